"""cgroup v2 helpers shared by the agent, the simulator and the CLI.

Nodes differ: pure v2 mounts the unified hierarchy at /sys/fs/cgroup, hybrid
layouts (this project's dev machines) at /sys/fs/cgroup/unified.  Detect it
from /proc/self/mountinfo instead of hard-coding either.
"""

from __future__ import annotations

import os


class CgroupError(RuntimeError):
    pass


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Return the mount point of the cgroup v2 (unified) hierarchy."""
    candidates = []
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype = right.split(" ", 1)[0]
                if fstype == "cgroup2":
                    candidates.append(left.split()[4].replace("\\040", " "))
    except OSError as e:
        raise CgroupError(f"cannot read {mountinfo}: {e}") from e
    if not candidates:
        raise CgroupError(
            "no cgroup v2 hierarchy is mounted; mount one with "
            "'mount -t cgroup2 none /sys/fs/cgroup/unified' (hybrid) or boot with "
            "systemd.unified_cgroup_hierarchy=1"
        )
    # Prefer the conventional locations when several are mounted.
    for pref in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if pref in candidates:
            return pref
    return candidates[0]


def cgroup_id(path: str) -> int:
    """The kernel's cgroup id (what bpf_get_current_cgroup_id returns) is the
    inode number of the cgroup directory on cgroup2fs."""
    return os.stat(path).st_ino


def resolve(path: str, root: str | None = None) -> str:
    """Absolute cgroup directory for ``path``; relative paths are taken from
    the cgroup v2 mount point."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(root or cgroup2_mount(), path))


def move_pid(cgroup_dir: str, pid: int) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def own_cgroup(pid: int | str = "self", root: str | None = None) -> str | None:
    """Absolute cgroup v2 directory of process ``pid`` (None when unknown)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hid, _, rest = line.rstrip("\n").partition(":")
                ctrl, _, rel = rest.partition(":")
                if hid == "0" and ctrl == "":
                    return resolve(rel.lstrip("/") or ".", root)
    except OSError:
        return None
    return None


def is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both absolute, normalized)."""
    path, top = os.path.normpath(path), os.path.normpath(top)
    return path == top or path.startswith(top.rstrip("/") + "/")
