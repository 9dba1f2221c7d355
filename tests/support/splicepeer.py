"""Pod-side peers for tests/privileged/test_splice.py (run inside pods).

    python -m tests.support.splicepeer serve --port P
    python -m tests.support.splicepeer bulk HOST PORT --up N --down M --after K
    python -m tests.support.splicepeer reset HOST PORT

Each connection opens with one round trip (``hello`` -> ``ready``), so the
proxy has decided the connection, and spliced it, before the bulk starts.

bulk: both ways at once (the client sends N seeded bytes while the server
sends M), then the client half-closes; the server, on EOF, sends K more
bytes, one JSON line of what it received (count, sha256), and closes.  The
client checks every byte it got and prints one JSON line (``ok``).
reset: the server sends 64 KiB, then closes with RST (SO_LINGER 0); the
client reads and reports whether it saw a reset or a clean EOF.
"""

from __future__ import annotations

import argparse
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


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(60)
        req = json.loads(_readline(conn))
        conn.sendall(b"ready\n")
        if req["mode"] == "reset":
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


def serve(port: int) -> int:
    ls = socket.create_server(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def bulk(host: str, port: int, up: int, down: int, after: int) -> dict:
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(json.dumps({"mode": "bulk", "down": down, "after": after}).encode() + b"\n")
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
    sent = hashlib.sha256()
    for chunk in _stream(1, up):
        s.sendall(chunk)
        sent.update(chunk)
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


def reset(host: str, port: int) -> dict:
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(json.dumps({"mode": "reset"}).encode() + b"\n")
    assert _readline(s) == b"ready\n"
    n = 0
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                return {"outcome": "eof", "received": n}
            n += len(b)
    except ConnectionResetError:
        return {"outcome": "reset", "received": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("--port", type=int, required=True)
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--up", type=int, required=True)
    b.add_argument("--down", type=int, required=True)
    b.add_argument("--after", type=int, required=True)
    r = sub.add_parser("reset")
    r.add_argument("host")
    r.add_argument("port", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.port)
    out = bulk(a.host, a.port, a.up, a.down, a.after) if a.cmd == "bulk" else reset(a.host, a.port)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
