"""The source proxy forwards a client's first bytes right behind the tunnel
header, before the destination has answered (for a new stream of the pooled
meshlet-mux/1 connection: in the same TLS record as its OPEN).  That is only
safe because the destination decides policy before it connects to the pod:
a refused connection must still be reset at the source, and the pod must
never see it, not even its bytes.  Cross-node, policy enforced by the
destination node's proxy alone (the kernel's connect-time refusal is off)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.privileged import (
    ip_of, policy_cli, probe, require_privileged, running_mesh, wait_for, wait_policies_enforced,
)

require_privileged()

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

PORT = 7003

# A pod server that writes one line per accepted connection with the bytes it
# received (read until the peer's EOF or 1 s of silence), then echoes them.
RECORDER = r"""
import json, socket, sys
log = open(sys.argv[1], "a", buffering=1)
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[2])))
ls.listen(64)
ls.settimeout(120)
print("listening", flush=True)
while True:
    c, peer = ls.accept()
    c.settimeout(1.0)
    got = b""
    try:
        while b"\n" not in got:
            d = c.recv(4096)
            if not d:
                break
            got += d
    except OSError:
        pass
    log.write(json.dumps({"peer": peer[0], "bytes": got.decode("latin-1")}) + "\n")
    try:
        c.sendall(got)
    except OSError:
        pass
    c.close()
"""

DENY = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pod2-1-deny-pod1-1, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
"""


def _seen(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_a_refused_stream_after_optimistic_bytes_resets_the_client_and_the_pod_sees_nothing(tmp_path):
    log = tmp_path / "pod2-1.jsonl"
    log.touch()
    with running_mesh(Cluster(nodes=2, pods_per_node=1), kernel_policy=False) as mesh:
        server = mesh.cluster.pod("pod2-1").popen(
            [sys.executable, "-c", RECORDER, str(log), str(PORT)], stdout=subprocess.PIPE, text=True)
        try:
            assert "listening" in server.stdout.readline()
            dst = ip_of(mesh, "pod2-1")
            # Allowed: the bytes arrive (and the pooled tunnel connection exists,
            # so the refused ones below are new streams on it: the optimistic path).
            assert probe(mesh, "pod1-1", dst, PORT)["result"] == "data"
            assert [e["bytes"] for e in _seen(log)] == ["hello\n"]

            f = tmp_path / "deny.yaml"
            f.write_text(DENY)
            for node in ("node1", "node2"):
                r = policy_cli(mesh, node, "apply", "-f", str(f))
                assert r.returncode == 0, r.stderr
            wait_policies_enforced(mesh)

            for _ in range(5):
                assert probe(mesh, "pod1-1", dst, PORT)["result"] == "reset"
            assert len(_seen(log)) == 1, _seen(log)  # nothing more reached the pod

            denied = wait_for(
                lambda: [e for e in mesh.access_log("node2")
                         if e.get("deny_reason") == "policy" and e.get("dst_pod") == "default/pod2-1"],
                "the destination proxy's access log to show the refusals")
            assert all(e["bytes_sent"] == 0 for e in denied)
            refused_at_source = [e for e in mesh.access_log("node1")
                                 if e.get("direction") == "outbound" and e.get("result") == "rejected"]
            assert len(refused_at_source) >= 5
        finally:
            server.kill()
            server.wait()
