"""Authorization policy as data: frozen values and the string matchers they use.

Everything here is immutable and pure.  :mod:`agent.policy.load` builds these
values from YAML; :mod:`agent.policy.evaluate` decides requests with them.

String patterns (principals, namespaces, methods, paths, hosts, header values)
follow Istio's four forms, and nothing else:

=============  ===========================================================
``abc``        exact: the value is ``abc``
``abc*``       prefix: the value starts with ``abc`` (``abc`` itself too)
``*abc``       suffix: the value ends with ``abc`` (``abc`` itself too)
``*``          presence: any non-empty value
=============  ===========================================================

A ``*`` anywhere else (``a*b``, ``**``, ``*a*``) is refused by the loader:
Istio would compare it literally, which is never what the author meant.

Principals and the trust domain
-------------------------------
A request's source principal is its verified SPIFFE ID.  Principal patterns
are compared, Istio-style, against the ID written without its scheme:
``<trust-domain>/ns/<namespace>/sa/<service-account>``.  A pattern may be
written three ways (the loader turns each into the Istio form once):

- ``cluster.local/ns/shop/sa/web`` (Istio's form; both API versions).  As in
  Istio, the trust domain ``cluster.local`` in a five-part principal stands
  for *the mesh's own* trust domain: with ``trust_domain="example.org"`` it
  becomes ``example.org/ns/shop/sa/web``.  Any other trust domain is kept
  literally (it matches only peers of that foreign trust domain).
- ``spiffe://example.org/ns/shop/sa/web`` (meshlet.io only): the SPIFFE ID
  itself, compared literally; no ``cluster.local`` aliasing.
- ``ns/shop/sa/web`` (meshlet.io only): short for the mesh's own trust domain.
  A pattern starting with ``ns/`` is always this short form.

Wildcards apply to the resulting string: ``ns/shop/sa/*`` is the prefix
``<td>/ns/shop/sa/``; ``*/ns/shop/sa/web`` is a suffix match and so accepts
any trust domain (exactly as in Istio).  Istio documents ``security.istio.io``
do not accept the two meshlet forms: Istio would compare them literally and
never match, so the loader refuses them instead of changing their meaning.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Action",
    "MatchKind",
    "StringMatch",
    "PrincipalMatch",
    "Source",
    "Operation",
    "Condition",
    "ConditionKey",
    "Rule",
    "Policy",
    "PolicySet",
    "IPNetwork",
    "DEFAULT_TRUST_DOMAIN",
    "DEFAULT_ROOT_NAMESPACE",
    "ISTIO_DEFAULT_TRUST_DOMAIN",
    "HeaderLocation",
    "ClaimToHeader",
    "JwtRule",
    "RequestAuthentication",
    "AuthInfo",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Istio's placeholder for "the mesh's own trust domain" inside principals.
ISTIO_DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_TRUST_DOMAIN = "cluster.local"
#: Policies in this namespace apply to every namespace (Istio's root namespace).
DEFAULT_ROOT_NAMESPACE = "istio-system"


class Action(str, enum.Enum):
    """What a policy does when one of its rules matches (CUSTOM is refused at load)."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"

    def __str__(self) -> str:
        return self.value


