"""End to end on a real kernel: a 2-node simulated cluster with one agent per
node, real eBPF redirect, real proxy processes, real traffic between pods.

Proof that a connection went through the mesh: the server reports the peer
address it saw.  A direct pod-to-pod connection shows the client pod's IP; a
meshed one shows the address of the delivering node proxy (the node side of
the pod's veth, 10.244.<n>.1).  Kernel counters and the proxies' access logs
are checked too.

Pods: pod1-1, pod1-2, pod1-3 on node1; pod2-1, pod2-2, pod2-3 on node2.
pod1-3 is not enrolled (mesh: false).  Port 7999 and pod2-3's addresses are
excluded from the mesh.
Every pod runs a transfer server on 7000 (and 7999) and an echo server on 7001.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.privileged import (
    TOOLS, gateway, ip_of, probe, require_privileged, start_servers, transfer, wait_for,
)

require_privileged()

from agent.datapath import bpfsys  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged

EXCLUDED = 7999


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pods_per_node=3).up()
    m = Mesh(cluster, exclude_ports=(EXCLUDED,), unmeshed={"pod1-3"},
             exclude_cidrs=(f"{cluster.pod('pod2-3').ip4}/32", f"{cluster.pod('pod2-3').ip6}/128"))
    try:
        start_servers(cluster, (("serve", 7000), ("serve", EXCLUDED), ("echo", 7001)))
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


# --- redirect and relay -----------------------------------------------------------

def test_same_node_goes_through_the_proxy(mesh):
    before = mesh.counters("node1")
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod1-2"), up=8 << 20, down=6 << 20)
    assert r["ok"], r
    # delivered by node1's proxy, not by pod1-1 directly
    assert r["server_saw_peer"] == gateway(mesh, "node1")
    after = mesh.counters("node1")
    # exactly one redirect: the proxy's own upstream connect was not redirected again
    assert after["redirect4"] - before["redirect4"] == 1
    assert after["flow_recorded"] - before["flow_recorded"] == 1
    entries = [e for e in mesh.access_log("node1")
               if e.get("dst", {}).get("pod") == "default/pod1-2" or
               "pod1-2" in json.dumps(e)]
    assert entries, mesh.access_log("node1")


def test_cross_node_goes_through_both_proxies(mesh):
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=5 << 20, down=7 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == gateway(mesh, "node2")
    out = json.dumps(mesh.access_log("node1"))
    inbound = json.dumps(mesh.access_log("node2"))
    assert "tunnel" in out and "pod2-1" in out
    assert "inbound" in inbound and "pod1-1" in inbound


def test_cross_node_reverse_direction(mesh):
    r = transfer(mesh, "pod2-2", ip_of(mesh, "pod1-1"), up=1 << 20, down=4 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == gateway(mesh, "node1")


def test_ipv6_is_redirected(mesh):
    before = mesh.counters("node1")
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-2", v6=True), up=2 << 20, down=2 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == gateway(mesh, "node2", v6=True)
    assert mesh.counters("node1")["redirect6"] - before["redirect6"] == 1
    r = transfer(mesh, "pod1-2", ip_of(mesh, "pod1-1", v6=True), up=1 << 20, down=1 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == gateway(mesh, "node1", v6=True)


@pytest.mark.parametrize("v6", [False, True])
def test_redirect_is_invisible_to_getpeername(mesh, v6):
    dst = ip_of(mesh, "pod2-1", v6=v6)
    client = mesh.cluster.pod("pod1-1").popen(TOOLS + ["session", dst, "7001"],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              text=True)
    try:
        hello = json.loads(client.stdout.readline())
        assert hello["peer"] == [dst, 7001], hello
        client.stdin.write("ping\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"echo": "ping"}
    finally:
        client.kill()
        client.wait()


def test_half_close_keeps_the_other_direction(mesh):
    # transfer() shuts down its write side first and only then reads the
    # server's answer: a relay without half-close would lose it.
    r = transfer(mesh, "pod1-2", ip_of(mesh, "pod2-2"), up=0, down=3 << 20)
    assert r["ok"], r


def test_unenrolled_pod_is_not_redirected(mesh):
    before = mesh.counters("node1")
    r = transfer(mesh, "pod1-3", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == ip_of(mesh, "pod1-3")
    assert mesh.counters("node1")["redirect4"] == before["redirect4"]


def test_excluded_port_bypasses(mesh):
    before = mesh.counters("node1")
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod1-2"), port=EXCLUDED, up=1 << 20, down=1 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == ip_of(mesh, "pod1-1")
    after = mesh.counters("node1")
    assert after["bypass_port"] - before["bypass_port"] == 1
    assert after["redirect4"] == before["redirect4"]


@pytest.mark.parametrize("v6", [False, True])
def test_excluded_cidr_bypasses(mesh, v6):
    before = mesh.counters("node1")
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-3", v6=v6), up=1 << 20, down=1 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == ip_of(mesh, "pod1-1", v6=v6)
    after = mesh.counters("node1")
    assert after["bypass_cidr"] - before["bypass_cidr"] == 1
    assert after["redirect4"] + after["redirect6"] == before["redirect4"] + before["redirect6"]


@pytest.mark.parametrize("dst", ["pod1-2", "pod2-2"])
def test_closed_port_fails_for_the_client(mesh, dst):
    # No listener on 7100: without the mesh the client gets ECONNREFUSED;
    # through it, the proxy resets the accepted connection.  A hang would show
    # as "timeout" (the probe's bound), which is a failure.
    r = probe(mesh, "pod1-1", ip_of(mesh, dst), 7100, timeout=3.0)
    assert r["result"] in ("reset", "eof", "connect_error"), r
    assert r["result"] != "timeout"


def test_unreachable_destination_fails_for_the_client(mesh):
    # 10.244.1.200 is in node1's pod range but no pod has it: the proxy's
    # upstream connect fails (no route/host) and the client is reset.
    r = probe(mesh, "pod1-1", "10.244.1.200", 7000, timeout=6.0)
    assert r["result"] in ("reset", "eof", "connect_error"), r


# --- the agent's lifecycle --------------------------------------------------------

def attachments(mesh, node: str) -> dict[int, list[int]]:
    cg = mesh.cluster.node(node).cgroup
    fd = os.open(cg, os.O_RDONLY)
    try:
        return {t: bpfsys.prog_query(fd, t) for t in (
            bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.ATTACH_CGROUP_INET6_CONNECT,
            bpfsys.ATTACH_CGROUP_SOCK_OPS, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME,
            bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME)}
    finally:
        os.close(fd)


def node_hooks(mesh, node: str = "node1") -> tuple:
    """The cgroup hooks the node's datapath attaches: splice.c's sock_ops
    too where the same-node splice is on (proxy.splice: auto, the default,
    on a kernel that has it: its maps are pinned)."""
    from agent.datapath import abi
    from agent.datapath.loader import CGROUP_HOOKS, SPLICE_HOOK

    spliced = os.path.isdir(os.path.join(mesh.agents[node].pin_dir, abi.SPLICE_DIR))
    return CGROUP_HOOKS + ((SPLICE_HOOK,) if spliced else ())


def expected_attachments(mesh) -> dict[int, int]:
    from collections import Counter

    return dict(Counter(h.attach_type for h in node_hooks(mesh)))


def test_agent_sigkill_and_restart_keeps_traffic(mesh):
    before_att = attachments(mesh, "node1")
    assert {t: len(ids) for t, ids in before_att.items()} == expected_attachments(mesh), before_att
    proxies = mesh.proxy_pids("node1")
    client = mesh.cluster.pod("pod1-1").popen(
        TOOLS + ["session", ip_of(mesh, "pod2-1"), "7001"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert "connected" in client.stdout.readline()

        def say(msg: str) -> dict:
            client.stdin.write(msg + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())

        assert say("before") == {"echo": "before"}
        mesh.stop_agent("node1", signal.SIGKILL)
        assert say("agent-dead") == {"echo": "agent-dead"}
        # new connections are still redirected while the agent is down
        r = transfer(mesh, "pod1-2", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r

        mesh.start_agent("node1")
        st = mesh.status("node1")
        assert st["datapath"]["how"] == "adopted"
        assert [w["pid"] for w in st["proxy"]] == proxies
        assert all(w["adopted"] for w in st["proxy"])
        assert attachments(mesh, "node1") == before_att  # same programs, no duplicates
        assert say("after") == {"echo": "after"}
        r = transfer(mesh, "pod1-2", ip_of(mesh, "pod1-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node1"), r
    finally:
        client.kill()
        client.wait()


def set_inventory(mesh, doc=None, text=None):
    gen = mesh.status("node1")["generation"]
    mesh.write_inventory(doc=doc, text=text)
    return gen


def test_removed_pod_is_no_longer_redirected(mesh):
    doc = mesh.inventory_doc()
    doc["pods"] = [p for p in doc["pods"] if p["name"] != "pod1-1"]
    try:
        set_inventory(mesh, doc)
        wait_for(lambda: all(e["pod"] != "default/pod1-1"
                             for e in mesh.status("node1")["enrolled"]), "pod1-1 unenrolled")
        # Unknown under the pods' cgroup subtree now: refused, never direct
        # (tests/privileged/test_lifecycle.py; mesh: false lets a pod out).
        r = probe(mesh, "pod1-1", ip_of(mesh, "pod1-2"), 7001)
        assert r["result"] == "connect_error" and r["errno"] == 1, r  # EPERM
    finally:
        mesh.write_inventory()
        wait_for(lambda: any(e["pod"] == "default/pod1-1"
                             for e in mesh.status("node1")["enrolled"]), "pod1-1 back")
    r = transfer(mesh, "pod1-1", ip_of(mesh, "pod1-2"), up=1 << 20, down=1 << 20)
    assert r["server_saw_peer"] == gateway(mesh, "node1"), r


def test_malformed_inventory_keeps_previous_state(mesh):
    good = mesh.status("node1")
    with open(mesh.inventory_path) as f:
        text = f.read()
    broken = text.replace(ip_of(mesh, "pod1-2"), "10.244.1.300", 1)
    assert broken != text
    line = next(i for i, ln in enumerate(broken.splitlines(), 1) if "10.244.1.300" in ln)
    try:
        mesh.write_inventory(text=broken)
        st = wait_for(lambda: (s := mesh.status("node1"))["inventory"]["error"] and s,
                      "the inventory error to be reported")
        err = st["inventory"]["error"]
        assert f"inventory.yaml:{line}:" in err and "ips" in err, err
        assert st["enrolled"] == good["enrolled"]
        r = transfer(mesh, "pod1-1", ip_of(mesh, "pod1-2"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node1"), r
    finally:
        mesh.write_inventory()
        wait_for(lambda: mesh.status("node1")["inventory"]["error"] is None, "recovery")


def test_strict_mode_refuses_plaintext_from_outside_the_mesh(mesh):
    assert probe(mesh, "pod1-3", ip_of(mesh, "pod2-1"), 7001)["result"] == "data"
    doc = mesh.inventory_doc()
    doc["namespaces"] = {"default": {"mode": "strict"}}
    try:
        set_inventory(mesh, doc)
        wait_for(lambda: all(w["mode"] == "strict"
                             for w in mesh.admin("node2", "/v1/workloads")["workloads"]),
                 "strict mode on node2")
        before = mesh.counters("node2")
        # pod1-3 is not in the mesh: its plaintext SYN to pod2-1 is dropped
        r = probe(mesh, "pod1-3", ip_of(mesh, "pod2-1"), 7001, timeout=2.0)
        assert r["result"] == "connect_error", r
        r6 = probe(mesh, "pod1-3", ip_of(mesh, "pod2-1", v6=True), 7001, timeout=2.0)
        assert r6["result"] == "connect_error", r6
        # a process on node2 itself, outside any pod, is outside the mesh too
        node2 = mesh.cluster.node("node2")
        out = node2.run(TOOLS + ["probe", ip_of(mesh, "pod2-1"), "7001", "--timeout", "2"],
                        check=False)
        assert json.loads(out.stdout)["result"] == "connect_error", out.stdout
        assert mesh.counters("node2")["strict_drop"] - before["strict_drop"] >= 3
        # meshed traffic still arrives, same node and cross node
        r = transfer(mesh, "pod1-1", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
        r = transfer(mesh, "pod2-2", ip_of(mesh, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(mesh, "node2"), r
        # excluded ports stay reachable directly
        r = transfer(mesh, "pod1-3", ip_of(mesh, "pod2-1"), port=EXCLUDED, up=1000, down=1000)
        assert r["ok"], r
    finally:
        mesh.write_inventory()
        wait_for(lambda: all(w["mode"] == "permissive"
                             for w in mesh.admin("node2", "/v1/workloads")["workloads"]),
                 "permissive again")
    assert probe(mesh, "pod1-3", ip_of(mesh, "pod2-1"), 7001)["result"] == "data"


def test_bpf_status_cli_reads_pins(mesh):
    ap = mesh.agents["node1"]
    # In the node's netns, as on a real node: clsact filters (kernels without
    # tcx) are found through netlink there; tcx links are pins, seen anywhere.
    r = mesh.cluster.node("node1").run([sys.executable, "-m", "agent.cli", "bpf", "status",
                                        "--pin-dir", ap.pin_dir, "-o", "json"], check=False)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    from agent.datapath import abi

    hooks = tuple(h.name for h in node_hooks(mesh))
    assert {"ml_connect4", "ml_connect6", "ml_sockops", "ml_getpeername4",
            "ml_getpeername6"} <= set(hooks)
    names = {p["name"] for p in st["programs"]}
    # splice.c's sk_msg program is no cgroup hook (attached to its SOCKHASH)
    splice_msg = {abi.SPLICE_PROG} if abi.SPLICE_OPS in hooks else set()
    assert set(hooks) | {"ml_tc_to_pod"} | splice_msg == names
    links = {li["name"]: li for li in st["links"]}
    assert all(links[f"cgroup-{n}"]["attached"] for n in hooks)
    # pod1-1, pod1-2 enrolled: strict mode's program on both veths, through
    # tcx links where the kernel has them, clsact filters otherwise (< 6.6)
    tcx_links = sum(1 for n in links if n.startswith("tc-"))
    if st["tc"]["attach"] == "tcx":
        assert tcx_links == 2 and st["tc"]["clsact_filters"] == []
    else:
        assert st["tc"]["attach"] == "clsact", st["tc"]
        assert tcx_links == 0 and len(st["tc"]["clsact_filters"]) == 2
    maps = {m["name"]: m for m in st["maps"]}
    assert maps["ml_enrolled"]["entries"] == 2
    assert maps["ml_pod_ips"]["entries"] == 4  # two pods, IPv4 + IPv6 each


def test_uninstall_after_a_stop_removes_everything():
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    m = Mesh(cluster)
    try:
        m.init_ca()
        m.write_inventory()
        m.write_configs()
        m.start_agent("node1")
        ap = m.agents["node1"]
        proxies = m.proxy_pids("node1")
        assert os.path.isdir(ap.pin_dir) and proxies
        assert m.stop_agent("node1", signal.SIGTERM) == 0
        assert os.path.isdir(ap.pin_dir)  # a stop never opens the mesh (tests/privileged/test_lifecycle.py)
        r = m.uninstall("node1", force=True)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(ap.pin_dir)
        assert all(len(ids) == 0 for ids in attachments(m, "node1").values())
        for pid in proxies:
            assert not os.path.exists(f"/proc/{pid}") or \
                _zombie(pid)
    finally:
        m.down()
        cluster.down()


def test_run_refuses_a_missing_cgroup_and_attaches_nothing(tmp_path):
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    m = Mesh(cluster, workdir=str(tmp_path))
    try:
        m.init_ca()
        m.write_inventory()
        doc = m.config_doc(cluster.node("node1"))
        doc["cgroup"] = doc["cgroup"] + "/does-not-exist"
        import yaml
        with open(m.agents["node1"].config, "w") as f:
            yaml.safe_dump(doc, f)
        r = cluster.node("node1").run([sys.executable, "-m", "agent.cli", "run", "--config",
                                       m.agents["node1"].config], check=False, timeout=60)
        assert r.returncode == 1
        assert "does-not-exist" in r.stderr and "cgroup" in r.stderr
        assert not os.path.exists(m.agents["node1"].pin_dir)
    finally:
        m.down()
        cluster.down()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


CRAFTED_TUNNEL = """
import json, socket, sys
from agent.proxy import tunnel
dst_ip, node_ip = sys.argv[1], sys.argv[2]
req = tunnel.TunnelRequest(dst=tunnel.Address(socket.AF_INET, dst_ip, 7001),
                           identity="spiffe://cluster.local/ns/default/sa/admin",
                           namespace="default", name="forged", src=None)
