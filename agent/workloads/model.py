"""The workload model: nodes, pods, namespace settings and services, whatever
they come from (the YAML inventory file today, see
:mod:`agent.workloads.yamlfile`; the Kubernetes API later).

Pure data and pure functions: frozen dataclasses, indexes built once per
:class:`Inventory`, :func:`diff` for reloads and :func:`services_doc` for the
JSON the agent publishes.  No parsing, no files, no clock: a source builds an
:class:`Inventory` and everything downstream only reads it.

Services are virtual IPs in front of the pods a label selector picks.
Endpoints are computed, never written: the pods of the service's namespace
whose labels include every selector label, each with its address in the
VIP's family and the ``targetPort``.  Pods with ``mesh: false`` are
endpoints too; the proxy connects to them directly.

``appProtocol`` decides what the node proxy does with a connection to a
service port: absent, sniff the first bytes (HTTP/1 gets the L7 path);
``http``, the L7 path without sniffing; ``tcp`` and ``opaque``, L4, never
sniffed (``opaque`` is for server-speaks-first protocols that must not be
peeked at; the proxy treats both the same today).
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.netaddr import IPAddress, normalize_ip

__all__ = [
    "IPAddress",
    "APP_PROTOCOLS",
    "Node",
    "Pod",
    "NamespaceSettings",
    "Inventory",
    "InventoryDiff",
    "diff",
    "ServicePort",
    "Service",
    "Endpoint",
    "ServiceIndex",
    "services_doc",
    "workload_id",
]

#: Values of ``ports[].appProtocol``.
APP_PROTOCOLS = ("http", "tcp", "opaque")


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
        return next((a for a in self.ips if a.version == 4), None)

    @property
    def ipv6(self) -> ipaddress.IPv6Address | None:
        return next((a for a in self.ips if a.version == 6), None)


@dataclass(frozen=True)
class NamespaceSettings:
    """Per-namespace overrides (``namespaces.<name>``)."""

    mode: str | None = None
    """``permissive`` or ``strict``; None keeps the node's default."""


@dataclass(frozen=True)
class ServicePort:
    """One port of a service."""

    port: int
    """The port clients connect to on the VIP."""

    target_port: int
    """The port on the endpoint pods."""

    name: str | None = None
    """Optional name, unique within the service."""

    app_protocol: str | None = None
    """``http``, ``tcp``, ``opaque`` or None (detect)."""

    @property
    def detect(self) -> bool:
        """The proxy sniffs the first bytes to choose L7 or L4."""
        return self.app_protocol is None

    @property
    def l7(self) -> bool:
        """Declared HTTP: per-request handling without sniffing."""
        return self.app_protocol == "http"


@dataclass(frozen=True)
class Service:
    """A virtual IP (or two) balanced over the pods its selector picks."""

    name: str
    namespace: str
    vips: tuple[IPAddress, ...]
    """At most one IPv4 and one IPv6 address."""
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Labels a pod must all carry (read-only mapping)."""

    @property
    def key(self) -> str:
        """``namespace/name``, unique in an inventory."""
        return f"{self.namespace}/{self.name}"

    def port(self, number_or_name: int | str) -> ServicePort | None:
        """The port with this number (or name), or None."""
        for p in self.ports:
            if p.port == number_or_name or (p.name is not None and p.name == number_or_name):
                return p
        return None

    def to_dict(self) -> dict:
        """The inventory YAML shape, defaults filled in (read back by
        :func:`agent.workloads.yamlfile.read_services`)."""
        ports = []
        for p in self.ports:
            d: dict = {"port": p.port, "targetPort": p.target_port}
            if p.name is not None:
                d["name"] = p.name
            if p.app_protocol is not None:
                d["appProtocol"] = p.app_protocol
            ports.append(d)
        return {
            "name": self.name,
            "namespace": self.namespace,
            "vip": [str(v) for v in self.vips],
            "selector": dict(self.selector),
            "ports": ports,
        }

    def selects(self, pod: Pod) -> bool:
        """``pod`` is in this service's namespace and carries every selector label."""
        return (
            pod.namespace == self.namespace
            and bool(self.selector)
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True, order=True)
class Endpoint:
    """One place a service port's traffic may go: a pod's address and port."""

    pod: str
    """Pod key, ``namespace/name``."""
    ip: IPAddress
    port: int
    node: str
    """Name of the node the pod runs on (same node: direct; other: tunnel)."""


