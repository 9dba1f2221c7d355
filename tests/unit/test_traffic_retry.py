"""agent/traffic/retry.py: scripted retry conversations (outcome in,
decision out), the rule table, and the retry budget's bound."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.traffic import outcome as oc
from agent.traffic.trafficpolicy import DEFAULTS, Budget, Retries, Timeouts, TrafficSettings
from agent.traffic.retry import (
    RULES, Attempt, Done, Request, Retry, RetryBudget, RetryState,
)

GENEROUS = Budget(percent=100, min_per_second=1000)


def state(method="GET", body=0, streaming=False, budget=GENEROUS, now=0.0, **retries):
    s = TrafficSettings(retries=dataclasses.replace(DEFAULTS.retries, **retries))
    return RetryState(Request(method, body, streaming), s, RetryBudget(budget, now), now)


def test_scripted_conversation_prefers_other_endpoints():
    st_ = state(per_try_timeout=0.5, attempts=2)
    assert st_.first() == Attempt(1, 0.5)
    d = st_.next("ep1", oc.CONNECT_FAILURE, 0.1)
    assert d == Retry(2, 0.5, frozenset({"ep1"}))
    d = st_.next("ep2", oc.status(503), 0.7)
    assert d == Retry(3, 0.5, frozenset({"ep1", "ep2"}))
    assert st_.next("ep3", oc.RESET, 1.0) == Done("attempts-exhausted")


@pytest.mark.parametrize("outcome, retried", [
    (oc.CONNECT_FAILURE, True), (oc.RESET, True), (oc.TIMEOUT, False),
    (oc.status(503), True), (oc.status(502), False), (oc.status(200), False),
    (oc.status(404), False),
])
def test_default_retry_on(outcome, retried):
    st_ = state()
    st_.first()
    d = st_.next("ep", outcome, 0.0)
    assert isinstance(d, Retry) == retried
    if not retried:
        assert d == Done("final-outcome")


@pytest.mark.parametrize("method, retried", [
    ("GET", True), ("HEAD", True), ("OPTIONS", True), ("TRACE", True), ("PUT", True),
    ("DELETE", True), ("get", True), ("POST", False), ("PATCH", False), ("CONNECT", False),
    ("PURGE", False),
])
def test_only_idempotent_methods_by_default(method, retried):
    st_ = state(method)
    st_.first()
    d = st_.next("ep", oc.CONNECT_FAILURE, 0.0)
    assert (d == Done("not-idempotent")) != retried
    st2 = state(method, non_idempotent=True)
    st2.first()
    assert isinstance(st2.next("ep", oc.CONNECT_FAILURE, 0.0), Retry)


@pytest.mark.parametrize("body, streaming, reason", [
    (65536, False, None), (65537, False, "body-too-large"), (None, False, "body-unknown-length"),
    (0, True, "body-streaming"), (10, False, None),
])
def test_bodies(body, streaming, reason):
    st_ = state("PUT", body, streaming)
    st_.first()
    d = st_.next("ep", oc.RESET, 0.0)
    assert (d == Done(reason)) if reason else isinstance(d, Retry)


def test_deadline_cuts_per_try_timeout_and_stops():
    s = TrafficSettings(retries=Retries(attempts=5, per_try_timeout=4.0),
                        timeouts=Timeouts(request=10.0))
    st_ = RetryState(Request("GET"), s, RetryBudget(GENEROUS), 100.0)
    assert st_.first().timeout == 4.0
    assert st_.next("a", oc.RESET, 104.0).timeout == 4.0
    assert st_.next("b", oc.RESET, 108.0).timeout == pytest.approx(2.0)
    assert st_.next("c", oc.RESET, 110.0) == Done("deadline")
    # no request timeout, no per-try timeout: no limit
    s2 = TrafficSettings(timeouts=Timeouts(request=None))
    assert RetryState(Request("GET"), s2, RetryBudget(GENEROUS), 0).first().timeout is None


def test_budget_denial_is_counted_and_only_for_would_be_retries():
    b = RetryBudget(Budget(percent=0, min_per_second=1), 0.0)
    s = TrafficSettings()
    first = RetryState(Request("GET"), s, b, 0.0)
    first.first()
    assert isinstance(first.next("a", oc.RESET, 0.0), Retry)
    second = RetryState(Request("GET"), s, b, 0.0)
    second.first()
    assert second.next("a", oc.RESET, 0.0) == Done("budget-exhausted")
    post = RetryState(Request("POST"), s, b, 0.0)
    post.first()
    assert post.next("a", oc.RESET, 0.0) == Done("not-idempotent")
    assert (b.granted, b.denied) == (1, 1)
    # a second later the bucket has a token again
    assert b.try_retry(1.0) and not b.try_retry(1.0)


def test_rule_table_order():
    assert [r for r, _ in RULES] == [
        "final-outcome", "not-idempotent", "body-streaming", "body-unknown-length",
        "body-too-large", "attempts-exhausted", "deadline", "budget-exhausted"]


def test_misuse_is_loud():
    st_ = state()
    with pytest.raises(RuntimeError):
        st_.next("a", oc.RESET, 0)
    st_.first()
    with pytest.raises(RuntimeError):
        st_.first()


@given(st.sampled_from(["POST", "PATCH", "CONNECT", "LOCK"]),
       st.lists(st.sampled_from([oc.CONNECT_FAILURE, oc.RESET, oc.TIMEOUT, oc.status(503),
                                 oc.status(502), oc.status(500)]), min_size=1, max_size=5))
@settings(max_examples=200)
def test_post_is_never_retried_by_default(method, outcomes):
    st_ = state(method, on=frozenset({"connect-failure", "reset", "timeout"}),
                statuses=frozenset(range(500, 600)), attempts=10)
    st_.first()
    assert st_.next("a", outcomes[0], 0.0) == Done("not-idempotent")


@given(st.integers(65537, 10**9), st.sampled_from(["GET", "PUT", "DELETE"]),
       st.sampled_from([oc.CONNECT_FAILURE, oc.RESET, oc.status(503)]))
@settings(max_examples=200)
def test_large_bodies_are_never_retried(size, method, outcome):
    st_ = state(method, size)
    st_.first()
    assert st_.next("a", outcome, 0.0) == Done("body-too-large")


@given(st.integers(1, 200), st.floats(0, 100), st.floats(0, 50), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_budget_bound_under_a_failing_upstream_for_a_minute(rate, percent, min_per_second, seed):
    """Every request fails and every client retries as much as it may: over a
    simulated minute the retries never exceed minPerSecond x (T + 1) plus
    percent % of the requests, at any point in time."""
    rng = random.Random(seed)
    budget = Budget(percent=percent, min_per_second=min_per_second)
    b = RetryBudget(budget, 0.0)
    s = TrafficSettings(retries=Retries(attempts=3, on=frozenset({"reset"}), statuses=frozenset()),
                        budget=budget, timeouts=Timeouts(request=None))
    now = 0.0
    retries = 0
    while now < 60.0:
        now += rng.expovariate(rate)
        r = RetryState(Request("GET"), s, b, now)
        r.first()
        while isinstance(r.next(object(), oc.RESET, now), Retry):
            retries += 1
        assert retries <= min_per_second * (now + 1) + percent / 100 * b.requests + 1e-9
    assert retries == b.granted
    assert b.granted + b.denied <= 3 * b.requests


def test_budget_window_stops_banking():
    """A burst long ago does not fund retries now: the bucket is capped by the
    last 10 s of requests."""
    b = RetryBudget(Budget(percent=100, min_per_second=0), 0.0)
    for _ in range(100):
        b.request(0.0)
    assert b.tokens == 100
    assert b.try_retry(5.0)
    assert not b.try_retry(11.0) and b.tokens == 0
