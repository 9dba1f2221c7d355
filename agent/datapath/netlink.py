"""Interface lookups and clsact filters through rtnetlink, for the datapath only.

What the long-running agent does on every sync (the route to a pod, whether
an interface is still there, which of our cls_bpf filters are attached) goes
and what strict mode does on kernels without tcx (a clsact qdisc and a
cls_bpf filter per pod veth) goes through a small rtnetlink client over a
plain socket below, not pyroute2: importing pyroute2 cost the agent ~8 MB of
its footprint (issue #13).  The messages are the ones ``tc`` sends: the
filter is bpf, direct-action, protocol all, at prio/handle ``TC_PRIO``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# linux/netlink.h, linux/rtnetlink.h
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x100, 0x200, 0x400
_NLM_F_DUMP = 0x300
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTM_NEWQDISC = 36
_RTM_NEWTFILTER, _RTM_DELTFILTER, _RTM_GETTFILTER = 44, 45, 46
_RTA_DST, _RTA_OIF = 1, 4
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_BPF_CLASSID, _TCA_BPF_FD, _TCA_BPF_NAME, _TCA_BPF_FLAGS = 3, 6, 7, 8
_TCA_BPF_FLAG_ACT_DIRECT = 1
_TC_H_CLSACT = 0xFFFFFFF1  # the clsact qdisc's parent (TC_H_CLSACT == TC_H_INGRESS)
_CLSACT_HANDLE = 0xFFFF0000
_ETH_P_ALL = 0x0003
_NLA_TYPE_MASK = 0x3FFF
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


def _attrs(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr/nlattr in ``buf[pos:end]``."""
    while pos + 4 <= end:
        length, typ = struct.unpack_from("=HH", buf, pos)
        if length < 4 or pos + length > end:
            return
        yield typ & _NLA_TYPE_MASK, buf[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def _attr(typ: int, payload: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(payload), typ) + payload
    return a + b"\0" * (-len(a) % 4)


def _cstr(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def _request(msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
    """Send one rtnetlink request in this network namespace and collect the
    answer: [(message type, payload)] up to NLMSG_DONE (dumps) or the one
    reply.  A NLMSG_ERROR with an error raises OSError(errno)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        seq = 1
        s.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), msg_type, _NLM_F_REQUEST | flags, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = s.recv(1 << 16)
            pos = 0
            while pos + _NLMSG_HDR.size <= len(data):
                length, typ, _, mseq, _ = _NLMSG_HDR.unpack_from(data, pos)
                if length < _NLMSG_HDR.size:
                    return out
                payload = data[pos + _NLMSG_HDR.size : pos + length]
                pos += (length + 3) & ~3
                if mseq != seq:
                    continue
                if typ == _NLMSG_DONE:
                    return out
                if typ == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    return out  # an acknowledgement
                out.append((typ, payload))
                if not flags & _NLM_F_DUMP:
                    return out


def route_oif(ip: str) -> tuple[int, str] | None:
    """(ifindex, ifname) of the interface the kernel would route ``ip`` out of,
    in the caller's network namespace; None when there is no route."""
    addr = ipaddress.ip_address(ip)
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(family, addr.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _attr(_RTA_DST, addr.packed)
    try:
        msgs = _request(_RTM_GETROUTE, 0, body)
    except OSError:  # no route, unreachable, ...
        return None
    for typ, payload in msgs:
        if typ != _RTM_NEWROUTE:
            continue
        for atype, value in _attrs(payload, _RTMSG.size, len(payload)):
            if atype == _RTA_OIF and len(value) >= 4:
                oif = struct.unpack_from("=I", value)[0]
                try:
                    return oif, socket.if_indextoname(oif)
                except OSError:
                    return oif, str(oif)
    return None


def ifindex_alive(ifindex: int, name: str) -> bool:
    """Interface ``ifindex`` exists in this network namespace and is still called ``name``."""
    try:
        return socket.if_indextoname(ifindex) == name
    except OSError:
        return False


# --- clsact + cls_bpf: strict mode on kernels without tcx (< 6.6) -----------
#
# The strict-mode program goes on the egress hook of a clsact qdisc on the
# node side of each pod's veth, as a direct-action bpf filter at a fixed
# priority and handle ("ML").  Its name says which datapath owns it
# (``meshlet:<pin dir>``), so several agents can share a network namespace
# and a restarted agent finds its own filters.  A filter stays attached when
# the process that added it exits, like a pinned link.  'replace-filter'
# swaps the program of an existing filter in one netlink operation: there is
# no moment without a filter.

CLSACT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
CLSACT_INGRESS = 0xFFFFFFF2
TC_PRIO = TC_HANDLE = 0x4D4C  # "ML"
_TCA_BPF_ID = 11


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    ifname: str
    prog_id: int | None
    owner: str


def _filter_of(ifindex: int, ifname: str, owner: str) -> TcFilter | None:
    """Our filter (prio ``TC_PRIO``, bpf, named ``owner``) on ``ifindex``'s clsact egress hook."""
    try:
        msgs = _request(
            _RTM_GETTFILTER, _NLM_F_DUMP, _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, CLSACT_EGRESS, 0)
        )
    except OSError:  # the interface went away meanwhile, or has no clsact qdisc
        return None
    for typ, payload in msgs:
        if typ != _RTM_NEWTFILTER or len(payload) < _TCMSG.size:
            continue
        info = _TCMSG.unpack_from(payload)[4]
        if info >> 16 != TC_PRIO:
            continue
        attrs = dict(_attrs(payload, _TCMSG.size, len(payload)))
        if _cstr(attrs.get(_TCA_KIND, b"")) != "bpf" or _TCA_OPTIONS not in attrs:
            continue
        opts = attrs[_TCA_OPTIONS]
        bpf = dict(_attrs(opts, 0, len(opts)))
        if _cstr(bpf.get(_TCA_BPF_NAME, b"")) != owner:
            continue
        pid = bpf.get(_TCA_BPF_ID)
        return TcFilter(
            ifindex, ifname, struct.unpack_from("=I", pid)[0] if pid and len(pid) >= 4 else None, owner
        )
    return None


def clsact_filters(owner: str, only: dict[int, str] | None = None) -> dict[int, TcFilter]:
    """Filters named ``owner`` on clsact egress, by ifindex: on every
    interface of this network namespace, or only on ``only`` {ifindex: name}."""
    links = socket.if_nameindex() if only is None else list(only.items())
    out = {}
    for idx, name in links:
        f = _filter_of(idx, name, owner)
        if f is not None:
            out[idx] = f
    return out


def _filter_request(msg_type: int, flags: int, ifindex: int, options: bytes | None) -> None:
    info = (TC_PRIO << 16) | socket.htons(_ETH_P_ALL)
    body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, TC_HANDLE, CLSACT_EGRESS, info) + _attr(_TCA_KIND, b"bpf\0")
    if options is not None:
        body += _attr(_TCA_OPTIONS, options)
    _request(msg_type, _NLM_F_ACK | flags, body)


def clsact_attach(ifindex: int, prog_fd: int, owner: str) -> None:
    """Put ``prog_fd`` on ``ifindex``'s clsact egress hook, adding the qdisc
    if needed and replacing the program of our filter atomically if one is
    there (one RTM_NEWTFILTER with NLM_F_REPLACE).  Raises OSError."""
    qdisc = _TCMSG.pack(socket.AF_UNSPEC, ifindex, _CLSACT_HANDLE, _TC_H_CLSACT, 0) + _attr(
        _TCA_KIND, b"clsact\0"
    )
    try:
        _request(_RTM_NEWQDISC, _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL, qdisc)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise OSError(e.errno, f"adding a clsact qdisc: {e.strerror}") from None
    options = (
        _attr(_TCA_BPF_CLASSID, struct.pack("=I", 1))
        + _attr(_TCA_BPF_FD, struct.pack("=I", prog_fd))
        + _attr(_TCA_BPF_NAME, owner.encode() + b"\0")
        + _attr(_TCA_BPF_FLAGS, struct.pack("=I", _TCA_BPF_FLAG_ACT_DIRECT))
    )
    try:
        _filter_request(_RTM_NEWTFILTER, _NLM_F_CREATE | _NLM_F_REPLACE, ifindex, options)
    except OSError as e:
        raise OSError(e.errno, f"adding the cls_bpf filter: {e.strerror}") from None


def clsact_detach(ifindex: int) -> None:
    """Remove our filter from ``ifindex`` (gone already is fine).  The clsact
    qdisc stays: other tools may use it, and it goes with the veth."""
    try:
        _filter_request(_RTM_DELTFILTER, 0, ifindex, None)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise OSError(e.errno, f"removing the cls_bpf filter: {e.strerror}") from None
