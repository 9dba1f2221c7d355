"""Decide a request against a :class:`PolicySet`: Istio's semantics, as pure functions.

Which policies apply
    A policy applies to a workload when it is in the workload's namespace (or
    in the set's root namespace, which applies mesh-wide) and every label of
    its ``selector`` is on the workload; no selector selects every workload.

Order of evaluation (``evaluate``)
    1. AUDIT policies never change the decision; every AUDIT policy with a
       matching rule is listed in ``Decision.audited``.
    2. DENY: if any rule of any applying DENY policy matches, the request is
       denied.  DENY always wins over ALLOW.
    3. If no ALLOW policy applies to the workload, the request is allowed.
    4. Once an ALLOW policy applies, the request is allowed iff some rule of
       some applying ALLOW policy matches; anything else is denied.

Rules, empty and not (Istio's documented meaning)

    ======================  =============================  ========================
    written                 ALLOW policy                   DENY / AUDIT policy
    ======================  =============================  ========================
    ``spec: {}`` or no      allow-nothing: the workload    DENY: refused at load
    ``rules``               is selected and no rule can    (it could never match);
                            match, so everything is        AUDIT: audits nothing
                            denied unless another ALLOW
                            policy matches
    ``rules: [{}]``         allow-all: ``{}`` matches      deny-all / audit-all
                            every request
    ``rules: [{from: X}]``  X, to any port/operation       X, to anything
    ======================  =============================  ========================

    A rule matches when one of its ``from`` sources, one of its ``to``
    operations and every ``when`` condition match (an absent list does not
    constrain).  In a source or operation every field given must match; a
    field matches when the request's value matches one of its patterns, a
    ``not*`` field when it matches none.  An attribute the request does not
    have (no verified principal, so also no source namespace; no source IP;
    an absent header) matches no pattern: ``principals`` fails,
    ``notPrincipals`` passes.  A header sent several times is matched value
    by value: ``values`` match if any one line matches, ``notValues`` if no
    line does.

HTTP-only fields on a connection that is not HTTP
    ``methods``, ``paths``, ``hosts`` (and their ``not`` forms) and
    ``request.headers[...]`` conditions cannot be evaluated on plain TCP.
    Following Istio's documented behaviour, never widening what is allowed:

    - an ALLOW rule that uses any HTTP-only field is ignored (it matches
      nothing), so it cannot allow a TCP connection;
    - a DENY or AUDIT rule has its HTTP-only fields dropped and the rest
      matched, so it denies more: ``to: [{operation: {methods: [GET]}}]``
      denies every TCP connection to the workload, ``{methods: [GET],
      ports: ["9000"]}`` every TCP connection to port 9000.

:func:`compile_l4` splits the policies that apply to one workload into what
the kernel could enforce at connection time and what needs the HTTP proxy;
its verdicts never contradict :func:`evaluate` (a Hypothesis test checks it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from agent.identity.spiffe import SpiffeId

from .index import Entry, RuleIndex, WorkloadIndex, build_workload_index
from .model import Action, AuthInfo, Condition, ConditionKey, Operation, Policy, PolicySet, Rule, Source

__all__ = [
    "Request",
    "Decision",
    "RuleRef",
    "RuleTrace",
    "evaluate",
    "explain",
    "workload_index",
    "rule_mismatch",
    "L4Rule",
    "L4Plan",
    "L4Verdict",
    "compile_l4",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Request:
    """What policy sees of one connection (``is_http=False``) or one HTTP request.

    The HTTP fields must already be normalized (``agent.policy.http``): the
    path without query, the host lower-cased with the default port stripped,
    header names lower-cased."""

    destination_namespace: str
    destination_labels: Mapping[str, str]
    destination_port: int
    source_principal: SpiffeId | None = None
    """The verified peer identity (mTLS, or the kernel for same-node traffic);
    None for a plaintext peer."""
    source_ip: IPAddress | None = None
    is_http: bool = False
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    auth: AuthInfo | None = None
    """The end user's validated JWT (RequestAuthentication); None: no token."""

    def __post_init__(self) -> None:
        if not 0 < self.destination_port <= 65535:
            raise ValueError(f"destination port {self.destination_port} is out of range")
        if self.is_http:
            if self.method is None or self.path is None:
                raise ValueError("an HTTP request needs a method and a path")
        elif (
            self.method is not None
            or self.path is not None
            or self.host is not None
            or self.headers
            or self.auth is not None
        ):
            raise ValueError("method, path, host, headers and auth exist only when is_http is true")
        object.__setattr__(self, "destination_labels", MappingProxyType(dict(self.destination_labels)))
        object.__setattr__(
            self, "headers", MappingProxyType({k.lower(): tuple(v) for k, v in self.headers.items()})
        )

    def with_http(
        self,
        method: str,
        path: str,
        host: str | None,
        headers: Mapping[str, tuple[str, ...]],
        auth: AuthInfo | None = None,
    ) -> Request:
        """This connection's request as one HTTP request, for the per-request
        path: the inputs must already be what __post_init__ would make of
        them (the parser's normalized path and host, ``header_multimap``'s
        lower-case names), so its checks and copies are skipped."""
        r = object.__new__(Request)
        r.__dict__.update(self.__dict__)
        r.__dict__.update(is_http=True, method=method, path=path, host=host, headers=headers, auth=auth)
        return r

    @property
    def request_principal(self) -> str | None:
        """The end user's principal ``<iss>/<sub>`` from a validated JWT."""
        return self.auth.principal if self.auth is not None else None

    @property
    def principal(self) -> str | None:
        """The source principal as policies match it: ``<trust-domain>/ns/.../sa/...``."""
        if self.source_principal is None:
            return None
        return f"{self.source_principal.trust_domain}{self.source_principal.path}"

    @property
    def source_namespace(self) -> str | None:
        """The namespace of the verified source identity (as in Istio, it comes
        from the peer's certificate, never from an unverified claim)."""
        return self.source_principal.namespace if self.source_principal is not None else None

    def describe(self) -> str:
        src = str(self.source_principal) if self.source_principal else "plaintext peer"
        if self.source_ip is not None:
            src += f" ({self.source_ip})"
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.destination_labels.items()))
        dst = f"{self.destination_namespace}{{{labels}}}:{self.destination_port}"
        if self.is_http:
            return f"{src} -> {dst} {self.method} {self.path}" + (f" host {self.host}" if self.host else "")
        return f"{src} -> {dst} (TCP)"