class MatchKind(str, enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True)
class StringMatch:
    """One pattern in Istio's exact / ``prefix*`` / ``*suffix`` / ``*`` syntax."""

    kind: MatchKind
    value: str
    """The literal part (without the ``*``); "" for presence."""
    ignore_case: bool = False
    """Hosts compare case-insensitively (``value`` is stored lowercased then)."""

    @staticmethod
    def parse(pattern: str, *, ignore_case: bool = False) -> StringMatch:
        """Split ``pattern`` into kind and literal.  Raises ValueError for an
        empty pattern or a ``*`` that is not a whole pattern, a first or a
        last character."""
        if not pattern:
            raise ValueError("must not be empty")
        if pattern == "*":
            return StringMatch(MatchKind.PRESENCE, "", ignore_case)
        if pattern.startswith("*"):
            kind, lit = MatchKind.SUFFIX, pattern[1:]
        elif pattern.endswith("*"):
            kind, lit = MatchKind.PREFIX, pattern[:-1]
        else:
            kind, lit = MatchKind.EXACT, pattern
        if "*" in lit:
            raise ValueError(
                f"{pattern!r}: '*' is only allowed alone, as the first character "
                "(suffix match) or as the last character (prefix match)"
            )
        return StringMatch(kind, lit.lower() if ignore_case else lit, ignore_case)

    def matches(self, s: str | None) -> bool:
        """Does ``s`` match?  An absent value (None) never does; presence also
        needs a non-empty value."""
        if s is None:
            return False
        if self.ignore_case:
            s = s.lower()
        if self.kind is MatchKind.EXACT:
            return s == self.value
        if self.kind is MatchKind.PREFIX:
            return s.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return s.endswith(self.value)
        return s != ""

    def covers(self, other: StringMatch) -> bool:
        """Every value ``other`` matches, this matches too (used by lint; exact,
        never guesses in the other direction)."""
        if self.ignore_case != other.ignore_case:
            return False
        if self.kind is MatchKind.PRESENCE:
            # presence needs a non-empty value; only an empty exact "" escapes it,
            # and the loader never builds one
            return True
        if other.kind is MatchKind.PRESENCE:
            return False
        if self.kind is MatchKind.EXACT:
            return other.kind is MatchKind.EXACT and other.value == self.value
        if self.kind is MatchKind.PREFIX:
            return other.kind in (MatchKind.EXACT, MatchKind.PREFIX) and other.value.startswith(self.value)
        return other.kind in (MatchKind.EXACT, MatchKind.SUFFIX) and other.value.endswith(self.value)

    def __str__(self) -> str:
        return {
            MatchKind.EXACT: self.value,
            MatchKind.PREFIX: self.value + "*",
            MatchKind.SUFFIX: "*" + self.value,
            MatchKind.PRESENCE: "*",
        }[self.kind]


@dataclass(frozen=True)
class PrincipalMatch:
    """A principal pattern: what the author wrote, and the matcher on Istio's form."""

    written: str
    match: StringMatch
    """Compared with ``<trust-domain>/<path>`` of the source's SPIFFE ID."""

    def matches(self, principal: str | None) -> bool:
        return self.match.matches(principal)

    def __str__(self) -> str:
        return self.written


class ConditionKey(str, enum.Enum):
    """The ``when`` keys meshlet implements; every other key is refused at load."""

    REQUEST_HEADER = "request.headers"  # request.headers[<name>]; HTTP only
    SOURCE_IP = "source.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_PRINCIPAL = "source.principal"
    DESTINATION_PORT = "destination.port"
    # end-user (JWT) attributes, set by RequestAuthentication; HTTP only
    AUTH_PRINCIPAL = "request.auth.principal"
    AUTH_AUDIENCES = "request.auth.audiences"
    AUTH_PRESENTER = "request.auth.presenter"
    AUTH_CLAIMS = "request.auth.claims"  # request.auth.claims[a][b]...


#: ``when`` keys that exist only in HTTP requests.
L7_CONDITION_KEYS = frozenset(
    {
        ConditionKey.REQUEST_HEADER,
        ConditionKey.AUTH_PRINCIPAL,
        ConditionKey.AUTH_AUDIENCES,
        ConditionKey.AUTH_PRESENTER,
        ConditionKey.AUTH_CLAIMS,
    }
)


@dataclass(frozen=True)
class Condition:
    """One ``when`` entry: matches iff the attribute is in ``values`` (when
    given) and in none of ``not_values``."""

    key: ConditionKey
    header: str | None
    """Lowercased header name for ``request.headers[...]``; else None."""
    values: tuple = ()
    not_values: tuple = ()
    """StringMatch (headers, namespaces, request.auth.*), PrincipalMatch, IPNetwork or int (ports)."""
    claim: tuple[str, ...] = ()
    """``request.auth.claims[a][b]``: the claim path ``("a", "b")``; else ()."""

    @property
    def is_l7(self) -> bool:
        return self.key in L7_CONDITION_KEYS

    @property
    def written_key(self) -> str:
        if self.header is not None:
            return f"request.headers[{self.header}]"
        if self.claim:
            return self.key.value + "".join(f"[{c}]" for c in self.claim)
        return self.key.value


@dataclass(frozen=True)
class Source:
    """``from[].source``: all given fields must match (each field: any of its values)."""

    principals: tuple[PrincipalMatch, ...] = ()
    not_principals: tuple[PrincipalMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    request_principals: tuple[StringMatch, ...] = ()
    """End-user principals ``<iss>/<sub>`` of a validated JWT (HTTP only)."""
    not_request_principals: tuple[StringMatch, ...] = ()

    L7_FIELDS = ("request_principals", "not_request_principals")

    @property
    def l7_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.L7_FIELDS if getattr(self, f))


