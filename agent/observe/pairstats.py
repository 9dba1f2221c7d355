"""``meshlet stats``: traffic per workload pair, like ``linkerd viz stat``.

Pure: the proxy workers' Istio-labelled TCP counters (merged by
:func:`agent.observe.prometheus.merge_tcp`) and the kernel's flow views (from
:func:`agent.observe.flowviews.build_views`) in; rows, filters and text out.

* connections and bytes come from the proxy (exact application bytes,
  updated at every read and final at close): the same numbers
  ``/metrics`` serves.  A pair's row uses the proxy's ``source`` reports
  when this node has them (the client's node), else its ``destination``
  reports (the server's node).  ``sent`` is what the source sent.
* TCP RTT comes from the kernel: the smoothed RTT (srtt) of every leg of
  the pair's connections that this node can attribute: the client pod's
  leg and every leg linked to it (proxy legs, the tunnel leg, the server
  pod's leg on the same node), open or recently closed.  The destination
  node of a cross-node connection cannot attribute its legs to a source
  workload, so its rows show no RTT.
* L7 columns come from the proxy's HTTP request counters (``proxy.l7``):
  requests, success rate (responses below 500 over all requests; a request
  that got no response, code 0, is a failure), and request latency
  p50/p95/p99 from the workers' merged log-bucket histograms (2% wide: a
  percentile is exact to within 2%).  They are counted where the request is
  parsed: the destination node's proxy.  So on the client's node a
  cross-node pair shows ``None`` ("-"): not measured there, not zero; the
  destination node's ``meshlet stats`` has them.  A same-node pair has both
  reports; the row uses the same reporter as its TCP numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

UNKNOWN = "unknown"


@dataclass(frozen=True)
class StatsFilter:
    """``--from`` / ``--to``: a workload name, or ``namespace/workload``."""

    src: str | None = None
    dst: str | None = None

    @staticmethod
    def _match(want: str | None, end: dict) -> bool:
        if not want:
            return True
        if "/" in want:
            return want == f"{end['namespace']}/{end['workload']}"
        return want == end["workload"]

    def matches(self, row: dict) -> bool:
        return self._match(self.src, row["source"]) and self._match(self.dst, row["destination"])


def percentile(values: list[int], q: float) -> int | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))
    return s[int(k)]


def _end(lb: dict, side: str) -> dict:
    wl = lb[f"{side}_workload"]
    ns = lb[f"{side}_workload_namespace"]
    if side == "destination" and wl == UNKNOWN:
        wl = lb.get("destination_service") or UNKNOWN  # outside the mesh: the IP dialed
    return {"workload": wl, "namespace": ns}


def fine_percentile(hist: dict[int, int], q: float, growth: float) -> float | None:
    """Nearest-rank percentile (ms) of a log-bucket latency histogram
    (bucket -> count, see ``agent.proxy.telemetry.fine_bucket``)."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, -(-total * q // 100))
    acc = 0
    for k in sorted(hist):
        acc += hist[k]
        if acc >= rank:
            return round(growth ** (k + 0.5) / 1000.0, 3)
    return None  # unreachable


def _pair_of(lb: dict) -> tuple:
    src, dst = _end(lb, "source"), _end(lb, "destination")
    return (src["namespace"], src["workload"], dst["namespace"], dst["workload"])


def _http_by_pair(http: dict | None) -> dict[tuple, dict]:
    """(reporter, pair) -> {"requests", "success", "latency": fine hist}."""
    out: dict[tuple, dict] = {}
    if not http or not http.get("present"):
        return out
    names = http["names"]
    for key, s in http["series"].items():
        lb = dict(zip(names, key, strict=False))
        r = out.setdefault((lb["reporter"], _pair_of(lb)), {"requests": 0, "success": 0, "latency": {}})
        r["requests"] += s.count
        try:
            code = int(lb.get("response_code", "0"))
        except ValueError:
            code = 0
        if 0 < code < 500:
            r["success"] += s.count
    for prefix, hist in http["latency"].items():
        lb = dict(zip(names, prefix, strict=False))
        r = out.setdefault((lb["reporter"], _pair_of(lb)), {"requests": 0, "success": 0, "latency": {}})
        for k, n in hist.items():
            r["latency"][k] = r["latency"].get(k, 0) + n
    return out


