"""Socket glue of meshlet-mux/1 (``agent.proxy.mux``): one ``MuxSession``
per mutual-TLS connection, each stream an ``asyncio.Transport`` of its own
(``StreamTransport``) so the relay's ``Endpoint``, the tunnel header code
and the L7 sessions run over a stream exactly as over a TLS connection;
and the outbound side's pool of sessions (``MuxPool``).

Rules:
- A stream's transport never exposes the shared socket
  (``get_extra_info("socket")`` is None): resetting a stream (``abort``,
  the relay's RST) sends ``RST`` for that stream only, never an RST of
  the TCP connection under the other streams.
- Writes beyond the stream's window wait in the stream (its write buffer);
  the stream's protocol is paused above the high-water mark, or while the
  TLS connection itself is paused.  Reads: bytes are credited back to the
  peer only once delivered to the stream's protocol, so a paused reader
  stops its sender after one window, and only that stream.
- A stream ends for its protocol with ``connection_lost``: ``None`` after
  ``close()``/``abort()``, ``ConnectionResetError`` when the peer reset it,
  the connection failed or was lost.
- A session is drained (GOAWAY: no new streams, open ones finish, closed
  when the last one ends) when the worker stops, a certificate rotates, or
  it has been idle ``idle_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.proxy import mux
from agent.proxy.relay import Endpoint
from agent.proxy.tls import TlsConnection

__all__ = ["MuxSession", "StreamTransport", "MuxPool", "IDLE_TIMEOUT", "LEGACY_RETRY_S"]

log = logging.getLogger("meshlet.proxy")

IDLE_TIMEOUT = 60.0  # a pooled connection without streams this long is closed (client side)
LEGACY_RETRY_S = 30.0  # a node that answered meshlet-tunnel/1 is dialed the old way this long
#: A server's drain: the GOAWAY notice goes out with this PING; its ACK (the
#: peer has read the notice, and every OPEN it sent before arrived ahead of
#: the ACK) lets the GOAWAY naming the last stream follow.
DRAIN_PING = b"mldrain\0"
#: A peer that never answers the drain's PING (gone, wedged): the final
#: GOAWAY goes out this long after the notice anyway.
DRAIN_ACK_TIMEOUT_S = 10.0
_RAW_HIGH = 256 * 1024  # the TLS connection's write high-water mark


class StreamTransport(asyncio.Transport):
    """One stream of a ``MuxSession``, as its protocol sees it."""

    def __init__(self, session: MuxSession, sid: int, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._session = session
        self.sid = sid
        self._protocol = protocol
        self._pending: list[bytes | memoryview] = []  # written, not yet within the window
        self._pending_size = 0
        self._high = 256 * 1024
        self._low = 128 * 1024
        self._proto_paused = False
        self._read_paused = False
        self._rbuf: list[bytes | memoryview] = []  # received while reading was paused
        self._eof_pending = False  # write_eof() waits for pending bytes
        self._remote_eof = False  # the peer's FIN (delivered or queued behind _rbuf)
        self._eof_delivered = False
        self._local_done = False
        self._closing = False
        self._closed = False
        self._held: bytes | None = None  # a reply waiting for the stream's next write (hold())
        self._held_timer: asyncio.TimerHandle | None = None

    def hold(self, data: bytes, delay: float) -> None:
        """Send ``data`` (the tunnel's reply header) just ahead of this
        stream's next write, FIN or reset, or after ``delay`` seconds if none
        comes first.  The reply to a new stream and the pod's first answer
        then share one flush (one TLS record and send on this side, one
        read and decrypt on the peer's) instead of a send each (issue #13);
        the order on the wire is the same."""
        self._held = data
        self._held_timer = asyncio.get_running_loop().call_later(delay, self.release)

    def release(self) -> None:
        """Send the held reply now (nothing if none is held)."""
        data = self._take_held()
        if data is not None:
            self.write(data)

    def _take_held(self) -> bytes | None:
        data, self._held = self._held, None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        return data

    # ---- asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None  # the socket is shared: never hand it to a stream's code
        if name == "mux_stream":
            return self.sid
        if name == "mux_session":
            return self._session
        return self._session.extra(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def write(self, data: Any) -> None:
        if self._closing or self._closed or self._local_done or self._eof_pending or not data:
            return
        held = self._take_held()
        if held is not None:
            self._queue(held)  # the reply first, in the same flush
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
            data = bytes(data)  # held below (pending, or views in the frames): must not change
        self._queue(data)
        s = self._session
        if len(s.streams) > 1 or s._receiving:
            # at the end of the loop's callbacks: the writes of every stream
            # that got bytes in this iteration share TLS records and one send
            s.flush_soon()
        else:
            # the connection's only stream: no other stream's bytes to wait
            # for, so no extra pass of the loop on a request's way (c1 latency)
            s.flush()
        self.update_pause()

    def _queue(self, data: bytes | memoryview) -> None:
        """Frame ``data`` as far as the window allows; the rest waits in order."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            return
        n = self._session.core.send_data(self.sid, data)
        if n < len(data):
            rest = memoryview(data)[n:]  # a view: the rest is not copied
            self._pending.append(rest)
            self._pending_size += len(rest)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._local_done or self._eof_pending or self._closed:
            return
        if self._held is not None:
            self.release()
        if self._pending:
            self._eof_pending = True
            return
        self._send_fin()

    def _send_fin(self) -> None:
        self._local_done = True
        self._eof_pending = False
        self._session.core.send_fin(self.sid)
        self._session.flush()

    def close(self) -> None:
        """Graceful: pending bytes, then FIN; a stream the peer still sends
        on is then reset (like a TCP close with the peer still sending)."""
        if self._closing or self._closed:
            return
        if self._held is not None:
            self.release()
        self._closing = True
        if self._pending:
            self._eof_pending = True
            return  # finished by window_open()
        self._finish_close()

    def _finish_close(self) -> None:
        if not self._local_done:
            self._send_fin()
        if not self._remote_eof:
            self._session.core.reset_stream(self.sid, mux.ErrorCode.CANCEL, "closed")
            self._session.flush()
        self._lost(None)

    def abort(self) -> None:
        if self._closed:
            return
        if self._held is not None and not self._closing:
            self.release()  # the reply, then the reset: as if it had been sent at once
        self._session.core.reset_stream(self.sid, mux.ErrorCode.CANCEL, "reset")
        self._session.flush()
        self._lost(None)

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        asyncio.get_running_loop().call_soon(self._drain_reads)

    def is_reading(self) -> bool:
        return not self._read_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 256 * 1024 if high is None else high
        self._low = self._high // 2 if low is None else low
        self.update_pause()

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]  # asyncio's signature; ours is a Protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ---- from the session

    def update_pause(self) -> None:
        if self._closed:
            return
        if self._session.write_paused or self._pending_size > self._high:
            if not self._proto_paused:
                self._proto_paused = True
                self._protocol.pause_writing()
        elif self._proto_paused and self._pending_size <= self._low:
            self._proto_paused = False
            self._protocol.resume_writing()

    def window_open(self) -> None:
        """The peer credited bytes: send what waits."""
        core = self._session.core
        while self._pending:
            head = self._pending[0]
            n = core.send_data(self.sid, head)
            self._pending_size -= n
            if n < len(head):
                self._pending[0] = memoryview(head)[n:]  # a view of the same immutable bytes
                break
            self._pending.pop(0)
        self._session.flush()
        if not self._pending and self._eof_pending:
            if self._closing:
                self._finish_close()
                return
            self._send_fin()
        self.update_pause()

    def deliver(self, data: bytes | memoryview) -> None:
        if self._closed:
            return
        if self._read_paused or self._rbuf:
            if isinstance(data, memoryview) and len(data) * 4 < len(data.obj):  # type: ignore[arg-type]  # obj is the bytes of a TLS read (typeshed: Buffer)
                data = bytes(data)  # kept a while: a small view must not pin a whole TLS read
            self._rbuf.append(data)
            return
        self._give(data)
        self._session.credit(self.sid, len(data))

    def deliver_many(self, chunks: list[bytes | memoryview]) -> None:
        """Consecutive chunks of this stream from one read: a forwarding
        relay Endpoint takes them in one call (one writev to the pod)."""
        proto = self._protocol
        if (
            self._closed
            or self._read_paused
            or self._rbuf
            or type(proto) is not Endpoint
            or not proto.forwarding()
        ):
            for c in chunks:
                self.deliver(c)
            return
        proto.data_received_many(chunks)
        self._session.credit(self.sid, sum(map(len, chunks)))

    def _give(self, data: bytes | memoryview) -> None:
        proto = self._protocol
        if type(proto) is Endpoint:  # the relay forwards views (of immutable bytes) as they are
            proto.data_received(data)  # type: ignore[arg-type]  # asyncio's signature says bytes
        else:  # the tunnel header reader, L7 sessions: bytes
            proto.data_received(bytes(data))

    def remote_eof(self) -> None:
        self._remote_eof = True
        if not self._rbuf and not self._read_paused:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        if self._eof_delivered or self._closed:
            return
        self._eof_delivered = True
        if not self._protocol.eof_received():
            self.close()

    def _drain_reads(self) -> None:
        while self._rbuf and not self._read_paused and not self._closed:
            data = self._rbuf.pop(0)
            self._give(data)
            self._session.credit(self.sid, len(data))
        if not self._rbuf and self._remote_eof and not self._read_paused:
            self._deliver_eof()

    def reset_by_peer(self, exc: Exception) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._held = None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._pending.clear()
        self._pending_size = 0
        self._rbuf.clear()
        self._session.forget(self.sid)
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)


