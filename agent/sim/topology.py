"""Simulated cluster: nodes and pods as network namespaces plus cgroup v2 dirs.

Topology for N nodes x M pods (all of it inside namespaces made here; the
root network namespace is never touched and nothing is routed off the host)::

    <prefix>-fabric netns: bridge <prefix>br, ports <prefix>n<n> (no uplink)
        |
    <prefix>-node<n> netns: eth0 198.18.0.<n>/24, fd00:198:18::<n>/64
        lo: 10.244.<n>.1/32, fd00:244:<n>::1/128  (the node "gateway")
        routes: 10.244.<m>.0/24 via 198.18.0.<m>, fd00:244:<m>::/64 via fd00:198:18::<m>
        <prefix>h<n>p<i>: host side of each pod's veth, also holds the gateway
        addresses; routes <pod ip>/32 and <pod ip6>/128 point at it
        |
    <prefix>-node<n>-<pod> netns: eth0 10.244.<n>.<10+i>/32, fd00:244:<n>::<10+i>/128
        routes: gateway dev eth0 (scope link), default via the gateway

cgroups (v2, under the detected mount)::

    <mount>/meshlet-sim-<prefix>/<node>/system        node agent / proxy
    <mount>/meshlet-sim-<prefix>/<node>/pods/<pod>    one per pod

or, with ``Cluster(kubelet_layout=...)`` (or :meth:`Pod.use_kubelet_layout`),
as a kubelet and its container runtime lay a pod out on a real node: the pod
cgroup (what the agent enrolls) under ``<node>/kubelet`` (the node's kubelet
cgroup root), holding a pause-container cgroup and an app-container cgroup,
and the pod's processes run in the app container's, a *child* of the pod
cgroup (agent.workloads.kubecgroup spells the names)::

    <node>/kubelet/kubepods.slice/kubepods-besteffort.slice/
        kubepods-besteffort-pod<uid_>.slice/cri-containerd-<64hex>.scope   systemd
    <node>/kubelet/kubepods/besteffort/pod<uid>/<64hex>                   cgroupfs

Commands run "in" a pod or node are moved into its cgroup and entered into its
network namespace only: the mount namespace is kept, so /sys/fs/cgroup and
/sys/fs/bpf stay as the caller sees them (``ip netns exec`` would remount /sys).

Stdlib only; the network is set up by calling ``ip`` (iproute2) and
``nsenter`` (util-linux).  A state file ``/run/meshlet-sim/<prefix>.json``
records the creating process so :func:`cleanup_stale` can remove what crashed
runs left behind without touching live clusters.

Size: ~1,000 lines in one module on purpose: setup and teardown live side by side so
teardown stays the exact inverse of setup, crashed runs included (test harness, not the data path).
"""

from __future__ import annotations

import atexit
import errno
import fnmatch
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.cgroup import cgroup2_mount
from agent.workloads import kubecgroup

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
STATE_DIR = "/run/meshlet-sim"
CGROUP_PREFIX = "meshlet-sim-"
DEFAULT_NAMESPACE = "default"

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,6}$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAX_NODES = 250
_MAX_POD_SLOTS = 240  # pod IPs are .10 .. .249
#: ``Cluster(kubelet_layout=...)`` values: one cgroup driver for every node, or
#: "both" (systemd on odd nodes, cgroupfs on even ones)
KUBELET_LAYOUTS = ("systemd", "cgroupfs", "both")


class SimError(RuntimeError):
    """Setting up or driving the simulated cluster failed."""


class SimCommandError(subprocess.CalledProcessError):
    """A command run in a node or pod exited non-zero; the message includes
    the tail of its stderr (CalledProcessError's does not)."""

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        if err:
            base += " stderr: " + err.strip()[-2000:]
        return base


# --------------------------------------------------------------------------
# Running things inside a namespace + cgroup
# --------------------------------------------------------------------------


