"""A pod's processes run in *child* cgroups of the pod cgroup on a real node
(the container runtime makes one per container, the pause container's
too), and the agent enrolls the pod cgroup: the datapath must find a task's
pod by walking up from the task's cgroup (bpf/sock.c ml_task_pod).

A 2-node simulated cluster laid out as kubelets do (agent.sim
``kubelet_layout="both"``: node1 the systemd driver,
``kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope``,
node2 cgroupfs, ``kubepods/besteffort/pod<uid>/<id>``); the agents read the
inventory file, which lists each pod's pod cgroup.  A process in a
container cgroup must be redirected, policed and counted exactly like one
in the pod cgroup; a process below a cgroup nobody listed, in the guarded
directory, is still refused; a pod taken out of the inventory stops
matching at once, children included.

Proof of the path, as in test_mesh.py: the server reports the peer it saw,
the delivering node proxy's address (the node gateway) for a meshed
connection, the client pod's own address for a direct one; a refused
connect() fails with EPERM.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.support.privileged import (
    TOOLS,
    gateway,
    ip_of,
    policy_cli,
    require_privileged,
    running_mesh,
    wait_for,
)

require_privileged()

from agent import cgroup as cg  # noqa: E402
from agent.sim import Cluster, exec_in  # noqa: E402

pytestmark = pytest.mark.privileged

SERVE = 7000


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pods_per_node=2, kubelet_layout="both")
    with running_mesh(cluster, (("serve", SERVE),)) as m:
        yield m


def transfer_from(mesh, pod: str, cgroup: str, dst_ip: str) -> dict:
    """One small ``transfer`` to ``dst_ip``'s serve tool from a process in
    ``cgroup`` and in ``pod``'s network namespace; its JSON report."""
    p = mesh.cluster.pod(pod)
    r = exec_in(p.netns, cgroup, TOOLS + ["transfer", dst_ip, str(SERVE), "--up", "65536", "--down",
                                          "65536", "--timeout", "20"], check=False, timeout=60)
    assert r.stdout, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_from(mesh, pod: str, cgroup: str, dst_ip: str) -> dict:
    p = mesh.cluster.pod(pod)
    r = exec_in(p.netns, cgroup, TOOLS + ["probe", dst_ip, str(SERVE), "--timeout", "5"],
                check=False, timeout=30)
    return json.loads(r.stdout.strip().splitlines()[-1])


def refused(r: dict) -> bool:
    return r["result"] == "connect_error" and r["errno"] == errno.EPERM


def enrolled(mesh, node: str) -> dict[str, int]:
    return {e["pod"]: e["cgroup_id"] for e in mesh.status(node)["enrolled"]}


def test_the_layout_is_the_kubelets(mesh):
    for name, scope in (("pod1-1", "cri-containerd-"), ("pod2-1", "")):
        pod = mesh.cluster.pod(name)
        assert os.path.dirname(pod.container) == pod.cgroup == os.path.dirname(pod.sandbox)
        assert os.path.basename(pod.container).startswith(scope)
        # the pod's processes run in the container cgroup, not in the pod cgroup
        r = pod.run(["cat", "/proc/self/cgroup"])
        assert r.stdout.strip().endswith(pod.container[len(cg.cgroup2_mount()):]), r.stdout
        # and the agent enrolled the pod cgroup
        assert enrolled(mesh, pod.node)[f"default/{name}"] == cg.cgroup_id(pod.cgroup)
    assert "kubepods.slice" in mesh.cluster.pod("pod1-1").cgroup
    assert "/kubepods/besteffort/pod" in mesh.cluster.pod("pod2-1").cgroup


@pytest.mark.parametrize("src,dst,v6", [("pod1-1", "pod2-1", False), ("pod2-2", "pod1-2", True),
                                        ("pod1-1", "pod1-2", False)])
def test_a_container_process_is_redirected_like_the_pod(mesh, src, dst, v6):
    """Cross-node both ways (systemd and cgroupfs layout on the client side,
    IPv4 and IPv6) and same-node: a process in the container cgroup, one in
    the pod cgroup itself and one in a cgroup nested inside the container's
    all go through the mesh."""
    pod = mesh.cluster.pod(src)
    nested = os.path.join(pod.container, "nested")
    os.makedirs(nested, exist_ok=True)
    want = gateway(mesh, mesh.cluster.pod(dst).node, v6=v6)
    for where in (pod.container, pod.cgroup, nested):
        r = transfer_from(mesh, src, where, ip_of(mesh, dst, v6=v6))
        assert r["ok"] and r["server_saw_peer"] == want, (where, r)


