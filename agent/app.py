"""The node agent: composition root and lifecycle (``meshlet run``).

It owns four things and keeps them in step with the node inventory, which a
:class:`~agent.workloads.source.WorkloadSource` supplies (built from the
config by :func:`~agent.workloads.source.source_from_config`):

* the eBPF datapath (loaded or adopted from bpffs pins),
* the kernel maps of enrolled workloads (a pod joining is a map write),
* the proxy state file the proxy workers read,
* the proxy worker processes (started in their own session, so the agent can
  die and restart without touching traffic; a restarted agent adopts them).

Two agents of one node (a DaemonSet upgrade with ``maxSurge: 1``) share the
pinned datapath and the host's ports; the hand-over lease
(:mod:`agent.handover`) says which one, the owner, writes the shared state
(kernel maps, node CA files, the metrics port).  A newcomer that finds a
live owner is its successor: it publishes its own proxy state, starts its
workers once the owner's guard allows its cgroup, and claims the lease once
they are ready; the old agent is then superseded: it writes nothing shared
and, on SIGTERM, drains its workers instead of leaving them running.  Every
shared write happens under the lease's lock after checking ownership.

An admin API on a Unix socket (:mod:`agent.admin`) answers ``meshlet
status`` and friends; :mod:`agent.supervisor` runs the proxy workers.  The
asyncio part is a thin shell: every step is a plain method.

Size: about 900 lines: the sync loop (inventory, identity, policy, kernel), its health for the
probes and the node's uninstall share the agent's state; the admin API (admin.py), proxy
supervision (supervisor.py) and the workload sources (workloads/) live elsewhere.  The next split
is the kernel-policy sync and uninstall into a module of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import cgroup as cg
from .admin import start_admin
from .config import AgentConfig
from .filesig import file_sig
from .fsutil import write_atomic
from .handover import Beat, Lease
from .supervisor import ProxySupervisor
from .workloads.model import Inventory, services_doc, workload_id
from .workloads.source import WorkloadSource, source_from_config
from .yamlsrc import SourceError

if TYPE_CHECKING:  # imported where used: the CLI's `run` should not pay for them at import
    from .datapath.flowtable import FlowReader
    from .identity.issuer import NodeIssuer
    from .identity.nodecsr import NodeEnroller
    from .observe.prometheus import MetricsServer
    from .policy.store import PolicyStore
    from .workloads.kubepolicy import PolicyWatcher

log = logging.getLogger("meshlet.agent")

STATE_VERSION = 1
POLL_INTERVAL = 0.5


class AgentError(RuntimeError):
    """Start-up failed; the message says what to fix."""


def ca_socket_path(cfg: AgentConfig) -> str:
    return os.path.join(cfg.run_dir, "ca.sock")


def tracing_state(cfg: AgentConfig) -> dict:
    """The state's ``tracing`` section: what the workers' span exporter needs."""
    t = cfg.tracing
    return {
        "otlp_endpoint": t.otlp_endpoint,
        "sample_rate": t.sample_rate,
        "max_queue": t.max_queue,
        "max_batch": t.max_batch,
        "export_timeout": t.export_timeout,
        "export_interval": t.export_interval,
        "service_instance": cfg.node,
    }


def proxy_state(
    cfg: AgentConfig,
    inv: Inventory,
    cgroup_ids: dict[str, int],
    generation: int,
    identity_generation: int = 0,
) -> dict:
    """The document the proxy workers read (pure: easy to test)."""
    return {
        "version": STATE_VERSION,
        "generation": generation,
        "node": cfg.node,
        "trust_domain": cfg.identity.trust_domain,
        "identity": {
            "trust_domain": cfg.identity.trust_domain,
            "ca_socket": ca_socket_path(cfg),
            "generation": identity_generation,
            "cert_ttl": cfg.identity.cert_ttl,
        },
        "pin_dir": cfg.bpf.pin_dir,
        "listen": {
            "ipv4": "0.0.0.0",
            "ipv6": "::" if cfg.proxy.redirect_ipv6 else None,
            "outbound_port": cfg.proxy.outbound_port,
            "tunnel_port": cfg.proxy.tunnel_port,
        },
        "connect_timeout": cfg.proxy.connect_timeout,
        "mesh_mark": cfg.proxy.mesh_mark,
        "buffer_size": cfg.proxy.buffer_size,
        "tunnel_security": cfg.proxy.tunnel_security,
        "tls_resumption": cfg.proxy.tls_resumption,
        "splice": cfg.proxy.splice is not False,  # the maps decide: none pinned, no splice
        "tunnel_mux": cfg.proxy.tunnel_mux,
        "path_parameters": cfg.proxy.path_parameters,
        "l7": cfg.proxy.l7,
        "access_log": {
            "enabled": cfg.access_log.enabled,
            "sampling": cfg.access_log.sampling,
            "path": cfg.access_log_path,
        },
        "tracing": tracing_state(cfg),
        "nodes": {
            n.name: {"address": str(n.address), "address6": str(n.address6) if n.address6 else None}
            for n in inv.nodes
        },
        "pods": [
            {
                "key": p.key,
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "node": p.node,
                "ips": [str(ip) for ip in p.ips],
                "cgroup_id": cgroup_ids.get(p.key),
                "mesh": p.mesh,
                "labels": dict(p.labels),
            }
            for p in inv.pods
        ],
        # Every service with its VIPs, ports and per-port endpoints computed
        # from the pods' labels (agent/workloads/model.py); the proxy
        # indexes them by (VIP, port) and routes connections to a VIP.
        "services": services_doc(inv.service_index),
    }


@dataclass
class Agent:
    cfg: AgentConfig
    source: WorkloadSource | None = None  # where the inventory comes from; default: from cfg
    inventory: Inventory | None = None
    inventory_error: str | None = None
    generation: int = 0
    enrolled: dict[str, int] = field(default_factory=dict)  # pod key -> cgroup id
    pending: dict[str, str] = field(default_factory=dict)  # pod key -> why not enrolled
    tc_errors: list[str] = field(default_factory=list)
    guarded: list[str] = field(default_factory=list)  # pods' cgroup dirs under the unknown-pod guard
    guard_pending: set[str] = field(default_factory=set)  # mesh: false pods whose cgroup is missing
    unguardable: set[str] = field(default_factory=set)  # dirs that cannot be guarded (warned once)
    started: float = field(default_factory=time.time)
    issuer: NodeIssuer | None = None
    identity_generation: int = 0
    identity_sig: tuple | None = None
    identity_error: str | None = None
    enroller: NodeEnroller | None = None  # identity.nodeCA: csr (Kubernetes mode)
    flow_reader: FlowReader | None = None  # while serving
    policies: PolicyStore | None = None  # from start()
    policy_watch: PolicyWatcher | None = None  # Kubernetes mode: the cluster's policies (start())
    policy_lock: threading.Lock = field(default_factory=threading.Lock)
    l4_kernel: dict = field(default_factory=dict)  # last kernel policy sync (plan summary)
    l4_sig: tuple | None = None  # (policy version, generation) it was for
    l4_names: dict = field(default_factory=dict)  # kernel policy id -> namespace/name
    l4_lock: threading.Lock = field(default_factory=threading.Lock)  # tick vs admin API
    last_tick: float | None = None  # time.monotonic() the loop last finished a tick (/healthz)
    role: str = "successor"  # hand-over role (agent.handover); the first beat decides
    admitted: bool = False  # successor: the owner's guard allows our cgroups (workers may start)
    admitted_members: tuple[str, ...] = ()  # owner: members whose cgroups our last guard sync allowed
    member_cgroups: frozenset[str] = frozenset()  # owner: the other live members' cgroups
    synced_mesh: frozenset[str] = frozenset()  # the mesh cgroups the last guard sync allowed
    metrics: MetricsServer | None = None  # the metrics server while this agent owns the node
    metrics_failed: bool = False  # its port was taken (logged once)
    takeover_error: str | None = None  # successor: taking the node over failed (never retried)
    health_written: tuple = ()  # (ready, why, role, time) last written to runDir/health.json

    def __post_init__(self) -> None:
        from .datapath.loader import Datapath, DatapathSpec

        self.cgroup_dir = cg.resolve(self.cfg.cgroup)
        self.state_path = os.path.join(self.cfg.run_dir, "proxy-state.json")
        self.spec = DatapathSpec(
            node=self.cfg.node,
            pin_dir=self.cfg.bpf.pin_dir,
            cgroup=self.cgroup_dir,
            redirect_ip4=str(self.cfg.proxy.redirect_ipv4),
            redirect_ip6=str(self.cfg.proxy.redirect_ipv6) if self.cfg.proxy.redirect_ipv6 else None,
            outbound_port=self.cfg.proxy.outbound_port,
            mesh_mark=self.cfg.proxy.mesh_mark,
            exclude_ports=tuple(self.cfg.mesh.exclude_ports),
            exclude_cidrs=tuple(str(c) for c in self.cfg.mesh.exclude_cidrs),
            tunnel_port=self.cfg.proxy.tunnel_port,
        )
        if not self.cfg.bpf.flow_tracking:
            self.spec = dataclasses.replace(self.spec, flow_tracking=False)
        if self.cfg.bpf.tc_attach != "auto":  # else the spec's default (MESHLET_TC_ATTACH or auto)
            self.spec = dataclasses.replace(self.spec, tc_attach=self.cfg.bpf.tc_attach)
        if self.cfg.proxy.splice is not False:  # the same-node kernel splice, where the kernel can
            from .datapath.probe import splice_plan, splice_supported

            try:
                spliced, warning = splice_plan(self.cfg.proxy.splice, splice_supported())
            except ValueError as e:  # proxy.splice: true on a kernel without the hooks
                raise AgentError(str(e)) from e
            if warning:
                log.warning("%s", warning)
            self.spec = dataclasses.replace(self.spec, splice=spliced)
        self.datapath = Datapath(self.spec)
        self.proxies = ProxySupervisor(self.cfg.run_dir, self.state_path, self.cfg.proxy.workers)
        self.lease = Lease(self.cfg.handover_dir or self.cfg.run_dir)
        if self.source is None:
            self.source = source_from_config(self.cfg)

    # --- start ----------------------------------------------------------------

    def preflight(self) -> None:
        """Fail fast, before touching the kernel, when something is missing."""
        from .doctor import DoctorError, ensure_ready

        try:
            ensure_ready(self.cfg)
        except DoctorError as e:
            raise AgentError(f"{e}\nnothing was attached.") from e
        if not os.path.isdir(self.cgroup_dir):
            raise AgentError(
                f"node cgroup {self.cgroup_dir} does not exist; create it or fix 'cgroup:' in the config"
            )

    def start(self) -> None:
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        if self.cfg.proxy.tunnel_security != "mtls":
            log.warning(
                "proxy.tunnelSecurity is %s: traffic between nodes is NOT encrypted or "
                "authenticated. This setting exists for benchmarks only.",
                self.cfg.proxy.tunnel_security,
            )
        src = self.source
        assert src is not None
        try:
            self.inventory = src.start()
        except SourceError as e:
            raise AgentError(f"inventory is invalid, not starting:\n{e}") from e
        except OSError as e:
            raise AgentError(f"cannot read inventory {src.where}: {e.strerror}") from e
        if self.inventory.node(self.cfg.node) is None:
            raise AgentError(
                f"{src.where}: node {self.cfg.node!r} (from the config's "
                "'node:') is not in the inventory's nodes[]"
            )
        self.load_policies()
        self.start_policy_watch()
        # Continue the generation count of a state file left by a previous
        # agent, so adopted proxy workers see a newer generation.
        try:
            with open(self.state_path) as f:
                self.generation = int(json.load(f).get("generation", 0))
        except (OSError, ValueError, AttributeError):
            pass
        try:
            with open(self.state_path) as f:
                self.identity_generation = int(json.load(f)["identity"]["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # identity.nodeCA: csr: the node asks for its intermediate and, until it
        # has one, runs without (its issuer signs nothing: fail closed).  The
        # module (and the Kubernetes client it imports) only when asked for:
        # the agent would hold its code for its whole life.
        if self.cfg.identity.node_ca == "csr":
            from .identity.nodecsr import enroller_for

            try:
                self.enroller = enroller_for(self.cfg, self.source)
            except ValueError as e:
                raise AgentError(str(e)) from e
        if self.enroller is not None:
            self.enroller.start()
        self.load_identity(initial=self.enroller is None)
        # Workers a previous agent left running are ours before the first
        # sync, so it waits for them to load a pod (one created while no agent
        # ran) before the kernel sends them its connections.
        self.proxies.adopt_running()
        os.makedirs(self.lease.directory, mode=0o700, exist_ok=True)
        self.beat()  # alone on the node: owner, and the datapath is open and synced
        if self.role == "successor":
            doc = self.lease.read()
            log.info(
                "agent %s owns node %s (lease %s): starting as its successor; this agent writes "
                "nothing shared until its proxy workers are ready and it takes the lease",
                doc.owner,
                self.cfg.node,
                self.lease.path,
            )
            self.sync()  # publishes this agent's proxy state only

    # --- the hand-over lease: two agents on one node (agent/handover.py) ----------------

    @contextlib.contextmanager
    def shared_writes(self):
        """Yields whether this agent owns the node, holding the lease's lock
        meanwhile: write shared state (kernel maps, node CA files) only when
        it yields True, inside the block, so a claim cannot come in between."""
        with self.lease.locked():
            yield self.lease.read().owner == self.lease.instance

    def _home(self) -> str:
        try:
            st = os.stat(self.cfg.run_dir)
        except OSError:
            return ""
        return f"{st.st_dev}:{st.st_ino}"

    def beat(self, leaving: bool = False) -> None:
        """Renew this agent's entry in the lease; act on a role change."""
        prev = self.role
        if prev == "successor":
            ready = self.admitted and not self.takeover_error and self.proxies.all_ready()
        else:
            ready = bool(self.proxies.workers) and all(self.proxies.alive())
        pod = os.environ.get("POD_NAME") or f"{socket.gethostname()}:{os.getpid()}"
        doc, role = self.lease.beat(
            Beat(
                self.lease.instance,
                prev,
                ready,
                tuple(sorted(self._mesh_cgroups())),
                pod=pod,
                home=self._home(),
                policy=self.policies.version if self.policies is not None else "",
                admitted=self.admitted_members if prev == "owner" else None,
                leaving=leaving,
            )
        )
        if leaving:
            return
        me = self.lease.instance
        others = frozenset(c for k, m in doc.members.items() if k != me for c in m.cgroups)
        self.admitted = me in doc.allowed
        if role == "owner":
            changed = others != self.member_cgroups
            self.member_cgroups = others
            if prev != "owner":
                try:
                    self._take_over(prev, doc.epoch)
                except Exception as e:
                    if not (prev == "successor" and self.admitted):
                        raise  # alone on the node: the start fails, as it always did
                    # A live agent let us in: give the node back to it rather than leave it to no one.
                    self.takeover_error = f"taking the node over failed, gave it back: {e}"
                    log.exception("node %s: %s", self.cfg.node, self.takeover_error)
                    self.lease.resign()
                    self.role = "successor"
                    return
            elif changed:
                self.sync()  # the guard allows the new member's cgroups (or stops allowing a gone one's)
            self.admitted_members = tuple(
                k for k, m in doc.members.items() if k != me and set(m.cgroups) <= self.synced_mesh
            )
        self.role = role
        if role == "superseded" and prev == "owner":
            log.warning(
                "agent %s took over node %s (lease epoch %d): this agent stops writing shared state "
                "and frees the metrics port; its proxy workers serve until SIGTERM, then drain",
                doc.owner,
                self.cfg.node,
                doc.epoch,
            )

    def _take_over(self, prev: str, epoch: int) -> None:
        """This agent just took the lease: open the pinned datapath (adopt it,
        or upgrade it in place; a fresh node loads it) and sync everything."""
        if prev == "superseded":
            log.warning(
                "node %s: the agent that took over is gone; this agent takes the node back (epoch %d)",
                self.cfg.node,
                epoch,
            )
            self.datapath.close()  # the other agent may have upgraded the maps in place: re-adopt
        elif self.admitted:
            log.info(
                "node %s: this agent's proxy workers are ready; it owns the node now (epoch %d)",
                self.cfg.node,
                epoch,
            )
        with self.shared_writes() as mine:
            if not mine:
                raise RuntimeError("another agent claimed the node while this one was taking it over")
            how = self.datapath.open()
        log.info("datapath %s (pins in %s, hooks on %s)", how, self.spec.pin_dir, self.cgroup_dir)
        self.role = "owner"  # the syncs below write (status and probes show it once the tick is over)
        self.l4_sig = None
        self.sync()
        self.sync_policy_kernel()
        self.proxies.supervise()

    # --- authorization policies (#4): applied through the admin API -----------------

    def load_policies(self) -> None:
        """The policies applied before a restart (runDir/policies.yaml): the
        AuthorizationPolicies and TrafficPolicies; also rewrites
        runDir/policies.json and runDir/traffic.json for the proxy workers."""
        from .policy.store import PolicyStore
        from .traffic.trafficpolicy import TRAFFIC_KIND

        store = PolicyStore(
            self.cfg.run_dir,
            trust_domain=self.cfg.identity.trust_domain,
            kinds=[TRAFFIC_KIND],
            max_bytes=self.cfg.workloads.max_policy_bytes,
        )
        try:
            self.policies = store.load()
        except SourceError as e:
            raise AgentError(
                f"stored policies {store.store_path} do not load, not starting (fix or remove the file):\n{e}"
            ) from e
        log.info("policies: %d, version %s", store.count, store.version)

    def start_policy_watch(self) -> None:
        """Kubernetes mode: the policies are the cluster's custom resources
        (agent/workloads/kubepolicy.py), applied through the store as
        `meshlet policy apply` does; the local apply is refused (admin.py).
        The first set is in force before any pod is enrolled."""
        src = self.source
        if getattr(src, "kind", None) != "kubernetes":  # no Kubernetes client code in file mode
            return
        from .workloads.kubernetes import KubernetesSource

        if not isinstance(src, KubernetesSource):
            return
        from .workloads.kubepolicy import PolicyWatcher

        store = self.policies
        assert store is not None
        w = PolicyWatcher(
            src.client,
            self.apply_cluster_policies,
            trust_domain=store.trust_domain,
            root_namespace=store.root_namespace,
            watch_timeout=self.cfg.workloads.watch_timeout,
        )
        self.policy_watch = w.start()
        if not w.wait_applied(self.cfg.workloads.sync_timeout):
            missing = "; ".join(w.not_synced()) or "no answer yet"
            w.close()
            self.policy_watch = None
            raise AgentError(
                f"Kubernetes API {src.where}: policies not synced within "
                f"{self.cfg.workloads.sync_timeout:g}s: {missing}"
            )

    def apply_cluster_policies(self, sources: list[tuple[str, str]]) -> None:
        """The cluster's whole policy set becomes the store's (the policy
        watcher's thread): create/replace what is there, delete the rest,
        then this node's kernel entries."""
        from .workloads.kubepolicy import replace_store

        store = self.policies
        assert store is not None
        with self.policy_lock:
            before = store.version
            replace_store(store, sources)
            if store.version != before:
                log.info(
                    "policies from the cluster: version %s -> %s (%d documents)",
                    before,
                    store.version,
                    store.count,
                )
        self.sync_policy_kernel()

    def policy_status(self) -> dict:
        if self.policies is None:
            return {"version": None, "count": 0}
        out = self.policies.summary()
        if self.policy_watch is not None:
            out["cluster"] = self.policy_watch.describe()
        if self.l4_kernel:
            from .policy.kernel import NO_POLICY_ID

            denied: dict[str, int] = {}
            try:
                for pid, n in self.datapath.l4_denied().items():
                    name = (
                        "(no ALLOW rule matched)"
                        if pid == NO_POLICY_ID
                        else self.l4_names.get(pid, f"id {pid}")
                    )
                    denied[name] = denied.get(name, 0) + n
            except (OSError, KeyError):
                pass
            out["kernel"] = {**self.l4_kernel, "denied_by_policy": denied}
        return out

    def sync_policy_kernel(self, wait: bool = True) -> bool:
        """Recompute the connect-time L4 entries (agent.policy.kernel) when the
        policies or the inventory changed, and diff-sync ml_l4_policy.  Called
        from every tick and right after an apply/delete through the admin API, so
        `meshlet policy apply` returns once this node's kernel enforces it.

        ``wait=False`` (the tick): if another thread is syncing (the admin
        API, after an apply of a large set), return False at once instead of
        waiting; the tick goes on with the rest of its work (restarting
        crashed proxy workers) and the next tick catches up."""
        if not self.l4_lock.acquire(blocking=wait):
            return False
        try:
            self._sync_policy_kernel()
        finally:
            self.l4_lock.release()
        return True

    def _sync_policy_kernel(self) -> None:
        from .policy.kernel import KernelPlan, compile_kernel, view_from_pods
        from .yamlsrc import gc_paused

        store, inv = self.policies, self.inventory
        if store is None or inv is None or not self.datapath.maps or self.role != "owner":
            return  # not the node's owner (a hand-over): it writes the kernel policy
        # No store lock: an apply (admin API thread) replaces the store's set
        # whole when it is done, so this is the old set or the new one, and
        # the loop never waits for an apply.
        ps = store.policyset
        version = ps.version  # TrafficPolicies do not matter here
        sig = (version, self.generation)
        if sig == self.l4_sig:
            return
        # bpf.kernelPolicy: false (or MESHLET_KERNEL_POLICY=0, for tests) leaves
        # every decision to the proxies.
        enabled = self.cfg.bpf.kernel_policy and os.environ.get("MESHLET_KERNEL_POLICY", "1") != "0"
        if enabled:
            srcs, dsts = view_from_pods(
                inv.pods,
                self.cfg.node,
                self.cfg.identity.trust_domain,
                {k: workload_id(k) for k in self.enrolled},
            )
            with gc_paused():  # as the policy store does: 10,000 rules, 0.39 -> 0.14 s of CPU
                plan = compile_kernel(ps, srcs, dsts, self.spec.max_l4_rules)
        else:
            plan = KernelPlan(capacity=self.spec.max_l4_rules)
        if plan.overflow and not self.l4_kernel.get("overflow"):
            log.warning("kernel L4 policy: %s", plan.summary()["reason"])
        with self.shared_writes() as mine:
            if not mine:
                return  # the node's owner writes the kernel policy (a hand-over)
            changes = self.datapath.sync_l4(plan.entries)
        self.l4_sig = sig
        self.l4_names.update(plan.policies)
        self.l4_kernel = {**plan.summary(), "version": version, "enabled": enabled}
        if changes["added"] or changes["updated"] or changes["removed"]:
            log.info(
                "kernel L4 policy for version %s: %d entries (%d deny), +%d ~%d -%d",
                version,
                len(plan.entries),
                plan.denies,
                changes["added"],
                changes["updated"],
                changes["removed"],
            )

    # --- identity: the node CA that signs its pods' SVIDs --------------------------

    def _identity_paths(self) -> list[str]:
        i = self.cfg.identity
        return [i.bundle, i.ca_cert, i.ca_key]

    def load_identity(self, initial: bool = False) -> bool:
        """(Re)load the CA files.  At start-up a problem is fatal; later it is
        logged and the previous material stays in force."""
        from datetime import timedelta

        from .identity.issuer import IdentityFilesError, NodeIssuer, load_material

        i = self.cfg.identity
        sig = _identity_sig(self._identity_paths())
        try:
            material = load_material(i.trust_domain, i.bundle, i.ca_cert, i.ca_key)
        except IdentityFilesError as e:
            if initial:
                raise AgentError(str(e)) from e
            self.identity_error = str(e)
            log.error("identity files not applied, keeping the previous ones: %s", e)
            self.identity_sig = sig
            return False
        changed = self.identity_sig is not None and sig != self.identity_sig
        if self.issuer is None:
            self.issuer = NodeIssuer(i.trust_domain, material, timedelta(seconds=i.cert_ttl), self.cfg.node)
        else:
            self.issuer.material = material
        self.identity_error = None
        if initial:
            prev = self._read_identity_fingerprint()
            if prev is not None and prev != sig[1]:
                changed = True
        self.identity_sig = sig
        self._write_identity_fingerprint(sig[1])
        if changed:
            self.identity_generation += 1
            log.info(
                "CA material or trust bundle changed (%d roots); proxies will renew (identity generation %d)",
                len(material.bundle.roots),
                self.identity_generation,
            )
        return changed

    def identity_status(self) -> dict:
        out: dict = {
            "trust_domain": self.cfg.identity.trust_domain,
            "generation": self.identity_generation,
            "error": self.identity_error,
        }
        if self.enroller is not None:
            out["node_ca_csr"] = self.enroller.status()
            if self.issuer is None:
                out["error"] = f"no node intermediate yet, no workload certificates: {self.enroller.message}"
        if self.issuer is not None:
            m = self.issuer.material
            out.update(
                {
                    "bundle_fingerprint": m.bundle.fingerprint(),
                    "roots": [
                        {
                            "subject": r.subject.rfc4514_string(),
                            "serial": f"{r.serial_number:x}",
                            "not_after": r.not_valid_after_utc.isoformat(),
                        }
                        for r in m.bundle.roots
                    ],
                    "node_ca": {
                        "subject": m.ca_cert.subject.rfc4514_string(),
                        "serial": f"{m.ca_cert.serial_number:x}",
                        "not_after": m.ca_cert.not_valid_after_utc.isoformat(),
                    },
                    "allowed": sorted(self.issuer.allowed),
                    "issuer_counters": dict(self.issuer.counters),
                }
            )
        return out

    def _read_identity_fingerprint(self) -> str | None:
        try:
            with open(os.path.join(self.cfg.run_dir, "identity.json")) as f:
                return json.load(f).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def _write_identity_fingerprint(self, fp: str) -> None:
        write_atomic(os.path.join(self.cfg.run_dir, "identity.json"), json.dumps({"fingerprint": fp}))

    def poll_identity(self) -> bool:
        stats = tuple(file_sig(p) for p in self._identity_paths())
        if self.identity_sig is not None and stats == self.identity_sig[0]:
            return False
        if self.load_identity():
            self.sync()
            return True
        return False

    # --- inventory -> kernel + proxy state --------------------------------------

    def poll_inventory(self) -> bool:
        """Apply a newer inventory from the source.  A bad one is logged (for
        the file: with file:line:field) and the last good state stays in force."""
        src = self.source
        assert src is not None
        try:
            inv = src.poll()
        except (SourceError, OSError) as e:
            self.inventory_error = str(e)
            log.error("inventory not applied, keeping the previous one:\n%s", e)
            return False
        if inv is None:
            return False
        if inv.node(self.cfg.node) is None:
            self.inventory_error = (
                f"{src.where}: node {self.cfg.node!r} is not in nodes[]; keeping the previous inventory"
            )
            log.error("%s", self.inventory_error)
            return False
        self.inventory_error = None
        self.inventory = inv
        log.info(
            "inventory reloaded: %d pods, %d on this node", len(inv.pods), len(inv.pods_on(self.cfg.node))
        )
        self.sync()
        return True

    def sync(self) -> None:
        """Make the kernel maps, tc links and proxy state match the inventory."""
        from .datapath import abi
        from .datapath.loader import WorkloadEntry
        from .datapath.netlink import route_oif

        inv = self.inventory
        assert inv is not None
        by_cgroup: dict[int, WorkloadEntry] = {}
        by_ip: dict[str, WorkloadEntry] = {}
        enrolled: dict[str, int] = {}
        pending: dict[str, str] = {}
        tc: dict[int, str] = {}
        guard_roots: dict[str, int] = {}  # directories pods are created in -> cgroup id
        allow: set[int] = set()  # cgroups of pods listed with mesh: false
        self.guard_pending = set()
        # The other agents of the node (a hand-over) are mesh processes too.
        mesh_cgroups = self._mesh_cgroups() | self.member_cgroups
        for pod in inv.pods_on(self.cfg.node):
            pod_dir = cg.resolve(pod.cgroup)
            self._guard_root(os.path.dirname(pod_dir), guard_roots, mesh_cgroups)
            if not pod.mesh:
                try:
                    allow.add(cg.cgroup_id(pod_dir))
                except OSError:
                    self.guard_pending.add(pod.key)  # its connects stay refused until it exists
                continue
            try:
                cgid = cg.cgroup_id(pod_dir)
            except OSError as e:
                pending[pod.key] = f"cgroup {pod.cgroup}: {e.strerror}"
                continue
            mode = abi.MODES[inv.mode_for(pod, self.cfg.mesh.mode)]
            entry = WorkloadEntry(workload_id(pod.key), mode)
            by_cgroup[cgid] = entry
            enrolled[pod.key] = cgid
            for ip in pod.ips:
                by_ip[str(ip)] = entry
                oif = route_oif(str(ip))
                if oif is not None:
                    tc[oif[0]] = oif[1]
        from .identity.spiffe import workload_id as spiffe_id

        td = self.cfg.identity.trust_domain
        if self.issuer is not None:  # None only while a node CA is requested by CSR (nothing is signed)
            self.issuer.allowed = frozenset(
                str(spiffe_id(td, p.namespace, p.service_account))
                for p in inv.pods_on(self.cfg.node)
                if p.mesh
            )
        # Order matters: the proxy must know a workload before the kernel
        # redirects it (else its first connections are rejected as unknown),
        # so publish the state, wait for the workers to load it, then enroll.
        self.generation += 1
        state = proxy_state(self.cfg, inv, enrolled, self.generation, self.identity_generation)
        write_atomic(self.state_path, json.dumps(state, indent=1))
        changes: dict = {}
        with self.shared_writes() as mine:
            if mine:  # else the owner of the node writes the kernel side (a hand-over)
                new = enrolled.keys() - self.enrolled.keys()
                late = self.proxies.wait_loaded(self.generation) if new else []
                if late:  # never redirect a pod the workers do not know: the next tick tries again
                    why = (
                        f"proxy workers {late} have not loaded a state that lists it "
                        "(enrolled once they have; retrying every tick)"
                    )
                    for key in new:  # its addresses stay in by_ip: strict mode still drops plaintext to it
                        del by_cgroup[enrolled.pop(key)]
                        pending[key] = why
                changes = self._sync_kernel(enrolled, by_cgroup, by_ip, tc, guard_roots, allow, mesh_cgroups)
        for err in self.tc_errors:
            log.error("%s — strict mode cannot be enforced for that pod", err)
        for key in enrolled.keys() - self.enrolled.keys():
            log.info("enrolled %s (cgroup id %d)", key, enrolled[key])
        for key in self.enrolled.keys() - enrolled.keys():
            log.info("unenrolled %s", key)
        for key, why in pending.items():
            if self.pending.get(key) != why:
                log.warning("pod %s not enrolled yet: %s", key, why)
        self.enrolled, self.pending = enrolled, pending
        log.debug("sync: %s, %d enrolled, state generation %d", changes, len(enrolled), self.generation)

    def _sync_kernel(self, enrolled, by_cgroup, by_ip, tc, guard_roots, allow, mesh_cgroups) -> dict:
        """sync()'s kernel side: only the node's owner, under the lease's lock."""
        for m in mesh_cgroups:  # the agents and their proxy workers, when below a guarded directory
            if any(cg.is_within(m, r) for r in guard_roots):
                try:
                    allow.add(cg.cgroup_id(m))
                except OSError:
                    pass
        changes = self.datapath.sync_workloads(by_cgroup, by_ip)
        # After enrolling: a known pod is never refused as unknown.
        changes.update(self.datapath.sync_guard(set(guard_roots.values()), allow))
        self.synced_mesh = frozenset(mesh_cgroups)
        self.guarded = sorted(guard_roots)
        self.tc_errors = self.datapath.sync_tc(tc)
        return changes

    def _mesh_cgroups(self) -> set[str]:
        """cgroup dirs of the agent and of its live proxy workers (those a
        previous agent started too): never refused by the unknown-pod guard."""
        found = [cg.own_cgroup()] + [cg.own_cgroup(pid) for pid in self.proxies.running_pids()]
        return {c for c in found if c}

    def _guard_root(self, path: str, roots: dict[str, int], mesh_cgroups: set[str]) -> None:
        """Add ``path`` (a directory pods are created in) to ``roots`` unless
        guarding it would refuse the mesh's own processes: it must lie within
        the node cgroup, and neither the agent nor a proxy worker may run in
        it or above it (below it they get an ALLOW entry of their own)."""
        if path in roots or path in self.unguardable:
            return
        above = [m for m in sorted(mesh_cgroups) if cg.is_within(path, m)]
        if not cg.is_within(path, self.cgroup_dir):
            why = f"it is not within the node cgroup {self.cgroup_dir}"
        elif above:
            why = f"the agent or its proxy runs in {above[0]}, at or above it"
        else:
            try:
                roots[path] = cg.cgroup_id(path)
            except OSError:
                pass  # not created yet; the next sync sees it
            return
        self.unguardable.add(path)
        log.warning(
            "pods' cgroup directory %s is not guarded (%s): a pod started there while the agent "
            "is down is not refused. Run the agent in a cgroup of its own, apart from the pods",
            path,
            why,
        )

    def shutdown(self) -> None:
        """A stop never opens the mesh: the pinned datapath and the proxy
        workers stay, so enrolled pods keep going through the proxy (and
        unknown pods stay refused) until a restarted agent adopts them.
        Detaching is :func:`uninstall` (``meshlet uninstall``).

        An agent that does not own the node (superseded by a newer one, or a
        successor that never took over) drains its proxy workers instead:
        they stop accepting, the kernel moves their queued connections to
        the owner's workers, and live connections get the drain timeout.  It
        writes no shared state on the way out."""
        if self.role != "owner":
            self.role = "draining"  # from now on it never claims the node
            self.proxies.drain(on_wait=self._beat_quietly)
        try:
            self.beat(leaving=True)  # a restarted agent finds the node free at once
        except OSError as e:
            log.warning("could not leave the hand-over lease %s: %s", self.lease.path, e)
        if self.enroller is not None:
            self.enroller.stop()
        if self.policy_watch is not None:
            self.policy_watch.close()
        if self.source is not None:
            self.source.close()
        self.datapath.close()
        if self.role == "owner":
            log.info(
                "stopped; the datapath and the proxy workers stay in place (a restarted agent "
                "adopts them; `meshlet uninstall` removes them)"
            )
        else:
            log.info("stopped (%s); the datapath is the owner's, left as it is", self.role)

    def _beat_quietly(self) -> None:
        """While draining: keep this agent's lease entry fresh, so the owner
        keeps allowing its cgroups while its workers finish connections."""
        try:
            self.beat()
        except Exception:  # draining goes on; the entry goes stale at worst
            log.exception("hand-over lease beat failed while draining")

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict:
        inv = self.inventory
        return {
            "node": self.cfg.node,
            "uptime_s": round(time.time() - self.started, 1),
            "datapath": {
                "how": self.datapath.how,
                "pin_dir": self.spec.pin_dir,
                "cgroup": self.cgroup_dir,
                "counters": self.datapath.stats() if self.datapath.maps else {},
                "tc_errors": self.tc_errors,
                "guarded_cgroups": self.guarded,
                "tc_attach": self.datapath.tc_mode,
            },
            "inventory": {
                "path": self.source.where if self.source is not None else None,
                "error": self.inventory_error,
                "pods": len(inv.pods) if inv else 0,
                # kind, last good load and, for the Kubernetes API, how stale
                "source": self.source.describe().to_dict() if self.source is not None else None,
            },
            "mode": self.cfg.mesh.mode,
            "generation": self.generation,
            "identity": self.identity_status(),
            "policy": self.policy_status(),
            "enrolled": [{"pod": k, "cgroup_id": v} for k, v in sorted(self.enrolled.items())],
            "pending": [{"pod": k, "reason": v} for k, v in sorted(self.pending.items())],
            "proxy": self.proxies.status(),
            "handover": {
                **self.lease.describe(self.role),
                "admitted": self.admitted,
                "takeover_error": self.takeover_error,
            },
        }

    # --- observability (#6): blocking reads, for threads only ------------------------

    def worker_stats(self) -> list[dict | None]:
        """Every proxy worker's stats socket (None: did not answer)."""
        return self.proxies.worker_stats()

    def metrics_snapshot(self) -> dict:
        """What one /metrics scrape reports (see agent.observe.prometheus.families)."""
        from .datapath.status import datapath_status

        return {
            "workers": self.worker_stats(),
            "workers_configured": len(self.proxies.workers),
            "datapath": datapath_status(self.spec.pin_dir),
            "identity": self.identity_status(),
        }

    def liveness(self):
        """/healthz: is the agent's loop still ticking?"""
        from .observe.prometheus import liveness

        return liveness(None if self.last_tick is None else time.monotonic() - self.last_tick)

    def readiness(self):
        """/readyz: can this node carry mesh traffic?  Only the node's owner
        is ready: a successor becomes ready when it takes the lease (its
        workers accept), a superseded agent stops being ready."""
        from .observe.prometheus import readiness

        if self.role == "successor":
            if self.takeover_error:
                return False, f"hand-over: {self.takeover_error}; restart this agent once fixed"
            if not self.admitted:
                return False, "hand-over: waiting for the node's owner to allow this agent's cgroups"
            doc = self.lease.read()
            theirs = doc.members[doc.owner].policy if doc.owner in doc.members else ""
            mine = self.policies.version if self.policies is not None else ""
            if theirs != mine:
                return False, (
                    f"hand-over: the owner enforces policy version {theirs}, this agent {mine}: it takes "
                    "over only with the same policies (apply them here too, or use Kubernetes mode)"
                )
            return False, "hand-over: waiting for this agent's proxy workers to be ready"
        if self.role == "superseded":
            return False, f"hand-over: superseded by agent {self.lease.read().owner}; draining on SIGTERM"
        return readiness(
            {
                "tick_age": None if self.last_tick is None else time.monotonic() - self.last_tick,
                "workers": [
                    {"alive": alive, "listening": listening}
                    for alive, listening in zip(self.proxies.alive(), self.proxies.listening(), strict=True)
                ],
                "identity_configured": self.cfg.identity is not None,
                "identity_loaded": self.issuer is not None,
            }
        )

    def start_metrics(self):
        """The /metrics server thread, or None (disabled, or the port is taken:
        logged once; the mesh keeps running without it, and the loop tries
        again: in a hand-over the old agent frees the port)."""
        m = self.cfg.metrics
        if not m.enabled:
            return None
        from .observe.prometheus import MetricsServer

        try:
            srv = MetricsServer(
                self.metrics_snapshot, str(m.address), m.port, live=self.liveness, ready=self.readiness
            ).start()
        except OSError as e:
            if self.metrics_failed:
                return None
            self.metrics_failed = True
            log.error(
                "cannot serve metrics on %s port %d: %s; is another agent or an Istio "
                "component using it? Set metrics.port (or metrics.enabled: false)",
                m.address,
                m.port,
                e.strerror or e,
            )
            return None
        self.metrics_failed = False
        log.info("metrics on http://%s:%d/metrics", m.address, srv.port)
        return srv

    def write_health(self) -> None:
        """runDir/health.json for the exec probes (``python3 -m agent.probe``):
        with two agents on a node's host network, a probe of the shared
        metrics port could be answered by the other one.  Rewritten when the
        verdict changes, and every few seconds to show the loop ticks."""
        ok, why = self.readiness()
        now = time.time()
        key = (ok, why, self.role)
        if self.health_written and self.health_written[:3] == key and now - self.health_written[3] < 5:
            return
        doc = {"tick": now, "ready": ok, "why": why, "role": self.role, "pid": os.getpid()}
        write_atomic(os.path.join(self.cfg.run_dir, "health.json"), json.dumps(doc), mode=0o640)
        self.health_written = (*key, now)

    # --- the asyncio shell ----------------------------------------------------------

    def tick(self) -> None:
        """One round of the control loop.  It never waits for a policy apply
        (the admin API's thread): proxy workers are supervised before the
        kernel policy, which is skipped while an apply is syncing it."""
        try:
            self.beat()  # the hand-over lease: who writes the node's shared state
        except Exception:  # the rest of the tick still runs (workers are supervised)
            log.exception("hand-over lease %s: beat failed (will retry)", self.lease.path)
        try:
            self.poll_inventory()
            if self.enroller is not None:
                with self.shared_writes() as mine:
                    if mine:  # the node's CA files are shared with a successor
                        self.enroller.install()  # a newly signed intermediate, before the files are polled
            self.poll_identity()
            if self.pending or self.guard_pending:
                self.sync()  # a pod cgroup may have appeared
            if self.role != "successor" or self.admitted:
                self.proxies.supervise()
            self.sync_policy_kernel(wait=False)
        except Exception:  # one bad tick must not kill the node agent
            log.exception("agent loop error (will retry)")
        try:
            self.write_health()
        except Exception:  # the probe sees a stale file and says so
            log.exception("cannot write %s/health.json", self.cfg.run_dir)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: hand the proxy workers over to new processes (an upgrade), refusing nothing.
        loop.add_signal_handler(signal.SIGHUP, self.proxies.restart)
        ca_server = await start_ca_server(self)
        from .datapath.flowtable import FlowReader
        from .proxy.memory import release_startup

        self.flow_reader = FlowReader(self.spec.pin_dir, self.cfg.bpf.flow_history).start()
        admin = await start_admin(self)
        self.last_tick = time.monotonic()  # the loop starts now: alive until it stops ticking
        if self.role == "owner":  # a successor binds the metrics port once it owns the node
            self.metrics = await asyncio.to_thread(self.start_metrics)
        log.info("agent ready: node %s, admin API on %s", self.cfg.node, self.cfg.admin.socket)
        started = False
        try:
            while not stop.is_set():
                # Blocking work (bpf syscalls, netlink via pyroute2, which runs
                # its own event loop) stays off this loop, in a worker thread.
                await asyncio.to_thread(self.tick)
                self.last_tick = time.monotonic()
                if not started:  # the first tick ends start-up: hand its garbage back
                    started = True
                    release_startup()
                # The metrics port is the owner's (the old agent frees it in a hand-over).
                if self.role == "owner" and self.metrics is None:
                    self.metrics = await asyncio.to_thread(self.start_metrics)
                elif self.role != "owner" and self.metrics is not None:
                    await asyncio.to_thread(self.metrics.stop)
                    self.metrics = None
                try:
                    await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
                except TimeoutError:
                    pass
        finally:
            if self.metrics is not None:
                await asyncio.to_thread(self.metrics.stop)
                self.metrics = None
            self.flow_reader.stop()
            admin.close()
            ca_server.close()
            await admin.wait_closed()
            await ca_server.wait_closed()
            try:
                os.unlink(ca_socket_path(self.cfg))
            except FileNotFoundError:
                pass
            try:
                os.unlink(self.cfg.admin.socket)
            except FileNotFoundError:
                pass


