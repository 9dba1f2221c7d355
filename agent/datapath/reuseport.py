"""Tunnel connections dealt round-robin to the proxy workers (plain bpf(2), no bcc).

Why.  A source worker carries all its pod streams to a peer node over one
long-lived mux tunnel, so a node accepts few tunnel connections, and with
plain ``SO_REUSEPORT`` a hash of each one's addresses alone picks the
worker that serves it for its whole life.  With two workers, two tunnels
share one worker half the time: that worker then does all of the node's
inbound work while its sibling idles (measured with an L7 load: 131 µs of
CPU per request on one destination worker, 0.3 µs on the other).

How.  Each worker files its tunnel listener in slot ``worker id`` of a
``REUSEPORT_SOCKARRAY`` pinned at ``<pin dir>/reuseport/tunnel-v4`` (or
``-v6``: a program can only pick a socket of the SYN's own reuseport group,
and each address family's listeners are a group of their own).  A
``BPF_PROG_TYPE_SK_REUSEPORT`` program attached to the group
(``SO_ATTACH_REUSEPORT_EBPF``) bumps a counter and selects slot
``counter % workers``.  The program always answers ``SK_PASS``: where the
slot is empty (its worker is restarting) or holds a socket of another group
(a listener on an old port), ``bpf_sk_select_reuseport`` fails and the
kernel's hash picks among the group's listeners, as without the program.
No connection is refused by it.

Lifecycle.  The kernel takes a listener out of the array when it closes.  A
hand-over's successor files its listener in its slot over its predecessor's,
so new tunnels go to the new process while the old one drains.  Every worker
attaches its own copy of the program (with its own counter); the group runs
the last one attached.  Queued connections of a closing listener still move
to a sibling (``tcp_migrate_req``): a program attached for
``BPF_SK_REUSEPORT_SELECT`` leaves migration to the kernel.

bcc 0.26 cannot declare a ``reuseport_sockarray`` ("unsupported map type"),
and the program is 19 instructions, so it is written out here.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from . import bpfsys

__all__ = ["MAX_SLOTS", "PIN_SUBDIR", "SpreadError", "program", "spread_listener", "pin_path"]

PIN_SUBDIR = "reuseport"
MAX_SLOTS = 64  # proxy.workers is at most 64 (config.py)
MAP_TYPE_ARRAY = 2
MAP_TYPE_REUSEPORT_SOCKARRAY = 20
SO_ATTACH_REUSEPORT_EBPF = 52  # <asm-generic/socket.h>; Python's socket module has no name for it
SK_PASS = 1
_HELPER_MAP_LOOKUP_ELEM = 1
_HELPER_SK_SELECT_REUSEPORT = 82
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class SpreadError(OSError):
    """The kernel refused a step; the message says which and what it means."""


def pin_path(pin_dir: str, family: int) -> str:
    return os.path.join(pin_dir, PIN_SUBDIR, "tunnel-v6" if family == socket.AF_INET6 else "tunnel-v4")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ld_map_fd(dst: int, fd: int) -> bytes:
    # BPF_LD | BPF_DW | BPF_IMM with src = BPF_PSEUDO_MAP_FD: two slots
    return _insn(0x18, dst, 1, 0, fd) + _insn(0, 0, 0, 0, 0)


def program(counter_fd: int, sockarray_fd: int, slots: int) -> bytes:
    """The SK_REUSEPORT program: ``slot = counter++ % slots`` (an atomic
    fetch-add on an ARRAY's one u64), ``bpf_sk_select_reuseport(ctx,
    sockarray, &slot, 0)``, then ``SK_PASS`` whatever the helper said."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slots must be 1..{MAX_SLOTS}, got {slots}")
    return b"".join(
        (
            _insn(0xBF, 6, 1),  # r6 = r1 (ctx)
            _insn(0x62, 10, 0, -4, 0),  # *(u32 *)(r10 - 4) = 0: the counter's key
            _insn(0xBF, 2, 10),  # r2 = r10
            _insn(0x07, 2, 0, 0, -4),  # r2 += -4
            _ld_map_fd(1, counter_fd),  # r1 = &counter
            _insn(0x85, imm=_HELPER_MAP_LOOKUP_ELEM),  # r0 = map_lookup_elem(r1, r2)
            _insn(0x15, 0, 0, 11, 0),  # if r0 == 0 goto pass (never: an ARRAY's slot 0)
            _insn(0xB7, 1, 0, 0, 1),  # r1 = 1
            # BPF_STX | BPF_ATOMIC | BPF_DW with imm BPF_ADD | BPF_FETCH: r1 = fetch_add(*(u64 *)r0, r1)
            _insn(0xDB, 0, 1, 0, 0x01),
            _insn(0x97, 1, 0, 0, slots),  # r1 %= slots (BPF_ALU64 | BPF_MOD | BPF_K: unsigned)
            _insn(0x63, 10, 1, -8, 0),  # *(u32 *)(r10 - 8) = r1: the slot
            _insn(0xBF, 1, 6),  # r1 = ctx
            _ld_map_fd(2, sockarray_fd),  # r2 = &sockarray
            _insn(0xBF, 3, 10),  # r3 = r10
            _insn(0x07, 3, 0, 0, -8),  # r3 += -8
            _insn(0xB7, 4, 0, 0, 0),  # r4 = 0 (flags)
            _insn(0x85, imm=_HELPER_SK_SELECT_REUSEPORT),  # an error: the kernel's hash picks
            _insn(0xB7, 0, 0, 0, SK_PASS),  # pass: r0 = SK_PASS
            _insn(0x95),  # exit
        )
    )


