"""End to end: policies applied through the real CLI to a real agent (a
1-node simulated cluster), kept across an agent SIGKILL and restart: the
store, the admin API and the CLI, for AuthorizationPolicy and TrafficPolicy
(published as runDir/traffic.json and loaded by the proxy's TrafficWatcher
code from that file)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.privileged import require_privileged

require_privileged()

from agent.policy.load import load_policies  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, _env, service  # noqa: E402
from agent.proxy.watch import load_traffic_file  # noqa: E402
from tests.support.policy import BAD  # noqa: E402

pytestmark = pytest.mark.privileged

REPO_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    pod = cluster.pods[0]
    # one service, so a TrafficPolicy for it applies without a warning
    m = Mesh(cluster, services=[service("web", dict(pod.labels), [{"port": 80}], index=31,
                                        namespace=pod.namespace)])
    try:
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


def cli(mesh, *args: str) -> subprocess.CompletedProcess:
    sock = os.path.join(mesh.agents["node1"].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", "policy", *args, "--socket", sock],
                          capture_output=True, text=True, env=_env(), timeout=60)


def policy_status(mesh) -> dict:
    return mesh.status("node1")["policy"]


def test_apply_list_get_diff_delete_and_restart(mesh, tmp_path):
    expected = load_policies(REPO_POLICIES)
    docs = len(expected) + len(expected.authentications)  # AuthorizationPolicies and RequestAuthentications
    empty = policy_status(mesh)
    assert empty["count"] == 0

    r = cli(mesh, "apply", "-f", str(REPO_POLICIES))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" created\n") == docs
    got = policy_status(mesh)
    assert (got["version"], got["count"]) == (expected.version, docs)

    r = cli(mesh, "apply", "-f", str(REPO_POLICIES))
    assert r.returncode == 0 and r.stdout.count(" unchanged\n") == docs
    assert cli(mesh, "diff", "-f", str(REPO_POLICIES)).returncode == 0

    listed = json.loads(cli(mesh, "list", "-o", "json").stdout)
    assert listed["version"] == expected.version
    assert [(p["namespace"], p["name"]) for p in listed["policies"]] == [
        (p.namespace, p.name) for p in (*expected.policies, *expected.authentications)]
    first = expected.policies[0]
    r = cli(mesh, "get", first.name, "-n", first.namespace, "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["name"] == first.name
    r = cli(mesh, "get", first.name, "-n", first.namespace)
    assert r.returncode == 0 and f"name: {first.name}\n" in r.stdout

    # a changed copy: diff shows it, changes nothing
    changed = tmp_path / "changed"
    shutil.copytree(REPO_POLICIES, changed, ignore=shutil.ignore_patterns("traffic"))
    f = changed / "20-shop-deny-admin.yaml"
    f.write_text(f.read_text().replace("/admin", "/root"))
    r = cli(mesh, "diff", "-f", str(changed))
    assert r.returncode == 1 and "-" in r.stdout and "/root" in r.stdout, r.stderr

    # an invalid file next to valid changes: nothing is applied
    (changed / "99-bad.yaml").write_text(BAD)
    r = cli(mesh, "apply", "-f", str(changed))
    assert r.returncode == 1
    assert f"{changed / '99-bad.yaml'}:7:" in r.stderr and "nothing changed" in r.stderr
    assert policy_status(mesh)["version"] == expected.version
    assert cli(mesh, "diff", "-f", str(changed)).returncode == 3

    r = cli(mesh, "delete", first.name, "-n", first.namespace)
    assert r.returncode == 0, r.stderr
    assert cli(mesh, "delete", first.name, "-n", first.namespace).returncode == 1
    assert cli(mesh, "get", first.name, "-n", first.namespace).returncode == 1
    after_delete = policy_status(mesh)
    assert after_delete["count"] == docs - 1
    assert after_delete["version"] != expected.version

    # the agent dies hard and comes back: the policies are still there
    before = json.loads(cli(mesh, "list", "-o", "json").stdout)
    mesh.stop_agent("node1", signal.SIGKILL)
    mesh.start_agent("node1")
    assert policy_status(mesh) == after_delete
    assert json.loads(cli(mesh, "list", "-o", "json").stdout) == before
    compiled = json.loads(pathlib.Path(mesh.agents["node1"].run_dir, "policies.json").read_text())
    assert compiled["version"] == after_delete["version"]
    assert compiled["count"] == after_delete["count"]


TRAFFIC = """\
apiVersion: meshlet.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  service: {service}
  retries: {{attempts: {attempts}, perTryTimeout: 250ms}}
  timeouts: {{request: 3s}}
