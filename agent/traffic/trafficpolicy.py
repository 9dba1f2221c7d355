"""TrafficPolicy resources: how the node proxy talks to one service.

Pure apart from reading files: :func:`parse_traffic_policies` turns text into
a :class:`TrafficPolicySet` or raises :class:`~agent.yamlsrc.SourceError`
listing every problem as ``file:line:column: field.path: message``;
:func:`load_traffic_policies` reads files and directories (``*.yaml``,
``*.yml``, sorted, not recursive) like the authorization policy loader, with
several ``---``-separated documents per file.

Shape, with every default::

    apiVersion: meshlet.io/v1alpha1
    kind: TrafficPolicy
    metadata: {name: backend, namespace: shop}   # both required
    spec:
      service: backend          # required: a service of metadata.namespace
      port: 80                  # optional: only this service port
      retries:
        attempts: 2             # retries after the first try (0 disables), 0..10
        perTryTimeout: null     # e.g. 500ms; null: whatever is left of timeouts.request
        retryOn: [connect-failure, reset, "503"]
                                # connect-failure, reset, timeout (the per-try one),
                                # 5xx, gateway-error (502, 503, 504), or status codes 400..599;
                                # gRPC (a trailers-only answer's grpc-status): cancelled,
                                # deadline-exceeded, internal, resource-exhausted, unavailable
                                # (retried even though gRPC calls are POSTs)
        retryNonIdempotent: false   # also retry POST, PATCH, CONNECT and unknown methods
        maxBodyBytes: 65536     # larger request bodies are never retried (the proxy
                                # would have to buffer them); 0..16777216
      budget:                   # per service, over all its clients on this node
        percent: 20             # retries may add this % of the requests of the last 10 s ...
        minPerSecond: 10        # ... plus this many per second (token bucket)
      timeouts:
        connect: 5s             # TCP (or tunnel) connect to an endpoint, > 0
        request: 15s            # whole request, retries included; 0s disables
        idle: 1h                # connection without any traffic; 0s disables
        streamIdle: 5m          # one request/response without a byte either way; 0s disables
        requestHeaders: 10s     # client sending the request headers; 0s disables
      circuitBreaker:           # per service, all endpoints together
        maxConnections: 1024
        maxPendingRequests: 1024
        maxRequests: 1024
      outlierDetection:         # per endpoint
        consecutive5xx: 5       # 5xx, resets and timeouts in a row; 0 disables
        consecutiveConnectFailures: 5   # 0 disables
        interval: 10s           # a clean interval lowers the ejection multiplier by one
        baseEjectionTime: 30s   # ejection lasts baseEjectionTime x number of ejections ...
        maxEjectionTime: 300s   # ... but at most this
        maxEjectionPercent: 10  # at most this % of endpoints at once (at least one
                                # if > 0, never all of them)

Durations are numbers with a unit: ``250ms``, ``2s``, ``1.5s``, ``5m``,
``1h``, or combinations such as ``1m30s``; a bare number is an error (is it
seconds or milliseconds?).

Matching: the policy with ``port`` equal to the service port dialed wins;
else the one without ``port``; else :data:`DEFAULTS`.  The chosen policy is
used whole: sections it leaves out take the defaults above, never the
values of a less specific policy (one place to read).  Two policies for the
same service and port are an error, across all files.

Fail closed: unknown fields, unknown ``retryOn`` conditions and durations
without a unit are errors.  Whether ``spec.service`` exists is not checked
here (the loader does not see the inventory).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from agent import yamlsrc as y
from agent.policy.load import (  # the model's names too: load is this package's one door
    AUTHN_KIND,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    DocKind,
    PolicySet,
    _check_options,
    collect_documents,
    policy_files,
    policy_kinds,
    policy_set,
    read_sources,
)
from agent.policy.load import (
    KIND as AUTHORIZATION_KIND,
)

# The values (pure, no YAML: what the proxy workers import), re-exported: this
# module stays the one door for readers of TrafficPolicy documents.
from . import settings as _settings
from .settings import *  # noqa: F403
from .settings import (
    API_VERSION,
    DATA_FORMAT,
    GRPC_RETRY_CONDITIONS,
    KIND,
    MAX_BODY_BYTES,
    PUBLISHED_FILE,
    PUBLISHED_FORMAT,
    RETRY_CONDITIONS,
    Budget,
    CircuitBreaker,
    OutlierDetection,
    Retries,
    Timeouts,
    TrafficPolicy,
    TrafficPolicySet,
    TrafficSettings,
    policies_to_data,
    traffic_set,
)

__all__ = [  # the values of agent.traffic.settings, and the YAML front end's own names
    *_settings.__all__,
    "parse_duration",
    "parse_traffic_policies",
    "load_traffic_policies",
    "traffic_policy_files",
    "TRAFFIC_KIND",
    "compile_traffic",
    "lint_traffic",
    "parse_all_sources",
    "load_all",
]

# --------------------------------------------------------------------------
# Durations

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """``"250ms"`` -> 0.25, ``"1m30s"`` -> 90.0.  Raises ValueError."""
    s = text.strip()
    if not _DURATION.fullmatch(s):
        if re.fullmatch(r"\d+(\.\d+)?", s):
            raise ValueError(f"{text!r} has no unit; write e.g. '{s}s' or '{s}ms'")
        raise ValueError(f"{text!r} is not a duration; write e.g. '250ms', '2s', '5m', '1h', '1m30s'")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))


def _duration(lo_open: float | None = 0.0, hi: float = 86400.0 * 365, *, zero_disables: bool = False):
    """A duration converter; with ``zero_disables`` 0 reads as None (off)."""

    def conv(v: y.Value) -> float | None:
        x = v.scalar()
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            raise y.Invalid(
                f"{v.node.value!r} has no unit; write e.g. '{v.node.value}s' or "
                f"'{v.node.value}ms' (quoted or not)"
            )
        s = y.string(v)
        try:
            d = parse_duration(s)
        except ValueError as e:
            raise y.Invalid(str(e)) from None
        if d == 0 and zero_disables:
            return None
        if lo_open is not None and not d > lo_open:
            raise y.Invalid(
                f"{s!r} must be longer than 0"
                + ("" if zero_disables else " (this timeout cannot be disabled)")
            )
        if d > hi:
            raise y.Invalid(f"{s!r} is too long (at most {hi:g}s)")
        return d

    return conv


# --------------------------------------------------------------------------
# Reading


_ALL_CONDITIONS = [*RETRY_CONDITIONS, *GRPC_RETRY_CONDITIONS]


def _retry_on_item(v: y.Value) -> str | int:
    x = v.scalar()
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise y.Invalid(f"expected a condition ({', '.join(_ALL_CONDITIONS)}) or a status code")
    if isinstance(x, str) and re.fullmatch(r"\d+", x.strip()):
        x = int(x.strip())
    if isinstance(x, int):
        if not 400 <= x <= 599:
            raise y.Invalid(f"{x} cannot be retried on; status codes 400..599 can")
        return x
    if x not in RETRY_CONDITIONS and x not in GRPC_RETRY_CONDITIONS:
        hint = y.did_you_mean(x, _ALL_CONDITIONS)
        raise y.Invalid(
            f"unknown retry condition {x!r}"
            + (
                f" (did you mean {hint!r}?)"
                if hint
                else f"; use {', '.join(_ALL_CONDITIONS)} or status codes"
            )
        )
    return x


def _read_retries(r: y.MapReader) -> Retries:
    d = Retries()
    attempts = r.get("attempts", y.integer(0, 10), d.attempts)
    per_try = r.get("perTryTimeout", _duration(), None)
    on_items = r.get("retryOn", y.list_of(_retry_on_item), None)
    non_idem = r.get("retryNonIdempotent", y.boolean, d.non_idempotent)
    max_body = r.get("maxBodyBytes", y.integer(0, MAX_BODY_BYTES), d.max_body_bytes)
    r.finish()
    on, statuses, grpc = d.on, d.statuses, d.grpc_statuses
    if on_items is not None:
        grpc = frozenset(GRPC_RETRY_CONDITIONS[i] for i in on_items if i in GRPC_RETRY_CONDITIONS)
        on_items = [i for i in on_items if i not in GRPC_RETRY_CONDITIONS]
        on = frozenset(i for i in on_items if isinstance(i, str) and RETRY_CONDITIONS[i] is None)
        codes: set[int] = {i for i in on_items if isinstance(i, int)}
        for i in on_items:
            if isinstance(i, str) and (cond := RETRY_CONDITIONS[i]) is not None:
                codes |= cond
        statuses = frozenset(codes)
    return Retries(
        attempts if attempts is not None else d.attempts,
        per_try,
        on,
        statuses,
        bool(non_idem),
        max_body if max_body is not None else d.max_body_bytes,
        grpc,
    )


def _read_budget(r: y.MapReader) -> Budget:
    d = Budget()
    b = Budget(
        r.get("percent", y.number(0, 100), d.percent),
        r.get("minPerSecond", y.number(0, 1_000_000), d.min_per_second),
    )
    r.finish()
    return b


def _read_timeouts(r: y.MapReader) -> Timeouts:
    d = Timeouts()
    off = _duration(zero_disables=True)
    t = Timeouts(
        connect=r.get("connect", _duration(hi=3600), d.connect),
        request=r.get("request", off, d.request),
        idle=r.get("idle", off, d.idle),
        stream_idle=r.get("streamIdle", off, d.stream_idle),
        request_headers=r.get("requestHeaders", off, d.request_headers),
    )
    r.finish()
    return t


def _read_breaker(r: y.MapReader) -> CircuitBreaker:
    d = CircuitBreaker()
    n = y.integer(1, 2**32 - 1)
    c = CircuitBreaker(
        r.get("maxConnections", n, d.max_connections),
        r.get("maxPendingRequests", n, d.max_pending_requests),
        r.get("maxRequests", n, d.max_requests),
    )
    r.finish()
    return c


def _read_outlier(r: y.MapReader) -> OutlierDetection:
    d = OutlierDetection()
    o = OutlierDetection(
        consecutive_5xx=r.get("consecutive5xx", y.integer(0, 1000), d.consecutive_5xx),
        consecutive_connect_failures=r.get(
            "consecutiveConnectFailures", y.integer(0, 1000), d.consecutive_connect_failures
        ),
        interval=r.get("interval", _duration(), d.interval),
        base_ejection_time=r.get("baseEjectionTime", _duration(), d.base_ejection_time),
        max_ejection_time=r.get("maxEjectionTime", _duration(), d.max_ejection_time),
        max_ejection_percent=r.get("maxEjectionPercent", y.integer(0, 100), d.max_ejection_percent),
    )
    r.finish()
    if (
        o.max_ejection_time is not None
        and o.base_ejection_time is not None
        and o.max_ejection_time < o.base_ejection_time
    ):
        at = r.at("maxEjectionTime") or r.at("baseEjectionTime")
        assert at is not None
        at.problem(
            f"maxEjectionTime ({o.max_ejection_time:g}s) is shorter than "
            f"baseEjectionTime ({o.base_ejection_time:g}s)"
        )
    return o


_SECTIONS = {
    "retries": _read_retries,
    "budget": _read_budget,
    "timeouts": _read_timeouts,
    "circuitBreaker": _read_breaker,
    "outlierDetection": _read_outlier,
}


def _where(v: y.Value) -> str:
    return f"{v.doc.filename}:{v.line}:{v.column}"


def _read_document(doc: y.Document) -> TrafficPolicy | None:
    top = doc.top()
    before = len(doc.problems)
    api = top.get("apiVersion", y.enum(API_VERSION))
    kind = top.get("kind", y.enum(KIND))
    meta_v, spec_v = top.at("metadata"), top.at("spec")
    top.finish()
    if api is None or kind is None:
        return None  # not a document we read: its fields would only add noise
    if meta_v is None:
        doc.add_at(top.value.node, "metadata", "required field is missing (name and namespace)")
    if spec_v is None:
        doc.add_at(top.value.node, "spec", "required field is missing (at least `service`)")
    meta = meta_v.convert(y.Value.mapping) if meta_v is not None else None
    spec = spec_v.convert(y.Value.mapping) if spec_v is not None else None
    name = namespace = None
    if meta is not None:
        name = meta.get("name", y.dns_subdomain)
        namespace = meta.get("namespace", y.dns_label)
        meta.get("labels", y.map_of(y.string, y.any_string), None)
        meta.get("annotations", y.map_of(y.string, y.any_string), None)
        meta.finish()
    service = port = None
    sections: dict[str, Any] = {}  # key -> what _SECTIONS[key] reads (one type per key)
    if spec is not None:
        service = spec.get("service", y.dns_label)
        port = spec.get("port", y.port, None)
        for key, read in _SECTIONS.items():
            sub = spec.section(key)
            if sub is not None:
                sections[key] = read(sub)
        spec.finish()
    if len(doc.problems) != before or None in (name, namespace, service) or len(sections) != 5:
        return None
    settings = TrafficSettings(
        sections["retries"],
        sections["budget"],
        sections["timeouts"],
        sections["circuitBreaker"],
        sections["outlierDetection"],
    )
    # name, namespace and service are not None: checked above
    return TrafficPolicy(name, namespace, service, port, settings, origin=_where(top.value))  # type: ignore[arg-type]


def _conflict(p: TrafficPolicy, doc: y.Document, accepted: Sequence[TrafficPolicy]) -> bool:
    """Two policies for the same service and port (or both for the whole service)."""
    other = next(
        (o for o in accepted if (o.namespace, o.service, o.port) == (p.namespace, p.service, p.port)), None
    )
    if other is None:
        return False
    spec = doc.top().at("spec")
    assert spec is not None
    sr = spec.mapping()
    at = sr.at("port") or sr.at("service")
    assert at is not None
    what = f"port {p.port} of service" if p.port is not None else "service"
    at.problem(
        f"{what} {p.namespace}/{p.service} already has a traffic policy, "
        f"{other.key} ({other.origin}); merge the two"
    )
    return True


def _summary(p: TrafficPolicy) -> dict[str, Any]:
    r = p.settings.retries
    return {
        "kind": KIND,
        "namespace": p.namespace,
        "name": p.name,
        "service": p.service,
        "port": p.port,
        "retries": r.attempts,
    }


def compile_traffic(policies: tuple[TrafficPolicy, ...], text: str) -> dict[str, Any]:
    """The published ``traffic.json``: the policies as data (``data``, in
    ``dataFormat``: what the proxy workers read, with
    :func:`~agent.traffic.settings.policies_from_data`, checking it gets
    ``version``), the stored YAML of the TrafficPolicy documents (what
    workers from before ``data`` parse), and a summary for tools."""
    ts = traffic_set(policies)
    return {
        "format": PUBLISHED_FORMAT,
        "kind": KIND,
        "version": ts.version,
        "count": len(ts),
        "dataFormat": DATA_FORMAT,
        "data": policies_to_data(ts.policies),
        "yaml": text,
        "policies": [_summary(p) for p in ts.policies],
    }


#: How the shared collector and the agent's policy store handle TrafficPolicy.
TRAFFIC_KIND = DocKind(
    KIND,
    "traffic policy",
    _read_document,
    _conflict,
    published=PUBLISHED_FILE,
    compile=compile_traffic,
    summary=_summary,
)


def _collect(texts: Sequence[tuple[str, str]]) -> TrafficPolicySet:
    got = collect_documents(texts, [TRAFFIC_KIND], noun=KIND)
    return traffic_set(got[KIND], tuple(dict.fromkeys(f for f, _ in texts)))


def parse_traffic_policies(text: str, filename: str = "<traffic>") -> TrafficPolicySet:
    """TrafficPolicies from one YAML text.  Raises SourceError listing every problem."""
    return _collect([(filename, text)])


#: The files :func:`load_traffic_policies` reads for a path (a file or a directory).
traffic_policy_files = policy_files


def load_traffic_policies(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> TrafficPolicySet:
    """Read files and directories into one :class:`TrafficPolicySet` (checked across files)."""
    return read_sources(paths, _collect)


def parse_all_sources(
    texts: Sequence[tuple[str, str]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> tuple[PolicySet, TrafficPolicySet]:
    """AuthorizationPolicy and TrafficPolicy documents, mixed in any files, each
    read by its ``kind`` (an unknown kind is an error) and checked across all
    files.  Raises SourceError listing every problem."""
    _check_options(trust_domain, root_namespace)
    got = collect_documents(texts, [*policy_kinds(trust_domain), TRAFFIC_KIND])
    files = tuple(dict.fromkeys(f for f, _ in texts))
    return (
        policy_set(got[AUTHORIZATION_KIND], trust_domain, root_namespace, files, got[AUTHN_KIND]),
        traffic_set(got[KIND], files),
    )


def load_all(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> tuple[PolicySet, TrafficPolicySet]:
    """:func:`parse_all_sources` over files and directories (``*.yaml``, ``*.yml``)."""
    return read_sources(
        paths,
        lambda texts: parse_all_sources(texts, trust_domain=trust_domain, root_namespace=root_namespace),
    )


def lint_traffic(
    ts: TrafficPolicySet, services: Sequence[tuple[str, str, tuple[int, ...]]]
) -> list[tuple[str, str, str, str]]:
    """Warnings, not errors (services can arrive after their policy), as
    ``(kind, policy, origin, message)``: ``no-service``, a policy whose service
    is not among ``services`` ((namespace, name, ports)); ``no-port``, a
    ``port`` that service does not have."""
    known = {(ns, name): set(ports) for ns, name, ports in services}
    out = []
    for p in ts.policies:
        ports = known.get((p.namespace, p.service))
        if ports is None:
            out.append(
                (
                    "no-service",
                    p.key,
                    p.origin,
                    f"service {p.namespace}/{p.service} is "
                    "not in the inventory (yet); the policy applies once it is",
                )
            )
        elif p.port is not None and p.port not in ports:
            out.append(
                (
                    "no-port",
                    p.key,
                    p.origin,
                    f"service {p.namespace}/{p.service} has no "
                    f"port {p.port} (it has {', '.join(map(str, sorted(ports))) or 'none'})",
                )
            )
    return out
