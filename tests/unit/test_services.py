"""Services (agent/workloads/model.py, read by agent/workloads/yamlfile.py):
the services section, endpoints from selectors, VIP lookup, and exact error
positions."""

from __future__ import annotations

import ipaddress

import pytest

from agent.workloads.model import Endpoint, ServiceIndex, ServicePort
from agent.workloads.yamlfile import parse_inventory, parse_services
from agent.yamlsrc import SourceError

INVENTORY = """\
nodes:
  - {name: node1, address: 198.18.0.1}
  - {name: node2, address: 198.18.0.2}
pods:
  - {name: be-1, namespace: shop, labels: {app: backend, v: "1"}, node: node1,
     ips: [10.244.1.10, "fd00:244:1::10"], cgroup: /x/1}
  - {name: be-2, namespace: shop, labels: {app: backend, v: "2"}, node: node2,
     ips: [10.244.2.10], cgroup: /x/2}
  - {name: web-1, namespace: shop, labels: {app: web}, node: node1, ips: [10.244.1.11], cgroup: /x/3}
  - {name: be-other, namespace: other, labels: {app: backend}, node: node2, ips: [10.244.2.11], cgroup: /x/4}
"""

SERVICES = """\
services:
  - name: backend
    namespace: shop
    vip: [10.96.0.10, "fd00:96::10"]
    selector: {app: backend}
    ports:
      - {port: 80, targetPort: 8080, name: http, appProtocol: http}
      - {port: 5432, appProtocol: opaque}
      - {port: 9000}
  - name: backend-v2
    namespace: shop
    vip: 10.96.0.11
    selector: {app: backend, v: "2"}
    ports: [{port: 80, appProtocol: tcp}]
"""

PODS = parse_inventory(INVENTORY, "inv.yaml").pods


def errors(text: str) -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_services(text, "svc.yaml", PODS)
    return [str(p) for p in ei.value.errors]


def test_endpoints_follow_selector_and_namespace():
    idx = parse_services(SERVICES, "svc.yaml", PODS)
    be, v2 = idx.services
    assert be.key == "shop/backend" and be.vips == (ipaddress.ip_address("10.96.0.10"),
                                                      ipaddress.ip_address("fd00:96::10"))
    eps = idx.endpoints(be, 80)
    assert eps == [Endpoint("shop/be-1", ipaddress.ip_address("10.244.1.10"), 8080, "node1"),
                   Endpoint("shop/be-2", ipaddress.ip_address("10.244.2.10"), 8080, "node2")]
    assert idx.endpoints("shop/backend", "http") == eps  # by port name too
    # IPv6: only the pod that has an IPv6 address
    assert [e.pod for e in idx.endpoints(be, 80, family=6)] == ["shop/be-1"]
    assert [e.pod for e in idx.endpoints(v2, 80)] == ["shop/be-2"]
    assert idx.endpoints(be, 9000)[0].port == 9000  # targetPort defaults to port
    assert idx.endpoints(be, 81) == [] and idx.endpoints("shop/nope", 80) == []
    assert idx.services_of(PODS[1]) == (be, v2) and idx.services_of(PODS[2]) == ()


def test_by_vip_and_protocols():
    idx = parse_services(SERVICES, "svc.yaml", PODS)
    svc, port = idx.by_vip("10.96.0.10", 80)
    assert svc.name == "backend" and port == ServicePort(80, 8080, "http", "http") and port.l7
    assert idx.by_vip("::ffff:10.96.0.10", 5432)[1].app_protocol == "opaque"
    assert idx.by_vip("FD00:96:0::10", 80)[0] is svc
    assert idx.by_vip("10.96.0.10", 81) is None and idx.by_vip("junk", 80) is None
    opaque, plain = idx.by_vip("10.96.0.10", 5432)[1], idx.by_vip("10.96.0.10", 9000)[1]
    assert not opaque.detect and not opaque.l7      # opaque: L4, never sniffed
    assert plain.detect                              # absent: detect
    assert not idx.by_vip("10.96.0.11", 80)[1].detect  # tcp: L4, never sniffed