# --- the CA socket: proxy workers send CSRs, one JSON line each way ----------------

CA_REQUEST_LIMIT = 64 * 1024


async def start_ca_server(agent: Agent) -> asyncio.AbstractServer:
    from .identity.issuer import IssueError

    path = ca_socket_path(agent.cfg)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    def answer(req: dict) -> dict:
        issuer = agent.issuer
        if issuer is None:  # the CA socket is served only once the identity is loaded
            return {"ok": False, "reason": "not_ready", "error": "the node CA is not loaded yet"}
        bundle = issuer.material.bundle.to_pem().decode()
        if req.get("op") == "bundle":
            return {"ok": True, "bundle": bundle, "generation": agent.identity_generation}
        if req.get("op") != "sign":
            return {"ok": False, "reason": "bad_request", "error": "op must be 'sign' or 'bundle'"}
        try:
            chain, _leaf = issuer.sign(str(req.get("identity", "")), str(req.get("csr", "")).encode())
        except IssueError as e:
            return {"ok": False, "reason": e.reason, "error": e.detail}
        return {
            "ok": True,
            "chain": chain.decode(),
            "bundle": bundle,
            "generation": agent.identity_generation,
        }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                req = json.loads(line[:CA_REQUEST_LIMIT])
                if not isinstance(req, dict):
                    raise ValueError("not an object")
                resp = answer(req)
            except ValueError as e:
                resp = {"ok": False, "reason": "bad_request", "error": f"not a JSON request: {e}"}
            writer.write(json.dumps(resp).encode() + b"\n")
            await writer.drain()
        except Exception:
            log.exception("CA request failed")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path, limit=CA_REQUEST_LIMIT)
    os.chmod(path, 0o600)
    return server


