"""The node agent: composition root and lifecycle (``meshlet run``).

It owns four things and keeps them in step with the node inventory:

* the eBPF datapath (loaded or adopted from bpffs pins),
* the kernel maps of enrolled workloads (a pod joining is a map write),
* the proxy state file the proxy workers read,
* the proxy worker processes (started in their own session, so the agent can
  die and restart without touching traffic; a restarted agent adopts them).

An admin API on a Unix socket answers ``meshlet status`` and friends.  The
asyncio part is a thin shell: every step is a plain method.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

from . import cgroup as cg
from .adminclient import unix_request
from .filesig import file_sig
from .config import AgentConfig
from .workloads.inventory import Inventory, load_inventory
from .workloads.services import services_doc
from .yamlsrc import SourceError

log = logging.getLogger("meshlet.agent")

STATE_VERSION = 1
POLL_INTERVAL = 0.5


class AgentError(RuntimeError):
    """Start-up failed; the message says what to fix."""


def workload_id(key: str) -> int:
    """A stable small id for a workload (its key's CRC32, 31 bits)."""
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def ca_socket_path(cfg: AgentConfig) -> str:
    return os.path.join(cfg.run_dir, "ca.sock")


def proxy_state(cfg: AgentConfig, inv: Inventory, cgroup_ids: dict[str, int],
                generation: int, identity_generation: int = 0) -> dict:
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
        "l7": cfg.proxy.l7,
        "access_log": {"enabled": cfg.access_log.enabled, "sampling": cfg.access_log.sampling,
                       "path": cfg.access_log_path},
        "nodes": {n.name: {"address": str(n.address),
                           "address6": str(n.address6) if n.address6 else None}
                  for n in inv.nodes},
        "pods": [{
            "key": p.key,
            "name": p.name,
            "namespace": p.namespace,
            "service_account": p.service_account,
            "node": p.node,
            "ips": [str(ip) for ip in p.ips],
            "cgroup_id": cgroup_ids.get(p.key),
            "mesh": p.mesh,
            "labels": dict(p.labels),
        } for p in inv.pods],
        # Every service with its VIPs, ports and per-port endpoints computed
        # from the pods' labels (agent/workloads/services.py); the proxy
        # indexes them by (VIP, port) and routes connections to a VIP.
        "services": services_doc(inv.service_index),
    }


def write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ProxyWorker:
    index: int
    pid: int | None = None
    popen: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    adopted: bool = False


