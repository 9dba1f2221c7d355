"""A small OTLP/HTTP trace receiver for tests: decodes each
``ExportTraceServiceRequest`` with the official ``opentelemetry-proto``
messages and keeps every span as a plain dict (hex ids, attributes).

In-process: ``with OtlpSink() as sink: ... sink.spans``.  As a process (in a
simulated node's network namespace)::

    python -m tests.support.otlpsink --listen 198.18.0.1 --port 4318 --out spans.jsonl
    python -m tests.support.otlpsink ... --hang   # accepts, reads, never answers

prints ``listening`` once it accepts connections; with ``--out`` every span
becomes one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return None if which is None else getattr(v, which)


def decode(body: bytes) -> list[dict[str, Any]]:
    """The spans of one export request, as dicts."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "trace_state": s.trace_state,
                        "name": s.name,
                        "kind": KINDS.get(s.kind, str(s.kind)),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": {0: "unset", 1: "ok", 2: "error"}.get(s.status.code, "?"),
                        "status_message": s.status.message,
                        "attributes": {a.key: _value(a.value) for a in s.attributes},
                        "resource": resource,
                        "scope": ss.scope.name,
                    }
                )
    return out


class OtlpSink:
    """An in-process receiver on ``host`` (a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, out: str | None = None) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ctype = self.headers.get("Content-Type")
                ok = self.path == "/v1/traces" and ctype == "application/x-protobuf"
                if ok:
                    spans = decode(body)
                    with sink._lock:
                        sink.requests += 1
                        sink.spans += spans
                        if out is not None:
                            with open(out, "a") as f:
                                for s in spans:
                                    f.write(json.dumps(s) + "\n")
                resp = ExportTraceServiceResponse().SerializeToString() if ok else b"bad request\n"
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def wait(self, pred, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Spans once ``pred(spans)`` holds (AssertionError after ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if pred(spans):
                return spans
            if time.monotonic() > end:
                raise AssertionError(f"the collector did not get the expected spans; it has {spans}")
            time.sleep(0.05)


class HangingCollector:
    """Accepts connections and reads requests, never answers (a slow collector)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1/traces"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(c)  # held open, never answered

    def __enter__(self) -> HangingCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._held:
            c.close()
        self.sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", help="append every span received as a JSON line")
    ap.add_argument("--hang", action="store_true", help="accept and never answer")
    ap.add_argument("--max-seconds", type=float, default=600)
    a = ap.parse_args()
    sink: OtlpSink | HangingCollector
    sink = HangingCollector(a.listen, a.port) if a.hang else OtlpSink(a.listen, a.port, a.out)
    with sink:
        print("listening", flush=True)
        time.sleep(a.max_seconds)


if __name__ == "__main__":
    main()