# --- small process helpers -----------------------------------------------------------


def _identity_sig(paths: list[str]) -> tuple:
    """(stat signature, content fingerprint) of the identity files."""
    import hashlib

    h = hashlib.sha256()
    stats = []
    for p in paths:
        stats.append(file_sig(p))
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"\0missing")
    return (tuple(stats), h.hexdigest())


def run_agent(cfg: AgentConfig, preflight: bool = True) -> int:
    from .proxy.memory import agent_arena_limit, limit_arenas

    arenas = agent_arena_limit(os.environ)
    if arenas is not None:
        limit_arenas(arenas)  # before any thread starts: see agent.proxy.memory, point 5
    try:
        source = source_from_config(cfg)
    except ValueError as e:  # KubeConfigError: no kubeconfig / not in a pod
        raise AgentError(f"cannot configure the workload source: {e}") from e
    agent = Agent(cfg, source=source)
    if preflight:
        agent.preflight()
    try:
        agent.start()
    except BaseException:
        # Never leave a half-attached datapath behind; a datapath that was
        # in place before us (adopted, or upgraded in place) was working and stays.
        if agent.datapath.how == "loaded":
            agent.proxies.stop()
            agent.datapath.teardown()
        with contextlib.suppress(Exception):
            agent.beat(leaving=True)  # a lease this agent took is free again
        raise
    try:
        # Plain asyncio, not uvloop: this loop only paces the tick (run in a
        # thread) and serves the node CA socket, so uvloop buys nothing here
        # and would cost its .so and libuv in the agent's memory (the proxy
        # workers, which carry the traffic, run on uvloop).
        asyncio.run(agent.serve())
    finally:
        agent.shutdown()
    return 0


