"""Same-node kernel fast path: splice an L4 relay's two sockets in the kernel.

Once the proxy has decided a plaintext connection between two pods of this
node (policy passed, no L7), ``Splicer.splice`` puts the relay's two TCP
sockets in the agent's pinned SOCKHASH (bpf/splice.c): from then on the
kernel sends each socket's incoming bytes out of the other, and the proxy
only watches the sockets for EOF and errors.  The proxy keeps owning the
connection: it stays in the live table, a policy reload that denies it still
resets it, and closing the sockets takes them out of the SOCKHASH.

What makes it exact:

- Order at the switch: the proxy stops reading both sockets, reads what
  their receive queues hold to the last byte and forwards it, and waits
  until its write buffers are empty; only then do the sockets go into the
  SOCKHASH.  Emptying the queues matters: the kernel hands the verdict the
  whole skb at the head of a queue, also the part the proxy already read,
  so a queue left half-read would send bytes twice.  Bytes that arrive
  meanwhile wait in the queue as whole skbs: both sockets' receive
  low-water marks are raised across the insert (no wake-up of the verdict
  halfway through it) and lowered after it, which makes the kernel run the
  verdict over everything queued, in order, before anything newer.
- Half-close: a redirected skb is sent by a kernel worker a little later,
  so on EOF from one side the proxy waits until the other socket has
  accepted every byte redirected to it (its write sequence, from TCP_INFO's
  bytes_acked plus SIOCOUTQ, advanced by the redirected count) before it
  shuts that socket's sending side.  Closing a socket whose redirected bytes
  are still queued would drop them.
- Counts: splice.c adds each redirected skb's length to the socket's entry
  in ml_splice_peers; ``Spliced.forwarded`` adds them to the relay's own.
- Anything unexpected (maps missing, insert refused) leaves the connection
  on the userspace relay; ``proxy.splice: false`` turns the splice off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.proxy.relay import Endpoint, Relay

__all__ = ["Spliced", "Splicer", "written"]

log = logging.getLogger("meshlet.proxy")

_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked) (Linux >= 4.1)
_TCP_INFO_LEN = _TCPI_BYTES_ACKED + 8
_RCVLOWAT_HOLD = 1 << 30  # the kernel caps it; large enough to hold data_ready back
_FLUSH_POLL_MAX = 0.05  # seconds between two checks of a slow flush
_DRAIN_CHUNK = 256 * 1024  # one read of a queue being emptied before the splice
_DRAIN_READS = 64  # reads per socket: its receive queue is bounded (tcp_rmem), a live sender is not
_DRAIN_POLLS = 40  # checks (about 1.5 s) for the write buffers to drain before a splice


def written(sock: Any) -> int:
    """Bytes ever put into ``sock``'s send queue (bytes_acked + unacked and
    unsent), read in that order so a concurrent ACK can only under-count."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCP_INFO_LEN:
        raise OSError("TCP_INFO has no tcpi_bytes_acked on this kernel")
    acked = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0]
    outq = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return int(acked) + outq


def _tcp_socket(ep: Endpoint) -> Any:
    tr = ep.transport
    if tr is None or tr.is_closing() or ep.lost or ep.eof:
        return None
    sock = tr.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if sock.type != socket.SOCK_STREAM:
        return None
    return sock


