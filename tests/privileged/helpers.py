"""Shared guards for the privileged tier (root + real kernel features)."""

from __future__ import annotations

import os
import shutil

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
