"""Observability without sockets (#6): the proxy's Istio-labelled counters,
the label-set cap, access-log sampling, the proxy state's new fields, the
/metrics families (parsed back with prometheus-client's parser), and
`meshlet stats` rows and table."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import proxy_state
from agent.config import parse_config
from agent.observe.exposition import render
from agent.observe.prometheus import _Collector, families, merge_tcp
from agent.proxy import telemetry as m
from agent.proxy import tracing
from agent.proxy.log import sampled
from agent.proxy.state import StateError, parse_state
from agent.observe.pairstats import StatsFilter, format_table, pair_rows, percentile, select
from agent.workloads.yamlfile import parse_inventory

WEB = m.Peer("web", "shop", "spiffe://td/ns/shop/sa/web", "web")
DB = m.Peer("db", "data", "spiffe://td/ns/data/sa/db", "db")


def lb(reporter="source", src=WEB, dst=DB, mtls=True, result="ok", service="10.0.0.7"):
    return m.labels_for(reporter, src, dst, service, m.UNKNOWN, mtls, result)


# --- proxy-side aggregation --------------------------------------------------------------

def test_labels_follow_istio_names_and_values():
    d = dict(zip(m.LABELS, lb()))
    assert d == {
        "reporter": "source", "source_workload": "web", "source_workload_namespace": "shop",
        "source_principal": "spiffe://td/ns/shop/sa/web", "source_app": "web",
        "source_canonical_service": "web", "destination_workload": "db",
        "destination_workload_namespace": "data", "destination_principal": "spiffe://td/ns/data/sa/db",
        "destination_app": "db", "destination_canonical_service": "db",
        "destination_service": "10.0.0.7", "destination_service_name": "unknown",
        "destination_service_namespace": "data", "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": "mutual_tls"}
    p = dict(zip(m.LABELS, m.labels_for("source", WEB, m.Peer(), "1.1.1.1", "PassthroughCluster",
                                        False)))
    assert p["destination_service_name"] == "PassthroughCluster"
    assert p["destination_service_namespace"] == "unknown"
    assert p["connection_security_policy"] == "none"
    assert dict(zip(m.LABELS, lb(result="refused")))["response_flags"] == "UF"
    assert dict(zip(m.LABELS, lb(result="reset")))["response_flags"] == "UC"


@pytest.mark.parametrize("name,app,want", [("web-7f9c", "web", "web"), ("web-7f9c", None, "web-7f9c"),
                                           (None, None, "unknown")])
def test_workload_is_the_app_label_else_the_pod_name(name, app, want):
    assert m.workload_of(name, app) == want


def test_open_flush_close_counts_exactly():
    t = m.TcpMetrics()
    t.opened(1, [lb("source"), lb("destination")])
    t.flush(1, 100, 10)
    t.flush(1, 100, 10)  # nothing new
    t.flush(1, 150, 30)
    snap = t.snapshot()
    assert [r[1:] for r in snap["tcp"]] == [[1, 0, 150, 30], [1, 0, 150, 30]]
    assert snap["live"] == 1
    t.closed(1, 160, 35)
    snap = t.snapshot()
    assert [r[1:] for r in snap["tcp"]] == [[1, 1, 160, 35], [1, 1, 160, 35]]
    assert snap["live"] == 0 and snap["labels"] == list(m.LABELS)
    json.dumps(snap)


def test_a_reset_closes_under_its_flag_and_a_failure_before_open_opens_there():
    t = m.TcpMetrics()
    t.opened(1, [lb()])
    t.closed(1, 5, 0, "reset")
    t.closed(2, 0, 0, "rejected", [lb()])  # never opened: counted under DENY only
    got = {dict(zip(m.LABELS, r[0]))["response_flags"]: r[1:] for r in t.snapshot()["tcp"]}
    assert got == {"-": [1, 0, 5, 0], "UC": [0, 1, 0, 0], "DENY": [1, 1, 0, 0]}


def test_label_sets_are_capped_and_overflow_counted():
    t = m.TcpMetrics(max_series=3)
    for i in range(10):
        t.opened(i, [lb(service=f"10.0.0.{i}")])
        t.closed(i, 1, 1)
    snap = t.snapshot()
    assert len(snap["tcp"]) == 3 and snap["overflow"] == 7
    assert sum(r[1] for r in snap["tcp"]) == 3
    t.opened(99, [lb(service="10.0.0.1")])  # an existing label set still counts
    assert {tuple(r[0]): r[1] for r in t.snapshot()["tcp"]}[lb(service="10.0.0.1")] == 2


def test_denials_by_reason():
    t = m.TcpMetrics()
    for r in ("mtls_refused", "mtls_refused", "not_local"):
        t.deny(r)
    assert t.snapshot()["denied"] == {"mtls_refused": 2, "not_local": 1}
    assert set(m.DENY_REASONS) >= {"unknown_source", "no_original_destination", "mtls_refused"}


# --- access-log sampling ----------------------------------------------------------------

def test_sampling_zero_and_one():
    keys = [f"10.0.0.{i % 250}:{i}>10.0.1.1:80" for i in range(2000)]
    assert all(sampled(k, 1.0) for k in keys)
    assert not any(sampled(k, 0.0) for k in keys)


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_sampling_fraction_is_statistically_bounded_and_deterministic(rate):
    n = 20_000
    keys = [f"10.244.1.{i % 200}:{30000 + i}>10.244.2.10:7000" for i in range(n)]
    hits = sum(sampled(k, rate) for k in keys)
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(hits - n * rate) < 5 * sd  # 5 sigma: a false failure is ~1 in 3.5 million
    assert [sampled(k, rate) for k in keys[:500]] == [sampled(k, rate) for k in keys[:500]]


# --- proxy state: labels and access-log settings from the agent ----------------------------

CFG = """\
node: node1
inventory: inv.yaml
cgroup: meshlet/node1
identity: {bundle: b.pem, caCert: c.pem, caKey: k.pem}
proxy: {redirectIPv4: 10.244.1.1}
runDir: /run/m
accessLog: {sampling: 0.25}
"""
INV = """\
nodes:
  - {name: node1, address: 198.18.0.1}