@dataclass(frozen=True)
class Operation:
    """``to[].operation``: all given fields must match.  Ports are L4; methods,
    paths and hosts exist only in HTTP requests."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[StringMatch, ...] = ()
    not_paths: tuple[StringMatch, ...] = ()
    hosts: tuple[StringMatch, ...] = ()
    not_hosts: tuple[StringMatch, ...] = ()

    L7_FIELDS = ("methods", "not_methods", "paths", "not_paths", "hosts", "not_hosts")

    @property
    def l7_fields(self) -> tuple[str, ...]:
        """Names of the HTTP-only fields this operation sets."""
        return tuple(f for f in self.L7_FIELDS if getattr(self, f))


@dataclass(frozen=True)
class Rule:
    """A rule matches when one of ``sources``, one of ``operations`` and every
    condition match; an absent list does not constrain (``{}`` matches all)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()
    origin: str = field(default="", compare=False)
    """``file:line:column`` of the rule, for messages (not part of its meaning)."""

    @property
    def l7_fields(self) -> tuple[str, ...]:
        """HTTP-only fields used anywhere in the rule (``methods``, ``request.headers[x]``...)."""
        out: list[str] = []
        for src in self.sources:
            out += [f for f in src.l7_fields if f not in out]
        for op in self.operations:
            out += [f for f in op.l7_fields if f not in out]
        out += [c.written_key for c in self.conditions if c.is_l7 and c.written_key not in out]
        return tuple(out)

    @property
    def is_l7(self) -> bool:
        return bool(self.l7_fields)


@dataclass(frozen=True)
class Policy:
    """One AuthorizationPolicy document."""

    name: str
    namespace: str
    action: Action
    selector: tuple[tuple[str, str], ...]
    """matchLabels as sorted pairs; () selects every workload of the namespace."""
    rules: tuple[Rule, ...]
    """() matches nothing: an ALLOW policy without rules allows nothing."""
    api_version: str = field(default="meshlet.io/v1alpha1", compare=False)
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def selector_labels(self) -> Mapping[str, str]:
        return dict(self.selector)

    def selects(self, namespace: str, labels: Mapping[str, str], root_namespace: str) -> bool:
        """Does this policy apply to a workload of ``namespace`` with ``labels``?"""
        if self.namespace != namespace and self.namespace != root_namespace:
            return False
        return all(labels.get(k) == v for k, v in self.selector)


@dataclass(frozen=True)
class PolicySet:
    """Every loaded policy, immutable, ordered by (namespace, name)."""

    policies: tuple[Policy, ...]
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """The mesh's trust domain, already applied to short-form principals."""
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    version: str = ""
    """Fingerprint of the meaning (not the formatting) of the set; see load.fingerprint."""
    sources: tuple[str, ...] = field(default=(), compare=False)
    """Files the set was read from."""
    authentications: tuple[RequestAuthentication, ...] = ()
    """RequestAuthentication documents (end-user JWT rules), ordered by (namespace, name)."""
    _selecting: dict = field(default_factory=dict, compare=False, repr=False)
    """Memo of :meth:`selecting` (the set is immutable; bounded)."""
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)
    """Memo of what :mod:`agent.policy.evaluate` compiles per workload (bounded)."""

    def selecting(self, namespace: str, labels: Mapping[str, str]) -> tuple[Policy, ...]:
        """The policies that apply to a workload of ``namespace`` with
        ``labels``, in the set's order.  Looks only at the policies of that
        namespace and of the root namespace."""
        key = (namespace, frozenset(labels.items()))
        memo = self._selecting
        got = memo.get(key)
        if got is None:
            by_ns = memo.get(None)
            if by_ns is None:
                by_ns = {}
                for i, p in enumerate(self.policies):
                    by_ns.setdefault(p.namespace, []).append((i, p))
                memo[None] = by_ns
            cands = list(by_ns.get(namespace, ()))
            if namespace != self.root_namespace:
                cands += by_ns.get(self.root_namespace, ())
                cands.sort(key=lambda t: t[0])
            got = tuple(p for _, p in cands if all(labels.get(k) == v for k, v in p.selector))
            if len(memo) >= 4096:
                memo.clear()
                memo[None] = by_ns
            memo[key] = got
        return got

    def jwt_rules(self, namespace: str, labels: Mapping[str, str]) -> tuple[JwtRule, ...]:
        """The JWT rules of every RequestAuthentication that applies to a
        workload of ``namespace`` with ``labels`` (its namespace's and the
        root namespace's, selector labels all on the workload), in order."""
        if not self.authentications:
            return ()
        key = ("jwt", namespace, frozenset(labels.items()))
        got = self._selecting.get(key)
        if got is None:
            got = tuple(
                r
                for a in self.authentications
                if a.selects(namespace, labels, self.root_namespace)
                for r in a.jwt_rules
            )
            if len(self._selecting) >= 4096:
                self._selecting.clear()
            self._selecting[key] = got
        return got

    def get(self, namespace: str, name: str) -> Policy | None:
        for p in self.policies:
            if p.namespace == namespace and p.name == name:
                return p
        return None

    def __len__(self) -> int:
        return len(self.policies)


