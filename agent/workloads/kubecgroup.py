"""A pod's cgroup v2 directory from its UID and QoS class, the way the
kubelet lays it out, for both cgroup drivers; the driver is detected from
what exists under the kubelet's cgroup root, never configured by hand.

systemd driver (slices; dashes in the UID become underscores, because a
dash in a slice name means nesting)::

    kubepods.slice/kubepods-pod<uid_>.slice                                    Guaranteed
    kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice  Burstable
    kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice BestEffort

cgroupfs driver::

    kubepods/pod<uid>                   Guaranteed
    kubepods/burstable/pod<uid>         Burstable
    kubepods/besteffort/pod<uid>        BestEffort

The root is the kubelet's ``--cgroup-root`` (``/`` by default, i.e. the
cgroup2 mount point).  :func:`pod_cgroup` is pure; :func:`detect_driver`
only looks at two directory names.

The pod cgroup is what meshlet enrolls, but no process runs in it: the
container runtime makes a child cgroup per container (the pod's pause
container too) and runs the container's processes there;
:func:`container_cgroup` spells those children the way the runtimes do
(``cri-containerd-<id>.scope``, ``crio-<id>.scope``, ``docker-<id>.scope``
under systemd; ``<id>``, or ``crio-<id>`` for CRI-O, under cgroupfs).  The
datapath matches a task to its pod by walking up from the task's cgroup to
the nearest enrolled one (bpf/sock.c ``ml_task_pod``), so the agent never
needs these names; the simulated cluster and the tests use them to lay
pods out as a real node does.
"""

from __future__ import annotations

import os

__all__ = ["DRIVERS", "QOS_CLASSES", "RUNTIMES", "container_cgroup", "detect_driver", "pod_cgroup"]

DRIVERS = ("systemd", "cgroupfs")
#: ``status.qosClass`` values; anything else (absent on a pod the kubelet has
#: not admitted yet) is treated as BestEffort, the kubelet's default tier.
QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")
#: container runtimes whose cgroup naming :func:`container_cgroup` knows
RUNTIMES = ("containerd", "crio", "docker")
_SCOPE_PREFIX = {"containerd": "cri-containerd", "crio": "crio", "docker": "docker"}


def pod_cgroup(root: str, driver: str, uid: str, qos: str | None) -> str:
    """The pod's cgroup directory under ``root`` for ``driver``."""
    tier = {"Guaranteed": "", "Burstable": "burstable", "BestEffort": "besteffort"}.get(
        qos or "", "besteffort"
    )
    if driver == "systemd":
        u = uid.replace("-", "_")
        if not tier:
            return os.path.join(root, "kubepods.slice", f"kubepods-pod{u}.slice")
        return os.path.join(root, "kubepods.slice", f"kubepods-{tier}.slice", f"kubepods-{tier}-pod{u}.slice")
    if driver == "cgroupfs":
        if not tier:
            return os.path.join(root, "kubepods", f"pod{uid}")
        return os.path.join(root, "kubepods", tier, f"pod{uid}")
    raise ValueError(f"unknown cgroup driver {driver!r}; expected one of {', '.join(DRIVERS)}")


def detect_driver(root: str) -> str | None:
    """``systemd`` when ``root/kubepods.slice`` exists, ``cgroupfs`` when
    ``root/kubepods`` does, None when neither (the kubelet has not started,
    or ``root`` is not its cgroup root).  Both at once is a node that
    switched drivers without a reboot; systemd wins, as it is the kubelet's
    default since 1.22."""
    if os.path.isdir(os.path.join(root, "kubepods.slice")):
        return "systemd"
    if os.path.isdir(os.path.join(root, "kubepods")):
        return "cgroupfs"
    return None


def container_cgroup(pod_dir: str, driver: str, runtime: str, container_id: str) -> str:
    """The cgroup directory ``runtime`` makes for container ``container_id``
    (64 hex digits) inside the pod cgroup ``pod_dir`` under ``driver``."""
    if runtime not in _SCOPE_PREFIX:
        raise ValueError(f"unknown container runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if len(container_id) != 64 or any(c not in "0123456789abcdef" for c in container_id):
        raise ValueError(f"container id {container_id!r} is not 64 lowercase hex digits")
    if driver == "systemd":
        return os.path.join(pod_dir, f"{_SCOPE_PREFIX[runtime]}-{container_id}.scope")
    if driver == "cgroupfs":
        return os.path.join(pod_dir, f"crio-{container_id}" if runtime == "crio" else container_id)
    raise ValueError(f"unknown cgroup driver {driver!r}; expected one of {', '.join(DRIVERS)}")
