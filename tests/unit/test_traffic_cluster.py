"""agent/traffic/upstream_cluster.py: picking, accounting, updates that keep state."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.traffic import outcome as oc
from agent.traffic.breaker import Limit
from agent.traffic.upstream_cluster import Cluster, target_str
from agent.traffic.trafficpolicy import (
    Budget, CircuitBreaker, OutlierDetection, Retries, TrafficSettings,
)

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80, "spiffe://td/ns/a/sa/x")
EJECT_FAST = TrafficSettings(outlier_detection=OutlierDetection(
    consecutive_5xx=2, base_ejection_time=10.0, max_ejection_percent=50))


def test_single_is_nameless_and_always_picks_its_target_without_accounting():
    c = Cluster.single(A)
    assert c.name is None and c.targets == (A,) and not c.multi
    assert all(c.pick(0.0) == A for _ in range(5))
    assert c.pick(0.0, avoid={A}) == A  # the only endpoint, even if already tried
    assert c.start(A) is None
    for _ in range(10):
        c.finish(None, A, oc.status(503), 0.01, 1.0)
    assert c.outlier.ejected(1.0) == frozenset() and c.lb.outstanding(A) == 0
    assert c.label() == "10.0.0.1:80" and c.label(A) == "10.0.0.1:80"


def test_targets_are_validated_deduplicated_and_keep_extra_elements():
    c = Cluster("ns/s:80", [A, C, A])
    assert c.targets == (A, C) and c.multi
    assert target_str(("fd00::1", 8080)) == "[fd00::1]:8080"
    assert c.label(C) == "ns/s:80 (10.0.0.3:80)"
    for bad in [("10.0.0.1",), ["10.0.0.1", 80], ("10.0.0.1", 0), ("10.0.0.1", "80"), ("10.0.0.1", True),
                ("10.0.0.1", 80, [1])]:
        with pytest.raises((ValueError, TypeError)):
            Cluster("x", [bad])


def test_empty_cluster_picks_nothing():
    assert Cluster("ns/s:80", []).pick(0.0) is None


def test_pick_skips_ejected_and_avoided_endpoints():
    c = Cluster("ns/s:80", [A, B], EJECT_FAST, rng=random.Random(1))
    for _ in range(2):
        c.finish(c.start(A), A, oc.status(500), 0.01, 1.0)
    assert c.outlier.ejected(1.0) == {A}
    assert {c.pick(2.0) for _ in range(20)} == {B}
    assert c.healthy(2.0) == [B]
    c2 = Cluster("ns/s:80", [A, B], rng=random.Random(2))
    assert {c2.pick(0.0, avoid={A}) for _ in range(20)} == {B}
    assert {c2.pick(0.0, avoid={A, B}) for _ in range(40)} == {A, B}  # all tried: any


def test_spread_and_outstanding_accounting():
    c = Cluster("ns/s:80", [A, B, C], rng=random.Random(3))
    toks = []
    for _ in range(30):
        t = c.pick(0.0)
        toks.append((t, c.start(t)))
    counts = Counter(t for t, _ in toks)
    assert max(counts.values()) - min(counts.values()) <= 2  # least outstanding evens it out
    for t, tok in toks:
        c.finish(tok, t, oc.status(200), 0.001, 0.0)
    assert all(c.lb.outstanding(t) == 0 for t in c.targets)
    tok = c.start(A)
    c.finish(tok, A, None, 0.5, 0.0)  # abandoned: released, nothing recorded for outliers
    assert c.lb.outstanding(A) == 0


def test_update_keeps_state_of_remaining_endpoints_and_applies_new_settings():
    c = Cluster("ns/s:80", [A, B], EJECT_FAST, rng=random.Random(4))
    for _ in range(2):
        c.finish(c.start(A), A, oc.status(503), 0.01, 1.0)
    held = c.start(B)
    assert c.breaker.acquire(Limit.REQUESTS) is None
    c.budget.request(1.0)
    new = TrafficSettings(retries=Retries(attempts=0), budget=Budget(percent=50, min_per_second=1),
                          circuit_breaker=CircuitBreaker(max_requests=1),
                          outlier_detection=EJECT_FAST.outlier_detection)
    c.update([A, B, C], new, 2.0)
    assert c.outlier.ejected(2.0) == {A}  # still ejected
    assert c.lb.outstanding(B) == 1  # in-flight work kept
    assert c.breaker.active[Limit.REQUESTS] == 1  # counts carry on ...
    assert c.breaker.acquire(Limit.REQUESTS) is not None  # ... against the new limit
    assert c.budget.budget == new.budget and c.budget.requests == 1
    assert not c.retries_on and c.retry_statuses == frozenset()
    c.finish(held, B, oc.status(200), 0.01, 2.0)
    c.update([B], new, 3.0)  # A removed: its state goes
    assert c.targets == (B,) and not c.multi and c.outlier.ejected(3.0) == frozenset()


def test_readmitted_endpoint_forgets_its_old_latency_and_is_tried_again():
    c = Cluster("ns/s:80", [A, B], EJECT_FAST, rng=random.Random(5))
    c.finish(c.start(A), A, oc.status(200), 5.0, 0.0)  # A looked slow once
    c.finish(c.start(B), B, oc.status(200), 0.01, 0.0)
    assert {c.pick(0.0) for _ in range(10)} == {B}  # sequential: lower EWMA always wins
    for _ in range(2):
        c.finish(c.start(A), A, oc.status(503), 0.01, 1.0)
    assert c.pick(2.0) == B
    assert c.pick(20.0) == A  # ejection over: A's stale EWMA is gone, it reads as 0
    assert c.lb.latency(A) is None


def test_outlier_fast_paths_change_nothing():
    # Successes on a clean endpoint skip expiry; an ejection still ends on time.
    c = Cluster("ns/s:80", [A, B, C], EJECT_FAST)
    for _ in range(2):
        c.finish(c.start(A), A, oc.status(502), 0.01, 1.0)
    for i in range(100):
        c.finish(c.start(B), B, oc.status(200), 0.01, 1.0 + i / 100)
    assert c.outlier.ejected(10.9) == {A} and c.outlier.ejected(11.0) == frozenset()
    assert oc.status(200) is oc.status(200)  # shared outcome instances
