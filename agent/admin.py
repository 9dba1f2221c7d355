"""The agent's admin API: HTTP/1.0 over a Unix socket, JSON bodies
(``meshlet status``, ``workloads``, ``services``, ``policy``, ``flows``,
``stats`` talk to it).

GET everywhere; POST and DELETE for policies.  A request body needs a
Content-Length (at most :data:`ADMIN_BODY_LIMIT` bytes).  Requests are
dispatched through :data:`ROUTE_TABLE`: the first route whose path matches
serves the request if it accepts the method; otherwise a method other than
GET gets 405 and an unknown path 404 (listing :data:`ROUTES`).

The handlers read the agent through :class:`AdminAgent`, the interface the
node agent (:class:`agent.app.Agent`) implements and test doubles implement
too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .workloads.model import Inventory, services_doc, workload_id
from .yamlsrc import SourceError

if TYPE_CHECKING:
    from .config import AgentConfig
    from .policy.store import PolicyStore

log = logging.getLogger("meshlet.agent")

__all__ = ["AdminAgent", "Route", "ROUTE_TABLE", "ROUTES", "ADMIN_BODY_LIMIT", "start_admin"]


class AdminAgent(Protocol):
    """What the admin API reads and calls on the agent.  Each route uses a
    part: policies need ``policies``, ``policy_lock``, ``inventory`` and
    ``sync_policy_kernel``; services ``inventory`` and ``inventory_error``;
    flows and stats ``flow_reader``, ``datapath`` and ``worker_stats``."""

    cfg: AgentConfig
    inventory: Inventory | None
    inventory_error: str | None
    enrolled: dict[str, int]
    pending: dict[str, str]
    policies: PolicyStore | None
    policy_lock: threading.Lock
    flow_reader: Any  # datapath.flows.FlowReader, while serving
    datapath: Any  # datapath.loader.Datapath
    spec: Any  # datapath.loader.DatapathSpec
    cgroup_dir: str

    def status(self) -> dict: ...

    def sync_policy_kernel(self, wait: bool = True) -> bool: ...

    def worker_stats(self) -> list[dict | None]: ...


FLOW_ROUTES = {"/v1/flows", "/v1/flows/follow"}
POLICY_ROUTES = {
    "/v1/policies",
    "/v1/policies/<namespace>/<name>[?kind=K]",
    "POST /v1/policies:apply",
    "POST /v1/policies:diff",
    "DELETE /v1/policies/<namespace>/<name>[?kind=K]",
}
ROUTES = {"/v1/status", "/v1/workloads", "/v1/bpf", "/v1/stats", "/v1/services"} | FLOW_ROUTES | POLICY_ROUTES
ADMIN_BODY_LIMIT = 4 << 20
ADMIN_HEADER_LINES = 100


async def _read_admin_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes, tuple | None]:
    """(method, target, body, error): error is (status, message) for a request
    that cannot be served (its body is then not read)."""
    line = await asyncio.wait_for(reader.readline(), 5)
    parts = line.decode("latin-1").split()
    method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
    length, error = 0, None
    for _ in range(ADMIN_HEADER_LINES):
        h = await asyncio.wait_for(reader.readline(), 5)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
                if length < 0:
                    raise ValueError
            except ValueError:
                error = (400, f"bad Content-Length {value.strip()!r}")
    else:
        return method, target, b"", (431, "too many header lines")
    if error is None and length > ADMIN_BODY_LIMIT:
        error = (413, f"request body of {length} bytes; the limit is {ADMIN_BODY_LIMIT}")
    body = b""
    if error is None and length:
        try:
            body = await asyncio.wait_for(reader.readexactly(length), 30)
        except asyncio.IncompleteReadError:
            error = (400, "request body shorter than its Content-Length")
    return method, target, body, error


# --- the route table ------------------------------------------------------------------

Answer = tuple[int, dict]


@dataclass(frozen=True)
class Request:
    """One admin request, as the handlers see it."""

    agent: AdminAgent
    method: str
    target: str
    """Path and query, as sent."""
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


Handler = Callable[[Request], Awaitable["Answer | None"]]


@dataclass(frozen=True)
class Route:
    """``path`` served by ``handler`` for ``methods``.  ``prefix``: every path
    starting with ``path``; ``exact``: the whole target (a query string makes
    it another path); otherwise the path without its query.  ``release``:
    the answer can be big (every flow in the history decoded): once it is
    sent, the agent hands its free heap back (``release_heap``)."""

    path: str
    handler: Handler
    methods: tuple[str, ...] = ("GET",)
    prefix: bool = False
    exact: bool = False
    release: bool = False

    def matches(self, target: str) -> bool:
        if self.exact:
            return target == self.path
        path = target.split("?", 1)[0]
        return path.startswith(self.path) if self.prefix else path == self.path


async def _status(req: Request) -> Answer:
    return 200, req.agent.status()


async def _workloads_h(req: Request) -> Answer:
    return 200, _workloads(req.agent)


async def _services_h(req: Request) -> Answer:
    return 200, _services(req.agent)


async def _bpf(req: Request) -> Answer:
    from .datapath.status import datapath_status

    return 200, datapath_status(req.agent.spec.pin_dir, req.agent.cgroup_dir)


async def _policies(req: Request) -> Answer:
    return await asyncio.to_thread(_policies_then_kernel, req.agent, req.method, req.target, req.body)


async def _stats(req: Request) -> Answer:
    return await _stats_route(req.agent, req.target)


async def _flows(req: Request) -> Answer | None:
    return await _flows_route(req.agent, req.target, req.reader, req.writer)


ROUTE_TABLE: tuple[Route, ...] = (
    Route("/v1/policies", _policies, ("GET", "POST", "DELETE"), prefix=True),
    Route("/v1/status", _status, exact=True),
    Route("/v1/workloads", _workloads_h, exact=True),
    Route("/v1/services", _services_h, exact=True),
    Route("/v1/bpf", _bpf, exact=True),
    Route("/v1/stats", _stats, release=True),
    Route("/v1/flows", _flows, release=True),
    Route("/v1/flows/follow", _flows),
)


def route_for(method: str, target: str) -> Route | Answer:
    """The route serving ``method target``, or the error answer (405, 404)."""
    for route in ROUTE_TABLE:
        if route.matches(target):
            if method in route.methods:
                return route
            break
    if method != "GET":
        return 405, {"error": f"{method or 'this request'} is not supported here"}
    return 404, {"error": f"unknown path {target!r}", "paths": sorted(ROUTES)}


def release_heap() -> None:
    """Hand the agent's free heap back after a big answer (``Route.release``):
    decoding a full flow history, its views and their JSON grow glibc's heap
    by ~8 MB, which glibc keeps once freed (it trims only the top of its
    heap), for the node's life, and the views' cycles wait for a full
    collection.  Measured in a 2-node simulated cluster after the bench's
    traffic (10,000 closed flows), ``/v1/flows`` three times: agent RSS 49.6
    -> 62.8 (the heap 7.1 -> 15.3 MB) -> 66.6 MB after the second; with the
    release 49.5 -> 55.5 -> 57.5 -> 57.5 MB (what stays is pymalloc arenas
    that some surviving object pins)."""
    import gc

    from .proxy.memory import trim

    gc.collect()  # the views refer to each other (linked legs): cycles, freed only by the collector
    trim()


async def start_admin(agent: AdminAgent) -> asyncio.AbstractServer:
    """Serve the admin API on ``agent.cfg.admin.socket`` (mode 0600)."""
    path = agent.cfg.admin.socket
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await serve_one(reader, writer):  # its answer went with its frame
            await asyncio.to_thread(release_heap)

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True when its route wants the heap released."""
        release = False
        try:
            method, target, payload, error = await _read_admin_request(reader)
            if error is not None:
                code, body = error[0], {"error": error[1]}
            else:
                found = route_for(method, target)
                if isinstance(found, Route):
                    release = found.release
                    answer = await found.handler(Request(agent, method, target, payload, reader, writer))
                    if answer is None:
                        return release  # streamed
                    code, body = answer
                else:
                    code, body = found
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.0 {code} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()
        return release

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server


