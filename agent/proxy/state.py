"""The proxy state file: parse, validate, watch.

The agent writes the state file atomically (write + rename); the proxy polls
its identity (inode, mtime, size) every 0.5 s and reloads. A broken file is
logged and the previous good state is kept, so the proxy keeps working when
the agent dies or writes garbage. Everything here is pure except
``StateWatcher.check()``/``run()``, which read the file.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.filesig import file_sig
from agent.proxy.tunnel import spiffe_id

__all__ = [
    "StateError",
    "Listen",
    "IdentityConfig",
    "AccessLogConfig",
    "NodeInfo",
    "Pod",
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


def normalize_ip(ip: str) -> str:
    """Canonical text form; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4."""
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


@dataclass(frozen=True)
class AccessLogConfig:
    """The ``access_log`` section: one JSON line per sampled connection."""

    enabled: bool = True
    sampling: float = 1.0  # fraction of connections logged, 0..1
    path: str | None = None  # None: the proxy's --access-log argument


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
    l7: bool = False  # sniff and serve HTTP/1.x with the L7 session on the destination node
    access_log: AccessLogConfig = AccessLogConfig()
    pod_by_key: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}), repr=False)

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
        raise StateError(f"{where}.cert_ttl: must be in [10, 7776000] seconds (as identity.certTTL), got {cert_ttl}")
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
        raise StateError("state.identity: missing (the agent must publish its CA socket and trust domain; "
                         "are the agent and proxy from the same meshlet release?)")
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
        raise StateError(f"state.tunnel_security: must be 'mtls' or 'insecure-plaintext', "
                         f"got {tunnel_security!r}")
    tls_resumption = _get(doc, "tls_resumption", "state", bool, True)
    l7 = _get(doc, "l7", "state", bool, False)
    access_log = _access_log(_get(doc, "access_log", "state", dict, {}))

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
        l7=l7,
        access_log=access_log,
        pod_by_key=MappingProxyType({p.key: p for p in pods}),
    )


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


class StateWatcher:
    """Polls the state file and keeps the last good ``ProxyState``.

    ``current`` is always a valid state (the constructor loads the file and
    raises if it cannot). ``on_change(old, new)`` is called after a reload.
    """

    def __init__(
        self,
        path: str,
        *,
        interval: float = 0.5,
        on_change: Callable[[ProxyState, ProxyState], None] | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self.on_change = on_change
        self.reloads = 0
        self.errors = 0
        self.last_error: str | None = None
        self._sig = self._stat()
        self.current: ProxyState = load_state(path)

    def _stat(self) -> tuple[int, int, int] | None:
        return file_sig(self.path)

    def check(self) -> bool:
        """Reload if the file changed. Returns True if a new state was loaded."""
        sig = self._stat()
        if sig == self._sig:
            return False
        self._sig = sig
        if sig is None:
            self._error(f"state file {self.path} disappeared; keeping generation {self.current.generation}")
            return False
        try:
            new = load_state(self.path)
        except (OSError, StateError) as e:
            self._error(
                f"cannot reload proxy state: {e}; keeping generation {self.current.generation}. "
                "Check that the agent writes the file atomically (write + rename) and is from the same release"
            )
            return False
        old, self.current = self.current, new
        self.reloads += 1
        self.last_error = None
        log.info("loaded proxy state generation %d (was %d)", new.generation, old.generation)
        if self.on_change is not None:
            try:
                self.on_change(old, new)
            except Exception:
                log.exception("state change callback failed")
        return True

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        log.error("%s", msg)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
