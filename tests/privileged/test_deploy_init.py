"""The DaemonSet's init container mounts bpffs on the host when it is not
mounted, and leaves a mounted one alone; its script runs here as written in
deploy/daemonset.yaml, in a private mount namespace (the host's mounts are
never touched)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support.kubeschema import DEPLOY
from tests.support.privileged import require_privileged

require_privileged()

pytestmark = pytest.mark.privileged


def init_script() -> list[str]:
    for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()):
        if d and d["kind"] == "DaemonSet":
            (init,) = d["spec"]["template"]["spec"]["initContainers"]
            return init["command"]
    raise AssertionError("no DaemonSet")


def in_private_mount_ns(before: str) -> str:
    """Run ``before``, then the init container's command, then list bpffs mounts."""
    cmd = init_script()
    assert cmd[:2] == ["/bin/sh", "-ec"]
    script = (
        f"{before}\n/bin/sh -ec {_q(cmd[2])}\n"
        "awk '$5 == \"/sys/fs/bpf\" && / - bpf / {print \"MOUNTED\"}' /proc/self/mountinfo"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def test_mounts_bpffs_when_missing():
    out = in_private_mount_ns("while awk '$5 == \"/sys/fs/bpf\"' /proc/self/mountinfo | grep -q .; "
                              "do umount /sys/fs/bpf; done")
    assert "mounted bpffs at /sys/fs/bpf" in out
    assert out.count("MOUNTED") == 1


def test_leaves_a_mounted_bpffs_alone():
    out = in_private_mount_ns("true")
    assert "bpffs already mounted" in out
    assert out.count("MOUNTED") == 1
