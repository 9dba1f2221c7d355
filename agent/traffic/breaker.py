"""Circuit breaking: per-service limits on concurrent work.

One :class:`Breaker` per upstream service on a node proxy counts, over all
of that service's endpoints:

============ ==================== =========================================
limit        header value         what is counted
============ ==================== =========================================
connections  max-connections      open connections to the service's endpoints
pending      max-pending-requests requests waiting for a connection
requests     max-requests         requests in flight (retries included)
============ ==================== =========================================

``acquire(limit)`` either counts one more and returns None, or returns an
:class:`Overloaded`; the shell then answers 503 with
``x-meshlet-overloaded: <header value>`` (L7) or closes the client connection
(L4) and never tries an endpoint.  ``release(limit)`` undoes one acquire.
Nothing queues here: waiting is the shell's business, counted as pending.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .settings import CircuitBreaker

__all__ = ["Limit", "Overloaded", "Breaker", "OVERLOADED_HEADER"]

OVERLOADED_HEADER = "x-meshlet-overloaded"


class Limit(enum.Enum):
    CONNECTIONS = "max-connections"
    PENDING = "max-pending-requests"
    REQUESTS = "max-requests"

    # Members are singletons compared by identity: hash them the same way, in
    # C (Enum's own __hash__ is Python code, run ~7 times per L7 request here).
    __hash__ = object.__hash__


_FIELD = {
    Limit.CONNECTIONS: "max_connections",
    Limit.PENDING: "max_pending_requests",
    Limit.REQUESTS: "max_requests",
}


@dataclass(frozen=True)
class Overloaded:
    """A limit was reached; answer with :attr:`status` and :attr:`headers`."""

    limit: Limit
    max: int

    status = 503

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return ((OVERLOADED_HEADER, self.limit.value),)

    def __str__(self) -> str:
        return f"overloaded: {self.limit.value} ({self.max}) reached"


class Breaker:
    """Counters against a :class:`~agent.traffic.trafficpolicy.CircuitBreaker`'s limits."""

    def __init__(self, limits: CircuitBreaker):
        self.limits = limits
        self.active = {lim: 0 for lim in Limit}
        self.overloaded = {lim: 0 for lim in Limit}
        """How often each limit refused (for metrics)."""

    def maximum(self, limit: Limit) -> int:
        return getattr(self.limits, _FIELD[limit])

    def acquire(self, limit: Limit) -> Overloaded | None:
        """Count one more, or say which limit refuses."""
        mx = self.maximum(limit)
        if self.active[limit] >= mx:
            self.overloaded[limit] += 1
            return Overloaded(limit, mx)
        self.active[limit] += 1
        return None

    def release(self, limit: Limit) -> None:
        if self.active[limit] <= 0:
            raise ValueError(f"release({limit.value}) without a matching acquire")
        self.active[limit] -= 1

    def update(self, limits: CircuitBreaker) -> None:
        """New limits (policy reload); current counts stay, only new work is checked."""
        self.limits = limits
