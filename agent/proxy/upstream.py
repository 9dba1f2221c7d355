"""Upstream connects of one proxy worker: plain TCP and mutual TLS, every
socket marked (``SO_MARK``) so the datapath lets proxy traffic through and
does not redirect it again; and the kernel flow table's leg links
(accepted socket ↔ upstream socket, for ``meshlet flows``).

Connect errors become ``ConnectFailure`` with the access-log result, the
tunnel status and a reason that names the likely cause.

Tunnels (``connect_tunnel``): with ``proxy.tunnelMux`` on, a pod connection
to another node becomes a stream of a pooled meshlet-mux/1 connection for
its (node, address, source identity, destination identity): the TLS client
presents the source workload's certificate and expects the destination
workload's, as for one connection per stream, so a stream can only ever be
carried for the pair of identities its connection was verified for.  A
connection is used for new streams only while the source's certificate and
the trust bundle are the ones it was made with and the peer's chain is
valid (else it is drained: open streams finish, new ones get a new
connection).  A peer that negotiates meshlet-tunnel/1 gets the TLS
connection as the stream itself (the old mode), and is dialed that way for
``LEGACY_RETRY_S`` without waiting on a shared dial.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.proxy import mux
from agent.proxy.conn import Conn, ConnectFailure, family_of, fmt_addr
from agent.proxy.inputs import ProxyInputs
from agent.proxy.muxglue import IDLE_TIMEOUT, MuxPool, MuxSession
from agent.proxy.relay import Endpoint
from agent.proxy.state import ProxyState
from agent.proxy.tls import MUX_ALPN, HandshakeError, TlsConnection
from agent.proxy.tunnel import Status

__all__ = ["Upstream", "LegLinker", "SO_MARK", "SO_COOKIE", "chain_not_after", "first_then"]

log = logging.getLogger("meshlet.proxy")

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)


class LegLinker(Protocol):
    """What ``agent.datapath.flowtable.FlowLinker`` provides."""

    def link_many(self, pairs: list[tuple[int, int]]) -> None: ...

    def close(self) -> None: ...


def _cookie(ep: Endpoint) -> int:
    """The kernel socket cookie of an endpoint's (raw) socket."""
    # cookies are read once connected, when the transport is set
    sock = ep.transport.get_extra_info("socket")  # type: ignore[union-attr]
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def chain_not_after(tls: TlsConnection) -> float:
    """When the first certificate of the peer's verified chain expires (epoch seconds)."""
    chain = tls.verified_chain
    if not chain:
        return 0.0
    return min(c.not_valid_after_utc.timestamp() for c in chain)


