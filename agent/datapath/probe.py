"""Kernel feature probes for ``meshlet doctor`` (and the fail-fast start of
``meshlet run``).  bcc-free on purpose: only the plain bpf(2) wrapper, os and
ctypes (and rtnetlink over a plain socket, for clsact), so probing costs
milliseconds and no LLVM.

Every probe returns quietly when the feature works and raises ``OSError``
(``bpfsys.BPFError`` is one) when it does not.  Whatever a probe creates —
program and link fds, a child cgroup, a network namespace — is gone when it
returns, also when it fails.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent import cgroup
from agent.datapath import bpfsys

# r0 = 1; exit — a valid program for every type probed here (1 = allow/pass).
TRIVIAL_PROG = bytes.fromhex("b7000000010000009500000000000000")

# bpf(2) numbers bpfsys does not need for anything else.
MAP_CREATE = 0
MAP_TYPE_SOCKHASH = 18
PROG_TYPE_SOCKET_FILTER = 1
PROG_TYPE_SK_SKB = 14
PROG_TYPE_SK_MSG = 16

LINK_TYPE_CGROUP = 3
LINK_TYPE_TCX = 11

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (see bpfsys)


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _probe_name() -> str:
    """Unique name for a temporary cgroup/netns; 'meshlet' in it so a leftover
    is easy to spot."""
    return f"meshlet-probe-{os.getpid()}-{secrets.token_hex(3)}"


def prog_loads(prog_type: int, expected_attach_type: int = 0) -> None:
    """The kernel accepts a program of this type (and attach type)."""
    os.close(bpfsys.prog_load(prog_type, TRIVIAL_PROG, expected_attach_type=expected_attach_type))


def sockhash_creates() -> None:
    """A SOCKHASH map can be created (CONFIG_BPF_STREAM_PARSER)."""
    # map_type, key_size, value_size (u64 socket cookie), max_entries
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, MAP_TYPE_SOCKHASH, 8, 8, 1)
    os.close(bpfsys.bpf(MAP_CREATE, attr))


def tunnel_spread_loads() -> None:
    """The tunnel listener's least-loaded program loads
    (``agent.datapath.reuseport``): a REUSEPORT_SOCKARRAY, ARRAY maps and
    the SK_REUSEPORT program for the most workers (the longest one the
    verifier sees)."""
    from . import reuseport

    slots = reuseport.MAX_SLOTS
    with (
        _closing(bpfsys.map_create(reuseport.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, slots)) as array,
        _closing(bpfsys.map_create(reuseport.MAP_TYPE_ARRAY, 4, 8, slots)) as load,
        _closing(bpfsys.map_create(reuseport.MAP_TYPE_ARRAY, 4, 8, 1)) as counter,
    ):
        os.close(
            bpfsys.prog_load(bpfsys.PROG_TYPE_SK_REUSEPORT, reuseport.program(counter, load, array, slots))
        )


def cgroup_link_works(cgroup_root: str, attach_type: int = bpfsys.ATTACH_CGROUP_INET4_CONNECT) -> None:
    """BPF_LINK_CREATE attaches a cgroup/connect program to a temporary child
    cgroup of ``cgroup_root``; closing the link fd detaches it."""
    child = os.path.join(cgroup_root, _probe_name())
    os.mkdir(child)
    try:
        with (
            _closing(os.open(child, os.O_RDONLY | os.O_DIRECTORY)) as cg_fd,
            _closing(
                bpfsys.prog_load(
                    bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, TRIVIAL_PROG, expected_attach_type=attach_type
                )
            ) as prog_fd,
            _closing(bpfsys.link_create(prog_fd, cg_fd, attach_type)) as link_fd,
        ):
            info = bpfsys.link_info(link_fd)
            if info.type != LINK_TYPE_CGROUP or info.target != cgroup.cgroup_id(child):
                raise OSError(
                    f"link created but reports type {info.type_name} on "
                    f"cgroup id {info.target}, expected cgroup {child}"
                )
    finally:
        os.rmdir(child)


def _run_in_netns(netns_path: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a short-lived thread that has joined ``netns_path``.
    setns() moves only the calling thread, so the process stays where it was."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with _closing(os.open(netns_path, os.O_RDONLY)) as ns_fd:
                if _libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which re-raises it
            errors.append(e)

    t = threading.Thread(target=body, name="meshlet-netns-probe")
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise OSError(e.errno, "the 'ip' command (iproute2) is not installed") from None
    except subprocess.CalledProcessError as e:
        raise OSError(f"ip {' '.join(args)}: {e.stderr.strip() or e.returncode}") from None


def tcx_link_works(attach_type: int = bpfsys.ATTACH_TCX_EGRESS) -> None:
    """BPF_LINK_CREATE attaches a sched_cls program through tcx (kernel >= 6.6)
    to ``lo`` of a temporary network namespace, which is deleted afterwards."""
    name = _probe_name()
    _ip("netns", "add", name)
    try:

        def attach() -> None:
            ifindex = socket.if_nametoindex("lo")
            with (
                _closing(bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, TRIVIAL_PROG)) as prog_fd,
                _closing(bpfsys.link_create(prog_fd, ifindex, attach_type)) as link_fd,
            ):
                info = bpfsys.link_info(link_fd)
                if info.type != LINK_TYPE_TCX or info.target != ifindex:
                    raise OSError(
                        f"link created but reports type {info.type_name} on "
                        f"ifindex {info.target}, expected tcx on {ifindex}"
                    )

        _run_in_netns(f"/run/netns/{name}", attach)
    finally:
        _ip("netns", "delete", name)


def clsact_works() -> None:
    """A sched_cls program goes on the egress hook of a clsact qdisc as a
    direct-action cls_bpf filter (strict mode's attach on kernels without
    tcx), on ``lo`` of a temporary network namespace, deleted afterwards."""
    from agent.datapath import netlink

    name = _probe_name()
    _ip("netns", "add", name)
    try:

        def attach() -> None:
            ifindex = socket.if_nametoindex("lo")
            with _closing(bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, TRIVIAL_PROG)) as prog_fd:
                netlink.clsact_attach(ifindex, prog_fd, name)
                want = bpfsys.prog_info(prog_fd).id
            got = netlink.clsact_filters(name, {ifindex: "lo"}).get(ifindex)
            if got is None or got.prog_id != want:
                raise OSError(
                    f"cls_bpf filter added but reads back as {got}, expected program id {want} on lo"
                )

        _run_in_netns(f"/run/netns/{name}", attach)
    finally:
        _ip("netns", "delete", name)


def splice_supported() -> str | None:
    """None when the same-node splice can work here (sk_msg and sock_ops
    programs, SOCKHASH maps), else why not and the fix (for the log and
    ``meshlet doctor``)."""
    try:
        prog_loads(PROG_TYPE_SK_MSG)
        prog_loads(bpfsys.PROG_TYPE_SOCK_OPS)
        sockhash_creates()
    except OSError as e:
        return (
            f"no sk_msg/sock_ops program or SOCKHASH map on this kernel ({e}); "
            "the fix: a kernel with CONFIG_BPF_STREAM_PARSER (Linux >= 4.20), or proxy.splice: false"
        )
    return None


def splice_plan(mode: bool | str, why_not: str | None) -> tuple[bool, str | None]:
    """What ``proxy.splice`` (``mode``: true, false or auto) comes to on a
    kernel where ``splice_supported()`` said ``why_not``: (spliced, the one
    warning to log).  ``auto`` falls back to the userspace relay with a
    warning; ``true`` on a kernel without the hooks is ``ValueError``, whose
    text names the fix (asked for explicitly, a silent fallback would hide
    it)."""
    if mode is False:
        return False, None
    if why_not is None:
        return True, None
    if mode is True:
        raise ValueError(f"proxy.splice is true, but {why_not}")
    return False, f"proxy.splice: auto: same-node connections stay on the userspace relay: {why_not}"
