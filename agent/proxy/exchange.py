"""One HTTP request forwarded to an upstream cluster, sans-IO.

:class:`HttpExchange` is the life of one request between the proxy's two
sockets, without the sockets: it takes *events* (the request was routed, a
body chunk, the request ended, a connection was attached or failed, the
response head arrived, the upstream was lost, a deadline passed) and returns
*commands* (connect, reset the upstream, answer locally, fail, forward the
response, switch protocols, wake me at). The shell (``l7``, and later an
HTTP/2 stream) owns the bytes: parsing, serialization, framing, pooling,
backpressure; the exchange owns every decision that does not depend on the
wire format, once:

- the cluster's circuit breaker count of requests in flight (``max-requests``),
- endpoint choice (``Cluster.pick``) and attempt accounting for load
  balancing and outlier detection (``Cluster.start``/``finish``/``connected``),
- retries (:class:`~agent.traffic.retry.RetryState`, the cluster's budget,
  the replay buffer bounded by ``maxBodyBytes``, the one free "stale pooled
  connection" retry),
- deadlines (request, per-try, stream idle) and the answer when one passes,
- the proxy's own answers: 503 UF/UC/UO/NR, 502, 504 UT, URX,
- Envoy-style response flags and the :class:`Exchange` record.

``handle(event, now)`` takes any event; the hot transitions are also
plain methods (``start``, ``request_body``, ``request_end``, ``attached``,
``response``, ``response_end``) that the shell calls directly, sparing an
event object and a dispatch per step (measured: ~4 us a request); ``handle``
maps those events to the same methods.

Everything that affects the state machine is in this module. One clock
(``now``, seconds, monotonic) is passed with every event; the exchange never
reads a clock.

States (:class:`State`) and what moves between them:

=========== =========================== =========================================
state       event                       next state, commands
=========== =========================== =========================================
ROUTING     Start(cluster)              CONNECTING, Connect
                                        ANSWERED, Respond 503 (UO, NR)
ROUTING     (shell: ``answer``)         ANSWERED (a hook answered)
ROUTING     (shell: ``fail``)           FAILED, Fail <status> (e.g. routing failed)
CONNECTING  Attached                    WAITING (+ Wake for the stream idle)
CONNECTING  ConnectFailed               CONNECTING, ResetUpstream + Connect (retry)
                                        FAILED, Fail 503 UF
CONNECTING  Refused (no connection      ANSWERED, Respond 503 UO (first try)
            slot in the breaker)        FAILED, Fail 503 UO (a retry)
WAITING     ResponseStarted(status)     RESPONDING, Forward
                                        CONNECTING, ResetUpstream + Connect
                                        (status listed in ``retryOn``)
                                        UPGRADED, SwitchProtocols (101 asked for)
                                        FAILED, Fail 502 (101 not asked for)
WAITING     (shell: ``grpc_response``)  as ResponseStarted(200), but retried when
            a gRPC trailers-only answer ``retryOn`` lists its ``grpc-status``
WAITING     UpstreamLost                CONNECTING, Connect(fresh) (a reused
                                        connection closed under us: once, free)
                                        CONNECTING, ResetUpstream + Connect
                                        (retry), or FAILED, Fail 503 UC
WAITING     BadResponse                 retry, or FAILED, Fail <status> UC
RESPONDING  ResponseEnd                 DONE
RESPONDING  UpstreamLost / BadResponse  FAILED, ResetClient (UC)
any live    Deadline                    Wake(next), or retry (per-try timeout),
                                        or FAILED, Fail 504 / ResetClient (UT)
any         BadRequest                  FAILED, Fail <status> / ResetClient (DPE)
any         ClientLost                  FAILED (attempt abandoned, counts released;
                                        UPGRADED stays)
=========== =========================== =========================================

``RequestBody``/``RequestEnd`` never change the state: they feed the replay
buffer and start the request and per-try deadlines. ``Fail`` means: answer
and close the client; ``ResetClient`` replaces it once a response (the
upstream's or the proxy's own) has begun. Both imply dropping the upstream
with a reset, as does ``Respond``; the shell always does so.

Two fields are written by the shell directly, not through events (per-chunk
events for them would cost more than they say): ``resp_bytes``, the response
body bytes, and ``last_io``, the time of the last byte either way (for the
stream idle timeout; the exchange sets it too on its own transitions).
:attr:`~HttpExchange.req_bytes` is counted by ``request_body``.

Size: a little over 800 lines, nearly half of it this docstring and the
documented event, command and record types; the machine is one class so
that its state stays in one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.proxy.tracing import HopContext
from agent.traffic.breaker import OVERLOADED_HEADER, Breaker, Limit, Overloaded
from agent.traffic.lb import Token
from agent.traffic.outcome import CONNECT_FAILURE, RESET, TIMEOUT, Outcome
from agent.traffic.outcome import grpc as grpc_outcome
from agent.traffic.outcome import status as status_outcome
from agent.traffic.retry import Done, Request, RetryState
from agent.traffic.settings import IDEMPOTENT_METHODS
from agent.traffic.upstream_cluster import Cluster, Target

__all__ = [
    "State",
    "HttpExchange",
    "Exchange",
    # events
    "Start",
    "RequestBody",
    "RequestEnd",
    "Attached",
    "Connected",
    "ConnectFailed",
    "Refused",
    "ResponseStarted",
    "response_started",
    "ResponseEnd",
    "UpstreamLost",
    "BadResponse",
    "BadRequest",
    "Deadline",
    "ClientLost",
    "REQUEST_END",
    "RESPONSE_END",
    "ATTACHED_REUSED",
    "ATTACHED_NEW",
    "DEADLINE",
    "CLIENT_LOST",
    # commands
    "Connect",
    "ResetUpstream",
    "Respond",
    "Fail",
    "ResetClient",
    "Forward",
    "SwitchProtocols",
    "Wake",
    "RESET_UPSTREAM",
    "RESET_CLIENT",
    "FORWARD",
    "SWITCH_PROTOCOLS",
]

Headers = Sequence[tuple[bytes, bytes]]

_IDEMPOTENT = frozenset(m.encode() for m in IDEMPOTENT_METHODS)
_FLAG_ORDER = {f: i for i, f in enumerate(("DPE", "NR", "UO", "UF", "UC", "UT", "URX"))}
_URX_REASONS = frozenset({"attempts-exhausted", "budget-exhausted", "deadline"})


class State(enum.Enum):
    ROUTING = "routing"
    """The request head arrived; no upstream chosen yet."""
    CONNECTING = "connecting"
    """An attempt waits for its connection (pooled or new)."""
    WAITING = "waiting"
    """The request went out on a connection; no final response head yet."""
    RESPONDING = "responding"
    """The upstream's final response head went to the client; its body follows."""
    ANSWERED = "answered"
    """The proxy answered by itself; what is left of the request body is discarded."""
    DONE = "done"
    """The upstream's response is complete."""
    FAILED = "failed"
    """Answered with an error or reset, or the client went away: terminal."""
    UPGRADED = "upgraded"
    """The upstream switched protocols: the shell relays bytes from now on."""


