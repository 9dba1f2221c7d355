"""End to end: policies applied through the real CLI to a real agent (a
1-node simulated cluster), kept across an agent SIGKILL and restart.  No
enforcement yet: this checks the store, the admin API and the CLI."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from tests.privileged.helpers import require_privileged

require_privileged()

from agent.policy.load import load_policies  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, _env  # noqa: E402

pytestmark = pytest.mark.privileged

REPO_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "policies"

BAD = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {colour: [red]}}]
"""


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=1, pods_per_node=1).up()
    m = Mesh(cluster)
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
    empty = policy_status(mesh)
    assert empty["count"] == 0

    r = cli(mesh, "apply", "-f", str(REPO_POLICIES))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" created\n") == len(expected)
    assert policy_status(mesh) == {"version": expected.version, "count": len(expected)}

    r = cli(mesh, "apply", "-f", str(REPO_POLICIES))
    assert r.returncode == 0 and r.stdout.count(" unchanged\n") == len(expected)
    assert cli(mesh, "diff", "-f", str(REPO_POLICIES)).returncode == 0

    listed = json.loads(cli(mesh, "list", "-o", "json").stdout)
    assert listed["version"] == expected.version
    assert [(p["namespace"], p["name"]) for p in listed["policies"]] == [
        (p.namespace, p.name) for p in expected.policies]
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
    assert after_delete["count"] == len(expected) - 1
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
