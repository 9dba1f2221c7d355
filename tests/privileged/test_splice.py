"""The same-node kernel splice end to end (bpf/splice.c, agent/proxy/splice.py):
one simulated node, real eBPF, a real proxy, pod processes on both ends.

A plaintext connection between two pods of the node, authorized and without
L7, is handed to the kernel: once the proxy has relayed what a pod sent it
so far, that pod's later messages go straight out of the proxy's socket
facing the other pod (sk_msg egress redirect).  What must still hold:
checksummed bytes both ways across a half-close, bytes sent before the
switch (through the proxy) and after it (redirected) in order, exact byte
counts in the access log and in the kernel flow table, a reset and a policy
change still reset both pods' sockets, and ``proxy.splice: false`` keeps the
userspace relay.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from tests.support.privileged import (
    policy_cli,
    require_privileged,
    running_mesh,
    transfer,
    wait_for,
    wait_policies_enforced,
    worker_counters,
)
from tests.support.splicepeer import held, release

require_privileged()

from agent.config import ProxyConfig  # noqa: E402
from agent.datapath import abi, bpfsys  # noqa: E402
from agent.datapath.splicemap import SpliceMaps  # noqa: E402
from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

DENY_POD1_1 = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: splice-deny-pod1-1, namespace: default}
spec:
  selector: {matchLabels: {app: pod1-2}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
"""


HERE = os.path.dirname(os.path.abspath(__file__))
PEER = [sys.executable, os.path.join(HERE, "..", "support", "splicepeer.py")]
PEER_PORT = 7100
OUTBOUND_PORT = ProxyConfig.__dataclass_fields__["outbound_port"].default  # the sim keeps the default


@pytest.fixture(scope="module")
def echo_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("splice") / "echo.log")


@pytest.fixture(scope="module")
def mesh(echo_log):
    server = PEER + ["serve", "--port", str(PEER_PORT), "--log", echo_log]
    with running_mesh(Cluster(nodes=1, pods_per_node=2), servers=(("serve", 7000),),
                      pod_servers=(("pod1-2",), server), max_seconds=600, splice=True) as m:
        yield m


def proxy_counters(mesh) -> dict[str, int]:
    return worker_counters(mesh, "node1")


def ip(mesh, pod: str) -> str:
    return mesh.cluster.pod(pod).ip4


