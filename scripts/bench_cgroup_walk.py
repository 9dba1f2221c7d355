#!/usr/bin/env python3
"""Micro-benchmark: what finding a task's pod by cgroup ancestry costs on connect().

ml_connect4 (bpf/sock.c) looks the task's own cgroup up first, then walks
its ancestors (ML_MAX_CGROUP_DEPTH helper calls, a hash lookup in
ml_enrolled and one in ml_cgroup_guard per existing level) until one of the
two maps holds it.  This measures the program's own run time, with the
kernel's run-time stats (BPF_ENABLE_STATS, on only while this runs), for
connect() calls from one pod, by where the calling process sits:

    pod cgroup          the task is in the enrolled cgroup itself (exact hit)
    container           one level below it: a real node's layout
    container + 10      ten levels further down (a container that nests cgroups)
    node system         not in any pod, not under a guarded directory: the
                        walk goes all the way up and finds nothing

plus the wall time per connect() (a Python loop; no meshlet program runs for
"outside", a cgroup beside the node cgroup).  Every connect goes to a closed
port on the pod's loopback: the program runs in full (the walk, then the
loopback bypass) and nothing else of the mesh is involved.  Rounds
alternate the placements; medians are printed.  The machine's load average
is printed with the numbers: they are only comparable within one run.

    sudo .venv/bin/python scripts/bench_cgroup_walk.py [--connects 20000] [--rounds 3] [--bpf-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.datapath import bpfsys
from agent.datapath.status import datapath_status
from agent.sim import Cluster, exec_in
from agent.sim.mesh import Mesh

LOOP = """
import socket, sys, time
n = int(sys.argv[1])
t0 = time.perf_counter_ns()
for _ in range(n):
    s = socket.socket()
    s.connect_ex(("127.0.0.1", 9))
    s.close()
print((time.perf_counter_ns() - t0) / n)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=20000, help="connect() calls per placement and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bpf-dir", help="compile this bpf/ directory instead (e.g. an older version's)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, cgroups, eBPF)")
        return 2
    if a.bpf_dir:
        os.environ["MESHLET_BPF_DIR"] = os.path.abspath(a.bpf_dir)
    cluster = Cluster(nodes=1, pods_per_node=1, ipv6=False, kubelet_layout="systemd")
    mesh = None
    stats_fd = None
    try:
        cluster.up()
        mesh = Mesh(cluster, log_level="warning")
        mesh.start()
        pod = cluster.pods[0]
        node = cluster.nodes[0]
        assert pod.container is not None
        deep = pod.container
        for i in range(10):
            deep = os.path.join(deep, f"n{i}")
        os.makedirs(deep)
        outside = os.path.join(cluster.cgroup, "outside")
        os.makedirs(outside)
        places = {
            "pod cgroup": pod.cgroup,
            "container": pod.container,
            "container + 10": deep,
            "node system": node.system_cgroup,
            "outside (no program)": outside,
        }
        prog_id = next(p["id"] for p in datapath_status(mesh.agents[node.name].pin_dir)["programs"]
                       if p["name"] == "ml_connect4")
        prog_fd = bpfsys.prog_fd_by_id(prog_id)
        stats_fd = bpfsys.enable_run_stats()
        load_before = os.getloadavg()
        runs: dict[str, dict[str, list[float]]] = {k: {"prog_ns": [], "connect_us": []} for k in places}
        for _ in range(a.rounds):
            for name, cg in places.items():
                ns0, n0 = bpfsys.prog_run_stats(prog_fd)
                r = exec_in(pod.netns, cg, [sys.executable, "-c", LOOP, str(a.connects)], timeout=600)
                ns1, n1 = bpfsys.prog_run_stats(prog_fd)
                runs[name]["connect_us"].append(float(r.stdout.strip()) / 1000)
                if n1 > n0:
                    runs[name]["prog_ns"].append((ns1 - ns0) / (n1 - n0))
        load_after = os.getloadavg()
        os.close(prog_fd)
    finally:
        if stats_fd is not None:
            os.close(stats_fd)
        if mesh is not None:
            mesh.down()
        cluster.down()
    print(f"ml_connect4 by where the connecting task sits; {a.connects} connects x {a.rounds} rounds, "
          f"medians; {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after" + (f"; bpf from {a.bpf_dir}" if a.bpf_dir else ""))
    hdr = f"{'placement':<24}{'program ns/run':>16}{'connect() us':>14}"
    print(hdr)
    print("-" * len(hdr))
    out = {}
    for name, r in runs.items():
        p = statistics.median(r["prog_ns"]) if r["prog_ns"] else None
        c = statistics.median(r["connect_us"])
        out[name] = {"prog_ns": p, "connect_us": c, "all": r}
        print(f"{name:<24}{(f'{p:.0f}' if p is not None else '-'):>16}{c:>14.2f}")
    print(json.dumps({"load": [load_before, load_after], "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
