"""Tiny traffic tools run inside simulated pods (tests, demo, benchmark).

    python -m agent.sim.tools serve --port 7000 [--bind ::]
    python -m agent.sim.tools transfer HOST PORT --up BYTES --down BYTES

The transfer protocol checks both directions and half-close: the client sends
a JSON header line {"down": N, "seed": S}, then BYTES of seeded random data,
then shuts down its write side.  The server reads to EOF, hashes what it got,
answers one JSON line {"received", "sha256", "peer"} and then N seeded bytes,
and closes.  The client verifies both hashes and prints one JSON result line;
exit status 0 only if everything arrived intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


def seeded_chunks(seed: int, total: int):
    rnd = random.Random(seed)
    left = total
    while left > 0:
        n = min(CHUNK, left)
        yield rnd.randbytes(n)
        left -= n


def _handle(conn: socket.socket, peer) -> None:
    with conn:
        conn.settimeout(60)
        f = conn.makefile("rb")
        header = json.loads(f.readline(4096))
        h = hashlib.sha256()
        received = 0
        while True:
            b = f.read1(CHUNK)
            if not b:
                break
            h.update(b)
            received += len(b)
        reply = {"received": received, "sha256": h.hexdigest(), "peer": peer[0].removeprefix("::ffff:")}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        for chunk in seeded_chunks(int(header.get("seed", 0)) + 1, int(header.get("down", 0))):
            conn.sendall(chunk)


def accept_loop(handler, port: int, bind: str, max_seconds: float) -> None:
    """Listen (dual-stack for an IPv6 ``bind``), print {"listening": port},
    and run ``handler(conn, peer)`` in a thread per connection until
    ``max_seconds`` have passed."""
    v6 = ":" in bind
    s = socket.create_server(
        (bind, port), family=socket.AF_INET6 if v6 else socket.AF_INET, dualstack_ipv6=v6, backlog=128
    )
    s.settimeout(1.0)
    print(json.dumps({"listening": port}), flush=True)
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        try:
            conn, peer = s.accept()
        except TimeoutError:
            continue
        # Served like an event-loop server (nginx, Go, asyncio) would: with a
        # timeout the socket is non-blocking underneath and Python waits in
        # poll(), so a recv() woken without data retries.  A plain blocking
        # socket would see that wake-up as EAGAIN on a spliced same-node
        # connection (the kernel's sockmap receive path; see README, "Known
        # limits") and the handler thread would die of it.
        conn.settimeout(max_seconds)
        threading.Thread(target=handler, args=(conn, peer), daemon=True).start()


def _echo(conn: socket.socket, peer) -> None:
    with conn:
        while True:
            b = conn.recv(65536)
            if not b:
                return
            conn.sendall(b)


def session(host: str, port: int, timeout: float) -> int:
    """A long-lived connection driven from stdin: each line is sent and its
    echo printed as {"echo": ...}; any failure prints {"error": ...}."""
    s = socket.create_connection((host, port), timeout=timeout)
    print(
        json.dumps(
            {
                "connected": list(s.getsockname()[:2]),
                "peer": [s.getpeername()[0].removeprefix("::ffff:"), s.getpeername()[1]],
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        data = line.encode()
        try:
            s.sendall(data)
            got = b""
            while len(got) < len(data):
                b = s.recv(65536)
                if not b:
                    raise ConnectionError("connection closed")
                got += b
            print(json.dumps({"echo": got.decode().rstrip("\n")}), flush=True)
        except OSError as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
    s.close()
    return 0


def transfer(host: str, port: int, up: int, down: int, seed: int, timeout: float) -> dict:
    t0 = time.monotonic()
    s = socket.create_connection((host, port), timeout=timeout)
    with s:
        s.sendall(json.dumps({"down": down, "seed": seed}).encode() + b"\n")
        h_up = hashlib.sha256()
        for chunk in seeded_chunks(seed, up):
            h_up.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        f = s.makefile("rb")
        reply = json.loads(f.readline(4096))
        h_down, got = hashlib.sha256(), 0
        while True:
            b = f.read1(CHUNK)
            if not b:
                break
            h_down.update(b)
            got += len(b)
    want_down = hashlib.sha256()
    for chunk in seeded_chunks(seed + 1, down):
        want_down.update(chunk)
    return {
        "ok": reply["received"] == up
        and reply["sha256"] == h_up.hexdigest()
        and got == down
        and h_down.hexdigest() == want_down.hexdigest(),
        "up": up,
        "down": down,
        "server_received": reply["received"],
        "client_received": got,
        "server_saw_peer": reply["peer"],
        "seconds": round(time.monotonic() - t0, 3),
    }


#: Set by SIGTERM in ``connrate`` (the CLI's): finish the connection in
#: flight, then report what was done so far.
_stop = threading.Event()


def connrate(host: str, port: int, seconds: float, limit: int = 100_000) -> dict:
    """New connections per second: connect, one echo round trip, close;
    sequential, bounded by ``seconds`` and ``limit`` (and, from the command
    line, ended early by SIGTERM)."""
    ok = errors = 0
    lat = []
    kinds: dict[str, int] = {}  # how the failed ones failed, e.g. "recv: ConnectionResetError"
    start = time.monotonic()
    t_end = start + seconds
    while time.monotonic() < t_end and ok + errors < limit and not _stop.is_set():
        t0 = time.monotonic()
        step = "connect"
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                step = "send"
                s.sendall(b"x")
                step = "recv"
                got = s.recv(1)
                if got != b"x":
                    raise ConnectionError("no echo" if not got else f"echo {got!r}")
            ok += 1
            lat.append(time.monotonic() - t0)
        except OSError as e:
            errors += 1
            kind = f"{step}: {type(e).__name__}" + (f" ({e})" if type(e) is ConnectionError else "")
            kinds[kind] = kinds.get(kind, 0) + 1
    lat.sort()
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)) if lat else None
    return {
        "connections": ok,
        "errors": errors,
        "per_second": round(ok / max(time.monotonic() - start, 1e-6), 1),
        "p50_ms": pick(0.5) if pick else None,
        "p99_ms": pick(0.99) if pick else None,
        "error_kinds": kinds,
    }


def probe(host: str, port: int, timeout: float) -> dict:
    """Connect, send a line, and report how the connection ended."""
    t0 = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except ConnectionResetError:
        # The peer accepted and reset before connect() returned: with a
        # timeout, connect() is non-blocking plus SO_ERROR, so a reset that
        # fast (a same-node proxy refusing) shows here, not at the first recv.
        return {"result": "reset", "seconds": round(time.monotonic() - t0, 3)}
    except OSError as e:
        return {
            "result": "connect_error",
            "errno": e.errno,
            "error": str(e),
            "seconds": round(time.monotonic() - t0, 3),
        }
    with s:
        s.settimeout(timeout)
        try:
            s.sendall(b"hello\n")
            data = s.recv(100)
            result = "data" if data else "eof"
        except ConnectionResetError:
            result = "reset"
        except TimeoutError:
            result = "timeout"
        except OSError as e:
            result = f"error:{e.errno}"
    return {"result": result, "seconds": round(time.monotonic() - t0, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.sim.tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bind", default="::")
    s.add_argument("--max-seconds", type=float, default=600)
    t = sub.add_parser("transfer")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--up", type=int, default=1 << 20)
    t.add_argument("--down", type=int, default=1 << 20)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--timeout", type=float, default=30)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--bind", default="::")
    e.add_argument("--max-seconds", type=float, default=600)
    se = sub.add_parser("session")
    se.add_argument("host")
    se.add_argument("port", type=int)
    se.add_argument("--timeout", type=float, default=10)
    cr = sub.add_parser("connrate")
    cr.add_argument("host")
    cr.add_argument("port", type=int)
    cr.add_argument(
        "--seconds", type=float, default=3, help="at most this long (SIGTERM ends it early, with its report)"
    )
    cr.add_argument("--limit", type=int, default=100_000, help="stop after this many connections")
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        accept_loop(_handle, a.port, a.bind, a.max_seconds)
        return 0
    if a.cmd == "echo":
        accept_loop(_echo, a.port, a.bind, a.max_seconds)
        return 0
    if a.cmd == "session":
        return session(a.host, a.port, a.timeout)
    if a.cmd == "transfer":
        try:
            r = transfer(a.host, a.port, a.up, a.down, a.seed, a.timeout)
        except (OSError, ValueError) as e:
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(r), flush=True)
        return 0 if r["ok"] else 1
    if a.cmd == "connrate":
        signal.signal(signal.SIGTERM, lambda *_: _stop.set())
        print(json.dumps(connrate(a.host, a.port, min(a.seconds, 60), a.limit)), flush=True)
        return 0
    r = probe(a.host, a.port, a.timeout)
    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
