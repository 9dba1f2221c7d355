"""What is pinned and attached (``meshlet bpf status``), read from bpffs with
the plain syscall, so it works while the agent is down."""

from __future__ import annotations

import os

from . import bpfsys
from .loader import CGROUP_HOOKS, TC_PROG, clsact_owner, read_l4_denied, read_stats


def _fill(fd: int, info: bpfsys.MapInfo) -> int | None:
    if info.type_name in ("array", "percpu_array"):
        return info.max_entries
    return sum(1 for _ in bpfsys.map_keys(fd, info.key_size, limit=info.max_entries + 1))


def datapath_status(pin_dir: str, cgroup_dir: str | None = None) -> dict:
    out: dict = {
        "pin_dir": pin_dir,
        "present": os.path.isdir(pin_dir),
        "maps": [],
        "programs": [],
        "links": [],
        "counters": {},
        "cgroup": cgroup_dir,
        "cgroup_attachments": {},
        "l4_policy": {},
        "tc": {"attach": "none", "clsact_filters": []},
    }
    if not out["present"]:
        return out
    for name in sorted(os.listdir(pin_dir)):
        path = os.path.join(pin_dir, name)
        if os.path.isdir(path):
            continue
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(fd)
            out["maps"].append(
                {
                    "name": name,
                    "id": info.id,
                    "type": info.type_name,
                    "key_size": info.key_size,
                    "value_size": info.value_size,
                    "max_entries": info.max_entries,
                    "entries": _fill(fd, info),
                }
            )
            if name == "ml_stats":
                out["counters"] = read_stats(fd)
            elif name == "ml_l4_policy":
                out["l4_policy"]["entries"] = out["maps"][-1]["entries"]
                out["l4_policy"]["capacity"] = info.max_entries
            elif name == "ml_l4_denied":
                out["l4_policy"]["denied_by_policy_id"] = {
                    str(k): v for k, v in sorted(read_l4_denied(fd).items())
                }
        finally:
            os.close(fd)
    if out["l4_policy"]:
        # connect-time L4 authorization: entries/capacity of ml_l4_policy and
        # connects it refused (ids: agent.policy.kernel.policy_id, 0 = no ALLOW rule matched)
        out["l4_policy"]["denied"] = out["counters"].get("policy_denied", 0)
    progs_dir = os.path.join(pin_dir, "progs")
    for name in sorted(os.listdir(progs_dir)) if os.path.isdir(progs_dir) else ():
        fd = bpfsys.obj_get(os.path.join(progs_dir, name))
        try:
            p = bpfsys.prog_info(fd)
            out["programs"].append({"name": name, "id": p.id, "type": p.type_name, "tag": p.tag})
        finally:
            os.close(fd)
    links_dir = os.path.join(pin_dir, "links")
    for name in sorted(os.listdir(links_dir)) if os.path.isdir(links_dir) else ():
        fd = bpfsys.obj_get(os.path.join(links_dir, name))
        try:
            li = bpfsys.link_info(fd)
            out["links"].append(
                {
                    "name": name,
                    "id": li.id,
                    "type": li.type_name,
                    "prog_id": li.prog_id,
                    "attach": bpfsys.ATTACH_TYPE_NAMES.get(li.attach_type, str(li.attach_type)),
                    ("cgroup_id" if li.type == 3 else "ifindex"): li.target,
                    "attached": li.target != 0,
                }
            )
        finally:
            os.close(fd)
    # Strict mode's program on the pods' veths: tcx links (above) or cls_bpf
    # filters on clsact (found by name through netlink, in this netns).
    from . import netlink

    filters = netlink.clsact_filters(clsact_owner(pin_dir))
    tc_prog = next((p["id"] for p in out["programs"] if p["name"] == TC_PROG), None)
    out["tc"]["clsact_filters"] = [
        {"ifindex": f.ifindex, "ifname": f.ifname, "prog_id": f.prog_id, "current": f.prog_id == tc_prog}
        for f in sorted(filters.values(), key=lambda f: f.ifindex)
    ]
    tcx = any(li["name"].startswith("tc-") for li in out["links"])
    out["tc"]["attach"] = "+".join(m for m, on in (("tcx", tcx), ("clsact", bool(filters))) if on) or "none"
    if cgroup_dir and os.path.isdir(cgroup_dir):
        cfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for h in CGROUP_HOOKS:
                ids = bpfsys.prog_query(cfd, h.attach_type)
                out["cgroup_attachments"][bpfsys.ATTACH_TYPE_NAMES[h.attach_type]] = ids
        finally:
            os.close(cfd)
    return out
