"""A simulated cluster in Kubernetes mode: the agents read their workloads
from the local test API server (tests/support/kubeapi.py) instead of the
inventory file.  Used by tests/privileged/test_kube_mesh.py and by
``scripts/demo.py --kubernetes``.

:func:`publish` serves the API on the loopback of every node's network
namespace (where the agents run), publishes the cluster's nodes,
namespaces (enrolled with ``meshlet.io/dataplane-mode: enabled``), pods and
services (with an EndpointSlice each), and moves every pod into the cgroup
the kubelet would have made for it: the systemd driver's layout on odd
nodes, cgroupfs on even ones, under the node's ``kubelet`` directory (its
``kubeletCgroupRoot``).  As on a real node, the pod's processes then run in
a container cgroup *below* the pod cgroup (containerd's naming on odd
nodes, CRI-O's on even ones, next to an empty pause-container cgroup):
the agents enroll the pod cgroup and the datapath must find it from the
container's.  Everything lives under the cluster's cgroup tree, so the
cluster's teardown removes it.
"""

from __future__ import annotations

import ipaddress
import os
import uuid

from agent.sim.mesh import Mesh
from agent.workloads import kubecgroup
from tests.support import kubeapi as k

ENABLED = {"meshlet.io/dataplane-mode": "enabled"}


def driver_of(node) -> str:
    """The kubelet cgroup driver a simulated node uses."""
    return "systemd" if node.index % 2 else "cgroupfs"


def runtime_of(node) -> str:
    """The container runtime a simulated node uses (cgroup naming of containers)."""
    return "containerd" if node.index % 2 else "crio"


def kubelet_root(node) -> str:
    return os.path.join(node.cgroup, "kubelet")


class KubeMesh(Mesh):
    """Agents configured with ``workloads.source: kubernetes``."""

    kubeconfig: str = ""

    def config_doc(self, node):
        doc = super().config_doc(node)
        del doc["inventory"]
        doc["workloads"] = {
            "source": "kubernetes",
            "kubeconfig": self.kubeconfig,
            "kubeletCgroupRoot": kubelet_root(node),
            "syncTimeout": 60,
            "watchTimeout": 30,
        }
        return doc


def place_in_kubelet_cgroup(cluster, pod, uid: str, qos: str) -> str:
    """Point the simulated pod at the cgroup the kubelet would have made for it
    and run its processes from now on in a container cgroup below it
    (created here, as the kubelet and the runtime do); returns the pod cgroup."""
    node = cluster.node(pod.node)
    pod.uid = uid
    path = pod.use_kubelet_layout(kubelet_root(node), driver_of(node), qos, runtime_of(node))
    assert path == kubecgroup.pod_cgroup(kubelet_root(node), driver_of(node), uid, qos)
    return path


def pod_object(pod, uid: str, qos: str = "BestEffort", labels: dict | None = None) -> dict:
    return k.pod(pod.name, pod.namespace, pod.node, pod.ips, labels={**pod.labels, **(labels or {})},
                 sa=pod.service_account, qos=qos, uid=uid)


def service_objects(svc: dict, index: int) -> list[dict]:
    """A Mesh-style service (agent.sim.mesh.service) as a Service and its EndpointSlice."""
    vips = list(svc["vip"])
    fams = ["IPv4" if ipaddress.ip_address(v).version == 4 else "IPv6" for v in vips]
    ports = [{k2: v for k2, v in p.items() if k2 in ("name", "port", "targetPort", "appProtocol")}
             for p in svc["ports"]]
    for i, p in enumerate(ports):
        p.setdefault("name", f"p{i}")
    spec = {"ipFamilies": fams, "ipFamilyPolicy": "PreferDualStack" if len(vips) > 1 else "SingleStack"}
    return [
        k.service(svc["name"], svc["namespace"], vips, dict(svc["selector"]), ports, **spec),
        k.endpointslice(f"{svc['name']}-s{index}", svc["namespace"], svc["name"],
                        [{"name": p["name"], "port": p.get("targetPort", p["port"])} for p in ports]),
    ]


def publish(cluster, api: k.FakeKubeAPI, *, services: list[dict] = (), qos: dict | None = None) -> dict[str, str]:
    """See the module docstring; returns pod name -> UID.  Call before the
    pods' processes start (they start in the pod's cgroup)."""
    for node in cluster.nodes:
        api.serve_in(node.netns)
        api.apply(k.node(node.name, node.address, node.address6))
    for ns in sorted({p.namespace for p in cluster.pods}):
        api.apply(k.namespace(ns, ENABLED))
    uids = {}
    for pod in cluster.pods:
        uids[pod.name] = str(uuid.uuid4())
        q = (qos or {}).get(pod.name, "BestEffort")
        place_in_kubelet_cgroup(cluster, pod, uids[pod.name], q)
        api.apply(pod_object(pod, uids[pod.name], q))
    for i, svc in enumerate(services):
        for obj in service_objects(svc, i):
            api.apply(obj)
    return uids
