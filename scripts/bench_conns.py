#!/usr/bin/env python3
"""Connection scale: proxy memory per 1,000 held connections, and after they close.

One simulated 2-node cluster, agents (and so their proxy workers) started
under an open-files soft limit of 1024, as on many hosts; the workers raise
it themselves.  pod1-1 holds N concurrent cross-node connections to pod2-1
(each proven by a one-byte echo: ``agent.sim.connhold``), for each N in
``--counts``; per node this reads the proxy workers' RSS (summed over
workers, from /proc) idle, with N held, and after they all closed (once
the workers had time to hand free memory back), and how much of the heap the
workers still use then (their stats' ``memory`` section; the JSON only).
Targets (issue #12): 10,000 connections held, RSS after close within 1.5x
of idle.  What keeps memory after a burst, and what gives it back:
``agent/proxy/memory.py``.

A measurement, not a test: numbers depend on the machine.

    scripts/bench_conns.py [--counts 1000,10000] [--json FILE]

``scripts/bench.py`` runs it as its connection-scale row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

HOLD = [sys.executable, "-m", "agent.sim.connhold"]
PORT = 7100
SETTLE_S = 6.0  # after close: more than two of the workers' maintenance rounds (memory trim)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proxy_rss_mb(mesh: Mesh, node: str) -> float:
    return round(sum(rss_kb(p) for p in mesh.proxy_pids(node)) / 1024, 1)


def heap_in_use_mb(mesh: Mesh, node: str) -> float | None:
    """What the program holds of glibc's heap (summed over workers): the
    rest of RSS is code, allocator slack and CPython's own pools."""
    kb = [((w["stats"] or {}).get("memory") or {}).get("heap_in_use_kb") for w in mesh.status(node)["proxy"]]
    return round(sum(kb) / 1024, 1) if kb and None not in kb else None


def tls_counters(mesh: Mesh, node: str) -> dict[str, int]:
    """The workers' TLS counters, summed (handshakes, resumed, session reads)."""
    out: dict[str, int] = {}
    for w in mesh.status(node)["proxy"]:
        for k, v in ((w["stats"] or {}).get("tls") or {}).items():
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return out


def active(mesh: Mesh, node: str) -> int:
    return sum((w["stats"] or {}).get("active_connections", 0) for w in mesh.status(node)["proxy"])


def wait(pred, bound: float = 300.0) -> bool:
    end = time.monotonic() + bound
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def measure_conns(counts: list[int], workers: int | None = None) -> list[dict]:
    """One row per count: RSS idle / held / after close per node (MB)."""
    cluster = Cluster(nodes=2, pods_per_node=1)
    mesh = None
    rows = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        cluster.up()
        server = cluster.pod("pod2-1").popen(HOLD + ["serve", "--port", str(PORT)],
                                             stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        kw = {"workers": workers} if workers else {"workers": 2}
        mesh = Mesh(cluster, log_level="warning", **kw)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by agents and workers
        try:
            mesh.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        nodes = ("node1", "node2")
        dst = cluster.pod("pod2-1").ip4
        for n in counts:
            idle = {node: proxy_rss_mb(mesh, node) for node in nodes}
            client = cluster.pod("pod1-1").popen(
                HOLD + ["hold", dst, str(PORT), "--count", str(n), "--parallel", "200"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            t0 = time.monotonic()
            got = json.loads(client.stdout.readline())
            open_s = time.monotonic() - t0
            held = {node: proxy_rss_mb(mesh, node) for node in nodes}
            client.stdin.write("close\n")
            client.stdin.flush()
            client.stdout.readline()
            client.wait(timeout=60)
            for node in nodes:
                wait(lambda node=node: active(mesh, node) == 0)
            time.sleep(SETTLE_S)
            after = {node: proxy_rss_mb(mesh, node) for node in nodes}
            in_use = {node: heap_in_use_mb(mesh, node) for node in nodes}
            tls = {node: tls_counters(mesh, node) for node in nodes}
            row = {"connections": n, "held": got["held"], "failed": got["failed"],
                   "open_seconds": round(open_s, 1)}
            for node in nodes:
                row[node] = {
                    "idle_mb": idle[node],
                    "held_mb": held[node],
                    "per_1k_mb": round((held[node] - idle[node]) / max(got["held"], 1) * 1000, 1),
                    "after_close_mb": after[node],
                    "after_close_heap_in_use_mb": in_use[node],
                    "after_over_idle": round(after[node] / idle[node], 2) if idle[node] else None,
                    "tls_so_far": tls[node],
                }
            rows.append(row)
            print_row(row)
    finally:
        if mesh is not None:
            mesh.down()
        cluster.down()
    return rows


HEADER = (f"{'conns':>7}{'held':>7}{'node':>7}{'idle MB':>9}{'held MB':>9}{'MB/1k':>7}"
          f"{'closed MB':>11}{'closed/idle':>13}")


def print_row(row: dict) -> None:
    for node in ("node1", "node2"):
        r = row[node]
        print(f"{row['connections']:>7}{row['held']:>7}{node:>7}{r['idle_mb']:>9.1f}{r['held_mb']:>9.1f}"
              f"{r['per_1k_mb']:>7.1f}{r['after_close_mb']:>11.1f}{r['after_over_idle']:>13.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,10000", help="comma-separated connection counts")
    ap.add_argument("--workers", type=int, default=None, help="proxy workers per node (default 2)")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces and loads eBPF: run it as root")
        return 2
    counts = [int(x) for x in a.counts.split(",") if x]
    print("connection scale: cross-node connections held through both node proxies (RSS summed over workers)")
    print(HEADER)
    print("-" * len(HEADER))
    rows = measure_conns(counts, a.workers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
