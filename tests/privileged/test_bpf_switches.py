"""bpf.flowTracking and bpf.kernelPolicy in the agent config: off, the flow
program is not attached (and comes back when switched on: the agent reloads
the datapath), and no kernel policy entry is written."""

from __future__ import annotations

import os

import pytest

from tests.support.privileged import require_privileged

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged


def links(mesh: Mesh) -> set[str]:
    return set(os.listdir(os.path.join(mesh.agents["node1"].pin_dir, "links")))


def test_flow_tracking_and_kernel_policy_follow_the_config():
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    mesh = Mesh(cluster, flow_tracking=False, kernel_policy=False)
    try:
        mesh.start()
        off = links(mesh)
        assert "cgroup-ml_connect4" in off and "cgroup-ml_flow_ops" not in off, off
        kernel = (mesh.status("node1").get("policy") or {}).get("kernel") or {}
        assert kernel.get("enabled") is False, kernel
        mesh.reconfigure(flow_tracking=True, kernel_policy=True)
        assert "cgroup-ml_flow_ops" in links(mesh)
        kernel = (mesh.status("node1").get("policy") or {}).get("kernel") or {}
        assert kernel.get("enabled") is True, kernel
    finally:
        mesh.down()
        cluster.down()
