"""Load, pin, adopt and tear down meshlet's eBPF datapath.

Pin layout under ``pin_dir`` (default /sys/fs/bpf/meshlet/<node>):

    ml_*            maps (created and pinned by bcc's BPF_TABLE_PINNED)
    events/ml_*     ring buffers (no keys to list, so kept apart from the maps)
    progs/<name>    the loaded programs
    links/cgroup-*  bpf links attaching the socket hooks to the node cgroup
    links/tc-*      tcx links on the node side of each enrolled pod's veth

Everything is a bpf link pinned in bpffs, so the datapath keeps working when
the agent exits, and a restarted agent that finds a complete, current set of
pins adopts them (no compile, no second attachment).

Strict mode's program goes on each pod's veth through tcx links (kernel
>= 6.6) or, on older kernels (Debian 12's 6.1, Ubuntu 22.04's 5.15), through
a cls_bpf filter on a clsact qdisc (``netlink.clsact_*``).  Such a filter is
no bpffs object: it is found again by its name, ``meshlet:<pin dir>``, and
stays attached when the agent exits, like the links.  ``tc_attach`` chooses
(``auto``: tcx when the kernel has it).  A pin set from another
version of the C (its hash is kept in ml_meta) is torn down and reloaded.

bcc is imported only when programs must be compiled; everything else goes
through the plain bpf(2) syscall (bpfsys).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

from .. import cgroup as cg
from . import abi, bpfsys

log = logging.getLogger("meshlet.datapath")

BPF_SOURCES = ("include/meshlet.h", "sock.c", "tc.c", "flows.c")


def bpf_dir() -> str:
    """Where the C lives: $MESHLET_BPF_DIR, else the repo's bpf/ directory."""
    env = os.environ.get("MESHLET_BPF_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "bpf"))


FLOW_PROG = "ml_flow_ops"   # "ml_flows" is the 4-tuple map's name


@dataclass(frozen=True)
class CgroupHook:
    name: str           # program (function) name in sock.c
    prog_type: int
    attach_type: int


CGROUP_HOOKS = (
    CgroupHook("ml_connect4", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    CgroupHook("ml_connect6", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    CgroupHook("ml_sockops", bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    CgroupHook("ml_getpeername4", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR,
               bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    CgroupHook("ml_getpeername6", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR,
               bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    # flows.c: a second sock_ops program, its own link, attached after
    # ml_sockops so it runs after it (it ORs its callback flags onto ml_sockops').
    CgroupHook(FLOW_PROG, bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
)
TC_PROG = "ml_tc_to_pod"
ALL_PROGS = tuple(h.name for h in CGROUP_HOOKS) + (TC_PROG,)


def cgroup_hooks(spec: "DatapathSpec") -> tuple[CgroupHook, ...]:
    """The cgroup hooks this spec compiles and attaches."""
    return tuple(h for h in CGROUP_HOOKS if spec.flow_tracking or h.name != FLOW_PROG)


TC_ATTACH_MODES = ("auto", "tcx", "clsact")


def _tc_attach_default() -> str:
    # An ad-hoc switch (MESHLET_TC_ATTACH=clsact) next to the config's bpf.tcAttach.
    return os.environ.get("MESHLET_TC_ATTACH", "auto")


def clsact_owner(pin_dir: str) -> str:
    """The name of this datapath's cls_bpf filters."""
    return f"meshlet:{os.path.normpath(pin_dir)}"


_tcx_works: bool | None = None


def resolve_tc_attach(want: str) -> str:
    """'tcx' or 'clsact' for ``want`` ('auto' probes tcx once per process)."""
    global _tcx_works
    if want not in TC_ATTACH_MODES:
        raise DatapathError(f"tc attach mode {want!r} is not one of {', '.join(TC_ATTACH_MODES)} "
                            "(bpf.tcAttach or MESHLET_TC_ATTACH)")
    if want != "auto":
        return want
    if _tcx_works is None:
        from . import probe

        try:
            probe.tcx_link_works()
            _tcx_works = True
        except OSError as e:
            log.info("no tcx links on this kernel (%s): strict mode uses clsact/cls_bpf", e)
            _tcx_works = False
    return "tcx" if _tcx_works else "clsact"


def _flow_tracking_default() -> bool:
    # A development switch for side-by-side benchmarks (MESHLET_FLOW_TRACKING=0).
    return os.environ.get("MESHLET_FLOW_TRACKING", "1") != "0"


@dataclass(frozen=True)
class DatapathSpec:
    """What the datapath must do on this node (from the agent config)."""

    node: str
    pin_dir: str
    cgroup: str                     # absolute cgroup v2 dir holding the node's pods
    redirect_ip4: str
    redirect_ip6: str | None
    outbound_port: int
    mesh_mark: int
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    max_flows: int = 65536
    max_workloads: int = 4096
    tunnel_port: int = 15008
    max_live_flows: int = 65536         # ml_live_flows (LRU) and ml_flow_links
    flow_ringbuf_bytes: int = 1 << 20   # ml_flow_events; a power of two >= one page
    flow_tracking: bool = field(default_factory=_flow_tracking_default)
    max_l4_rules: int = 16384           # ml_l4_policy: connect-time L4 authorization entries
    tc_attach: str = field(default_factory=_tc_attach_default)  # auto | tcx | clsact


@dataclass(frozen=True)
class Rendered:
    text: str
    cflags: tuple[str, ...]

    @property
    def source_hash(self) -> int:
        h = hashlib.sha256(self.text.encode() + b"\0" + "\0".join(self.cflags).encode())
        return int.from_bytes(h.digest()[:8], "little")


def render(spec: DatapathSpec, src_dir: str | None = None) -> Rendered:
    """The exact C text and cflags handed to bcc (``meshlet bpf render``)."""
    src_dir = src_dir or bpf_dir()
    parts = []
    for rel in BPF_SOURCES:
        path = os.path.join(src_dir, rel)
        with open(path) as f:
            parts.append(f"/* ---- bpf/{rel} ---- */\n{f.read()}")
    cflags = (
        f'-DML_PIN_DIR="{spec.pin_dir}"',
        f"-DML_MAX_FLOWS={spec.max_flows}",
        f"-DML_MAX_WORKLOADS={spec.max_workloads}",
        f"-DML_MAX_LIVE_FLOWS={spec.max_live_flows}",
        f"-DML_FLOW_RINGBUF_BYTES={spec.flow_ringbuf_bytes}",
        f"-DML_FLOW_TRACKING={1 if spec.flow_tracking else 0}",
        f"-DML_MAX_L4_RULES={spec.max_l4_rules}",
    )
    return Rendered("\n".join(parts), cflags)


class DatapathError(RuntimeError):
    """The datapath could not be brought up; the message says what to do."""


@dataclass
class WorkloadEntry:
    workload_id: int
    mode: int


L4Entries = dict[tuple[int, str, int], tuple[int, int]]
"""ml_l4_policy content: (source workload id, destination IP, port or 0) ->
(abi.L4_DENY or abi.L4_PASS, policy id)."""


@dataclass
class Datapath:
    spec: DatapathSpec
    maps: dict[str, int] = field(default_factory=dict)
    how: str = ""
    tc_mode: str = ""    # how strict mode attaches here: 'tcx' or 'clsact' (set by open())
    _l4: dict[bytes, bytes] | None = None   # what ml_l4_policy holds (None: read it first)

    # --- lifecycle ---------------------------------------------------------

    def open(self) -> str:
        """Adopt a matching pinned datapath or load a fresh one.  Returns
        'adopted' or 'loaded'.  On failure nothing stays attached."""
        os.makedirs(self.spec.pin_dir, exist_ok=True)
        self.tc_mode = resolve_tc_attach(self.spec.tc_attach)
        rendered = render(self.spec)
        if self._adoptable(rendered):
            self._open_maps()
            self.how = "adopted"
            log.info("adopted pinned datapath in %s", self.spec.pin_dir)
        else:
            if os.listdir(self.spec.pin_dir):
                log.info("pinned datapath in %s is stale or incomplete; reloading",
                         self.spec.pin_dir)
                # clsact filters keep the old program (and its maps) until
                # sync_tc swaps in the new one: strict mode has no gap.
                self.teardown(keep_clsact=True)
                os.makedirs(self.spec.pin_dir, exist_ok=True)
            try:
                self._load(rendered)
            except Exception:
                self.teardown()
                raise
            self.how = "loaded"
        self.write_config(enabled=True)
        return self.how

    def close(self) -> None:
        for fd in self.maps.values():
            os.close(fd)
        self.maps.clear()
        self._l4 = None

    def teardown(self, keep_clsact: bool = False) -> None:
        """Detach every link and clsact filter and remove every pin
        (idempotent)."""
        self.close()
        remove_pins(self.spec.pin_dir, keep_clsact=keep_clsact)
        log.info("datapath removed from %s", self.spec.pin_dir)

    # --- load / adopt --------------------------------------------------------

    def _cgroup_fd(self) -> int:
        try:
            return os.open(self.spec.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise DatapathError(f"cannot open node cgroup {self.spec.cgroup}: {e.strerror}; "
                                "check 'cgroup:' in the config points at the cgroup v2 "
                                "directory holding this node's pods") from e

    def _adoptable(self, rendered: Rendered) -> bool:
        pd = self.spec.pin_dir
        hooks = cgroup_hooks(self.spec)
        needed = [os.path.join(pd, m) for m in abi.MAPS] + \
            [os.path.join(pd, abi.EVENTS_DIR, m) for m in abi.RINGBUFS] + \
            [os.path.join(pd, "progs", h.name) for h in hooks] + \
            [os.path.join(pd, "progs", TC_PROG)] + \
            [os.path.join(pd, "links", f"cgroup-{h.name}") for h in hooks]
        if not all(os.path.exists(p) for p in needed):
            return False
        try:
            fd = bpfsys.obj_get(os.path.join(pd, "ml_meta"))
            try:
                raw = bpfsys.map_lookup(fd, bytes(ctypes.c_uint32(0)), ctypes.sizeof(abi.MlMeta))
            finally:
                os.close(fd)
            meta = abi.MlMeta.from_buffer_copy(raw) if raw else None
            if not meta or meta.source_hash != rendered.source_hash \
                    or meta.abi_version != abi.ABI_VERSION:
                return False
            cgid = cg.cgroup_id(self.spec.cgroup)
            for h in hooks:
                info = _pinned_link_info(os.path.join(pd, "links", f"cgroup-{h.name}"))
                prog = _pinned_prog_info(os.path.join(pd, "progs", h.name))
                if info is None or prog is None or info.prog_id != prog.id \
                        or info.target != cgid or info.attach_type != h.attach_type:
                    return False
        except OSError:
            return False
        return True

    def _load(self, rendered: Rendered) -> None:
        try:
            from bcc import BPF  # noqa: heavy import, agent only
        except ImportError as e:
            raise DatapathError("cannot import bcc: install python3-bpfcc and use a venv made "
                                "with --system-site-packages (run the README's bootstrap)") from e
        try:
            b = BPF(text=rendered.text.encode(), cflags=list(rendered.cflags))
        except Exception as e:
            raise DatapathError(f"bcc failed to compile the datapath: {e}; run 'meshlet doctor' "
                                "(kernel headers under /lib/modules/$(uname -r)/build?)") from e
        try:
            progs = {}
            hooks = cgroup_hooks(self.spec)
            for h in hooks:
                if h.prog_type == bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR:
                    fn = b.load_func(h.name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=h.attach_type)
                else:
                    fn = b.load_func(h.name.encode(), BPF.SOCK_OPS)
                progs[h.name] = fn.fd
            progs[TC_PROG] = b.load_func(TC_PROG.encode(), BPF.SCHED_CLS).fd
            os.makedirs(os.path.join(self.spec.pin_dir, "progs"), exist_ok=True)
            os.makedirs(os.path.join(self.spec.pin_dir, "links"), exist_ok=True)
            for name, fd in progs.items():
                bpfsys.obj_pin(fd, os.path.join(self.spec.pin_dir, "progs", name))
            self._open_maps()
            meta = abi.MlMeta(rendered.source_hash, abi.ABI_VERSION, 0)
            bpfsys.map_update(self.maps["ml_meta"], bytes(ctypes.c_uint32(0)), bytes(meta))
            # Config before attaching: hooks must never run half-configured.
            self.write_config(enabled=True)
            self.sync_excludes()
            cgfd = self._cgroup_fd()
            try:
                for h in hooks:
                    try:
                        lfd = bpfsys.link_create(progs[h.name], cgfd, h.attach_type)
                    except OSError as e:
                        raise DatapathError(
                            f"cannot attach {h.name} to {self.spec.cgroup}: {e.strerror}; "
                            "run 'meshlet doctor'") from e
                    try:
                        bpfsys.obj_pin(lfd, os.path.join(self.spec.pin_dir, "links",
                                                         f"cgroup-{h.name}"))
                    finally:
                        os.close(lfd)
            finally:
                os.close(cgfd)
        finally:
            b.cleanup()
        log.info("datapath compiled, loaded and pinned in %s (cgroup %s)",
                 self.spec.pin_dir, self.spec.cgroup)

    def _open_maps(self) -> None:
        self.close()
        for name in abi.MAPS:
            path = os.path.join(self.spec.pin_dir, name)
            try:
                self.maps[name] = bpfsys.obj_get(path)
            except OSError as e:
                raise DatapathError(f"pinned map {path} missing: {e.strerror}") from e

    # --- data ----------------------------------------------------------------

    def write_config(self, enabled: bool = True) -> None:
        c = abi.MlConfig()
        _, w4 = abi.pack_addr(self.spec.redirect_ip4)
        c.redirect_ip4_be = w4[0]
        if self.spec.redirect_ip6:
            _, w6 = abi.pack_addr(self.spec.redirect_ip6)
            for i in range(4):
                c.redirect_ip6_be[i] = w6[i]
            c.has_ip6 = 1
        c.outbound_port = self.spec.outbound_port
        c.enabled = 1 if enabled else 0
        c.mesh_mark = self.spec.mesh_mark
        c.tunnel_port = self.spec.tunnel_port
        bpfsys.map_update(self.maps["ml_config"], bytes(ctypes.c_uint32(0)), bytes(c))

    def sync_excludes(self) -> None:
        want_ports = {bytes(ctypes.c_uint16(p)) for p in self.spec.exclude_ports}
        _sync_set(self.maps["ml_excl_ports"], 2, want_ports, b"\x01")
        want4, want6 = set(), set()
        for cidr in self.spec.exclude_cidrs:
            k = abi.cidr_key(cidr)
            (want4 if isinstance(k, abi.MlCidr4Key) else want6).add(bytes(k))
        _sync_set(self.maps["ml_excl_cidr4"], ctypes.sizeof(abi.MlCidr4Key), want4, b"\x01")
        _sync_set(self.maps["ml_excl_cidr6"], ctypes.sizeof(abi.MlCidr6Key), want6, b"\x01")

    def sync_workloads(self, by_cgroup: dict[int, WorkloadEntry],
                       by_ip: dict[str, WorkloadEntry]) -> dict[str, int]:
        """Make ml_enrolled and ml_pod_ips hold exactly these entries; returns
        counts of what changed."""
        enrolled = {bytes(ctypes.c_uint64(cgid)): bytes(abi.MlWorkload(w.workload_id, w.mode))
                    for cgid, w in by_cgroup.items()}
        ips = {bytes(abi.ip_key(ip)): bytes(abi.MlWorkload(w.workload_id, w.mode))
               for ip, w in by_ip.items()}
        a = _sync_map(self.maps["ml_enrolled"], 8, enrolled)
        b = _sync_map(self.maps["ml_pod_ips"], ctypes.sizeof(abi.MlIpKey), ips)
        return {"enrolled_changed": a, "pod_ips_changed": b}

    def sync_l4(self, entries: L4Entries) -> dict[str, int]:
        """Make ml_l4_policy hold exactly ``entries``, in an order that never
        refuses more than the old or the new content would: new PASS entries
        first, then stale DENYs out, then new DENYs in, then stale PASSes out.
        Returns what changed.  Raises OSError (e.g. E2BIG when full)."""
        fd = self.maps["ml_l4_policy"]
        ksz, vsz = ctypes.sizeof(abi.MlL4Key), ctypes.sizeof(abi.MlL4Verdict)
        if self._l4 is None:  # first sync after open/adopt: what is pinned now
            have = {}
            for k in bpfsys.map_keys(fd, ksz, limit=self.spec.max_l4_rules + 1):
                v = bpfsys.map_lookup(fd, k, vsz)
                if v is not None:
                    have[k] = v
            self._l4 = have
        have = self._l4
        want = {bytes(abi.l4_key(wid, ip, port)): bytes(abi.MlL4Verdict(pid, action))
                for (wid, ip, port), (action, pid) in entries.items()}

        def deny(v: bytes) -> bool:
            return abi.MlL4Verdict.from_buffer_copy(v).action == abi.L4_DENY

        added = removed = updated = 0

        def put(k: bytes, v: bytes) -> None:
            nonlocal added, updated
            bpfsys.map_update(fd, k, v)
            if k in have:
                updated += 1
            else:
                added += 1
            have[k] = v

        def drop(k: bytes) -> None:
            nonlocal removed
            try:
                bpfsys.map_delete(fd, k)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            del have[k]
            removed += 1

        for k, v in want.items():
            if not deny(v) and have.get(k) != v:
                put(k, v)
        for k in [k for k, v in have.items() if deny(v) and k not in want]:
            drop(k)
        for k, v in want.items():
            if deny(v) and have.get(k) != v:
                put(k, v)
        for k in [k for k in have if k not in want]:
            drop(k)
        return {"added": added, "updated": updated, "removed": removed, "entries": len(have)}

    def l4_denied(self) -> dict[int, int]:
        """policy id -> connects the kernel refused for it (ml_l4_denied)."""
        return read_l4_denied(self.maps["ml_l4_denied"])

    def enrolled_cgroups(self) -> set[int]:
        return {ctypes.c_uint64.from_buffer_copy(k).value
                for k in bpfsys.map_keys(self.maps["ml_enrolled"], 8)}

    def stats(self) -> dict[str, int]:
        return read_stats(self.maps["ml_stats"])

    # --- tc (strict inbound) -------------------------------------------------

    def sync_tc(self, wanted: dict[int, str]) -> list[str]:
        """Put the strict-mode program on every wanted {ifindex: ifname} and
        take it off every other interface, through ``tc_mode``; anything
        attached the other way (a datapath adopted across a mode switch) is
        removed once the new attachments are in place.  Returns error strings."""
        mode = self.tc_mode or resolve_tc_attach(self.spec.tc_attach)
        if mode == "tcx":
            errors = self._sync_tcx(wanted)
            self._sync_clsact({})
        else:
            errors = self._sync_clsact(wanted)
            self._sync_tcx({})
        return errors

    def tc_attachments(self) -> dict[int, str]:
        """{ifindex: ifname} carrying the strict-mode program now (both ways)."""
        from . import netlink

        out = {f.ifindex: f.ifname for f in
               netlink.clsact_filters(clsact_owner(self.spec.pin_dir)).values()}
        links_dir = os.path.join(self.spec.pin_dir, "links")
        for name in os.listdir(links_dir) if os.path.isdir(links_dir) else ():
            if name.startswith("tc-"):
                _, idx, ifname = name.split("-", 2)
                out[int(idx)] = ifname
        return out

    def _sync_tcx(self, wanted: dict[int, str]) -> list[str]:
        """Keep one tcx egress link per wanted {ifindex: ifname}; drop links of
        interfaces that are gone or no longer wanted."""
        from . import netlink

        links_dir = os.path.join(self.spec.pin_dir, "links")
        have: dict[int, str] = {}
        for name in os.listdir(links_dir):
            if not name.startswith("tc-"):
                continue
            path = os.path.join(links_dir, name)
            _, idx, ifname = name.split("-", 2)
            info = _pinned_link_info(path)
            alive = info is not None and info.target == int(idx) and \
                netlink.ifindex_alive(int(idx), ifname)
            if not alive or wanted.get(int(idx)) != ifname:
                _detach_pinned_link(path)
            else:
                have[int(idx)] = ifname
        errors = []
        prog_path = os.path.join(self.spec.pin_dir, "progs", TC_PROG)
        missing = {i: n for i, n in wanted.items() if i not in have}
        if not missing:
            return errors
        pfd = bpfsys.obj_get(prog_path)
        try:
            for idx, ifname in missing.items():
                try:
                    lfd = bpfsys.link_create(pfd, idx, bpfsys.ATTACH_TCX_EGRESS)
                except OSError as e:
                    errors.append(f"cannot attach {TC_PROG} to {ifname} (tcx): {e.strerror}")
                    continue
                try:
                    bpfsys.obj_pin(lfd, os.path.join(links_dir, f"tc-{idx}-{ifname}"))
                finally:
                    os.close(lfd)
        finally:
            os.close(pfd)
        return errors

    def _sync_clsact(self, wanted: dict[int, str]) -> list[str]:
        """Keep our cls_bpf filter, running the pinned program, on the clsact
        egress hook of every wanted interface and of no other.  A filter that
        runs another program (left by the previous load) is replaced in place."""
        from . import netlink

        owner = clsact_owner(self.spec.pin_dir)
        have = netlink.clsact_filters(owner)
        errors = []
        if wanted:
            pfd = bpfsys.obj_get(os.path.join(self.spec.pin_dir, "progs", TC_PROG))
            try:
                prog_id = bpfsys.prog_info(pfd).id
                for idx, ifname in wanted.items():
                    f = have.get(idx)
                    if f is not None and f.ifname == ifname and f.prog_id == prog_id:
                        continue
                    try:
                        netlink.clsact_attach(idx, pfd, owner)
                    except OSError as e:
                        errors.append(f"cannot attach {TC_PROG} to {ifname} (clsact): "
                                      f"{e.strerror or e}")
            finally:
                os.close(pfd)
        for idx, f in have.items():
            if wanted.get(idx) != f.ifname:
                try:
                    netlink.clsact_detach(idx)
                except OSError as e:
                    errors.append(f"cannot remove {TC_PROG} from {f.ifname} (clsact): {e}")
        return errors


# --- helpers shared with `meshlet bpf status` --------------------------------

def _pinned_link_info(path: str) -> bpfsys.LinkInfo | None:
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return None
    try:
        return bpfsys.link_info(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _pinned_prog_info(path: str) -> bpfsys.ProgInfo | None:
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return None
    try:
        return bpfsys.prog_info(fd)
    finally:
        os.close(fd)


def remove_pins(pin_dir: str, keep_clsact: bool = False) -> None:
    """Detach every pinned link under ``pin_dir`` and every clsact filter of
    that datapath (unless ``keep_clsact``), and remove all its pins."""
    if not keep_clsact:
        from . import netlink

        for idx in netlink.clsact_filters(clsact_owner(pin_dir)):
            try:
                netlink.clsact_detach(idx)
            except OSError as e:
                log.warning("removing the clsact filter of %s from ifindex %d: %s",
                            pin_dir, idx, e)
    links = os.path.join(pin_dir, "links")
    if os.path.isdir(links):
        for name in os.listdir(links):
            _detach_pinned_link(os.path.join(links, name))
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)
    remove_empty_parent(pin_dir)


def remove_empty_parent(path: str, name: str = "meshlet") -> None:
    """Remove the shared parent (``.../meshlet``) the agent created for its
    node's directory, once no node uses it any more."""
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.basename(parent) == name:
        try:
            os.rmdir(parent)
        except OSError:
            pass  # another node's directory is still there (or it is not ours)


def _detach_pinned_link(path: str) -> None:
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        fd = None
    if fd is not None:
        try:
            bpfsys.bpf(bpfsys.LINK_DETACH, bpfsys._attr("=I", fd))
        except OSError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
                log.warning("detaching %s: %s", path, e)
        finally:
            os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_map(fd: int, key_size: int, want: dict[bytes, bytes]) -> int:
    changed = 0
    for k in list(bpfsys.map_keys(fd, key_size)):
        if k not in want:
            bpfsys.map_delete(fd, k)
            changed += 1
    for k, v in want.items():
        cur = bpfsys.map_lookup(fd, k, len(v))
        if cur != v:
            bpfsys.map_update(fd, k, v)
            changed += 1
    return changed


def _sync_set(fd: int, key_size: int, want: set[bytes], value: bytes) -> int:
    return _sync_map(fd, key_size, {k: value for k in want})


def possible_cpus() -> int:
    """Number of possible CPUs (the stride of per-CPU map values)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def read_l4_denied(fd: int) -> dict[int, int]:
    out = {}
    for k in bpfsys.map_keys(fd, 4):
        v = bpfsys.map_lookup(fd, k, 8)
        if v is not None:
            out[int.from_bytes(k, sys.byteorder)] = int.from_bytes(v, sys.byteorder)
    return out


def read_stats(fd: int) -> dict[str, int]:
    ncpu = possible_cpus()
    out = {}
    for i, name in enumerate(abi.STATS):
        raw = bpfsys.map_lookup(fd, bytes(ctypes.c_uint32(i)), 8 * ncpu)
        out[name] = sum(int.from_bytes(raw[j:j + 8], "little") for j in range(0, len(raw), 8)) \
            if raw else 0
    return out
