"""What a TrafficPolicy says, as values: the settings the proxy applies to
one service, the set of policies and its version, and their JSON form.

Pure and free of YAML.  :mod:`agent.traffic.trafficpolicy` reads the YAML
documents (every field, default and rule is described there); the agent
publishes the policies it read in ``traffic.json`` both as that YAML and as
the data of :func:`policies_to_data`, and the proxy workers read the data
with :func:`policies_from_data`, so a worker never loads a YAML parser
(about 1.5 MB of its memory).  The reader is strict: an unknown field, a
value of the wrong type or data whose recomputed version differs from the
one the file states is refused, and the worker keeps its previous policies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.policy.canon import canonical

__all__ = [
    "API_VERSION",
    "KIND",
    "IDEMPOTENT_METHODS",
    "RETRY_CONDITIONS",
    "GRPC_RETRY_CONDITIONS",
    "BUDGET_WINDOW",
    "MAX_BODY_BYTES",
    "Retries",
    "Budget",
    "Timeouts",
    "CircuitBreaker",
    "OutlierDetection",
    "TrafficSettings",
    "DEFAULTS",
    "TrafficPolicy",
    "TrafficPolicySet",
    "traffic_fingerprint",
    "traffic_set",
    "PUBLISHED_FILE",
    "PUBLISHED_FORMAT",
    "DATA_FORMAT",
    "TrafficDataError",
    "policies_to_data",
    "policies_from_data",
]

API_VERSION = "meshlet.io/v1alpha1"
KIND = "TrafficPolicy"

#: Methods retried without ``retryNonIdempotent`` (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: Named ``retryOn`` conditions: outcome kinds, or sets of status codes.
RETRY_CONDITIONS: dict[str, frozenset[int] | None] = {
    "connect-failure": None,
    "reset": None,
    "timeout": None,
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
}

#: ``retryOn`` conditions on a gRPC answer's ``grpc-status`` (Envoy's names).
GRPC_RETRY_CONDITIONS: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

#: The sliding window (seconds) the retry budget's ``percent`` is taken over.
BUDGET_WINDOW = 10.0

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Retries:
    attempts: int = 2
    """Retries after the first try; 0 disables retries."""
    per_try_timeout: float | None = None
    """Seconds per try; None: what is left of the request timeout."""
    on: frozenset[str] = frozenset({"connect-failure", "reset"})
    """Outcome kinds retried: ``connect-failure``, ``reset``, ``timeout``."""
    statuses: frozenset[int] = frozenset({503})
    """Status codes retried."""
    non_idempotent: bool = False
    """Also retry methods that are not idempotent."""
    max_body_bytes: int = 65536
    """Requests with a larger (or unknown-length) body are never retried."""
    grpc_statuses: frozenset[int] = frozenset()
    """gRPC status codes retried (:data:`GRPC_RETRY_CONDITIONS`)."""


@dataclass(frozen=True)
class Budget:
    percent: float = 20.0
    """Retries may add this percentage of the service's requests of the last
    :data:`BUDGET_WINDOW` seconds..."""
    min_per_second: float = 10.0
    """...plus this many retries per second (a token bucket of that size)."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    request: float | None = 15.0
    idle: float | None = 3600.0
    stream_idle: float | None = 300.0
    request_headers: float | None = 10.0


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    """5xx responses, resets and timeouts in a row that eject; 0 disables."""
    consecutive_connect_failures: int = 5
    """Connect failures in a row that eject; 0 disables."""
    interval: float = 10.0
    """A whole interval admitted without ejection lowers the multiplier by one."""
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True)
class TrafficSettings:
    """What a policy says, every section filled in."""

    retries: Retries = field(default_factory=Retries)
    budget: Budget = field(default_factory=Budget)
    timeouts: Timeouts = field(default_factory=Timeouts)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)


#: Settings for services no policy names.
DEFAULTS = TrafficSettings()


@dataclass(frozen=True)
class TrafficPolicy:
    name: str
    namespace: str
    service: str
    """Service name in :attr:`namespace`."""
    port: int | None
    """Service port this policy is limited to, or None for every port."""
    settings: TrafficSettings
    origin: str = field(default="", compare=False)
    """``file:line:column`` of the document, for messages."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TrafficPolicySet:
    policies: tuple[TrafficPolicy, ...] = ()
    files: tuple[str, ...] = field(default=(), compare=False)
    version: str = ""
    """Fingerprint of what the policies mean (see :func:`traffic_fingerprint`)."""

    def __len__(self) -> int:
        return len(self.policies)

    def get(self, namespace: str, name: str) -> TrafficPolicy | None:
        for p in self.policies:
            if p.namespace == namespace and p.name == name:
                return p
        return None

    def policy_for(self, namespace: str, service: str, port: int) -> TrafficPolicy | None:
        """The policy that applies to ``service``'s ``port`` (see module doc), or None."""
        whole = None
        for p in self.policies:
            if p.namespace == namespace and p.service == service:
                if p.port == port:
                    return p
                if p.port is None:
                    whole = p
        return whole

    def settings_for(self, namespace: str, service: str, port: int) -> TrafficSettings:
        p = self.policy_for(namespace, service, port)
        return p.settings if p is not None else DEFAULTS


