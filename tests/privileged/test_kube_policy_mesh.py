"""End to end: policies from the cluster.  A 2-node simulated cluster in
Kubernetes mode (tests/support/kubemesh.py); a policy custom resource is
written with `meshlet policy apply --kubeconfig`, changed, broken and
deleted while a long transfer runs, and BOTH nodes enforce the same set:
the DENY is seen from pods on node1 and on node2.  A broken edit is refused
in the object's status and the DENY before it keeps denying.

Pods pod1-1, pod1-2 on node1; pod2-1, pod2-2 on node2; namespace default;
every pod serves on 7000 (transfer), 7001 and 7002 (echo).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.support.privileged import TOOLS, gateway, ip_of, probe, require_privileged, start_servers, wait_for

require_privileged()

from agent.sim import Cluster  # noqa: E402
from tests.support import kubeapi as k  # noqa: E402
from tests.support.kubemesh import KubeMesh, publish  # noqa: E402

pytestmark = pytest.mark.privileged

MESHLET = "meshlet.io/v1alpha1"
DENY = {
    "apiVersion": MESHLET, "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-port", "namespace": "default"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["7002"]}}]}]},
}
# one pod on each node as destination, the client on the other node
PAIRS = (("pod1-1", "pod2-1"), ("pod2-2", "pod1-2"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("kubepolicy"))
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    api = k.FakeKubeAPI(workdir=work, bookmark_interval=1.0)
    mesh = KubeMesh(cluster)
    try:
        publish(cluster, api)
        api.start()
        mesh.kubeconfig = api.kubeconfig(os.path.join(work, "kubeconfig"))
        start_servers(cluster, (("serve", 7000), ("echo", 7001), ("echo", 7002)))
        mesh.start()
        yield mesh, api, work
    finally:
        mesh.down()
        api.stop()
        cluster.down()


def outcome(mesh, src: str, dst: str, port: int) -> str:
    r = probe(mesh, src, ip_of(mesh, dst), port, timeout=5.0)
    if r["result"] == "connect_error" and r.get("errno") in (1, 104):  # EPERM (the kernel), ECONNRESET
        return "denied"
    return "denied" if r["result"] in ("reset", "eof") else r["result"]


def both_nodes(mesh, port: int, want: str, what: str) -> None:
    """From a pod on each node to a pod on the other: ``want`` on both."""
    for src, dst in PAIRS:
        wait_for(lambda s=src, d=dst: outcome(mesh, s, d, port) == want,
                 f"{what}: {src} -> {dst}:{port} {want}", timeout=30, interval=0.3)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "policy", *args],
                          capture_output=True, text=True, timeout=120)


def accepted(api, name: str) -> dict | None:
    conds = (api.get("AuthorizationPolicy", "default", name, MESHLET).get("status") or {}).get("conditions")
    return next((c for c in conds or () if c["type"] == "Accepted"), None)


def test_a_policy_cr_is_enforced_by_both_nodes_while_traffic_runs(env):
    mesh, api, work = env
    kc = mesh.kubeconfig
    both_nodes(mesh, 7002, "data", "no policy yet")
    bg = mesh.cluster.pod("pod1-1").popen(
        TOOLS + ["transfer", ip_of(mesh, "pod2-2"), "7000", "--up", str(64 << 20), "--down", str(64 << 20),
                 "--timeout", "240"], stdout=subprocess.PIPE, text=True)
    try:
        # created with the CLI: written as a CR, reported accepted by the nodes
        f = os.path.join(work, "deny.yaml")
        with open(f, "w") as fh:
            yaml.safe_dump(DENY, fh)
        r = cli("apply", "--kubeconfig", kc, "-f", f, "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "authorizationpolicy.meshlet.io default/deny-port accepted (generation 1)" in r.stdout
        both_nodes(mesh, 7002, "denied", "the DENY")
        both_nodes(mesh, 7001, "data", "other ports untouched")

        # a node agent refuses a local apply: the cluster's set is the node's set
        r = cli("apply", "--socket", os.path.join(mesh.agents["node1"].run_dir, "admin.sock"), "-f", f)
        assert r.returncode == 1 and "Kubernetes API" in r.stderr and "--kubeconfig" in r.stderr

        # changed in the cluster: both nodes follow
        changed = copy.deepcopy(DENY)
        changed["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["7001"]
        api.apply(changed)
        both_nodes(mesh, 7001, "denied", "the changed DENY")
        both_nodes(mesh, 7002, "data", "the old port free again")
        wait_for(lambda: (c := accepted(api, "deny-port")) and c["observedGeneration"] == 2
                 and c["status"] == "True", "generation 2 accepted")

        # a broken edit is refused and the DENY keeps denying, on both nodes
        broken = copy.deepcopy(changed)
        broken["spec"]["rules"][0]["from"] = [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]
        api.apply(broken)
        cond = wait_for(lambda: (c := accepted(api, "deny-port")) and c["observedGeneration"] == 3 and c,
                        "the verdict on generation 3")
        assert cond["status"] == "False" and "remoteIpBlocks" in cond["message"], cond
        assert cond["message"].endswith("generation 2 stays in force")
        for node in ("node1", "node2"):
            wait_for(lambda n=node: mesh.status(n)["policy"]["cluster"]["refused_total"] == 1,
                     f"{node} refused generation 3")
        both_nodes(mesh, 7001, "denied", "the DENY after the broken edit")
        both_nodes(mesh, 7002, "data", "7002 after the broken edit")
        st = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--socket",
                             os.path.join(mesh.agents["node2"].run_dir, "admin.sock")],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        assert f"from the cluster ({api.url}): 1 objects, in sync" in st.stdout, st.stdout
        assert ("REFUSED meshlet.io/v1alpha1/AuthorizationPolicy/default/deny-port generation 3 "
                "(generation 2 stays)") in st.stdout, st.stdout

        # the API goes away: the last set stays in force on both nodes
        api.stop()
        try:
            for node in ("node1", "node2"):
                wait_for(lambda n=node: not mesh.status(n)["policy"]["cluster"]["in_sync"],
                         f"{node} notices the outage")
            both_nodes(mesh, 7001, "denied", "the DENY while the API is away")
        finally:
            api.start()
        for node in ("node1", "node2"):
            wait_for(lambda n=node: mesh.status(n)["policy"]["cluster"]["in_sync"], f"{node} in sync again")

        # deleted with the CLI: lifted on both nodes
        r = cli("delete", "--kubeconfig", kc, "deny-port", "-n", "default")
        assert r.returncode == 0, r.stdout + r.stderr
        both_nodes(mesh, 7001, "data", "the DENY deleted")
        for node in ("node1", "node2"):
            pol = mesh.status(node)["policy"]
            assert pol["count"] == 0 and pol["cluster"]["objects"] == 0, pol
    finally:
        out, _ = bg.communicate(timeout=300)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ok"] and report["server_saw_peer"] == gateway(mesh, "node2"), report
