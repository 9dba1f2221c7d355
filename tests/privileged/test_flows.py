"""The kernel flow table end to end: a 2-node simulated cluster, real eBPF,
real proxies, real traffic, read back through the agent and `meshlet flows`.

Byte counts are exact: they are the kernel's tcp_info counters, where the
SYN (on the connecting side) and each FIN count one byte once acknowledged
or received.  The transfer tool's client sends a JSON header line and its
payload, half-closes, reads the server's JSON reply line and payload, then
closes after the server's FIN: so its leg has bytes_acked = header + up +
SYN + FIN and bytes_received = reply + down + FIN.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.privileged import TOOLS, require_privileged, running_mesh, wait_for

require_privileged()

from agent.datapath import bpfsys  # noqa: E402
from agent.datapath.flowtable import link_flows  # noqa: E402
from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

RTT_BOUND_US = 1_000_000  # generous: loopback-class veths measure tens of us
HISTORY = 300  # bpf.flowHistory: closed flows the agent keeps (the tests below make fewer)


@pytest.fixture(scope="module")
def mesh():
    # splice: false: these tests check the proxy's own legs (its accepted and
    # upstream sockets) against the pods' byte for byte, and with the
    # same-node splice a pod's bytes skip the proxy socket facing it (they
    # leave through the far one), so those legs carry less.  The pod legs
    # stay exact with the splice on: tests/privileged/test_splice.py checks
    # the client pod's leg of a spliced connection in the flow table.
    with running_mesh(Cluster(nodes=2, pods_per_node=2), servers=(("serve", 7000), ("echo", 7001)),
                      max_seconds=600, splice=False, flow_history=HISTORY) as m:
        yield m


def ip(mesh, pod: str) -> str:
    return mesh.cluster.pod(pod).ip4


def transfer(mesh, src: str, dst_ip: str, up: int, down: int, seed: int = 1) -> dict:
    r = mesh.cluster.pod(src).run(TOOLS + ["transfer", dst_ip, "7000", "--up", str(up),
                                           "--down", str(down), "--seed", str(seed),
                                           "--timeout", "20"], check=False, timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"], res
    return res


def cli(mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--socket", sock, *args],
                          capture_output=True, text=True, timeout=30)


def flows_json(mesh, node: str, *args: str) -> list[dict]:
    r = cli(mesh, node, "-o", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)




def legs(flows: list[dict], role: str, **match) -> list[dict]:
    out = []
    for f in flows:
        if f["role"] != role:
            continue
        if all(f[k.split("__")[0]][k.split("__")[1]] == v for k, v in match.items()):
            out.append(f)
    return out


def expected_bytes(res: dict, up: int, down: int, seed: int = 1) -> tuple[int, int]:
    header = len(json.dumps({"down": down, "seed": seed})) + 1
    reply = len(json.dumps({"received": res["server_received"], "sha256": "0" * 64,
                            "peer": res["server_saw_peer"]})) + 1
    return header + up + 2, reply + down + 1


def test_transfer_bytes_are_exact_on_both_pod_legs(mesh):
    up, down = 3 * 1000 * 1000 + 7, 1234567
    res = transfer(mesh, "pod1-1", ip(mesh, "pod1-2"), up, down, seed=11)
    sent, received = expected_bytes(res, up, down, seed=11)

    def closed_client():
        fl = flows_json(mesh, "node1", "--pod", "default/pod1-1", "--state", "closed")
        return [f for f in legs(fl, "client", destination__pod="default/pod1-2")
                if f["bytes_acked"] >= up]
    client = wait_for(closed_client, "the closed client leg")[-1]
    assert (client["bytes_acked"], client["bytes_received"]) == (sent, received)
    assert (client["sent"], client["received"]) == (sent, received)
    assert client["source"]["identity"] == "spiffe://cluster.local/ns/default/sa/pod1-1"
    assert client["destination"]["port"] == 7000
    assert client["verdict"] == "allowed" and client["state"] == "CLOSE"
    assert 0 < client["srtt_us"] < RTT_BOUND_US and 0 < client["min_rtt_us"] <= client["srtt_us"]
    assert client["duration_s"] > 0
    # The server pod's leg (passive: no SYN in its counters) got the same
    # bytes through the proxy: the client's payload and FIN, the reply and FIN.
    def server_leg():
        fl = flows_json(mesh, "node1", "--pod", "pod1-2", "--port", "7000", "--state", "closed")
        return [f for f in legs(fl, "server", destination__pod="default/pod1-2")
                if (f["sent"], f["received"]) == (sent - 1, received)]
    s = wait_for(server_leg, "the server leg with the same bytes")[-1]
    # the proxy linked its two legs, so the server leg resolves to the client pod
    assert s["source"]["pod"] == "default/pod1-1" and s["via"]["kind"] == "proxy"
    assert 0 < s["srtt_us"] < RTT_BOUND_US
    # the proxy's accepted leg is linked to the client leg by the 4-tuple
    def accepted_leg():
        return [f for f in flows_json(mesh, "node1", "--state", "closed")
                if f["role"] == "proxy-outbound" and client["cookie"] in f["linked"]]
    acc = wait_for(accepted_leg, "the proxy's accepted leg")[0]
    assert (acc["sent"], acc["received"]) == (sent - 1, received)
    assert acc["source"]["pod"] == "default/pod1-1"


def test_open_session_is_live_with_rtt(mesh):
    client = mesh.cluster.pod("pod1-1").popen(TOOLS + ["session", ip(mesh, "pod2-1"), "7001"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True)
    try:
        hello = json.loads(client.stdout.readline())
        port = hello["connected"][1]
        msg = "x" * 999  # + newline = 1000 bytes
        for _ in range(5):
            client.stdin.write(msg + "\n")
            client.stdin.flush()
            assert json.loads(client.stdout.readline())["echo"] == msg

        # Live counters are refreshed by the kernel's RTT/state/retransmit
        # callbacks: the client's last ACK for our request refreshed
        # bytes_acked; the echo's data arrived after that ACK was processed,
        # so bytes_received is exact as of the previous round trip.
        def live_leg():
            fl = flows_json(mesh, "node1", "--state", "open", "--pod", "pod1-1")
            return [f for f in legs(fl, "client", source__port=port)
                    if f["bytes_acked"] == 5000 + 1]  # + SYN
        f = wait_for(live_leg, "the live client leg")[0]
        assert f["open"] and f["state"] == "ESTABLISHED" and f["end"] is None
        assert f["bytes_received"] in (4000, 5000)
        assert f["destination"]["pod"] == "default/pod2-1"
        assert 0 < f["srtt_us"] < RTT_BOUND_US and f["duration_s"] > 0
        # cross node: node2 sees the tunnel leg and the pod server leg; the
        # server's counters are exact once the (delayed) ACK of the echo is in
        def server_leg():
            fl = flows_json(mesh, "node2", "--state", "open", "--pod", "pod2-1", "--port", "7001")
            return [g for g in legs(fl, "server") if (g["sent"], g["received"]) == (5000, 5000)]
        srv = wait_for(server_leg, "the live server leg on node2")
        assert srv[0]["source"]["kind"] == "proxy"
        tunnel = [g for g in flows_json(mesh, "node2", "--state", "open")
                  if g["role"] == "proxy-tunnel"]
        assert tunnel and tunnel[0]["source"]["kind"] == "node"
    finally:
        client.stdin.close()
        client.wait(timeout=10)


def test_short_flow_between_two_reads_is_reported(mesh):
    before = flows_json(mesh, "node1", "--state", "closed")
    seen = {f["cookie"] for f in before}
    r = mesh.cluster.pod("pod1-2").run(TOOLS + ["probe", ip(mesh, "pod1-1"), "7001"],
                                       check=False, timeout=30)
    assert json.loads(r.stdout)["result"] == "data"
    def new_closed():
        after = flows_json(mesh, "node1", "--state", "closed", "--pod", "pod1-2")
        return [f for f in legs(after, "client", source__pod="default/pod1-2")
                if f["cookie"] not in seen]
    new = wait_for(new_closed, "the short flow")
    assert len(new) == 1, new
    assert new[0]["sent"] == len(b"hello\n") + 2 and new[0]["destination"]["port"] == 7001


def test_filters_sort_and_table_via_the_cli(mesh):
    transfer(mesh, "pod1-2", ip(mesh, "pod2-2"), 200_000, 100_000)
    all_ = flows_json(mesh, "node1")
    assert {f["role"] for f in all_} >= {"client", "server", "proxy-outbound", "proxy-upstream"}
    by_ns = flows_json(mesh, "node1", "--namespace", "default", "--identity",
                       "spiffe://cluster.local/ns/default/sa/pod1-2")
    assert by_ns and all("spiffe://cluster.local/ns/default/sa/pod1-2" in
                         (f["source"]["identity"], f["destination"]["identity"]) for f in by_ns)
    assert flows_json(mesh, "node1", "--namespace", "nope") == []
    big = flows_json(mesh, "node1", "--sort", "bytes")
    totals = [f["sent"] + f["received"] for f in big]
    assert totals == sorted(totals, reverse=True)
    assert len(flows_json(mesh, "node1", "--since", "1h")) >= len(all_)
    r = cli(mesh, "node1", "--pod", "pod1-2", "--port", "7000")
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0].split()
    assert head[:3] == ["SOURCE", "DESTINATION", "ROLE"] and "VERDICT" in head
    assert "default/pod2-2:7000" in r.stdout
    r = cli(mesh, "node1", "-o", "wide", "--limit", "3")
    assert r.returncode == 0 and "COOKIE" in r.stdout.splitlines()[0]
    assert cli(mesh, "node1", "--since", "soon").returncode == 2
    assert cli(mesh, "node1", "--state", "sleepy").returncode == 2


def test_follow_shows_a_new_flow(mesh):
    sock = os.path.join(mesh.agents["node1"].run_dir, "admin.sock")
    f = subprocess.Popen([sys.executable, "-m", "agent.cli", "flows", "--socket", sock,
                          "--follow", "-o", "json", "--pod", "pod1-1", "--max-seconds", "8"],
                         stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the follower is connected
        transfer(mesh, "pod1-1", ip(mesh, "pod1-2"), 1000, 1000, seed=5)
        out, _ = f.communicate(timeout=20)
    finally:
        if f.poll() is None:
            f.kill()
            f.wait()
    events = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    closed = [e for e in events if e["event"] == "closed" and e["flow"]["role"] == "client"]
    assert closed, events
    assert closed[0]["flow"]["source"]["pod"] == "default/pod1-1"


def test_closed_flows_survive_agent_sigkill_and_restart(mesh):
    mesh.stop_agent("node1", signal.SIGKILL)
    # while the agent is down: a flow opens and closes, the ring keeps it
    res = transfer(mesh, "pod1-1", ip(mesh, "pod1-2"), 50_000, 40_000, seed=9)
    sent, received = expected_bytes(res, 50_000, 40_000, seed=9)
    mesh.start_agent("node1")
    assert mesh.status("node1")["datapath"]["how"] == "adopted"  # no bcc object now
    def match():
        fl = flows_json(mesh, "node1", "--state", "closed", "--pod", "pod1-1")
        return [f for f in legs(fl, "client") if (f["sent"], f["received"]) == (sent, received)]
    assert len(wait_for(match, "the flow closed while the agent was down")) == 1


def test_proxy_links_join_accepted_and_upstream_legs(mesh):
    client = mesh.cluster.pod("pod1-1").popen(TOOLS + ["session", ip(mesh, "pod1-2"), "7001"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True)
    try:
        port = json.loads(client.stdout.readline())["connected"][1]
        client.stdin.write("ping\n")
        client.stdin.flush()
        client.stdout.readline()
        # The proxy files its accepted/upstream cookie pair itself: the four
        # legs join, and the server leg names the client pod.
        def four_legs():
            fl = flows_json(mesh, "node1", "--state", "open")
            c = legs(fl, "client", source__port=port)
            srv = [f for f in legs(fl, "server", destination__pod="default/pod1-2")
                   if f["received"] == 5 and f["source"]["pod"] == "default/pod1-1"]
            return (fl, c[0], srv[0]) if c and c[0]["linked"] and srv else None
        fl, c, srv = wait_for(four_legs, "the four live legs, joined")
        acc = next(f for f in fl if f["cookie"] in c["linked"])
        up = next(f for f in fl if f["cookie"] in srv["linked"])
        assert (acc["role"], up["role"]) == ("proxy-outbound", "proxy-upstream")
        assert up["cookie"] in acc["linked"] and acc["cookie"] in up["linked"]
        assert srv["via"]["kind"] == "proxy"
        # linking again (what a restarted proxy might do) changes nothing
        link_flows(mesh.agents["node1"].pin_dir, acc["cookie"], up["cookie"])
        again = next(f for f in flows_json(mesh, "node1", "--state", "open")
                     if f["cookie"] == srv["cookie"])
        assert again["source"]["pod"] == "default/pod1-1"
    finally:
        client.stdin.close()
        client.wait(timeout=10)
    # at close, the link travels in the record and leaves the map
    fd = bpfsys.obj_get(os.path.join(mesh.agents["node1"].pin_dir, "ml_flow_links"))
    try:
        wait_for(lambda: not list(bpfsys.map_keys(fd, 8)), "ml_flow_links emptied")
    finally:
        os.close(fd)


def test_flow_counters_show_no_pressure(mesh):
    c = mesh.counters("node1")
    assert c["flow_tracked"] > 0 and c["flow_closed"] > 0
    assert c["flow_ringbuf_full"] == 0 and c["flow_evicted"] == 0 and c["flow_table_full"] == 0


def test_the_history_keeps_the_configured_number_of_closed_flows(mesh):
    """bpf.flowHistory bounds what `meshlet flows` can show of closed flows:
    more short connections than that, and the oldest go (the newest stay)."""
    before = mesh.admin("node1", "/v1/flows?state=closed&limit=100000")
    assert before["reader"]["closed_limit"] == HISTORY
    r = mesh.cluster.pod("pod1-1").run(TOOLS + ["connrate", ip(mesh, "pod2-1"), "7001", "--seconds", "20",
                                                               "--limit", str(HISTORY + 150)],
                                       check=False, timeout=60)
    made = json.loads(r.stdout.strip().splitlines()[-1])
    assert made["connections"] > HISTORY, made  # ~2 flows of node1 each (the pod's and the proxy's)
    wait_for(lambda: mesh.admin("node1", "/v1/flows?state=closed&limit=100000")["reader"]["closed_buffered"]
             == HISTORY, "the history filled up")
    after = mesh.admin("node1", "/v1/flows?state=closed&limit=100000")
    cookies = {f["cookie"] for f in after["flows"] if not f["open"]}
    assert 0 < len(cookies) <= HISTORY
    assert not cookies & {f["cookie"] for f in before["flows"] if not f["open"]}  # the oldest went
