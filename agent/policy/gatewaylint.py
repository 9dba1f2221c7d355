"""Gateway routes against mesh policy: ``meshlet policy lint --gateway`` (pure).

An API gateway in front of the mesh has its own routes, retries, timeouts
and JWT checks; the mesh has AuthorizationPolicies, TrafficPolicies and
RequestAuthentications for the same backends.  This module reads the
gateway's side -- Kubernetes Gateway API ``HTTPRoute`` documents and, for
JWT, Envoy Gateway's ``SecurityPolicy`` (``gateway.envoyproxy.io``), with
positions (``file:line:column``) -- and reports where the two disagree:

=====================  ==========================================================
``route-denied``       a route's backend has ALLOW policies and none of their
                       rules can match the gateway's identity for the route's
                       requests: the route can only fail (403)
``deny-covers-route``  a mesh DENY rule matches the route's own path from the
                       gateway
``unexposed-allow``    a mesh ALLOW rule for the gateway's identity names paths
                       that no route to that backend exposes
``double-retries``     the route retries and a mesh TrafficPolicy retries the
                       same backend: attempts multiply (the worst case is said)
``timeout-shorter``    the route's timeout is shorter than the mesh's per-try
                       timeout times its attempts for that backend
``jwt-mismatch``       end-user JWTs are validated at the gateway and in the
                       mesh with different issuers or keys
=====================  ==========================================================

End-user attributes cannot be known here: an ALLOW rule that needs a request
principal or ``request.auth.*`` counts as one that may match, and a DENY
rule that needs one as one that may not (only certain conflicts are
reported).  A route's path is judged by the request for that path itself
(``PathPrefix /api`` by ``/api``), with the method of the match (GET when
none is given).

The mesh side comes in as a :class:`PolicySet` and two functions the caller
builds from its inventory and TrafficPolicies (this package does not import
agent.traffic): ``workload(namespace, service, port)`` -> (labels, target
port), ``traffic(namespace, service, port)`` -> :class:`MeshTraffic` or None
(no TrafficPolicy for it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent import yamlsrc as y
from agent.identity.spiffe import SpiffeIdError, parse_spiffe_id

from .evaluate import Request, evaluate
from .load import DocKind, collect_documents
from .model import Action, ConditionKey, MatchKind, Policy, PolicySet, Rule, Source, StringMatch

__all__ = [
    "ROUTE_KIND",
    "SECURITY_KIND",
    "Finding",
    "MeshTraffic",
    "RouteMatch",
    "Backend",
    "RouteRule",
    "HTTPRoute",
    "GatewayJwt",
    "GatewayConfig",
    "parse_gateway",
    "parse_duration",
    "lint_gateway",
]

ROUTE_KIND = "HTTPRoute"
SECURITY_KIND = "SecurityPolicy"
_ROUTE_APIS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
_SECURITY_APIS = ("gateway.envoyproxy.io/v1alpha1",)


@dataclass(frozen=True)
class Finding:
    kind: str
    origin: str
    """``file:line:column`` of the gateway (or mesh) item the finding is about."""
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "origin": self.origin, "message": self.message}

    def __str__(self) -> str:
        return f"{self.origin}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class MeshTraffic:
    """What the mesh's TrafficPolicy does for one backend port."""

    attempts: int
    """Retries after the first try."""
    per_try_timeout: float | None
    request_timeout: float | None
    origin: str


@dataclass(frozen=True)
class RouteMatch:
    path_type: str
    """``PathPrefix``, ``Exact`` or ``RegularExpression``."""
    path: str
    method: str | None
    origin: str


@dataclass(frozen=True)
class Backend:
    name: str
    namespace: str
    port: int
    origin: str


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...]
    backends: tuple[Backend, ...]
    retry_attempts: int | None
    retry_origin: str
    timeout: float | None
    """``timeouts.backendRequest`` if given, else ``timeouts.request``: what bounds the mesh's part."""
    timeout_origin: str
    origin: str


