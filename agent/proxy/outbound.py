"""The outbound role: connections from the pods of this node.

accept (port 15001) → ``FlowSource.pop()`` (original destination + source
cgroup) → ``routing.route()`` → one of:

Local / Passthrough
    connect upstream (marked, with a timeout) → relay (plaintext; the
    access log names both identities).  Local: this proxy is the
    destination's proxy too, so ``destination`` authorizes it and may serve
    it as HTTP (``proxy.l7``).
Tunnel
    mutual TLS 1.3 to the peer node's tunnel port presenting the *source
    workload's* SVID and expecting the *destination workload's* SPIFFE ID
    (a new stream of a pooled meshlet-mux/1 connection for that pair of
    identities, or a TLS connection of its own with a meshlet-tunnel/1
    peer: ``Upstream.connect_tunnel``), then send the header, forward
    client bytes right away, read the inbound side's response, then relay
    the way back.
Service (a VIP)
    HTTP (appProtocol http, or sniffed): an L7 session that balances,
    retries and times out per request, each upstream leg an ordinary
    outbound connection (``_service_socket``); anything else: one endpoint
    per connection, connect failures tried on another.

Any failure resets the client (RST), as a failed connect would without the
mesh; so does a missing certificate (fail closed).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

from agent.proxy import telemetry as m
from agent.proxy import tunnel
from agent.proxy.conn import (
    STATUS_RESULT,
    Conn,
    ConnectFailure,
    Deadline,
    Live,
    family_of,
    fmt_addr,
    relayed,
    set_ready,
)
from agent.proxy.destination import Destination
from agent.proxy.inputs import ProxyInputs
from agent.proxy.l7 import Response, UpstreamPool
from agent.proxy.relay import Endpoint, Relay
from agent.proxy.routing import (
    Local,
    Passthrough,
    Reject,
    ServiceRoute,
    Tunnel,
    endpoint_route,
    route,
    service_route,
)
from agent.proxy.splice import Splicer
from agent.proxy.state import ProxyState, normalize_ip
from agent.proxy.stats import Accounting
from agent.proxy.tls import SESSION_CACHE_SIZE
from agent.proxy.tunnel import Status
from agent.proxy.upstream import Upstream
from agent.traffic.outcome import CONNECT_FAILURE as _CONNECT_FAILURE
from agent.traffic.outcome import RESET as _RESET
from agent.traffic.outcome import status as _status
from agent.traffic.upstream_cluster import Cluster

__all__ = ["Outbound", "FlowSource"]

if TYPE_CHECKING:  # h2glue (and the h2 library) only once an HTTP/2 client arrives: footprint
    from agent.proxy.h2glue import H2Pool

log = logging.getLogger("meshlet.proxy")

_OK = _status(200)


class FlowSource(Protocol):
    """What ``agent.datapath.origdst.FlowTable`` provides."""

    def pop(self, peer: tuple, local: tuple) -> Any: ...

    def close(self) -> None: ...


class Outbound:
    """Serves the outbound listener; owns the service clusters and the
    per-source-pod pools of service legs."""

    def __init__(
        self,
        inputs: ProxyInputs,
        accounting: Accounting,
        live: Live,
        upstream: Upstream,
        destination: Destination,
        flows: FlowSource | None = None,
    ) -> None:
        self.inputs = inputs
        self.accounting = accounting
        self.counters = accounting.counters
        self.live = live
        self.upstream = upstream
        self.destination = destination
        self.flows = flows  # set by ProxyServer.start() when it opens the datapath
        self.splicer: Splicer | None = None  # same-node kernel splice (ProxyServer.start(), if pinned)
        # Services: per-worker clusters (endpoints, LB, outlier, breaker, budget).
        self.clusters: dict[str, Cluster] = {}
        self._cluster_stamps: dict[str, tuple] = {}
        self._src_pools: dict[str, UpstreamPool] = {}
        self._src_h2_pools: dict[str, H2Pool] = {}  # HTTP/2 legs (one connection, many streams)

    def state_changed(self, new: ProxyState) -> None:
        """Drop the pools of pods and the clusters of services that are gone."""
        for key in [k for k in self._src_pools if k not in new.pod_by_key]:
            self._src_pools.pop(key).close()  # that pod is gone
        for key in [k for k in self._src_h2_pools if k not in new.pod_by_key]:
            p = self._src_h2_pools.pop(key)
            p.close()
            p.base.close()
        for key in [k for k in self.clusters if k.rsplit(":", 1)[0] not in new.service_by_key]:
            del self.clusters[key]  # that service is gone
            self._cluster_stamps.pop(key, None)

    def close(self) -> None:
        for pool in self._src_pools.values():
            pool.close()
        self._src_pools.clear()
        for h2pool in self._src_h2_pools.values():
            h2pool.close()
            h2pool.base.close()
        self._src_h2_pools.clear()

    async def handle(self, conn: Conn) -> None:
        client = conn.client
        state = self.inputs.watcher.current
        tr = client.transport
        assert tr is not None
        peer = tr.get_extra_info("peername")
        local = tr.get_extra_info("sockname")
        conn.src_addr = peer
        try:
            # the flow table is opened before the outbound listener starts
            origin = self.flows.pop(peer, local)  # type: ignore[union-attr]
        except OSError as e:
            origin = None
            log.error(
                "flow table lookup failed for %s: %s (is the agent's datapath pinned under %s?)",
                fmt_addr(peer),
                e,
                state.pin_dir,
            )
        if origin is None:
            self.counters["flow_misses"] += 1
            conn.deny(
                "no_original_destination",
                "no original destination recorded for this connection "
                "(not redirected by meshlet's connect hook, or the flow record expired)",
            )
            client.reset()
            return
        conn.dst_addr = (origin.dst_ip, origin.dst_port)
        conn.service = normalize_ip(origin.dst_ip)
        decision = route(state, origin, peer)
        if isinstance(decision, ServiceRoute):
            await self._to_service(conn, state, decision, peer)
            return
        await self._forward(conn, state, decision, peer, origin.dst_port)

    async def _forward(self, conn: Conn, state: ProxyState, decision: Any, peer: Any, dst_port: int) -> None:
        """Carry an outbound connection to where ``decision`` says (Local,
        Tunnel, Passthrough; Reject resets it)."""
        client = conn.client
        src = decision.src
        if src is not None:
            conn.src_pod = src.key
            conn.src_identity = state.identity(src)
        if isinstance(decision, Reject):
            conn.deny(decision.code, decision.reason)
            log.warning(
                "rejected connection from %s to %s: %s",
                fmt_addr(peer),
                fmt_addr(conn.dst_addr),
                decision.reason,
            )
            client.reset()
            return
        if isinstance(decision, (Local, Tunnel)):
            conn.dst_pod = decision.pod.key
            conn.dst_identity = state.identity(decision.pod)
        conn.route = {Local: "local", Tunnel: "tunnel", Passthrough: "passthrough"}[type(decision)]
        conn.mtls = isinstance(decision, Tunnel) and state.tunnel_security == "mtls"
        http_data: bytes | None = None  # the first bytes of an HTTP client (L7 on)
        http_proto = "http/1.1"  # or "h2"
        if isinstance(decision, Local):
            if conn.ready is not None:
                # A service's leg: HTTP by construction (nothing sent yet). Parsed
                # again here only if this pod's policies need it; else relayed.
                if self.destination.l7_for(state, decision.pod):
                    http_data = b""
                    http_proto = conn.leg_protocol
            elif self.destination.l7_for(state, decision.pod):
                proto, data = await self.destination.sniff(client)
                if proto is not None:
                    http_data, http_proto = data, proto
                else:
                    client.unread(data)
            if not self.destination.authorize(
                conn,
                conn.src_identity,
                normalize_ip(peer[0]),
                decision.pod,
                dst_port,
                http=http_data is not None,
            ):
                client.reset()  # same node: the kernel's cgroup record is the source identity
                return
        if conn.ready is None and not (isinstance(decision, Local) and http_data is None):
            self._unfile(state, client)  # another node, passthrough or L7: never spliced
        if isinstance(decision, Local):  # this proxy is both ends' proxy
            self.accounting.opened(conn, state, src, decision.pod, ("source", "destination"), m.UNKNOWN)
        elif isinstance(decision, Tunnel):
            self.accounting.opened(conn, state, src, decision.pod, ("source",), m.UNKNOWN)
        else:
            self.accounting.opened(conn, state, src, None, ("source",), "PassthroughCluster")

        if http_data is not None:
            first = None
            if conn.ready is not None:  # connect now, so the service's session sees a connect failure as one
                try:
                    first = await self.upstream.open_socket(decision.addr, state)
                except ConnectFailure as f:
                    conn.fail(f.result, f.reason)
                    client.reset()
                    return
                set_ready(conn)
            await self.destination.serve(
                http_proto, conn, client, http_data, decision.addr, state, first_sock=first
            )
            return
        header = b""
        header_sent = False
        if isinstance(decision, Tunnel):
            header = tunnel.encode_request(
                tunnel.TunnelRequest(
                    dst=tunnel.Address(family_of(decision.dst[0]), decision.dst[0], decision.dst[1]),
                    identity=conn.src_identity or "",
                    namespace=src.namespace,
                    name=src.name,
                    src=tunnel.Address(family_of(normalize_ip(peer[0])), normalize_ip(peer[0]), peer[1]),
                    # A service leg is HTTP: the peer connects to the pod and answers at once
                    # instead of sniffing first (so a refused pod is a connect failure here).
                    protocol=conn.leg_protocol if conn.ready is not None else "",
                )
            )
        try:
            if isinstance(decision, Tunnel) and state.tunnel_security == "insecure-plaintext":
                upstream = await self.upstream.connect(decision.addr, state, "upstream")  # benchmarks only
                conn.peer_verified = False
            elif isinstance(decision, Tunnel):
                self.inputs.tls.session_cache_size = SESSION_CACHE_SIZE if state.tls_resumption else 0
                # a stream of a pooled meshlet-mux/1 connection (the header in its OPEN),
                # or a TLS connection of its own (meshlet-tunnel/1)
                upstream, header_sent = await self.upstream.connect_tunnel(
                    decision.addr,
                    state,
                    node=decision.node,
                    src=conn.src_identity or "",
                    dst=conn.dst_identity or "",
                    first=header,
                )
                conn.peer_verified = True
            else:
                upstream = await self.upstream.connect(
                    decision.addr, state, "upstream", splice=isinstance(decision, Local)
                )
        except ConnectFailure as f:
            reason = f.reason
            if isinstance(decision, Tunnel) and f.status is Status.FORBIDDEN and f.result == "rejected":
                conn.deny_reason = "no_certificate" if reason.startswith("no_certificate") else "mtls_refused"
            if isinstance(decision, Tunnel):
                if f.status is Status.FORBIDDEN and reason.startswith("no_certificate"):
                    log.error(
                        "reset connection from %s (%s) to %s: no certificate for identity %s; "
                        "failing closed (%s)",
                        fmt_addr(peer),
                        conn.src_pod,
                        fmt_addr(conn.dst_addr),
                        conn.src_identity,
                        reason,
                    )
                elif f.status is not Status.FORBIDDEN:
                    reason = (
                        f"tunnel to node {decision.node}: {reason} (is the meshlet proxy running there, "
                        f"port {decision.tunnel_port} reachable?)"
                    )
            conn.fail(f.result, reason)
            client.reset()
            return
        conn.upstream = upstream
        self.upstream.link(conn)
        relay = conn.relay = Relay(client, upstream, buffer_size=state.buffer_size)
        if not isinstance(decision, Tunnel):
            set_ready(conn)
            relay.start()
            if isinstance(decision, Local) and state.splice and self.splicer is not None:
                # Both ends are pods of this node, authorized, no L7: the kernel relays.
                self.splicer.splice(relay)
            await relayed(conn, relay)
            return

        if not header_sent:
            upstream.write(header)
        relay.forward(client)  # client bytes may be pipelined right behind the header
        try:
            resp, leftover = await self._read_response(
                upstream, state.connect_timeout + self.inputs.header_timeout
            )
        except (TimeoutError, tunnel.TunnelError, ConnectionError, EOFError) as e:
            what = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            conn.fail(
                "timeout" if isinstance(e, TimeoutError) else "reset",
                f"tunnel to node {decision.node} ({fmt_addr(decision.addr)}) failed "
                f"before its response: {what}",
            )
            relay.abort(conn.reason)
            await relayed(conn, relay)
            return
        if not resp.ok:
            conn.fail(
                STATUS_RESULT.get(resp.status, "rejected"),
                f"node {decision.node} answered {resp.status.name.lower().replace('_', '-')}: {resp.reason}",
            )
            relay.abort(conn.reason)
            await relayed(conn, relay)
            return
        upstream.unread(leftover)
        set_ready(conn)  # a service leg: the pod accepted, its session may send
        relay.forward(upstream)
        await relayed(conn, relay)

    async def _read_response(self, upstream: Endpoint, timeout: float) -> tuple[tunnel.TunnelResponse, bytes]:
        decoder = tunnel.ResponseDecoder()
        async with Deadline(self.live.running_loop(), timeout):
            while True:
                data = await upstream.receive()
                if not data:
                    raise EOFError(
                        "tunnel closed before responding (is the peer a meshlet proxy of the same release?)"
                    )
                out = decoder.feed(data)
                if isinstance(out, tunnel.Decoded):
                    # this side's decoder decodes responses only
                    return out.message, out.leftover  # type: ignore[return-value]

    def _unfile(self, state: ProxyState, client: Any) -> None:
        """The splice's sock_ops filed the client pod's socket (it cannot know
        where the connection goes); this one will not be spliced."""
        if self.splicer is not None and state.splice:
            tr = client.transport
            if tr is not None:
                self.splicer.unfile(tr.get_extra_info("peername"), tr.get_extra_info("sockname"))

    async def _to_service(self, conn: Conn, state: ProxyState, r: ServiceRoute, peer: Any) -> None:
        """A connection to a service VIP.  HTTP (appProtocol http, or sniffed
        when it is not declared and ``proxy.l7`` is on): an L7 session that
        balances, retries and times out per request over the service's
        endpoints; each upstream leg is an ordinary outbound connection from
        the client pod to the chosen pod (``_service_socket``), so the
        destination side (policy, metrics, mTLS) is the same as for a pod
        dialed directly.  Anything else: one endpoint per connection (P2C
        on open connections), with connect failures tried on another."""
        client = conn.client
        src = r.src
        conn.src_pod = src.key
        conn.src_identity = state.identity(src)
        conn.cluster = r.cluster
        conn.route = "service"
        conn.service = f"{r.name}.{r.namespace}.svc.cluster.local"
        cluster = self._service_cluster(state, r)
        if not r.endpoints:
            conn.fail("refused", f"service {r.cluster} has no endpoints")
            log.warning(
                "reset connection from %s to %s: service %s has no endpoints",
                fmt_addr(peer),
                fmt_addr(conn.dst_addr),
                r.cluster,
            )
            client.reset()
            return
        proto = "http/1.1" if r.app_protocol == "http" else None
        data = b""
        if r.app_protocol is None and state.l7 is not False:
            proto, data = await self.destination.sniff(client)
            if proto is None:
                client.unread(data)
        elif proto is not None:  # declared HTTP: HTTP/1.1, unless the client starts with the h2c preface
            sniffed, data = await self.destination.sniff(client)
            proto = sniffed or proto
        if proto is not None:
            self._unfile(state, client)  # an L7 session: never spliced
            conn.labels = []  # its legs carry the TCP metrics, one per endpoint connection
            box: dict[str, Any] = {"state": state, "route": r}
            vip_ip, vip_port = r.vip

            def choose(_head: Any) -> Any:
                st = self.inputs.watcher.current
                if st is not box["state"]:
                    svc = st.service_at(vip_ip, vip_port)
                    if svc is None:
                        return Response(503, f"service {r.cluster} is gone\n".encode())
                    box["route"] = service_route(
                        st, st.pod_by_key.get(src.key) or src, svc[0], svc[1], vip_ip, vip_port, r.family
                    )
                    box["state"] = st
                return self._service_cluster(st, box["route"])

            if proto == "h2":
                await self.destination.serve_h2(
                    conn,
                    client,
                    data,
                    None,
                    state,
                    choose=choose,
                    pool=self._source_h2_pool(state, src.key, normalize_ip(peer[0])),
                )
                return
            await self.destination.serve_l7(
                conn,
                client,
                data,
                None,
                state,
                choose=choose,
                pool=self._source_pool(state, src.key, normalize_ip(peer[0])),
            )
            return
        # L4: per connection.
        tried: list[tuple] = []
        now = time.monotonic()
        for _ in range(max(1, min(3, len(cluster.targets)))):
            target = cluster.pick(now, avoid=tried)
            if target is None or target in tried:
                break
            tried.append(target)
            pod = state.pod_by_ip.get(normalize_ip(target[0]))
            if pod is None:
                continue
            d = endpoint_route(state, src, pod, target[1], ip=target[0], family=r.family)
            if isinstance(d, (Local, Tunnel)):
                ok = await self._probe_endpoint(state, d)
                if not ok:
                    cluster.finish(None, target, _CONNECT_FAILURE, 0.0, time.monotonic())
                    continue
            token = cluster.start(target)
            conn.dst_addr = (target[0], target[1])
            t0 = time.monotonic()
            try:
                await self._forward(conn, state, d, peer, target[1])
            finally:
                cluster.finish(
                    token,
                    target,
                    _OK if conn.result == "ok" else _RESET,
                    time.monotonic() - t0,
                    time.monotonic(),
                )
            return
        conn.fail(
            "refused",
            f"no endpoint of service {r.cluster} accepted the connection "
            f"(tried {', '.join(fmt_addr(t) or '?' for t in tried)})",
        )
        client.reset()

    async def _probe_endpoint(self, state: ProxyState, d: Any) -> bool:
        """L4 service connections: is a Local endpoint accepting?  (A Tunnel
        endpoint is judged by its node proxy: always True here.)"""
        if not isinstance(d, Local):
            return True
        try:
            sock = await self.upstream.open_socket(d.addr, state)
        except ConnectFailure:
            return False
        sock.close()
        return True

    def _service_cluster(self, state: ProxyState, r: ServiceRoute) -> Cluster:
        """This worker's long-lived cluster for a service port: endpoints from
        the state, settings from the TrafficPolicy in force."""
        ts = self.inputs.traffic.current
        stamp = (id(state), ts.version)
        key = f"{r.cluster}/{r.family}"
        c = self.clusters.get(key)
        if c is not None and self._cluster_stamps.get(key) == stamp:
            return c
        targets = [(ip, r.target_port) for ip in r.addrs]
        settings = ts.settings_for(r.namespace, r.name, r.port)
        now = time.monotonic()
        if c is None:
            c = self.clusters[key] = Cluster(r.cluster, targets, settings, now)
        else:
            c.update(targets, settings, now)
        self._cluster_stamps[key] = stamp
        return c

    def _source_pool(self, state: ProxyState, src_key: str, src_ip: str) -> UpstreamPool:
        """Keep-alive legs of one source pod to its services' endpoints."""
        pool = self._src_pools.get(src_key)
        if pool is None:
            pool = self._src_pools[src_key] = UpstreamPool(
                connect_timeout=state.connect_timeout + self.inputs.header_timeout + 1.0,
                buffer_size=state.buffer_size,
                open_socket=functools.partial(self._service_socket, src_key, src_ip),
            )
        return pool

    def _source_h2_pool(self, state: ProxyState, src_key: str, src_ip: str) -> H2Pool:
        """HTTP/2 legs of one source pod to its services' endpoints (each leg
        one connection carrying many streams)."""
        from agent.proxy.h2glue import H2Pool

        pool = self._src_h2_pools.get(src_key)
        if pool is None:
            base = UpstreamPool(
                connect_timeout=state.connect_timeout + self.inputs.header_timeout + 1.0,
                buffer_size=state.buffer_size,
                open_socket=functools.partial(self._service_socket, src_key, src_ip, protocol="h2"),
            )
            pool = self._src_h2_pools[src_key] = H2Pool(base)
        return pool

    async def _service_socket(
        self, src_key: str, src_ip: str, target: tuple, protocol: str = "http/1.1"
    ) -> socket.socket:
        """An upstream leg for a service's L7 session: one end of a socketpair
        whose other end is served as an outbound connection from pod
        ``src_key`` to ``target`` (Local, Tunnel or Passthrough, with the
        usual policy, metrics and access log), carrying ``protocol``
        (``http/1.1`` or ``h2``).  Returns once that connection reached its
        destination; raises OSError/TimeoutError if it did not."""
        state = self.inputs.watcher.current
        src = state.pod_by_key.get(src_key)
        pod = state.pod_by_ip.get(normalize_ip(target[0]))
        if src is None or pod is None:
            raise OSError(f"{fmt_addr(target)} is no longer a pod of the inventory")
        d = endpoint_route(state, src, pod, target[1], ip=target[0])
        if isinstance(d, Reject):
            raise OSError(d.reason)
        loop = self.live.running_loop()
        mine, theirs = socket.socketpair()
        try:
            mine.setblocking(False)
            theirs.setblocking(False)
            _, ep = await loop.create_connection(
                lambda: Endpoint("client", prebuffer_limit=state.buffer_size), sock=theirs
            )
        except BaseException:
            mine.close()
            theirs.close()
            raise
        conn = Conn("outbound", ep, seq=self.accounting.next_seq())
        conn.ready = ready = loop.create_future()
        conn.leg_protocol = protocol
        conn.src_addr = (src_ip, 0)
        conn.dst_addr = (target[0], target[1])
        conn.service = normalize_ip(target[0])
        self.counters["service_legs"] += 1

        async def leg(c: Conn) -> None:
            try:
                await self._forward(c, self.inputs.watcher.current, d, (src_ip, 0), target[1])
            finally:
                if not ready.done():
                    ready.set_exception(
                        ConnectFailure(c.result, Status.UNREACHABLE, c.reason or "leg closed")
                    )

        self.live.spawn(leg, conn)
        try:
            await ready
        except ConnectFailure as f:
            mine.close()
            if f.result == "timeout":
                raise TimeoutError(f.reason) from None
            raise OSError(f.reason) from None
        except BaseException:
            mine.close()
            raise
        return mine