def _open_sockarray(path: str) -> int:
    """The pinned array at ``path``, created (and pinned) by the first worker
    to get here; a sibling racing it opens the one that won."""
    for _ in range(3):
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.PinNotFound:
            pass
        else:
            info = bpfsys.map_info(fd)
            if (info.type, info.key_size, info.value_size, info.max_entries) != (
                MAP_TYPE_REUSEPORT_SOCKARRAY,
                4,
                8,
                MAX_SLOTS,
            ):
                os.close(fd)
                raise SpreadError(
                    errno.EINVAL,
                    f"{path} is a {info.type_name} map ({info.key_size}/{info.value_size} bytes, "
                    f"{info.max_entries} entries), not the {MAX_SLOTS}-slot reuseport_sockarray "
                    "this worker expects; remove it (the workers re-create it)",
                )
            return fd
        fd = bpfsys.map_create(MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_SLOTS, "ml_tunnel_socks")
        try:
            bpfsys.obj_pin(fd, path)
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EEXIST:
                raise
    raise SpreadError(errno.EAGAIN, f"{path}: pinned and unpinned under us three times")


def spread_listener(sock: socket.socket, pin_dir: str, slot: int, slots: int) -> None:
    """File the listening ``sock`` in ``slot`` of its family's pinned array
    under ``pin_dir`` and attach the round-robin program over ``slots``
    workers to its reuseport group.  Raises :class:`SpreadError` (an
    ``OSError``) with what failed; the caller keeps the listener, which the
    kernel's hash still serves."""
    if not 0 <= slot < slots <= MAX_SLOTS:
        raise ValueError(f"slot {slot} of {slots}: need 0 <= slot < slots <= {MAX_SLOTS}")
    path = pin_path(pin_dir, sock.family)
    step = "create the pin directory"
    counter = array = prog = -1
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        step = "open or create the reuseport_sockarray"
        array = _open_sockarray(path)
        step = f"file the listener in slot {slot}"
        bpfsys.map_update(array, _U32.pack(slot), _U64.pack(sock.fileno()))
        step = "create the program's counter"
        counter = bpfsys.map_create(MAP_TYPE_ARRAY, 4, 8, 1, "ml_tunnel_rr")
        step = "load the SK_REUSEPORT program"
        prog = bpfsys.prog_load(
            bpfsys.PROG_TYPE_SK_REUSEPORT, program(counter, array, slots), name="ml_tunnel_rr"
        )
        step = "attach it (SO_ATTACH_REUSEPORT_EBPF)"
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, _U32.pack(prog))
    except OSError as e:
        if isinstance(e, SpreadError):
            raise
        raise SpreadError(e.errno, f"cannot {step} at {path}: {e.strerror or e}") from None
    finally:
        for fd in (prog, counter, array):  # the group holds the program, the program its maps
            if fd >= 0:
                os.close(fd)
