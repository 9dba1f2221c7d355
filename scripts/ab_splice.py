"""Same-node A/B of proxy.splice: one node, nginx and iperf3 in pod1-2;
clients pod1-3 (unmeshed: direct) and pod1-1 (meshed), with proxy.splice off
and on alternated in one mesh (the agent restarts in between; the proxies
adopt the new state), ROUNDS rounds (default 3).

Prints, per run: wrk -c32 -t1 -d3 req/s and p99; CPU microseconds per
request of wrk, the nginx worker and the proxy workers (utime+stime from
/proc and getrusage, so the softirq work done in their context counts);
then iperf3 -t3 Gbit/s and the proxy workers' CPU-seconds per GB.  CPU per
unit of work holds up on a shared machine where req/s does not.  Then,
under wrk, the node's eBPF programs: runs and nanoseconds per request
(the kernel's run-time stats, on for the wrk runs only), which says how
much of the spliced path's extra CPU is meshlet's own programs and how much
the kernel's sk_msg machinery.  Needs root (a simulated cluster), wrk, nginx
and iperf3.

    sudo .venv/bin/python scripts/ab_splice.py [ROUNDS]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench import run_iperf, run_wrk  # noqa: E402
from benchtools import write_nginx_conf  # noqa: E402

from agent.datapath import bpfsys  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402


def prog_stats(pin_dir: str) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of every program pinned under ``pin_dir``."""
    out = {}
    progs = os.path.join(pin_dir, "progs")
    for name in sorted(os.listdir(progs)):
        fd = bpfsys.obj_get(os.path.join(progs, name))
        try:
            out[name] = bpfsys.prog_run_stats(fd)
        finally:
            os.close(fd)
    return out


def per_request(before: dict, after: dict, reqs: float) -> str:
    """``name runs/req ns/req`` for the programs that ran, and the sum."""
    parts, total = [], 0.0
    for name, (ns1, n1) in after.items():
        ns0, n0 = before.get(name, (0, 0))
        if n1 > n0 and reqs:
            total += (ns1 - ns0) / reqs
            parts.append(f"{name} {(n1 - n0) / reqs:.2f}x {(ns1 - ns0) / reqs:.0f}")
    return f"{total:.0f} ns/req: " + ", ".join(parts)


def cpu_seconds(pids: list[int]) -> float:
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return t / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(rounds: int) -> None:
    cluster = Cluster(nodes=1, pods_per_node=3).up()
    mesh = Mesh(cluster, log_level="warning", splice=False, unmeshed={"pod1-3"})
    try:
        mesh.start()
        d = tempfile.mkdtemp()
        conf = write_nginx_conf(d, ["8080 reuseport"], "hello\n")
        server = cluster.pod("pod1-2")
        server.popen(["nginx", "-c", conf, "-p", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
        time.sleep(1)
        with open(os.path.join(d, "nginx.pid")) as f:
            master = f.read().strip()
        out = subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout
        nginx = [int(p) for p in out.split()]
        ip = server.ip4
        for r in range(rounds):
            for mode in ("off", "on"):
                mesh.reconfigure(splice=mode == "on")
                time.sleep(0.5)
                proxies = [w["pid"] for w in mesh.status("node1")["proxy"]]
                pin_dir = mesh.agents["node1"].pin_dir
                for src in ("pod1-3", "pod1-1"):
                    stats_fd = bpfsys.enable_run_stats()
                    try:
                        b0 = prog_stats(pin_dir)
                        k0, n0, p0 = children_seconds(), cpu_seconds(nginx), cpu_seconds(proxies)
                        w = run_wrk(cluster, src, f"http://{ip}:8080/", 3, 32)
                        k1, n1, p1 = children_seconds(), cpu_seconds(nginx), cpu_seconds(proxies)
                        b1 = prog_stats(pin_dir)
                    finally:
                        os.close(stats_fd)
                    b = run_iperf(cluster, src, ip, 3)
                    p2 = cpu_seconds(proxies)
                    reqs = (w.get("rps") or 0) * 3
                    gb = (b["gbps"] or 0) * 3 / 8

                    def us(x: float, reqs: float = reqs) -> float | None:
                        return round(x * 1e6 / reqs, 1) if reqs else None

                    label = "direct" if src == "pod1-3" else f"splice-{mode}"
                    print(
                        f"round {r} {label:10s} rps {w.get('rps')} p99_ms {w.get('p99_ms')} "
                        f"cpu_us/req wrk {us(k1 - k0)} nginx {us(n1 - n0)} proxy {us(p1 - p0)} "
                        f"total {us(k1 - k0 + n1 - n0 + p1 - p0)} | iperf3 {round(b['gbps'] or 0, 2)} Gbit/s "
                        f"proxy_cpu_s/GB {round((p2 - p1) / gb, 3) if gb else None}",
                        flush=True,
                    )
                    print(f"    eBPF under wrk: {per_request(b0, b1, reqs)}", flush=True)
        c = mesh.counters("node1")
        print("datapath", {k: v for k, v in c.items() if "splice" in k}, flush=True)
    finally:
        mesh.down()
        cluster.down()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
