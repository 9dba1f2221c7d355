"""Services: virtual IPs in front of the pods a label selector picks.

This is the ``services:`` section of the node inventory
(:mod:`agent.workloads.inventory` reads it with :func:`read_services` and
checks it with :func:`check_against_pods`; :func:`parse_services` reads a
file for this section alone).  Pure: no sockets, no files.

Shape::

    services:
      - name: backend
        namespace: shop                  # default "default"
        vip: [10.96.0.10, "fd00:96::10"] # 1..2 virtual IPs, at most one per family
        selector: {app: backend}         # required, non-empty: pods of the namespace with these labels
        ports:                           # 1.., unique by port and by name
          - port: 80                     # the port clients dial on the VIP
            targetPort: 8080             # the pod's port (default: port); numbers only
            name: http                   # optional; unique within the service
            appProtocol: http            # http | tcp | opaque; absent: detect

A VIP is on no interface anywhere.  The kernel hook redirects every
connection of an enrolled pod to the node proxy, whatever its destination,
and the proxy recognises the VIP in the original destination.  So only
mesh pods can reach a VIP: there is no kube-proxy (a pod with
``mesh: false``, or a process outside any pod, gets no route to it).

``appProtocol`` decides what the node proxy does with a connection to the
port:

- absent: sniff the first bytes; HTTP/1 gets the L7 path (per-request load
  balancing, retries), anything else stays L4;
- ``http``: the L7 path, without sniffing;
- ``tcp`` and ``opaque``: L4 (per-connection load balancing), never sniffed.
  ``opaque`` is the word for protocols that must not even be peeked at
  (server-speaks-first such as MySQL or SMTP would stall a sniffer); the
  proxy treats both the same today.

Endpoints are computed, never written: the pods of the service's namespace
whose labels include every selector label, each with its address in the
VIP's family and the ``targetPort``.  A selector is required because a
service without one would have no endpoints (Kubernetes leaves those to a
separate Endpoints object, which meshlet does not read).  Pods with
``mesh: false`` are endpoints too; the proxy connects to them directly
(plain TCP, as to any non-mesh address).

Checked across entries: ``namespace/name`` is unique and no ``vip:port`` is
served by two services.  :func:`check_against_pods` adds the checks that
need the pods and nodes: a VIP is not a pod IP and not a node address.
A VIP must also be routable-looking: loopback, link-local, unspecified and
multicast addresses are refused.

:func:`services_doc` is the JSON shape the agent publishes (proxy state,
admin API): every service with its VIPs and, per port, its endpoints.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

from yaml.nodes import ScalarNode

from agent import yamlsrc as y
from agent.workloads.inventory import Pod, _label_key, _label_value

__all__ = [
    "APP_PROTOCOLS", "ServicePort", "Service", "Endpoint", "ServiceIndex",
    "read_services", "parse_services", "load_services", "check_against_pods",
    "services_doc",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Values of ``ports[].appProtocol``.
APP_PROTOCOLS = ("http", "tcp", "opaque")


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
        """The inventory YAML shape, defaults filled in (read back by :func:`read_services`)."""
        ports = []
        for p in self.ports:
            d: dict = {"port": p.port, "targetPort": p.target_port}
            if p.name is not None:
                d["name"] = p.name
            if p.app_protocol is not None:
                d["appProtocol"] = p.app_protocol
            ports.append(d)
        return {"name": self.name, "namespace": self.namespace,
                "vip": [str(v) for v in self.vips], "selector": dict(self.selector),
                "ports": ports}

    def selects(self, pod: Pod) -> bool:
        """``pod`` is in this service's namespace and carries every selector label."""
        return (pod.namespace == self.namespace and bool(self.selector)
                and all(pod.labels.get(k) == v for k, v in self.selector.items()))


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
        init=False, repr=False, compare=False, hash=False)
    _by_key: Mapping[str, Service] = field(init=False, repr=False, compare=False, hash=False)
    _members: Mapping[str, tuple[Pod, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "pods", tuple(self.pods))
        object.__setattr__(self, "_by_vip", {(vip, p.port): (s, p)
                                             for s in self.services for vip in s.vips for p in s.ports})
        object.__setattr__(self, "_by_key", {s.key: s for s in self.services})
        object.__setattr__(self, "_members", {s.key: tuple(p for p in self.pods if s.selects(p))
                                              for s in self.services})

    def service(self, key: str) -> Service | None:
        """The service with key ``namespace/name``, or None."""
        return self._by_key.get(key)

    def by_vip(self, ip: str | IPAddress, port: int) -> tuple[Service, ServicePort] | None:
        """The service and port a connection to ``ip:port`` is for, or None.

        IPv6 text is normalised and IPv4-mapped IPv6 (``::ffff:a.b.c.d``, as
        dual-stack sockets report it) matches the IPv4 VIP."""
        addr = _normalize_ip(ip)
        return None if addr is None else self._by_vip.get((addr, port))

    def endpoints(self, service: Service | str, port: ServicePort | int | str, *,
                  family: int = 4) -> list[Endpoint]:
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


def _normalize_ip(ip: str | IPAddress) -> IPAddress | None:
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip.strip().split("%", 1)[0])
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


