"""Same-node kernel fast path: pods' bytes skip the proxy's relay.

Once the proxy has decided a plaintext connection between two pods of this
node (policy passed, no L7), ``Splicer.splice`` files its own two sockets as
redirect targets and arms the two pod sockets at the other ends
(bpf/splice.c): from then on a pod's ``sendmsg`` puts its bytes straight into
the send queue of the proxy's socket facing the other pod (sk_msg egress
redirect, in the sender's own context), so the bytes cross one TCP
connection and never userspace.  The proxy keeps owning the connection: it
stays in the live table, EOF and resets still reach it through TCP and are
propagated as for any relay, a policy reload that denies it disarms and
resets it, and closing its sockets ends the redirect.

What makes it exact:

- Order at the switch: the kernel redirects a pod socket's message only
  when the bytes that socket has sent to the proxy so far (``passed``,
  counted by the kernel) equal the bytes the proxy has read from it and
  fully handed to the far socket's kernel send queue (``relayed``, written
  by the proxy when its write buffer is empty).  Redirected bytes then join
  the far socket's stream behind everything the proxy wrote.  Not in step
  yet: the message goes to the proxy as usual; the proxy relays it and
  arms again with the new count (``Spliced.relayed``).
- Room: the kernel redirects only while the target holds at most
  ML_SPLICE_WINDOW unacknowledged bytes (targets get a send buffer well
  above it): a redirect into a full target would fail with EAGAIN and
  nothing would wake a non-blocking sender (nginx stalled).  Past the
  window the bytes go through the proxy, with TCP's backpressure.
- Half-close: a redirect is done when the pod's ``sendmsg`` returns, so the
  pod's FIN reaches the proxy after its last redirected byte is queued on
  the far socket; the relay's usual half-close (once its own buffer is
  empty) keeps the order.
- Counts: splice.c adds each redirected message to the target socket's
  ml_splice_peers entry; ``Spliced.redirected`` adds them to the relay's own.
- Anything unexpected (maps missing, insert refused) leaves the connection
  on the userspace relay; ``proxy.splice: false`` turns the splice off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from agent.datapath.abi import flow_key
from agent.datapath.splicemap import established, pod_key

if TYPE_CHECKING:
    from agent.proxy.relay import Endpoint, Relay

__all__ = ["Spliced", "Splicer"]

log = logging.getLogger("meshlet.proxy")

_SO_SNDBUFFORCE = 32  # <asm-generic/socket.h> (CAP_NET_ADMIN, which the proxy has for SO_MARK)
# Send buffer of a target socket (the kernel doubles it): four times
# bpf/include/meshlet.h's ML_SPLICE_WINDOW (4 MiB), so that a redirect never
# finds its target full (see bpf/splice.c, "Room").
_TARGET_SNDBUF = 8 << 20
_ARM_POLL_MAX = 0.05  # seconds between two checks of a write buffer that is slow to drain
_ARM_POLLS = 40  # checks (about 1.5 s) before arming waits for the next chunk instead


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
    """A relay whose pods may send past it; attached as ``relay.splice``."""

    __slots__ = ("_keys", "_tasks", "cookies", "final", "relay", "splicer")

    def __init__(
        self, splicer: Splicer, relay: Relay, cookies: tuple[int, int], keys: tuple[bytes, bytes]
    ) -> None:
        self.splicer = splicer
        self.relay = relay
        self.cookies = cookies  # the proxy's sockets: a (from the client pod), b (to the server pod)
        self._keys: tuple[bytes, bytes] | None = keys  # the pod sockets behind a and b; None: disarmed
        self.final: tuple[int, int] | None = None  # redirected counts once released
        self._tasks: set[asyncio.Task] = set()

    def _index(self, ep: Endpoint) -> int:
        return 0 if ep is self.relay.a else 1

    def redirected(self, ep: Endpoint) -> int:
        """Bytes the kernel carried from ``ep``'s pod to the other side."""
        i = self._index(ep)
        if self.final is not None:
            return self.final[i]
        try:
            return self.splicer.maps.redirected(self.cookies[1 - i])
        except OSError:
            return 0

    def relayed(self, src: Endpoint) -> None:
        """The proxy forwarded bytes from ``src``: arm its pod socket with the
        new count once they are all in the far socket's kernel queue."""
        if self._keys is None or self.final is not None:
            return
        dst = self.relay.b if src is self.relay.a else self.relay.a
        if self._arm_if_flushed(src, dst) is not None:
            return
        task = asyncio.get_running_loop().create_task(self._arm_when_flushed(src, dst, src.bytes_in))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _arm_when_flushed(self, src: Endpoint, dst: Endpoint, upto: int) -> None:
        delay = 0.0002
        for _ in range(_ARM_POLLS):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _ARM_POLL_MAX)
            if src.bytes_in != upto or self._keys is None or self.final is not None:
                return  # newer bytes came: their own relayed() arms
            if self._arm_if_flushed(src, dst) is not None:
                return

    def _arm_if_flushed(self, src: Endpoint, dst: Endpoint) -> bool | None:
        """Arm ``src`` if ``dst``'s transport has handed every byte to the
        kernel (True); False: ``dst`` is gone, nothing to arm; None: bytes
        are still buffered, try again later."""
        tr = dst.transport
        if tr is None or tr.is_closing():
            return False
        if tr.get_write_buffer_size():
            return None
        self._arm(src)
        return True

    def _arm(self, src: Endpoint) -> None:
        i = self._index(src)
        keys = self._keys
        if keys is None:
            return
        try:
            self.splicer.maps.arm(keys[i], self.cookies[1 - i], src.bytes_in)
        except OSError as e:
            self.splicer.failed(e)
            self.disarm()

    def after_flush(self, src: Endpoint, dst: Endpoint, then: Any) -> None:
        """Called by the relay on EOF from ``src``: every byte redirected
        from ``src``'s pod is already in ``dst``'s kernel queue (the
        redirect is done inside the pod's sendmsg, before its FIN), so the
        relay half-closes as usual."""
        then()

    def disarm(self) -> None:
        """Later pod messages go to the proxy through TCP (a policy reset,
        a failure): nothing is redirected past the proxy any more."""
        keys, self._keys = self._keys, None
        if keys is None:
            return
        for k in keys:
            try:
                self.splicer.maps.disarm(k)
            except OSError:
                pass

    def release(self) -> None:
        """The relay ended: keep the final counts, free the map entries."""
        if self.final is not None:
            return
        self.disarm()
        counts = []
        for c in (self.cookies[1], self.cookies[0]):  # a's pod went out of b, b's out of a
            try:
                counts.append(self.splicer.maps.remove(c))
            except OSError:
                counts.append(0)
        self.final = (counts[0], counts[1])
        for t in self._tasks:
            t.cancel()
        self.splicer.released()


