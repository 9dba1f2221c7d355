"""End to end: L4 authorization enforced by the destination node's proxy, on
a real 2-node simulated cluster, with policies applied through the real CLI
(`meshlet policy apply`) to both agents.

Pods pod1-1, pod1-2 on node1; pod2-1, pod2-2 on node2; namespace default,
labels {app: <name>}, service account <name>.  Every pod runs an echo server
on 7001 and on 7002.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.privileged import (
    TOOLS, ip_of, policy_cli as cli, probe as probe_ip, require_privileged, running_mesh, wait_for,
)

require_privileged()

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

DENIED = ("reset", "eof")

BASE = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pod2-1-default-deny, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pod2-1-allow, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
"""

DENY_PORT = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pod2-1-deny-7002, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["7002"]}}]
"""

DENY_POD1_1 = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pod2-1-deny-pod1-1, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
"""


@pytest.fixture(scope="module")
def mesh():
    # The kernel refuses certain L4 denials at connect() (EPERM; proven in
    # test_policy_kernel.py); here the kernel path is off (bpf.kernelPolicy),
    # so these tests prove that the destination node's proxy enforces alone.
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("echo", 7001), ("echo", 7002)),
                      kernel_policy=False) as m:
        yield m


def apply(mesh, tmp_path, name: str, text: str) -> None:
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    for node in ("node1", "node2"):
        r = cli(mesh, node, "apply", "-f", str(f))
        assert r.returncode == 0, r.stderr


def delete(mesh, *names: str) -> None:
    for node in ("node1", "node2"):
        for name in names:
            r = cli(mesh, node, "delete", name, "-n", "default")
            assert r.returncode == 0, r.stderr


def probe(mesh, src: str, dst: str, port: int = 7001) -> str:
    r = probe_ip(mesh, src, ip_of(mesh, dst), port, timeout=5)
    # A same-node proxy can reset before connect() has returned (ECONNRESET
    # from the connect itself): that is the same refusal.
    return "reset" if r["result"] == "connect_error" and r.get("errno") == 104 else r["result"]


def until(mesh, src: str, dst: str, want: tuple[str, ...], port: int = 7001) -> str:
    """The proxies poll policies.json: wait (bounded) until the verdict shows."""
    return wait_for(lambda: (lambda r: r if r in want else None)(probe(mesh, src, dst, port)),
                    f"{src} -> {dst}:{port} to be {want}", timeout=15, interval=0.2)


def test_enforcement_apply_reload_and_delete(mesh, tmp_path):
    assert probe(mesh, "pod1-2", "pod2-1") == "data"  # no policies: allowed

    apply(mesh, tmp_path, "base", BASE)
    until(mesh, "pod1-2", "pod2-1", DENIED)                      # cross-node, not allowed
    assert probe(mesh, "pod1-1", "pod2-1") == "data"             # cross-node, allowed principal
    assert probe(mesh, "pod2-2", "pod2-1") in DENIED             # same node, enforced too
    assert probe(mesh, "pod1-2", "pod2-2") == "data"             # other workloads untouched

    log2 = mesh.access_log("node2")
    denied = [e for e in log2 if e.get("verdict") == "denied"]
    assert {e["src_pod"] for e in denied} >= {"default/pod1-2", "default/pod2-2"}
    assert all(e["deny_reason"] == "policy" for e in denied)
    allowed = [e for e in log2 if e.get("policy") == "default/pod2-1-allow"]
    assert allowed and allowed[-1]["verdict"] == "allowed" and allowed[-1]["rule"] == 0

    # DENY by port
    apply(mesh, tmp_path, "deny-port", DENY_PORT)
    until(mesh, "pod1-1", "pod2-1", DENIED, port=7002)
    assert probe(mesh, "pod1-1", "pod2-1") == "data"             # 7001 still allowed
    denied_series = [ln for ln in mesh.scrape("node2").splitlines()
                     if ln.startswith("meshlet_denied_connections_total{")
                     and 'reason="policy"' in ln and 'policy="default/pod2-1-deny-7002"' in ln]
    assert denied_series and float(denied_series[0].rsplit(" ", 1)[1]) >= 1, denied_series

    # an open session is closed once a policy denies it
    client = mesh.cluster.pod("pod1-1").popen(
        TOOLS + ["session", mesh.cluster.pod("pod2-1").ip4, "7001"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert "connected" in client.stdout.readline()
        client.stdin.write("ping\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"echo": "ping"}
        apply(mesh, tmp_path, "deny-pod1-1", DENY_POD1_1)

        def closed():
            client.stdin.write("ping\n")
            client.stdin.flush()
            return "error" in json.loads(client.stdout.readline())
        wait_for(closed, "the open session to be closed by the policy", timeout=15, interval=0.2)
    finally:
        client.kill()
        client.wait()
    closes = [e for e in mesh.access_log("node2")
              if e.get("policy") == "default/pod2-1-deny-pod1-1" and "closed" in e["reason"]]
    assert closes, "the destination proxy logged no policy close"

    # deleting the policies restores access
    delete(mesh, "pod2-1-deny-pod1-1", "pod2-1-deny-7002", "pod2-1-allow", "pod2-1-default-deny")
    until(mesh, "pod1-2", "pod2-1", ("data",))
    assert probe(mesh, "pod1-1", "pod2-1", 7002) == "data"