class MuxSession(asyncio.Protocol):
    """The application protocol of one meshlet-mux/1 TLS connection."""

    def __init__(
        self,
        tls: TlsConnection,
        *,
        client: bool,
        counters: dict[str, int],
        max_streams: int = mux.DEFAULT_MAX_STREAMS,
        idle_timeout: float = IDLE_TIMEOUT,
        on_stream: Callable[[MuxSession, StreamTransport, Endpoint], None] | None = None,
        on_closed: Callable[[MuxSession], None] | None = None,
        buffer_size: int = 256 * 1024,
    ) -> None:
        self.tls = tls
        self.core = mux.MuxConnection(client=client, max_streams=max_streams)
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.on_stream = on_stream
        self.on_closed = on_closed
        self.buffer_size = buffer_size
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamTransport] = {}
        self.write_paused = False
        self.closed = False
        self.draining = False
        self._final_goaway = False  # a drain's last GOAWAY sent (or not needed): close when empty
        self.opened_at = time.monotonic()
        self.streams_total = 0
        self.meta: dict[str, Any] = {}  # what the pool checks for freshness (serials, expiry)
        self._idle_handle: asyncio.TimerHandle | None = None
        self._receiving = False  # in data_received: credits wait for its one flush at the end
        self._last_active = time.monotonic()
        self._flush_pending = False  # a flush_soon() is scheduled
        self._drain_timer: asyncio.TimerHandle | None = None  # a drain notice's wait for its PING ACK
        self._drain_reason = ""

    # ---- attach: the TLS connection's plaintext side switches to this protocol

    def attach(self, ep: Endpoint) -> None:
        """Take over the TLS connection whose app protocol was ``ep`` (an
        ``Endpoint`` that may hold bytes received since the handshake)."""
        tr = ep.transport
        assert tr is not None
        self.transport = tr
        tr.set_protocol(self)
        tr.set_write_buffer_limits(high=_RAW_HIGH, low=_RAW_HIGH // 2)
        early = ep.take_buffered()
        if ep.lost:
            self.connection_lost(ep.lost_exc if isinstance(ep.lost_exc, Exception) else None)
            return
        if early:
            self.data_received(early)
        if ep.eof and not self.closed:
            self.eof_received()
        self._arm_idle()

    def extra(self, name: str, default: Any = None) -> Any:
        tr = self.transport
        return tr.get_extra_info(name, default) if tr is not None else default

    # ---- streams

    def can_open(self) -> bool:
        return not self.closed and not self.draining and self.core.can_open()

    def open_stream(self, first: bytes, protocol: Endpoint) -> StreamTransport:
        sid = self.core.open_stream(first)
        st = StreamTransport(self, sid, protocol)
        self.streams[sid] = st
        self.streams_total += 1
        self.counters["tunnel_streams_out"] = self.counters.get("tunnel_streams_out", 0) + 1
        self._touch()
        protocol.connection_made(st)
        self.flush_soon()  # the caller's first DATA (if any) rides in the same record
        return st

    def forget(self, sid: int) -> None:
        self.streams.pop(sid, None)
        if not self.streams:
            if self.draining and self._final_goaway:
                self.close()
            elif self.draining:
                pass  # a drain's notice: streams still on the wire are served; _drain_final closes
            else:
                self._arm_idle()

    def credit(self, sid: int, n: int) -> None:
        self.core.consumed(sid, n)
        if not self._receiving:  # within data_received: its flush sends the WINDOW_UPDATE with the rest
            # else a WINDOW_UPDATE (if one is due) joins the iteration's flush: flushing
            # here would also send other streams' queued writes early, on their own
            self.flush_soon()

    def flush_soon(self) -> None:
        """Flush at the end of this loop iteration's callbacks, unless a
        flush comes first: the OPEN of a new stream then shares its TLS
        record and write with the client bytes the caller forwards right
        after it (one record and one send per new connection, not two)."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        bufs = self.core.buffers_to_send()
        tr = self.transport
        if bufs and tr is not None and not tr.is_closing():
            tr.writelines(bufs)  # the TLS connection encrypts each buffer: no joined copy

    def drain(self, reason: str) -> None:
        """GOAWAY: no new streams here; close once the open ones end.

        A server drains in two steps: a notice (no new streams, but those
        already on the wire are served) with a PING, then, once the peer
        ACKs that PING, the GOAWAY naming the last stream, after which an
        empty connection closes.  The peer reads its input in order, so
        every OPEN it sent before it saw the notice is here before the ACK
        and is served.  Without the notice, an OPEN crossing the GOAWAY on
        the wire was refused and its pod connection reset; with the notice
        but a fixed delay (1 s) instead of the ACK, a peer too loaded to
        read the notice within the delay could still cross it (both seen
        in worker hand-overs under load).  ``DRAIN_ACK_TIMEOUT_S`` bounds
        the wait for a peer that never answers."""
        if self.closed or self.draining:
            return
        self.draining = True
        if not self.core.client and not self.core.closed:
            self.core.goaway_notice(reason)
            self.core.ping(DRAIN_PING)
            self.flush()
            self._drain_reason = reason
            self._drain_timer = asyncio.get_running_loop().call_later(
                DRAIN_ACK_TIMEOUT_S, self._drain_final, reason
            )
            return
        self._drain_final(reason)

    def _drain_final(self, reason: str) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.closed or self._final_goaway:
            return
        self._final_goaway = True
        self.core.goaway(mux.ErrorCode.NO_ERROR, reason)
        self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.draining = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.transport is not None:
            self.transport.close()
        self._fail_streams(ConnectionResetError("the tunnel connection was closed"))
        if self.on_closed is not None:
            self.on_closed(self)

    def _fail_streams(self, exc: Exception) -> None:
        for st in list(self.streams.values()):
            st.reset_by_peer(exc)
        self.streams.clear()

    # ---- idle expiry

    def _touch(self) -> None:
        self._last_active = time.monotonic()

    def _arm_idle(self) -> None:
        if self.closed or self.idle_timeout <= 0:
            return
        self._touch()
        if self._idle_handle is None:
            self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self.closed or self.streams:
            return
        left = self._last_active + self.idle_timeout - time.monotonic()
        if left > 0.01:
            self._idle_handle = asyncio.get_running_loop().call_later(left, self._idle_check)
            return
        self.counters["tunnel_idle_closed"] = self.counters.get("tunnel_idle_closed", 0) + 1
        self.drain("idle")

    # ---- asyncio.Protocol (the TLS connection's plaintext)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream protocol gets a Transport

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.core.receive(data)
        except mux.MuxError as e:
            self.counters["tunnel_mux_errors"] = self.counters.get("tunnel_mux_errors", 0) + 1
            log.warning(
                "closing tunnel connection with %s (node %s): meshlet-mux protocol error %s: %s "
                "(a peer of another release or a bug; its streams are reset)",
                _fmt(self.extra("peername")),
                self.tls.peer_node or self.tls.peer_label or "?",
                e.code.name,
                e,
            )
            self.flush()  # the GOAWAY naming the error
            self.close()
            return
        self._receiving = True
        try:
            i, n = 0, len(events)
            while i < n:
                ev = events[i]
                i += 1
                if not isinstance(ev, mux.DataReceived):
                    self._event(ev)
                    continue
                chunks = [ev.data]  # this stream's consecutive DATA in this read: delivered at once
                while i < n:
                    nxt = events[i]
                    if not isinstance(nxt, mux.DataReceived) or nxt.stream_id != ev.stream_id:
                        break
                    chunks.append(nxt.data)
                    i += 1
                self._data(ev.stream_id, chunks)
        finally:
            self._receiving = False
        self.flush()

    def _data(self, sid: int, chunks: list[bytes | memoryview]) -> None:
        st = self.streams.get(sid)
        if st is None:  # the stream's application is gone: keep the window moving
            self.core.consumed(sid, sum(map(len, chunks)))
        elif len(chunks) == 1:
            st.deliver(chunks[0])
        else:
            st.deliver_many(chunks)

    def _event(self, ev: mux.Event) -> None:
        if isinstance(ev, mux.WindowUpdated):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.window_open()
        elif isinstance(ev, mux.StreamOpened):
            self._opened(ev)
        elif isinstance(ev, mux.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.remote_eof()
        elif isinstance(ev, mux.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                code = ev.code.name if isinstance(ev.code, mux.ErrorCode) else str(ev.code)
                st.reset_by_peer(ConnectionResetError(f"stream reset by the peer ({code}): {ev.reason}"))
        elif isinstance(ev, mux.PingAcked):
            if ev.data == DRAIN_PING and self._drain_timer is not None:
                self._drain_final(self._drain_reason)  # the peer has read the notice
        elif isinstance(ev, mux.GoAwayReceived):
            self.draining = True
            self._final_goaway = True  # this side opens nothing more: close once the streams end
            for sid, st in list(self.streams.items()):
                if sid > ev.last_stream_id:
                    st.reset_by_peer(ConnectionResetError(f"refused: the peer is draining ({ev.reason})"))
            if not self.streams:
                self.close()

    def _opened(self, ev: mux.StreamOpened) -> None:
        ep = Endpoint("client", prebuffer_limit=self.buffer_size)
        st = StreamTransport(self, ev.stream_id, ep)
        self.streams[ev.stream_id] = st
        self.streams_total += 1
        self.counters["tunnel_streams_in"] = self.counters.get("tunnel_streams_in", 0) + 1
        self._touch()
        ep.connection_made(st)
        if ev.data:
            ep.data_received(ev.data)
        if self.on_stream is not None:
            self.on_stream(self, st, ep)

    def eof_received(self) -> bool:
        self._fail_streams(ConnectionResetError("the peer closed the tunnel connection"))
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_streams(
            ConnectionResetError(
                f"the tunnel connection was lost: {exc}" if exc else "the tunnel connection closed"
            )
        )
        if not self.closed:
            self.transport = None
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        for st in list(self.streams.values()):
            st.update_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self.streams.values()):
            st.update_pause()


def _fmt(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)


class MuxPool:
    """The outbound side's sessions: per (node, address, source identity,
    destination identity), the connections with room for another stream;
    one dial at a time per key (concurrent streams wait for it)."""

    def __init__(self) -> None:
        self.sessions: dict[tuple, list[MuxSession]] = {}
        self.dialing: dict[tuple, asyncio.Future[None]] = {}
        self.legacy: dict[
            tuple, float
        ] = {}  # (node, address) → monotonic time until which to dial the old way

    def pick(self, key: tuple, fresh: Callable[[MuxSession], str | None]) -> MuxSession | None:
        """A session of ``key`` that may open a stream; stale ones (``fresh``
        returns why) are drained on the way."""
        found = None
        for s in list(self.sessions.get(key, ())):
            if not s.can_open():
                continue
            why = fresh(s)
            if why is not None:
                s.drain(why)
                continue
            if found is None:
                found = s
        return found

    def add(self, key: tuple, s: MuxSession) -> None:
        self.sessions.setdefault(key, []).append(s)
        prev = s.on_closed

        def closed(sess: MuxSession) -> None:
            lst = self.sessions.get(key)
            if lst is not None and sess in lst:
                lst.remove(sess)
                if not lst:
                    del self.sessions[key]
            if prev is not None:
                prev(sess)

        s.on_closed = closed

    def is_legacy(self, peer: tuple) -> bool:
        until = self.legacy.get(peer)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self.legacy[peer]
            return False
        return True

    def mark_legacy(self, peer: tuple) -> None:
        self.legacy[peer] = time.monotonic() + LEGACY_RETRY_S

    def all(self) -> list[MuxSession]:
        return [s for lst in self.sessions.values() for s in lst]

    def drain_all(self, reason: str) -> None:
        for s in self.all():
            s.drain(reason)

    def stats(self) -> dict[str, int]:
        sessions = self.all()
        return {"connections": len(sessions), "streams": sum(len(s.streams) for s in sessions)}
