"""Trace spans of the L7 proxy, exported to an OpenTelemetry collector.

One span per request and proxy hop (a request through a service VIP across
nodes crosses two L7 sessions, so it gets two spans):

============================= ================ ============================
path (who runs an L7 session) span kind        parent
============================= ================ ============================
pod → service VIP (HTTP)      CLIENT, at the   the incoming ``traceparent``'s
  source node's proxy         source node      span, if any
  … its leg to the endpoint   SERVER, at the   the CLIENT span above
  pod (if that pod is served  endpoint's node
  at L7: ``proxy.l7``)
pod → pod, same node          SERVER (one: the the incoming span
  (``Local``: one proxy, one  node proxy is
  session)                    both ends')
pod → pod, across nodes       SERVER, at the   the incoming span
  (the source proxy relays    destination node
  the tunnel at L4)
============================= ================ ============================

Who decides what:

- ``tracing`` (sans-IO): the ids and the sampling decision per hop (the
  incoming ``traceparent``'s sampled flag, else the configured rate); the
  exchange carries the :class:`~agent.proxy.tracing.HopContext` it
  forwarded;
- :class:`SpanRecorder`, on the event loop, called once per answered
  request (``Accounting.on_http_response``): if sampled, one small
  :class:`LightSpan` (references and two clock reads, no SDK object) into
  the bounded :class:`SpanQueue` -- a full queue drops the span and counts
  it, never waits;
- :class:`SpanExporter`, a daemon thread per worker: takes batches, builds
  the SDK's ``ReadableSpan`` objects (:func:`attributes` maps a light span
  to OpenTelemetry's semantic-convention names) and sends them with the
  SDK's OTLP/HTTP protobuf exporter, each request bounded by
  ``exportTimeout``; failures are counted and logged at most once a minute.
  A slow or absent collector only fills the queue.

The OpenTelemetry packages are imported by the export thread's start only:
a worker with no ``tracing.otlpEndpoint`` loads none of them, and records
nothing (the sample rate is 0, so no new trace is sampled; the recorder is
None).

The span API is per exchange: an HTTP/2 shell that reports each stream's
exchange through the same ``on_response`` hook gets a span per stream.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any

from agent.proxy import tracing
from agent.proxy.state import ProxyState, TracingConfig, normalize_ip

__all__ = [
    "SERVER",
    "CLIENT",
    "LightSpan",
    "SpanQueue",
    "SpanRecorder",
    "SpanExporter",
    "Tracing",
    "attributes",
    "is_error",
    "span_kind",
    "start_tracing",
]

log = logging.getLogger("meshlet.proxy.spans")

SERVER, CLIENT = "server", "client"
SCOPE = "meshlet.proxy"
#: HTTP methods OpenTelemetry names as they are; others are ``_OTHER``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
FAILURE_LOG_INTERVAL = 60.0  # seconds between two "export failed" log lines


def span_kind(route: str | None) -> str:
    """The L7 session on a connection to a service VIP is the source side
    (CLIENT); every other L7 session serves a destination pod (SERVER)."""
    return CLIENT if route == "service" else SERVER


def is_error(status: int, flags: str) -> bool:
    """A span's status: error on no response, a 5xx, or any response flag."""
    return status == 0 or status >= 500 or flags != "-"


class LightSpan:
    """What the event loop keeps of one sampled request: enough to build the
    span later, in the export thread (immutable values and references)."""

    __slots__ = (
        "kind",
        "trace",
        "start_ns",
        "end_ns",
        "method",
        "path",
        "host",
        "version",
        "status",
        "flags",
        "cluster",
        "upstream",
        "attempts",
        "req_bytes",
        "resp_bytes",
        "route",
        "src_identity",
        "dst_identity",
        "src_addr",
        "state",
        "grpc_status",
    )

    def __init__(
        self,
        kind: str,
        trace: tracing.HopContext,
        start_ns: int,
        end_ns: int,
        head: Any,
        status: int,
        flags: str,
        exchange: Any,
        conn: Any,
        state: ProxyState | None,
    ) -> None:
        self.kind = kind
        self.trace = trace
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.method = head.method
        self.path = head.path.path
        self.host = head.host
        self.version = head.version
        self.status = status
        self.flags = flags
        self.cluster = exchange.cluster
        self.upstream = exchange.upstream
        self.attempts = exchange.attempts
        self.req_bytes = exchange.request_body_bytes
        self.resp_bytes = exchange.response_body_bytes
        self.route = conn.route
        self.src_identity = conn.src_identity
        self.dst_identity = conn.dst_identity
        self.src_addr = conn.src_addr
        self.state = state  # immutable: the export thread resolves the endpoint's identity in it
        # gRPC (an HTTP/2 stream): the call's status, from its trailers or the proxy's own answer
        self.grpc_status = getattr(exchange, "grpc_status", None)


