"""Pod-side peers for tests/privileged/test_splice.py (run inside pods).

    python -m tests.support.splicepeer serve --port P [--log FILE] [--accepted FILE]
    python -m tests.support.splicepeer bulk HOST PORT --up N --down M --after K [--early E] [--hold]
    python -m tests.support.splicepeer reset HOST PORT
    python -m tests.support.splicepeer echo HOST PORT

Each connection opens with one round trip (``hello`` -> ``ready``), so the
proxy has decided the connection, and spliced it, before the bulk starts.
``--early E`` sends the first E bytes of the client's stream right behind
``hello``, before ``ready``: they reach the proxy before it has decided, so
they go through its userspace relay, and the rest of the stream after them.
``--hold``: once all is sent, print the socket's addresses (one JSON line)
and wait for a line on stdin before the half-close (the test reads the
kernel's counts of a live connection meanwhile).

bulk: both ways at once (the client sends N seeded bytes while the server
sends M), then the client half-closes; the server, on EOF, sends K more
bytes, one JSON line of what it received (count, sha256), and closes.  The
client checks every byte it got and prints one JSON line (``ok``).
reset: after ``ready`` the client sends one more line, then the server sends
64 KiB and closes with RST (SO_LINGER 0); the client reads and reports
whether it saw a reset or a clean EOF.  (A server that reset right after
``ready`` could beat the proxy's splice of the connection.)
echo: lines from stdin are sent and echoed back (printed as JSON, or
``{"error": ...}`` once the connection is gone); the server appends how its
echo session ended (``reset``, ``eof``) to ``--log``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import struct
import sys
import threading

CHUNK = 64 * 1024


def _stream(seed: int, total: int):
    rnd = random.Random(seed)
    left = total
    while left > 0:
        n = min(CHUNK, left)
        yield rnd.randbytes(n)
        left -= n


def _readline(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise ConnectionError("closed before a line")
        buf += b
    return buf


def _serve_one(conn: socket.socket, log: str | None, accepted: str | None = None) -> None:
    with conn:
        if accepted:  # the accepted socket's own 4-tuple, for tests that look it up in BPF maps
            with open(accepted, "a") as f:
                local, peer = conn.getsockname(), conn.getpeername()
                f.write(json.dumps({"local": list(local[:2]), "peer": list(peer[:2])}) + "\n")
        conn.settimeout(60)
        req = json.loads(_readline(conn))
        conn.sendall(b"ready\n")
        if req["mode"] == "echo":
            try:
                while True:
                    b = conn.recv(65536)
                    if not b:
                        outcome = "eof"
                        break
                    conn.sendall(b)
            except ConnectionResetError:
                outcome = "reset"
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps({"echo": outcome}) + "\n")
            return
        if req["mode"] == "reset":
            _readline(conn)  # "go": the client saw "ready", the proxy has spliced by now
            conn.sendall(b"r" * CHUNK)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        got = {"n": 0, "h": hashlib.sha256()}

        def receive() -> None:
            while True:
                b = conn.recv(1 << 20)
                if not b:
                    return
                got["n"] += len(b)
                got["h"].update(b)

        t = threading.Thread(target=receive)
        t.start()
        for chunk in _stream(2, req["down"]):
            conn.sendall(chunk)
        t.join()
        # the client half-closed: this direction keeps flowing
        for chunk in _stream(3, req["after"]):
            conn.sendall(chunk)
        conn.sendall(json.dumps({"received": got["n"], "sha256": got["h"].hexdigest()}).encode() + b"\n")


def serve(port: int, log: str | None, accepted: str | None = None) -> int:
    ls = socket.create_server(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_one, args=(conn, log, accepted), daemon=True).start()


def bulk(host: str, port: int, up: int, down: int, after: int, early: int = 0, hold: bool = False) -> dict:
    stream = b"".join(_stream(1, up))
    s = socket.create_connection((host, port), timeout=60)
    hello = json.dumps({"mode": "bulk", "down": down, "after": after}).encode() + b"\n"
    # One send: the proxy has not decided the connection yet, so all of it
    # goes through its relay.
    s.sendall(hello + stream[:early])
    assert _readline(s) == b"ready\n"
    want = hashlib.sha256()
    for chunk in _stream(2, down):
        want.update(chunk)
    for chunk in _stream(3, after):
        want.update(chunk)
    got = bytearray()

    def receive() -> None:
        while True:
            b = s.recv(1 << 20)
            if not b:
                return
            got.extend(b)

    t = threading.Thread(target=receive)
    t.start()
    sent = hashlib.sha256(stream)
    for i in range(early, up, CHUNK):
        s.sendall(stream[i : i + CHUNK])
    if hold:
        local, peer = s.getsockname(), s.getpeername()
        print(json.dumps({"local": list(local[:2]), "peer": list(peer[:2])}), flush=True)
        sys.stdin.readline()
    s.shutdown(socket.SHUT_WR)
    t.join()
    s.close()
    body_len = down + after
    data, report = bytes(got[:body_len]), bytes(got[body_len:])
    rep = json.loads(report) if report.endswith(b"\n") else {}
    ok = (
        len(got) > body_len
        and hashlib.sha256(data).hexdigest() == want.hexdigest()
        and rep.get("received") == up
        and rep.get("sha256") == sent.hexdigest()
    )
    return {"ok": ok, "received": len(data), "server": rep}


@contextlib.contextmanager
def held(client):
    """The test's side of ``bulk --hold``: the client (a Popen with text
    pipes) is killed on the way out if it is still running (a failed
    assertion before ``release``)."""
    try:
        yield client
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def release(client) -> dict:
    """Let the held client finish; its report (``ok``, ...)."""
    client.stdin.write("go\n")
    client.stdin.flush()
    out, _ = client.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def reset(host: str, port: int) -> dict:
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(json.dumps({"mode": "reset"}).encode() + b"\n")
    assert _readline(s) == b"ready\n"
    s.sendall(b"go\n")  # past the proxy, spliced
    n = 0
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                return {"outcome": "eof", "received": n}
            n += len(b)
    except ConnectionResetError:
        return {"outcome": "reset", "received": n}


def echo(host: str, port: int) -> int:
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(json.dumps({"mode": "echo"}).encode() + b"\n")
    assert _readline(s) == b"ready\n"
    print(json.dumps({"connected": True}), flush=True)
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            got = _readline(s)
        except OSError as e:
            print(json.dumps({"error": str(e) or type(e).__name__}), flush=True)
            continue
        print(json.dumps({"echo": got.decode().strip()}), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--port", type=int, required=True)
    sv.add_argument("--log")
    sv.add_argument("--accepted", help="append each accepted socket's local and peer address here")
    e = sub.add_parser("echo")
    e.add_argument("host")
    e.add_argument("port", type=int)
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--up", type=int, required=True)
    b.add_argument("--down", type=int, required=True)
    b.add_argument("--after", type=int, required=True)
    b.add_argument("--early", type=int, default=0)
    b.add_argument("--hold", action="store_true")
    r = sub.add_parser("reset")
    r.add_argument("host")
    r.add_argument("port", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.port, a.log, a.accepted)
    if a.cmd == "echo":
        return echo(a.host, a.port)
    out = (
        bulk(a.host, a.port, a.up, a.down, a.after, a.early, a.hold)
        if a.cmd == "bulk"
        else reset(a.host, a.port)
    )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
