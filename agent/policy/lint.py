"""Lint a :class:`PolicySet`: things that load fine but probably do not do
what the author meant.  Pure; every finding names the policy, the rule and
where it was written.

Checks (``kind``):

- ``shadowed``: a rule that can never decide anything because another rule
  of the same action, in a policy applying to at least the same workloads,
  matches every request it matches (a duplicate, or a narrower copy).
- ``contradiction``: an ALLOW rule that can never allow, because a DENY rule
  applying to at least the same workloads matches every request it matches.
- ``no-workload``: with an inventory, a policy whose selector matches no pod.
- ``l7-port``: a rule with HTTP-only fields that applies to a port not known
  to be HTTP (not in ``http_ports``; without that list, one that names no
  port at all).  On such a port an ALLOW rule allows nothing and a DENY rule
  denies every connection matching its other fields.
- ``never-matches``: an AUDIT policy without rules.
- ``method-case``: a lower-case method pattern (methods are case-sensitive).

"Matches every request it matches" is decided syntactically and only in the
safe direction: a finding is reported only when it is certain; overlaps that
are partial, or that need reasoning across fields, are not reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .model import Action, Condition, Operation, Policy, PolicySet, Rule, Source

__all__ = ["Finding", "lint", "rule_subsumed"]


@dataclass(frozen=True)
class Finding:
    kind: str
    policy: str
    rule: int | None
    origin: str
    message: str

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        rule = f" rule {self.rule}" if self.rule is not None else ""
        return f"{where}{self.kind}: {self.policy}{rule}: {self.message}"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "policy": self.policy,
            "rule": self.rule,
            "origin": self.origin,
            "message": self.message,
        }


# --------------------------------------------------------------------------
# Subsumption: every request matching a also matches b


def _pat_covers(b, a) -> bool:
    bm = getattr(b, "match", b)
    am = getattr(a, "match", a)
    return bm.covers(am)


def _net_covers(b, a) -> bool:
    return a.version == b.version and a.subnet_of(b)


def _eq(b, a) -> bool:
    return a == b


def _field_within(a_vals: tuple, a_not: tuple, b_vals: tuple, b_not: tuple, covers: Callable) -> bool:
    if b_vals:
        if not a_vals or not all(any(covers(bv, av) for bv in b_vals) for av in a_vals):
            return False
    # b excludes N_b; a must exclude at least that (each b exclusion inside an a exclusion)
    return all(any(covers(an, bn) for an in a_not) for bn in b_not)


def _source_within(a: Source, b: Source) -> bool:
    return (
        _field_within(a.principals, a.not_principals, b.principals, b.not_principals, _pat_covers)
        and _field_within(a.namespaces, a.not_namespaces, b.namespaces, b.not_namespaces, _pat_covers)
        and _field_within(a.ip_blocks, a.not_ip_blocks, b.ip_blocks, b.not_ip_blocks, _net_covers)
        and _field_within(
            a.request_principals,
            a.not_request_principals,
            b.request_principals,
            b.not_request_principals,
            _pat_covers,
        )
    )


def _operation_within(a: Operation, b: Operation) -> bool:
    return (
        _field_within(a.ports, a.not_ports, b.ports, b.not_ports, _eq)
        and _field_within(a.methods, a.not_methods, b.methods, b.not_methods, _pat_covers)
        and _field_within(a.paths, a.not_paths, b.paths, b.not_paths, _pat_covers)
        and _field_within(a.hosts, a.not_hosts, b.hosts, b.not_hosts, _pat_covers)
    )


def _condition_within(a: Condition, b: Condition) -> bool:
    if (a.key, a.header, a.claim) != (b.key, b.header, b.claim):
        return False
    vals = (a.values, a.not_values, b.values, b.not_values)
    return _field_within(
        *vals,
        _net_covers
        if a.key.value == "source.ip"
        else _eq
        if a.key.value == "destination.port"
        else _pat_covers,
    )


def _all_within(a_items: tuple, b_items: tuple, within: Callable) -> bool:
    if not b_items:
        return True
    if not a_items:
        return False
    return all(any(within(x, y) for y in b_items) for x in a_items)


def rule_subsumed(a: Rule, b: Rule, action: Action) -> bool:
    """True only if every request (HTTP or not) matching rule ``a`` of an
    ``action`` policy also matches rule ``b`` of an ``action`` policy."""
    if action is Action.ALLOW and b.is_l7 and not a.is_l7:
        return False  # on TCP b is ignored while a still allows
    return (
        _all_within(a.sources, b.sources, _source_within)
        and _all_within(a.operations, b.operations, _operation_within)
        and all(any(_condition_within(ca, cb) for ca in a.conditions) for cb in b.conditions)
    )


def _applies_at_least(q: Policy, p: Policy, root: str) -> bool:
    """Policy q applies to every workload p applies to."""
    if q.namespace != p.namespace and q.namespace != root:
        return False
    return set(q.selector) <= set(p.selector)


# --------------------------------------------------------------------------


def _rules(ps: PolicySet) -> Iterable[tuple[Policy, int, Rule]]:
    for p in ps.policies:
        for i, r in enumerate(p.rules):
            yield p, i, r


def _shadowing(ps: PolicySet) -> list[Finding]:
    out: list[Finding] = []
    every = list(_rules(ps))
    index = {(p.key, i): n for n, (p, i, _) in enumerate(every)}
    for p, i, a in every:
        if p.action is Action.AUDIT:
            continue
        me = index[(p.key, i)]
        done = False
        for q, j, b in every:
            if done:
                break
            if (q.key, j) == (p.key, i) or not _applies_at_least(q, p, ps.root_namespace):
                continue
            if q.action is p.action and rule_subsumed(a, b, p.action):
                mutual = _applies_at_least(p, q, ps.root_namespace) and rule_subsumed(b, a, p.action)
                if mutual and index[(q.key, j)] > me:
                    continue  # identical pair: report the later one only
                what = "rule" if q.key == p.key else f"{q.action} policy {q.key} rule"
                out.append(
                    Finding(
                        "shadowed",
                        p.key,
                        i,
                        a.origin,
                        f"never decides anything: {what} {j} ({b.origin}) matches "
                        "every request this rule matches",
                    )
                )
                done = True
            elif p.action is Action.ALLOW and q.action is Action.DENY and rule_subsumed(a, b, Action.DENY):
                out.append(
                    Finding(
                        "contradiction",
                        p.key,
                        i,
                        a.origin,
                        f"can never allow: DENY policy {q.key} rule {j} ({b.origin}) "
                        "denies every request this rule allows",
                    )
                )
                done = True
    return out


def _l7_ports(ps: PolicySet, http_ports: frozenset[int] | None) -> list[Finding]:
    out: list[Finding] = []
    for p, i, r in _rules(ps):
        if not r.is_l7:
            continue
        if p.action is Action.ALLOW:
            effect = "there it is ignored and allows nothing"
        else:
            effect = (
                "there its HTTP-only fields are dropped and it "
                f"{'denies' if p.action is Action.DENY else 'audits'} every connection "
                "matching the rest"
            )
        port_sets: list[tuple[int, ...]] = []
        for op in r.operations:
            if op.l7_fields:
                port_sets.append(op.ports)
        if any(c.is_l7 for c in r.conditions):
            port_sets.append(
                tuple(pt for op in r.operations for pt in op.ports)
                if r.operations and all(op.ports for op in r.operations)
                else ()
            )
        for ports in port_sets:
            if not ports:
                hint = "; list the HTTP ports in `ports`" if http_ports is None else ""
                out.append(
                    Finding(
                        "l7-port",
                        p.key,
                        i,
                        r.origin,
                        f"uses HTTP-only fields ({', '.join(r.l7_fields)}) on every port, "
                        f"including non-HTTP ones; {effect}{hint}",
                    )
                )
                break
            if http_ports is not None:
                bad = sorted(pt for pt in ports if pt not in http_ports)
                if bad:
                    out.append(
                        Finding(
                            "l7-port",
                            p.key,
                            i,
                            r.origin,
                            f"uses HTTP-only fields ({', '.join(r.l7_fields)}) on port(s) "
                            f"{', '.join(map(str, bad))}, not known to be HTTP; {effect}",
                        )
                    )
                    break
    return out


def _misc(ps: PolicySet) -> list[Finding]:
    out: list[Finding] = []
    for p in ps.policies:
        if p.action is Action.AUDIT and not p.rules:
            out.append(
                Finding(
                    "never-matches",
                    p.key,
                    None,
                    p.origin,
                    "AUDIT policy without rules audits nothing; add rules or {} for all",
                )
            )
    for p, i, r in _rules(ps):
        for op in r.operations:
            for m in op.methods + op.not_methods:
                if m.value != m.value.upper():
                    out.append(
                        Finding(
                            "method-case",
                            p.key,
                            i,
                            r.origin,
                            f"method {str(m)!r} is not upper case; methods are "
                            f"case-sensitive, so it does not match {m.value.upper()!r}",
                        )
                    )
    return out


def _no_workload(ps: PolicySet, pods: Sequence[tuple[str, Mapping[str, str]]]) -> list[Finding]:
    out = []
    for p in ps.policies:
        if not any(p.selects(ns, labels, ps.root_namespace) for ns, labels in pods):
            sel = ",".join(f"{k}={v}" for k, v in p.selector) or "(whole namespace)"
            out.append(
                Finding(
                    "no-workload",
                    p.key,
                    None,
                    p.origin,
                    f"selector {sel} in namespace {p.namespace} matches no pod of the inventory",
                )
            )
    return out


def lint(
    ps: PolicySet,
    *,
    pods: Sequence[tuple[str, Mapping[str, str]]] | None = None,
    http_ports: Iterable[int] | None = None,
) -> list[Finding]:
    """Every finding, ordered by where it was written.

    ``pods``: (namespace, labels) of each workload, to check selectors;
    ``http_ports``: the ports known to carry HTTP."""
    found = _shadowing(ps) + _l7_ports(ps, frozenset(http_ports) if http_ports is not None else None)
    found += _misc(ps)
    if pods is not None:
        found += _no_workload(ps, pods)
    return sorted(found, key=lambda f: (_origin_key(f.origin), f.kind))


def _origin_key(origin: str) -> tuple:
    file, _, rest = origin.rpartition(":")
    file2, _, line = file.rpartition(":")
    try:
        return (file2, int(line), int(rest))
    except ValueError:
        return (origin, 0, 0)
