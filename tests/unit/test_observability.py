"""Observability without sockets (#6): the proxy's Istio-labelled counters,
the label-set cap, access-log sampling, the proxy state's new fields, the
/metrics families (parsed back with prometheus-client's parser), and
`meshlet stats` rows and table."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.app import proxy_state
from agent.config import parse_config
from agent.metrics import _Collector, families, merge_tcp
from agent.proxy import metrics as m
from agent.proxy.log import sampled
from agent.proxy.state import StateError, parse_state
from agent.stats import StatsFilter, format_table, pair_rows, percentile, select
from agent.workloads.inventory import parse_inventory

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


def scrape(snap) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(lambda: snap))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
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
    reg = CollectorRegistry(auto_describe=False)
    c = _Collector(boom)
    reg.register(c)
    text = generate_latest(reg).decode()
    assert "meshlet_metrics_scrape_errors_total 1.0" in text and c.errors == 1


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
