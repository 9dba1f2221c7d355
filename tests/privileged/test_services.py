"""Services from the inventory to the proxy, end to end on a real 2-node
simulated cluster: the agents publish every service with its VIPs, ports
and endpoints (computed from the pods' labels) in proxy-state.json; the
proxy workers load that state; the proxy's own parser and router turn a
connection to the VIP into a ServiceRoute; `meshlet services` shows it; a
live inventory change is applied and a broken one keeps the previous
services.  (Traffic to a VIP through the data plane is the integrator's
e2e: the proxy server consumes ServiceRoute.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.support.privileged import require_privileged, wait_for

require_privileged()

from agent.proxy.routing import Reject, ServiceRoute, endpoint_route, route  # noqa: E402
from agent.proxy.state import load_state  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402
from tests.support.mesh import FlowOrigin as Origin  # noqa: E402

pytestmark = pytest.mark.privileged

VIP4, VIP6 = service_vip(10), service_vip(10, 6)


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pod_specs={
        1: [{"name": "client", "labels": {"app": "client"}},
            {"name": "web-1", "labels": {"app": "web", "v": "1"}}],
        2: [{"name": "web-2", "labels": {"app": "web", "v": "2"}},
            {"name": "web-off", "labels": {"app": "web", "v": "2"}}],
    }).up()
    m = Mesh(cluster, unmeshed={"web-off"}, services=[
        service("web", {"app": "web"}, [{"port": 80, "targetPort": 7000, "name": "http",
                                         "appProtocol": "http"},
                                        {"port": 7001, "appProtocol": "tcp"}],
                index=10, ipv6=True),
    ])
    try:
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


def state(mesh, node: str):
    return load_state(os.path.join(mesh.agents[node].run_dir, "proxy-state.json"))


def loaded_by_workers(mesh, node: str) -> bool:
    st = mesh.status(node)
    return all((w.get("stats") or {}).get("state_generation", -1) >= st["generation"]
               for w in st["proxy"])


def test_every_node_publishes_the_services_with_their_endpoints(mesh):
    c = mesh.cluster
    for node in ("node1", "node2"):
        s = state(mesh, node)
        svc, http = s.service_by_vip[(VIP4, 80)]
        assert svc.key == "default/web" and svc.vips == (VIP4, VIP6)
        assert (http.port, http.target_port, http.name, http.app_protocol) == (80, 7000, "http", "http")
        want = sorted([("default/web-1", c.pod("web-1").ip4, "node1"),
                       ("default/web-1", c.pod("web-1").ip6, "node1"),
                       ("default/web-2", c.pod("web-2").ip4, "node2"),
                       ("default/web-2", c.pod("web-2").ip6, "node2"),
                       ("default/web-off", c.pod("web-off").ip4, "node2"),
                       ("default/web-off", c.pod("web-off").ip6, "node2")])
        assert sorted((e.pod, e.ip, e.node) for e in http.endpoints) == want
        assert all(e.port == 7000 for e in http.endpoints)
        assert s.service_by_vip[(VIP6, 7001)][1].app_protocol == "tcp"
        assert wait_for(lambda: loaded_by_workers(mesh, node), f"{node}'s proxies loaded the state")


def test_the_proxy_routes_the_vip_from_its_state(mesh):
    c = mesh.cluster
    s = state(mesh, "node1")
    client = s.pod_by_key["default/client"]
    assert client.cgroup_id is not None  # enrolled: the kernel knows it
    d = route(s, Origin(socket.AF_INET, VIP4, 80, client.cgroup_id), (c.pod("client").ip4, 40000))
    assert type(d) is ServiceRoute and d.cluster == "default/web:80" and d.target_port == 7000
    assert [p.key for p in d.endpoints] == ["default/web-1", "default/web-2", "default/web-off"]
    kinds = [type(endpoint_route(s, d.src, p, d.target_port, ip=d.addr_of(p)[0],
                                 family=d.family)).__name__ for p in d.endpoints]
    assert kinds == ["Local", "Tunnel", "Passthrough"]  # same node, other node, not meshed
    d6 = route(s, Origin(socket.AF_INET6, VIP6, 7001, client.cgroup_id),
               (c.pod("client").ip6, 40000, 0, 0))
    assert type(d6) is ServiceRoute and set(d6.addrs) == {c.pod("web-1").ip6, c.pod("web-2").ip6,
                                                          c.pod("web-off").ip6}
    bad = route(s, Origin(socket.AF_INET, VIP4, 81, client.cgroup_id), (c.pod("client").ip4, 1))
    assert type(bad) is Reject and bad.code == "no_service_port"


def meshlet(mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--socket", sock],
                          capture_output=True, text=True, timeout=60)


def test_meshlet_services_shows_them(mesh):
    r = meshlet(mesh, "node2", "services", "-o", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["node"] == "node2" and [s["key"] for s in data["services"]] == ["default/web"]
    eps = data["services"][0]["ports"][0]["endpoints"]
    assert {(e["pod"], e["local"], e["mesh"]) for e in eps} == {
        ("default/web-1", False, True), ("default/web-2", True, True),
        ("default/web-off", True, False)}
    r = meshlet(mesh, "node2", "services")
    assert r.returncode == 0 and "default/web" in r.stdout and "3 (2 here)" in r.stdout


def test_live_change_applies_and_a_broken_one_keeps_the_previous(mesh):
    before = {n: state(mesh, n).generation for n in ("node1", "node2")}
    doc = mesh.inventory_doc()
    doc["services"][0]["selector"] = {"app": "web", "v": "2"}
    doc["services"].append(service("solo", {"app": "web", "v": "1"}, [{"port": 9}], index=11))
    mesh.write_inventory(doc)
    for node in ("node1", "node2"):
        s = wait_for(lambda: (st := state(mesh, node)).generation > before[node]
                     and "default/solo" in st.service_by_key and st, f"{node} publishes the change")
        assert {e.pod for e in s.service_by_vip[(VIP4, 80)][1].endpoints} == {
            "default/web-2", "default/web-off"}
        assert {e.pod for e in s.service_by_vip[(service_vip(11), 9)][1].endpoints} == {"default/web-1"}

    good = {n: state(mesh, n).generation for n in ("node1", "node2")}
    broken = dict(doc, services=doc["services"] + [
        service("clash", {"app": "web"}, [{"port": 80}], index=12)])
    broken["services"][-1]["vip"] = [mesh.cluster.pod("client").ip4]  # a pod's IP: refused
    mesh.write_inventory(broken)
    for node in ("node1", "node2"):
        st = wait_for(lambda: (x := mesh.status(node))["inventory"]["error"] and x,
                      f"{node} reports the broken inventory")
        err = st["inventory"]["error"]
        assert mesh.inventory_path in err and "services[2].vip" in err and "is also the IP" in err
        s = state(mesh, node)
        assert s.generation == good[node] and "default/clash" not in s.service_by_key
        assert mesh.admin(node, "/v1/services")["inventory_error"] == err
    mesh.write_inventory(doc)  # repaired: the error clears
    for node in ("node1", "node2"):
        wait_for(lambda: mesh.status(node)["inventory"]["error"] is None, f"{node} recovers")
