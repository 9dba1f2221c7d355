#!/usr/bin/env python3
"""L7 proxy benchmark on loopback: what the node proxy's HTTP path costs.

One run, measured back to back with ``wrk -t1 --latency`` against the same
upstream, each proxy in a process of its own (one core each, as a worker):

    direct         wrk -> upstream
    relay-l4       wrk -> minimal uvloop byte relay (no parsing) -> upstream
    l7             wrk -> meshlet L7Session (agent.proxy.l7) -> upstream:
                   parse, normalize, framing checks, trace headers, pool;
                   one endpoint, retries off
    l7-lb-retries  the same with a two-endpoint cluster (P2C) and the
                   default retry policy (attempts 2, budget), when the L7
                   session speaks clusters (agent.traffic.upstream_cluster):
                   the source side of a service VIP
    l7-policy      ``l7`` with the destination side's per-request
                   authorization: an ALLOW rule with HTTP fields (so the
                   connection is not allowed as TCP and every request is
                   evaluated, ``agent.proxy.l7authz``) and a DENY rule, as
                   ``Destination.on_http_request`` runs them

The upstream is **nginx** (Debian package) with a temporary config on
127.0.0.1, one worker, ``return 200`` of a 3-byte body, keep-alive without
a request limit; the two-endpoint cluster uses two of its listening ports.
Reported per path: req/s, p50/p99 latency (ms), the ratio of req/s to
direct, and for the proxies the CPU time their process used per request
(from /proc; steadier than req/s on a busy machine). This is a benchmark,
not a test: compare ratios within one run.

    .venv/bin/python scripts/bench_l7.py [--duration 5] [--connections 32] [--json FILE]
                                         [--paths l7,l7-policy] [--profile DIR] [--python-only]

``--profile DIR`` runs each L7 server under cProfile and writes
``DIR/<path>.prof`` (read with ``python -m pstats``); its numbers are then
inflated by the profiler, so compare CPU µs/request without it.
``--python-only`` measures the L7 session's own Python work per request
(no sockets: transports that count bytes, upstream connections pooled
already), the steadiest number on a shared machine.

Importable: ``run(duration, connections) -> dict``. Everything it starts is
stopped (process groups) and its temp directory removed, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchtools import parse_wrk, write_nginx_conf  # scripts/, next to this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATHS = ("direct", "relay-l4", "l7", "l7-lb-retries", "l7-policy")

#: The destination's policies for ``l7-policy``: the client's identity and
#: the ALLOW rule's HTTP fields make every request go through evaluation.
POLICY = """
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-api, namespace: bench}
spec:
  selector: {matchLabels: {app: upstream}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bench/sa/client"]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/", "/api/*"]}}]