# --------------------------------------------------------------------------
# Reading


def _vip(v: y.Value) -> IPAddress:
    ip = y.ip_address()(v)
    if ip.is_loopback or ip.is_link_local:
        raise y.Invalid(f"{ip} is a {'loopback' if ip.is_loopback else 'link-local'} address; "
                        "a VIP needs an address no host owns, e.g. from 10.96.0.0/16 or "
                        "fd00:96::/112")
    return ip


def _vips(v: y.Value) -> tuple[IPAddress, ...]:
    items = v.items() if not isinstance(v.node, ScalarNode) else None
    if items is None:  # a single address is fine too: `vip: 10.96.0.10`
        return (_vip(v),)
    ips = y.list_of(_vip, min_len=1)(v)
    if len(ips) > 2:
        raise y.Invalid("a service has at most two VIPs (one IPv4, one IPv6)")
    seen: dict[int, int] = {}
    for i, ip in enumerate(ips):
        if ip.version in seen:
            items[i].problem(f"a service has at most one IPv{ip.version} VIP "
                             f"(vip[{seen[ip.version]}] is {ips[seen[ip.version]]})")
            raise y.Reported()
        seen[ip.version] = i
    return ips


def _target_port(v: y.Value) -> int:
    if isinstance(v.node, ScalarNode) and v.node.tag == "tag:yaml.org,2002:str":
        raise y.Invalid(f"named target ports ({v.node.value!r}) are not supported; "
                        "write the pod's port number")
    return y.port(v)


def _selector(v: y.Value) -> dict[str, str]:
    labels = y.map_of(_label_key, _label_value)(v)
    if not labels:
        raise y.Invalid("a service needs at least one selector label; without one it would "
                        "have no endpoints")
    return labels


def _read_port(item: y.Value) -> ServicePort | None:
    r = item.convert(y.Value.mapping)
    if r is None:
        return None
    before = len(r.doc.problems)
    port = r.get("port", y.port)
    target = r.get("targetPort", _target_port, port)
    name = r.get("name", y.dns_label, None)
    proto = r.get("appProtocol", y.enum(*APP_PROTOCOLS), None)
    r.finish()
    if len(r.doc.problems) != before or port is None:
        return None
    return ServicePort(port, target, name, proto)


def _read_ports(v: y.Value) -> tuple[ServicePort, ...]:
    items = v.items()
    if not items:
        raise y.Invalid("a service needs at least one port")
    before = len(v.doc.problems)
    ports = [_read_port(i) for i in items]
    by_port: dict[int, int] = {}
    by_name: dict[str, int] = {}
    for i, p in enumerate(ports):
        if p is None:
            continue
        r = items[i].mapping()
        if p.port in by_port:
            at = r.at("port")
            assert at is not None
            at.problem(f"port {p.port} is listed twice (first at {items[by_port[p.port]].where})")
        by_port.setdefault(p.port, i)
        if p.name is not None:
            if p.name in by_name:
                at = r.at("name")
                assert at is not None
                at.problem(f"port name {p.name!r} is used twice (first at {items[by_name[p.name]].where})")
            by_name.setdefault(p.name, i)
    if len(v.doc.problems) != before:
        raise y.Reported()
    return tuple(p for p in ports if p is not None)


def _read_service(item: y.Value) -> tuple[Service, y.MapReader] | None:
    r = item.convert(y.Value.mapping)
    if r is None:
        return None
    before = len(r.doc.problems)
    name = r.get("name", y.dns_label)
    namespace = r.get("namespace", y.dns_label, "default")
    vips = r.get("vip", _vips)
    ports = r.get("ports", _read_ports)
    selector = r.get("selector", _selector)
    r.finish()
    if len(r.doc.problems) != before:
        return None
    return Service(name, namespace, vips, ports, MappingProxyType(dict(selector))), r