_STARTED = frozenset({State.RESPONDING, State.ANSWERED, State.DONE})  # a response reached the client


# --------------------------------------------------------------------------
# Events (what the shell saw)


@dataclass(frozen=True, slots=True)
class Start:
    """The shell chose ``cluster`` for the request. ``head(target)`` gives
    the request head as it goes on the wire to the first target (it may need
    the target, e.g. for a missing Host); retries send the same bytes."""

    cluster: Cluster
    head: Callable[[Target], bytes]


@dataclass(frozen=True, slots=True)
class RequestBody:
    """``size`` payload bytes of the request body, as ``pieces`` on the wire."""

    size: int
    pieces: tuple[bytes, ...] | list[bytes]


@dataclass(frozen=True, slots=True)
class RequestEnd:
    """The client's request is complete."""


@dataclass(frozen=True, slots=True)
class Attached:
    """The current attempt has its connection (``reused``: from the pool);
    the shell wrote :attr:`Connect.data` on it."""

    reused: bool


@dataclass(frozen=True, slots=True)
class Connected:
    """A new connection to ``target`` was made (for outlier detection)."""

    target: Target


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    reason: str
    """What the client is told if this ends the request."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The circuit breaker had no room for the new connection the attempt needs."""

    over: Overloaded


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """A final (non-1xx, or 101) response head arrived from the upstream."""

    status: int


