"""Per-connection TCP telemetry of one proxy worker, with Istio's labels.

Pure: no sockets, no clock.  The server calls :meth:`TcpMetrics.opened`
once it knows both ends of a connection, :meth:`TcpMetrics.flush` with the
relay's running byte counts (at every stats read), and
:meth:`TcpMetrics.closed` when the connection is finished; the agent sums
every worker's :meth:`TcpMetrics.snapshot` into Prometheus metrics.

Labels follow Istio's standard metrics so its Grafana dashboards and Kiali
read them unchanged:

* ``reporter``: ``source`` for what the proxy saw as the client's node,
  ``destination`` as the server's node.  A same-node connection is reported
  by both, as a sidecar pair would (the node proxy is both).
* ``*_workload``: the pod's ``app`` label, else the pod name (Istio uses
  the owning Deployment's name; meshlet's inventory has no owners).
* ``*_principal``: the SPIFFE ID, ``unknown`` if the end has none.
* ``destination_service``: there are no Services yet, so it is the IP
  address the client dialed (no port, as Istio's service host has none:
  bounded by the destinations' addresses); ``destination_service_name`` is
  ``PassthroughCluster`` for destinations outside the mesh (as in Istio)
  and ``unknown`` for mesh pods.
* ``connection_security_policy``: ``mutual_tls`` when the bytes crossed
  nodes inside the mTLS tunnel, ``none`` otherwise (same node, passthrough,
  or the benchmark-only plaintext tunnel).
* ``response_flags``: Envoy's flags: ``-`` ok, ``UF`` upstream connect
  failed (refused, timed out), ``UC`` reset, ``DENY`` refused by the mesh.

Byte counters use Istio's direction: ``received`` is what the source sent
(request direction), ``sent`` what the destination sent back.  They are
updated from the relay at every stats read and made exact at close.

Cardinality is bounded: at most ``max_series`` label sets; connections
beyond that are counted in ``overflow`` only (``meshlet_metrics_overflow_total``).

HTTP requests (``proxy.l7``): :class:`HttpMetrics` keeps Istio's
``istio_requests_total`` and the duration / request size / response size
histograms (Envoy's default buckets) under the connection's labels with
``request_protocol`` ``http``, plus ``response_code``, the request's
``response_flags`` and ``grpc_response_status`` ("" for HTTP; a gRPC call's
``grpc-status``, its ``request_protocol`` then ``grpc``, as Istio labels
them), and a finer latency histogram per connection label set for
``meshlet stats`` percentiles.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from math import log
from typing import Any

__all__ = [
    "LABELS",
    "Peer",
    "TcpMetrics",
    "workload_of",
    "labels_for",
    "MAX_SERIES",
    "DENY_REASONS",
    "HTTP_LABELS",
    "BUCKETS",
    "HttpMetrics",
    "http_prefix",
    "http_labels",
    "fine_bucket",
    "fine_value_ms",
    "HttpHandle",
]

MAX_SERIES = 10_000
UNKNOWN = "unknown"

LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_canonical_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_canonical_service",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

#: Why the proxy itself refused a connection (``meshlet_denied_connections_total{reason}``).
DENY_REASONS: tuple[str, ...] = (
    "no_original_destination",  # not redirected by meshlet's hook, or the record expired
    "unknown_source",  # the kernel's source cgroup/address is no enrolled pod's
    "forbidden_destination",  # a pod dialed the proxy itself or a node's tunnel port
    "tunnel_not_from_node",  # a tunnel connection from a non-node address
    "mtls_refused",  # TLS handshake refused (either side)
    "key_scope",  # a node's certificate for an identity it has no pod of, or from another node
    "no_certificate",  # no SVID for the source identity: failing closed
    "identity_mismatch",  # tunnel header or SNI disagrees with the certificate
    "not_local",  # tunnel asks for a pod that is not on this node
    "no_route",  # the destination pod's node has no address in the state
    "bad_tunnel_header",  # malformed, oversized or missing tunnel header
    "policy",  # an authorization policy denied it (counted per policy too)
    "no_service_port",  # a service VIP dialed on a port the service does not declare
)

_FLAGS = {"ok": "-", "refused": "UF", "timeout": "UF", "reset": "UC", "rejected": "DENY"}
_FLAGS_AT = LABELS.index("response_flags")  # where with_result puts them


def workload_of(name: str | None, app: str | None) -> str:
    """The workload label of a pod: its ``app`` label, else its name."""
    return app or name or UNKNOWN


@dataclass(frozen=True)
class Peer:
    """One end of a connection, as far as the proxy knows it."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN


