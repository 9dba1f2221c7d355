"""The node proxy's asyncio shell: listeners, connects, relays, stats.

This is the only proxy module that touches sockets. Protocol decisions live
in ``routing`` (where to go), ``tunnel`` (the header) and ``relay`` (moving
bytes). Two paths:

outbound (port 15001)
    accept → ``FlowTable.pop()`` (original destination + source cgroup) →
    ``route()`` → connect upstream (marked, with a timeout) → Local/Passthrough:
    relay (plaintext; the access log names both identities); Tunnel: mutual
    TLS 1.3 presenting the *source workload's* SVID and expecting the
    *destination workload's* SPIFFE ID, then, inside TLS, send the header,
    forward client bytes right away, read the inbound side's response, then
    relay the way back. Any failure resets the client (RST), as a failed
    connect would without the mesh; so does a missing certificate (fail
    closed).

tunnel (port 15008)
    only from mesh node addresses → TLS server handshake (certificate chosen
    by SNI, client certificate verified as a SPIFFE ID of the trust domain) →
    read the header (timeout, size limit) → the header's identity must be the
    verified one, and SNI must have named the destination pod's identity
    (else ``forbidden``) → the destination must be a mesh pod on THIS node
    (else ``not-local``: never an open relay) → connect (marked) → respond
    with a status → relay.

L7 (``proxy.l7``, off by default)
    wherever the proxy is about to connect to the destination pod (the
    tunnel listener after the header, and the Local route), the first client
    bytes are sniffed (``sniff``; at most ``L7_SNIFF_TIMEOUT``, so a
    server-speaks-first protocol still works). HTTP/1.x is served by an
    ``l7.L7Session`` on the client's transport, with this worker's keep-alive
    ``UpstreamPool`` (its sockets are opened by ``_open_socket``: marked) and
    per-request counters in ``stats()["http"]``; anything else (TLS from the
    app, HTTP/2 prior knowledge, binary, silence) stays on the L4 relay.

A crash on one connection is logged and resets that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from agent.proxy import tunnel
from agent.proxy.authz import PolicyWatcher, authorize, policy_path
from agent.proxy.certs import CertManager
from agent.proxy import metrics as m
from agent.proxy.l7 import L7Session, L7Settings, Response, UpstreamPool
from agent.proxy.l7authz import DENIED_BODY, Denial, RequestAuthorizer
from agent.proxy.log import AccessLog, sampled
from agent.proxy.sniff import Verdict, sniff
from agent.proxy.relay import Endpoint, Relay
from agent.proxy.routing import (
    Local, Passthrough, Reject, ServiceRoute, Tunnel, endpoint_route, route, service_route, tunnel_peer_allowed,
)
from agent.proxy.watch import TrafficWatcher
from agent.traffic.cluster import Cluster
from agent.traffic.policy import Retries, Timeouts, TrafficSettings
from agent.traffic.outcome import CONNECT_FAILURE as _CONNECT_FAILURE, RESET as _RESET, status as _status
from agent.proxy.state import Pod, ProxyState, StateWatcher, normalize_ip
from agent.proxy.tls import SESSION_CACHE_SIZE, HandshakeError, TlsConnection, TlsContexts
from agent.proxy.tunnel import Status

__all__ = ["ProxyServer", "ConnectFailure", "SO_MARK", "stats_socket_path"]

log = logging.getLogger("meshlet.proxy")

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
BACKLOG = 1024
HEADER_TIMEOUT = 5.0
REFUSE_LINGER = 2.0  # how long an error response waits for the peer to go away
L7_SNIFF_TIMEOUT = 0.2  # seconds to wait for a client's first bytes before choosing L4
L7_LATENCY_SAMPLES = 1024  # recent request latencies kept for stats()


class FlowSource(Protocol):
    """What ``agent.datapath.flowmap.FlowTable`` provides."""

    def pop(self, peer: tuple, local: tuple) -> Any: ...

    def close(self) -> None: ...


class LegLinker(Protocol):
    """What ``agent.datapath.flows.FlowLinker`` provides."""

    def link_many(self, pairs: list[tuple[int, int]]) -> None: ...

    def close(self) -> None: ...


def _cookie(ep: Endpoint) -> int:
    """The kernel socket cookie of an endpoint's (raw) socket."""
    sock = ep.transport.get_extra_info("socket")  # type: ignore[union-attr]
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def _peer_of(state: ProxyState, pod: Pod | None, principal: str | None = None) -> m.Peer:
    if pod is None:
        return m.Peer(principal=principal or m.UNKNOWN)
    return m.Peer(workload=pod.workload, namespace=pod.namespace,
                  principal=principal or state.identity(pod), app=pod.app or m.UNKNOWN)


_OK = _status(200)
_TS_CACHE: list = [0, ""]  # (whole second, its ISO-8601 text) for _utc_ms


def _utc_ms() -> str:
    """Now as ``2026-01-02T03:04:05.678+00:00`` (the access log's ``ts``), the
    seconds part formatted once per second: this runs for every request."""
    now = time.time()
    sec = int(now)
    if sec != _TS_CACHE[0]:
        _TS_CACHE[0] = sec
        _TS_CACHE[1] = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_TS_CACHE[1]}.{int((now - sec) * 1000):03d}+00:00"


def _set_ready(conn: "Conn") -> None:
    """A service leg reached its destination: its session may send."""
    if conn.ready is not None and not conn.ready.done():
        conn.ready.set_result(None)


def _first_then(sock: socket.socket, open_socket: Any) -> Any:
    """An ``open_socket`` for a pool that hands out ``sock`` (already
    connected) first, then connects as usual."""
    box = [sock]

    async def opener(target: tuple) -> socket.socket:
        if box:
            return box.pop()
        return await open_socket(target)

    return opener


def stats_socket_path(state_path: str, worker_id: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), f"proxy-{worker_id}.sock")


def _fmt_addr(addr: Any) -> str | None:
    if not addr:
        return None
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def _norm_addr(addr: Any) -> str | None:
    try:
        return _fmt_addr((normalize_ip(str(addr[0])), addr[1])) if addr else None
    except ValueError:
        return _fmt_addr(addr)


