"""gRPC and HTTP/2 (h2c, prior knowledge) through the mesh, on a real 2-node
simulated cluster with real grpcio servers and clients in pods
(tests/support/podgrpc.py), curl --http2-prior-knowledge and h2load.

    node1: client, grpc-1        node2: grpc-2

Service ``echo`` (port 90 → 9000, protocol detected) selects grpc-1 and
grpc-2: the client's node proxy balances each call of one channel (one
HTTP/2 connection) over the same-node leg and the mTLS tunnel leg.  Every
assertion about the upstreams is on what the servers logged they received.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.podservers import PodServers, repo_env
from tests.support.privileged import require_privileged, wait_for, wait_policies_enforced

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402

pytestmark = pytest.mark.privileged

VIP = service_vip(21)
PORT = 9000
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SVC = "meshlet.test.Echo"




@pytest.fixture(scope="module")
def env(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("grpc"))
    cluster = Cluster(nodes=2, pod_specs={
        1: [{"name": "client", "labels": {"app": "client"}},
            {"name": "grpc-1", "labels": {"app": "grpc"}}],
        2: [{"name": "grpc-2", "labels": {"app": "grpc"}}],
    }).up()
    mesh = Mesh(cluster, l7=True, services=[
        service("echo", {"app": "grpc"}, [{"port": 90, "targetPort": PORT, "name": "grpc"}], index=21),
    ])
    servers = PodServers(cluster, logdir, ["tests.support.podgrpc", "serve", "--port", str(PORT), "--max-seconds", "900"])
    try:
        mesh.start()
        for name in ("grpc-1", "grpc-2"):
            servers.start(name)
        yield mesh, servers
    finally:
        for name in list(servers.procs):
            servers.stop(name)
        mesh.down()
        cluster.down()


def calls(mesh: Mesh, target: str, *plan: str, timeout: float = 10.0) -> list[dict]:
    """One channel from the client pod, the calls in ``plan`` (``Unary*100``...)."""
    r = mesh.cluster.pod("client").run(
        [sys.executable, "-m", "tests.support.podgrpc", "call", "--target", target,
         "--timeout", str(timeout), *plan],
        check=False, timeout=180, env=repo_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr + mesh.proxy_log("node1")[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def _diag(mesh: Mesh) -> str:
    return mesh.proxy_log("node1")[-3000:] + mesh.proxy_log("node2")[-3000:]


@pytest.mark.parametrize("dst", ["grpc-1", "grpc-2"], ids=["same-node", "cross-node"])
def test_unary_and_streaming_to_a_pod(env, dst):
    mesh, servers = env
    servers.reset_logs()
    res = calls(mesh, f"{mesh.cluster.pod(dst).ip4}:{PORT}", "Unary*3", "Stream")
    assert all(r["ok"] for r in res), (res, _diag(mesh))
    assert [r["reply"] for r in res[:3]] == [f"{dst}:0", f"{dst}:1", f"{dst}:2"]
    assert res[3]["reply"] == [f"{dst}:0:3", f"{dst}:1:3", f"{dst}:2:3"]
    assert [r["method"] for r in servers.received(dst)] == ["Unary"] * 3 + ["Stream"]
    # served as HTTP/2 by the destination's proxy: one request line per call
    node = "node1" if dst == "grpc-1" else "node2"

    def lines():  # request lines are buffered: written with the next connection line or within 0.5 s
        got = [x for x in mesh.access_log(node) if x.get("kind") == "request"
               and str(x.get("path", "")).startswith(f"/{SVC}/")]
        return got if len(got) >= 4 else None

    wait_for(lines, "a request line per call in the destination's access log", timeout=10)


def test_one_channel_is_balanced_per_call_over_both_endpoints(env):
    mesh, servers = env
    servers.reset_logs()
    res = calls(mesh, f"{VIP}:90", "Unary*100")
    assert all(r["ok"] for r in res), (res[:5], _diag(mesh))
    by: dict[str, int] = {}
    for r in res:
        name = r["reply"].split(":")[0]
        by[name] = by.get(name, 0) + 1
    assert set(by) == {"grpc-1", "grpc-2"}, by  # same-node and cross-node, one client connection
    assert min(by.values()) >= 10, by
    for name, n in by.items():
        assert len(servers.received(name)) == n


def test_streaming_through_the_vip(env):
    mesh, _ = env
    res = calls(mesh, f"{VIP}:90", "Stream*4")
    assert all(r["ok"] and len(r["reply"]) == 3 for r in res), (res, _diag(mesh))


def test_denied_method_is_permission_denied_and_others_work(env, tmp_path):
    mesh, servers = env
    f = tmp_path / "deny.yaml"
    f.write_text(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: grpc}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/{SVC}/Admin"]}}}}]
""")
    _policy(mesh, "apply", "-f", str(f))
    try:
        servers.reset_logs()
        for target in (f"{VIP}:90", f"{mesh.cluster.pod('grpc-2').ip4}:{PORT}"):
            res = calls(mesh, target, "Unary", "Admin", "Unary", "Admin", "Stream")
            got = [(r["method"], r["code"]) for r in res]
            assert got == [("Unary", "OK"), ("Admin", "PERMISSION_DENIED"), ("Unary", "OK"),
                           ("Admin", "PERMISSION_DENIED"), ("Stream", "OK")], (got, _diag(mesh))
            assert res[1]["details"] == "RBAC: access denied"
        for name in ("grpc-1", "grpc-2"):  # a denied call never reached a server
            assert "Admin" not in [r["method"] for r in servers.received(name)]
        denied = [x for x in mesh.access_log("node1") + mesh.access_log("node2")
                  if x.get("kind") == "request" and str(x.get("path", "")).endswith("/Admin")]
        assert denied and all(x.get("grpc_status") == 7 for x in denied), denied[:2]
    finally:
        _policy(mesh, "delete", "deny-admin", "-n", "default")