@dataclass
class Agent:
    cfg: AgentConfig
    keep_datapath: bool = False
    inventory: Inventory | None = None
    inventory_error: str | None = None
    inventory_sig: tuple | None = None
    generation: int = 0
    enrolled: dict[str, int] = field(default_factory=dict)      # pod key -> cgroup id
    pending: dict[str, str] = field(default_factory=dict)       # pod key -> why not enrolled
    tc_errors: list[str] = field(default_factory=list)
    workers: list[ProxyWorker] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    issuer: object = None                                       # identity.issuer.NodeIssuer
    identity_generation: int = 0
    identity_sig: tuple | None = None
    identity_error: str | None = None
    flow_history: int = 10_000          # closed flows kept for `meshlet flows`
    flow_reader: object = None          # datapath.flows.FlowReader, while serving
    policies: object = None             # policy.store.PolicyStore, from start()
    policy_lock: threading.Lock = field(default_factory=threading.Lock)
    l4_kernel: dict = field(default_factory=dict)     # last kernel policy sync (plan summary)
    l4_sig: tuple | None = None                       # (policy version, generation) it was for
    l4_names: dict = field(default_factory=dict)      # kernel policy id -> namespace/name
    l4_lock: threading.Lock = field(default_factory=threading.Lock)  # tick vs admin API

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
        self.datapath = Datapath(self.spec)
        self.workers = [ProxyWorker(i) for i in range(self.cfg.proxy.workers)]

    # --- start ----------------------------------------------------------------

    def preflight(self) -> None:
        """Fail fast, before touching the kernel, when something is missing."""
        from .doctor import DoctorError, ensure_ready

        try:
            ensure_ready(self.cfg)
        except DoctorError as e:
            raise AgentError(f"{e}\nnothing was attached.") from e
        if not os.path.isdir(self.cgroup_dir):
            raise AgentError(f"node cgroup {self.cgroup_dir} does not exist; create it or fix "
                             "'cgroup:' in the config")

    def start(self) -> None:
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        if self.cfg.proxy.tunnel_security != "mtls":
            log.warning("proxy.tunnelSecurity is %s: traffic between nodes is NOT encrypted or "
                        "authenticated. This setting exists for benchmarks only.",
                        self.cfg.proxy.tunnel_security)
        try:
            self.inventory = load_inventory(self.cfg.inventory)
        except SourceError as e:
            raise AgentError(f"inventory is invalid, not starting:\n{e}") from e
        except OSError as e:
            raise AgentError(f"cannot read inventory {self.cfg.inventory}: {e.strerror}") from e
        if self.inventory.node(self.cfg.node) is None:
            raise AgentError(f"{self.cfg.inventory}: node {self.cfg.node!r} (from the config's "
                             "'node:') is not in the inventory's nodes[]")
        self.inventory_sig = file_sig(self.cfg.inventory)
        self.load_policies()
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
        self.load_identity(initial=True)
        how = self.datapath.open()
        log.info("datapath %s (pins in %s, hooks on %s)", how, self.spec.pin_dir, self.cgroup_dir)
        self.sync()
        self.sync_policy_kernel()
        self.supervise_proxies()

    # --- authorization policies (#4): applied through the admin API -----------------

    def load_policies(self) -> None:
        """The policies applied before a restart (runDir/policies.yaml): the
        AuthorizationPolicies and TrafficPolicies; also rewrites
        runDir/policies.json and runDir/traffic.json for the proxy workers."""
        from .policy.store import PolicyStore
        from .traffic.policy import TRAFFIC_KIND

        store = PolicyStore(self.cfg.run_dir, trust_domain=self.cfg.identity.trust_domain,
                            kinds=[TRAFFIC_KIND])
        try:
            self.policies = store.load()
        except SourceError as e:
            raise AgentError(f"stored policies {store.store_path} do not load, not starting "
                             f"(fix or remove the file):\n{e}") from e
        log.info("policies: %d, version %s", store.count, store.version)

    def policy_status(self) -> dict:
        if self.policies is None:
            return {"version": None, "count": 0}
        out = self.policies.summary()
        if self.l4_kernel:
            from .policy.kernel import NO_POLICY_ID

            denied = {}
            try:
                for pid, n in self.datapath.l4_denied().items():
                    name = "(no ALLOW rule matched)" if pid == NO_POLICY_ID else \
                        self.l4_names.get(pid, f"id {pid}")
                    denied[name] = denied.get(name, 0) + n
            except (OSError, KeyError):
                pass
            out["kernel"] = {**self.l4_kernel, "denied_by_policy": denied}
        return out

    def sync_policy_kernel(self) -> None:
        """Recompute the connect-time L4 entries (agent.policy.kernel) when the
        policies or the inventory changed, and diff-sync ml_l4_policy.  Called
        from every tick and right after an apply/delete through the admin API, so
        `meshlet policy apply` returns once this node's kernel enforces it."""
        with self.l4_lock:
            self._sync_policy_kernel()

    def _sync_policy_kernel(self) -> None:
        from .policy.kernel import KernelPlan, compile_kernel, view_from_pods

        store, inv = self.policies, self.inventory
        if store is None or inv is None or not self.datapath.maps:
            return
        with self.policy_lock:  # the admin API applies in another thread
            ps, version = store.policyset, store.policyset.version  # TrafficPolicies do not matter here
        sig = (version, self.generation)
        if sig == self.l4_sig:
            return
        # bpf.kernelPolicy: false (or MESHLET_KERNEL_POLICY=0, for tests) leaves
        # every decision to the proxies.
        enabled = self.cfg.bpf.kernel_policy and os.environ.get("MESHLET_KERNEL_POLICY", "1") != "0"
        if enabled:
            srcs, dsts = view_from_pods(inv.pods, self.cfg.node, self.cfg.identity.trust_domain,
                                        {k: workload_id(k) for k in self.enrolled})
            plan = compile_kernel(ps, srcs, dsts, self.spec.max_l4_rules)
        else:
            plan = KernelPlan(capacity=self.spec.max_l4_rules)
        if plan.overflow and not self.l4_kernel.get("overflow"):
            log.warning("kernel L4 policy: %s", plan.summary()["reason"])
        changes = self.datapath.sync_l4(plan.entries)
        self.l4_sig = sig
        self.l4_names.update(plan.policies)
        self.l4_kernel = {**plan.summary(), "version": version, "enabled": enabled}
        if changes["added"] or changes["updated"] or changes["removed"]:
            log.info("kernel L4 policy for version %s: %d entries (%d deny), +%d ~%d -%d",
                     version, len(plan.entries), plan.denies, changes["added"],
                     changes["updated"], changes["removed"])

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
            self.issuer = NodeIssuer(i.trust_domain, material, timedelta(seconds=i.cert_ttl),
                                     self.cfg.node)
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
            log.info("CA material or trust bundle changed (%d roots); proxies will renew "
                     "(identity generation %d)", len(material.bundle.roots),
                     self.identity_generation)
        return changed

    def identity_status(self) -> dict:
        out: dict = {"trust_domain": self.cfg.identity.trust_domain,
                     "generation": self.identity_generation, "error": self.identity_error}
        if self.issuer is not None:
            m = self.issuer.material
            out.update({
                "bundle_fingerprint": m.bundle.fingerprint(),
                "roots": [{"subject": r.subject.rfc4514_string(), "serial": f"{r.serial_number:x}",
                           "not_after": r.not_valid_after_utc.isoformat()}
                          for r in m.bundle.roots],
                "node_ca": {"subject": m.ca_cert.subject.rfc4514_string(),
                            "serial": f"{m.ca_cert.serial_number:x}",
                            "not_after": m.ca_cert.not_valid_after_utc.isoformat()},
                "allowed": sorted(self.issuer.allowed),
                "issuer_counters": dict(self.issuer.counters),
            })
        return out

    def _read_identity_fingerprint(self) -> str | None:
        try:
            with open(os.path.join(self.cfg.run_dir, "identity.json")) as f:
                return json.load(f).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def _write_identity_fingerprint(self, fp: str) -> None:
        write_atomic(os.path.join(self.cfg.run_dir, "identity.json"),
                     json.dumps({"fingerprint": fp}))

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
        """Reload the inventory when the file changed.  A bad file is logged
        with file:line:field and the last good state stays in force."""
        sig = file_sig(self.cfg.inventory)
        if sig == self.inventory_sig:
            return False
        self.inventory_sig = sig
        try:
            inv = load_inventory(self.cfg.inventory)
        except (SourceError, OSError) as e:
            self.inventory_error = str(e)
            log.error("inventory not applied, keeping the previous one:\n%s", e)
            return False
        if inv.node(self.cfg.node) is None:
            self.inventory_error = (f"{self.cfg.inventory}: node {self.cfg.node!r} is not in "
                                    "nodes[]; keeping the previous inventory")
            log.error("%s", self.inventory_error)
            return False
        self.inventory_error = None
        self.inventory = inv
        log.info("inventory reloaded: %d pods, %d on this node", len(inv.pods),
                 len(inv.pods_on(self.cfg.node)))
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
        for pod in inv.pods_on(self.cfg.node):
            if not pod.mesh:
                continue
            try:
                cgid = cg.cgroup_id(cg.resolve(pod.cgroup))
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
        self.issuer.allowed = frozenset(
            str(spiffe_id(td, p.namespace, p.service_account))
            for p in inv.pods_on(self.cfg.node) if p.mesh)
        # Order matters: the proxy must know a workload before the kernel
        # redirects it (else its first connections are rejected as unknown),
        # so publish the state, wait for the workers to load it, then enroll.
        self.generation += 1
        state = proxy_state(self.cfg, inv, enrolled, self.generation, self.identity_generation)
        write_atomic(self.state_path, json.dumps(state, indent=1))
        if enrolled.keys() - self.enrolled.keys():
            self.wait_proxies_loaded(self.generation)
        changes = self.datapath.sync_workloads(by_cgroup, by_ip)
        self.tc_errors = self.datapath.sync_tc(tc)
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
        log.debug("sync: %s, %d enrolled, state generation %d", changes, len(enrolled),
                  self.generation)

    def wait_proxies_loaded(self, generation: int, timeout: float = 3.0) -> bool:
        """Until every running worker reports ``generation`` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = []
            for w in self.workers:
                if not w.pid or not _pid_alive(w.pid, w.popen):
                    continue  # not started yet: it will read the file at start-up
                st = _proxy_stats(os.path.join(self.cfg.run_dir, f"proxy-{w.index}.sock"))
                if not st or st.get("state_generation", -1) < generation:
                    pending.append(w.index)
            if not pending:
                return True
            time.sleep(0.05)
        log.warning("proxy workers %s did not load state generation %d within %.0fs; "
                    "enrolling anyway", pending, generation, timeout)
        return False

    # --- proxy workers --------------------------------------------------------------

    def _pidfile(self, w: ProxyWorker) -> str:
        return os.path.join(self.cfg.run_dir, f"proxy-{w.index}.pid")

    def _proxy_argv(self, w: ProxyWorker) -> list[str]:
        # The access log's path, sampling and on/off come from the state file.
        return [sys.executable, "-m", "agent.proxy", "--state", self.state_path,
                "--worker-id", str(w.index)]

    def supervise_proxies(self) -> None:
        """Adopt running workers, reap and restart dead ones."""
        for w in self.workers:
            if w.popen is not None:
                if w.popen.poll() is None:
                    continue
                log.error("proxy worker %d (pid %d) exited with %s; restarting", w.index,
                          w.popen.pid, w.popen.returncode)
                w.popen = None
                w.pid = None
                w.restarts += 1
            elif w.pid is not None and _alive_proxy(w.pid, self.state_path):
                continue
            elif w.pid is None:
                pid = _read_pid(self._pidfile(w))
                if pid and _alive_proxy(pid, self.state_path):
                    w.pid, w.adopted = pid, True
                    log.info("adopted running proxy worker %d (pid %d)", w.index, pid)
                    continue
            if w.restarts and time.time() - w.started < min(30, 2 ** w.restarts):
                continue  # back off
            logf = open(os.path.join(self.cfg.run_dir, f"proxy-{w.index}.log"), "ab")
            try:
                w.popen = subprocess.Popen(self._proxy_argv(w), stdout=logf, stderr=logf,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           cwd="/", env=_proxy_env())
            finally:
                logf.close()
            w.pid, w.started, w.adopted = w.popen.pid, time.time(), False
            write_atomic(self._pidfile(w), str(w.pid))
            log.info("started proxy worker %d (pid %d)", w.index, w.pid)

    def stop_proxies(self, timeout: float = 6.0) -> None:
        pids = [w.pid for w in self.workers if w.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        for w in self.workers:
            if not w.pid:
                continue
            while time.time() < deadline and _pid_alive(w.pid, w.popen):
                time.sleep(0.05)
            if _pid_alive(w.pid, w.popen):
                os.kill(w.pid, signal.SIGKILL)
            if w.popen is not None:
                w.popen.wait(timeout=2)
            try:
                os.unlink(self._pidfile(w))
            except FileNotFoundError:
                pass
            w.pid = w.popen = None

    def shutdown(self) -> None:
        if self.keep_datapath:
            self.datapath.close()
            log.info("exiting with the datapath and proxy left running (--keep-datapath); "
                     "a restarted agent adopts them")
            return
        self.stop_proxies()
        self.datapath.teardown()
        for name in ("proxy-state.json",):
            try:
                os.unlink(os.path.join(self.cfg.run_dir, name))
            except FileNotFoundError:
                pass
        log.info("stopped; datapath detached and unpinned")

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict:
        inv = self.inventory
        return {
            "node": self.cfg.node,
            "uptime_s": round(time.time() - self.started, 1),
            "datapath": {"how": self.datapath.how, "pin_dir": self.spec.pin_dir,
                         "cgroup": self.cgroup_dir, "counters": self.datapath.stats(),
                         "tc_errors": self.tc_errors, "tc_attach": self.datapath.tc_mode},
            "inventory": {"path": self.cfg.inventory, "error": self.inventory_error,
                          "pods": len(inv.pods) if inv else 0},
            "mode": self.cfg.mesh.mode,
            "generation": self.generation,
            "identity": self.identity_status(),
            "policy": self.policy_status(),
            "enrolled": [{"pod": k, "cgroup_id": v} for k, v in sorted(self.enrolled.items())],
            "pending": [{"pod": k, "reason": v} for k, v in sorted(self.pending.items())],
            "proxy": [{"worker": w.index, "pid": w.pid, "adopted": w.adopted,
                       "alive": bool(w.pid and _pid_alive(w.pid, w.popen)),
                       "restarts": w.restarts,
                       "stats": _proxy_stats(os.path.join(self.cfg.run_dir,
                                                          f"proxy-{w.index}.sock"))}
                      for w in self.workers],
        }

    # --- observability (#6): blocking reads, for threads only ------------------------

    def worker_stats(self) -> list[dict | None]:
        """Every proxy worker's stats socket (None: did not answer)."""
        return [_proxy_stats(os.path.join(self.cfg.run_dir, f"proxy-{w.index}.sock"))
                for w in self.workers]

    def metrics_snapshot(self) -> dict:
        """What one /metrics scrape reports (see agent.metrics.families)."""
        from .datapath.status import datapath_status

        return {"workers": self.worker_stats(), "workers_configured": len(self.workers),
                "datapath": datapath_status(self.spec.pin_dir),
                "identity": self.identity_status()}

    def start_metrics(self):
        """The /metrics server thread, or None (disabled, or the port is taken:
        logged; the mesh keeps running without it)."""
        m = self.cfg.metrics
        if not m.enabled:
            return None
        from .metrics import MetricsServer

        try:
            srv = MetricsServer(self.metrics_snapshot, str(m.address), m.port).start()
        except OSError as e:
            log.error("cannot serve metrics on %s port %d: %s; is another agent or an Istio "
                      "component using it? Set metrics.port (or metrics.enabled: false)",
                      m.address, m.port, e.strerror or e)
            return None
        log.info("metrics on http://%s:%d/metrics", m.address, srv.port)
        return srv

    # --- the asyncio shell ----------------------------------------------------------

    def tick(self) -> None:
        try:
            self.poll_inventory()
            self.poll_identity()
            if self.pending:
                self.sync()  # a pod cgroup may have appeared
            self.sync_policy_kernel()
            self.supervise_proxies()
        except Exception:  # one bad tick must not kill the node agent
            log.exception("agent loop error (will retry)")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ca_server = await start_ca_server(self)
        from .datapath.flows import FlowReader
        self.flow_reader = FlowReader(self.spec.pin_dir, self.flow_history).start()
        admin = await start_admin(self)
        metrics = await asyncio.to_thread(self.start_metrics)
        log.info("agent ready: node %s, admin API on %s", self.cfg.node, self.cfg.admin.socket)
        try:
            while not stop.is_set():
                # Blocking work (bpf syscalls, netlink via pyroute2, which runs
                # its own event loop) stays off this loop, in a worker thread.
                await asyncio.to_thread(self.tick)
                try:
                    await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
                except asyncio.TimeoutError:
                    pass
        finally:
            if metrics is not None:
                await asyncio.to_thread(metrics.stop)
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
        bundle = issuer.material.bundle.to_pem().decode()
        if req.get("op") == "bundle":
            return {"ok": True, "bundle": bundle, "generation": agent.identity_generation}
        if req.get("op") != "sign":
            return {"ok": False, "reason": "bad_request", "error": "op must be 'sign' or 'bundle'"}
        try:
            chain, _leaf = issuer.sign(str(req.get("identity", "")),
                                       str(req.get("csr", "")).encode())
        except IssueError as e:
            return {"ok": False, "reason": e.reason, "error": e.detail}
        return {"ok": True, "chain": chain.decode(), "bundle": bundle,
                "generation": agent.identity_generation}

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


