"""Where an outbound connection goes. Pure: state + kernel record + peer in,
decision out. The server turns decisions into sockets.

Rules, in order:

1. The source is identified by the kernel's record (the cgroup id of the
   process that called connect()). No enrolled pod on this node with that
   cgroup id → Reject.
2. The accepted socket's peer address must be one of that pod's IPs: the
   kernel record and the address must agree → otherwise Reject.
3. A destination that is the proxy itself (one of its listen ports on this
   node's address, a wildcard or loopback) → Reject, to avoid loops.
4. Destination is a service VIP (``ProxyState.service_by_vip``) → a
   ServiceRoute naming the service, the port dialed and its endpoints (the
   pods with an address in the VIP's family).  The VIP on a port the service
   does not declare → Reject (``no_service_port``): a VIP is on no
   interface, so passing it through could only fail later and less clearly.
   The caller picks an endpoint (load balancing is not routing) and asks
   :func:`endpoint_route` where that pod is.
5. Destination IP is a mesh pod on this node → Local (connect straight to it);
   on another node → Tunnel to that node's tunnel port; not a mesh pod →
   Passthrough (connect to the original destination as-is).

:func:`endpoint_route` is rule 5 for a chosen pod, after the same checks as
rules 3-4 on its address: exactly what :func:`route` returns for a direct
connection from the same source to that pod and port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from agent.proxy.state import Pod, ProxyState, normalize_ip
from agent.proxy.tunnel import AF_INET, AF_INET6

__all__ = [
    "Origin",
    "Local",
    "Tunnel",
    "Passthrough",
    "Reject",
    "ServiceRoute",
    "Decision",
    "route",
    "endpoint_route",
    "service_route",
]


class Origin(Protocol):
    """What ``agent.datapath.origdst.FlowOrigin`` provides."""

    family: int
    dst_ip: str
    dst_port: int
    cgroup_id: int


@dataclass(frozen=True)
class Local:
    src: Pod
    pod: Pod  # destination pod (on this node)
    addr: tuple[str, int]


@dataclass(frozen=True)
class Tunnel:
    src: Pod
    pod: Pod  # destination pod (on `node`)
    dst: tuple[str, int]  # original destination, sent in the tunnel header
    node: str
    node_addr: str
    tunnel_port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.node_addr, self.tunnel_port)


@dataclass(frozen=True)
class Passthrough:
    src: Pod
    addr: tuple[str, int]


@dataclass(frozen=True)
class Reject:
    reason: str
    src: Pod | None = None
    code: str = "unknown_source"  # a metrics.DENY_REASONS value


@dataclass(frozen=True)
class ServiceRoute:
    """A connection to a service VIP: balance it over ``endpoints``.

    Not a place to connect to: pick an endpoint, then :func:`endpoint_route`
    (state, src, pod, target_port, ip=addr_of(pod)[0], family=family) says
    where it is (Local, Tunnel, or Passthrough for a non-mesh pod).  An
    empty ``endpoints`` means no pod matches the selector in this family:
    the caller refuses the connection (L4) or answers 503 (L7).
    """

    src: Pod
    service: str  # "<namespace>/<name>"
    name: str
    namespace: str
    port: int  # the service port dialed
    app_protocol: str | None  # None (detect), "http", "tcp" or "opaque"
    vip: tuple[str, int]  # the original destination, normalized
    endpoints: tuple[Pod, ...]  # pods with an address in the VIP's family, by key
    target_port: int  # the port on every endpoint
    family: int = AF_INET  # the client socket's family (picks tunnel addresses)
    port_name: str | None = None
    addrs: tuple[str, ...] = ()  # endpoints[i]'s address in the VIP's family

    @property
    def cluster(self) -> str:
        """``namespace/name:port``: the upstream name in stats and logs."""
        return f"{self.service}:{self.port}"

    @cached_property
    def _addr_by_key(self) -> dict[str, str]:
        return {p.key: ip for p, ip in zip(self.endpoints, self.addrs, strict=False)}

    def addr_of(self, pod: Pod) -> tuple[str, int]:
        """(address, target port) to dial for ``pod``, one of ``endpoints``."""
        ip = self._addr_by_key.get(pod.key)
        if ip is None:
            raise KeyError(f"{pod.key} is not an endpoint of {self.cluster}")
        return (ip, self.target_port)


Decision = Local | Tunnel | Passthrough | Reject | ServiceRoute


def _is_self(state: ProxyState, ip: str, port: int) -> bool:
    lst = state.listen
    if port not in (lst.outbound_port, lst.tunnel_port):
        return False
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback or addr.is_unspecified:
        return True
    mine = {lst.ipv4, lst.ipv6}
    me = state.this_node
    if me is not None:
        mine |= {me.address, me.address6}
    mine.discard(None)
    return ip in {normalize_ip(a) for a in mine if a}


def _is_node_address(state: ProxyState, ip: str) -> bool:
    return any(ip in {normalize_ip(a) for a in (n.address, n.address6) if a} for n in state.nodes.values())


def tunnel_peer_allowed(state: ProxyState, peer_ip: str) -> bool:
    """Until the tunnel is mutually authenticated (mTLS, issue #3), the
    inbound side accepts tunnels only from the address of a mesh node."""
    try:
        return _is_node_address(state, normalize_ip(peer_ip))
    except ValueError:
        return False


def route(state: ProxyState, origin: Origin, peer: tuple) -> Decision:
    """Decide what to do with an accepted outbound connection.

    ``peer`` is getpeername() of the accepted socket (IPv4-mapped IPv6 is
    treated as IPv4).
    """
    src = state.pod_by_cgroup.get(origin.cgroup_id)
    if src is None:
        return Reject(
            f"unknown source cgroup {origin.cgroup_id}: no enrolled pod on node {state.node} has it "
            "(stale flow record, or the agent has not published this pod yet)"
        )
    try:
        peer_ip = normalize_ip(str(peer[0]))
        dst_ip = normalize_ip(origin.dst_ip)
    except (ValueError, IndexError, TypeError):
        return Reject(f"unparsable address (peer {peer!r}, destination {origin.dst_ip!r})", src)
    if peer_ip not in src.ips:
        return Reject(
            f"peer address {peer_ip} is not an address of pod {src.key} ({', '.join(src.ips) or 'none'}): "
            "the kernel's cgroup record and the connection's address disagree",
            src,
        )
    port = int(origin.dst_port)
    pre = _check_destination(state, src, dst_ip, port)
    if pre is not None:
        return pre
    svc = state.service_by_vip.get((dst_ip, port))
    if svc is not None:
        return _service_route(state, src, svc[0], svc[1], dst_ip, port, origin.family)
    owners = state.service_by_ip.get(dst_ip)
    if owners:
        known = ", ".join(f"{p.port} ({s.key})" for s in owners for p in s.ports)
        return Reject(
            f"{dst_ip} is a service VIP, but no service has port {port} on it (ports: {known})",
            src,
            "no_service_port",
        )
    return _to_address(state, src, state.pod_by_ip.get(dst_ip), dst_ip, port, origin.family)


def endpoint_route(
    state: ProxyState,
    src: Pod | None,
    pod: Pod,
    port: int,
    *,
    ip: str | None = None,
    family: int | None = None,
) -> Decision:
    """Where a connection from ``src`` to ``pod``:``port`` goes: Local, Tunnel,
    Passthrough (a non-mesh pod) or Reject, exactly as :func:`route` decides
    for a connection that dialed that address directly.

    ``ip`` is the pod's address to use (default: its IPv4 address if it has
    one, else its first); it must be one of ``pod.ips``.  ``family`` is the
    client socket's family (``AF_INET``/``AF_INET6``, default from
    ``ip``): as in route(), an IPv6 socket prefers the destination node's
    IPv6 tunnel address.  ``src`` is carried into the decision unchanged.
    """
    if ip is None:
        if not pod.ips:
            return Reject(f"pod {pod.key} has no address", src, "no_route")
        ip = next((a for a in pod.ips if ":" not in a), pod.ips[0])
    try:
        ip = normalize_ip(ip)
    except ValueError:
        return Reject(f"unparsable endpoint address {ip!r} for pod {pod.key}", src, "no_route")
    if ip not in pod.ips:
        return Reject(
            f"{ip} is not an address of pod {pod.key} ({', '.join(pod.ips) or 'none'})", src, "no_route"
        )
    if family is None:
        family = AF_INET6 if ":" in ip else AF_INET
    # src may be None (a caller without a client pod): carried into the decision as is
    pre = _check_destination(state, src, ip, port)  # type: ignore[arg-type]
    if pre is not None:
        return pre
    # src may be None here too, as above
    return _to_address(state, src, pod, ip, port, family)  # type: ignore[arg-type]


def _check_destination(state: ProxyState, src: Pod, dst_ip: str, port: int) -> Reject | None:
    """Rules 3 and 3b: a bad port, the proxy itself, a node's tunnel port."""
    if not 0 < port < 65536:
        return Reject(f"invalid destination port {port}", src, "forbidden_destination")
    if _is_self(state, dst_ip, port):
        return Reject(
            f"destination {dst_ip}:{port} is the proxy itself; refusing to loop", src, "forbidden_destination"
        )
    if port == state.listen.tunnel_port and _is_node_address(state, dst_ip):
        return Reject(
            f"{src.key if src else 'a pod'} tried to open a mesh tunnel to "
            f"{dst_ip}:{port} itself; only node proxies may (a pod could otherwise "
            "claim any identity)",
            src,
            "forbidden_destination",
        )
    return None


