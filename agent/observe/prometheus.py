"""The node's Prometheus endpoint: ``GET /metrics`` (default port 15020),
and beside it the probes of the DaemonSet: ``GET /healthz`` (liveness) and
``GET /readyz`` (readiness), 200 or 503 with the reason as plain text.

Two halves:

* :func:`families` is pure: a *snapshot* (plain dicts: every proxy
  worker's stats, the datapath status, the agent's identity state) in,
  metric families (``agent.observe.exposition``) out.  Unit tests feed it
  dicts, and parse what is served with prometheus_client's parser.
* :func:`liveness` and :func:`readiness` are pure too: the agent's
  facts (age of its last tick, workers alive, identity loaded) in, a
  verdict and its reason out.  A probe never scrapes: it costs no stats
  socket round trip and no map read.
* :class:`MetricsServer` serves them from a threading TCP server thread
  (the text format of ``agent.observe.exposition`` for every path but the
  two probes; one request per connection).  Each scrape calls the agent's
  snapshot function *in that thread*: the proxy stats sockets and the
  bpf(2) map reads never run on the agent's event loop, and the proxies
  only answer a stats request.

Istio-compatible TCP metrics are the sum over the proxy workers of their
label sets (see ``agent/proxy/telemetry.py`` for the labels).  So are
Istio's request metrics (``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes``,
``istio_response_bytes``) for the HTTP requests the proxy served with
``proxy.l7`` on: counted by the destination node's proxy (reporter
``destination``; a same-node request also as ``source``).  Without L7 the
families have no samples: "not measured", never a fake zero.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from ..proxy.telemetry import DENY_REASONS
from .exposition import CONTENT_TYPE, Counter, Family, Gauge, Histogram, render

log = logging.getLogger("meshlet.metrics")

TCP_COUNTERS = (  # Istio name, snapshot column, help
    ("istio_tcp_connections_opened_total", 1, "TCP connections opened, by the reporting proxy."),
    ("istio_tcp_connections_closed_total", 2, "TCP connections closed, by the reporting proxy."),
    (
        "istio_tcp_received_bytes_total",
        3,
        "Bytes the source sent to the destination (request direction) over TCP.",
    ),
    (
        "istio_tcp_sent_bytes_total",
        4,
        "Bytes the destination sent back to the source (response direction) over TCP.",
    ),
)


def _pick(spread: dict[str, Any]) -> str:
    """How a listener group's new connections reach the worker: "hash" when
    a family fell back to the kernel's hash, else "least-loaded"."""
    return (
        "hash"
        if any(v != "least-loaded" for k, v in spread.items() if k in ("ipv4", "ipv6"))
        else "least-loaded"
    )


def merge_tcp(workers: Iterable[dict | None]) -> tuple[list[str], dict[tuple, list[int]]]:
    """Sum the workers' TCP label sets: (label names, labels -> [opened,
    closed, received, sent])."""
    names: list[str] = []
    out: dict[tuple, list[int]] = {}
    for w in workers:
        m = (w or {}).get("metrics")
        if not m:
            continue
        names = names or m["labels"]
        for row in m["tcp"]:
            key = tuple(row[0])
            acc = out.setdefault(key, [0, 0, 0, 0])
            for i in range(4):
                acc[i] += row[1 + i]
    return names, out


HTTP_HISTOGRAMS = (  # Istio name, snapshot sum column, buckets column, help
    (
        "istio_request_duration_milliseconds",
        2,
        3,
        "Time from the request's first byte to the end of the response, in milliseconds.",
    ),
    ("istio_request_bytes", 4, 5, "HTTP request body sizes, in bytes."),
    ("istio_response_bytes", 6, 7, "HTTP response body sizes, in bytes."),
)


class HttpSeries:
    """Sum of one request label set over workers (see HttpMetrics.snapshot)."""

    __slots__ = ("count", "sums", "buckets")

    def __init__(self, nb: int) -> None:
        self.count = 0
        self.sums = [0.0, 0, 0]
        self.buckets = [[0] * nb, [0] * nb, [0] * nb]


