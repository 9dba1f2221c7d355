"""One upstream cluster: a service port's endpoints (or one pod) and their state.

The node proxy keeps one :class:`Cluster` per service port per worker (and
the L7 session one per direct pod address, :meth:`Cluster.single`).  It is
long-lived: :meth:`Cluster.update` takes a new endpoint list or new
:class:`~agent.traffic.trafficpolicy.TrafficSettings` and keeps what is known about
endpoints that remain (load-balancing statistics, ejections, breaker counts,
the retry budget).

A *target* is a hashable tuple ``(ip, port, *extra)``: the shell's
connection pool keys on the whole tuple and hands it to its socket opener
(extra elements may, e.g., name the source identity of an mTLS tunnel);
messages use ``target[0]:target[1]`` (:func:`target_str`).

Per cluster:

- ``lb`` -- :class:`~agent.traffic.lb.LoadBalancer` (P2C, least outstanding);
- ``outlier`` -- :class:`~agent.traffic.outlier.OutlierDetector`;
- ``breaker`` -- :class:`~agent.traffic.breaker.Breaker`;
- ``budget`` -- :class:`~agent.traffic.retry.RetryBudget`.

A cluster with a single endpoint skips load balancing and outlier accounting
entirely (nothing to choose, and the last endpoint is never ejected): that is
the cheap path of a direct pod address.

Pure: no sockets, no clock; ``now`` is passed in (the shell's monotonic
clock, the same one for every call on a cluster).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from .breaker import Breaker
from .lb import LoadBalancer, Token
from .outcome import Outcome
from .outlier import OutlierDetector
from .retry import RetryBudget
from .settings import DEFAULTS, TrafficSettings

__all__ = ["Cluster", "Target", "target_str"]

Target = tuple
"""``(ip, port, *extra)``; hashable."""


def target_str(t: Target) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) of a target, for messages."""
    ip = str(t[0])
    return f"[{ip}]:{t[1]}" if ":" in ip else f"{ip}:{t[1]}"


def _check(targets: Sequence[Target]) -> tuple[Target, ...]:
    out = []
    for t in targets:
        if (
            not isinstance(t, tuple)
            or len(t) < 2
            or not isinstance(t[0], str)
            or not isinstance(t[1], int)
            or isinstance(t[1], bool)
            or not 0 < t[1] < 65536
        ):
            raise ValueError(f"a target is a tuple (ip, port, *extra), not {t!r}")
        hash(t)  # extra elements must be hashable too (TypeError otherwise)
        out.append(t)
    return tuple(dict.fromkeys(out))


class Cluster:
    """Endpoints of one upstream plus the state the proxy keeps about them."""

    def __init__(
        self,
        name: str | None,
        targets: Sequence[Target],
        settings: TrafficSettings = DEFAULTS,
        now: float = 0.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        """``ns/service:port``, or None for a direct pod address."""
        self.targets: tuple[Target, ...] = _check(targets)
        self.settings = settings
        self.lb: LoadBalancer[Target] = LoadBalancer(rng or random.Random())
        self.outlier: OutlierDetector[Target] = OutlierDetector(settings.outlier_detection, self.targets, now)
        self.breaker = Breaker(settings.circuit_breaker)
        self.budget = RetryBudget(settings.budget, now)
        self._ejected: frozenset = frozenset()
        self._derive()

    @classmethod
    def single(cls, target: Target, settings: TrafficSettings = DEFAULTS, now: float = 0.0) -> Cluster:
        """A cluster of one pod address (no service): ``name`` is None."""
        return cls(None, [target], settings, now)

    def _derive(self) -> None:
        # Read on every request: kept flat.
        s = self.settings
        self.multi = len(self.targets) > 1
        self.retry_statuses = s.retries.statuses if s.retries.attempts else frozenset()
        self.retries_on = s.retries.attempts > 0

    def update(self, targets: Sequence[Target], settings: TrafficSettings, now: float) -> None:
        """New endpoints and/or settings.  Endpoints that remain keep their
        statistics and ejections; breaker counts and the budget carry on."""
        self.targets = _check(targets)
        old, self.settings = self.settings, settings
        if settings.outlier_detection != old.outlier_detection:
            self.outlier.config = settings.outlier_detection
        self.outlier.set_endpoints(self.targets, now)
        self.lb.retain(self.targets)
        self.breaker.update(settings.circuit_breaker)
        if settings.budget != old.budget:
            self.budget.budget = settings.budget
        self._derive()

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {len(self.targets)} targets)"

    def label(self, target: Target | None = None) -> str:
        """For messages: the cluster name and/or the target address."""
        if target is None:
            return self.name or ",".join(target_str(t) for t in self.targets[:3])
        return target_str(target) if self.name is None else f"{self.name} ({target_str(target)})"

    # -- per attempt
    def pick(self, now: float, avoid: Collection[Target] = ()) -> Target | None:
        """The endpoint for the next attempt, or None if there is none to try
        (empty cluster; every endpoint ejected cannot happen by design)."""
        t = self.targets
        if len(t) == 1:
            return t[0]
        if not t:
            return None
        ej = self.outlier.ejected(now)
        if ej is not self._ejected:
            for e in self._ejected - ej:  # back from an ejection: its old latency says nothing
                self.lb.forget_latency(e)
            self._ejected = ej
        return self.lb.pick(t, unavailable=ej, avoid=avoid)

    def start(self, target: Target) -> Token | None:
        """An attempt to ``target`` begins; the token goes to :meth:`finish`."""
        return self.lb.start(target) if self.multi else None

    def finish(
        self, token: Token | None, target: Target, outcome: Outcome | None, latency: float, now: float
    ) -> None:
        """The attempt ended.  ``outcome`` None: abandoned (the client went
        away): only the load balancer's count is released."""
        if token is not None:
            self.lb.finish(token, outcome is not None and outcome.ok, latency)
        if outcome is not None and self.multi:
            self.outlier.record(target, outcome, now)

    def connected(self, target: Target, now: float) -> None:
        """A connection to ``target`` was made (resets its connect failures)."""
        if self.multi:
            self.outlier.connected(target, now)

    def healthy(self, now: float) -> list[Target]:
        """Endpoints not ejected at ``now`` (for stats and tests)."""
        ej = self.outlier.ejected(now)
        return [t for t in self.targets if t not in ej]
