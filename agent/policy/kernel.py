"""Compile a :class:`PolicySet` into connect-time kernel entries (pure).

The cgroup ``connect4``/``connect6`` hooks can refuse a connection before it
exists: they know which enrolled workload calls ``connect()`` (its cgroup)
and where it connects to.  This module decides, with the real evaluator,
which of those connections the destination node's proxy would refuse no
matter what, and emits exactly those as kernel entries.  The proxy keeps
deciding everything it receives (defence in depth, and cross-node it decides
against the mTLS-verified identity).

What the kernel may assume about a connection from enrolled pod S on this
node to mesh pod D (any node), port P:

- the source principal is S's own SPIFFE identity (the proxy asserts it from
  the kernel's cgroup record on the same node, and from S's certificate
  through the tunnel), and the source IP is S's address of the
  destination's family (the proxy rejects any other peer address);
- D is known by its IP (service VIPs and non-mesh destinations never get an
  entry; nor do connections that bypass the redirect, which the kernel
  checks first).

An entry is emitted only when :meth:`L4Plan.verdict` (compile_l4, the
evaluator's connection-level part) is ``deny``: final for every request the
connection could carry, so an ALLOW rule with HTTP fields (which could allow
some HTTP request) or a DENY rule with HTTP fields (which might deny only
some requests) keeps the connection away from the kernel.  So the kernel
never refuses what the proxy would allow: a Hypothesis test checks, over
random policy sets, that :func:`evaluate` refuses every connection and every
HTTP request the kernel refuses.

Ports: only ports that some applying rule mentions (``ports``,
``notPorts``, ``destination.port``) can be decided differently from the
others, so each (S, D) is decided for every mentioned port plus one port
that no rule mentions, which stands for all the others (kernel port 0, "any
port without an entry of its own").  Under a port-0 DENY, a mentioned port
that is not denied gets a PASS entry (the proxy decides it).

When the entries would not fit the kernel map, none are emitted (the proxy
still enforces everything) and the plan says so.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.datapath.abi import L4_DENY, L4_PASS  # ML_L4_* of bpf/include/meshlet.h, defined once
from agent.identity.spiffe import SpiffeId, SpiffeIdError
from agent.identity.spiffe import workload_id as spiffe_id

from .evaluate import L4Plan, Request, compile_l4
from .model import Action, ConditionKey, Policy, PolicySet

__all__ = [
    "KernelSource",
    "KernelDestination",
    "KernelPlan",
    "L4_DENY",
    "L4_PASS",
    "NO_POLICY_ID",
    "compile_kernel",
    "policy_id",
    "view_from_pods",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NO_POLICY_ID = 0
"""The policy id of a refusal no DENY rule made (ALLOW policies apply, none matches)."""

EntryKey = tuple[int, str, int]
"""(source workload id, destination IP, destination port or 0 for "any other port")."""


def policy_id(key: str) -> int:
    """The stable 32-bit id of policy ``namespace/name`` in the kernel's
    counters (never :data:`NO_POLICY_ID`)."""
    return zlib.crc32(key.encode()) or 1


@dataclass(frozen=True)
class KernelSource:
    """An enrolled pod on this node, as the kernel knows it."""

    key: str
    workload_id: int
    """The id connect4/6 read from ml_enrolled for the pod's cgroup."""
    principal: SpiffeId
    ips: tuple[IPAddress, ...]


@dataclass(frozen=True)
class KernelDestination:
    """A mesh pod (any node), known by its IPs."""

    key: str
    namespace: str
    labels: Mapping[str, str]
    ips: tuple[IPAddress, ...]


@dataclass
class KernelPlan:
    entries: dict[EntryKey, tuple[int, int]] = field(default_factory=dict)
    """(workload id, destination IP, port|0) -> (L4_DENY or L4_PASS, policy id)."""
    capacity: int = 0
    needed: int = 0
    """Entries the policies need (counted up to capacity + 1 once over)."""
    overflow: bool = False
    """More entries than ``capacity``: ``entries`` is empty, the proxy decides alone."""
    policies: dict[int, str] = field(default_factory=dict)
    """policy id -> ``namespace/name`` of every policy an entry names."""
    sources: int = 0
    destinations: int = 0

    @property
    def denies(self) -> int:
        return sum(1 for a, _ in self.entries.values() if a == L4_DENY)

    def summary(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "deny": self.denies,
            "pass": len(self.entries) - self.denies,
            "capacity": self.capacity,
            "needed": self.needed,
            "overflow": self.overflow,
            "sources": self.sources,
            "destinations": self.destinations,
            "reason": (
                f"{self.needed if self.needed <= self.capacity else 'more than ' + str(self.capacity)}"
                f" entries needed, the kernel map holds {self.capacity}: nothing is "
                "enforced in the kernel, the proxy decides every connection"
            )
            if self.overflow
            else "",
        }