@pytest.mark.parametrize("body, expected", [
    ("  - name: a\n    vip: [10.96.0.1, 10.96.0.2]\n    selector: {a: b}\n    ports: [{port: 80}]\n",
     ["svc.yaml:3:22: services[0].vip[1]: a service has at most one IPv4 VIP (vip[0] is 10.96.0.1)"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {}\n    ports: [{port: 80}]\n",
     ["svc.yaml:4:15: services[0].selector: a service needs at least one selector label; "
      "without one it would have no endpoints"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80, targetPort: http}]\n",
     ["svc.yaml:5:36: services[0].ports[0].targetPort: named target ports ('http') are not "
      "supported; write the pod's port number"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80, appProtocol: grpc}]\n",
     ["svc.yaml:5:37: services[0].ports[0].appProtocol: 'grpc' is not one of: http, tcp, opaque"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80}, {port: 80}]\n",
     ["svc.yaml:5:32: services[0].ports[1].port: port 80 is listed twice (first at line 5)"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: []\n",
     ["svc.yaml:5:12: services[0].ports: a service needs at least one port"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80}]\n    typ: x\n",
     ["svc.yaml:6:5: services[0].typ: unknown field 'typ'; known fields: name, namespace, vip, "
      "ports, selector"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80}]\n"
     "  - name: b\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80}]\n",
     ["svc.yaml:7:10: services[1].vip: 10.96.0.1:80 is already served by service "
      "'default/a' (line 2)"]),
    ("  - name: a\n    vip: 10.96.0.1\n    selector: {a: b}\n    ports: [{port: 80}]\n"
     "  - name: a\n    vip: 10.96.0.2\n    selector: {a: b}\n    ports: [{port: 80}]\n",
     ["svc.yaml:6:11: services[1].name: service 'default/a' is listed twice (first at line 2)"]),
    ("  - name: a\n    vip: 10.244.1.11\n    selector: {a: b}\n    ports: [{port: 80}]\n",
     ["svc.yaml:3:10: services[0].vip: VIP 10.244.1.11 is also the IP of pod shop/web-1; "
      "pick an unused address"]),
])
def test_errors_with_exact_positions(body, expected):
    assert errors("services:\n" + body) == expected


def test_empty_index_and_no_section():
    assert parse_services("pods: []\n", "svc.yaml").services == ()
    assert ServiceIndex().by_vip("10.0.0.1", 80) is None


# --- published shape, admin API and CLI ---------------------------------------------------

def test_services_doc_lists_endpoints_of_both_families():
    from agent.workloads.model import services_doc

    idx = parse_services(SERVICES, "svc.yaml", PODS)
    be, v2 = services_doc(idx)
    assert (be["key"], be["vips"], be["selector"]) == ("shop/backend", ["10.96.0.10", "fd00:96::10"],
                                                       {"app": "backend"})
    assert be["ports"][0]["endpoints"] == [
        {"pod": "shop/be-1", "ip": "10.244.1.10", "port": 8080, "node": "node1"},
        {"pod": "shop/be-2", "ip": "10.244.2.10", "port": 8080, "node": "node2"},
        {"pod": "shop/be-1", "ip": "fd00:244:1::10", "port": 8080, "node": "node1"}]
    assert [p["app_protocol"] for p in be["ports"]] == ["http", "opaque", None]
    assert [e["pod"] for e in v2["ports"][0]["endpoints"]] == ["shop/be-2"]


ADMIN_INV = INVENTORY.replace("ips: [10.244.1.11], cgroup: /x/3}",
                              "ips: [10.244.1.11], cgroup: /x/3, mesh: false}") + """\
  - {name: web-2, namespace: shop, labels: {app: web}, node: node2, ips: [10.244.2.12], cgroup: /x/5}
services:
  - name: backend
    namespace: shop
    vip: [10.96.0.10, "fd00:96::10"]
    selector: {app: backend}
    ports: [{port: 80, targetPort: 8080, name: http, appProtocol: http}]
  - {name: web, namespace: shop, vip: 10.96.0.12, selector: {app: web}, ports: [{port: 8000}]}
  - {name: nobody, namespace: shop, vip: 10.96.0.13, selector: {app: none}, ports: [{port: 1}]}
"""