# --- uninstall: the only way the datapath comes off a node -------------------------


def uninstall(cfg: AgentConfig, force: bool = False) -> dict:
    """Stop the proxy workers a stopped agent left running, detach and unpin
    the datapath, remove the proxy state.  Refuses (AgentError) while the
    agent runs, and while pods are enrolled unless ``force``: their
    connections would go direct, in plaintext and without policy.  Returns
    what it removed."""
    from .adminclient import admin_get
    from .datapath.loader import enrolled_count, remove_pins

    try:
        admin_get(cfg.admin.socket, "/v1/status", timeout=2)
    except (OSError, ValueError):
        pass  # no agent answers: go on
    else:
        raise AgentError(
            f"the agent of node {cfg.node} is running (admin socket {cfg.admin.socket}); "
            "stop it first (a stop keeps the datapath), then uninstall"
        )
    enrolled = enrolled_count(cfg.bpf.pin_dir)
    if enrolled and not force:
        raise AgentError(
            f"{enrolled} pod(s) are enrolled in the datapath pinned at {cfg.bpf.pin_dir}: "
            "uninstalling would send their connections direct, in plaintext and without "
            "policy. Take them out of the mesh first (mesh: false, or remove them from the "
            "inventory, and let the agent sync), or pass --force"
        )
    state_path = os.path.join(cfg.run_dir, "proxy-state.json")
    proxies = ProxySupervisor(cfg.run_dir, state_path, max(cfg.proxy.workers, _pidfile_count(cfg.run_dir)))
    workers = proxies.adopt_running()
    proxies.stop()
    present = os.path.isdir(cfg.bpf.pin_dir)
    remove_pins(cfg.bpf.pin_dir)
    try:
        os.unlink(state_path)
    except FileNotFoundError:
        pass
    log.info("uninstalled: %d proxy worker(s) stopped, datapath %s removed", workers, cfg.bpf.pin_dir)
    return {
        "node": cfg.node,
        "pin_dir": cfg.bpf.pin_dir,
        "datapath_removed": present,
        "proxy_workers_stopped": workers,
        "enrolled_pods_dropped": enrolled,
    }


def _pidfile_count(run_dir: str) -> int:
    """1 + the highest worker index with a pid file in ``run_dir`` (0: none)."""
    import re

    n = 0
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        m = re.fullmatch(r"proxy-(\d+)\.pid", name)
        if m:
            n = max(n, int(m.group(1)) + 1)
    return n
