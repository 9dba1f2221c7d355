"""agent/traffic/outlier.py: thresholds, growing ejection time, re-admission,
the ejection cap and never ejecting the last endpoint."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.traffic import outcome as oc
from agent.traffic.outlier import OutlierDetector
from agent.traffic.trafficpolicy import OutlierDetection

CFG = OutlierDetection(consecutive_5xx=3, consecutive_connect_failures=2, interval=10.0,
                       base_ejection_time=30.0, max_ejection_time=300.0, max_ejection_percent=50)
EPS = ["a", "b", "c", "d"]


def fail(od, ep, now, n, outcome=oc.status(500)):
    got = None
    for _ in range(n):
        got = od.record(ep, outcome, now) or got
    return got


def test_consecutive_5xx_ejects_and_success_resets():
    od = OutlierDetector(CFG, EPS)
    fail(od, "a", 0, 2)
    od.record("a", oc.status(200), 0)
    assert fail(od, "a", 0, 2) is None and not od.is_ejected("a", 0)
    ej = od.record("a", oc.RESET, 1.0)  # resets and timeouts count like 5xx
    assert (ej.endpoint, ej.since, ej.until, ej.reason) == ("a", 1.0, 31.0, "consecutive-5xx")
    assert od.ejected(30.9) == {"a"} and od.ejected(31.0) == frozenset()


def test_connect_failures_and_connected():
    od = OutlierDetector(CFG, EPS)
    od.record("b", oc.CONNECT_FAILURE, 0)
    od.connected("b", 0)
    assert od.record("b", oc.CONNECT_FAILURE, 0) is None
    assert od.record("b", oc.CONNECT_FAILURE, 0).reason == "consecutive-connect-failures"
    # a 404 is the endpoint answering: not an outlier
    assert fail(od, "c", 0, 10, oc.status(404)) is None


def test_ejection_time_grows_then_decays():
    od = OutlierDetector(CFG, EPS)
    t, durations = 0.0, []
    for _ in range(4):
        ej = fail(od, "a", t, 3)
        durations.append(ej.until - ej.since)
        t = ej.until + 1.0  # fails again right after re-admission
    assert durations == [30.0, 60.0, 90.0, 120.0]
    assert od.multiplier("a") == 4
    # 25 s admitted without trouble: two clean intervals
    od.ejected(t + 24.0)
    assert od.multiplier("a") == 2
    ej = fail(od, "a", t + 24.0, 3)
    assert ej.until - ej.since == 90.0


def test_ejection_time_is_capped():
    cfg = OutlierDetection(consecutive_5xx=1, base_ejection_time=100.0, max_ejection_time=250.0,
                           max_ejection_percent=50)
    od = OutlierDetector(cfg, EPS)
    t, got = 0.0, []
    for _ in range(4):
        ej = od.record("a", oc.status(503), t)
        got.append(ej.until - ej.since)
        t = ej.until
    assert got == [100.0, 200.0, 250.0, 250.0]


@pytest.mark.parametrize("n, percent, cap", [
    (1, 100, 0), (2, 100, 1), (2, 10, 1), (4, 50, 2), (10, 10, 1), (10, 35, 3), (4, 0, 0),
    (3, 100, 2),
])
def test_cap(n, percent, cap):
    cfg = OutlierDetection(consecutive_5xx=1, max_ejection_percent=percent)
    od = OutlierDetector(cfg, [f"e{i}" for i in range(n)])
    assert od.max_ejected() == cap
    for i in range(n):
        od.record(f"e{i}", oc.status(500), 0)
    assert len(od.ejected(0)) == cap and od.skipped == n - cap


def test_shrinking_endpoint_set_readmits_one():
    cfg = OutlierDetection(consecutive_5xx=1, max_ejection_percent=100)
    od = OutlierDetector(cfg, ["a", "b", "c"])
    od.record("a", oc.status(500), 0)
    od.record("b", oc.status(500), 5)
    assert od.ejected(6) == {"a", "b"}
    od.set_endpoints(["a", "b"], 6)   # c went away: a (ending first) comes back
    assert od.ejected(6) == {"b"}
    od.set_endpoints(["b", "new"], 7)
    assert od.ejected(7) == {"b"} and od.multiplier("new") == 0
    assert od.record("gone", oc.status(500), 7) is None


@given(st.integers(1, 8), st.integers(0, 100),
       st.lists(st.tuples(st.integers(0, 7), st.sampled_from(
           [oc.status(500), oc.status(503), oc.RESET, oc.TIMEOUT, oc.CONNECT_FAILURE, oc.status(200)]),
           st.floats(0, 5)), max_size=200))
@settings(max_examples=300)
def test_never_ejects_the_last_endpoint_nor_more_than_the_cap(n, percent, events):
    cfg = OutlierDetection(consecutive_5xx=1, consecutive_connect_failures=1,
                           max_ejection_percent=percent, base_ejection_time=10.0)
    eps = list(range(n))
    od = OutlierDetector(cfg, eps)
    now = 0.0
    for i, outcome, dt in events:
        now += dt
        od.record(i % n, outcome, now)
        ejected = od.ejected(now)
        assert len(ejected) < n
        assert len(ejected) <= max(1 if percent else 0, n * percent // 100)
