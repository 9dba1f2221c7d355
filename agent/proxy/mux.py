"""meshlet-mux/1: many tunnel streams over one mutual-TLS connection between
two node proxies.  Sans-IO and pure: bytes in, events out; calls in, bytes
to send out.  Nothing here touches sockets or TLS.

Rules of the wire format (everything that affects parsing lives here):

- A frame is ``LENGTH (3) | TYPE (1) | FLAGS (1) | STREAM (4)``, big endian,
  then LENGTH payload bytes.  LENGTH is at most ``MAX_FRAME`` (64 KiB);
  the top bit of STREAM is reserved and must be 0.
- Only the client (the outbound proxy, which dialed) opens streams, with
  ids that strictly increase; stream 0 is the connection itself.
- ``OPEN`` (stream > 0): a new stream; its payload is the stream's first
  bytes (the outbound proxy puts today's tunnel request header there, at
  most ``tunnel.MAX_HEADER``).  ``DATA``: stream bytes.  ``FIN``: this
  direction of the stream is finished (half-close; empty payload).
  ``RST``: the stream is dead both ways (``CODE (4) | reason``).
  ``WINDOW_UPDATE``: ``INCREMENT (4)`` more bytes the peer may send on the
  stream.  ``PING`` (stream 0): 8 opaque bytes, echoed with flag ``ACK``.
  ``GOAWAY`` (stream 0): ``LAST_STREAM (4) | CODE (4) | reason``: no
  stream above LAST_STREAM was or will be served; open streams finish.
- Flow control is per stream: each side may have at most ``INITIAL_WINDOW``
  unacknowledged bytes in flight per stream; the receiver credits bytes
  back (``WINDOW_UPDATE``) as its application consumes them.  A receiver
  may grant more than it consumed (ours does once a stream has moved a
  whole initial window: a bulk stream gets up to ``BULK_WINDOW``, so a
  sender is not stalled a round trip per 256 KiB, while the windows grown
  on one connection stay within ``BULK_BUDGET`` together); a sender only
  ever counts the credit it was given, so peers of either kind
  interoperate.  So a stream
  whose destination is slow stops its sender alone, and the connection
  keeps carrying the other streams (no connection-level window: the
  receiver never stops reading the connection, and it holds at most
  ``max_streams * INITIAL_WINDOW + BULK_BUDGET`` bytes).
- A server admits at most ``max_streams`` open streams; an OPEN over that
  (or above a GOAWAY it sent) is answered ``RST REFUSED`` (the client then
  uses another connection).
- Anything malformed is a connection error (``MuxError``, fail closed):
  an unknown frame type, an oversize frame, a frame on a stream id that was
  never opened, stream frames on stream 0 or connection frames on a
  stream, OPEN from the server or with a non-increasing id, DATA after FIN,
  DATA beyond the window, a zero or overflowing window increment, a bad
  payload size.  Frames for a stream that was opened and is closed since
  (a reset crossing a frame on the wire) are ignored.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "ALPN",
    "MAX_FRAME",
    "INITIAL_WINDOW",
    "DEFAULT_MAX_STREAMS",
    "FrameType",
    "ErrorCode",
    "MuxError",
    "Event",
    "StreamOpened",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
    "PingAcked",
    "GoAwayReceived",
    "MuxConnection",
]

ALPN = "meshlet-mux/1"
MAX_FRAME = 64 * 1024
INITIAL_WINDOW = 256 * 1024  # the window every stream starts with (fixed by the protocol)
BULK_WINDOW = 4 * 1024 * 1024  # the receive window we grant a stream that moved a whole initial window
BULK_BUDGET = 16 * 1024 * 1024  # at most this much grown window (beyond INITIAL_WINDOW) per connection
DEFAULT_MAX_STREAMS = 100
MAX_OPEN_PAYLOAD = 4096  # tunnel.MAX_HEADER: the first bytes a stream carries are its header
MAX_REASON = 256
_MAX_WINDOW = 2**31 - 1
_MAX_STREAM_ID = 2**31 - 1

_HEADER = struct.Struct("!BHBBI")  # length split as (hi byte, lo 16 bits), type, flags, stream
HEADER_SIZE = _HEADER.size  # 9
_U32 = struct.Struct("!I")
_U32x2 = struct.Struct("!II")

FLAG_ACK = 0x1


class FrameType(enum.IntEnum):
    DATA = 0
    OPEN = 1
    FIN = 2
    RST = 3
    WINDOW_UPDATE = 4
    PING = 5
    GOAWAY = 6


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0
    PROTOCOL = 1  # malformed or out-of-order frame
    FLOW_CONTROL = 2  # DATA beyond the window, window overflow
    FRAME_SIZE = 3
    REFUSED = 4  # stream not served (limit, draining): the client may retry elsewhere
    CANCEL = 5  # the stream's application aborted it
    INTERNAL = 6


class MuxError(Exception):
    """A connection error: the whole connection must be closed (after the
    GOAWAY the connection has queued, if any)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    data: bytes  # the stream's first bytes (the tunnel request header)


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    # A view of received immutable bytes (keep it, or copy the part to keep); the
    # application must call ``consumed(stream_id, len(data))`` once it took them.
    data: memoryview | bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: int  # the peer finished its direction (FIN)


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: ErrorCode | int
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    stream_id: int  # more may be sent on it now


