"""Proxy memory comes back after a burst of connections (issue #12 item 7),
on a real kernel: a 2-node simulated cluster, 2 worker processes per node,
3,000 concurrent cross-node connections (``agent.sim.connhold``) held
through both node proxies (node1: outbound + TLS client; node2: TLS server
+ inbound), then closed.

The bound is the issue's target: each node's proxy RSS (summed over its
workers, from /proc) back within 1.5x of its idle RSS.  Holding 3,000
connections adds ~35-50 KB each (~100-150 MB per node against ~90 MB idle),
so the bound is met only if at least ~70 % of what the burst took goes back.
Before the fixes (a session leak in CPython's ssl, pymalloc arenas pinned by
survivors: see agent/proxy/memory.py) node1 kept ~80 % of it and failed.
The test also bounds node1's reads of TLS sessions (the leaking call): a
session refused by one of node2's workers is kept, not fetched again.
RSS is memory, not time: the test polls (bounded) because the workers hand
memory back in their maintenance round after a burst.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.privileged import ip_of, require_privileged, wait_for

require_privileged()

from agent.proxy.memory import rss_kb  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged

HOLD = [sys.executable, "-m", "agent.sim.connhold"]
PORT = 7100
COUNT = 3000
BOUND = 1.5  # after close / idle, per node (issue #12)
NODES = ("node1", "node2")


def node_rss_kb(mesh: Mesh, node: str) -> int:
    pids = mesh.proxy_pids(node)
    assert len(pids) == mesh.workers, (node, pids)
    return sum(rss_kb(p) for p in pids)


def worker_stats(mesh: Mesh, node: str) -> list[dict]:
    def answered():
        st = [w["stats"] for w in mesh.status(node)["proxy"]]
        return all(st) and st

    return wait_for(answered, f"every worker of {node} answers its stats socket")


@pytest.mark.parametrize("mux", [False, True], ids=["tls-per-connection", "pooled-mux"])
def test_rss_returns_within_1_5x_of_idle_after_3000_connections_close(mux):
    """Both tunnel modes: one TLS connection per pod connection (proxy.tunnelMux
    off, the fallback a meshlet-tunnel/1 peer gets; its case is the
    per-handshake session leak) and the default pooled tunnel, where the 3,000
    pod connections are streams of a few TLS connections."""
    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster, workers=2, log_level="warning", tunnel_mux=mux)
    client = None
    try:
        server = cluster.pod("pod2-1").popen(HOLD + ["serve", "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        mesh.start()
        for n in NODES:
            stats = worker_stats(mesh, n)
            assert all(st["memory"]["allocator"] == "malloc" for st in stats)
            # each worker froze its start-up heap before listening (memory.freeze_heap)
            assert all(st["memory"]["gc_frozen"] > 10_000 for st in stats), [st["memory"] for st in stats]
        idle = {n: node_rss_kb(mesh, n) for n in NODES}

        client = cluster.pod("pod1-1").popen(
            HOLD + ["hold", ip_of(mesh, "pod2-1"), str(PORT), "--count", str(COUNT), "--parallel", "200"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        got = json.loads(client.stdout.readline())
        assert got == {"held": COUNT, "failed": 0, "errors": {}}, got
        held = {n: node_rss_kb(mesh, n) for n in NODES}
        client.stdin.write("close\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"closed": COUNT}
        for n in NODES:
            wait_for(lambda n=n: sum(st["active_connections"] for st in worker_stats(mesh, n)) == 0,
                     f"{n}'s connections closed", timeout=120)

        def back() -> dict[str, int] | None:
            now = {n: node_rss_kb(mesh, n) for n in NODES}
            return now if all(now[n] <= BOUND * idle[n] for n in NODES) else None

        def numbers() -> str:
            now = {n: node_rss_kb(mesh, n) for n in NODES}
            return "; ".join(
                f"{n}: idle {idle[n] >> 10} MB, held {held[n] >> 10} MB, now {now[n] >> 10} MB "
                f"({now[n] / idle[n]:.2f}x idle, {(now[n] - idle[n]) / max(held[n] - idle[n], 1):.0%} of the burst kept)"
                for n in NODES)

        try:
            wait_for(back, "proxy RSS back within 1.5x of idle", timeout=60, interval=1.0)
        except AssertionError:
            raise AssertionError(numbers()) from None
        if mux:  # the 3,000 connections were streams: a handful of TLS connections carried them
            c1 = [st["counters"] for st in worker_stats(mesh, "node1")]
            assert sum(c["tunnel_streams_out"] for c in c1) >= COUNT, c1
            assert 0 < sum(c["tunnel_connections_out"] for c in c1) <= COUNT // 10, c1  # 100 streams a connection at most
            return
        for n in NODES:
            assert held[n] - idle[n] > 50 << 10, numbers()  # the burst did take memory
            assert all(st["memory"]["trims"] >= 1 for st in worker_stats(mesh, n)), n
        # node2's two workers have their own ticket keys, so about half of node1's resumption offers are
        # refused; a refused session is kept, not refetched (each fetch leaks ~7 KB on CPython < 3.12.7
        # and its copies pinned the burst's heap pages): a few fetches per worker, not hundreds
        tls = [st["tls"] for st in worker_stats(mesh, "node1")]
        assert sum(t["handshakes"] for t in tls) >= COUNT, tls
        assert 0 < sum(t["resumed"] for t in tls) < COUNT, tls  # some refused: the case at stake
        assert sum(t["session_reads"] for t in tls) <= 4 * mesh.workers * 2, tls
    finally:
        if client is not None:
            client.kill()
            client.wait()
        mesh.down()
        cluster.down()


def test_a_worker_hands_back_what_one_bulk_stream_took_once_idle():
    """One bulk stream is no burst of connections (``TrimSchedule`` never
    fires for it), and the workers' trim threshold is high so glibc keeps
    free heap while traffic runs; the idle trim (``memory.IdleTrim``) hands
    it back once the worker is quiet.  The sending worker's RSS right after
    an iperf3 run, then (polled, bounded) after it went idle: lower by at
    least a few MB.  Memory, not time."""
    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster, workers=1, log_level="warning")
    server = None
    try:
        mesh.start()
        server = cluster.pod("pod2-1").popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
        wait_for(lambda: cluster.pod("pod2-1").run(["ss", "-Hltn", "sport = :5201"]).stdout.strip(),
                 "iperf3 listens in pod2-1")
        before = worker_stats(mesh, "node1")[0]["memory"]["trims"]
        r = cluster.pod("pod1-1").run(["iperf3", "-c", ip_of(mesh, "pod2-1"), "-p", "5201", "-t", "2", "-J"],
                                      check=False, timeout=60)
        held = node_rss_kb(mesh, "node1")  # right after: the idle trim needs a quiet maintenance round first
        sent = json.loads(r.stdout)["end"]["sum_received"]["bytes"]
        assert sent > 50 << 20, r.stdout[-500:]

        # polled from /proc only: a stats request is work for the worker, and idle means no work
        def trimmed():
            now = node_rss_kb(mesh, "node1")
            return now if now <= held - (3 << 10) else None

        try:
            wait_for(trimmed, "node1's worker hands memory back once idle", timeout=60, interval=1.0)
        except AssertionError:
            mem = worker_stats(mesh, "node1")[0]["memory"]
            raise AssertionError(f"held {held >> 10} MB right after {sent >> 20} MB, now "
                                 f"{node_rss_kb(mesh, 'node1') >> 10} MB; {mem}") from None
        assert worker_stats(mesh, "node1")[0]["memory"]["trims"] > before
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        mesh.down()
        cluster.down()