---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: bench}
spec:
  selector: {matchLabels: {app: upstream}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"""



# ---------------------------------------------------------------------------
# the servers (run in child processes: `bench_l7.py --serve KIND ...`)

def _serve_relay(listen: int, upstream: int, seconds: float) -> None:
    import asyncio

    import uvloop

    up_addr = ("127.0.0.1", upstream)

    class Up(asyncio.Protocol):
        def __init__(self, down: Down) -> None:
            self.down = down

        def connection_made(self, t) -> None:
            self.t = t

        def data_received(self, d: bytes) -> None:
            self.down.t.write(d)

        def connection_lost(self, exc) -> None:
            self.down.t.close()

    class Down(asyncio.Protocol):
        def connection_made(self, t) -> None:
            self.t = t
            self.up: Up | None = None
            self.buf: list[bytes] = []
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), *up_addr)
            except OSError:
                self.t.close()
                return
            for b in self.buf:
                self.up.t.write(b)
            self.buf = []

        def data_received(self, d: bytes) -> None:
            if self.up is not None:
                self.up.t.write(d)
            else:
                self.buf.append(d)

        def connection_lost(self, exc) -> None:
            if self.up is not None:
                self.up.t.close()

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", listen)
        async with srv:
            await asyncio.sleep(seconds)

    uvloop.run(main())


def _policy_hook():
    """``on_request`` as the destination side runs it (``Destination.on_http_request``,
    without its logging and counters): one authorizer per connection."""
    from agent.policy.evaluate import Decision
    from agent.policy.load import parse_policies
    from agent.proxy.l7 import Response
    from agent.proxy.l7authz import DENIED_BODY, RequestAuthorizer

    ps = parse_policies(POLICY, "bench-policy.yaml")

    def new_hook():
        az = RequestAuthorizer(lambda: ps, identity="spiffe://cluster.local/ns/bench/sa/client",
                               src_ip="10.0.0.9", namespace="bench", labels={"app": "upstream"},
                               port=80, tcp_allowed=False)

        def on_request(head):
            d = az.decide(head.method, head.path.path, head.host, head.headers, head.path.query)
            if d is None or (type(d) is Decision and d.allowed):
                return None
            return Response(403, DENIED_BODY, [(b"Content-Type", b"text/plain")])

        return on_request

    return new_hook


def _serve_l7(listen: int, upstreams: list[int], kind: str, seconds: float, profile: str | None) -> None:
    import asyncio

    import uvloop

    sys.path.insert(0, ROOT)
    from agent.proxy import l7

    targets = [("127.0.0.1", p) for p in upstreams]
    lb = kind == "l7-lb"
    try:
        from agent.traffic.upstream_cluster import Cluster  # the L7 session speaks clusters
    except ImportError:  # older session: the chooser returns an address
        Cluster = None  # type: ignore[assignment]

    if Cluster is not None and hasattr(Cluster, "single"):
        from agent.traffic.trafficpolicy import Retries, TrafficSettings
        if lb:
            cluster = Cluster("bench/upstream:80", targets, TrafficSettings())  # default retries
        else:
            cluster = Cluster.single(targets[0], TrafficSettings(retries=Retries(attempts=0)))

        def choose(head):
            return cluster
    else:
        if lb:
            raise SystemExit("this L7 session has no clusters: no load-balanced variant")
        addr = targets[0]

        def choose(head):
            return addr

    async def main() -> None:
        pool = l7.UpstreamPool()
        if kind == "l7-policy":
            new_hook = _policy_hook()

            def factory():
                return l7.L7Session(choose, pool, on_request=new_hook(), on_response=lambda *a: None)
        else:
            factory = l7.session_factory(choose, pool, on_response=lambda *a: None)
        srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", listen)
        async with srv:
            await asyncio.sleep(seconds)

    if profile is None:
        uvloop.run(main())
        return
    import cProfile
    import signal as _signal

    prof = cProfile.Profile(time.process_time)  # CPU, not wall time: the machine may be busy

    def _dump(*_a) -> None:
        prof.disable()
        prof.dump_stats(profile)
        os._exit(0)

    _signal.signal(_signal.SIGTERM, _dump)  # the driver stops servers with SIGTERM
    prof.enable()
    uvloop.run(main())
    _dump()


# ---------------------------------------------------------------------------
# the Python cost alone: no sockets, no kernel, no load generator

_REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends
_RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 21:00:00 GMT\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")  # nginx's


class _NullTransport:
    """Just enough of an asyncio transport for the L7 session: writes are counted."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, pieces) -> None:
        for d in pieces:
            self.written += len(d)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close


def python_cost(kind: str, requests: int = 20000, rounds: int = 5) -> float:
    """CPU µs per request of the L7 session's own Python work for ``kind``
    (``l7``, ``l7-lb-retries``, ``l7-policy``): one keep-alive client, the
    upstream connections already pooled, transports that only count bytes.
    The least of ``rounds`` rounds (the others were disturbed)."""

    import uvloop

    sys.path.insert(0, ROOT)
    from agent.proxy import l7
    from agent.proxy.pool import _Upstream
    from agent.traffic.trafficpolicy import Retries, TrafficSettings
    from agent.traffic.upstream_cluster import Cluster

    targets = [("127.0.0.1", 8081), ("127.0.0.1", 8082)]
    if kind == "l7-lb-retries":
        cluster = Cluster("bench/upstream:80", targets, TrafficSettings())
    else:
        cluster = Cluster.single(targets[0], TrafficSettings(retries=Retries(attempts=0)))
    on_request = _policy_hook()() if kind == "l7-policy" else None

    async def main() -> float:
        pool = l7.UpstreamPool()
        for t in cluster.targets:
            up = _Upstream(pool, t)
            up.connection_made(_NullTransport())
            pool.release(up)
        session = l7.L7Session(lambda head: cluster, pool, on_request=on_request,
                               on_response=lambda *a: None)
        client = _NullTransport()
        session.connection_made(client)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(requests):
                session.data_received(_REQ)
                up = session._up
                up.data_received(_RESP)
            best = min(best, time.process_time() - t0)
            if session._up is not None or client.closing:
                raise RuntimeError(f"{kind}: the session did not finish its requests")
        if client.written < len(b"HTTP/1.1 200 OK\r\n\r\nok\n") * requests * rounds:
            raise RuntimeError(f"{kind}: responses were not written ({client.written} bytes)")
        return best / requests * 1e6

    return uvloop.run(main())


# ---------------------------------------------------------------------------
# the driver

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _start(argv: list[str], log_path: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)  # own process group: killed as a whole


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
    else:
        try:  # the leader is gone; children of its group may not be
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(port: int, duration: float, connections: int) -> dict:
    d = max(1, round(duration))
    r = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{d}s", "--latency",
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=d + 30)
    res = parse_wrk(r.stdout)
    if res["rps"] is None:
        res["errors"] = (r.stderr or r.stdout).strip()[-300:]
    return res


def _has_clusters() -> bool:
    return os.path.exists(os.path.join(ROOT, "agent", "traffic", "upstream_cluster.py"))