class Spliced:
    """A relay whose bytes the kernel carries; attached as ``relay.splice``."""

    def __init__(
        self,
        splicer: Splicer,
        relay: Relay,
        socks: tuple[Any, Any],
        cookies: tuple[int, int],
        base_written: tuple[int, int],
    ) -> None:
        self.splicer = splicer
        self.relay = relay
        self.socks = socks
        self.cookies = cookies
        # Write sequence of each socket and userspace counts at the switch.
        self.base_written = base_written
        self.base_in = (relay.a.bytes_in, relay.b.bytes_in)
        self.final: tuple[int, int] | None = None  # redirected counts once released
        self._tasks: set[asyncio.Task] = set()

    def _index(self, ep: Endpoint) -> int:
        return 0 if ep is self.relay.a else 1

    def redirected(self, ep: Endpoint) -> int:
        """Bytes the kernel carried from ``ep`` to its peer."""
        i = self._index(ep)
        if self.final is not None:
            return self.final[i]
        try:
            return self.splicer.maps.redirected(self.cookies[i])
        except OSError:
            return 0

    def flushed(self, src: Endpoint, dst: Endpoint) -> bool:
        """Every byte from ``src`` is in ``dst``'s send queue."""
        if dst.transport is None or dst.transport.get_write_buffer_size():
            return False
        i, j = self._index(src), self._index(dst)
        want = self.redirected(src) + (src.bytes_in - self.base_in[i])
        return written(self.socks[j]) - self.base_written[j] >= want

    def after_flush(self, src: Endpoint, dst: Endpoint, then: Any) -> None:
        """Call ``then()`` once ``src``'s bytes reached ``dst``'s socket (or
        ``dst`` is gone)."""
        task = asyncio.get_running_loop().create_task(self._flush(src, dst, then))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, src: Endpoint, dst: Endpoint, then: Any) -> None:
        delay = 0.0002
        while not dst.lost:
            try:
                if self.flushed(src, dst):
                    break
            except OSError:  # the socket went away meanwhile
                break
            self.splicer.flush_waits += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, _FLUSH_POLL_MAX)
        then()

    def release(self) -> None:
        """The relay ended: keep the final counts, free the map entries."""
        if self.final is not None:
            return
        counts = []
        for c in self.cookies:
            try:
                counts.append(self.splicer.maps.remove(c))
            except OSError:
                counts.append(0)
        self.final = (counts[0], counts[1])
        for t in self._tasks:
            t.cancel()
        for ep in (self.relay.a, self.relay.b):
            self.splicer.unwatch(ep)


