"""A DaemonSet upgrade that drops nothing (issue #11 item 4): two agents on
one node, the hand-over lease (agent/handover.py), on a real kernel.

node1's agent (A) is replaced the way a RollingUpdate with ``maxSurge: 1``
does it: the new agent pod (B: its own run dir, its own cgroup among the
pods', the same pins and lease) starts while A runs, its workers join A's
listeners with SO_REUSEPORT, it takes the lease once they are ready; then A
gets SIGTERM (the kubelet deletes the old pod once the new one is Ready),
its workers stop accepting and drain, and it exits.  Meanwhile new
connections flow same-node, out of node1 and into node1, and long-lived
streams stay open across the hand-over.

Counted as in test_lifecycle.py: the ``serve`` tool answers each connection
with the peer it saw, so a connection through the mesh shows the delivering
node proxy's address and one that bypassed it the client pod's own.  Counts,
never times.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.privileged import (
    TOOLS,
    EchoSession,
    gateway,
    ip_of,
    meshlet,
    require_privileged,
    running_mesh,
    wait_for,
)

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.topology import exec_in  # noqa: E402
from tests.privileged.test_lifecycle import Load, pinned  # noqa: E402

pytestmark = pytest.mark.privileged

SERVE, ECHO = 7000, 7001
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loads(mesh, workdir: str) -> dict[str, Load]:
    """New connections back to back: out of node1, into node1, within node1."""
    return {
        "out": Load(mesh, "pod1-1", ip_of(mesh, "pod2-1"), workdir),
        "in": Load(mesh, "pod2-2", ip_of(mesh, "pod1-2"), workdir),
        "same": Load(mesh, "pod1-2", ip_of(mesh, "pod1-1"), workdir),
    }


def wait_all(ls: dict[str, Load], n: int, what: str) -> None:
    for k, load in ls.items():
        load.wait_more(n, f"{k}: {what}")


def check_meshed(mesh, results: dict[str, dict]) -> None:
    """0 failed connections, 0 bypassed: every one delivered by the proxy of
    the destination's node."""
    expect = {"out": gateway(mesh, "node2"), "in": gateway(mesh, "node1"), "same": gateway(mesh, "node1")}
    for k, r in results.items():
        assert r["errors"] == {}, (k, r)
        assert r["peers"] == {expect[k]: r["total"]}, (k, r)  # not the client's own address: no bypass


def probe_ready(mesh, key: str) -> tuple[int, str]:
    """The DaemonSet's readiness probe of agent ``key``'s pod: exit code, output."""
    r = subprocess.run([sys.executable, "-m", "agent.probe", "ready", "--run-dir", mesh.agents[key].run_dir],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    return r.returncode, r.stdout.strip()


def connect_from(mesh, cgroup: str, node: str = "node1") -> dict:
    """A connection to node2's tunnel port from a process of ``node`` in
    ``cgroup``: the unknown-pod guard refuses it (EPERM) in a pods' directory
    unless the agent allowed that cgroup."""
    n, peer = mesh.cluster.node(node), mesh.cluster.node("node2")
    r = exec_in(n.netns, cgroup, TOOLS + ["probe", peer.address, "15008", "--timeout", "3"], check=False)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kernel_ids(p: dict) -> tuple:
    return (p["progs"], p["links"], {n: m["id"] for n, m in p["maps"].items()})


def test_daemonset_upgrade_hands_node1_over_dropping_nothing(tmp_path):
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("serve", SERVE), ("echo", ECHO)),
                      mode="strict", workers=2) as mesh:
        a = mesh.agents["node1"]
        old_workers = set(mesh.proxy_pids("node1"))
        st_a = mesh.status("node1")
        assert st_a["handover"]["role"] == "owner" and len(old_workers) == 2
        before = pinned(mesh, "node1")
        ls = loads(mesh, str(tmp_path))
        sessions = [EchoSession(mesh, "pod1-1", ip_of(mesh, "pod2-1"), ECHO) for _ in range(3)]
        sessions += [EchoSession(mesh, "pod2-2", ip_of(mesh, "pod1-2"), ECHO) for _ in range(3)]
        try:
            wait_all(ls, 20, "load before the upgrade")

            # The new pod starts beside the old one and takes the lease once its workers are ready.
            b = mesh.start_successor("node1")
            st_b = mesh.status(b)
            assert st_b["datapath"]["how"] == "adopted", mesh.agent_log(b)[-6000:]
            new_workers = {w["pid"] for w in st_b["proxy"]}
            assert len(new_workers) == 2 and not new_workers & old_workers
            assert st_b["handover"]["owner"] == st_b["handover"]["instance"]
            # B's pod sits among the pods' cgroups, where the guard refuses a stranger; B is allowed
            # (the owner A let it in before its workers started), and so is A while it drains
            stranger = os.path.join(mesh.cluster.node("node1").pods_cgroup, "stranger")
            os.makedirs(stranger, exist_ok=True)
            try:
                assert connect_from(mesh, stranger).get("errno") == errno.EPERM
            finally:
                os.rmdir(stranger)
            assert connect_from(mesh, mesh.agents[b].cgroup).get("errno") != errno.EPERM
            wait_for(lambda: mesh.status("node1")["handover"]["role"] == "superseded", "A superseded")
            # the exec probes: B ready, A not (the kubelet now deletes the old pod)
            assert probe_ready(mesh, b) == (0, "ok")
            wait_for(lambda: probe_ready(mesh, "node1")[0] == 1, "A's probe says not ready")
            assert "superseded by agent" in probe_ready(mesh, "node1")[1]
            out = meshlet(mesh, "node1", "status").stdout
            assert f"is superseded; owner {st_b['handover']['instance']}" in out, out
            assert set(mesh.proxy_pids("node1")) == old_workers  # A's workers still serve until SIGTERM
            wait_all(ls, 30, "load with both agents")
            assert all(s.say("both") == {"echo": "both"} for s in sessions)

            # The kubelet deletes the old pod: SIGTERM.  Its workers stop accepting and drain.
            a.popen.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining proxy workers" in mesh.agent_log("node1"), "A drains")
            wait_all(ls, 30, "load while A drains")
            # the streams keep going on the old workers, which wait for them (a worker that
            # holds none of them may already be gone: the pooled tunnel can carry all six
            # streams on one or two TLS connections, each held by one worker)
            assert all(s.say("draining") == {"echo": "draining"} for s in sessions)
            assert a.popen.poll() is None and any(_alive(pid) for pid in old_workers)
        finally:
            codes = [s.close() for s in sessions]
        assert codes == [0] * 6  # every stream finished cleanly, none reset
        # streams over: the old workers exit well before the drain timeout, and so does A
        assert a.popen.wait(timeout=60) == 0
        a.popen = None
        log_a = mesh.agent_log("node1")
        assert "finished draining" in log_a and "killing them" not in log_a
        assert not any(_alive(pid) for pid in old_workers)
        assert mesh.end_pod("node1") == []  # nothing left for the container runtime to kill

        try:
            wait_all(ls, 30, "load after A is gone")
        finally:
            results = {k: load.stop() for k, load in ls.items()}
        check_meshed(mesh, results)

        # Afterwards only B serves: it alone in the lease, its workers the ones answering.
        st_b = mesh.status(b)
        assert st_b["handover"]["role"] == "owner"
        assert list(st_b["handover"]["members"]) == [st_b["handover"]["instance"]]
        assert {w["pid"] for w in st_b["proxy"]} == new_workers
        served = sum((w["stats"] or {}).get("counters", {}).get("result_ok", 0) for w in st_b["proxy"])
        assert served > 0
        for w in st_b["proxy"]:
            c = (w["stats"] or {}).get("counters", {})
            assert c.get("result_rejected", 0) == 0 and c.get("internal_errors", 0) == 0, c
        # Nothing shared was re-created: the same programs, links and maps throughout.
        assert _kernel_ids(pinned(mesh, "node1")) == _kernel_ids(before)


