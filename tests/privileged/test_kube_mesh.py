"""End to end in Kubernetes mode: a 2-node simulated cluster whose agents
read their workloads from the local test API server (tests/support/kubeapi.py,
served inside each node's network namespace on its loopback), not from the
inventory file.

Pods' cgroups follow the kubelet's layout, one driver per node: node1 the
systemd driver (``kubepods.slice/kubepods-<qos>.slice/...pod<uid_>.slice``),
node2 cgroupfs (``kubepods/<qos>/pod<uid>``), under each node's
``kubeletCgroupRoot``; the agents detect the driver and find the pods by UID.
As on a real node, the pods' processes run in container cgroups below the
pod cgroups (containerd's naming on node1, CRI-O's on node2): every
meshed connection below comes from a containerised process.

Proof that a connection went through the mesh, as in test_mesh.py: the
server sees the delivering node proxy's address (the node gateway) instead
of the client pod's IP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.support.privileged import (
    ask_node_ca,
    TOOLS, gateway, ip_of, probe, require_privileged, start_servers, transfer, wait_for,
)

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.workloads import kubecgroup  # noqa: E402
from tests.support import kubeapi as k  # noqa: E402
from tests.support.kubemesh import (  # noqa: E402
    KubeMesh, driver_of, kubelet_root, place_in_kubelet_cgroup, pod_object, publish,
)

pytestmark = pytest.mark.privileged

QOS = {"pod1-1": "Burstable", "pod1-2": "BestEffort", "pod2-1": "Guaranteed", "pod2-2": "BestEffort"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("kube"))
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    api = k.FakeKubeAPI(workdir=work, bookmark_interval=1.0)
    mesh = KubeMesh(cluster)
    try:
        assert [driver_of(n) for n in cluster.nodes] == ["systemd", "cgroupfs"]  # both drivers
        uids = publish(cluster, api, qos=QOS)
        api.start()
        mesh.kubeconfig = api.kubeconfig(os.path.join(work, "kubeconfig"))
        start_servers(cluster, (("serve", 7000), ("echo", 7001)))
        mesh.start()
        yield mesh, api, uids
    finally:
        mesh.down()
        api.stop()
        cluster.down()


def enrolled(mesh, node) -> set[str]:
    return {e["pod"] for e in mesh.status(node)["enrolled"]}


def test_agents_sync_from_the_api_and_find_kubelet_cgroups(env):
    mesh, api, _ = env
    for node, pods in (("node1", {"default/pod1-1", "default/pod1-2"}),
                       ("node2", {"default/pod2-1", "default/pod2-2"})):
        st = wait_for(lambda n=node: (s := mesh.status(n))["enrolled"] and s, f"{node} enrolled")
        src = st["inventory"]["source"]
        assert src["kind"] == "kubernetes" and src["where"] == api.url
        assert src["detail"]["cgroup_driver"] == driver_of(mesh.cluster.node(node))
        assert enrolled(mesh, node) == pods
        assert st["inventory"]["pods"] == 4
    r = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--socket",
                        os.path.join(mesh.agents["node1"].run_dir, "admin.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"inventory {api.url}: 4 pods" in r.stdout
    assert "kubernetes: in sync (every watch open)" in r.stdout
    assert f"kubelet cgroups: systemd under {kubelet_root(mesh.cluster.node('node1'))}" in r.stdout
    assert "Pod: 4 objects" in r.stdout


def test_a_containerised_process_is_meshed(env):
    """The agents enroll the pod cgroup; the pod's processes run in a
    container cgroup below it (and the pause container's is beside it): the
    datapath finds the pod from the container, both drivers."""
    from agent import cgroup as cg

    mesh, _, _ = env
    mount = cg.cgroup2_mount()
    for name, dst, scope in (("pod1-1", "pod2-1", "cri-containerd-"), ("pod2-1", "pod1-1", "crio-")):
        pod = mesh.cluster.pod(name)
        assert os.path.dirname(pod.container) == pod.cgroup == os.path.dirname(pod.sandbox)
        assert os.path.basename(pod.container).startswith(scope)
        assert {e["pod"]: e["cgroup_id"] for e in mesh.status(pod.node)["enrolled"]}[
            f"default/{name}"] == cg.cgroup_id(pod.cgroup)
        # pod.run and pod.popen (every tool of these tests) run in the container cgroup
        assert pod.run(["cat", "/proc/self/cgroup"]).stdout.strip().endswith(pod.container[len(mount):])
        r = transfer(mesh, name, ip_of(mesh, dst), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, mesh.cluster.pod(dst).node), r


def test_cross_node_traffic_goes_through_the_mesh(env):
    mesh, _, _ = env
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=2 << 20, down=2 << 20)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
    r = transfer(mesh, "pod2-2", ip_of(mesh, "pod1-2", v6=True), up=1 << 20, down=1 << 20)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node1", v6=True), r


def test_relabel_create_delete_while_traffic_runs(env):
    mesh, api, uids = env
    cluster = mesh.cluster
    # A long transfer keeps running through everything below.
    bg = cluster.pod("pod1-1").popen(
        TOOLS + ["transfer", ip_of(mesh, "pod2-2"), "7000", "--up", str(64 << 20), "--down", str(64 << 20),
                 "--timeout", "120"], stdout=subprocess.PIPE, text=True)
    try:
        # opt a pod out by label, then back in
        api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": "disabled"})
        wait_for(lambda: "default/pod1-2" not in enrolled(mesh, "node1"), "pod1-2 unenrolled")
        r = transfer(mesh, "pod1-2", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == ip_of(mesh, "pod1-2"), r  # direct, not meshed
        api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": None})
        wait_for(lambda: "default/pod1-2" in enrolled(mesh, "node1"), "pod1-2 enrolled again")
        r = transfer(mesh, "pod1-2", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r

        # a new pod: the API knows it before its cgroup exists -> pending, then enrolled
        pod = cluster.add_pod("node2", "pod2-9")
        uid = str(uuid.uuid4())
        path = kubecgroup.pod_cgroup(kubelet_root(cluster.node("node2")), "cgroupfs", uid, "Burstable")
        api.apply(pod_object(pod, uid, "Burstable"))
        wait_for(lambda: any(p["pod"] == "default/pod2-9" and path in p["reason"]
                             for p in mesh.status("node2")["pending"]), "pod2-9 pending on its cgroup")
        place_in_kubelet_cgroup(cluster, pod, uid, "Burstable")
        wait_for(lambda: "default/pod2-9" in enrolled(mesh, "node2"), "pod2-9 enrolled")
        start = pod.popen(TOOLS + ["serve", "--port", "7000", "--max-seconds", "300"],
                          stdout=subprocess.PIPE, text=True)
        assert "listening" in start.stdout.readline()
        r = transfer(mesh, "pod2-9", ip_of(mesh, "pod1-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node1"), r
        r = transfer(mesh, "pod1-1", pod.ip4, up=1 << 20, down=1 << 20)  # node1 knows it as a destination
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r

        # deleted from the API: unenrolled and gone from the other node's view
        api.delete("Pod", "default", "pod2-9")
        wait_for(lambda: "default/pod2-9" not in enrolled(mesh, "node2"), "pod2-9 unenrolled")
        wait_for(lambda: mesh.status("node1")["inventory"]["pods"] == 4, "node1 forgot pod2-9")
        cluster.remove_pod("pod2-9")
    finally:
        out, _ = bg.communicate(timeout=180)
    import json

    report = json.loads(out.strip().splitlines()[-1])
    assert report["ok"] and report["server_saw_peer"] == gateway(mesh, "node2"), report


def test_a_pod_is_enrolled_only_once_every_proxy_worker_knows_it(env):
    """The datapath redirects a pod only after every worker holds a state
    that lists it (else the worker refuses its connections as coming from
    an unknown source): with node1's workers stopped, a pod opted back in
    stays pending with the reason, its connects are refused by the guard
    (not redirected to a proxy that would reset them), and it is enrolled
    once the workers run again."""
    mesh, api, _ = env
    api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": "disabled"})
    wait_for(lambda: "default/pod1-2" not in enrolled(mesh, "node1"), "pod1-2 unenrolled")
    pids = mesh.proxy_pids("node1")
    assert pids
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # a worker that cannot load the new state (a loaded node, at worst)
        api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": None})
        why = wait_for(lambda: [p["reason"] for p in mesh.status("node1")["pending"] if p["pod"] == "default/pod1-2"],
                       "pod1-2 pending on the workers")
        assert "have not loaded a state that lists it" in why[0], why
        assert "default/pod1-2" not in enrolled(mesh, "node1")
        r = probe(mesh, "pod1-2", ip_of(mesh, "pod2-1"), 7001, timeout=2.0)
        assert r["result"] == "connect_error", r  # refused as not yet enrolled, not redirected
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: "default/pod1-2" in enrolled(mesh, "node1"), "pod1-2 enrolled once the workers run")
    assert not [p for p in mesh.status("node1")["pending"] if p["pod"] == "default/pod1-2"]
    r = transfer(mesh, "pod1-2", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
    assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r


def test_namespace_switched_to_strict(env):
    mesh, api, _ = env
    # pod1-2 opts out, so it is outside the mesh: plaintext to pod2-1 works while permissive
    api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": "disabled"})
    try:
        wait_for(lambda: "default/pod1-2" not in enrolled(mesh, "node1"), "pod1-2 unenrolled")
        assert probe(mesh, "pod1-2", ip_of(mesh, "pod2-1"), 7001)["result"] == "data"
        api.patch_labels("Namespace", "", "default", {"meshlet.io/mode": "strict"})
        wait_for(lambda: all(w["mode"] == "strict" for w in mesh.admin("node2", "/v1/workloads")["workloads"]),
                 "strict on node2")
        r = probe(mesh, "pod1-2", ip_of(mesh, "pod2-1"), 7001, timeout=2.0)
        assert r["result"] == "connect_error", r
        r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
    finally:
        api.patch_labels("Namespace", "", "default", {"meshlet.io/mode": None})
        api.patch_labels("Pod", "default", "pod1-2", {"meshlet.io/dataplane-mode": None})
        wait_for(lambda: all(w["mode"] == "permissive"
                             for w in mesh.admin("node2", "/v1/workloads")["workloads"]), "permissive again")
        wait_for(lambda: "default/pod1-2" in enrolled(mesh, "node1"), "pod1-2 enrolled again")


def test_node_signs_only_pods_the_api_places_on_it(env):
    mesh, api, _ = env

    td = mesh.trust_domain
    other = f"spiffe://{td}/ns/default/sa/{mesh.cluster.pod('pod2-1').service_account}"
    own = f"spiffe://{td}/ns/default/sa/{mesh.cluster.pod('pod1-1').service_account}"
    resp = ask_node_ca(mesh, "node1", other)
    assert resp["ok"] is False and resp["reason"] == "not_on_node", resp
    assert ask_node_ca(mesh, "node1", own)["ok"] is True
    # The API places a pod of node2's service account on node1: node1 may now
    # sign that identity; once the pod is deleted, no longer.
    extra = k.pod("moved", "default", "node1", ["10.244.1.200"], sa=mesh.cluster.pod("pod2-1").service_account)
    api.apply(extra)
    try:
        wait_for(lambda: ask_node_ca(mesh, "node1", other)["ok"] is True,
                 "node1 signs for the pod the API put on it")
    finally:
        api.delete("Pod", "default", "moved")
    wait_for(lambda: ask_node_ca(mesh, "node1", other).get("reason") == "not_on_node",
             "refused again after the deletion")


def test_api_outage_keeps_the_mesh_running_and_status_says_stale(env):
    mesh, api, _ = env
    api.stop()
    try:
        wait_for(lambda: (src := mesh.status("node1")["inventory"]["source"])["detail"]["in_sync"] is False
                 and src["error"], "node1 to notice the outage and say why")
        assert enrolled(mesh, "node1") == {"default/pod1-1", "default/pod1-2"}  # fail static
        r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
        out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--socket",
                              os.path.join(mesh.agents["node1"].run_dir, "admin.sock")],
                             capture_output=True, text=True, timeout=30).stdout
        assert "kubernetes: NOT IN SYNC, last good state kept; stale " in out, out
    finally:
        api.start()
    for node in ("node1", "node2"):
        wait_for(lambda n=node: mesh.status(n)["inventory"]["source"]["detail"]["in_sync"], f"{node} in sync again")