try:
    s = socket.create_connection((node_ip, 15008), timeout=3)
    s.sendall(tunnel.encode_request(req) + b"sneaky\\n")
    dec, out = tunnel.ResponseDecoder(), tunnel.NEED_MORE
    while out is tunnel.NEED_MORE:
        chunk = s.recv(4096)
        if not chunk:
            print(json.dumps({"result": "eof"})); sys.exit()
        out = dec.feed(chunk)
    print(json.dumps({"result": "response", "status": out.message.status.name}))
except ConnectionResetError:
    print(json.dumps({"result": "reset"}))
except OSError as e:
    print(json.dumps({"result": "error", "error": str(e)}))
"""


@pytest.mark.parametrize("src", ["pod1-3", "pod1-1"])
def test_tunnel_port_is_not_a_way_around_the_mesh(mesh, src):
    # A forged tunnel header sent straight to node2's tunnel port, from a pod
    # outside the mesh (pod1-3) or inside it (pod1-1, whose connection the
    # kernel steers into its own node proxy), never reaches pod2-1.
    node2 = mesh.cluster.node("node2")
    r = mesh.cluster.pod(src).run([sys.executable, "-c", CRAFTED_TUNNEL, ip_of(mesh, "pod2-1"),
                                   node2.address], check=False, timeout=30)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["result"] in ("response", "reset", "eof"), res
    if res["result"] == "response":
        assert res["status"] != "OK", res
    assert "forged" not in json.dumps(
        [e for e in mesh.access_log("node2") if e.get("result") == "ok"])
