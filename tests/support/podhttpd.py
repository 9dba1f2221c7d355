"""A small HTTP/1.1 server for pods in privileged tests (Python's http.server).

Answers every request with ``<name> <method> <path>`` and appends the same
line, plus the traceparent it got and every header line (``headers``:
``[[lower-case name, value], ...]``), to ``--log`` (one JSON line per request)
so tests assert on what the backend received.  ``--fail-first N`` answers
the first N requests with ``--fail-status`` (default 503); ``--delay`` sleeps
before answering.  Stops after ``--max-seconds``.

    python -m tests.support.podhttpd --name web-1 --port 7000 --log /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--max-seconds", type=float, default=300)
    a = ap.parse_args()
    lock = threading.Lock()
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 65536  # head and body in one write (flushed after each request)
        disable_nagle_algorithm = True

        def log_message(self, *args):  # quiet
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body_in = self.rfile.read(length) if length else b""
            with lock:
                count[0] += 1
                n = count[0]
                with open(a.log, "a") as f:
                    f.write(json.dumps({"n": n, "method": self.command, "path": self.path,
                                        "traceparent": self.headers.get("traceparent"),
                                        "x-request-id": self.headers.get("x-request-id"),
                                        "headers": [[k.lower(), v] for k, v in self.headers.items()],
                                        "body": len(body_in)}) + "\n")
            if a.delay:
                time.sleep(a.delay)
            status = a.fail_status if n <= a.fail_first else 200
            body = f"{a.name} {self.command} {self.path}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    srv = Server(("::", a.port), Handler)
    threading.Timer(a.max_seconds, srv.shutdown).start()
    print("listening", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