def peer(mesh, *args: str) -> dict:
    r = mesh.cluster.pod("pod1-1").run(PEER + list(args), check=False, timeout=120)
    assert r.returncode == 0 and r.stdout, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def flows(mesh, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--socket",
                        os.path.join(mesh.agents["node1"].run_dir, "admin.sock"), "-o", "json", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_splice_maps_have_the_layout_abi_mirrors(mesh):
    sdir = os.path.join(mesh.agents["node1"].pin_dir, abi.SPLICE_DIR)
    key4 = ctypes.sizeof(abi.MlFlowKey)
    for name, key, value in ((abi.SPLICE_SOCKHASH, key4, 4), (abi.SPLICE_TARGETS, 8, 4),
                             (abi.SPLICE_PEERS, 8, ctypes.sizeof(abi.MlSplicePeer)),
                             (abi.SPLICE_ARM, key4, ctypes.sizeof(abi.MlSpliceArm)),
                             (abi.SPLICE_CNT, key4, ctypes.sizeof(abi.MlSpliceCnt))):
        fd = bpfsys.obj_get(os.path.join(sdir, name))
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        assert (info.key_size, info.value_size) == (key, value), name


def test_bulk_both_ways_with_half_close_is_spliced_and_counted(mesh):
    before, kbefore = proxy_counters(mesh), mesh.counters("node1")
    up, down, after, early = 16 * 1000 * 1000 + 7, 12 * 1000 * 1000 + 3, 4 * 1000 * 1000 + 1, 30_011
    # Both ways at once, then the client half-closes and the server keeps
    # sending ``after`` bytes and its report: every byte checked by sha256.
    # The client's first ``early`` bytes go out before the proxy has even
    # decided the connection (so through its relay), the rest after them.
    client = mesh.cluster.pod("pod1-1").popen(
        PEER + ["bulk", ip(mesh, "pod1-2"), str(PEER_PORT), "--up", str(up), "--down", str(down),
                "--after", str(after), "--early", str(early), "--hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with held(client):
        addrs = json.loads(client.stdout.readline())
        # The live client socket, in the kernel's own count: its first
        # bytes went to the proxy, everything after them straight across.
        # (Its real peer is the proxy's outbound listener: getpeername()
        # answers the original destination.)
        key = pod_key_of(addrs["local"], [mesh.cluster.nodes[0].gateway4, OUTBOUND_PORT])
        counts = SpliceMaps(mesh.agents["node1"].pin_dir).counts(key)
        hello = len(json.dumps({"mode": "bulk", "down": down, "after": after})) + 1
        assert counts is not None, addrs
        passed, redirected = counts
        assert passed + redirected == hello + up, counts
        assert passed >= hello + early and redirected > 0, counts
        # meshlet flows counts the redirected bytes of the open connection
        # too (the kernel adds them to its record only at close).  The live
        # record's own part is tcp_info as of the socket's last RTT sample,
        # which may trail its last ACK by a segment or so; the bytes it sent
        # first (the hello and ``early``) were acked and sampled long before.
        # Without the redirected bytes the leg shows ``passed`` + its SYN.
        live = [f for f in flows(mesh, "--pod", "default/pod1-1", "--state", "open")
                if f["role"] == "client" and f["source"]["port"] == addrs["local"][1]]
        assert len(live) == 1, live
        got = live[0]["bytes_acked"]
        assert redirected + hello + early <= got <= hello + up + 2, (live[0], counts)
        res = release(client)
    assert res["ok"], res
    after_c = proxy_counters(mesh)
    assert after_c["spliced"] == before["spliced"] + 1, (before, after_c)
    assert after_c["splice_failed"] == before["splice_failed"]
    kafter = mesh.counters("node1")
    assert kafter["splice_redirected"] > kbefore["splice_redirected"]  # the kernel carried bytes

    # The access log counts the kernel's bytes too.
    report = len(json.dumps({"received": up, "sha256": "0" * 64})) + 1
    sent, received = hello + up, len("ready\n") + down + after + report

    def entry():
        return [e for e in mesh.access_log("node1")
                if e.get("route") == "local" and e.get("dst_addr", "").endswith(f":{PEER_PORT}")]
    e = wait_for(entry, "the access log line of the spliced connection")[-1]
    assert (e["bytes_sent"], e["bytes_received"]) == (sent, received), e
    assert e["result"] == "ok", e

    # The kernel flow table saw the same bytes on the client pod's socket
    # (tcp_info: the connecting side's SYN and each FIN count one byte; the
    # bytes its app sent past its own TCP connection are added at close).
    def client_leg():
        return [f for f in flows(mesh, "--pod", "default/pod1-1", "--state", "closed")
                if f["role"] == "client" and f["destination"]["port"] == PEER_PORT]
    leg = wait_for(client_leg, "the closed client leg in the flow table")[-1]
    assert (leg["bytes_acked"], leg["bytes_received"]) == (sent + 2, received + 1), leg


def pod_key_of(local: list, peer: list) -> bytes:
    """The ml_splice key of a pod socket from its own addresses."""
    key = abi.MlFlowKey()
    key.family, s = abi.pack_addr(local[0])
    _, d = abi.pack_addr(peer[0])
    key.saddr_be[:], key.daddr_be[:] = s, d
    key.sport, key.dport = local[1], peer[1]
    return bytes(key)


def test_reset_propagates_through_a_spliced_connection(mesh):
    before = proxy_counters(mesh)
    res = peer(mesh, "reset", ip(mesh, "pod1-2"), str(PEER_PORT))
    assert res["outcome"] == "reset", res  # an RST, never a clean EOF
    after = proxy_counters(mesh)
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert after["spliced"] == before["spliced"] + 1, changed
    assert after["splice_failed"] == before["splice_failed"], changed


def test_policy_change_resets_both_pods_of_a_spliced_connection(mesh, tmp_path, echo_log):
    before = proxy_counters(mesh)
    client = mesh.cluster.pod("pod1-1").popen(
        PEER + ["echo", ip(mesh, "pod1-2"), str(PEER_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    f = tmp_path / "deny.yaml"
    f.write_text(DENY_POD1_1)
    kbefore = mesh.counters("node1")
    try:
        assert "connected" in client.stdout.readline()
        for i in range(3):
            client.stdin.write(f"ping{i}\n")
            client.stdin.flush()
            assert json.loads(client.stdout.readline()) == {"echo": f"ping{i}"}
        assert proxy_counters(mesh)["spliced"] == before["spliced"] + 1
        # after the switch: these went past the proxy, both ways
        assert mesh.counters("node1")["splice_redirected"] >= kbefore["splice_redirected"] + 4
        r = policy_cli(mesh, "node1", "apply", "-f", str(f))
        assert r.returncode == 0, r.stderr
        wait_policies_enforced(mesh)

        def closed():
            client.stdin.write("ping\n")
            client.stdin.flush()
            return "error" in json.loads(client.stdout.readline())
        wait_for(closed, "the spliced session to be reset by the policy", timeout=15, interval=0.2)

        # The server pod's socket was reset too, not closed cleanly.
        def server_outcome():
            try:
                with open(echo_log) as fh:
                    return [json.loads(x) for x in fh]
            except FileNotFoundError:
                return []
        assert wait_for(server_outcome, "the server's echo session to end")[-1] == {"echo": "reset"}
    finally:
        client.kill()
        client.wait()
        policy_cli(mesh, "node1", "delete", "splice-deny-pod1-1", "-n", "default")
    closes = [e for e in mesh.access_log("node1")
              if e.get("policy") == "default/splice-deny-pod1-1" and "closed" in e["reason"]]
    assert closes, "the proxy logged no policy close"


def worker_fds(mesh) -> dict[int, int]:
    return {w["pid"]: len(os.listdir(f"/proc/{w['pid']}/fd")) for w in mesh.status("node1")["proxy"]}


def test_splice_off_keeps_the_userspace_relay_and_the_toggle_leaks_no_fd(mesh):
    # (earlier tests' spliced connections have all ended: the workers hold
    # one set of map fds, which the toggle closes and opens again)
    fds = worker_fds(mesh)
    mesh.reconfigure(splice=False)
    try:
        assert not os.path.exists(os.path.join(mesh.agents["node1"].pin_dir, abi.SPLICE_DIR))
        before, kbefore = proxy_counters(mesh), mesh.counters("node1")
        res = transfer(mesh, "pod1-1", ip(mesh, "pod1-2"), up=3 << 20, down=2 << 20)
        assert res["ok"], res
        after = proxy_counters(mesh)
        assert after["spliced"] == before["spliced"]
        assert mesh.counters("node1")["splice_redirected"] == kbefore["splice_redirected"]
    finally:
        mesh.reconfigure(splice=True)
    assert worker_fds(mesh) == fds  # the same workers (adopted), nothing leaked
