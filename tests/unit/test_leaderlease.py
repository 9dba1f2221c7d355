"""The Lease rules (agent.identity.leaderlease) and the re-issue limit
(agent.identity.csrpolicy.IssueHistory) as pure functions: no API, no
clock (monotonic and wall times are passed in)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.identity import csrpolicy as cp
from agent.identity import leaderlease as ll
from tests.support import kubeapi as k

T0 = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)
A = ll.LeaseConfig(identity="ca-0_aaaa", lease_duration=15, renew_deadline=10, retry_period=2)
B = ll.LeaseConfig(identity="ca-1_bbbb", lease_duration=15, renew_deadline=10, retry_period=2)


def stored(body: dict, rv: str) -> ll.LeaseRecord:
    """``body`` as the API would serve it back (validated against the Lease schema)."""
    obj = {**body, "metadata": {**body["metadata"], "resourceVersion": rv}}
    k.validate(obj)
    return ll.read_lease(obj)


def test_no_lease_is_created_by_whoever_comes_first():
    p = ll.plan(A, None, None, 100.0, T0)
    assert p.action == "create" and p.acquires
    rec = stored(p.body, "1")
    assert (rec.holder, rec.duration, rec.transitions) == ("ca-0_aaaa", 15, 0)
    assert rec.renew_time == rec.acquire_time == "2026-12-06T12:00:00.123456Z"
    assert "resourceVersion" not in p.body["metadata"]  # a create names no version


def test_the_holder_renews_keeping_acquire_time_and_transitions():
    held = stored(ll.lease_object(A, T0, None), "7")
    p = ll.plan(A, held, 100.0, 105.0, T0 + timedelta(seconds=5))
    assert p.action == "update" and not p.acquires
    assert p.body["metadata"]["resourceVersion"] == "7"  # optimistic concurrency
    rec = stored(p.body, "8")
    assert rec.acquire_time == held.acquire_time and rec.transitions == 0
    assert rec.renew_time == ll.micro_time(T0 + timedelta(seconds=5))


def test_a_live_lease_is_waited_out_on_the_candidates_own_clock():
    held = stored(ll.lease_object(A, T0, None), "7")
    # B first saw this record at monotonic 100: it waits the whole duration from then
    p = ll.plan(B, held, 100.0, 114.9, T0)
    assert p.action == "wait" and "ca-0_aaaa holds lease meshlet-system/meshlet-ca" in p.reason
    # B's wall clock runs far ahead (skew): renewTime is not what it goes by
    assert ll.plan(B, held, 100.0, 101.0, T0 + timedelta(hours=3)).action == "wait"
    # seen for the first time just now: the whole duration is still ahead
    assert ll.plan(B, held, None, 500.0, T0).action == "wait"
    # unchanged for the lease duration: taken over, acquireTime new, one more transition
    p = ll.plan(B, held, 100.0, 115.0, T0 + timedelta(seconds=15))
    assert p.action == "update" and p.acquires and p.body["metadata"]["resourceVersion"] == "7"
    rec = stored(p.body, "8")
    assert rec.holder == "ca-1_bbbb" and rec.transitions == 1
    assert rec.acquire_time == rec.renew_time == ll.micro_time(T0 + timedelta(seconds=15))


def test_the_lease_duration_written_by_the_holder_is_the_one_waited():
    long = ll.LeaseConfig(identity="ca-0_aaaa", lease_duration=60, renew_deadline=40, retry_period=5)
    held = stored(ll.lease_object(long, T0, None), "7")
    assert ll.plan(B, held, 100.0, 130.0, T0).action == "wait"
    assert ll.plan(B, held, 100.0, 160.0, T0).action == "update"


def test_a_released_lease_is_taken_at_once():
    held = stored(ll.lease_object(A, T0, None), "7")
    released = stored(ll.release_object(A, T0 + timedelta(seconds=3), held), "8")
    assert released.holder == "" and released.duration == 1 and released.transitions == 0
    p = ll.plan(B, released, 200.0, 200.0, T0 + timedelta(seconds=3))
    assert p.action == "update" and p.acquires
    assert stored(p.body, "9").transitions == 1


def test_timings_that_could_overlap_two_leaders_are_refused():
    with pytest.raises(ValueError, match=r"renew deadline \(15s\) < lease duration \(15s\)"):
        ll.LeaseConfig(identity="x", lease_duration=15, renew_deadline=15, retry_period=2)
    with pytest.raises(ValueError, match=r"retry period \(10s\) < renew deadline"):
        ll.LeaseConfig(identity="x", lease_duration=15, renew_deadline=10, retry_period=10)
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        ll.LeaseConfig(identity="x", name="Meshlet_CA")
    with pytest.raises(ValueError, match="1..128 characters"):
        ll.LeaseConfig(identity="")


# --- the re-issue limit -------------------------------------------------------------------


def test_the_reissue_limit_counts_per_node_within_the_window():
    h = cp.IssueHistory(cp.ReissueLimit(2, timedelta(hours=1)))
    h.record("node-a", "csr-1", T0)
    h.record("node-a", "csr-1", T0)  # the same CSR seen again (a relist): counted once
    h.record("node-b", "csr-2", T0)
    assert h.refusal("node-a", T0 + timedelta(minutes=1)) is None
    h.record("node-a", "csr-3", T0 + timedelta(minutes=10))
    why = h.refusal("node-a", T0 + timedelta(minutes=11))
    assert why is not None
    assert "node node-a was issued 2 intermediates in the last 1h" in why
    assert "the re-issue limit is 2 per 1h" in why and "--reissue-limit" in why
    assert "after 2026-12-06T13:00:00Z" in why  # when the oldest leaves the window
    assert h.refusal("node-b", T0 + timedelta(minutes=11)) is None  # per node
    # the oldest left the window: one more is allowed
    assert h.refusal("node-a", T0 + timedelta(hours=1, seconds=1)) is None
    assert h.recent("node-a", T0 + timedelta(hours=1, seconds=1)) == [T0 + timedelta(minutes=10)]


def test_a_reissue_limit_must_allow_something():
    with pytest.raises(ValueError, match="count >= 1"):
        cp.ReissueLimit(0)
    with pytest.raises(ValueError, match="positive window"):
        cp.ReissueLimit(1, timedelta(0))


def test_the_limited_until_time_is_read_back_from_the_denial():
    h = cp.IssueHistory(cp.ReissueLimit(1, timedelta(minutes=30)))
    h.record("node-a", "csr-1", T0)
    why = h.refusal("node-a", T0 + timedelta(minutes=1))
    assert why is not None
    denied = cp.condition("Denied", "RateLimited", why, T0)
    assert cp.limited_until(denied) == datetime(2026, 12, 6, 12, 30, 0, tzinfo=UTC)
    assert cp.limited_until(cp.condition("Denied", "WrongNode", why, T0)) is None  # only that reason
    assert cp.limited_until(cp.condition("Denied", "RateLimited", "no time here", T0)) is None
