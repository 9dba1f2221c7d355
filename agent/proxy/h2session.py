"""HTTP/2 on one connection, sans-IO: the ``h2`` library's frames and events
turned into per-stream requests and responses, with the proxy's own rules.

Two ends, one base:

- :class:`ServerSide` is the downstream connection (a client speaking h2c
  with prior knowledge): ``feed(data, now)`` returns :class:`Request`,
  :class:`Body`, :class:`End`, :class:`Trailers`, :class:`PeerReset`,
  :class:`Refused`, :class:`GoAway`, :class:`Broken` events;
- :class:`ClientSide` is an upstream connection (the proxy speaks h2c to
  the pod or the next leg): it returns :class:`ResponseHead`, :class:`Body`,
  :class:`Trailers`, :class:`End`, :class:`PeerReset`, :class:`GoAway`,
  :class:`Broken`.

Both buffer what flow control does not let out yet (``send_data``) and
send it as the peer opens its window; ``data_to_send()`` is what goes on
the wire. Nothing here reads a clock (``now`` is passed in) or a socket.

Flow control, both ways, as a relay must do it so that a slow reader never
makes the proxy buffer without bound: the connection-level window is
given back at once (so one stalled stream never starves the others that
share the connection), the stream-level window only when the bytes left
the other side's buffer (``send_data(..., credit=)`` carries what to give
back; ``drained()`` says it is due). So a stream holds at most its window
in the proxy.

Requests are checked as RFC 9113 8.3 says, each failure a *stream* error
(the other streams of the connection go on): pseudo-header fields only
``:method :scheme :authority :path``, each once, before every regular
field; ``:method``, ``:scheme`` and ``:path`` present; names lowercase
tokens; no connection-specific field (``connection``, ``keep-alive``,
``proxy-connection``, ``transfer-encoding``, ``upgrade``; ``te`` other than
``trailers``); values without CR, LF, NUL or surrounding whitespace; a
``host`` differing from ``:authority`` (two hosts would let a request be
authorized under one name and served under the other). ``:path`` is
normalized like an HTTP/1.1 target (``agent.policy.http``); what cannot be
normalized is answered with its status (400/414), like HTTP/1.1.

Attack classes bounded here (``H2Limits``):

- rapid reset (CVE-2023-44487): streams the client resets are counted in
  a token bucket; past it the connection gets GOAWAY ENHANCE_YOUR_CALM and
  is closed;
- SETTINGS floods: likewise, a token bucket of SETTINGS frames;
- too many concurrent streams: ``max_concurrent_streams`` is advertised;
  a HEADERS that opens a stream past it is answered RST_STREAM
  REFUSED_STREAM (RFC 9113 5.1.2: the client may retry it, the connection's
  other streams go on) after its header block is decoded, so the HPACK
  context stays in step with the peer. Refused streams draw on the
  rapid-reset bucket: a client that keeps opening past the limit gets
  GOAWAY ENHANCE_YOUR_CALM;
- header-list size and CONTINUATION floods: ``max_header_list_size`` is
  advertised and enforced by ``h2``'s HPACK decoder, which also caps a
  header block at 64 CONTINUATION frames of at most ``max_frame_size``
  each (so at most ~1 MiB of raw block is ever held);
- a DATA frame larger than the window: ``h2`` answers FLOW_CONTROL_ERROR;
- zero-window stalls: what waits for a window is bounded per stream (the
  window given back only as bytes leave) and per connection
  (``max_buffered``, ``stall_timeout``: the shell enforces both).
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h2.events as hev
from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy, StreamState
from hyperframe.frame import RstStreamFrame

from agent.policy.http import HttpError, NormalizedPath, normalize_path

__all__ = [
    "H2Limits",
    "H2Head",
    "ServerSide",
    "ClientSide",
    "Request",
    "ResponseHead",
    "Body",
    "End",
    "Trailers",
    "PeerReset",
    "Refused",
    "GoAway",
    "Broken",
    "PREFACE",
    "grpc_timeout",
    "is_grpc",
    "response_headers",
    "forward_headers",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class H2Limits:
    """Per-connection bounds (module docstring)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    """Decoded header bytes per request (RFC 9113 6.5.2 way of counting)."""
    stream_window: int = 256 * 1024
    """Initial window this side grants per stream (what a stream may hold in the proxy)."""
    connection_window: int = 4 * 1024 * 1024
    resets_burst: int = 200
    resets_per_s: float = 50.0
    """Streams the peer may reset: a burst, then this rate (rapid reset)."""
    settings_burst: int = 50
    settings_per_s: float = 5.0
    """SETTINGS frames the peer may send: a burst, then this rate."""
    max_buffered: int = 8 * 1024 * 1024
    """Bytes one connection may hold waiting for the peer's window (the shell
    closes it past that: GOAWAY ENHANCE_YOUR_CALM)."""
    stall_timeout: float = 30.0
    """Seconds bytes may wait for the peer's window without any going out
    (a zero-window stall; the shell closes the connection)."""