class Splicer:
    """A worker's access to the pinned splice maps (None: none pinned)."""

    def __init__(self, maps: Any, counters: dict[str, int]) -> None:
        self.maps = maps  # agent.datapath.splicemap.SpliceMaps
        self.counters = counters
        self._warned = False
        self._live = 0  # Spliced relays not yet released (they use self.maps)
        self._retired = False

    def splice(self, relay: Relay) -> None:
        """Let ``relay``'s pods send past it from now on (each side as soon
        as the proxy has relayed everything that side sent it so far).
        Anything amiss: it stays in userspace."""
        sa, sb = _tcp_socket(relay.a), _tcp_socket(relay.b)
        if sa is None or sb is None:
            self.counters["splice_skipped"] += 1
            return
        try:
            for s in (sa, sb):  # room for the window, whatever autotuning would give
                s.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _TARGET_SNDBUF)
            keys = (pod_key(sa), pod_key(sb))
            cookies = self.maps.add_targets(sa, sb)
        except OSError as e:
            if not (established(sa) and established(sb)):
                # A pod reset or closed its end in the microseconds since
                # the relay started (its FIN or RST not read yet): nothing
                # left to splice; the relay propagates the end as usual.
                self.counters["splice_skipped"] += 1
                return
            self.failed(e)
            return
        sp = relay.splice = Spliced(self, relay, cookies, keys)
        self._live += 1
        self.counters["spliced"] += 1
        sp.relayed(relay.a)
        sp.relayed(relay.b)

    def unfile(self, peer: tuple, local: tuple) -> None:
        """The outbound connection the proxy accepted as ``peer`` -> ``local``
        will not be spliced (another node, L7, passthrough): take the pod's
        socket out of the splice SOCKHASH, so that its sends take the plain
        TCP path again instead of running the sk_msg program for nothing
        for the connection's whole life."""
        self._unfile(bytes(flow_key(peer, local)))

    def unfile_upstream(self, sock: socket.socket) -> None:
        """The proxy's upstream connection ``sock`` to a pod of this node
        will not be spliced (it carries a tunnel stream, an L7 session or a
        pooled connection): sock_ops filed the pod's accepted socket for a
        splice all the same (it cannot know either); take it out, as
        ``unfile`` does for a client pod's socket."""
        try:
            key = pod_key(sock)
        except OSError as e:
            self.failed(e)
            return
        self._unfile(key)

    def _unfile(self, key: bytes) -> None:
        try:
            self.maps.unfile(key)
        except OSError as e:
            self.failed(e)

    def failed(self, e: OSError) -> None:
        self.counters["splice_failed"] += 1
        if not self._warned:
            self._warned = True
            log.warning("same-node splice failed (%s): relaying in userspace", e)

    def released(self) -> None:
        self._live -= 1
        if self._retired and self._live == 0:
            self.maps.close()

    def retire(self) -> None:
        """No new connections (proxy.splice off, or the agent pinned new
        maps): close the maps once the last relay spliced with them ends."""
        self._retired = True
        if self._live == 0:
            self.maps.close()

    def close(self) -> None:
        self.maps.close()