"""


def test_traffic_policy_apply_list_get_publish_delete(mesh, tmp_path):
    run_dir = pathlib.Path(mesh.agents["node1"].run_dir)
    ns = mesh.cluster.pods[0].namespace
    before = policy_status(mesh)
    f = tmp_path / "traffic.yaml"
    f.write_text(TRAFFIC.format(name="web", ns=ns, service="web", attempts=3) + "---\n"
                 + TRAFFIC.format(name="later", ns=ns, service="not-yet", attempts=1))

    r = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "validate", str(f)],
                       capture_output=True, text=True, env=_env(), timeout=60)  # offline
    assert r.returncode == 0 and "2 traffic policies" in r.stdout, r.stdout + r.stderr
    r = cli(mesh, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert f"trafficpolicy {ns}/web created\n" in r.stdout
    assert f"trafficpolicy {ns}/later created\n" in r.stdout
    # a service the inventory does not have: a warning, not an error; the known one: none
    assert "warning:" in r.stderr and f"{ns}/not-yet" in r.stderr and f"{ns}/web " not in r.stderr
    after = policy_status(mesh)
    assert after["count"] == before["count"] + 2 and after["version"] != before["version"]
    assert after["byKind"]["TrafficPolicy"] == 2

    # published for the proxies: traffic.json loads with the proxy's own reader
    ts = load_traffic_file(str(run_dir / "traffic.json"))
    assert [p.key for p in ts.policies] == [f"{ns}/later", f"{ns}/web"]
    web = ts.settings_for(ns, "web", 80)
    assert web.retries.attempts == 3 and web.retries.per_try_timeout == 0.25
    assert web.timeouts.request == 3.0
    compiled = json.loads((run_dir / "policies.json").read_text())
    assert "TrafficPolicy" not in compiled["yaml"]  # authorization-only, as before

    listed = json.loads(cli(mesh, "list", "-o", "json").stdout)
    rows = {(p["kind"], p["name"]) for p in listed["policies"]}
    assert {("TrafficPolicy", "web"), ("TrafficPolicy", "later")} <= rows
    r = cli(mesh, "list")
    assert any(ln.split()[:3] == ["TrafficPolicy", ns, "web"] for ln in r.stdout.splitlines())
    r = cli(mesh, "get", "trafficpolicy/web", "-n", ns, "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["spec"]["retries"]["attempts"] == 3
    r = cli(mesh, "get", "web", "-n", ns, "--kind", "TrafficPolicy")
    assert r.returncode == 0 and "perTryTimeout: 250ms" in r.stdout

    # a batch with one bad TrafficPolicy changes nothing, and says where
    bad = tmp_path / "bad.yaml"
    bad.write_text(TRAFFIC.format(name="web", ns=ns, service="web", attempts=5) + "---\n"
                   + TRAFFIC.format(name="x", ns=ns, service="web", attempts=1)
                   .replace("perTryTimeout: 250ms", "perTryTimeout: 250"))
    r = cli(mesh, "apply", "-f", str(bad))
    assert r.returncode == 1 and f"{bad}:14:" in r.stderr and "perTryTimeout" in r.stderr, r.stderr
    assert policy_status(mesh)["version"] == after["version"]

    # the agent dies hard: traffic policies come back with the store
    mesh.stop_agent("node1", signal.SIGKILL)
    mesh.start_agent("node1")
    assert policy_status(mesh)["version"] == after["version"]

    for name in ("web", "later"):
        r = cli(mesh, "delete", f"trafficpolicy/{name}", "-n", ns)
        assert r.returncode == 0 and f"trafficpolicy {ns}/{name} deleted" in r.stdout, r.stderr
    assert cli(mesh, "get", "trafficpolicy/web", "-n", ns).returncode == 1
    assert policy_status(mesh)["version"] == before["version"]
    assert len(load_traffic_file(str(run_dir / "traffic.json"))) == 0
