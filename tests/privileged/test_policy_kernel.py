"""End to end: L4 authorization decided in the kernel at connect() time, on a
real 2-node simulated cluster, with policies applied through the real CLI
to both agents.

The source node's cgroup connect hook refuses a connection the policies
deny for sure: the app's connect() fails with EPERM at once, and neither
proxy ever sees it.  Connections the kernel cannot decide (an ALLOW rule
with HTTP fields) still reach the destination proxy, which decides.

Pods pod1-1, pod1-2 on node1; pod2-1, pod2-2 on node2; namespace default,
labels {app: <name>}, service account <name>; echo servers on 7001, 7002.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.privileged import (
    ip_of, policy_cli as cli, probe as probe_ip, require_privileged, running_mesh, wait_for,
    worker_stats,
)

require_privileged()

from agent.policy.kernel import NO_POLICY_ID, policy_id  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import _env  # noqa: E402

pytestmark = pytest.mark.privileged

HEAD = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: {action}
"""

DENY_POD1_2 = HEAD.format(name="k-deny-pod1-2", app="pod2-1", action="DENY") + """\
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-2]}}]
"""

ALLOW_POD1_1_7001 = HEAD.format(name="k-allow-7001", app="pod2-1", action="ALLOW") + """\
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
    to: [{operation: {ports: ["7001"]}}]
"""

ALLOW_GET = HEAD.format(name="k-allow-get", app="pod2-2", action="ALLOW") + """\
  rules:
  - to: [{operation: {methods: [GET]}}]
"""

DENY_SAME_NODE = HEAD.format(name="k-deny-same-node", app="pod1-1", action="DENY") + """\
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-2]}}]
    to: [{operation: {ports: ["7002"]}}]
"""


@pytest.fixture(scope="module")
def mesh():
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("echo", 7001), ("echo", 7002))) as m:
        yield m


def apply(mesh, tmp_path, name: str, text: str, nodes=("node1", "node2")) -> tuple[float, float]:
    """Apply on every node; returns when node1's `meshlet policy apply` started
    and returned (monotonic)."""
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    t = (0.0, 0.0)
    for node in nodes:
        t0 = time.monotonic()
        r = cli(mesh, node, "apply", "-f", str(f))
        assert r.returncode == 0, r.stderr
        if node == "node1":
            t = (t0, time.monotonic())
    return t


def delete(mesh, *names: str) -> None:
    for node in ("node1", "node2"):
        for name in names:
            r = cli(mesh, node, "delete", name, "-n", "default")
            assert r.returncode in (0, 1), r.stderr  # 1: already gone (cleanup after a failure)


def probe(mesh, src: str, dst: str, port: int = 7001, family: int = 4) -> dict:
    return probe_ip(mesh, src, ip_of(mesh, dst, v6=family == 6), port, timeout=5)


def refused(r: dict) -> bool:
    return r["result"] == "connect_error" and r["errno"] == errno.EPERM


def until(mesh, src, dst, pred, what: str, port: int = 7001, family: int = 4) -> dict:
    return wait_for(lambda: (lambda r: r if pred(r) else None)(probe(mesh, src, dst, port, family)),
                    f"{src} -> {dst}:{port} to be {what}", timeout=15, interval=0.1)


def accepted(mesh) -> dict[str, int]:
    """Connections every proxy worker of both nodes accepted."""
    out = {}
    for node in ("node1", "node2"):
        for i, st in enumerate(worker_stats(mesh, node)):
            c = st.get("counters") or {}
            out[f"{node}/{i}"] = c.get("outbound_accepted", 0) + c.get("inbound_accepted", 0)
    return out


def settled(mesh) -> dict[str, int]:
    """accepted() once it stops moving (connections made earlier may still be
    in the proxies' accept queues or tunnels)."""
    last = [accepted(mesh)]

    def same():
        time.sleep(0.5)
        now = accepted(mesh)
        if now == last[0]:
            return now
        last[0] = now
        return None
    return wait_for(same, "the proxies' accept counters to settle", timeout=20, interval=0)


def bpf_status(mesh, node: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bpf", "status", "--pin-dir",
                        mesh.agents[node].pin_dir, "-o", "json"],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


POLL = """\
import errno, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 20
n = 0
while time.monotonic() < deadline and n < 4000:
    n += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
    except PermissionError:
        print(time.monotonic(), n, flush=True)
        break
    except OSError:
        pass
    finally:
        s.close()
    time.sleep(0.005)
else:
    print("never", n, flush=True)
"""


