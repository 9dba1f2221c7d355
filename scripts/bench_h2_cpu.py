#!/usr/bin/env python3
"""CPU per HTTP/2 request of the node proxy's h2 path, on loopback.

h2load (-c32 -m10 by default, a fixed number of requests) -> one H2Session
server (agent.proxy.h2glue, one endpoint, retries off) in a process of its
own -> nginx speaking h2c (``return 200``, 3 bytes).  Reports the proxy
process's CPU time per request (from /proc: steadier than req/s on a busy
machine) and h2load's req/s; ``--profile FILE`` runs the proxy under cProfile
and writes its stats (``python -m pstats FILE``).  A benchmark, not a test.

    .venv/bin/python scripts/bench_h2_cpu.py [--requests 30000] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from bench_l7 import _cpu_seconds, _free_port, _start, _stop, _wait_port  # scripts/, next to this file
from benchtools import write_nginx_conf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(listen: int, upstream: int, seconds: float, profile: str | None) -> None:
    import asyncio
    import signal

    import uvloop

    sys.path.insert(0, ROOT)
    from agent.proxy.h2glue import H2Pool, H2Session
    from agent.proxy.pool import UpstreamPool
    from agent.traffic.trafficpolicy import Retries, TrafficSettings
    from agent.traffic.upstream_cluster import Cluster

    cluster = Cluster.single(("127.0.0.1", upstream), TrafficSettings(retries=Retries(attempts=0)))
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        pool = H2Pool(UpstreamPool())
        srv = await loop.create_server(
            lambda: H2Session(lambda head: cluster, pool, on_response=lambda *a: None), "127.0.0.1", listen
        )
        async with srv:
            await asyncio.wait_for(stop, seconds)

    if prof is not None:
        prof.enable()
    try:
        uvloop.run(main())
    except TimeoutError:
        pass
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)


def _h2load(port: int, n: int, clients: int, streams: int) -> tuple[float | None, str]:
    r = subprocess.run(["h2load", "-c", str(clients), "-m", str(streams), "-t", "1", "-n", str(n),
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=600)
    m = re.search(r"finished in [^,]+, ([\d.]+) req/s", r.stdout)
    done = re.search(r"requests: .*", r.stdout)
    return (float(m.group(1)) if m else None), (done.group(0) if done else (r.stdout + r.stderr)[-300:])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        prof = sys.argv[5] if len(sys.argv) > 5 else None
        _serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), prof)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--profile")
    a = ap.parse_args()
    for tool in ("h2load", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is not installed")
    tmp = tempfile.mkdtemp(prefix="meshlet-bench-h2cpu-")
    procs: list[subprocess.Popen] = []
    try:
        up = _free_port()
        conf = write_nginx_conf(tmp, [f"127.0.0.1:{up} http2"], "ok\n", worker_connections=4096,
                                keepalive_timeout="60s")
        nginx = _start(["nginx", "-e", os.path.join(tmp, "error.log"), "-p", tmp, "-c", conf],
                       os.path.join(tmp, "nginx.out"))
        procs.append(nginx)
        _wait_port(up, nginx)
        port = _free_port()
        argv = [sys.executable, os.path.abspath(__file__), "--serve", str(port), str(up), "900"]
        if a.profile:
            argv.append(os.path.abspath(a.profile))
        proxy = _start(argv, os.path.join(tmp, "proxy.log"))
        procs.append(proxy)
        _wait_port(port, proxy)
        _h2load(port, 2000, a.clients, a.streams)  # warm up
        c0 = _cpu_seconds(proxy.pid)
        rps, line = _h2load(port, a.requests, a.clients, a.streams)
        cpu = _cpu_seconds(proxy.pid) - c0
        load = os.getloadavg()
        print(f"h2load -c{a.clients} -m{a.streams} -n{a.requests}: {rps or 0:,.0f} req/s; {line}")
        print(f"proxy CPU: {cpu * 1e6 / a.requests:.0f} us/request "
              f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs)")
        _stop(proxy)
        procs.remove(proxy)
        if a.profile:
            print(f"profile: {a.profile}")
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