def _mentioned_ports(policies: Iterable[Policy]) -> set[int]:
    ports: set[int] = set()
    for p in policies:
        if p.action is Action.AUDIT:
            continue
        for r in p.rules:
            for o in r.operations:
                ports.update(o.ports)
                ports.update(o.not_ports)
            for c in r.conditions:
                if c.key is ConditionKey.DESTINATION_PORT:
                    ports.update(int(v) for v in c.values)
                    ports.update(int(v) for v in c.not_values)
    return {p for p in ports if 0 < p <= 65535}


def _other_port(mentioned: set[int]) -> int:
    """A port no rule mentions: it stands for every such port."""
    p = 1
    while p in mentioned:
        p += 1
    return p


@dataclass
class _DstPlan:
    plan: L4Plan
    ports: tuple[int, ...]
    other: int


def _denied(
    dp: _DstPlan, dst: KernelDestination, src: KernelSource, src_ip: IPAddress, port: int
) -> tuple[bool, str | None]:
    """Whether the proxy refuses every connection (and request) from ``src``
    to ``dst``:``port``, and the deciding DENY policy (None: no ALLOW rule
    can match).  compile_l4's verdicts never contradict evaluate() (Hypothesis
    tests in test_policy_evaluate and test_policy_kernel check it)."""
    req = Request(
        destination_namespace=dst.namespace,
        destination_labels=dst.labels,
        destination_port=port,
        source_principal=src.principal,
        source_ip=src_ip,
    )
    v = dp.plan.verdict(req)
    if v.verdict != "deny":
        return False, None
    return True, v.rule.policy if v.rule is not None else None


def compile_kernel(
    ps: PolicySet, sources: Iterable[KernelSource], destinations: Iterable[KernelDestination], capacity: int
) -> KernelPlan:
    """The kernel entries for connections from ``sources`` to ``destinations``."""
    sources, destinations = list(sources), list(destinations)
    plan = KernelPlan(capacity=capacity, sources=len(sources), destinations=len(destinations))
    entries: dict[EntryKey, tuple[int, int]] = {}
    names: dict[int, str] = {}
    per_dst: dict[tuple, _DstPlan | None] = {}
    cache: dict[tuple, list[tuple[int, int, int]]] = {}

    def pid(name: str | None) -> int:
        if name is None:
            return NO_POLICY_ID
        i = policy_id(name)
        names[i] = name
        return i

    for dst in destinations:
        sel = (dst.namespace, tuple(sorted(dst.labels.items())))
        if sel not in per_dst:
            applying = ps.selecting(dst.namespace, dst.labels)
            if not any(p.action is not Action.AUDIT for p in applying):
                per_dst[sel] = None  # nothing can deny: no entries
            else:
                mentioned = _mentioned_ports(applying)
                per_dst[sel] = _DstPlan(
                    compile_l4(ps, dst.namespace, dst.labels),
                    tuple(sorted(mentioned)),
                    _other_port(mentioned),
                )
        dp = per_dst[sel]
        if dp is None:
            continue
        for src in sources:
            for dip in dst.ips:
                sips = [ip for ip in src.ips if ip.version == dip.version]
                if len(sips) != 1:
                    continue  # no (or no single) source address of that family: not certain
                dkey = str(dip)
                # the same for every destination with these labels (replicas)
                ck = (sel, src.workload_id, dip.version)
                decided = cache.get(ck)
                if decided is None:
                    other, other_by = _denied(dp, dst, src, sips[0], dp.other)
                    decided = []
                    if other:
                        decided.append((0, L4_DENY, pid(other_by)))
                    for port in dp.ports:
                        denied, by = _denied(dp, dst, src, sips[0], port)
                        if denied and not (other and by == other_by):
                            decided.append((port, L4_DENY, pid(by)))
                        elif not denied and other:
                            decided.append((port, L4_PASS, NO_POLICY_ID))
                    cache[ck] = decided
                for port, action, policy in decided:
                    entries[(src.workload_id, dkey, port)] = (action, policy)
                if len(entries) > capacity:
                    plan.needed = len(entries)
                    plan.overflow = True
                    return plan
    plan.entries = entries
    plan.needed = len(entries)
    plan.policies = names
    return plan


def view_from_pods(
    pods: Iterable[Any], node: str, trust_domain: str, enrolled: Mapping[str, int]
) -> tuple[list[KernelSource], list[KernelDestination]]:
    """Sources and destinations from inventory pods (objects with ``key``,
    ``name``, ``namespace``, ``service_account``, ``labels``, ``ips``,
    ``node`` and ``mesh``).  ``enrolled``: pod key -> workload id of the pods
    this node's kernel has enrolled (only those can be refused at connect)."""
    srcs: list[KernelSource] = []
    dsts: list[KernelDestination] = []
    for p in pods:
        if not p.mesh:
            continue
        ips = tuple(ipaddress.ip_address(str(ip)) for ip in p.ips)
        dsts.append(KernelDestination(p.key, p.namespace, dict(p.labels), ips))
        if p.node == node and p.key in enrolled:
            try:
                principal = spiffe_id(trust_domain, p.namespace, p.service_account)
            except SpiffeIdError:
                continue
            srcs.append(KernelSource(p.key, enrolled[p.key], principal, ips))
    return srcs, dsts
