#!/usr/bin/env python3
"""The node's memory footprint: the agent and each proxy worker, RSS and PSS
(from /proc/<pid>/smaps_rollup), with a given number of enrolled pods.

For each pod count it brings up a one-node simulated cluster (agent.sim:
netns + veth + cgroups, torn down afterwards), starts meshlet on it with
``--workers`` proxy workers, waits until every worker answers, then reads the
agent's and the workers' memory, and whether the agent maps bcc's LLVM
(libbcc, libLLVM, libclang: it must not, the loader step carries them).

    sudo .venv/bin/python scripts/bench_footprint.py --pods 2,100 --workers 2 --out footprint.json
    sudo .venv/bin/python scripts/bench_footprint.py --pods 2,100 --workers 1 --nodes 2 --traffic

RSS counts every shared page in full in each process; PSS divides shared
pages between the processes that map them; *distinct* is the union of the
page frames the node's processes map (``bench_envoy.tree_distinct_mb``,
from pagemap): every page once, what the node would cost on its own, the
measure the README judges the footprint target on (against one Envoy
sidecar's).  ``--traffic`` first pushes what scripts/bench.py pushes through
the mesh before it reads its memory rows, from pod1-1: to pod1-2 on the
same node (spliced), HTTP (wrk -c32) and one bulk stream (iperf3); to
pod<last>-1, the first pod of the last node (cross-node, the mux tunnel),
the same plus sequential new connections (``agent.sim.tools connrate``,
each one a closed flow the agent keeps in its history) and HTTP on one
connection (wrk -c1).  As in the bench, pod1-2 and pod<last>-1 back a
service "web" (port 80 -> 8080, appProtocol http).  Then it waits
``--settle`` seconds: memory held at idle *after* traffic, as the bench's
rows see it (the bench waits 5 s).  Each worker's glibc heap split (in use /
free, from its stats socket) tells Python objects from free heap kept by
the allocator.
Memory, not time: nothing here is timed.  Run as root (the simulated
cluster needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.privileged import llvm_mappings  # the same check the tests make

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, for bench_envoy
from bench_envoy import tree_distinct_mb, tree_pss_mb


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """{'rss': KiB, 'pss': KiB} of ``pid`` from /proc/<pid>/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    return out


def top_mappings(pid: int, n: int = 12) -> list[tuple[str, int]]:
    """The ``n`` biggest contributors to ``pid``'s RSS, KiB: each file mapped
    (its segments summed) and ``[anon]`` for anonymous memory (the heap,
    Python's arenas, thread stacks)."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                parts = line.split(None, 5)
                name = parts[5].strip() if len(parts) == 6 else "[anon]"
                if name.startswith("[") and name not in ("[heap]", "[stack]"):
                    name = "[anon]" if name.startswith("[anon") else name
            elif first == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:n]


def agent_pid(root: int) -> int:
    """The agent process: ``root`` or the first descendant running the agent
    (``agent.daemon``, which ``meshlet run`` execs; ``agent.cli run`` under
    MESHLET_AGENT_SITE=1); the node's exec wrapper may sit above it."""
    todo = [root]
    while todo:
        p = todo.pop(0)
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"agent.daemon" in argv or (b"agent.cli" in argv and b"run" in argv):
                return p
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    raise RuntimeError(f"no agent process under pid {root}")