def _family_of(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


class ConnectFailure(Exception):
    """An upstream connect failed. ``result`` is the access-log result."""

    def __init__(self, result: str, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.status = status
        self.reason = reason


_STATUS_RESULT = {
    Status.REFUSED: "refused",
    Status.UNREACHABLE: "refused",
    Status.TIMEOUT: "timeout",
}


@dataclass
class Conn:
    """Book-keeping for one proxied connection (the access-log record)."""

    direction: str
    client: Endpoint
    started: float = field(default_factory=time.monotonic)
    route: str | None = None
    src_pod: str | None = None
    src_identity: str | None = None
    src_addr: Any = None
    dst_addr: Any = None
    dst_pod: str | None = None
    dst_identity: str | None = None
    peer_verified: bool = False  # the peer proxy's certificate was verified (Tunnel, both ends)
    bytes_sent: int = 0  # source → destination
    bytes_received: int = 0  # destination → source
    result: str = "ok"
    reason: str = ""
    upstream: Endpoint | None = None
    relay: Relay | None = None
    tls: TlsConnection | None = None  # inbound: the TLS layer under ``client``
    seq: int = 0  # per-worker connection number (the metrics' handle)
    labels: list = field(default_factory=list)  # metric label sets, one per reporter
    deny_reason: str | None = None  # a metrics.DENY_REASONS value: the mesh refused it
    service: str | None = None  # destination_service: the IP address the client dialed
    mtls: bool = False  # the bytes crossed nodes in the mutual-TLS tunnel
    # Authorization (destination side only): what the policy saw, and its verdict.
    authz: tuple[str | None, str | None, str, int] | None = None  # (identity, src ip, dst pod key, port)
    verdict: str | None = None  # "allowed" | "denied"; None: not checked here
    policy: str | None = None  # the deciding policy (namespace/name)
    rule: int | None = None
    audit: list = field(default_factory=list)  # AUDIT matches: [{"policy", "rule"}]
    # L7 (destination side): requests are authorized one by one.
    l7_authz: RequestAuthorizer | None = None
    upgrade_head: Any = None  # the request that switched protocols (re-checked on reload)
    requests_denied: int = 0
    denial: tuple[Any, str | None, int | None] | None = None  # (head, policy, rule) of the last 403
    # Services: the upstream cluster (``ns/name:port``) a VIP connection went to.
    cluster: str | None = None
    log_base: dict | None = None  # record() for this connection's request lines (made once)
    log_key: str = ""  # its sample_key(), for request lines without an x-request-id
    # An upstream leg opened by a service's L7 session (a socketpair, not an
    # accepted socket): resolved once the destination is connected.
    ready: asyncio.Future | None = None

    def fail(self, result: str, reason: str) -> None:
        self.result = result
        self.reason = reason

    def deny(self, code: str, reason: str) -> None:
        """Refused by the mesh itself (counted by ``code``)."""
        self.fail("rejected", reason)
        self.deny_reason = code

    def byte_counts(self) -> tuple[int, int]:
        """(source → destination, destination → source) so far."""
        r = self.relay
        if r is None:
            return self.bytes_sent, self.bytes_received
        return max(self.bytes_sent, r.a.bytes_in), max(self.bytes_received, r.b.bytes_in)

    def fallback_labels(self, state: ProxyState) -> list[tuple[str, ...]]:
        """Labels for a connection that failed before both ends were known."""
        src = state.pod_by_key.get(self.src_pod or "")
        dst = state.pod_by_key.get(self.dst_pod or "")
        if dst is None and self.service:
            dst = state.pod_by_ip.get(self.service)  # refused before routing: whom it was for
        reporter = "source" if self.direction == "outbound" else "destination"
        return [m.labels_for(reporter, _peer_of(state, src, self.src_identity),
                             _peer_of(state, dst, self.dst_identity),
                             self.service or m.UNKNOWN, m.UNKNOWN, self.mtls)]

    def sample_key(self) -> str:
        """The original connection's 4-tuple: both node proxies see the same."""
        return f"{_norm_addr(self.src_addr)}>{_norm_addr(self.dst_addr)}"

    def reset_all(self) -> None:
        if self.relay is not None:
            self.relay.abort(self.reason or "reset")
        self.client.reset()
        if self.tls is not None:
            self.tls.abort()  # before the handshake completed, ``client`` has no transport
        if self.upstream is not None:
            self.upstream.reset()

    def record(self, worker: int) -> dict[str, Any]:
        return {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "worker": worker,
            "direction": self.direction,
            "route": self.route,
            "src_pod": self.src_pod,
            "src_identity": self.src_identity,
            "src_addr": _fmt_addr(self.src_addr),
            "dst_addr": _fmt_addr(self.dst_addr),
            "dst_pod": self.dst_pod,
            "dst_identity": self.dst_identity,
            "peer_verified": self.peer_verified,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "result": self.result,
            "reason": self.reason,
            "deny_reason": self.deny_reason,
            "connection_security_policy": "mutual_tls" if self.mtls else "none",
            **self._workload_fields(),
            **self._authz_fields(),
        }

    def _authz_fields(self) -> dict[str, Any]:
        if self.verdict is None:
            return {}
        out: dict[str, Any] = {"verdict": self.verdict, "policy": self.policy, "rule": self.rule}
        if self.audit:
            out["audit"] = list(self.audit)
        return out

    def _workload_fields(self) -> dict[str, Any]:
        """The workload labels the metrics use (first reporter's)."""
        if not self.labels:
            return {}
        lb = dict(zip(m.LABELS, self.labels[0]))
        return {k: lb[k] for k in ("source_workload", "source_workload_namespace",
                                   "source_principal", "destination_workload",
                                   "destination_workload_namespace", "destination_principal",
                                   "destination_service")}


class _StatsProtocol(asyncio.Protocol):
    def __init__(self, server: "ProxyServer") -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            body = json.dumps(self.server.stats(), separators=(",", ":")).encode() + b"\n"
            transport.write(body)  # type: ignore[attr-defined]
        finally:
            transport.close()


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


class ProxyServer:
    """One proxy worker. ``start()``, then ``stop()`` (or ``serve(stop_event)``)."""

    def __init__(
        self,
        watcher: StateWatcher,
        *,
        flow_table: FlowSource | None = None,
        worker_id: int = 0,
        access_log: str | None = None,
        stats_path: str | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        certs: CertManager | None = None,
        linker: LegLinker | None = None,
        max_series: int = m.MAX_SERIES,
    ) -> None:
        self.watcher = watcher
        self.worker_id = worker_id
        self.header_timeout = header_timeout
        self.stats_path = stats_path if stats_path is not None else stats_socket_path(watcher.path, worker_id)
        self._flows = flow_table
        self._own_flows = flow_table is None
        # Workload certificates (in memory only) and the TLS contexts built on them.
        self.certs = certs if certs is not None else CertManager.from_state(watcher.current)
        self.tls = TlsContexts(self.certs)
        self._certs_task: asyncio.Task[None] | None = None
        self._access_arg = access_log
        self._access = AccessLog(self._access_path(watcher.current))
        self.metrics = m.TcpMetrics(max_series)
        self.http_metrics = m.HttpMetrics(max_series)  # istio_request* (L7 requests)
        self._linker = linker
        self._link_warned = False
        self._links: list[tuple[int, int]] = []  # cookie pairs waiting for the next flush
        self._seq = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._stats_server: asyncio.AbstractServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: dict[asyncio.Task[None], Conn] = {}
        self._stopping = False
        self._mark_warned = False
        self._started_at = time.monotonic()
        self.addresses: dict[str, list[tuple]] = {"outbound": [], "tunnel": []}
        self.counters: dict[str, int] = {
            "outbound_accepted": 0,
            "inbound_accepted": 0,
            "result_ok": 0,
            "result_refused": 0,
            "result_reset": 0,
            "result_timeout": 0,
            "result_rejected": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "flow_misses": 0,
            "internal_errors": 0,
            "legs_linked": 0,
            "leg_link_errors": 0,
            "access_log_skipped": 0,
            "requests_denied": 0,
            "service_legs": 0,
        }
        # Services: per-worker clusters (endpoints, LB, outlier, breaker,
        # budget) and TrafficPolicies (traffic.json next to the state file).
        self.traffic = TrafficWatcher.for_state(watcher.path)
        self._clusters: dict[str, Cluster] = {}
        self._cluster_stamps: dict[str, tuple] = {}
        self._src_pools: dict[str, UpstreamPool] = {}
        self._pod_clusters: dict[tuple, Cluster] = {}
        self._l7_need: dict[tuple, bool] = {}  # proxy.l7 auto: (policy version, pod) -> L7?
        # L7 (proxy.l7): one upstream pool per worker, and per-request counters.
        self._pool: UpstreamPool | None = None
        self.http: dict[str, Any] = {
            "connections": 0,  # downstream connections served by the L7 session
            "requests": 0,  # responses reported (on_response)
            "by_class": {},  # "2xx": n ... by the status the client got
            "latency_ms_sum": 0.0,
            "latency_ms_count": 0,
        }
        self._latencies: deque[float] = deque(maxlen=L7_LATENCY_SAMPLES)
        # Authorization policies: policies.json next to the state file.
        self.policies = PolicyWatcher(policy_path(watcher.path))
        self._policy_task: asyncio.Task[None] | None = None
        if watcher.on_change is None:
            watcher.on_change = self._state_changed

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        state = self.watcher.current
        if self._flows is None:
            # Lazy: keeps the datapath (and anything it imports) out of unit tests.
            from agent.datapath.flowmap import FlowTable

            try:
                self._flows = FlowTable(state.pin_dir)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"cannot open the flow table pinned under {state.pin_dir}: {e.strerror or e}; "
                    "has the agent loaded and pinned the datapath (is bpffs mounted)?",
                ) from e
            if self._linker is None:
                from agent.datapath.flows import FlowLinker

                self._linker = FlowLinker(state.pin_dir)
        try:
            await self._start_listeners(state)
            await self._start_stats()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._watch_task = asyncio.get_running_loop().create_task(self.watcher.run())
        self._certs_task = asyncio.get_running_loop().create_task(self.certs.run())
        self._policy_task = asyncio.get_running_loop().create_task(self._watch_policies())
        log.info(
            "proxy worker %d serving node %s (state generation %d): outbound %s, tunnel %s",
            self.worker_id,
            state.node,
            state.generation,
            ", ".join(_fmt_addr(a) or "?" for a in self.addresses["outbound"]),
            ", ".join(_fmt_addr(a) or "?" for a in self.addresses["tunnel"]),
        )

    async def _start_listeners(self, state: ProxyState) -> None:
        loop = asyncio.get_running_loop()
        lst = state.listen
        for ip, family in ((lst.ipv4, socket.AF_INET), (lst.ipv6, socket.AF_INET6)):
            if not ip:
                continue
            for kind, port, factory in (
                ("outbound", lst.outbound_port, self._factory("outbound", self._outbound)),
                ("tunnel", lst.tunnel_port, self._tunnel_factory()),
            ):
                sock = self._listen_socket(family, ip, port, kind)
                srv = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
                self._servers.append(srv)
                self.addresses[kind].append(sock.getsockname())

    @staticmethod
    def _listen_socket(family: int, ip: str, port: int, kind: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            hint = ""
            if e.errno == errno.EADDRINUSE:
                hint = (
                    f"; another process holds the port without SO_REUSEPORT "
                    f"(check: ss -ltnp 'sport = :{port}')"
                )
            elif e.errno == errno.EADDRNOTAVAIL:
                hint = "; the address is not configured on any interface in this network namespace"
            raise OSError(e.errno, f"cannot listen for {kind} connections on {_fmt_addr((ip, port))}: {e.strerror}{hint}") from e
        return sock

    async def _start_stats(self) -> None:
        path = self.stats_path
        if not path:
            return
        if len(os.fsencode(path)) >= 108:
            log.warning("stats socket path too long for AF_UNIX, stats endpoint disabled: %s", path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from a previous run of this worker
        loop = asyncio.get_running_loop()
        self._stats_server = await loop.create_unix_server(lambda: _StatsProtocol(self), path)

    def _factory(self, kind: str, handler: Any) -> Any:
        direction = "outbound" if kind == "outbound" else "inbound"

        def on_made(ep: Endpoint) -> None:
            if self._stopping:
                ep.reset()
                return
            self.counters[f"{direction}_accepted"] += 1
            conn = Conn(direction, ep, seq=self._next_seq())
            task = asyncio.get_running_loop().create_task(self._guard(handler, conn))
            self._tasks[task] = conn
            task.add_done_callback(self._tasks.pop)

        return lambda: Endpoint("client", on_made=on_made)

    def _tunnel_factory(self) -> Any:
        """Accepted tunnel sockets: address check, then a TLS server handshake."""

        def factory() -> TlsConnection:
            ep = Endpoint("client")

            def on_made(tls: TlsConnection) -> bool:
                if self._stopping:
                    return False
                self.counters["inbound_accepted"] += 1
                conn = Conn("inbound", ep, route="local", tls=tls, seq=self._next_seq())
                conn.src_addr = tls.raw.get_extra_info("peername")  # type: ignore[union-attr]
                state = self.watcher.current
                if not conn.src_addr or not tunnel_peer_allowed(state, str(conn.src_addr[0])):
                    # Before any TLS work: nothing but a mesh node may even try a handshake.
                    ip = conn.src_addr[0] if conn.src_addr else "?"
                    conn.deny("tunnel_not_from_node",
                              f"tunnel from {ip}, which is not a mesh node address")
                    log.warning("refused tunnel from %s: %s", _fmt_addr(conn.src_addr), conn.reason)
                    self._finish(conn)
                    return False
                task = asyncio.get_running_loop().create_task(self._guard(self._inbound, conn))
                self._tasks[task] = conn
                task.add_done_callback(self._tasks.pop)
                return True

            if self.watcher.current.tunnel_security == "insecure-plaintext":
                return self._plaintext_tunnel()  # benchmarks only: no TLS at all
            return self.tls.server_connection(ep, on_made=on_made)

        return factory

    def _plaintext_tunnel(self) -> Endpoint:
        """``proxy.tunnelSecurity: insecure-plaintext``: the tunnel header is
        taken on trust (peer_verified false), as before mTLS existed."""

        def on_made(ep: Endpoint) -> None:
            if self._stopping:
                ep.reset()
                return
            self.counters["inbound_accepted"] += 1
            conn = Conn("inbound", ep, route="local", seq=self._next_seq())
            conn.src_addr = ep.transport.get_extra_info("peername")  # type: ignore[union-attr]
            if not conn.src_addr or not tunnel_peer_allowed(self.watcher.current,
                                                            str(conn.src_addr[0])):
                conn.deny("tunnel_not_from_node", "plaintext tunnel from a non-node address")
                ep.reset()
                self._finish(conn)
                return
            task = asyncio.get_running_loop().create_task(self._guard(self._inbound, conn))
            self._tasks[task] = conn
            task.add_done_callback(self._tasks.pop)

        return Endpoint("client", on_made=on_made)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let relays finish for `grace` seconds; abort the rest."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        if self._stats_server is not None:
            self._stats_server.close()
            self._stats_server = None
            with contextlib.suppress(OSError):
                os.unlink(self.stats_path)
        for attr in ("_watch_task", "_certs_task", "_policy_task"):
            t = getattr(self, attr)
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
                setattr(self, attr, None)
        if self._tasks and grace > 0:
            log.info("waiting up to %.1f s for %d active connection(s) to finish", grace, len(self._tasks))
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self._tasks:
            log.info("aborting %d connection(s) still active at shutdown", len(self._tasks))
            for conn in list(self._tasks.values()):
                if conn.result == "ok":
                    conn.fail("reset", "proxy shutting down")
                conn.reset_all()
            await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_flows and self._flows is not None:
            with contextlib.suppress(Exception):
                self._flows.close()
            self._flows = None
        if self._linker is not None:
            with contextlib.suppress(Exception):
                self._linker.close()
        if self._pool is not None:
            self._pool.close()
        for pool in self._src_pools.values():
            pool.close()
        self._src_pools.clear()
        self._access.close()

    async def serve(self, stop: asyncio.Event, grace: float = 5.0) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("shutting down: no longer accepting connections")
            await self.stop(grace)

    async def _watch_policies(self) -> None:
        while True:
            await asyncio.sleep(self.watcher.interval)
            try:
                if self.policies.check():
                    self._recheck("policy set changed")
            except Exception:  # noqa: BLE001 - keep watching; the previous set stays
                log.exception("authorization policy reload failed")
            self._access.flush()  # request lines buffered since the last connection line
            try:
                self.traffic.check()  # clusters pick the new settings up on their next use
            except Exception:  # noqa: BLE001
                log.exception("traffic policy reload failed")

    def _recheck(self, why: str) -> None:
        """Close (reset) every live destination-side connection the current
        policies no longer allow, with one log line each."""
        ps = self.policies.current
        state = self.watcher.current
        for conn in list(self._tasks.values()):
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
            self._record_decision(conn, d)
            conn.deny("policy", f"closed ({why}): policy: {d.reason}")
            log.warning("closed connection %s (%s) -> %s (%s): no longer allowed, denied by %s",
                        _fmt_addr(conn.src_addr), identity or "no identity", _fmt_addr(conn.dst_addr),
                        dst_key, self._decided_by(d))
            conn.reset_all()

    @staticmethod
    def _decided_by(d: Any) -> str:
        if d.policy is None:
            return "no ALLOW policy match"
        return f"policy {d.policy} rule {d.rule}"

    @staticmethod
    def _record_decision(conn: Conn, d: Any) -> None:
        conn.verdict = "allowed" if d.allowed else "denied"
        conn.policy = d.policy
        conn.rule = d.rule
        conn.audit = [{"policy": a.policy, "rule": a.rule} for a in d.audited]

    def _authorize(self, conn: Conn, state: ProxyState, identity: str | None, src_ip: str | None,
                   pod: Pod, port: int, *, http: bool = False) -> bool:
        """Decide a new destination-side connection; False: denied (the caller refuses it).

        ``http``: the connection will be served by the L7 session, which
        decides every request (``l7authz``); the connection itself is then
        let through even if its TCP decision is a deny (``DENY /admin``
        denies TCP traffic whole, but only /admin requests)."""
        d = authorize(self.policies.current, src_identity=identity, src_ip=src_ip, dst=pod, port=port)
        conn.authz = (identity, src_ip, pod.key, port)
        if http:
            conn.l7_authz = RequestAuthorizer(lambda: self.policies.current, identity=identity, src_ip=src_ip,
                                              namespace=pod.namespace, labels=pod.label_map, port=port,
                                              tcp_allowed=d.allowed)
            if not d.allowed:
                conn.verdict = "allowed"  # the connection; its requests are decided one by one
                return True
        self._record_decision(conn, d)
        if d.audited:
            log.info("audit: connection %s (%s) -> %s port %d matched %s", _fmt_addr(conn.src_addr),
                     identity or "no identity", pod.key, port,
                     ", ".join(f"{a.policy} rule {a.rule}" for a in d.audited))
        if d.allowed:
            return True
        conn.deny("policy", f"policy: {d.reason}")
        if conn.direction == "outbound":  # the tunnel's refusal is logged by _refuse
            log.warning("denied connection %s (%s) -> %s port %d: %s", _fmt_addr(conn.src_addr),
                        identity or "no identity", pod.key, port, conn.reason)
        return False

    def _state_changed(self, old: ProxyState, new: ProxyState) -> None:
        self.certs.update(new)
        for key in [k for k in self._src_pools if k not in new.pod_by_key]:
            self._src_pools.pop(key).close()  # that pod is gone
        for key in [k for k in self._clusters if k.rsplit(":", 1)[0] not in new.service_by_key]:
            del self._clusters[key]  # that service is gone
            self._cluster_stamps.pop(key, None)
        if len(self.policies.current):  # labels may have changed
            self._recheck("pod labels may have changed")
        if old.access_log != new.access_log:
            self._access.reopen(self._access_path(new))
            log.info("access log: %s, sampling %g", self._access.path or "off",
                     new.access_log.sampling)
        if old.listen != new.listen:
            log.warning(
                "listen settings changed (%s → %s); restart the proxy workers to apply them",
                old.listen,
                new.listen,
            )

    # ------------------------------------------------------------ stats

    def _access_path(self, state: ProxyState) -> str | None:
        """Where the access log goes: the state's path, else --access-log; None: off."""
        if not state.access_log.enabled:
            return None
        return state.access_log.path or self._access_arg

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def stats(self) -> dict[str, Any]:
        st = self.watcher.current
        for conn in self._tasks.values():  # live byte counts into the metrics
            if conn.relay is not None:
                self.metrics.flush(conn.seq, *conn.byte_counts())
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "node": st.node,
            "state_generation": st.generation,
            "state_reloads": self.watcher.reloads,
            "state_errors": self.watcher.errors,
            "state_last_error": self.watcher.last_error,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "active_connections": len(self._tasks),
            "counters": dict(self.counters),
            "certs": self.certs.snapshot(),
            "tls": self.tls.stats(),
            "access_log": {"path": self._access.path,
                           "sampling": st.access_log.sampling},
            "metrics": self.metrics.snapshot(),
            "http_metrics": self.http_metrics.snapshot(),
            "traffic": self.traffic.stats(),
            "clusters": self._cluster_stats(),
            "http": self._http_stats(),
            "policy": {"version": self.policies.current.version, "count": len(self.policies.current),
                       "reloads": self.policies.reloads, "errors": self.policies.errors,
                       "last_error": self.policies.last_error},
        }

    def _cluster_stats(self) -> dict[str, Any]:
        """Per service port: endpoints, the ones ejected now, and the breaker."""
        now = time.monotonic()
        out: dict[str, Any] = {}
        for key, c in self._clusters.items():
            healthy = set(c.healthy(now))
            out[key] = {"endpoints": [_fmt_addr(t) for t in c.targets],
                        "ejected": [_fmt_addr(t) for t in c.targets if t not in healthy],
                        "outstanding": {_fmt_addr(t): c.lb.outstanding(t) for t in c.targets}}
        return out

    def _http_stats(self) -> dict[str, Any]:
        pool = self._pool
        return {
            **self.http,
            "by_class": dict(self.http["by_class"]),
            "latency_ms_recent": list(self._latencies),
            "pool": {"connects": pool.connects if pool else 0, "reuses": pool.reuses if pool else 0,
                     "idle": pool.idle_count() if pool else 0},
        }

    def _on_http_response(self, conn: Conn, head: Any, status: int, elapsed: float, exchange: Any) -> None:
        h = self.http
        h["requests"] += 1
        cls = f"{status // 100}xx" if 100 <= status <= 599 else "other"
        h["by_class"][cls] = h["by_class"].get(cls, 0) + 1
        ms = elapsed * 1000.0
        h["latency_ms_sum"] += ms
        h["latency_ms_count"] += 1
        self._latencies.append(round(ms, 3))
        # Istio request metrics: the label ids are made once per connection
        # (and routed service), kept on the connection record.
        handles = conn.__dict__.get("_http_handles")
        if handles is None:
            handles = conn.__dict__["_http_handles"] = {}
        cluster = exchange.cluster
        hd = handles.get(cluster)
        if hd is None:
            hd = handles[cluster] = self.http_metrics.handle(
                conn.labels or conn.fallback_labels(self.watcher.current), cluster)
        flags = exchange.flags or "-"
        denied = False
        policy = None
        if status == 403 or flags != "-":
            policy = getattr(exchange, "policy", None)
            denied = "RBAC" in flags
            den = conn.denial  # (head, policy, rule) of the last request refused by policy
            if den is not None and den[0] is head and status == 403:
                denied, policy = True, policy or den[1]
                if flags == "-":
                    flags = "RBAC"  # Envoy's flag for a request refused by authorization policy
            if denied:
                self.http_metrics.deny(policy or "")
        self.http_metrics.observe(hd, status, flags, ms, exchange.request_body_bytes,
                                  exchange.response_body_bytes)
        if self._access.path is not None:
            st = self.watcher.current
            base = conn.log_base
            if base is None:  # the connection's part of every request line, made once
                base = conn.log_base = conn.record(self.worker_id)
                conn.log_key = conn.sample_key()
            base["ts"] = _utc_ms()
            if not self._access.write_request(base,
                                              f"{conn.log_key}#{h['requests']}",
                                              st.access_log.sampling, head, status, elapsed, exchange,
                                              flags=flags, policy=policy if denied else None):
                self.counters["access_log_skipped"] += 1

    # ------------------------------------------------------------ per connection

    async def _guard(self, handler: Any, conn: Conn) -> None:
        try:
            await handler(conn)
        except asyncio.CancelledError:
            conn.fail("reset", conn.reason or "cancelled at shutdown")
            conn.reset_all()
            raise
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception(
                "internal error on %s connection from %s; that connection was reset, the proxy keeps running "
                "(this is a bug: please report it with this traceback)",
                conn.direction,
                _fmt_addr(conn.src_addr),
            )
            conn.fail("reset", "internal error")
            conn.reset_all()
        finally:
            self._finish(conn)

    def _finish(self, conn: Conn) -> None:
        self.counters[f"result_{conn.result}"] = self.counters.get(f"result_{conn.result}", 0) + 1
        self.counters["bytes_sent"] += conn.bytes_sent
        self.counters["bytes_received"] += conn.bytes_received
        state = self.watcher.current
        if conn.deny_reason:
            self.metrics.deny(conn.deny_reason,
                              (conn.policy or "") if conn.deny_reason == "policy" else None)
        if not conn.labels:
            conn.labels = conn.fallback_labels(state)
        self.metrics.closed(conn.seq, conn.bytes_sent, conn.bytes_received, conn.result,
                            conn.labels)
        if self._access.path is None:
            return
        if sampled(conn.sample_key(), state.access_log.sampling):
            self._access.write(conn.record(self.worker_id))
        else:
            self.counters["access_log_skipped"] += 1

    def _opened(self, conn: Conn, state: ProxyState, src: Pod | None, dst: Pod | None,
                reporters: tuple[str, ...], service_name: str) -> None:
        """Both ends are known: count the connection as opened."""
        s = _peer_of(state, src, conn.src_identity)
        d = _peer_of(state, dst, conn.dst_identity)
        conn.labels = [m.labels_for(r, s, d, conn.service or m.UNKNOWN, service_name, conn.mtls)
                       for r in reporters]
        self.metrics.opened(conn.seq, conn.labels)

    def _link(self, conn: Conn) -> None:
        """Queue "the accepted and the upstream socket carry one connection"
        for the kernel flow table (``meshlet flows`` joins the legs).  The
        cookies are read now, while both sockets are surely open (two
        getsockopt calls); the map write happens once per loop iteration
        for every connection set up in it (one batched bpf(2) call)."""
        if self._linker is None or conn.upstream is None or conn.ready is not None:
            return  # (a service leg's client end is a socketpair, not a TCP flow)
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
        if not pairs or self._linker is None:
            return
        try:
            self._linker.link_many(pairs)
            self.counters["legs_linked"] += len(pairs)
        except Exception as e:  # noqa: BLE001 - observability must not break traffic
            self.counters["leg_link_errors"] += len(pairs)
            if not self._link_warned:
                self._link_warned = True
                log.warning("cannot link flow legs in the kernel flow table (%s); `meshlet flows` "
                            "will not join the proxy's legs (is the agent's datapath pinned?)", e)

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

    async def _connect(self, addr: tuple[str, int], state: ProxyState, name: str) -> Endpoint:
        """Connect upstream (plaintext) with SO_MARK and a timeout. Raises ConnectFailure."""
        sock = await self._open_socket(addr, state)
        try:
            _, ep = await asyncio.get_running_loop().create_connection(
                lambda: Endpoint(name, prebuffer_limit=state.buffer_size), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return ep  # type: ignore[return-value]

    async def _connect_tls(self, addr: tuple[str, int], state: ProxyState, *, node: str, src: str,
                           dst: str) -> Endpoint:
        """Connect to a peer node's tunnel port and do the mTLS client handshake
        as ``src``, expecting ``dst``. Raises ConnectFailure."""
        ep = Endpoint("upstream", prebuffer_limit=state.buffer_size)
        try:
            tls = self.tls.client_connection(ep, node=node, src=src, dst=dst)
        except HandshakeError as e:  # no certificate: fail closed before touching the network
            raise ConnectFailure("rejected", Status.FORBIDDEN, f"{e.reason}: {e.detail}") from None
        sock = await self._open_socket(addr, state)
        try:
            await asyncio.get_running_loop().create_connection(lambda: tls, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            await tls.wait_handshake(state.connect_timeout + self.header_timeout)
        except HandshakeError as e:
            raise ConnectFailure(
                "timeout" if e.reason == "timeout" else "rejected", Status.FORBIDDEN,
                f"mTLS handshake with node {node} ({_fmt_addr(addr)}) refused: {e.reason}: {e.detail}",
            ) from None
        return ep

    async def _open_socket(self, addr: tuple[str, int], state: ProxyState) -> socket.socket:
        """A connected, marked, non-blocking TCP socket. Raises ConnectFailure."""
        loop = asyncio.get_running_loop()
        target = _fmt_addr(addr)
        sock = socket.socket(_family_of(addr[0]), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            self._mark(sock, state.mesh_mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, addr), state.connect_timeout)
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

    # ---- L7 (proxy.l7)

    async def _sniff(self, ep: Endpoint, first: bytes = b"") -> tuple[bool, bytes]:
        """(is it HTTP/1.x, the bytes read so far). Waits at most
        L7_SNIFF_TIMEOUT for more bytes; silence, EOF or an error mean L4."""
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
        return verdict is Verdict.HTTP1 and not ep.lost, data

    def _l7_pool(self, state: ProxyState) -> UpstreamPool:
        if self._pool is None:
            self._pool = UpstreamPool(connect_timeout=state.connect_timeout + 1.0,
                                      buffer_size=state.buffer_size, open_socket=self._pool_socket)
        return self._pool

    async def _pool_socket(self, addr: tuple[str, int]) -> socket.socket:
        """The pool's connect: marked like every upstream socket."""
        try:
            return await self._open_socket(addr, self.watcher.current)
        except ConnectFailure as f:
            if f.result == "timeout":
                raise TimeoutError(f.reason) from None
            raise OSError(f.reason) from None

    async def _serve_l7(self, conn: Conn, ep: Endpoint, data: bytes, addr: tuple[str, int] | None,
                        state: ProxyState, *, first_sock: socket.socket | None = None,
                        choose: Any = None, pool: UpstreamPool | None = None) -> None:
        """Hand the client's transport (raw, or TLS plaintext side) to an L7
        session; return when the connection is over.

        Destination side: towards ``addr`` (the pod), every request authorized
        (``_on_http_request``); ``first_sock``, already connected to the pod,
        serves the first request.  Source side of a service: ``choose`` and
        ``pool`` (a service's cluster, the legs of this source pod)."""
        self.http["connections"] += 1
        done = asyncio.get_running_loop().create_future()
        own_pool = None
        if choose is None:
            cluster = self._pod_cluster(addr, state)
            choose = lambda _head: cluster  # noqa: E731
            if first_sock is not None:
                pool = own_pool = UpstreamPool(connect_timeout=state.connect_timeout + 1.0,
                                               buffer_size=state.buffer_size,
                                               open_socket=_first_then(first_sock, self._pool_socket))
            else:
                pool = self._l7_pool(state)
        on_request = functools.partial(self._on_http_request, conn) if conn.l7_authz is not None else None
        session = _ProxySession(choose, pool, L7Settings(buffer_size=state.buffer_size),
                                on_request=on_request,
                                on_response=functools.partial(self._on_http_response, conn), done=done)
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

    # ---- services (VIPs): the source side balances, the destination side authorizes

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
            log.warning("reset connection from %s to %s: service %s has no endpoints",
                        _fmt_addr(peer), _fmt_addr(conn.dst_addr), r.cluster)
            client.reset()
            return
        http = r.app_protocol == "http"
        data = b""
        if r.app_protocol is None and state.l7 is not False:
            http, data = await self._sniff(client)
            if not http:
                client.unread(data)
        if http:
            conn.labels = []  # its legs carry the TCP metrics, one per endpoint connection
            box: dict[str, Any] = {"state": state, "route": r}
            vip_ip, vip_port = r.vip

            def choose(_head: Any) -> Any:
                st = self.watcher.current
                if st is not box["state"]:
                    svc = st.service_at(vip_ip, vip_port)
                    if svc is None:
                        return Response(503, f"service {r.cluster} is gone\n".encode())
                    box["route"] = service_route(st, st.pod_by_key.get(src.key) or src, svc[0], svc[1],
                                                  vip_ip, vip_port, r.family)
                    box["state"] = st
                return self._service_cluster(st, box["route"])

            await self._serve_l7(conn, client, data, None, state, choose=choose,
                                 pool=self._source_pool(state, src.key, normalize_ip(peer[0])))
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
                cluster.finish(token, target, _OK if conn.result == "ok" else _RESET,
                               time.monotonic() - t0, time.monotonic())
            return
        conn.fail("refused", f"no endpoint of service {r.cluster} accepted the connection "
                             f"(tried {', '.join(_fmt_addr(t) or '?' for t in tried)})")
        client.reset()

    async def _probe_endpoint(self, state: ProxyState, d: Any) -> bool:
        """L4 service connections: is a Local endpoint accepting?  (A Tunnel
        endpoint is judged by its node proxy: always True here.)"""
        if not isinstance(d, Local):
            return True
        try:
            sock = await self._open_socket(d.addr, state)
        except ConnectFailure:
            return False
        sock.close()
        return True

    def _l7_for(self, state: ProxyState, pod: Pod) -> bool:
        """Serve HTTP/1.x to ``pod`` with the L7 session (``proxy.l7``)?  In
        ``auto`` mode: when an authorization policy with HTTP fields selects
        it, so that policy is decided per request."""
        mode = state.l7
        if mode is True or mode is False:
            return mode
        ps = self.policies.current
        key = (ps.version, pod.namespace, pod.labels)
        need = self._l7_need.get(key)
        if need is None:
            if len(self._l7_need) >= 4096:
                self._l7_need.clear()
            need = self._l7_need[key] = any(
                r.is_l7 for p in ps.selecting(pod.namespace, pod.label_map) for r in p.rules)
        return need

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
            c = self._pod_clusters[addr] = Cluster.single(addr, TrafficSettings(
                retries=Retries(attempts=0),
                timeouts=Timeouts(connect=state.connect_timeout, request=None)))
        return c

    def _service_cluster(self, state: ProxyState, r: ServiceRoute) -> Cluster:
        """This worker's long-lived cluster for a service port: endpoints from
        the state, settings from the TrafficPolicy in force."""
        ts = self.traffic.current
        stamp = (id(state), ts.version)
        key = f"{r.cluster}/{r.family}"
        c = self._clusters.get(key)
        if c is not None and self._cluster_stamps.get(key) == stamp:
            return c
        targets = [(ip, r.target_port) for ip in r.addrs]
        settings = ts.settings_for(r.namespace, r.name, r.port)
        now = time.monotonic()
        if c is None:
            c = self._clusters[key] = Cluster(r.cluster, targets, settings, now)
        else:
            c.update(targets, settings, now)
        self._cluster_stamps[key] = stamp
        return c

    def _source_pool(self, state: ProxyState, src_key: str, src_ip: str) -> UpstreamPool:
        """Keep-alive legs of one source pod to its services' endpoints."""
        pool = self._src_pools.get(src_key)
        if pool is None:
            pool = self._src_pools[src_key] = UpstreamPool(
                connect_timeout=state.connect_timeout + self.header_timeout + 1.0,
                buffer_size=state.buffer_size,
                open_socket=functools.partial(self._service_socket, src_key, src_ip))
        return pool

    async def _service_socket(self, src_key: str, src_ip: str, target: tuple) -> socket.socket:
        """An upstream leg for a service's L7 session: one end of a socketpair
        whose other end is served as an outbound connection from pod
        ``src_key`` to ``target`` (Local, Tunnel or Passthrough, with the
        usual policy, metrics and access log).  Returns once that connection
        reached its destination; raises OSError/TimeoutError if it did not."""
        state = self.watcher.current
        src = state.pod_by_key.get(src_key)
        pod = state.pod_by_ip.get(normalize_ip(target[0]))
        if src is None or pod is None:
            raise OSError(f"{_fmt_addr(target)} is no longer a pod of the inventory")
        d = endpoint_route(state, src, pod, target[1], ip=target[0])
        if isinstance(d, Reject):
            raise OSError(d.reason)
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        try:
            mine.setblocking(False)
            theirs.setblocking(False)
            _, ep = await loop.create_connection(
                lambda: Endpoint("client", prebuffer_limit=state.buffer_size), sock=theirs)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        conn = Conn("outbound", ep, seq=self._next_seq())  # type: ignore[arg-type]
        conn.ready = ready = loop.create_future()
        conn.src_addr = (src_ip, 0)
        conn.dst_addr = (target[0], target[1])
        conn.service = normalize_ip(target[0])
        self.counters["service_legs"] += 1

        async def leg(c: Conn) -> None:
            try:
                await self._forward(c, self.watcher.current, d, (src_ip, 0), target[1])
            finally:
                if not ready.done():
                    ready.set_exception(ConnectFailure(c.result, Status.UNREACHABLE, c.reason or "leg closed"))

        task = loop.create_task(self._guard(leg, conn))
        self._tasks[task] = conn
        task.add_done_callback(self._tasks.pop)
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

    def _on_http_request(self, conn: Conn, head: Any) -> Response | None:
        """L7 authorization of one request (``l7authz``): None lets it through."""
        az = conn.l7_authz
        if az is None:
            return None
        d = az.decide(head.method, head.path.path, head.host, head.headers)
        if d is None:
            if head.upgrade is not None:
                conn.upgrade_head = head
            return None
        if isinstance(d, Denial):
            return Response(d.status, (d.reason + "\n").encode("utf-8", "replace"))
        src = conn.src_identity or "no identity"
        what = f"{head.method.decode('latin-1')} {head.path.path}"
        if d.audited:
            log.info("audit: request %s (%s) -> %s %s matched %s", _fmt_addr(conn.src_addr), src,
                     conn.dst_pod, what, ", ".join(f"{a.policy} rule {a.rule}" for a in d.audited))
        if d.allowed:
            if head.upgrade is not None:
                conn.upgrade_head = head
            return None
        conn.requests_denied += 1
        conn.denial = (head, d.policy, d.rule)
        self.counters["requests_denied"] += 1
        log.warning("denied request %s (%s) -> %s %s: %s", _fmt_addr(conn.src_addr), src, conn.dst_pod,
                    what, self._decided_by(d))
        return Response(403, DENIED_BODY, [(b"Content-Type", b"text/plain")])

    async def _relay(self, conn: Conn, relay: Relay) -> None:
        result = await relay.done
        conn.bytes_sent = result.a_to_b
        conn.bytes_received = result.b_to_a
        if result.error and conn.result == "ok":
            conn.fail("reset", result.reason)
        elif not conn.reason:
            conn.reason = result.reason

    # ---- outbound

    async def _outbound(self, conn: Conn) -> None:
        client = conn.client
        state = self.watcher.current
        tr = client.transport
        assert tr is not None
        peer = tr.get_extra_info("peername")
        local = tr.get_extra_info("sockname")
        conn.src_addr = peer
        try:
            origin = self._flows.pop(peer, local)  # type: ignore[union-attr]
        except OSError as e:
            origin = None
            log.error("flow table lookup failed for %s: %s (is the agent's datapath pinned under %s?)",
                      _fmt_addr(peer), e, state.pin_dir)
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
            log.warning("rejected connection from %s to %s: %s",
                        _fmt_addr(peer), _fmt_addr(conn.dst_addr), decision.reason)
            client.reset()
            return
        if isinstance(decision, (Local, Tunnel)):
            conn.dst_pod = decision.pod.key
            conn.dst_identity = state.identity(decision.pod)
        conn.route = {Local: "local", Tunnel: "tunnel", Passthrough: "passthrough"}[type(decision)]
        conn.mtls = isinstance(decision, Tunnel) and state.tunnel_security == "mtls"
        http_data: bytes | None = None  # the first bytes of an HTTP/1 client (L7 on)
        if isinstance(decision, Local):
            if conn.ready is not None:
                # A service's leg: HTTP by construction (nothing sent yet). Parsed
                # again here only if this pod's policies need it; else relayed.
                if self._l7_for(state, decision.pod):
                    http_data = b""
            elif self._l7_for(state, decision.pod):
                is_http, data = await self._sniff(client)
                if is_http:
                    http_data = data
                else:
                    client.unread(data)
            if not self._authorize(conn, state, conn.src_identity, normalize_ip(peer[0]), decision.pod,
                                   dst_port, http=http_data is not None):
                client.reset()  # same node: the kernel's cgroup record is the source identity
                return
        if isinstance(decision, Local):  # this proxy is both ends' proxy
            self._opened(conn, state, src, decision.pod, ("source", "destination"), m.UNKNOWN)
        elif isinstance(decision, Tunnel):
            self._opened(conn, state, src, decision.pod, ("source",), m.UNKNOWN)
        else:
            self._opened(conn, state, src, None, ("source",), "PassthroughCluster")

        if http_data is not None:
            first = None
            if conn.ready is not None:  # connect now, so the service's session sees a connect failure as one
                try:
                    first = await self._open_socket(decision.addr, state)
                except ConnectFailure as f:
                    conn.fail(f.result, f.reason)
                    client.reset()
                    return
                _set_ready(conn)
            await self._serve_l7(conn, client, http_data, decision.addr, state, first_sock=first)
            return
        try:
            if isinstance(decision, Tunnel) and state.tunnel_security == "insecure-plaintext":
                upstream = await self._connect(decision.addr, state, "upstream")  # benchmarks only
                conn.peer_verified = False
            elif isinstance(decision, Tunnel):
                self.tls.session_cache_size = SESSION_CACHE_SIZE if state.tls_resumption else 0
                upstream = await self._connect_tls(decision.addr, state, node=decision.node,
                                                   src=conn.src_identity or "", dst=conn.dst_identity or "")
                conn.peer_verified = True
            else:
                upstream = await self._connect(decision.addr, state, "upstream")
        except ConnectFailure as f:
            reason = f.reason
            if isinstance(decision, Tunnel) and f.status is Status.FORBIDDEN and f.result == "rejected":
                conn.deny_reason = "no_certificate" if reason.startswith("no_certificate") \
                    else "mtls_refused"
            if isinstance(decision, Tunnel):
                if f.status is Status.FORBIDDEN and reason.startswith("no_certificate"):
                    log.error("reset connection from %s (%s) to %s: no certificate for identity %s; "
                              "failing closed (%s)", _fmt_addr(peer), conn.src_pod, _fmt_addr(conn.dst_addr),
                              conn.src_identity, reason)
                elif f.status is not Status.FORBIDDEN:
                    reason = (f"tunnel to node {decision.node}: {reason} (is the meshlet proxy running there, "
                              f"port {decision.tunnel_port} reachable?)")
            conn.fail(f.result, reason)
            client.reset()
            return
        conn.upstream = upstream
        self._link(conn)
        relay = conn.relay = Relay(client, upstream, buffer_size=state.buffer_size)
        if not isinstance(decision, Tunnel):
            _set_ready(conn)
            relay.start()
            await self._relay(conn, relay)
            return

        header = tunnel.encode_request(
            tunnel.TunnelRequest(
                dst=tunnel.Address(_family_of(decision.dst[0]), decision.dst[0], decision.dst[1]),
                identity=conn.src_identity or "",
                namespace=src.namespace,  # type: ignore[union-attr]
                name=src.name,  # type: ignore[union-attr]
                src=tunnel.Address(_family_of(normalize_ip(peer[0])), normalize_ip(peer[0]), peer[1]),
                # A service leg is HTTP: the peer connects to the pod and answers at once
                # instead of sniffing first (so a refused pod is a connect failure here).
                protocol="http/1.1" if conn.ready is not None else "",
            )
        )
        upstream.write(header)
        relay.forward(client)  # client bytes may be pipelined right behind the header
        try:
            resp, leftover = await self._read_response(upstream, state.connect_timeout + self.header_timeout)
        except (TimeoutError, tunnel.TunnelError, ConnectionError, EOFError) as e:
            what = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            conn.fail(
                "timeout" if isinstance(e, TimeoutError) else "reset",
                f"tunnel to node {decision.node} ({_fmt_addr(decision.addr)}) failed before its response: {what}",
            )
            relay.abort(conn.reason)
            await self._relay(conn, relay)
            return
        if not resp.ok:
            conn.fail(
                _STATUS_RESULT.get(resp.status, "rejected"),
                f"node {decision.node} answered {resp.status.name.lower().replace('_', '-')}: {resp.reason}",
            )
            relay.abort(conn.reason)
            await self._relay(conn, relay)
            return
        upstream.unread(leftover)
        _set_ready(conn)  # a service leg: the pod accepted, its session may send
        relay.forward(upstream)
        await self._relay(conn, relay)

    async def _read_response(self, upstream: Endpoint, timeout: float) -> tuple[tunnel.TunnelResponse, bytes]:
        decoder = tunnel.ResponseDecoder()
        async with asyncio.timeout(timeout):
            while True:
                data = await upstream.receive()
                if not data:
                    raise EOFError("tunnel closed before responding (is the peer a meshlet proxy of the same release?)")
                out = decoder.feed(data)
                if isinstance(out, tunnel.Decoded):
                    return out.message, out.leftover  # type: ignore[return-value]

    # ---- inbound (tunnel listener)

    async def _inbound(self, conn: Conn) -> None:
        ep = conn.client
        tls = conn.tls
        verified = None
        if tls is not None:
            try:
                await tls.wait_handshake(self.header_timeout)
            except HandshakeError as e:  # counted and logged by the TLS layer
                conn.deny("mtls_refused", f"mTLS handshake refused: {e.reason}: {e.detail}")
                return
            verified = tls.peer_identity
            conn.src_identity = verified
            conn.peer_verified = True
            conn.mtls = True
        state = self.watcher.current
        decoder = tunnel.RequestDecoder()
        try:
            async with asyncio.timeout(self.header_timeout):
                while True:
                    data = await ep.receive()
                    if not data:
                        conn.deny("bad_tunnel_header",
                                  "tunnel peer closed before sending a complete header")
                        ep.close()
                        return
                    out = decoder.feed(data)
                    if isinstance(out, tunnel.Decoded):
                        break
        except TimeoutError:
            conn.deny_reason = "bad_tunnel_header"
            await self._refuse(conn, Status.BAD_REQUEST, f"no complete tunnel header within {self.header_timeout:g}s")
            return
        except tunnel.TunnelError as e:
            conn.deny_reason = "bad_tunnel_header"
            await self._refuse(conn, e.status, str(e))
            return
        except ConnectionError as e:
            conn.fail("reset", f"tunnel peer reset before sending a header: {e}")
            return
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
        elif req.identity != verified:
            conn.deny_reason = "identity_mismatch"
            await self._refuse(conn, Status.FORBIDDEN,
                               f"the tunnel header claims identity {req.identity!r}, but the client "
                               f"certificate is {verified}")
            return
        pod = state.pod_by_ip.get(dst_ip)
        if pod is None or not pod.mesh or pod.node != state.node:
            if pod is None or not pod.mesh:
                why = f"{dst_ip} is not a mesh pod on node {state.node}"
            else:
                why = (f"{dst_ip} is pod {pod.key} on node {pod.node}, not on node {state.node} "
                       "(the sending node's state may be stale)")
            conn.deny_reason = "not_local"
            await self._refuse(conn, Status.NOT_LOCAL, why)
            return
        conn.dst_pod = pod.key
        conn.dst_identity = state.identity(pod)
        if tls is not None and (not tls.sni_named or tls.local_identity != conn.dst_identity):
            conn.deny_reason = "identity_mismatch"
            await self._refuse(conn, Status.FORBIDDEN,
                               f"the client authenticated this node as {tls.local_identity or 'nobody (no SNI)'}, "
                               f"but asks for pod {pod.key}, which is {conn.dst_identity}")
            return
        # Authorization: only a verified peer has an identity (plaintext tunnels: none).
        src_ip = normalize_ip(req.src.ip) if req.src is not None else None
        leftover = out.leftover
        hinted = req.protocol == "http/1.1"  # the source proxy parsed it (a service's leg)
        is_http = hinted and self._l7_for(state, pod)  # else the L4 path: it connects before answering
        if not hinted and self._l7_for(state, pod):
            is_http, leftover = await self._sniff(ep, leftover)
        if not self._authorize(conn, state, verified, src_ip, pod, req.dst.port, http=is_http):
            await self._refuse(conn, Status.FORBIDDEN, conn.reason)
            return
        self._opened(conn, state, state.pod_by_key.get(conn.src_pod or ""), pod, ("destination",),
                     m.UNKNOWN)
        if is_http:
            first = None
            if hinted:  # connect first: the source waits for this answer before sending
                try:
                    first = await self._open_socket((dst_ip, req.dst.port), state)
                except ConnectFailure as f:
                    await self._refuse(conn, f.status, f.reason, result=f.result)
                    return
            ep.write(tunnel.encode_response(tunnel.TunnelResponse(Status.OK)))
            await self._serve_l7(conn, ep, leftover, (dst_ip, req.dst.port), state, first_sock=first)
            return
        try:
            upstream = await self._connect((dst_ip, req.dst.port), state, "pod")
        except ConnectFailure as f:
            await self._refuse(conn, f.status, f.reason, result=f.result)
            return
        conn.upstream = upstream
        self._link(conn)
        relay = conn.relay = Relay(ep, upstream, buffer_size=state.buffer_size)
        ep.write(tunnel.encode_response(tunnel.TunnelResponse(Status.OK)))
        ep.unread(leftover)
        relay.start()
        await self._relay(conn, relay)

    async def _refuse(self, conn: Conn, status: Status, reason: str, result: str = "rejected") -> None:
        """Answer an error status, then close once the peer goes away."""
        ep = conn.client
        conn.fail(result, reason)
        if result == "rejected":
            log.warning("refused tunnel from %s: %s", _fmt_addr(conn.src_addr), reason)
        ep.write(tunnel.encode_response(tunnel.TunnelResponse(status, reason)))
        ep.write_eof()
        # Wait (bounded) for the peer to close, so our close does not turn into
        # an RST that could destroy the response before the peer reads it.
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(REFUSE_LINGER):
                while await ep.receive():
                    pass
        ep.close()
