"""One node proxy worker: the composition of its roles, its listeners and
its lifecycle.

``ProxyServer`` builds one frozen ``inputs.ProxyInputs`` (state watcher,
certificates and TLS contexts, policy and traffic watchers, metrics, access
log) and hands it to the roles, as ztunnel's ``src/proxy/`` does:

``outbound``     the outbound listener (15001): pods of this node → Local,
                 Tunnel, Passthrough, or a service VIP (LB, retries, L7)
``inbound``      the tunnel listener (15008): other nodes → pods of this
                 node, admitted by the pure ``admission`` functions
``destination``  authorization and L7 serving where a connection ends on
                 this node (the tunnel, and outbound's Local route)
``upstream``     connects: plain and mutual TLS, marked (``SO_MARK``);
                 leg links in the kernel flow table
``conn``         the connection record (``Conn``) and the live set (``Live``)
``stats``        counters, metrics and access-log accounting; the stats
                 socket

This module keeps what is per worker rather than per connection: the
listening sockets, the stats socket, the state/certificate/policy watchers
and their reactions (re-check live connections when policy or pod labels
change), and shutdown.  Protocol decisions live in ``routing`` (where to
go), ``admission`` (whether the destination side accepts), ``tunnel`` (the
header), ``relay`` (moving bytes) and ``l7`` (HTTP).

A crash on one connection is logged and resets that connection only.

Readiness and hand-over (several workers share the listeners with
SO_REUSEPORT, see ``agent.supervisor``): ``start()`` opens the stats
socket first (``ready: false``), then waits for the workload certificates
(bounded by ``ready_timeout``), and only then listens, so a new worker
never takes a connection it cannot serve; ``stop()`` closes the listeners
first (the kernel moves what was queued on them to a sibling, see
``limits.enable_listener_migration``) and lets live connections finish for
the drain time.  Out of file descriptors, a new connection is shed (reset,
result ``overload``, see ``conn.Live.shed``), keeping a reserve for the
worker's own files; after connections close, free heap memory goes back to the
system (``memory.trim``; ``agent.proxy.memory`` says what keeps memory after a
burst and what returns it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from agent.policy.http import set_default_path_parameters
from agent.proxy import memory
from agent.proxy import telemetry as m
from agent.proxy.authz import PolicyWatcher, policy_path
from agent.proxy.conn import Conn, ConnectFailure, Live, fmt_addr
from agent.proxy.destination import Destination
from agent.proxy.inbound import Inbound
from agent.proxy.inputs import ProxyInputs
from agent.proxy.limits import nofile_limit
from agent.proxy.log import AccessLog
from agent.proxy.outbound import FlowSource, Outbound
from agent.proxy.relay import Endpoint
from agent.proxy.spans import Tracing, start_tracing
from agent.proxy.splice import Splicer
from agent.proxy.state import ProxyState, StateWatcher
from agent.proxy.stats import Accounting, StatsProtocol, cluster_stats, stats_socket_path
from agent.proxy.tls import TlsContexts
from agent.proxy.upstream import SO_MARK, LegLinker, Upstream
from agent.proxy.watch import TrafficWatcher
from agent.proxy.workload_certs import CertManager

if TYPE_CHECKING:
    from agent.datapath.reuseport import TunnelSpread

# ConnectFailure, SO_MARK and stats_socket_path are re-exported: they lived here before the split.
__all__ = ["ProxyServer", "ConnectFailure", "SO_MARK", "stats_socket_path"]

log = logging.getLogger("meshlet.proxy")

BACKLOG = 4096
HEADER_TIMEOUT = 5.0
READY_TIMEOUT = 30.0  # the longest start() waits for certificates before listening anyway
MAINTENANCE_INTERVAL = 2.0
TUNNEL_LOAD_INTERVAL = 1.0  # seconds between writes of this worker's tunnel load (agent.datapath.reuseport)


class ProxyServer:
    """One proxy worker. ``start()``, then ``stop()`` (or ``serve(stop_event)``)."""

    def __init__(
        self,
        watcher: StateWatcher,
        *,
        flow_table: FlowSource | None = None,
        worker_id: int = 0,
        workers: int = 1,
        access_log: str | None = None,
        stats_path: str | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        certs: CertManager | None = None,
        linker: LegLinker | None = None,
        max_series: int = m.MAX_SERIES,
        ready_timeout: float = READY_TIMEOUT,
        freeze_heap: bool = False,
    ) -> None:
        self.watcher = watcher
        # Freeze the heap before listening (memory.freeze_heap): the worker
        # process sets it; an in-process server (tests) leaves its host's heap alone.
        self.freeze_heap = freeze_heap
        self.worker_id = worker_id
        self.workers = workers  # the listeners' slots (see _spread_listener)
        # How new connections reach this node's workers, per listener group
        # ("tunnel", "outbound") and family: "least-loaded", or "hash: <why
        # not>" (the kernel's SO_REUSEPORT hash).
        self.spread_modes: dict[str, dict[str, str]] = {"tunnel": {}, "outbound": {}}
        self._spreads: dict[str, TunnelSpread] = {}
        self._spread_task: asyncio.Task | None = None
        self.header_timeout = header_timeout
        self.ready_timeout = ready_timeout
        self.ready = False  # listening: certificates loaded (or ready_timeout passed)
        self._stats_ino: int | None = None  # the stats socket this worker bound (not a successor's)
        self.trims = 0  # memory handed back after bursts (``_maintain``)
        self.stats_path = stats_path if stats_path is not None else stats_socket_path(watcher.path, worker_id)
        self._own_flows = flow_table is None
        # Workload certificates (in memory only) and the TLS contexts built on them.
        self.certs = certs if certs is not None else CertManager.from_state(watcher.current)
        self.tls = TlsContexts(self.certs)
        self._access_arg = access_log
        self.metrics = m.TcpMetrics(max_series)
        self.http_metrics = m.HttpMetrics(max_series)  # istio_request* (L7 requests)
        # Services: TrafficPolicies (traffic.json next to the state file).
        self.traffic = TrafficWatcher.for_state(watcher.path)
        # Authorization policies: policies.json next to the state file.
        self.policies = PolicyWatcher(policy_path(watcher.path), self._local_workloads)
        self.inputs = ProxyInputs(
            watcher=watcher,
            worker_id=worker_id,
            header_timeout=header_timeout,
            certs=self.certs,
            tls=self.tls,
            policies=self.policies,
            traffic=self.traffic,
            metrics=self.metrics,
            http_metrics=self.http_metrics,
            access=AccessLog(self._access_path(watcher.current)),
        )
        # The roles, sharing the inputs; per-worker mutable state lives in the
        # role that owns it (accounting, live connections, pools, clusters).
        self.accounting = Accounting(self.inputs)
        self.counters = self.accounting.counters
        self.live = Live(self.accounting.finish, self.accounting.internal_error)
        self.upstream = Upstream(self.inputs, self.counters, linker)
        self.destination = Destination(self.inputs, self.accounting, self.upstream)
        self.outbound = Outbound(
            self.inputs, self.accounting, self.live, self.upstream, self.destination, flow_table
        )
        self.inbound = Inbound(self.inputs, self.accounting, self.live, self.upstream, self.destination)
        self._servers: list[asyncio.AbstractServer] = []
        self._stats_server: asyncio.AbstractServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._certs_task: asyncio.Task[None] | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self._maint_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self.tracing: Tracing | None = None  # span export (tracing.otlpEndpoint), started by start()
        self.addresses: dict[str, list[tuple]] = {"outbound": [], "tunnel": []}
        if watcher.on_change is None:
            watcher.on_change = self._state_changed

    # ------------------------------------------------------------ lifecycle

    def _open_splicer(self, pin_dir: str) -> Splicer | None:
        """The same-node splice, when the agent pinned its maps (the kernel
        has the hooks and proxy.splice is on); else None: userspace relay."""
        from agent.datapath.splicemap import SpliceMaps  # lazy, as the flow table

        maps = SpliceMaps(pin_dir)
        if not maps.available():
            log.info("no splice maps pinned under %s: same-node connections use the userspace relay", pin_dir)
            return None
        return Splicer(maps, self.accounting.counters)

    def _unfile_upstream(self, sock: socket.socket) -> None:
        sp = self.outbound.splicer
        if sp is not None:
            sp.unfile_upstream(sock)

    async def start(self) -> None:
        self.upstream.unfile = self._unfile_upstream
        state = self.watcher.current
        # the L7 session's parsers follow proxy.pathParameters (one setting per worker process)
        set_default_path_parameters(state.path_parameters)
        if self.outbound.splicer is None and state.splice:
            self.outbound.splicer = self._open_splicer(state.pin_dir)
        if self.outbound.flows is None:
            # Lazy: keeps the datapath (and anything it imports) out of unit tests.
            from agent.datapath.origdst import FlowTable

            try:
                self.outbound.flows = FlowTable(state.pin_dir)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"cannot open the flow table pinned under {state.pin_dir}: {e.strerror or e}; "
                    "has the agent loaded and pinned the datapath (is bpffs mounted)?",
                ) from e
            if self.upstream.linker is None:
                from agent.datapath.flowtable import FlowLinker

                self.upstream.linker = FlowLinker(state.pin_dir)
        loop = asyncio.get_running_loop()
        self.inputs.access.flush_after(loop.call_later)  # one write(2) per FLUSH_DELAY, not per line
        self.live.loop = loop
        try:
            await self._start_stats()  # answers ``ready: false`` until the listeners are up
            self._certs_task = loop.create_task(self.certs.run())
            await self._wait_certificates()
            state = self.watcher.current  # it may have changed while waiting
            self._start_tracing(state)  # before the first request
            if self.freeze_heap:
                log.info(
                    "heap frozen before listening: %d objects out of the collector's sight",
                    memory.freeze_heap(),
                )
                memory.trim()  # start-up garbage (memory.MALLOC_TUNING: glibc keeps it otherwise)
            await self._start_listeners(state)
        except BaseException:
            await self.stop(grace=0)
            raise
        self.ready = True
        self.live.fd_cap = nofile_limit() - self.live.FD_RESERVE  # __main__ may have raised it
        self._watch_task = loop.create_task(self.watcher.run())
        self._policy_task = loop.create_task(self._watch_policies())
        self._maint_task = loop.create_task(self._maintain())
        if self._spreads:
            self._spread_task = loop.create_task(self._publish_loads())
        log.info(
            "proxy worker %d serving node %s (state generation %d): outbound %s, tunnel %s",
            self.worker_id,
            state.node,
            state.generation,
            ", ".join(fmt_addr(a) or "?" for a in self.addresses["outbound"]),
            ", ".join(fmt_addr(a) or "?" for a in self.addresses["tunnel"]),
        )

    def _certificates_settled(self) -> bool:
        """The trust bundle is in and every local identity has its
        certificate, or the CA answered that it will not sign it."""
        snap = self.certs.snapshot()
        return bool(snap["bundle_roots"]) and all(
            i["serial"] is not None or i["failures"] for i in snap["identities"]
        )

    async def _wait_certificates(self) -> None:
        """Until every local identity has its certificate (and the bundle is
        in), so the first tunnel connections are not refused for want of one.
        Bounded: with the agent's CA away, a worker still serves what needs no
        certificate (same-node traffic) and fails closed on the rest."""
        if self.ready_timeout <= 0:
            return
        try:
            async with asyncio.timeout(self.ready_timeout):
                while not self._certificates_settled():
                    await asyncio.sleep(0.02)
            log.info("workload certificates loaded (%d identities); listening", len(self.certs.identities()))
        except TimeoutError:
            log.warning(
                "listening without certificates for %s after %.0f s (%s): tunnel connections from "
                "those identities are refused until they arrive",
                ", ".join(sorted(self.certs.wanted() - set(self.certs.identities()))) or "the trust bundle",
                self.ready_timeout,
                self.certs.last_error or "the agent's CA has not answered",
            )

    async def _start_listeners(self, state: ProxyState) -> None:
        loop = asyncio.get_running_loop()
        lst = state.listen
        for ip, family in ((lst.ipv4, socket.AF_INET), (lst.ipv6, socket.AF_INET6)):
            if not ip:
                continue
            for kind, port, factory in (
                ("outbound", lst.outbound_port, self._outbound_factory()),
                ("tunnel", lst.tunnel_port, self.inbound.factory),
            ):
                sock = self._listen_socket(family, ip, port, kind)
                self._spread_listener(kind, sock, state.pin_dir)
                srv = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
                self._servers.append(srv)
                self.addresses[kind].append(sock.getsockname())

    def _spread_listener(self, kind: str, sock: socket.socket, pin_dir: str) -> None:
        """Deal the connections this listener accepts to the node's
        least-loaded worker (``agent.datapath.reuseport``): the tunnel
        listener by the tunnel connections each worker holds (a node gets
        few, long-lived tunnels, and SO_REUSEPORT's hash alone can put all of
        a peer's on one worker), the outbound listener by each worker's active
        connections (a pod's few long-lived connections, an HTTP/2 client's
        one, likewise).  Where the kernel refuses, the hash keeps serving."""
        modes = self.spread_modes[kind]
        fam = "ipv6" if sock.family == socket.AF_INET6 else "ipv4"
        if not os.path.isdir(pin_dir):
            modes[fam] = f"hash: no pin directory {pin_dir}"
            log.info("no pin directory %s: %s connections are spread by the kernel's hash", pin_dir, kind)
            return
        from agent.datapath.reuseport import TunnelSpread  # lazy, as the flow table

        try:
            spread = self._spreads.get(kind)
            if spread is None:
                spread = self._spreads[kind] = TunnelSpread(pin_dir, self.worker_id, self.workers, kind)
            spread.add_listener(sock)
        except OSError as e:
            modes[fam] = f"hash: {e.strerror or e}"
            log.warning(
                "%s; %s connections are spread by the kernel's hash, which can put all of a peer's %s "
                "on one worker (the SK_REUSEPORT program needs CAP_BPF)",
                e.strerror or e,
                kind,
                "tunnels" if kind == "tunnel" else "long-lived connections",
            )
            return
        modes[fam] = "least-loaded"

    def _loads(self) -> dict[str, int]:
        """What each listener group's pick weighs: the tunnel connections this
        worker holds, and its active connections."""
        return {"tunnel": self.inbound.tunnel_load(), "outbound": len(self.live.tasks)}

    async def _publish_loads(self) -> None:
        """Write this worker's loads for the least-loaded picks about once a
        second (two bpf(2) calls per group), until a successor takes its slot."""
        failed = False
        handed: set[str] = set()  # groups whose slot a successor took
        while len(handed) < len(self._spreads):
            await asyncio.sleep(TUNNEL_LOAD_INTERVAL)
            loads = self._loads()
            for kind, spread in list(self._spreads.items()):
                if kind in handed:
                    continue
                try:
                    if not spread.publish(loads[kind]):
                        log.info(
                            "%s slot %d taken by a successor: no longer publishing this worker's load",
                            kind,
                            self.worker_id,
                        )
                        handed.add(kind)
                        continue
                    failed = False
                except OSError as e:
                    if not failed:
                        log.warning("cannot publish this worker's %s load: %s", kind, e.strerror or e)
                    failed = True

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
            raise OSError(
                e.errno, f"cannot listen for {kind} connections on {fmt_addr((ip, port))}: {e.strerror}{hint}"
            ) from e
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
        self._stats_server = await loop.create_unix_server(lambda: StatsProtocol(self.stats), path)
        with contextlib.suppress(OSError):
            self._stats_ino = os.stat(path).st_ino

    def _outbound_factory(self) -> Any:
        live = self.live
        counters = self.counters
        next_seq = self.accounting.next_seq
        handle = self.outbound.handle

        def on_made(ep: Endpoint) -> None:
            if live.stopping:
                ep.reset()
                return
            counters["outbound_accepted"] += 1
            conn = Conn("outbound", ep, seq=next_seq())
            if live.no_fd_to_spare(ep.transport):
                live.shed(conn)
                return
            live.spawn(handle, conn)

        return lambda: Endpoint("client", on_made=on_made)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let relays finish for `grace` seconds; abort the rest."""
        self.live.stopping = True
        self.ready = False
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        self.inbound.drain("proxy shutting down")  # multiplexed tunnels: GOAWAY, open streams finish
        if self._stats_server is not None:
            self._stats_server.close()
            self._stats_server = None
            # A successor (an upgrade) may have bound the path since: leave its socket alone.
            with contextlib.suppress(OSError):
                if os.stat(self.stats_path).st_ino == self._stats_ino:
                    os.unlink(self.stats_path)
        for attr in ("_watch_task", "_certs_task", "_policy_task", "_maint_task", "_spread_task"):
            t = getattr(self, attr)
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
                setattr(self, attr, None)
        tasks = self.live.tasks
        if tasks and grace > 0:
            log.info("waiting up to %.1f s for %d active connection(s) to finish", grace, len(tasks))
            await asyncio.wait(list(tasks), timeout=grace)
        if tasks:
            log.info("aborting %d connection(s) still active at shutdown", len(tasks))
            for conn in list(tasks.values()):
                if conn.result == "ok":
                    conn.fail("reset", "proxy shutting down")
                conn.reset_all()
            await asyncio.wait(list(tasks), timeout=1.0)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_flows and self.outbound.flows is not None:
            with contextlib.suppress(Exception):
                self.outbound.flows.close()
            self.outbound.flows = None
        if self.outbound.splicer is not None:
            with contextlib.suppress(Exception):
                self.outbound.splicer.close()
            self.outbound.splicer = None
        for spread in self._spreads.values():
            spread.close()
        self._spreads.clear()
        self.upstream.close()
        self.destination.close()
        self.outbound.close()
        self.inputs.access.close()
        tr, self.tracing = self.tracing, None
        if tr is not None:  # one last export, off the loop, bounded
            self.accounting.spans = None
            await asyncio.to_thread(tr.close, min(2.0, tr.cfg.export_timeout + 0.5))

    async def serve(self, stop: asyncio.Event, grace: float = 5.0) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("shutting down: no longer accepting connections")
            await self.stop(grace)

    # ------------------------------------------------------------ watchers

    async def _maintain(self) -> None:
        """Return memory after connections closed, when ``memory.TrimSchedule``
        says a burst is closing or over, or ``memory.IdleTrim`` that the
        worker went quiet after traffic: collect the cyclic garbage they left
        (transports and protocols refer to each other), then ``malloc_trim``;
        else glibc keeps the freed pages and the worker's RSS stays at its
        peak."""
        schedule = memory.TrimSchedule()
        idle = memory.IdleTrim()  # and once quiet after any traffic (a bulk stream is no burst)
        idle.due(time.process_time(), time.monotonic())  # its first sample: the work since counts
        pooled = 0
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            burst = schedule.due(len(self.live.tasks), self.accounting.finished)
            # A pooled tunnel connection closed (idle expiry): its TLS buffers
            # (grown to the largest batch it sent) are freed only by the collector.
            was, pooled = pooled, len(self.upstream.mux_pool.all()) + len(self.inbound.sessions)
            if idle.due(time.process_time(), time.monotonic()) or burst or pooled < was:
                gc.collect()
                memory.trim()
                self.trims += 1

    def _local_workloads(self) -> list[tuple[str, dict[str, str]]]:
        """(namespace, labels) of each distinct mesh pod of this node: the
        workloads whose rule index a policy load builds ahead (off the loop)."""
        st = self.watcher.current
        seen = {(p.namespace, p.labels): p for p in st.pods if p.node == st.node and p.mesh}
        return [(p.namespace, p.label_map) for p in seen.values()]

    async def _watch_policies(self) -> None:
        while True:
            await asyncio.sleep(self.policies.interval)
            try:
                # loaded (and indexed for this node's pods) in a worker thread;
                # swapped in one step: traffic keeps flowing meanwhile
                if await self.policies.check_async():
                    await self._recheck_async("policy set changed")
            except Exception:
                log.exception("authorization policy reload failed")
            self.inputs.access.flush()  # request lines buffered since the last connection line
            try:
                await self.traffic.check_async()  # clusters pick the new settings up on their next use
            except Exception:
                log.exception("traffic policy reload failed")

    def _recheck(self, why: str) -> None:
        """Close (reset) every live destination-side connection the current
        policies no longer allow, with one log line each."""
        self.destination.recheck(why, list(self.live.tasks.values()))

    async def _recheck_async(self, why: str, chunk: int = 256) -> None:
        """:meth:`_recheck` in chunks, yielding to the event loop between
        them, so re-checking 10,000 live connections does not stall traffic."""
        conns = list(self.live.tasks.values())
        for i in range(0, len(conns), chunk):
            self.destination.recheck(why, conns[i : i + chunk])
            if i + chunk < len(conns):
                await asyncio.sleep(0)

    def _start_tracing(self, state: ProxyState) -> None:
        """Span export per the state's ``tracing`` (``agent.proxy.spans``);
        a previous exporter is stopped in a thread of its own (never the loop)."""
        old = self.tracing
        try:
            tr = start_tracing(state.tracing, self.worker_id, lambda: self.watcher.current)
        except Exception as e:  # noqa: BLE001 - observability must not stop the proxy: serve without spans
            log.error("trace spans off: cannot start the exporter to %s: %s", state.tracing.otlp_endpoint, e)
            tr = None
        self.tracing = tr
        self.accounting.spans = None if tr is None else tr.recorder
        if old is not None:
            threading.Thread(target=old.close, name="meshlet-span-export-stop", daemon=True).start()
        if tr is not None or old is not None:
            log.info(
                "trace spans: %s",
                f"to {state.tracing.otlp_endpoint}, new traces sampled at {state.tracing.sample_rate:g}"
                if tr is not None
                else "off",
            )

    def _state_changed(self, old: ProxyState, new: ProxyState) -> None:
        self.certs.update(new)
        if old.tracing != new.tracing and self.ready:
            self._start_tracing(new)
        if old.path_parameters != new.path_parameters:
            set_default_path_parameters(new.path_parameters)
            log.info("path parameters: %s", new.path_parameters)
        self.outbound.state_changed(new)
        sp = self.outbound.splicer
        if sp is not None and (not new.splice or not sp.maps.current()):
            # proxy.splice off, or maps replaced: connections spliced before keep
            # the maps they use, which close when the last of them ends.
            sp.retire()
            self.outbound.splicer = sp = None
        if new.splice and self.ready and sp is None:
            # proxy.splice turned on (the agent pinned the maps before publishing the state)
            self.outbound.splicer = self._open_splicer(new.pin_dir)
        if len(self.policies.current):  # labels may have changed
            self._recheck("pod labels may have changed")
        if old.access_log != new.access_log:
            access = self.inputs.access
            access.reopen(self._access_path(new))
            log.info("access log: %s, sampling %g", access.path or "off", new.access_log.sampling)
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

    def _spread_stats(self, kind: str) -> dict[str, Any]:
        """``stats()["tunnel_spread"]`` / ``["outbound_spread"]``: the pick per
        family, this worker's load and what it last published."""
        spread = self._spreads.get(kind)
        return {
            "workers": self.workers,
            **self.spread_modes[kind],
            "load": self._loads()[kind],
            "published": None if spread is None else spread.published,
        }

    def stats(self) -> dict[str, Any]:
        st = self.watcher.current
        tasks = self.live.tasks
        for conn in tasks.values():  # live byte counts into the metrics
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
            "ready": self.ready,
            "active_connections": len(tasks),
            "fd_limit": nofile_limit(),
            "overloads": self.live.overloads,
            "memory": {**memory.report(), "trims": self.trims},
            "counters": dict(self.counters),
            "certs": self.certs.snapshot(),
            "tls": self.tls.stats(),
            "tunnel_mux": {"out": self.upstream.mux_pool.stats(), "in": self.inbound.mux_stats()},
            "tunnel_spread": self._spread_stats("tunnel"),
            "outbound_spread": self._spread_stats("outbound"),
            "access_log": {"path": self.inputs.access.path, "sampling": st.access_log.sampling},
            "tracing": None if self.tracing is None else self.tracing.stats(),
            "metrics": self.metrics.snapshot(),
            "http_metrics": self.http_metrics.snapshot(),
            "traffic": self.traffic.stats(),
            "clusters": cluster_stats(self.outbound.clusters),
            "http": self.accounting.http_stats(self.destination.pool),
            "policy": {
                "version": self.policies.current.version,
                "count": len(self.policies.current),
                "reloads": self.policies.reloads,
                "errors": self.policies.errors,
                "last_error": self.policies.last_error,
                "last_load": self.policies.last_load,
            },
        }
