"""Kubernetes objects to the workload model: pure, no I/O, no clock.

Two steps.  :func:`slim` keeps of each object only what meshlet uses (a
small frozen record with interned strings: a node agent caches every pod of
the cluster, so the full objects, ~10 KB each, would cost hundreds of MB).
:func:`build_inventory` turns the cached records into an
:class:`~agent.workloads.model.Inventory`, with the enrollment rules:

* a pod is enrolled (``mesh``) when its own label
  ``meshlet.io/dataplane-mode`` is ``enabled``, or its namespace carries
  that label and the pod does not say ``disabled``;
* hostNetwork pods and pods not ``Running`` are never enrolled;
* a namespace's mode comes from its label (or, failing that, annotation)
  ``meshlet.io/mode``: ``strict`` or ``permissive``.  Any other value is
  treated as ``strict`` and reported: a typo must not open a namespace up.

Which pods are in the inventory at all: every pod with an IP that is
neither hostNetwork (its IP is the node's) nor finished (Succeeded or
Failed pods' IPs are reused by new pods).  Pods of other nodes are there
for cross-node routing and as service endpoints; only this node's are
given a cgroup path (:mod:`agent.workloads.kubecgroup`).

Services: ClusterIP and NodePort/LoadBalancer services with a selector and
cluster IPs (headless and ExternalName services have no VIP; selector-less
ones no endpoints meshlet can compute).  A named ``targetPort`` is resolved
through the service's EndpointSlices (their ports carry the service port's
name and the resolved number); a port that cannot be resolved yet is left
out and reported.  ``appProtocol``: ``http`` (any case) → L7, ``tcp`` → L4,
absent → detect, anything else (``https``, ``kubernetes.io/h2c``, ``mysql``,
...) → ``opaque`` (L4, never sniffed), as Istio treats protocols it does not
parse.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.workloads.model import (
    Inventory,
    IPAddress,
    NamespaceSettings,
    Node,
    Pod,
    Service,
    ServicePort,
)

__all__ = [
    "DATAPLANE_LABEL",
    "MODE_KEY",
    "PodRec",
    "NodeRec",
    "NamespaceRec",
    "ServiceRec",
    "SliceRec",
    "slim",
    "build_inventory",
    "pod_enrolled",
]

#: Namespace or pod label: ``enabled`` enrolls, on a pod ``disabled`` opts out.
DATAPLANE_LABEL = "meshlet.io/dataplane-mode"
#: Namespace label (or annotation): ``strict`` or ``permissive``.
MODE_KEY = "meshlet.io/mode"

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _i(s: str) -> str:
    return sys.intern(s)


def _labels(d: Mapping | None) -> Mapping[str, str]:
    if not d:
        return _EMPTY
    return MappingProxyType({_i(str(k)): _i(str(v)) for k, v in d.items()})


@dataclass(frozen=True, slots=True)
class PodRec:
    uid: str
    name: str
    namespace: str
    node: str
    service_account: str
    labels: Mapping[str, str]
    phase: str
    ips: tuple[str, ...]
    host_network: bool
    qos: str | None
    rv: str


@dataclass(frozen=True, slots=True)
class NodeRec:
    name: str
    ipv4: str | None
    ipv6: str | None
    rv: str


@dataclass(frozen=True, slots=True)
class NamespaceRec:
    name: str
    dataplane: str | None
    """The ``meshlet.io/dataplane-mode`` label, or None."""
    mode: str | None
    """``meshlet.io/mode`` from the label, else the annotation, or None."""
    rv: str


@dataclass(frozen=True, slots=True)
class ServiceRec:
    name: str
    namespace: str
    type: str
    cluster_ips: tuple[str, ...]
    selector: Mapping[str, str]
    ports: tuple[tuple[str | None, int, int | str, str | None], ...]
    """(name, port, targetPort, appProtocol) per port."""
    rv: str


@dataclass(frozen=True, slots=True)
class SliceRec:
    name: str
    namespace: str
    service: str | None
    """The ``kubernetes.io/service-name`` label."""
    ports: tuple[tuple[str | None, int], ...]
    """(name, port) per port: the resolved target port of that service port name."""
    rv: str


Record = PodRec | NodeRec | NamespaceRec | ServiceRec | SliceRec


def _meta(obj: Mapping) -> Mapping:
    m = obj.get("metadata")
    if not isinstance(m, Mapping) or not m.get("name"):
        raise ValueError("object without metadata.name")
    return m


def slim(kind: str, obj: Mapping) -> Record:
    """The record of a ``kind`` (Pod, Node, Namespace, Service, EndpointSlice)
    object; raises ValueError for an object missing what every object has."""
    m = _meta(obj)
    name, ns, rv = _i(m["name"]), _i(m.get("namespace") or ""), str(m.get("resourceVersion") or "")
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if kind == "Pod":
        ips = tuple(str(a["ip"]) for a in status.get("podIPs") or () if a.get("ip"))
        if not ips and status.get("podIP"):
            ips = (str(status["podIP"]),)
        return PodRec(
            uid=str(m.get("uid") or ""),
            name=name,
            namespace=ns,
            node=_i(spec.get("nodeName") or ""),
            service_account=_i(spec.get("serviceAccountName") or "default"),
            labels=_labels(m.get("labels")),
            phase=_i(status.get("phase") or "Pending"),
            ips=ips,
            host_network=bool(spec.get("hostNetwork")),
            qos=status.get("qosClass"),
            rv=rv,
        )
    if kind == "Node":
        v4 = v6 = None
        for a in status.get("addresses") or ():
            if a.get("type") != "InternalIP":
                continue
            try:
                ip = ipaddress.ip_address(a.get("address"))
            except ValueError:
                continue
            if ip.version == 4 and v4 is None:
                v4 = str(ip)
            elif ip.version == 6 and v6 is None:
                v6 = str(ip)
        return NodeRec(name, v4, v6, rv)
    if kind == "Namespace":
        labels, ann = m.get("labels") or {}, m.get("annotations") or {}
        return NamespaceRec(name, labels.get(DATAPLANE_LABEL), labels.get(MODE_KEY, ann.get(MODE_KEY)), rv)
    if kind == "Service":
        ips = tuple(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
        ports = tuple(
            (p.get("name") or None, int(p["port"]), p.get("targetPort", p["port"]), p.get("appProtocol"))
            for p in spec.get("ports") or ()
            if (p.get("protocol") or "TCP") == "TCP"
        )
        return ServiceRec(
            name, ns, spec.get("type") or "ClusterIP", ips, _labels(spec.get("selector")), ports, rv
        )
    if kind == "EndpointSlice":
        service = (m.get("labels") or {}).get("kubernetes.io/service-name")
        sports = tuple(
            (p.get("name") or None, int(p["port"]))
            for p in obj.get("ports") or ()
            if p.get("port") is not None and (p.get("protocol") or "TCP") == "TCP"
        )
        return SliceRec(name, ns, service, sports, rv)
    raise ValueError(f"unknown kind {kind!r}")


def pod_enrolled(pod: PodRec, ns: NamespaceRec | None) -> bool:
    """The enrollment rules of the module docstring."""
    if pod.host_network or pod.phase != "Running":
        return False
    own = pod.labels.get(DATAPLANE_LABEL)
    if own == "disabled":
        return False
    return own == "enabled" or (ns is not None and ns.dataplane == "enabled")


def _app_protocol(v: str | None) -> str | None:
    if v is None:
        return None
    low = v.lower()
    if low == "http":
        return "http"
    if low == "tcp":
        return "tcp"
    return "opaque"


def _ip(s: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def build_inventory(
    *,
    pods: Iterable[PodRec],
    nodes: Iterable[NodeRec],
    namespaces: Iterable[NamespaceRec],
    services: Iterable[ServiceRec],
    slices: Iterable[SliceRec],
    this_node: str,
    cgroup_of,
) -> tuple[Inventory, list[str]]:
    """The inventory and the notes (objects left out or read as strict, and why).

    ``cgroup_of(pod)`` gives the cgroup directory of a pod on ``this_node``
    (see :mod:`agent.workloads.kubecgroup`)."""
    notes: list[str] = []
    out_nodes = []
    for n in sorted(nodes, key=lambda n: n.name):
        if n.ipv4 is None:
            notes.append(f"node {n.name}: no IPv4 InternalIP; left out (meshlet tunnels to an IPv4 address)")
            continue
        v6 = ipaddress.IPv6Address(n.ipv6) if n.ipv6 else None
        out_nodes.append(Node(n.name, ipaddress.IPv4Address(n.ipv4), v6))

    ns_by_name = {n.name: n for n in namespaces}
    ns_settings: dict[str, NamespaceSettings] = {}
    for nsr in sorted(ns_by_name.values(), key=lambda n: n.name):
        if nsr.mode is None:
            continue
        if nsr.mode in ("strict", "permissive"):
            ns_settings[nsr.name] = NamespaceSettings(mode=nsr.mode)
        else:
            notes.append(
                f"namespace {nsr.name}: {MODE_KEY}={nsr.mode!r} is neither strict nor permissive; "
                "enforcing strict until it is fixed"
            )
            ns_settings[nsr.name] = NamespaceSettings(mode="strict")

    out_pods: list[Pod] = []
    seen_ip: dict[IPAddress, str] = {}
    for p in sorted(pods, key=lambda p: (p.namespace, p.name)):
        if p.host_network or p.phase in ("Succeeded", "Failed") or not p.ips or not p.node:
            continue
        ips: list[IPAddress] = []
        for s in p.ips:
            ip = _ip(s)
            if ip is not None and all(a.version != ip.version for a in ips) and ip not in seen_ip:
                ips.append(ip)
            elif ip is not None and ip in seen_ip:
                notes.append(f"pod {p.namespace}/{p.name}: IP {ip} is also pod {seen_ip[ip]}'s; left out")
        if not ips:
            continue
        key = f"{p.namespace}/{p.name}"
        for ip in ips:
            seen_ip[ip] = key
        local = p.node == this_node
        out_pods.append(
            Pod(
                name=p.name,
                namespace=p.namespace,
                service_account=p.service_account,
                node=p.node,
                ips=tuple(ips),
                cgroup=cgroup_of(p) if local else "",
                mesh=pod_enrolled(p, ns_by_name.get(p.namespace)),
                labels=p.labels,
            )
        )

    # Named target ports, resolved per service through its EndpointSlices.
    named: dict[tuple[str, str], dict[str | None, int]] = {}
    for sl in slices:
        if sl.service is None:
            continue
        d = named.setdefault((sl.namespace, sl.service), {})
        for pname, port in sl.ports:
            d.setdefault(pname, port)
    out_svcs: list[Service] = []
    taken: set[tuple[IPAddress, int]] = set()
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if svc.type == "ExternalName" or not svc.selector:
            continue
        vips: list[IPAddress] = []
        for c in svc.cluster_ips:
            ip = _ip(c)  # "None" (headless) is not an address
            if ip is not None and all(v.version != ip.version for v in vips):
                vips.append(ip)
        if not vips:
            continue
        ports: list[ServicePort] = []
        for pname, port, target, proto in svc.ports:
            if isinstance(target, str) and not target.isdigit():
                number = named.get((svc.namespace, svc.name), {}).get(pname)
                if number is None:
                    notes.append(
                        f"service {svc.namespace}/{svc.name} port {pname or port}: targetPort {target!r} "
                        "is not resolved by an EndpointSlice yet; port left out"
                    )
                    continue
                target = number
            if any((v, port) in taken for v in vips):
                notes.append(f"service {svc.namespace}/{svc.name}: port {port} of its VIP is served twice")
                continue
            ports.append(ServicePort(port, int(target), pname, _app_protocol(proto)))
        if not ports:
            continue
        taken.update((v, p.port) for v in vips for p in ports)
        out_svcs.append(Service(svc.name, svc.namespace, tuple(vips), tuple(ports), svc.selector))
    inv = Inventory(
        nodes=tuple(out_nodes),
        pods=tuple(out_pods),
        namespaces=MappingProxyType(ns_settings),
        services=tuple(out_svcs),
    )
    return inv, notes