class _Bucket:
    __slots__ = ("burst", "rate", "level", "t")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self.level = float(burst)
        self.t: float | None = None

    def take(self, now: float) -> bool:
        """One token; False when the bucket is empty."""
        if self.t is not None:
            self.level = min(float(self.burst), self.level + (now - self.t) * self.rate)
        self.t = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class H2Head:
    """A request's head as policy and the shell see it (the fields the HTTP/1.1
    ``RequestHead`` has, so that authorization, metrics and logs take both)."""

    method: bytes
    target: bytes
    """``:path`` as received."""
    path: NormalizedPath
    scheme: bytes
    host: bytes | None
    """``:authority`` (else the ``host`` field)."""
    headers: Headers
    """Regular fields, lowercase names, as received."""
    grpc: bool
    """``content-type: application/grpc...``."""
    timeout: float | None = None
    """``grpc-timeout``, in seconds, when given and valid."""
    upgrade: None = None
    version: bytes = b"2"


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Request:
    stream_id: int
    head: H2Head
    end: bool
    """The request has no body (END_STREAM on its HEADERS; an :class:`End` follows too)."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    stream_id: int
    status: int
    headers: Headers
    end: bool
    """No body follows (a gRPC trailers-only response, a 204...; an :class:`End` follows too)."""


@dataclass(frozen=True, slots=True)
class Body:
    stream_id: int
    data: bytes
    credit: int
    """Flow-controlled bytes: give back with ``credit(stream_id, n)`` once forwarded."""
    end: bool = False
    """The frame ended the stream (an :class:`End` follows all the same)."""


@dataclass(frozen=True, slots=True)
class End:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Trailers:
    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class PeerReset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A malformed request. ``status`` None: the stream was reset (PROTOCOL_ERROR);
    else the shell answers ``status`` (the target could not be normalized)."""

    stream_id: int
    status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer will open no more streams; those above ``last_stream_id`` were not processed."""

    last_stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Broken:
    """A connection error: GOAWAY is queued; send it and close."""

    reason: str


# --------------------------------------------------------------------------
# Header rules

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# Not forwarded: connection-specific fields, and the ones the proxy sets itself.
_DROP_FORWARD = _CONNECTION_SPECIFIC | {b"host", b"http2-settings"}
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (1-8 digits and a unit, gRPC over HTTP/2) in seconds, or None."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def is_grpc(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for n, v in headers:
        if n == b"content-type":
            return v.startswith(b"application/grpc")
    return False


def _check_request(raw: Sequence[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], Headers] | str:
    """(pseudo fields, regular fields), or why the request is malformed."""
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for h in raw:
        n, v = h
        if n[:1] == b":":
            if regular:
                return f"pseudo-header {n.decode('latin-1')} after a regular field"
            if n not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {n.decode('latin-1', 'replace')}"
            if n in pseudo:
                return f"duplicate pseudo-header {n.decode('latin-1')}"
            pseudo[n] = v
            continue
        if not _TOKEN.match(n):
            return f"bad header name {n[:64]!r} (HTTP/2 names are lowercase tokens)"
        if n in _CONNECTION_SPECIFIC:
            return f"connection-specific header {n.decode('latin-1')} in HTTP/2"
        if n == b"te" and v.strip().lower() != b"trailers":
            return "te other than trailers in HTTP/2"
        if _BAD_VALUE.search(v):
            return f"bad value of header {n.decode('latin-1')}"
        regular.append(h)  # as decoded: a never-indexed field stays so (RFC 7541 7.1.3)
    for n, v in pseudo.items():
        if _BAD_VALUE.search(v) or (not v and n != b":authority"):
            return f"bad value of {n.decode('latin-1')}"
    m = pseudo.get(b":method")
    if m is None:
        return "missing :method"
    if m == b"CONNECT":
        return "CONNECT is not supported"
    if b":scheme" not in pseudo or b":path" not in pseudo:
        return "missing :scheme or :path"
    return pseudo, regular


def _head(sid: int, raw: Sequence[tuple[bytes, bytes]]) -> H2Head | Refused:
    got = _check_request(raw)
    if isinstance(got, str):
        return Refused(sid, None, got)
    pseudo, regular = got
    authority = pseudo.get(b":authority") or None
    host = None
    for n, v in regular:
        if n == b"host":
            if host is not None:
                return Refused(sid, None, "more than one host header")
            host = v
    if authority is not None and host is not None and host.lower() != authority.lower():
        return Refused(sid, None, "host differs from :authority")
    target = pseudo[b":path"]
    method = pseudo[b":method"]
    try:
        if target == b"*" and method == b"OPTIONS":
            path = NormalizedPath("*", None)
        else:
            path = normalize_path(target)
    except HttpError as e:
        return Refused(sid, e.status, e.reason)
    grpc = is_grpc(regular)
    timeout = None
    if grpc:
        for n, v in regular:
            if n == b"grpc-timeout":
                timeout = grpc_timeout(v)
    return H2Head(method, target, path, pseudo[b":scheme"], authority or host, regular, grpc, timeout)


def forward_headers(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> Headers:
    """Regular fields to send on (connection-specific ones and ``drop``
    removed), the same objects: a field the peer sent never-indexed is
    re-encoded never-indexed, as RFC 7541 7.1.3 asks of an intermediary."""
    return [h for h in headers if h[0] not in _DROP_FORWARD and h[0] not in drop]


def response_headers(status: int, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    return [(b":status", b"%d" % status), *forward_headers(headers)]


# --------------------------------------------------------------------------
# The two ends


#: Stream states in which the peer sends no more DATA: no window to give back.
_NO_MORE_DATA = frozenset({StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED})


class _Connection(H2Connection):
    """h2's connection, except that a GOAWAY received does not close this
    side: h2 refuses every frame after it (even in the same read), but RFC
    9113 6.8 lets the streams the peer already took finish. No new stream is
    opened on it (``ClientSide.capacity`` is 0 from then on)."""

    refused_streams = 0
    """Streams refused (REFUSED_STREAM) for exceeding the concurrent-stream limit."""

    def _receive_headers_frame(self, frame: Any) -> Any:
        """h2 makes a HEADERS past the concurrent-stream limit a connection
        error, which would end every stream of the connection.  RFC 9113
        5.1.2 lets a server refuse just that stream: decode the header block
        (the HPACK context is shared by the whole connection, so it must be
        decoded even when the request is thrown away), remember the stream as
        reset by us (later frames on it get h2's answers for a reset stream,
        DATA still counts towards the connection window) and answer
        RST_STREAM REFUSED_STREAM."""
        sid = frame.stream_id
        if (
            self.config.client_side
            or sid in self.streams
            or sid % 2 == 0
            or sid <= self.highest_inbound_stream_id
            or self.exact_open_streams(1) < self.local_settings.max_concurrent_streams
        ):
            return super()._receive_headers_frame(frame)
        _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        self.highest_inbound_stream_id = sid
        self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
        self.refused_streams += 1
        rst = RstStreamFrame(sid)
        rst.error_code = ErrorCodes.REFUSED_STREAM
        return [rst], events

    def _receive_goaway_frame(self, frame: Any) -> Any:
        got = super()._receive_goaway_frame(frame)
        if self.state_machine.state is ConnectionState.CLOSED:
            self.state_machine.state = ConnectionState.CLIENT_OPEN
        return got

    def _open_streams(self, remainder: int) -> int:
        """Open streams of one parity, as h2 counts them, only when it matters.

        h2 counts by walking every stream it still holds (and prunes the
        closed ones then) each time a stream is opened or received: with
        100 streams on an upstream connection that walk was the proxy's
        largest single cost per request.  Here no stream is ever pushed, so
        every stream a connection holds has a client's (odd) id, and the
        streams held bound the open ones from above; h2 only compares the
        count with the concurrent-stream limits, so below both limits that
        bound gives the same answers, and the exact walk runs only near them
        (which also keeps the held streams bounded by the limits)."""
        n = len(self.streams)
        if remainder == 1 and n < min(
            self.local_settings.max_concurrent_streams, self.remote_settings.max_concurrent_streams
        ):
            return n
        return super()._open_streams(remainder)

    def exact_open_streams(self, remainder: int) -> int:
        return super()._open_streams(remainder)


class _Side:
    """What both ends share: the h2 connection, buffered output, credits."""

    def __init__(self, client_side: bool, limits: H2Limits) -> None:
        self.limits = limits
        cfg = H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=False,  # checked here: stream errors, not connection errors
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = c = _Connection(cfg)
        # In force at once (what initiate_connection advertises); update() would
        # only queue them until the peer's ACK, and advertise the defaults.
        c.local_settings = Settings(
            client=client_side,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        c.decoder.max_header_list_size = limits.max_header_list_size
        # Headers out without Huffman coding (allowed, RFC 7541 5.2): pure-Python
        # Huffman encoding is a tenth of the proxy's time per request, for bytes
        # that only cross a loopback or the tunnel.
        c.encoder.encode = functools.partial(c.encoder.encode, huffman=False)  # type: ignore[method-assign]
        c.initiate_connection()
        extra = limits.connection_window - 65535
        if extra > 0:
            c.increment_flow_control_window(extra)
        self._pending: dict[int, collections.deque] = {}
        self._drained: list[Any] = []  # credits due to the other side
        self.buffered = 0
        self.closed = False
        self.goaway_received = False
        self.peer_settings = False  # the peer's first SETTINGS arrived
        self._conn_credit = 0
        self._refused_seen = 0  # self.h2.refused_streams already drawn on the reset bucket
        self._owed: dict[int, int] = {}  # stream credit not sent yet (credit())
        self._full = False  # ClientSide.capacity found no room; until a stream may have closed
        self._credit_at = max(1, limits.stream_window // 2)
        self._settings = _Bucket(limits.settings_burst, limits.settings_per_s)

    # ---- output

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def send_headers(self, sid: int, headers: Headers, end: bool = False) -> None:
        self._full = False
        if self.closed:
            return
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except (ProtocolError, StreamClosedError):
            self._forget(sid)

    def send_data(self, sid: int, data: bytes, end: bool = False, credit: Any = None) -> None:
        """Queue ``data`` (and END_STREAM) on ``sid``; ``credit`` is
        reported by ``drained()`` once all of ``data`` went out (the shell's
        token: what to give back to whom)."""
        self._full = False
        q = self._pending.get(sid)
        if q is None:
            q = self._pending[sid] = collections.deque()
        q.append([data, end, credit])
        self.buffered += len(data)
        self._flush(sid, q)

    def end_stream(self, sid: int) -> None:
        self.send_data(sid, b"", True)

    def send_trailers(self, sid: int, headers: Headers) -> None:
        q = self._pending.get(sid)
        if q:
            q.append([headers, None, None])  # after the buffered data
        else:
            self.send_headers(sid, headers, end=True)

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self._full = False
        self._forget(sid)
        if self.closed:
            return
        try:
            self.h2.reset_stream(sid, code)
        except (ProtocolError, StreamClosedError):
            pass

    def credit(self, sid: int, n: int) -> None:
        """Give ``n`` bytes of stream window back (they were forwarded).

        Not a WINDOW_UPDATE per DATA frame: the credit is kept until it
        reaches half the stream window (the peer still has the other half to
        send meanwhile, so it never waits on it), and none is sent for a
        stream the peer has ended (no DATA can follow)."""
        if n <= 0 or self.closed:
            return
        st = self.h2.streams.get(sid)
        if st is None or st.state_machine.state in _NO_MORE_DATA:
            self._owed.pop(sid, None)
            return
        owed = self._owed.pop(sid, 0) + n
        if owed < self._credit_at:
            self._owed[sid] = owed
            return
        try:
            self.h2.increment_flow_control_window(owed, stream_id=sid)
        except (ProtocolError, StreamClosedError, KeyError):
            pass

    def drained(self) -> list[Any]:
        """Credits whose data went out since the last call."""
        d = self._drained
        if d:
            self._drained = []
        return d

    def forget(self, sid: int) -> list[Any]:
        """Drop what is buffered for ``sid``; the credits it held (still due)."""
        return self._forget(sid)

    def pending(self, sid: int) -> int:
        q = self._pending.get(sid)
        return sum(len(e[0]) for e in q if e[1] is not None) if q else 0

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        if not self.closed:
            try:
                self.h2.close_connection(code)
            except ProtocolError:
                pass

    def _forget(self, sid: int) -> list[Any]:
        self._owed.pop(sid, None)
        q = self._pending.pop(sid, None)
        out: list[Any] = []
        if q:
            for data, end, credit in q:
                if end is not None:
                    self.buffered -= len(data)
                if credit is not None:
                    out.append(credit)
        return out

    def _flush(self, sid: int, q: collections.deque) -> None:
        h2 = self.h2
        while q:
            e = q[0]
            data, end, credit = e
            if end is None:  # trailers
                q.popleft()
                self.send_headers(sid, data, end=True)
                continue
            try:
                while data:
                    room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                    if room <= 0:
                        e[0] = data
                        return
                    piece = data[:room]
                    data = data[room:]
                    # END_STREAM on the last piece: one frame, not a DATA and an empty DATA
                    h2.send_data(sid, piece, end_stream=end and not data)
                    self.buffered -= len(piece)
                    if end and not data:
                        end = False
                if end:
                    h2.end_stream(sid)
            except (ProtocolError, StreamClosedError, KeyError):
                self._drained.extend(self._forget(sid))
                if credit is not None:
                    self._drained.append(credit)
                return
            q.popleft()
            if credit is not None:
                self._drained.append(credit)
        self._pending.pop(sid, None)

    def _flush_all(self) -> None:
        for sid in list(self._pending):
            q = self._pending.get(sid)
            if q:
                self._flush(sid, q)

    # ---- input

    def _feed(self, data: bytes, now: float) -> list:
        """h2's events for ``data``; a connection error gives [Broken]."""
        if self.closed:
            return []
        self._full = False
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.closed = True
            return [Broken(f"HTTP/2 protocol error: {e}")]
        refused = self.h2.refused_streams - self._refused_seen
        if refused:
            self._refused_seen += refused
            for _ in range(refused):
                if not self._on_reset(now):
                    return self._calm("too many streams opened past the concurrent-stream limit")
        out: list = []
        opened = False
        ev: Any
        for ev in events:
            t = type(ev)
            if t is hev.DataReceived:
                self._conn_credit += ev.flow_controlled_length
                if ev.data or ev.flow_controlled_length:
                    out.append(
                        Body(ev.stream_id, ev.data, ev.flow_controlled_length, ev.stream_ended is not None)
                    )
            elif t is hev.StreamEnded:
                self._owed.pop(ev.stream_id, None)
                out.append(End(ev.stream_id))
            elif t is hev.WindowUpdated or t is hev.RemoteSettingsChanged:
                opened = True
                if t is hev.RemoteSettingsChanged:
                    self.peer_settings = True
                    if not self._settings.take(now):
                        return self._calm("SETTINGS flood")
            elif t is hev.StreamReset:
                self._owed.pop(ev.stream_id, None)
                self._forget(ev.stream_id)
                out.append(PeerReset(ev.stream_id, int(ev.error_code)))
                if ev.remote_reset and not self._on_reset(now):
                    return self._calm("rapid reset: too many streams reset by the peer")
            elif t is hev.ConnectionTerminated:
                self.goaway_received = True
                out.append(GoAway(ev.last_stream_id or 0, int(ev.error_code)))
            else:
                out.extend(self._event(ev))
        if self._conn_credit:
            try:
                self.h2.increment_flow_control_window(self._conn_credit)
            except ProtocolError:
                pass
            self._conn_credit = 0
        if opened:
            self._flush_all()
        return out

    def _calm(self, why: str) -> list:
        self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self.closed = True
        return [Broken(why)]

    def _on_reset(self, now: float) -> bool:
        return True

    def _event(self, ev: object) -> list:
        return []


