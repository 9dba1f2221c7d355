"""Privileged tests of the simulated cluster harness (agent/sim/topology.py).

Needs root, iproute2 (`ip`), util-linux (`nsenter`) and a cgroup v2 mount.
Connectivity is probed with a small Python helper (ICMP echo over raw sockets
and a TCP exchange with a named responder) so no `ping` binary is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.privileged

_reasons = []
if os.geteuid() != 0:
    _reasons.append("needs root")
for _tool in ("ip", "nsenter"):
    if shutil.which(_tool) is None:
        _reasons.append(f"needs `{_tool}` (apt-get install iproute2 util-linux)")
try:
    from agent.cgroup import cgroup2_mount
    cgroup2_mount()
except Exception as _e:  # noqa: BLE001
    _reasons.append(f"needs a cgroup v2 mount ({_e})")
if _reasons:
    pytest.skip("simulated cluster: " + "; ".join(_reasons),
                allow_module_level=True)

from agent.sim import Cluster, SimError, cleanup_stale, exec_argv  # noqa: E402
from agent.sim import topology as simcluster  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 18080

# Answers every TCP connection with its name; dual-stack on [::]:PORT.
RESPONDER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[1])))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(sys.argv[2].encode())
        c.close()
""")

# For each [addr, port] in argv[1] (JSON): ICMP echo + TCP read of the name.
PROBE = textwrap.dedent("""
    import json, os, socket, struct, sys, time

    def csum(b):
        if len(b) % 2:
            b += b"\\0"
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    def ping(addr, timeout=2.0):
        v6 = ":" in addr
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        req, rep = (128, 129) if v6 else (8, 0)
        ident = os.getpid() & 0xFFFF
        with socket.socket(fam, socket.SOCK_RAW, proto) as s:
            hdr = struct.pack("!BBHHH", req, 0, 0, ident, 1) + b"meshlet"
            if not v6:  # the kernel fills in the ICMPv6 checksum
                hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
            s.sendto(hdr, (addr, 0))
            end = time.monotonic() + timeout
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    return False
                if not v6:
                    data = data[(data[0] & 0xF) * 4:]
                t, _c, _s, i, _q = struct.unpack("!BBHHH", data[:8])
                if t == rep and i == ident:
                    return True

    def tcp(addr, port):
        try:
            with socket.create_connection((addr, port), timeout=2) as c:
                c.settimeout(2)
                buf = b""
                while True:
                    d = c.recv(256)
                    if not d:
                        return buf.decode()
                    buf += d
        except OSError as e:
            return "error: %s" % e

    out = []
    for addr, port in json.loads(sys.argv[1]):
        out.append([addr, ping(addr), tcp(addr, port)])
    print(json.dumps(out))
""")


