"""agent/traffic/lb.py: P2C choice rules, accounting, determinism, spread."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.traffic.lb import FAILURE_CEILING, LoadBalancer

EPS = ["a", "b", "c", "d"]


def test_least_outstanding_wins_then_latency_weighted_then_unsampled():
    lb = LoadBalancer(random.Random(1))
    ta = lb.start("a")
    # two candidates: the one without outstanding work always wins
    assert {lb.pick(["a", "b"]) for _ in range(50)} == {"b"}
    lb.finish(lb.start("b"), True, 0.040)
    lb.finish(ta, True, 0.010)
    assert lb.outstanding("a") == lb.outstanding("b") == 0
    # equal outstanding: inverse-latency shares (a: 4/5, b: 1/5), nobody starves
    got = Counter(lb.pick(["a", "b"]) for _ in range(2000))
    assert 0.75 * 2000 < got["a"] < 0.85 * 2000 and got["b"] > 0.15 * 2000
    # an endpoint without samples wins a tie outright (tried early)
    assert {lb.pick(["a", "b", "new"], avoid={"a"}) for _ in range(30)} == {"new"}


def test_unavailable_avoid_and_single_candidate():
    lb = LoadBalancer(random.Random(2))
    assert lb.pick([]) is None
    assert lb.pick(["a", "b"], unavailable={"a", "b"}) is None
    assert {lb.pick(EPS, unavailable={"a", "b", "c"}) for _ in range(20)} == {"d"}
    assert {lb.pick(EPS, avoid={"a", "b"}) for _ in range(50)} <= {"c", "d"}
    # avoid is a preference: with nothing else left, a tried endpoint is fine
    assert lb.pick(["a"], avoid={"a"}) == "a"
    assert lb.pick(["a", "b"], unavailable={"b"}, avoid={"a"}) == "a"


def test_finish_is_once_and_failures_never_look_faster():
    lb = LoadBalancer(random.Random(3))
    t = lb.start("a")
    assert lb.finish(t, True, 0.5) and not lb.finish(t, True, 0.5)
    assert lb.outstanding("a") == 0 and lb.latency("a") == 0.5
    lb.finish(lb.start("a"), False, 0.001)   # a fast failure: slower, not faster
    assert lb.latency("a") == 0.3 * 2 * 0.5 + 0.7 * 0.5
    lb.finish(lb.start("a"), True, 0.1)
    assert 0.1 < lb.latency("a") < 0.65
    assert lb.latency("zz") is None


def test_an_endpoint_that_fails_fast_from_its_first_try_does_not_attract_traffic():
    """The bad endpoint's first sample is a fast failure (a reset, a 503,
    a refused connect), the good one's first includes its dial: each
    further failure must make the bad one look slower, else it keeps the
    fast first sample and wins most tie-breaks (three of four, seen in
    the retry-budget test, where its retries emptied the retry budget)."""
    lb = LoadBalancer(random.Random(5))
    lb.finish(lb.start("good"), True, 0.005)  # the dial
    lb.finish(lb.start("bad"), False, 0.0002)
    picks = Counter()
    for _ in range(200):
        e = lb.pick(["bad", "good"])
        picks[e] += 1
        lb.finish(lb.start(e), e == "good", 0.0002 if e == "bad" else 0.0005)
    assert picks["bad"] < 0.2 * 200, picks  # near TIE_FLOOR, not three in four
    assert picks["bad"] > 0, picks  # still sampled (would be seen again once it recovers)


def test_a_burst_of_failures_is_bounded_so_a_recovered_endpoint_comes_back():
    """Each failure makes an endpoint look slower, but only up to
    FAILURE_CEILING x its peers' mean: after 100 failures in a row (outlier
    detection off), ten successes bring it back near its real latency
    (unbounded, its EWMA was 1.3^100 times its first sample)."""
    lb = LoadBalancer(random.Random(6))
    for e in ("good", "other", "bad"):
        lb.finish(lb.start(e), True, 0.001)
    for _ in range(100):
        lb.finish(lb.start("bad"), False, 0.0002)
    assert 4 * 0.001 < lb.latency("bad") <= FAILURE_CEILING * 0.001 * (1 + 1e-9)  # well behind its peers
    ceiling = lb.latency("bad")
    lb.finish(lb.start("bad"), False, 0.0002)
    assert lb.latency("bad") == pytest.approx(ceiling, rel=1e-9)  # at the ceiling: no growth
    for _ in range(10):
        lb.finish(lb.start("bad"), True, 0.001)
    assert lb.latency("bad") < 0.0015


def test_retain_forgets_removed_endpoints_but_not_in_flight():
    lb = LoadBalancer(random.Random(4))
    lb.finish(lb.start("a"), True, 1.0)
    t = lb.start("b")
    lb.retain(["c"])
    assert lb.latency("a") is None and lb.outstanding("b") == 1
    assert lb.finish(t, True, 0.1)


def test_deterministic_with_a_seed():
    def run(seed):
        lb = LoadBalancer(random.Random(seed))
        out = []
        for i in range(200):
            e = lb.pick(EPS)
            out.append(e)
            if i % 3:
                lb.finish(lb.start(e), True, 0.01 * (i % 7))
            else:
                lb.start(e)
        return out
    assert run(7) == run(7)


def test_p2c_spreads_load_evenly():
    """Requests that take a while (8 in flight at any time): every endpoint
    gets close to its fair share."""
    rng = random.Random(42)
    lb = LoadBalancer(rng)
    eps = [f"ep{i}" for i in range(8)]
    inflight = []
    counts = Counter()
    for _ in range(20_000):
        e = lb.pick(eps)
        counts[e] += 1
        inflight.append(lb.start(e))
        if len(inflight) > 8:
            lb.finish(inflight.pop(rng.randrange(len(inflight))), True, 0.01)
    fair = 20_000 / len(eps)
    assert all(0.9 * fair <= counts[e] <= 1.1 * fair for e in eps), counts


@given(st.lists(st.sampled_from(EPS), min_size=1, unique=True),
       st.sets(st.sampled_from(EPS)), st.integers(0, 2**32), st.integers(0, 30))
@settings(max_examples=300)
def test_never_picks_an_unavailable_endpoint_while_another_exists(endpoints, down, seed, busy):
    lb = LoadBalancer(random.Random(seed))
    for i in range(busy):  # some load skews the ranking
        lb.start(endpoints[i % len(endpoints)])
    for _ in range(20):
        got = lb.pick(endpoints, unavailable=down, avoid={endpoints[0]})
        if set(endpoints) - down:
            assert got in endpoints and got not in down
        else:
            assert got is None


def test_a_once_slow_endpoint_keeps_a_floor_share_of_ties_and_so_is_seen_again():
    import random as _random

    from agent.traffic.lb import TIE_FLOOR, LoadBalancer as _LB
    lb = _LB(_random.Random(7))
    lb.finish(lb.start("slow"), True, 10.0)  # was very slow once
    lb.finish(lb.start("fast"), True, 0.001)
    wins = sum(lb.pick(["slow", "fast"]) == "slow" for _ in range(4000))
    assert wins >= 4000 * TIE_FLOOR * 0.8  # not starved (inverse weights alone: ~0.01 %)
    assert wins <= 4000 * TIE_FLOOR * 1.2  # still strongly prefers the fast one
