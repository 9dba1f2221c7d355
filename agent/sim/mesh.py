"""A simulated cluster with a meshlet agent on every node.

Used by the privileged tests, the demo and the benchmark.  Each node gets a
config file, its own run dir (/run/meshlet/<prefix>-<node>) and pin dir
(/sys/fs/bpf/meshlet/<prefix>-<node>); all nodes read one shared inventory
file.  Agents run as ``python -m agent.cli run`` (which execs ``agent.daemon``,
the same pid: see agent/daemon.py) inside the node's netns and
``system`` cgroup, exactly as a user would start them.

Services: ``Mesh(cluster, services=[...])`` writes the list as the
inventory's ``services:`` section (see agent/workloads/yamlfile.py).  Take
VIPs from :func:`service_vip` (10.96.0.0/16 and fd00:96::/112): they are on
no interface, and only mesh pods can reach them, because the kernel hook
hands every connection of an enrolled pod to the node proxy, which knows
the VIP (there is no kube-proxy).

A DaemonSet upgrade (``maxSurge: 1``): :meth:`Mesh.start_successor` starts
a second agent for a node while its agent runs, as the new pod would: its
own run dir (the pod's emptyDir) and its own cgroup among the pods' (the
new pod's), the same pin dir, identity dir and hand-over lease
(``handoverDir``, agent/handover.py).  :meth:`Mesh.end_pod` does what the
container runtime does when a pod ends: kills what is left of its processes.

Teardown stops agents (SIGTERM, then SIGKILL), kills stray proxy workers,
detaches and unpins every datapath, and removes run dirs — also when the
caller failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.datapath.loader import remove_empty_parent, remove_pins

from .topology import Cluster, Node, _cgroup_pids, _kill_cgroup, popen_in

PROXY_PORTS = {"outbound": 15001, "tunnel": 15008}

#: Where simulated services take their virtual IPs (as Kubernetes' default
#: service CIDR): never assigned to an interface.
SERVICE_CIDR4 = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:96::/112"


def service_vip(index: int, family: int = 4) -> str:
    """The ``index``-th (1..65534) VIP of the simulated service range."""
    import ipaddress

    if not 1 <= index <= 65534:
        raise ValueError(f"service VIP index {index} is outside 1..65534")
    net = ipaddress.ip_network(SERVICE_CIDR4 if family == 4 else SERVICE_CIDR6)
    return str(net.network_address + index)


def service(
    name: str,
    selector: dict[str, str],
    ports: list[dict],
    *,
    index: int,
    namespace: str = "default",
    ipv6: bool = False,
) -> dict:
    """One entry of the inventory's ``services:`` section, VIPs from
    :func:`service_vip` (``ipv6``: an IPv6 VIP too).  ``ports`` as in the
    inventory, e.g. ``[{"port": 80, "targetPort": 8080, "appProtocol": "http"}]``."""
    vips = [service_vip(index, 4)] + ([service_vip(index, 6)] if ipv6 else [])
    return {
        "name": name,
        "namespace": namespace,
        "vip": vips,
        "selector": dict(selector),
        "ports": [dict(p) for p in ports],
    }


def _timeout_scale() -> float:
    try:
        return max(1.0, float(os.environ.get("MESHLET_SIM_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


@dataclass
class AgentProc:
    node: Node
    config: str
    run_dir: str
    pin_dir: str
    popen: subprocess.Popen | None = None
    log_path: str = ""
    handover_dir: str = ""  # handoverDir; default: run_dir
    cgroup: str = ""  # a cgroup of its own (a successor's "pod"); default: the node's system cgroup


@dataclass
class Mesh:
    """Agents on every node of ``cluster``; see module docstring."""

    cluster: Cluster
    mode: str = "permissive"
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    workers: int = 1
    unmeshed: set[str] = field(default_factory=set)  # pod names with mesh: false
    namespaces: dict[str, dict] = field(default_factory=dict)
    services: list[dict] = field(default_factory=list)  # the inventory's services: section
    log_level: str = "info"
    workdir: str = ""
    trust_domain: str = "cluster.local"
    cert_ttl: int = 86400
    tunnel_security: str = "mtls"  # insecure-plaintext: benchmarks only
    tls_resumption: bool = True
    splice: bool | str = "auto"  # proxy.splice: the same-node kernel splice (true, false or auto)
    tunnel_mux: bool = True  # proxy.tunnelMux
    legacy_tunnel_nodes: set[str] = field(default_factory=set)  # nodes forced to meshlet-tunnel/1 only
    l7: bool | str = "auto"  # proxy.l7: true, false or auto (the default; see config.py)
    path_parameters: str = "reject"  # proxy.pathParameters: reject, strip or keep
    flow_tracking: bool = True  # bpf.flowTracking: the kernel flow table
    flow_history: int | None = None  # bpf.flowHistory (None: the config's default)
    kernel_policy: bool = True  # bpf.kernelPolicy: policy refusals at connect()
    tc_attach: str = "auto"  # bpf.tcAttach: tcx, clsact or auto (strict mode)
    access_log_settings: dict = field(default_factory=dict)  # the config's accessLog section
    tracing_settings: dict = field(default_factory=dict)  # the config's tracing section
    metrics_port: int = 15020
    agents: dict[str, AgentProc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._own_workdir = not self.workdir
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix=f"meshlet-{self.cluster.prefix}-")
        self.inventory_path = os.path.join(self.workdir, "inventory.yaml")
        self.ca_dir = os.path.join(self.workdir, "ca")
        for node in self.cluster.nodes:
            tag = f"{self.cluster.prefix}-{node.name}"
            ap = AgentProc(
                node=node,
                config=os.path.join(self.workdir, f"{node.name}.yaml"),
                run_dir=f"/run/meshlet/{tag}",
                pin_dir=f"/sys/fs/bpf/meshlet/{tag}",
            )
            ap.log_path = os.path.join(self.workdir, f"agent-{node.name}.log")
            self.agents[node.name] = ap

    # --- files ------------------------------------------------------------------

    def inventory_doc(self) -> dict:
        doc = self.cluster.inventory()
        for p in doc["pods"]:
            p["mesh"] = p["name"] not in self.unmeshed
        if self.namespaces:
            doc["namespaces"] = self.namespaces
        if self.services:
            doc["services"] = [dict(s) for s in self.services]
        return doc

    def write_inventory(self, doc: dict | None = None, text: str | None = None) -> None:
        """Write the inventory atomically (``text`` verbatim, e.g. a broken file)."""
        if text is None:
            text = yaml.safe_dump(doc or self.inventory_doc(), sort_keys=False)
        tmp = self.inventory_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.inventory_path)

    # --- CA material: one CA dir, a copy of what each node needs in its own dir ------

    def identity_dir(self, node: str) -> str:
        return os.path.join(self.workdir, "identity", node)

    def init_ca(self) -> None:
        from agent.identity.ca import init_ca

        if not os.path.exists(os.path.join(self.ca_dir, "bundle.pem")):
            init_ca(self.ca_dir, self.trust_domain, [n.name for n in self.cluster.nodes])
        self.distribute_ca()

    def distribute_ca(
        self, nodes: list[str] | None = None, *, bundle: bool = True, node_ca: bool = True
    ) -> None:
        """Copy the CA dir's bundle and/or node intermediates to the nodes'
        identity dirs (what an operator or a secret sync would do).  The key
        goes first: the agent retries until cert and key match."""
        for name in nodes or [n.name for n in self.cluster.nodes]:
            d = self.identity_dir(name)
            os.makedirs(d, mode=0o700, exist_ok=True)
            files = []
            if node_ca:
                files += [
                    (os.path.join(self.ca_dir, "nodes", name, "ca-key.pem"), "ca-key.pem"),
                    (os.path.join(self.ca_dir, "nodes", name, "ca.pem"), "ca.pem"),
                ]
            if bundle:
                files.append((os.path.join(self.ca_dir, "bundle.pem"), "bundle.pem"))
            for src, dst in files:
                tmp = os.path.join(d, f".{dst}.tmp")
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, os.path.join(d, dst))

    def config_doc(self, node: Node, key: str | None = None) -> dict:
        ap = self.agents[key or node.name]
        proxy: dict[str, Any] = {
            "redirectIPv4": node.gateway4,
            "workers": self.workers,
            "connectTimeout": 2.0,
            "tunnelSecurity": self.tunnel_security,
            "tlsResumption": self.tls_resumption,
            "splice": self.splice,
            "tunnelMux": self.tunnel_mux and node.name not in self.legacy_tunnel_nodes,
            "l7": self.l7,
            "pathParameters": self.path_parameters,
        }
        if node.gateway6:
            proxy["redirectIPv6"] = node.gateway6
        return {
            "node": node.name,
            "inventory": self.inventory_path,
            "cgroup": node.cgroup,
            "bpf": {
                "pinDir": ap.pin_dir,
                "flowTracking": self.flow_tracking,
                "kernelPolicy": self.kernel_policy,
                "tcAttach": self.tc_attach,
                **({} if self.flow_history is None else {"flowHistory": self.flow_history}),
            },
            "proxy": proxy,
            "mesh": {
                "mode": self.mode,
                "excludePorts": list(self.exclude_ports),
                "excludeCIDRs": list(self.exclude_cidrs),
            },
            "admin": {"socket": os.path.join(ap.run_dir, "admin.sock")},
            "identity": {
                "trustDomain": self.trust_domain,
                "bundle": os.path.join(self.identity_dir(node.name), "bundle.pem"),
                "caCert": os.path.join(self.identity_dir(node.name), "ca.pem"),
                "caKey": os.path.join(self.identity_dir(node.name), "ca-key.pem"),
                "certTTL": self.cert_ttl,
            },
            "runDir": ap.run_dir,
            "handoverDir": ap.handover_dir or ap.run_dir,
            "logLevel": self.log_level,
            "metrics": {"port": self.metrics_port},
            "accessLog": dict(self.access_log_settings),
            "tracing": dict(self.tracing_settings),
        }

    def write_configs(self) -> None:
        for node in self.cluster.nodes:
            with open(self.agents[node.name].config, "w") as f:
                yaml.safe_dump(self.config_doc(node), f, sort_keys=False)

    # --- agents --------------------------------------------------------------------

    def start(self, timeout: float = 90, *, listening: bool = True) -> Mesh:
        """Start every agent; return once each one's workers listen
        (``listening=False``: once they report stats, for a test whose
        workers wait for certificates it has not let the CA give yet)."""
        self.init_ca()
        self.write_inventory()
        self.write_configs()
        for name in self.agents:
            self.start_agent(name, wait=False)
        for name in self.agents:
            self.wait_ready(name, timeout=timeout, listening=listening)
        return self

    def start_agent(self, name: str, *, wait: bool = True, timeout: float = 90) -> subprocess.Popen:
        """Start the agent of node ``name``.  A stop (SIGTERM or SIGKILL)
        leaves the datapath and the proxy workers in place for the next
        agent; :meth:`uninstall` or teardown removes them."""
        ap = self.agents[name]
        argv = [sys.executable, "-m", "agent.cli", "run", "--config", ap.config]
        logf = open(ap.log_path, "ab")
        try:
            ap.popen = ap.node.popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=_env())
        finally:
            logf.close()
        if wait:
            self.wait_ready(name, timeout=timeout)
        return ap.popen

    def start_successor(
        self,
        name: str,
        *,
        wait: bool = True,
        timeout: float = 90,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> str:
        """Start a second agent for node ``name`` while its agent runs (see the
        module docstring); returns its key in :attr:`agents` (``<name>-next``).
        ``wait``: until it owns the node (its workers are ready).  Policies
        applied to the running agent are copied to the new run dir (in
        Kubernetes mode both read them from the cluster).  ``env``: added to
        its environment (e.g. a PYTHONPATH with another version; ``python -m``
        looks in ``cwd`` first)."""
        old = self.agents[name]
        key = f"{name}-next"
        if key in self.agents and self.agents[key].popen is not None:
            raise RuntimeError(f"{key} is running already")
        node = old.node
        ap = AgentProc(
            node=node,
            config=os.path.join(self.workdir, f"{key}.yaml"),
            run_dir=f"{old.run_dir}-next",
            pin_dir=old.pin_dir,
            log_path=os.path.join(self.workdir, f"agent-{key}.log"),
            handover_dir=old.handover_dir or old.run_dir,
            cgroup=os.path.join(node.pods_cgroup, f"meshlet-{key}"),
        )
        self.agents[key] = ap
        os.makedirs(ap.cgroup, exist_ok=True)
        os.makedirs(ap.run_dir, mode=0o700, exist_ok=True)
        stored = os.path.join(old.run_dir, "policies.yaml")
        if os.path.exists(stored):
            shutil.copyfile(stored, os.path.join(ap.run_dir, "policies.yaml"))
        with open(ap.config, "w") as f:
            yaml.safe_dump(self.config_doc(node, key), f, sort_keys=False)
        argv = [sys.executable, "-m", "agent.cli", "run", "--config", ap.config]
        logf = open(ap.log_path, "ab")
        try:
            ap.popen = popen_in(
                node.netns,
                ap.cgroup,
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**_env(), **(env or {})},
                cwd=cwd,
            )
        finally:
            logf.close()
        if wait:
            self.wait_owner(key, timeout=timeout)
        return key

    def wait_owner(self, key: str, timeout: float = 90) -> dict:
        """Until agent ``key`` owns its node (the hand-over lease) with every
        proxy worker ready, and its health file (what the DaemonSet's
        readiness probe reads) says ready; its status."""
        ap = self.agents[key]
        deadline = time.monotonic() + timeout * _timeout_scale()
        last: object = None
        while time.monotonic() < deadline:
            if ap.popen is not None and ap.popen.poll() is not None:
                raise RuntimeError(
                    f"agent {key} exited with {ap.popen.returncode}:\n" + self.agent_log(key)[-4000:]
                )
            try:
                with open(os.path.join(ap.run_dir, "health.json")) as f:
                    health = json.load(f)
                st = self.status(key)
                if (
                    health.get("ready")
                    and st["handover"]["role"] == "owner"
                    and all(w["alive"] and (w["stats"] or {}).get("ready") for w in st["proxy"])
                ):
                    return st
                last = (health, st["handover"])
            except (OSError, KeyError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(
            f"agent {key} does not own its node after {timeout}s (last: {last}):\n"
            + self.agent_log(key)[-4000:]
        )

    def end_pod(self, key: str) -> list[int]:
        """What the container runtime does when agent ``key``'s pod ends
        (after the agent exited): kill what is left of its processes (its own
        cgroup, or its proxy workers by their pid files); returns their pids."""
        ap = self.agents[key]
        left = []
        if ap.cgroup:
            left = _cgroup_pids(ap.cgroup)
            _kill_cgroup(ap.cgroup)
        else:
            for pid in self.proxy_pids(key):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"agent.proxy" in f.read():
                            os.kill(pid, signal.SIGKILL)
                            left.append(pid)
                except OSError:
                    pass
        return left

    def uninstall(self, name: str, *, force: bool = False) -> subprocess.CompletedProcess:
        """``meshlet uninstall`` on node ``name`` (output captured, not checked)."""
        argv = [sys.executable, "-m", "agent.cli", "uninstall", "--config", self.agents[name].config]
        return self.agents[name].node.run(
            argv + (["--force"] if force else []), check=False, timeout=60, env=_env()
        )

    def policy(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """``meshlet policy <args>`` against node ``name``'s agent, as a user
        runs it (output captured, not checked)."""
        sock = os.path.join(self.agents[name].run_dir, "admin.sock")
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "policy", *args, "--socket", sock],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )

    def policies_enforced(self) -> bool:
        """Every proxy worker of every node reports its agent's policy version."""
        for name in self.agents:
            st = self.status(name)
            want = (st.get("policy") or {}).get("version")
            if not want or any(
                ((w.get("stats") or {}).get("policy") or {}).get("version") != want for w in st["proxy"]
            ):
                return False
        return True

    def wait_policies_enforced(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.policies_enforced():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxies did not load the applied policies within {timeout:g} s")
            time.sleep(0.1)

    def reconfigure(self, timeout: float = 90, **changes: Any) -> None:
        """Change Mesh settings, rewrite the configs and restart every agent
        (SIGTERM: the datapath and proxies stay up and
        the new agents adopt them, then publish the new proxy state)."""
        for k, v in changes.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)
        self.write_configs()
        for name in self.agents:
            gen = self.status(name)["generation"]
            self.stop_agent(name, signal.SIGTERM)
            self.start_agent(name, timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # proxies loaded the new state
                st = self.status(name)
                if st["generation"] > gen and all(
                    (w.get("stats") or {}).get("state_generation", -1) >= st["generation"]
                    for w in st["proxy"]
                ):
                    break
                time.sleep(0.1)

    def wait_ready(self, name: str, timeout: float = 90, *, listening: bool = True) -> dict:
        """Until the admin API answers and every proxy worker is ready: its
        listeners are up (a worker reports stats, ``ready: false``, while it
        still waits for its certificates; a connection redirected to it then
        is refused).  ``listening=False``: until every worker reports stats.
        ``MESHLET_SIM_TIMEOUT_SCALE`` multiplies ``timeout`` on slow machines
        (the Vagrant guest under qemu's software emulation sets it: bcc's
        compile and the verifier run many times slower there)."""
        ap = self.agents[name]
        timeout *= _timeout_scale()
        deadline = time.monotonic() + timeout
        last: dict | OSError | None = None
        while time.monotonic() < deadline:
            if ap.popen is not None and ap.popen.poll() is not None:
                raise RuntimeError(
                    f"agent on {name} exited with {ap.popen.returncode}:\n" + self.agent_log(name)[-4000:]
                )
            try:
                st = self.status(name)
                if st["proxy"] and all(
                    w["alive"] and w["stats"] and (w["stats"].get("ready") or not listening)
                    for w in st["proxy"]
                ):
                    return st
                last = st
            except OSError as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(
            f"agent on {name} not ready after {timeout}s (last: {last}):\n" + self.agent_log(name)[-4000:]
        )

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        ap = self.agents[name]
        if ap.popen is None:
            return None
        if ap.popen.poll() is None:
            ap.popen.send_signal(sig)
            try:
                ap.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                ap.popen.kill()
                ap.popen.wait(timeout=10)
        rc = ap.popen.returncode
        ap.popen = None
        return rc

    def agent_log(self, name: str) -> str:
        try:
            with open(self.agents[name].log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def proxy_log(self, name: str, worker: int = 0) -> str:
        try:
            with open(os.path.join(self.agents[name].run_dir, f"proxy-{worker}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # --- queries ----------------------------------------------------------------------

    def admin(self, name: str, path: str) -> dict:
        from agent.adminclient import admin_get

        return admin_get(os.path.join(self.agents[name].run_dir, "admin.sock"), path)[1]

    def status(self, name: str) -> dict:
        return self.admin(name, "/v1/status")

    def access_log(self, name: str) -> list[dict]:
        path = os.path.join(self.agents[name].run_dir, "access.log")
        try:
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def scrape(self, name: str) -> str:
        """GET /metrics from inside the node's network namespace."""
        code = (
            "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{self.metrics_port}/metrics', timeout=20).read().decode())"
        )
        return self.agents[name].node.run([sys.executable, "-c", code], timeout=30).stdout

    def counters(self, name: str) -> dict[str, int]:
        from agent.datapath.status import datapath_status

        return datapath_status(self.agents[name].pin_dir)["counters"]

    def proxy_pids(self, name: str) -> list[int]:
        pids = []
        for w in range(self.workers):
            try:
                with open(os.path.join(self.agents[name].run_dir, f"proxy-{w}.pid")) as f:
                    pids.append(int(f.read()))
            except (OSError, ValueError):
                pass
        return pids

    # --- teardown ---------------------------------------------------------------------

    def down(self) -> None:
        """Stop everything this mesh started; never raises."""
        for name in list(self.agents):
            try:
                self.stop_agent(name, signal.SIGKILL, timeout=10)
            except Exception:  # noqa: BLE001 - down() never raises; the kill below is the fallback
                pass
        for name, ap in self.agents.items():
            for pid in self.proxy_pids(name):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"agent.proxy" in f.read():
                            os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                remove_pins(ap.pin_dir)
            except Exception:  # noqa: BLE001 - down() never raises; the rest of the teardown must run
                pass
            if ap.cgroup:
                try:
                    _kill_cgroup(ap.cgroup)
                    os.rmdir(ap.cgroup)
                except OSError:
                    pass
            shutil.rmtree(ap.run_dir, ignore_errors=True)
            remove_empty_parent(ap.run_dir)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