pods:
  - {name: web-7f9c, namespace: shop, labels: {app: web}, node: node1, ips: [10.244.1.10],
     cgroup: /sys/fs/cgroup/k/web}
  - {name: solo, namespace: shop, node: node1, ips: [10.244.1.11], cgroup: /sys/fs/cgroup/k/solo}
"""


def test_proxy_state_carries_labels_and_access_log_settings():
    cfg = parse_config(CFG, "/etc/m/c.yaml")
    doc = proxy_state(cfg, parse_inventory(INV, "inv.yaml"), {}, 3)
    assert doc["access_log"] == {"enabled": True, "sampling": 0.25, "path": "/run/m/access.log"}
    st = parse_state(json.loads(json.dumps(doc)))
    assert st.access_log.sampling == 0.25 and st.access_log.path == "/run/m/access.log"
    assert [(p.workload, p.app) for p in st.pods] == [("web", "web"), ("solo", None)]
    assert st.pod_by_key["shop/web-7f9c"].workload == "web"


@pytest.mark.parametrize("patch,msg", [
    ({"access_log": {"sampling": 2}}, "state.access_log.sampling: must be in [0, 1]"),
    ({"access_log": {"enabled": "yes"}}, "state.access_log.enabled: expected bool"),
    ({"access_log": {"path": "rel.log"}}, "state.access_log.path: must be an absolute path"),
])
def test_proxy_state_rejects_bad_access_log(patch, msg):
    doc = proxy_state(parse_config(CFG, "/etc/m/c.yaml"), parse_inventory(INV, "inv.yaml"), {}, 3)
    doc.update(patch)
    with pytest.raises(StateError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        parse_state(doc)


def test_proxy_state_rejects_non_string_labels():
    doc = proxy_state(parse_config(CFG, "/etc/m/c.yaml"), parse_inventory(INV, "inv.yaml"), {}, 3)
    doc["pods"][0]["labels"] = {"app": 3}
    with pytest.raises(StateError, match=r"state.pods\[0\].labels: labels must map strings"):
        parse_state(doc)


# --- /metrics families ------------------------------------------------------------------

def worker(rows, denied=None, tls=None, certs=()):
    t = m.TcpMetrics()
    for i, (labels, rec, sent, open_) in enumerate(rows):
        t.opened(i, [labels])
        if open_:
            t.flush(i, rec, sent)
        else:
            t.closed(i, rec, sent)
    for r, n in (denied or {}).items():
        for _ in range(n):
            t.deny(r)
    return {"metrics": t.snapshot(), "active_connections": sum(1 for r in rows if r[3]),
            "tls": tls or {"handshakes": 0, "resumed": 0, "refused": 0, "failures": {}},
            "certs": {"identities": [{"spiffe_id": s, "not_after": a} for s, a in certs]}}


SNAP = {
    "workers": [
        worker([(lb(), 100, 10, False), (lb(), 50, 5, True)], {"mtls_refused": 1},
               {"handshakes": 5, "resumed": 3, "refused": 1, "failures": {"unknown_ca": 1}},
               [("spiffe://td/ns/shop/sa/web", "2030-01-01T00:00:00+00:00")]),
        worker([(lb(), 7, 1, False)], {"mtls_refused": 2, "not_local": 1},
               {"handshakes": 1, "resumed": 0, "refused": 0, "failures": {}},
               [("spiffe://td/ns/shop/sa/web", "2029-01-01T00:00:00+00:00")]),
        None,  # a worker that did not answer
    ],
    "workers_configured": 3,
    "identity": {"generation": 4, "roots": [{}, {}]},
    "datapath": {"maps": [{"name": "ml_enrolled", "entries": 2, "max_entries": 4096},
                          {"name": "ml_stats", "entries": None, "max_entries": 15}],
                 "counters": {"redirect4": 9, "strict_drop": 1}},
}


def exposed(snap) -> str:
    """What /metrics serves for ``snap``."""
    return render(_Collector(lambda: snap).collect()).decode()


def scrape(snap) -> dict:
    out = {}
    for fam in text_string_to_metric_families(exposed(snap)):
        out[fam.name] = [(s.labels, s.value) for s in fam.samples]
    return out


def test_metrics_sum_workers_and_parse_with_prometheus_client():
    got = scrape(SNAP)
    (labels, opened), = got["istio_tcp_connections_opened"]
    assert opened == 3 and labels == dict(zip(m.LABELS, lb()))
    assert got["istio_tcp_connections_closed"][0][1] == 2
    assert got["istio_tcp_received_bytes"][0][1] == 157
    assert got["istio_tcp_sent_bytes"][0][1] == 16
    denied = {s["reason"]: v for s, v in got["meshlet_denied_connections"]}
    assert denied["mtls_refused"] == 3 and denied["not_local"] == 1 and denied["unknown_source"] == 0
    assert all(s["policy"] == "" for s, _ in got["meshlet_denied_connections"])
    assert got["meshlet_proxy_workers_up"] == [({}, 2)] and got["meshlet_proxy_workers"] == [({}, 3)]
    assert got["meshlet_proxy_active_connections"] == [({}, 1)]
    assert {s["result"]: v for s, v in got["meshlet_tls_handshakes"]} == \
        {"full": 3, "resumed": 3, "refused": 1}
    assert got["meshlet_tls_refused"] == [({"reason": "unknown_ca"}, 1)]
    (sid, exp), = got["meshlet_workload_certificate_expiry_timestamp_seconds"]
    assert sid == {"spiffe_id": "spiffe://td/ns/shop/sa/web"} and exp == 1861920000  # the earliest
    assert got["meshlet_trust_bundle_roots"] == [({}, 2)]
    assert got["meshlet_identity_generation"] == [({}, 4)]
    assert got["meshlet_bpf_map_entries"] == [({"map": "ml_enrolled"}, 2)]
    assert ({"map": "ml_stats"}, 15) in got["meshlet_bpf_map_capacity"]
    assert ({"event": "redirect4"}, 9) in got["meshlet_datapath_events"]
    assert got["meshlet_metrics_scrape_errors"] == [({}, 0)]
    assert "istio_requests" not in got and "meshlet_policy_version" not in got  # L7 / #4 not yet


def test_a_failing_snapshot_still_serves_and_counts_the_error():
    def boom():
        raise OSError("stats socket gone")
    c = _Collector(boom)
    text = render(c.collect()).decode()
    assert "meshlet_metrics_scrape_errors_total 1.0\n" in text and c.errors == 1


def test_families_of_an_empty_snapshot():
    names = {f.name for f in families({})}
    assert {"istio_tcp_connections_opened", "meshlet_proxy_workers_up",
            "meshlet_denied_connections"} <= names


# --- meshlet stats -----------------------------------------------------------------------

def view(cookie, role, src_pod, dst_pod, srtt, linked=(), dst_ip="10.0.0.7", dst_port=80):
    return {"cookie": cookie, "role": role, "srtt_us": srtt, "linked": list(linked),
            "source": {"pod": src_pod, "ip": "10.0.0.5", "port": 40000},
            "destination": {"pod": dst_pod, "ip": dst_ip, "port": dst_port}}


WORKLOADS = {"shop/web-1": ("web", "shop"), "data/db-1": ("db", "data")}


def test_pair_rows_prefer_the_source_report_and_take_rtt_from_linked_legs():
    w = [worker([(lb("source"), 100, 10, False), (lb("source"), 50, 5, True),
                 (lb("destination"), 999, 999, False)])]
    names, tcp = merge_tcp(w)
    views = [view(1, "client", "shop/web-1", "data/db-1", 40, linked=[2]),
             view(2, "proxy-outbound", "shop/web-1", None, 50, linked=[1, 3]),
             view(3, "proxy-upstream", None, None, 900, linked=[2]),
             view(4, "server", None, "data/db-1", 30)]  # unattributed: not counted
    (row,) = pair_rows(names, tcp, views, WORKLOADS)
    assert row["reporter"] == "source" and row["security"] == "mutual_tls"
    assert row["source"] == {"workload": "web", "namespace": "shop"}
    assert row["destination"] == {"workload": "db", "namespace": "data"}
    assert row["connections"] == {"total": 2, "active": 1, "closed": 1, "failed": 0}
    assert row["bytes"] == {"sent": 150, "received": 15}
    assert row["tcp_rtt_us"] == {"p50": 50, "max": 900, "samples": 3}
    assert row["requests"] is None and row["success_rate"] is None
    assert row["latency_ms"] == {"p50": None, "p95": None, "p99": None}


def test_pair_rows_on_the_destination_node_and_passthrough():
    ext = m.labels_for("source", WEB, m.Peer(), "93.184.216.34", "PassthroughCluster", False)
    names, tcp = merge_tcp([worker([(lb("destination"), 1, 2, False), (ext, 3, 4, False)])])
    views = [view(1, "client", "shop/web-1", None, 70, dst_ip="93.184.216.34")]
    rows = {r["destination"]["workload"]: r for r in pair_rows(names, tcp, views, WORKLOADS)}
    assert rows["db"]["reporter"] == "destination" and rows["db"]["tcp_rtt_us"]["p50"] is None
    assert rows["93.184.216.34"]["destination"]["namespace"] == "unknown"
    assert rows["93.184.216.34"]["tcp_rtt_us"]["p50"] == 70
    assert rows["93.184.216.34"]["security"] == "none"


def test_stats_filters_and_table():
    names, tcp = merge_tcp([worker([(lb(), 2048, 10, False)])])
    rows = pair_rows(names, tcp, [], WORKLOADS)
    assert select(rows, StatsFilter(src="web")) == rows
    assert select(rows, StatsFilter(src="shop/web", dst="data/db")) == rows
    assert select(rows, StatsFilter(src="db")) == []
    assert select(rows, StatsFilter(dst="shop/db")) == []
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["SOURCE", "DESTINATION", "SECURITY", "CONNS", "ACTIVE", "SENT",
                                "RECEIVED", "RTT", "P50", "RTT", "MAX", "REQUESTS", "SUCCESS",
                                "P50", "P95", "P99"]
    assert lines[1].split() == ["shop/web", "data/db", "mutual_tls", "1", "0", "2.0KiB", "10B",
                                "-", "-", "-", "-", "-", "-", "-"]


@pytest.mark.parametrize("vals,q,want", [([], 50, None), ([5], 50, 5), ([1, 2, 3, 4], 50, 2),
                                         ([1, 2, 3, 4], 100, 4), (list(range(1, 101)), 95, 95)])
def test_percentile_nearest_rank(vals, q, want):
    assert percentile(vals, q) == want


def test_policy_denials_are_labelled_by_the_deciding_policy():
    workers = []
    for pols in (["shop/deny-admin", "shop/deny-admin", ""], ["shop/deny-admin"]):
        t = m.TcpMetrics()
        for p in pols:
            t.deny("policy", p)
        workers.append({"metrics": t.snapshot(), "active_connections": 0})
    got = scrape({"workers": workers})
    rows = {(s["reason"], s["policy"]): v for s, v in got["meshlet_denied_connections"]}
    assert rows[("policy", "shop/deny-admin")] == 3
    assert rows[("policy", "")] == 1  # no ALLOW rule matched: no single policy decided
    assert rows[("mtls_refused", "")] == 0


# --- HTTP requests (L7): istio_requests_total, histograms, stats, access log -------------

import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from agent.observe.prometheus import merge_http  # noqa: E402
from agent.policy.http import NormalizedPath  # noqa: E402
from agent.proxy.l7 import Exchange  # noqa: E402
from agent.proxy.log import AccessLog, LineBase, RequestDenial, request_ids, request_record  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from agent.observe.pairstats import fine_percentile  # noqa: E402


def http_conn_labels(mtls=False):
    return [lb("source", mtls=mtls), lb("destination", mtls=mtls)]


def test_http_labels_are_istios_with_code_flags_and_protocol():
    h = m.HttpMetrics()
    h.observe(h.handle(http_conn_labels()), 404, "-", 3.0)
    h.observe(h.handle([lb("destination", mtls=False)]), 503, "UF,URX", 7.0)
    snap = h.snapshot()
    assert snap["labels"] == list(m.LABELS) + ["response_code", "grpc_response_status"]
    rows = {(r[0][0], r[0][-2], r[0][m.LABELS.index("response_flags")]): r for r in snap["series"]}
    assert set(rows) == {("source", "404", "-"), ("destination", "404", "-"),
                         ("destination", "503", "UF,URX")}
    d = dict(zip(snap["labels"], rows[("destination", "503", "UF,URX")][0]))
    assert d["request_protocol"] == "http" and d["grpc_response_status"] == ""
    assert d["connection_security_policy"] == "none" and d["source_principal"] == WEB.principal
    assert d["destination_service"] == "10.0.0.7" and d["destination_service_name"] == "unknown"
    json.dumps(snap)


def test_grpc_calls_carry_their_status_and_protocol():
    h = m.HttpMetrics()
    pids = h.handle([lb("destination")])
    h.observe(pids, 200, "-", 1.0, grpc="0")
    h.observe(pids, 200, "-", 1.0, grpc="7")
    h.observe(pids, 200, "-", 1.0, grpc="7")
    h.observe(pids, 200, "-", 1.0)  # plain HTTP on the same connection
    snap = h.snapshot()
    rows = [dict(zip(snap["labels"], r[0])) | {"n": r[1]} for r in snap["series"]]
    got = sorted((d["request_protocol"], d["grpc_response_status"], d["n"]) for d in rows)
    assert got == [("grpc", "0", 1), ("grpc", "7", 2), ("http", "", 1)]


def test_a_routed_service_names_destination_service_as_istio_does():
    h = m.HttpMetrics()
    (pid,) = h.prefixes([lb("destination")], "shop/reviews:9080")
    h.observe(h.handle([lb("destination")], "shop/reviews:9080"), 200, "-", 1.0)
    d = dict(zip(m.HTTP_LABELS, h.snapshot()["series"][0][0]))
    assert (d["destination_service"], d["destination_service_name"],
            d["destination_service_namespace"]) == ("reviews.shop.svc.cluster.local", "reviews", "shop")
    assert h.prefixes([lb("destination")], "shop/reviews:9080") == (pid,)  # interned
    assert h.prefixes([lb("destination")]) != (pid,)


def test_duration_and_size_buckets_are_envoys_defaults_with_le_semantics():
    assert m.BUCKETS[:4] == (0.5, 1, 5, 10) and m.BUCKETS[-1] == 3600000
    h = m.HttpMetrics()
    pids = h.handle([lb("destination")])
    for ms in (0.2, 0.5, 0.7, 1.0, 9.9, 4_000_000):  # <=0.5 twice, <=1 twice, <=10, beyond the last
        h.observe(pids, 200, "-", ms, req_bytes=0, resp_bytes=1234)
    (row,) = h.snapshot()["series"]
    _, count, dsum, dur, qsum, req, rsum, resp = row
    assert count == 6 and math.isclose(dsum, 0.2 + 0.5 + 0.7 + 1.0 + 9.9 + 4_000_000)
    assert dur[:4] == [2, 2, 0, 1] and dur[-1] == 1 and sum(dur) == 6
    assert req[0] == 6 and qsum == 0
    assert resp[m.BUCKETS.index(2500)] == 6 and rsum == 6 * 1234


def test_http_series_are_capped_and_overflow_counted():
    h = m.HttpMetrics(max_series=2)
    pids = h.handle(http_conn_labels())
    for code in (200, 404, 500):
        h.observe(pids, code, "-", 1.0)
    snap = h.snapshot()
    assert len(snap["series"]) == 2 and snap["overflow"] == 4  # 404 x1 and 500 x2 reporters... capped
    h2 = m.HttpMetrics(max_series=1)
    assert len(h2.prefixes(http_conn_labels())) == 1 and h2.overflow == 1
    h2.observe(h2.handle(()), 200, "-", 1.0)  # no label set at all: counted, not lost silently
    h2.observe(h2.handle(()), 200, "-", 1.0)
    assert h2.overflow == 3


def test_fine_latency_buckets_give_percentiles_within_two_percent():
    hist: dict[int, int] = {}
    values = [0.05 * 1.07 ** i for i in range(200)]  # 50 us .. ~35 s
    for v in values:
        k = m.fine_bucket(v)
        hist[k] = hist.get(k, 0) + 1
    for q in (50, 95, 99):
        exact = percentile(values, q)
        got = fine_percentile(hist, q, m.FINE_GROWTH)
        assert abs(got - exact) / exact < 0.02, (q, got, exact)
    assert fine_percentile({}, 50, m.FINE_GROWTH) is None
    assert m.fine_bucket(0.0) == 0


def http_worker(observations, denied=()):
    h = m.HttpMetrics()
    pids = h.handle(http_conn_labels())
    for code, ms in observations:
        h.observe(pids, code, "-", ms, 10, 100)
    for p in denied:
        h.deny(p)
    return {"http_metrics": h.snapshot(), "metrics": m.TcpMetrics().snapshot(),
            "active_connections": 0}


def test_request_metrics_sum_workers_and_parse_with_prometheus_client():
    got = scrape({"workers": [http_worker([(200, 2.0), (200, 30.0), (404, 0.3)], ["shop/deny-admin"]),
                              http_worker([(200, 700.0)], ["shop/deny-admin", ""]), None]})
    req = {(s["reporter"], s["response_code"]): v for s, v in got["istio_requests"]}
    assert req == {("source", "200"): 3, ("source", "404"): 1,
                   ("destination", "200"): 3, ("destination", "404"): 1}
    assert all(s["request_protocol"] == "http" and s["grpc_response_status"] == ""
               for s, _ in got["istio_requests"])
    dur = [(s, v) for s, v in got["istio_request_duration_milliseconds"]
           if s.get("reporter") == "destination" and s.get("response_code") == "200"]
    buckets = {s["le"]: v for s, v in dur if "le" in s}
    assert buckets["1"] == 0 and buckets["5"] == 1 and buckets["50"] == 2 and buckets["1000"] == 3
    assert buckets["+Inf"] == 3
    assert buckets["0.5"] == 0 and len(buckets) == len(m.BUCKETS) + 1
    # the parser folds _count/_sum into the family's samples
    fam = {f.name: f for f in text_string_to_metric_families(exposed(
        {"workers": [http_worker([(200, 2.0), (200, 30.0)])]}))}
    h = fam["istio_request_duration_milliseconds"]
    assert h.type == "histogram"
    sums = [s.value for s in h.samples if s.name.endswith("_sum") and s.labels["reporter"] == "source"]
    assert sums == [32.0]
    assert {f for f in fam} >= {"istio_request_bytes", "istio_response_bytes"}
    assert {s["policy"]: v for s, v in got["meshlet_denied_requests"]} == \
        {"shop/deny-admin": 2, "": 1}


def test_no_request_families_from_proxies_without_l7_counters():
    got = scrape(SNAP)  # workers that report no http_metrics at all
    assert "istio_requests" not in got and "meshlet_denied_requests" not in got
    got = scrape({"workers": [http_worker([])]})  # L7 counters, no request yet: no sample, no zero
    assert got["istio_requests"] == []


def test_stats_rows_carry_requests_success_rate_and_latency():
    w = http_worker([(200, 1.0)] * 90 + [(404, 2.0)] * 5 + [(503, 100.0)] * 5)
    t = m.TcpMetrics()
    t.opened(1, http_conn_labels())
    w["metrics"] = t.snapshot()
    names, tcp = merge_tcp([w])
    (row,) = pair_rows(names, tcp, [], WORKLOADS, merge_http([w]))
    assert row["reporter"] == "source" and row["requests"] == 100
    assert row["success_rate"] == 0.95  # 404 is a success, 503 is not
    lat = row["latency_ms"]
    assert abs(lat["p50"] - 1.0) < 0.02 and abs(lat["p95"] - 2.0) < 0.04
    assert abs(lat["p99"] - 100.0) < 2.0
    table = format_table([row]).splitlines()[1].split()
    assert table[-5:] == ["100", "95.0%", f"{lat['p50']:g}ms", f"{lat['p95']:g}ms", f"{lat['p99']:g}ms"]


def test_stats_l7_columns_fall_back_to_the_other_reporter_and_stay_none_without_requests():
    h = m.HttpMetrics()
    h.observe(h.handle([lb("destination")]), 200, "-", 5.0)
    w = {"http_metrics": h.snapshot(), "metrics": None}
    names, tcp = merge_tcp([worker([(lb("source"), 1, 1, False)])])
    (row,) = pair_rows(names, tcp, [], WORKLOADS, merge_http([w]))
    assert row["reporter"] == "source" and row["requests"] == 1 and row["success_rate"] == 1.0
    names, tcp = merge_tcp([worker([(lb("source"), 1, 1, False)])])
    (row,) = pair_rows(names, tcp, [], WORKLOADS, merge_http([{"http_metrics": m.HttpMetrics().snapshot()}]))
    assert row["requests"] is None and row["latency_ms"]["p99"] is None


def head(method=b"GET", path="/api/items", query="page=2", host=b"web:8080", headers=()):
    return SimpleNamespace(method=method, path=NormalizedPath(path, query), host=host,
                           headers=list(headers))


def test_request_record_has_the_connection_fields_and_the_requests_own():
    base = {"ts": "t", "route": "local", "src_pod": "shop/web-1", "dst_pod": "data/db-1",
            "bytes_sent": 999, "bytes_received": 999, "duration_ms": 5000.0, "result": "ok",
            "reason": "http: 3 request(s)", "source_workload": "web"}
    ex = Exchange(cluster="data/db:80", upstream=("10.0.0.7", 80), attempts=2, flags="URX",
                  request_body_bytes=12, response_body_bytes=34)
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    hd = head(headers=[(b"X-Request-ID", b" abc-123 "), (b"traceparent", tp)])
    rec = request_record(base, hd, 503, 0.0125, ex, request_ids(hd, ex))
    assert rec["kind"] == "request" and rec["route"] == "local" and rec["source_workload"] == "web"
    assert (rec["method"], rec["path"], rec["authority"], rec["status"]) == \
        ("GET", "/api/items", "web:8080", 503)  # path normalized, no query
    assert rec["duration_ms"] == 12.5 and rec["bytes_sent"] == 12 and rec["bytes_received"] == 34
    assert rec["upstream"] == "10.0.0.7:80" and rec["cluster"] == "data/db:80" and rec["attempts"] == 2
    assert rec["response_flags"] == "URX" and rec["result"] == "URX" and rec["reason"] == ""
    assert rec["request_id"] == "abc-123" and rec["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "policy" not in rec and base["bytes_sent"] == 999  # base untouched
    denied = request_record(base, head(), 403, 0.001, Exchange(), request_ids(head(), Exchange()),
                            flags="RBAC", denial=RequestDenial("policy", "shop/deny-admin", 0, "policy x"))
    assert denied["verdict"] == "denied" and denied["policy"] == "shop/deny-admin" and denied["rule"] == 0
    assert denied["deny_reason"] == "policy" and denied["reason"] == "policy x"
    assert denied["response_flags"] == "RBAC" and denied["request_id"] is None
    assert denied["trace_id"] is None
    json.dumps(rec)


def written_request_lines(tmp_path, base, calls):
    """What AccessLog.write_request wrote for ``calls`` [(head, status, elapsed, exchange, flags, denial)]."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        for hd, status, elapsed, ex, flags, denial in calls:
            assert log.write_request(base, "k", 1.0, hd, status, elapsed, ex, flags=flags, denial=denial)
        log.flush()
    finally:
        log.close()
    return path.read_text().splitlines()