# --- policies (#4): the policy store over the admin API -------------------------------


def _traffic_warnings(agent: AdminAgent, store) -> list[str]:
    """TrafficPolicies for services the inventory does not have (yet): warnings,
    never errors, since a service can arrive after its policy."""
    from .traffic.trafficpolicy import KIND as TRAFFIC
    from .traffic.trafficpolicy import lint_traffic, parse_traffic_policies

    inv = agent.inventory
    if inv is None or TRAFFIC not in store.kinds:
        return []
    services = [(sv.namespace, sv.name, tuple(pt.port for pt in sv.ports)) for sv in inv.services]
    text = store.sets[TRAFFIC]["yaml"]
    if not text.strip():
        return []
    return [
        f"{origin}: {kind}: traffic policy {key}: {message}"
        for kind, key, origin, message in lint_traffic(
            parse_traffic_policies(text, "policies.yaml"), services
        )
    ]


def _policies_then_kernel(agent: AdminAgent, method: str, target: str, payload: bytes) -> tuple[int, dict]:
    """The policy route, then (after a change) the kernel's L4 entries."""
    code, body = _policies_route(agent, method, target, payload)
    if code == 200 and method in ("POST", "DELETE") and not target.split("?", 1)[0].endswith(":diff"):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            agent.sync_policy_kernel()
        except Exception:  # the tick retries; the proxies enforce meanwhile
            log.exception("kernel L4 policy sync after a policy change failed (will retry)")
        if "timings" in body:
            body["timings"]["kernel"] = {
                "ms": round((time.perf_counter() - wall) * 1000, 1),
                "cpu_ms": round((time.thread_time() - cpu) * 1000, 1),
            }
            log.info("policy apply stages (ms wall/CPU): %s", _stages_line(body["timings"]))
    return code, body


