"""The proxy state file: parse, validate, watch.

The agent writes the state file atomically (write + rename); the proxy polls
its identity (inode, mtime, size) every 0.5 s and reloads. A broken file is
logged and the previous good state is kept, so the proxy keeps working when
the agent dies or writes garbage. Everything here is pure except
``StateWatcher.check()``/``run()``, which read the file.

Services (``services``, optional): each with its VIPs and ports, and per
port the endpoints the agent computed from the pods' labels (pod key,
address, target port, node).  They are checked against ``pods`` (an
endpoint names a known pod, one of its addresses and its node) and indexed
by ``(vip, port)`` in :attr:`ProxyState.service_by_vip`, VIPs normalized
like pod IPs (IPv4-mapped IPv6 is the IPv4 address).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.proxy.tunnel import spiffe_id
from agent.proxy.watch import FileWatcher  # the generic poll/reload loop

__all__ = [
    "StateError",
    "Listen",
    "IdentityConfig",
    "AccessLogConfig",
    "TracingConfig",
    "NodeInfo",
    "Pod",
    "Service",
    "ServicePort",
    "ServiceEndpoint",
    "APP_PROTOCOLS",
    "ProxyState",
    "parse_state",
    "load_state",
    "StateWatcher",
    "normalize_ip",
]

log = logging.getLogger("meshlet.proxy.state")

SUPPORTED_VERSION = 1


class StateError(ValueError):
    """The state document is invalid. The message names the field."""


@functools.lru_cache(maxsize=1024)
def normalize_ip(ip: str) -> str:
    """Canonical text form; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4.

    Cached: each new connection asks several times for the same few pod and
    node addresses (~2 us a parse; issue #13).  Invalid input raises
    ValueError every time (exceptions are not cached)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True)
class Listen:
    ipv4: str | None  # address for the IPv4 listeners (None: no IPv4 listeners)
    ipv6: str | None  # address for the IPv6 (V6ONLY) listeners (None: none)
    outbound_port: int
    tunnel_port: int


@dataclass(frozen=True)
class IdentityConfig:
    """Where the proxy gets its workloads' certificates (the ``identity`` section)."""

    trust_domain: str
    ca_socket: str  # the agent's CA (Unix stream socket: one JSON line each way)
    generation: int  # changes when the node's CA material or trust bundle changed
    cert_ttl: int  # seconds; what the agent issues (informational for the proxy)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str | None
    address6: str | None

    def address_for(self, family_v6: bool) -> str | None:
        """Tunnel address of this node, preferring the given family."""
        if family_v6:
            return self.address6 or self.address
        return self.address or self.address6


@dataclass(frozen=True)
class Pod:
    key: str  # "<namespace>/<name>"
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]  # normalized
    cgroup_id: int | None
    mesh: bool
    app: str | None = None  # the pod's ``app`` label
    labels: tuple[tuple[str, str], ...] = ()  # every label, sorted (policy selectors match them)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def workload(self) -> str:
        """The metrics' workload label: the ``app`` label, else the pod name."""
        return self.app or self.name


#: ``ports[].app_protocol`` values; None means "detect" (sniff the first bytes).
APP_PROTOCOLS = ("http", "tcp", "opaque")


@dataclass(frozen=True, order=True)
class ServiceEndpoint:
    """One address a service port's traffic may go to."""

    pod: str  # pod key "<namespace>/<name>" (in ProxyState.pod_by_key)
    ip: str  # normalized; one of the pod's ips
    port: int  # the port's target port
    node: str  # the pod's node

    @property
    def v6(self) -> bool:
        return ":" in self.ip


@dataclass(frozen=True)
class ServicePort:
    port: int  # dialed on the VIP
    target_port: int  # on the endpoint pods
    name: str | None = None
    app_protocol: str | None = None  # an APP_PROTOCOLS value, or None: detect
    endpoints: tuple[ServiceEndpoint, ...] = ()  # every family, sorted


@dataclass(frozen=True)
class Service:
    key: str  # "<namespace>/<name>"
    name: str
    namespace: str
    vips: tuple[str, ...]  # normalized, at most one per family
    ports: tuple[ServicePort, ...]

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True)
class AccessLogConfig:
    """The ``access_log`` section: one JSON line per sampled connection."""

    enabled: bool = True
    sampling: float = 1.0  # fraction of connections logged, 0..1
    path: str | None = None  # None: the proxy's --access-log argument