def merge_http(workers: Iterable[dict | None]) -> dict[str, Any]:
    """Sum the workers' HTTP request series and latency histograms.

    {"names", "bounds", "series": labels -> HttpSeries, "latency":
    prefix labels -> {fine bucket: n}, "fine_growth", "denied_policies",
    "overflow", "present": any worker reported L7 counters}."""
    out: dict[str, Any] = {
        "names": [],
        "bounds": [],
        "series": {},
        "latency": {},
        "fine_growth": None,
        "denied_policies": {},
        "overflow": 0,
        "present": False,
    }
    for w in workers:
        h = (w or {}).get("http_metrics")
        if not h:
            continue
        out["present"] = True
        out["names"] = out["names"] or h["labels"]
        out["bounds"] = out["bounds"] or h["buckets"]
        out["fine_growth"] = out["fine_growth"] or h.get("fine_growth")
        nb = len(h["buckets"]) + 1
        for row in h["series"]:
            key = tuple(row[0])
            acc = out["series"].get(key)
            if acc is None:
                acc = out["series"][key] = HttpSeries(nb)
            acc.count += row[1]
            for j, (si, bi) in enumerate(((2, 3), (4, 5), (6, 7))):
                acc.sums[j] += row[si]
                for i, n in enumerate(row[bi]):
                    acc.buckets[j][i] += n
        for prefix, hist in h.get("latency", ()):
            acc2 = out["latency"].setdefault(tuple(prefix), {})
            for k, n in hist.items():
                acc2[int(k)] = acc2.get(int(k), 0) + n
        for pol, n in h.get("denied_policies", {}).items():
            out["denied_policies"][pol] = out["denied_policies"].get(pol, 0) + n
        out["overflow"] += h.get("overflow", 0)
    return out


def http_families(http: dict[str, Any]) -> list[Family]:
    """istio_requests_total and the three histograms (Istio's names)."""
    names, bounds = http["names"], http["bounds"]
    req = Counter("istio_requests_total", "HTTP requests served by the reporting proxy.", labels=names)
    hists = [Histogram(n, doc, labels=names) for n, _, _, doc in HTTP_HISTOGRAMS]
    les = [f"{b:g}" if b != int(b) else str(int(b)) for b in bounds] + ["+Inf"]
    for key, s in sorted(http["series"].items()):
        lv = list(key)
        req.add_metric(lv, s.count)
        for j, fam in enumerate(hists):
            cum, acc = [], 0
            for le, n in zip(les, s.buckets[j], strict=False):
                acc += n
                cum.append((le, acc))
            fam.add_metric(lv, cum, s.sums[j])
    return [req, *hists]


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def tracing_families(live: list[dict[str, Any]]) -> list[Family]:
    """Trace spans (``tracing`` in the workers' stats), when a worker exports them."""
    tr = [w["tracing"] for w in live if w.get("tracing")]
    if not tr:
        return []
    spans = Counter(
        "meshlet_trace_spans_total",
        "Trace spans of the proxy workers by result: exported (the collector took them), dropped "
        "(the export queue was full: the collector is slow or down), failed (in an export request "
        "that failed).",
        labels=["result"],
    )
    for result in ("exported", "dropped", "failed"):
        spans.add_metric([result], sum(t.get(result, 0) for t in tr))
    failures = Counter(
        "meshlet_trace_export_failures_total",
        "Export requests to the OpenTelemetry collector that failed (error, refused or timed out).",
    )
    failures.add_metric([], sum(t.get("export_failures", 0) for t in tr))
    queued = Gauge("meshlet_trace_spans_queued", "Spans waiting for export in the proxy workers.")
    queued.add_metric([], sum(t.get("queued", 0) for t in tr))
    return [spans, failures, queued]


