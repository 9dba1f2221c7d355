"""Shared guards for the privileged tier (root + real kernel features)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest


def missing_privileges() -> list[str]:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            reasons.append(f"needs `{tool}` (apt-get install iproute2 util-linux)")
    if not os.path.ismount("/sys/fs/bpf"):
        reasons.append("needs bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
    try:
        from agent.cgroup import cgroup2_mount
        cgroup2_mount()
    except Exception as e:  # noqa: BLE001
        reasons.append(f"needs a cgroup v2 mount ({e})")
    return reasons


def require_privileged() -> None:
    """Skip the calling module (with the reason) unless root + kernel bits."""
    reasons = missing_privileges()
    if reasons:
        pytest.skip("privileged tier: " + "; ".join(reasons), allow_module_level=True)


# --- shared by the end-to-end files ------------------------------------------------

TOOLS = [sys.executable, "-m", "agent.sim.tools"]


def wait_for(pred, what: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``pred`` until it returns something truthy (returned) or fail
    after ``timeout`` seconds — a bound, never a timing claim."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def start_servers(cluster, servers=(("serve", 7000), ("echo", 7001)), max_seconds: int = 900):
    """Start the pod traffic tools in every pod and wait until they listen."""
    for pod in cluster.pods:
        for kind, port in servers:
            p = pod.popen(TOOLS + [kind, "--port", str(port), "--max-seconds", str(max_seconds)],
                          stdout=subprocess.PIPE, text=True)
            assert "listening" in p.stdout.readline(), f"{kind} on {pod.name}:{port}"