@dataclass(frozen=True, slots=True)
class ResponseEnd:
    """The upstream's response is complete."""


@dataclass(frozen=True, slots=True)
class UpstreamLost:
    """The upstream connection closed (or reset). ``got_bytes``: it had sent
    something since this request went out on it."""

    reason: str | None = None
    """Why, if the shell knows (the socket error)."""
    got_bytes: bool = False


@dataclass(frozen=True, slots=True)
class BadResponse:
    """The upstream's response did not parse; ``status`` is what to answer."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """The client's request did not parse (after its head); answer ``status``."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Deadline:
    """The shell was woken (a :class:`Wake` was due)."""


@dataclass(frozen=True, slots=True)
class ClientLost:
    """The client connection is gone (or the shell gave up on it)."""


_STARTED_BY_STATUS: dict[int, ResponseStarted] = {}


def response_started(status: int) -> ResponseStarted:
    """The event for a response head with ``status`` (shared instances)."""
    ev = _STARTED_BY_STATUS.get(status)
    if ev is None:
        ev = _STARTED_BY_STATUS[status] = ResponseStarted(status)
    return ev


REQUEST_END = RequestEnd()
RESPONSE_END = ResponseEnd()
ATTACHED_REUSED = Attached(True)
ATTACHED_NEW = Attached(False)
DEADLINE = Deadline()
CLIENT_LOST = ClientLost()


# --------------------------------------------------------------------------
# Commands (what the shell must do)


@dataclass(slots=True)  # one or more per request: not frozen (see http1.RequestHead), never changed
class Connect:
    """Get a connection to ``target`` -- an idle pooled one, else a new one
    (``timeout``: the connect timeout), counting it in the cluster's breaker
    (if refused: feed :class:`Refused`) -- and write ``data`` on it, then
    the rest of the request body as it comes. ``fresh``: never a pooled
    connection."""

    target: Target
    timeout: float | None
    data: tuple[bytes, ...]
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class ResetUpstream:
    """Drop the current upstream connection with a reset (or cancel its connect)."""


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client by the proxy itself; the client connection may stay."""

    status: int
    body: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the client with this error and close it."""

    status: int
    body: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class ResetClient:
    """A response had begun: the failure can only be told by resetting the client."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the upstream's response head (and then its body) to the client."""


@dataclass(frozen=True, slots=True)
class SwitchProtocols:
    """Send the 101 on and relay bytes both ways from now on."""


@dataclass(slots=True)  # per request with deadlines: not frozen (see http1.RequestHead), never changed
class Wake:
    """Feed :class:`Deadline` no earlier than ``at`` (and not much later)."""

    at: float


RESET_UPSTREAM = ResetUpstream()
RESET_CLIENT = ResetClient()
FORWARD = Forward()
SWITCH_PROTOCOLS = SwitchProtocols()

_NOTHING: tuple = ()
_FORWARD = (FORWARD,)

Command = Connect | ResetUpstream | Respond | Fail | ResetClient | Forward | SwitchProtocols | Wake
Event = (
    Start
    | RequestBody
    | RequestEnd
    | Attached
    | Connected
    | ConnectFailed
    | Refused
    | ResponseStarted
    | ResponseEnd
    | UpstreamLost
    | BadResponse
    | BadRequest
    | Deadline
    | ClientLost
)


@dataclass(slots=True)
class Exchange:
    """What happened to one request, for ``on_response`` (metrics, access log).

    ``flags`` follow Envoy's response flags, comma-separated in this order,
    "-" for none: DPE downstream protocol error, NR no healthy upstream, UO
    circuit breaker overflow, UF upstream connect failure, UC upstream
    connection terminated, UT upstream (per-try or request) timeout, URX
    retries exhausted. A request the short-circuit refused by policy has
    none here: the metrics (``stats``) report it as RBAC."""

    cluster: str | None = None
    """The service port (``ns/name:port``) or None for a direct pod address."""
    upstream: tuple | None = None
    """The last upstream target tried, or None if none was."""
    attempts: int = 0
    """Tries made (1 without retries; 0 when none was made)."""
    flags: str = "-"
    request_body_bytes: int = 0
    response_body_bytes: int = 0
    trace: HopContext | None = None
    """The trace context forwarded upstream (generated request ids included), if forwarded."""
    grpc_status: int | None = None
    """gRPC: the response's ``grpc-status`` (trailers, or the proxy's own answer); set by the HTTP/2 shell."""


