#!/usr/bin/env python3
"""What trace spans cost per request, in microseconds of CPU (one core).

On the event loop (the L7 path), per request:

    hop            tracing.hop() on a request without traceparent (ids, the
                   sampling draw), at sample rate 0 and 1
    unsampled      SpanRecorder.on_response for a request whose trace is not
                   sampled (what every unsampled request pays when a
                   collector is configured; nothing at all when none is)
    sampled        the same for a sampled request: a LightSpan and a queue put

In the export thread, per span (off the loop, but the same process and GIL):

    build          the SDK ReadableSpan with its attributes
    encode         OTLP protobuf encoding of a batch of 512, per span

    .venv/bin/python scripts/bench_spans.py [--n 200000]

With ``--l7``, the whole L7 path instead (bench_l7.py's setup: ``wrk -t1``
-> an L7Session -> nginx on loopback, the proxy in a process of its own):
CPU microseconds per request of the proxy process (its export thread
included) without tracing and with spans exported to a receiver on loopback
(tests/support/otlpsink.py, in this process) at sample rates 0, 0.01 and 1.

    .venv/bin/python scripts/bench_spans.py --l7 [--duration 4] [--connections 32]

A benchmark, not a test: numbers vary with the machine; compare within a run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from agent.proxy import spans, tracing
from agent.proxy.exchange import Exchange
from agent.proxy.http1 import RequestParser
from agent.proxy.state import TracingConfig

RAW = (
    b"GET /api/items/42 HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\n"
    b"User-Agent: bench\r\nAccept: */*\r\n\r\n"
)


def per_call_us(fn, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L7_RATES = {"l7, no tracing": None, "l7, spans, rate 0": 0.0, "l7, spans, rate 0.01": 0.01,
            "l7, spans, rate 1": 1.0}


def _serve(listen: int, upstream: int, rate: float | None, endpoint: str, seconds: float) -> None:
    """The L7 session as bench_l7's ``l7`` path; with ``rate``, spans recorded
    per response (as Accounting.on_http_response does) and exported."""
    import asyncio

    import uvloop

    from agent.proxy import l7
    from agent.traffic.trafficpolicy import Retries, TrafficSettings
    from agent.traffic.upstream_cluster import Cluster

    cluster = Cluster.single(("127.0.0.1", upstream), TrafficSettings(retries=Retries(attempts=0)))
    conn = SimpleNamespace(route="local", src_identity="spiffe://cluster.local/ns/default/sa/client",
                           dst_identity="spiffe://cluster.local/ns/default/sa/web",
                           src_addr=("127.0.0.1", 1))
    on_response = lambda *a: None  # noqa: E731 - bench_l7's hook
    if rate is not None:
        cfg = TracingConfig(endpoint, rate, max_queue=2048, max_batch=512, service_instance="bench")
        t = spans.start_tracing(cfg, 0, lambda: None)
        assert t is not None
        rec = t.recorder

        def on_response(head, status, elapsed, ex):  # type: ignore[misc]
            rec.on_response(conn, head, status, elapsed, ex, ex.flags)

    async def main() -> None:
        factory = l7.session_factory(lambda _h: cluster, l7.UpstreamPool(), on_response=on_response)
        srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", listen)
        async with srv:
            await asyncio.sleep(seconds)

    uvloop.run(main())


def l7_run(duration: float, connections: int) -> dict[str, dict]:
    import shutil
    import subprocess
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_l7 import _cpu_seconds, _free_port, _start, _stop, _wait_port, _wrk
    from benchtools import write_nginx_conf

    from tests.support.otlpsink import OtlpSink

    tmp = tempfile.mkdtemp(prefix="meshlet-bench-spans-")
    procs: list[subprocess.Popen] = []
    out: dict[str, dict] = {}
    try:
        up = _free_port()
        conf = write_nginx_conf(tmp, [f"127.0.0.1:{up}"], "ok\n", worker_connections=4096,
                                keepalive_timeout="60s")
        nginx = _start(["nginx", "-e", os.path.join(tmp, "error.log"), "-p", tmp, "-c", conf],
                       os.path.join(tmp, "nginx.out"))
        procs.append(nginx)
        _wait_port(up, nginx)
        with OtlpSink() as sink:
            for name, rate in L7_RATES.items():
                port = _free_port()
                proc = _start([sys.executable, os.path.abspath(__file__), "--serve", str(port), str(up),
                               "-" if rate is None else str(rate), sink.url, str(4 * duration + 60)],
                              os.path.join(tmp, "l7.log"))
                procs.append(proc)
                _wait_port(port, proc)
                _wrk(port, 1, connections)  # warm up
                before, cpu0 = len(sink.spans), _cpu_seconds(proc.pid)
                r = out[name] = _wrk(port, duration, connections)
                time.sleep(1.5)  # the export thread's last batches count too
                if r.get("requests"):
                    r["cpu_us_per_req"] = round((_cpu_seconds(proc.pid) - cpu0) / r["requests"] * 1e6, 1)
                r["spans_received"] = len(sink.spans) - before
                _stop(procs.pop())
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        listen, upstream, rate, endpoint, seconds = sys.argv[2:7]
        _serve(int(listen), int(upstream), None if rate == "-" else float(rate), endpoint, float(seconds))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--l7", action="store_true", help="the whole L7 path with wrk and nginx")
    ap.add_argument("--duration", type=float, default=4)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.l7:
        print(f"{'path':22} {'req/s':>9} {'p50 ms':>8} {'cpu us/req':>10} {'spans':>8}")
        for name, r in l7_run(args.duration, args.connections).items():
            print(f"{name:22} {r.get('rps') or 0:9.0f} {r.get('p50_ms') or 0:8.2f} "
                  f"{r.get('cpu_us_per_req') or 0:10.1f} {r['spans_received']:8d}  {r.get('errors') or ''}")
        return
    n = args.n
    head = RequestParser().feed(RAW)[0]
    conn = SimpleNamespace(
        route="local",
        src_identity="spiffe://cluster.local/ns/default/sa/client",
        dst_identity="spiffe://cluster.local/ns/default/sa/web",
        src_addr=("10.244.1.5", 40000),
    )
    out: dict[str, float] = {}
    for rate in (0.0, 1.0):
        tracing.set_sample_rate(rate)
        out[f"hop (rate {rate:g})"] = per_call_us(lambda: tracing.hop(head.headers), n)
    tracing.set_sample_rate(0.0)
    unsampled = Exchange("default/web:80", ("10.244.2.7", 7000), 1, "-", 0, 3, tracing.hop(head.headers))
    tracing.set_sample_rate(1.0)
    sampled = Exchange("default/web:80", ("10.244.2.7", 7000), 1, "-", 0, 3, tracing.hop(head.headers))
    q = spans.SpanQueue(n + 1, n + 1)
    rec = spans.SpanRecorder(q, lambda: None)
    out["on_response, unsampled"] = per_call_us(
        lambda: rec.on_response(conn, head, 200, 0.001, unsampled, "-"), n
    )
    out["on_response, sampled"] = per_call_us(
        lambda: rec.on_response(conn, head, 200, 0.001, sampled, "-"), n
    )
    sdk = spans._Sdk(TracingConfig("http://127.0.0.1:4318/v1/traces", 1.0, service_instance="bench"), 0)
    light = q.take(1)[0]
    m = max(1, n // 20)
    out["export thread: build ReadableSpan"] = per_call_us(lambda: sdk.readable(light), m)
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    batch = [sdk.readable(light) for _ in range(512)]
    k = max(1, m // 512)
    out["export thread: encode (batch 512)"] = per_call_us(
        lambda: encode_spans(batch).SerializePartialToString(), k
    ) / 512
    w = max(len(x) for x in out)
    for name, us in out.items():
        print(f"{name:<{w}}  {us:7.2f} us")


if __name__ == "__main__":
    main()
