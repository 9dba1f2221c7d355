"""Policies compiled once into an index, so a request looks only at rules that can match it.

:func:`agent.policy.evaluate.evaluate` is the per-request path.  Walking every
rule of every applying policy made its cost grow with the whole set (10,000
rules: ~20 ms a request).  This module builds, once per policy set and
workload, a :class:`WorkloadIndex`: the policies that select the workload and,
for each action, its rules filed under one *key* each rule needs the request
to have.  A request gathers the rules filed under its own values and the
rules that have no key; only those are matched, in their original order.

Keys (a rule is filed under the one dimension that gives it the smallest
bucket; a dimension is usable only if *every* alternative of the rule
constrains it with patterns of the forms below, so a rule filed under a key
can match only requests that have that key):

==============  ============================================================
``port``        every ``to`` operation lists ``ports``
``method``      every operation lists ``methods``, all exact (HTTP only)
``path``        every operation lists ``paths``, all exact or ``prefix*``
                (HTTP only)
``principal``   every ``from`` source lists ``principals``, all exact or
                ``prefix*``
``namespace``   every source lists ``namespaces``, all exact or ``prefix*``
==============  ============================================================

Two indexes per action: one for HTTP requests and one for connections that
are not HTTP.  The second leaves out ALLOW rules with HTTP-only fields (they
never match such a connection) and files DENY/AUDIT rules with HTTP fields
under L4 keys only (their HTTP fields are dropped there).  Both return
*candidates*: the caller still matches each one fully, so the index can only
leave out rules that cannot match, never decide.  ``evaluate() ==
explain()[0]`` is checked by Hypothesis over random sets.

Which policies select a workload is indexed by namespace
(:meth:`~agent.policy.model.PolicySet.selecting`), so a new workload does not
look at every policy of the mesh either.  Everything here is immutable once
built and pure; :func:`agent.policy.evaluate.workload_index` keeps one per
workload on the set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .model import Action, MatchKind, Policy, Rule

__all__ = ["Entry", "RuleIndex", "WorkloadIndex", "build_workload_index"]

_INDEXABLE = (MatchKind.EXACT, MatchKind.PREFIX)


@dataclass(frozen=True, slots=True)
class Entry:
    """One rule of one applying policy, in evaluation order (``seq``)."""

    seq: int
    pos: int
    """Position of the policy among the workload's applying policies."""
    policy: Policy
    index: int
    """The rule's index in its policy."""
    rule: Rule
    l7: bool
    """The rule has HTTP-only fields."""


class _Prefixes:
    """Exact keys and ``prefix*`` keys of one string dimension."""

    __slots__ = ("exact", "prefix", "lengths")

    def __init__(self) -> None:
        self.exact: dict[str, list[int]] = {}
        self.prefix: dict[str, list[int]] = {}
        self.lengths: tuple[int, ...] = ()

    def add(self, kind: MatchKind, value: str, seq: int) -> None:
        (self.exact if kind is MatchKind.EXACT else self.prefix).setdefault(value, []).append(seq)

    def freeze(self) -> None:
        self.lengths = tuple(sorted({len(k) for k in self.prefix}))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefix)

    def lookup(self, value: str | None, out: list[int]) -> None:
        if value is None:
            return
        got = self.exact.get(value)
        if got:
            out += got
        if self.prefix:
            n = len(value)
            get = self.prefix.get
            for length in self.lengths:
                if length > n:
                    break
                got = get(value[:length])
                if got:
                    out += got


def _strings(pats: Sequence) -> list[tuple[MatchKind, str]] | None:
    """(kind, literal) of exact/prefix patterns; None if any is another kind
    or case-insensitive (those cannot be looked up by value)."""
    out = []
    for p in pats:
        m = getattr(p, "match", p)  # PrincipalMatch wraps a StringMatch
        if m.kind not in _INDEXABLE or m.ignore_case:
            return None
        out.append((m.kind, m.value))
    return out


def _keys(rule: Rule, http: bool) -> dict[str, list]:
    """For each dimension this rule can be filed under, its keys."""
    out: dict[str, list] = {}
    ops = rule.operations
    if ops:
        if all(o.ports for o in ops):
            out["port"] = sorted({p for o in ops for p in o.ports})
        if http:
            methods = [_strings(o.methods) if o.methods else None for o in ops]
            if all(m is not None and all(k is MatchKind.EXACT for k, _ in m) for m in methods):
                out["method"] = sorted({v for m in methods if m for _, v in m})
            paths = [_strings(o.paths) if o.paths else None for o in ops]
            if all(p is not None for p in paths):
                out["path"] = sorted({kv for p in paths if p for kv in p})
    srcs = rule.sources
    if srcs:
        prs = [_strings(s.principals) if s.principals else None for s in srcs]
        if all(p is not None for p in prs):
            out["principal"] = sorted({kv for p in prs if p for kv in p})
        nss = [_strings(s.namespaces) if s.namespaces else None for s in srcs]
        if all(n is not None for n in nss):
            out["namespace"] = sorted({kv for n in nss if n for kv in n})
    return out