def worker_memory(run_dir: str, worker: int) -> dict:
    """A worker's own memory report (``agent.proxy.memory.report`` in its
    stats: glibc's heap in use / free), from its stats socket; {} when it
    does not answer."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.path.join(run_dir, f"proxy-{worker}.sock"))
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        return json.loads(buf).get("memory") or {}
    except (OSError, ValueError):
        return {}


WEB = {"app": "web"}  # the labels of the bench's nginx pods, behind the service "web"


def pod_specs(nodes: int, pods: int) -> dict:
    """The cluster's pods: ``pods`` per node, the bench's nginx pods
    (pod1-2 and pod<nodes>-1) labelled as the service "web" selects."""
    specs: dict = {}
    for n in range(1, nodes + 1):
        specs[n] = [
            {"name": f"pod{n}-{i}", **({"labels": WEB} if (n, i) in ((1, 2), (nodes, 1)) else {})}
            for i in range(1, pods + 1)
        ]
    return specs


def push_traffic(cluster, nodes: int, seconds: int) -> dict:
    """The bench's meshed paths (module docstring) for ``seconds`` each: from
    pod1-1 to pod1-2, then to pod<nodes>-1; the servers run in those pods."""
    from bench import run_connrate, run_iperf, run_wrk  # scripts/, next to this file
    from benchtools import write_nginx_conf

    paths = {"same-node": "pod1-2", "cross-node": f"pod{nodes}-1"} if nodes > 1 else {"same-node": "pod1-2"}
    d = tempfile.mkdtemp(prefix="meshlet-footprint-")
    procs: list[subprocess.Popen] = []
    out: dict = {}
    try:
        for dst in paths.values():
            os.makedirs(os.path.join(d, dst))
            conf = write_nginx_conf(os.path.join(d, dst), ["8080 reuseport"], "hello from nginx in a pod\n")
            pod = cluster.pod(dst)
            procs += [
                pod.popen(
                    ["nginx", "-c", conf, "-p", os.path.join(d, dst)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
                pod.popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL),
                pod.popen(
                    [
                        sys.executable,
                        "-m",
                        "agent.sim.tools",
                        "echo",
                        "--port",
                        "7001",
                        "--max-seconds",
                        "1800",
                    ],
                    stdout=subprocess.DEVNULL,
                ),
            ]
        time.sleep(1.0)  # the servers listen
        for where, dst in paths.items():
            host = cluster.pod(dst).ip4
            row = {
                "rps": run_wrk(cluster, "pod1-1", f"http://{host}:8080/", seconds, 32).get("rps"),
                "gbps": run_iperf(cluster, "pod1-1", host, seconds).get("gbps"),
            }
            if where == "cross-node":
                row["conn_per_s"] = run_connrate(cluster, "pod1-1", host, seconds).get("per_second")
                row["rps_c1"] = run_wrk(cluster, "pod1-1", f"http://{host}:8080/", seconds, 1).get("rps")
            out[where] = row
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            pr.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)
    return out


def measure(pods: int, workers: int, settle: float, nodes: int = 1, traffic: int = 0) -> dict:
    """Bring up ``nodes`` nodes with ``pods`` pods each and meshlet, push
    traffic for ``traffic`` seconds (0: none), measure node1 (and the
    other nodes' distinct pages and heaps), tear down."""
    from agent.sim import Cluster
    from agent.sim.mesh import Mesh, service

    if traffic and pods < 2:
        raise SystemExit("bench_footprint: --traffic needs --pods 2 or more (a client and a server per node)")
    specs = pod_specs(nodes, pods) if traffic else None
    cluster = Cluster(nodes=nodes, pods_per_node=pods, ipv6=False, pod_specs=specs)
    with cluster:
        web = [service("web", WEB, [{"port": 80, "targetPort": 8080, "appProtocol": "http"}], index=1)]
        mesh = Mesh(cluster, workers=workers, log_level="warning", services=web if traffic else [])
        try:
            mesh.start(timeout=300)
            st = mesh.status("node1")
            enrolled = st.get("datapath", {}).get("enrolled", st.get("enrolled"))
            load = push_traffic(cluster, nodes, traffic) if traffic else None
            time.sleep(settle)  # memory, not time: let start-up (or traffic) garbage go first
            popen = mesh.agents["node1"].popen
            assert popen is not None
            apid = agent_pid(popen.pid)
            agent = smaps_rollup_kb(apid)
            agent["llvm"] = llvm_mappings(apid)  # type: ignore[assignment]
            wpids = mesh.proxy_pids("node1")
            procs = [smaps_rollup_kb(p) for p in wpids]
            for i, w in enumerate(procs):
                w["heap"] = worker_memory(mesh.agents["node1"].run_dir, i)  # type: ignore[assignment]
            distinct = tree_distinct_mb(apid)
            pss = tree_pss_mb(apid)
            detail = {"agent": top_mappings(apid), "proxy worker 0": top_mappings(wpids[0]) if wpids else []}
            others = {}  # the other nodes' totals (the bench reads every node)
            for n in cluster.nodes[1:]:
                p = mesh.agents[n.name].popen
                assert p is not None
                others[n.name] = {
                    "node_distinct_mb": tree_distinct_mb(agent_pid(p.pid)),
                    "heaps": [worker_memory(mesh.agents[n.name].run_dir, i) for i in range(workers)],
                }
        finally:
            mesh.down()
    return {
        "pods": pods,
        "nodes": nodes,
        "enrolled": enrolled,
        "workers": workers,
        "traffic": load,
        "agent": agent,
        "proxy_workers": procs,
        "node_rss_kb": agent["rss"] + sum(p["rss"] for p in procs),
        "node_pss_kb": agent["pss"] + sum(p["pss"] for p in procs),
        "node_tree_pss_mb": pss,
        "node_distinct_mb": distinct,
        "top_mappings_kb": detail,
        "other_nodes": others,
    }


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def print_detail(rows: list[dict]) -> None:
    for r in rows:
        for who, top in r["top_mappings_kb"].items():
            print(f"{r['pods']} pods, {who}: biggest parts of RSS")
            for name, kb in top:
                print(f"    {mb(kb):>7} MB  {name}")


def print_table(rows: list[dict]) -> None:
    print(
        f"{'pods':>5} {'what':<16} {'RSS MB':>8} {'PSS MB':>8} {'distinct MB':>12}  glibc heap (in use / free MB)"
    )
    for r in rows:
        for where, t in (r.get("traffic") or {}).items():
            line = f"{r['pods']:>5} after traffic, {where}: {t['rps']} req/s (wrk -c32), "
            line += f"{t['gbps']} Gbit/s (iperf3)"
            if "conn_per_s" in t:
                line += f", {t['conn_per_s']} new conn/s (connrate), {t['rps_c1']} req/s (wrk -c1)"
            print(line)
        print(f"{r['pods']:>5} {'agent':<16} {mb(r['agent']['rss']):>8} {mb(r['agent']['pss']):>8}")
        for i, w in enumerate(r["proxy_workers"]):
            h = w.get("heap") or {}
            split = (
                f"{mb(h['heap_in_use_kb'])} / {mb(h['heap_free_kb'])} (mmapped {mb(h['mmapped_kb'])}, "
                f"trims {h.get('trims')})"
                if h.get("heap_in_use_kb") is not None
                else "-"
            )
            print(
                f"{r['pods']:>5} {f'proxy worker {i}':<16} {mb(w['rss']):>8} {mb(w['pss']):>8} {'':>12}  {split}"
            )
        print(
            f"{r['pods']:>5} {'node total':<16} {mb(r['node_rss_kb']):>8} {mb(r['node_pss_kb']):>8} "
            f"{r['node_distinct_mb']:>12.1f}"
        )
        for name, o in r.get("other_nodes", {}).items():
            heaps = ", ".join(
                f"{mb(h['heap_in_use_kb'])} / {mb(h['heap_free_kb'])}"
                for h in o["heaps"]
                if h.get("heap_in_use_kb")
            )
            print(
                f"{r['pods']:>5} {name + ' total':<16} {'':>8} {'':>8} {o['node_distinct_mb']:>12.1f}  {heaps}"
            )
        if r["agent"]["llvm"]:
            print(f"      the agent maps LLVM: {', '.join(r['agent']['llvm'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", default="2,100", help="comma-separated pod counts (default 2,100)")
    ap.add_argument("--workers", type=int, default=2, help="proxy workers (default 2)")
    ap.add_argument(
        "--settle", type=float, default=5.0, help="seconds to wait before reading memory (5: as the bench)"
    )
    ap.add_argument(
        "--nodes", type=int, default=1, help="nodes in the cluster (default 1; node1 is measured)"
    )
    ap.add_argument(
        "--traffic",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="SECONDS",
        help="push the bench's meshed traffic, SECONDS per run (3 if given bare), before measuring",
    )
    ap.add_argument("--out", help="write the rows as JSON here too")
    ap.add_argument("--detail", action="store_true", help="also print the biggest mappings of each process")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_footprint: run as root (the simulated cluster needs it)", file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in args.pods.split(",") if c.strip()]
    except ValueError:
        print(f"bench_footprint: --pods {args.pods!r}: expected numbers like 2,100", file=sys.stderr)
        return 2
    rows = [measure(n, args.workers, args.settle, args.nodes, args.traffic) for n in counts]
    print_table(rows)
    if args.detail:
        print_detail(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
