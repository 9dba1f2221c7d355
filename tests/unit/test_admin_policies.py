"""The agent's admin API for policies (agent/admin.py) over a real Unix socket,
with a test double of the agent (agent.admin.AdminAgent): request bodies (Content-Length, the 4 MiB bound), the
policy routes, and the CLI commands on top of them (agent/cli/policy.py), with
AuthorizationPolicy and TrafficPolicy documents."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import threading
import types

import pytest
from click.testing import CliRunner

from agent import admin as admin_api
from agent.adminclient import admin_request
from agent.cli import main
from agent.policy.store import PolicyStore
from agent.traffic.trafficpolicy import TRAFFIC_KIND
from agent.workloads.yamlfile import parse_inventory
from tests.support.admin import admin_server
from tests.support.policy import BAD

REPO_POLICIES = str(pathlib.Path(__file__).resolve().parents[2] / "policies")


# one service: shop/backend on port 80 (for the traffic warnings)
INVENTORY = """\
nodes: [{name: node1, address: 198.18.0.1}]
services:
  - {name: backend, namespace: shop, vip: 10.96.0.10, selector: {app: backend}, ports: [{port: 80}]}
"""


class PolicyAgent:
    """The parts of agent.admin.AdminAgent the policy routes use: a real store
    and inventory; ``sync_policy_kernel`` counts its calls."""

    def __init__(self, sock: str, store: PolicyStore):
        self.cfg = types.SimpleNamespace(admin=types.SimpleNamespace(socket=sock))
        self.policies, self.policy_lock = store, threading.Lock()
        self.inventory, self.inventory_error = parse_inventory(INVENTORY, "inv.yaml"), None
        self.kernel_syncs = 0

    def sync_policy_kernel(self) -> None:
        self.kernel_syncs += 1


@pytest.fixture
def admin(tmp_path):
    """An admin server on a socket in tmp_path, run in its own thread and loop."""
    sock = str(tmp_path / "admin.sock")
    store = PolicyStore(str(tmp_path / "run"), kinds=[TRAFFIC_KIND]).load()
    agent = PolicyAgent(sock, store)
    with admin_server(agent):
        yield types.SimpleNamespace(sock=sock, store=store, run_dir=tmp_path / "run", agent=agent)


def files(*pairs):
    return {"files": [{"filename": f, "text": t} for f, t in pairs]}


def test_routes(admin):
    text = pathlib.Path(REPO_POLICIES, "20-shop-deny-admin.yaml").read_text()
    code, data = admin_request(admin.sock, "POST", "/v1/policies:diff", files(("x.yaml", text)))
    assert code == 200 and data["diff"].startswith("--- /dev/null\n")
    assert admin.agent.kernel_syncs == 0  # a diff changes nothing
    code, data = admin_request(admin.sock, "POST", "/v1/policies:apply", files(("x.yaml", text)))
    assert code == 200 and [c["result"] for c in data["changes"]] == ["created"]
    assert admin.agent.kernel_syncs == 1  # the kernel's L4 entries follow before the answer
    # where the time went, stage by stage (wall and this thread's CPU), the kernel sync included
    assert list(data["timings"]) == ["decode", "parse", "plan", "compile", "write", "kernel"]
    assert all(set(t) == {"ms", "cpu_ms"} for t in data["timings"].values())
    version = data["version"]
    code, data = admin_request(admin.sock, "GET", "/v1/policies")
    assert code == 200 and data["count"] == 1 and data["version"] == version
    ns, name = data["policies"][0]["namespace"], data["policies"][0]["name"]
    code, data = admin_request(admin.sock, "GET", f"/v1/policies/{ns}/{name}")
    assert code == 200 and data["document"]["metadata"]["name"] == name
    assert data["yaml"].startswith("apiVersion:")
    code, data = admin_request(admin.sock, "POST", "/v1/policies:apply", files(("bad.yaml", BAD)))
    assert code == 400 and data["errors"][0]["file"] == "bad.yaml" and data["errors"][0]["line"] == 7
    assert admin.store.version == version
    assert admin_request(admin.sock, "GET", "/v1/policies/shop/nope")[0] == 404
    assert admin_request(admin.sock, "DELETE", f"/v1/policies/{ns}/{name}")[0] == 200
    assert admin.agent.kernel_syncs == 2
    assert admin_request(admin.sock, "DELETE", f"/v1/policies/{ns}/{name}")[0] == 404
    assert admin_request(admin.sock, "PUT", "/v1/policies")[0] == 405
    assert admin_request(admin.sock, "POST", "/v1/status", {})[0] == 405
    assert admin_request(admin.sock, "GET", "/v1/policies:apply")[0] == 405


def test_bodies(admin):
    def raw(req: bytes) -> tuple[int, dict]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(admin.sock)
            s.sendall(req)
            s.shutdown(socket.SHUT_WR)   # a short body ends here
            answer = b"".join(iter(lambda: s.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    assert raw(b"POST /v1/policies:apply HTTP/1.0\r\nContent-Length: x\r\n\r\n")[0] == 400
    big = admin_api.ADMIN_BODY_LIMIT + 1
    assert raw(f"POST /v1/policies:apply HTTP/1.0\r\nContent-Length: {big}\r\n\r\n".encode())[0] == 413
    assert raw(b"POST /v1/policies:apply HTTP/1.0\r\nContent-Length: 4\r\n\r\n{}")[0] == 400
    code, data = raw(b"POST /v1/policies:apply HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
    assert code == 400 and "files" in data["error"]
    assert raw(b"GET /v1/policies HTTP/1.0\r\n" + b"X: y\r\n" * 200 + b"\r\n")[0] == 431


def test_cli(admin, tmp_path):
    run = CliRunner().invoke
    env = {"MESHLET_ADMIN_SOCKET": admin.sock}
    r = run(main, ["policy", "diff", "-f", REPO_POLICIES], env=env)
    assert r.exit_code == 1 and "+++ b/shop/" in r.output
    r = run(main, ["policy", "apply", "-f", REPO_POLICIES], env=env)
    assert r.exit_code == 0, r.output
    assert r.output.count(" created\n") == admin.store.count > 1
    version = admin.store.version
    r = run(main, ["policy", "apply", "-f", REPO_POLICIES], env=env)
    assert r.exit_code == 0 and " created" not in r.output and " unchanged" in r.output
    assert run(main, ["policy", "diff", "-f", REPO_POLICIES], env=env).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = run(main, ["policy", "apply", "-f", REPO_POLICIES, "-f", str(bad)], env=env)
    assert r.exit_code == 1 and f"{bad}:7:" in r.output and "nothing changed" in r.output
    assert run(main, ["policy", "diff", "-f", str(bad)], env=env).exit_code == 3
    assert admin.store.version == version
    r = run(main, ["policy", "list", "-o", "json"], env=env)
    data = json.loads(r.output)
    assert data["version"] == version
    p = data["policies"][0]
    r = run(main, ["policy", "get", p["name"], "-n", p["namespace"]], env=env)
    assert r.exit_code == 0 and f"name: {p['name']}" in r.output
    r = run(main, ["policy", "get", p["name"], "-n", p["namespace"], "-o", "json"], env=env)
    assert json.loads(r.output)["metadata"]["namespace"] == p["namespace"]
    assert run(main, ["policy", "get", "nope", "-n", "shop"], env=env).exit_code == 1
    r = run(main, ["policy", "delete", p["name"], "-n", p["namespace"]], env=env)
    assert r.exit_code == 0 and "deleted" in r.output
    assert run(main, ["policy", "delete", p["name"], "-n", p["namespace"]], env=env).exit_code == 1
    r = run(main, ["policy", "list"], env=env)
    assert r.exit_code == 0 and f"{len(data['policies']) - 1} policies" in r.output
    assert os.path.exists(admin.run_dir / "policies.json")


def test_cli_without_agent(tmp_path):
    env = {"MESHLET_ADMIN_SOCKET": str(tmp_path / "nothing.sock")}
    r = CliRunner().invoke(main, ["policy", "list"], env=env)
    assert r.exit_code == 1 and "cannot reach the agent" in r.output
    assert CliRunner().invoke(main, ["policy", "diff", "-f", REPO_POLICIES], env=env).exit_code == 3


TRAFFIC = str(pathlib.Path(REPO_POLICIES, "traffic"))


def traffic_doc(name: str, service: str = "backend", attempts: int = 2) -> str:
    return (f"apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\n"
            f"metadata: {{name: {name}, namespace: shop}}\n"
            f"spec:\n  service: {service}\n  retries: {{attempts: {attempts}}}\n")


def test_traffic_routes(admin):
    both = (traffic_doc("deny-admin") + "---\n"
            + pathlib.Path(REPO_POLICIES, "20-shop-deny-admin.yaml").read_text())
    code, data = admin_request(admin.sock, "POST", "/v1/policies:apply", files(("m.yaml", both)))
    assert code == 200, data
    assert sorted((c["kind"], c["name"]) for c in data["changes"]) == [
        ("AuthorizationPolicy", "deny-admin"), ("TrafficPolicy", "deny-admin")]
    assert data["warnings"] == [] and data["count"] == 2
    code, data = admin_request(admin.sock, "GET", "/v1/policies")
    assert data["byKind"] == {"AuthorizationPolicy": 1, "TrafficPolicy": 1}
    assert [p["kind"] for p in data["policies"]] == ["AuthorizationPolicy", "TrafficPolicy"]
    # one name, two kinds: the kind is needed
    code, data = admin_request(admin.sock, "GET", "/v1/policies/shop/deny-admin")
    assert code == 409 and data["kinds"] == ["AuthorizationPolicy", "TrafficPolicy"]
    assert admin_request(admin.sock, "DELETE", "/v1/policies/shop/deny-admin")[0] == 409
    code, data = admin_request(admin.sock, "GET", "/v1/policies/shop/deny-admin?kind=TrafficPolicy")
    assert code == 200 and data["kind"] == "TrafficPolicy"
    assert data["document"]["spec"]["service"] == "backend" and "kind: TrafficPolicy" in data["yaml"]
    assert admin_request(admin.sock, "GET", "/v1/policies/shop/deny-admin?kind=Gateway")[0] == 400
    code, data = admin_request(admin.sock, "DELETE", "/v1/policies/shop/deny-admin?kind=TrafficPolicy")
    assert code == 200 and data["kind"] == "TrafficPolicy" and data["count"] == 1
    assert admin_request(admin.sock, "GET", "/v1/policies/shop/deny-admin")[1]["kind"] == \
        "AuthorizationPolicy"
    # a service the inventory does not have: applied, with a warning
    code, data = admin_request(admin.sock, "POST", "/v1/policies:apply",
                               files(("w.yaml", traffic_doc("later", "cart"))))
    assert code == 200 and [c["result"] for c in data["changes"]] == ["created"]
    (w,) = data["warnings"]
    assert w.startswith("policies.yaml:") and "no-service" in w and "shop/cart" in w
    # a bad TrafficPolicy next to a good AuthorizationPolicy: nothing changes
    version = admin.store.version
    bad = traffic_doc("x").replace("attempts: 2", "attempts: eleven")
    code, data = admin_request(admin.sock, "POST", "/v1/policies:apply",
                               files(("ok.yaml", both), ("bad.yaml", bad)))
    assert code == 400 and [(e["file"], e["line"], e["path"]) for e in data["errors"]] == [
        ("bad.yaml", 6, "spec.retries.attempts")]
    assert admin.store.version == version


def test_traffic_cli(admin):
    run = CliRunner().invoke
    env = {"MESHLET_ADMIN_SOCKET": admin.sock}
    r = run(main, ["policy", "validate", REPO_POLICIES, TRAFFIC])
    assert r.exit_code == 0 and "3 traffic policies" in r.output and "TRAFFIC" in r.output, r.output
    r = run(main, ["policy", "apply", "-f", REPO_POLICIES, "-f", TRAFFIC], env=env)
    assert r.exit_code == 0, r.output
    assert "trafficpolicy shop/backend created\n" in r.stdout
    assert "trafficpolicy data/postgres created\n" in r.stdout
    # the inventory has shop/backend:80 only: warnings on stderr, not a failure
    assert "warning: " in r.stderr and "data/postgres" in r.stderr and "no port 8443" in r.stderr
    assert (admin.run_dir / "traffic.json").exists()
    assert run(main, ["policy", "diff", "-f", TRAFFIC], env=env).exit_code == 0
    r = run(main, ["policy", "list"], env=env)
    assert r.exit_code == 0 and r.output.splitlines()[0].split() == ["KIND", "NAMESPACE", "NAME", "WHAT"]
    assert any(ln.split()[:3] == ["TrafficPolicy", "shop", "backend-checkout"]
               and "service backend:8443, 1 retries" in ln for ln in r.output.splitlines())
    r = run(main, ["policy", "get", "trafficpolicy/backend", "-n", "shop", "-o", "json"], env=env)
    assert r.exit_code == 0 and json.loads(r.output)["spec"]["retries"]["attempts"] == 3
    r = run(main, ["policy", "get", "backend", "-n", "shop", "--kind", "TrafficPolicy"], env=env)
    assert r.exit_code == 0 and "kind: TrafficPolicy\n" in r.output
    r = run(main, ["policy", "get", "backend", "-n", "shop"], env=env)  # one kind has it
    assert r.exit_code == 0 and "service: backend" in r.output
    assert run(main, ["policy", "get", "gateway/backend", "-n", "shop"], env=env).exit_code == 2
    assert run(main, ["policy", "get", "authorizationpolicy/backend", "-n", "shop"],
               env=env).exit_code == 1
    r = run(main, ["policy", "delete", "trafficpolicy/backend", "-n", "shop"], env=env)
    assert r.exit_code == 0 and r.output.startswith("trafficpolicy shop/backend deleted")
    assert run(main, ["policy", "get", "backend", "-n", "shop"], env=env).exit_code == 1
    assert json.loads((admin.run_dir / "traffic.json").read_text())["count"] == 2
