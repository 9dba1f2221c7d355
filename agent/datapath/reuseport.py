"""Connections dealt to the least-loaded proxy worker (plain bpf(2), no bcc).

Two listener groups use it, each with maps of its own (``GROUPS``): the
tunnel listener (connections from other nodes' proxies) and the outbound
listener (the pods' redirected connections).

Why.  A source worker carries all its pod streams to a peer node over one
long-lived mux tunnel, so a node accepts few tunnel connections, and with
plain ``SO_REUSEPORT`` a hash of each one's addresses alone picks the
worker that serves it for its whole life.  With two workers, two tunnels
share one worker half the time: that worker then does all of the node's
inbound work while its sibling idles (measured with an L7 load: 88–94 µs
of CPU per request on one destination worker, 0.2 µs on the other).  A
plain round-robin is not enough either: it does not know the tunnels a
worker already holds (a worker added or restarted next to one holding the
node's only tunnel got the next one too).

The same holds on the outbound side, for a pod's few long-lived
connections (an HTTP/2 or gRPC client keeps one): the source worker that
accepts a pod connection carries its streams over its own tunnel, so two
such clients hashed to one worker load one source worker and, through its
tunnel, one destination worker.

How.  Three maps per group under ``<pin dir>/reuseport/`` (here the tunnel
group's; the outbound group's are ``outbound-v4``, ``outbound-v6`` and
``outbound-load``, its load the worker's active connections):

- ``tunnel-v4`` and ``tunnel-v6`` (``REUSEPORT_SOCKARRAY``): each worker
  files its tunnel listener in slot ``worker id``.  A program can only pick
  a socket of the SYN's own reuseport group, and each address family's
  listeners are a group of their own;
- ``tunnel-load`` (``ARRAY``, one u64 per slot): the tunnel connections
  each worker holds.  The worker writes its own count about once a second
  (:meth:`TunnelSpread.publish`); the program adds one when it sends a SYN
  there, so tunnels dialled at the same moment do not all see the same
  minimum.

A ``BPF_PROG_TYPE_SK_REUSEPORT`` program attached to the group
(``SO_ATTACH_REUSEPORT_EBPF``) scans the ``workers`` slots from a rotating
start (so equal loads take turns), picks the first with the smallest load,
and selects its listener.  It always answers ``SK_PASS``: where the slot is
empty (its worker is restarting) or holds a socket of another group (a
listener on an old port), ``bpf_sk_select_reuseport`` fails and the
kernel's hash picks among the group's listeners, as without the program.
No connection is refused by it.

Lifecycle.  The kernel takes a listener out of the array when it closes.  A
hand-over's successor files its listener in its slot over its
predecessor's, so new tunnels go to the new process while the old one
drains; the old one sees its listener gone from the slot and stops writing
the slot's load.  Every worker attaches its own copy of the program (with
its own rotation counter); the group runs the last one attached.  Queued
connections of a closing listener still move to a sibling
(``tcp_migrate_req``): a program attached for ``BPF_SK_REUSEPORT_SELECT``
leaves migration to the kernel.

bcc 0.26 cannot declare a ``reuseport_sockarray`` ("unsupported map
type"), so the program is written out here: a loop unrolled over the
slots, ~15 instructions each (the program for 64 workers is ~1,000).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from . import bpfsys
from .splicemap import socket_cookie

__all__ = ["GROUPS", "MAX_SLOTS", "PIN_SUBDIR", "SpreadError", "TunnelSpread", "pin_path", "program"]

PIN_SUBDIR = "reuseport"
#: listener group -> the short tag of its BPF object names (the kernel keeps 15 characters)
GROUPS = {"tunnel": "tunnel", "outbound": "out"}
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


def pin_path(pin_dir: str, family: int, group: str = "tunnel") -> str:
    """The group's REUSEPORT_SOCKARRAY for ``family``'s listeners."""
    return os.path.join(pin_dir, PIN_SUBDIR, f"{group}-v6" if family == socket.AF_INET6 else f"{group}-v4")


def load_path(pin_dir: str, group: str = "tunnel") -> str:
    """The group's load map (one u64 per worker slot)."""
    return os.path.join(pin_dir, PIN_SUBDIR, f"{group}-load")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ld_map_fd(dst: int, fd: int) -> bytes:
    # BPF_LD | BPF_DW | BPF_IMM with src = BPF_PSEUDO_MAP_FD: two slots
    return _insn(0x18, dst, 1, 0, fd) + _insn(0, 0, 0, 0, 0)