def labels_for(
    reporter: str, src: Peer, dst: Peer, service: str, service_name: str, mtls: bool, result: str = "ok"
) -> tuple[str, ...]:
    """The label values, in :data:`LABELS` order."""
    return (
        reporter,
        src.workload,
        src.namespace,
        src.principal,
        src.app,
        src.workload,
        dst.workload,
        dst.namespace,
        dst.principal,
        dst.app,
        dst.workload,
        service,
        service_name,
        dst.namespace if service_name != "PassthroughCluster" else UNKNOWN,
        "tcp",
        _FLAGS.get(result, "-"),
        "mutual_tls" if mtls else "none",
    )


def with_result(labels: tuple[str, ...], result: str) -> tuple[str, ...]:
    """``labels`` with the response flags of ``result`` (the same tuple
    when they are already those: every connection that ends "ok")."""
    flag = _FLAGS.get(result, "-")
    i = _FLAGS_AT
    if labels[i] == flag:
        return labels
    return labels[:i] + (flag,) + labels[i + 1 :]


class _Series:
    __slots__ = ("opened", "closed", "sent", "received")

    def __init__(self) -> None:
        self.opened = self.closed = self.sent = self.received = 0


class _Tracked:
    """What has been reported for one live connection."""

    __slots__ = ("labels", "received", "sent")

    def __init__(self, labels: tuple[tuple[str, ...], ...]) -> None:
        self.labels = labels  # one label tuple per reporter
        self.received = 0
        self.sent = 0