def traffic_fingerprint(policies: Sequence[TrafficPolicy]) -> str:
    """A short hash of what the policies mean (not how they are written)."""
    body = [canonical(p) for p in sorted(policies, key=lambda p: (p.namespace, p.name))]
    text = json.dumps({"trafficPolicies": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def traffic_set(policies: Sequence[TrafficPolicy], files: Sequence[str] = ()) -> TrafficPolicySet:
    ordered = tuple(sorted(policies, key=lambda p: (p.namespace, p.name)))
    return TrafficPolicySet(ordered, tuple(files), traffic_fingerprint(ordered))


#: The file the agent publishes in runDir for the proxy workers.
PUBLISHED_FILE = "traffic.json"
PUBLISHED_FORMAT = 1

# --------------------------------------------------------------------------
# JSON form (traffic.json's "data")

#: Version of the shape :func:`policies_to_data` writes; a reader refuses any other.
DATA_FORMAT = 1


class TrafficDataError(ValueError):
    """Published traffic policy data that cannot be read back exactly."""


def policies_to_data(policies: Sequence[TrafficPolicy]) -> list[dict[str, Any]]:
    """The policies as JSON data: each one's fields that take part in its
    meaning (never ``origin``), the form the version is computed from."""
    return [canonical(p) for p in policies]


# A field's annotation (the module uses postponed annotations: strings) and
# the JSON values it accepts.
def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return type(v) is int or type(v) is float


_VALUE_CHECKS = {
    "int": _is_int,
    "float": _is_number,
    "float | None": lambda v: v is None or _is_number(v),
    "bool": lambda v: type(v) is bool,
    "frozenset[str]": lambda v: type(v) is list and all(type(i) is str for i in v),
    "frozenset[int]": lambda v: type(v) is list and all(_is_int(i) for i in v),
}


def _section(cls: type, data: Any, where: str) -> Any:
    if type(data) is not dict:
        raise TrafficDataError(f"{where}: expected an object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TrafficDataError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for name, v in data.items():
        annotation = str(known[name].type)  # a string: this module postpones annotations
        check = _VALUE_CHECKS.get(annotation)
        if check is None or not check(v):
            raise TrafficDataError(f"{where}.{name}: expected {annotation}, got {v!r}")
        values[name] = frozenset(v) if type(v) is list else v
    return cls(**values)


_SECTIONS: dict[str, type] = {
    "retries": Retries,
    "budget": Budget,
    "timeouts": Timeouts,
    "circuit_breaker": CircuitBreaker,
    "outlier_detection": OutlierDetection,
}


def _policy(data: Any, where: str) -> TrafficPolicy:
    if type(data) is not dict:
        raise TrafficDataError(f"{where}: expected an object")
    unknown = sorted(set(data) - {"name", "namespace", "service", "port", "settings"})
    if unknown:
        raise TrafficDataError(f"{where}: unknown field {unknown[0]!r}")
    for key in ("name", "namespace", "service"):
        if type(data.get(key)) is not str:
            raise TrafficDataError(f"{where}.{key}: expected a string")
    port = data.get("port")
    if port is not None and not (_is_int(port) and 0 < port < 65536):
        raise TrafficDataError(f"{where}.port: expected a port number or null, got {port!r}")
    settings = data.get("settings", {})
    if type(settings) is not dict:
        raise TrafficDataError(f"{where}.settings: expected an object")
    unknown = sorted(set(settings) - set(_SECTIONS))
    if unknown:
        raise TrafficDataError(f"{where}.settings: unknown section {unknown[0]!r}")
    sections = {
        k: _section(cls, settings.get(k, {}), f"{where}.settings.{k}") for k, cls in _SECTIONS.items()
    }
    return TrafficPolicy(
        data["name"], data["namespace"], data["service"], port, TrafficSettings(**sections), origin=where
    )


def policies_from_data(data: Any, *, version: str, source: str = "<data>") -> TrafficPolicySet:
    """The set :func:`policies_to_data` wrote (``source``: the file, for
    messages and each policy's ``origin``).  Raises TrafficDataError when the
    data is malformed or its recomputed version is not ``version``."""
    if type(data) is not list:
        raise TrafficDataError(f"{source}: expected a list of traffic policies")
    ts = traffic_set([_policy(d, f"{source}: data[{i}]") for i, d in enumerate(data)], (source,))
    if ts.version != version:
        raise TrafficDataError(
            f"{source}: the policies have version {ts.version}, but the file says {version}"
        )
    return ts
