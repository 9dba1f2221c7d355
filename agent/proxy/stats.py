"""One worker's accounting and its stats endpoint.

``Accounting`` owns the per-worker counters, the L7 request counters and
recent latencies, and what happens when a connection opens (metrics
labels) and finishes (counters, metrics, access log), and when an L7
response goes out (request metrics, request access-log line).  The
``stats()`` document itself is put together by ``server.ProxyServer``,
which sees every role; ``StatsProtocol`` serves it as one JSON line on a
Unix socket (``stats_socket_path``), read by the agent and ``meshlet``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.proxy import telemetry as m
from agent.proxy.conn import Conn, fmt_addr, peer_of, utc_ms
from agent.proxy.inputs import ProxyInputs
from agent.proxy.log import LineBase, sampled
from agent.proxy.spans import SpanRecorder
from agent.proxy.state import Pod, ProxyState
from agent.traffic.upstream_cluster import Cluster

__all__ = ["Accounting", "StatsProtocol", "cluster_stats", "stats_socket_path", "L7_LATENCY_SAMPLES"]

L7_LATENCY_SAMPLES = 1024  # recent request latencies kept for stats()
LABEL_CACHE_SIZE = 1024  # metric label sets kept per pair of connection ends (Accounting.opened)


def stats_socket_path(state_path: str, worker_id: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), f"proxy-{worker_id}.sock")


class StatsProtocol(asyncio.Protocol):
    """Writes ``snapshot()`` as one JSON line, then closes."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            body = json.dumps(self.snapshot(), separators=(",", ":")).encode() + b"\n"
            # a stream server's transport is a WriteTransport; asyncio types it as BaseTransport
            transport.write(body)  # type: ignore[attr-defined]
        finally:
            transport.close()