@dataclass(frozen=True)
class RuleRef:
    policy: str
    """``namespace/name``."""
    rule: int
    origin: str = ""

    def __str__(self) -> str:
        return f"{self.policy} rule {self.rule}"


DecisionAction = Literal["DENY", "ALLOW", "NO_MATCH", "NO_POLICY"]


@dataclass(frozen=True)
class Decision:
    """The outcome and what decided it.

    ``action``: ``DENY`` (a DENY rule matched), ``ALLOW`` (an ALLOW rule
    matched), ``NO_MATCH`` (ALLOW policies apply, none matched: denied),
    ``NO_POLICY`` (no ALLOW policy applies: allowed)."""

    allowed: bool
    action: DecisionAction
    policy: str | None
    rule: int | None
    reason: str
    audited: tuple[RuleRef, ...] = ()
    origin: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "action": self.action,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "origin": self.origin,
            "audited": [{"policy": a.policy, "rule": a.rule, "origin": a.origin} for a in self.audited],
        }


@dataclass(frozen=True)
class RuleTrace:
    """How one rule fared: ``outcome`` is matched, no match, or ignored."""

    policy: str
    action: Action
    rule: int
    outcome: Literal["matched", "no match", "ignored"]
    detail: str
    origin: str = ""


# --------------------------------------------------------------------------
# Matching one rule


def _ip_in(net, ip) -> bool:
    return ip is not None and ip.version == net.version and ip in net


def _eq(a, b) -> bool:
    return a == b


def _pat(p, s) -> bool:
    return p.matches(s)


