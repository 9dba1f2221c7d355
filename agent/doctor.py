"""``meshlet doctor``: can this node run meshlet, and if not, what to do.

Every check is a function that looks at one thing and returns a ``Check``:
its name, whether it passed, what it saw and — when it failed — one concrete
command or step that fixes it.  The inputs (files under /proc and /sys, the
kernel release, the Python to import bcc with, PATH) are parameters, gathered
in ``Environment``, so the checks are testable with fake files and no root.
Probes that need the real kernel (loading programs, creating links) live in
``agent.datapath.probe``.  Given the agent's config, the doctor also checks
what that config needs (its pin dir, its node cgroup, a way to attach strict
mode: tcx links on >= 6.6, a clsact qdisc with cls_bpf on older kernels) and
says what is pinned there already (a stop keeps the datapath).  ``meshlet
doctor`` also asks a running agent that gets its node CA by CSR
(``identity.nodeCA: csr``) whether it has it (:func:`check_node_ca_csr`);
with no agent answering, it reads the node's files instead: the intermediate
and the request record ``<caKey>.pending.json`` (:func:`check_node_ca_files`).

``meshlet run`` calls the same checks before touching the kernel, so it fails
with the same list of fixes instead of half-attaching.  A check that is not
``required`` (JIT, BTF, tcx where clsact does the job) is reported as a warning;
``ready()`` / ``ensure_ready()`` ignore it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent import cgroup

if TYPE_CHECKING:
    from agent.config import AgentConfig

BOOTSTRAP = "bash scripts/bootstrap.sh  (from the meshlet checkout, as root)"
AS_ROOT = "run as root: sudo meshlet doctor (in a pod: securityContext.privileged: true)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    # A failed required check stops `meshlet run`; others are warnings.
    required: bool = True


@dataclass(frozen=True)
class Environment:
    """Where the checks look.  The defaults describe the running machine;
    tests point them at fake files."""

    proc_status: str = "/proc/self/status"
    """Capabilities (CapEff) and uid of this process."""
    mountinfo: str = "/proc/self/mountinfo"
    """Mount table: cgroup v2 and bpffs are found here."""
    bpffs: str = "/sys/fs/bpf"
    """The conventional bpffs mount point."""
    jit_sysctl: str = "/proc/sys/net/core/bpf_jit_enable"
    btf_vmlinux: str = "/sys/kernel/btf/vmlinux"
    kernel_release: str = field(default_factory=lambda: os.uname().release)
    proc_config: str = "/proc/config.gz"
    """Kernel config; /boot/config-<release> is tried when this is absent."""
    boot_dir: str = "/boot"
    modules_dir: str = "/lib/modules"
    python: str = sys.executable
    """Interpreter that must be able to import bcc (the agent's own)."""
    tool_path: str | None = None
    """PATH to find tools in; None means the environment's PATH."""
    probe_kernel: bool = True
    """Load probe programs and create links (needs root and a real kernel)."""


class DoctorError(RuntimeError):
    """This node cannot run meshlet; the message lists what to fix."""


# --- plumbing ---------------------------------------------------------------


def _guarded(name: str, required: bool, fn: Callable[[], Check]) -> Check:
    """A check that crashes is reported as failed, never crashes the doctor."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return Check(
            name,
            False,
            f"the check itself failed: {type(e).__name__}: {e}",
            "this is a meshlet bug; please report it with this output",
            required,
        )


def _check(name: str, required: bool = True):
    """Decorate ``fn(...) -> (ok, detail, fix)``; the result is a ``Check``.
    ``fix`` may also be ``(fix, required)`` to override ``required``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs) -> Check:
            def run() -> Check:
                ok, detail, fix = fn(*args, **kwargs)
                req = required
                if isinstance(fix, tuple):
                    fix, req = fix
                return Check(name, ok, detail, None if ok else fix, req)

            return _guarded(name, required, run)

        return wrapper

    return deco


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) pairs from a /proc/<pid>/mountinfo file."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                out.append((fields[4].replace("\\040", " "), right.split()[0]))
    return out


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"cannot parse kernel release {release!r}")
    return int(m[1]), int(m[2])


# --- host checks ------------------------------------------------------------

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
_CAP_NAMES = {
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_BPF: "CAP_BPF",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_PERFMON: "CAP_PERFMON",
}


