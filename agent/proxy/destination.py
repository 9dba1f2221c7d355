"""The destination side of a connection on this node: authorize it, choose
L7 or L4, serve HTTP/1.x with the L7 session.

A connection reaches the destination side two ways: through the tunnel
listener from another node (``inbound``), or from a pod of this node to a
pod of this node (``outbound``'s Local route: this proxy is both ends'
proxy).  Both use this role; the policy decision itself is the pure
``admission.authorize_connection``.

L7 (``proxy.l7``, off by default; ``auto``: when a policy with HTTP fields
selects the pod): the first client bytes are sniffed (``sniff``; at most
``L7_SNIFF_TIMEOUT``, so a server-speaks-first protocol still works).
HTTP/1.x is served by an ``l7.L7Session`` on the client's transport, with
this worker's keep-alive ``UpstreamPool`` (its sockets are opened by
``Upstream.open_socket``: marked) and per-request counters in
``stats()["http"]``; every request is authorized (``l7authz``).  HTTP/2
with prior knowledge (h2c, gRPC) is served the same way, stream by stream,
by an ``h2glue.H2Session`` over this worker's ``H2Pool`` (``serve_h2``).
Anything else (TLS from the app, binary, silence) stays on the L4 relay.
A policy change re-checks live connections (``recheck``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agent.policy.evaluate import workload_index
from agent.proxy.admission import ConnectionDecisions, Refusal, decided_by
from agent.proxy.authz import authorize
from agent.proxy.conn import Conn, fmt_addr
from agent.proxy.inputs import ProxyInputs
from agent.proxy.jwks import JWKS_FILES
from agent.proxy.l7 import L7Session, L7Settings, Response, UpstreamPool
from agent.proxy.l7authz import DENIED_BODY, Denial, RequestAuthorizer
from agent.proxy.log import RequestDenial
from agent.proxy.relay import Endpoint
from agent.proxy.sniff import Verdict, sniff
from agent.proxy.state import Pod, ProxyState
from agent.proxy.stats import Accounting
from agent.proxy.upstream import Upstream, first_then
from agent.traffic.settings import Retries, Timeouts, TrafficSettings
from agent.traffic.upstream_cluster import Cluster

if TYPE_CHECKING:  # h2glue (and the h2 library) only once an HTTP/2 client arrives: footprint
    from agent.proxy.h2glue import H2Pool

__all__ = ["Destination", "L7_SNIFF_TIMEOUT", "record_decision"]

log = logging.getLogger("meshlet.proxy")

L7_SNIFF_TIMEOUT = 0.2  # seconds to wait for a client's first bytes before choosing L4
_PROTOCOLS = {Verdict.HTTP1: "http/1.1", Verdict.HTTP2: "h2"}


@functools.cache
def _proxy_h2_session() -> type:
    """The HTTP/2 session class of this side, made on first use: a worker
    that never sees an HTTP/2 client never imports h2 (~1.5 MB)."""
    from agent.proxy.h2glue import H2Session

    class _ProxyH2Session(H2Session):
        """An HTTP/2 session that tells the server when it is over, and counts bytes."""

        def __init__(self, *args: Any, done: asyncio.Future, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.done = done
            self.bytes_in = 0
            self.relay = None

        def data_received(self, data: bytes) -> None:
            self.bytes_in += len(data)
            super().data_received(data)

        def connection_lost(self, exc: BaseException | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                if not self.done.done():
                    self.done.set_result(None)

    return _ProxyH2Session


class _ProxySession(L7Session):
    """An L7 session that tells the server when it is over, and counts bytes
    (received from the client, received from the destination pod)."""

    def __init__(self, *args: Any, done: asyncio.Future, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.done = done
        self.bytes_in = 0
        self.bytes_out = 0

    def _signal(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)

    def _up_data(self, up: Any, data: bytes) -> None:
        self.bytes_out += len(data)
        super()._up_data(up, data)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._signal()

    def _switch_to_relay(self, up: Any, r: Any) -> None:
        try:
            super()._switch_to_relay(up, r)
        finally:
            self._signal()


def record_decision(conn: Conn, d: Any) -> None:
    """Put a policy decision on the connection record (access log, metrics)."""
    conn.verdict = "allowed" if d.allowed else "denied"
    conn.policy = d.policy
    conn.rule = d.rule
    conn.audit = [{"policy": a.policy, "rule": a.rule} for a in d.audited]


class Destination:
    """Authorization and L7 serving for connections that end on this node."""

    def __init__(self, inputs: ProxyInputs, accounting: Accounting, upstream: Upstream) -> None:
        self.inputs = inputs
        self.accounting = accounting
        self.upstream = upstream
        self.pool: UpstreamPool | None = None  # L7: this worker's keep-alive pool to its pods
        self.h2_pool: H2Pool | None = None  # HTTP/2: this worker's connections to its pods
        self._pod_clusters: dict[tuple, Cluster] = {}
        self._l7_need: dict[tuple, bool] = {}  # proxy.l7 auto: (policy version, pod) -> L7?
        self.decisions = ConnectionDecisions()  # connection policy decisions, per policy set

    def close(self) -> None:
        if self.h2_pool is not None:
            self.h2_pool.close()
        if self.pool is not None:
            self.pool.close()

    # ---- authorization

    def authorize(
        self, conn: Conn, identity: str | None, src_ip: str | None, pod: Pod, port: int, *, http: bool = False
    ) -> bool:
        """Decide a new destination-side connection; False: denied (the caller refuses it).

        ``http``: the connection will be served by the L7 session, which
        decides every request (``l7authz``); the connection itself is then
        let through even if its TCP decision is a deny."""
        policies = self.inputs.policies
        got = self.decisions.decide(policies.current, identity, src_ip, pod, port, http=http)
        conn.authz = (identity, src_ip, pod.key, port)
        refusal: Refusal | None
        if isinstance(got, Refusal):
            assert got.decision is not None  # a policy refusal carries its decision
            refusal, d = got, got.decision
        else:
            d = got
            refusal = None
            if http:
                conn.l7_authz = RequestAuthorizer(
                    lambda: policies.current,
                    identity=identity,
                    src_ip=src_ip,
                    namespace=pod.namespace,
                    labels=pod.label_map,
                    port=port,
                    tcp_allowed=d.allowed,
                    jwks_file=JWKS_FILES.get,
                )
                if not d.allowed:
                    conn.verdict = "allowed"  # the connection; its requests are decided one by one
                    return True
        record_decision(conn, d)
        if d.audited:
            log.info(
                "audit: connection %s (%s) -> %s port %d matched %s",
                fmt_addr(conn.src_addr),
                identity or "no identity",
                pod.key,
                port,
                ", ".join(f"{a.policy} rule {a.rule}" for a in d.audited),
            )
        if refusal is None:
            return True
        conn.deny(refusal.code, refusal.reason)
        if conn.direction == "outbound":  # the tunnel's refusal is logged by Inbound.refuse
            log.warning(
                "denied connection %s (%s) -> %s port %d: %s",
                fmt_addr(conn.src_addr),
                identity or "no identity",
                pod.key,
                port,
                conn.reason,
            )
        return False

    def recheck(self, why: str, conns: Iterable[Conn]) -> None:
        """Close (reset) every live destination-side connection the current
        policies no longer allow, with one log line each."""
        ps = self.inputs.policies.current
        state = self.inputs.watcher.current
        for conn in conns:
            if conn.authz is None or conn.result != "ok":
                continue
            identity, src_ip, dst_key, port = conn.authz
            pod = state.pod_by_key.get(dst_key)
            if pod is None:
                continue
            if conn.l7_authz is not None:
                # HTTP: the next request is decided by the new set; only a
                # connection that switched protocols is judged now, by the
                # request that upgraded it.
                head = conn.upgrade_head
                if head is None or conn.relay is None:
                    continue
                d = conn.l7_authz.decide(head.method, head.path.path, head.host, head.headers)
                if d is None or isinstance(d, Denial) or d.allowed:
                    continue
            else:
                d = authorize(ps, src_identity=identity, src_ip=src_ip, dst=pod, port=port)
            if d.allowed:
                continue
            record_decision(conn, d)
            conn.deny("policy", f"closed ({why}): policy: {d.reason}")
            log.warning(
                "closed connection %s (%s) -> %s (%s): no longer allowed, denied by %s",
                fmt_addr(conn.src_addr),
                identity or "no identity",
                fmt_addr(conn.dst_addr),
                dst_key,
                decided_by(d),
            )
            conn.reset_all()

    def on_http_request(self, conn: Conn, head: Any) -> Any:
        """L7 authentication and authorization of one request (``l7authz``):
        None lets it through as it is, a head lets that through instead (JWT:
        token removed, claim headers set), a Response refuses it."""
        az = conn.l7_authz
        if az is None:
            return None
        d = az.decide(head.method, head.path.path, head.host, head.headers, head.path.query)
        if d is None:
            if head.upgrade is not None:
                conn.upgrade_head = head
            return self._authenticated(az, head)
        if isinstance(d, Denial):
            if d.status == 401:  # end-user authentication (an invalid JWT): logged as denied
                conn.denials[id(head)] = (head, RequestDenial("authentication", None, None, d.reason))
                self.accounting.counters["requests_unauthenticated"] += 1
            return Response(d.status, (d.reason + "\n").encode("utf-8", "replace"), list(d.headers))
        src = conn.src_identity or "no identity"
        what = f"{head.method.decode('latin-1')} {head.path.path}"
        if d.audited:
            log.info(
                "audit: request %s (%s) -> %s %s matched %s",
                fmt_addr(conn.src_addr),
                src,
                conn.dst_pod,
                what,
                ", ".join(f"{a.policy} rule {a.rule}" for a in d.audited),
            )
        if d.allowed:
            if head.upgrade is not None:
                conn.upgrade_head = head
            return self._authenticated(az, head)
        conn.requests_denied += 1
        why = decided_by(d)
        conn.denials[id(head)] = (head, RequestDenial("policy", d.policy, d.rule, why))
        self.accounting.counters["requests_denied"] += 1
        log.warning(
            "denied request %s (%s) -> %s %s: %s", fmt_addr(conn.src_addr), src, conn.dst_pod, what, why
        )
        return Response(403, DENIED_BODY, [(b"Content-Type", b"text/plain")])

    @staticmethod
    def _authenticated(az: RequestAuthorizer, head: Any) -> Any:
        """The head to forward after authentication (``az.authn``): None when unchanged."""
        a = az.authn
        if not a.changes_request:
            return None
        path = head.path
        q = a.forward_query(path.query)
        return dataclasses.replace(
            head,
            headers=a.forward_headers(head.headers),
            path=path if q == path.query else dataclasses.replace(path, query=q),
        )

    # ---- L7 or L4

    def l7_for(self, state: ProxyState, pod: Pod) -> bool:
        """Serve HTTP/1.x to ``pod`` with the L7 session (``proxy.l7``)?  In
        ``auto`` mode: when an authorization policy with HTTP fields selects
        it, so that policy is decided per request."""
        mode = state.l7
        if mode is True or mode is False:
            return mode
        ps = self.inputs.policies.current
        key = (ps.version, pod.namespace, pod.labels)
        need = self._l7_need.get(key)
        if need is None:
            if len(self._l7_need) >= 4096:
                self._l7_need.clear()
            need = self._l7_need[key] = workload_index(ps, pod.namespace, pod.label_map).has_l7
        return need

    @staticmethod
    async def sniff(ep: Endpoint, first: bytes = b"") -> tuple[str | None, bytes]:
        """(``"http/1.1"``, ``"h2"`` or None for neither, the bytes read so far).
        Waits at most L7_SNIFF_TIMEOUT for more bytes; silence, EOF or an
        error mean L4."""
        data = first
        verdict = sniff(data)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(L7_SNIFF_TIMEOUT):
                while verdict is Verdict.NEED_MORE:
                    more = await ep.receive()
                    if not more:
                        break
                    data += more
                    verdict = sniff(data)
        if ep.lost:
            return None, data
        return _PROTOCOLS.get(verdict), data

    def _l7_pool(self, state: ProxyState) -> UpstreamPool:
        if self.pool is None:
            self.pool = UpstreamPool(
                connect_timeout=state.connect_timeout + 1.0,
                buffer_size=state.buffer_size,
                open_socket=self.upstream.pool_socket,
            )
        return self.pool

    def _h2_pool(self, state: ProxyState) -> H2Pool:
        from agent.proxy.h2glue import H2Pool

        if self.h2_pool is None:
            self.h2_pool = H2Pool(self._l7_pool(state))
        return self.h2_pool

    async def serve(
        self, protocol: str, conn: Conn, ep: Endpoint, data: bytes, addr: Any, state: ProxyState, **kw: Any
    ) -> None:
        """``serve_h2`` for ``"h2"``, else ``serve_l7``."""
        if protocol == "h2":
            await self.serve_h2(conn, ep, data, addr, state, **kw)
        else:
            await self.serve_l7(conn, ep, data, addr, state, **kw)

    async def serve_h2(
        self,
        conn: Conn,
        ep: Endpoint,
        data: bytes,
        addr: tuple[str, int] | None,
        state: ProxyState,
        *,
        first_sock: socket.socket | None = None,
        choose: Any = None,
        pool: H2Pool | None = None,
    ) -> None:
        """``serve_l7`` for an HTTP/2 client: every stream a request, each
        authorized, balanced, retried and counted on its own."""
        from agent.proxy.h2glue import H2Pool

        self.accounting.http["connections"] += 1
        done = asyncio.get_running_loop().create_future()
        own_pool = None
        if choose is None:
            cluster = self._pod_cluster(addr, state)
            choose = lambda _head: cluster  # noqa: E731 - a one-line closure over this cluster
            if first_sock is not None:
                base = UpstreamPool(
                    connect_timeout=state.connect_timeout + 1.0,
                    buffer_size=state.buffer_size,
                    open_socket=first_then(first_sock, self.upstream.pool_socket),
                )
                pool = own_pool = H2Pool(base)
            else:
                pool = self._h2_pool(state)
        assert pool is not None
        on_request = functools.partial(self.on_http_request, conn) if conn.l7_authz is not None else None
        session = _proxy_h2_session()(
            choose,
            pool,
            L7Settings(buffer_size=state.buffer_size),
            on_request=on_request,
            on_response=functools.partial(self.accounting.on_http_response, conn),
            done=done,
        )
        tr = ep.transport
        assert tr is not None
        data += ep.take_buffered()
        tr.set_protocol(session)
        session.connection_made(tr)
        if data:
            session.data_received(data)
        if ep.eof:
            session.eof_received()
        try:
            await done
        finally:
            if own_pool is not None:
                own_pool.close()
                own_pool.base.close()
        conn.bytes_sent = session.bytes_in
        conn.bytes_received = session.bytes_out
        conn.reason = conn.reason or f"h2: {session.requests} request(s)"

    def _pod_cluster(self, addr: tuple[str, int] | None, state: ProxyState) -> Cluster:
        """The destination side's cluster for one pod address: no retries (the
        source side's service policy retries, on another endpoint; retrying
        here too would multiply attempts) and no request timeout (the
        source's policy sets it); connect timeout from the proxy config."""
        assert addr is not None
        c = self._pod_clusters.get(addr)
        if c is None or c.settings.timeouts.connect != state.connect_timeout:
            if len(self._pod_clusters) >= 4096:
                self._pod_clusters.clear()
            c = self._pod_clusters[addr] = Cluster.single(
                addr,
                TrafficSettings(
                    retries=Retries(attempts=0),
                    timeouts=Timeouts(connect=state.connect_timeout, request=None),
                ),
            )
        return c

    async def serve_l7(
        self,
        conn: Conn,
        ep: Endpoint,
        data: bytes,
        addr: tuple[str, int] | None,
        state: ProxyState,
        *,
        first_sock: socket.socket | None = None,
        choose: Any = None,
        pool: UpstreamPool | None = None,
    ) -> None:
        """Hand the client's transport (raw, or TLS plaintext side) to an L7
        session; return when the connection is over.

        Destination side: towards ``addr`` (the pod), every request authorized
        (``on_http_request``); ``first_sock``, already connected to the pod,
        serves the first request.  Source side of a service: ``choose`` and
        ``pool`` (a service's cluster, the legs of this source pod)."""
        self.accounting.http["connections"] += 1
        done = asyncio.get_running_loop().create_future()
        own_pool = None
        if choose is None:
            cluster = self._pod_cluster(addr, state)
            choose = lambda _head: cluster  # noqa: E731 - a one-line closure over this cluster
            if first_sock is not None:
                pool = own_pool = UpstreamPool(
                    connect_timeout=state.connect_timeout + 1.0,
                    buffer_size=state.buffer_size,
                    open_socket=first_then(first_sock, self.upstream.pool_socket),
                )
            else:
                pool = self._l7_pool(state)
        on_request = functools.partial(self.on_http_request, conn) if conn.l7_authz is not None else None
        session = _ProxySession(
            choose,
            pool,
            L7Settings(buffer_size=state.buffer_size),
            on_request=on_request,
            on_response=functools.partial(self.accounting.on_http_response, conn),
            done=done,
        )
        tr = ep.transport
        assert tr is not None
        data += ep.take_buffered()  # whatever arrived since (or without) the sniff
        tr.set_protocol(session)
        session.connection_made(tr)
        if data:
            session.data_received(data)
        if ep.eof:
            session.eof_received()
        try:
            await done
        finally:
            if own_pool is not None and session.relay is None:
                own_pool.close()
        relay = session.relay  # the request upgraded: the L4 relay carries the rest
        if relay is not None:
            conn.relay = relay
            result = await relay.done
            conn.bytes_sent = session.bytes_in + result.a_to_b
            conn.bytes_received = session.bytes_out + result.b_to_a
            if result.error and conn.result == "ok":
                conn.fail("reset", result.reason)
            return
        conn.bytes_sent = session.bytes_in
        conn.bytes_received = session.bytes_out
        conn.reason = conn.reason or f"http: {session.requests} request(s)"