class Accounting:
    """Counters, metrics and access log of one worker's connections."""

    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs
        self._seq = 0
        self.finished = 0  # connections over (any result)
        self.counters: dict[str, int] = {
            "outbound_accepted": 0,
            "inbound_accepted": 0,
            "result_ok": 0,
            "result_refused": 0,
            "result_reset": 0,
            "result_timeout": 0,
            "result_rejected": 0,
            "result_overload": 0,
            "handshakes_shed": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "flow_misses": 0,
            "internal_errors": 0,
            "legs_linked": 0,
            "leg_link_errors": 0,
            "access_log_skipped": 0,
            "requests_denied": 0,  # refused by authorization policy (403)
            "requests_unauthenticated": 0,  # refused by end-user authentication (401: invalid JWT)
            "service_legs": 0,
            "spliced": 0,  # same-node relays handed to the kernel (agent.proxy.splice)
            "splice_skipped": 0,  # not spliced: not two TCP sockets, or a pod already ended it
            "splice_failed": 0,  # the kernel refused the insert: relayed in userspace
            # node-to-node tunnels: TLS connections vs the pod connections (streams) they carry
            "tunnel_connections_out": 0,  # meshlet-mux/1 connections dialed
            "tunnel_connections_in": 0,  # meshlet-mux/1 connections accepted
            "tunnel_streams_out": 0,
            "tunnel_streams_in": 0,
            "tunnel_legacy": 0,  # dials a peer answered with meshlet-tunnel/1 (one connection per stream)
            "tunnel_idle_closed": 0,
            "tunnel_mux_errors": 0,
        }
        # L7 (proxy.l7): per-request counters.
        self.http: dict[str, Any] = {
            "connections": 0,  # downstream connections served by the L7 session
            "requests": 0,  # responses reported (on_response)
            "by_class": {},  # "2xx": n ... by the status the client got
            "latency_ms_sum": 0.0,
            "latency_ms_count": 0,
        }
        self.latencies: deque[float] = deque(maxlen=L7_LATENCY_SAMPLES)
        self.spans: SpanRecorder | None = None  # trace spans (server.py sets it when exporting)
        self._labels: dict[tuple[Any, ...], tuple[Any, Any, list[tuple[str, ...]]]] = {}  # see opened()
        self._labels_state: ProxyState | None = None  # the snapshot _labels were made from

    def next_seq(self) -> int:
        """A new per-worker connection number (the metrics' handle)."""
        self._seq += 1
        return self._seq

    def internal_error(self) -> None:
        self.counters["internal_errors"] += 1

    def opened(
        self,
        conn: Conn,
        state: ProxyState,
        src: Pod | None,
        dst: Pod | None,
        reporters: tuple[str, ...],
        service_name: str,
    ) -> None:
        """Both ends are known: count the connection as opened."""
        # The label sets depend on the state snapshot (its identities), the two
        # pods and these values only: made once per pair of ends, not per
        # connection.  An entry keeps its pods, so the ids in its key stay theirs.
        key = (
            id(src),
            id(dst),
            conn.src_identity,
            conn.dst_identity,
            conn.service,
            service_name,
            conn.mtls,
            reporters,
        )
        hit = self._labels.get(key) if self._labels_state is state else None
        if hit is not None and hit[0] is src and hit[1] is dst:
            labels = hit[2]
        else:
            if self._labels_state is not state or len(self._labels) >= LABEL_CACHE_SIZE:
                self._labels.clear()
                self._labels_state = state
            s = peer_of(state, src, conn.src_identity)
            d = peer_of(state, dst, conn.dst_identity)
            svc = conn.service or m.UNKNOWN
            labels = [m.labels_for(r, s, d, svc, service_name, conn.mtls) for r in reporters]
            self._labels[key] = (src, dst, labels)
        conn.labels = labels  # shared, never changed in place
        self.inputs.metrics.opened(conn.seq, labels)

    def finish(self, conn: Conn) -> None:
        """The connection is over (or was refused): count it, close its
        metrics series, write its access-log line."""
        inp = self.inputs
        if conn.carrier:  # a multiplexed tunnel connection: counted by its streams
            return
        self.finished += 1
        self.counters[f"result_{conn.result}"] = self.counters.get(f"result_{conn.result}", 0) + 1
        self.counters["bytes_sent"] += conn.bytes_sent
        self.counters["bytes_received"] += conn.bytes_received
        state = inp.watcher.current
        if conn.deny_reason:
            inp.metrics.deny(conn.deny_reason, (conn.policy or "") if conn.deny_reason == "policy" else None)
        if not conn.labels:
            conn.labels = conn.fallback_labels(state)
        inp.metrics.closed(conn.seq, conn.bytes_sent, conn.bytes_received, conn.result, conn.labels)
        access = inp.access
        if access.path is None:
            return
        rate = state.access_log.sampling
        if rate >= 1.0 or sampled(conn.sample_key(), rate):  # (the key only when it matters)
            access.write(conn.record(inp.worker_id))
        else:
            self.counters["access_log_skipped"] += 1

    def on_http_response(self, conn: Conn, head: Any, status: int, elapsed: float, exchange: Any) -> None:
        """The L7 session answered one request (``L7Session.on_response``)."""
        inp = self.inputs
        h = self.http
        h["requests"] += 1
        cls = f"{status // 100}xx" if 100 <= status <= 599 else "other"
        h["by_class"][cls] = h["by_class"].get(cls, 0) + 1
        ms = elapsed * 1000.0
        h["latency_ms_sum"] += ms
        h["latency_ms_count"] += 1
        self.latencies.append(round(ms, 3))
        # Istio request metrics: the label ids are made once per connection
        # (and routed service), kept on the connection record.
        handles = conn.http_handles
        if handles is None:
            handles = conn.http_handles = {}
        cluster = exchange.cluster
        hd = handles.get(cluster)
        if hd is None:
            hd = handles[cluster] = inp.http_metrics.handle(
                conn.labels or conn.fallback_labels(inp.watcher.current), cluster
            )
        flags = exchange.flags or "-"
        g = exchange.grpc_status  # gRPC (HTTP/2): refused by policy is HTTP 200 + grpc-status 7
        denial = None
        if conn.denials:  # this request refused by the proxy itself (on_http_request)?
            den = conn.denials.pop(id(head), None)
            if den is not None and den[0] is head:
                denial = den[1]
                if denial.deny_reason == "policy":
                    # Envoy's flag for a request refused by authorization policy; a 401
                    # (authentication) has none, as with Envoy's jwt_authn
                    flags = "RBAC" if flags == "-" else f"{flags},RBAC"
                    inp.http_metrics.deny(denial.policy or "")  # "": no ALLOW policy matched
        inp.http_metrics.observe(
            hd,
            status,
            flags,
            ms,
            exchange.request_body_bytes,
            exchange.response_body_bytes,
            "" if g is None else str(g),
        )
        access = inp.access
        if access.path is not None:
            st = inp.watcher.current
            base = conn.log_base
            if base is None:  # the connection's part of every request line, made once
                base = conn.log_base = LineBase(conn.record(inp.worker_id))
                conn.log_key = conn.sample_key()
            base["ts"] = utc_ms()
            rate = st.access_log.sampling
            if not access.write_request(
                base,
                # the sampling key without a request id (all are logged at 1)
                f"{conn.log_key}#{h['requests']}" if rate < 1.0 else "",
                rate,
                head,
                status,
                elapsed,
                exchange,
                flags=flags,
                denial=denial,
            ):
                self.counters["access_log_skipped"] += 1
        sp = self.spans
        if sp is not None:  # last: a span never costs the request its metrics or log line
            sp.on_response(conn, head, status, elapsed, exchange, flags)

    def http_stats(self, pool: Any) -> dict[str, Any]:
        """``stats()["http"]``: request counters and the destination pool."""
        return {
            **self.http,
            "by_class": dict(self.http["by_class"]),
            "latency_ms_recent": list(self.latencies),
            "pool": {
                "connects": pool.connects if pool else 0,
                "reuses": pool.reuses if pool else 0,
                "idle": pool.idle_count() if pool else 0,
            },
        }


def cluster_stats(clusters: dict[str, Cluster]) -> dict[str, Any]:
    """Per service port: endpoints, the ones ejected now, and the breaker."""
    now = time.monotonic()
    out: dict[str, Any] = {}
    for key, c in clusters.items():
        healthy = set(c.healthy(now))
        out[key] = {
            "endpoints": [fmt_addr(t) for t in c.targets],
            "ejected": [fmt_addr(t) for t in c.targets if t not in healthy],
            "outstanding": {fmt_addr(t): c.lb.outstanding(t) for t in c.targets},
        }
    return out
