"""Full-duplex byte relay between two asyncio transports, built on Protocols.

No StreamReader, no per-byte Python work: ``data_received`` hands each chunk
the loop read (uvloop reads up to 256 KiB at a time) straight to the other
transport's ``write``. Rules:

- Before forwarding starts, an ``Endpoint`` collects incoming bytes so the
  server can read a tunnel header or response with ``receive()`` and push
  back what follows with ``unread()``; those bytes are forwarded first.
  The pre-buffer is bounded (reading pauses at ``prebuffer_limit``).
- Backpressure: each transport's write high-water mark is ``buffer_size``.
  When the destination transport pauses writing, the source pauses reading;
  it resumes on ``resume_writing``. So the relay holds at most about
  ``buffer_size`` + one read per direction.
- Half-close: EOF from one side → ``write_eof()`` on the other; the other
  direction keeps flowing. Both directions at EOF → both closed gracefully.
- Errors: a side lost with an error (RST, EPIPE...) → the other side is
  aborted with RST (``SO_LINGER`` (1, 0) then close), so failures propagate
  as failures, never as clean closes.
- ``Relay.done`` resolves once both sides are closed, with byte counts and
  the reason the relay ended.
- Spliced (``agent.proxy.splice``, same-node plaintext): once in step, the
  pods' bytes go straight out of the far socket in the kernel; the relay
  tells the splice after each forwarded chunk (it re-arms), still sees EOF
  and errors, disarms before an abort, and counts the kernel's bytes in its
  results.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.proxy.splice import Spliced

__all__ = ["Endpoint", "Relay", "RelayResult", "reset_transport", "set_nodelay"]

_LINGER_RST = struct.pack("ii", 1, 0)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a transport's TCP socket.  uvloop (the proxy's loop)
    already sets it on every TCP transport it makes, accepted or connected:
    nothing to do then (this cost ~8 us per connection: a getsockopt for the
    socket's family and a setsockopt; issue #13).  Other loops: set it."""
    if type(transport).__module__ == "uvloop.loop" and type(transport).__name__ == "TCPTransport":
        return
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def reset_transport(transport: asyncio.WriteTransport | None) -> None:
    """Close with RST: SO_LINGER (on, 0 s), then abort. Safe to call twice."""
    if transport is None:
        return
    # Only while the handle is surely open: a closed transport's fd number may
    # already belong to another socket.
    sock = None if transport.is_closing() else transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