def families(snap: dict[str, Any]) -> list[Family]:
    """Snapshot -> metric families.  ``snap`` keys: ``workers`` (list of
    proxy stats dicts, None for a worker that did not answer),
    ``datapath`` (datapath_status()), ``identity`` (Agent.identity_status()),
    ``workers_configured``."""
    workers = snap.get("workers") or []
    live = [w for w in workers if w]
    out: list[Family] = []

    names, tcp = merge_tcp(live)
    for metric, col, doc in TCP_COUNTERS:
        fam = Counter(metric, doc, labels=names)
        for key, vals in sorted(tcp.items()):
            fam.add_metric(list(key), vals[col - 1])
        out.append(fam)
    http = merge_http(live)
    if http["present"]:
        out += http_families(http)

    up = Gauge("meshlet_proxy_workers_up", "Proxy workers answering their stats socket.")
    up.add_metric([], len(live))
    out.append(up)
    conf = Gauge("meshlet_proxy_workers", "Proxy workers configured.")
    conf.add_metric([], snap.get("workers_configured", len(workers)))
    out.append(conf)
    active = Gauge("meshlet_proxy_active_connections", "Connections the proxy workers are handling now.")
    active.add_metric([], sum(w.get("active_connections", 0) for w in live))
    out.append(active)
    tunnels = Gauge(
        "meshlet_proxy_tunnel_connections",
        "Tunnel connections each proxy worker holds now (accepted from other nodes); new ones go to "
        'the least loaded. pick="hash": the kernel refused the least-loaded program for that '
        "worker's listeners (meshlet status says why).",
        labels=["worker", "pick"],
    )
    conns = Gauge(
        "meshlet_proxy_worker_connections",
        "Active connections of each proxy worker; new pod connections go to the least loaded. "
        'pick="hash": the kernel refused the least-loaded program for that worker\'s outbound '
        "listeners (meshlet status says why).",
        labels=["worker", "pick"],
    )
    for w in live:
        for gauge, section in ((tunnels, "tunnel_spread"), (conns, "outbound_spread")):
            spread = w.get(section)
            if spread is None:
                continue  # a worker from before that least-loaded pick
            gauge.add_metric([str(w.get("worker", "")), _pick(spread)], spread.get("load", 0))
    out.append(tunnels)
    out.append(conns)

    denied = Counter(
        "meshlet_denied_connections_total",
        "Connections the mesh refused, by reason. 'policy' names the deciding authorization "
        'policy (reason="policy"); empty for the mesh\'s own checks.',
        labels=["reason", "policy"],
    )
    totals = {r: 0 for r in DENY_REASONS if r != "policy"}
    by_policy: dict[str, int] = {}
    for w in live:
        wm = w.get("metrics") or {}
        for r, n in wm.get("denied", {}).items():
            if r != "policy":
                totals[r] = totals.get(r, 0) + n
        for pol, n in wm.get("denied_policies", {}).items():
            by_policy[pol] = by_policy.get(pol, 0) + n
    for r, n in sorted(totals.items()):
        denied.add_metric([r, ""], n)
    for pol, n in sorted(by_policy.items()):  # reason "policy": one series per deciding policy
        denied.add_metric(["policy", pol], n)
    out.append(denied)
    if http["present"]:
        dreq = Counter(
            "meshlet_denied_requests_total",
            "HTTP requests refused with 403 by authorization policy, by deciding policy "
            "(ns/name; empty: no ALLOW rule matched).",
            labels=["policy"],
        )
        for pol, n in sorted(http["denied_policies"].items()):
            dreq.add_metric([pol], n)
        out.append(dreq)

    out += tracing_families(live)

    overflow = Counter(
        "meshlet_metrics_overflow_total",
        "Connections (istio_tcp_*) or requests (istio_request*) not counted because a worker "
        "reached its label-set cap.",
    )
    overflow.add_metric([], sum((w.get("metrics") or {}).get("overflow", 0) for w in live) + http["overflow"])
    out.append(overflow)
    series = Gauge("meshlet_metrics_label_sets", "Istio label sets held by the proxy workers (summed).")
    series.add_metric(
        [], sum(len((w.get("metrics") or {}).get("tcp", ())) for w in live) + len(http["series"])
    )
    out.append(series)

    hs = Counter(
        "meshlet_tls_handshakes_total",
        "Tunnel TLS handshakes by result (full, resumed, refused).",
        labels=["result"],
    )
    refused = Counter(
        "meshlet_tls_refused_total", "Refused tunnel TLS handshakes by reason.", labels=["reason"]
    )
    full = resumed = ref = 0
    reasons: dict[str, int] = {}
    for w in live:
        t = w.get("tls") or {}
        full += t.get("handshakes", 0) - t.get("resumed", 0)
        resumed += t.get("resumed", 0)
        ref += t.get("refused", 0)
        for r, n in (t.get("failures") or {}).items():
            reasons[r] = reasons.get(r, 0) + n
    for result, n in (("full", full), ("resumed", resumed), ("refused", ref)):
        hs.add_metric([result], n)
    for r, n in sorted(reasons.items()):
        refused.add_metric([r], n)
    out += [hs, refused]

    # The pooled, multiplexed tunnel: TLS connections against the pod connections they carry.
    tconns = Counter(
        "meshlet_tunnel_connections_total",
        "Multiplexed tunnel (meshlet-mux/1) TLS connections, by direction (out: dialed, in: accepted).",
        labels=["direction"],
    )
    tstreams = Counter(
        "meshlet_tunnel_streams_total",
        "Pod connections carried as streams of multiplexed tunnel connections, by direction.",
        labels=["direction"],
    )
    for d in ("out", "in"):
        tconns.add_metric([d], sum((w.get("counters") or {}).get(f"tunnel_connections_{d}", 0) for w in live))
        tstreams.add_metric([d], sum((w.get("counters") or {}).get(f"tunnel_streams_{d}", 0) for w in live))
    out += [tconns, tstreams]

    expiry = Gauge(
        "meshlet_workload_certificate_expiry_timestamp_seconds",
        "Expiry (Unix time) of the workload certificate the proxy holds; the earliest across workers.",
        labels=["spiffe_id"],
    )
    soonest: dict[str, float] = {}
    for w in live:
        for c in (w.get("certs") or {}).get("identities", []):
            t = _ts(c.get("not_after"))
            if t is not None:
                soonest[c["spiffe_id"]] = min(t, soonest.get(c["spiffe_id"], t))
    for sid, t in sorted(soonest.items()):
        expiry.add_metric([sid], t)
    out.append(expiry)

    ident = snap.get("identity") or {}
    roots = Gauge("meshlet_trust_bundle_roots", "Root CAs in the node's trust bundle.")
    roots.add_metric([], len(ident.get("roots", [])))
    gen = Gauge(
        "meshlet_identity_generation", "Changes whenever the node's CA material or trust bundle changed."
    )
    gen.add_metric([], ident.get("generation", 0))
    out += [roots, gen]

    dp = snap.get("datapath") or {}
    entries = Gauge("meshlet_bpf_map_entries", "Entries in a pinned BPF map.", labels=["map"])
    cap = Gauge("meshlet_bpf_map_capacity", "max_entries of a pinned BPF map.", labels=["map"])
    for mp in dp.get("maps", []):
        if mp.get("entries") is not None:
            entries.add_metric([mp["name"]], mp["entries"])
        cap.add_metric([mp["name"]], mp["max_entries"])
    events = Counter(
        "meshlet_datapath_events_total",
        "Kernel datapath counters: redirects, bypasses, strict-mode drops, flow table and ring "
        "buffer pressure (origdst_full is a redirect the proxy cannot serve).",
        labels=["event"],
    )
    for k, v in sorted((dp.get("counters") or {}).items()):
        events.add_metric([k], v)
    out += [entries, cap, events]
    return out


