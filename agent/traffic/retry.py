"""Retries, sans-IO: one :class:`RetryState` per request, one
:class:`RetryBudget` per service.

The shell's loop for one request::

    state = RetryState(request, settings, budget, now)
    attempt = state.first()                     # Attempt(number=1, timeout, avoid=())
    while True:
        ep = lb.pick(endpoints, unavailable=ejected, avoid=attempt.avoid)
        outcome = ...try ep for at most attempt.timeout...
        decision = state.next(ep, outcome, now)
        if isinstance(decision, Done): break    # answer with the last outcome
        attempt = decision                      # a Retry is an Attempt

Everything that affects the decision is in :data:`RULES`, checked in
order; the first rule that says no ends the request with its reason:

====================== ===========================================================
reason                 when
====================== ===========================================================
final-outcome          the outcome is not one ``retryOn`` lists (success included)
not-idempotent         the method is not idempotent and ``retryNonIdempotent``
                       is false (only GET, HEAD, OPTIONS, TRACE, PUT, DELETE
                       are, per RFC 9110 -- even a connect failure of a POST
                       is not retried: the shell may already have consumed
                       body bytes it cannot replay)
body-streaming         the body is being streamed (upgrade, bidirectional)
body-unknown-length    chunked without a known end: nothing to replay from
body-too-large         the body is larger than ``maxBodyBytes`` (not buffered)
attempts-exhausted     ``attempts`` retries were made already
deadline               the request timeout has (nearly) run out
budget-exhausted       the service's retry budget refuses (counted)
====================== ===========================================================

Otherwise the answer is a :class:`Retry` with the next per-try timeout (the
policy's ``perTryTimeout``, cut to what is left of the request timeout) and
``avoid`` = every endpoint tried so far, which the load balancer skips while
another endpoint is available.

The shell reports ``reset`` and ``timeout`` only while no response byte has
reached the client; after that nothing can be retried and it must not ask.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .outcome import Kind, Outcome
from .settings import BUDGET_WINDOW, IDEMPOTENT_METHODS, Budget, Retries, TrafficSettings

__all__ = ["Request", "Attempt", "Retry", "Done", "RetryState", "RetryBudget", "RULES", "MIN_TRY_TIME"]

#: A retry needs at least this much of the request timeout left (seconds).
MIN_TRY_TIME = 0.001


@dataclass(frozen=True)
class Request:
    """What the retry logic needs to know about a request."""

    method: str
    body_length: int | None = 0
    """Body size in bytes when known (Content-Length, or 0 for none); None when
    the length is unknown (chunked)."""
    streaming: bool = False
    """The body is streamed both ways or has no end (upgrade, CONNECT, gRPC
    bidirectional streams)."""


@dataclass(frozen=True)
class Attempt:
    number: int
    """1 for the first try, 2 for the first retry..."""
    timeout: float | None
    """Seconds this try may take; None: no limit."""
    avoid: frozenset = frozenset()
    """Endpoints already tried; pass to ``LoadBalancer.pick(avoid=...)``."""


@dataclass(frozen=True)
class Retry(Attempt):
    """Try again, with :attr:`timeout`, preferably not on :attr:`avoid`."""


@dataclass(frozen=True)
class Done:
    """Stop; answer the client with the last outcome."""

    reason: str


class RetryBudget:
    """Per service: how many retries its requests may add.

    A token bucket: every request (first tries only) adds ``percent / 100``
    of a token, time adds ``minPerSecond`` tokens per second, a retry takes
    one.  The bucket holds at most ``minPerSecond`` plus ``percent`` % of the
    requests of the last :data:`BUDGET_WINDOW` seconds, so quiet periods do
    not bank retries for a later storm.  It starts full at ``minPerSecond``.

    Hence, over any span of ``T`` seconds from the start, retries granted
    are at most ``minPerSecond x (T + 1) + percent % x requests``: under a
    fully failing upstream the extra load is bounded whatever the clients do.
    """

    def __init__(self, budget: Budget, now: float = 0.0, window: float = BUDGET_WINDOW):
        self.budget = budget
        self.window = window
        self._tokens = budget.min_per_second
        self._at = now
        self._slots: deque[list[float]] = deque()  # [second, requests]
        self._in_window = 0
        self.requests = 0
        self.granted = 0
        self.denied = 0
        """Retries refused by the budget (for metrics)."""

    def _capacity(self) -> float:
        return self.budget.min_per_second + self.budget.percent / 100 * self._in_window

    def _advance(self, now: float) -> None:
        while self._slots and self._slots[0][0] <= now - self.window:
            self._in_window -= int(self._slots.popleft()[1])
        if now > self._at:
            self._tokens += (now - self._at) * self.budget.min_per_second
            self._at = now
        self._tokens = min(self._tokens, self._capacity())

    def request(self, now: float) -> None:
        """A request's first try starts."""
        self._advance(now)
        second = math.floor(now)
        if self._slots and self._slots[-1][0] == second:
            self._slots[-1][1] += 1
        else:
            self._slots.append([second, 1])
        self._in_window += 1
        self.requests += 1
        self._tokens = min(self._tokens + self.budget.percent / 100, self._capacity())

    def try_retry(self, now: float) -> bool:
        """Take a token for one retry; False (counted in :attr:`denied`) if none."""
        self._advance(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.granted += 1
            return True
        self.denied += 1
        return False

    @property
    def tokens(self) -> float:
        return self._tokens


class RetryState:
    """The retry decisions for one request (rules in the module doc)."""

    def __init__(
        self,
        request: Request,
        settings: TrafficSettings,
        budget: RetryBudget,
        now: float,
        *,
        counted: bool = False,
    ):
        """``now``: when the request started.  ``counted``: the shell already
        reported this request to ``budget.request`` (it does so for every
        request and makes a RetryState only once a retry is considered)."""
        self.request = request
        self.retries: Retries = settings.retries
        self.budget = budget
        self.started = now
        self.deadline = None if settings.timeouts.request is None else now + settings.timeouts.request
        self.tried: list[Hashable] = []
        self.outcomes: list[Outcome] = []
        self.attempt = 0
        if not counted:
            budget.request(now)

    def _timeout(self, now: float) -> float | None:
        per_try = self.retries.per_try_timeout
        if self.deadline is None:
            return per_try
        left = max(0.0, self.deadline - now)
        return left if per_try is None else min(per_try, left)

    def first(self) -> Attempt:
        if self.attempt:
            raise RuntimeError("first() called twice")
        self.attempt = 1
        return Attempt(1, self._timeout(self.started))

    def next(self, endpoint: Hashable, outcome: Outcome, now: float) -> Retry | Done:
        """The current attempt on ``endpoint`` ended with ``outcome``: retry or stop."""
        if not self.attempt:
            raise RuntimeError("next() before first()")
        self.tried.append(endpoint)
        self.outcomes.append(outcome)
        for reason, refuses in RULES:
            if refuses(self, outcome, now):
                return Done(reason)
        self.attempt += 1
        return Retry(self.attempt, self._timeout(now), frozenset(self.tried))

    # -- the rules (each says True to refuse)
    def _not_retriable(self, o: Outcome, now: float) -> bool:
        if o.grpc is not None:
            return o.grpc not in self.retries.grpc_statuses
        if o.kind is Kind.STATUS:
            return o.status not in self.retries.statuses
        return o.kind.value not in self.retries.on

    def _not_idempotent(self, o: Outcome, now: float) -> bool:
        if o.grpc is not None:  # gRPC calls are POSTs; a gRPC code in retryOn is the opt-in
            return False
        return not self.retries.non_idempotent and self.request.method.upper() not in IDEMPOTENT_METHODS

    def _streaming(self, o: Outcome, now: float) -> bool:
        return self.request.streaming

    def _unknown_length(self, o: Outcome, now: float) -> bool:
        return self.request.body_length is None

    def _too_large(self, o: Outcome, now: float) -> bool:
        return (self.request.body_length or 0) > self.retries.max_body_bytes

    def _exhausted(self, o: Outcome, now: float) -> bool:
        return self.attempt > self.retries.attempts

    def _deadline(self, o: Outcome, now: float) -> bool:
        return self.deadline is not None and self.deadline - now < MIN_TRY_TIME

    def _no_budget(self, o: Outcome, now: float) -> bool:
        return not self.budget.try_retry(now)


#: (reason, refuses?) in the order they are checked; the budget comes last so
#: that only retries that would otherwise happen take (or are denied) a token.
RULES: tuple[tuple[str, Callable[[RetryState, Outcome, float], bool]], ...] = (
    ("final-outcome", RetryState._not_retriable),
    ("not-idempotent", RetryState._not_idempotent),
    ("body-streaming", RetryState._streaming),
    ("body-unknown-length", RetryState._unknown_length),
    ("body-too-large", RetryState._too_large),
    ("attempts-exhausted", RetryState._exhausted),
    ("deadline", RetryState._deadline),
    ("budget-exhausted", RetryState._no_budget),
)
