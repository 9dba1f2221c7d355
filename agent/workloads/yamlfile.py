"""The YAML inventory file (dev, tests, VMs): text in, a validated
:class:`~agent.workloads.model.Inventory` out.

Pure: :func:`parse_inventory` turns text into an Inventory or raises
:class:`~agent.yamlsrc.SourceError` listing every problem as
``file:line:column: field.path: message``; :func:`load_inventory` only adds
reading the file.  Watching the file for changes is
:class:`agent.workloads.filesource.FileSource`.

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
    services:                          # optional: virtual IPs (below)
      - name: backend
        namespace: shop
        vip: [10.96.0.10, "fd00:96::10"]
        selector: {app: backend}
        ports: [{port: 80, targetPort: 8080, name: http, appProtocol: http}]

Checked across entries: node names are unique, node addresses are unique,
``(namespace, name)`` is unique, no IP belongs to two pods, and every pod's
node exists.  Services: ``namespace/name`` is unique, no ``vip:port`` is
served twice, and a VIP is neither a pod IP nor a node address.
Endpoints are computed from the pods (:attr:`Inventory.service_index`),
never written.

The ``services:`` section alone can be read with :func:`parse_services`
(other sections are allowed and ignored there).  Its shape::

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from types import MappingProxyType

from yaml.nodes import ScalarNode

from agent import labels
from agent import yamlsrc as y
from agent.config import MESH_MODES
from agent.workloads.model import (
    APP_PROTOCOLS,
    Inventory,
    IPAddress,
    NamespaceSettings,
    Node,
    Pod,
    Service,
    ServiceIndex,
    ServicePort,
)

__all__ = [
    "load_inventory",
    "parse_inventory",
    "read_services",
    "parse_services",
    "load_services",
    "check_against_pods",
]


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
# Reading the inventory


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
                _blame(n, "name", f"node {name!r} is listed twice (first at {_where(by_name[name], 'name')})")
            else:
                by_name[name] = n
        for attr in ("address", "address6"):
            a = n[attr]
            if a is None:
                continue
            if a in by_addr:
                other, oattr = by_addr[a]
                _blame(
                    n, attr, f"{a} is already the address of node {other['name']!r} ({_where(other, oattr)})"
                )
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
                here.items()[i].problem(
                    f"{ip} is already used by pod {other_name} ({there.items()[j].where})"
                )
            else:
                by_ip[ip] = (p, i)
        if nodes_ok and p["node"] is not None and p["node"] not in by_name:
            hint = y.did_you_mean(p["node"], by_name)
            _blame(
                p,
                "node",
                f"node {p['node']!r} is not in nodes[]"
                + (
                    f" (did you mean {hint!r}?)" if hint else f"; known nodes: {', '.join(by_name) or 'none'}"
                ),
            )

    before = len(doc.problems)
    services = read_services(svc_val)
    if len(doc.problems) == before and svc_val is not None:
        # Only over services that read cleanly (positions line up with items)
        # and only pods that did (else a VIP clash could be a spurious echo).
        check_against_pods(
            services,
            [Pod(**p.fields) for p in pods if p.ok],
            svc_val,
            [Node(**n.fields) for n in nodes if n.ok],
        )

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
            items[i].problem(
                f"a pod has at most one IPv{ip.version} address "
                f"(ips[{seen[ip.version]}] is {ips[seen[ip.version]]})"
            )
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
        labels=r.get("labels", y.map_of(labels.key, labels.value), {}),
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


# --------------------------------------------------------------------------
# Reading services


def _vip(v: y.Value) -> IPAddress:
    ip = y.ip_address()(v)
    if ip.is_loopback or ip.is_link_local:
        raise y.Invalid(
            f"{ip} is a {'loopback' if ip.is_loopback else 'link-local'} address; "
            "a VIP needs an address no host owns, e.g. from 10.96.0.0/16 or "
            "fd00:96::/112"
        )
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
            items[i].problem(
                f"a service has at most one IPv{ip.version} VIP "
                f"(vip[{seen[ip.version]}] is {ips[seen[ip.version]]})"
            )
            raise y.Reported()
        seen[ip.version] = i
    return ips


def _target_port(v: y.Value) -> int:
    if isinstance(v.node, ScalarNode) and v.node.tag == "tag:yaml.org,2002:str":
        raise y.Invalid(
            f"named target ports ({v.node.value!r}) are not supported; write the pod's port number"
        )
    return y.port(v)


def _selector(v: y.Value) -> dict[str, str]:
    selected = y.map_of(labels.key, labels.value)(v)
    if not selected:
        raise y.Invalid("a service needs at least one selector label; without one it would have no endpoints")
    return selected


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
                    at.problem(
                        f"{vip}:{p.port} is already served by service {other[0].key!r} "
                        f"({other[1].value.where})"
                    )
                else:
                    by_vip[(vip, p.port)] = (svc, r)
        out.append(svc)
    return tuple(out)


def check_against_pods(
    services: Sequence[Service], pods: Iterable[Pod], value: y.Value | None = None, nodes: Iterable = ()
) -> list[str]:
    """Problems that need the pods and nodes: a VIP that is also a pod IP or
    a node address (``nodes``: objects with ``name``, ``address`` and
    ``address6``, as :class:`agent.workloads.model.Node`).  Returned as
    messages; when ``value`` (the ``services:`` field ``services`` were read
    from without problems) is given, each is also recorded at its ``vip``."""
    owners: dict[IPAddress, str] = {}
    for n in nodes:
        for a in (n.address, n.address6):
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


def parse_services(text: str, filename: str = "<services>", pods: Sequence[Pod] = ()) -> ServiceIndex:
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
