"""A/B of new connections cross-node (agent.sim.tools connrate: sequential
connect, 1-byte echo, close; pod1-1 -> pod2-1, one worker per node), rounds
alternated (A B, then B A), with each proxy worker's CPU microseconds per connection (utime +
stime from /proc/<pid>/stat) beside the connections per second.  Root only.

    sudo .venv/bin/python scripts/conn_ab.py --seconds 5 --rounds 4 \\
        base=/tmp/base new=.

Each ``label=ROOT`` runs its own simulated cluster with the agent code found
under ROOT (a checkout, e.g. ``git archive <commit> | tar -x -C /tmp/base``).
``--py-spy DIR`` records both workers of the first side during its first
round (collapsed stacks, needs py-spy on PATH).  Numbers from a shared machine
are noisy: compare the CPU per connection more than the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchtools import ab_parser, drive_sides  # the scripts folder is on sys.path when run as a script


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(parts[11]) / tck, int(parts[12]) / tck


def serve(root: str) -> None:
    """One cluster; a line ``run SECONDS [SPYDIR]`` on stdin runs connrate and prints JSON."""
    sys.path.insert(0, os.path.abspath(root))
    # The agents are started with ``python -m``, which looks in the working
    # directory before PYTHONPATH: run from a checkout, every side would run
    # that checkout's agent whatever its ROOT.
    os.chdir(os.path.abspath(root))
    from agent.sim import Cluster
    from agent.sim.mesh import Mesh

    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster, log_level="warning")
    try:
        mesh.start()
        src, dst = cluster.pods[0].name, cluster.pods[-1].name
        srv = cluster.pod(dst).popen(
            [sys.executable, "-m", "agent.sim.tools", "echo", "--port", "7001", "--max-seconds", "900"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] != "run":
                break
            pids = {n: mesh.proxy_pids(n)[0] for n in mesh.agents}
            spies = []
            if len(cmd) > 2:
                for n, p in pids.items():
                    spies.append(
                        subprocess.Popen(
                            [
                                "py-spy",
                                "record",
                                "--pid",
                                str(p),
                                "--format",
                                "raw",
                                "--rate",
                                "200",
                                "--duration",
                                str(int(float(cmd[1]))),
                                "--nonblocking",
                                "-o",
                                os.path.join(cmd[2], f"{n}.txt"),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            before = {n: _cpu(p) for n, p in pids.items()}
            r = cluster.pod(src).run(
                [
                    sys.executable,
                    "-m",
                    "agent.sim.tools",
                    "connrate",
                    cluster.pod(dst).ip4,
                    "7001",
                    "--seconds",
                    cmd[1],
                ],
                check=False,
                timeout=float(cmd[1]) + 30,
            )
            after = {n: _cpu(p) for n, p in pids.items()}
            for s in spies:
                s.wait(timeout=60)
            try:
                res = json.loads(r.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print(json.dumps({"error": (r.stderr or r.stdout)[-300:]}), flush=True)
                continue
            out = {"per_second": res["per_second"], "errors": res["errors"]}
            per = 1e6 / max(res["connections"], 1)
            for n in pids:
                user, system = (after[n][k] - before[n][k] for k in (0, 1))
                out[f"cpu_us_per_conn_{n}"] = round((user + system) * per, 1)
                out[f"user_us_{n}"] = round(user * per, 1)
            print(json.dumps(out), flush=True)
        srv.terminate()
        srv.wait(timeout=10)
    finally:
        mesh.down()
        cluster.down()


def main() -> None:
    ap = ab_parser(__doc__, "5")
    ap.add_argument("--py-spy", dest="spy", help="record the first side's workers into this directory")
    ap.add_argument("--serve", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("sides", nargs="*", metavar="LABEL=ROOT")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return
    sides = dict(spec.split("=", 1) for spec in a.sides)

    def command(r: int, i: int) -> str:
        spy = f" {os.path.abspath(a.spy)}" if a.spy and r == 0 and i == 0 else ""
        return f"run {a.seconds}{spy}"

    drive_sides(__file__, {label: [root] for label, root in sides.items()}, a.rounds, command,
                alternate=True)

if __name__ == "__main__":
    main()
