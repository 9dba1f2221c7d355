"""The node inventory: which nodes and pods exist (YAML file; dev, tests, VMs).

Pure: :func:`parse_inventory` turns text into an :class:`Inventory` or raises
:class:`~agent.yamlsrc.SourceError` listing every problem as
``file:line:column: field.path: message``; :func:`load_inventory` only adds
reading the file.  :func:`diff` compares two inventories pod by pod, for
reloads.

Shape::

    nodes:
      - name: node1
        address: 198.18.0.1            # IPv4 tunnel endpoint, required
        address6: fd00:198:18::1       # optional
    pods:
      - name: pod1-1
        namespace: default             # default "default"
        serviceAccount: pod1-1         # default "default"
        labels: {app: web}             # Kubernetes label syntax, default {}
        node: node1                    # one of nodes[].name
        ips: [10.244.1.10, "fd00:244:1::10"]   # 1..2, at most one per family
        cgroup: /sys/fs/cgroup/...     # required
        mesh: true                     # enrolled in the mesh, default true
    namespaces:                        # optional
      shop: {mode: strict}             # overrides the node default for that namespace
    services:                          # optional: virtual IPs (see agent.workloads.services)
      - name: backend
        namespace: shop
        vip: [10.96.0.10, "fd00:96::10"]
        selector: {app: backend}
        ports: [{port: 80, targetPort: 8080, name: http, appProtocol: http}]

Checked across entries: node names are unique, node addresses are unique,
``(namespace, name)`` is unique, no IP belongs to two pods, and every pod's
node exists.  Services: ``namespace/name`` is unique, no ``vip:port`` is
served twice, and a VIP is neither a pod IP nor a node address (see
:mod:`agent.workloads.services`).  Endpoints are computed from the pods
(:attr:`Inventory.service_index`), never written.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from agent import yamlsrc as y
from agent.config import MESH_MODES

if TYPE_CHECKING:  # services.py imports this module: import it lazily at run time
    from agent.workloads.services import Service, ServiceIndex

__all__ = [
    "Node", "Pod", "NamespaceSettings", "Inventory", "InventoryDiff",
    "load_inventory", "parse_inventory", "diff",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Node:
    """A node of the (possibly simulated) cluster."""

    name: str
    """RFC 1123 label, unique in the inventory."""

    address: ipaddress.IPv4Address
    """IPv4 tunnel endpoint other nodes connect to."""

    address6: ipaddress.IPv6Address | None = None
    """Optional IPv6 tunnel endpoint."""


@dataclass(frozen=True)
class Pod:
    """A workload instance on some node."""

    name: str
    """RFC 1123 label; unique within its namespace."""

    namespace: str
    """Kubernetes namespace (RFC 1123 label)."""

    service_account: str
    """Service account the pod runs as; its mesh identity derives from it."""

    node: str
    """Name of the node the pod runs on."""

    ips: tuple[IPAddress, ...]
    """Pod addresses, at most one IPv4 and one IPv6."""

    cgroup: str
    """cgroup v2 directory of the pod, kept as written."""

    mesh: bool = True
    """Enrolled in the mesh (its connections are redirected)."""

    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Kubernetes-style labels (read-only mapping)."""

    @property
    def key(self) -> str:
        """``namespace/name``, unique in an inventory."""
        return f"{self.namespace}/{self.name}"

    @property
    def ipv4(self) -> ipaddress.IPv4Address | None:
        return next((a for a in self.ips if a.version == 4), None)  # type: ignore[return-value]

    @property
    def ipv6(self) -> ipaddress.IPv6Address | None:
        return next((a for a in self.ips if a.version == 6), None)  # type: ignore[return-value]


@dataclass(frozen=True)
class NamespaceSettings:
    """Per-namespace overrides (``namespaces.<name>``)."""

    mode: str | None = None
    """``permissive`` or ``strict``; None keeps the node's default."""


def _normalize_ip(ip: str | IPAddress) -> IPAddress | None:
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # "::ffff:10.0.0.1" as seen on dual-stack sockets
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