class TcpMetrics:
    """Counters of one worker; see the module docstring."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self.series: dict[tuple[str, ...], _Series] = {}
        self.denied: dict[str, int] = {}
        self.denied_policies: dict[str, int] = {}  # reason "policy", by deciding policy (ns/name)
        self.overflow = 0
        self._live: dict[int, _Tracked] = {}

    def _get(self, labels: tuple[str, ...]) -> _Series | None:
        s = self.series.get(labels)
        if s is None:
            if len(self.series) >= self.max_series:
                self.overflow += 1
                return None
            s = self.series[labels] = _Series()
        return s

    def opened(self, conn_id: int, labels: list[tuple[str, ...]]) -> None:
        """A connection with known ends: count it opened under each reporter's labels."""
        if conn_id in self._live:
            return
        kept = []
        for lb in labels:
            s = self._get(lb)
            if s is not None:
                s.opened += 1
                kept.append(lb)
        self._live[conn_id] = _Tracked(tuple(kept))

    def is_open(self, conn_id: int) -> bool:
        return conn_id in self._live

    def flush(self, conn_id: int, received: int, sent: int) -> None:
        """Running totals of a live connection: add what is new."""
        t = self._live.get(conn_id)
        if t is None:
            return
        dr, ds = received - t.received, sent - t.sent
        if dr <= 0 and ds <= 0:
            return
        t.received, t.sent = max(received, t.received), max(sent, t.sent)
        for lb in t.labels:
            s = self.series[lb]
            s.received += max(dr, 0)
            s.sent += max(ds, 0)

    def closed(
        self,
        conn_id: int,
        received: int,
        sent: int,
        result: str = "ok",
        labels: list[tuple[str, ...]] | None = None,
    ) -> None:
        """Final totals.  A connection never reported as opened (it failed
        first) is opened here with ``labels``."""
        if conn_id not in self._live:
            self.opened(conn_id, [with_result(lb, result) for lb in labels or ()])
        self.flush(conn_id, received, sent)
        t = self._live.pop(conn_id)
        for lb in t.labels:
            key = with_result(lb, result)
            if key is not lb:  # the failure shows in response_flags of the close
                s = self._get(key)
                if s is None:
                    continue
            else:
                s = self.series[lb]
            s.closed += 1

    def deny(self, reason: str, policy: str | None = None) -> None:
        self.denied[reason] = self.denied.get(reason, 0) + 1
        if policy is not None:  # "": no ALLOW rule matched (no single policy decided)
            self.denied_policies[policy] = self.denied_policies.get(policy, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-able: label names once, then one row per label set."""
        return {
            "labels": list(LABELS),
            "tcp": [[list(lb), s.opened, s.closed, s.received, s.sent] for lb, s in self.series.items()],
            "denied": dict(self.denied),
            "denied_policies": dict(self.denied_policies),
            "overflow": self.overflow,
            "max_series": self.max_series,
            "live": len(self._live),
        }


# --- HTTP requests (L7) ------------------------------------------------------------

#: Istio's request metrics carry the TCP labels (``request_protocol`` is
#: ``http``) plus the response's code and its gRPC status (always "": the
#: proxy speaks HTTP/1.x only).
HTTP_LABELS: tuple[str, ...] = LABELS + ("response_code", "grpc_response_status")

#: Envoy's default histogram buckets, which Istio's request duration and
#: size histograms use (milliseconds, or bytes for the sizes).
BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)

#: Latency for percentiles (``meshlet stats``): log buckets 2% wide, in
#: microseconds.  Bucket ``i`` holds ``[G**i, G**(i+1))`` us; exact merge
#: across workers, at most ~1,100 buckets up to an hour.
FINE_GROWTH = 1.02
_FINE_K = 1.0 / math.log(FINE_GROWTH)

_RF = LABELS.index("response_flags")
_PROTO = LABELS.index("request_protocol")
_SVC = LABELS.index("destination_service")


def fine_bucket(ms: float) -> int:
    us = ms * 1000.0
    return int(math.log(us) * _FINE_K) if us > 1.0 else 0


def fine_value_ms(idx: int) -> float:
    """The midpoint (geometric) of fine bucket ``idx``, in ms."""
    return FINE_GROWTH ** (idx + 0.5) / 1000.0


def http_prefix(tcp_labels: tuple[str, ...], cluster: str | None = None) -> tuple[str, ...]:
    """A connection's TCP label set as the constant part of its requests'
    labels: ``request_protocol`` http, ``response_flags`` filled per request.

    ``cluster`` (``ns/name:port``, the service the request was routed to)
    names the destination service as Istio does: ``name.ns.svc.cluster.local``,
    ``name``, ``ns``."""
    lb = list(tcp_labels)
    lb[_PROTO] = "http"
    lb[_RF] = ""
    if cluster:
        ns, _, rest = cluster.partition("/")
        name = rest.rsplit(":", 1)[0]
        if ns and name:
            lb[_SVC : _SVC + 3] = [f"{name}.{ns}.svc.cluster.local", name, ns]
    return tuple(lb)


def http_labels(prefix: tuple[str, ...], code: int, flags: str, grpc: str = "") -> tuple[str, ...]:
    """The full :data:`HTTP_LABELS` values of one request series (``grpc``:
    its ``grpc-status``, "" for plain HTTP)."""
    lb = prefix[:_RF] + (flags or "-",) + prefix[_RF + 1 :] + (str(code), grpc)
    if grpc:
        lb = lb[:_PROTO] + ("grpc",) + lb[_PROTO + 1 :]
    return lb


# One series is a flat list (fast in-place increments):
# [count, duration sum, request bytes sum, response bytes sum,
#  duration buckets..., request size buckets..., response size buckets...]
# with len(BUCKETS) + 1 buckets each (the last: above every bound).
_NB = len(BUCKETS) + 1
_DUR, _REQ, _RESP = 4, 4 + _NB, 4 + 2 * _NB
_SERIES_LEN = 4 + 3 * _NB


class HttpHandle:
    """What one connection needs to count its requests: its label-set ids
    and, per (status, flags) seen, the series and latency histograms to
    bump.  Made by :meth:`HttpMetrics.handle` once per connection."""

    __slots__ = ("pids", "targets")

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids = pids
        self.targets: dict[tuple[int, str, str], tuple] = {}


class HttpMetrics:
    """Per-request counters of one worker, Istio-labelled.

    The hot path is :meth:`observe`: the label tuples are made once per
    connection (:meth:`handle`), and the handle caches, per (status, flags),
    the series to bump; a request then costs three bisections, a log and a
    few list increments per reporter.  Bounded like :class:`TcpMetrics`: at
    most ``max_series`` request series and as many label sets; what does
    not fit is counted in ``overflow``."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self.series: dict[tuple[int, int, str, str], list] = {}
        self._prefix_ids: dict[tuple[str, ...], int] = {}
        self._prefixes: list[tuple[str, ...]] = []
        self.latency: dict[int, dict[int, int]] = {}  # prefix id -> fine bucket -> n
        self.denied_policies: dict[str, int] = {}
        self.denied = 0
        self.overflow = 0

    def prefixes(
        self, tcp_labels: list[tuple[str, ...]] | tuple, cluster: str | None = None
    ) -> tuple[int, ...]:
        """Ids for a connection's label sets (one per reporter)."""
        out = []
        for lb in tcp_labels:
            p = http_prefix(lb, cluster)
            pid = self._prefix_ids.get(p)
            if pid is None:
                if len(self._prefixes) >= self.max_series:
                    self.overflow += 1
                    continue
                pid = self._prefix_ids[p] = len(self._prefixes)
                self._prefixes.append(p)
                self.latency[pid] = {}
            out.append(pid)
        return tuple(out)

    def handle(self, tcp_labels: list[tuple[str, ...]] | tuple, cluster: str | None = None) -> HttpHandle:
        """Once per connection (and routed service), not per request."""
        return HttpHandle(self.prefixes(tcp_labels, cluster))

    def _targets(self, h: HttpHandle, code: int, flags: str, grpc: str) -> tuple:
        out = []
        for pid in h.pids:
            key = (pid, code, flags, grpc)
            s = self.series.get(key)
            if s is None:
                if len(self.series) >= self.max_series:
                    continue
                s = self.series[key] = [0] * _SERIES_LEN
                s[1] = 0.0
            out.append((s, self.latency[pid]))
        t = tuple(out)
        if t and len(t) == len(h.pids):  # complete: safe to reuse (series are never removed)
            h.targets[(code, flags, grpc)] = t
        return t

    def observe(
        self,
        h: HttpHandle,
        code: int,
        flags: str,
        ms: float,
        req_bytes: int = 0,
        resp_bytes: int = 0,
        grpc: str = "",
    ) -> None:
        """One finished request under each of the connection's reporters
        (``grpc``: a gRPC call's ``grpc-status``)."""
        targets = h.targets.get((code, flags, grpc))
        if targets is None:
            targets = self._targets(h, code, flags, grpc)
            missing = len(h.pids) - len(targets)
            if missing or not h.pids:
                self.overflow += missing or 1
        di = _DUR + bisect_left(BUCKETS, ms)
        qi = _REQ + bisect_left(BUCKETS, req_bytes) if req_bytes else _REQ  # GETs: no body
        ri = _RESP + bisect_left(BUCKETS, resp_bytes) if resp_bytes else _RESP
        us = ms * 1000.0
        fine = int(log(us) * _FINE_K) if us > 1.0 else 0
        for s, lat in targets:
            s[0] += 1
            s[1] += ms
            s[2] += req_bytes
            s[3] += resp_bytes
            s[di] += 1
            s[qi] += 1
            s[ri] += 1
            lat[fine] = lat.get(fine, 0) + 1

    def deny(self, policy: str) -> None:
        """A request refused by authorization policy (``""``: no ALLOW matched)."""
        self.denied += 1
        self.denied_policies[policy] = self.denied_policies.get(policy, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-able.  ``series`` rows: [labels, count, duration sum (ms),
        duration buckets, request bytes sum, buckets, response bytes sum,
        buckets]; bucket lists are per bucket (not cumulative), one longer
        than ``buckets`` (the overflow above the last bound).  ``latency``
        rows: [prefix labels (``response_flags`` empty), {fine bucket: n}]."""
        ps = self._prefixes
        return {
            "labels": list(HTTP_LABELS),
            "buckets": list(BUCKETS),
            "series": [
                [
                    list(http_labels(ps[pid], code, flags, grpc)),
                    s[0],
                    s[1],
                    s[_DUR:_REQ],
                    s[2],
                    s[_REQ:_RESP],
                    s[3],
                    s[_RESP:],
                ]
                for (pid, code, flags, grpc), s in self.series.items()
            ],
            "fine_growth": FINE_GROWTH,
            "latency": [
                [list(ps[pid]), {str(k): v for k, v in lat.items()}]
                for pid, lat in self.latency.items()
                if lat
            ],
            "denied": self.denied,
            "denied_policies": dict(self.denied_policies),
            "overflow": self.overflow,
        }