def _policy(mesh: Mesh, *args: str) -> None:
    for node in mesh.agents:
        sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
        r = subprocess.run([sys.executable, "-m", "agent.cli", "policy", *args, "--socket", sock],
                           capture_output=True, text=True, env=repo_env(), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    wait_policies_enforced(mesh)


def _cli(mesh: Mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--socket", sock],
                          capture_output=True, text=True, env=repo_env(), timeout=60)


def test_unavailable_is_retried_on_the_other_endpoint(env, tmp_path):
    mesh, servers = env
    f = tmp_path / "traffic.yaml"
    f.write_text("""
apiVersion: meshlet.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: default}
spec:
  service: echo
  retries: {attempts: 2, retryOn: [unavailable]}
  outlierDetection: {consecutive5xx: 0}
""")
    for node in mesh.agents:
        r = _cli(mesh, node, "policy", "apply", "-f", str(f))
        assert r.returncode == 0, r.stdout + r.stderr

    def loaded():
        return all(((w.get("stats") or {}).get("traffic") or {}).get("count", 0) >= 1
                   for node in mesh.agents for w in mesh.status(node)["proxy"])

    wait_for(loaded, "the proxy workers run the TrafficPolicy", timeout=15)
    servers.start("grpc-2", "--fail")  # the cross-node endpoint answers UNAVAILABLE
    try:
        servers.reset_logs()
        res = calls(mesh, f"{VIP}:90", "Unary*30")
        assert all(r["ok"] for r in res), ([r for r in res if not r["ok"]][:3], _diag(mesh))
        assert {r["reply"].split(":")[0] for r in res} == {"grpc-1"}
        assert len(servers.received("grpc-2")) > 0  # tried, its UNAVAILABLE never reached the client
        retried = [x for x in mesh.access_log("node1") if x.get("kind") == "request"
                   and x.get("route") == "service" and x.get("attempts") == 2]
        assert retried and all(x["grpc_status"] == 0 for x in retried), retried[:2]
    finally:
        servers.start("grpc-2")
        for node in mesh.agents:
            _cli(mesh, node, "policy", "delete", "echo", "-n", "default", "--kind", "trafficpolicy")


def test_grpc_status_is_a_metric_label(env):
    mesh, servers = env
    servers.start("grpc-1", "--fail")
    try:
        res = calls(mesh, f"{mesh.cluster.pod('grpc-1').ip4}:{PORT}", "Unary*2", "Stream")
        assert [r["code"] for r in res] == ["UNAVAILABLE", "UNAVAILABLE", "OK"], res
    finally:
        servers.start("grpc-1")
    from prometheus_client.parser import text_string_to_metric_families

    ip = mesh.cluster.pod("grpc-1").ip4

    def seen():
        out = set()
        for fam in text_string_to_metric_families(mesh.scrape("node1")):
            for smp in fam.samples:
                lb = smp.labels
                if (smp.name == "istio_requests_total" and lb.get("destination_service") == ip
                        and lb.get("reporter") == "destination"):
                    out.add((lb["request_protocol"], lb["response_code"], lb["grpc_response_status"]))
        return out

    got = wait_for(lambda: {("grpc", "200", "14"), ("grpc", "200", "0")} <= (s := seen()) and s,
                   "the gRPC series in /metrics", timeout=20)
    assert all(p == "grpc" for p, _, g in got if g), got


def test_deadline_is_deadline_exceeded(env):
    mesh, servers = env
    servers.start("grpc-2", "--delay", "3")
    try:
        res = calls(mesh, f"{mesh.cluster.pod('grpc-2').ip4}:{PORT}", "Unary", timeout=0.5)
        assert res[0]["code"] == "DEADLINE_EXCEEDED", res
    finally:
        servers.start("grpc-2")


def test_curl_http2_prior_knowledge_through_the_mesh(env):
    mesh, _ = env
    r = mesh.cluster.pod("client").run(
        ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", "-H", "content-type: application/grpc", "-H", "te: trailers",
         "--data-binary", "@-", f"http://{VIP}:90/{SVC}/Unary"],
        input="\x00\x00\x00\x00\x02hi", check=False, timeout=30)
    assert r.returncode == 0, r.stderr + _diag(mesh)
    assert r.stdout.split() == ["2", "200"], r.stdout


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_the_mesh(env):
    mesh, _ = env
    r = mesh.cluster.pod("client").run(
        ["h2load", "-n", "400", "-c", "4", "-m", "10", "-H", "content-type: application/grpc",
         "-H", "te: trailers", f"http://{VIP}:90/{SVC}/Unary"],
        check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # "requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored, 0 timeout"
    line = next(x for x in r.stdout.splitlines() if x.startswith("requests:"))
    assert "400 done" in line and "0 errored" in line and "0 timeout" in line, r.stdout
