"""Strict mode through clsact + cls_bpf, the attach kernels without tcx
(< 6.6: Debian 12's 6.1, Ubuntu 22.04's 5.15) get.  Forced here with
``bpf.tcAttach: clsact`` so a 6.18 machine proves the path too; on a 6.1
kernel (the Vagrant VM) ``auto`` picks it by itself.

Proof that strict mode works: a plaintext SYN from outside the mesh is
dropped (connect fails, ``strict_drop`` counts it) while meshed traffic
arrives.  Proof that the filters behave like the pinned links: they stay
attached while the agent is down, a restarted agent keeps them (same
program id, nothing re-added), and SIGTERM removes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.privileged import TOOLS, require_privileged, start_servers, wait_for

require_privileged()

from agent.datapath import bpfsys, netlink  # noqa: E402
from agent.datapath.loader import clsact_owner, resolve_tc_attach  # noqa: E402
from agent.datapath.probe import TRIVIAL_PROG  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    m = Mesh(cluster, tc_attach="clsact", namespaces={"default": {"mode": "strict"}})
    try:
        start_servers(cluster, (("serve", 7000), ("echo", 7001)))
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


def bpf_status(mesh, node: str) -> dict:
    ap = mesh.agents[node]
    r = mesh.cluster.node(node).run([sys.executable, "-m", "agent.cli", "bpf", "status",
                                     "--pin-dir", ap.pin_dir, "-o", "json"], check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def node_probe(mesh, node: str, ip: str, port: int = 7001) -> str:
    """A process on the node itself, outside any pod: outside the mesh."""
    out = mesh.cluster.node(node).run(TOOLS + ["probe", ip, str(port), "--timeout", "2"],
                                      check=False)
    return json.loads(out.stdout.strip().splitlines()[-1])["result"]


def transfer(mesh, src: str, dst: str) -> dict:
    r = mesh.cluster.pod(src).run(TOOLS + ["transfer", mesh.cluster.pod(dst).ip4, "7000",
                                           "--up", str(1 << 20), "--down", str(1 << 20),
                                           "--timeout", "20"], check=False, timeout=60)
    assert r.stdout, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def filters(mesh, node: str) -> dict[str, int | None]:
    st = bpf_status(mesh, node)
    return {f["ifname"]: f["prog_id"] for f in st["tc"]["clsact_filters"]}


def test_strict_mode_goes_through_clsact(mesh):
    st = bpf_status(mesh, "node2")
    assert st["tc"]["attach"] == "clsact", st["tc"]
    assert not [li for li in st["links"] if li["name"].startswith("tc-")]
    tc_prog = next(p["id"] for p in st["programs"] if p["name"] == "ml_tc_to_pod")
    fs = st["tc"]["clsact_filters"]
    assert len(fs) == 2 and all(f["prog_id"] == tc_prog and f["current"] for f in fs), fs
    assert mesh.status("node2")["datapath"]["tc_attach"] == "clsact"


def test_plaintext_from_outside_is_dropped_and_meshed_traffic_arrives(mesh):
    before = mesh.counters("node2")["strict_drop"]
    assert node_probe(mesh, "node2", mesh.cluster.pod("pod2-1").ip4) == "connect_error"
    assert node_probe(mesh, "node2", mesh.cluster.pod("pod2-1").ip6) == "connect_error"
    assert mesh.counters("node2")["strict_drop"] - before >= 2
    gw2 = mesh.cluster.node("node2").gateway4
    for src in ("pod1-1", "pod2-2"):  # cross node and same node
        r = transfer(mesh, src, "pod2-1")
        assert r["ok"] and r["server_saw_peer"] == gw2, r


def test_filters_survive_the_agent_and_are_kept_on_restart(mesh):
    held = filters(mesh, "node2")
    assert len(held) == 2
    mesh.stop_agent("node2", signal.SIGKILL)
    try:
        # nobody is watching: the kernel still enforces
        assert filters(mesh, "node2") == held
        assert node_probe(mesh, "node2", mesh.cluster.pod("pod2-2").ip4) == "connect_error"
    finally:
        mesh.start_agent("node2")
    st = mesh.status("node2")
    assert st["datapath"]["how"] == "adopted" and st["datapath"]["tc_attach"] == "clsact"
    assert filters(mesh, "node2") == held  # the same programs: kept, not re-added
    assert transfer(mesh, "pod1-2", "pod2-2")["ok"]


def test_sigterm_keeps_the_filters_and_uninstall_removes_them():
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    m = Mesh(cluster, tc_attach="clsact", namespaces={"default": {"mode": "strict"}})
    try:
        m.init_ca()
        m.write_inventory()
        m.write_configs()
        m.start_agent("node1")
        assert len(filters(m, "node1")) == 1
        assert m.stop_agent("node1", signal.SIGTERM) == 0
        node = cluster.node("node1")

        def tc_show() -> str:
            return node.run(["tc", "-j", "filter", "show", "dev", cluster.pod("pod1-1").host_veth,
                             "egress"], check=False).stdout

        assert "meshlet:" in tc_show()  # a stop never opens strict mode
        r = m.uninstall("node1", force=True)
        assert r.returncode == 0, r.stderr
        out = tc_show()
        assert "ml_tc_to_pod" not in out and "meshlet:" not in out, out
    finally:
        m.down()
        cluster.down()


def test_replace_swaps_the_program_in_one_filter():
    """What a reload relies on: replacing our filter changes its program in
    place (one filter before, during and after), in a namespace of our own."""
    name = "meshlet-test-clsact"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def body() -> list:
            import socket

            idx = socket.if_nametoindex("lo")
            a = bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, TRIVIAL_PROG)
            b = bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, TRIVIAL_PROG)
            try:
                netlink.clsact_attach(idx, a, "meshlet:/test")
                first = netlink.clsact_filters("meshlet:/test")
                netlink.clsact_attach(idx, b, "meshlet:/test")
                second = netlink.clsact_filters("meshlet:/test")
                other = netlink.clsact_filters("meshlet:/other")
                netlink.clsact_detach(idx)
                netlink.clsact_detach(idx)  # twice is fine
                return [first, second, other, netlink.clsact_filters("meshlet:/test"),
                        bpfsys.prog_info(a).id, bpfsys.prog_info(b).id]
            finally:
                os.close(a)
                os.close(b)
        from agent.datapath.probe import _run_in_netns

        out: list = []
        _run_in_netns(f"/run/netns/{name}", lambda: out.extend(body()))
        first, second, other, after, id_a, id_b = out
        assert [f.prog_id for f in first.values()] == [id_a]
        assert [f.prog_id for f in second.values()] == [id_b]
        assert other == {} and after == {}
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_auto_picks_tcx_where_the_kernel_has_it():
    """On a kernel with tcx, 'auto' is tcx; without (the VM's 6.1), clsact."""
    from agent import doctor

    want = "tcx" if doctor.kernel_version(os.uname().release) >= (6, 6) else "clsact"
    assert resolve_tc_attach("auto") == want
    assert clsact_owner("/sys/fs/bpf/meshlet/node1/") == "meshlet:/sys/fs/bpf/meshlet/node1"


RELOAD = r"""
import dataclasses, json, socket, sys
from agent.datapath import bpfsys, netlink
from agent.datapath.loader import Datapath, DatapathSpec, TC_PROG, clsact_owner
pin_dir, cgroup = sys.argv[1], sys.argv[2]
idx = socket.if_nametoindex("vreload0")
spec = DatapathSpec(node="reload", pin_dir=pin_dir, cgroup=cgroup, redirect_ip4="10.0.0.1",
                    redirect_ip6=None, outbound_port=15001, mesh_mark=0x4000, tc_attach="clsact")
def filt():
    return {i: f.prog_id for i, f in netlink.clsact_filters(clsact_owner(pin_dir)).items()}
def pinned_prog():
    fd = bpfsys.obj_get(pin_dir + "/progs/" + TC_PROG)
    try:
        return bpfsys.prog_info(fd).id
    finally:
        import os; os.close(fd)
out = {}
d = Datapath(spec)
out["first"] = d.open()
out["errors"] = d.sync_tc({idx: "vreload0"})
out["loaded"] = (filt(), pinned_prog())
d.close()
# another version of the C (the L4 policy map's size differs): upgraded in place
d = Datapath(dataclasses.replace(spec, max_l4_rules=4096))
out["second"] = d.open()
out["after_open"] = filt()          # the old program still guards the pod
d.sync_tc({idx: "vreload0"})
out["after_sync"] = (filt(), pinned_prog())
d.teardown()
out["after_teardown"] = filt()
print(json.dumps(out))
"""


def test_a_reload_swaps_the_program_without_a_gap(tmp_path):
    """A datapath of another version is upgraded in place: its clsact filter
    keeps the old program until sync_tc swaps in the new one (never no
    filter), and teardown removes it."""
    from agent import cgroup as cg

    name = f"meshlet-test-reload-{os.getpid()}"
    pin_dir = f"/sys/fs/bpf/{name}"
    cgdir = os.path.join(cg.cgroup2_mount(), name)
    os.mkdir(cgdir)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "vreload0", "type", "veth", "peer",
                        "name", "vreload1"], check=True)
        # nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs
        r = subprocess.run(["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c", RELOAD,
                            pin_dir, cgdir], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
        from agent.datapath.loader import remove_pins

        remove_pins(pin_dir)
        os.rmdir(cgdir)
    assert out["first"] == "loaded" and out["errors"] == []
    (filters1, prog1) = out["loaded"]
    assert list(filters1.values()) == [prog1]
    assert out["second"] == "upgraded"           # other C: new programs, maps carried over
    assert list(out["after_open"].values()) == [prog1]
    filters2, prog2 = out["after_sync"]
    assert prog2 != prog1 and list(filters2.values()) == [prog2]
    assert out["after_teardown"] == {}