def read_services(value: y.Value | None) -> tuple[Service, ...]:
    """Read the value of a ``services:`` field (None: absent) into services.

    Problems go to ``value.doc`` (check it afterwards); services with
    problems are left out of the result."""
    if value is None:
        return ()
    items = value.convert(y.Value.items)
    if items is None:
        return ()
    read = [s for s in map(_read_service, items) if s is not None]
    by_key: dict[str, y.MapReader] = {}
    by_vip: dict[tuple[IPAddress, int], tuple[Service, y.MapReader]] = {}
    out = []
    for svc, r in read:
        if svc.key in by_key:
            at = r.at("name")
            assert at is not None
            at.problem(f"service {svc.key!r} is listed twice (first at {by_key[svc.key].value.where})")
            continue
        by_key[svc.key] = r
        for vip in svc.vips:
            for p in svc.ports:
                other = by_vip.get((vip, p.port))
                if other is not None:
                    at = r.at("vip")
                    assert at is not None
                    at.problem(f"{vip}:{p.port} is already served by service {other[0].key!r} "
                               f"({other[1].value.where})")
                else:
                    by_vip[(vip, p.port)] = (svc, r)
        out.append(svc)
    return tuple(out)


def check_against_pods(services: Sequence[Service], pods: Iterable[Pod],
                       value: y.Value | None = None, nodes: Iterable = ()) -> list[str]:
    """Problems that need the pods and nodes: a VIP that is also a pod IP or
    a node address (``nodes``: objects with ``name``, ``address`` and
    ``address6``, as :class:`agent.workloads.inventory.Node`).  Returned as
    messages; when ``value`` (the ``services:`` field ``services`` were read
    from without problems) is given, each is also recorded at its ``vip``."""
    owners: dict[IPAddress, str] = {}
    for n in nodes:
        for a in (n.address, getattr(n, "address6", None)):
            if a is not None:
                owners[a] = f"the address of node {n.name}"
    for p in pods:
        for ip in p.ips:
            owners[ip] = f"the IP of pod {p.key}"
    items = value.items() if value is not None else []
    out = []
    for i, s in enumerate(services):
        for j, vip in enumerate(s.vips):
            owner = owners.get(vip)
            if owner is not None:
                msg = f"VIP {vip} is also {owner}; pick an unused address"
                out.append(f"service {s.key}: {msg}")
                if i < len(items):
                    at = items[i].mapping().at("vip")
                    if at is not None and not isinstance(at.node, ScalarNode):
                        at = at.items()[j]
                    (at or items[i]).problem(msg)
    return out


def parse_services(text: str, filename: str = "<services>",
                   pods: Sequence[Pod] = ()) -> ServiceIndex:
    """A file holding a ``services:`` section (other inventory sections are
    allowed and ignored) into a :class:`ServiceIndex` over ``pods``.
    Raises SourceError listing every problem."""
    doc = y.parse(text, filename)
    top = doc.top()
    value = top.at("services")
    for other in ("nodes", "pods", "namespaces"):
        top.at(other)
    top.finish()
    services = read_services(value)
    if not doc.failed and value is not None:
        check_against_pods(services, pods, value)
    doc.check()
    return ServiceIndex(services, tuple(pods))


def load_services(path: str | os.PathLike[str], pods: Sequence[Pod] = ()) -> ServiceIndex:
    """Read ``path`` with :func:`parse_services`; raises SourceError."""
    p = os.fspath(path)
    return parse_services(y.read_text(p), p, pods)


def services_doc(index: ServiceIndex) -> list[dict]:
    """Every service as published by the agent (proxy state, admin API):
    key, name, namespace, VIPs, selector and, per port, the endpoints in
    every family (one entry per pod address), sorted.  JSON-able."""
    out = []
    for s in index.services:
        ports = []
        for p in s.ports:
            eps = index.endpoints(s, p, family=4) + index.endpoints(s, p, family=6)
            ports.append({
                "port": p.port, "target_port": p.target_port, "name": p.name,
                "app_protocol": p.app_protocol,
                "endpoints": [{"pod": e.pod, "ip": str(e.ip), "port": e.port, "node": e.node}
                              for e in eps],
            })
        out.append({"key": s.key, "name": s.name, "namespace": s.namespace,
                    "vips": [str(v) for v in s.vips], "selector": dict(s.selector),
                    "ports": ports})
    return out