# opcodes (BPF_CLASS | BPF_SIZE/BPF_OP | BPF_SRC), see include/uapi/linux/bpf.h
_MOV_X, _MOV_K, _ADD_K, _MOD_K = 0xBF, 0xB7, 0x07, 0x97  # BPF_ALU64; MOD is unsigned
_LDX_W, _LDX_DW, _STX_W, _ST_W = 0x61, 0x79, 0x63, 0x62
_XADD_DW = 0xDB  # BPF_STX | BPF_ATOMIC | BPF_DW with imm BPF_ADD (0): the classic XADD, any kernel
_JEQ_K, _JGE_X, _CALL, _EXIT = 0x15, 0x3D, 0x85, 0x95
R0, R1, R2, R3, R4, R6, R7, R8, R9, FP = 0, 1, 2, 3, 4, 6, 7, 8, 9, 10


def program(counter_fd: int, load_fd: int, sockarray_fd: int, slots: int) -> bytes:
    """The SK_REUSEPORT program over ``slots`` workers.  Registers: r6 the
    context, r7 the rotating start, r8 the best slot so far, r9 its load.

    ``start = counter++ % slots``; for k in 0..slots-1, slot ``(start + k) %
    slots`` replaces the best when its load is strictly smaller (so among
    equals the first from ``start`` wins: equal loads take turns); then
    ``load[best] += 1``, ``bpf_sk_select_reuseport(ctx, sockarray, &best,
    0)``, and ``SK_PASS`` whatever the helper said."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slots must be 1..{MAX_SLOTS}, got {slots}")
    out = [
        _insn(_MOV_X, R6, R1),
        _insn(_ST_W, FP, 0, -4, 0),  # the counter's key, 0
        _insn(_MOV_X, R2, FP),
        _insn(_ADD_K, R2, 0, 0, -4),
        _ld_map_fd(R1, counter_fd),
        _insn(_CALL, imm=_HELPER_MAP_LOOKUP_ELEM),
        _insn(_MOV_K, R7, 0, 0, 0),
        _insn(_JEQ_K, R0, 0, 3, 0),  # never (an ARRAY's slot 0), but the verifier asks
        _insn(_LDX_DW, R7, R0, 0, 0),  # start = counter (racing SYNs may share one: harmless)
        _insn(_MOV_K, R1, 0, 0, 1),
        _insn(_XADD_DW, R0, R1, 0, 0),  # counter += 1
        _insn(_MOD_K, R7, 0, 0, slots),
        _insn(_MOV_X, R8, R7),
        _insn(_MOV_K, R9, 0, 0, -1),  # sign-extended: the largest u64
    ]
    for k in range(slots):
        out += [
            _insn(_MOV_X, R1, R7),
            _insn(_ADD_K, R1, 0, 0, k),
            _insn(_MOD_K, R1, 0, 0, slots),
            _insn(_STX_W, FP, R1, -8, 0),  # the slot, as the load map's key
            _ld_map_fd(R1, load_fd),
            _insn(_MOV_X, R2, FP),
            _insn(_ADD_K, R2, 0, 0, -8),
            _insn(_CALL, imm=_HELPER_MAP_LOOKUP_ELEM),
            _insn(_JEQ_K, R0, 0, 5, 0),
            _insn(_LDX_DW, R1, R0, 0, 0),  # its load
            _insn(_JGE_X, R1, R9, 3, 0),  # not smaller: keep the best
            _insn(_MOV_X, R9, R1),
            _insn(_LDX_W, R1, FP, -8, 0),
            _insn(_MOV_X, R8, R1),
        ]
    out += [
        _insn(_STX_W, FP, R8, -8, 0),  # the chosen slot
        _ld_map_fd(R1, load_fd),
        _insn(_MOV_X, R2, FP),
        _insn(_ADD_K, R2, 0, 0, -8),
        _insn(_CALL, imm=_HELPER_MAP_LOOKUP_ELEM),
        _insn(_JEQ_K, R0, 0, 2, 0),
        _insn(_MOV_K, R1, 0, 0, 1),
        _insn(_XADD_DW, R0, R1, 0, 0),  # load[best] += 1 until its worker writes its count
        _insn(_MOV_X, R1, R6),
        _ld_map_fd(R2, sockarray_fd),
        _insn(_MOV_X, R3, FP),
        _insn(_ADD_K, R3, 0, 0, -8),
        _insn(_MOV_K, R4, 0, 0, 0),
        _insn(_CALL, imm=_HELPER_SK_SELECT_REUSEPORT),  # an error: the kernel's hash picks
        _insn(_MOV_K, R0, 0, 0, SK_PASS),
        _insn(_EXIT),
    ]
    return b"".join(out)


def _open_pinned(path: str, map_type: int, name: str) -> int:
    """The map pinned at ``path`` (u32 keys, u64 values, MAX_SLOTS entries),
    created and pinned by the first worker to get here; a sibling racing it
    opens the one that won."""
    for _ in range(3):
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.PinNotFound:
            pass
        else:
            info = bpfsys.map_info(fd)
            if (info.type, info.key_size, info.value_size, info.max_entries) != (map_type, 4, 8, MAX_SLOTS):
                os.close(fd)
                want = bpfsys.MAP_TYPE_NAMES.get(map_type, str(map_type))
                raise SpreadError(
                    errno.EINVAL,
                    f"{path} is a {info.type_name} map ({info.key_size}/{info.value_size} bytes, "
                    f"{info.max_entries} entries), not the {MAX_SLOTS}-slot {want} this worker "
                    "expects; remove it (the workers re-create it)",
                )
            return fd
        fd = bpfsys.map_create(map_type, 4, 8, MAX_SLOTS, name)
        try:
            bpfsys.obj_pin(fd, path)
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EEXIST:
                raise
    raise SpreadError(errno.EAGAIN, f"{path}: pinned and unpinned under us three times")


class TunnelSpread:
    """One worker's part in one listener ``group`` (``GROUPS``; the tunnel
    listener's by default): its slot in the arrays, its listeners filed
    there, and the load it publishes.  Every method raises
    :class:`SpreadError` (an ``OSError``) saying which step the kernel
    refused; the listeners keep serving by the kernel's hash."""

    def __init__(self, pin_dir: str, slot: int, slots: int, group: str = "tunnel") -> None:
        if not 0 <= slot < slots <= MAX_SLOTS:
            raise ValueError(f"slot {slot} of {slots}: need 0 <= slot < slots <= {MAX_SLOTS}")
        if group not in GROUPS:
            raise ValueError(f"unknown listener group {group!r} (one of {', '.join(GROUPS)})")
        self.pin_dir, self.slot, self.slots, self.group = pin_dir, slot, slots, group
        self._tag = GROUPS[group]
        self._key = _U32.pack(slot)
        self._arrays: list[tuple[int, bytes]] = []  # (array fd, our listener's cookie)
        self.published: int | None = None  # the load last written
        path = load_path(pin_dir, group)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._load = _open_pinned(path, MAP_TYPE_ARRAY, f"ml_{self._tag}_load")
        except OSError as e:
            raise _error(e, "open or create the load map", path) from None
        try:
            self.publish(0)  # a restarted worker holds no tunnel yet, whatever its predecessor left
        except OSError:
            self.close()
            raise

    def add_listener(self, sock: socket.socket) -> None:
        """File the listening ``sock`` in this worker's slot of its family's
        array and attach the program to its reuseport group."""
        path = pin_path(self.pin_dir, sock.family, self.group)
        step = "open or create the reuseport_sockarray"
        counter = array = prog = -1
        try:
            array = _open_pinned(path, MAP_TYPE_REUSEPORT_SOCKARRAY, f"ml_{self._tag}_socks")
            step = f"file the listener in slot {self.slot}"
            bpfsys.map_update(array, self._key, _U64.pack(sock.fileno()))
            step = "create the program's counter"
            counter = bpfsys.map_create(MAP_TYPE_ARRAY, 4, 8, 1, f"ml_{self._tag}_rr")
            step = "load the SK_REUSEPORT program"
            prog = bpfsys.prog_load(
                bpfsys.PROG_TYPE_SK_REUSEPORT,
                program(counter, self._load, array, self.slots),
                name=f"ml_{self._tag}_pick",
            )
            step = "attach it (SO_ATTACH_REUSEPORT_EBPF)"
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, _U32.pack(prog))
            self._arrays.append((array, _U64.pack(socket_cookie(sock))))  # a lookup answers the cookie
            array = -1  # kept: publish() checks the slot is still ours
        except OSError as e:
            raise _error(e, step, path) from None
        finally:
            for fd in (prog, counter, array):  # the group holds the program, the program its maps
                if fd >= 0:
                    os.close(fd)

    def owns_slot(self) -> bool:
        """Whether one of this worker's listeners is still in its slot (a
        hand-over's successor files its own there)."""
        for fd, cookie in self._arrays:
            if bpfsys.map_lookup(fd, self._key, 8) == cookie:
                return True
        return False

    def publish(self, load: int) -> bool:
        """Write this worker's load (the tunnel connections it holds, or for
        the outbound group its active connections) into its slot of the load
        map, unless a successor has taken the slot.  Written every time
        (it also clears what the program reserved for SYNs that have been
        accepted since); False when the slot is no longer ours."""
        if self._arrays and not self.owns_slot():
            return False
        bpfsys.map_update(self._load, self._key, _U64.pack(load))
        self.published = load
        return True

    def close(self) -> None:
        for fd, _ in self._arrays:
            os.close(fd)
        self._arrays.clear()
        if self._load >= 0:
            os.close(self._load)
            self._load = -1


def _error(e: OSError, step: str, path: str) -> SpreadError:
    if isinstance(e, SpreadError):
        return e
    return SpreadError(e.errno, f"cannot {step} at {path}: {e.strerror or e}")