@_check("privileges")
def check_privileges(proc_status: str = "/proc/self/status"):
    """CAP_SYS_ADMIN is what counts: meshlet creates cgroups and namespaces and
    attaches cgroup programs, which CAP_BPF alone does not allow."""
    fields = {}
    with open(proc_status) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    cap_eff = int(fields["CapEff"][0], 16)
    euid = fields["Uid"][1]
    have = [n for bit, n in _CAP_NAMES.items() if cap_eff >> bit & 1]
    detail = f"euid {euid}, " + (", ".join(have) if have else "no BPF-related capabilities")
    return bool(cap_eff >> CAP_SYS_ADMIN & 1), detail, AS_ROOT


@_check("bpf JIT", required=False)
def check_jit(jit_sysctl: str = "/proc/sys/net/core/bpf_jit_enable"):
    try:
        with open(jit_sysctl) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return (
            False,
            f"{jit_sysctl} missing: kernel built without CONFIG_BPF_JIT, programs run interpreted (slow)",
            "use a kernel with CONFIG_BPF_JIT=y",
        )
    if value in ("1", "2"):
        return True, f"enabled (bpf_jit_enable={value})", None
    return (
        False,
        f"disabled (bpf_jit_enable={value}): programs run interpreted (slow)",
        "sysctl -w net.core.bpf_jit_enable=1",
    )


@_check("cgroup v2")
def check_cgroup2(mountinfo: str = "/proc/self/mountinfo"):
    try:
        return True, f"mounted at {cgroup.cgroup2_mount(mountinfo)}", None
    except cgroup.CgroupError as e:
        return (
            False,
            str(e).split(";")[0],
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified",
        )


@_check("bpffs")
def check_bpffs(mountinfo: str = "/proc/self/mountinfo", path: str = "/sys/fs/bpf"):
    types = [t for mp, t in _mounts(mountinfo) if mp == path]
    if "bpf" in types:
        return True, f"mounted at {path}", None
    seen = f" (a {types[-1]} is mounted there)" if types else ""
    return False, f"no bpf filesystem at {path}{seen}", f"mount -t bpf bpf {path}"


@_check("BTF", required=False)
def check_btf(btf_vmlinux: str = "/sys/kernel/btf/vmlinux"):
    if os.path.exists(btf_vmlinux):
        return True, btf_vmlinux, None
    return (
        False,
        f"{btf_vmlinux} missing: no kernel type info for CO-RE/fentry tools "
        "(meshlet's own programs use only UAPI types)",
        "use a kernel with CONFIG_DEBUG_INFO_BTF=y",
    )


# Options meshlet's datapath cannot work without, and ones it can.
KERNEL_CONFIG_REQUIRED = (
    "CONFIG_BPF_SYSCALL",  # bpf(2)
    "CONFIG_CGROUP_BPF",  # cgroup/connect4/6, sock_ops
    "CONFIG_BPF_STREAM_PARSER",  # sockmap/sockhash, sk_msg, sk_skb
    "CONFIG_NET_CLS_BPF",  # tc programs
    "CONFIG_NET_SCH_INGRESS",  # clsact
    "CONFIG_NET_NS",  # pods/simulated nodes
)
KERNEL_CONFIG_OPTIONAL = (
    "CONFIG_BPF_JIT",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_VETH",  # simulated nodes in tests and the demo
)


def _read_config(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):  # /proc/config.gz; zlib, not gzip: the agent runs this at every start
        raw = zlib.decompress(raw, wbits=zlib.MAX_WBITS | 16)
    values = {}
    for line in raw.decode(errors="replace").splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key.startswith("CONFIG_"):
            values[key] = value
    return values


@_check("kernel config")
def check_kernel_config(paths: Iterable[str] = ("/proc/config.gz",)):
    paths = list(paths)
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return (
            False,
            f"not readable ({' or '.join(paths)} missing); relying on the load probes",
            (
                "the probes below are authoritative; for /proc/config.gz use a kernel "
                "with CONFIG_IKCONFIG_PROC=y",
                False,
            ),
        )
    values = _read_config(path)

    def missing(opts: Sequence[str]) -> list[str]:
        return [o for o in opts if values.get(o) not in ("y", "m")]

    req, opt = missing(KERNEL_CONFIG_REQUIRED), missing(KERNEL_CONFIG_OPTIONAL)
    if not req and not opt:
        return (
            True,
            f"{path}: all {len(KERNEL_CONFIG_REQUIRED) + len(KERNEL_CONFIG_OPTIONAL)} options set",
            None,
        )
    parts = []
    if req:
        parts.append("missing " + ", ".join(req))
    if opt:
        parts.append("missing (optional) " + ", ".join(opt))
    fix = (
        "use a kernel built with "
        + ", ".join(f"{o}=y" for o in req + opt)
        + " (Debian: apt-get install linux-image-$(dpkg --print-architecture) && reboot)"
    )
    return False, f"{path}: " + "; ".join(parts), (fix, bool(req))