def _any_value(p, values: tuple[str, ...]) -> bool:
    return any(p.matches(v) for v in values)


def _field(
    name: str, values: tuple, not_values: tuple, actual: Any, one: Callable[[Any, Any], bool], shown: str
) -> str | None:
    """Why a field does not match (None when it does)."""
    if values and not any(one(v, actual) for v in values):
        return f"{name}: {shown} is not {_fmt(values)}"
    for v in not_values:
        if one(v, actual):
            neg = "not" + name[0].upper() + name[1:]
            return f"{neg}: {shown} matches {v}"
    return None


def _fmt(values: tuple) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else "any of [" + ", ".join(items) + "]"


def _source_mismatch(s: Source, req: Request, drop_l7: bool = False) -> str | None:
    principal = req.principal
    shown_p = principal or "no verified principal"
    rp = req.request_principal
    return (
        _field("principals", s.principals, s.not_principals, principal, _pat, shown_p)
        or _field(
            "namespaces",
            s.namespaces,
            s.not_namespaces,
            req.source_namespace,
            _pat,
            req.source_namespace or "no verified namespace",
        )
        or _field(
            "ipBlocks",
            s.ip_blocks,
            s.not_ip_blocks,
            req.source_ip,
            _ip_in,
            str(req.source_ip or "unknown source IP"),
        )
        or (
            None
            if drop_l7
            else _field(
                "requestPrincipals",
                s.request_principals,
                s.not_request_principals,
                rp,
                _pat,
                rp or "no request principal",
            )
        )
    )


def _operation_mismatch(op: Operation, req: Request, drop_l7: bool) -> str | None:
    why = _field("ports", op.ports, op.not_ports, req.destination_port, _eq, str(req.destination_port))
    if why or drop_l7:
        return why
    return (
        _field("methods", op.methods, op.not_methods, req.method, _pat, str(req.method))
        or _field("paths", op.paths, op.not_paths, req.path, _pat, str(req.path))
        or _field("hosts", op.hosts, op.not_hosts, req.host, _pat, req.host or "no host")
    )


def _condition_mismatch(c: Condition, req: Request) -> str | None:
    k = c.key
    if k is ConditionKey.REQUEST_HEADER:
        vals = req.headers.get(c.header or "", ())
        shown = "absent" if not vals else ", ".join(repr(v) for v in vals)
        return _field(c.written_key, c.values, c.not_values, vals, _any_value, shown)
    if k is ConditionKey.SOURCE_IP:
        return _field(
            k.value, c.values, c.not_values, req.source_ip, _ip_in, str(req.source_ip or "unknown source IP")
        )
    if k is ConditionKey.SOURCE_NAMESPACE:
        return _field(
            k.value,
            c.values,
            c.not_values,
            req.source_namespace,
            _pat,
            req.source_namespace or "no verified namespace",
        )
    if k is ConditionKey.SOURCE_PRINCIPAL:
        return _field(
            k.value, c.values, c.not_values, req.principal, _pat, req.principal or "no verified principal"
        )
    if k in _AUTH_KEYS:
        vals = _auth_values(c, req)
        shown = "no validated token" if req.auth is None else ", ".join(repr(v) for v in vals) or "absent"
        return _field(c.written_key, c.values, c.not_values, vals, _any_value, shown)
    return _field(k.value, c.values, c.not_values, req.destination_port, _eq, str(req.destination_port))


_AUTH_KEYS = frozenset(
    {
        ConditionKey.AUTH_PRINCIPAL,
        ConditionKey.AUTH_AUDIENCES,
        ConditionKey.AUTH_PRESENTER,
        ConditionKey.AUTH_CLAIMS,
    }
)


def _auth_values(c: Condition, req: Request) -> tuple[str, ...]:
    """The request's values for a ``request.auth.*`` key (none without a token)."""
    a = req.auth
    if a is None:
        return ()
    k = c.key
    if k is ConditionKey.AUTH_PRINCIPAL:
        return (a.principal,) if a.principal is not None else ()
    if k is ConditionKey.AUTH_AUDIENCES:
        return a.audiences
    if k is ConditionKey.AUTH_PRESENTER:
        return (a.presenter,) if a.presenter is not None else ()
    return a.claim(c.claim)