def test_kernel_refuses_at_connect_and_the_proxies_never_see_it(mesh, tmp_path):
    assert probe(mesh, "pod1-2", "pod2-1")["result"] == "data"   # no policies yet
    poller = mesh.cluster.pod("pod1-2").popen(
        [sys.executable, "-c", POLL, mesh.cluster.pod("pod2-1").ip4, "7001"],
        stdout=subprocess.PIPE, text=True)
    try:
        t_started, t_applied = apply(mesh, tmp_path, "deny", DENY_POD1_2)
        out, _ = poller.communicate(timeout=40)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()
    first = out.split()
    assert first and first[0] != "never", out
    # a measurement for the notes, not a claim: apply returned -> kernel refuses
    print(f"\nkernel refusal: {(float(first[0]) - t_applied) * 1000:+.0f} ms after `meshlet policy "
          f"apply` returned on node1 ({(t_applied - t_started) * 1000:.0f} ms after it started; "
          f"{first[1]} connects polled)")

    try:
        before_acc, before_cnt = settled(mesh), mesh.counters("node1")["policy_denied"]
        for family in (4, 6):
            for _ in range(2):
                r = probe(mesh, "pod1-2", "pod2-1", 7001, family)
                assert refused(r), r
        assert refused(probe(mesh, "pod1-2", "pod2-1", 7002))       # every port
        assert accepted(mesh) == before_acc                         # no proxy saw them
        assert mesh.counters("node1")["policy_denied"] == before_cnt + 5

        assert probe(mesh, "pod1-1", "pod2-1")["result"] == "data"  # an allowed peer
        assert probe(mesh, "pod1-2", "pod2-2")["result"] == "data"  # another workload

        st = bpf_status(mesh, "node1")
        l4 = st["l4_policy"]
        assert l4["entries"] >= 2 and l4["capacity"] == 16384 and l4["denied"] >= 5
        assert l4["denied_by_policy_id"][str(policy_id("default/k-deny-pod1-2"))] >= 5
        kern = mesh.status("node1")["policy"]["kernel"]
        assert kern["denied_by_policy"]["default/k-deny-pod1-2"] >= 5 and not kern["overflow"]
    finally:
        delete(mesh, "k-deny-pod1-2")
    until(mesh, "pod1-2", "pod2-1", lambda r: r["result"] == "data", "allowed again")
    assert bpf_status(mesh, "node1")["l4_policy"]["entries"] == 0


def test_default_deny_refuses_everything_but_the_allowed_port(mesh, tmp_path):
    apply(mesh, tmp_path, "allow", ALLOW_POD1_1_7001)
    try:
        # apply returns once the node's kernel enforces: no waiting
        assert refused(probe(mesh, "pod1-2", "pod2-1"))
        assert probe(mesh, "pod1-1", "pod2-1", 7001)["result"] == "data"   # the PASS exception
        assert refused(probe(mesh, "pod1-1", "pod2-1", 7002))
        before = mesh.status("node1")["policy"]["kernel"]["denied_by_policy"]
        assert before.get("(no ALLOW rule matched)", 0) >= 2
        assert str(NO_POLICY_ID) in bpf_status(mesh, "node1")["l4_policy"]["denied_by_policy_id"]
        # same-node sources of node2 are refused by node2's kernel
        assert refused(probe(mesh, "pod2-2", "pod2-1", 7001))
        assert mesh.counters("node2")["policy_denied"] >= 1
    finally:
        delete(mesh, "k-allow-7001")
    until(mesh, "pod1-1", "pod2-1", lambda r: r["result"] == "data", "allowed again", port=7002)


def test_same_node_deny_by_port(mesh, tmp_path):
    apply(mesh, tmp_path, "same", DENY_SAME_NODE)
    try:
        assert refused(probe(mesh, "pod1-2", "pod1-1", 7002))
        assert probe(mesh, "pod1-2", "pod1-1", 7001)["result"] == "data"
        assert probe(mesh, "pod2-1", "pod1-1", 7002)["result"] == "data"
    finally:
        delete(mesh, "k-deny-same-node")
    until(mesh, "pod1-2", "pod1-1", lambda r: r["result"] == "data", "allowed again", port=7002)


def test_http_allow_rule_leaves_the_decision_to_the_proxy(mesh, tmp_path):
    # An ALLOW rule with HTTP fields could allow some request: the kernel must
    # not refuse.  The proxy sees the plain TCP connection and denies it there.
    apply(mesh, tmp_path, "get", ALLOW_GET)
    try:
        st = mesh.status("node1")["policy"]
        wait_for(lambda: mesh.status("node1")["policy"]["kernel"].get("version") == st["version"],
                 "node1 to compile the policies for its kernel", timeout=15)
        r = until(mesh, "pod1-2", "pod2-2", lambda r: r["result"] in ("reset", "eof"),
                  "denied by the proxy")
        assert not refused(r)
        log = [e for e in mesh.access_log("node2")
               if e.get("verdict") == "denied" and e.get("src_pod") == "default/pod1-2"]
        assert log, "the destination proxy decided nothing"
    finally:
        delete(mesh, "k-allow-get")
    until(mesh, "pod1-2", "pod2-2", lambda r: r["result"] == "data", "allowed again")