@dataclass(frozen=True)
class Inventory:
    """Nodes, pods and namespace settings, validated and indexed."""

    nodes: tuple[Node, ...] = ()
    """All nodes, in file order."""

    pods: tuple[Pod, ...] = ()
    """All pods, in file order."""

    namespaces: Mapping[str, NamespaceSettings] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    """Settings by namespace name; namespaces not listed use the defaults."""

    services: tuple[Service, ...] = ()
    """Services (virtual IPs), in file order."""

    _by_ip: Mapping[IPAddress, Pod] = field(init=False, repr=False, compare=False, hash=False)
    _nodes: Mapping[str, Node] = field(init=False, repr=False, compare=False, hash=False)
    _services: ServiceIndex | None = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_ip", {ip: p for p in self.pods for ip in p.ips})
        object.__setattr__(self, "_nodes", {n.name: n for n in self.nodes})
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "_services", None)

    @property
    def service_index(self) -> ServiceIndex:
        """The services indexed by VIP and port, with endpoints computed from
        :attr:`pods` (built on first use)."""
        if self._services is None:
            from agent.workloads.services import ServiceIndex
            object.__setattr__(self, "_services", ServiceIndex(self.services, self.pods))
        assert self._services is not None
        return self._services

    def node(self, name: str) -> Node | None:
        """The node called ``name``, or None."""
        return self._nodes.get(name)

    def pods_on(self, node: str | Node) -> tuple[Pod, ...]:
        """Pods scheduled on ``node`` (a name or a :class:`Node`), in file order."""
        name = node.name if isinstance(node, Node) else node
        return tuple(p for p in self.pods if p.node == name)

    def pod(self, key: str) -> Pod | None:
        """The pod with key ``namespace/name``, or None."""
        return next((p for p in self.pods if p.key == key), None)

    def pod_by_ip(self, ip: str | IPAddress) -> Pod | None:
        """The pod owning ``ip``; IPv6 text is normalised and IPv4-mapped IPv6
        (``::ffff:a.b.c.d``) matches the IPv4 address. Non-addresses give None."""
        addr = _normalize_ip(ip)
        return None if addr is None else self._by_ip.get(addr)

    def mode_for(self, pod: Pod, default: str) -> str:
        """The mesh mode for ``pod``: its namespace's override, else ``default``."""
        ns = self.namespaces.get(pod.namespace)
        return ns.mode if ns is not None and ns.mode is not None else default

    def to_dict(self) -> dict:
        """The YAML shape, every default filled in (``parse_inventory`` reads it back)."""
        def node(n: Node) -> dict:
            d = {"name": n.name, "address": str(n.address)}
            if n.address6 is not None:
                d["address6"] = str(n.address6)
            return d

        return {
            "nodes": [node(n) for n in self.nodes],
            "pods": [{
                "name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account,
                "labels": dict(p.labels), "node": p.node, "ips": [str(a) for a in p.ips],
                "cgroup": p.cgroup, "mesh": p.mesh,
            } for p in self.pods],
            "namespaces": {k: ({"mode": v.mode} if v.mode is not None else {})
                           for k, v in self.namespaces.items()},
            "services": [s.to_dict() for s in self.services],
        }


@dataclass(frozen=True)
class InventoryDiff:
    """What changed between two inventories, pod by pod (sorted by key)."""

    added: tuple[Pod, ...] = ()
    """Pods only in the new inventory."""

    removed: tuple[Pod, ...] = ()
    """Pods only in the old inventory."""

    changed: tuple[tuple[Pod, Pod], ...] = ()
    """``(old, new)`` for pods whose key is in both but whose fields differ."""

    namespaces_changed: tuple[str, ...] = ()
    """Namespaces whose settings (e.g. mode) were added, removed or changed;
    their pods' effective mode may differ even though the pods did not."""

    services_changed: tuple[str, ...] = ()
    """Keys (``namespace/name``) of services added, removed or changed (VIPs,
    ports or selector; endpoints follow the pods, see ``added``/``removed``)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.namespaces_changed
                    or self.services_changed)


def diff(old: Inventory, new: Inventory) -> InventoryDiff:
    """Compare pods by ``namespace/name`` (and namespace settings by name)."""
    before = {p.key: p for p in old.pods}
    after = {p.key: p for p in new.pods}
    ns = sorted(k for k in set(old.namespaces) | set(new.namespaces)
                if old.namespaces.get(k) != new.namespaces.get(k))

    def svc_sig(s: Service) -> tuple:
        return (s, tuple(sorted(s.selector.items())))  # Service equality ignores the selector

    svc_old = {s.key: svc_sig(s) for s in old.services}
    svc_new = {s.key: svc_sig(s) for s in new.services}
    svcs = sorted(k for k in svc_old.keys() | svc_new.keys() if svc_old.get(k) != svc_new.get(k))
    return InventoryDiff(
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple((before[k], after[k]) for k in sorted(before.keys() & after.keys())
                      if before[k] != after[k]),
        namespaces_changed=tuple(ns),
        services_changed=tuple(svcs),
    )


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate the inventory file at ``path``; raises ``SourceError``."""
    path = os.fspath(path)
    return parse_inventory(y.read_text(path), path)