def _join_whys(whys: list[str]) -> str:
    return whys[0] if len(whys) == 1 else "; ".join(f"[{i}] {w}" for i, w in enumerate(whys))


def rule_mismatch(rule: Rule, req: Request, *, drop_l7: bool = False) -> str | None:
    """Why ``rule`` does not match ``req`` (None when it matches).

    ``drop_l7`` matches only the rule's L4 part (HTTP-only fields removed),
    as DENY/AUDIT rules are on non-HTTP connections.  Without it the request
    must be HTTP if the rule has HTTP-only fields (the caller decides)."""
    if rule.sources:
        whys = [_source_mismatch(s, req, drop_l7) for s in rule.sources]
        if all(whys):
            return "from: " + _join_whys(cast("list[str]", whys))  # all() above: no None left
    if rule.operations:
        whys = [_operation_mismatch(o, req, drop_l7) for o in rule.operations]
        if all(whys):
            return "to: " + _join_whys(cast("list[str]", whys))  # all() above: no None left
    for c in rule.conditions:
        if drop_l7 and c.is_l7:
            continue
        why = _condition_mismatch(c, req)
        if why:
            return "when: " + why
    return None


def _trace_rule(p: Policy, i: int, rule: Rule, req: Request) -> RuleTrace:
    def t(outcome, detail):
        return RuleTrace(p.key, p.action, i, outcome, detail, rule.origin)

    if not req.is_http and rule.is_l7:
        fields = ", ".join(rule.l7_fields)
        if p.action is Action.ALLOW:
            return t(
                "ignored",
                f"uses HTTP-only fields ({fields}) and this connection is not HTTP; "
                "such ALLOW rules never match",
            )
        why = rule_mismatch(rule, req, drop_l7=True)
        note = f"HTTP-only fields ({fields}) dropped on a non-HTTP connection"
        return t("no match", f"{why} ({note})") if why else t("matched", note)
    why = rule_mismatch(rule, req)
    return t("no match", why) if why else t("matched", "")


# --------------------------------------------------------------------------
# Deciding


def explain(policyset: PolicySet, req: Request) -> tuple[Decision, tuple[RuleTrace, ...]]:
    """The decision and how every rule of every applying policy fared."""
    applying = policyset.selecting(req.destination_namespace, req.destination_labels)
    traces: list[RuleTrace] = []
    audited: list[RuleRef] = []
    deny: RuleTrace | None = None
    allow: RuleTrace | None = None
    allow_policies = [p for p in applying if p.action is Action.ALLOW]
    for action in (Action.AUDIT, Action.DENY, Action.ALLOW):
        for p in applying:
            if p.action is not action:
                continue
            if not p.rules:
                traces.append(
                    RuleTrace(
                        p.key,
                        p.action,
                        -1,
                        "no match",
                        "policy has no rules, so it matches nothing",
                        p.origin,
                    )
                )
            for i, rule in enumerate(p.rules):
                tr = _trace_rule(p, i, rule, req)
                traces.append(tr)
                if tr.outcome != "matched":
                    continue
                if action is Action.AUDIT:
                    audited.append(RuleRef(p.key, i, rule.origin))
                    break  # one entry per AUDIT policy
                if action is Action.DENY and deny is None:
                    deny = tr
                if action is Action.ALLOW and allow is None:
                    allow = tr
    aud = tuple(audited)
    if deny is not None:
        d = Decision(
            False,
            "DENY",
            deny.policy,
            deny.rule,
            f"denied by DENY policy {deny.policy} rule {deny.rule}"
            + (f" ({deny.detail})" if deny.detail else ""),
            aud,
            deny.origin,
        )
    elif not allow_policies:
        d = Decision(True, "NO_POLICY", None, None, "allowed: no ALLOW policy applies to this workload", aud)
    elif allow is not None:
        d = Decision(
            True,
            "ALLOW",
            allow.policy,
            allow.rule,
            f"allowed by ALLOW policy {allow.policy} rule {allow.rule}",
            aud,
            allow.origin,
        )
    else:
        names = ", ".join(p.key for p in allow_policies)
        ignored = [t for t in traces if t.action is Action.ALLOW and t.outcome == "ignored"]
        extra = (
            (
                f"; {len(ignored)} ALLOW rule(s) were ignored because they use HTTP-only fields "
                "on a non-HTTP connection"
            )
            if ignored
            else ""
        )
        d = Decision(
            False,
            "NO_MATCH",
            None,
            None,
            f"denied: ALLOW policies apply ({names}) and none of their rules match{extra}",
            aud,
        )
    return d, tuple(traces)


