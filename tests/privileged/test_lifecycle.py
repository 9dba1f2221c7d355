"""The mesh never opens during the agent's lifecycle (issue #12, items 1-3).

Real 2-node simulated clusters, real load, real faults.  Every test counts
where the connections of a pod went while something happened to its node's
agent: the ``serve`` tool in the server pod answers each connection with the
peer address it saw (tests/support/connload.py), so a connection through the
mesh shows the delivering node proxy's address (the node's gateway), a
connection that bypassed it shows the client pod's own address, and a
connection the kernel refused fails with EPERM.  Counts, never times.

Pods: pod1-1 and pod1-2 on node1, pod2-1 and pod2-2 on node2; pod1-2 is out
of the mesh (mesh: false).  Mode strict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.privileged import (
    TOOLS, agent_llvm, gateway, ip_of, probe, require_privileged, running_mesh, wait_for,
)

require_privileged()

from agent.datapath import bpfsys  # noqa: E402
from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

SERVE, ECHO = 7000, 7001
REPO_BPF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bpf")


class Load:
    """tests/support/connload.py running in a pod until stopped."""

    def __init__(self, mesh, src: str, dst_ip: str, workdir: str, count: int = 100_000,
                 max_seconds: float = 240):
        self.out = os.path.join(workdir, f"load-{src}-{time.monotonic_ns()}.json")
        self.stop_file = self.out + ".stop"
        self.proc = mesh.cluster.pod(src).popen(
            [sys.executable, "-m", "tests.support.connload", dst_ip, str(SERVE), "--out", self.out,
             "--stop-file", self.stop_file, "--count", str(count), "--max-seconds", str(max_seconds),
             "--every", "5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def read(self) -> dict:
        try:
            with open(self.out) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"total": 0, "peers": {}, "errors": {}, "done": False}

    def wait_more(self, n: int, what: str) -> dict:
        """Until ``n`` more connections than now were made."""
        base = self.read()["total"]
        return wait_for(lambda: (r := self.read())["total"] >= base + n and r, what, timeout=120)

    def stop_after_done(self) -> dict:
        """Wait until the bounded run (``count``) is over; its tallies."""
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.stop()

    def stop(self) -> dict:
        with open(self.stop_file, "w"):
            pass
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        r = self.read()
        assert r["done"], (r, self.proc.stderr.read() if self.proc.stderr else "")
        return r


class Sessions:
    """Long-lived echo connections from a pod; each says a line on demand."""

    def __init__(self, mesh, src: str, dst_ip: str, n: int):
        self.procs = []
        for _ in range(n):
            p = mesh.cluster.pod(src).popen(TOOLS + ["session", dst_ip, str(ECHO)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
            assert "connected" in p.stdout.readline()

    def say(self, msg: str) -> list[dict]:
        out = []
        for p in self.procs:
            p.stdin.write(msg + "\n")
            p.stdin.flush()
            out.append(json.loads(p.stdout.readline()))
        return out

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def attached(mesh, node: str) -> int:
    """Programs attached to the node's cgroup, over every hook meshlet uses."""
    from agent.datapath.loader import CGROUP_HOOKS

    fd = os.open(mesh.cluster.node(node).cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sum(len(bpfsys.prog_query(fd, t)) for t in {h.attach_type for h in CGROUP_HOOKS})
    finally:
        os.close(fd)


def cluster_2x2() -> Cluster:
    return Cluster(nodes=2, pods_per_node=2)


# --- item 1: a plain stop keeps the mesh closed; detaching is `meshlet uninstall` -----


def test_plain_stop_keeps_the_mesh_closed_and_uninstall_is_explicit(tmp_path):
    with running_mesh(cluster_2x2(), (("serve", SERVE), ("echo", ECHO)), mode="strict",
                      unmeshed={"pod1-2"}) as mesh:
        node2_gw, self_ip = gateway(mesh, "node2"), ip_of(mesh, "pod1-1")
        sessions = Sessions(mesh, "pod1-1", ip_of(mesh, "pod2-1"), 8)
        load = Load(mesh, "pod1-1", ip_of(mesh, "pod2-1"), str(tmp_path))
        try:
            assert sessions.say("before") == [{"echo": "before"}] * 8
            load.wait_more(20, "load before the stop")
            proxies = mesh.proxy_pids("node1")
            # A plain stop, as systemd or the kubelet sends it: no flag.
            assert mesh.stop_agent("node1", signal.SIGTERM) == 0
            load.wait_more(200, "load while the agent is stopped")
            # Strict mode still holds on the same node: plaintext from the
            # unmeshed pod never reaches the strict pod.
            assert probe(mesh, "pod1-2", ip_of(mesh, "pod1-1"), ECHO, timeout=1.5)["result"] != "data"
            # The doctor says what the stop left and what the next run does.
            from agent.datapath import abi
            from agent.doctor import check_pinned_datapath

            c = check_pinned_datapath(mesh.agents["node1"].pin_dir, mesh.cluster.node("node1").cgroup)
            assert c.ok and f"ABI {abi.ABI_VERSION}, attached, 1 pod(s) enrolled, 1 pods'" in c.detail, c
            # Detaching is explicit, and refused while pods are enrolled.
            r = mesh.uninstall("node1")
            assert r.returncode == 1 and "enrolled" in r.stderr and "--force" in r.stderr, r.stderr
            assert os.path.isdir(mesh.agents["node1"].pin_dir)
            load.wait_more(50, "load after the refused uninstall")
            assert sessions.say("agent-stopped") == [{"echo": "agent-stopped"}] * 8

            mesh.start_agent("node1")
            st = mesh.status("node1")
            assert st["datapath"]["how"] == "adopted"
            assert [w["pid"] for w in st["proxy"]] == proxies
            load.wait_more(50, "load after the restart")
        finally:
            res = load.stop()
            said = sessions.say("after")
            sessions.close()
        assert res["errors"] == {}, res
        assert res["peers"].get(self_ip, 0) == 0, f"bypassed the mesh: {res}"
        assert res["peers"] == {node2_gw: res["total"]}, res
        assert said == [{"echo": "after"}] * 8  # 0 of 8 long-lived streams reset

        # `uninstall` refuses while the agent runs, then removes everything.
        r = mesh.uninstall("node1", force=True)
        assert r.returncode == 1 and "running" in r.stderr, r.stderr
        assert mesh.stop_agent("node1", signal.SIGTERM) == 0
        r = mesh.uninstall("node1", force=True)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(mesh.agents["node1"].pin_dir)
        assert attached(mesh, "node1") == 0
        for pid in proxies:
            wait_for(lambda pid=pid: not _alive(pid), f"proxy worker {pid} gone")
        # Now, and only now, pod1-1's connections go direct (to the
        # unmeshed pod1-2: node2's pods are strict and drop plaintext).
        r = mesh.cluster.pod("pod1-1").run(
            TOOLS + ["transfer", ip_of(mesh, "pod1-2"), str(SERVE), "--up", "1", "--down", "1"],
            check=False, timeout=60)
        assert json.loads(r.stdout.strip().splitlines()[-1])["server_saw_peer"] == self_ip


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- item 3: a pod started while the agent is down gets no plaintext path -----------


def test_pod_created_while_the_agent_is_down_is_refused_not_bypassed(tmp_path):
    with running_mesh(cluster_2x2(), (("serve", SERVE),), unmeshed={"pod1-2"}) as mesh:
        node2_gw = gateway(mesh, "node2")
        dst = ip_of(mesh, "pod2-1")
        assert mesh.stop_agent("node1", signal.SIGTERM) == 0
        denied_before = mesh.counters("node1").get("unknown_denied", 0)
        # The pod appears, and starts talking, while no agent runs on its node.
        pod = mesh.cluster.add_pod("node1", "late")
        mesh.cluster.pod("late").run(TOOLS + ["serve", "--port", str(SERVE), "--max-seconds", "1"],
                                     check=False, timeout=30)  # (the pod works: it can listen)
        mesh.write_inventory()  # the inventory lists it (mesh: true), nobody enrolled it
        gap = Load(mesh, "late", dst, str(tmp_path), count=20).stop_after_done()
        assert gap["total"] == 20 and gap["peers"] == {}, f"bypassed the mesh: {gap}"
        assert gap["errors"] == {"EPERM": 20}, gap
        assert mesh.counters("node1")["unknown_denied"] - denied_before >= 20
        # Known pods are untouched meanwhile: the unmeshed one goes direct, as listed.
        direct = Load(mesh, "pod1-2", dst, str(tmp_path), count=5).stop_after_done()
        assert direct["peers"] == {ip_of(mesh, "pod1-2"): 5}, direct
        meshed = Load(mesh, "pod1-1", dst, str(tmp_path), count=5).stop_after_done()
        assert meshed["peers"] == {node2_gw: 5}, meshed

        mesh.start_agent("node1")
        wait_for(lambda: any(e["pod"] == "default/late" for e in mesh.status("node1")["enrolled"]),
                 "the late pod enrolled")
        assert mesh.status("node1")["datapath"]["guarded_cgroups"] == [
            os.path.dirname(pod.cgroup)]
        # Its first connections may wait for its new identity's certificate
        # (item 4's business); once one got through, all do.
        wait_for(lambda: Load(mesh, "late", dst, str(tmp_path), count=1).stop_after_done()["peers"],
                 "the late pod's first meshed connection", timeout=60, interval=0.5)
        after = Load(mesh, "late", dst, str(tmp_path), count=20).stop_after_done()
        assert after["peers"] == {node2_gw: 20} and after["errors"] == {}, after


def test_pod_removed_from_the_inventory_is_refused_until_listed_unmeshed(tmp_path):
    with running_mesh(cluster_2x2(), (("serve", SERVE),)) as mesh:
        dst = ip_of(mesh, "pod2-1")
        doc = mesh.inventory_doc()
        doc["pods"] = [p for p in doc["pods"] if p["name"] != "pod1-1"]
        mesh.write_inventory(doc)
        wait_for(lambda: all(e["pod"] != "default/pod1-1" for e in mesh.status("node1")["enrolled"]),
                 "pod1-1 unenrolled")
        r = Load(mesh, "pod1-1", dst, str(tmp_path), count=5).stop_after_done()
        assert r["errors"] == {"EPERM": 5} and r["peers"] == {}, r
        for p in doc["pods"]:
            p["mesh"] = True
        doc["pods"].append(dict(next(p for p in mesh.inventory_doc()["pods"] if p["name"] == "pod1-1"),
                                mesh=False))
        mesh.write_inventory(doc)
        wait_for(lambda: Load(mesh, "pod1-1", dst, str(tmp_path), count=1).stop_after_done()["peers"],
                 "pod1-1 let out unmeshed")
        r = Load(mesh, "pod1-1", dst, str(tmp_path), count=5).stop_after_done()
        assert r["peers"] == {ip_of(mesh, "pod1-1"): 5}, r


# --- item 2: an upgrade with changed eBPF code swaps programs without a window -----


def changed_bpf(tmp_path, name: str, edits: dict[str, tuple[str, str]]) -> str:
    """A copy of bpf/ with ``edits`` ({file: (old, new)}) applied, as a new
    meshlet version would ship it."""
    import shutil

    d = os.path.join(str(tmp_path), name)
    shutil.copytree(REPO_BPF, d)
    for rel, (old, new) in edits.items():
        path = os.path.join(d, rel)
        with open(path) as f:
            text = f.read()
        assert old in text, (rel, old)
        with open(path, "w") as f:
            f.write(text.replace(old, new, 1))
    return d


def pinned(mesh, node: str) -> dict:
    from agent.datapath.status import datapath_status

    st = datapath_status(mesh.agents[node].pin_dir)
    return {"progs": {p["name"]: p["id"] for p in st["programs"]},
            "links": {li["name"]: (li["id"], li["prog_id"], li["attached"]) for li in st["links"]},
            "maps": {m["name"]: m for m in st["maps"]}, "counters": st["counters"]}


def test_upgrade_with_changed_ebpf_code_has_no_window(tmp_path, monkeypatch):
    with running_mesh(cluster_2x2(), (("serve", SERVE), ("echo", ECHO)), unmeshed={"pod1-2"},
                      exclude_ports=(7999,)) as mesh:
        node2_gw, self_ip = gateway(mesh, "node2"), ip_of(mesh, "pod1-1")
        sessions = Sessions(mesh, "pod1-1", ip_of(mesh, "pod2-1"), 8)
        load = Load(mesh, "pod1-1", ip_of(mesh, "pod2-1"), str(tmp_path))
        try:
            load.wait_more(20, "load before the upgrade")
            # Loaded, upgraded, adopted: bcc's LLVM stays in the loader step (#13).
            assert agent_llvm(mesh, "node1") == []
            assert mesh.stop_agent("node1", signal.SIGTERM) == 0
            before = pinned(mesh, "node1")

            # A new version whose program the verifier refuses (and that
            # resizes a map): found before anything changes; the agent
            # refuses to start, the old datapath runs on with its old maps.
            monkeypatch.setenv("MESHLET_BPF_DIR", changed_bpf(tmp_path, "broken", {
                "include/meshlet.h": ("#define ML_MAX_EXCLUDES 256", "#define ML_MAX_EXCLUDES 512"),
                "tc.c": ("int ml_tc_to_pod(struct __sk_buff *skb)\n{",
                         "int ml_tc_to_pod(struct __sk_buff *skb)\n{\n"
                         "\tif (*(volatile char *)(long)skb->data == 1)\n\t\treturn ML_TC_DROP;")}))
            p = mesh.start_agent("node1", wait=False)
            assert p.wait(timeout=180) == 1
            assert "refused the datapath's programs" in mesh.agent_log("node1")
            mesh.agents["node1"].popen = None
            same = pinned(mesh, "node1")
            assert (same["progs"], same["links"]) == (before["progs"], before["links"])
            assert {n: m["id"] for n, m in same["maps"].items()} == \
                {n: m["id"] for n, m in before["maps"].items()}
            load.wait_more(50, "load after the refused upgrade")

            # A new version that changes code and a map's size: upgraded in place.
            monkeypatch.setenv("MESHLET_BPF_DIR", changed_bpf(tmp_path, "next", {
                "include/meshlet.h": ("#define ML_MAX_EXCLUDES 256", "#define ML_MAX_EXCLUDES 512"),
                "sock.c": ("int ml_connect4(struct bpf_sock_addr *ctx)\n{",
                           "/* next version */\nint ml_connect4(struct bpf_sock_addr *ctx)\n{")}))
            mesh.start_agent("node1")
            assert mesh.status("node1")["datapath"]["how"] == "upgraded"
            assert agent_llvm(mesh, "node1") == []
            load.wait_more(100, "load after the upgrade")
            after = pinned(mesh, "node1")
        finally:
            res = load.stop()
            said = sessions.say("after")
            sessions.close()
        assert res["errors"] == {}, res
        assert res["peers"].get(self_ip, 0) == 0, f"bypassed the mesh: {res}"
        assert res["peers"] == {node2_gw: res["total"]}, res
        assert said == [{"echo": "after"}] * 8  # 0 of 8 long-lived streams reset
        # The same links now run new programs; every program was replaced.
        assert {n: (i, a) for n, (i, _, a) in after["links"].items()} == \
            {n: (i, a) for n, (i, _, a) in before["links"].items()}
        assert all(after["progs"][n] != before["progs"][n] for n in before["progs"])
        assert {n: pid for n, (_, pid, _) in after["links"].items() if n.startswith("cgroup-")} == \
            {n: after["progs"][n.removeprefix("cgroup-")] for n in after["links"] if n.startswith("cgroup-")}
        # Unchanged maps were shared, the resized one migrated with its entries.
        assert after["maps"]["ml_flows"]["id"] == before["maps"]["ml_flows"]["id"]
        assert after["maps"]["ml_enrolled"]["id"] == before["maps"]["ml_enrolled"]["id"]
        assert after["maps"]["ml_excl_ports"]["max_entries"] == 512
        assert after["maps"]["ml_excl_ports"]["entries"] == 1  # port 7999, carried over
        assert after["counters"]["redirect4"] >= before["counters"]["redirect4"]
        # The next start with the same code adopts it.
        assert mesh.stop_agent("node1", signal.SIGTERM) == 0
        mesh.start_agent("node1")
        assert mesh.status("node1")["datapath"]["how"] == "adopted"
        assert agent_llvm(mesh, "node1") == []
