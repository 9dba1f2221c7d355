"""Where container runtimes put a pod's containers (agent/workloads/kubecgroup.py
container_cgroup): the simulated cluster lays pods out with it, so the
names must be the runtimes' own."""

from __future__ import annotations

import pytest

from agent.workloads import kubecgroup

CID = "0123456789abcdef" * 4
POD = "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda_b.slice"


@pytest.mark.parametrize(
    "driver,runtime,name",
    [
        ("systemd", "containerd", f"cri-containerd-{CID}.scope"),
        ("systemd", "crio", f"crio-{CID}.scope"),
        ("systemd", "docker", f"docker-{CID}.scope"),
        ("cgroupfs", "containerd", CID),
        ("cgroupfs", "crio", f"crio-{CID}"),
        ("cgroupfs", "docker", CID),
    ],
)
def test_container_cgroup_names(driver, runtime, name):
    assert kubecgroup.container_cgroup(POD, driver, runtime, CID) == f"{POD}/{name}"


@pytest.mark.parametrize(
    "args,msg",
    [
        (("systemd", "rkt", CID), "unknown container runtime 'rkt'"),
        (("x", "containerd", CID), "unknown cgroup driver 'x'"),
        (("systemd", "containerd", CID[:-1]), "not 64 lowercase hex digits"),
        (("systemd", "containerd", CID.upper()), "not 64 lowercase hex digits"),
        (("systemd", "containerd", "../" + CID[3:]), "not 64 lowercase hex digits"),
    ],
)
def test_container_cgroup_refuses_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        kubecgroup.container_cgroup(POD, *args)


def test_runtimes_are_the_known_ones():
    assert kubecgroup.RUNTIMES == ("containerd", "crio", "docker")