def reference_line(base, hd, status, elapsed, ex, flags=None, denial=None):
    rec = request_record(dict(base), hd, status, elapsed, ex, request_ids(hd, ex), flags, denial)
    return json.dumps(rec, separators=(",", ":"))


def test_request_lines_from_the_template_are_json_dumps_of_request_record(tmp_path):
    # LineBase encodes only the request's fields into a template of the
    # connection's; the text must be what the generic json.dumps wrote
    # (same keys, same order), for any record: escapes, braces in values,
    # labels, audit lists, a "ts" per request, denials and gRPC (the generic path).
    conn = {"ts": "2026-01-01T00:00:00.000+00:00", "worker": 0, "direction": "inbound",
            "route": "tunnel", "src_pod": "shop/web-{1}", "src_identity": "spiffe://x/ns/shop/sa/\u00e9\"q",
            "dst_addr": "10.0.0.7:80", "peer_verified": True, "bytes_sent": 0, "bytes_received": 0,
            "duration_ms": 1.5, "result": "ok", "reason": "", "deny_reason": None,
            "source_workload": "w\u00fcb %s {0}", "verdict": "allowed", "policy": None, "rule": None,
            "audit": ["a/b", "c"]}
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    calls = [
        (head(), 200, 0.0125, Exchange(cluster=None, upstream=("10.0.0.7", 80), attempts=1), None, None),
        (head(method=b"P\xe9ST", path="/a\"b/{c}", host=None, headers=[(b"X-Request-ID", b"r\x01d"),
                                                                     (b"traceparent", tp)]),
         503, 1e-7, Exchange(cluster="data/db:80", upstream=("fd00::7", 8080), attempts=2, flags="UF,URX",
                             request_body_bytes=12, response_body_bytes=34), None, None),
        (head(), 403, 0.001, Exchange(), "RBAC", RequestDenial("policy", "shop/deny", 0, "policy x")),
        (head(), 200, 0.002, Exchange(grpc_status=7), None, None),
        (head(), 0, float("nan"), Exchange(), None, None),
    ]
    for base in (LineBase(conn), LineBase({}), LineBase({"kind": "x", "status": 1, "ts": "t", "z": 1.25})):
        want = []
        for i, (hd, status, elapsed, ex, flags, denial) in enumerate(calls):
            if "ts" in base:
                base["ts"] = f"ts-{i}"
            want.append(reference_line(base, hd, status, elapsed, ex, flags, denial))
        base.template = None
        got = []
        for i, call in enumerate(calls):
            if "ts" in base:
                base["ts"] = f"ts-{i}"
            got += written_request_lines(tmp_path, base, [call])[-1:]
            (tmp_path / "access.log").unlink()
        assert got == want
        assert base.template is not None  # the template was used (and kept)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                                                     st.floats(allow_nan=False, allow_infinity=False),
                                                     st.lists(st.text(max_size=3), max_size=2)), max_size=8),
       st.text(max_size=10), st.binary(max_size=10), st.floats(min_value=0, max_value=1e6),
       st.binary(min_size=1, max_size=6).filter(lambda b: b.strip(b" \t")))
