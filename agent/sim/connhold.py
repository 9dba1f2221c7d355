"""Many concurrent connections, held open: the connection-scale load of the
privileged tests and ``scripts/bench_conns.py``.

    python -m agent.sim.connhold serve --port P
        asyncio echo server; prints {"listening": P}; serves until killed.
    python -m agent.sim.connhold hold HOST PORT --count N [--parallel K]
        opens N connections (at most K connecting at once), proves each one
        with a one-byte echo, prints {"held": ok, "failed": n, "errors": {...}},
        then waits for a line on stdin; on "close" it closes them all and
        prints {"closed": n} (the echo server sees EOF on each).

Both raise their own open-files soft limit to the hard limit.  Counts, not
times, are the output: a failed connection is named by its error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from collections import Counter


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _say(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


async def serve(port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(echo, None, port, backlog=4096, reuse_address=True)  # v4 and v6
    _say({"listening": port})
    async with srv:
        await srv.serve_forever()


async def hold(host: str, port: int, count: int, parallel: int, timeout: float) -> None:
    held: list[asyncio.StreamWriter] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(b"x")
                    if await reader.readexactly(1) != b"x":
                        raise ConnectionError("wrong echo")
                held.append(writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                errors[type(e).__name__] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    _say({"held": len(held), "failed": sum(errors.values()), "errors": dict(errors)})
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() == "close":
        for w in held:
            w.close()
        await asyncio.sleep(0.5)
        _say({"closed": len(held)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.sim.connhold")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--parallel", type=int, default=100)
    h.add_argument("--timeout", type=float, default=60.0, help="per connection (a bound, not a claim)")
    a = ap.parse_args(argv)
    _raise_nofile()
    if a.cmd == "serve":
        asyncio.run(serve(a.port))
    else:
        asyncio.run(hold(a.host, a.port, a.count, a.parallel, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