@pytest.fixture
def admin(tmp_path):
    """The agent's admin server (agent/admin.py) on a socket in tmp_path, for a
    stand-in agent holding a parsed inventory; its own thread and loop."""
    import types

    from tests.support.admin import admin_server

    sock = str(tmp_path / "admin.sock")
    agent = types.SimpleNamespace(
        cfg=types.SimpleNamespace(node="node1", admin=types.SimpleNamespace(socket=sock)),
        inventory=parse_inventory(ADMIN_INV, "inv.yaml"), inventory_error=None)
    with admin_server(agent):
        yield types.SimpleNamespace(sock=sock, agent=agent)


def _cli(*args):
    from click.testing import CliRunner

    from agent.cli import main

    return CliRunner().invoke(main, list(args))


def test_admin_api_and_cli_json(admin):
    import json

    from agent.adminclient import admin_request

    code, data = admin_request(admin.sock, "GET", "/v1/services")
    assert code == 200 and data["node"] == "node1" and data["inventory_error"] is None
    assert [s["key"] for s in data["services"]] == ["shop/backend", "shop/web", "shop/nobody"]
    web = data["services"][1]["ports"][0]
    assert web["endpoints"] == [
        {"pod": "shop/web-1", "ip": "10.244.1.11", "port": 8000, "node": "node1", "mesh": False,
         "local": True},
        {"pod": "shop/web-2", "ip": "10.244.2.12", "port": 8000, "node": "node2", "mesh": True,
         "local": False}]
    r = _cli("services", "--socket", admin.sock, "-o", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == data
    code, data = admin_request(admin.sock, "GET", "/v1/nothing")
    assert code == 404 and "/v1/services" in data["paths"]


def test_cli_table_and_wide(admin):
    r = _cli("services", "--socket", admin.sock)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["SERVICE", "VIPS", "PORT", "PROTOCOL", "ENDPOINTS"]
    assert lines[1].split() == ["shop/backend", "10.96.0.10,fd00:96::10", "80/http", "->", "8080",
                                "http", "2", "(1", "here)"]
    assert lines[2].split()[2:] == ["8000", "->", "8000", "detect", "2", "(1", "here)"]
    assert "0 (no pod matches)" in lines[3]
    r = _cli("services", "--socket", admin.sock, "-o", "wide")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.output.splitlines()]
    assert rows[0][-4:] == ["ENDPOINT", "NODE", "ADDRESS", "MESH"]
    assert rows[4][-4:] == ["shop/web-1", "node1", "10.244.1.11:8000", "no"]
    assert rows[3][-2:] == ["[fd00:244:1::10]:8080", "yes"]
    assert rows[-1][-1] == "<none>"
    admin.agent.inventory_error = "inv.yaml:3:4: pods[0].ips: bad"
    r = _cli("services", "--socket", admin.sock)
    assert "INVENTORY RELOAD FAILED" in r.output and "inv.yaml:3:4" in r.output


def test_cli_without_agent(tmp_path):
    r = _cli("services", "--socket", str(tmp_path / "none.sock"))
    assert r.exit_code == 1 and "cannot reach the agent" in r.output


def test_inventory_validate_covers_services(tmp_path):
    import json

    f = tmp_path / "inv.yaml"
    f.write_text(ADMIN_INV)
    r = _cli("inventory", "validate", str(f))
    assert r.exit_code == 0 and "valid (2 nodes, 5 pods, 3 services)" in r.output
    assert json.loads(_cli("inventory", "validate", str(f), "-o", "json").output)["services"] == 3
    f.write_text(ADMIN_INV.replace("vip: 10.96.0.12", "vip: 10.244.2.12"))
    r = _cli("inventory", "validate", str(f), "-o", "json")
    assert r.exit_code == 1 and json.loads(r.output)["errors"] == [
        f"{f}:18:39: services[1].vip: VIP 10.244.2.12 is also the IP of pod shop/web-2; "
        "pick an unused address"]