def parse_inventory(text: str, filename: str = "<inventory>") -> Inventory:
    """Validate inventory text; raises ``SourceError`` listing every problem."""
    doc = y.parse(text, filename)
    inv = _read(doc.top())
    doc.check()
    assert inv is not None
    return inv


# --------------------------------------------------------------------------
# Reading

# Kubernetes label syntax: key = [prefix/]name, value = name or "".
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _label_key(v: y.Value) -> str:
    k = y.string(v)
    prefix, _, name = k.rpartition("/")
    ok = 0 < len(name) <= 63 and _LABEL_NAME.fullmatch(name)
    if prefix:
        ok = ok and len(prefix) <= 253 and all(
            re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", part) for part in prefix.split("."))
    if not ok:
        raise y.Invalid(f"{k!r} is not a valid label key: [dns.prefix/]name, name at most 63 "
                        "characters of letters, digits, '-', '_', '.'")
    return k


def _label_value(v: y.Value) -> str:
    s = y.any_string(v)
    if len(s) > 63 or not _LABEL_NAME.fullmatch(s):
        raise y.Invalid(f"{s!r} is not a valid label value: at most 63 characters of letters, "
                        "digits, '-', '_', '.', starting and ending with a letter or digit")
    return s


def _reader_of(v: y.Value) -> y.MapReader:
    return v.mapping()


def _read(top: y.MapReader) -> Inventory | None:
    doc = top.doc
    node_vals = top.at("nodes")
    pod_vals = top.at("pods")
    ns_val = top.at("namespaces")
    svc_val = top.at("services")
    top.finish()

    def items(v: y.Value | None) -> list[y.Value]:
        if v is None:
            return []
        got = v.convert(y.Value.items)
        return got or []

    before = len(doc.problems)
    nodes = [e for e in map(_read_node, items(node_vals)) if e is not None]
    nodes_ok = len(doc.problems) == before  # else "unknown node" errors could be spurious
    pods = [e for e in map(_read_pod, items(pod_vals)) if e is not None]

    namespaces: dict[str, NamespaceSettings] = {}
    if ns_val is not None:
        nsmap = ns_val.convert(_reader_of)
        if nsmap is not None:
            for kv, vv in y.entries(nsmap):
                name = kv.convert(y.dns_label)
                settings = _read_namespace(vv)
                if name is not None and settings is not None:
                    namespaces[name] = settings

    # -- cross-checks over whatever fields parsed, each reported at the later entry
    by_name: dict[str, _Entry] = {}
    by_addr: dict[IPAddress, tuple[_Entry, str]] = {}
    for n in nodes:
        name = n["name"]
        if name is not None:
            if name in by_name:
                _blame(n, "name", f"node {name!r} is listed twice "
                                  f"(first at {_where(by_name[name], 'name')})")
            else:
                by_name[name] = n
        for attr in ("address", "address6"):
            a = n[attr]
            if a is None:
                continue
            if a in by_addr:
                other, oattr = by_addr[a]
                _blame(n, attr, f"{a} is already the address of node {other['name']!r} "
                                f"({_where(other, oattr)})")
            else:
                by_addr[a] = (n, attr)

    by_key: dict[str, _Entry] = {}
    by_ip: dict[IPAddress, tuple[_Entry, int]] = {}
    for p in pods:
        if p["name"] is not None and p["namespace"] is not None:
            key = f"{p['namespace']}/{p['name']}"
            if key in by_key:
                _blame(p, "name", f"pod {key!r} is listed twice (first at {_where(by_key[key], 'name')})")
            else:
                by_key[key] = p
        for i, ip in enumerate(p["ips"] or ()):
            if ip in by_ip:
                other, j = by_ip[ip]
                here, there = p.reader.at("ips"), other.reader.at("ips")
                assert here is not None and there is not None
                other_name = f"{other['namespace'] or '?'}/{other['name'] or '?'}"
                here.items()[i].problem(f"{ip} is already used by pod {other_name} "
                                        f"({there.items()[j].where})")
            else:
                by_ip[ip] = (p, i)
        if nodes_ok and p["node"] is not None and p["node"] not in by_name:
            hint = y.did_you_mean(p["node"], by_name)
            _blame(p, "node", f"node {p['node']!r} is not in nodes[]"
                              + (f" (did you mean {hint!r}?)" if hint else
                                 f"; known nodes: {', '.join(by_name) or 'none'}"))

    from agent.workloads.services import check_against_pods, read_services

    before = len(doc.problems)
    services = read_services(svc_val)
    if len(doc.problems) == before and svc_val is not None:
        # Only over services that read cleanly (positions line up with items)
        # and only pods that did (else a VIP clash could be a spurious echo).
        check_against_pods(services, [Pod(**p.fields) for p in pods if p.ok],
                           svc_val, [Node(**n.fields) for n in nodes if n.ok])

    if doc.failed:
        return None
    return Inventory(
        nodes=tuple(Node(**n.fields) for n in nodes),
        pods=tuple(Pod(**p.fields) for p in pods),
        namespaces=MappingProxyType(namespaces),
        services=services,
    )


def _where(e: _Entry, key: str) -> str:
    v = e.reader.at(key)
    return v.where if v is not None else f"line {e.reader.value.line}"


def _blame(e: _Entry, key: str, message: str) -> None:
    """Report at field ``key`` of an entry (or at the entry when it is defaulted)."""
    v = e.reader.at(key)
    if v is not None:
        v.problem(message)
    else:
        e.reader.doc.add_at(e.reader.value.node, f"{e.reader.path}.{key}", message)


class _Entry:
    """One list item as read: the fields that parsed (None if not) and where."""

    def __init__(self, fields: dict, reader: y.MapReader, ok: bool):
        self.fields, self.reader, self.ok = fields, reader, ok

    def __getitem__(self, key: str):
        return self.fields[key]


def _read_node(item: y.Value) -> _Entry | None:
    r = item.convert(_reader_of)
    if r is None:
        return None
    before = len(r.doc.problems)
    n = dict(
        name=r.get("name", y.dns_label),
        address=r.get("address", y.ip_address(4)),
        address6=r.get("address6", y.ip_address(6), None),
    )
    r.finish()
    return _Entry(n, r, len(r.doc.problems) == before)


def _pod_ips(v: y.Value) -> tuple[IPAddress, ...]:
    ips = y.list_of(y.ip_address(), min_len=1)(v)
    items = v.items()
    seen: dict[int, int] = {}
    for i, ip in enumerate(ips):
        if ip.version in seen:
            items[i].problem(f"a pod has at most one IPv{ip.version} address "
                             f"(ips[{seen[ip.version]}] is {ips[seen[ip.version]]})")
            raise y.Reported()
        seen[ip.version] = i
    return ips


def _read_pod(item: y.Value) -> _Entry | None:
    r = item.convert(_reader_of)
    if r is None:
        return None
    before = len(r.doc.problems)
    p = dict(
        name=r.get("name", y.dns_label),
        namespace=r.get("namespace", y.dns_label, "default"),
        service_account=r.get("serviceAccount", y.dns_subdomain, "default"),
        labels=r.get("labels", y.map_of(_label_key, _label_value), {}),
        node=r.get("node", y.dns_label),
        ips=r.get("ips", _pod_ips),
        cgroup=r.get("cgroup", y.string),
        mesh=r.get("mesh", y.boolean, True),
    )
    r.finish()
    if p["labels"] is not None:
        p["labels"] = MappingProxyType(dict(p["labels"]))
    return _Entry(p, r, len(r.doc.problems) == before)


def _read_namespace(v: y.Value) -> NamespaceSettings | None:
    if v.is_null:
        return NamespaceSettings()
    r = v.convert(_reader_of)
    if r is None:
        return None
    before = len(r.doc.problems)
    mode = r.get("mode", y.enum(*MESH_MODES), None)
    r.finish()
    if len(r.doc.problems) != before:
        return None
    return NamespaceSettings(mode=mode)