class Splicer:
    """A worker's access to the pinned splice maps (None: none pinned)."""

    def __init__(self, maps: Any, counters: dict[str, int]) -> None:
        self.maps = maps  # agent.datapath.splicemap.SpliceMaps
        self.counters = counters
        self.flush_waits = 0  # polls while a half-close waited for the kernel
        self._warned = False
        self._tasks: set[asyncio.Task] = set()
        self._epoll: select.epoll | None = None  # spliced sockets, watched for EOF/errors only
        self._watched: dict[int, Endpoint] = {}  # fd -> its endpoint

    def splice(self, relay: Relay) -> None:
        """Hand ``relay``'s bytes to the kernel.  Reading stops on both
        sides; what the sockets hold is read and forwarded here, to the
        last byte (the verdict must only ever see whole, unread skbs: the
        kernel hands it the skb at the head of the queue even when the proxy
        had read part of it); once the write buffers are empty the sockets
        go into the SOCKHASH.  Anything amiss: it stays in userspace."""
        if not self._eligible(relay):
            self.counters["splice_skipped"] += 1
            return
        relay.hold = True
        for ep in (relay.a, relay.b):
            ep.transport.pause_reading()  # type: ignore[union-attr]  # eligible: open transports
        if not self._drain(relay):
            self._unhold(relay)
            self.counters["splice_skipped"] += 1
            return
        if self._insert(relay):
            self._unhold(relay)
            return
        task = asyncio.get_running_loop().create_task(self._when_drained(relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _drain(relay: Relay) -> bool:
        """Read both sockets' receive queues empty and forward what was in
        them.  False: EOF or an error came first (the relay handles them as
        usual, and the connection is not spliced)."""
        for ep in (relay.a, relay.b):
            sock = _tcp_socket(ep)
            if sock is None:
                return False
            fd = sock.fileno()
            for _ in range(_DRAIN_READS):
                try:
                    data = os.read(fd, _DRAIN_CHUNK)
                except BlockingIOError:
                    break
                except OSError as e:
                    relay.abort(f"{ep.name or 'peer'} failed while splicing: {e}")
                    return False
                if not data:
                    return False  # EOF: the transport reads it again once resumed
                ep.data_received(data)
            else:
                return False  # still more: the peer sends faster than we read
        return True

    async def _when_drained(self, relay: Relay) -> None:
        delay = 0.0002
        try:
            for _ in range(_DRAIN_POLLS):
                if not self._eligible(relay) or not relay.buffered():
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, _FLUSH_POLL_MAX)
            if relay.buffered() or not self._insert(relay):
                self.counters["splice_skipped"] += 1
        finally:
            self._unhold(relay)

    @staticmethod
    def _unhold(relay: Relay) -> None:
        relay.hold = False
        if relay.splice is None:  # back to the userspace relay
            for ep, other in ((relay.a, relay.b), (relay.b, relay.a)):
                if not ep.lost and ep.transport is not None and not ep.transport.is_closing():
                    if not other._write_paused:
                        ep.transport.resume_reading()

    @staticmethod
    def _eligible(relay: Relay) -> bool:
        a, b = relay.a, relay.b
        return _tcp_socket(a) is not None and _tcp_socket(b) is not None and not a._buf and not b._buf

    def _insert(self, relay: Relay) -> bool:
        """Splice now if nothing is buffered; False: not (yet) possible."""
        a, b = relay.a, relay.b
        sa, sb = _tcp_socket(a), _tcp_socket(b)
        if sa is None or sb is None or a._buf or b._buf or relay.buffered():
            return False
        held = []
        try:
            base = (written(sa), written(sb))  # nothing buffered: all the relay wrote
            for s in (sa, sb):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _RCVLOWAT_HOLD)
                held.append(s)
            cookies = self.maps.insert(sa, sb)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:  # a socket left ESTABLISHED (half-closed) meanwhile
                self.counters["splice_skipped"] += 1
                return True
            self.counters["splice_failed"] += 1
            if not self._warned:
                self._warned = True
                log.warning("same-node splice failed (%s): relaying in userspace", e)
            return True  # given up: stays in userspace
        finally:
            for s in held:  # runs the verdict over what queued meanwhile, in order
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass
        relay.splice = Spliced(self, relay, (sa, sb), cookies, base)
        self.counters["spliced"] += 1
        for ep, sock in ((a, sa), (b, sb)):
            self._watch(ep, sock)
        return True

    # ---- watching spliced sockets for EOF and errors only

    def _watch(self, ep: Endpoint, sock: Any) -> None:
        """Stop reading ``ep`` (its bytes go through the kernel; every arrival
        would still wake the loop for a read that finds nothing) and watch it
        for EOF, hang-up and errors only; on one, reading resumes and the
        relay sees it as usual."""
        if self._epoll is None:
            self._epoll = select.epoll()
            asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._on_events)
        fd = sock.fileno()
        try:
            self._epoll.register(fd, select.EPOLLRDHUP)  # EPOLLERR and EPOLLHUP always
        except OSError:
            return  # keep reading it: correct, only busier
        self._watched[fd] = ep
        ep.transport.pause_reading()  # type: ignore[union-attr]  # open: just spliced

    def _on_events(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            self._unwatch(fd)

    def _unwatch(self, fd: int, only: Endpoint | None = None) -> None:
        ep = self._watched.get(fd)
        if ep is None or (only is not None and ep is not only):
            return
        del self._watched[fd]
        try:
            self._epoll.unregister(fd)  # type: ignore[union-attr]  # set when watching
        except OSError:
            pass  # closed: already gone from the epoll set
        if not ep.lost and ep.transport is not None and not ep.transport.is_closing():
            ep.transport.resume_reading()

    def unwatch(self, ep: Endpoint) -> None:
        """Resume reading ``ep`` (its relay reached EOF or ended)."""
        tr = ep.transport
        sock = tr.get_extra_info("socket") if tr is not None and not tr.is_closing() else None
        if sock is not None:
            self._unwatch(sock.fileno(), only=ep)
        else:
            for fd, w in list(self._watched.items()):
                if w is ep:
                    del self._watched[fd]

    def close(self) -> None:
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        self._watched.clear()
        self.maps.close()