# --- admin API: HTTP/1.0 over a Unix socket, JSON bodies --------------------------
# GET everywhere; POST and DELETE for policies.  A request body needs a
# Content-Length (at most ADMIN_BODY_LIMIT bytes).

FLOW_ROUTES = {"/v1/flows", "/v1/flows/follow"}
POLICY_ROUTES = {"/v1/policies", "/v1/policies/<namespace>/<name>[?kind=K]",
                 "POST /v1/policies:apply", "POST /v1/policies:diff",
                 "DELETE /v1/policies/<namespace>/<name>[?kind=K]"}
ROUTES = {"/v1/status", "/v1/workloads", "/v1/bpf", "/v1/stats", "/v1/services"} | FLOW_ROUTES \
    | POLICY_ROUTES
ADMIN_BODY_LIMIT = 4 << 20
ADMIN_HEADER_LINES = 100


async def _read_admin_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes, tuple | None]:
    """(method, target, body, error): error is (status, message) for a request
    that cannot be served (its body is then not read)."""
    line = await asyncio.wait_for(reader.readline(), 5)
    parts = line.decode("latin-1").split()
    method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
    length, error = 0, None
    for _ in range(ADMIN_HEADER_LINES):
        h = await asyncio.wait_for(reader.readline(), 5)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
                if length < 0:
                    raise ValueError
            except ValueError:
                error = (400, f"bad Content-Length {value.strip()!r}")
    else:
        return method, target, b"", (431, "too many header lines")
    if error is None and length > ADMIN_BODY_LIMIT:
        error = (413, f"request body of {length} bytes; the limit is {ADMIN_BODY_LIMIT}")
    body = b""
    if error is None and length:
        try:
            body = await asyncio.wait_for(reader.readexactly(length), 30)
        except asyncio.IncompleteReadError:
            error = (400, "request body shorter than its Content-Length")
    return method, target, body, error