# The per-request path: the same decision as explain()[0], without building a
# trace or a reason string for every rule (only for the deciding one).


def _ok(values: tuple, not_values: tuple, actual: Any, one: Callable[[Any, Any], bool]) -> bool:
    if values and not any(one(v, actual) for v in values):
        return False
    return not any(one(v, actual) for v in not_values)


def _source_ok(s: Source, req: Request, drop_l7: bool = False) -> bool:
    return (
        _ok(s.principals, s.not_principals, req.principal, _pat)
        and _ok(s.namespaces, s.not_namespaces, req.source_namespace, _pat)
        and _ok(s.ip_blocks, s.not_ip_blocks, req.source_ip, _ip_in)
        and (
            drop_l7
            or not (s.request_principals or s.not_request_principals)
            or _ok(s.request_principals, s.not_request_principals, req.request_principal, _pat)
        )
    )


def _operation_ok(op: Operation, req: Request, drop_l7: bool) -> bool:
    if not _ok(op.ports, op.not_ports, req.destination_port, _eq):
        return False
    if drop_l7:
        return True
    return (
        _ok(op.methods, op.not_methods, req.method, _pat)
        and _ok(op.paths, op.not_paths, req.path, _pat)
        and _ok(op.hosts, op.not_hosts, req.host, _pat)
    )


def _condition_ok(c: Condition, req: Request) -> bool:
    k = c.key
    if k is ConditionKey.REQUEST_HEADER:
        return _ok(c.values, c.not_values, req.headers.get(c.header or "", ()), _any_value)
    if k is ConditionKey.SOURCE_IP:
        return _ok(c.values, c.not_values, req.source_ip, _ip_in)
    if k is ConditionKey.SOURCE_NAMESPACE:
        return _ok(c.values, c.not_values, req.source_namespace, _pat)
    if k is ConditionKey.SOURCE_PRINCIPAL:
        return _ok(c.values, c.not_values, req.principal, _pat)
    if k in _AUTH_KEYS:
        return _ok(c.values, c.not_values, _auth_values(c, req), _any_value)
    return _ok(c.values, c.not_values, req.destination_port, _eq)


def rule_matches(rule: Rule, req: Request, *, drop_l7: bool = False) -> bool:
    """``rule_mismatch(rule, req, drop_l7=...) is None``, without the explanation."""
    if rule.sources and not any(_source_ok(s, req, drop_l7) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_ok(o, req, drop_l7) for o in rule.operations):
        return False
    for c in rule.conditions:
        if drop_l7 and c.is_l7:
            continue
        if not _condition_ok(c, req):
            return False
    return True


def workload_index(policyset: PolicySet, namespace: str, labels: Mapping[str, str]) -> WorkloadIndex:
    """The set compiled for one workload (:mod:`agent.policy.index`), built on
    first use and kept on the set (at most :data:`MAX_INDEXED_WORKLOADS`)."""
    key = (namespace, frozenset(labels.items()))
    memo = policyset._compiled
    got = memo.get(key)
    if got is None:
        got = build_workload_index(
            policyset.selecting(namespace, labels), policyset.jwt_rules(namespace, labels)
        )
        if len(memo) >= MAX_INDEXED_WORKLOADS:
            memo.clear()
        memo[key] = got
    return got


