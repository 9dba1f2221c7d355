"""``meshlet flows``: what the node's TCP flows are, who they belong to.

Pure: flow records (dicts from :func:`agent.datapath.flowtable.decode_flow`) in,
views, filters, sort orders and text out.  The agent builds views (it has the
inventory); the CLI only formats what the admin API returns.

One row per socket ("leg") the kernel tracks.  A relayed connection has up
to four legs on one node: the pod's client leg, the proxy's accepted leg,
the proxy's upstream leg and the destination pod's server leg.
:func:`link_legs` joins them: client <-> proxy accepted and proxy upstream
<-> pod server by the reversed 4-tuple, proxy accepted <-> proxy upstream by
the cookie pairs the proxy files in ``ml_flow_links``.

Every row reads source -> destination.  ``sent`` is what the source sent,
``received`` what it got back, whichever end of the leg the kernel watched.
Counters are the kernel's tcp_info counters: SYN and FIN count one byte each
once acknowledged/received.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SORT_KEYS = ("start", "srtt", "bytes", "age", "retrans")
STATES = (
    "open",
    "closed",
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "closing",
)
ROLE_LABELS = {
    "client": "egress",
    "server": "ingress",
    "proxy-outbound": "proxy-in",
    "proxy-tunnel": "tunnel-in",
    "proxy-upstream": "proxy-out",
    "unknown": "?",
}
# Legs whose source is on the local end of the socket (sent = bytes_acked).
_LOCAL_IS_SOURCE = ("client", "proxy-upstream", "unknown")


# --- resolution ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: str | None = None  # namespace/name
    namespace: str | None = None
    identity: str | None = None  # spiffe://<td>/ns/<ns>/sa/<sa>
    node: str | None = None
    kind: str = "ip"  # pod | proxy | node | ip

    @property
    def label(self) -> str:
        if self.pod:
            return self.pod
        if self.kind in ("proxy", "node"):
            return f"{self.kind}/{self.node}"
        return self.ip

    def to_dict(self) -> dict:
        return {
            "ip": self.ip,
            "port": self.port,
            "pod": self.pod,
            "namespace": self.namespace,
            "identity": self.identity,
            "node": self.node,
            "kind": self.kind,
            "label": self.label,
        }


@dataclass
class Resolver:
    """Addresses and workload ids -> pods, proxies and nodes."""

    by_ip: dict[str, dict] = field(default_factory=dict)
    by_workload: dict[int, dict] = field(default_factory=dict)

    def add_pod(
        self,
        key: str,
        namespace: str,
        service_account: str,
        node: str,
        ips: Iterable[str],
        trust_domain: str,
        workload_id: int | None = None,
    ) -> None:
        info = {
            "pod": key,
            "namespace": namespace,
            "node": node,
            "kind": "pod",
            "identity": f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
        }
        for ip in ips:
            self.by_ip[_norm(ip)] = info
        if workload_id is not None:
            self.by_workload[workload_id] = info

    def add_address(self, ip: str, kind: str, node: str) -> None:
        self.by_ip.setdefault(_norm(ip), {"kind": kind, "node": node})

    @classmethod
    def from_inventory(
        cls, inv, trust_domain: str, proxy_ips: dict[str, str], workload_id: Callable[[str], int]
    ) -> Resolver:
        """``inv``: an Inventory; ``proxy_ips``: address -> node of the node
        proxies' redirect addresses."""
        r = cls()
        for p in inv.pods:
            r.add_pod(
                p.key,
                p.namespace,
                p.service_account,
                p.node,
                [str(ip) for ip in p.ips],
                trust_domain,
                workload_id(p.key),
            )
        for ip, node in proxy_ips.items():
            r.add_address(ip, "proxy", node)
        for n in inv.nodes:
            r.add_address(str(n.address), "node", n.name)
            if n.address6:
                r.add_address(str(n.address6), "node", n.name)
        return r

    def endpoint(self, ip: str, port: int, workload_id: int | None = None) -> Endpoint:
        info = self.by_ip.get(_norm(ip))
        if info is None and workload_id:
            info = self.by_workload.get(workload_id)
        info = info or {}
        return Endpoint(
            ip=ip,
            port=port,
            pod=info.get("pod"),
            namespace=info.get("namespace"),
            identity=info.get("identity"),
            node=info.get("node"),
            kind=info.get("kind", "ip"),
        )


