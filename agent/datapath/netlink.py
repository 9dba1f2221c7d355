"""Interface lookups through netlink (pyroute2), for the datapath only."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass


def route_oif(ip: str) -> tuple[int, str] | None:
    """(ifindex, ifname) of the interface the kernel would route ``ip`` out of,
    in the caller's network namespace; None when there is no route."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=ip)
        except Exception:  # noqa: BLE001 - NetlinkError (no route, unreachable) or any other: no route
            return None
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        if oif is None:
            return None
        links = ipr.get_links(oif)
        name = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
        return oif, name


def ifindex_alive(ifindex: int, name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            links = ipr.get_links(ifindex)
        except Exception:  # noqa: BLE001 - NetlinkError (no such link) or any other: not alive
            return False
        return bool(links) and links[0].get_attr("IFLA_IFNAME") == name


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
_TCA_BPF_ID = 11  # pyroute2 0.9 does not decode it


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    ifname: str
    prog_id: int | None
    owner: str


def _bpf_prog_id(options) -> int | None:
    """TCA_BPF_ID from a filter's TCA_OPTIONS, read from the raw attribute
    buffer (header: u16 length, u16 type; value: u32)."""
    if options is None:
        return None
    buf = options.data[options.offset : options.offset + options.length]
    pos = 4
    while pos + 4 <= len(buf):
        length, typ = struct.unpack_from("=HH", buf, pos)
        if length < 4:
            break
        if typ & 0x3FFF == _TCA_BPF_ID and length >= 8:
            return struct.unpack_from("=I", buf, pos + 4)[0]
        pos += (length + 3) & ~3
    return None


def _filters_of(ipr, ifindex: int, ifname: str, owner: str) -> TcFilter | None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = ipr.get_filters(index=ifindex, parent=CLSACT_EGRESS)
    except (NetlinkError, OSError):  # the interface went away meanwhile
        return None
    for f in filters:
        if f.get_attr("TCA_KIND") != "bpf" or f["info"] >> 16 != TC_PRIO:
            continue
        opts = f.get_attr("TCA_OPTIONS")
        if opts is None or opts.get_attr("TCA_BPF_NAME") != owner:
            continue
        return TcFilter(ifindex, ifname, _bpf_prog_id(opts), owner)
    return None


def clsact_filters(owner: str, only: dict[int, str] | None = None) -> dict[int, TcFilter]:
    """Filters named ``owner`` on clsact egress, by ifindex: on every
    interface of this network namespace, or only on ``only`` {ifindex: name}."""
    from pyroute2 import IPRoute

    out = {}
    with IPRoute() as ipr:
        if only is None:
            links = [(ln["index"], ln.get_attr("IFLA_IFNAME")) for ln in ipr.get_links()]
        else:
            links = list(only.items())
        for idx, name in links:
            f = _filters_of(ipr, idx, name, owner)
            if f is not None:
                out[idx] = f
    return out


def clsact_attach(ifindex: int, prog_fd: int, owner: str) -> None:
    """Put ``prog_fd`` on ``ifindex``'s clsact egress hook, adding the qdisc
    if needed and replacing the program of our filter atomically if one is
    there.  Raises OSError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise OSError(e.code, f"adding a clsact qdisc: {os.strerror(e.code)}") from None
        try:
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                handle=TC_HANDLE,
                fd=prog_fd,
                name=owner,
                parent=CLSACT_EGRESS,
                prio=TC_PRIO,
                classid=1,
                direct_action=True,
            )
        except NetlinkError as e:
            raise OSError(e.code, f"adding the cls_bpf filter: {os.strerror(e.code)}") from None


def clsact_detach(ifindex: int) -> None:
    """Remove our filter from ``ifindex`` (gone already is fine).  The clsact
    qdisc stays: other tools may use it, and it goes with the veth."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, handle=TC_HANDLE, parent=CLSACT_EGRESS, prio=TC_PRIO)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                raise OSError(e.code, f"removing the cls_bpf filter: {os.strerror(e.code)}") from None