#: Workloads whose compiled index a PolicySet keeps (a node has fewer pods).
MAX_INDEXED_WORKLOADS = 512


def _candidates(idx: RuleIndex[Entry], req: Request) -> Iterable[Entry]:
    if req.is_http:
        return idx.candidates(req.destination_port, req.principal, req.source_namespace, req.method, req.path)
    return idx.candidates(req.destination_port, req.principal, req.source_namespace)


def _first(idx: RuleIndex[Entry], req: Request, drop_l7: bool) -> Entry | None:
    """The first rule of ``idx`` (evaluation order) that matches ``req``."""
    if not idx.entries:
        return None
    for e in _candidates(idx, req):
        if rule_matches(e.rule, req, drop_l7=drop_l7 and e.l7):
            return e
    return None


def evaluate(policyset: PolicySet, req: Request) -> Decision:
    """Allow or deny ``req`` (semantics in the module docstring); the same
    Decision as ``explain(policyset, req)[0]``, looking only at the rules the
    workload's index (:func:`workload_index`) gives as candidates."""
    wi = workload_index(policyset, req.destination_namespace, req.destination_labels)
    http = req.is_http
    by_action = wi.http if http else wi.tcp
    drop = not http  # DENY/AUDIT rules with HTTP fields: their L4 part, on TCP
    audited: list[RuleRef] = []
    audit = by_action[Action.AUDIT]
    if audit.entries:
        seen: set[int] = set()
        for e in _candidates(audit, req):
            if e.pos not in seen and rule_matches(e.rule, req, drop_l7=drop and e.l7):
                seen.add(e.pos)
                audited.append(RuleRef(e.policy.key, e.index, e.rule.origin))
    aud = tuple(audited)
    deny = _first(by_action[Action.DENY], req, drop)
    if deny is not None:
        p, i = deny.policy, deny.index
        tr = _trace_rule(p, i, p.rules[i], req)
        return Decision(
            False,
            "DENY",
            p.key,
            i,
            f"denied by DENY policy {p.key} rule {i}" + (f" ({tr.detail})" if tr.detail else ""),
            aud,
            p.rules[i].origin,
        )
    if not wi.allow_names:
        return Decision(
            True, "NO_POLICY", None, None, "allowed: no ALLOW policy applies to this workload", aud
        )
    allow = _first(by_action[Action.ALLOW], req, False)
    if allow is not None:
        p, i = allow.policy, allow.index
        return Decision(
            True, "ALLOW", p.key, i, f"allowed by ALLOW policy {p.key} rule {i}", aud, p.rules[i].origin
        )
    names = wi.allow_list
    ignored = 0 if http else wi.ignored_on_tcp
    extra = (
        (f"; {ignored} ALLOW rule(s) were ignored because they use HTTP-only fields on a non-HTTP connection")
        if ignored
        else ""
    )
    return Decision(
        False,
        "NO_MATCH",
        None,
        None,
        f"denied: ALLOW policies apply ({names}) and none of their rules match{extra}",
        aud,
    )


# --------------------------------------------------------------------------
# The L4 part, for enforcement before any HTTP is parsed


def _l4_only(rule: Rule) -> Rule:
    ops = tuple(Operation(ports=o.ports, not_ports=o.not_ports) for o in rule.operations)
    conds = tuple(c for c in rule.conditions if not c.is_l7)
    srcs = tuple(
        dataclasses.replace(s, request_principals=(), not_request_principals=()) if s.l7_fields else s
        for s in rule.sources
    )
    return Rule(srcs, ops, conds, origin=rule.origin)


@dataclass(frozen=True)
class L4Rule:
    ref: RuleRef
    action: Action
    match: Rule
    """The rule with its HTTP-only fields removed (its L4 part)."""
    l7: bool
    """The original rule had HTTP-only fields."""

    @property
    def rule(self) -> Rule:
        """What is matched (for :class:`~agent.policy.index.RuleIndex`)."""
        return self.match


#: Longer L4 rule lists are looked up through a RuleIndex (the kernel compile
#: asks a plan once per source, destination and port).
_L4_INDEX_MIN = 16