def _stages_line(timings: dict) -> str:
    return ", ".join(f"{k} {v['ms']:.0f}/{v['cpu_ms']:.0f}" for k, v in timings.items())


def _policies_route(agent: AdminAgent, method: str, target: str, payload: bytes) -> tuple[int, dict]:
    """Runs in a worker thread; one store operation at a time.  Documents are
    AuthorizationPolicy and TrafficPolicy (one store, one version).

    GET    /v1/policies                      {"version", "count", "byKind", "policies": [summary...]}
                                             (every summary has "kind", "namespace", "name")
    GET    /v1/policies/<ns>/<name>[?kind=K] {"kind", "namespace", "name", "document", "yaml"}
    POST   /v1/policies:apply                body {"files": [{"filename", "text"}...]}
                                             -> {"changes": [{"kind", "namespace", "name", "result"}],
                                                 "version", "previous_version", "count", "warnings",
                                                 "timings": {stage: {"ms", "cpu_ms"}}}
    POST   /v1/policies:diff                 same body -> {"diff", "changes", "version"}
    DELETE /v1/policies/<ns>/<name>[?kind=K] {"deleted": "ns/name", "kind", "version", "count"}

    Invalid documents: 400 {"error", "errors": [{"file", "line", "column", "path",
    "message", "text"}]}, and nothing changed.  Unknown policy: 404.  In
    Kubernetes mode (``agent.policy_watch``) apply and delete answer 409
    {"error", "source": "kubernetes", "server"}: the cluster's custom
    resources are the node's whole set.  Without
    ``kind``, a name that documents of two kinds share: 409 {"error", "kinds"}.
    "warnings": TrafficPolicies for services not in the inventory (applied anyway)."""
    from urllib.parse import parse_qs, unquote

    from .policy.store import MAX_DOCUMENT_BYTES, Ambiguous

    store = agent.policies
    if store is None:
        return 503, {"error": "the policy store is not loaded yet"}
    path, _, query = target.partition("?")
    watch = getattr(agent, "policy_watch", None)
    if watch is not None and (method == "DELETE" or path == "/v1/policies:apply"):
        return 409, {
            "error": "this agent enforces the policies of the Kubernetes API "
            f"({watch.client.server}, workloads.source: kubernetes); a local change would make "
            "this node disagree with the others and be undone by the next event. Write the "
            "custom resources instead: `meshlet policy apply --kubeconfig FILE -f ...` "
            "(or --in-cluster), or kubectl",
            "source": "kubernetes",
            "server": watch.client.server,
        }
    with agent.policy_lock:
        if path in ("/v1/policies:apply", "/v1/policies:diff"):
            if method != "POST":
                return 405, {"error": f"{path} needs POST"}
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                req = json.loads(payload or b"null")
                files = req["files"]
                sources = [(str(f["filename"]), f["text"]) for f in files]
                if not all(isinstance(t, str) for _, t in sources):
                    raise TypeError("text must be a string")
            except (ValueError, KeyError, TypeError) as e:
                return 400, {
                    "error": f'body must be JSON {{"files": [{{"filename": ..., "text": ...}}]}} ({e})'
                }
            if sum(len(t.encode()) for _, t in sources) > MAX_DOCUMENT_BYTES:
                return 413, {"error": f"more than {MAX_DOCUMENT_BYTES} bytes of policy text"}
            decode = {
                "ms": round((time.perf_counter() - wall) * 1000, 1),
                "cpu_ms": round((time.thread_time() - cpu) * 1000, 1),
            }
            before = store.version
            try:
                if path.endswith(":diff"):
                    text, changes = store.diff(sources)
                    return 200, {
                        "diff": text,
                        "changes": [c.to_dict() for c in changes],
                        "version": store.version,
                    }
                changes = store.apply(sources)
            except SourceError as e:
                return 400, {
                    "error": str(e),
                    "errors": [p.as_dict() for p in e.errors],
                }
            if store.version != before:
                log.info(
                    "policies applied: version %s -> %s (%d documents)", before, store.version, store.count
                )
            try:
                warnings = _traffic_warnings(agent, store)
            except Exception:
                log.exception("traffic policy lint failed")
                warnings = []
            for w in warnings:
                log.warning("%s", w)
            return 200, {
                "changes": [c.to_dict() for c in changes],
                "version": store.version,
                "previous_version": before,
                "count": store.count,
                "warnings": warnings,
                # where the time went (wall and CPU ms per stage; "kernel" is added after the sync)
                "timings": {"decode": decode, **store.timings},
            }
        if path == "/v1/policies":
            if method != "GET":
                return 405, {"error": "/v1/policies needs GET"}
            return 200, {
                "version": store.version,
                "count": store.count,
                "byKind": store.summary()["byKind"],
                "policies": store.list(),
            }
        rest = path[len("/v1/policies/") :].split("/") if path.startswith("/v1/policies/") else []
        if len(rest) != 2 or not all(rest):
            return 404, {"error": f"unknown path {target!r}", "paths": sorted(POLICY_ROUTES)}
        ns, name = unquote(rest[0]), unquote(rest[1])
        kinds = parse_qs(query).get("kind")
        kind = kinds[-1] if kinds else None
        known = ["AuthorizationPolicy", "RequestAuthentication", *store.kinds]
        if kind is not None and kind not in known:
            return 400, {"error": f"unknown kind {kind!r}; one of: {', '.join(known)}"}
        what = f"{kind or 'policy'} {ns}/{name}"
        try:
            if method == "GET":
                doc = store.get(ns, name, kind)
                if doc is None:
                    return 404, {"error": f"no {what}"}
                return 200, {
                    "kind": store.kind_of(ns, name, kind),
                    "namespace": ns,
                    "name": name,
                    "yaml": store.get_yaml(ns, name, kind),
                    "document": json.loads(json.dumps(doc, default=str)),
                }
            if method == "DELETE":
                found = store.kind_of(ns, name, kind)
                if found is None or not store.delete(ns, name, found):
                    return 404, {"error": f"no {what}"}
                log.info("%s %s/%s deleted: version %s", found, ns, name, store.version)
                return 200, {
                    "deleted": f"{ns}/{name}",
                    "kind": found,
                    "version": store.version,
                    "count": store.count,
                }
        except Ambiguous as e:
            return 409, {"error": str(e), "kinds": e.kinds}
        return 405, {"error": f"{method} is not supported on {path}"}


