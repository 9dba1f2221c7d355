#!/usr/bin/env python3
"""Where the cross-node mTLS p99 comes from (issue #13 item 3): a driver.

Builds the benchmark's 2-node cluster (agent/sim), nginx in pod2-1, and runs
``wrk -c32 --latency`` rounds, alternating direct (pod1-3, outside the mesh)
and mesh (pod1-1 -> node1 proxy -> mTLS tunnel -> node2 proxy -> pod2-1), so
a drift of the shared machine hits both alike.  Inside every proxy worker,
``scripts/p99site/sitecustomize.py`` (put on PYTHONPATH here, active only
with ``MESHLET_P99_PROBE``) records GC pauses and event-loop lag; this
driver diffs them per phase and adds, per worker (and per ksoftirqd), CPU
time, CPU per request, the time spent runnable but waiting for a CPU
(``/proc/<pid>/schedstat``) and involuntary context switches.

    python scripts/p99_probe.py [--rounds 3] [--duration 5] [--durations 2,10]
                                [--l7 false|true|auto] [--tunnel mtls|insecure-plaintext]
                                [--churn] [--setup-profile DIR] [--py-spy DIR]
                                [--h2load-log PREFIX] [--tcpdump PREFIX] [--renice N]
                                [--env KEY=VALUE ...] [--json FILE]

``--churn``: 4 clients opening tunnel connections back to back first (what
a wrk run pays up front for its 32 connections), ``--setup-profile DIR``
with py-spy on both workers meanwhile; ``--py-spy DIR``: py-spy during the
last mesh round (raw collapsed stacks, ``DIR/<node>-<pid>.txt``);
``--h2load-log PREFIX``: one h2load run per path after the rounds, with its
per-request log summarized (p99, and where in the run the slowest 1% fell);
``--tcpdump PREFIX``: round 1 captured on the pod side and the tunnel
(``PREFIX.<mode>.<pod|tunnel>.pcap``); the first mesh round also prints a
TCP_NODELAY census of the workers' sockets.  A probe, not a test: compare
ratios within one run.
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

from benchtools import write_nginx_conf  # noqa: E402 - scripts/, next to this file

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

SITE = os.path.join(ROOT, "scripts", "p99site")
BUCKETS = ("0.1", "0.25", "0.5", "1", "2", "5", "10", "20", "50", "100", "inf")


def wrk(cluster, src: str, url: str, duration: int, connections: int) -> dict:
    r = cluster.pod(src).run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
                             check=False, timeout=duration + 30)
    out: dict = {"raw": r.stdout}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "75%", "90%", "99%"):
            v = parts[1]
            ms = float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-2]) if v.endswith("ms") \
                else float(v[:-1]) * 1000
            out[f"p{parts[0][:-1]}"] = ms
        if line.startswith("Requests/sec:"):
            out["rps"] = float(line.split()[1])
    out.pop("raw")
    return out


def proc(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tck
    with open(f"/proc/{pid}/schedstat") as f:  # ns on CPU, ns runnable but waiting for a CPU, timeslices
        on_cpu, waited, _slices = (int(x) for x in f.read().split())
    out["run_delay_s"] = waited / 1e9
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches"):
                out["invol"] = int(line.split()[1])
            elif line.startswith("voluntary_ctxt_switches"):
                out["vol"] = int(line.split()[1])
    return out


def probe(d: str, pid: int) -> dict:
    try:
        with open(os.path.join(d, f"{pid}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def ksoftirqd_pids() -> dict[str, int]:
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm.startswith("ksoftirqd/"):
                out[comm] = int(pid)
    return out


def snapshot(mesh: Mesh, cluster, d: str) -> dict:
    out = {}
    for comm, pid in ksoftirqd_pids().items():  # the kernel's deferred packet processing, as a task
        out[(comm, pid)] = {"proc": proc(pid), "probe": {}}
    for n in cluster.nodes:
        for pid in mesh.proxy_pids(n.name):
            out[(n.name, pid)] = {"proc": proc(pid), "probe": probe(d, pid)}
    return out


def diff(before: dict, after: dict, seconds: float) -> dict:
    rows = {}
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            continue
        pa, pb = a["probe"], b["probe"]
        row = {"cpu_pct": round(100 * (a["proc"]["cpu_s"] - b["proc"]["cpu_s"]) / seconds, 1),
               "invol_cs": a["proc"]["invol"] - b["proc"]["invol"],
               "run_delay_pct": round(100 * (a["proc"]["run_delay_s"] - b["proc"]["run_delay_s"]) / seconds,
                                      1),
               "vol_cs": a["proc"]["vol"] - b["proc"]["vol"]}
        if pa and pb:
            row["gc"] = {g: {"n": pa["gc"][g]["n"] - pb["gc"][g]["n"],
                             "ms": round(pa["gc"][g]["total_ms"] - pb["gc"][g]["total_ms"], 2)}
                         for g in ("0", "1", "2")}
            row["gc_max_ms_ever"] = {g: round(pa["gc"][g]["max_ms"], 2) for g in ("0", "1", "2")}
            row["gc_hist"] = [x - y for x, y in zip(pa["gc_hist"], pb["gc_hist"], strict=True)]
            row["lag_hist"] = [x - y for x, y in zip(pa["lag_hist"], pb["lag_hist"], strict=True)]
            n = pa["lag_n"] - pb["lag_n"]
            row["lag_mean_ms"] = round((pa["lag_total_ms"] - pb["lag_total_ms"]) / n, 3) if n else None
        rows[f"{key[0]}/{key[1]}"] = row
    return rows


def nodelay_census(pid: int) -> dict:
    """TCP_NODELAY of every TCP socket ``pid`` holds, by (local port, state):
    copies of its descriptors through pidfd_getfd(2)."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, int] = {}
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            try:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                try:
                    peer = s.getpeername()
                except OSError:
                    continue  # a listener
                local = s.getsockname()
                role = "tunnel" if 15008 in (local[1], peer[1]) else "pod"
                key = f"{role} nodelay={s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}"
                out[key] = out.get(key, 0) + 1
            finally:
                s.detach()
                os.close(fd)
    finally:
        os.close(pidfd)
    return out