@dataclass(frozen=True)
class L4Verdict:
    verdict: Literal["allow", "deny", "l7"]
    """``l7``: only the HTTP proxy can decide (or, if the port is not HTTP, the
    full :func:`evaluate` on the connection)."""
    rule: RuleRef | None
    reason: str


@dataclass(frozen=True)
class L4Plan:
    """The policies applying to one workload, split for connection-time enforcement."""

    deny: tuple[L4Rule, ...]
    """DENY rules without HTTP-only fields: a matching connection is denied."""
    l7_deny: tuple[L4Rule, ...]
    """DENY rules with HTTP-only fields (L4 part): a matching connection needs the proxy."""
    allow: tuple[L4Rule, ...] | None
    """ALLOW rules without HTTP-only fields; None when no ALLOW policy applies."""
    l7_allow: tuple[L4Rule, ...]
    """ALLOW rules with HTTP-only fields (L4 part)."""
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def _first(self, which: str, rules: tuple[L4Rule, ...], conn: Request) -> L4Rule | None:
        """The first of ``rules`` matching ``conn`` (through an index when long)."""
        if len(rules) < _L4_INDEX_MIN:
            return next((r for r in rules if rule_matches(r.match, conn)), None)
        idx = self._index.get(which)
        if idx is None:
            idx = self._index[which] = RuleIndex(rules, False)
        cands = idx.candidates(conn.destination_port, conn.principal, conn.source_namespace)
        return next((r for r in cands if rule_matches(r.match, conn)), None)

    @property
    def exact(self) -> bool:
        """Every connection gets a final verdict at L4 (no HTTP-only rules apply)."""
        return not self.l7_deny and not self.l7_allow

    def verdict(self, conn: Request) -> L4Verdict:
        """What can be decided from the connection's L4 attributes alone
        (its HTTP fields, if any, are not looked at).  ``allow``/``deny`` are
        final for every request the connection could carry."""
        hit = self._first("deny", self.deny, conn)
        if hit is not None:
            return L4Verdict("deny", hit.ref, f"denied at L4 by {hit.ref}")
        maybe_denied = self._first("l7_deny", self.l7_deny, conn)
        if self.allow is None:
            allow_side = L4Verdict("allow", None, "no ALLOW policy applies")
        else:
            hit = self._first("allow", self.allow, conn)
            if hit is not None:
                allow_side = L4Verdict("allow", hit.ref, f"allowed at L4 by {hit.ref}")
            else:
                l7hit = self._first("l7_allow", self.l7_allow, conn)
                if l7hit is None:
                    return L4Verdict("deny", None, "no ALLOW rule can match this connection")
                allow_side = L4Verdict("l7", l7hit.ref, f"{l7hit.ref} may allow it, depending on the request")
        if maybe_denied is not None:
            return L4Verdict(
                "l7", maybe_denied.ref, f"{maybe_denied.ref} may deny it, depending on the request"
            )
        return allow_side


def compile_l4(policyset: PolicySet, namespace: str, labels: Mapping[str, str]) -> L4Plan:
    """Split the policies applying to workload (``namespace``, ``labels``).

    AUDIT policies are left out: they never change a decision."""
    deny: list[L4Rule] = []
    l7_deny: list[L4Rule] = []
    allow: list[L4Rule] = []
    l7_allow: list[L4Rule] = []
    any_allow = False
    for p in policyset.selecting(namespace, labels):
        if p.action is Action.AUDIT:
            continue
        any_allow = any_allow or p.action is Action.ALLOW
        for i, rule in enumerate(p.rules):
            r = L4Rule(RuleRef(p.key, i, rule.origin), p.action, _l4_only(rule), rule.is_l7)
            if p.action is Action.DENY:
                (l7_deny if r.l7 else deny).append(r)
            else:
                (l7_allow if r.l7 else allow).append(r)
    return L4Plan(tuple(deny), tuple(l7_deny), tuple(allow) if any_allow else None, tuple(l7_allow))
