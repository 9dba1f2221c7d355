"""W3C Trace Context and request ids for one proxy hop, sans-IO.

Rules (https://www.w3.org/TR/trace-context/):

- ``traceparent`` is ``VV-TTTT(32 hex)-PPPP(16 hex)-FF``, lower-case hex.
  Version ``ff`` is invalid; the trace id and parent id must not be all
  zeros. Version ``00`` must be exactly 55 characters; a higher version may
  carry more fields after a ``-`` (we read the first four and re-emit 00).
- The proxy is a hop: it keeps the trace id and flags and sends a new parent
  id (its own span). A missing or invalid ``traceparent`` starts a new trace
  (sampled flag off), and then any ``tracestate`` is dropped, as the spec
  requires. More than one ``traceparent`` line is invalid.
- ``tracestate`` lines are joined with ``,`` and passed on unchanged when
  at most :data:`MAX_TRACESTATE` bytes and 32 members; otherwise members are
  dropped from the end until it fits.
- ``x-request-id`` is kept when present and sane (1..128 visible ASCII),
  else a new one in the uuid4 text form.

Sampling (whether this hop records a span, ``agent.proxy.spans``): parent
based, as OpenTelemetry's default sampler. A valid incoming ``traceparent``
decides with its sampled flag, both ways; a new trace is sampled with
probability :func:`sample_rate` (0 unless the worker exports spans:
:func:`set_sample_rate`), and a sampled new trace is forwarded with the flag
set, so the next hop (the destination node's proxy, the app) records its
part too. The proxy keeps no span state here: ``HopContext`` is the span's
identity (trace id, this hop's span id, the parent span id received).

New ids come from a Mersenne Twister (:class:`random.Random`) seeded from
``os.urandom`` at import and again in every forked child: trace, span and
request ids must be unique, not secret (W3C Trace Context asks for random,
not unpredictable, ids), and this costs no syscall per request. Never use
them as secrets or capabilities.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "TraceParent",
    "parse_traceparent",
    "new_span_id",
    "new_trace_id",
    "new_request_id",
    "HopContext",
    "hop",
    "MAX_TRACESTATE",
    "MAX_TRACESTATE_MEMBERS",
    "TRACE_HEADERS",
    "set_sample_rate",
    "sample_rate",
]

MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"x-request-id"})

_TP = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_VISIBLE = re.compile(rb"[\x20-\x7e]*")
_ODD = frozenset(b"13579bdf")  # a lower-case hex digit with its low bit set


@dataclass(slots=True)  # made per request: not frozen (see http1.RequestHead), never changed
class TraceParent:
    trace_id: bytes  # 32 lower-case hex
    parent_id: bytes  # 16 lower-case hex
    flags: bytes  # 2 lower-case hex

    @property
    def sampled(self) -> bool:
        return self.flags[1] in _ODD  # the flags' low bit (W3C: "sampled")

    def header(self) -> bytes:
        return b"00-%s-%s-%s" % (self.trace_id, self.parent_id, self.flags)

    def child(self, span_id: bytes) -> TraceParent:
        """The same trace with this hop's span as the parent."""
        return TraceParent(self.trace_id, span_id, self.flags)


def parse_traceparent(value: bytes | str) -> TraceParent | None:
    """The parsed header, or None when it is invalid (never raises)."""
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    value = value.strip(b" \t")
    first = value[:55]
    if _TP.fullmatch(first) is None:  # the four fields have fixed widths: slice them
        return None
    version = first[:2]
    if version == b"00":
        if len(value) != 55:
            return None
    elif version == b"ff" or (len(value) > 55 and value[55] != 0x2D):  # '-'
        return None
    trace_id = first[3:35]
    parent_id = first[36:52]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, parent_id, first[53:55])


_rng = random.Random()  # seeded from os.urandom
os.register_at_fork(after_in_child=_rng.seed)  # a forked worker must not repeat its parent's ids
_bits = _rng.getrandbits
_random = _rng.random
_rate = 0.0  # set_sample_rate(): the chance a new trace is sampled


def set_sample_rate(rate: float) -> None:
    """The probability, 0..1, that a request arriving without a valid
    ``traceparent`` starts a sampled trace (per worker process; 0, the
    default, when the worker exports no spans)."""
    global _rate
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sample rate must be in [0, 1], got {rate!r}")
    _rate = float(rate)


