"""The plain bpf(2) syscall through ctypes — no bcc, no LLVM.

Proxy workers and the CLI use this to reach pinned maps and to inspect
programs and links; the agent uses it for what bcc 0.26 lacks (bpf links,
program queries).  Only the commands meshlet needs are wrapped.  Layouts follow
``union bpf_attr`` in include/uapi/linux/bpf.h; every command zero-fills a
128-byte attr buffer and sets only the leading fields it uses.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
# dlopen(NULL): the C library this process already runs on.  Not
# ctypes.util.find_library, which runs ldconfig in a child and imports
# tempfile and shutil into the agent and every proxy worker for good.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_NEXT_ID = 11
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
MAP_LOOKUP_AND_DELETE_ELEM = 21
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34
ENABLE_STATS = 32

# enum bpf_attach_type (the ones meshlet uses)
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_SKB_STREAM_VERDICT = 5
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30
ATTACH_TCX_INGRESS = 46
ATTACH_TCX_EGRESS = 47

ATTACH_TYPE_NAMES = {
    ATTACH_CGROUP_SOCK_OPS: "cgroup/sock_ops",
    ATTACH_CGROUP_INET4_CONNECT: "cgroup/connect4",
    ATTACH_CGROUP_INET6_CONNECT: "cgroup/connect6",
    ATTACH_CGROUP_INET4_GETPEERNAME: "cgroup/getpeername4",
    ATTACH_CGROUP_INET6_GETPEERNAME: "cgroup/getpeername6",
    ATTACH_TCX_INGRESS: "tcx/ingress",
    ATTACH_TCX_EGRESS: "tcx/egress",
}

# enum bpf_prog_type (subset)
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_SK_SKB = 14
PROG_TYPE_SK_MSG = 16
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_SK_REUSEPORT = 21

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_link_type
LINK_TYPE_NAMES = {
    1: "raw_tracepoint",
    2: "tracing",
    3: "cgroup",
    4: "iter",
    5: "netns",
    6: "xdp",
    7: "perf_event",
    8: "kprobe_multi",
    9: "struct_ops",
    10: "netfilter",
    11: "tcx",
    12: "uprobe_multi",
    13: "netkit",
}
MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    3: "prog_array",
    4: "perf_event_array",
    5: "percpu_hash",
    6: "percpu_array",
    7: "stack_trace",
    8: "cgroup_array",
    9: "lru_hash",
    10: "lru_percpu_hash",
    11: "lpm_trie",
    15: "sockmap",
    18: "sockhash",
    20: "reuseport_sockarray",
    27: "ringbuf",
}
PROG_TYPE_NAMES = {
    3: "sched_cls",
    13: "sock_ops",
    18: "cgroup_sock_addr",
    16: "sk_msg",
    14: "sk_skb",
    8: "cgroup_skb",
    9: "cgroup_sock",
    21: "sk_reuseport",
}


class BPFError(OSError):
    """A failed bpf(2) call; ``errno`` and the command are kept."""


def bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    buf = ctypes.create_string_buffer(128)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _ptr(buf) -> int:
    return ctypes.addressof(buf)


# --- objects -------------------------------------------------------------


class PinNotFound(BPFError, FileNotFoundError):
    """``obj_get`` of a path with nothing pinned: a ``FileNotFoundError``, as
    an ``open`` of it would raise, and a ``BPFError``."""


def obj_get(path: str, read_only: bool = False) -> int:
    """Open a pinned object; returns a new fd (caller closes).  Nothing
    pinned at ``path``: PinNotFound."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    flags = 1 << 3 if read_only else 0  # BPF_F_RDONLY
    try:
        return bpf(OBJ_GET, _attr("=QII", _ptr(p), 0, flags))
    except BPFError as e:
        if e.errno == errno.ENOENT:
            raise PinNotFound(e.errno, f"nothing pinned at {path}") from None
        raise


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, _attr("=QI", _ptr(p), fd))


# --- maps ----------------------------------------------------------------


def _lookup(cmd: int, fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(cmd, _attr("=I4xQQQ", fd, _ptr(k), _ptr(v), 0))
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "") -> int:
    """BPF_MAP_CREATE; returns the new map's fd (caller closes).  Only for
    maps bcc cannot declare (``agent.datapath.reuseport``): the datapath's
    own maps come from the C."""
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name
    attr = _attr("=IIIIIII16s", map_type, key_size, value_size, max_entries, 0, 0, 0, name.encode()[:15])
    return bpf(MAP_CREATE, attr)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    return _lookup(MAP_LOOKUP_ELEM, fd, key, value_size)