def _norm(ip: str) -> str:
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a)


# --- linking ---------------------------------------------------------------------------


def _tuple(f: dict, reverse: bool = False) -> tuple:
    lo, re_ = (f["remote"], f["local"]) if reverse else (f["local"], f["remote"])
    return (_norm(lo[0]), lo[1], _norm(re_[0]), re_[1])


def link_legs(flows: list[dict], links: dict[int, int] | None = None) -> dict[int, set[int]]:
    """cookie -> cookies of the legs it is directly joined to (see module doc)."""
    links = dict(links or {})
    for f in flows:
        if f.get("peer_cookie"):
            links.setdefault(f["cookie"], f["peer_cookie"])
    by_tuple: dict[tuple, list[dict]] = {}
    for f in flows:
        by_tuple.setdefault(_tuple(f), []).append(f)
    pairs = {
        ("client", "proxy-outbound"),
        ("proxy-outbound", "client"),
        ("proxy-upstream", "server"),
        ("server", "proxy-upstream"),
    }
    out: dict[int, set[int]] = {f["cookie"]: set() for f in flows}
    for f in flows:
        for g in by_tuple.get(_tuple(f, reverse=True), ()):
            if (f["role"], g["role"]) in pairs and g["cookie"] != f["cookie"]:
                out[f["cookie"]].add(g["cookie"])
    present = set(out)
    for a, b in links.items():
        if a in present and b in present:
            out[a].add(b)
            out[b].add(a)
    return out


def _origin(cookie: int, by_cookie: dict[int, dict], graph: dict[int, set[int]]) -> dict | None:
    """The pod client leg a server leg's connection started from, if every
    leg between them is known (server <- upstream <- accepted <- client)."""
    seen = {cookie}
    todo = [cookie]
    while todo:
        c = todo.pop()
        for n in graph.get(c, ()):
            if n in seen:
                continue
            seen.add(n)
            if by_cookie[n]["role"] == "client":
                return by_cookie[n]
            if by_cookie[n]["role"] in ("proxy-upstream", "proxy-outbound"):
                todo.append(n)
    return None


# --- views -------------------------------------------------------------------------------


def build_views(
    flows: list[dict], resolver: Resolver, node: str, now: float, links: dict[int, int] | None = None
) -> list[dict]:
    """Flow records -> views (source/destination resolved, oriented counters)."""
    graph = link_legs(flows, links)
    by_cookie = {f["cookie"]: f for f in flows}
    out = []
    for f in flows:
        role = f["role"]
        local = resolver.endpoint(
            f["local"][0], f["local"][1], f.get("workload_id") if role in ("client", "server") else None
        )
        remote = resolver.endpoint(f["remote"][0], f["remote"][1])
        via = None
        if role == "client":
            src = local
            dst = resolver.endpoint(*f["orig_dst"]) if f.get("orig_dst") else remote
            via = remote
        elif role in _LOCAL_IS_SOURCE:
            src, dst = local, remote
        else:
            src, dst = remote, local
            if role == "server":
                origin = _origin(f["cookie"], by_cookie, graph)
                if origin is not None:
                    via = remote
                    src = resolver.endpoint(origin["local"][0], origin["local"][1], origin.get("workload_id"))
        if role in _LOCAL_IS_SOURCE:
            sent, received = f["bytes_acked"], f["bytes_received"]
        else:
            sent, received = f["bytes_received"], f["bytes_acked"]
        end = f.get("end")
        start = f.get("start")
        duration = ((end or now) - start) if start else None
        meshed = role != "server" or remote.kind in ("proxy", "node")
        out.append(
            {
                "cookie": f["cookie"],
                "node": node,
                "role": role,
                "direction": ROLE_LABELS.get(role, role),
                "source": src.to_dict(),
                "destination": dst.to_dict(),
                "via": via.to_dict() if via else None,
                "state": f["state"],
                "open": end is None,
                "sent": sent,
                "received": received,
                "bytes_acked": f["bytes_acked"],
                "bytes_received": f["bytes_received"],
                "srtt_us": f["srtt_us"],
                "min_rtt_us": f["min_rtt_us"],
                "retransmits": f["retransmits"],
                "start": start,
                "end": end,
                "duration_s": round(duration, 6) if duration is not None else None,
                "linked": sorted(graph.get(f["cookie"], ())),
                "evicted": f.get("evicted", False),
                # Authorization policy arrives with issue #4: for now everything
                # the mesh relays is allowed, and what bypasses it has no verdict.
                "verdict": "allowed" if meshed else "-",
            }
        )
    return out


