"""Proxy trace spans (agent/proxy/spans.py, the sampling in tracing.py, the
``tracing`` config and state sections).

The pure parts are tested directly; export goes through the real
OpenTelemetry SDK exporter over real HTTP to a receiver on loopback that
decodes with the official protobuf messages (tests/support/otlpsink.py).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from agent.config import parse_config
from agent.proxy import spans, tracing
from agent.proxy.exchange import Exchange
from agent.proxy.http1 import RequestHead, RequestParser
from agent.proxy.spans import (
    CLIENT,
    SERVER,
    LightSpan,
    SpanExporter,
    SpanQueue,
    SpanRecorder,
    attributes,
    is_error,
    span_kind,
    start_tracing,
)
from agent.proxy.state import StateError, TracingConfig, parse_state
from agent.yamlsrc import SourceError
from tests.support.otlpsink import HangingCollector, OtlpSink

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"


@pytest.fixture(autouse=True)
def _rate():
    """The sample rate is per process: every test leaves it at 0."""
    yield
    tracing.set_sample_rate(0.0)


def head(raw: bytes) -> RequestHead:
    evs = RequestParser().feed(raw)
    assert isinstance(evs[0], RequestHead), evs
    return evs[0]


def tp(flags: str = "01") -> bytes:
    return f"00-{TID}-{PID}-{flags}".encode()


# --- sampling (tracing.hop) --------------------------------------------------------------


def test_a_new_trace_is_sampled_at_the_rate_and_forwarded_with_the_flag():
    tracing.set_sample_rate(0.0)
    assert not any(tracing.hop([]).sampled for _ in range(200))
    assert all(tracing.hop([]).traceparent.flags == b"00" for _ in range(10))
    tracing.set_sample_rate(1.0)
    ctxs = [tracing.hop([]) for _ in range(200)]
    assert all(c.sampled and c.traceparent.flags == b"01" for c in ctxs)
    assert all(c.parent_id is None for c in ctxs)  # a new trace: a root span
    tracing.set_sample_rate(0.25)
    n = sum(tracing.hop([]).sampled for _ in range(4000))
    assert 800 < n < 1200, n  # 1000 expected, sd ~27


def test_the_incoming_sampled_flag_decides_both_ways():
    tracing.set_sample_rate(0.0)
    ctx = tracing.hop([(b"traceparent", tp("01"))])
    assert ctx.sampled and ctx.traceparent.flags == b"01"
    tracing.set_sample_rate(1.0)
    ctx = tracing.hop([(b"traceparent", tp("00"))])
    assert not ctx.sampled and ctx.traceparent.flags == b"00"  # not re-sampled downstream
    assert tracing.hop([(b"traceparent", tp("03"))]).sampled  # other flag bits kept, low bit read


def test_set_sample_rate_refuses_nonsense():
    with pytest.raises(ValueError):
        tracing.set_sample_rate(1.5)
    with pytest.raises(ValueError):
        tracing.set_sample_rate(-0.1)


def test_source_hop_is_the_parent_of_the_destination_hop():
    """The source proxy's span id goes out in traceparent; the destination
    proxy's span has it as parent; the first has the client's span."""
    src = tracing.hop([(b"traceparent", tp())])
    assert src.parent_id == PID.encode() and src.traceparent.trace_id == TID.encode()
    dst = tracing.hop(src.headers())
    assert dst.parent_id == src.span_id
    assert dst.traceparent.trace_id == src.traceparent.trace_id
    assert len({PID.encode(), src.span_id, dst.span_id}) == 3


# --- kinds, status, attributes -------------------------------------------------------------


def test_span_kind_and_error_status():
    assert span_kind("service") == CLIENT
    assert {span_kind(r) for r in ("local", "tunnel", None)} == {SERVER}
    assert not is_error(200, "-") and not is_error(404, "-")
    assert is_error(503, "-") and is_error(0, "-") and is_error(200, "URX") and is_error(403, "RBAC")


def conn(**kw):
    base = {"route": "local", "src_identity": "spiffe://cluster.local/ns/default/sa/client",
            "dst_identity": "spiffe://cluster.local/ns/default/sa/web", "src_addr": ("10.244.1.5", 40000)}
    base.update(kw)
    return SimpleNamespace(**base)


def light(kind=SERVER, status=200, flags="-", attempts=1, **kw) -> LightSpan:
    h = head(b"POST /api/items?id=7 HTTP/1.1\r\nHost: web.default:8080\r\nContent-Length: 0\r\n"
             b"traceparent: " + tp() + b"\r\nx-request-id: rid-1\r\n\r\n")
    ctx = tracing.hop(h.headers)
    ex = Exchange("default/web:80", ("10.244.2.7", 7000), attempts, flags, 10, 20, ctx)
    return LightSpan(kind, ctx, 1_000, 2_000, h, status, flags, ex, conn(**kw), None)


def test_attributes_of_a_server_span_use_the_semantic_conventions():
    a = attributes(light())
    assert a["http.request.method"] == "POST"
    assert a["http.response.status_code"] == 200
    assert a["url.path"] == "/api/items"  # no query: it may hold secrets
    assert a["server.address"] == "web.default" and a["server.port"] == 8080
    assert a["client.address"] == "10.244.1.5" and a["network.peer.port"] == 40000
    assert a["network.protocol.version"] == "1.1"
    assert a["meshlet.source.principal"] == "spiffe://cluster.local/ns/default/sa/client"
    assert a["meshlet.destination.principal"] == "spiffe://cluster.local/ns/default/sa/web"
    assert a["meshlet.upstream"] == "10.244.2.7:7000"
    assert a["meshlet.cluster"] == "default/web:80"
    assert a["meshlet.response_flags"] == "-"
    assert a["meshlet.request_id"] == "rid-1"
    assert a["http.request.body.size"] == 10 and a["http.response.body.size"] == 20
    assert "http.request.resend_count" not in a and "error.type" not in a


def test_attributes_of_a_client_span_name_the_endpoint_and_retries():
    from tests.unit.test_proxy_state import published

    state = parse_state(published())  # shop/be-2 is 10.244.2.10
    s = light(CLIENT, status=503, flags="URX", attempts=3, route="service", dst_identity=None)
    s.upstream = ("10.244.2.10", 8080)
    s.state = state
    a = attributes(s)
    assert a["network.peer.address"] == "10.244.2.10" and a["network.peer.port"] == 8080
    assert a["meshlet.destination.principal"] == "spiffe://cluster.local/ns/shop/sa/default"
    assert a["http.request.resend_count"] == 2
    assert a["error.type"] == "URX" and a["meshlet.route"] == "service"
    assert "client.address" not in a


def test_odd_methods_and_hosts():
    s = light()
    s.method, s.host = b"PURGE", b"[fd00::1]:81"
    a = attributes(s)
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "PURGE"
    assert a["server.address"] == "fd00::1" and a["server.port"] == 81
    s.host, s.status = b"plainhost", 0
    a = attributes(s)
    assert a["server.address"] == "plainhost" and "server.port" not in a
    assert a["error.type"] == "no_response" and "http.response.status_code" not in a


# --- the bounded queue and the recorder ----------------------------------------------------


def test_the_queue_is_bounded_counts_drops_and_wakes_the_exporter_at_a_batch():
    wake = threading.Event()
    q = SpanQueue(3, 2, wake)
    s = light()
    assert q.put(s) and not wake.is_set()
    assert q.put(s) and wake.is_set()  # a full batch
    assert q.put(s)
    assert not q.put(s) and not q.put(s)
    assert (len(q), q.queued, q.dropped) == (3, 3, 2)
    assert len(q.take(2)) == 2 and len(q.take(5)) == 1 and q.take(5) == []
    assert q.put(s) and q.dropped == 2


def test_the_recorder_keeps_sampled_requests_only():
    q = SpanQueue(10, 10)
    rec = SpanRecorder(q, lambda: None)
    h = head(b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: " + tp("00") + b"\r\n\r\n")
    ex = Exchange(None, None, 0, "-", 0, 0, tracing.hop(h.headers))
    rec.on_response(conn(), h, 200, 0.002, ex, "-")
    assert len(q) == 0 and rec.unsampled == 1
    h = head(b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: " + tp("01") + b"\r\n\r\n")
    ctx = tracing.hop(h.headers)
    rec.on_response(conn(route="service"), h, 200, 0.002, Exchange(None, None, 1, "-", 0, 0, ctx), "-")
    (s,) = q.take(5)
    assert s.kind == CLIENT and s.trace is ctx
    assert s.end_ns - s.start_ns == 2_000_000 and abs(s.end_ns - time.time_ns()) < 60e9


def test_a_request_answered_before_forwarding_still_joins_the_clients_trace():
    """A 403 from policy: the exchange forwarded nothing (no trace context)."""
    q = SpanQueue(10, 10)
    rec = SpanRecorder(q, lambda: None)
    h = head(b"GET /admin HTTP/1.1\r\nHost: a\r\ntraceparent: " + tp("01") + b"\r\n\r\n")
    rec.on_response(conn(), h, 403, 0.001, Exchange(None, None, 0, "-", 0, 0, None), "RBAC")
    (s,) = q.take(1)
    assert s.trace.parent_id == PID.encode() and s.trace.traceparent.trace_id == TID.encode()
    assert attributes(s)["meshlet.response_flags"] == "RBAC"


# --- config and state ----------------------------------------------------------------------

CFG = """\
node: n1
inventory: inv.yaml
cgroup: /x
identity: {bundle: b, caCert: c, caKey: k}
proxy: {redirectIPv4: 10.0.0.1}
"""


def test_tracing_config_defaults_and_round_trip():
    c = parse_config(CFG, "/etc/m/c.yaml")
    assert c.tracing.otlp_endpoint is None and c.tracing.sample_rate == 0.01
    c = parse_config(CFG + "tracing: {otlpEndpoint: 'http://collector:4318', sampleRate: 0.5,"
                     " maxQueue: 100, exportTimeout: 2}\n", "/etc/m/c.yaml")
    assert c.tracing.otlp_endpoint == "http://collector:4318/v1/traces"  # the standard path added
    assert (c.tracing.sample_rate, c.tracing.max_queue, c.tracing.export_timeout) == (0.5, 100, 2.0)
    import yaml

    assert parse_config(yaml.safe_dump(c.to_dict()), "/etc/m/c.yaml") == c


@pytest.mark.parametrize("bad, fragment", [
    ("otlpEndpoint: 'grpc://c:4317'", "6:25: tracing.otlpEndpoint: 'grpc://c:4317': the scheme must be http"),
    ("otlpEndpoint: 'http://:4318'", "tracing.otlpEndpoint: 'http://:4318' names no host"),
    ("otlpEndpoint: 'http://u:pw@c:4318'", "credentials do not belong"),
    ("otlpEndpoint: 'http://c:4318/v1/traces?x=1'", "no query or fragment"),
    ("sampleRate: 1.5", "6:23: tracing.sampleRate: 1.5 is out of range (0..1)"),
    ("maxQueue: 0", "tracing.maxQueue: 0 is out of range"),
    ("exportTimeout: 0", "tracing.exportTimeout: 0 must be greater than 0"),
    ("exportIntervall: 1", "tracing.exportIntervall: unknown field"),
])
def test_bad_tracing_config_names_file_line_and_field(bad, fragment):
    with pytest.raises(SourceError) as e:
        parse_config(CFG + "tracing: {" + bad + "}\n", "/etc/m/c.yaml")
    assert "/etc/m/c.yaml:" in str(e.value) and fragment in str(e.value)


def test_the_agent_publishes_tracing_to_the_workers():
    from agent.app import proxy_state
    from agent.workloads.yamlfile import parse_inventory
    from tests.unit.test_proxy_state import SVC_CFG, SVC_INV

    text = SVC_CFG + "tracing: {otlpEndpoint: 'https://c:4318/x', sampleRate: 1}\n"
    cfg = parse_config(text, "/etc/m/c.yaml")
    d = json.loads(json.dumps(proxy_state(cfg, parse_inventory(SVC_INV, "inv.yaml"), {}, 1)))
    t = parse_state(d).tracing
    assert t == TracingConfig("https://c:4318/x", 1.0, 2048, 512, 5.0, 1.0, "node1")
    d["tracing"]["sample_rate"] = 2
    with pytest.raises(StateError, match="state.tracing.sample_rate"):
        parse_state(d)
    d["tracing"] = {"otlp_endpoint": "c:4318"}
    with pytest.raises(StateError, match="state.tracing.otlp_endpoint"):
        parse_state(d)
    del d["tracing"]  # an older agent's state: no spans
    assert parse_state(d).tracing.otlp_endpoint is None


def test_no_endpoint_means_no_tracing_and_no_sampling():
    tracing.set_sample_rate(0.3)
    assert start_tracing(TracingConfig(None, 1.0), 0, lambda: None) is None
    assert tracing.sample_rate() == 0.0


# --- export through the SDK to a real receiver ---------------------------------------------


def cfg(url: str, **kw) -> TracingConfig:
    base = {"otlp_endpoint": url, "sample_rate": 1.0, "max_queue": 64, "max_batch": 16,
            "export_timeout": 1.0, "export_interval": 0.05, "service_instance": "node1"}
    base.update(kw)
    return TracingConfig(**base)


def test_spans_reach_the_collector_with_ids_kind_status_and_attributes():
    with OtlpSink() as sink:
        t = start_tracing(cfg(sink.url), 3, lambda: None)
        assert t is not None and tracing.sample_rate() == 1.0
        try:
            ok, bad = light(), light(CLIENT, status=503, flags="UF", route="service")
            t.exporter.queue.put(ok)
            t.exporter.queue.put(bad)
            got = sink.wait(lambda s: len(s) == 2)
        finally:
            t.close()
    by_kind = {s["kind"]: s for s in got}
    srv, cli = by_kind["server"], by_kind["client"]
    assert srv["trace_id"] == TID and srv["parent_span_id"] == PID
    assert srv["span_id"] == ok.trace.span_id.decode()
    assert (srv["start"], srv["end"]) == (1_000, 2_000)
    assert srv["name"] == "POST" and srv["status"] == "unset" and srv["scope"] == "meshlet.proxy"
    assert srv["attributes"]["meshlet.source.principal"] == "spiffe://cluster.local/ns/default/sa/client"
    assert srv["attributes"]["http.response.status_code"] == 200
    assert srv["resource"]["service.name"] == "meshlet-proxy"
    assert srv["resource"]["service.instance.id"] == "node1/3"
    assert cli["status"] == "error" and cli["status_message"] == "UF"
    assert cli["attributes"]["error.type"] == "UF"
    st = t.stats()
    assert (st["exported"], st["failed"], st["dropped"]) == (2, 0, 0)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return port


def test_a_collector_that_is_down_costs_only_counted_failures():
    t = start_tracing(cfg(f"http://127.0.0.1:{closed_port()}/v1/traces", max_queue=4, max_batch=2), 0,
                      lambda: None)
    assert t is not None
    try:
        q = t.exporter.queue
        accepted = sum(q.put(light()) for _ in range(50))  # never blocks: full means dropped
        assert accepted + q.dropped == 50 and q.dropped > 0
        wait(lambda: t.stats()["failed"] == accepted)  # every accepted span in a failed export
        assert t.stats()["exported"] == 0 and t.stats()["export_failures"] >= 1
    finally:
        t.close()


def test_a_collector_that_never_answers_costs_only_counted_failures():
    with HangingCollector() as hang:
        t = start_tracing(cfg(hang.url, max_queue=4, max_batch=2, export_timeout=2.0), 0, lambda: None)
        assert t is not None
        try:
            q = t.exporter.queue
            q.put(light())
            wait(lambda: hang.accepted >= 1)  # the export thread is stuck on it now
            results = [q.put(light()) for _ in range(20)]
            # at most 4 wait and 2 more went out in a batch: the rest is dropped, counted
            assert results.count(False) >= 14 and q.dropped == results.count(False)
            wait(lambda: t.stats()["export_failures"] >= 1)
            assert t.stats()["exported"] == 0
        finally:
            t.close()


def test_export_failures_are_logged_at_most_once_a_minute(caplog):
    ex = SpanExporter(cfg(f"http://127.0.0.1:{closed_port()}/v1/traces", export_timeout=0.2))
    ex._sdk = spans._Sdk(ex.cfg, 0)
    ex._exporter = ex._sdk.exporter()
    with caplog.at_level("WARNING", logger="meshlet.proxy.spans"):
        assert not ex.export([light()]) and not ex.export([light()])
    lines = [r for r in caplog.records if "span export to" in r.getMessage()]
    assert len(lines) == 1 and "is the collector up" in lines[0].getMessage()
    assert (ex.export_failures, ex.failed) == (2, 2)
    ex._exporter.shutdown()


def wait(pred, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_prometheus_sums_the_workers_span_counters():
    from tests.unit.test_observability import scrape

    t = {"exported": 5, "dropped": 2, "failed": 1, "export_failures": 1, "queued": 3}
    got = scrape({"workers": [{"tracing": t}, {"tracing": dict(t, dropped=10)}, {"tracing": None}, None]})
    by_result = {s["result"]: v for s, v in got["meshlet_trace_spans"]}
    assert by_result == {"exported": 10, "dropped": 12, "failed": 2}
    assert got["meshlet_trace_export_failures"] == [({}, 2)]
    assert got["meshlet_trace_spans_queued"] == [({}, 6)]
    assert "meshlet_trace_spans" not in scrape({"workers": [{"tracing": None}]})  # no exporter: no series


# --- the worker's wiring, in-process (tests/support/mesh.py: two proxies on loopback) --------


def test_a_worker_exports_l7_spans_after_a_live_reload_and_stops_after_another(tmp_path):
    """node2 serves a pod at L7; its tracing section is turned on, then off,
    by state reloads (as the agent publishes config changes)."""
    import asyncio
    import os

    from tests.support.aio import close_writer, run
    from tests.support.http import HeaderEcho, http_request
    from tests.support.mesh import V4, Cluster, FlowOrigin

    def reload(c, node: int, tracing_doc: dict | None) -> None:
        p = tmp_path / f"node{node + 1}" / "state.json"
        doc = json.loads(p.read_text())
        doc["generation"] += 1
        doc.pop("tracing", None)
        if tracing_doc is not None:
            doc["tracing"] = tracing_doc
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)
        assert c.servers[node].watcher.check()

    async def get(c, web, traceparent: str) -> tuple[int, bytes]:
        r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", web.port, 1001))
        try:
            status, _head, body = await http_request(r, w, "GET", "/hello",
                                                     headers=(("traceparent", traceparent),))
        finally:
            await close_writer(w)
        return status, body

    async def main(sink):
        async with Cluster(tmp_path, l7=True) as c:
            web = await HeaderEcho("127.0.0.7").start()  # a pod of node2
            try:
                srv = c.servers[1]
                assert srv.tracing is None and srv.stats()["tracing"] is None
                reload(c, 1, {"otlp_endpoint": sink.url, "sample_rate": 0.0, "export_interval": 0.05,
                              "service_instance": "node2"})
                assert srv.tracing is not None and srv.accounting.spans is srv.tracing.recorder
                status, body = await get(c, web, f"00-{TID}-{PID}-01")
                assert status == 200
                got = await asyncio.to_thread(sink.wait, lambda s: len(s) == 1)
                forwarded = [ln for ln in body.split(b"\r\n") if ln.lower().startswith(b"traceparent:")]
                stats = srv.stats()["tracing"]
                reload(c, 1, None)
                off = (srv.tracing, srv.accounting.spans, tracing.sample_rate())
                status2, _ = await get(c, web, f"00-{TID}-{PID}-01")
                await asyncio.sleep(0.3)
                return got, forwarded, stats, off, status2
            finally:
                await web.stop()

    with OtlpSink() as sink:
        got, forwarded, stats, off, status2 = run(main(sink))
        after = list(sink.spans)
    (s,) = got
    assert s["kind"] == "server" and s["trace_id"] == TID and s["parent_span_id"] == PID
    assert forwarded == [f"traceparent: 00-{TID}-{s['span_id']}-01".encode()]  # the app's parent
    assert s["attributes"]["meshlet.destination.principal"].endswith("/sa/db")
    assert s["attributes"]["meshlet.route"] == "local"  # the inbound side of the tunnel
    assert s["resource"]["k8s.node.name"] == "node2"
    assert stats["exported"] == 1 and stats["dropped"] == 0 and stats["endpoint"] == sink.url
    assert off == (None, None, 0.0) and status2 == 200
    assert after == got  # off: the second request left no span