def map_lookup_and_delete(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Look up and remove ``key`` in one bpf(2) call (hash maps: kernel
    5.14+).  None if absent.  Raises BPFError (EINVAL, ENOTSUPP) where the
    map type or kernel lacks the command: fall back to lookup + delete."""
    return _lookup(MAP_LOOKUP_AND_DELETE_ELEM, fd, key, value_size)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _attr("=I4xQQQ", fd, _ptr(k), _ptr(v), flags))


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _attr("=I4xQ", fd, _ptr(k)))
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, limit: int = 1 << 20):
    """Iterate over the keys of a hash-like map (bounded by ``limit``)."""
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    for _ in range(limit):
        if cur is None:
            attr = _attr("=I4xQQ", fd, 0, _ptr(nxt))
        else:
            kb = ctypes.create_string_buffer(cur, key_size)
            attr = _attr("=I4xQQ", fd, _ptr(kb), _ptr(nxt))
        try:
            bpf(MAP_GET_NEXT_KEY, attr)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        cur = nxt.raw
        yield cur


# --- info ----------------------------------------------------------------


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    # cgroup links: cgroup id + attach type; tcx links: ifindex + attach type
    target: int
    attach_type: int

    @property
    def type_name(self) -> str:
        return LINK_TYPE_NAMES.get(self.type, str(self.type))


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, _ptr(buf)))
    return buf.raw


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88)
    typ, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(typ, mid, ks, vs, me, fl, name)


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232)
    typ, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(typ, pid, tag, name)


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program: the kernel counts them only
    while run-time stats are enabled (:func:`enable_run_stats`)."""
    run_ns, runs = struct.unpack_from("=QQ", _info(fd, 232), 192)
    return run_ns, runs


def enable_run_stats() -> int:
    """Turn the kernel's per-program run-time stats on (BPF_ENABLE_STATS,
    BPF_STATS_RUN_TIME) until the returned fd is closed; they cost a clock
    read per program run, so keep them for measurements only."""
    return bpf(ENABLE_STATS, _attr("=I", 0))


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    typ, lid, pid = struct.unpack_from("=III", raw, 0)
    target = attach = 0
    if typ == 3:  # cgroup: __u64 cgroup_id; __u32 attach_type
        target, attach = struct.unpack_from("=QI", raw, 16)
    elif typ in (11, 13):  # tcx/netkit: __u32 ifindex; __u32 attach_type
        target, attach = struct.unpack_from("=II", raw, 16)
    return LinkInfo(typ, lid, pid, target, attach)


def obj_kind(fd: int) -> str:
    """'map', 'prog' or 'link' for an fd from obj_get (via /proc fdinfo)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "unknown"
    for kind in ("map", "prog", "link"):
        if f"bpf-{kind}" in link:
            return kind
    return "unknown"


# --- programs and attachments ---------------------------------------------


def prog_load(
    prog_type: int, insns: bytes, license: bytes = b"GPL", expected_attach_type: int = 0, name: str = ""
) -> int:
    """Load raw instructions (``meshlet doctor``'s probes of the hooks, and
    the proxy's tunnel spreading in ``agent.datapath.reuseport``).  Loaded
    without the verifier's log first (a long program's log fills any
    buffer, and the load then fails ENOSPC); on a refusal, once more with
    it, for the message."""
    ib = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)

    def load(log: ctypes.Array | None) -> int:
        buf = ctypes.create_string_buffer(128)
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
        # kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type
        struct.pack_into(
            "=IIQQIIQII16sII",
            buf,
            0,
            prog_type,
            len(insns) // 8,
            _ptr(ib),
            _ptr(lic),
            0 if log is None else 1,
            0 if log is None else len(log),
            0 if log is None else _ptr(log),
            0,
            0,
            name.encode()[:15],
            0,
            expected_attach_type,
        )
        return bpf(PROG_LOAD, buf)

    try:
        return load(None)
    except BPFError as first:
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return load(log)  # not expected to pass: the same program, now with the log
        except BPFError:
            pass
        msg = log.value.decode(errors="replace").strip()
        if len(msg) > 4000:  # the verifier's last words say why
            msg = "..." + msg[-4000:]
        raise BPFError(first.errno, f"{first.strerror}{': ' + msg if msg else ''}") from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    """BPF_PROG_ATTACH (legacy attach): e.g. an sk_skb verdict onto a
    SOCKHASH, which keeps the program for as long as the map lives."""
    bpf(PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, flags))


def link_create(prog_fd: int, target_fd_or_ifindex: int, attach_type: int, flags: int = 0) -> int:
    """BPF_LINK_CREATE: cgroup links take a cgroup dir fd, tcx links an ifindex."""
    return bpf(LINK_CREATE, _attr("=IIII", prog_fd, target_fd_or_ifindex, attach_type, flags))


F_REPLACE = 1 << 2  # BPF_F_REPLACE: LINK_UPDATE only if the link still runs old_prog_fd


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """BPF_LINK_UPDATE: swap the program a link runs, atomically (each packet
    or connect sees the old or the new program, never none).  With
    ``old_prog_fd`` the kernel refuses (EPERM) unless the link ran that one."""
    flags = F_REPLACE if old_prog_fd is not None else 0
    bpf(LINK_UPDATE, _attr("=IIII", link_fd, new_prog_fd, flags, old_prog_fd or 0))


def prog_query(target_fd_or_ifindex: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Program ids attached to a cgroup (or, for tcx, to an ifindex)."""
    ids = (ctypes.c_uint32 * max_progs)()
    # target_fd, attach_type, query_flags, attach_flags, prog_ids, prog_cnt
    buf = _attr("=IIIIQI", target_fd_or_ifindex, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    bpf(PROG_QUERY, buf)
    cnt = struct.unpack_from("=I", buf, 24)[0]
    return list(ids[:cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(PROG_GET_FD_BY_ID, _attr("=I", prog_id))