# --------------------------------------------------------------------------
# The state machine


class HttpExchange:
    """One request's way to an upstream (module docstring).

    ``method``: the request method (bytes); ``body_length``: the request
    body's size when known (0: no body), None when it is not (chunked);
    ``end``: what the shell writes after the last body piece (HTTP/1.1's
    last chunk), replayed with the body on a retry; ``upgrade``: the request
    asks for a protocol switch the proxy allows; ``now``: when the request
    head arrived."""

    __slots__ = (
        "method",
        "body_length",
        "end",
        "upgrade",
        "t0",
        "state",
        "cluster",
        "preamble",
        "req_done",
        "status",
        "flags",
        "held",
        "target",
        "token",
        "attempts",
        "attempt_t0",
        "retry",
        "replay",
        "replay_size",
        "reused",
        "stale_retried",
        "try_until",
        "req_until",
        "stream_idle",
        "last_io",
        "req_bytes",
        "resp_bytes",
        "trace",
    )

    def __init__(
        self, method: bytes, body_length: int | None, now: float, end: bytes = b"", upgrade: bool = False
    ) -> None:
        self.method = method
        self.body_length = body_length
        self.end = end
        self.upgrade = upgrade
        self.t0 = now
        self.state = State.ROUTING
        self.cluster: Cluster | None = None
        self.preamble = b""
        self.req_done = False
        self.status = 0
        self.flags: list[str] | None = None
        self.held: Breaker | None = None  # max-requests count held
        self.target: Target | None = None
        self.token: Token[Target] | None = None  # the load balancer's, for the current attempt
        self.attempts = 0
        self.attempt_t0 = 0.0
        self.retry: RetryState | None = None
        self.replay: list[bytes] | None = None  # request body as sent, kept for a retry
        self.replay_size = 0
        self.reused = False
        self.stale_retried = False
        self.try_until: float | None = None
        self.req_until: float | None = None
        self.stream_idle: float | None = None
        self.last_io = 0.0
        self.req_bytes = 0
        self.resp_bytes = 0
        self.trace: HopContext | None = None

    def __repr__(self) -> str:
        return f"<HttpExchange {self.method.decode('latin-1')} {self.state.name} attempts={self.attempts}>"

    # ---- the entry point

    def handle(self, ev: Event, now: float) -> Sequence[Command]:
        """Feed one event; the commands to carry out, in order."""
        return _HANDLERS[type(ev)](self, ev, now)

    # ---- state the shell reads

    @property
    def discarding(self) -> bool:
        """The proxy answered: the rest of the request body goes nowhere."""
        return self.state is State.ANSWERED

    @property
    def response_done(self) -> bool:
        """The client has its whole response (the upstream's or the proxy's)."""
        s = self.state
        return s is State.DONE or s is State.ANSWERED

    def flag(self, flag: str) -> None:
        """Add a response flag (one of those :class:`Exchange` lists), once."""
        f = self.flags
        if f is None:
            self.flags = [flag]
        elif flag not in f:
            f.append(flag)

    def answer(self, status: int) -> None:
        """A hook answered the request (``on_request``/``choose``): no upstream."""
        self.state = State.ANSWERED
        self.status = status

    def fail(self, status: int, reason: str, now: float) -> Sequence[Command]:
        """The shell cannot go on with this request (e.g. routing failed)."""
        return self._fail(status, reason, now)

    def record(self) -> Exchange:
        c = self.cluster
        f = self.flags
        return Exchange(
            None if c is None else c.name,
            self.target,
            self.attempts,
            "-" if f is None else ",".join(sorted(f, key=_FLAG_ORDER.__getitem__)),
            self.req_bytes,
            self.resp_bytes,
            self.trace,
        )

    def release(self) -> None:
        """Give back the request's ``max-requests`` count (idempotent)."""
        b = self.held
        if b is not None:
            self.held = None
            b.release(Limit.REQUESTS)

    # ---- events

    # The hot transitions are also methods with plain arguments: the shell
    # calls them directly (no event object, no dispatch); ``handle`` maps each
    # event to the same method, so scripts exercise the same code.

    def start(self, cluster: Cluster, head: Callable[[Target], bytes], now: float) -> Sequence[Command]:
        """:class:`Start`."""
        c = self.cluster = cluster
        over = c.breaker.acquire(Limit.REQUESTS)
        if over is not None:
            return self._overloaded(over, now)
        self.held = c.breaker
        s = c.settings
        si = self.stream_idle = s.timeouts.stream_idle
        if si is not None:  # counts from the head (a tick may come while connecting)
            self.last_io = now
        if c.retries_on:
            c.budget.request(now)
            rs = s.retries
            if rs.non_idempotent or rs.grpc_statuses or self.method in _IDEMPOTENT:
                n = self.body_length
                if n is None or n <= rs.max_body_bytes:
                    self.replay = []
        target = c.pick(now)
        if target is None:
            self.flag("NR")
            self.answer(503)
            return (Respond(503, b"no healthy upstream\n"),)
        self.preamble = head(target)
        return self._try(c, target, now)

    def request_body(self, size: int, pieces: tuple[bytes, ...] | list[bytes]) -> Sequence[Command]:
        """:class:`RequestBody` (needs no clock)."""
        if self.state is State.ANSWERED:
            return _NOTHING
        n = size
        self.req_bytes += n
        rp = self.replay
        if rp is not None:
            self.replay_size += n
            # only start() sets replay, after the cluster: no None check per chunk
            if self.replay_size > self.cluster.settings.retries.max_body_bytes:  # type: ignore[union-attr]
                self.replay = None  # too large to replay: this request is never retried
            else:
                rp += pieces
        return _NOTHING

    def request_end(self, now: float) -> Sequence[Command]:
        """:class:`RequestEnd`."""
        self.req_done = True
        s = self.state
        if s is not State.WAITING and s is not State.CONNECTING and s is not State.RESPONDING:
            return _NOTHING
        self.last_io = now
        c: Cluster = self.cluster  # type: ignore[assignment]  # a live attempt: start() set it
        t = c.settings.timeouts.request
        w = self._arm_try(c, now)
        if t is None:
            return _NOTHING if w is None else (w,)
        d = self.req_until = now + t
        return (Wake(d),) if w is None else (Wake(d), w)

    def attached(self, reused: bool, now: float) -> Sequence[Command]:
        """:class:`Attached`."""
        self.reused = reused
        self.state = State.WAITING
        if self.token is not None:  # latency for P2C: from the request on the wire, not the connect
            self.attempt_t0 = now
        self.last_io = now
        si = self.stream_idle
        return _NOTHING if si is None else (Wake(now + si),)

    def _connected(self, ev: Connected, now: float) -> Sequence[Command]:
        if self.cluster is not None:
            self.cluster.connected(ev.target, now)
        return _NOTHING

    def _connect_failed(self, ev: ConnectFailed, now: float) -> Sequence[Command]:
        return self._attempt_failed(CONNECT_FAILURE, 503, "UF", ev.reason, now)

    def _refused(self, ev: Refused, now: float) -> Sequence[Command]:
        self._end_attempt(None, now)
        return self._overloaded(ev.over, now)

    def response(self, st: int, now: float) -> Sequence[Command]:
        """:class:`ResponseStarted` with status ``st``."""
        c: Cluster = self.cluster  # type: ignore[assignment]  # a response: start() set it
        if self.token is not None or c.multi:
            self._end_attempt(status_outcome(st), now)
        else:
            self.try_until = None
        if st in c.retry_statuses:
            r = self._retry_after(status_outcome(st), now)
            if r is not None:
                return r  # this response is discarded (its connection reset)
        if st == 101:
            if not self.upgrade:
                return self._fail(502, "upstream switched protocols without being asked", now)
            self.status = 101
            self.state = State.UPGRADED
            return (SWITCH_PROTOCOLS,)
        self.status = st
        self.state = State.RESPONDING
        return _FORWARD

    def grpc_response(self, code: int, now: float) -> Sequence[Command]:
        """:meth:`response` for a gRPC trailers-only answer (HTTP 200 whose
        ``grpc-status`` is ``code``): retried when ``retryOn`` names the code
        (the HTTP/2 shell calls it; the outcome counts as Envoy maps it)."""
        c: Cluster = self.cluster  # type: ignore[assignment]  # a response: start() set it
        if not c.retries_on or code not in c.settings.retries.grpc_statuses:
            return self.response(200, now)
        o = grpc_outcome(code)
        if self.token is not None or c.multi:
            self._end_attempt(o, now)
        else:
            self.try_until = None
        r = self._retry_after(o, now)
        if r is not None:
            return r  # this answer is discarded (its stream reset)
        self.status = 200
        self.state = State.RESPONDING
        return _FORWARD

    def response_end(self) -> Sequence[Command]:
        """:class:`ResponseEnd` (needs no clock)."""
        self.state = State.DONE
        return _NOTHING

    def _lost(self, ev: UpstreamLost, now: float) -> Sequence[Command]:
        if self.state is State.RESPONDING:
            self.flag("UC")
            return self._fail(502, "upstream connection lost mid-response", now)
        if (
            self.reused
            and not ev.got_bytes
            and not self.stale_retried
            and (self.body_length == 0 or self.replay is not None)
        ):
            # A pooled connection the upstream closed just as we reused it: once, fresh,
            # same endpoint (not the endpoint's fault, not an attempt).
            self.stale_retried = True
            self.state = State.CONNECTING
            c = self.cluster
            assert c is not None and self.target is not None
            return (Connect(self.target, c.settings.timeouts.connect, self._data(), fresh=True),)
        why = "" if ev.reason is None else f": {ev.reason}"
        return self._attempt_failed(
            RESET, 503, "UC", f"upstream closed the connection before responding{why}", now
        )

    def _bad_response(self, ev: BadResponse, now: float) -> Sequence[Command]:
        reason = f"bad response from the upstream: {ev.reason}"
        if self.state is State.RESPONDING:
            self.flag("UC")
            return self._fail(ev.status, reason, now)
        return self._attempt_failed(RESET, ev.status, "UC", reason, now)

    def _bad_request(self, ev: BadRequest, now: float) -> Sequence[Command]:
        self.flag("DPE")
        return self._fail(ev.status, ev.reason, now)

    def _deadline(self, ev: Deadline, now: float) -> Sequence[Command]:
        s = self.state
        if s is not State.WAITING and s is not State.CONNECTING and s is not State.RESPONDING:
            return _NOTHING
        nxt = None
        if s is not State.RESPONDING:
            d = self.req_until
            if d is not None:
                if now >= d:
                    self.flag("UT")
                    return self._fail(504, "upstream did not respond in time (request timeout)", now)
                nxt = d
            d = self.try_until
            if d is not None:
                if now >= d:
                    return self._attempt_failed(TIMEOUT, 504, "UT", "upstream did not respond in time", now)
                nxt = d if nxt is None or d < nxt else nxt
        si = self.stream_idle
        if si is not None:
            d = self.last_io + si
            if now >= d:
                self.flag("UT")
                return self._fail(504, f"no byte either way for {si:g}s (stream idle timeout)", now)
            nxt = d if nxt is None or d < nxt else nxt
        return _NOTHING if nxt is None else (Wake(nxt),)

    def _client_lost(self, ev: ClientLost, now: float) -> Sequence[Command]:
        if self.token is not None:
            self._end_attempt(None, now)
        self.release()
        if self.state is not State.UPGRADED:
            self.state = State.FAILED
        return _NOTHING

    # ---- helpers

    def _data(self) -> tuple[bytes, ...]:
        """What goes out first on an attempt's connection: the head, then the
        body kept for replay (and its end, if the request is complete)."""
        rp = self.replay
        if not rp:
            if rp is not None and self.req_done and self.end:
                return (self.preamble, self.end)
            return (self.preamble,)
        if self.req_done and self.end:
            return (self.preamble, *rp, self.end)
        return (self.preamble, *rp)

    def _try(self, c: Cluster, target: Target, now: float) -> tuple[Command, ...]:
        """Start an attempt on ``target`` of ``c`` (the exchange's cluster)."""
        self.target = target
        self.attempts += 1
        self.token = c.start(target)
        self.attempt_t0 = now
        self.try_until = None
        self.state = State.CONNECTING
        rp = self.replay
        conn = Connect(
            target,
            c.settings.timeouts.connect,
            (self.preamble,) if not rp and not self.req_done else self._data(),
        )
        if self.req_done:
            w = self._arm_try(c, now)
            if w is not None:
                return (w, conn)
        return (conn,)

    def _arm_try(self, c: Cluster, now: float) -> Wake | None:
        """The per-try deadline of the current attempt (``c``: the exchange's cluster)."""
        pt = c.settings.retries.per_try_timeout
        if pt is None:
            return None
        self.try_until = d = now + pt
        return Wake(d)

    def _end_attempt(self, outcome: Outcome | None, now: float) -> None:
        """Account the current attempt (None: abandoned) to the cluster."""
        c = self.cluster
        tgt = self.target
        if c is not None and tgt is not None and (self.token is not None or c.multi):
            c.finish(self.token, tgt, outcome, now - self.attempt_t0, now)
        self.token = None
        self.try_until = None

    def _attempt_failed(
        self, outcome: Outcome, status: int, flag: str, reason: str, now: float
    ) -> Sequence[Command]:
        """Connect failure, reset or per-try timeout: retry, or answer ``status``."""
        self._end_attempt(outcome, now)
        r = self._retry_after(outcome, now)
        if r is not None:
            return r
        self.flag(flag)
        return self._fail(status, reason, now)

    def _retry_after(self, outcome: Outcome, now: float) -> tuple[Command, ...] | None:
        """Another attempt if the policy and the budget allow, else None."""
        c = self.cluster
        if c is None or self.replay is None or self.state in _STARTED:
            return None
        rs = self.retry
        if rs is None:
            n = self.body_length
            rs = self.retry = RetryState(
                Request(self.method.decode("latin-1"), self.replay_size if n is None else n),
                c.settings,
                c.budget,
                self.t0,
                counted=True,
            )
            rs.first()
        d = rs.next(self.target, outcome, now)
        if isinstance(d, Done):
            if d.reason in _URX_REASONS:
                self.flag("URX")
            return None
        target = c.pick(now, d.avoid)
        if target is None:
            return None
        return (RESET_UPSTREAM, *self._try(c, target, now))

    def _overloaded(self, over: Overloaded, now: float) -> Sequence[Command]:
        self.flag("UO")
        body = f"{over}\n".encode()
        headers = [(OVERLOADED_HEADER.encode(), over.limit.value.encode())]
        if self.attempts <= 1 and self.state not in _STARTED:  # nothing went upstream yet
            self.answer(503)
            return (Respond(503, body, headers),)
        return self._fail(503, body.decode("utf-8", "replace").rstrip("\n"), now, headers)

    def _fail(self, status: int, reason: str, now: float, headers: Headers = ()) -> Sequence[Command]:
        """Answer with an error and close (reset if a response already began)."""
        if self.token is not None:
            self._end_attempt(None, now)
        started = self.state in _STARTED
        self.state = State.FAILED
        if started:
            return (RESET_CLIENT,)
        self.status = status
        return (Fail(status, (reason + "\n").encode("utf-8", "replace"), headers),)


_HANDLERS: dict[type, Callable[[HttpExchange, Any, float], Sequence[Command]]] = {
    Start: lambda ex, ev, now: ex.start(ev.cluster, ev.head, now),
    RequestBody: lambda ex, ev, now: ex.request_body(ev.size, ev.pieces),
    RequestEnd: lambda ex, ev, now: ex.request_end(now),
    Attached: lambda ex, ev, now: ex.attached(ev.reused, now),
    Connected: HttpExchange._connected,
    ConnectFailed: HttpExchange._connect_failed,
    Refused: HttpExchange._refused,
    ResponseStarted: lambda ex, ev, now: ex.response(ev.status, now),
    ResponseEnd: lambda ex, ev, now: ex.response_end(),
    UpstreamLost: HttpExchange._lost,
    BadResponse: HttpExchange._bad_response,
    BadRequest: HttpExchange._bad_request,
    Deadline: HttpExchange._deadline,
    ClientLost: HttpExchange._client_lost,
}