def pair_rows(
    names: list[str],
    tcp: dict[tuple, list[int]],
    views: Iterable[dict],
    workload_of: dict[str, tuple[str, str]],
    http: dict | None = None,
) -> list[dict]:
    """One row per (source workload, destination workload).

    ``tcp``: label values -> [opened, closed, received, sent] (Istio's
    direction); ``views``: flow views; ``workload_of``: pod key ->
    (workload, namespace); ``http``: :func:`agent.observe.prometheus.merge_http`."""
    by_reporter: dict[str, dict[tuple, dict]] = {"source": {}, "destination": {}}
    for key, (opened, closed, received, sent) in tcp.items():
        lb = dict(zip(names, key, strict=False))
        src, dst = _end(lb, "source"), _end(lb, "destination")
        pair = (src["namespace"], src["workload"], dst["namespace"], dst["workload"])
        rows = by_reporter.setdefault(lb["reporter"], {})
        r = rows.get(pair)
        if r is None:
            r = rows[pair] = {
                "source": src,
                "destination": dst,
                "reporter": lb["reporter"],
                "security": set(),
                "opened": 0,
                "closed": 0,
                "failed": 0,
                "sent": 0,
                "received": 0,
            }
        r["opened"] += opened
        r["closed"] += closed
        if lb.get("response_flags", "-") != "-":
            r["failed"] += closed
        r["sent"] += received
        r["received"] += sent
        if opened or closed:
            r["security"].add(lb["connection_security_policy"])
    merged = dict(by_reporter["destination"])
    merged.update(by_reporter["source"])  # the client's node knows the pair best
    rtts = _rtt_samples(views, workload_of)
    l7 = _http_by_pair(http)
    growth = (http or {}).get("fine_growth") or 1.02
    out = []
    for pair, r in sorted(merged.items()):
        samples = rtts.get(pair, [])
        h = l7.get((r["reporter"], pair))
        if h is None:  # e.g. requests counted under the other reporter only
            other = "destination" if r["reporter"] == "source" else "source"
            h = l7.get((other, pair))
        out.append(
            {
                "source": r["source"],
                "destination": r["destination"],
                "reporter": r["reporter"],
                "security": ",".join(sorted(r["security"])) or "-",
                "connections": {
                    "total": r["opened"],
                    "active": r["opened"] - r["closed"],
                    "closed": r["closed"],
                    "failed": r["failed"],
                },
                "bytes": {"sent": r["sent"], "received": r["received"]},
                "tcp_rtt_us": {
                    "p50": percentile(samples, 50),
                    "max": max(samples) if samples else None,
                    "samples": len(samples),
                },
                # L7: None where this node parsed no HTTP for the pair (not zero).
                "requests": h["requests"] if h else None,
                "success_rate": round(h["success"] / h["requests"], 6) if h and h["requests"] else None,
                "latency_ms": {
                    q: fine_percentile(h["latency"], n, growth) if h else None
                    for q, n in (("p50", 50), ("p95", 95), ("p99", 99))
                },
            }
        )
    return out


def _rtt_samples(views: Iterable[dict], workload_of: dict[str, tuple[str, str]]) -> dict[tuple, list[int]]:
    """pair -> srtt (us) of every leg linked to one of its client legs."""
    views = list(views)
    by_cookie = {v["cookie"]: v for v in views}
    out: dict[tuple, list[int]] = {}
    for v in views:
        if v["role"] != "client":
            continue
        s, d = v["source"].get("pod"), v["destination"].get("pod")
        if s not in workload_of:
            continue
        sw, sns = workload_of[s]
        if d in workload_of:
            dw, dns = workload_of[d]
        else:
            dw, dns = v["destination"]["ip"], UNKNOWN
        seen = {v["cookie"]}
        todo = [v["cookie"]]
        while todo:
            for n in by_cookie[todo.pop()].get("linked", ()):
                if n in by_cookie and n not in seen:
                    seen.add(n)
                    todo.append(n)
        samples = out.setdefault((sns, sw, dns, dw), [])
        samples += [by_cookie[c]["srtt_us"] for c in sorted(seen) if by_cookie[c]["srtt_us"]]
    return out


def select(rows: list[dict], flt: StatsFilter) -> list[dict]:
    return [r for r in rows if flt.matches(r)]


# --- formatting ----------------------------------------------------------------------

COLUMNS = (
    "SOURCE",
    "DESTINATION",
    "SECURITY",
    "CONNS",
    "ACTIVE",
    "SENT",
    "RECEIVED",
    "RTT P50",
    "RTT MAX",
    "REQUESTS",
    "SUCCESS",
    "P50",
    "P95",
    "P99",
)


def _name(end: dict) -> str:
    return end["workload"] if end["namespace"] == UNKNOWN else f"{end['namespace']}/{end['workload']}"


def _opt(v, fmt) -> str:
    return "-" if v is None else fmt(v)


def format_table(rows: list[dict]) -> str:
    from .flowviews import human_bytes, human_us

    table = [list(COLUMNS)]
    for r in rows:
        lat = r["latency_ms"]
        table.append(
            [
                _name(r["source"]),
                _name(r["destination"]),
                r["security"],
                str(r["connections"]["total"]),
                str(r["connections"]["active"]),
                human_bytes(r["bytes"]["sent"]),
                human_bytes(r["bytes"]["received"]),
                human_us(r["tcp_rtt_us"]["p50"]),
                human_us(r["tcp_rtt_us"]["max"]),
                _opt(r["requests"], str),
                _opt(r["success_rate"], lambda x: f"{x * 100:.1f}%"),
                _opt(lat["p50"], lambda x: f"{x:g}ms"),
                _opt(lat["p95"], lambda x: f"{x:g}ms"),
                _opt(lat["p99"], lambda x: f"{x:g}ms"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