# -- Datapath.sync_l4 against a real map -------------------------------------------------

@pytest.fixture(scope="module")
def l4_datapath():
    """The compiled maps (no programs attached) behind a Datapath object."""
    import tempfile

    bcc = pytest.importorskip("bcc")
    from agent.datapath import bpfsys
    from agent.datapath.loader import Datapath, DatapathSpec, remove_pins, render

    pin_dir = tempfile.mkdtemp(prefix="l4sync-", dir="/sys/fs/bpf")
    spec = DatapathSpec(node="l4sync", pin_dir=pin_dir, cgroup="/", redirect_ip4="10.0.0.1",
                        redirect_ip6=None, outbound_port=15001, mesh_mark=1, max_l4_rules=64)
    r = render(spec)
    b = bcc.BPF(text=r.text.encode(), cflags=list(r.cflags))
    dp = Datapath(spec)
    try:
        for name in ("ml_l4_policy", "ml_l4_denied"):
            dp.maps[name] = bpfsys.obj_get(os.path.join(pin_dir, name))
        yield dp
    finally:
        dp.close()
        b.cleanup()
        remove_pins(pin_dir)


def _read_l4(dp) -> dict:
    import ctypes

    from agent.datapath import abi, bpfsys
    fd = dp.maps["ml_l4_policy"]
    out = {}
    for k in bpfsys.map_keys(fd, ctypes.sizeof(abi.MlL4Key)):
        v = abi.MlL4Verdict.from_buffer_copy(bpfsys.map_lookup(fd, k, ctypes.sizeof(abi.MlL4Verdict)))
        key = abi.MlL4Key.from_buffer_copy(k)
        out[(key.workload_id, abi.unpack_addr(key.family, key.dst_be), key.dst_port)] = \
            (v.action, v.policy_id)
    return out


def _refusals(entries) -> set:
    from agent.policy.kernel import L4_DENY
    out = set()
    for w in (1, 2):
        for ip in ("10.0.0.1", "fd00::1"):
            for port in (80, 443, 9):
                v = entries.get((w, ip, port)) or entries.get((w, ip, 0))
                if v is not None and v[0] == L4_DENY:
                    out.add((w, ip, port))
    return out


def test_sync_l4_never_refuses_more_than_the_old_or_the_new_entries(l4_datapath, monkeypatch):
    import random

    from agent.datapath import bpfsys
    from agent.policy.kernel import L4_DENY, L4_PASS

    dp = l4_datapath
    rnd = random.Random(4)
    keys = [(w, ip, p) for w in (1, 2) for ip in ("10.0.0.1", "fd00::1") for p in (0, 80, 443)]
    states: list[set] = []
    real_update, real_delete = bpfsys.map_update, bpfsys.map_delete

    def update(*a, **kw):
        real_update(*a, **kw)
        states.append(_refusals(_read_l4(dp)))

    def delete(*a, **kw):
        out = real_delete(*a, **kw)
        states.append(_refusals(_read_l4(dp)))
        return out

    monkeypatch.setattr(bpfsys, "map_update", update)
    monkeypatch.setattr(bpfsys, "map_delete", delete)
    old: dict = {}
    dp.sync_l4(old)
    for _ in range(60):
        new = {}
        for k in keys:
            c = rnd.random()
            if c < 0.3:
                new[k] = (L4_DENY, rnd.choice((0, 7, 9)))
            elif c < 0.5:
                new[k] = (L4_PASS, 0)
        states.clear()
        changes = dp.sync_l4(new)
        allowed = _refusals(old) | _refusals(new)
        for st in states:
            assert st <= allowed, (old, new)
        assert _read_l4(dp) == new
        assert changes["entries"] == len(new)
        old = new
    dp.sync_l4({})
    assert _read_l4(dp) == {}


def test_sync_l4_adopts_what_is_pinned(l4_datapath):
    from agent.datapath.loader import Datapath
    from agent.policy.kernel import L4_DENY

    dp = l4_datapath
    dp.sync_l4({(1, "10.0.0.1", 0): (L4_DENY, 5), (2, "10.0.0.1", 80): (L4_DENY, 6)})
    other = Datapath(dp.spec, maps=dict(dp.maps))   # a restarted agent: no cache yet
    assert other.sync_l4({(1, "10.0.0.1", 0): (L4_DENY, 5)}) == \
        {"added": 0, "updated": 0, "removed": 1, "entries": 1}
    assert _read_l4(dp) == {(1, "10.0.0.1", 0): (L4_DENY, 5)}
    other.maps = {}  # the fixture closes the fds
    dp._l4 = None
    dp.sync_l4({})