@dataclass(frozen=True)
class HTTPRoute:
    name: str
    namespace: str
    rules: tuple[RouteRule, ...]
    origin: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class GatewayJwt:
    """Envoy Gateway's SecurityPolicy ``jwt.providers`` for some HTTPRoutes."""

    name: str
    namespace: str
    routes: tuple[str, ...]
    """Names of the HTTPRoutes (in ``namespace``) it targets."""
    providers: tuple[tuple[str, str], ...]
    """(issuer, keys): keys are ``uri:<jwks uri>`` or ``inline:<canonical JSON>``."""
    origin: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class GatewayConfig:
    routes: tuple[HTTPRoute, ...]
    jwt: tuple[GatewayJwt, ...]


# --------------------------------------------------------------------------
# Reading


_GEP_DURATION = re.compile(r"(?:\d{1,5}(?:h|m|s|ms)){1,4}")
_DURATION_PART = re.compile(r"(\d+)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """A Gateway API duration (GEP-2257: ``1h``, ``30s``, ``500ms``, ``1m30s``) in seconds."""
    if not _GEP_DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a Gateway API duration (e.g. 10s, 500ms, 1m30s)")
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in _DURATION_PART.findall(text))


def _duration(v: y.Value) -> float:
    try:
        return parse_duration(y.string(v))
    except ValueError as e:
        raise y.Invalid(str(e)) from None


def _where(v: y.Value) -> str:
    return f"{v.doc.filename}:{v.line}:{v.column}"


def _skip(r: y.MapReader, *keys: str) -> None:
    """Fields the lint does not need: accepted as they are."""
    for k in keys:
        r.at(k)


def _meta(top: y.MapReader, doc: y.Document) -> tuple[str | None, str | None]:
    meta_v = top.at("metadata")
    if meta_v is None:
        doc.add_at(top.value.node, "metadata", "required field is missing (name and namespace)")
        return None, None
    meta = top.section("metadata")
    if meta is None:
        return None, None
    name = meta.get("name", y.dns_subdomain)
    namespace = meta.get("namespace", y.dns_label)
    _skip(meta, "labels", "annotations", "uid", "resourceVersion", "generation", "creationTimestamp")
    meta.finish()
    return name, namespace


def _read_match(v: y.Value) -> RouteMatch | None:
    m = v.convert(y.Value.mapping)
    if m is None:
        return None
    before = len(m.doc.problems)
    path_type, path = "PathPrefix", "/"
    p = m.section("path")
    if p is not None and m.has("path"):
        path_type = p.get("type", y.enum("PathPrefix", "Exact", "RegularExpression"), "PathPrefix") or ""
        path = p.get("value", y.string, "/") or "/"
        p.finish()
        if path_type != "RegularExpression" and not path.startswith("/"):
            (p.at("value") or p.value).problem(f"{path!r}: a path starts with '/'")
    method = m.get(
        "method", y.enum("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"), None
    )
    _skip(m, "headers", "queryParams")
    m.finish()
    if len(m.doc.problems) != before:
        return None
    return RouteMatch(path_type, path, method, _where(v))


def _read_backend(v: y.Value, namespace: str) -> Backend | None:
    b = v.convert(y.Value.mapping)
    if b is None:
        return None
    before = len(b.doc.problems)
    name = b.get("name", y.dns_subdomain)
    ns = b.get("namespace", y.dns_label, namespace)
    kind = b.get("kind", y.string, "Service")
    port = b.get("port", y.port, None)
    _skip(b, "group", "weight", "filters")
    b.finish()
    if kind != "Service":
        return None  # not a mesh service
    if port is None and len(b.doc.problems) == before:
        b.value.problem("backendRefs to a Service need a port")
    if len(b.doc.problems) != before or name is None:
        return None
    return Backend(name, ns, port, _where(v))


def _read_rule(v: y.Value, namespace: str) -> RouteRule | None:
    r = v.convert(y.Value.mapping)
    if r is None:
        return None
    before = len(r.doc.problems)
    matches_v, backends_v = r.at("matches"), r.at("backendRefs")
    retry_v, timeouts_v = r.at("retry"), r.at("timeouts")
    _skip(r, "name", "filters", "sessionPersistence")
    r.finish()
    items = matches_v.convert(y.Value.items) if matches_v is not None else None
    matches = tuple(m for m in (_read_match(i) for i in items or []) if m is not None)
    if items is None:
        matches = (RouteMatch("PathPrefix", "/", None, _where(v)),)  # Gateway API's default match
    bitems = backends_v.convert(y.Value.items) if backends_v is not None else []
    backends = tuple(b for b in (_read_backend(i, namespace) for i in bitems or []) if b is not None)
    attempts, retry_origin = None, ""
    if retry_v is not None:
        rr = retry_v.convert(y.Value.mapping)
        if rr is not None:
            attempts = rr.get("attempts", y.integer(0, 1000), None)
            _skip(rr, "codes", "backoff")
            rr.finish()
            retry_origin = _where(retry_v)
    timeout, timeout_origin = None, ""
    if timeouts_v is not None:
        t = timeouts_v.convert(y.Value.mapping)
        if t is not None:
            request = t.get("request", _duration, None)
            backend = t.get("backendRequest", _duration, None)
            t.finish()
            timeout = backend if backend is not None else request
            if timeout == 0:
                timeout = None  # 0s disables the timeout
            at = t.at("backendRequest") if backend is not None else t.at("request")
            timeout_origin = _where(at) if at is not None else _where(timeouts_v)
    if len(r.doc.problems) != before:
        return None
    return RouteRule(matches, backends, attempts, retry_origin, timeout, timeout_origin, _where(v))


def _read_route(doc: y.Document) -> HTTPRoute | None:
    top = doc.top()
    before = len(doc.problems)
    top.get("apiVersion", y.enum(*_ROUTE_APIS))
    top.get("kind", y.enum(ROUTE_KIND))
    name, namespace = _meta(top, doc)
    spec_v = top.at("spec")
    _skip(top, "status")
    top.finish()
    rules: list[RouteRule] = []
    spec = spec_v.convert(y.Value.mapping) if spec_v is not None else None
    if spec is None and spec_v is None:
        doc.add_at(top.value.node, "spec", "required field is missing")
    if spec is not None:
        rules_v = spec.at("rules")
        _skip(spec, "parentRefs", "hostnames")
        spec.finish()
        items = rules_v.convert(y.Value.items) if rules_v is not None else []
        rules = [r for r in (_read_rule(i, namespace or "") for i in items or []) if r is not None]
    if len(doc.problems) != before or name is None or namespace is None:
        return None
    return HTTPRoute(name, namespace, tuple(rules), _where(top.value))


def _read_provider(v: y.Value) -> tuple[str, str] | None:
    p = v.convert(y.Value.mapping)
    if p is None:
        return None
    before = len(p.doc.problems)
    issuer = p.get("issuer", y.string, "")
    keys = ""
    remote = p.section("remoteJWKS")
    if remote is not None and p.has("remoteJWKS"):
        keys = "uri:" + (remote.get("uri", y.string) or "")
        _skip(remote, "backendRefs", "backendSettings", "cacheDuration")
        remote.finish()
    local = p.section("localJWKS")
    if local is not None and p.has("localJWKS"):
        inline = local.get("inline", y.string, None)
        _skip(local, "type", "valueRef")
        local.finish()
        if inline is not None:
            try:
                keys = "inline:" + json.dumps(json.loads(inline), sort_keys=True, separators=(",", ":"))
            except ValueError:
                (local.at("inline") or local.value).problem("not valid JSON")
    _skip(p, "name", "audiences", "claimToHeaders", "recomputeRoute", "extractFrom")
    p.finish()
    if len(p.doc.problems) != before:
        return None
    return issuer, keys


def _read_security(doc: y.Document) -> GatewayJwt | None:
    top = doc.top()
    before = len(doc.problems)
    top.get("apiVersion", y.enum(*_SECURITY_APIS))
    top.get("kind", y.enum(SECURITY_KIND))
    name, namespace = _meta(top, doc)
    spec_v = top.at("spec")
    _skip(top, "status")
    top.finish()
    routes: list[str] = []
    providers: list[tuple[str, str]] = []
    spec = spec_v.convert(y.Value.mapping) if spec_v is not None else None
    if spec is not None:
        for key in ("targetRefs", "targetRef"):
            tv = spec.at(key)
            items = (
                ([tv] if key == "targetRef" else tv.convert(y.Value.items) or []) if tv is not None else []
            )
            for item in items:
                t = item.convert(y.Value.mapping)
                if t is None:
                    continue
                kind = t.get("kind", y.string)
                tname = t.get("name", y.string)
                _skip(t, "group", "namespace", "sectionName")
                t.finish()
                if kind == ROUTE_KIND and tname:
                    routes.append(tname)
        jwt_v = spec.at("jwt")
        _skip(spec, "cors", "basicAuth", "apiKeyAuth", "oidc", "extAuth", "authorization", "targetSelectors")
        spec.finish()
        if jwt_v is not None:
            j = jwt_v.convert(y.Value.mapping)
            if j is not None:
                pv = j.at("providers")
                _skip(j, "optional")
                j.finish()
                for item in (pv.convert(y.Value.items) or []) if pv is not None else []:
                    got = _read_provider(item)
                    if got is not None:
                        providers.append(got)
    if len(doc.problems) != before or name is None or namespace is None:
        return None
    return GatewayJwt(name, namespace, tuple(routes), tuple(providers), _where(top.value))


def parse_gateway(texts: Sequence[tuple[str, str]]) -> GatewayConfig:
    """HTTPRoute and SecurityPolicy documents of ``(filename, text)`` pairs.
    Raises SourceError (``file:line:column: field: what``) for anything it
    cannot read, including unknown fields and other kinds."""
    got = collect_documents(
        texts,
        [
            DocKind(ROUTE_KIND, "route", _read_route),
            DocKind(SECURITY_KIND, "security policy", _read_security),
        ],
        noun="gateway",
    )
    return GatewayConfig(got[ROUTE_KIND], got[SECURITY_KIND])


# --------------------------------------------------------------------------
# Checks

_AUTH_KEYS = frozenset(
    {
        ConditionKey.AUTH_PRINCIPAL,
        ConditionKey.AUTH_AUDIENCES,
        ConditionKey.AUTH_PRESENTER,
        ConditionKey.AUTH_CLAIMS,
    }
)


def _needs_user(rule: Rule) -> bool:
    return any(s.request_principals or s.not_request_principals for s in rule.sources) or any(
        c.key in _AUTH_KEYS for c in rule.conditions
    )


def _without_user(rule: Rule) -> Rule:
    srcs = tuple(
        dataclasses.replace(s, request_principals=(), not_request_principals=()) for s in rule.sources
    )
    if any(s == Source() for s in srcs):
        srcs = ()  # an alternative that only named end users: any source
    conds = tuple(c for c in rule.conditions if c.key not in _AUTH_KEYS)
    return dataclasses.replace(rule, sources=srcs, conditions=conds)


def _optimistic(ps: PolicySet) -> PolicySet:
    """The set with end-user attributes resolved in the gateway's favour: ALLOW
    rules lose them (they may match), DENY rules that need them are left out
    (they may not)."""
    pols: list[Policy] = []
    for p in ps.policies:
        if p.action is Action.ALLOW:
            rules = tuple(_without_user(r) if _needs_user(r) else r for r in p.rules)
        elif p.action is Action.DENY:
            rules = tuple(r for r in p.rules if not _needs_user(r))
        else:
            continue
        pols.append(dataclasses.replace(p, rules=rules))
    return PolicySet(tuple(pols), ps.trust_domain, ps.root_namespace, ps.version + "/gateway")


def _path_for(m: RouteMatch) -> str | None:
    if m.path_type == "RegularExpression":
        return None
    return m.path


def _exposes(pattern: StringMatch, routes: Sequence[RouteMatch]) -> bool:
    """Some route match sends requests that ``pattern`` (a path pattern) matches."""
    for m in routes:
        if m.path_type == "RegularExpression" or pattern.kind in (MatchKind.PRESENCE, MatchKind.SUFFIX):
            return True  # cannot tell: assume it does
        if m.path_type == "Exact":
            if pattern.matches(m.path):
                return True
            continue
        prefix = m.path.rstrip("/")
        if not prefix:
            return True  # PathPrefix / sends every path
        v = pattern.value
        if pattern.kind is MatchKind.EXACT and (v == prefix or v.startswith(prefix + "/")):
            return True
        if pattern.kind is MatchKind.PREFIX and (v.startswith(prefix) or prefix.startswith(v)):
            return True
    return False


def lint_gateway(
    cfg: GatewayConfig,
    ps: PolicySet,
    gateway: str,
    *,
    workload: Callable[[str, str, int], tuple[Mapping[str, str], int]],
    traffic: Callable[[str, str, int], MeshTraffic | None],
) -> list[Finding]:
    """Every finding (kinds in the module docstring), in route order.
    ``gateway``: the gateway's SPIFFE ID (``spiffe://td/ns/N/sa/S``)."""
    try:
        gw = parse_spiffe_id(gateway)
    except SpiffeIdError as e:
        raise ValueError(f"gateway identity {gateway!r}: {e}") from None
    gw_principal = f"{gw.trust_domain}{gw.path}"
    opt = _optimistic(ps)
    out: list[Finding] = []
    exposed: dict[tuple[str, Mapping[str, str] | tuple, int], list[RouteMatch]] = {}
    jwt_by_route: dict[tuple[str, str], list[GatewayJwt]] = {}
    for sp in cfg.jwt:
        for r in sp.routes:
            jwt_by_route.setdefault((sp.namespace, r), []).append(sp)
    jwt_seen: set[tuple[str, str, str]] = set()
    for route in cfg.routes:
        for rule in route.rules:
            for b in rule.backends:
                labels, port = workload(b.namespace, b.name, b.port)
                key = (b.namespace, tuple(sorted(labels.items())), port)
                exposed.setdefault(key, []).extend(rule.matches)
                out += _authz_findings(opt, gw, route, rule, b, labels, port)
                out += _traffic_findings(route, rule, b, traffic(b.namespace, b.name, b.port))
                for sp in jwt_by_route.get((route.namespace, route.name), []):
                    seen = (sp.key, b.namespace, b.name)
                    if seen not in jwt_seen:
                        jwt_seen.add(seen)
                        out += _jwt_findings(ps, sp, route, b, labels)
    out += _unexposed(ps, gw_principal, exposed)
    return out


def _authz_findings(opt: PolicySet, gw, route: HTTPRoute, rule: RouteRule, b: Backend, labels, port: int):
    out: list[Finding] = []
    no_match = 0
    judged = 0
    for m in rule.matches:
        path = _path_for(m)
        if path is None:
            continue
        judged += 1
        req = Request(b.namespace, labels, port, gw, is_http=True, method=m.method or "GET", path=path)
        d = evaluate(opt, req)
        if d.action == "DENY":
            out.append(
                Finding(
                    "deny-covers-route",
                    m.origin,
                    f"route {route.key} sends {m.method or 'GET'} {path} to {b.namespace}/{b.name}, "
                    f"and mesh DENY policy {d.policy} rule {d.rule} ({d.origin}) denies it from the gateway",
                )
            )
        elif d.action == "NO_MATCH":
            no_match += 1
    if judged and no_match == judged:
        out.append(
            Finding(
                "route-denied",
                b.origin,
                f"route {route.key} sends to {b.namespace}/{b.name} port {b.port}, whose mesh ALLOW policies "
                f"have no rule the gateway ({gw}) can match for it: the route can only fail (403)",
            )
        )
    return out


def _traffic_findings(route: HTTPRoute, rule: RouteRule, b: Backend, mt: MeshTraffic | None) -> list[Finding]:
    if mt is None:
        return []
    out: list[Finding] = []
    if rule.retry_attempts and mt.attempts:
        worst = (1 + rule.retry_attempts) * (1 + mt.attempts)
        out.append(
            Finding(
                "double-retries",
                rule.retry_origin,
                f"route {route.key} retries {rule.retry_attempts} time(s) and the mesh TrafficPolicy "
                f"({mt.origin}) retries {b.namespace}/{b.name} {mt.attempts} time(s): up to {worst} attempts "
                "reach the backend for one client request; retry in one layer",
            )
        )
    if rule.timeout is not None:
        tries = 1 + mt.attempts
        if mt.per_try_timeout is not None:
            need, how = mt.per_try_timeout * tries, f"{mt.per_try_timeout:g}s per try x {tries} attempts"
        elif mt.request_timeout is not None:
            need, how = mt.request_timeout, f"its request timeout ({mt.request_timeout:g}s)"
        else:
            need, how = None, ""
        if need is not None and rule.timeout < need:
            out.append(
                Finding(
                    "timeout-shorter",
                    rule.timeout_origin,
                    f"route {route.key} gives {b.namespace}/{b.name} {rule.timeout:g}s, but the mesh "
                    f"TrafficPolicy ({mt.origin}) may take {need:g}s ({how}): the gateway gives up while "
                    "the mesh still retries",
                )
            )
    return out


def _mesh_keys(rule) -> str:
    if rule.jwks:
        return "inline:" + rule.jwks
    return "uri:file://" + rule.jwks_file


def _jwt_findings(ps: PolicySet, sp: GatewayJwt, route: HTTPRoute, b: Backend, labels) -> list[Finding]:
    mesh = ps.jwt_rules(b.namespace, labels)
    if not mesh or not sp.providers:
        return []
    g_iss = {i for i, _ in sp.providers}
    m_iss = {r.issuer for r in mesh}
    if g_iss != m_iss:
        return [
            Finding(
                "jwt-mismatch",
                sp.origin,
                f"SecurityPolicy {sp.key} (route {route.key}) accepts issuers {sorted(g_iss)}, the mesh's "
                f"RequestAuthentication for {b.namespace}/{b.name} ({mesh[0].origin}) {sorted(m_iss)}: "
                "users are checked twice with different rules",
            )
        ]
    for iss, keys in sp.providers:
        mesh_keys = {_mesh_keys(r) for r in mesh if r.issuer == iss}
        if keys not in mesh_keys:
            return [
                Finding(
                    "jwt-mismatch",
                    sp.origin,
                    f"SecurityPolicy {sp.key} (route {route.key}) and the mesh's RequestAuthentication for "
                    f"{b.namespace}/{b.name} ({mesh[0].origin}) verify issuer {iss} with different keys",
                )
            ]
    return []


def _gateway_rule(rule: Rule, gw_principal: str) -> bool:
    """The rule is written for the gateway: some source names it by principal."""
    return any(any(p.matches(gw_principal) for p in s.principals) for s in rule.sources)


def _unexposed(ps: PolicySet, gw_principal: str, exposed) -> list[Finding]:
    out: list[Finding] = []
    seen: set[tuple[str, int]] = set()
    for (ns, labels_t, port), matches in exposed.items():
        labels = dict(labels_t)
        for p in ps.selecting(ns, labels):
            if p.action is not Action.ALLOW:
                continue
            for i, rule in enumerate(p.rules):
                if (p.key, i) in seen or not _gateway_rule(rule, gw_principal):
                    continue
                for op in rule.operations:
                    if op.ports and port not in op.ports:
                        continue
                    missing = [str(pat) for pat in op.paths if not _exposes(pat, matches)]
                    if missing:
                        seen.add((p.key, i))
                        out.append(
                            Finding(
                                "unexposed-allow",
                                rule.origin,
                                f"ALLOW policy {p.key} rule {i} lets the gateway reach paths {missing}, "
                                "which no route to this backend exposes (stale rule, or a missing route?)",
                            )
                        )
                        break
    return out