def netns_path(netns: str) -> str:
    """Path of a named netns (``/run/netns/<name>``); paths pass through."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


# $1 = cgroup dir, $2 = netns file, rest = argv.  The shell moves itself into
# the cgroup, then execs nsenter (which joins only the network namespace and
# execs the program), so the pid the caller sees is the program's pid.
_WRAP_CG_NS = 'echo $$ > "$1/cgroup.procs" || exit 126; ns=$2; shift 2; exec nsenter --net="$ns" -- "$@"'
_WRAP_CG = 'echo $$ > "$1/cgroup.procs" || exit 126; shift; exec "$@"'


def exec_argv(netns: str | None, cgroup: str | None, argv: Sequence[str]) -> list[str]:
    """Wrap ``argv`` so it runs in ``netns`` (name or path) and ``cgroup``
    (a cgroup v2 directory), keeping the caller's mount namespace.  Either may
    be None to skip that part.  The program keeps the pid of the wrapper."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(
            "argv must be a sequence of strings, not a string; use ['sh', '-c', cmd] for shell syntax"
        )
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty argv")
    if cgroup and netns:
        return ["sh", "-c", _WRAP_CG_NS, "meshlet-exec", cgroup, netns_path(netns), *argv]
    if cgroup:
        return ["sh", "-c", _WRAP_CG, "meshlet-exec", cgroup, *argv]
    if netns:
        return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    return argv