async def start_admin(agent: Agent) -> asyncio.AbstractServer:
    path = agent.cfg.admin.socket
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, payload, error = await _read_admin_request(reader)
            if error is not None:
                code, body = error[0], {"error": error[1]}
            elif target.split("?", 1)[0].startswith("/v1/policies") and method in (
                    "GET", "POST", "DELETE"):
                code, body = await asyncio.to_thread(_policies_then_kernel, agent, method, target,
                                                     payload)
            elif method != "GET":
                code, body = 405, {"error": f"{method or 'this request'} is not supported here"}
            elif target == "/v1/status":
                code, body = 200, agent.status()
            elif target == "/v1/workloads":
                code, body = 200, _workloads(agent)
            elif target == "/v1/services":
                code, body = 200, _services(agent)
            elif target == "/v1/bpf":
                from .datapath.status import datapath_status
                code, body = 200, datapath_status(agent.spec.pin_dir, agent.cgroup_dir)
            elif target.split("?", 1)[0] == "/v1/stats":
                code, body = await _stats_route(agent, target)
            elif target.split("?", 1)[0] in FLOW_ROUTES:
                answer = await _flows_route(agent, target, reader, writer)
                if answer is None:
                    return  # streamed
                code, body = answer
            else:
                code, body = 404, {"error": f"unknown path {target!r}", "paths": sorted(ROUTES)}
            data = json.dumps(body).encode()
            writer.write(f"HTTP/1.0 {code} X\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server


# --- policies (#4): the policy store over the admin API -------------------------------

def _traffic_warnings(agent: Agent, store) -> list[str]:
    """TrafficPolicies for services the inventory does not have (yet): warnings,
    never errors, since a service can arrive after its policy."""
    from .traffic.policy import KIND as TRAFFIC, lint_traffic, parse_traffic_policies

    inv = getattr(agent, "inventory", None)
    if inv is None or TRAFFIC not in getattr(store, "kinds", {}):
        return []
    services = [(sv.namespace, sv.name, tuple(pt.port for pt in sv.ports))
                for sv in getattr(inv, "services", ())]
    text = store.sets[TRAFFIC]["yaml"]
    if not text.strip():
        return []
    return [f"{origin}: {kind}: traffic policy {key}: {message}" for kind, key, origin, message
            in lint_traffic(parse_traffic_policies(text, "policies.yaml"), services)]


def _policies_then_kernel(agent: Agent, method: str, target: str,
                          payload: bytes) -> tuple[int, dict]:
    """The policy route, then (after a change) the kernel's L4 entries."""
    code, body = _policies_route(agent, method, target, payload)
    sync = getattr(agent, "sync_policy_kernel", None)  # absent on test stand-ins
    if sync is not None and code == 200 and method in ("POST", "DELETE") \
            and not target.split("?", 1)[0].endswith(":diff"):
        try:
            sync()
        except Exception:  # the tick retries; the proxies enforce meanwhile
            log.exception("kernel L4 policy sync after a policy change failed (will retry)")
    return code, body


def _policies_route(agent: Agent, method: str, target: str, payload: bytes) -> tuple[int, dict]:
    """Runs in a worker thread; one store operation at a time.  Documents are
    AuthorizationPolicy and TrafficPolicy (one store, one version).

    GET    /v1/policies                      {"version", "count", "byKind", "policies": [summary...]}
                                             (every summary has "kind", "namespace", "name")
    GET    /v1/policies/<ns>/<name>[?kind=K] {"kind", "namespace", "name", "document", "yaml"}
    POST   /v1/policies:apply                body {"files": [{"filename", "text"}...]}
                                             -> {"changes": [{"kind", "namespace", "name", "result"}],
                                                 "version", "previous_version", "count", "warnings"}
    POST   /v1/policies:diff                 same body -> {"diff", "changes", "version"}
    DELETE /v1/policies/<ns>/<name>[?kind=K] {"deleted": "ns/name", "kind", "version", "count"}

    Invalid documents: 400 {"error", "errors": [{"file", "line", "column", "path",
    "message", "text"}]}, and nothing changed.  Unknown policy: 404.  Without
    ``kind``, a name that documents of two kinds share: 409 {"error", "kinds"}.
    "warnings": TrafficPolicies for services not in the inventory (applied anyway)."""
    from urllib.parse import parse_qs, unquote

    from .policy.store import MAX_DOCUMENT_BYTES, Ambiguous

    store = agent.policies
    if store is None:
        return 503, {"error": "the policy store is not loaded yet"}
    path, _, query = target.partition("?")
    with agent.policy_lock:
        if path in ("/v1/policies:apply", "/v1/policies:diff"):
            if method != "POST":
                return 405, {"error": f"{path} needs POST"}
            try:
                req = json.loads(payload or b"null")
                files = req["files"]
                sources = [(str(f["filename"]), f["text"]) for f in files]
                if not all(isinstance(t, str) for _, t in sources):
                    raise TypeError("text must be a string")
            except (ValueError, KeyError, TypeError) as e:
                return 400, {"error": 'body must be JSON {"files": [{"filename": ..., "text": ...}]}'
                                      f" ({e})"}
            if sum(len(t.encode()) for _, t in sources) > MAX_DOCUMENT_BYTES:
                return 413, {"error": f"more than {MAX_DOCUMENT_BYTES} bytes of policy text"}
            before = store.version
            try:
                if path.endswith(":diff"):
                    text, changes = store.diff(sources)
                    return 200, {"diff": text, "changes": [c.to_dict() for c in changes],
                                 "version": store.version}
                changes = store.apply(sources)
            except SourceError as e:
                return 400, {"error": str(e), "errors": [
                    {"file": p.file, "line": p.line, "column": p.column, "path": p.path,
                     "message": p.message, "text": str(p)} for p in e.errors]}
            if store.version != before:
                log.info("policies applied: version %s -> %s (%d documents)", before,
                         store.version, store.count)
            try:
                warnings = _traffic_warnings(agent, store)
            except Exception:  # noqa: BLE001 - a lint must never fail an applied change
                log.exception("traffic policy lint failed")
                warnings = []
            for w in warnings:
                log.warning("%s", w)
            return 200, {"changes": [c.to_dict() for c in changes], "version": store.version,
                         "previous_version": before, "count": store.count, "warnings": warnings}
        if path == "/v1/policies":
            if method != "GET":
                return 405, {"error": "/v1/policies needs GET"}
            return 200, {"version": store.version, "count": store.count,
                         "byKind": store.summary()["byKind"], "policies": store.list()}
        rest = path[len("/v1/policies/"):].split("/") if path.startswith("/v1/policies/") else []
        if len(rest) != 2 or not all(rest):
            return 404, {"error": f"unknown path {target!r}", "paths": sorted(POLICY_ROUTES)}
        ns, name = unquote(rest[0]), unquote(rest[1])
        kinds = parse_qs(query).get("kind")
        kind = kinds[-1] if kinds else None
        known = ["AuthorizationPolicy", *getattr(store, "kinds", {})]
        if kind is not None and kind not in known:
            return 400, {"error": f"unknown kind {kind!r}; one of: {', '.join(known)}"}
        what = f"{kind or 'policy'} {ns}/{name}"
        try:
            if method == "GET":
                doc = store.get(ns, name, kind)
                if doc is None:
                    return 404, {"error": f"no {what}"}
                return 200, {"kind": store.kind_of(ns, name, kind), "namespace": ns, "name": name,
                             "yaml": store.get_yaml(ns, name, kind),
                             "document": json.loads(json.dumps(doc, default=str))}
            if method == "DELETE":
                found = store.kind_of(ns, name, kind)
                if found is None or not store.delete(ns, name, found):
                    return 404, {"error": f"no {what}"}
                log.info("%s %s/%s deleted: version %s", found, ns, name, store.version)
                return 200, {"deleted": f"{ns}/{name}", "kind": found, "version": store.version,
                             "count": store.count}
        except Ambiguous as e:
            return 409, {"error": str(e), "kinds": e.kinds}
        return 405, {"error": f"{method} is not supported on {path}"}


# --- flows (#6): the kernel flow table over the admin API ------------------------------

FOLLOW_MAX_SECONDS = 3600.0
FOLLOW_INTERVAL = 0.25


def _flow_views(agent: Agent, records: list[dict], links: dict[int, int]) -> list[dict]:
    from .flows import Resolver, build_views

    proxy_ips = {str(ip): agent.cfg.node for ip in (agent.cfg.proxy.redirect_ipv4,
                                                    agent.cfg.proxy.redirect_ipv6) if ip}
    res = Resolver.from_inventory(agent.inventory, agent.cfg.identity.trust_domain, proxy_ips,
                                  workload_id) if agent.inventory else Resolver()
    return build_views(records, res, agent.cfg.node, time.time(), links)


async def _flows_route(agent: Agent, target: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> tuple[int, dict] | None:
    """GET /v1/flows?filters -> JSON; GET /v1/flows/follow?filters -> JSON
    lines {"event": "new"|"closed", "flow": ...} until the client goes away
    or max_seconds pass (returns None then)."""
    from urllib.parse import parse_qs, urlsplit

    from .flows import FlowFilter, select, sort_views

    url = urlsplit(target)
    params = {k: v[-1] for k, v in parse_qs(url.query).items()}
    try:
        flt = FlowFilter.from_params(params)
        sort = params.get("sort", "start")
        sort_views([], sort)
        limit = int(params.get("limit") or 0)
        max_s = min(float(params.get("max_seconds") or FOLLOW_MAX_SECONDS), FOLLOW_MAX_SECONDS)
    except ValueError as e:
        return 400, {"error": str(e)}
    fr = agent.flow_reader
    if url.path == "/v1/flows":
        def collect() -> tuple[dict, dict]:
            return fr.snapshot(), agent.datapath.stats()
        snap, stats = await asyncio.to_thread(collect)
        closed = {f["cookie"] for f in snap["closed"]}
        records = snap["closed"] + [f for f in snap["live"] if f["cookie"] not in closed]
        now = time.time()
        views = select(_flow_views(agent, records, snap["links"]), flt, sort, now, limit)
        return 200, {"node": agent.cfg.node, "now": now, "flows": views, "reader": snap["reader"],
                     "counters": {k: v for k, v in stats.items() if k.startswith("flow_")}}
    loop = asyncio.get_running_loop()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
    await writer.drain()
    gone = asyncio.ensure_future(reader.read(1))  # completes when the client hangs up
    try:
        cursor = await asyncio.to_thread(fr.cursor)
        deadline = loop.time() + max_s
        while loop.time() < deadline and not gone.done():
            cursor, events = await asyncio.to_thread(fr.poll_events, cursor)
            if events:
                views = _flow_views(agent, [f for _, f in events], {})
                now = time.time()
                for (kind, _), v in zip(events, views):
                    if flt.matches(v, now):
                        writer.write(json.dumps({"event": kind, "flow": v}).encode() + b"\n")
                await writer.drain()
            await asyncio.wait([gone], timeout=FOLLOW_INTERVAL)
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        gone.cancel()
    return None


async def _stats_route(agent: Agent, target: str) -> tuple[int, dict]:
    """GET /v1/stats?from=W&to=W -> per workload pair rows (agent/stats.py)."""
    from urllib.parse import parse_qs, urlsplit

    from .metrics import merge_http, merge_tcp
    from .stats import StatsFilter, pair_rows, select

    params = {k: v[-1] for k, v in parse_qs(urlsplit(target).query).items()}
    flt = StatsFilter(src=params.get("from") or None, dst=params.get("to") or None)
    fr = agent.flow_reader

    def collect() -> tuple[list, dict]:
        return agent.worker_stats(), fr.snapshot()

    workers, snap = await asyncio.to_thread(collect)
    closed = {f["cookie"] for f in snap["closed"]}
    records = snap["closed"] + [f for f in snap["live"] if f["cookie"] not in closed]
    views = _flow_views(agent, records, snap["links"])
    inv = agent.inventory
    workload_of = {p.key: (p.labels.get("app") or p.name, p.namespace)
                   for p in (inv.pods if inv else ())}
    names, tcp = merge_tcp(workers)
    http = merge_http(workers)
    rows = select(pair_rows(names, tcp, views, workload_of, http), flt)
    return 200, {"node": agent.cfg.node, "now": time.time(), "rows": rows,
                 "workers": {"configured": len(workers),
                             "answered": sum(1 for w in workers if w)},
                 "l7": ("HTTP requests counted by the destination node's proxy (proxy.l7)"
                        if agent.cfg.proxy.l7 else "not measured: proxy.l7 is off")}


def _workloads(agent: Agent) -> dict:
    inv = agent.inventory
    out = []
    for pod in inv.pods_on(agent.cfg.node) if inv else ():
        out.append({
            "pod": pod.key, "service_account": pod.service_account,
            "ips": [str(ip) for ip in pod.ips],
            "mesh": pod.mesh,
            "mode": inv.mode_for(pod, agent.cfg.mesh.mode),
            "enrolled": pod.key in agent.enrolled,
            "cgroup_id": agent.enrolled.get(pod.key),
            "reason": agent.pending.get(pod.key) or (None if pod.mesh else "mesh: false"),
        })
    return {"node": agent.cfg.node, "workloads": out}


def _services(agent: Agent) -> dict:
    """GET /v1/services: the services the proxies route (what proxy-state.json
    publishes), each endpoint with its pod's mesh flag and whether it is on
    this node."""
    inv = agent.inventory
    out = services_doc(inv.service_index) if inv else []
    mesh = {p.key: p.mesh for p in (inv.pods if inv else ())}
    for svc in out:
        for port in svc["ports"]:
            for ep in port["endpoints"]:
                ep["mesh"] = mesh.get(ep["pod"], False)
                ep["local"] = ep["node"] == agent.cfg.node
    return {"node": agent.cfg.node, "services": out,
            "inventory_error": getattr(agent, "inventory_error", None)}


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


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive_proxy(pid: int, state_path: str) -> bool:
    """True when ``pid`` is a live proxy worker serving ``state_path``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return b"agent.proxy" in argv and state_path.encode() in argv


def _pid_alive(pid: int, popen: subprocess.Popen | None) -> bool:
    if popen is not None:
        return popen.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _proxy_env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _proxy_stats(sock_path: str) -> dict | None:
    try:
        return json.loads(unix_request(sock_path, timeout=0.5))
    except (OSError, ValueError):
        return None


def run_agent(cfg: AgentConfig, keep_datapath: bool = False, preflight: bool = True) -> int:
    agent = Agent(cfg, keep_datapath=keep_datapath)
    if preflight:
        agent.preflight()
    try:
        agent.start()
    except BaseException:
        # Never leave a half-attached datapath behind; a datapath we adopted
        # was working before us and stays.
        if agent.datapath.how != "adopted":
            agent.stop_proxies()
            agent.datapath.teardown()
        raise
    try:
        try:
            import uvloop
            uvloop.run(agent.serve())
        except ImportError:
            asyncio.run(agent.serve())
    finally:
        agent.shutdown()
    return 0