# --- flows (#6): the kernel flow table over the admin API ------------------------------

FOLLOW_MAX_SECONDS = 3600.0
FOLLOW_INTERVAL = 0.25


def _flow_views(agent: AdminAgent, records: list[dict], links: dict[int, int]) -> list[dict]:
    from .observe.flowviews import Resolver, build_views

    proxy_ips = {
        str(ip): agent.cfg.node for ip in (agent.cfg.proxy.redirect_ipv4, agent.cfg.proxy.redirect_ipv6) if ip
    }
    res = (
        Resolver.from_inventory(agent.inventory, agent.cfg.identity.trust_domain, proxy_ips, workload_id)
        if agent.inventory
        else Resolver()
    )
    return build_views(records, res, agent.cfg.node, time.time(), links)


async def _flows_route(
    agent: AdminAgent, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[int, dict] | None:
    """GET /v1/flows?filters -> JSON; GET /v1/flows/follow?filters -> JSON
    lines {"event": "new"|"closed", "flow": ...} until the client goes away
    or max_seconds pass (returns None then)."""
    from urllib.parse import parse_qs, urlsplit

    from .observe.flowviews import FlowFilter, select, sort_views

    url = urlsplit(target)
    params = {k: v[-1] for k, v in parse_qs(url.query).items()}
    try:
        flt = FlowFilter.from_params(params)
        sort = params.get("sort", "start")
        sort_views([], sort)
        limit = int(params.get("limit") or 0)
        max_s = min(float(params.get("max_seconds") or FOLLOW_MAX_SECONDS), FOLLOW_MAX_SECONDS)
    except ValueError as e:
        return 400, {"error": str(e)}
    fr = agent.flow_reader
    if url.path == "/v1/flows":

        def collect() -> tuple[dict, dict]:
            return fr.snapshot(), agent.datapath.stats()

        snap, stats = await asyncio.to_thread(collect)
        closed = {f["cookie"] for f in snap["closed"]}
        records = snap["closed"] + [f for f in snap["live"] if f["cookie"] not in closed]
        now = time.time()
        views = select(_flow_views(agent, records, snap["links"]), flt, sort, now, limit)
        return 200, {
            "node": agent.cfg.node,
            "now": now,
            "flows": views,
            "reader": snap["reader"],
            "counters": {k: v for k, v in stats.items() if k.startswith("flow_")},
        }
    loop = asyncio.get_running_loop()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
    await writer.drain()
    gone = asyncio.ensure_future(reader.read(1))  # completes when the client hangs up
    try:
        cursor = await asyncio.to_thread(fr.cursor)
        deadline = loop.time() + max_s
        while loop.time() < deadline and not gone.done():
            cursor, events = await asyncio.to_thread(fr.poll_events, cursor)
            if events:
                views = _flow_views(agent, [f for _, f in events], {})
                now = time.time()
                for (kind, _), v in zip(events, views, strict=True):
                    if flt.matches(v, now):
                        writer.write(json.dumps({"event": kind, "flow": v}).encode() + b"\n")
                await writer.drain()
            await asyncio.wait([gone], timeout=FOLLOW_INTERVAL)
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        gone.cancel()
    return None


async def _stats_route(agent: AdminAgent, target: str) -> tuple[int, dict]:
    """GET /v1/stats?from=W&to=W -> per workload pair rows (agent/observe/pairstats.py)."""
    from urllib.parse import parse_qs, urlsplit

    from .observe.pairstats import StatsFilter, pair_rows, select
    from .observe.prometheus import merge_http, merge_tcp

    params = {k: v[-1] for k, v in parse_qs(urlsplit(target).query).items()}
    flt = StatsFilter(src=params.get("from") or None, dst=params.get("to") or None)
    fr = agent.flow_reader

    def collect() -> tuple[list, dict]:
        return agent.worker_stats(), fr.snapshot()

    workers, snap = await asyncio.to_thread(collect)
    closed = {f["cookie"] for f in snap["closed"]}
    records = snap["closed"] + [f for f in snap["live"] if f["cookie"] not in closed]
    views = _flow_views(agent, records, snap["links"])
    inv = agent.inventory
    workload_of = {p.key: (p.labels.get("app") or p.name, p.namespace) for p in (inv.pods if inv else ())}
    names, tcp = merge_tcp(workers)
    http = merge_http(workers)
    rows = select(pair_rows(names, tcp, views, workload_of, http), flt)
    return 200, {
        "node": agent.cfg.node,
        "now": time.time(),
        "rows": rows,
        "workers": {"configured": len(workers), "answered": sum(1 for w in workers if w)},
        "l7": (
            "HTTP requests counted by the destination node's proxy (proxy.l7)"
            if agent.cfg.proxy.l7
            else "not measured: proxy.l7 is off"
        ),
    }


def _workloads(agent: AdminAgent) -> dict:
    inv = agent.inventory
    out = []
    for pod in inv.pods_on(agent.cfg.node) if inv else ():
        out.append(
            {
                "pod": pod.key,
                "service_account": pod.service_account,
                "ips": [str(ip) for ip in pod.ips],
                "mesh": pod.mesh,
                "mode": inv.mode_for(pod, agent.cfg.mesh.mode) if inv else agent.cfg.mesh.mode,
                "enrolled": pod.key in agent.enrolled,
                "cgroup_id": agent.enrolled.get(pod.key),
                "reason": agent.pending.get(pod.key) or (None if pod.mesh else "mesh: false"),
            }
        )
    return {"node": agent.cfg.node, "workloads": out}


def _services(agent: AdminAgent) -> dict:
    """GET /v1/services: the services the proxies route (what proxy-state.json
    publishes), each endpoint with its pod's mesh flag and whether it is on
    this node."""
    inv = agent.inventory
    out = services_doc(inv.service_index) if inv else []
    mesh = {p.key: p.mesh for p in (inv.pods if inv else ())}
    for svc in out:
        for port in svc["ports"]:
            for ep in port["endpoints"]:
                ep["mesh"] = mesh.get(ep["pod"], False)
                ep["local"] = ep["node"] == agent.cfg.node
    return {"node": agent.cfg.node, "services": out, "inventory_error": agent.inventory_error}
