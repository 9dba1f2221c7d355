"""Outlier detection: eject endpoints that keep failing, for a growing while.

One :class:`OutlierDetector` per service port on a node proxy.  The shell
reports every attempt's :class:`~agent.traffic.outcome.Outcome` with the
endpoint and ``now``; the load balancer asks :meth:`~OutlierDetector.ejected`.

Rules:

- a connect failure adds to the endpoint's consecutive connect failures;
  a 5xx status, a reset or a timeout add to its consecutive 5xx; any
  other status resets both (a successful connect alone, reported with
  :meth:`connected`, resets the connect failures);
- reaching ``consecutiveConnectFailures`` or ``consecutive5xx`` (0: never)
  ejects the endpoint for ``baseEjectionTime x n`` (at most
  ``maxEjectionTime``), ``n`` being its ejection multiplier, which each
  ejection raises by one and each whole ``interval`` admitted without an
  ejection lowers by one (down to 0);
- at most ``max(1, floor(endpoints x maxEjectionPercent / 100))`` endpoints
  are ejected at once (none if the percent is 0), and never all of them;
  an ejection refused by this cap is counted in :attr:`skipped` and the
  endpoint's counters start again;
- an ejected endpoint is re-admitted once its time is over, and early if
  the endpoint set shrinks so that every remaining endpoint is ejected
  (the one whose ejection ends first comes back).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .outcome import Kind, Outcome
from .settings import OutlierDetection

__all__ = ["OutlierDetector", "Ejection"]

E = TypeVar("E", bound=Hashable)

_NONE: frozenset = frozenset()


@dataclass(frozen=True)
class Ejection(Generic[E]):
    endpoint: E
    since: float
    until: float
    reason: str
    """``consecutive-5xx`` or ``consecutive-connect-failures``."""


class _State:
    __slots__ = ("c5xx", "cconn", "multiplier", "until", "admitted_since")

    def __init__(self, now: float) -> None:
        self.c5xx = 0
        self.cconn = 0
        self.multiplier = 0
        self.until: float | None = None
        self.admitted_since = now


class OutlierDetector(Generic[E]):
    def __init__(self, config: OutlierDetection, endpoints: Collection[E] = (), now: float = 0.0):
        self.config = config
        self._state: dict[E, _State] = {}
        self.ejections: list[Ejection[E]] = []
        """Every ejection made, oldest first (bounded; for logs and tests)."""
        self.skipped = 0
        """Ejections refused because of maxEjectionPercent / the last endpoint."""
        self._quiet = True  # no endpoint ejected, no multiplier above 0: nothing to expire
        self.set_endpoints(endpoints, now)

    # -- endpoint set
    def set_endpoints(self, endpoints: Collection[E], now: float) -> None:
        """The service's endpoints changed: forget removed ones, start new ones clean."""
        eps = list(dict.fromkeys(endpoints))
        self._state = {e: self._state.get(e) or _State(now) for e in eps}
        self._expire(now)
        ejected = [e for e, s in self._state.items() if s.until is not None]
        if self._state and len(ejected) == len(self._state):
            # every ejected endpoint has an `until` (that is what ejected means)
            first = min(ejected, key=lambda e: self._state[e].until)  # type: ignore[arg-type, return-value]
            self._admit(first, now)

    def _admit(self, e: E, now: float) -> None:
        s = self._state[e]
        s.until = None
        s.admitted_since = now
        s.c5xx = s.cconn = 0

    def _expire(self, now: float) -> None:
        if self._quiet:
            return
        quiet = True
        for e, s in self._state.items():
            if s.until is not None and now >= s.until:
                self._admit(e, s.until)
            if s.until is None and s.multiplier > 0:
                # each whole clean interval since admission lowers the multiplier by one
                steps = int((now - s.admitted_since) // self.config.interval)
                if steps > 0:
                    s.multiplier = max(0, s.multiplier - steps)
                    s.admitted_since += steps * self.config.interval
            if s.until is not None or s.multiplier > 0:
                quiet = False
        self._quiet = quiet

    # -- queries
    def ejected(self, now: float) -> frozenset[E]:
        """Endpoints ejected at ``now`` (re-admits those whose time is over)."""
        if self._quiet:
            return _NONE
        self._expire(now)
        return frozenset(e for e, s in self._state.items() if s.until is not None)

    def is_ejected(self, endpoint: E, now: float) -> bool:
        return endpoint in self.ejected(now)

    def multiplier(self, endpoint: E) -> int:
        s = self._state.get(endpoint)
        return 0 if s is None else s.multiplier

    def max_ejected(self) -> int:
        """How many endpoints may be ejected at once."""
        n = len(self._state)
        pct = self.config.max_ejection_percent
        if pct <= 0 or n <= 1:
            return 0
        return min(n - 1, max(1, math.floor(n * pct / 100)))

    # -- events
    def connected(self, endpoint: E, now: float) -> None:
        """A connection to ``endpoint`` was made: its connect failures start again."""
        s = self._state.get(endpoint)
        if s is not None:
            s.cconn = 0

    def record(self, endpoint: E, outcome: Outcome, now: float) -> Ejection[E] | None:
        """Count one attempt's outcome; returns the ejection it caused, if any."""
        s = self._state.get(endpoint)
        if (
            s is not None
            and s.c5xx == 0
            and s.cconn == 0
            and outcome.kind is Kind.STATUS
            and not outcome.is_5xx
        ):
            return None  # the common case: a success that changes nothing (expiry is lazy)
        self._expire(now)
        if s is None or s.until is not None:
            return None  # unknown endpoint, or in flight when it was ejected
        c = self.config
        reason = None
        if outcome.kind is Kind.CONNECT_FAILURE:
            s.cconn += 1
            if c.consecutive_connect_failures and s.cconn >= c.consecutive_connect_failures:
                reason = "consecutive-connect-failures"
        elif outcome.kind is Kind.STATUS and not outcome.is_5xx:
            s.c5xx = s.cconn = 0
        else:  # 5xx, reset, timeout
            s.cconn = 0
            s.c5xx += 1
            if c.consecutive_5xx and s.c5xx >= c.consecutive_5xx:
                reason = "consecutive-5xx"
        if reason is None:
            return None
        s.c5xx = s.cconn = 0
        if sum(1 for x in self._state.values() if x.until is not None) >= self.max_ejected():
            self.skipped += 1
            return None
        s.multiplier += 1
        self._quiet = False
        duration = min(c.base_ejection_time * s.multiplier, max(c.max_ejection_time, c.base_ejection_time))
        s.until = now + duration
        ej = Ejection(endpoint, now, s.until, reason)
        self.ejections.append(ej)
        del self.ejections[:-100]
        return ej