def test_a_container_process_is_counted_as_its_pod(mesh):
    pod = mesh.cluster.pod("pod1-1")
    r = transfer_from(mesh, "pod1-1", pod.container, ip_of(mesh, "pod2-2"))
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
    sock = os.path.join(mesh.agents["node1"].run_dir, "admin.sock")

    def client_leg():
        out = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--socket", sock, "-o", "json",
                              "--pod", "default/pod1-1", "--state", "closed"],
                             capture_output=True, text=True, timeout=30, check=True)
        return [f for f in json.loads(out.stdout)
                if f["role"] == "client" and f["destination"].get("pod") == "default/pod2-2"]
    leg = wait_for(client_leg, "the container process's client leg")[-1]
    # the kernel filed the flow under the pod's workload ...
    assert leg["source"]["pod"] == "default/pod1-1"
    assert leg["source"]["identity"] == "spiffe://cluster.local/ns/default/sa/pod1-1"
    assert leg["destination"]["port"] == SERVE and leg["bytes_acked"] > 65536
    # ... and recorded the pod cgroup as the connection's origin: the proxy
    # knows pods by that id and refuses an unknown one ("unknown source
    # cgroup"), so the meshed transfer above proves it; the kernel's
    # per-CPU redirect counter saw it too
    assert cg.cgroup_id(pod.cgroup) != cg.cgroup_id(pod.container)


def test_a_container_process_is_policed_like_the_pod(mesh, tmp_path):
    deny = tmp_path / "deny.yaml"
    deny.write_text("""\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: anc-deny, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-2]}}]
""")
    before = mesh.counters("node1").get("policy_denied", 0)
    for node in ("node1", "node2"):
        r = policy_cli(mesh, node, "apply", "-f", str(deny))
        assert r.returncode == 0, r.stderr
    try:
        pod = mesh.cluster.pod("pod1-2")
        for where in (pod.container, pod.cgroup):
            r = wait_for(lambda w=where: (p := probe_from(mesh, "pod1-2", w, ip_of(mesh, "pod2-1"))) and
                         refused(p) and p, f"the kernel to refuse pod1-2 from {where}", timeout=20)
            assert refused(r)
        assert mesh.counters("node1")["policy_denied"] - before >= 2
        # another pod's container is not covered by that policy
        r = transfer_from(mesh, "pod1-1", mesh.cluster.pod("pod1-1").container, ip_of(mesh, "pod2-1"))
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
    finally:
        for node in ("node1", "node2"):
            policy_cli(mesh, node, "delete", "anc-deny", "-n", "default")


def test_a_child_of_an_unknown_pod_cgroup_is_refused(mesh):
    """A pod the inventory does not list, laid out by the kubelet in the
    guarded directory: its container process gets EPERM, not a direct path."""
    cluster = mesh.cluster
    guarded = mesh.status("node1")["datapath"]["guarded_cgroups"]
    before = mesh.counters("node1").get("unknown_denied", 0)
    pod = cluster.add_pod("node1", "stranger")  # the inventory is not rewritten
    try:
        assert os.path.dirname(pod.cgroup) in guarded
        assert os.path.dirname(pod.container) == pod.cgroup
        for where in (pod.container, pod.cgroup):
            r = probe_from(mesh, "stranger", where, ip_of(mesh, "pod2-1"))
            assert refused(r), (where, r)
        assert mesh.counters("node1")["unknown_denied"] - before >= 2
    finally:
        cluster.remove_pod("stranger")


def test_a_removed_pod_stops_matching_children_included(mesh):
    """Run last (it changes the inventory): unlisted, pod1-2's container is
    refused as unknown at once; listed with mesh: false, it goes direct."""
    pod = mesh.cluster.pod("pod1-2")
    dst = ip_of(mesh, "pod2-1")
    r = transfer_from(mesh, "pod1-2", pod.container, dst)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
    doc = mesh.inventory_doc()
    doc["pods"] = [p for p in doc["pods"] if p["name"] != "pod1-2"]
    mesh.write_inventory(doc)
    wait_for(lambda: "default/pod1-2" not in enrolled(mesh, "node1"), "pod1-2 unenrolled")
    for where in (pod.container, pod.cgroup):
        r = probe_from(mesh, "pod1-2", where, dst)
        assert refused(r), (where, r)
    doc["pods"].append(dict(next(p for p in mesh.inventory_doc()["pods"] if p["name"] == "pod1-2"),
                            mesh=False))
    mesh.write_inventory(doc)
    wait_for(lambda: not refused(probe_from(mesh, "pod1-2", pod.container, dst)), "pod1-2 let out unmeshed")
    for where in (pod.container, pod.cgroup):
        r = transfer_from(mesh, "pod1-2", where, dst)
        assert r["ok"] and r["server_saw_peer"] == ip_of(mesh, "pod1-2"), (where, r)
