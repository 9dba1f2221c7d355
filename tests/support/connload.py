"""Connection load that counts where each connection went (lifecycle tests).

Run inside a pod against a ``serve`` tool (agent.sim.tools), which answers
every connection with the peer address it saw::

    python -m tests.support.connload HOST PORT --out FILE [--count N] [--stop-file F]

Opens connections one after another (connect, send the transfer header,
half-close, read the answer) until ``--count`` connections were made, the
stop file exists, or ``--max-seconds`` passed.  Every ``--every``
connections, and at the end, it rewrites ``--out`` (atomically) with one JSON
object: ``total``, ``peers`` ({address the server saw: count}), ``errors``
({errno name: count}) and ``done``.  A test tells meshed connections (the
peer is the delivering node proxy's address) from bypassed ones (the peer is
the client pod's own address) and counts refusals (EPERM from the kernel) and
resets.  Bounded in count and time, like every test tool.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import time
from collections import Counter


def one(host: str, port: int, timeout: float) -> str:
    """One connection: the peer address the server reports."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b'{"down": 0, "seed": 0}\n')
        s.shutdown(socket.SHUT_WR)
        f = s.makefile("rb")
        line = f.readline(4096)
        if not line:
            raise ConnectionResetError(errno.ECONNRESET, "closed before the answer")
        return str(json.loads(line)["peer"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.connload")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--stop-file")
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--timeout", type=float, default=5)
    ap.add_argument("--every", type=int, default=20)
    a = ap.parse_args(argv)
    peers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    total = 0

    def write(done: bool) -> None:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"total": total, "peers": dict(peers), "errors": dict(errors), "done": done}, f)
        os.replace(tmp, a.out)

    end = time.monotonic() + a.max_seconds
    write(False)
    while total < a.count and time.monotonic() < end:
        if a.stop_file and os.path.exists(a.stop_file):
            break
        try:
            peers[one(a.host, a.port, a.timeout)] += 1
        except OSError as e:
            errors[errno.errorcode.get(e.errno or 0, type(e).__name__)] += 1
            time.sleep(0.01)  # a refused connect returns at once: do not spin
        total += 1
        if total % a.every == 0:
            write(False)
    write(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