def _start_responder(owner, name):
    p = owner.popen([sys.executable, "-c", RESPONDER, str(PORT), name],
                    stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", f"responder {name} failed"
    return p


def _probe(owner, targets):
    """targets: list of (addr, expected responder name)."""
    r = owner.run([sys.executable, "-c", PROBE,
                   json.dumps([[a, PORT] for a, _ in targets])], timeout=60)
    got = {a: (ok, name) for a, ok, name in json.loads(r.stdout)}
    return {a: got[a] for a, _ in targets}


def _leftovers(prefix):
    netns = [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")] \
        if os.path.isdir("/run/netns") else []
    cg = os.path.join(cgroup2_mount(), "meshlet-sim-" + prefix)
    state = os.path.join(simcluster.STATE_DIR, prefix + ".json")
    return netns + [p for p in (cg, state) if os.path.exists(p)]


def _dead(pid, timeout=3.0):
    """True once pid is gone or a zombie (killed but not yet reaped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


def _cgroup_of(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise AssertionError("no cgroup v2 line")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(nodes=2, pods_per_node=2)
    prefix = c.prefix
    with c:
        yield c
    assert _leftovers(prefix) == []


def test_connectivity_matrix(cluster):
    servers = [_start_responder(p, p.name) for p in cluster.pods]
    servers += [_start_responder(n, n.name) for n in cluster.nodes]
    expect = {}   # (source, addr) -> responder name
    for src in cluster.pods:
        node = cluster.node(src.node)
        for dst in cluster.pods:
            if dst is not src:
                for ip in dst.ips:
                    expect[(src.name, ip)] = dst.name
        expect[(src.name, node.gateway4)] = node.name
        expect[(src.name, node.gateway6)] = node.name
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if dst is not src:
                expect[(src.name, dst.address)] = dst.name
                expect[(src.name, dst.address6)] = dst.name
    failures = []
    owners = {o.name: o for o in cluster.pods + cluster.nodes}
    for oname, owner in owners.items():
        targets = [(a, n) for (s, a), n in expect.items() if s == oname]
        for addr, (pinged, answer) in _probe(owner, targets).items():
            want = expect[(oname, addr)]
            if not pinged or answer != want:
                failures.append(f"{oname} -> {addr}: ping={pinged} tcp={answer!r} "
                                f"(want {want})")
    assert not failures, "\n".join(failures)
    # Both same-node and cross-node pairs were in the matrix.
    assert any(cluster.pod(s).node == cluster.pod(n).node
               for (s, _a), n in expect.items() if s.startswith("pod") and n.startswith("pod"))
    assert any(cluster.pod(s).node != cluster.pod(n).node
               for (s, _a), n in expect.items() if s.startswith("pod") and n.startswith("pod"))
    for s in servers:
        assert s.poll() is None


def test_pod_popen_is_in_pod_cgroup_and_netns(cluster):
    pod = cluster.pods[0]
    p = pod.popen(["sleep", "30"])
    mount = cgroup2_mount()
    assert os.path.join(mount, _cgroup_of(p.pid).lstrip("/")) == pod.cgroup
    assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == \
        os.stat(f"/run/netns/{pod.netns}").st_ino
    # Mount namespace unchanged: cgroupfs still visible from inside.
    assert os.stat(f"/proc/{p.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    r = pod.run(["cat", os.path.join(pod.cgroup, "cgroup.procs")])
    assert r.stdout.split()  # the cat itself is in there
    p.kill()
    p.wait()


def test_node_run_uses_system_cgroup_and_node_netns(cluster):
    node = cluster.node("node1")
    r = node.run(["sh", "-c", "cat /proc/self/cgroup; ip -4 -o addr show dev eth0"])
    assert f"0::{node.system_cgroup[len(cgroup2_mount()):]}" in r.stdout
    assert node.address in r.stdout
    with pytest.raises(subprocess.CalledProcessError) as ei:
        node.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert "boom" in str(ei.value)


def test_inventory(cluster, tmp_path):
    import yaml
    inv = cluster.inventory()
    assert [n["name"] for n in inv["nodes"]] == ["node1", "node2"]
    assert inv["nodes"][0] == {"name": "node1", "address": "198.18.0.1",
                               "address6": "fd00:198:18::1"}
    p = inv["pods"][0]
    assert p == {"name": "pod1-1", "namespace": "default",
                 "serviceAccount": "pod1-1", "labels": {"app": "pod1-1"},
                 "node": "node1", "ips": ["10.244.1.10", "fd00:244:1::10"],
                 "cgroup": os.path.join(cgroup2_mount(),
                                        f"meshlet-sim-{cluster.prefix}",
                                        "node1/pods/pod1-1")}
    path = tmp_path / "inv.yaml"
    cluster.write_inventory(str(path), trustDomain="cluster.local")
    text = path.read_text()
    assert "labels: {app: pod1-1}" in text
    loaded = yaml.safe_load(text)
    assert loaded["trustDomain"] == "cluster.local"
    assert loaded["pods"] == inv["pods"] and loaded["nodes"] == inv["nodes"]


def test_add_and_remove_pod_live(cluster):
    pod = cluster.add_pod("node2", "web", namespace="shop",
                          labels={"app": "web", "tier": "front"})
    try:
        assert pod.service_account == "web" and pod.node == "node2"
        assert cluster.pod("web") is pod
        assert any(p["name"] == "web" and p["namespace"] == "shop"
                   for p in cluster.inventory()["pods"])
        _start_responder(pod, "web")
        src = cluster.pod("pod1-1")
        res = _probe(src, [(ip, "web") for ip in pod.ips])
        assert all(v == (True, "web") for v in res.values()), res
        res = _probe(pod, [(cluster.node("node2").gateway4, "?"),
                           (cluster.node("node2").gateway6, "?")])
        assert all(v[0] for v in res.values()), res
        sleeper = pod.popen(["sleep", "30"])
        with pytest.raises(ValueError):
            cluster.add_pod("node1", "web")
    finally:
        cluster.remove_pod("web")
    assert _dead(sleeper.pid)
    assert not os.path.exists(f"/run/netns/{pod.netns}")
    assert not os.path.exists(pod.cgroup)
    with pytest.raises(KeyError):
        cluster.pod("web")
    routes = cluster.node("node2").run(["ip", "-o", "route"]).stdout
    assert pod.ip4 not in routes
    # The rest of the cluster is unaffected.
    res = _probe(cluster.pod("pod1-1"), [(cluster.pod("pod2-1").ip6, "pod2-1")])
    assert res[cluster.pod("pod2-1").ip6][0]


def test_teardown_when_body_raises():
    c = Cluster(nodes=1, pods_per_node=1)
    pids = []
    with pytest.raises(RuntimeError, match="body failed"):
        with c:
            pod = c.pods[0]
            pids.append(pod.popen(["sleep", "60"]).pid)
            # An untracked orphan left in the pod cgroup, one in the node's.
            r = pod.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            pids.append(int(r.stdout))
            r = c.nodes[0].run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            pids.append(int(r.stdout))
            raise RuntimeError("body failed")
    assert _leftovers(c.prefix) == []
    assert all(_dead(p) for p in pids)
    c.down()   # idempotent


def test_up_failure_rolls_back(monkeypatch):
    calls = []
    real = Cluster._build_pod

    def flaky(self, pod):
        calls.append(pod.name)
        if len(calls) == 2:
            raise SimError("injected failure")
        return real(self, pod)

    monkeypatch.setattr(Cluster, "_build_pod", flaky)
    c = Cluster(nodes=1, pods_per_node=2)
    with pytest.raises(SimError, match="injected"):
        c.up()
    assert _leftovers(c.prefix) == []


def test_cleanup_stale(cluster):
    script = textwrap.dedent("""
        import os, subprocess, sys
        from agent.sim import Cluster
        c = Cluster(nodes=1, pods_per_node=1).up()
        p = c.pods[0].popen(["sleep", "60"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        print(c.prefix, p.pid, flush=True)
        os._exit(0)   # "crash": no teardown
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    prefix, pid = r.stdout.split()
    assert _leftovers(prefix)
    cleaned = cleanup_stale()
    assert prefix in cleaned
    assert cluster.prefix not in cleaned          # live creator: left alone
    assert os.path.exists(f"/run/netns/{cluster.prefix}-fabric")
    assert _leftovers(prefix) == []
    assert _dead(int(pid))


def test_exec_argv_rejects_strings():
    with pytest.raises(TypeError):
        exec_argv("x", None, "sleep 1")
    assert exec_argv(None, None, ["true"]) == ["true"]


def test_bad_names_rejected():
    with pytest.raises(ValueError):
        Cluster(prefix="has-dash")
    with pytest.raises(ValueError):
        Cluster(nodes=1, pod_specs={"node1": [{"name": "Bad_Name"}]})
    with pytest.raises(ValueError):
        Cluster(nodes=1, pod_specs={"node7": []})


def test_down_kills_sigterm_ignoring_process():
    """A tracked process that ignores SIGTERM is still killed at down()."""
    with Cluster(nodes=1, pods_per_node=0) as c:
        p = c.nodes[0].popen([sys.executable, "-c",
                              "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('x', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
        p.stdout.readline()
    assert p.returncode == -signal.SIGKILL


def test_ipv4_only_cluster():
    with Cluster(nodes=2, pods_per_node=1, ipv6=False) as c:
        a, b = c.pods
        assert a.ip6 is None and a.ips == [a.ip4]
        inv = c.inventory()
        assert "address6" not in inv["nodes"][0]
        assert inv["pods"][1]["ips"] == ["10.244.2.10"]
        _start_responder(b, b.name)
        assert _probe(a, [(b.ip4, b.name)])[b.ip4] == (True, b.name)