class _Collector:
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot
        self.errors = 0

    def collect(self) -> Iterable[Family]:
        try:
            snap = self.snapshot()
        except Exception:  # a scrape must not kill the server thread
            self.errors += 1
            log.exception("metrics snapshot failed")
            snap = {}
        yield from families(snap)
        err = Counter("meshlet_metrics_scrape_errors", "Scrapes whose snapshot failed (served partially).")
        err.add_metric([], self.errors)
        yield err


#: A liveness/readiness verdict: (ok, reason shown in the probe's body).
Verdict = tuple[bool, str]

#: An agent whose loop has not finished a tick for this long is stuck (the
#: loop ticks every half second; a tick that waits on the kernel or the
#: proxies takes a few seconds at worst).  The kubelet then restarts it, and
#: the new agent adopts the pinned datapath.
LIVENESS_WINDOW = 60.0


def liveness(tick_age: float | None, window: float = LIVENESS_WINDOW) -> Verdict:
    """Alive while the agent's loop keeps ticking.  ``tick_age``: seconds
    since the last tick ended (or since the loop started, before the first)."""
    if tick_age is None:
        return False, "the agent loop has not started"
    if tick_age > window:
        return False, f"the agent loop has not ticked for {tick_age:.0f}s (limit {window:.0f}s): stuck"
    return True, "ok"