class Endpoint(asyncio.Protocol):
    """One socket of a relayed connection."""

    def __init__(
        self,
        name: str = "",
        *,
        prebuffer_limit: int = 256 * 1024,
        on_made: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0  # bytes received here and forwarded to the peer
        self.pauses = 0  # times reading was paused because the peer was full
        self._on_made = on_made
        self._limit = prebuffer_limit
        self._relay: Relay | None = None
        self._peer: Endpoint | None = None  # where incoming bytes go, once forwarding
        self._source: Endpoint | None = None  # who forwards into this endpoint
        self._buf = bytearray()
        self._prebuffer_paused = False
        self._write_paused = False
        self._writable = False  # False after write_eof/close/abort/loss
        self.eof = False  # EOF received
        self.lost = False
        self.lost_exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream protocol gets a Transport
        self._writable = True
        set_nodelay(transport)
        if self._on_made is not None:
            self._on_made(self)

    def forwarding(self) -> bool:
        return self._peer is not None

    def data_received_many(self, chunks: list[bytes | memoryview]) -> None:
        """Several chunks at once (a tunnel stream's share of one TLS read),
        while forwarding: one ``writelines`` to the peer, so one ``writev``
        instead of a ``write`` each."""
        peer = self._peer
        if peer is None:
            raise RuntimeError("data_received_many before forwarding started")
        self.bytes_in += sum(map(len, chunks))
        if peer._writable and not peer.transport.is_closing():  # type: ignore[union-attr]  # set in connection_made
            peer.transport.writelines(chunks)  # type: ignore[union-attr]  # set in connection_made

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer is not None:
            self.bytes_in += len(data)
            if peer._writable and not peer.transport.is_closing():  # type: ignore[union-attr]  # set in connection_made
                peer.transport.write(data)  # type: ignore[union-attr]  # set in connection_made
            relay = self._relay
            if relay is not None and relay.splice is not None:
                relay.splice.relayed(self)  # the kernel may take over from here
            return
        self._buf += data
        if len(self._buf) >= self._limit and not self._prebuffer_paused:
            self._prebuffer_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]  # set in connection_made
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._peer is not None and self._relay is not None:
            self._relay._on_eof(self)
        else:
            self._wake()
        return True  # keep the other direction open

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self._writable = False
        self._wake()
        if self._relay is not None:
            self._relay._on_lost(self, exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        src = self._source
        if src is not None and not src.lost and src.transport is not None:
            src.pauses += 1
            src.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        src = self._source
        if src is not None and not src.lost and src.transport is not None:
            src.transport.resume_reading()

    # ---- before forwarding: read headers

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def receive(self) -> bytes:
        """Bytes received so far (waits for some); b"" at EOF.

        Raises ConnectionError if the connection was lost with an error.
        Only valid before forwarding starts.
        """
        while not self._buf and not self.eof and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._buf:
            return self.take_buffered()
        if self.lost and self.lost_exc is not None:
            if isinstance(self.lost_exc, ConnectionError):
                raise self.lost_exc
            raise ConnectionResetError(str(self.lost_exc))
        return b""

    def take_buffered(self) -> bytes:
        """Bytes received but not read yet, removed (before the transport is
        handed to another protocol, which must see them first)."""
        data = bytes(self._buf)
        self._buf.clear()
        if self._prebuffer_paused and self._peer is None:
            self._prebuffer_paused = False
            if not self.lost:
                self.transport.resume_reading()  # type: ignore[union-attr]  # set in connection_made
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front: they are forwarded first."""
        if data:
            self._buf[:0] = data

    def can_write(self) -> bool:
        return self._writable and not self.transport.is_closing()  # type: ignore[union-attr]  # set in connection_made

    def write(self, data: bytes) -> None:
        if self.can_write():
            self.transport.write(data)  # type: ignore[union-attr]  # set in connection_made

    def write_eof(self) -> None:
        """Half-close our sending side (after buffered bytes are sent)."""
        if self.can_write():
            self.transport.write_eof()  # type: ignore[union-attr]  # set in connection_made
        self._writable = False

    def reset(self) -> None:
        self._writable = False
        if not self.lost:
            reset_transport(self.transport)

    def close(self) -> None:
        self._writable = False
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class RelayResult:
    a_to_b: int  # bytes forwarded from a to b
    b_to_a: int
    reason: str  # "eof" (both sides finished), "reset by <name>: ...", "aborted: ..."
    error: bool  # True if the relay ended with a reset/abort


class Relay:
    """Couples two endpoints. Call ``start()`` (or ``forward()`` per side)."""

    def __init__(self, a: Endpoint, b: Endpoint, *, buffer_size: int = 256 * 1024) -> None:
        self.a = a
        self.b = b
        self.buffer_size = buffer_size
        self.done: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()
        self._reason: str | None = None
        self._error = False
        self.splice: Spliced | None = None  # set by Splicer.splice: the pods may send past the proxy
        a._relay = self
        b._relay = self
        for ep in (a, b):
            if not ep.lost and ep.transport is not None and not ep.transport.is_closing():
                ep.transport.set_write_buffer_limits(high=buffer_size, low=buffer_size // 2)
        for ep in (a, b):
            if ep.lost:
                self._on_lost(ep, ep.lost_exc)

    def _other(self, ep: Endpoint) -> Endpoint:
        return self.b if ep is self.a else self.a

    def start(self) -> None:
        self.forward(self.a)
        self.forward(self.b)

    def forward(self, src: Endpoint) -> None:
        """Start forwarding src's bytes (buffered ones first) to the other side."""
        dst = self._other(src)
        src._peer = dst
        dst._source = src
        if src._buf:
            data = bytes(src._buf)
            src._buf.clear()
            src.bytes_in += len(data)
            dst.write(data)
        if not src.lost and src.transport is not None:
            src._prebuffer_paused = False
            if dst._write_paused:
                src.pauses += 1
                src.transport.pause_reading()
            else:
                src.transport.resume_reading()
        if src.eof:
            self._on_eof(src)

    def forwarded(self) -> tuple[int, int]:
        """Bytes carried a -> b and b -> a so far (by the proxy and the kernel)."""
        sp = self.splice
        if sp is None:
            return self.a.bytes_in, self.b.bytes_in
        return self.a.bytes_in + sp.redirected(self.a), self.b.bytes_in + sp.redirected(self.b)

    def buffered(self) -> int:
        """Bytes waiting in both transports' write buffers."""
        n = 0
        for ep in (self.a, self.b):
            if ep.transport is not None and not ep.lost:
                n += ep.transport.get_write_buffer_size()
        return n

    def abort(self, reason: str) -> None:
        """Reset both sides (RST)."""
        if self._reason is None:
            self._reason = f"aborted: {reason}"
            self._error = True
        if self.splice is not None:
            self.splice.disarm()  # before the resets: no pod byte goes past the proxy any more
        self.a.reset()
        self.b.reset()

    # ---- endpoint events

    def _on_eof(self, src: Endpoint) -> None:
        sp = self.splice
        if sp is not None and sp.final is None:
            sp.after_flush(src, self._other(src), lambda: self._half_close(src))
            return
        self._half_close(src)

    def _half_close(self, src: Endpoint) -> None:
        dst = self._other(src)
        if dst.can_write():
            if dst.transport.can_write_eof():  # type: ignore[union-attr]  # set in connection_made
                dst.transport.write_eof()  # type: ignore[union-attr]  # set in connection_made
            else:
                dst.transport.close()  # type: ignore[union-attr]  # set in connection_made
        dst._writable = False
        a, b = self.a, self.b
        if a.eof and b.eof and a._peer is not None and b._peer is not None:
            if self._reason is None:
                self._reason = "eof"
            a.close()
            b.close()

    def _on_lost(self, ep: Endpoint, exc: BaseException | None) -> None:
        other = self._other(ep)
        if self._reason is None:
            if exc is not None:
                self._reason = f"reset by {ep.name or 'peer'}: {exc}"
                self._error = True
            else:
                self._reason = f"closed by {ep.name or 'peer'}"
        if not other.lost:
            if exc is not None:
                other.reset()
            else:
                other.close()
        if self.a.lost and self.b.lost and not self.done.done():
            if self.splice is not None:
                self.splice.release()
            a_to_b, b_to_a = self.forwarded()
            self.done.set_result(RelayResult(a_to_b, b_to_a, self._reason, self._error))