@dataclass(frozen=True)
class HeaderLocation:
    """``fromHeaders[]``: a header that carries the token, after ``prefix``."""

    name: str
    """Lower-cased header name."""
    prefix: str = ""


@dataclass(frozen=True)
class ClaimToHeader:
    """``outputClaimToHeaders[]``: the proxy sets ``header`` to the claim's value."""

    header: str
    """Lower-cased header name."""
    claim: str
    """Claim name; ``a.b`` is claim ``b`` inside object claim ``a``."""


@dataclass(frozen=True)
class JwtRule:
    """One ``jwtRules[]`` entry of a RequestAuthentication."""

    issuer: str
    audiences: tuple[str, ...] = ()
    """() accepts any audience (Istio/Envoy: not checked)."""
    jwks: str = ""
    """The inline JWKS, as canonical JSON (sorted keys); "" when ``jwks_file`` is used."""
    jwks_file: str = ""
    """Absolute path of a JWKS file the destination proxy reads (and re-reads when it changes)."""
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    output_payload_to_header: str = ""
    """Lower-cased header name, or ""."""
    clock_skew: float | None = None
    """Seconds of clock difference tolerated for exp/nbf/iat (meshlet.io
    ``clockSkewSeconds``); None: the proxy's default (60 s)."""
    origin: str = field(default="", compare=False)

    @property
    def header_locations(self) -> tuple[HeaderLocation, ...]:
        """Where tokens are looked for in headers (Istio's default when
        neither ``fromHeaders`` nor ``fromParams`` is given:
        ``Authorization: Bearer <token>`` and the ``access_token`` parameter)."""
        if self.from_headers or self.from_params:
            return self.from_headers
        return (HeaderLocation("authorization", "Bearer "),)

    @property
    def param_locations(self) -> tuple[str, ...]:
        if self.from_headers or self.from_params:
            return self.from_params
        return ("access_token",)

    @property
    def output_headers(self) -> tuple[str, ...]:
        """Headers only the proxy may set (a client's copies are removed)."""
        out = tuple(c.header for c in self.output_claim_to_headers)
        return out + ((self.output_payload_to_header,) if self.output_payload_to_header else ())


@dataclass(frozen=True)
class RequestAuthentication:
    """One RequestAuthentication document: which workloads validate which JWTs."""

    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    jwt_rules: tuple[JwtRule, ...]
    api_version: str = field(default="meshlet.io/v1alpha1", compare=False)
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: Mapping[str, str], root_namespace: str) -> bool:
        if self.namespace != namespace and self.namespace != root_namespace:
            return False
        return all(labels.get(k) == v for k, v in self.selector)


@dataclass(frozen=True)
class AuthInfo:
    """A validated token, as ``request.auth.*`` sees it."""

    issuer: str
    subject: str | None
    audiences: tuple[str, ...]
    presenter: str | None
    claims: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def principal(self) -> str | None:
        """``<iss>/<sub>`` (Istio's request principal); None without ``sub``."""
        return f"{self.issuer}/{self.subject}" if self.subject is not None else None

    def claim(self, path: Sequence[str]) -> tuple[str, ...]:
        """The string values of a (nested) claim: a string is one value, a
        list its string items; anything else, or an absent claim, none."""
        v: Any = self.claims
        for name in path:
            if not isinstance(v, dict) or name not in v:
                return ()
            v = v[name]
        if isinstance(v, str):
            return (v,)
        if isinstance(v, list):
            return tuple(x for x in v if isinstance(x, str))
        return ()
