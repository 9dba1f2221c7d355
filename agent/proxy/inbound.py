"""The inbound role: the tunnel listener (port 15008), connections from
other nodes' proxies to the pods of this node.

accept → only from mesh node addresses (before any TLS work) → TLS server
handshake (certificate chosen by SNI, client certificate verified as a
SPIFFE ID of the trust domain) → read the header (timeout, size limit) →
``admission.admit_tunnel`` (key scope: the certificate was issued by the
intermediate of the node the connection comes from, for an identity with
a pod on that node; the header's identity must be the verified one;
the destination must be a mesh pod on THIS node, never an open relay; SNI
must have named that pod's identity) → ``destination`` authorizes it and
picks L7 or L4 → connect (marked) → respond with a status → relay.
Every refusal answers a tunnel status with its reason (``refuse``).

A connection that negotiated ALPN ``meshlet-mux/1`` carries many streams
(``agent.proxy.muxglue``): each stream goes through the same steps from
"read the header" on, as a connection of its own (its own access-log line),
authorized by the peer identity verified on the TLS connection it arrived
on and by its own header (the header's identity must be that verified one:
a stream can never speak for another identity).  The connection itself is
counted (``tunnel_connections_in``), not logged as a pod connection.  It is
drained (GOAWAY: open streams finish, the client opens new ones on a new
connection) when the worker stops or when this side's certificate or the
trust bundle changed since its handshake; a stream arriving after the
peer's certificate expired is refused.

``proxy.tunnelSecurity: insecure-plaintext`` (benchmarks only) skips TLS:
the header's identity is taken on trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

from agent.proxy import telemetry as m
from agent.proxy import tunnel
from agent.proxy.admission import Refusal, admit_tunnel, node_at
from agent.proxy.conn import Conn, ConnectFailure, Deadline, Live, fmt_addr, relayed
from agent.proxy.destination import Destination
from agent.proxy.inputs import ProxyInputs
from agent.proxy.muxglue import IDLE_TIMEOUT, MuxSession, StreamTransport
from agent.proxy.relay import Endpoint, Relay
from agent.proxy.routing import tunnel_peer_allowed
from agent.proxy.state import Pod, ProxyState, normalize_ip
from agent.proxy.stats import Accounting
from agent.proxy.tls import MUX_ALPN, HandshakeError, TlsConnection
from agent.proxy.tunnel import Status
from agent.proxy.upstream import Upstream, chain_not_after

__all__ = ["Inbound", "REFUSE_LINGER"]

log = logging.getLogger("meshlet.proxy")

REFUSE_LINGER = 2.0  # how long an error response waits for the peer to go away
_OK_RESPONSE = tunnel.encode_response(tunnel.TunnelResponse(Status.OK))  # the same bytes for every stream
# How long a stream's OK reply may wait for the pod's first bytes to share their
# send (StreamTransport.hold); far below the source's wait for it (connect_timeout
# + header_timeout), and nothing waits on it while the pod is silent.
REPLY_HOLD = 0.05
#: A key-scope refusal waits this long for a newer state that admits the
#: stream (the source node may know a pod this worker's state does not yet).
KEY_SCOPE_RECHECK_S = 1.5
KEY_SCOPE_POLL_S = 0.05
# TLS handshakes in progress from one source address before more are shed:
# a flood from one node address must not hold the worker's memory.
MAX_HANDSHAKES_PER_SOURCE = 512


class Inbound:
    """Serves the tunnel listener."""

    def __init__(
        self,
        inputs: ProxyInputs,
        accounting: Accounting,
        live: Live,
        upstream: Upstream,
        destination: Destination,
    ) -> None:
        self.inputs = inputs
        self.accounting = accounting
        self.counters = accounting.counters
        self.live = live
        self.upstream = upstream
        self.destination = destination
        self.handshaking: dict[str, int] = {}  # source address → TLS handshakes in progress
        self.max_handshakes = MAX_HANDSHAKES_PER_SOURCE
        self.sessions: set[MuxSession] = set()  # meshlet-mux/1 connections being served
        self.max_streams = upstream.max_streams
        self.legacy_open = 0  # meshlet-tunnel/1 connections being served (one per stream)

    def tunnel_load(self) -> int:
        """The tunnel connections this worker holds (handshaking, pooled or
        one per stream): what it publishes for the least-loaded pick of new
        ones (``agent.datapath.reuseport``)."""
        return len(self.sessions) + self.legacy_open + sum(self.handshaking.values())

    def drain(self, reason: str) -> None:
        """GOAWAY on every multiplexed tunnel connection (worker stopping)."""
        for s in list(self.sessions):
            s.drain(reason)

    def mux_stats(self) -> dict[str, int]:
        return {"connections": len(self.sessions), "streams": sum(len(s.streams) for s in self.sessions)}

    # ---- accept

    def factory(self) -> TlsConnection | Endpoint:
        """A protocol for an accepted tunnel socket: address check, then a
        TLS server handshake."""
        state = self.inputs.watcher.current
        if state.tunnel_security == "insecure-plaintext":
            return self._plaintext_tunnel()  # benchmarks only: no TLS at all
        self.inputs.tls.mux = state.tunnel_mux  # which ALPNs this side offers
        ep = Endpoint("client")

        def on_made(tls: TlsConnection) -> bool:
            if self.live.stopping:
                return False
            self.counters["inbound_accepted"] += 1
            conn = Conn("inbound", ep, route="local", tls=tls, seq=self.accounting.next_seq())
            # the raw transport is set from connection_made on
            conn.src_addr = tls.raw.get_extra_info("peername")  # type: ignore[union-attr]
            if not conn.src_addr or not tunnel_peer_allowed(
                self.inputs.watcher.current, str(conn.src_addr[0])
            ):
                # Before any TLS work: nothing but a mesh node may even try a handshake.
                ip = conn.src_addr[0] if conn.src_addr else "?"
                conn.deny("tunnel_not_from_node", f"tunnel from {ip}, which is not a mesh node address")
                log.warning("refused tunnel from %s: %s", fmt_addr(conn.src_addr), conn.reason)
                self.accounting.finish(conn)
                return False
            if self.live.no_fd_to_spare(tls.raw):
                self.live.shed(conn)
                return False
            ip = str(conn.src_addr[0])
            pending = self.handshaking.get(ip, 0)
            if pending >= self.max_handshakes:
                shed = self.counters["handshakes_shed"] = self.counters["handshakes_shed"] + 1
                conn.fail("overload", f"{pending} TLS handshakes from {ip} already in progress; shed")
                if shed in (1, 100, 10_000) or shed % 100_000 == 0:  # a flood must not flood the log
                    log.warning(
                        "overload: %d TLS handshakes from %s in progress, new ones are reset (%d so far); "
                        "is that node flooding this one?",
                        pending,
                        ip,
                        self.counters["handshakes_shed"],
                    )
                self.accounting.finish(conn)
                return False
            self.handshaking[ip] = pending + 1
            self.live.spawn(self.handle, conn)
            return True

        return self.inputs.tls.server_connection(ep, on_made=on_made)

    def _plaintext_tunnel(self) -> Endpoint:
        """``proxy.tunnelSecurity: insecure-plaintext``: the tunnel header is
        taken on trust (peer_verified false), as before mTLS existed."""

        def on_made(ep: Endpoint) -> None:
            if self.live.stopping:
                ep.reset()
                return
            self.counters["inbound_accepted"] += 1
            conn = Conn("inbound", ep, route="local", seq=self.accounting.next_seq())
            # accepted: the transport is set
            conn.src_addr = ep.transport.get_extra_info("peername")  # type: ignore[union-attr]
            if not conn.src_addr or not tunnel_peer_allowed(
                self.inputs.watcher.current, str(conn.src_addr[0])
            ):
                conn.deny("tunnel_not_from_node", "plaintext tunnel from a non-node address")
                ep.reset()
                self.accounting.finish(conn)
                return
            self.live.spawn(self.handle, conn)

        return Endpoint("client", on_made=on_made)

    # ---- per connection

    async def handle(self, conn: Conn) -> None:
        tls = conn.tls
        if tls is not None:
            try:
                await tls.wait_handshake(self.inputs.header_timeout)
            except HandshakeError as e:  # counted and logged by the TLS layer
                conn.deny("mtls_refused", f"mTLS handshake refused: {e.reason}: {e.detail}")
                return
            finally:
                self._handshake_done(str(conn.src_addr[0]))
            if tls.alpn == MUX_ALPN:
                self._serve_mux(conn, tls)
                return
            self.legacy_open += 1
            try:
                await self.serve(conn, tls)
            finally:
                self.legacy_open -= 1
            return
        await self.serve(conn, tls)

    # ---- multiplexed connections (meshlet-mux/1)

    def _serve_mux(self, conn: Conn, tls: TlsConnection) -> None:
        """The TLS connection carries streams from now on: each one is served
        as a tunnel connection of its own (``serve``)."""
        conn.carrier = True  # not a pod connection: no access-log line of its own
        self.counters["tunnel_connections_in"] = self.counters.get("tunnel_connections_in", 0) + 1
        state = self.inputs.watcher.current
        session = MuxSession(
            tls,
            client=False,
            counters=self.counters,
            max_streams=self.max_streams,
            idle_timeout=2 * IDLE_TIMEOUT,  # the client closes first; this reaps a vanished one
            on_stream=self._on_stream,
            on_closed=self.sessions.discard,
            buffer_size=state.buffer_size,
        )
        certs = self.inputs.tls.certs
        svid = certs.certificate(tls.local_identity or "")
        session.meta = {
            "local_serial": svid.serial if svid is not None else None,
            "bundle": certs.bundle_fingerprint,
            "peer_not_after": chain_not_after(tls),
            "peername": conn.src_addr,  # the TCP peer (a node) of every stream: no getpeername(2) each
        }
        self.sessions.add(session)
        session.attach(conn.client)
        if self.live.stopping:
            session.drain("proxy shutting down")

    def _on_stream(self, session: MuxSession, st: StreamTransport, ep: Endpoint) -> None:
        tls = session.tls
        conn = Conn("inbound", ep, route="local", seq=self.accounting.next_seq())
        conn.src_addr = session.meta.get("peername") or session.extra("peername")
        if self.live.stopping:
            session.drain("proxy shutting down")
        if time.time() >= session.meta.get("peer_not_after", 0.0):
            session.drain("peer certificate expired")
            conn.deny(
                "mtls_refused",
                f"the certificate {tls.peer_identity} presented on this tunnel connection has expired",
            )
            log.warning("refused tunnel stream from %s: %s", fmt_addr(conn.src_addr), conn.reason)
            st.abort()
            self.accounting.finish(conn)
            return
        certs = self.inputs.tls.certs
        svid = certs.certificate(tls.local_identity or "")
        if svid is None or svid.serial != session.meta.get("local_serial"):
            session.drain("certificate rotated")  # this stream is served; the next ones go elsewhere
        elif certs.bundle_fingerprint != session.meta.get("bundle"):
            session.drain("trust bundle changed")
        self.live.spawn(functools.partial(self.serve, tls=tls), conn)

    async def _key_scope_again(
        self, state: ProxyState, admit: Callable[[ProxyState], Pod | Refusal], refusal: Refusal
    ) -> tuple[Pod | Refusal, ProxyState]:
        """A key-scope refusal may come from this worker's state lagging the
        source node's: that node enrolls a pod once its own workers know it,
        while this node's agent learns of the pod on its own, and this worker
        reads the agent's state file every half second (seen: a pod opted
        back in was refused here 0.2 s after its node enrolled it).  Nothing
        went to a pod yet, so admit again with each newer state, for at most
        ``KEY_SCOPE_RECHECK_S``, before refusing: still fail closed."""
        watcher = self.inputs.watcher
        deadline = time.monotonic() + KEY_SCOPE_RECHECK_S
        result: Pod | Refusal = refusal
        while time.monotonic() < deadline:
            await asyncio.sleep(KEY_SCOPE_POLL_S)  # the watcher replaces ``current`` as a whole
            if watcher.current is not state:
                state = watcher.current
                result = admit(state)
                if not (isinstance(result, Refusal) and result.code == "key_scope"):
                    break
        return result, state

    # ---- per connection (or stream), after the handshake

    async def serve(self, conn: Conn, tls: TlsConnection | None) -> None:
        inp = self.inputs
        header_timeout = inp.header_timeout
        ep = conn.client
        verified = None
        peer_ip = conn.src_addr[0] if conn.src_addr else None  # the TCP peer: a node (checked on accept)
        if tls is not None:
            verified = tls.peer_identity
            conn.src_identity = verified
            conn.peer_verified = True
            conn.mtls = True
        state = inp.watcher.current
        decoder = tunnel.RequestDecoder()
        try:
            # A stream's header came in its OPEN: already here, decoded without
            # arming a timer.  Otherwise wait for the rest, bounded.
            early = ep.take_buffered()
            out = decoder.feed(early) if early else None
            if not isinstance(out, tunnel.Decoded):
                async with Deadline(self.live.running_loop(), header_timeout):
                    while True:
                        data = await ep.receive()
                        if not data:
                            conn.deny(
                                "bad_tunnel_header", "tunnel peer closed before sending a complete header"
                            )
                            ep.close()
                            return
                        out = decoder.feed(data)
                        if isinstance(out, tunnel.Decoded):
                            break
        except TimeoutError:
            conn.deny_reason = "bad_tunnel_header"
            await self.refuse(
                conn, Status.BAD_REQUEST, f"no complete tunnel header within {header_timeout:g}s"
            )
            return
        except tunnel.TunnelError as e:
            conn.deny_reason = "bad_tunnel_header"
            await self.refuse(conn, e.status, str(e))
            return
        except ConnectionError as e:
            conn.fail("reset", f"tunnel peer reset before sending a header: {e}")
            return
        # this side's decoder decodes requests only
        req: tunnel.TunnelRequest = out.message  # type: ignore[assignment]
        if req.namespace or req.name:
            conn.src_pod = f"{req.namespace}/{req.name}"
        if req.src is not None:
            conn.src_addr = req.src.sockaddr
        dst_ip = normalize_ip(req.dst.ip)
        conn.dst_addr = (dst_ip, req.dst.port)
        conn.service = dst_ip
        if tls is None:
            conn.src_identity = req.identity  # plaintext (benchmarks only): unverified
            pod = admit_tunnel(state, req, dst_ip, verified=None, mtls=False)
        else:
            t = tls

            def admit(state: ProxyState) -> Pod | Refusal:
                return admit_tunnel(
                    state,
                    req,
                    dst_ip,
                    verified=verified,
                    mtls=True,
                    sni_named=t.sni_named,
                    local_identity=t.local_identity,
                    peer_node=node_at(state, normalize_ip(str(peer_ip))) if peer_ip else None,
                    issuer_node=t.peer_node,
                )

            pod = admit(state)
            if isinstance(pod, Refusal) and pod.code == "key_scope":
                pod, state = await self._key_scope_again(state, admit, pod)
        if isinstance(pod, Refusal):
            if pod.pod is not None:  # a local pod it may not ask for: the record names it
                conn.dst_pod = pod.pod.key
                conn.dst_identity = state.identity(pod.pod)
            conn.deny_reason = pod.code
            await self.refuse(conn, pod.status, pod.reason)
            return
        conn.dst_pod = pod.key
        conn.dst_identity = state.identity(pod)
        # Authorization: only a verified peer has an identity (plaintext tunnels: none).
        src_ip = normalize_ip(req.src.ip) if req.src is not None else None
        leftover = out.leftover
        dest = self.destination
        hinted = req.protocol in ("http/1.1", "h2")  # the source proxy parsed it (a service's leg)
        # else the L4 path: it connects before answering
        proto: str | None = req.protocol if hinted and dest.l7_for(state, pod) else None
        if not hinted and dest.l7_for(state, pod):
            proto, leftover = await dest.sniff(ep, leftover)
        is_http = proto is not None
        if not dest.authorize(conn, verified, src_ip, pod, req.dst.port, http=is_http):
            await self.refuse(conn, Status.FORBIDDEN, conn.reason)
            return
        self.accounting.opened(
            conn, state, state.pod_by_key.get(conn.src_pod or ""), pod, ("destination",), m.UNKNOWN
        )
        if is_http:
            first = None
            if hinted:  # connect first: the source waits for this answer before sending
                try:
                    first = await self.upstream.open_socket((dst_ip, req.dst.port), state)
                except ConnectFailure as f:
                    await self.refuse(conn, f.status, f.reason, result=f.result)
                    return
            ep.write(_OK_RESPONSE)
            await dest.serve(proto or "", conn, ep, leftover, (dst_ip, req.dst.port), state, first_sock=first)
            return
        try:
            upstream = await self.upstream.connect((dst_ip, req.dst.port), state, "pod")
        except ConnectFailure as f:
            await self.refuse(conn, f.status, f.reason, result=f.result)
            return
        conn.upstream = upstream
        self.upstream.link(conn)
        relay = conn.relay = Relay(ep, upstream, buffer_size=state.buffer_size)
        tr = ep.transport
        if type(tr) is StreamTransport and leftover and not hinted:
            # The pod is connected: the reply rides with its first bytes (or FIN,
            # or reset), else goes alone after REPLY_HOLD; the source forwards
            # its client's bytes meanwhile and waits for it only to relay back.
            # Only when the client's bytes came with the OPEN: a source that sent
            # none (a service leg, which waits for this reply before its session
            # writes; a server-speaks-first client) gets it at once, or the pod
            # would wait for a request held behind the reply for REPLY_HOLD.
            tr.hold(_OK_RESPONSE, REPLY_HOLD)
        else:
            ep.write(_OK_RESPONSE)
        ep.unread(leftover)
        relay.start()
        await relayed(conn, relay)

    def _handshake_done(self, ip: str) -> None:
        n = self.handshaking.get(ip, 0) - 1
        if n > 0:
            self.handshaking[ip] = n
        else:
            self.handshaking.pop(ip, None)

    async def refuse(self, conn: Conn, status: Status, reason: str, result: str = "rejected") -> None:
        """Answer an error status, then close once the peer goes away."""
        ep = conn.client
        conn.fail(result, reason)
        if result == "rejected":
            log.warning("refused tunnel from %s: %s", fmt_addr(conn.src_addr), reason)
        ep.write(tunnel.encode_response(tunnel.TunnelResponse(status, reason)))
        ep.write_eof()
        # Wait (bounded) for the peer to close, so our close does not turn into
        # an RST that could destroy the response before the peer reads it.
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(REFUSE_LINGER):
                while await ep.receive():
                    pass
        ep.close()