def readiness(facts: dict[str, Any], window: float = LIVENESS_WINDOW) -> Verdict:
    """Ready when the node can carry mesh traffic: the loop is alive, every
    proxy worker is alive and listening (a worker listens once it holds its
    certificates; until then the pods' redirected connections are refused),
    and the node's identity is loaded (when mTLS is configured).  ``facts``:
    ``tick_age``, ``workers`` (list of ``{"alive": bool, "listening":
    bool}``; no ``listening``: listening), ``identity_configured``,
    ``identity_loaded``."""
    ok, why = liveness(facts.get("tick_age"), window)
    if not ok:
        return ok, why
    problems = []
    workers = facts.get("workers") or []
    dead = sum(1 for w in workers if not w.get("alive"))
    if not workers:
        problems.append("no proxy worker")
    elif dead:
        problems.append(f"{dead} of {len(workers)} proxy workers not running")
    else:
        deaf = sum(1 for w in workers if not w.get("listening", True))
        if deaf:
            problems.append(
                f"{deaf} of {len(workers)} proxy workers not listening yet (waiting for their certificates)"
            )
    if facts.get("identity_configured") and not facts.get("identity_loaded"):
        problems.append("the node's identity (intermediate CA, bundle) is not loaded")
    if problems:
        return False, "; ".join(problems)
    return True, "ok"


#: Bounds on what a client may send: a request line and headers, no body.
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 100
REQUEST_TIMEOUT = 10.0


class _Handler(socketserver.StreamRequestHandler):
    """One HTTP/1.x request per connection (``Connection: close``): GET or
    HEAD of a probe path, or of anything else for the metrics.  Scrapes and
    probes are not logged."""

    timeout = REQUEST_TIMEOUT
    server: _Server

    def handle(self) -> None:
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            for _ in range(MAX_HEADERS + 1):
                h = self.rfile.readline(MAX_REQUEST_LINE + 1)
                if h in (b"\r\n", b"\n", b""):
                    break
            else:
                return self._send(431, "too many header fields\n", head=False)
        except OSError:  # the timeout, a reset
            return
        parts = line.decode("latin-1").split()
        if len(line) > MAX_REQUEST_LINE or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._send(400, "bad request\n", head=False)
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return self._send(405, "only GET and HEAD\n", head=False, extra="Allow: GET, HEAD\r\n")
        status, ctype, body = self.server.answer(target.split("?", 1)[0])
        self._send(status, body, head=method == "HEAD", ctype=ctype)

    def _send(
        self,
        status: int,
        body: str | bytes,
        *,
        head: bool,
        ctype: str = "text/plain; charset=utf-8",
        extra: str = "",
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        reason = _REASONS.get(status, "")
        head_lines = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n"
        )
        try:
            self.wfile.write(head_lines.encode() + (b"" if head else data))
            if status >= 400:
                # What the client sent beyond what was read would make the
                # close a reset, which can destroy the answer before the
                # client reads it: end our side, then take a bounded rest.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(1.0)
                for _ in range(16):
                    if not self.connection.recv(65536):
                        break
        except OSError:
            pass


_REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], family: int, answer: Callable[[str], tuple[int, str, bytes]]
    ):
        self.address_family = family
        self.answer = answer
        super().__init__(address, _Handler)


class MetricsServer:
    """A threading HTTP/1.x server in a daemon thread: the metrics (one
    collector) and, when given, the /healthz and /readyz probes."""

    def __init__(
        self,
        snapshot: Callable[[], dict],
        address: str,
        port: int,
        *,
        live: Callable[[], Verdict] | None = None,
        ready: Callable[[], Verdict] | None = None,
    ) -> None:
        self.collector = _Collector(snapshot)
        self.address, self.port = address, port
        self.probes = {p: f for p, f in (("/healthz", live), ("/readyz", ready)) if f is not None}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``: a probe's
        verdict, or the metrics for any other path."""
        check = self.probes.get(path)
        if check is None:
            return 200, CONTENT_TYPE, render(self.collector.collect())
        try:
            ok, why = check()
        except Exception as e:  # a broken check is a failed probe, never a dead server thread
            log.exception("health check failed")
            ok, why = False, f"the check itself failed: {e}"
        return (200 if ok else 503), "text/plain; charset=utf-8", why.encode() + b"\n"

    def start(self) -> MetricsServer:
        family = socket.getaddrinfo(
            self.address, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        self._server = _Server((self.address, self.port), family, self.answer)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
