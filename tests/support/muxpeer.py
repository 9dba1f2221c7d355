"""Pod-side servers and clients for the multiplexed tunnel tests
(tests/privileged/test_tunnel_mux.py); run inside pods::

    python -m tests.support.muxpeer gate PORT --gate FILE  # transfer server: reads once FILE exists
    python -m tests.support.muxpeer rst PORT               # reads one line, then resets (SO_LINGER 0)
    python -m tests.support.muxpeer many HOST PORT --count N  # N transfers open at once, checksummed
    python -m tests.support.muxpeer expect-reset HOST PORT   # sends a line: RESET / EOF / DATA

Servers print a first line with "listening" and run for ``--max-seconds``;
clients print one JSON line.  Bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

from agent.sim.tools import _handle, accept_loop


def gate(port: int, gate_file: str, max_seconds: float) -> None:
    def handler(conn: socket.socket, peer) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        _handle(conn, peer)

    accept_loop(handler, port, "::", max_seconds)


def rst(port: int, max_seconds: float) -> None:
    def handler(conn: socket.socket, _peer) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        f.readline(4096)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    accept_loop(handler, port, "::", max_seconds)


def many(host: str, port: int, count: int, size: int) -> dict:
    """``count`` transfers (``size`` bytes up and down), all connected before any finishes."""
    socks = [socket.create_connection((host, port), timeout=30) for _ in range(count)]
    results: list[bool] = []
    lock = threading.Lock()

    def one(i: int, s: socket.socket) -> None:
        ok = False
        try:
            with s:
                payload = bytes([i % 251]) * size
                s.sendall(json.dumps({"down": 0, "seed": 0}).encode() + b"\n" + payload)
                s.shutdown(socket.SHUT_WR)
                reply = json.loads(s.makefile("rb").readline(4096))
                ok = reply["received"] == size and reply["sha256"] == hashlib.sha256(payload).hexdigest()
        except OSError:
            ok = False
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return {"count": count, "ok": sum(results)}


def expect_reset(host: str, port: int) -> dict:
    s = socket.create_connection((host, port), timeout=30)
    with s:
        s.sendall(b"hello\n")
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            return {"outcome": "RESET"}
        return {"outcome": "DATA" if data else "EOF"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gate")
    g.add_argument("port", type=int)
    g.add_argument("--gate", required=True)
    g.add_argument("--max-seconds", type=float, default=600)
    r = sub.add_parser("rst")
    r.add_argument("port", type=int)
    r.add_argument("--max-seconds", type=float, default=600)
    m = sub.add_parser("many")
    m.add_argument("host")
    m.add_argument("port", type=int)
    m.add_argument("--count", type=int, default=40)
    m.add_argument("--size", type=int, default=4096)
    e = sub.add_parser("expect-reset")
    e.add_argument("host")
    e.add_argument("port", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "gate":
        gate(a.port, a.gate, a.max_seconds)
    elif a.cmd == "rst":
        rst(a.port, a.max_seconds)
    elif a.cmd == "many":
        print(json.dumps(many(a.host, a.port, a.count, a.size)), flush=True)
    else:
        print(json.dumps(expect_reset(a.host, a.port)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