def describe_log(path: str) -> str:
    """p50/p99 of an h2load per-request log, and where in the run the
    slowest 1% started (per 10% of the run)."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[2])))
    if not rows:
        return "no requests logged"
    rows.sort()
    t0, t1 = rows[0][0], rows[-1][0]
    lat = sorted(d for _, d in rows)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    deciles = [0] * 10
    for t, d in rows:
        if d >= p99:
            deciles[min(9, int(10 * (t - t0) / max(1, t1 - t0)))] += 1
    return (f"{len(rows)} requests, p50 {lat[len(lat) // 2] / 1000:.2f} ms, p99 {p99 / 1000:.2f} ms, "
            f"max {lat[-1] / 1000:.1f} ms; slowest 1% by tenth of the run: {deciles}")


def fmt_hist(h: list[int]) -> str:
    return " ".join(f"<={b}:{n}" for b, n in zip(BUCKETS, h, strict=False) if n)


def pyspy(cluster, mesh, out_dir: str, seconds: int) -> list[subprocess.Popen]:
    os.makedirs(out_dir, exist_ok=True)
    spies = []
    for n in cluster.nodes:
        for pid in mesh.proxy_pids(n.name):
            spies.append(subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--nonblocking",
                 "-r", "250", "-d", str(seconds), "-f", "raw",
                 "-o", os.path.join(out_dir, f"{n.name}-{pid}.txt"), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    return spies


def churn(cluster, mesh, a, pdir: str) -> None:
    """New tunnel connections back to back (the cost a wrk run pays up front
    for its 32 connections), 4 clients at once; both workers under py-spy
    with ``--setup-profile``."""
    spies = pyspy(cluster, mesh, a.setup_profile, a.duration + 1) if a.setup_profile else []
    host = cluster.pod("pod2-1").ip4
    time.sleep(1.1)
    before = snapshot(mesh, cluster, pdir)
    t0 = time.monotonic()
    procs = [cluster.pod("pod1-1").popen([sys.executable, "-m", "agent.sim.tools", "connrate", host, "7001",
                                          "--seconds", str(a.duration)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=a.duration + 30)[0].strip() for p in procs]
    secs = time.monotonic() - t0
    time.sleep(1.1)
    for s in spies:
        s.wait(timeout=60)
    print(f"new connections, 4 clients: {outs}", flush=True)
    print_workers(diff(before, snapshot(mesh, cluster, pdir), secs + 1.1))


def print_workers(rows: dict) -> None:
    for w, r in rows.items():
        print(f"    {w}: cpu {r['cpu_pct']}% ({r.get('cpu_us_per_req')} us/request)  "
              f"waiting for a CPU {r['run_delay_pct']}%  invol {r['invol_cs']}  vol {r['vol_cs']}  "
              f"gc {r.get('gc')}  gcmax {r.get('gc_max_ms_ever')}", flush=True)
        if "gc" not in r:
            continue  # not a worker (ksoftirqd)
        print(f"        gc pauses ms {fmt_hist(r.get('gc_hist', []))}", flush=True)
        print(f"        loop lag ms {fmt_hist(r.get('lag_hist', []))}  "
              f"mean {r.get('lag_mean_ms')}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--durations", default="",
                    help="comma-separated wrk durations to cycle through in the mesh rounds (e.g. 2,10): "
                         "a p99 made by connection setup shrinks as the run grows")
    ap.add_argument("--l7", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--tunnel", default="mtls", choices=["mtls", "insecure-plaintext"])
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the agents and workers")
    ap.add_argument("--py-spy", dest="pyspy", help="record workers with py-spy in the last mesh round")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--setup-profile", dest="setup_profile",
                    help="py-spy both workers during a run of new connections (--churn) into DIR")
    ap.add_argument("--h2load-log", dest="h2load_log",
                    help="after the rounds: one h2load --h1 -c32 run per path with a per-request log "
                         "(PREFIX.<mode>.tsv: start us, status, duration us): when do slow requests happen")
    ap.add_argument("--renice", type=int, default=None,
                    help="an experiment on the scheduler: mesh rounds alternate between the workers' "
                         "niceness as started and this one (e.g. -10), in the same cluster")
    ap.add_argument("--churn", action="store_true", help="a run of new connections before the wrk rounds")
    ap.add_argument("--tcpdump", help="capture the tunnel (node2, port 15008) of mesh round 1 into this pcap")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, eBPF)")
        return 2
    pdir = tempfile.mkdtemp(prefix="meshlet-p99-")
    os.environ["MESHLET_P99_PROBE"] = pdir
    os.environ["MESHLET_WORKER_SITE"] = "1"  # the probe is a sitecustomize: workers need `site`
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SITE + (os.pathsep + old if old else "")
    for kv in a.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    l7 = {"auto": "auto", "true": True, "false": False}[a.l7]
    cluster = Cluster(nodes=2, pods_per_node=3, pod_specs={
        1: [{"name": "pod1-1"}, {"name": "pod1-2"}, {"name": "pod1-3"}],
        2: [{"name": "pod2-1"}, {"name": "pod2-2"}, {"name": "pod2-3"}]})
    mesh = None
    rows = []
    try:
        cluster.up()
        mesh = Mesh(cluster, unmeshed={"pod1-3"}, log_level="warning", l7=l7,
                    tunnel_security=a.tunnel)
        mesh.start()
        d = os.path.join(pdir, "nginx")
        os.makedirs(d)
        conf = write_nginx_conf(d, ["8080 reuseport"], "hello from nginx in a pod\n")
        cluster.pod("pod2-1").popen(["nginx", "-c", conf, "-p", d], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        cluster.pod("pod2-1").popen([sys.executable, "-m", "agent.sim.tools", "echo", "--port", "7001",
                                     "--max-seconds", "900"], stdout=subprocess.DEVNULL)
        time.sleep(1.5)
        if a.setup_profile or a.churn:
            churn(cluster, mesh, a, pdir)
        url = f"http://{cluster.pod('pod2-1').ip4}:8080/"
        wrk(cluster, "pod1-1", url, 1, a.connections)  # warm: connections, sessions
        for rnd in range(1, a.rounds + 1):
            nice = 0
            if a.renice is not None:
                nice = a.renice if rnd % 2 == 0 else 0
                for n in cluster.nodes:
                    for pid in mesh.proxy_pids(n.name):
                        os.setpriority(os.PRIO_PROCESS, pid, nice)
            for mode, src in (("direct", "pod1-3"), ("mesh", "pod1-1")):
                spies = []
                if a.pyspy and mode == "mesh" and rnd == a.rounds:
                    os.makedirs(a.pyspy, exist_ok=True)
                    for n in cluster.nodes:
                        for pid in mesh.proxy_pids(n.name):
                            spies.append(subprocess.Popen(
                                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                                 "--nonblocking", "-r", "200", "-d", str(a.duration + 1), "-f", "raw",
                                 "-o", os.path.join(a.pyspy, f"{n.name}-{pid}.txt"), "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(0.5)
                time.sleep(1.1)  # a fresh probe dump
                before = snapshot(mesh, cluster, pdir)
                t0 = time.monotonic()
                census = {}
                if mode == "mesh" and rnd == 1:  # the sockets' options, while wrk holds them open
                    import threading

                    def take_census(into: dict = census) -> None:
                        time.sleep(a.duration / 2)
                        for n in cluster.nodes:
                            for pid in mesh.proxy_pids(n.name):
                                into[f"{n.name}/{pid}"] = nodelay_census(pid)

                    th = threading.Thread(target=take_census)
                    th.start()
                dumps = []
                if a.tcpdump and rnd == 1:
                    # the tunnel as node2 sees it, and the pod side as wrk's pod sees it
                    for where, filt in ((cluster.node("node2"), "tcp port 15008"),
                                        (cluster.pod(src), "tcp port 15001 or tcp port 8080")):
                        dumps.append(where.popen(
                            ["tcpdump", "-i", "any", "-s", "100", "-B", "16384", "-w",
                             f"{a.tcpdump}.{mode}.{'tunnel' if '15008' in filt else 'pod'}.pcap", filt],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(1.0)
                dur = a.duration
                if a.durations and mode == "mesh":
                    ds = [int(x) for x in a.durations.split(",")]
                    dur = ds[(rnd - 1) % len(ds)]
                res = wrk(cluster, src, url, dur, a.connections)
                res["duration"] = dur
                res["nice"] = nice
                for dump in dumps:
                    dump.terminate()
                    dump.wait(timeout=30)
                if census or (mode == "mesh" and rnd == 1):
                    th.join()
                secs = time.monotonic() - t0
                time.sleep(1.1)
                after = snapshot(mesh, cluster, pdir)
                for s in spies:
                    s.wait(timeout=60)
                row = {"round": rnd, "mode": mode, **res, "workers": diff(before, after, secs + 1.1)}
                reqs = (res.get("rps") or 0) * dur
                for w in row["workers"].values():  # CPU per request (the 1.1 s after wrk is idle)
                    cpu_s = w["cpu_pct"] / 100 * (secs + 1.1)
                    w["cpu_us_per_req"] = round(cpu_s / reqs * 1e6, 1) if reqs else None
                rows.append(row)
                print(f"round {rnd} {mode:<6} {res['duration']:>3}s nice {res['nice']:>3} "
                      f"rps {res.get('rps', 0):>9,.0f}  "
                      f"p50 {res.get('p50', 0):6.2f}  p90 {res.get('p90', 0):6.2f}  "
                      f"p99 {res.get('p99', 0):6.2f} ms", flush=True)
                for w, c in census.items():
                    print(f"    {w} TCP_NODELAY of established sockets: {c}", flush=True)
                if mode == "mesh":
                    print_workers(row["workers"])
        if a.h2load_log:
            for mode, src in (("direct", "pod1-3"), ("mesh", "pod1-1")):
                log = f"{a.h2load_log}.{mode}.tsv"
                argv = ["h2load", "--h1", f"-c{a.connections}", "-m1", "-D", str(a.duration),
                        "--log-file", log, url]
                r = cluster.pod(src).run(argv, check=False, timeout=a.duration + 30)
                print(f"h2load {mode}: " + " | ".join(ln.strip() for ln in r.stdout.splitlines()
                                                     if ln.startswith(("finished", "time for request"))))
                print(f"    {describe_log(log)}", flush=True)
    finally:
        if mesh is not None:
            mesh.down()
        cluster.down()
        shutil.rmtree(pdir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