# --- filters -------------------------------------------------------------------------------

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """'30s', '5m', '1.5h', '2d', '250ms' or plain seconds -> seconds."""
    m = _SINCE.match(text or "")
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d (e.g. 30s, 5m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class FlowFilter:
    pod: str | None = None
    namespace: str | None = None
    identity: str | None = None
    port: int | None = None
    state: str | None = None
    since: float | None = None  # seconds

    def __post_init__(self) -> None:
        if self.state is not None and self.state.lower() not in STATES:
            raise ValueError(f"invalid state {self.state!r}: one of {', '.join(STATES)}")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> FlowFilter:
        """From query parameters; raises ValueError with a readable message."""
        port = params.get("port")
        since = params.get("since")
        try:
            port_v = int(port) if port not in (None, "") else None
        except ValueError:
            raise ValueError(f"invalid port {port!r}") from None
        return cls(
            pod=params.get("pod") or None,
            namespace=params.get("namespace") or None,
            identity=params.get("identity") or None,
            port=port_v,
            state=params.get("state") or None,
            since=parse_since(since) if since else None,
        )

    def to_params(self) -> dict[str, str]:
        out = {}
        for k in ("pod", "namespace", "identity", "port", "state", "since"):
            v = getattr(self, k)
            if v is not None:
                out[k] = str(v)
        return out

    def matches(self, v: dict, now: float) -> bool:
        ends = [v["source"], v["destination"]]
        if self.pod is not None and not any(_pod_match(self.pod, e.get("pod")) for e in ends):
            return False
        if self.namespace is not None and self.namespace not in (e.get("namespace") for e in ends):
            return False
        if self.identity is not None and self.identity not in (e.get("identity") for e in ends):
            return False
        if self.port is not None and self.port not in (e.get("port") for e in ends):
            return False
        if self.state is not None:
            s = self.state.lower()
            if s == "open":
                if not v["open"]:
                    return False
            elif s == "closed":
                if v["open"]:
                    return False
            elif v["state"].lower() != s:
                return False
        if self.since is not None and not v["open"] and (v["end"] or 0) < now - self.since:
            return False
        return True


def _pod_match(want: str, pod: str | None) -> bool:
    if not pod:
        return False
    return want == pod or ("/" not in want and pod.split("/", 1)[-1] == want)


def sort_views(views: list[dict], key: str = "start") -> list[dict]:
    """'start' oldest first; 'srtt', 'bytes', 'retrans' largest first; 'age'
    longest-lived first."""
    if key not in SORT_KEYS:
        raise ValueError(f"invalid sort key {key!r}: one of {', '.join(SORT_KEYS)}")
    if key == "start":
        return sorted(views, key=lambda v: (v["start"] or 0, v["cookie"]))
    if key == "srtt":
        return sorted(views, key=lambda v: (-v["srtt_us"], v["cookie"]))
    if key == "bytes":
        return sorted(views, key=lambda v: (-(v["sent"] + v["received"]), v["cookie"]))
    if key == "retrans":
        return sorted(views, key=lambda v: (-v["retransmits"], v["cookie"]))
    return sorted(views, key=lambda v: (-(v["duration_s"] or 0), v["cookie"]))


def select(views: list[dict], flt: FlowFilter, sort: str, now: float, limit: int | None = None) -> list[dict]:
    out = sort_views([v for v in views if flt.matches(v, now)], sort)
    return out[:limit] if limit else out


# --- formatting --------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}B"


def human_us(us: int | None) -> str:
    if not us:
        return "-"
    if us >= 1_000_000:
        return f"{us / 1e6:.2f}s"
    if us >= 1000:
        return f"{us / 1000:.2f}ms"
    return f"{us}us"


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def _ep(e: dict, wide: bool, with_port: bool) -> str:
    if wide:
        host = f"[{e['ip']}]" if ":" in e["ip"] else e["ip"]
        name = f"{e['label']}" if e["label"] != e["ip"] else ""
        return f"{name}({host}:{e['port']})" if name else f"{host}:{e['port']}"
    return f"{e['label']}:{e['port']}" if with_port else e["label"]


COLUMNS = (
    "SOURCE",
    "DESTINATION",
    "ROLE",
    "STATE",
    "SENT",
    "RECEIVED",
    "SRTT",
    "MIN RTT",
    "RETRANS",
    "DURATION",
    "VERDICT",
)
WIDE_COLUMNS = COLUMNS + ("NODE", "COOKIE", "LINKED", "VIA")


def row(v: dict, wide: bool = False) -> list[str]:
    cells = [
        _ep(v["source"], wide, with_port=False),
        _ep(v["destination"], wide, with_port=True),
        v["direction"],
        v["state"],
        human_bytes(v["sent"]),
        human_bytes(v["received"]),
        human_us(v["srtt_us"]),
        human_us(v["min_rtt_us"]),
        str(v["retransmits"]),
        human_duration(v["duration_s"]),
        v["verdict"],
    ]
    if wide:
        cells += [
            v["node"],
            str(v["cookie"]),
            ",".join(str(c) for c in v["linked"]) or "-",
            _ep(v["via"], True, True) if v.get("via") else "-",
        ]
    return cells


# Column widths for streamed rows (--follow), which cannot be measured first.
FIXED_WIDTHS = {
    "EVENT": 7,
    "SOURCE": 22,
    "DESTINATION": 28,
    "ROLE": 9,
    "STATE": 11,
    "SENT": 9,
    "RECEIVED": 9,
    "SRTT": 8,
    "MIN RTT": 8,
    "RETRANS": 7,
    "DURATION": 8,
    "VERDICT": 7,
    "NODE": 10,
    "COOKIE": 20,
    "LINKED": 20,
    "VIA": 30,
}


def format_table(
    views: list[dict],
    wide: bool = False,
    header: bool = True,
    prefix: list[str] | None = None,
    fixed: bool = False,
) -> str:
    """Aligned columns; ``prefix`` adds a leading column (e.g. follow events);
    ``fixed`` uses FIXED_WIDTHS so separately printed rows line up."""
    cols = list(WIDE_COLUMNS if wide else COLUMNS)
    rows = [row(v, wide) for v in views]
    if prefix is not None:
        cols = ["EVENT"] + cols
        rows = [[p] + r for p, r in zip(prefix, rows, strict=True)]
    table = ([cols] if header else []) + rows
    if not table:
        return ""
    if fixed:
        widths = [FIXED_WIDTHS[c] for c in cols]
    else:
        widths = [max(len(r[i]) for r in ([cols] + rows)) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)