@_check("kernel headers")
def check_kernel_headers(release: str, modules_dir: str = "/lib/modules"):
    """bcc compiles against /lib/modules/<release>/build; with Debian's split
    packages the linux/ headers are in the 'source' (-common) directory."""
    base = os.path.join(modules_dir, release)
    build = os.path.join(base, "build")
    if not os.path.isdir(os.path.join(build, "include")):
        return False, f"{build}/include missing: bcc cannot compile", BOOTSTRAP
    if not any(os.path.isdir(os.path.join(base, d, "include", "linux")) for d in ("build", "source")):
        return (
            False,
            f"no include/linux under {build} or {base}/source "
            "(Debian split headers need the -common directory linked as 'source')",
            BOOTSTRAP,
        )
    target = os.path.basename(os.path.realpath(build))
    return True, f"{build} -> {target}", None


@_check("bcc")
def check_bcc(python: str = sys.executable):
    """Imported in a child process: libbcc embeds LLVM (~60 MB), which the
    doctor (and `meshlet run` before it loads anything) should not carry."""
    fix = (
        "apt-get install python3-bpfcc, and use a venv made with "
        "/usr/bin/python3 -m venv --system-site-packages; " + BOOTSTRAP + " does both"
    )
    try:
        proc = subprocess.run(
            [python, "-c", "import bcc; print(bcc.__version__)"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot run {python}: {e}", fix
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return False, f"import bcc failed: {lines[-1] if lines else proc.returncode}", fix
    return True, f"bcc {proc.stdout.strip()} ({python})", None


TOOLS = {"ip": "iproute2", "nsenter": "util-linux"}


def _which(name: str, path: str | None = None) -> str | None:
    """The executable ``name`` on ``path`` (default: $PATH), or None: what
    ``shutil.which`` answers for a bare name, without importing shutil (and
    the bz2/lzma modules it brings) into the agent, which runs this check at
    every start."""
    dirs = (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep)
    for d in dirs:
        p = os.path.join(d or ".", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


@_check("tools")
def check_tools(tools: dict[str, str] = TOOLS, path: str | None = None):
    missing = [t for t in tools if _which(t, path) is None]
    if not missing:
        return True, ", ".join(tools), None
    packages = sorted({tools[t] for t in missing})
    return False, "not found: " + ", ".join(missing), "apt-get install -y " + " ".join(packages)


# --- kernel probes ----------------------------------------------------------


def check_probe(name: str, probe: Callable[[], None], fix: str, required: bool = True) -> Check:
    """Run ``probe``; an ``OSError`` means the kernel said no.  Permission
    and missing-syscall errors get their own fixes; anything else gets ``fix``."""

    def run() -> Check:
        try:
            probe()
        except (OSError, cgroup.CgroupError) as e:
            err = getattr(e, "errno", None)
            if err in (errno.EPERM, errno.EACCES):
                return Check(name, False, f"not permitted: {e}", AS_ROOT, required)
            if err == errno.ENOSYS:
                return Check(
                    name,
                    False,
                    "no bpf(2) syscall in this kernel",
                    "use a kernel with CONFIG_BPF_SYSCALL=y",
                    required,
                )
            return Check(name, False, str(e), fix, required)
        return Check(name, True, "works", None, required)

    return _guarded(name, required, run)


TCX_MIN_KERNEL = (6, 6)


def check_tcx(release: str, probe: Callable[[], None], required: bool = False) -> Check:
    """tcx links (kernel >= 6.6) are the preferred attach for the strict-mode
    program on each pod's veth; without them clsact/cls_bpf carries it (see
    ``check_strict_attach``), so tcx is required only when the config asks
    for it (``bpf.tcAttach: tcx``) in strict mode."""
    name = "tcx links"
    fix = (
        "a kernel >= 6.6 (Debian 12: the bookworm-backports linux-image), "
        "bpf.tcAttach: auto (clsact), or mesh.mode: permissive"
    )
    try:
        too_old = kernel_version(release) < TCX_MIN_KERNEL
    except ValueError as e:
        return Check(name, False, str(e), "report this kernel release string as a meshlet bug", required)
    if too_old:
        if not required:
            fix = "nothing to do; tcx needs a kernel >= 6.6 (Debian 12: the bookworm-backports linux-image)"
        return Check(
            name,
            False,
            f"kernel {release} < 6.6 has no tcx"
            + ("" if required else "; strict mode attaches through clsact instead"),
            fix,
            required,
        )
    return check_probe(name, probe, "a kernel >= 6.6 with CONFIG_NET_XGRESS=y", required)


def check_clsact(probe: Callable[[], None], required: bool = False) -> Check:
    """A clsact qdisc with a direct-action cls_bpf filter: strict mode's
    attach on kernels without tcx (Debian 12's 6.1, Ubuntu 22.04's 5.15)."""
    return check_probe(
        "clsact (cls_bpf)",
        probe,
        "a kernel with CONFIG_NET_CLS_BPF=y and CONFIG_NET_SCH_INGRESS=y, or mesh.mode: permissive",
        required,
    )


def check_strict_attach(tcx: Check, clsact: Check, want: str = "auto", required: bool = False) -> Check:
    """How strict mode's program will go on each pod's veth, from the two
    probes and ``bpf.tcAttach`` (``want``): tcx when asked for or available,
    clsact otherwise.  Required in strict mode."""
    name = "strict mode attach"
    if want in ("auto", "tcx") and tcx.ok:
        return Check(name, True, "tcx links", None, required)
    if want in ("auto", "clsact") and clsact.ok:
        why = "bpf.tcAttach: clsact" if want == "clsact" else "no tcx on this kernel"
        return Check(name, True, f"clsact/cls_bpf ({why})", None, required)
    if want == "tcx":
        detail = f"bpf.tcAttach is tcx but tcx links do not work here ({tcx.detail})"
        fix = "bpf.tcAttach: auto (uses clsact when tcx is missing), or a kernel >= 6.6"
    elif want == "clsact":
        detail = f"bpf.tcAttach is clsact but clsact/cls_bpf does not work here ({clsact.detail})"
        fix = clsact.fix or "bpf.tcAttach: auto"
    else:
        detail = f"neither tcx ({tcx.detail}) nor clsact/cls_bpf ({clsact.detail}) works"
        fix = clsact.fix or "a kernel with CONFIG_NET_CLS_BPF=y and CONFIG_NET_SCH_INGRESS=y"
    detail += ": strict mode cannot be enforced"
    return Check(
        name, False, detail, fix + ("" if "permissive" in fix else ", or mesh.mode: permissive"), required
    )


def check_splice(mode: bool | str, hooks: Sequence[Check]) -> Check:
    """The same-node splice (``proxy.splice``, ``mode``), from the probes of
    the hooks it needs (sk_msg, sock_ops, SOCKHASH).  Required only when the
    config says ``true``; with ``auto`` (the default) a kernel without them
    gets a warning line: the agent keeps same-node connections on the
    userspace relay."""
    name = "same-node splice"
    required = mode is True
    if mode is False:
        return Check(name, True, "off (proxy.splice: false)", None, False)
    missing = [c for c in hooks if not c.ok]
    if not missing:
        return Check(name, True, "same-node L4 connections are spliced in the kernel", None, required)
    why = "; ".join(f"{c.name}: {c.detail}" for c in missing)
    if required:
        detail = f"proxy.splice is true, but the kernel lacks what it needs ({why})"
        fix = "a kernel with CONFIG_BPF_STREAM_PARSER=y (Linux >= 4.20), or proxy.splice: auto or false"
    else:
        detail = f"same-node connections stay on the userspace relay ({why})"
        fix = "a kernel with CONFIG_BPF_STREAM_PARSER=y (Linux >= 4.20); proxy.splice: false silences this"
    return Check(name, False, detail, fix, required)


def _kernel_probes(
    env: Environment, strict: bool, tc_attach: str = "auto", splice: bool | str = "auto"
) -> list[Check]:
    from agent.datapath import bpfsys, probe

    def hook(prog_type: int, attach: int = 0) -> Callable[[], None]:
        return lambda: probe.prog_loads(prog_type, attach)

    cgroup_fix = "use a kernel with CONFIG_CGROUP_BPF=y"
    sockmap_fix = "use a kernel with CONFIG_BPF_STREAM_PARSER=y"
    sock_ops = check_probe("hook sock_ops", hook(bpfsys.PROG_TYPE_SOCK_OPS), cgroup_fix)
    # Only the same-node splice needs these (required when proxy.splice is true).
    sockmap = [
        check_probe("hook sk_msg", hook(probe.PROG_TYPE_SK_MSG), sockmap_fix, splice is True),
        check_probe("sockhash map", probe.sockhash_creates, sockmap_fix, splice is True),
    ]
    return [
        check_probe(
            "bpf syscall", hook(probe.PROG_TYPE_SOCKET_FILTER), "use a kernel with CONFIG_BPF_SYSCALL=y"
        ),
        check_probe(
            "hook cgroup/connect4",
            hook(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
            cgroup_fix,
        ),
        check_probe(
            "hook cgroup/connect6",
            hook(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
            cgroup_fix,
        ),
        sock_ops,
        check_probe(
            "hook sched_cls (tc)",
            hook(bpfsys.PROG_TYPE_SCHED_CLS),
            "use a kernel with CONFIG_NET_CLS_BPF=y and CONFIG_NET_SCH_INGRESS=y",
        ),
        *sockmap,
        check_splice(splice, [sock_ops, *sockmap]),
        check_probe(
            "tunnel least-loaded",
            probe.tunnel_spread_loads,
            "Linux >= 4.19 with CONFIG_BPF_SYSCALL (SK_REUSEPORT programs); without it the kernel's "
            "SO_REUSEPORT hash spreads tunnel connections, and can put all of a peer's on one worker",
            False,
        ),
        check_probe(
            "bpf links (cgroup)",
            lambda: probe.cgroup_link_works(cgroup.cgroup2_mount(env.mountinfo)),
            "a kernel >= 5.7 (bpf links for cgroups); check 'cgroup v2' above",
        ),
    ] + _tc_probes(env, strict, tc_attach)


def _tc_probes(env: Environment, strict: bool, tc_attach: str) -> list[Check]:
    from agent.datapath import probe

    tcx = check_tcx(env.kernel_release, probe.tcx_link_works, required=strict and tc_attach == "tcx")
    clsact = check_clsact(probe.clsact_works, required=strict and tc_attach == "clsact")
    return [tcx, clsact, check_strict_attach(tcx, clsact, tc_attach, required=strict)]


# --- what an agent config needs ----------------------------------------------


@_check("pin dir")
def check_pin_dir(pin_dir: str, mountinfo: str = "/proc/self/mountinfo"):
    """The pin dir (created by the agent) must be on a bpf filesystem: the
    mount with the longest matching mount point decides."""
    fstype, where = "?", "/"
    for mp, t in _mounts(mountinfo):  # later mounts shadow earlier ones
        inside = pin_dir == mp or pin_dir.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(where):
            fstype, where = t, mp
    if fstype == "bpf":
        return True, f"{pin_dir} (bpffs at {where})", None
    return (
        False,
        f"{pin_dir} is on {fstype} at {where}, not on bpffs: pins would fail",
        "mount -t bpf bpf /sys/fs/bpf, or set bpf.pinDir under a bpffs mount",
    )


@_check("node cgroup")
def check_node_cgroup(path: str, mountinfo: str = "/proc/self/mountinfo"):
    try:
        root = cgroup.cgroup2_mount(mountinfo)
    except cgroup.CgroupError:
        return False, f"{path}: no cgroup v2 mount to resolve it in", "see 'cgroup v2' above"
    d = cgroup.resolve(path, root)
    if d != root and not d.startswith(root + "/"):
        return (
            False,
            f"{d} is not under the cgroup v2 mount {root}",
            f"set 'cgroup:' in the config to a path under {root}",
        )
    if not os.path.isdir(d):
        return False, f"{d} does not exist", f"mkdir -p {d}"
    return True, d, None


@_check("kubelet cgroups", required=False)
def check_kubelet_cgroups(root: str | None, mountinfo: str = "/proc/self/mountinfo"):
    """Kubernetes mode: the kubelet's pod cgroups are found under its root and
    the cgroup driver is recognised (pods are enrolled by their cgroup)."""
    from .workloads.kubecgroup import detect_driver

    try:
        d = cgroup.resolve(root or "", cgroup.cgroup2_mount(mountinfo))
    except cgroup.CgroupError:
        return False, "no cgroup v2 mount to look in", "see 'cgroup v2' above"
    driver = detect_driver(d)
    if driver is None:
        return (
            False,
            f"neither kubepods.slice (systemd driver) nor kubepods (cgroupfs) under {d}; "
            "pods stay pending until the kubelet creates them",
            "set workloads.kubeletCgroupRoot to the kubelet's --cgroup-root, or start the kubelet",
        )
    return True, f"{driver} driver under {d}", None


@_check("kubernetes API", required=False)
def check_kube_api(config: AgentConfig, timeout: float = 3.0):
    """Kubernetes mode: the API server answers a one-item list of nodes with
    the configured credentials (the agent retries anyway; this says why not)."""
    from .workloads.kubeclient import ApiError, KubeClient, KubeConfigError

    w = config.workloads
    try:
        client = (
            KubeClient.from_kubeconfig(w.kubeconfig, w.context) if w.kubeconfig else KubeClient.in_cluster()
        )
    except KubeConfigError as e:
        return False, str(e), "fix workloads.kubeconfig, or run in a pod with its service account mounted"
    try:
        doc = client.get("/api/v1/nodes", {"limit": "1"}, timeout=timeout)
    except ApiError as e:
        fix = {
            401: "the token is not accepted: check the service account token / kubeconfig user",
            403: "grant get/list/watch on nodes, namespaces, pods, services and endpointslices "
            "(the ClusterRole in deploy/)",
        }.get(e.status, "check that the API server is reachable from this node (address, port, CA)")
        return False, str(e), fix
    rv = (doc.get("metadata") or {}).get("resourceVersion")
    return True, f"{client.server} answers (resourceVersion {rv})", None


@_check("pinned datapath", required=False)
def check_pinned_datapath(pin_dir: str, cgroup_path: str, mountinfo: str = "/proc/self/mountinfo"):
    """What a previous agent left pinned (a stop keeps it): what `meshlet run`
    will do with it.  Informational: it never stops `meshlet run`."""
    from agent.datapath import abi
    from agent.datapath.loader import pinned_summary

    p = pinned_summary(pin_dir, cgroup.resolve(cgroup_path, cgroup.cgroup2_mount(mountinfo)))
    if not p["present"]:
        return True, f"nothing pinned at {pin_dir}: `meshlet run` loads the datapath", None
    seen = (
        f"ABI {p['abi_version'] if p['abi_version'] is not None else '?'}, "
        f"{'attached' if p['attached'] else 'NOT attached'}, {p['enrolled']} pod(s) enrolled, "
        f"{p['guarded']} pods' cgroup dir(s) guarded"
    )
    if not p["attached"]:
        return True, f"{seen}: leftovers; `meshlet run` replaces them", None
    if p["abi_version"] == abi.ABI_VERSION:
        then = "`meshlet run` adopts it (or upgrades it in place if its C differs)"
    else:
        then = (
            f"this meshlet has ABI {abi.ABI_VERSION}: `meshlet run` upgrades it in place, "
            "carrying maps over where their layout allows (else it refuses and leaves it running)"
        )
    return True, f"{seen}; {then}. `meshlet uninstall` removes it", None


# --- the running agent ------------------------------------------------------

NODE_CA_CSR = "node CA by CSR"


def check_node_ca_csr(ident: dict) -> Check:
    """``identity.nodeCA: csr`` (Kubernetes mode): has the node its
    intermediate, or what is its CSR waiting for?  ``ident`` is the running
    agent's ``/v1/status`` ``identity`` (what ``meshlet status`` and ``meshlet
    certs`` show), with its ``node_ca_csr``.

    Loaded: passes.  Waiting (asking, not yet approved or signed, installing,
    the API unreachable): a warning naming the CSR and how to look at it --
    nothing is signed for pods meanwhile.  Denied (or Failed, or a signed
    certificate the node refused): a required failure with the reason."""
    csr = ident["node_ca_csr"]
    state, message = csr.get("state") or "?", csr.get("message") or ""
    name = csr.get("csr")
    signer = csr.get("signer") or "meshlet.io/node-intermediate"
    ca = ident.get("node_ca")
    if ca:
        return Check(
            NODE_CA_CSR,
            True,
            f"node CA loaded ({ca.get('subject')}, expires {ca.get('not_after')}); "
            f"CSR client {state}: {message}",
            None,
            False,
        )
    look = (
        f"see it with `kubectl get csr {name}` (its conditions: `kubectl describe csr {name}`)"
        if name
        else f"see the node's requests with `kubectl get csr` (signer {signer})"
    )
    controller = (
        f"is `meshlet ca controller` running? It approves and signs {signer} CSRs "
        "(`kubectl -n meshlet-system get pods -l app.kubernetes.io/name=meshlet-ca`; its logs say why not)"
    )
    if state == "denied":
        return Check(
            NODE_CA_CSR,
            False,
            f"no node CA, nothing signed for pods: {message}",
            f"the CA controller refused this node's request for the reason above ({look}): fix what it "
            "names (the node name the agent's token is bound to, the trust domain, the controller's "
            "rules: `meshlet ca controller --help`); the agent asks again by itself",
            True,
        )
    if state == "error":
        fix = "the agent cannot reach the Kubernetes API (see the kubernetes API check); " + controller
    else:
        fix = f"{look}; {controller}"
    return Check(NODE_CA_CSR, False, f"no node CA yet: {message}", fix, False)


def check_node_ca_files(identity, *, agent: str | None = None, now=None) -> Check:
    """``identity.nodeCA: csr`` without a running agent: what the node's
    files say.  ``identity`` is the config's (``bundle``, ``caCert``,
    ``caKey``, ``trustDomain``); ``agent`` notes why the agent was not asked.

    A request record (``<caKey>.pending.json``, written by the agent's CSR
    client, :mod:`agent.identity.nodecsr`): pending -- a warning naming the
    CSR and since when; denied -- a required failure with the controller's
    reason.  No record: the intermediate on disk passes if it is this
    node's and valid, else a warning (the agent has not asked yet)."""
    from datetime import UTC, datetime

    from .identity.csrpolicy import renewal_due
    from .identity.issuer import IdentityFilesError, load_material
    from .identity.nodecsr import read_pending

    now = now or datetime.now(UTC)
    pending = identity.ca_key + ".pending.json"
    why_no_agent = f" (no agent answered at {agent}: read from the node's files)" if agent else ""
    try:
        rec = read_pending(pending)
    except FileNotFoundError:
        rec = None
    except (OSError, ValueError) as e:
        return Check(
            NODE_CA_CSR,
            False,
            f"cannot read the node's CSR record: {getattr(e, 'strerror', None) or e}{why_no_agent}",
            f"run as root (the record is 0600), or remove {pending} and let the agent ask again",
            False,
        )
    if rec is not None:
        name = rec["csr"]
        look = f"`kubectl get csr {name}` (its conditions: `kubectl describe csr {name}`)"
        if rec["state"] == "denied":
            return Check(
                NODE_CA_CSR,
                False,
                f"CSR {name} {rec.get('condition', 'Denied')}: {rec.get('reason')}: {rec.get('message')} "
                f"(recorded {rec.get('updated', '?')}); no node CA, nothing signed for pods{why_no_agent}",
                f"the CA controller refused this node's request for the reason above ({look}): fix what it "
                "names (the node name the agent's token is bound to, the trust domain, the controller's "
                "rules and re-issue limit: `meshlet ca controller --help`); the agent asks again by itself",
                True,
            )
        waiting = "signature" if rec["state"] == "approved" else "approval"
        return Check(
            NODE_CA_CSR,
            False,
            f"CSR {name} pending since {rec.get('created', '?')}, waiting for {waiting} "
            f"(last seen {rec.get('updated', '?')}){why_no_agent}",
            f"see it with {look}; is `meshlet ca controller` running? "
            "(`kubectl -n meshlet-system get pods -l app.kubernetes.io/name=meshlet-ca`; "
            "`kubectl -n meshlet-system get lease meshlet-ca` names the replica that signs)",
            False,
        )
    try:
        m = load_material(identity.trust_domain, identity.bundle, identity.ca_cert, identity.ca_key)
    except IdentityFilesError as e:
        return Check(
            NODE_CA_CSR,
            False,
            f"no node CA and no CSR pending: {e}{why_no_agent}",
            "the agent asks for its intermediate when it starts (`meshlet run`); its CSR client "
            f"records the request in {pending}",
            False,
        )
    subject = m.ca_cert.subject.rfc4514_string()
    due = renewal_due(m.ca_cert, now)
    if due is not None:
        return Check(
            NODE_CA_CSR,
            False,
            f"node CA {subject}: {due}; no renewal pending{why_no_agent}",
            "the agent renews it by itself while it runs (`meshlet run`)",
            False,
        )
    return Check(
        NODE_CA_CSR,
        True,
        f"node CA loaded from the files ({subject}, expires "
        f"{m.ca_cert.not_valid_after_utc.isoformat()}); no CSR pending{why_no_agent}",
        None,
        False,
    )


def check_agent_node_ca(sock: str, *, expected: bool = True, timeout: float = 2.0) -> Check | None:
    """:func:`check_node_ca_csr` on the agent that answers at ``sock``; None
    when it does not get its CA by CSR.  No agent answering: a warning if
    one was ``expected`` (asked for, or the config says CSR), else None."""
    from .adminclient import admin_get

    try:
        status, st = admin_get(sock, "/v1/status", timeout=timeout)
    except (OSError, ValueError) as e:
        if not expected:
            return None
        return Check(
            NODE_CA_CSR,
            False,
            f"cannot ask the agent at {sock}: {e}",
            "start the agent (`meshlet run`), or pass --socket / --node",
            False,
        )
    if status != 200:
        return Check(NODE_CA_CSR, False, f"the agent at {sock} answered {status}", None, False)
    ident = st.get("identity") or {}
    if not isinstance(ident.get("node_ca_csr"), dict):
        return None
    return _guarded(NODE_CA_CSR, False, lambda: check_node_ca_csr(ident))


# --- the whole list ---------------------------------------------------------


def run_checks(config: AgentConfig | None = None, env: Environment | None = None) -> list[Check]:
    """All checks, in reading order.  ``config`` (the agent's) adds what it
    needs; ``env`` says where to look (default: this machine)."""
    env = env or Environment()
    privileges = check_privileges(env.proc_status)
    checks = [
        privileges,
        check_cgroup2(env.mountinfo),
        check_bpffs(env.mountinfo, env.bpffs),
        check_jit(env.jit_sysctl),
        check_btf(env.btf_vmlinux),
        check_kernel_config((env.proc_config, os.path.join(env.boot_dir, f"config-{env.kernel_release}"))),
    ]
    if env.probe_kernel and not privileges.ok:
        # Ten copies of EPERM would hide the one fix that matters.
        checks.append(
            Check(
                "kernel probes",
                False,
                "skipped: loading programs needs CAP_SYS_ADMIN (see privileges)",
                AS_ROOT,
            )
        )
    elif env.probe_kernel:
        strict = config is not None and config.mesh.mode == "strict"
        tc_attach = (
            config.bpf.tc_attach if config is not None else os.environ.get("MESHLET_TC_ATTACH", "auto")
        )
        splice = config.proxy.splice if config is not None else "auto"
        checks += _kernel_probes(env, strict, tc_attach, splice)
    checks += [
        check_kernel_headers(env.kernel_release, env.modules_dir),
        check_bcc(env.python),
        check_tools(TOOLS, env.tool_path),
    ]
    if config is not None:
        checks += [
            check_pin_dir(config.bpf.pin_dir, env.mountinfo),
            check_node_cgroup(config.cgroup, env.mountinfo),
            check_pinned_datapath(config.bpf.pin_dir, config.cgroup, env.mountinfo),
        ]
        if config.workloads.source == "kubernetes":
            checks.append(check_kubelet_cgroups(config.workloads.kubelet_cgroup_root, env.mountinfo))
            checks.append(check_kube_api(config))
    return checks


def ready(checks: Iterable[Check]) -> bool:
    """True when every required check passed."""
    return all(c.ok or not c.required for c in checks)


def ensure_ready(config: AgentConfig | None = None, env: Environment | None = None) -> list[Check]:
    """For `meshlet run`: the checks, or ``DoctorError`` listing the fixes."""
    checks = run_checks(config, env)
    if not ready(checks):
        failed = [c for c in checks if not c.ok and c.required]
        raise DoctorError("this node cannot run meshlet yet:\n" + format_checks(failed))
    return checks


def _mark(c: Check) -> str:
    return "✓" if c.ok else ("✗" if c.required else "!")


def format_checks(checks: Sequence[Check]) -> str:
    """A table: mark, name, detail; the fix on the line under each failure.
    ✓ passed, ✗ failed, ! failed but optional."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{_mark(c)} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"  {'':<{width}}  fix: {c.fix}")
    failed = [c for c in checks if not c.ok]
    blocking = sum(c.required for c in failed)
    if not failed:
        lines.append(f"all {len(checks)} checks passed")
    else:
        lines.append(f"{len(failed)} of {len(checks)} checks failed, {blocking} of them required")
    return "\n".join(lines)


def checks_to_json(checks: Sequence[Check]) -> dict:
    """A JSON-ready dict: ``{"ready": bool, "checks": [{name, ok, detail, fix, required}]}``."""
    return {"ready": ready(checks), "checks": [dataclasses.asdict(c) for c in checks]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.doctor [--json]``; exit 0 when ready, 1 when not."""
    import argparse  # `python -m agent.doctor` only, not the agent's preflight

    parser = argparse.ArgumentParser(prog="meshlet doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    checks = run_checks()
    print(json.dumps(checks_to_json(checks), indent=2) if args.json else format_checks(checks))
    return 0 if ready(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
