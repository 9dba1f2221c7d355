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

bcc is imported only when programs must be compiled, and only in the
short-lived loader step (loadstep.py: ``load_or_upgrade`` runs there, in a
child process that pins and exits), never in the long-running agent, which
works on the pins through the plain bpf(2) syscall (bpfsys).

Size: about 1,050 lines: the datapath's whole lifecycle (render, load, adopt, upgrade in
place, strict mode through tcx or clsact, teardown) in one module, because each step must leave
the kernel in a state the others expect.  The pure parts (render, plan_upgrade) are plain
functions here and could move out first.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field

from .. import cgroup as cg
from . import abi, bpfsys

log = logging.getLogger("meshlet.datapath")

BPF_SOURCES = ("include/meshlet.h", "sock.c", "tc.c", "flowtrack.c", "splice.c")


def bpf_dir() -> str:
    """Where the C lives: $MESHLET_BPF_DIR, else the repo's bpf/ directory."""
    env = os.environ.get("MESHLET_BPF_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "bpf"))


FLOW_PROG = "ml_flow_ops"  # "ml_flows" is the 4-tuple map's name


@dataclass(frozen=True)
class CgroupHook:
    name: str  # program (function) name in sock.c
    prog_type: int
    attach_type: int


CGROUP_HOOKS = (
    CgroupHook("ml_connect4", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    CgroupHook("ml_connect6", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    CgroupHook("ml_sockops", bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    CgroupHook("ml_getpeername4", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    CgroupHook("ml_getpeername6", bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    # flowtrack.c: a second sock_ops program, its own link, attached after
    # ml_sockops so it runs after it (it ORs its callback flags onto ml_sockops').
    CgroupHook(FLOW_PROG, bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
)
# splice.c (proxy.splice only): files the pods' sockets of proxied
# connections in the splice SOCKHASH; attached last, so that at close it runs
# after flowtrack.c has read the socket's splice count.
SPLICE_HOOK = CgroupHook(abi.SPLICE_OPS, bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS)
TC_PROG = "ml_tc_to_pod"
ALL_PROGS = tuple(h.name for h in CGROUP_HOOKS) + (TC_PROG,)

# Adding a program or a map.  Everything that needs bcc runs in the loader
# step (Datapath.load_or_upgrade in `python -m agent.datapath.loadstep`);
# the agent only adopts the pins, so a new object must be pinned there and
# found again here:
# - a map: declare it pinned in the C (BPF_TABLE_PINNED under ML_PIN_DIR)
#   and add it to abi.MAPS (or abi.RINGBUFS): _adoptable requires its pin,
#   _open_maps opens it in the agent, an upgrade shares or migrates it
#   (plan_upgrade); list it in HELD_BY_FD if proxy workers hold it by fd;
# - a cgroup program: one CgroupHook above (loaded in _load_progs, pinned as
#   progs/<name>, linked as links/cgroup-<name>, checked by _adoptable,
#   switched by _swap on upgrade);
# - any other program (e.g. an sk_skb verdict on a sockhash): load it in
#   _load_progs, pin it under progs/, attach it in _load and re-point it in
#   _swap (pinned links where the kernel has them), and add its pins to
#   _adoptable's list so a datapath without it is reloaded, not adopted.


def cgroup_hooks(spec: DatapathSpec) -> tuple[CgroupHook, ...]:
    """The cgroup hooks this spec compiles and attaches."""
    hooks = tuple(h for h in CGROUP_HOOKS if spec.flow_tracking or h.name != FLOW_PROG)
    return hooks + (SPLICE_HOOK,) if spec.splice else hooks


TC_ATTACH_MODES = ("auto", "tcx", "clsact")


def _tc_attach_default() -> str:
    # An ad-hoc switch (MESHLET_TC_ATTACH=clsact) next to the config's bpf.tcAttach.
    return os.environ.get("MESHLET_TC_ATTACH", "auto")


def clsact_owner(pin_dir: str) -> str:
    """The name of this datapath's cls_bpf filters."""
    return f"meshlet:{os.path.normpath(pin_dir)}"


_tcx_works: bool | None = None

_compile_allowed = False


def allow_compile() -> None:
    """Let this process import bcc and compile: the loader step calls it
    (agent/datapath/loadstep.py); the agent never does."""
    global _compile_allowed
    _compile_allowed = True


def resolve_tc_attach(want: str) -> str:
    """'tcx' or 'clsact' for ``want`` ('auto' probes tcx once per process)."""
    global _tcx_works
    if want not in TC_ATTACH_MODES:
        raise DatapathError(
            f"tc attach mode {want!r} is not one of {', '.join(TC_ATTACH_MODES)} "
            "(bpf.tcAttach or MESHLET_TC_ATTACH)"
        )
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
    cgroup: str  # absolute cgroup v2 dir holding the node's pods
    redirect_ip4: str
    redirect_ip6: str | None
    outbound_port: int
    mesh_mark: int
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    max_flows: int = 65536
    max_workloads: int = 4096
    tunnel_port: int = 15008
    max_live_flows: int = 65536  # ml_live_flows (LRU) and ml_flow_links
    flow_ringbuf_bytes: int = 1 << 20  # ml_flow_events; a power of two >= one page
    flow_tracking: bool = field(default_factory=_flow_tracking_default)
    max_l4_rules: int = 16384  # ml_l4_policy: connect-time L4 authorization entries
    tc_attach: str = field(default_factory=_tc_attach_default)  # auto | tcx | clsact
    splice: bool = False  # splice.c + <pin dir>/splice/ (proxy.splice on, and the kernel has sk_msg)


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
        f"-DML_SPLICE={1 if spec.splice else 0}",
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
    tc_mode: str = ""  # how strict mode attaches here: 'tcx' or 'clsact' (set by open())
    _l4: dict[bytes, bytes] | None = None  # what ml_l4_policy holds (None: read it first)

    # --- lifecycle ---------------------------------------------------------

    def open(self) -> str:
        """Adopt a matching pinned datapath, upgrade a running one built from
        other C in place, or load a fresh one.  Returns 'adopted',
        'upgraded' or 'loaded'.  On failure a datapath that was running
        keeps running unchanged, and a fresh load leaves nothing attached.

        Loading and upgrading need bcc, which maps clang/LLVM into the process
        for good: they run in the short-lived loader step
        (``python -m agent.datapath.loadstep``), and this process only adopts
        what the step pinned, through the bpf(2) syscall."""
        os.makedirs(self.spec.pin_dir, exist_ok=True)
        self.tc_mode = resolve_tc_attach(self.spec.tc_attach)
        rendered = render(self.spec)
        if self._adoptable(rendered):
            self.how = "adopted"
            log.info("adopted pinned datapath in %s", self.spec.pin_dir)
        else:
            from . import loadstep

            self.how = loadstep.run(self.spec)
            if not self._adoptable(rendered):
                raise DatapathError(
                    f"the datapath loader step reported {self.how!r} but the pins in "
                    f"{self.spec.pin_dir} are not a complete, current datapath (was bpf/ changed "
                    "meanwhile?); run 'meshlet bpf status' and start the agent again"
                )
        self._open_maps()
        self.write_config(enabled=True)
        return self.how

    def load_or_upgrade(self) -> str:
        """The loader step's work (never in the agent's process: it imports
        bcc): upgrade a running datapath built from other C in place, or
        load a fresh one over detached leftovers.  Returns 'upgraded',
        'loaded', or 'adopted' when a current datapath is already pinned."""
        os.makedirs(self.spec.pin_dir, exist_ok=True)
        rendered = render(self.spec)
        if self._adoptable(rendered):
            return "adopted"
        if self._attached():
            # Another version of the C is running: never take it down first.
            self._upgrade(rendered)
            return "upgraded"
        if os.listdir(self.spec.pin_dir):
            # Nothing attached: removing the leftovers opens nothing.  clsact
            # filters keep the old program (and its maps) until sync_tc swaps
            # in the new one: strict mode has no gap.
            log.info("pinned datapath in %s is incomplete and detached; reloading", self.spec.pin_dir)
            self.teardown(keep_clsact=True)
            os.makedirs(self.spec.pin_dir, exist_ok=True)
        try:
            self._load(rendered)
        except Exception:
            self.teardown()
            raise
        return "loaded"

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
            raise DatapathError(
                f"cannot open node cgroup {self.spec.cgroup}: {e.strerror}; "
                "check 'cgroup:' in the config points at the cgroup v2 "
                "directory holding this node's pods"
            ) from e

    def _adoptable(self, rendered: Rendered) -> bool:
        pd = self.spec.pin_dir
        hooks = cgroup_hooks(self.spec)
        needed = (
            [os.path.join(pd, m) for m in abi.MAPS]
            + [os.path.join(pd, abi.EVENTS_DIR, m) for m in abi.RINGBUFS]
            + [os.path.join(pd, "progs", h.name) for h in hooks]
            + [os.path.join(pd, "progs", TC_PROG)]
            + [os.path.join(pd, "links", f"cgroup-{h.name}") for h in hooks]
        )
        if not all(os.path.exists(p) for p in needed):
            return False
        try:
            fd = bpfsys.obj_get(os.path.join(pd, "ml_meta"))
            try:
                raw = bpfsys.map_lookup(fd, bytes(ctypes.c_uint32(0)), ctypes.sizeof(abi.MlMeta))
            finally:
                os.close(fd)
            meta = abi.MlMeta.from_buffer_copy(raw) if raw else None
            if not meta or meta.source_hash != rendered.source_hash or meta.abi_version != abi.ABI_VERSION:
                return False
            cgid = cg.cgroup_id(self.spec.cgroup)
            for h in hooks:
                info = _pinned_link_info(os.path.join(pd, "links", f"cgroup-{h.name}"))
                prog = _pinned_prog_info(os.path.join(pd, "progs", h.name))
                if (
                    info is None
                    or prog is None
                    or info.prog_id != prog.id
                    or info.target != cgid
                    or info.attach_type != h.attach_type
                ):
                    return False
        except OSError:
            return False
        return True

    def _compile(self, rendered: Rendered, pin_dir: str | None = None):
        """bcc's BPF object for ``rendered`` (maps created or reused through
        their pins under ``pin_dir``, the spec's by default); the caller
        calls ``cleanup()``.  Only in the loader step."""
        if not _compile_allowed:
            raise DatapathError(
                "internal error: bcc compile requested outside the datapath loader step "
                "(it would map LLVM into this long-running process for good)"
            )
        if self.spec.splice:  # bcc pins into it but does not create it
            os.makedirs(os.path.join(pin_dir or self.spec.pin_dir, abi.SPLICE_DIR), exist_ok=True)
        try:
            from bcc import BPF  # heavy (LLVM, ~60 MB): imported only when compiling
        except ImportError as e:
            raise DatapathError(
                "cannot import bcc: install python3-bpfcc and use a venv made "
                "with --system-site-packages (run the README's bootstrap)"
            ) from e
        try:
            return BPF(text=rendered.text.encode(), cflags=list(rendered.cflags))
        except Exception as e:
            raise DatapathError(
                f"bcc failed to compile the datapath: {e}; run 'meshlet doctor' "
                "(kernel headers under /lib/modules/$(uname -r)/build?)"
            ) from e

    def _load_progs(self, b) -> dict[str, int]:
        """Load (and so verify) every program: name -> fd (owned by ``b``)."""
        from bcc import BPF

        progs = {}
        try:
            for h in cgroup_hooks(self.spec):
                if h.prog_type == bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR:
                    fn = b.load_func(h.name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=h.attach_type)
                else:
                    fn = b.load_func(h.name.encode(), BPF.SOCK_OPS)
                progs[h.name] = fn.fd
            progs[TC_PROG] = b.load_func(TC_PROG.encode(), BPF.SCHED_CLS).fd
        except Exception as e:
            raise DatapathError(
                f"the kernel refused the datapath's programs: {e}; run 'meshlet doctor' "
                "(the verifier's log is above)"
            ) from e
        if self.spec.splice:
            try:
                progs[abi.SPLICE_PROG] = b.load_func(abi.SPLICE_PROG.encode(), BPF.SK_MSG).fd
            except Exception as e:
                # Its sock_ops half is loaded and would be attached: refuse
                # the whole datapath rather than attach half of the splice.
                raise DatapathError(
                    f"proxy.splice: the kernel refused the sk_msg program {abi.SPLICE_PROG}: {e}; "
                    "set proxy.splice: false, or run a kernel with sk_msg and SOCKHASH "
                    "(CONFIG_BPF_STREAM_PARSER, Linux >= 4.20)"
                ) from e
        return progs

    def _attach_splice(self, progs: dict[str, int]) -> None:
        """Attach splice.c's sk_msg program to the pinned pod-socket SOCKHASH
        (the map keeps it; sockets filed before this get no program and
        stay on the userspace relay), or remove the splice pins when the
        spec has no splice."""
        sdir = os.path.join(self.spec.pin_dir, abi.SPLICE_DIR)
        if not self.spec.splice:
            if os.path.isdir(sdir):
                _rmtree(sdir)
            return
        try:
            hfd = bpfsys.obj_get(os.path.join(sdir, abi.SPLICE_SOCKHASH))
            try:
                bpfsys.prog_attach(hfd, progs[abi.SPLICE_PROG], bpfsys.ATTACH_SK_MSG_VERDICT)
            finally:
                os.close(hfd)
        except OSError as e:
            raise DatapathError(
                f"proxy.splice: cannot attach {abi.SPLICE_PROG} to {abi.SPLICE_SOCKHASH}: {e}; "
                "set proxy.splice: false, or run a kernel with sk_msg (CONFIG_BPF_STREAM_PARSER)"
            ) from e

    def _load(self, rendered: Rendered) -> None:
        b = self._compile(rendered)
        try:
            progs = self._load_progs(b)
            hooks = cgroup_hooks(self.spec)
            os.makedirs(os.path.join(self.spec.pin_dir, "progs"), exist_ok=True)
            os.makedirs(os.path.join(self.spec.pin_dir, "links"), exist_ok=True)
            for name, fd in progs.items():
                bpfsys.obj_pin(fd, os.path.join(self.spec.pin_dir, "progs", name))
            self._attach_splice(progs)
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
                            "run 'meshlet doctor'"
                        ) from e
                    try:
                        bpfsys.obj_pin(lfd, os.path.join(self.spec.pin_dir, "links", f"cgroup-{h.name}"))
                    finally:
                        os.close(lfd)
            finally:
                os.close(cgfd)
        finally:
            b.cleanup()
        log.info(
            "datapath compiled, loaded and pinned in %s (cgroup %s)", self.spec.pin_dir, self.spec.cgroup
        )

    # --- upgrade in place: the new programs replace the old ones atomically ----

    def _attached(self) -> bool:
        """A pinned cgroup link of this pin dir is attached to the node cgroup
        (a datapath is running, whatever its version)."""
        links = os.path.join(self.spec.pin_dir, "links")
        try:
            cgid = cg.cgroup_id(self.spec.cgroup)
            names = os.listdir(links)
        except OSError:
            return False
        for name in names:
            if name.startswith("cgroup-"):
                info = _pinned_link_info(os.path.join(links, name))
                if info is not None and info.target == cgid:
                    return True
        return False

    def _probe_layouts(self) -> dict[str, bpfsys.MapInfo]:
        """The map layouts the new C asks for: compiled once into a scratch
        pin dir (fresh maps, no program loaded or attached), read, removed."""
        scratch = os.path.join(self.spec.pin_dir, "staging")  # bpffs names take no dots
        remove_pins(scratch)
        os.makedirs(scratch)
        try:
            b = self._compile(render(dataclasses.replace(self.spec, pin_dir=scratch)), scratch)
            b.cleanup()
            return map_layouts(scratch)
        finally:
            remove_pins(scratch)

    def _upgrade(self, rendered: Rendered) -> None:
        """Replace the running programs with ``rendered``'s without a window:
        maps whose layout is unchanged are shared (bcc reuses their pins),
        maps that only grew or shrank are migrated (a new map at the pin,
        entries copied before the swap and again after it), then every link
        is switched to its new program with BPF_LINK_UPDATE.  The new
        programs are compiled and verified before anything changes; any
        failure before the swap puts the old pins back and leaves the
        running datapath as it was."""
        pd = self.spec.pin_dir
        plan = plan_upgrade(map_layouts(pd), self._probe_layouts())
        moved: dict[str, tuple[int, bpfsys.MapInfo]] = {}  # migrated map -> (old fd, old layout)
        try:
            for name in plan.migrate:
                path = os.path.join(pd, name)
                fd = bpfsys.obj_get(path)
                moved[name] = (fd, bpfsys.map_info(fd))
                os.unlink(path)  # the old programs keep their reference
            b = self._compile(rendered)
        except BaseException:
            _restore_pins(pd, moved)
            for ofd, _ in moved.values():
                os.close(ofd)
            raise
        try:
            try:
                progs = self._load_progs(b)
                self._open_maps()
                for name, (ofd, oinfo) in moved.items():
                    n = copy_map(ofd, self.maps[name], oinfo, bpfsys.BPF_ANY)
                    log.info("upgrade: map %s migrated (%d entries copied)", name, n)
                self.write_config(enabled=True)
                self.sync_excludes()
            except BaseException:
                self.close()
                _restore_pins(pd, moved)
                raise
            self._attach_splice(progs)  # before its sock_ops hook starts filing sockets
            self._swap(progs)
            # What the old programs wrote between the copy and the swap.
            for name, (ofd, oinfo) in moved.items():
                if oinfo.type in _HASH_TYPES:
                    copy_map(ofd, self.maps[name], oinfo, bpfsys.BPF_NOEXIST)
            for name in plan.dropped:
                try:
                    os.unlink(os.path.join(pd, name))
                except FileNotFoundError:
                    pass
            meta = abi.MlMeta(rendered.source_hash, abi.ABI_VERSION, 0)
            bpfsys.map_update(self.maps["ml_meta"], bytes(ctypes.c_uint32(0)), bytes(meta))
        finally:
            b.cleanup()
            for ofd, _ in moved.values():
                os.close(ofd)
        log.info(
            "datapath upgraded in place in %s: %d maps shared, %d migrated, %d new; programs swapped",
            pd,
            len(plan.shared),
            len(plan.migrate),
            len(plan.created),
        )

    def _swap(self, progs: dict[str, int]) -> None:
        """Point every link at its new program (BPF_LINK_UPDATE), attach the
        hooks that had no link, detach the ones this spec no longer wants,
        and re-pin progs/ with the new programs."""
        pd = self.spec.pin_dir
        links = os.path.join(pd, "links")
        os.makedirs(links, exist_ok=True)
        hooks = cgroup_hooks(self.spec)
        cgid = cg.cgroup_id(self.spec.cgroup)
        cgfd = self._cgroup_fd()
        try:
            for h in hooks:
                path = os.path.join(links, f"cgroup-{h.name}")
                info = _pinned_link_info(path)
                try:
                    if info is not None and info.target == cgid and info.attach_type == h.attach_type:
                        lfd = bpfsys.obj_get(path)
                        try:
                            bpfsys.link_update(lfd, progs[h.name])
                        finally:
                            os.close(lfd)
                        continue
                    _detach_pinned_link(path)
                    lfd = bpfsys.link_create(progs[h.name], cgfd, h.attach_type)
                except OSError as e:
                    raise DatapathError(
                        f"upgrade: cannot switch {h.name} on {self.spec.cgroup} to its new program: "
                        f"{e.strerror or e}; hooks not switched yet keep the previous version "
                        "(nothing is detached). Start the agent again to finish, or run 'meshlet doctor'"
                    ) from e
                try:
                    bpfsys.obj_pin(lfd, path)
                finally:
                    os.close(lfd)
        finally:
            os.close(cgfd)
        wanted = {f"cgroup-{h.name}" for h in hooks}
        for name in os.listdir(links):
            path = os.path.join(links, name)
            if name.startswith("cgroup-") and name not in wanted:
                _detach_pinned_link(path)
            elif name.startswith("tc-"):
                try:
                    lfd = bpfsys.obj_get(path)
                    try:
                        bpfsys.link_update(lfd, progs[TC_PROG])
                    finally:
                        os.close(lfd)
                except OSError as e:  # e.g. its interface is gone: sync_tc drops it
                    log.warning("upgrade: tc link %s keeps its old program: %s", name, e)
        pdir = os.path.join(pd, "progs")
        os.makedirs(pdir, exist_ok=True)
        for name in os.listdir(pdir):
            if name not in progs:
                os.unlink(os.path.join(pdir, name))
        for name, fd in progs.items():
            path = os.path.join(pdir, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            bpfsys.obj_pin(fd, path)

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
        want4: set[bytes] = set()
        want6: set[bytes] = set()
        for cidr in self.spec.exclude_cidrs:
            k = abi.cidr_key(cidr)
            (want4 if isinstance(k, abi.MlCidr4Key) else want6).add(bytes(k))
        _sync_set(self.maps["ml_excl_cidr4"], ctypes.sizeof(abi.MlCidr4Key), want4, b"\x01")
        _sync_set(self.maps["ml_excl_cidr6"], ctypes.sizeof(abi.MlCidr6Key), want6, b"\x01")

    def sync_workloads(
        self, by_cgroup: dict[int, WorkloadEntry], by_ip: dict[str, WorkloadEntry]
    ) -> dict[str, int]:
        """Make ml_enrolled and ml_pod_ips hold exactly these entries; returns
        counts of what changed."""
        enrolled = {
            bytes(ctypes.c_uint64(cgid)): bytes(abi.MlWorkload(w.workload_id, w.mode))
            for cgid, w in by_cgroup.items()
        }
        ips = {bytes(abi.ip_key(ip)): bytes(abi.MlWorkload(w.workload_id, w.mode)) for ip, w in by_ip.items()}
        a = _sync_map(self.maps["ml_enrolled"], 8, enrolled)
        b = _sync_map(self.maps["ml_pod_ips"], ctypes.sizeof(abi.MlIpKey), ips)
        return {"enrolled_changed": a, "pod_ips_changed": b}

    def sync_guard(self, deny_roots: set[int], allow: set[int]) -> dict[str, int]:
        """ml_cgroup_guard: add a DENY_UNKNOWN entry for every cgroup id in
        ``deny_roots`` (the directories pods are created in) and make the
        ALLOW entries exactly ``allow`` (pods listed with mesh: false).
        DENY_UNKNOWN entries are never removed here: a directory the agent
        once saw pods in stays guarded until ``meshlet uninstall`` (cgroup
        ids are never reused, so a removed directory's entry is inert).
        Returns what changed."""
        fd = self.maps["ml_cgroup_guard"]
        deny = bytes(ctypes.c_uint32(abi.GUARD_DENY_UNKNOWN))
        allow_v = bytes(ctypes.c_uint32(abi.GUARD_ALLOW))
        have = {}
        for k in bpfsys.map_keys(fd, 8):
            v = bpfsys.map_lookup(fd, k, 4)
            if v is not None:
                have[ctypes.c_uint64.from_buffer_copy(k).value] = v
        added = removed = 0
        for cgid in sorted(allow):  # known pods first: never refused as unknown
            if have.get(cgid) != allow_v:
                bpfsys.map_update(fd, bytes(ctypes.c_uint64(cgid)), allow_v)
                added += 1
        for cgid in sorted(deny_roots - allow):
            if have.get(cgid) != deny:
                bpfsys.map_update(fd, bytes(ctypes.c_uint64(cgid)), deny)
                added += 1
        for cgid, v in have.items():
            if v == allow_v and cgid not in allow:
                try:
                    bpfsys.map_delete(fd, bytes(ctypes.c_uint64(cgid)))
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
                removed += 1
        return {"guard_added": added, "guard_removed": removed}

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
        want = {
            bytes(abi.l4_key(wid, ip, port)): bytes(abi.MlL4Verdict(pid, action))
            for (wid, ip, port), (action, pid) in entries.items()
        }

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
        return {
            ctypes.c_uint64.from_buffer_copy(k).value for k in bpfsys.map_keys(self.maps["ml_enrolled"], 8)
        }

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

        out = {f.ifindex: f.ifname for f in netlink.clsact_filters(clsact_owner(self.spec.pin_dir)).values()}
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
            _, idx_s, ifname = name.split("-", 2)
            idx = int(idx_s)
            info = _pinned_link_info(path)
            alive = info is not None and info.target == idx and netlink.ifindex_alive(idx, ifname)
            if not alive or wanted.get(idx) != ifname:
                _detach_pinned_link(path)
            else:
                have[idx] = ifname
        errors: list[str] = []
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
                        errors.append(f"cannot attach {TC_PROG} to {ifname} (clsact): {e.strerror or e}")
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


# Maps that processes other than the programs hold open by fd (proxy
# workers: origdst.py, flowtable.py): replacing one would leave them reading
# a map nobody writes, so an upgrade must share these.
HELD_BY_FD = frozenset({"ml_flows", "ml_flow_links", f"{abi.EVENTS_DIR}/ml_flow_events"})
_HASH_TYPES = frozenset({1, 5, 9, 10, 11})  # hash, percpu_hash, lru_hash, lru_percpu_hash, lpm_trie
_PERCPU_TYPES = frozenset({5, 6, 10})  # percpu_hash, percpu_array, lru_percpu_hash


@dataclass(frozen=True)
class UpgradePlan:
    """What an in-place upgrade does with each pinned map (names as pinned,
    ring buffers as ``events/<name>``)."""

    shared: tuple[str, ...]  # same layout: the new programs use the pinned map
    migrate: tuple[str, ...]  # same key and value, other size or flags: new map, entries copied
    created: tuple[str, ...]  # new in this version
    dropped: tuple[str, ...]  # no longer used: unpinned after the swap


def _layout(i: bpfsys.MapInfo) -> str:
    return (
        f"{i.type_name} key {i.key_size} B, value {i.value_size} B, "
        f"{i.max_entries} entries, flags {i.flags:#x}"
    )


def plan_upgrade(old: dict[str, bpfsys.MapInfo], new: dict[str, bpfsys.MapInfo]) -> UpgradePlan:
    """How to carry the pinned maps ``old`` over to the layouts ``new``
    (pure).  Raises DatapathError, naming the map and both layouts, when a
    map cannot be carried over without a migration written for it (its key
    or value layout changed, or other processes hold it open)."""
    shared, migrate, created = [], [], []
    for name, n in sorted(new.items()):
        o = old.get(name)
        if o is None:
            created.append(name)
        elif (o.type, o.key_size, o.value_size, o.max_entries, o.flags) == (
            n.type,
            n.key_size,
            n.value_size,
            n.max_entries,
            n.flags,
        ):
            shared.append(name)
        elif (o.type, o.key_size, o.value_size) == (n.type, n.key_size, n.value_size) and (
            name not in HELD_BY_FD
        ):
            migrate.append(name)
        else:
            raise DatapathError(
                f"cannot upgrade the running datapath in place: pinned map {name} is "
                f"{_layout(o)}, this version needs {_layout(n)}"
                + (" and the proxy workers hold it open" if name in HELD_BY_FD else "")
                + ". The running datapath was left as it was. Keep the previous meshlet version, "
                "or schedule a window: stop the agent, 'meshlet uninstall --force', start this version"
            )
    dropped = sorted(set(old) - set(new))
    return UpgradePlan(tuple(shared), tuple(migrate), tuple(created), tuple(dropped))


def map_layouts(pin_dir: str) -> dict[str, bpfsys.MapInfo]:
    """The layout of every map pinned in ``pin_dir`` (and its ring buffers,
    as ``events/<name>``)."""
    out = {}
    events = os.path.join(pin_dir, abi.EVENTS_DIR)
    for d, prefix in ((pin_dir, ""), (events, f"{abi.EVENTS_DIR}/")):
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            path = os.path.join(d, name)
            if os.path.isdir(path):
                continue
            fd = bpfsys.obj_get(path)
            try:
                out[prefix + name] = bpfsys.map_info(fd)
            finally:
                os.close(fd)
    return out


def copy_map(src: int, dst: int, info: bpfsys.MapInfo, flags: int) -> int:
    """Copy every entry of map ``src`` (layout ``info``) into ``dst`` (same
    key and value layout); entries ``dst`` refuses (full, out of range,
    already there under BPF_NOEXIST) are skipped.  Returns entries copied."""
    vsz = info.value_size
    if info.type in _PERCPU_TYPES:
        vsz = (vsz + 7) // 8 * 8 * possible_cpus()
    n = 0
    for k in list(bpfsys.map_keys(src, info.key_size, limit=info.max_entries + 1)):
        v = bpfsys.map_lookup(src, k, vsz)
        if v is None:
            continue
        try:
            bpfsys.map_update(dst, k, v, flags)
            n += 1
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.E2BIG, errno.ENOSPC):
                raise
    return n


def _restore_pins(pin_dir: str, moved: dict[str, tuple[int, bpfsys.MapInfo]]) -> None:
    """Put the old maps back at their pins after a failed upgrade."""
    for name, (fd, _) in moved.items():
        path = os.path.join(pin_dir, name)
        try:
            os.unlink(path)  # a new map bcc may have pinned there
        except FileNotFoundError:
            pass
        bpfsys.obj_pin(fd, path)


def pinned_summary(pin_dir: str, cgroup_dir: str) -> dict:
    """What is pinned at ``pin_dir`` (``meshlet doctor``): present, attached
    to ``cgroup_dir``, its ABI version (None: unreadable), pods enrolled and
    cgroup directories guarded."""
    out: dict = {"present": os.path.isdir(pin_dir), "attached": False, "abi_version": None}
    out["enrolled"] = enrolled_count(pin_dir)
    out["guarded"] = 0
    if not out["present"]:
        return out
    out["attached"] = Datapath(DatapathSpec("", pin_dir, cgroup_dir, "0.0.0.0", None, 0, 0))._attached()
    try:
        fd = bpfsys.obj_get(os.path.join(pin_dir, "ml_meta"))
        try:
            raw = bpfsys.map_lookup(fd, bytes(ctypes.c_uint32(0)), ctypes.sizeof(abi.MlMeta))
        finally:
            os.close(fd)
        if raw:
            out["abi_version"] = abi.MlMeta.from_buffer_copy(raw).abi_version
    except OSError:
        pass
    try:
        fd = bpfsys.obj_get(os.path.join(pin_dir, "ml_cgroup_guard"))
    except OSError:
        return out
    try:
        out["guarded"] = sum(
            1
            for k in bpfsys.map_keys(fd, 8)
            if bpfsys.map_lookup(fd, k, 4) == bytes(ctypes.c_uint32(abi.GUARD_DENY_UNKNOWN))
        )
    finally:
        os.close(fd)
    return out


def enrolled_count(pin_dir: str) -> int:
    """Pods enrolled in the datapath pinned at ``pin_dir`` (0: none, or no datapath)."""
    try:
        fd = bpfsys.obj_get(os.path.join(pin_dir, "ml_enrolled"))
    except OSError:
        return 0
    try:
        return sum(1 for _ in bpfsys.map_keys(fd, 8))
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
                log.warning("removing the clsact filter of %s from ifindex %d: %s", pin_dir, idx, e)
    links = os.path.join(pin_dir, "links")
    if os.path.isdir(links):
        for name in os.listdir(links):
            _detach_pinned_link(os.path.join(links, name))
    if os.path.isdir(pin_dir):
        _rmtree(pin_dir)
    remove_empty_parent(pin_dir)


def _rmtree(path: str) -> None:
    # shutil only here, on teardown: it loads bz2 and lzma, which the
    # agent would otherwise keep for the node's life.
    import shutil

    shutil.rmtree(path, ignore_errors=True)


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
        out[name] = sum(int.from_bytes(raw[j : j + 8], "little") for j in range(0, len(raw), 8)) if raw else 0
    return out