class SpanQueue:
    """A bounded FIFO from the event loop (``put``) to the export thread
    (``take``).  ``put`` never blocks: when ``max_len`` spans wait, the new
    one is dropped and counted.  One producer (the loop) and one consumer:
    ``deque`` append and popleft are atomic, so no lock."""

    def __init__(self, max_len: int, batch: int, wake: threading.Event | None = None) -> None:
        self.max_len = max_len
        self.batch = batch
        self.wake = wake
        self.spans: collections.deque[LightSpan] = collections.deque()
        self.queued = 0  # spans accepted
        self.dropped = 0  # spans refused (queue full)

    def __len__(self) -> int:
        return len(self.spans)

    def put(self, span: LightSpan) -> bool:
        q = self.spans
        n = len(q)
        if n >= self.max_len:
            self.dropped += 1
            return False
        q.append(span)
        self.queued += 1
        if n + 1 == self.batch and self.wake is not None:  # a full batch: export now
            self.wake.set()
        return True

    def take(self, n: int) -> list[LightSpan]:
        q = self.spans
        out: list[LightSpan] = []
        pop = q.popleft
        try:
            while len(out) < n:
                out.append(pop())
        except IndexError:
            pass
        return out


class SpanRecorder:
    """The event loop's side: ``on_response`` per answered request."""

    def __init__(self, queue: SpanQueue, state: Any) -> None:
        self.queue = queue
        self._state = state  # a zero-argument callable: the current ProxyState
        self.recorded = 0
        self.unsampled = 0

    def on_response(
        self, conn: Any, head: Any, status: int, elapsed: float, exchange: Any, flags: str
    ) -> None:
        """Record the request's span if its trace is sampled.  ``exchange``
        is the :class:`~agent.proxy.exchange.Exchange` record; ``flags`` the
        response flags as reported (RBAC included)."""
        tr = exchange.trace
        if tr is None:
            # Answered before anything was forwarded (refused by policy, no
            # upstream...): the span still belongs to the client's trace.
            tr = tracing.hop(head.headers)
        if not tr.sampled:
            self.unsampled += 1
            return
        end = time.time_ns()
        span = LightSpan(
            span_kind(conn.route),
            tr,
            end - int(elapsed * 1e9),
            end,
            head,
            status,
            flags,
            exchange,
            conn,
            self._state(),
        )
        if self.queue.put(span):
            self.recorded += 1


def _text(b: bytes | str | None) -> str | None:
    if b is None:
        return None
    return b if isinstance(b, str) else b.decode("latin-1")


