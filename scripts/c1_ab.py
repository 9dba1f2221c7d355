"""A/B of the added latency at one connection, cross-node (wrk -c1 --latency,
or -cN with ``--connections``
against nginx in pod2-1; through the mesh from pod1-1, direct from pod1-2
outside it), rounds alternated (A B, then B A), with each proxy worker's CPU
microseconds per request beside the p50s.  Root only.

    sudo .venv/bin/python scripts/c1_ab.py --seconds 3 --rounds 4 \\
        base=/tmp/base new=.

Each ``label=ROOT`` runs its own simulated cluster (2 nodes, one worker per
node) with the agent code found under ROOT (a checkout, e.g. ``git archive
<commit> | tar -x -C /tmp/base``).  ``added_p50_ms`` is the mesh p50 minus
the direct p50 of the same round and cluster: the bench's "added p50 ms, c1"
row.  ``--l7`` turns ``proxy.l7`` on (the destination proxy parses every
request, as in the bench's "meshlet L7" column); with ``--connections 32``
this is the A/B of that column's CPU per request.  Numbers from a shared
machine are noisy: compare medians of rounds, and the CPU per request more
than the rate.

``--workers 2`` runs two proxy workers per node and reports each worker's
CPU per request (``cpu_us_per_req_node2_w1``...) and the tunnel connections
each worker accepted (``tunnels_in_node2``): how evenly a node's tunnels
spread over its workers.  ``--fresh`` starts the mesh anew before
every round (the cluster and nginx stay), so each round dials new tunnels
and the spread is drawn again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchtools import ab_parser, drive_sides, run_wrk, write_nginx_conf  # scripts/ is on sys.path


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def serve(root: str, connections: int = 1, l7: bool = False, workers: int = 1, fresh: bool = False) -> None:
    """One cluster; a line ``run SECONDS`` on stdin runs one direct and one
    mesh wrk -c``connections`` and prints JSON."""
    sys.path.insert(0, os.path.abspath(root))
    os.chdir(os.path.abspath(root))  # python -m looks in the working directory first
    from agent.sim import Cluster
    from agent.sim.mesh import Mesh

    cluster = Cluster(nodes=2, pods_per_node=2).up()

    def new_mesh() -> Mesh:
        return Mesh(
            cluster, unmeshed={"pod1-2"}, log_level="warning", workers=workers, **({"l7": True} if l7 else {})
        )

    mesh = new_mesh()
    workdir = tempfile.mkdtemp(prefix="c1ab-")
    try:
        mesh.start()
        conf = write_nginx_conf(workdir, ["8080 reuseport"], "hello from nginx in a pod\n")
        cluster.pod("pod2-1").popen(["nginx", "-c", conf, "-p", workdir],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        url = f"http://{cluster.pod('pod2-1').ip4}:8080/"
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] != "run":
                break
            seconds = int(float(cmd[1]))
            if fresh:
                mesh.down()
                mesh = new_mesh()
                mesh.start()

            direct = run_wrk(cluster, "pod1-2", url, seconds, connections)
            pids = {(n, w): p for n in mesh.agents for w, p in enumerate(mesh.proxy_pids(n))}
            before = {k: _cpu(p) for k, p in pids.items()}
            meshed = run_wrk(cluster, "pod1-1", url, seconds, connections)
            after = {k: _cpu(p) for k, p in pids.items()}
            if direct["p50_ms"] is None or meshed["p50_ms"] is None or not meshed["requests"]:
                print(json.dumps({"error": "wrk failed", "direct": direct, "mesh": meshed}), flush=True)
                continue
            out = {
                "added_p50_ms": round(meshed["p50_ms"] - direct["p50_ms"], 4),
                "mesh_p50_ms": meshed["p50_ms"],
                "direct_p50_ms": direct["p50_ms"],
                "mesh_rps": meshed["rps"],
                "direct_rps": direct["rps"],
                "mesh_p99_ms": meshed["p99_ms"],
            }
            if workers > 1:  # how the tunnels a node accepted landed on its workers
                for n in mesh.agents:
                    out[f"tunnels_in_{n}"] = [
                        (w["stats"] or {}).get("counters", {}).get("tunnel_connections_in", 0)
                        for w in mesh.status(n)["proxy"]
                    ]
            for (n, w) in pids:
                key = f"cpu_us_per_req_{n}" + (f"_w{w}" if workers > 1 else "")
                out[key] = round((after[n, w] - before[n, w]) * 1e6 / meshed["requests"], 1)
            print(json.dumps(out), flush=True)
    finally:
        subprocess.run(["pkill", "-f", f"nginx -c {workdir}"], check=False)
        mesh.down()
        cluster.down()


def main() -> None:
    ap = ab_parser(__doc__, "3")
    ap.add_argument("--connections", type=int, default=1, help="wrk -c (default 1: the added-latency row)")
    ap.add_argument("--l7", action="store_true", help="proxy.l7 on: the destination parses every request")
    ap.add_argument("--workers", type=int, default=1, help="proxy workers per node (default 1)")
    ap.add_argument("--fresh", action="store_true", help="a new mesh (new tunnels) before every round")
    ap.add_argument("--serve", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("sides", nargs="*", metavar="LABEL=ROOT")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.connections, a.l7, a.workers, a.fresh)
        return
    sides = dict(spec.split("=", 1) for spec in a.sides)
    extra = [*(["--l7"] if a.l7 else []), "--workers", str(a.workers), *(["--fresh"] if a.fresh else [])]
    args = {label: [root, "--connections", str(a.connections), *extra] for label, root in sides.items()}
    drive_sides(__file__, args, a.rounds, lambda r, i: f"run {a.seconds}", alternate=True)


if __name__ == "__main__":
    main()
