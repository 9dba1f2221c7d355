"""Load balancing: power of two choices on least outstanding work.

One :class:`LoadBalancer` per service port and node proxy.  The L7 path
calls :meth:`~LoadBalancer.pick` once per request *attempt*; the L4 path
once per connection.  ``start(ep)`` before sending, ``finish(token, ok,
latency)`` when the attempt (request) or the connection ends: "outstanding"
is then in-flight requests for L7 and open connections for L4, and the
latency is the time to response headers (L7) or to connect (L4).

Choice rules, in order:

1. candidates are the endpoints given minus ``unavailable`` (ejected by
   outlier detection, known down); none left: ``None`` (the shell answers
   503, "no healthy upstream");
2. endpoints in ``avoid`` (already tried by this request) are dropped too,
   unless that would leave none;
3. two distinct candidates are drawn with the injected RNG; the one with
   fewer outstanding requests wins; on a tie, each wins with a probability
   inversely proportional to its latency EWMA (the faster one is preferred
   but the slower one keeps a share -- at least ``TIE_FLOOR`` -- so its EWMA
   stays current -- a strict
   "lower EWMA wins" starves every endpoint but the fastest under
   sequential traffic, where outstanding is always 0); an endpoint without
   samples (EWMA 0) wins such a tie outright, two of them: the first drawn.
   A single candidate is taken as is.

The latency EWMA starts at the first sample (an endpoint without samples
reads as 0 and so is tried early).  A failed attempt makes an endpoint look
slower: its sample is ``FAILURE_PENALTY x max(latency, ewma)``, so each
failure raises the EWMA (by 30% at the default weights) and an endpoint
that fails fast does not attract traffic.  (With the sample only
``max(latency, ewma)``, an endpoint whose first sample was a fast failure
kept that fast EWMA for good: an endpoint resetting every request won
three of four tie-breaks against a healthy one whose first sample included
its dial, and its retries emptied the retry budget.)  The penalty stops
once the endpoint looks ``FAILURE_CEILING`` times slower than the mean of
its peers: without that bound each failure multiplied its EWMA (by 1.3), so
after a burst of dozens of failures, not ejected (outlier detection off, or
failures below its threshold), a recovered endpoint stayed at its tie-break
floor for hundreds of requests; bounded, a handful of successes bring it
back (and the EWMA only moves when the endpoint is picked).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["LoadBalancer", "Token", "EWMA_ALPHA"]

E = TypeVar("E", bound=Hashable)

#: Weight of a new latency sample in the EWMA.
EWMA_ALPHA = 0.3
#: The least share of latency tie-breaks an endpoint wins, however slow its
#: EWMA: without it, an endpoint that was slow once (its EWMA only moves
#: when it is picked) would starve after it recovers.
TIE_FLOOR = 0.1
#: A failed attempt's latency sample is this multiple of the larger of its
#: latency and the EWMA (see the module doc) ...
FAILURE_PENALTY = 2.0
#: ... as long as that keeps the endpoint's EWMA within this multiple of its
#: peers' mean EWMA: past it, a failure's sample is only the larger of its
#: latency and the EWMA (no further growth).
FAILURE_CEILING = 8.0


@dataclass(frozen=True)
class Token(Generic[E]):
    """One started attempt (or connection); pass it to :meth:`LoadBalancer.finish`."""

    endpoint: E
    serial: int


class _Stats:
    __slots__ = ("outstanding", "ewma", "samples")

    def __init__(self) -> None:
        self.outstanding = 0
        self.ewma = 0.0
        self.samples = 0


class LoadBalancer(Generic[E]):
    """P2C over least outstanding requests with an inverse-EWMA-latency tiebreak."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._stats: dict[E, _Stats] = {}
        self._open: set[Token[E]] = set()
        self._serial = itertools.count(1)

    # -- choosing
    def pick(
        self, endpoints: Sequence[E], *, unavailable: Collection[E] = (), avoid: Collection[E] = ()
    ) -> E | None:
        """Choose an endpoint (rules in the module doc); None if all are unavailable."""
        cands = [e for e in endpoints if e not in unavailable] if unavailable else endpoints
        if not cands:
            return None
        if avoid:
            fresh = [e for e in cands if e not in avoid]
            if fresh:
                cands = fresh
        n = len(cands)
        if n == 1:
            return cands[0]
        rnd = self._rng.randrange  # two distinct indexes (cheaper than sample())
        i = rnd(n)
        j = rnd(n - 1)
        if j >= i:
            j += 1
        a, b = cands[i], cands[j]
        oa, la = self._rank(a)
        ob, lb = self._rank(b)
        if oa != ob:
            return a if oa < ob else b
        if la <= 0.0 or lb <= 0.0:
            return b if lb < la else a
        # P(a) = lb / (la + lb): inverse-latency weights, kept within
        # [TIE_FLOOR, 1 - TIE_FLOOR] so a slow endpoint still gets samples
        # and is seen again once it recovers.
        p = min(max(lb / (la + lb), TIE_FLOOR), 1.0 - TIE_FLOOR)
        return a if self._rng.random() < p else b

    def _rank(self, e: E) -> tuple[int, float]:
        s = self._stats.get(e)
        return (0, 0.0) if s is None else (s.outstanding, s.ewma)

    # -- accounting
    def start(self, endpoint: E) -> Token[E]:
        """An attempt to ``endpoint`` begins."""
        s = self._stats.get(endpoint)
        if s is None:
            s = self._stats[endpoint] = _Stats()
        s.outstanding += 1
        tok = Token(endpoint, next(self._serial))
        self._open.add(tok)
        return tok

    def finish(self, token: Token[E], ok: bool, latency: float) -> bool:
        """The attempt ended; False (and no change) if ``token`` was already finished."""
        if token not in self._open:
            return False
        self._open.discard(token)
        s = self._stats[token.endpoint]
        s.outstanding -= 1
        latency = max(0.0, latency)
        if not ok:
            base = max(latency, s.ewma)  # never faster for a failure
            latency = FAILURE_PENALTY * base
            peers = [o.ewma for o in self._stats.values() if o is not s and o.samples]
            if peers:  # ... but slower only up to FAILURE_CEILING x its peers' mean
                latency = min(latency, max(base, FAILURE_CEILING * sum(peers) / len(peers)))
        s.ewma = latency if s.samples == 0 else EWMA_ALPHA * latency + (1 - EWMA_ALPHA) * s.ewma
        s.samples += 1
        return True

    # -- state
    def outstanding(self, endpoint: E) -> int:
        s = self._stats.get(endpoint)
        return 0 if s is None else s.outstanding

    def latency(self, endpoint: E) -> float | None:
        """The latency EWMA in seconds, None before the first sample."""
        s = self._stats.get(endpoint)
        return None if s is None or s.samples == 0 else s.ewma

    def forget_latency(self, endpoint: E) -> None:
        """Drop ``endpoint``'s latency EWMA (it reads as 0 again, so it is tried
        early): for an endpoint coming back from an ejection, whose old
        samples say nothing about it now and would otherwise keep it out of
        every P2C draw it shares with a faster-looking endpoint."""
        s = self._stats.get(endpoint)
        if s is not None:
            s.ewma = 0.0
            s.samples = 0

    def retain(self, endpoints: Collection[E]) -> None:
        """Forget statistics of endpoints no longer listed (after an inventory
        change); ones with attempts in flight are kept until those finish."""
        keep = set(endpoints) | {t.endpoint for t in self._open}
        for e in [e for e in self._stats if e not in keep]:
            del self._stats[e]