def exec_in(
    netns: str | None,
    cgroup: str | None,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30,
    **kw: Any,
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion inside ``netns`` + ``cgroup`` (see
    :func:`exec_argv`).  Unless the caller passes ``stdout``/``stderr``/
    ``capture_output``, output is captured as text.  With ``check`` a non-zero
    exit raises :class:`SimCommandError` (stderr in the message)."""
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        kw["capture_output"] = True
        kw.setdefault("text", True)
    p = subprocess.run(exec_argv(netns, cgroup, argv), timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise SimCommandError(p.returncode, list(argv), p.stdout, p.stderr)
    return p


def popen_in(
    netns: str | None, cgroup: str | None, argv: Sequence[str], *, wait_ready: float = 5.0, **kw: Any
) -> subprocess.Popen:
    """Start ``argv`` inside ``netns`` + ``cgroup`` and return the Popen.

    The wrapper moves the process into the cgroup first and joins the netns
    second; with ``wait_ready`` > 0 this waits (up to that many seconds) until
    the process is in the netns, so on return it is in both (unless it has
    already exited)."""
    p = subprocess.Popen(exec_argv(netns, cgroup, argv), **kw)
    if netns and wait_ready > 0:
        try:
            want = _ns_inode(netns_path(netns))
        except OSError:
            return p
        deadline = time.monotonic() + wait_ready
        while p.poll() is None:
            try:
                if _ns_inode(f"/proc/{p.pid}/ns/net") == want:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.warning("pid %d did not enter netns %s within %.1fs", p.pid, netns, wait_ready)
                break
            time.sleep(0.001)
    return p


def _ns_inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


# --------------------------------------------------------------------------
# Low-level helpers
# --------------------------------------------------------------------------


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    try:
        p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise SimError(f"{argv[0]} not found; install iproute2/util-linux") from e
    if p.returncode != 0:
        detail = (p.stderr or p.stdout).strip()
        where = f" (batch: {input.strip()[:500]!r})" if input else ""
        raise SimError(f"{shlex.join(argv)} failed ({p.returncode}): {detail}{where}")
    return p.stdout


def _ip(*args: str, netns: str | None = None) -> str:
    return _run(["ip", *(["-n", netns] if netns else []), *args])


def _ip_batch(netns: str | None, cmds: Iterable[str], *, force: bool = False) -> None:
    text = "".join(c + "\n" for c in cmds)
    if not text:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    _run(argv, input=text)


def _sysctl(netns: str, settings: dict[str, str]) -> None:
    """Set net sysctls inside ``netns`` (/proc/sys/net follows the netns of
    the process that opens it)."""
    script = "; ".join(
        f"echo {shlex.quote(v)} > /proc/sys/{k.replace('.', '/')}" for k, v in settings.items()
    )
    _run(["nsenter", f"--net={netns_path(netns)}", "--", "sh", "-ec", script])


def _proc_starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'.
    return int(data.rpartition(")")[2].split()[19])


def _creator_alive(state: dict) -> bool:
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    st = _proc_starttime(pid)
    return st is not None and st == state.get("starttime")


def _read_cgroup_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _populated(cg: str) -> bool:
    for line in _read_cgroup_file(os.path.join(cg, "cgroup.events")).splitlines():
        k, _, v = line.partition(" ")
        if k == "populated":
            return v.strip() != "0"
    return False


def _cgroup_pids(cg: str) -> list[int]:
    pids: list[int] = []
    for root, _dirs, _files in os.walk(cg):
        for tok in _read_cgroup_file(os.path.join(root, "cgroup.procs")).split():
            if tok.isdigit():
                pids.append(int(tok))
    return pids


def _kill_cgroup(cg: str, timeout: float = 5.0) -> None:
    """SIGKILL everything in cgroup ``cg`` and below; wait until empty."""
    if not os.path.isdir(cg):
        return
    me = os.getpid()
    try:
        with open(os.path.join(cg, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError as e:
        log.debug("cgroup.kill on %s failed (%s); sending SIGKILL", cg, e)
    deadline = time.monotonic() + timeout
    while _populated(cg) or _cgroup_pids(cg):
        for pid in _cgroup_pids(cg):
            if pid != me:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            log.warning("cgroup %s still populated after %.1fs", cg, timeout)
            return
        time.sleep(0.01)


def _kill_netns_procs(netns_names: Iterable[str]) -> None:
    """SIGKILL processes whose network namespace is one of ``netns_names``
    (e.g. started with ``ip netns exec`` outside our cgroups)."""
    inodes = set()
    for name in netns_names:
        try:
            inodes.add(_ns_inode(netns_path(name)))
        except OSError:
            pass
    if not inodes:
        return
    me = os.getpid()
    for _ in range(3):
        victims = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                if _ns_inode(f"/proc/{d}/ns/net") in inodes:
                    victims.append(int(d))
            except OSError:
                continue
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _rmdir_tree(top: str, timeout: float = 3.0) -> None:
    """rmdir a cgroup tree bottom-up, retrying while the kernel says busy."""
    if not os.path.isdir(top):
        return
    deadline = time.monotonic() + timeout
    while True:
        busy = None
        for root, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(root)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    busy = e
                else:
                    raise
        if not os.path.isdir(top):
            return
        if time.monotonic() > deadline:
            raise SimError(f"cannot remove cgroup {top}: {busy}")
        time.sleep(0.02)


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def _destroy_prefix(prefix: str, cgroup_mount: str | None = None) -> list[str]:
    """Remove every netns, cgroup and the state file of cluster ``prefix``.
    Never raises; returns the error messages it logged."""
    errors: list[str] = []

    def step(what: str, fn, *a, **kw) -> None:
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - teardown must continue
            msg = f"{prefix}: {what}: {e}"
            log.warning("sim teardown: %s", msg)
            errors.append(msg)

    try:
        mount = cgroup_mount or cgroup2_mount()
    except Exception as e:  # noqa: BLE001 - collected: teardown reports, never raises
        mount = None
        errors.append(f"{prefix}: no cgroup2 mount: {e}")
    cg_root = os.path.join(mount, CGROUP_PREFIX + prefix) if mount else None
    if cg_root:
        step("kill cgroup processes", _kill_cgroup, cg_root)
    names = [n for n in _list_netns() if n.startswith(prefix + "-")]
    step("kill netns processes", _kill_netns_procs, names)
    # Pods first (their veths' host ends live in node netns), then nodes,
    # then the fabric; deleting a netns destroys the interfaces in it.
    names.sort(key=lambda n: (-n.count("-"), n))
    if names:
        step("delete netns", _ip_batch, None, [f"netns delete {n}" for n in names], force=True)
        for n in names:  # anything the batch could not remove
            if os.path.exists(netns_path(n)):
                step(f"delete netns {n}", _ip, "netns", "delete", n)
    if cg_root:
        step("remove cgroups", _rmdir_tree, cg_root)
    try:
        os.unlink(_state_path(prefix))
    except FileNotFoundError:
        pass
    except OSError as e:
        errors.append(f"{prefix}: state file: {e}")
    return errors


def cleanup_stale(prefix_glob: str = "mls") -> list[str]:
    """Remove leftovers (netns, cgroups under ``meshlet-sim-*``, processes in
    them, state files) of simulated clusters whose creating process is dead.

    ``prefix_glob`` is matched against cluster prefixes with fnmatch; without
    wildcard characters it is a plain prefix (``"mls"`` == ``"mls*"``).
    Clusters whose creator is still running are left alone.  Returns the
    prefixes that were cleaned up."""
    pattern = prefix_glob if any(c in prefix_glob for c in "*?[") else prefix_glob + "*"
    candidates: set[str] = set()
    for n in _list_netns():
        if "-" in n:
            candidates.add(n.split("-", 1)[0])
    mount: str | None
    try:
        mount = cgroup2_mount()
        for d in os.listdir(mount):
            if d.startswith(CGROUP_PREFIX):
                candidates.add(d[len(CGROUP_PREFIX) :])
    except Exception as e:  # noqa: BLE001 - no cgroup2 mount: nothing of ours to clean there
        log.debug("cleanup_stale: no cgroup2 mount: %s", e)
        mount = None
    try:
        for f in os.listdir(STATE_DIR):
            if f.endswith(".json"):
                candidates.add(f[:-5])
    except FileNotFoundError:
        pass
    cleaned = []
    for prefix in sorted(candidates):
        if not fnmatch.fnmatchcase(prefix, pattern):
            continue
        try:
            with open(_state_path(prefix)) as sf:
                state = json.load(sf)
        except (OSError, ValueError):
            state = {}
        if _creator_alive(state):
            continue
        log.info("cleaning up stale simulated cluster %s (creator pid %s)", prefix, state.get("pid"))
        _destroy_prefix(prefix, mount)
        cleaned.append(prefix)
    return cleaned


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """A simulated node: a netns on the fabric bridge plus a cgroup dir."""

    name: str
    index: int
    netns: str
    address: str
    address6: str | None
    gateway4: str
    gateway6: str | None
    cgroup: str
    pods_cgroup: str
    system_cgroup: str
    _cluster: Cluster = field(repr=False, default=None)  # type: ignore[assignment]  # Cluster sets it

    @property
    def pod_cidr4(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def pod_cidr6(self) -> str:
        return f"fd00:244:{self.index}::/64"

    @property
    def pods(self) -> list[Pod]:
        return [p for p in self._cluster.pods if p.node == self.name]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run in the node netns and its ``system`` cgroup (output captured as
        text unless stdout/stderr are given); see :func:`exec_in`."""
        return exec_in(self.netns, self.system_cgroup, argv, check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start in the node netns + ``system`` cgroup; killed at down()."""
        return self._cluster._track(self, popen_in(self.netns, self.system_cgroup, argv, **kw))


@dataclass(eq=False)
class Pod:
    """A simulated pod: a netns with a veth to its node plus a cgroup dir."""

    name: str
    namespace: str
    service_account: str
    labels: dict[str, str]
    node: str
    netns: str
    ip4: str
    ip6: str | None
    cgroup: str
    host_veth: str
    slot: int = 0
    #: the Kubernetes UID the kubelet layout names the pod cgroup after
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: where the pod's processes run: None for the pod cgroup itself, else its
    #: app container's cgroup, a child of it (see :meth:`use_kubelet_layout`)
    container: str | None = None
    #: the pause container's cgroup in the kubelet layout (nothing runs there)
    sandbox: str | None = None
    _cluster: Cluster = field(repr=False, default=None)  # type: ignore[assignment]  # Cluster sets it

    @property
    def ips(self) -> list[str]:
        return [self.ip4] + ([self.ip6] if self.ip6 else [])

    @property
    def proc_cgroup(self) -> str:
        """The cgroup :meth:`run` and :meth:`popen` put processes in."""
        return self.container or self.cgroup

    def use_kubelet_layout(
        self,
        root: str,
        driver: str,
        qos: str | None = "BestEffort",
        runtime: str = "containerd",
        *,
        create: bool = True,
    ) -> str:
        """Lay the pod out as a kubelet with cgroup ``driver`` (its cgroup
        root ``root``) and container ``runtime`` would: the pod cgroup
        (becomes :attr:`cgroup`) with a pause-container and an app-container
        cgroup in it; processes started from now on run in the app
        container's (:attr:`container`).  Creates the directories unless
        ``create`` is false (the cluster's build does it); call it before the
        pod's processes start (running ones stay where they are).  Returns
        the pod cgroup."""
        pod_dir = kubecgroup.pod_cgroup(root, driver, self.uid, qos)
        self.cgroup = pod_dir
        self.sandbox = kubecgroup.container_cgroup(pod_dir, driver, runtime, secrets.token_hex(32))
        self.container = kubecgroup.container_cgroup(pod_dir, driver, runtime, secrets.token_hex(32))
        if create:
            self._make_cgroups()
        return pod_dir

    def _make_cgroups(self) -> None:
        for d in (self.cgroup, self.sandbox, self.container):
            if d:
                os.makedirs(d, exist_ok=True)

    @property
    def spiffe_path(self) -> str:
        return f"ns/{self.namespace}/sa/{self.service_account}"

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run in the pod netns + :attr:`proc_cgroup`; see :func:`exec_in`."""
        return exec_in(self.netns, self.proc_cgroup, argv, check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start in the pod netns + :attr:`proc_cgroup`; killed at remove_pod/down."""
        return self._cluster._track(self, popen_in(self.netns, self.proc_cgroup, argv, **kw))


class _FlowMap(dict):
    """Marker: dump this mapping in YAML flow style."""


class _FlowSeq(list):
    """Marker: dump this sequence in YAML flow style."""


# Clusters still up at interpreter exit are torn down (safety net).
_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _teardown_live() -> None:
    for c in list(_LIVE):
        c.down()


class Cluster:
    """N nodes x M pods simulated with netns, veths, a bridge and cgroups.

    ``pod_specs`` optionally maps a node (name ``"node1"`` or index ``1``) to a
    list of dicts with keys ``name``, ``namespace``, ``service_account``,
    ``labels``; nodes missing from it get ``pods_per_node`` default pods
    (``pod<n>-<i>``).  Labels default to ``{"app": <name>}`` and the service
    account to the ``app`` label (else ``default``).  Pod names are unique
    per cluster.  Use as a context manager, or call :meth:`up`/:meth:`down`.

    ``kubelet_layout`` (one of :data:`KUBELET_LAYOUTS`) lays every pod out as
    a kubelet would, BestEffort class, under ``<node cgroup>/kubelet``, with
    its processes in a container cgroup below the pod cgroup (see
    :meth:`Pod.use_kubelet_layout`; ``container_runtime`` names them).
    """

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 2,
        *,
        prefix: str | None = None,
        ipv6: bool = True,
        pod_specs: dict | None = None,
        kubelet_layout: str | None = None,
        container_runtime: str = "containerd",
    ) -> None:
        if kubelet_layout is not None and kubelet_layout not in KUBELET_LAYOUTS:
            raise ValueError(f"kubelet_layout must be one of {', '.join(KUBELET_LAYOUTS)}")
        if container_runtime not in kubecgroup.RUNTIMES:
            raise ValueError(f"container_runtime must be one of {', '.join(kubecgroup.RUNTIMES)}")
        self.kubelet_layout = kubelet_layout
        self.container_runtime = container_runtime
        if not 1 <= nodes <= _MAX_NODES:
            raise ValueError(f"nodes must be 1..{_MAX_NODES}")
        if pods_per_node < 0:
            raise ValueError("pods_per_node must be >= 0")
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise ValueError("prefix must match [a-z][a-z0-9]{0,6} (it goes into 15-char interface names)")
        self.ipv6 = ipv6
        self.cgroup_mount = cgroup2_mount()
        self.prefix = prefix or self._fresh_prefix()
        self.cgroup = os.path.join(self.cgroup_mount, CGROUP_PREFIX + self.prefix)
        self.fabric_netns = f"{self.prefix}-fabric"
        self.bridge = f"{self.prefix}br"
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self._next_slot: dict[str, int] = {}
        self._procs: list[tuple[object, subprocess.Popen]] = []
        self._lock = threading.RLock()
        self._up = False
        self._created = False  # anything may exist on the system

        for n in range(1, nodes + 1):
            name = f"node{n}"
            cg = os.path.join(self.cgroup, name)
            self.nodes.append(
                Node(
                    name=name,
                    index=n,
                    netns=f"{self.prefix}-{name}",
                    address=f"198.18.0.{n}",
                    address6=f"fd00:198:18::{n}" if ipv6 else None,
                    gateway4=f"10.244.{n}.1",
                    gateway6=f"fd00:244:{n}::1" if ipv6 else None,
                    cgroup=cg,
                    pods_cgroup=os.path.join(cg, "pods"),
                    system_cgroup=os.path.join(cg, "system"),
                    _cluster=self,
                )
            )
            self._next_slot[name] = 0

        specs = dict(pod_specs or {})
        for key in specs:
            if str(key) not in self._node_map() and not (isinstance(key, int) and 1 <= key <= nodes):
                raise ValueError(f"pod_specs: unknown node {key!r}")
        for node in self.nodes:
            lst = specs.get(node.name, specs.get(node.index))
            if lst is None:
                lst = [{"name": f"pod{node.index}-{i + 1}"} for i in range(pods_per_node)]
            for spec in lst:
                spec = dict(spec)
                unknown = set(spec) - {"name", "namespace", "service_account", "labels"}
                if unknown or "name" not in spec:
                    raise ValueError(f"bad pod spec {spec!r}: needs 'name'; unknown keys {sorted(unknown)}")
                self.pods.append(self._new_pod(node, **spec))

    # -- names / lookup ----------------------------------------------------

    @staticmethod
    def _fresh_prefix() -> str:
        existing = {n.split("-", 1)[0] for n in _list_netns()}
        for _ in range(100):
            p = "mls" + secrets.token_hex(2)
            if (
                p not in existing
                and not os.path.exists(_state_path(p))
                and not os.path.exists(os.path.join(cgroup2_mount(), CGROUP_PREFIX + p))
            ):
                return p
        raise SimError("could not find an unused cluster prefix")

    def _node_map(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in cluster {self.prefix}")

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(f"no pod {name!r} in cluster {self.prefix}")

    def _new_pod(
        self,
        node: Node,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        service_account: str | None = None,
        labels: dict | None = None,
    ) -> Pod:
        if not _DNS_LABEL_RE.match(name or ""):
            raise ValueError(f"pod name {name!r} is not a DNS label")
        if any(p.name == name for p in self.pods):
            raise ValueError(f"pod {name!r} already exists in this cluster")
        slot = self._next_slot[node.name]
        if slot >= _MAX_POD_SLOTS:
            raise SimError(f"node {node.name} ran out of pod addresses")
        self._next_slot[node.name] = slot + 1
        labels = {str(k): str(v) for k, v in (labels if labels is not None else {"app": name}).items()}
        sa = service_account or labels.get("app") or "default"
        host = f"{self.prefix}h{node.index}p{slot}"
        assert len(host) <= 15, host
        n = node.index
        pod = Pod(
            name=name,
            namespace=namespace,
            service_account=sa,
            labels=labels,
            node=node.name,
            netns=f"{self.prefix}-{node.name}-{name}",
            ip4=f"10.244.{n}.{10 + slot}",
            ip6=f"fd00:244:{n}::{10 + slot}" if self.ipv6 else None,
            cgroup=os.path.join(node.pods_cgroup, name),
            host_veth=host,
            slot=slot,
            _cluster=self,
        )
        driver = self.kubelet_driver(node)
        if driver is not None:
            pod.use_kubelet_layout(
                self.kubelet_root(node), driver, "BestEffort", self.container_runtime, create=False
            )
        return pod

    def kubelet_driver(self, node: Node) -> str | None:
        """The cgroup driver ``kubelet_layout`` gives ``node`` (None: no kubelet layout)."""
        if self.kubelet_layout == "both":
            return "systemd" if node.index % 2 else "cgroupfs"
        return self.kubelet_layout

    @staticmethod
    def kubelet_root(node: Node) -> str:
        """The node's kubelet cgroup root (``kubeletCgroupRoot``) in the kubelet layout."""
        return os.path.join(node.cgroup, "kubelet")

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Cluster:
        """Build namespaces, links, addresses, routes and cgroups.  On any
        failure everything built so far is torn down and the error re-raised."""
        with self._lock:
            if self._up:
                return self
            self._created = True
            _LIVE.add(self)
            try:
                self._write_state()
                self._build()
            except BaseException:
                self.down()
                raise
            self._up = True
            return self

    def _write_state(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "starttime": _proc_starttime(os.getpid()),
            "prefix": self.prefix,
            "cgroup": self.cgroup,
            "created": time.time(),
        }
        tmp = _state_path(self.prefix) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, _state_path(self.prefix))

    def _build(self) -> None:
        for n in self.nodes:
            for d in (n.cgroup, n.pods_cgroup, n.system_cgroup):
                os.makedirs(d, exist_ok=True)
        _ip("netns", "add", self.fabric_netns)
        _sysctl(
            self.fabric_netns,
            {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"},
        )
        for n in self.nodes:
            _ip("netns", "add", n.netns)
            _sysctl(n.netns, self._node_sysctls())
        fabric = [
            "link set lo up",
            f"link add {self.bridge} type bridge stp_state 0 mcast_snooping 0",
            f"link set {self.bridge} up",
        ]
        for n in self.nodes:
            port = f"{self.prefix}n{n.index}"
            fabric += [
                f"link add {port} type veth peer name eth0 netns {n.netns}",
                f"link set {port} master {self.bridge}",
                f"link set {port} up",
            ]
        _ip_batch(self.fabric_netns, fabric)
        for n in self.nodes:
            cmds = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {n.address}/24 dev eth0",
                f"addr add {n.gateway4}/32 dev lo",
            ]
            if self.ipv6:
                cmds += [f"addr add {n.address6}/64 dev eth0 nodad", f"addr add {n.gateway6}/128 dev lo"]
            for m in self.nodes:
                if m is n:
                    continue
                cmds.append(f"route add {m.pod_cidr4} via {m.address} dev eth0")
                if self.ipv6:
                    cmds.append(f"route add {m.pod_cidr6} via {m.address6} dev eth0")
            _ip_batch(n.netns, cmds)
        for p in self.pods:
            self._build_pod(p)

    @staticmethod
    def _node_sysctls() -> dict[str, str]:
        return {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv6.conf.all.forwarding": "1",
            "net.ipv6.conf.default.forwarding": "1",
            # No DAD anywhere: link-locals usable at once (a tentative
            # link-local on a fresh host veth drops the first packets).
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
        }

    def _build_pod(self, p: Pod) -> None:
        node = self.node(p.node)
        p._make_cgroups()
        _ip("netns", "add", p.netns)
        _sysctl(
            p.netns,
            {
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
            },
        )
        host = [
            f"link add {p.host_veth} type veth peer name eth0 netns {p.netns}",
            f"link set {p.host_veth} up",
            f"addr add {node.gateway4}/32 dev {p.host_veth}",
            f"route add {p.ip4}/32 dev {p.host_veth}",
        ]
        if self.ipv6:
            host += [
                f"addr add {node.gateway6}/128 dev {p.host_veth} nodad",
                f"route add {p.ip6}/128 dev {p.host_veth}",
            ]
        _ip_batch(node.netns, host)
        pod = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {p.ip4}/32 dev eth0",
            f"route add {node.gateway4}/32 dev eth0 scope link",
            f"route add default via {node.gateway4} dev eth0",
        ]
        if self.ipv6:
            pod += [
                f"addr add {p.ip6}/128 dev eth0 nodad",
                f"route add {node.gateway6}/128 dev eth0",
                f"route add ::/0 via {node.gateway6} dev eth0",
            ]
        _ip_batch(p.netns, pod)

    def down(self) -> None:
        """Tear everything down: tracked processes (SIGTERM, then SIGKILL),
        every process in the cluster's cgroups (cgroup.kill) or netns, the
        netns (and with them veths and the bridge), the cgroups, the state
        file.  Idempotent; logs problems instead of raising."""
        with self._lock:
            if not self._created:
                return
            try:
                self._stop_procs(self._procs)
            except Exception as e:  # noqa: BLE001 - logged; the rest of the teardown must run
                log.warning("sim teardown %s: stopping processes: %s", self.prefix, e)
            self._procs = []
            try:
                _destroy_prefix(self.prefix, self.cgroup_mount)
            except Exception as e:  # noqa: BLE001 - down() never raises
                log.warning("sim teardown %s: %s", self.prefix, e)
            self._up = False
            self._created = False
            _LIVE.discard(self)

    @staticmethod
    def _stop_procs(procs: Sequence[tuple[object, subprocess.Popen]], grace: float = 1.0) -> None:
        live = [p for _o, p in procs if p.poll() is None]
        for p in live:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        for _o, p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not die", p.pid)
            for s in (p.stdin, p.stdout, p.stderr):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _track(self, owner: object, p: subprocess.Popen) -> subprocess.Popen:
        with self._lock:
            self._procs.append((owner, p))
        return p

    # -- live changes ------------------------------------------------------

    def add_pod(
        self,
        node: str | Node,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        service_account: str | None = None,
        labels: dict | None = None,
    ) -> Pod:
        """Create a pod on a running cluster.  On failure the partial pod is
        removed and the error re-raised."""
        with self._lock:
            if not self._up:
                raise SimError("add_pod needs a cluster that is up")
            n = node if isinstance(node, Node) else self.node(node)
            pod = self._new_pod(n, name, namespace, service_account, labels)
            self.pods.append(pod)
            try:
                self._build_pod(pod)
            except BaseException:
                self._teardown_pod(pod)
                raise
            return pod

    def remove_pod(self, name: str) -> None:
        """Kill the pod's processes and delete its netns, veth and cgroup."""
        with self._lock:
            pod = self.pod(name)
            self._teardown_pod(pod)

    def _teardown_pod(self, pod: Pod) -> None:
        mine = [(o, p) for o, p in self._procs if o is pod]
        self._procs = [(o, p) for o, p in self._procs if o is not pod]
        try:
            self._stop_procs(mine, grace=0.5)
        except Exception as e:  # noqa: BLE001 - logged; the rest of the teardown must run
            log.warning("remove_pod %s: stopping processes: %s", pod.name, e)
        _kill_cgroup(pod.cgroup)
        if os.path.exists(netns_path(pod.netns)):
            _kill_netns_procs([pod.netns])
        node = self.node(pod.node)
        # Deleting the host end destroys the pair now (netns teardown is
        # asynchronous), so the node's routes to the pod go away at once.
        if os.path.exists(netns_path(node.netns)):
            try:
                _ip("link", "del", pod.host_veth, netns=node.netns)
            except SimError as e:
                log.debug("remove_pod %s: %s", pod.name, e)
        if os.path.exists(netns_path(pod.netns)):
            _ip("netns", "delete", pod.netns)
        _rmdir_tree(pod.cgroup)
        if pod in self.pods:
            self.pods.remove(pod)

    # -- inventory ---------------------------------------------------------

    def inventory(self) -> dict:
        """The node inventory document (see agent/workloads)."""
        nodes = []
        for n in self.nodes:
            d: dict[str, Any] = {"name": n.name, "address": n.address}
            if n.address6:
                d["address6"] = n.address6
            nodes.append(d)
        pods = [
            {
                "name": p.name,
                "namespace": p.namespace,
                "serviceAccount": p.service_account,
                "labels": dict(p.labels),
                "node": p.node,
                "ips": list(p.ips),
                "cgroup": p.cgroup,
            }
            for p in self.pods
        ]
        return {"nodes": nodes, "pods": pods}

    def write_inventory(self, path: str, **overrides: Any) -> None:
        """Write :meth:`inventory` as YAML (top-level keys in ``overrides``
        replace or extend the document), atomically.  Pod ``labels`` and
        ``ips`` are written in flow style, everything else in block style."""
        import yaml

        class _Dumper(yaml.SafeDumper):
            pass

        _Dumper.add_representer(
            _FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True)
        )
        _Dumper.add_representer(
            _FlowSeq, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
        )

        doc = self.inventory()
        for p in doc["pods"]:
            p["labels"] = _FlowMap(p["labels"])
            p["ips"] = _FlowSeq(p["ips"])
        doc.update(overrides)
        text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return f"Cluster(prefix={self.prefix!r}, nodes={len(self.nodes)}, pods={len(self.pods)}, {state})"
