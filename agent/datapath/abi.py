"""ctypes mirrors of bpf/include/meshlet.h — must match it field for field.

tests/privileged/test_abi.py compiles the C with bcc and compares every size
and offset below with bcc's generated Key/Leaf types, and every constant in
:data:`CONSTANTS` with the header's value (``_Static_assert`` in the same
compiler), so a change on one side only fails loudly.  The rest of the agent
takes these values from here (agent/policy/kernel.py too), never copies them.
``*_be`` fields hold network byte order.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import sys

ABI_VERSION = 4

AF_INET = 2
AF_INET6 = 10

MODE_PERMISSIVE = 0
MODE_STRICT = 1
MODES = {"permissive": MODE_PERMISSIVE, "strict": MODE_STRICT}


class MlConfig(ctypes.Structure):
    _fields_ = [
        ("redirect_ip4_be", ctypes.c_uint32),
        ("redirect_ip6_be", ctypes.c_uint32 * 4),
        ("outbound_port", ctypes.c_uint16),
        ("has_ip6", ctypes.c_uint8),
        ("enabled", ctypes.c_uint8),
        ("mesh_mark", ctypes.c_uint32),
        ("tunnel_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class MlWorkload(ctypes.Structure):
    _fields_ = [
        ("workload_id", ctypes.c_uint32),
        ("mode", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class MlIpKey(ctypes.Structure):
    _fields_ = [
        ("addr_be", ctypes.c_uint32 * 4),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class MlCidr4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr_be", ctypes.c_uint32)]


class MlCidr6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr_be", ctypes.c_uint32 * 4)]


class MlOrigDst(ctypes.Structure):
    _fields_ = [
        ("dst_be", ctypes.c_uint32 * 4),
        ("cgroup_id", ctypes.c_uint64),
        ("dst_port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("workload_id", ctypes.c_uint32),
    ]


class MlFlowKey(ctypes.Structure):
    _fields_ = [
        ("saddr_be", ctypes.c_uint32 * 4),
        ("daddr_be", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


# flow roles (ML_ROLE_*)
ROLE_NONE = 0
ROLE_CLIENT = 1
ROLE_SERVER = 2
ROLE_PROXY_OUTBOUND = 3
ROLE_PROXY_TUNNEL = 4
ROLE_PROXY_UPSTREAM = 5
ROLES = {
    ROLE_NONE: "unknown",
    ROLE_CLIENT: "client",
    ROLE_SERVER: "server",
    ROLE_PROXY_OUTBOUND: "proxy-outbound",
    ROLE_PROXY_TUNNEL: "proxy-tunnel",
    ROLE_PROXY_UPSTREAM: "proxy-upstream",
}

FLOW_F_EVICTED = 1  # ML_FLOW_F_EVICTED

# BPF_TCP_* (include/uapi/linux/bpf.h), the values of MlFlow.state
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
TCP_CLOSE = 7


class MlFlow(ctypes.Structure):
    """struct ml_flow: ml_live_flows values and ml_flow_events records."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("peer_cookie", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("update_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("saddr_be", ctypes.c_uint32 * 4),
        ("daddr_be", ctypes.c_uint32 * 4),
        ("orig_dst_be", ctypes.c_uint32 * 4),
        ("workload_id", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("rtt_min_us", ctypes.c_uint32),
        ("total_retrans", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("orig_dport", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("orig_family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


# ml_l4_policy verdicts (ML_L4_*)
L4_PASS = 0
L4_DENY = 1


class MlL4Key(ctypes.Structure):
    """struct ml_l4_key: (source workload, destination address, port); port 0: any."""

    _fields_ = [
        ("dst_be", ctypes.c_uint32 * 4),
        ("workload_id", ctypes.c_uint32),
        ("dst_port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class MlL4Verdict(ctypes.Structure):
    _fields_ = [
        ("policy_id", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class MlMeta(ctypes.Structure):
    _fields_ = [
        ("source_hash", ctypes.c_uint64),
        ("abi_version", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


# ml_cgroup_guard values: a directory pods are created in (a task below it
# that is not enrolled cannot connect), or a known pod out of the mesh.
GUARD_DENY_UNKNOWN = 1
GUARD_ALLOW = 2

# enum ml_stat, in order
STATS = [
    "redirect4",
    "redirect6",
    "bypass_port",
    "bypass_cidr",
    "bypass_local",
    "bypass_no_ip6",
    "flow_recorded",
    "origdst_full",
    "strict_drop",
    "strict_mesh",
    "flow_tracked",
    "flow_closed",
    "flow_table_full",
    "flow_evicted",
    "flow_ringbuf_full",
    "policy_denied",
    "unknown_denied",
    "splice_redirected",
    "splice_miss",
]

# map name -> (key type, value type); the privileged ABI test walks this.
MAPS: dict[str, tuple[type, type]] = {
    "ml_config": (ctypes.c_uint32, MlConfig),
    "ml_meta": (ctypes.c_uint32, MlMeta),
    "ml_stats": (ctypes.c_uint32, ctypes.c_uint64),
    "ml_enrolled": (ctypes.c_uint64, MlWorkload),
    "ml_pod_ips": (MlIpKey, MlWorkload),
    "ml_excl_ports": (ctypes.c_uint16, ctypes.c_uint8),
    "ml_excl_cidr4": (MlCidr4Key, ctypes.c_uint8),
    "ml_excl_cidr6": (MlCidr6Key, ctypes.c_uint8),
    "ml_l4_policy": (MlL4Key, MlL4Verdict),
    "ml_l4_denied": (ctypes.c_uint32, ctypes.c_uint64),
    "ml_cgroup_guard": (ctypes.c_uint64, ctypes.c_uint32),
    "ml_origdst": (ctypes.c_uint64, MlOrigDst),
    "ml_flows": (MlFlowKey, MlOrigDst),
    "ml_live_flows": (ctypes.c_uint64, MlFlow),
    "ml_flow_links": (ctypes.c_uint64, ctypes.c_uint64),
}


class MlSplicePeer(ctypes.Structure):
    """ml_splice_peers value (bpf/include/meshlet.h struct ml_splice_peer)."""

    _fields_ = [
        ("peer_cookie", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("acked", ctypes.c_uint64),
    ]


class MlSpliceArm(ctypes.Structure):
    """ml_splice_arm value (bpf/include/meshlet.h struct ml_splice_arm)."""

    _fields_ = [
        ("target_cookie", ctypes.c_uint64),
        ("relayed", ctypes.c_uint64),
    ]


class MlSpliceCnt(ctypes.Structure):
    """ml_splice_cnt value (bpf/include/meshlet.h struct ml_splice_cnt)."""

    _fields_ = [
        ("passed", ctypes.c_uint64),
        ("redirected", ctypes.c_uint64),
    ]


# The same-node splice (bpf/splice.c, compiled with ML_SPLICE=1 only): its
# maps are pinned under <pin dir>/splice/, apart from MAPS (a SOCKHASH holds
# sockets and cannot be read back, and a kernel without sk_msg has none).
SPLICE_DIR = "splice"
SPLICE_SOCKHASH = "ml_splice"  # MlFlowKey (a pod socket's own 4-tuple) -> pod socket
SPLICE_TARGETS = "ml_splice_tgt"  # u64 socket cookie -> the proxy's socket
SPLICE_PEERS = "ml_splice_peers"  # u64 socket cookie (a target) -> MlSplicePeer
SPLICE_ARM = "ml_splice_arm"  # MlFlowKey -> MlSpliceArm (written by the proxy)
SPLICE_CNT = "ml_splice_cnt"  # MlFlowKey -> MlSpliceCnt (written by BPF)
SPLICE_PENDING = "ml_splice_pending"  # MlFlowKey -> u8 (sock_ops only)
SPLICE_PROG = "ml_splice_msg"  # sk_msg, attached to ml_splice
SPLICE_OPS = "ml_splice_ops"  # sock_ops, a cgroup hook (only with ML_SPLICE=1)

# Ring buffers: pinned under <pin dir>/events/ (they have no keys to list, so
# they stay out of the directory of hash and array maps) -> record type.
EVENTS_DIR = "events"
RINGBUFS: dict[str, type] = {
    "ml_flow_events": MlFlow,
}


# Every #define of meshlet.h that the agent relies on, by its C name.
# tests/privileged/test_abi.py compiles the header with bcc and a
# _Static_assert per entry, so a value that drifts on either side fails to
# compile; it also checks that every ML_ABI_VERSION/ML_AF_*/ML_MODE_*/
# ML_ROLE_*/ML_FLOW_F_*/ML_L4_*/ML_GUARD_* define of the header is listed here.
CONSTANTS: dict[str, int] = {
    "ML_ABI_VERSION": ABI_VERSION,
    "ML_AF_INET": AF_INET,
    "ML_AF_INET6": AF_INET6,
    "ML_MODE_PERMISSIVE": MODE_PERMISSIVE,
    "ML_MODE_STRICT": MODE_STRICT,
    "ML_ROLE_NONE": ROLE_NONE,
    "ML_ROLE_CLIENT": ROLE_CLIENT,
    "ML_ROLE_SERVER": ROLE_SERVER,
    "ML_ROLE_PROXY_OUTBOUND": ROLE_PROXY_OUTBOUND,
    "ML_ROLE_PROXY_TUNNEL": ROLE_PROXY_TUNNEL,
    "ML_ROLE_PROXY_UPSTREAM": ROLE_PROXY_UPSTREAM,
    "ML_FLOW_F_EVICTED": FLOW_F_EVICTED,
    "ML_L4_PASS": L4_PASS,
    "ML_L4_DENY": L4_DENY,
    "ML_GUARD_DENY_UNKNOWN": GUARD_DENY_UNKNOWN,
    "ML_GUARD_ALLOW": GUARD_ALLOW,
    **{f"ML_STAT_{name.upper()}": i for i, name in enumerate(STATS)},
    "ML_STAT_MAX": len(STATS),
}


@functools.lru_cache(maxsize=1024)
def pack_addr(ip: str) -> tuple[int, tuple[int, int, int, int]]:
    """Text address -> (family, four network-order u32 words as stored by the
    kernel on a little- or big-endian host).  IPv4-mapped IPv6 becomes IPv4.
    Cached (an immutable result): the flow-table key of every accepted
    connection packs the same few pod and proxy addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        raw = addr.packed + bytes(12)
        fam = AF_INET
    else:
        raw = addr.packed
        fam = AF_INET6
    w0, w1, w2, w3 = (int.from_bytes(raw[i : i + 4], "little" if _LITTLE else "big") for i in range(0, 16, 4))
    return fam, (w0, w1, w2, w3)


def unpack_addr(family: int, words) -> str:
    if family == AF_INET:
        b = int(words[0]).to_bytes(4, "little" if _LITTLE else "big")
        return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"  # (no socket module here: agent.policy imports this one)
    raw = b"".join(int(w).to_bytes(4, "little" if _LITTLE else "big") for w in words)
    return str(ipaddress.IPv6Address(raw))


_LITTLE = sys.byteorder == "little"


def ip_key(ip: str) -> MlIpKey:
    fam, words = pack_addr(ip)
    k = MlIpKey()
    k.family = fam
    for i, w in enumerate(words):
        k.addr_be[i] = w
    return k


def flow_key(peer: tuple, local: tuple) -> MlFlowKey:
    """Key for ml_flows from the proxy's view of an accepted socket:
    ``peer`` = getpeername() (the pod), ``local`` = getsockname()."""
    pfam, pw = pack_addr(peer[0])
    lfam, lw = pack_addr(local[0])
    k = MlFlowKey()
    k.family = pfam
    for i in range(4):
        k.saddr_be[i] = pw[i]
        k.daddr_be[i] = lw[i]
    k.sport = int(peer[1])
    k.dport = int(local[1])
    return k


def l4_key(workload_id: int, ip: str, port: int) -> MlL4Key:
    """Key for ml_l4_policy (``port`` 0: any port without an entry of its own)."""
    fam, words = pack_addr(ip)
    k = MlL4Key()
    for i, w in enumerate(words):
        k.dst_be[i] = w
    k.workload_id = workload_id
    k.dst_port = port
    k.family = fam
    return k


def cidr_key(cidr: str):
    net = ipaddress.ip_network(cidr, strict=False)
    fam, words = pack_addr(str(net.network_address))
    if net.version == 4:
        return MlCidr4Key(net.prefixlen, words[0])
    k = MlCidr6Key()
    k.prefixlen = net.prefixlen
    for i, w in enumerate(words):
        k.addr_be[i] = w
    return k


def htons(port: int) -> int:
    """``port`` in network byte order, read as a host-order integer (as C's htons)."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)
