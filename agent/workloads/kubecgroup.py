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
"""

from __future__ import annotations

import os

__all__ = ["DRIVERS", "QOS_CLASSES", "detect_driver", "pod_cgroup"]

DRIVERS = ("systemd", "cgroupfs")
#: ``status.qosClass`` values; anything else (absent on a pod the kubelet has
#: not admitted yet) is treated as BestEffort, the kubelet's default tier.
QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")


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
