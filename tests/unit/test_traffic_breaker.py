"""agent/traffic/breaker.py: each limit refuses with its own header value."""

from __future__ import annotations

import pytest

from agent.traffic.breaker import OVERLOADED_HEADER, Breaker, Limit, Overloaded
from agent.traffic.trafficpolicy import CircuitBreaker


@pytest.mark.parametrize("limit, header", [
    (Limit.CONNECTIONS, "max-connections"), (Limit.PENDING, "max-pending-requests"),
    (Limit.REQUESTS, "max-requests"),
])
def test_each_limit(limit, header):
    b = Breaker(CircuitBreaker(max_connections=2, max_pending_requests=2, max_requests=2))
    assert b.acquire(limit) is None and b.acquire(limit) is None
    o = b.acquire(limit)
    assert o == Overloaded(limit, 2) and o.status == 503
    assert o.headers == ((OVERLOADED_HEADER, header),) and OVERLOADED_HEADER == "x-meshlet-overloaded"
    assert str(o) == f"overloaded: {header} (2) reached"
    assert b.overloaded[limit] == 1 and b.active[limit] == 2
    # the other limits are independent
    assert all(b.acquire(other) is None for other in Limit if other is not limit)
    b.release(limit)
    assert b.acquire(limit) is None


def test_release_without_acquire_and_new_limits():
    b = Breaker(CircuitBreaker(max_requests=1))
    with pytest.raises(ValueError):
        b.release(Limit.REQUESTS)
    assert b.acquire(Limit.REQUESTS) is None
    b.update(CircuitBreaker(max_requests=3))
    assert b.acquire(Limit.REQUESTS) is None and b.active[Limit.REQUESTS] == 2
    b.update(CircuitBreaker(max_requests=1))
    assert isinstance(b.acquire(Limit.REQUESTS), Overloaded)