def broken_proxy_copy(tmp_path) -> str:
    """A copy of the agent package whose proxy worker cannot start (a new
    version that crashes): its directory, for PYTHONPATH."""
    root = str(tmp_path / "broken")
    shutil.copytree(os.path.join(REPO, "agent"), os.path.join(root, "agent"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(root, "agent", "proxy", "__main__.py")
    with open(path) as f:
        code = f.read()
    with open(path, "w") as f:
        f.write('raise SystemExit("this build of the proxy is broken")\n' + code)
    return root


def test_a_successor_that_dies_before_ready_changes_nothing(tmp_path):
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("serve", SERVE), ("echo", ECHO)),
                      mode="strict", workers=2) as mesh:
        st_a = mesh.status("node1")
        lease_a = (st_a["handover"]["owner"], st_a["handover"]["epoch"])
        old_workers = set(mesh.proxy_pids("node1"))
        before = pinned(mesh, "node1")
        ls = loads(mesh, str(tmp_path))
        sessions = [EchoSession(mesh, "pod1-1", ip_of(mesh, "pod2-1"), ECHO) for _ in range(2)]
        try:
            wait_all(ls, 20, "load before the upgrade")
            broken = broken_proxy_copy(tmp_path)
            b = mesh.start_successor("node1", wait=False, cwd=broken,
                                     env={"PYTHONPATH": broken + os.pathsep + REPO})
            # B is admitted (the owner's guard allows its cgroup), its workers crash again and again:
            # it never becomes ready, so it never takes the lease.
            try:
                wait_for(lambda: mesh.agent_log(b).count("exited with") >= 2, "B's workers failed twice",
                         timeout=90)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{mesh.agent_log(b)[-5000:]}") from None
            st_b = mesh.status(b)
            assert st_b["handover"]["role"] == "successor" and st_b["handover"]["admitted"] is True
            assert (st_b["handover"]["owner"], st_b["handover"]["epoch"]) == lease_a
            wait_all(ls, 30, "load while B fails")
            # B's pod dies (killed, as after an OOM or a rollback).
            mesh.agents[b].popen.kill()
            mesh.agents[b].popen.wait(timeout=30)
            mesh.agents[b].popen = None
            mesh.end_pod(b)
            wait_all(ls, 30, "load after B died")
            assert all(s.say("still") == {"echo": "still"} for s in sessions)
        finally:
            results = {k: load.stop() for k, load in ls.items()}
            codes = [s.close() for s in sessions]
        check_meshed(mesh, results)
        assert codes == [0, 0]
        st_a = mesh.status("node1")
        assert st_a["handover"]["role"] == "owner"
        assert (st_a["handover"]["owner"], st_a["handover"]["epoch"]) == lease_a  # never lost the node
        assert set(mesh.proxy_pids("node1")) == old_workers
        assert all(w["restarts"] == 0 for w in st_a["proxy"])
        # B's entry goes stale and the owner drops it (and B's cgroup from its guard's allow list)
        wait_for(lambda: list(mesh.status("node1")["handover"]["members"]) == [lease_a[0]],
                 "B's lease entry dropped", timeout=60)
        assert _kernel_ids(pinned(mesh, "node1")) == _kernel_ids(before)
