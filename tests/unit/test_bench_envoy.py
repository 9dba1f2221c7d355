"""The Envoy-sidecars benchmark path (scripts/bench_envoy.py): what it
captures, what its sidecars admit, and how the comparison is computed.
The speed itself lives in the benchmark, never in a test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))

import bench_envoy as be  # noqa: E402 - scripts/ is not a package


def test_capture_only_the_benchmark_ports_and_never_envoys_own_traffic():
    rules = be.iptables_rules()
    out = [r for r in rules if r[:2] == ["-A", be.CHAIN_OUT]]
    # Envoy's uid returns before any redirect, or its upstream connections would loop.
    assert out[0][-1] == "RETURN" and str(be.ENVOY_UID) in out[0]
    redirects = [r for r in rules if "REDIRECT" in r]
    assert len(redirects) == 2
    for r in redirects:
        assert r[r.index("--dports") + 1] == "8080,5201,7001"
    # every chain and jump made is removed again
    made = {r[1] for r in rules if r[0] == "-N"}
    removed = {r[1] for r in be.iptables_cleanup() if r[0] == "-X"}
    assert made == removed
    jumps = [r for r in rules if r[0] == "-A" and r[1] in ("OUTPUT", "PREROUTING")]
    assert sorted(["-D", *r[1:]] for r in jumps) == sorted(r for r in be.iptables_cleanup() if r[0] == "-D")


def test_sidecar_config_is_mtls_13_with_spiffe_rbac():
    certs = {"chain": "/c", "key": "/k", "bundle": "/b"}
    cfg = be.envoy_config(certs, peers_out=["spiffe://td/ns/a/sa/srv"], peers_in=["spiffe://td/ns/a/sa/cli"])
    listeners = {x["name"]: x for x in cfg["static_resources"]["listeners"]}
    inbound = listeners["virtualInbound"]["filter_chains"]
    assert {c["filter_chain_match"]["destination_port"] for c in inbound} == {8080, 5201, 7001}
    for chain in inbound:
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        ctx = tls["common_tls_context"]
        assert ctx["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
        assert ctx["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/cli"}}]
        rbac = [f for f in _filters(chain) if "rbac" in f["name"]]
        assert len(rbac) == 1
        principals = rbac[0]["typed_config"]["rules"]["policies"]["allow-peers"]["principals"]
        assert principals == [{"authenticated": {"principal_name": {"exact": "spiffe://td/ns/a/sa/cli"}}}]
    (outbound,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "outbound"]
    assert outbound["type"] == "ORIGINAL_DST"
    up = outbound["transport_socket"]["typed_config"]["common_tls_context"]
    assert up["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://td/ns/a/sa/srv"}


def _filters(chain):
    out = []
    for f in chain["filters"]:
        out.append(f)
        out += f["typed_config"].get("http_filters", [])
    return out


def test_comparison_ratios_and_added_latency():
    direct = {"http": {"rps": 1000.0}, "http_c1": {"p50_ms": 0.10}}
    meshlet = {"http": {"rps": 500.0}, "http_c1": {"p50_ms": 0.20}, "bulk": {"gbps": 2.0}}
    envoy = {"http": {"rps": 250.0}, "http_c1": {"p50_ms": 0.50}, "bulk": {"gbps": 4.0}, "rss_mb": {"n1": 70.0}}
    rows = {r["metric"]: r for r in be.comparison(direct, meshlet, None, envoy, {"n1": 35.0, "n2": 40.0})}
    assert rows["req/s, c32"]["meshlet_over_envoy"] == 2.0
    assert rows["req/s, c32"]["meshlet_over_direct"] == 0.5
    assert rows["bulk Gbit/s"]["meshlet_over_envoy"] == 0.5
    assert rows["added p50 ms, c1"]["meshlet"] == 0.1 and rows["added p50 ms, c1"]["envoy"] == 0.4
    assert rows["added p50 ms, c1"]["meshlet_over_envoy"] == 0.25
    assert rows["RSS MB per node"]["meshlet"] == 40.0  # the larger node
    assert rows["new conn/s"]["meshlet_over_envoy"] is None  # not measured: no ratio, not zero


def test_comparison_adds_the_default_worker_count_rows_when_given():
    direct = {"http": {"rps": 1000.0, "p99_ms": 1.0}}
    envoy = {"http": {"rps": 250.0, "p99_ms": 8.0}}
    l4 = {"workers": 2, "http": {"rps": 800.0, "p99_ms": 2.0}}
    l7 = {"workers": 2, "http": {"rps": 500.0, "p99_ms": 4.0}}
    rows = {r["metric"]: r for r in be.comparison(direct, {}, None, envoy, {}, at_workers=(2, l4, l7))}
    rps, p99 = rows["req/s, c32, 2 workers"], rows["p99 ms, c32, 2 workers"]
    assert rps["meshlet_over_envoy"] == 3.2 and rps["meshlet_l7_over_envoy"] == 2.0 and rps["higher_is_better"]
    assert p99["meshlet_l7_over_envoy"] == 0.5 and not p99["higher_is_better"]
    assert rps["meshlet_over_direct"] == 0.8
    plain = {r["metric"] for r in be.comparison(direct, {}, None, envoy, {})}
    assert not any("workers" in m for m in plain)  # one worker only: no such rows


def test_comparison_has_a_pss_row_beside_the_rss_row():
    envoy = {"rss_mb": {"n1": 70.0}, "pss_mb": {"n1": 60.0}}
    pss = {"n1": 63.0, "n2": 66.0}
    rows = {r["metric"]: r for r in be.comparison({}, {}, None, envoy, {"n1": 90.0}, pss)}
    assert rows["RSS MB per node"]["meshlet_over_envoy"] == round(90.0 / 70.0, 3)  # RSS stays shown
    assert rows["PSS MB per node"]["meshlet"] == 66.0  # the larger node
    assert rows["PSS MB per node"]["meshlet_over_envoy"] == 1.1
    no_pss = {r["metric"]: r for r in be.comparison({}, {}, None, {}, {"n1": 90.0})}
    assert no_pss["PSS MB per node"]["meshlet"] is None  # not measured: no number, not zero


@pytest.fixture
def forked_pair():
    """A process holding 32 MiB it wrote, and a forked child sharing those
    pages copy-on-write; both wait on stdin.  A tree of our own, not this
    test process's: other tests' children come and go in that one."""
    code = "import os, sys; b = bytearray(b'x') * (32 << 20); os.fork() or sys.stdin.read(); sys.stdin.read()"
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        kids: list[int] = []
        while time.monotonic() < deadline:
            with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
                kids = [int(c) for c in f.read().split()]
            if kids and be._tree_rss_kb(kids[0]) >= 32 << 10:
                break
            time.sleep(0.05)
        assert kids, "the child was not forked"
        yield parent.pid, kids[0]
    finally:
        parent.communicate(b"")


def test_tree_memory_sums_a_real_process_tree(forked_pair):
    # The child is counted, and PSS (the pages the two share divided) is
    # less than RSS (counted in full in each).
    parent, child = forked_pair
    rss, pss = be._tree_rss_kb(parent), be._tree_pss_kb(parent)
    alone = be._tree_rss_kb(child)
    assert alone >= 32 << 10 and rss >= alone + (32 << 10)
    assert 0 < pss < rss - (8 << 10)


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows page frames to root only")
def test_distinct_memory_counts_a_page_two_processes_share_once(forked_pair):
    # Distinct pages: fewer than the summed RSS, at least what each holds.
    parent, child = forked_pair
    summed = be._tree_rss_kb(parent)
    distinct = be._tree_distinct_kb(parent)
    assert 32 << 10 <= be._tree_distinct_kb(child) <= distinct
    assert distinct < summed - (24 << 10)  # the 32 MiB buffer is counted once, not twice


def test_comparison_has_a_distinct_pages_row():
    envoy = {"rss_mb": {"n1": 74.0}, "distinct_mb": {"n1": 74.0}}
    distinct = {"n1": 81.4, "n2": 77.7}
    rows = {r["metric"]: r for r in be.comparison({}, {}, None, envoy, {"n1": 105.0}, None, distinct)}
    assert rows["distinct MB per node"]["meshlet"] == 81.4  # the larger node
    assert rows["distinct MB per node"]["meshlet_over_envoy"] == 1.1
    assert rows["PSS MB per node"]["meshlet"] is None  # not measured: no number, not zero


def test_the_chart_shows_req_s_at_the_default_worker_count_beside_the_main_rows():
    direct = {"http": {"rps": 1000.0, "p99_ms": 1.0}}
    envoy = {"http": {"rps": 250.0, "p99_ms": 8.0}}
    two = {"workers": 2, "http": {"rps": 800.0, "p99_ms": 2.0}}
    shown = [r["metric"] for r in be.chart_rows(be.comparison(direct, {}, None, envoy, {}, at_workers=(2, two, two)))]
    assert shown == ["req/s, c32", "p99 ms, c32", "bulk Gbit/s", "new conn/s", "req/s, c32, 2 workers",
                     "added p50 ms, c1", "RSS MB per node", "PSS MB per node", "distinct MB per node"]
    one = [r["metric"] for r in be.chart_rows(be.comparison(direct, {}, None, envoy, {}))]
    assert "req/s, c32, 2 workers" not in one and len(one) == 8


def test_median_row_folds_rounds_and_leaves_out_a_failed_part():
    rounds = [
        {"http": {"rps": 100.0, "p99_ms": 9.0, "requests": 10}, "bulk": {"gbps": 3.0}},
        {"http": {"rps": None, "error": "wrk: connection refused"}, "bulk": {"gbps": 5.0}},
        {"http": {"rps": 300.0, "p99_ms": 1.0, "requests": 30}, "bulk": {"gbps": 4.0}},
        None,  # a round that did not measure this path
    ]
    row = be.median_row(rounds)
    assert row["http"]["rps"] == 200.0  # the two rounds with a rate, not (0 + 100 + 300)
    assert row["http"]["p99_ms"] == 5.0 and row["bulk"]["gbps"] == 4.0
    assert row["http"]["error"] == "wrk: connection refused"  # not a number: kept as the round gave it
    assert be.median_row([None, {}]) is None


def test_paired_comparison_takes_the_median_of_each_rounds_own_ratio():
    # The host slows down in round 2 for both sides alike: the paired ratio holds
    # at 2.0 every round, while the medians of the values alone would give 400/150.
    direct = {"http": {"rps": 1000.0}, "http_c1": {"p50_ms": 0.1}}
    rounds = [
        {"direct": direct,
         "meshlet": {"http": {"rps": 400.0}, "http_c1": {"p50_ms": 0.2}, "bulk": {"gbps": 2.0}},
         "envoy": {"http": {"rps": 200.0}, "http_c1": {"p50_ms": 0.5}, "bulk": {"gbps": 4.0}},
         "meshlet_l7": {"http": {"rps": 300.0}}, "envoy_l7": {"http": {"rps": 200.0}}},
        {"direct": direct,
         "meshlet": {"http": {"rps": 200.0}, "http_c1": {"p50_ms": 0.3}, "bulk": {"gbps": 1.0}},
         "envoy": {"http": {"rps": 100.0}, "http_c1": {"p50_ms": 0.5}, "bulk": {"gbps": 4.0}},
         "meshlet_l7": {"http": {"rps": 100.0}}, "envoy_l7": {"http": {"rps": 100.0}}},
        {"direct": direct,
         "meshlet": {"http": {"rps": 600.0}, "http_c1": {"p50_ms": 0.2}, "bulk": {"gbps": 3.0}},
         "envoy": {"http": {"rps": 300.0}, "http_c1": {"p50_ms": 0.6}, "bulk": {"gbps": 4.0}},
         "meshlet_l7": {"http": {"rps": 900.0}}, "envoy_l7": {"http": {"rps": 300.0}}},
    ]
    memory = {"rss_mb": {"n1": 70.0}}
    rows = {r["metric"]: r for r in be.paired_comparison(rounds, {"n1": 60.0}, envoy_memory=memory)}
    rps = rows["req/s, c32"]
    assert rps["meshlet"] == 400.0 and rps["envoy"] == 200.0  # medians of the values
    assert rps["meshlet_over_envoy_rounds"] == [2.0, 2.0, 2.0] and rps["meshlet_over_envoy"] == 2.0
    # L7 against the Envoy run of its own round: 1.5, 1.0, 3.0
    assert rps["meshlet_l7_over_envoy_rounds"] == [1.5, 1.0, 3.0] and rps["meshlet_l7_over_envoy"] == 1.5
    added = rows["added p50 ms, c1"]  # per round (0.1/0.4, 0.2/0.4, 0.1/0.5)
    assert added["meshlet_over_envoy_rounds"] == [0.25, 0.5, 0.2] and added["meshlet_over_envoy"] == 0.25
    assert rows["bulk Gbit/s"]["meshlet_over_envoy"] == 0.5
    mem = rows["RSS MB per node"]  # read once: its ratio from the values, no rounds
    assert mem["meshlet_over_envoy"] == round(60.0 / 70.0, 3) and "meshlet_over_envoy_rounds" not in mem
    assert rows["new conn/s"]["meshlet_over_envoy"] is None  # not measured in any round: no ratio


def test_paired_comparison_pairs_the_default_worker_rows_with_envoy_in_their_round():
    direct = {"http": {"rps": 1000.0, "p99_ms": 1.0}}
    rounds = [
        {"direct": direct, "meshlet": {"http": {"rps": 400.0}}, "envoy": {"http": {"rps": 200.0}},
         "meshlet_w": {"http": {"rps": 900.0, "p99_ms": 2.0}},
         "envoy_w": {"http": {"rps": 300.0, "p99_ms": 8.0}},
         "meshlet_l7_w": {"http": {"rps": 500.0}}, "envoy_l7_w": {"http": {"rps": 250.0}}},
        {"direct": direct, "meshlet": {"http": {"rps": 400.0}}, "envoy": {"http": {"rps": 200.0}},
         "meshlet_w": {"http": {"rps": 300.0, "p99_ms": 4.0}},
         "envoy_w": {"http": {"rps": 100.0, "p99_ms": 8.0}},
         "meshlet_l7_w": {"http": {"rps": 200.0}}, "envoy_l7_w": {"http": {"rps": 400.0}}},
    ]
    one_pass = (2, {"http": {"rps": 1.0}}, None)  # the workers table's row: not used when rounds have them
    rows = {r["metric"]: r for r in be.paired_comparison(rounds, {}, at_workers=one_pass, workers=2)}
    w = rows["req/s, c32, 2 workers"]
    assert w["meshlet"] == 600.0  # median of 900 and 300, not the one-pass row
    assert w["meshlet_over_envoy_rounds"] == [3.0, 3.0] and w["meshlet_over_envoy"] == 3.0
    assert w["meshlet_l7_over_envoy_rounds"] == [2.0, 0.5]  # against Envoy beside the L7 runs
    assert rows["p99 ms, c32, 2 workers"]["meshlet_over_envoy_rounds"] == [0.25, 0.5]
    assert rows["req/s, c32"]["meshlet_over_envoy_rounds"] == [2.0, 2.0]  # the L4 rows keep their own pairs
    single = {r["metric"]: r for r in be.paired_comparison(rounds[:1], {}, at_workers=one_pass)}
    assert single["req/s, c32, 2 workers"]["meshlet"] == 1.0  # no workers= : the one-pass row