def _service_route(state: ProxyState, src: Pod, svc, sp, vip: str, port: int, family: int) -> ServiceRoute:
    """The ServiceRoute for ``src`` dialing ``vip``:``port`` of ``svc`` (a
    state.Service) on its port ``sp`` (a state.ServicePort): the endpoints
    with an address in the VIP's family.  Public as :func:`service_route`."""
    v6 = ":" in vip
    eps, addrs = [], []
    for e in sp.endpoints:  # sorted by pod key, then address
        pod = state.pod_by_key.get(e.pod)
        if pod is not None and e.v6 == v6:  # at most one address per family and pod
            eps.append(pod)
            addrs.append(e.ip)
    return ServiceRoute(
        src,
        svc.key,
        svc.name,
        svc.namespace,
        port,
        sp.app_protocol,
        (vip, port),
        tuple(eps),
        sp.target_port,
        family,
        sp.name,
        tuple(addrs),
    )


service_route = _service_route


def _to_address(
    state: ProxyState, src: Pod, dst: Pod | None, dst_ip: str, port: int, family: int
) -> Decision:
    """Rule 5: a mesh pod here or elsewhere, or anything else as-is."""
    if dst is None or not dst.mesh:
        return Passthrough(src, (dst_ip, port))
    if dst.node == state.node:
        return Local(src, dst, (dst_ip, port))
    node = state.nodes.get(dst.node)
    want_v6 = family == AF_INET6 or ":" in dst_ip
    node_addr = node.address_for(want_v6) if node is not None else None
    if node_addr is None:
        return Reject(
            f"pod {dst.key} is on node {dst.node}, which has no address in the proxy state "
            "(check the agent's node inventory)",
            src,
            "no_route",
        )
    return Tunnel(src, dst, (dst_ip, port), dst.node, node_addr, state.listen.tunnel_port)