def first_then(sock: socket.socket, open_socket: Any) -> Any:
    """An ``open_socket`` for a pool that hands out ``sock`` (already
    connected) first, then connects as usual."""
    box = [sock]

    async def opener(target: tuple) -> socket.socket:
        if box:
            return box.pop()
        return await open_socket(target)

    return opener


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[str, int], timeout: float
) -> None:
    """Connect the non-blocking ``sock`` to the numeric ``addr`` on the loop
    within ``timeout`` seconds (else TimeoutError).

    Not ``loop.sock_connect``: uvloop's resolves every address with
    getaddrinfo in libuv's thread pool first, even a numeric one, which cost
    each destination-side connect a round trip to a pool thread (futex
    wake, eventfd, one more loop wakeup; issue #13).  The address here is
    always numeric: connect(2) straight away, then wait for writability."""
    try:
        sock.connect(addr)
        return
    except (BlockingIOError, InterruptedError):
        pass  # in progress
    # To a pod of this node (a veth away) the handshake has usually completed
    # within connect(2) itself: one getpeername() saves registering the
    # socket with the loop and a loop iteration.
    try:
        sock.getpeername()
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
    # Only a connect still in progress arms a timer (not asyncio.timeout around
    # the whole call): the usual connect to a pod of this node needs none.
    fd = sock.fileno()
    done = loop.create_future()
    loop.add_writer(fd, _wake, done)
    timer = loop.call_later(timeout, _expire, done)
    try:
        await done
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Upstream:
    """Opens this worker's upstream connections; links legs in the kernel."""

    def __init__(
        self, inputs: ProxyInputs, counters: dict[str, int], linker: LegLinker | None = None
    ) -> None:
        self.inputs = inputs
        self.counters = counters
        self.linker = linker  # set by ProxyServer.start() when it opens the datapath
        self._mark_warned = False
        self._link_warned = False
        self._links: list[tuple[int, int]] = []  # cookie pairs waiting for the next flush
        self.mux_pool = MuxPool()
        self.max_streams = mux.DEFAULT_MAX_STREAMS  # per pooled tunnel connection
        self.idle_timeout = IDLE_TIMEOUT  # a pooled tunnel connection without streams is closed after
        # set by ProxyServer: takes the pod's socket at the far end of an
        # upstream socket out of the splice map (``Splicer.unfile_upstream``)
        self.unfile: Callable[[socket.socket], None] | None = None

    def close(self) -> None:
        self.mux_pool.drain_all("proxy shutting down")
        if self.linker is not None:
            with contextlib.suppress(Exception):
                self.linker.close()

    # ---- connects

    def _mark(self, sock: socket.socket, mark: int) -> None:
        if not mark:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            if not self._mark_warned:
                self._mark_warned = True
                log.error(
                    "cannot set SO_MARK=%#x on upstream sockets (%s): the proxy needs CAP_NET_ADMIN; "
                    "without the mark, strict mode may drop and the redirect may loop proxy traffic",
                    mark,
                    e.strerror,
                )

    async def connect(
        self, addr: tuple[str, int], state: ProxyState, name: str, *, splice: bool = False
    ) -> Endpoint:
        """Connect upstream (plaintext) with SO_MARK and a timeout. Raises
        ConnectFailure.  ``splice``: the caller may splice the connection
        (same-node L4), so the pod's socket stays filed for it."""
        sock = await self.open_socket(addr, state, splice=splice)
        try:
            _, ep = await asyncio.get_running_loop().create_connection(
                lambda: Endpoint(name, prebuffer_limit=state.buffer_size), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return ep

    async def connect_tls(
        self, addr: tuple[str, int], state: ProxyState, *, node: str, src: str, dst: str
    ) -> Endpoint:
        """Connect to a peer node's tunnel port and do the mTLS client handshake
        as ``src``, expecting ``dst`` with a certificate issued by ``node``'s
        intermediate CA (key scope: no other node may speak for the pods of
        ``node``). Raises ConnectFailure."""
        ep = Endpoint("upstream", prebuffer_limit=state.buffer_size)
        try:
            tls = self.inputs.tls.client_connection(ep, node=node, src=src, dst=dst, expect_node=node)
        except HandshakeError as e:  # no certificate: fail closed before touching the network
            raise ConnectFailure("rejected", Status.FORBIDDEN, f"{e.reason}: {e.detail}") from None
        sock = await self.open_socket(addr, state)
        try:
            await asyncio.get_running_loop().create_connection(lambda: tls, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            await tls.wait_handshake(state.connect_timeout + self.inputs.header_timeout)
        except HandshakeError as e:
            raise ConnectFailure(
                "timeout" if e.reason == "timeout" else "rejected",
                Status.FORBIDDEN,
                f"mTLS handshake with node {node} ({fmt_addr(addr)}) refused: {e.reason}: {e.detail}",
            ) from None
        return ep

    async def connect_tunnel(
        self, addr: tuple[str, int], state: ProxyState, *, node: str, src: str, dst: str, first: bytes
    ) -> tuple[Endpoint, bool]:
        """An upstream for a pod connection to ``node``: a new stream of a
        pooled meshlet-mux/1 connection whose first bytes are ``first``
        (the tunnel header), or, with the knob off or a peer that only
        speaks meshlet-tunnel/1, a TLS connection of its own.  Returns the
        endpoint and whether ``first`` was sent.  Raises ConnectFailure."""
        tls_ctx = self.inputs.tls
        tls_ctx.mux = state.tunnel_mux
        pool = self.mux_pool
        peer = (node, addr)
        if not state.tunnel_mux or pool.is_legacy(peer):
            return await self.connect_tls(addr, state, node=node, src=src, dst=dst), False
        key = (node, addr, src, dst)

        def fresh(s: MuxSession) -> str | None:
            svid = tls_ctx.certs.certificate(src)
            if svid is None or svid.serial != s.meta.get("src_serial"):
                return "source certificate rotated"
            if tls_ctx.certs.bundle_fingerprint != s.meta.get("bundle"):
                return "trust bundle changed"
            if time.time() >= s.meta.get("peer_not_after", 0.0):
                return "peer certificate expired"
            return None

        while True:
            s = pool.pick(key, fresh)
            if s is not None:
                ep = Endpoint("upstream", prebuffer_limit=state.buffer_size)
                s.open_stream(first, ep)
                return ep, True
            fut = pool.dialing.get(key)
            if fut is not None:
                await asyncio.wait([fut])
                if not fut.cancelled() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]  # the dial's ConnectFailure
                continue
            fut = pool.dialing[key] = asyncio.get_running_loop().create_future()
            try:
                ep = await self.connect_tls(addr, state, node=node, src=src, dst=dst)
                if not self._pooled(ep, key, state, src):
                    fut.set_result(None)
                    return ep, False  # the peer speaks meshlet-tunnel/1: this connection is the stream
                fut.set_result(None)
            except ConnectFailure as f:
                fut.set_exception(f)
                fut.exception()  # retrieved (there may be no waiter)
                raise
            except BaseException:
                fut.cancel()
                raise
            finally:
                if pool.dialing.get(key) is fut:
                    del pool.dialing[key]

    def _pooled(self, ep: Endpoint, key: tuple, state: ProxyState, src: str) -> bool:
        """Make a new TLS connection a pooled meshlet-mux/1 session, if it
        negotiated that; False (and the peer remembered as legacy) if not."""
        tls: TlsConnection = ep.transport.get_extra_info("tls_connection")  # type: ignore[union-attr]
        if tls.alpn != MUX_ALPN:
            self.mux_pool.mark_legacy((key[0], key[1]))
            self.counters["tunnel_legacy"] = self.counters.get("tunnel_legacy", 0) + 1
            return False
        certs = self.inputs.tls.certs
        session = MuxSession(
            tls,
            client=True,
            counters=self.counters,
            max_streams=self.max_streams,
            idle_timeout=self.idle_timeout,
            buffer_size=state.buffer_size,
        )
        svid = certs.certificate(src)
        session.meta = {
            "src_serial": svid.serial if svid is not None else None,
            "bundle": certs.bundle_fingerprint,
            "peer_not_after": chain_not_after(tls),
        }
        session.attach(ep)
        self.counters["tunnel_connections_out"] = self.counters.get("tunnel_connections_out", 0) + 1
        self.mux_pool.add(key, session)
        return True

    async def open_socket(
        self, addr: tuple[str, int], state: ProxyState, *, splice: bool = False
    ) -> socket.socket:
        """A connected, marked, non-blocking TCP socket. Raises ConnectFailure.
        Unless ``splice``, a pod socket at the other end is taken out of the
        splice map at once, before any byte goes either way."""
        loop = asyncio.get_running_loop()
        target = fmt_addr(addr)
        sock = socket.socket(family_of(addr[0]), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            self._mark(sock, state.mesh_mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(loop, sock, addr, state.connect_timeout)
            if self.unfile is not None and not splice and state.splice:
                self.unfile(sock)
            return sock
        except TimeoutError:
            sock.close()
            raise ConnectFailure(
                "timeout",
                Status.TIMEOUT,
                f"connect to {target} timed out after {state.connect_timeout:g}s "
                "(is a firewall or NetworkPolicy dropping it?)",
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise ConnectFailure("refused", Status.REFUSED, f"connection to {target} refused") from None
        except OSError as e:
            sock.close()
            raise ConnectFailure(
                "refused", Status.UNREACHABLE, f"cannot connect to {target}: {e.strerror or e}"
            ) from None
        except BaseException:
            sock.close()
            raise

    async def pool_socket(self, addr: tuple[str, int]) -> socket.socket:
        """An ``UpstreamPool``'s connect: marked like every upstream socket."""
        try:
            return await self.open_socket(addr, self.inputs.watcher.current)
        except ConnectFailure as f:
            if f.result == "timeout":
                raise TimeoutError(f.reason) from None
            raise OSError(f.reason) from None

    # ---- leg links (kernel flow table)

    def link(self, conn: Conn) -> None:
        """Queue "the accepted and the upstream socket carry one connection"
        for the kernel flow table (``meshlet flows`` joins the legs).  The
        cookies are read now, while both sockets are surely open (two
        getsockopt calls); the map write happens once per loop iteration
        for every connection set up in it (one batched bpf(2) call)."""
        if self.linker is None or conn.upstream is None or conn.ready is not None:
            return  # (a service leg's client end is a socketpair, not a TCP flow)
        if conn.client.transport is None or conn.client.transport.get_extra_info("socket") is None:
            return  # a stream of a multiplexed tunnel: no socket of its own
        if conn.upstream.transport is None or conn.upstream.transport.get_extra_info("socket") is None:
            return
        try:
            pair = (_cookie(conn.client), _cookie(conn.upstream))
        except OSError:
            self.counters["leg_link_errors"] += 1
            return
        if not self._links:
            asyncio.get_running_loop().call_soon(self._flush_links)
        self._links.append(pair)

    def _flush_links(self) -> None:
        pairs, self._links = self._links, []
        if not pairs or self.linker is None:
            return
        try:
            self.linker.link_many(pairs)
            self.counters["legs_linked"] += len(pairs)
        except Exception as e:  # noqa: BLE001 - observability must not break traffic
            self.counters["leg_link_errors"] += len(pairs)
            if not self._link_warned:
                self._link_warned = True
                log.warning(
                    "cannot link flow legs in the kernel flow table (%s); `meshlet flows` "
                    "will not join the proxy's legs (is the agent's datapath pinned?)",
                    e,
                )