@dataclass(frozen=True, slots=True)
class PingAcked:
    data: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    code: ErrorCode | int
    reason: str


Event = StreamOpened | DataReceived | StreamEnded | StreamReset | WindowUpdated | PingAcked | GoAwayReceived


def _code(raw: int) -> ErrorCode | int:
    try:
        return ErrorCode(raw)
    except ValueError:
        return raw  # a newer peer's code: still an error


def _reason(raw: bytes) -> str:
    return raw[:MAX_REASON].decode("utf-8", "replace")


def _reason_bytes(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One encoded frame (also used by tests to write malformed ones)."""
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


# ------------------------------------------------------------------ the state machine


class _Stream:
    __slots__ = (
        "sid",
        "send_window",
        "recv_window",
        "window",
        "taken",
        "unacked",
        "local_done",
        "remote_done",
    )

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.send_window = INITIAL_WINDOW  # bytes we may still send
        self.recv_window = INITIAL_WINDOW  # bytes the peer may still send
        self.window = INITIAL_WINDOW  # the receive window granted (grows once, for bulk)
        self.taken = 0  # bytes the application consumed until the window grew (-1 after)
        self.unacked = 0  # consumed by the application, not yet credited back
        self.local_done = False  # we sent FIN
        self.remote_done = False  # we received FIN


class MuxConnection:
    """One side of a meshlet-mux/1 connection.

    ``receive(data)`` returns events (or raises MuxError); the other calls
    queue frames; ``data_to_send()`` takes the bytes to write."""

    def __init__(
        self,
        *,
        client: bool,
        max_streams: int = DEFAULT_MAX_STREAMS,
        bulk_window: int = BULK_WINDOW,
        bulk_budget: int = BULK_BUDGET,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not INITIAL_WINDOW <= bulk_window <= _MAX_WINDOW:
            raise ValueError(f"bulk_window must be between {INITIAL_WINDOW} and {_MAX_WINDOW}")
        if bulk_budget < 0:
            raise ValueError("bulk_budget must not be negative")
        self.client = client
        self.max_streams = max_streams
        self.bulk_window = bulk_window
        self.bulk_budget = bulk_budget
        self.granted = 0  # grown window (beyond INITIAL_WINDOW) held by open streams
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0  # highest id opened (by us if client, by the peer if server)
        self.goaway_sent: int | None = None  # the LAST_STREAM we announced
        self.goaway_received: int | None = None
        self.notice_sent = False  # goaway_notice(): a drain's first GOAWAY (LAST_STREAM = max)
        self.closed = False  # after a connection error
        self.refused = 0  # OPENs answered RST REFUSED (server)
        self._buf = bytearray()  # a frame header or control frame cut short by the last read
        self._data_left = 0  # bytes of the current DATA frame's payload still to come
        self._data_sid = 0  # ... on this stream
        self._out: list[bytes | memoryview] = []

    # ---- output

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = bytes(self._out[0]) if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """The same bytes as ``data_to_send()``, as the queued buffers in
        order (frame headers, views of DATA payloads), not joined: a writer
        that can take them one by one (the TLS connection's ``writelines``)
        saves a copy of every byte."""
        out = self._out
        self._out = []
        return out

    # ---- streams (client opens)

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    def can_open(self) -> bool:
        return (
            self.client
            and not self.closed
            and self.goaway_received is None
            and self.goaway_sent is None
            and len(self.streams) < self.max_streams
            and self.last_stream_id < _MAX_STREAM_ID
        )

    def open_stream(self, first: bytes = b"") -> int:
        """Open a stream whose first bytes are ``first`` (the tunnel header). Returns its id."""
        if not self.can_open():
            raise MuxError(ErrorCode.INTERNAL, "no new stream may be opened on this connection")
        if len(first) > MAX_OPEN_PAYLOAD:
            raise MuxError(ErrorCode.INTERNAL, f"OPEN payload too large ({len(first)} bytes)")
        sid = self.last_stream_id + 1
        self.last_stream_id = sid
        self.streams[sid] = _Stream(sid)
        self._out.append(frame(FrameType.OPEN, 0, sid, first))
        return sid

    def send_window(self, sid: int) -> int:
        s = self.streams.get(sid)
        return s.send_window if s is not None and not s.local_done else 0

    def send_data(self, sid: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the stream's window allows; returns
        how many bytes were taken (the caller keeps the rest until a
        ``WindowUpdated``)."""
        s = self.streams.get(sid)
        if s is None or s.local_done or self.closed:
            return 0
        n = min(len(data), s.send_window)
        if n <= 0:
            return 0
        s.send_window -= n
        view = memoryview(data)
        # Output holds views, not copies, of immutable bytes (data_to_send
        # joins them into one buffer: one copy per byte, not two); a
        # mutable buffer the caller may reuse is copied.
        keep = view if isinstance(view.obj, bytes) else None
        out = self._out
        for off in range(0, n, MAX_FRAME):
            chunk = view[off : min(n, off + MAX_FRAME)]
            k = len(chunk)
            out.append(_HEADER.pack(k >> 16, k & 0xFFFF, FrameType.DATA, 0, sid))
            out.append(chunk if keep is not None else bytes(chunk))
        return n

    def send_fin(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None or s.local_done or self.closed:
            return
        s.local_done = True
        self._out.append(frame(FrameType.FIN, 0, sid))
        self._maybe_forget(s)

    def reset_stream(self, sid: int, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        s = self._drop(sid)
        if s is None or self.closed:
            return
        self._out.append(frame(FrameType.RST, 0, sid, _U32.pack(int(code)) + _reason_bytes(reason)))

    def consumed(self, sid: int, n: int) -> None:
        """The application took ``n`` bytes of the stream: credit them back
        (batched, half the window at a time: each update costs the sender a
        wake-up, a read and a TLS record).  A stream that has
        moved a whole initial window is bulk: its window grows to
        ``bulk_window`` (once, as far as the connection's ``bulk_budget``
        allows), so its sender is credited ahead, in larger steps."""
        s = self.streams.get(sid)
        if s is None or s.remote_done or n <= 0:
            return
        s.unacked += n
        inc = 0
        if s.taken >= 0:  # not yet bulk
            s.taken += n
            if s.taken >= INITIAL_WINDOW:  # it moved a whole initial window: grow it, within the budget
                s.taken = -1
                inc = max(0, min(self.bulk_window - INITIAL_WINDOW, self.bulk_budget - self.granted))
                self.granted += inc
                s.window += inc
        if s.unacked >= s.window // 2:
            inc += s.unacked
            s.unacked = 0
        if inc:
            s.recv_window += inc
            self._out.append(frame(FrameType.WINDOW_UPDATE, 0, sid, _U32.pack(inc)))

    def ping(self, data: bytes = b"\0" * 8) -> None:
        if len(data) != 8:
            raise ValueError("a PING carries 8 bytes")
        self._out.append(frame(FrameType.PING, 0, 0, data))

    def goaway_notice(self, reason: str = "") -> None:
        """The first half of a graceful drain (server): GOAWAY with the
        highest possible LAST_STREAM, so the peer opens nothing new here,
        while OPENs already on the wire are still served.  ``goaway()`` a
        round trip later names the real last stream (as HTTP/2 servers do,
        RFC 9113 6.8): a stream is then refused only if the peer opened it
        after it had the notice, which it does not."""
        if self.closed or self.goaway_sent is not None or self.notice_sent:
            return
        self.notice_sent = True
        self._out.append(
            frame(
                FrameType.GOAWAY,
                0,
                0,
                _U32x2.pack(_MAX_STREAM_ID, int(ErrorCode.NO_ERROR)) + _reason_bytes(reason),
            )
        )

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """No new streams on this connection; open ones finish.  (Server: no
        stream above the last one seen will be served.)"""
        if self.closed or self.goaway_sent is not None:
            return
        last = self.last_stream_id
        self.goaway_sent = last
        self._out.append(frame(FrameType.GOAWAY, 0, 0, _U32x2.pack(last, int(code)) + _reason_bytes(reason)))

    def _drop(self, sid: int) -> _Stream | None:
        s = self.streams.pop(sid, None)
        if s is not None:
            self.granted -= s.window - INITIAL_WINDOW  # its grown window goes back to the budget
        return s

    def _maybe_forget(self, s: _Stream) -> None:
        if s.local_done and s.remote_done:
            self._drop(s.sid)

    # ---- input

    def _error(self, code: ErrorCode, message: str) -> MuxError:
        """Fail the connection: queue a GOAWAY naming the error, refuse all input after."""
        if not self.closed:
            self.goaway_sent = self.last_stream_id
            self._out.append(
                frame(
                    FrameType.GOAWAY,
                    0,
                    0,
                    _U32x2.pack(self.last_stream_id, int(code)) + _reason_bytes(message),
                )
            )
            self.closed = True
        return MuxError(code, message)

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; return what happened.  Raises MuxError
        (the connection is dead: send ``data_to_send()``, then close).

        DATA payloads are not copied: a ``DataReceived`` holds a view of
        ``data`` (of a private copy if ``data`` is mutable), delivered as
        soon as its bytes are here, so a frame split across reads arrives as
        more than one ``DataReceived``.  Only a split frame header or a
        split control frame is carried over (copied) to the next call."""
        if self.closed:
            raise MuxError(ErrorCode.PROTOCOL, "connection already failed")
        if not isinstance(data, bytes):
            data = bytes(data)  # payload views must not change under the application
        events: list[Event] = []
        view = memoryview(data)
        end = len(data)
        off = 0
        if self._data_left:  # the rest of a DATA frame whose header came earlier
            off = min(self._data_left, end)
            self._data_left -= off
            self._deliver(self._data_sid, view[:off], events)
        if self._buf and off < end:
            off = self._carried(view, off, events)
        while end - off >= HEADER_SIZE:
            hi, lo, ftype, flags, sid = _HEADER.unpack_from(data, off)
            length = (hi << 16) | lo
            if length > MAX_FRAME:
                raise self._error(ErrorCode.FRAME_SIZE, f"frame of {length} bytes (limit {MAX_FRAME})")
            start = off + HEADER_SIZE
            if ftype == FrameType.DATA:
                self._data_frame(sid, length)
                off = min(end, start + length)
                self._data_left = start + length - off
                self._data_sid = sid
                self._deliver(sid, view[start:off], events)
                continue
            if end - start < length:
                break
            off = start + length
            self._frame(ftype, flags, sid, view[start:off], events)
        if off < end:
            self._buf += view[off:]  # less than a header, or a control frame cut short
        return events

    def _carried(self, view: memoryview, off: int, events: list[Event]) -> int:
        """Complete the frame begun in ``_buf`` from ``view[off:]``; returns
        the new offset."""
        buf, end = self._buf, len(view)
        if len(buf) < HEADER_SIZE:
            k = min(HEADER_SIZE - len(buf), end - off)
            buf += view[off : off + k]
            off += k
            if len(buf) < HEADER_SIZE:
                return off
        hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf)
        length = (hi << 16) | lo
        if length > MAX_FRAME:
            raise self._error(ErrorCode.FRAME_SIZE, f"frame of {length} bytes (limit {MAX_FRAME})")
        if ftype == FrameType.DATA:
            self._buf = bytearray()
            self._data_frame(sid, length)
            k = min(length, end - off)
            self._data_left = length - k
            self._data_sid = sid
            self._deliver(sid, view[off : off + k], events)
            return off + k
        k = min(HEADER_SIZE + length - len(buf), end - off)
        buf += view[off : off + k]
        off += k
        if len(buf) == HEADER_SIZE + length:
            self._buf = bytearray()
            self._frame(ftype, flags, sid, memoryview(bytes(buf))[HEADER_SIZE:], events)
        return off

    def _data_frame(self, sid: int, n: int) -> None:
        """Check a DATA header (the whole frame counts against the window at once)."""
        if sid > _MAX_STREAM_ID:
            raise self._error(ErrorCode.PROTOCOL, "reserved bit set in a stream id")
        s = self._stream_for(sid, "DATA")
        if s is None:
            return  # a stream closed since: its bytes are dropped
        if s.remote_done:
            raise self._error(ErrorCode.PROTOCOL, f"DATA on stream {sid} after its FIN")
        if n > s.recv_window:
            raise self._error(
                ErrorCode.FLOW_CONTROL,
                f"DATA of {n} bytes on stream {sid} beyond its window ({s.recv_window} bytes left)",
            )
        s.recv_window -= n

    def _deliver(self, sid: int, payload: memoryview, events: list[Event]) -> None:
        if len(payload) and sid in self.streams:
            events.append(DataReceived(sid, payload))

    def _frame(self, ftype: int, flags: int, sid: int, payload: memoryview, events: list[Event]) -> None:
        if sid > _MAX_STREAM_ID:
            raise self._error(ErrorCode.PROTOCOL, "reserved bit set in a stream id")
        if ftype == FrameType.OPEN:
            self._open(sid, payload, events)
        elif ftype == FrameType.FIN:
            if len(payload):
                raise self._error(ErrorCode.FRAME_SIZE, "FIN with a payload")
            s = self._stream_for(sid, "FIN")
            if s is None:
                return
            if s.remote_done:
                raise self._error(ErrorCode.PROTOCOL, f"second FIN on stream {sid}")
            s.remote_done = True
            events.append(StreamEnded(sid))
            self._maybe_forget(s)
        elif ftype == FrameType.RST:
            if len(payload) < 4:
                raise self._error(ErrorCode.FRAME_SIZE, "RST shorter than its code")
            s = self._stream_for(sid, "RST")
            if s is None:
                return
            self._drop(sid)
            (code,) = _U32.unpack_from(payload)
            events.append(StreamReset(sid, _code(code), _reason(payload[4:].tobytes())))
        elif ftype == FrameType.WINDOW_UPDATE:
            if len(payload) != 4:
                raise self._error(ErrorCode.FRAME_SIZE, "WINDOW_UPDATE payload is not 4 bytes")
            (inc,) = _U32.unpack_from(payload)
            if inc == 0:
                raise self._error(ErrorCode.PROTOCOL, f"WINDOW_UPDATE of 0 on stream {sid}")
            s = self._stream_for(sid, "WINDOW_UPDATE")
            if s is None:
                return
            if s.send_window + inc > _MAX_WINDOW:
                raise self._error(ErrorCode.FLOW_CONTROL, f"window of stream {sid} overflows")
            s.send_window += inc
            if not s.local_done:
                events.append(WindowUpdated(sid))
        elif ftype == FrameType.PING:
            if sid != 0:
                raise self._error(ErrorCode.PROTOCOL, "PING on a stream")
            if len(payload) != 8:
                raise self._error(ErrorCode.FRAME_SIZE, "PING payload is not 8 bytes")
            if flags & FLAG_ACK:
                events.append(PingAcked(payload.tobytes()))
            else:
                self._out.append(frame(FrameType.PING, FLAG_ACK, 0, payload.tobytes()))
        elif ftype == FrameType.GOAWAY:
            if sid != 0:
                raise self._error(ErrorCode.PROTOCOL, "GOAWAY on a stream")
            if len(payload) < 8:
                raise self._error(ErrorCode.FRAME_SIZE, "GOAWAY shorter than 8 bytes")
            last, code = _U32x2.unpack_from(payload)
            if self.goaway_received is not None and last > self.goaway_received:
                raise self._error(ErrorCode.PROTOCOL, "GOAWAY raised its last stream id")
            self.goaway_received = last
            events.append(GoAwayReceived(last, _code(code), _reason(payload[8:].tobytes())))
        else:
            raise self._error(ErrorCode.PROTOCOL, f"unknown frame type {ftype}")

    def _stream_for(self, sid: int, what: str) -> _Stream | None:
        """The open stream ``sid``; None for one that was open and is closed
        now (the frame crossed a reset); a connection error otherwise."""
        if sid == 0:
            raise self._error(ErrorCode.PROTOCOL, f"{what} on stream 0")
        s = self.streams.get(sid)
        if s is None and sid > self.last_stream_id:
            raise self._error(ErrorCode.PROTOCOL, f"{what} on stream {sid}, which was never opened")
        return s

    def _open(self, sid: int, payload: memoryview, events: list[Event]) -> None:
        if self.client:
            raise self._error(ErrorCode.PROTOCOL, "the server may not open streams")
        if sid == 0 or sid <= self.last_stream_id:
            raise self._error(
                ErrorCode.PROTOCOL,
                f"OPEN of stream {sid} after stream {self.last_stream_id} (ids must increase)",
            )
        if len(payload) > MAX_OPEN_PAYLOAD:
            raise self._error(ErrorCode.FRAME_SIZE, f"OPEN payload of {len(payload)} bytes")
        self.last_stream_id = sid
        if self.goaway_sent is not None or len(self.streams) >= self.max_streams:
            self.refused += 1
            why = (
                "draining (GOAWAY sent)"
                if self.goaway_sent is not None
                else (f"{self.max_streams} streams already open")
            )
            self._out.append(frame(FrameType.RST, 0, sid, _U32.pack(ErrorCode.REFUSED) + why.encode()))
            return
        self.streams[sid] = _Stream(sid)
        events.append(StreamOpened(sid, payload.tobytes()))
