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
4. Destination IP is a mesh pod on this node → Local (connect straight to it);
   on another node → Tunnel to that node's tunnel port; not a mesh pod →
   Passthrough (connect to the original destination as-is).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Protocol, Union

from agent.proxy.state import Pod, ProxyState, normalize_ip

__all__ = ["Origin", "Local", "Tunnel", "Passthrough", "Reject", "Decision", "route"]


class Origin(Protocol):
    """What ``agent.datapath.flowmap.FlowOrigin`` provides."""

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


Decision = Union[Local, Tunnel, Passthrough, Reject]


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
    return ip in {normalize_ip(a) for a in mine if a}  # type: ignore[arg-type]


def _is_node_address(state: ProxyState, ip: str) -> bool:
    return any(ip in {normalize_ip(a) for a in (n.address, n.address6) if a}
               for n in state.nodes.values())


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
    if not 0 < port < 65536:
        return Reject(f"invalid destination port {port}", src, "forbidden_destination")
    if _is_self(state, dst_ip, port):
        return Reject(f"destination {dst_ip}:{port} is the proxy itself; refusing to loop", src,
                      "forbidden_destination")

    if port == state.listen.tunnel_port and _is_node_address(state, dst_ip):
        return Reject(f"{src.key} tried to open a mesh tunnel to {dst_ip}:{port} itself; only node "
                      "proxies may (a pod could otherwise claim any identity)", src,
                      "forbidden_destination")
    dst = state.pod_by_ip.get(dst_ip)
    if dst is None or not dst.mesh:
        return Passthrough(src, (dst_ip, port))
    if dst.node == state.node:
        return Local(src, dst, (dst_ip, port))
    node = state.nodes.get(dst.node)
    want_v6 = origin.family == socket.AF_INET6 or ":" in dst_ip
    node_addr = node.address_for(want_v6) if node is not None else None
    if node_addr is None:
        return Reject(
            f"pod {dst.key} is on node {dst.node}, which has no address in the proxy state "
            "(check the agent's node inventory)",
            src,
            "no_route",
        )
    return Tunnel(src, dst, (dst_ip, port), dst.node, node_addr, state.listen.tunnel_port)
