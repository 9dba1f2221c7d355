"""The DaemonSet's agent container has five capabilities, not `privileged`:
run the agents of a simulated cluster with exactly that bounding set (no
other capability can be gained after exec) and show that the mesh works in
strict mode with mTLS, same node and across nodes, and that the probes of
the DaemonSet answer on the metrics port.

CAP_SYS_RESOURCE is in the DaemonSet for kernels before 5.11 (BPF memory
was charged to RLIMIT_MEMLOCK); where the machine itself lacks it, the set
here is what remains, and the agent must not need it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.support.kubeschema import DEPLOY
from tests.support.privileged import gateway, ip_of, require_privileged, start_servers, transfer

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, _env  # noqa: E402
from agent.sim.topology import exec_argv  # noqa: E402

pytestmark = pytest.mark.privileged

CAP_BITS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}


def daemonset_caps() -> list[str]:
    for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()):
        if d and d["kind"] == "DaemonSet":
            agent = next(c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
            return agent["securityContext"]["capabilities"]["add"]
    raise AssertionError("no DaemonSet in deploy/daemonset.yaml")


def own_bounding_set() -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("CapBnd:")).split()[1], 16)


def cgroup_root_needs_dac_override() -> bool:
    """On a kubelet node the cgroup2 root is 0755 and root, its owner, may
    create the agent's probe cgroup there.  This machine mounts it 0555 (a
    hybrid layout at /sys/fs/cgroup/unified): only CAP_DAC_OVERRIDE writes
    there, so the test adds it for that and says so."""
    import os
    import stat

    from agent.cgroup import cgroup2_mount

    st = os.stat(cgroup2_mount())
    return st.st_uid == 0 and not st.st_mode & stat.S_IWUSR


CAP_BITS["DAC_OVERRIDE"] = 1
CAPS = daemonset_caps()
HOST_EXTRA = ["DAC_OVERRIDE"] if cgroup_root_needs_dac_override() else []
MASK = sum(1 << CAP_BITS[c] for c in CAPS + HOST_EXTRA) & own_bounding_set()


class CappedMesh(Mesh):
    """Agents (and so their proxy workers) start under the DaemonSet's bounding set."""

    def start_agent(self, name, *, keep_datapath=True, wait=True, timeout=90):
        ap = self.agents[name]
        bounding = "-all," + ",".join(f"+{c.lower()}" for c in CAPS + HOST_EXTRA if (1 << CAP_BITS[c]) & MASK)
        argv = [
            "setpriv",
            f"--bounding-set={bounding}",
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            ap.config,
        ]
        if keep_datapath:
            argv.append("--keep-datapath")
        with open(ap.log_path, "ab") as logf:
            ap.popen = ap.node.popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=_env())
        if wait:
            self.wait_ready(name, timeout=timeout)
        return ap.popen


def cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("CapEff:")).split()[1], 16)


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    m = CappedMesh(cluster, mode="strict")
    try:
        start_servers(cluster)
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


def test_the_daemonset_grants_the_capabilities_this_test_uses():
    assert set(CAPS) == set(CAP_BITS) - {"DAC_OVERRIDE"}


def test_agent_and_proxies_run_with_only_those_capabilities(mesh):
    for name, ap in mesh.agents.items():
        assert ap.popen is not None and ap.popen.poll() is None, name
        # popen is the netns/cgroup wrapper that exec'd setpriv and then python
        assert cap_eff(ap.popen.pid) == MASK, name
        workers = mesh.status(name)["proxy"]
        assert workers and all(w["alive"] for w in workers)
        for w in workers:
            assert cap_eff(w["pid"]) & ~MASK == 0, f"{name} worker {w['pid']}"
            # the tunnel and outbound listeners' SK_REUSEPORT programs load with these (BPF, NET_ADMIN)
            assert w["stats"]["tunnel_spread"]["ipv4"] == "least-loaded", w["stats"]["tunnel_spread"]
            assert w["stats"]["outbound_spread"]["ipv4"] == "least-loaded", w["stats"]["outbound_spread"]


def test_strict_mtls_traffic_flows_same_node_and_across(mesh):
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod1-2"), up=1 << 20, down=1 << 20)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node1"), r
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r


def test_the_probes_answer_on_the_metrics_port(mesh):
    node = mesh.cluster.nodes[0]
    for path in ("/healthz", "/readyz"):
        out = subprocess.run(
            exec_argv(
                node.netns,
                None,
                [
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://127.0.0.1:{mesh.metrics_port}{path}",
                ],
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.stdout == "200", (path, out.stdout, out.stderr)