def test_request_line_template_matches_json_dumps_for_any_record(record, path, host, elapsed, rid):
    base = LineBase(record)
    hd = head(path=path, host=host, headers=[(b"x-request-id", rid)])
    ex = Exchange(cluster=path or None, upstream=("10.0.0.1", 1), attempts=1, request_body_bytes=len(path))
    want = reference_line(base, hd, 200, elapsed, ex)
    with tempfile.TemporaryDirectory() as d:
        assert written_request_lines(pathlib.Path(d), base, [(hd, 200, elapsed, ex, None, None)]) == [want]


def test_request_ids_are_what_the_exchange_forwarded():
    # the client sent an invalid x-request-id: the hop generated one, and that is logged
    client = [(b"x-request-id", b"not valid!"), (b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")]
    hop = tracing.hop(client)
    assert hop.request_id_generated
    got = request_ids(head(headers=client), Exchange(trace=hop))
    assert got == (hop.request_id.decode(), "a" * 32)
    # not forwarded (answered by the proxy): what the client sent
    assert request_ids(head(headers=[(b"x-request-id", b"client")]), Exchange()) == ("client", None)
    assert request_ids(head(headers=[(b"traceparent", b"garbage")]), Exchange()) == (None, None)


# --- the proxy worker's hook, on real sockets (no root: loopback addresses) --------------

from tests.support.aio import close_writer, run  # noqa: E402
from tests.support.http import StatusServer, http_request  # noqa: E402
from tests.support.mesh import Cluster, FlowOrigin, V4  # noqa: E402


async def get(reader, writer, path: str, rid: str | None = None) -> int:
    headers = (("X-Request-Id", rid),) if rid else ()
    return (await http_request(reader, writer, "GET", path, headers=headers))[0]


PATHS = ["/ok", "/ok?x=1", "/missing", "/ok", "/nope/../ok", "/gone"]  # 200 200 404 200 200 404


@pytest.mark.parametrize("dst_ip,node,reporters,mtls",
                         [("127.0.0.5", 0, ("destination", "source"), "none"),
                          ("127.0.0.7", 1, ("destination",), "mutual_tls")], ids=["local", "tunnel"])
def test_each_request_is_counted_timed_and_logged(tmp_path, dst_ip, node, reporters, mtls):
    async def main():
        async with Cluster(tmp_path, l7=True) as c:
            web = await StatusServer(dst_ip).start()
            try:
                codes = []
                r, w = await c.connect(FlowOrigin(V4, dst_ip, web.port, 1001))
                for i, p in enumerate(PATHS):
                    codes.append(await get(r, w, p, rid=f"req-{i}" if i % 2 else None))
                await close_writer(w)
                srv = c.servers[node]
                async with asyncio.timeout(10):  # the connection line is written at close
                    while srv.stats()["active_connections"]:
                        await asyncio.sleep(0.01)
                return codes, srv.stats(), c.access(f"node{node + 1}")
            finally:
                await web.stop()

    codes, stats, log = run(main())
    assert codes == [200, 200, 404, 200, 200, 404]
    hm = stats["http_metrics"]
    series = {}
    for row in hm["series"]:
        d = dict(zip(hm["labels"], row[0]))
        series[(d["reporter"], d["response_code"])] = (d, row)
    assert set(series) == {(r, c) for r in reporters for c in ("200", "404")}
    for r in reporters:
        d, row = series[(r, "200")]
        assert row[1] == 4 and series[(r, "404")][1][1] == 2
        assert d["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
        assert d["destination_workload"] == ("web-1" if node == 0 else "db-1")
        assert d["connection_security_policy"] == mtls and d["response_flags"] == "-"
        assert 0 < row[2] < 10_000 * 4  # summed duration: positive, below the test's bound
        # body bytes as the session reports them (Exchange.response_body_bytes), same as the log
        assert row[6] == sum(e["bytes_received"] for e in log
                             if e.get("kind") == "request" and e["status"] == 200)
    # the access log: one line per request, then the connection's line
    reqs = [e for e in log if e.get("kind") == "request"]
    conns = [e for e in log if e.get("kind") != "request" and e["dst_pod"]]
    assert len(reqs) == len(PATHS) and len(conns) == 1
    assert [e["path"] for e in reqs] == ["/ok", "/ok", "/missing", "/ok", "/ok", "/gone"]
    assert [e["status"] for e in reqs] == codes
    assert all(e["method"] == "GET" and e["authority"] == "web" and 0 < e["duration_ms"] < 10_000
               and e["response_flags"] == "-" and e["result"] == "ok"
               and e["src_pod"] == conns[0]["src_pod"] and e["dst_pod"] == conns[0]["dst_pod"]
               and e["connection_security_policy"] == mtls for e in reqs)
    assert [e["request_id"] for e in reqs][1::2] == ["req-1", "req-3", "req-5"]
    for e in reqs:  # what the session's Exchange says (filled in by the L7 traffic work)
        if e["upstream"] is not None:
            assert e["upstream"].rsplit(":", 1)[0] == dst_ip and e["attempts"] >= 1
    assert sum(int(k) * 0 + v for _, hist in hm["latency"] for k, v in hist.items()) == \
        len(PATHS) * len(reporters)


def test_sampling_zero_writes_no_request_lines_but_still_counts(tmp_path):
    async def main():
        async with Cluster(tmp_path, l7=True) as c:
            web = await StatusServer("127.0.0.5").start()
            try:
                srv = c.servers[0]
                st = srv.watcher.current
                srv.watcher.current = dataclasses.replace(
                    st, access_log=dataclasses.replace(st.access_log, sampling=0.0))
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", web.port, 1001))
                for p in ("/ok", "/x"):
                    await get(r, w, p)
                await close_writer(w)
                return srv.stats(), c.access("node1")
            finally:
                await web.stop()

    stats, log = run(main())
    assert not [e for e in log if e.get("kind") == "request"]
    assert stats["counters"]["access_log_skipped"] >= 2
    assert sum(row[1] for row in stats["http_metrics"]["series"]) == 4  # 2 requests x 2 reporters


def test_a_request_refused_by_policy_is_counted_under_its_policy(tmp_path):
    """The integrator's short-circuit records (head, RequestDenial) on the
    connection before answering 403 / 401; the response hook counts and logs
    it: RBAC for authorization, no flag for authentication (as Envoy)."""
    from agent.proxy.conn import Conn
    from agent.proxy.state import StateWatcher
    from agent.proxy.server import ProxyServer
    from tests.support.mesh import state_doc

    (tmp_path / "state.json").write_text(json.dumps(state_doc("node1", "127.0.0.1", 1, 2)))
    srv = ProxyServer(StateWatcher(str(tmp_path / "state.json")), flow_table=object(),
                      access_log=str(tmp_path / "access.log"))
    try:
        conn = Conn(direction="inbound", client=None)
        conn.labels = [lb("destination")]
        hd = head(path="/admin", query=None)
        conn.denials[id(hd)] = (hd, RequestDenial("policy", "shop/deny-admin", 0, "policy shop/deny-admin rule 0"))
        nomatch = head(path="/grpc.Svc/Get", query=None)  # gRPC: HTTP 200 + grpc-status 7
        conn.denials[id(nomatch)] = (nomatch, RequestDenial("policy", None, None, "no ALLOW policy match"))
        jwt = head(path="/me", query=None)
        conn.denials[id(jwt)] = (jwt, RequestDenial("authentication", None, None, "Jwt is expired"))
        srv.accounting.on_http_response(conn, jwt, 401, 0.0004, Exchange())
        srv.accounting.on_http_response(conn, nomatch, 200, 0.0004, Exchange(grpc_status=7))
        srv.accounting.on_http_response(conn, hd, 403, 0.0004, Exchange())
        other = head(path="/ok", query=None)
        srv.accounting.on_http_response(conn, other, 403, 0.0004, Exchange())  # the app's own 403: not a denial
        srv.accounting.on_http_response(conn, hd, 403, 0.0004, Exchange())  # reported once only
        hm = srv.stats()["http_metrics"]
    finally:
        srv.inputs.access.close()
    assert hm["denied_policies"] == {"shop/deny-admin": 1, "": 1} and not conn.denials
    flags = sorted({dict(zip(hm["labels"], r[0]))["response_flags"] for r in hm["series"]})
    assert flags == ["-", "RBAC"]
    lines = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    got = [(e["path"], e["status"], e["response_flags"], e.get("verdict"), e.get("deny_reason"), e.get("policy"),
            e.get("rule"), e["reason"]) for e in lines]
    assert got == [
        ("/me", 401, "-", "denied", "authentication", None, None, "Jwt is expired"),
        ("/grpc.Svc/Get", 200, "RBAC", "denied", "policy", None, None, "no ALLOW policy match"),
        ("/admin", 403, "RBAC", "denied", "policy", "shop/deny-admin", 0, "policy shop/deny-admin rule 0"),
        ("/ok", 403, "-", None, None, None, None, ""),
        ("/admin", 403, "-", None, None, None, None, ""),
    ]


def test_each_workers_tunnel_connections_are_a_gauge_with_how_new_ones_are_picked():
    w0 = {**worker([]), "worker": 0, "tunnel_spread": {"workers": 2, "ipv4": "least-loaded", "load": 3}}
    w1 = {**worker([]), "worker": 1,
          "tunnel_spread": {"workers": 2, "ipv4": "least-loaded", "ipv6": "hash: no CAP_BPF", "load": 1}}
    old = {**worker([]), "worker": 2}  # a worker from before the least-loaded pick: no series
    got = scrape({**SNAP, "workers": [w0, w1, old]})
    assert sorted((s["worker"], s["pick"], v) for s, v in got["meshlet_proxy_tunnel_connections"]) == [
        ("0", "least-loaded", 3), ("1", "hash", 1)]


def test_each_workers_active_connections_are_a_gauge_with_how_new_pod_connections_are_picked():
    w0 = {**worker([]), "worker": 0, "outbound_spread": {"workers": 2, "ipv4": "least-loaded", "load": 7}}
    w1 = {**worker([]), "worker": 1,
          "outbound_spread": {"workers": 2, "ipv4": "hash: no pin directory /x", "load": 5}}
    old = {**worker([]), "worker": 2}  # a worker from before the outbound pick: no series
    got = scrape({**SNAP, "workers": [w0, w1, old]})
    assert sorted((s["worker"], s["pick"], v) for s, v in got["meshlet_proxy_worker_connections"]) == [
        ("0", "least-loaded", 7), ("1", "hash", 5)]
    assert "meshlet_proxy_tunnel_connections" not in got or not got["meshlet_proxy_tunnel_connections"]