class _HasRule(Protocol):
    @property
    def rule(self) -> Rule: ...


E = TypeVar("E", bound=_HasRule)


class RuleIndex(Generic[E]):
    """The rules of one action for one workload, filed by key (see the module
    docstring).  :meth:`candidates` returns, in evaluation order, every rule
    that can match a request with these values (and maybe some that cannot).
    Items are anything with a ``rule`` (:class:`Entry`; the kernel's L4 rules)."""

    __slots__ = ("entries", "always", "port", "method", "path", "principal", "namespace", "_keyed")

    def __init__(self, entries: Sequence[E], http: bool) -> None:
        self.entries = tuple(entries)
        self.port: dict[int, list[int]] = {}
        self.method: dict[str, list[int]] = {}
        self.path = _Prefixes()
        self.principal = _Prefixes()
        self.namespace = _Prefixes()
        keys = [_keys(e.rule, http) for e in self.entries]
        # how many rules each key would hold if every rule used that dimension
        load: dict[tuple[str, object], int] = {}
        for k in keys:
            for dim, vals in k.items():
                for v in vals:
                    load[(dim, v)] = load.get((dim, v), 0) + 1
        always: list[int] = []
        for i, k in enumerate(keys):
            if not k:
                always.append(i)
                continue
            dim = min(k, key=lambda d: (sum(load[(d, v)] for v in k[d]), d))
            for v in k[dim]:
                if dim == "port":
                    self.port.setdefault(v, []).append(i)
                elif dim == "method":
                    self.method.setdefault(v, []).append(i)
                else:
                    getattr(self, dim).add(v[0], v[1], i)
        for p in (self.path, self.principal, self.namespace):
            p.freeze()
        self.always = tuple(always)
        self._keyed = bool(self.port or self.method or self.path or self.principal or self.namespace)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def candidates(
        self,
        port: int,
        principal: str | None,
        namespace: str | None,
        method: str | None = None,
        path: str | None = None,
    ) -> Iterable[E]:
        entries = self.entries
        if not self._keyed:
            return entries
        hits = list(self.always)
        if self.port:
            got = self.port.get(port)
            if got:
                hits += got
        if method is not None and self.method:
            got = self.method.get(method)
            if got:
                hits += got
        if self.path:
            self.path.lookup(path, hits)
        if self.principal:
            self.principal.lookup(principal, hits)
        if self.namespace:
            self.namespace.lookup(namespace, hits)
        if not hits:
            return ()
        return [entries[i] for i in sorted(set(hits))]


@dataclass(frozen=True)
class WorkloadIndex:
    """What the policy set means for one workload (namespace and labels)."""

    policies: tuple[Policy, ...]
    """The applying policies, in the set's order."""
    http: Mapping[Action, RuleIndex[Entry]]
    """Per action, for HTTP requests."""
    tcp: Mapping[Action, RuleIndex[Entry]]
    """Per action, for connections that are not HTTP (see the module docstring)."""
    allow_names: tuple[str, ...]
    """``ns/name`` of the applying ALLOW policies (empty: no ALLOW policy applies)."""
    allow_list: str
    """``allow_names`` joined with ", " (a denial's reason names them; joined once)."""
    ignored_on_tcp: int
    """ALLOW rules with HTTP-only fields (ignored on a connection that is not HTTP)."""
    has_l7: bool
    """Some applying rule has HTTP-only fields (the proxy serves the workload as HTTP)."""
    audit_l7: bool
    """Some applying AUDIT rule has HTTP-only fields (each request must be evaluated)."""
    jwt_rules: tuple = ()
    """The JWT rules of the RequestAuthentications that apply (each request is authenticated)."""


def build_workload_index(applying: Sequence[Policy], jwt_rules: tuple = ()) -> WorkloadIndex:
    by_action: dict[Action, list[Entry]] = {a: [] for a in Action}
    seq = 0
    for pos, p in enumerate(applying):
        for i, rule in enumerate(p.rules):
            by_action[p.action].append(Entry(seq, pos, p, i, rule, rule.is_l7))
            seq += 1
    http = {a: RuleIndex(es, True) for a, es in by_action.items()}
    tcp = {
        a: RuleIndex([e for e in es if not (a is Action.ALLOW and e.l7)], False)
        for a, es in by_action.items()
    }
    allow = by_action[Action.ALLOW]
    return WorkloadIndex(
        policies=tuple(applying),
        http=http,
        tcp=tcp,
        allow_names=tuple(p.key for p in applying if p.action is Action.ALLOW),
        allow_list=", ".join(p.key for p in applying if p.action is Action.ALLOW),
        ignored_on_tcp=sum(1 for e in allow if e.l7),
        has_l7=bool(jwt_rules) or any(e.l7 for es in by_action.values() for e in es),
        audit_l7=any(e.l7 for e in by_action[Action.AUDIT]),
        jwt_rules=jwt_rules,
    )