@dataclass(frozen=True)
class ServiceIndex:
    """Services indexed by VIP and port, with endpoints computed from pods."""

    services: tuple[Service, ...] = ()
    pods: tuple[Pod, ...] = ()
    _by_vip: Mapping[tuple[IPAddress, int], tuple[Service, ServicePort]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_key: Mapping[str, Service] = field(init=False, repr=False, compare=False, hash=False)
    _members: Mapping[str, tuple[Pod, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "pods", tuple(self.pods))
        object.__setattr__(
            self, "_by_vip", {(vip, p.port): (s, p) for s in self.services for vip in s.vips for p in s.ports}
        )
        object.__setattr__(self, "_by_key", {s.key: s for s in self.services})
        object.__setattr__(
            self, "_members", {s.key: tuple(p for p in self.pods if s.selects(p)) for s in self.services}
        )

    def service(self, key: str) -> Service | None:
        """The service with key ``namespace/name``, or None."""
        return self._by_key.get(key)

    def by_vip(self, ip: str | IPAddress, port: int) -> tuple[Service, ServicePort] | None:
        """The service and port a connection to ``ip:port`` is for, or None.

        IPv6 text is normalised and IPv4-mapped IPv6 (``::ffff:a.b.c.d``, as
        dual-stack sockets report it) matches the IPv4 VIP."""
        addr = normalize_ip(ip)
        return None if addr is None else self._by_vip.get((addr, port))

    def endpoints(
        self, service: Service | str, port: ServicePort | int | str, *, family: int = 4
    ) -> list[Endpoint]:
        """Endpoints of ``service``'s ``port`` in one address family (that of the
        VIP dialed), sorted; pods without an address in the family are left out.
        An unknown service or port gives []."""
        svc = self._by_key.get(service) if isinstance(service, str) else service
        if svc is None:
            return []
        sp = port if isinstance(port, ServicePort) else svc.port(port)
        if sp is None or sp not in svc.ports:
            return []
        members = self._members.get(svc.key)
        if members is None:  # a Service not in this index: compute on the spot
            members = tuple(p for p in self.pods if svc.selects(p))
        out = []
        for pod in members:
            ip = pod.ipv4 if family == 4 else pod.ipv6
            if ip is not None:
                out.append(Endpoint(pod.key, ip, sp.target_port, pod.node))
        return sorted(out)

    def services_of(self, pod: Pod) -> tuple[Service, ...]:
        """The services whose selector picks ``pod``."""
        return tuple(s for s in self.services if s.selects(pod))


@dataclass(frozen=True)
class Inventory:
    """Nodes, pods and namespace settings, validated and indexed."""

    nodes: tuple[Node, ...] = ()
    """All nodes, in file order."""

    pods: tuple[Pod, ...] = ()
    """All pods, in file order."""

    namespaces: Mapping[str, NamespaceSettings] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
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
        addr = normalize_ip(ip)
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
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "serviceAccount": p.service_account,
                    "labels": dict(p.labels),
                    "node": p.node,
                    "ips": [str(a) for a in p.ips],
                    "cgroup": p.cgroup,
                    "mesh": p.mesh,
                }
                for p in self.pods
            ],
            "namespaces": {
                k: ({"mode": v.mode} if v.mode is not None else {}) for k, v in self.namespaces.items()
            },
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
        return bool(
            self.added or self.removed or self.changed or self.namespaces_changed or self.services_changed
        )


def diff(old: Inventory, new: Inventory) -> InventoryDiff:
    """Compare pods by ``namespace/name`` (and namespace settings by name)."""
    before = {p.key: p for p in old.pods}
    after = {p.key: p for p in new.pods}
    ns = sorted(
        k for k in set(old.namespaces) | set(new.namespaces) if old.namespaces.get(k) != new.namespaces.get(k)
    )

    def svc_sig(s: Service) -> tuple:
        return (s, tuple(sorted(s.selector.items())))  # Service equality ignores the selector

    svc_old = {s.key: svc_sig(s) for s in old.services}
    svc_new = {s.key: svc_sig(s) for s in new.services}
    svcs = sorted(k for k in svc_old.keys() | svc_new.keys() if svc_old.get(k) != svc_new.get(k))
    return InventoryDiff(
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple(
            (before[k], after[k]) for k in sorted(before.keys() & after.keys()) if before[k] != after[k]
        ),
        namespaces_changed=tuple(ns),
        services_changed=tuple(svcs),
    )


def services_doc(index: ServiceIndex) -> list[dict]:
    """Every service as published by the agent (proxy state, admin API):
    key, name, namespace, VIPs, selector and, per port, the endpoints in
    every family (one entry per pod address), sorted.  JSON-able."""
    out = []
    for s in index.services:
        ports = []
        for p in s.ports:
            eps = index.endpoints(s, p, family=4) + index.endpoints(s, p, family=6)
            ports.append(
                {
                    "port": p.port,
                    "target_port": p.target_port,
                    "name": p.name,
                    "app_protocol": p.app_protocol,
                    "endpoints": [
                        {"pod": e.pod, "ip": str(e.ip), "port": e.port, "node": e.node} for e in eps
                    ],
                }
            )
        out.append(
            {
                "key": s.key,
                "name": s.name,
                "namespace": s.namespace,
                "vips": [str(v) for v in s.vips],
                "selector": dict(s.selector),
                "ports": ports,
            }
        )
    return out


def workload_id(key: str) -> int:
    """A stable small id for a workload (its key's CRC32, 31 bits): what the
    kernel maps store for an enrolled pod."""
    return zlib.crc32(key.encode()) & 0x7FFFFFFF