def run(duration: float, connections: int, paths: tuple[str, ...] = PATHS,
        profile: str | None = None) -> dict:
    """Measure every path once; returns {"upstream", "wrk", "paths": {name: result}}.

    A result has rps, p50_ms, p99_ms, errors and ratio (rps / direct rps)."""
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (Debian: apt-get install {tool})")
    tmp = tempfile.mkdtemp(prefix="meshlet-bench-l7-")
    procs: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    # each server lives at most this long, even if this process dies without cleaning up
    lifetime = 4 * (duration + 5) * len(PATHS) + 60
    try:
        up1, up2 = _free_port(), _free_port()
        conf = write_nginx_conf(tmp, [f"127.0.0.1:{up1}", f"127.0.0.1:{up2}"], "ok\n",
                                worker_connections=4096, keepalive_timeout="60s")
        nginx = _start(["nginx", "-e", os.path.join(tmp, "error.log"), "-p", tmp, "-c", conf],
                       os.path.join(tmp, "nginx.out"))
        procs.append(nginx)
        _wait_port(up1, nginx)
        _wait_port(up2, nginx)

        me = os.path.abspath(__file__)
        py = sys.executable
        servers = {
            "relay-l4": ["--serve", "relay", str(up1)],
            "l7": ["--serve", "l7", str(up1)],
            "l7-lb-retries": ["--serve", "l7-lb", f"{up1},{up2}"],
            "l7-policy": ["--serve", "l7-policy", str(up1)],
        }
        for name in paths:
            if name == "direct":
                port = up1
            else:
                if name == "l7-lb-retries" and not _has_clusters():
                    results[name] = {"skipped": "the L7 session has no clusters yet"}
                    continue
                port = _free_port()
                argv = [py, me, *servers[name][:2], str(port), servers[name][2], str(lifetime)]
                if profile is not None and name != "relay-l4":
                    argv.append(os.path.join(os.path.abspath(profile), f"{name}.prof"))
                proc = _start(argv, os.path.join(tmp, f"{name}.log"))
                procs.append(proc)
                _wait_port(port, proc)
            _wrk(port, 1, connections)  # warm up: pools filled, code paths hot
            cpu0 = _cpu_seconds(procs[-1].pid) if name != "direct" else None
            results[name] = r = _wrk(port, duration, connections)
            if cpu0 is not None and r.get("requests"):
                # CPU the proxy process spent per request: unlike req/s, this
                # does not depend on what else the machine is running
                r["cpu_us_per_req"] = round((_cpu_seconds(procs[-1].pid) - cpu0) / r["requests"] * 1e6, 1)
            if name != "direct":
                _stop(procs.pop())
                log_path = os.path.join(tmp, f"{name}.log")
                with open(log_path, errors="replace") as f:
                    tail = f.read()[-400:].strip()
                if tail:
                    results[name]["log"] = tail
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    base = results.get("direct", {}).get("rps")
    for r in results.values():
        if base and r.get("rps"):
            r["ratio"] = round(r["rps"] / base, 3)
    return {"upstream": "nginx (Debian), 1 worker, return 200 'ok\\n', keep-alive",
            "wrk": f"-t1 -c{connections} -d{max(1, round(duration))}s --latency", "paths": results}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        kind, listen, ups, seconds = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
        prof = sys.argv[6] if len(sys.argv) > 6 else None
        if kind == "relay":
            _serve_relay(listen, int(ups), seconds)
        else:
            _serve_l7(listen, [int(p) for p in ups.split(",")], kind, seconds, prof)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5, help="seconds per path (wrk -d)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--profile", metavar="DIR",
                    help="run the L7 servers under cProfile, stats in DIR/<path>.prof")
    ap.add_argument("--python-only", action="store_true",
                    help="measure only the L7 session's Python CPU per request, without sockets")
    a = ap.parse_args()
    paths = tuple(a.paths.split(","))
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    if a.python_only:
        for name in paths:
            if name.startswith("l7"):
                print(f"{name:15} {python_cost(name):6.1f} us/request of Python (no sockets)")
        return 0
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    res = run(a.duration, a.connections, paths, a.profile)
    print(f"meshlet L7 benchmark: wrk {res['wrk']}, upstream {res['upstream']}")
    print(f"{'path':15} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x direct':>9} {'cpu us/req':>10}  errors")
    for name, r in res["paths"].items():
        if "skipped" in r:
            print(f"{name:15} skipped: {r['skipped']}")
            continue
        print(f"{name:15} {_fmt(r.get('rps'), '9.0f')} {_fmt(r.get('p50_ms'), '8.2f')} "
              f"{_fmt(r.get('p99_ms'), '8.2f')} {_fmt(r.get('ratio'), '9.3f')} "
              f"{_fmt(r.get('cpu_us_per_req'), '10.1f')}  {r.get('errors') or ''}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