class ServerSide(_Side):
    """The downstream end (module docstring)."""

    def __init__(self, limits: H2Limits | None = None) -> None:
        super().__init__(False, limits or H2Limits())
        self._resets = _Bucket(self.limits.resets_burst, self.limits.resets_per_s)

    def feed(self, data: bytes, now: float) -> list:
        return self._feed(data, now)

    def respond(self, sid: int, status: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        self.send_headers(sid, response_headers(status, headers), end)

    def _on_reset(self, now: float) -> bool:
        return self._resets.take(now)

    def _event(self, ev: object) -> list:
        t = type(ev)
        if t is hev.RequestReceived:
            sid = ev.stream_id  # type: ignore[attr-defined]
            h = _head(sid, ev.headers)  # type: ignore[attr-defined]
            if isinstance(h, Refused):
                if h.status is None:
                    self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
                return [h]
            return [Request(sid, h, ev.stream_ended is not None)]  # type: ignore[attr-defined]
        if t is hev.TrailersReceived:
            sid = ev.stream_id  # type: ignore[attr-defined]
            hs = [(n, v) for n, v in ev.headers if n[:1] != b":"]  # type: ignore[attr-defined]
            return [Trailers(sid, hs)]
        return []


class ClientSide(_Side):
    """An upstream end (module docstring)."""

    def __init__(self, limits: H2Limits | None = None) -> None:
        super().__init__(True, limits or H2Limits())

    def feed(self, data: bytes, now: float) -> list:
        return self._feed(data, now)

    def open_stream(self, head: Headers, end: bool) -> int:
        """A new stream carrying ``head`` (pseudo fields first); its id."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, head, end_stream=end)
        return sid

    @property
    def capacity(self) -> int:
        """Streams this connection may still open."""
        if self.closed or self.goaway_received or self._full:
            return 0
        h = self.h2
        limit = h.remote_settings.max_concurrent_streams
        if not self.peer_settings:  # unlimited until its SETTINGS say otherwise: be modest
            limit = min(limit, 100)
        n = len(h.streams)  # bounds the open ones (_Connection._open_streams)
        if n < limit:
            return limit - n
        # The exact count walks every stream: once, until one may have closed
        # (a frame received or sent, a reset); a pool probes full connections often.
        room = limit - h.exact_open_streams(1)
        self._full = room <= 0
        return room

    @property
    def open_streams(self) -> int:
        return self.h2.exact_open_streams(1)

    def _event(self, ev: object) -> list:
        t = type(ev)
        if t is hev.ResponseReceived:
            sid = ev.stream_id  # type: ignore[attr-defined]
            status = 0
            hs: Headers = []
            for h in ev.headers:  # type: ignore[attr-defined]
                n, v = h
                if n == b":status":
                    status = int(v) if v.isdigit() and len(v) == 3 else 0
                elif n[:1] != b":":
                    hs.append(h)
            if not 200 <= status <= 599:
                self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
                return [PeerReset(sid, ErrorCodes.PROTOCOL_ERROR)]
            return [ResponseHead(sid, status, hs, ev.stream_ended is not None)]  # type: ignore[attr-defined]
        if t is hev.TrailersReceived:
            sid = ev.stream_id  # type: ignore[attr-defined]
            hs = [(n, v) for n, v in ev.headers if n[:1] != b":"]  # type: ignore[attr-defined]
            return [Trailers(sid, hs)]
        return []