@dataclass(frozen=True)
class TracingConfig:
    """The ``tracing`` section: span export (``agent.proxy.spans``); no
    endpoint, no spans."""

    otlp_endpoint: str | None = None
    sample_rate: float = 0.0  # new traces sampled, 0..1 (the agent's default is config.py's)
    max_queue: int = 2048
    max_batch: int = 512
    export_timeout: float = 5.0
    export_interval: float = 1.0
    service_instance: str = ""  # the node name, in the spans' resource


@dataclass(frozen=True)
class ProxyState:
    version: int
    generation: int
    node: str
    trust_domain: str
    pin_dir: str
    listen: Listen
    connect_timeout: float
    mesh_mark: int
    buffer_size: int
    identity_config: IdentityConfig | None  # required in state files (see load_state)
    # "mtls" (always, in production) or "insecure-plaintext" (benchmarks only)
    nodes: Mapping[str, NodeInfo]
    pods: tuple[Pod, ...]
    pod_by_ip: Mapping[str, Pod] = field(repr=False)
    # Only enrolled (mesh) pods on THIS node: cgroup ids are node-local.
    pod_by_cgroup: Mapping[int, Pod] = field(repr=False)
    # "mtls" (always, in production) or "insecure-plaintext" (benchmarks only)
    tunnel_security: str = "mtls"
    tls_resumption: bool = True
    splice: bool = False  # proxy.splice: same-node L4 relays spliced in the kernel where pinned
    tunnel_mux: bool = True  # proxy.tunnelMux: offer meshlet-mux/1 (pooled, multiplexed tunnel)
    path_parameters: str = "reject"  # proxy.pathParameters: reject, strip or keep (agent.policy.http)
    l7: bool | str = (
        False  # True / "auto" / False: where the destination node serves HTTP/1.x with L7 (config.py)
    )
    access_log: AccessLogConfig = AccessLogConfig()
    tracing: TracingConfig = TracingConfig()
    pod_by_key: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    services: tuple[Service, ...] = ()
    # (normalized VIP, port) -> the service and the port dialed
    service_by_vip: Mapping[tuple[str, int], tuple[Service, ServicePort]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    service_by_key: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    # normalized VIP -> the services on it (several may share one VIP on different ports)
    service_by_ip: Mapping[str, tuple[Service, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )

    def service_at(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """The service and port a connection to ``ip:port`` is for (any text
        form of the VIP, IPv4-mapped included), or None."""
        try:
            return self.service_by_vip.get((normalize_ip(ip), port))
        except ValueError:
            return None

    def identity(self, pod: Pod) -> str:
        return spiffe_id(self.trust_domain, pod.namespace, pod.service_account)

    @property
    def this_node(self) -> NodeInfo | None:
        return self.nodes.get(self.node)

    @property
    def local_identities(self) -> frozenset[str]:
        """SPIFFE IDs of the enrolled pods on this node: the certificates it needs."""
        return frozenset(self.identity(p) for p in self.pods if p.mesh and p.node == self.node)


# ------------------------------------------------------------------ parsing


def _get(d: Mapping[str, Any], key: str, where: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise StateError(f"{where}.{key}: missing")
        return default
    v = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(v, bool) and bool not in types:
        raise StateError(f"{where}.{key}: expected {_tname(typ)}, got a boolean")
    if not isinstance(v, typ):
        raise StateError(f"{where}.{key}: expected {_tname(typ)}, got {type(v).__name__}")
    return v


def _tname(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def _ip(v: Any, where: str, *, v6: bool | None = None) -> str:
    if not isinstance(v, str):
        raise StateError(f"{where}: expected an IP address string, got {type(v).__name__}")
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise StateError(f"{where}: not an IP address: {v!r}") from None
    if v6 is not None and (addr.version == 6) != v6:
        raise StateError(f"{where}: expected an IPv{6 if v6 else 4} address, got {v!r}")
    return normalize_ip(v) if v6 is None else str(addr)


def _port(v: int, where: str) -> int:
    if not 1 <= v <= 65535:
        raise StateError(f"{where}: port out of range: {v}")
    return v


_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")


def _trust_domain(v: str, where: str) -> str:
    if not v or len(v) > 255 or not set(v) <= _TRUST_DOMAIN_CHARS:
        raise StateError(f"{where}: invalid trust domain {v!r} (lowercase a-z 0-9 '.' '-' '_', at most 255)")
    return v


def _identity(d: Any, top_td: str | None) -> IdentityConfig:
    where = "state.identity"
    if not isinstance(d, dict):
        raise StateError(f"{where}: expected an object, got {type(d).__name__}")
    td = _trust_domain(_get(d, "trust_domain", where, str), f"{where}.trust_domain")
    if top_td is not None and td != top_td:
        raise StateError(f"{where}.trust_domain: {td!r} differs from state.trust_domain {top_td!r}")
    ca_socket = _get(d, "ca_socket", where, str)
    if not ca_socket.startswith("/"):
        raise StateError(f"{where}.ca_socket: must be an absolute path, got {ca_socket!r}")
    if len(os.fsencode(ca_socket)) >= 108:
        raise StateError(f"{where}.ca_socket: path too long for a Unix socket ({ca_socket!r})")
    generation = _get(d, "generation", where, int)
    if generation < 0:
        raise StateError(f"{where}.generation: must be >= 0, got {generation}")
    cert_ttl = _get(d, "cert_ttl", where, int)
    if not 10 <= cert_ttl <= 90 * 86400:
        raise StateError(
            f"{where}.cert_ttl: must be in [10, 7776000] seconds (as identity.certTTL), got {cert_ttl}"
        )
    return IdentityConfig(trust_domain=td, ca_socket=ca_socket, generation=generation, cert_ttl=cert_ttl)


def parse_state(doc: Any, *, require_identity: bool = True) -> ProxyState:
    """Validate a decoded JSON document and build the immutable state.

    The ``identity`` section is required: the proxy never tunnels without
    mutual TLS.
    """
    if not isinstance(doc, dict):
        raise StateError("state: expected a JSON object at top level")
    version = _get(doc, "version", "state", int)
    if version != SUPPORTED_VERSION:
        raise StateError(
            f"state.version: {version} is not supported (this proxy reads version {SUPPORTED_VERSION}); "
            "are the agent and proxy from the same meshlet release?"
        )
    generation = _get(doc, "generation", "state", int)
    node = _get(doc, "node", "state", str)
    top_td = _get(doc, "trust_domain", "state", str, None)
    if top_td is not None:
        _trust_domain(top_td, "state.trust_domain")
    identity_config: IdentityConfig | None = None
    if "identity" in doc:
        identity_config = _identity(doc["identity"], top_td)
    elif require_identity:
        raise StateError(
            "state.identity: missing (the agent must publish its CA socket and trust domain; "
            "are the agent and proxy from the same meshlet release?)"
        )
    trust_domain = identity_config.trust_domain if identity_config else top_td
    if trust_domain is None:
        raise StateError("state.trust_domain: missing")
    pin_dir = _get(doc, "pin_dir", "state", str, "")

    ld = _get(doc, "listen", "state", dict)
    ipv4 = ld.get("ipv4")
    ipv6 = ld.get("ipv6")
    listen = Listen(
        ipv4=_ip(ipv4, "state.listen.ipv4", v6=False) if ipv4 else None,
        ipv6=_ip(ipv6, "state.listen.ipv6", v6=True) if ipv6 else None,
        outbound_port=_port(_get(ld, "outbound_port", "state.listen", int), "state.listen.outbound_port"),
        tunnel_port=_port(_get(ld, "tunnel_port", "state.listen", int), "state.listen.tunnel_port"),
    )
    if listen.ipv4 is None and listen.ipv6 is None:
        raise StateError("state.listen: neither ipv4 nor ipv6 is set; the proxy would listen nowhere")

    connect_timeout = float(_get(doc, "connect_timeout", "state", (int, float), 5.0))
    if not 0 < connect_timeout <= 300:
        raise StateError(f"state.connect_timeout: must be in (0, 300] seconds, got {connect_timeout}")
    mesh_mark = _get(doc, "mesh_mark", "state", int, 0)
    if not 0 <= mesh_mark <= 0xFFFFFFFF:
        raise StateError(f"state.mesh_mark: must be a 32-bit unsigned integer, got {mesh_mark}")
    buffer_size = _get(doc, "buffer_size", "state", int, 262144)
    if not 4096 <= buffer_size <= 64 * 1024 * 1024:
        raise StateError(f"state.buffer_size: must be in [4096, 64 MiB], got {buffer_size}")

    tunnel_security = _get(doc, "tunnel_security", "state", str, "mtls")
    if tunnel_security not in ("mtls", "insecure-plaintext"):
        raise StateError(
            f"state.tunnel_security: must be 'mtls' or 'insecure-plaintext', got {tunnel_security!r}"
        )
    tls_resumption = _get(doc, "tls_resumption", "state", bool, True)
    splice = _get(doc, "splice", "state", bool, False)
    tunnel_mux = _get(doc, "tunnel_mux", "state", bool, True)
    path_parameters = _get(doc, "path_parameters", "state", str, "reject")
    if path_parameters not in ("reject", "strip", "keep"):
        raise StateError(
            f"state.path_parameters: must be 'reject', 'strip' or 'keep', got {path_parameters!r}"
        )
    l7 = _get(doc, "l7", "state", (bool, str), False)
    if isinstance(l7, str) and l7 != "auto":
        raise StateError(f"state.l7: {l7!r} is not true, false or 'auto'")
    access_log = _access_log(_get(doc, "access_log", "state", dict, {}))
    tracing = _tracing(_get(doc, "tracing", "state", dict, {}))

    nodes: dict[str, NodeInfo] = {}
    for name, nd in _get(doc, "nodes", "state", dict).items():
        where = f"state.nodes[{name!r}]"
        if not isinstance(nd, dict):
            raise StateError(f"{where}: expected an object")
        a4, a6 = nd.get("address"), nd.get("address6")
        nodes[name] = NodeInfo(
            name=name,
            address=_ip(a4, f"{where}.address", v6=False) if a4 else None,
            address6=_ip(a6, f"{where}.address6", v6=True) if a6 else None,
        )

    pods: list[Pod] = []
    by_ip: dict[str, Pod] = {}
    by_cg: dict[int, Pod] = {}
    keys: set[str] = set()
    for i, pd in enumerate(_get(doc, "pods", "state", list)):
        where = f"state.pods[{i}]"
        if not isinstance(pd, dict):
            raise StateError(f"{where}: expected an object")
        name = _get(pd, "name", where, str)
        namespace = _get(pd, "namespace", where, str)
        if "/" in namespace or not namespace or not name:
            raise StateError(f"{where}: invalid namespace/name {namespace!r}/{name!r}")
        key = _get(pd, "key", where, str, f"{namespace}/{name}")
        if key in keys:
            raise StateError(f"{where}.key: duplicate pod {key!r}")
        keys.add(key)
        ips_raw = _get(pd, "ips", where, list)
        cgroup_id = _get(pd, "cgroup_id", where, (int, type(None)), None)
        pod = Pod(
            key=key,
            name=name,
            namespace=namespace,
            service_account=_get(pd, "service_account", where, str, "default"),
            node=_get(pd, "node", where, str),
            ips=tuple(_ip(ip, f"{where}.ips[{j}]") for j, ip in enumerate(ips_raw)),
            cgroup_id=cgroup_id,
            mesh=_get(pd, "mesh", where, bool, True),
            app=_app_label(_get(pd, "labels", where, dict, {}), f"{where}.labels"),
            labels=tuple(sorted(_get(pd, "labels", where, dict, {}).items())),
        )
        for ip in pod.ips:
            other = by_ip.get(ip)
            if other is not None:
                raise StateError(f"{where}.ips: {ip} is also the address of pod {other.key}")
            by_ip[ip] = pod
        if pod.node == node and pod.mesh and cgroup_id is not None:
            other = by_cg.get(cgroup_id)
            if other is not None:
                raise StateError(f"{where}.cgroup_id: {cgroup_id} is also the cgroup of pod {other.key}")
            by_cg[cgroup_id] = pod
        pods.append(pod)

    pod_by_key = {p.key: p for p in pods}
    services, by_vip = _services(_get(doc, "services", "state", list, []), pod_by_key, by_ip)

    return ProxyState(
        version=version,
        generation=generation,
        node=node,
        trust_domain=trust_domain,
        pin_dir=pin_dir,
        listen=listen,
        connect_timeout=connect_timeout,
        mesh_mark=mesh_mark,
        buffer_size=buffer_size,
        identity_config=identity_config,
        nodes=MappingProxyType(nodes),
        pods=tuple(pods),
        pod_by_ip=MappingProxyType(by_ip),
        pod_by_cgroup=MappingProxyType(by_cg),
        tunnel_security=tunnel_security,
        tls_resumption=tls_resumption,
        splice=splice,
        tunnel_mux=tunnel_mux,
        path_parameters=path_parameters,
        l7=l7,
        access_log=access_log,
        tracing=tracing,
        pod_by_key=MappingProxyType(pod_by_key),
        services=services,
        service_by_vip=MappingProxyType(by_vip),
        service_by_key=MappingProxyType({s.key: s for s in services}),
        service_by_ip=MappingProxyType(_by_ip(services)),
    )


def _services(
    items: list,
    pods: Mapping[str, Pod],
    pod_by_ip: Mapping[str, Pod],
) -> tuple[tuple[Service, ...], dict[tuple[str, int], tuple[Service, ServicePort]]]:
    out: list[Service] = []
    keys: set[str] = set()
    by_vip: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
    for i, sd in enumerate(items):
        where = f"state.services[{i}]"
        if not isinstance(sd, dict):
            raise StateError(f"{where}: expected an object")
        name = _get(sd, "name", where, str)
        namespace = _get(sd, "namespace", where, str)
        if "/" in namespace or "/" in name or not namespace or not name:
            raise StateError(f"{where}: invalid namespace/name {namespace!r}/{name!r}")
        key = _get(sd, "key", where, str, f"{namespace}/{name}")
        if key != f"{namespace}/{name}":
            raise StateError(f"{where}.key: {key!r} is not {namespace}/{name}")
        if key in keys:
            raise StateError(f"{where}.key: duplicate service {key!r}")
        keys.add(key)
        vips_raw = _get(sd, "vips", where, list)
        if not 1 <= len(vips_raw) <= 2:
            raise StateError(f"{where}.vips: expected 1 or 2 addresses, got {len(vips_raw)}")
        vips = tuple(_ip(v, f"{where}.vips[{j}]") for j, v in enumerate(vips_raw))
        if len({":" in v for v in vips}) != len(vips):
            raise StateError(f"{where}.vips: at most one address per family, got {list(vips)}")
        for j, v in enumerate(vips):
            if v in pod_by_ip:
                raise StateError(f"{where}.vips[{j}]: {v} is also the address of pod {pod_by_ip[v].key}")
        ports_raw = _get(sd, "ports", where, list)
        if not ports_raw:
            raise StateError(f"{where}.ports: a service needs at least one port")
        ports: list[ServicePort] = []
        for j, pd in enumerate(ports_raw):
            pw = f"{where}.ports[{j}]"
            if not isinstance(pd, dict):
                raise StateError(f"{pw}: expected an object")
            number = _port(_get(pd, "port", pw, int), f"{pw}.port")
            if any(p.port == number for p in ports):
                raise StateError(f"{pw}.port: port {number} is listed twice")
            target = _port(_get(pd, "target_port", pw, int, number), f"{pw}.target_port")
            proto = _get(pd, "app_protocol", pw, (str, type(None)), None)
            if proto is not None and proto not in APP_PROTOCOLS:
                raise StateError(
                    f"{pw}.app_protocol: {proto!r} is not one of {', '.join(APP_PROTOCOLS)} (or null: detect)"
                )
            eps = tuple(
                sorted(
                    _endpoint(e, f"{pw}.endpoints[{k}]", target, pods)
                    for k, e in enumerate(_get(pd, "endpoints", pw, list, []))
                )
            )
            if len(set(eps)) != len(eps):
                raise StateError(f"{pw}.endpoints: an endpoint is listed twice")
            ports.append(
                ServicePort(number, target, _get(pd, "name", pw, (str, type(None)), None), proto, eps)
            )
        svc = Service(key, name, namespace, vips, tuple(ports))
        for v in vips:
            for p in svc.ports:
                other = by_vip.get((v, p.port))
                if other is not None:
                    raise StateError(f"{where}: {v}:{p.port} is already served by service {other[0].key}")
                by_vip[(v, p.port)] = (svc, p)
        out.append(svc)
    return tuple(out), by_vip


def _by_ip(services: tuple[Service, ...]) -> dict[str, tuple[Service, ...]]:
    out: dict[str, tuple[Service, ...]] = {}
    for s in services:
        for v in s.vips:
            out[v] = out.get(v, ()) + (s,)
    return out


def _endpoint(d: Any, where: str, target_port: int, pods: Mapping[str, Pod]) -> ServiceEndpoint:
    if not isinstance(d, dict):
        raise StateError(f"{where}: expected an object")
    key = _get(d, "pod", where, str)
    pod = pods.get(key)
    if pod is None:
        raise StateError(f"{where}.pod: {key!r} is not in state.pods")
    ip = _ip(_get(d, "ip", where, str), f"{where}.ip")
    if ip not in pod.ips:
        raise StateError(f"{where}.ip: {ip} is not an address of pod {key} ({', '.join(pod.ips) or 'none'})")
    port = _port(_get(d, "port", where, int), f"{where}.port")
    if port != target_port:
        raise StateError(f"{where}.port: {port} differs from the port's target_port {target_port}")
    node = _get(d, "node", where, str, pod.node)
    if node != pod.node:
        raise StateError(f"{where}.node: {node!r} but pod {key} is on {pod.node!r}")
    return ServiceEndpoint(key, ip, port, node)


def _app_label(labels: dict, where: str) -> str | None:
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise StateError(f"{where}: labels must map strings to strings, got {k!r}: {v!r}")
    return labels.get("app") or None


def _access_log(d: dict) -> AccessLogConfig:
    where = "state.access_log"
    enabled = _get(d, "enabled", where, bool, True)
    sampling = float(_get(d, "sampling", where, (int, float), 1.0))
    if not 0.0 <= sampling <= 1.0:
        raise StateError(f"{where}.sampling: must be in [0, 1], got {sampling}")
    path = _get(d, "path", where, (str, type(None)), None)
    if path is not None and not path.startswith("/"):
        raise StateError(f"{where}.path: must be an absolute path, got {path!r}")
    return AccessLogConfig(enabled=enabled, sampling=sampling, path=path)


def _tracing(d: dict) -> TracingConfig:
    where = "state.tracing"
    endpoint = _get(d, "otlp_endpoint", where, (str, type(None)), None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise StateError(f"{where}.otlp_endpoint: must be an http(s) URL, got {endpoint!r}")
    rate = float(_get(d, "sample_rate", where, (int, float), 0.0))
    if not 0.0 <= rate <= 1.0:
        raise StateError(f"{where}.sample_rate: must be in [0, 1], got {rate}")
    sizes: dict[str, int] = {}
    for key, lo, default in (("max_queue", 1, 2048), ("max_batch", 1, 512)):
        n = _get(d, key, where, int, default)
        if isinstance(n, bool) or n < lo:
            raise StateError(f"{where}.{key}: must be an integer >= {lo}, got {n!r}")
        sizes[key] = n
    times: dict[str, float] = {}
    for name, secs in (("export_timeout", 5.0), ("export_interval", 1.0)):
        x = float(_get(d, name, where, (int, float), secs))
        if not 0.0 < x <= 3600.0:
            raise StateError(f"{where}.{name}: must be in (0, 3600] seconds, got {x}")
        times[name] = x
    return TracingConfig(
        otlp_endpoint=endpoint,
        sample_rate=rate,
        max_queue=sizes["max_queue"],
        max_batch=sizes["max_batch"],
        export_timeout=times["export_timeout"],
        export_interval=times["export_interval"],
        service_instance=_get(d, "service_instance", where, str, ""),
    )


def load_state(path: str) -> ProxyState:
    """Read and parse the state file. Raises StateError (or OSError)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise StateError(f"{path}: not valid JSON: {e}") from None
    try:
        return parse_state(doc, require_identity=True)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None


# ------------------------------------------------------------------ watching


def _describe_state(s: ProxyState) -> str:
    return f"generation {s.generation}"


class StateWatcher(FileWatcher[ProxyState]):
    """Polls the state file and keeps the last good ``ProxyState``
    (agent/proxy/watch.py).

    ``current`` is always a valid state (the constructor loads the file and
    raises if it cannot). ``on_change(old, new)`` is called after a reload.
    A vanished file is an error; the last good state stays.
    """

    current: ProxyState

    def __init__(
        self,
        path: str,
        *,
        interval: float = 0.5,
        on_change: Callable[[ProxyState, ProxyState], None] | None = None,
    ) -> None:
        super().__init__(
            path,
            load_state,
            None,  # type: ignore[arg-type]  # no state until prime() below loads the file
            what="proxy state",
            errors=(OSError, StateError),
            describe=_describe_state,
            on_change=on_change,
            interval=interval,
            logger=log,
            hint=(
                "Check that the agent writes the file atomically (write + rename) "
                "and is from the same release"
            ),
        )
        self.prime()