def _host_port(host: str) -> tuple[str, int | None]:
    """A Host header's (name, port): ``[v6]:port``, ``name:port``, ``name``."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            rest = host[end + 1 :]
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
            return host[1:end], port
        return host, None
    name, sep, digits = host.rpartition(":")
    if sep and digits.isdigit() and name:
        return name, int(digits)
    return host, None


def _endpoint_identity(state: ProxyState | None, upstream: Any) -> str | None:
    if state is None or not upstream:
        return None
    pod = state.pod_by_ip.get(normalize_ip(str(upstream[0])))
    return None if pod is None else state.identity(pod)


def attributes(s: LightSpan) -> dict[str, Any]:
    """A light span's attributes with OpenTelemetry's semantic-convention
    names (HTTP spans, stable since 1.23), plus meshlet's own:
    ``meshlet.source.principal`` / ``meshlet.destination.principal`` (SPIFFE
    ids of the two workloads; the destination of a CLIENT span is the
    endpoint pod chosen for the last try), ``meshlet.response_flags``
    (Envoy's), ``meshlet.upstream`` (address:port of the last try),
    ``meshlet.cluster`` (service port, ``ns/name:port``), ``meshlet.route``,
    ``meshlet.request_id`` (x-request-id).  There are no route templates in
    meshlet, so no ``http.route``: ``url.path`` carries the (normalized)
    path, without the query.  A gRPC call (an HTTP/2 stream) adds
    ``rpc.system`` and ``rpc.grpc.status_code`` (its ``grpc-status``)."""
    method = _text(s.method) or ""
    a: dict[str, Any] = {}
    if method in KNOWN_METHODS:
        a["http.request.method"] = method
    else:
        a["http.request.method"] = "_OTHER"
        a["http.request.method_original"] = method
    if s.status:
        a["http.response.status_code"] = s.status
    a["url.path"] = s.path
    a["url.scheme"] = "http"
    a["network.protocol.name"] = "http"
    a["network.protocol.version"] = _text(s.version) or "1.1"
    host = _text(s.host)
    if host:
        name, port = _host_port(host)
        a["server.address"] = name
        if port is not None:
            a["server.port"] = port
    up = s.upstream
    if up:
        a["meshlet.upstream"] = f"[{up[0]}]:{up[1]}" if ":" in str(up[0]) else f"{up[0]}:{up[1]}"
    if s.kind == CLIENT:
        if up:
            a["network.peer.address"] = str(up[0])
            a["network.peer.port"] = int(up[1])
        dst = _endpoint_identity(s.state, up)
    else:
        src = s.src_addr
        if src:
            a["client.address"] = normalize_ip(str(src[0]))
            a["network.peer.address"] = normalize_ip(str(src[0]))
            a["network.peer.port"] = int(src[1])
        dst = s.dst_identity
    if s.src_identity:
        a["meshlet.source.principal"] = s.src_identity
    if dst:
        a["meshlet.destination.principal"] = dst
    if s.attempts > 1:
        a["http.request.resend_count"] = s.attempts - 1
    if s.req_bytes:
        a["http.request.body.size"] = s.req_bytes
    if s.resp_bytes:
        a["http.response.body.size"] = s.resp_bytes
    a["meshlet.response_flags"] = s.flags
    if s.cluster:
        a["meshlet.cluster"] = s.cluster
    if s.route:
        a["meshlet.route"] = s.route
    a["meshlet.request_id"] = _text(s.trace.request_id)
    g = s.grpc_status
    if g is not None:  # OpenTelemetry's RPC conventions (gRPC)
        a["rpc.system"] = "grpc"
        a["rpc.grpc.status_code"] = g
    if is_error(s.status, s.flags):
        a["error.type"] = s.flags if s.flags != "-" else str(s.status) if s.status else "no_response"
    return a


class SpanExporter:
    """The export thread of one worker (module docstring)."""

    def __init__(self, cfg: TracingConfig, worker_id: int = 0, exporter: Any = None) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.wake = threading.Event()
        self.queue = SpanQueue(cfg.max_queue, cfg.max_batch, self.wake)
        self._exporter = exporter  # None: the SDK's OTLP/HTTP exporter, made by start()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.exported = 0  # spans the collector accepted
        self.failed = 0  # spans in failed export requests
        self.export_failures = 0  # failed export requests
        self.exports = 0  # export requests made
        self._last_failure_log = -math.inf  # the first failure is always logged
        self._sdk: Any = None
        self.error: str | None = None  # why the thread could not start exporting

    def start(self) -> None:
        """Start the thread; it imports the SDK itself (about half a second
        and 10 MB, once per worker), never the event loop."""
        self._thread = threading.Thread(target=self._main, name="meshlet-span-export", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._sdk = _Sdk(self.cfg, self.worker_id)
            if self._exporter is None:
                self._exporter = self._sdk.exporter()
        except Exception as e:  # noqa: BLE001 - observability must not stop the proxy: no spans
            self.error = f"cannot load the OpenTelemetry exporter: {e}"
            log.error(
                "trace spans off: %s (is opentelemetry-exporter-otlp-proto-http installed?)", self.error
            )
            self.queue.max_len = 0  # every span is dropped (and counted) from now on
            self.queue.take(len(self.queue))
            return
        self._run()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread after one last export (at most ``timeout`` waited)."""
        self._stop.set()
        self.wake.set()
        t = self._thread
        if t is not None:
            t.join(timeout)
        ex = self._exporter
        if ex is not None and (t is None or not t.is_alive()):
            try:
                ex.shutdown()
            except Exception:  # shutting down: nothing more to do about it
                log.debug("span exporter shutdown failed", exc_info=True)

    def _run(self) -> None:
        cfg = self.cfg
        while True:
            stopping = self._stop.is_set()
            if not stopping and len(self.queue) < cfg.max_batch:
                self.wake.wait(cfg.export_interval)
            self.wake.clear()
            while True:
                batch = self.queue.take(cfg.max_batch)
                if not batch:
                    break
                self.export(batch)
                if self._stop.is_set():
                    break  # one last batch at most
            if stopping or self._stop.is_set():
                return

    def export(self, batch: list[LightSpan]) -> bool:
        """Build and send one batch (the export thread; tests call it too)."""
        try:
            spans = [self._sdk.readable(s) for s in batch]
            ok = self._exporter.export(spans) == self._sdk.success
        except Exception:  # a bug here must not kill the thread: counted and logged
            log.exception("building or exporting %d spans failed", len(batch))
            ok = False
        self.exports += 1
        if ok:
            self.exported += len(batch)
            return True
        self.export_failures += 1
        self.failed += len(batch)
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            log.warning(
                "span export to %s failed (%d failed requests, %d spans lost so far; %d dropped "
                "when the queue was full): is the collector up and answering within %gs?",
                self.cfg.otlp_endpoint,
                self.export_failures,
                self.failed,
                self.queue.dropped,
                self.cfg.export_timeout,
            )
        return False

    def stats(self) -> dict[str, Any]:
        q = self.queue
        return {
            "endpoint": self.cfg.otlp_endpoint,
            "sample_rate": tracing.sample_rate(),
            "queued": len(q),
            "max_queue": q.max_len,
            "recorded": q.queued,
            "dropped": q.dropped,
            "exported": self.exported,
            "failed": self.failed,
            "exports": self.exports,
            "export_failures": self.export_failures,
            "error": self.error,
        }


class _Sdk:
    """The OpenTelemetry SDK, imported here only (the export thread's side)."""

    def __init__(self, cfg: TracingConfig, worker_id: int) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        self.cfg = cfg
        self.ReadableSpan = ReadableSpan
        self.SpanContext = SpanContext
        self.TraceState = TraceState
        self.sampled = TraceFlags(TraceFlags.SAMPLED)
        self.kinds = {SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT}
        self.ok = Status(StatusCode.UNSET)
        self.Status, self.ERROR = Status, StatusCode.ERROR
        self.success = SpanExportResult.SUCCESS
        self.resource = Resource.create(
            {
                "service.name": "meshlet-proxy",
                "service.namespace": "meshlet",
                "service.instance.id": f"{cfg.service_instance or 'node'}/{worker_id}",
                "k8s.node.name": cfg.service_instance,
            }
        )
        self.scope = InstrumentationScope(SCOPE)

    def exporter(self) -> Any:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Each failed request is counted and logged (rate-limited) by SpanExporter;
        # the exporter's own line per retry would flood the worker's log.
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        return OTLPSpanExporter(endpoint=self.cfg.otlp_endpoint, timeout=self.cfg.export_timeout)

    def readable(self, s: LightSpan) -> Any:
        tr = s.trace
        tid = int(tr.traceparent.trace_id, 16)
        state = self.TraceState.from_header([tr.tracestate.decode("latin-1")]) if tr.tracestate else None
        ctx = self.SpanContext(tid, int(tr.span_id, 16), False, self.sampled, state)
        pid = tr.parent_id
        parent = None if pid is None else self.SpanContext(tid, int(pid, 16), True, self.sampled)
        attrs = attributes(s)
        err = "error.type" in attrs
        status = self.Status(self.ERROR, s.flags if s.flags != "-" else None) if err else self.ok
        return self.ReadableSpan(
            name=attrs["http.request.method"] if attrs["http.request.method"] != "_OTHER" else "HTTP",
            context=ctx,
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            kind=self.kinds[s.kind],
            status=status,
            start_time=s.start_ns,
            end_time=s.end_ns,
            instrumentation_scope=self.scope,
        )


class Tracing:
    """One worker's span recording and export, or nothing (``start_tracing``)."""

    def __init__(self, cfg: TracingConfig, exporter: SpanExporter, recorder: SpanRecorder) -> None:
        self.cfg = cfg
        self.exporter = exporter
        self.recorder = recorder

    def stats(self) -> dict[str, Any]:
        return {**self.exporter.stats(), "unsampled": self.recorder.unsampled}

    def close(self, timeout: float = 2.0) -> None:
        self.exporter.close(timeout)


def start_tracing(cfg: TracingConfig, worker_id: int, state: Any) -> Tracing | None:
    """Start exporting spans per ``cfg`` (None when it names no endpoint: then
    no new trace is sampled either); sets ``tracing``'s sample rate.
    ``state``: a zero-argument callable giving the current ProxyState."""
    if not cfg.otlp_endpoint:
        tracing.set_sample_rate(0.0)
        return None
    exporter = SpanExporter(cfg, worker_id)
    exporter.start()
    tracing.set_sample_rate(cfg.sample_rate)
    return Tracing(cfg, exporter, SpanRecorder(exporter.queue, state))