def sample_rate() -> float:
    return _rate


def new_trace_id() -> bytes:
    """32 lower-case hex digits, not all zero (unique, not secret: module docstring)."""
    while True:
        t = b"%032x" % _bits(128)
        if t != _ZERO_TRACE:
            return t


def new_span_id() -> bytes:
    """16 lower-case hex digits, not all zero (unique, not secret: module docstring)."""
    while True:
        s = b"%016x" % _bits(64)
        if s != _ZERO_SPAN:
            return s


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> bytes:
    """A random id in uuid4 text form (version 4, RFC 4122 variant), lower-case."""
    return _uuid4_text(_bits(128))


def _uuid4_text(bits: int) -> bytes:
    """128 random ``bits`` as a uuid4 (version and variant set), lower-case text."""
    h = b"%032x" % ((bits & _UUID4_CLEAR) | _UUID4_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1


def _new_ids() -> tuple[bytes, bytes, bytes]:
    """(trace id, span id, request id) for a request that brought neither a
    traceparent nor an x-request-id: the three of :func:`new_trace_id`,
    :func:`new_span_id` and :func:`new_request_id`, from one draw (this runs
    for most requests at the first L7 hop)."""
    x = _bits(320)
    t = b"%032x" % (x & _M128)
    s = b"%016x" % ((x >> 128) & _M64)
    if t == _ZERO_TRACE or s == _ZERO_SPAN:
        return new_trace_id(), new_span_id(), new_request_id()
    return t, s, _uuid4_text(x >> 192)


def _bound_tracestate(value: bytes) -> bytes | None:
    if not _VISIBLE.fullmatch(value):
        return None
    members = [m.strip(b" \t") for m in value.split(b",")]
    members = [m for m in members if m][:MAX_TRACESTATE_MEMBERS]
    while members and len(b",".join(members)) > MAX_TRACESTATE:
        members.pop()
    return b",".join(members) or None


@dataclass(slots=True)  # made per request: not frozen (see http1.RequestHead), never changed
class HopContext:
    """What this hop forwards, and what it logs."""

    traceparent: TraceParent
    """Sent upstream: this hop's span as the parent."""
    incoming: TraceParent | None
    """The valid traceparent received, if any."""
    tracestate: bytes | None
    request_id: bytes
    request_id_generated: bool

    @property
    def span_id(self) -> bytes:
        return self.traceparent.parent_id

    @property
    def parent_id(self) -> bytes | None:
        """The span this hop's span is a child of: the incoming parent, if any."""
        i = self.incoming
        return None if i is None else i.parent_id

    @property
    def sampled(self) -> bool:
        """Record a span for this hop (module docstring, "Sampling")."""
        return self.traceparent.sampled

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"traceparent", self.traceparent.header())]
        if self.tracestate is not None:
            out.append((b"tracestate", self.tracestate))
        out.append((b"x-request-id", self.request_id))
        return out


def hop(headers: Sequence[tuple[bytes, bytes]]) -> HopContext:
    """Trace context for forwarding a request with these header lines."""
    tps: list[bytes] = []
    states: list[bytes] = []
    rid: bytes | None = None
    for n, v in headers:
        if len(n) in (11, 10, 12):
            ln = n.lower()
            if ln == b"traceparent":
                tps.append(v)
            elif ln == b"tracestate":
                states.append(v.strip(b" \t"))
            elif ln == b"x-request-id" and rid is None:
                rid = v.strip(b" \t")
    incoming = parse_traceparent(tps[0]) if len(tps) == 1 else None
    if rid is not None and not _REQUEST_ID.fullmatch(rid):
        rid = None
    if incoming is None and rid is None:  # the usual first hop: every id is new
        trace, span, rid = _new_ids()
        r = _rate
        tp = TraceParent(trace, span, b"01" if r and _random() < r else b"00")
        return HopContext(tp, None, None, rid, True)
    span = new_span_id()
    if incoming is not None:
        tp = incoming.child(span)
        state = _bound_tracestate(b",".join(states)) if states else None
    else:
        r = _rate
        tp = TraceParent(new_trace_id(), span, b"01" if r and _random() < r else b"00")
        state = None
    if rid is None:
        rid, generated = new_request_id(), True
    else:
        generated = False
    return HopContext(tp, incoming, state, rid, generated)
