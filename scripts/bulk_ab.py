"""A/B of cross-node bulk (iperf3 pod1-1 -> pod2-1, one worker per node),
rounds alternated, with each proxy worker's CPU seconds and minor page
faults per GB (from /proc/<pid>/stat) beside the Gbit/s.  Root only.

    sudo .venv/bin/python scripts/bulk_ab.py --seconds 3 --rounds 4 \\
        base=/tmp/base:mux new=.:mux legacy=.:legacy plain=.:plain

Each ``label=ROOT:MODE`` runs its own simulated cluster with the agent code
found under ROOT (a checkout, e.g. ``git archive <commit> | tar -x -C
/tmp/base``); MODE is mux (meshlet-mux/1), legacy (proxy.tunnelMux: false)
or plain (tunnel_security: insecure-plaintext).  Numbers from a shared
machine are noisy: compare the CPU per GB more than the Gbit/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchtools import ab_parser, drive_sides  # the scripts folder is on sys.path when run as a script

MODES = {
    "mux": {"tunnel_mux": True},
    "legacy": {"tunnel_mux": False},
    "plain": {"tunnel_security": "insecure-plaintext"},
}


def _stat(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK"), int(parts[7])


def serve(root: str, mode: str) -> None:
    """One cluster; a line ``run SECONDS`` on stdin runs iperf3 and prints JSON."""
    sys.path.insert(0, os.path.abspath(root))
    # The agents are started with ``python -m``, which looks in the working
    # directory before PYTHONPATH: run from a checkout, every side would run
    # that checkout's agent whatever its ROOT.
    os.chdir(os.path.abspath(root))
    from agent.sim import Cluster
    from agent.sim.mesh import Mesh

    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster, log_level="warning", **MODES[mode])
    try:
        mesh.start()
        src, dst = cluster.pods[0].name, cluster.pods[-1].name
        srv = cluster.pod(dst).popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] != "run":
                break
            pids = {n: mesh.proxy_pids(n)[0] for n in mesh.agents}
            before = {n: _stat(p) for n, p in pids.items()}
            r = cluster.pod(src).run(
                ["iperf3", "-c", cluster.pod(dst).ip4, "-p", "5201", "-t", cmd[1], "-J"],
                check=False,
                timeout=float(cmd[1]) + 30,
            )
            after = {n: _stat(p) for n, p in pids.items()}
            try:
                end = json.loads(r.stdout)["end"]["sum_received"]
            except (ValueError, KeyError):
                print(json.dumps({"error": (r.stderr or r.stdout)[-300:]}), flush=True)
                continue
            gb = end["bytes"] / 1e9
            out = {"gbps": round(end["bits_per_second"] / 1e9, 3)}
            for n in pids:
                out[f"cpu_s_per_GB_{n}"] = round((after[n][0] - before[n][0]) / gb, 3)
                out[f"kfaults_per_GB_{n}"] = round((after[n][1] - before[n][1]) / gb / 1000, 1)
            print(json.dumps(out), flush=True)
        srv.terminate()
    finally:
        mesh.down()
        cluster.down()


def main() -> None:
    ap = ab_parser(__doc__, "3")
    ap.add_argument("--serve", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("sides", nargs="*", metavar="LABEL=ROOT:MODE")
    a = ap.parse_args()
    if a.serve:
        serve(*a.serve)
        return
    sides = {}
    for spec in a.sides:
        label, rest = spec.split("=", 1)
        root, mode = rest.rsplit(":", 1)
        if mode not in MODES:
            sys.exit(f"{spec}: mode must be one of {', '.join(MODES)}")
        sides[label] = [root, mode]
    drive_sides(__file__, sides, a.rounds, lambda r, i: f"run {a.seconds}")

if __name__ == "__main__":
    main()
