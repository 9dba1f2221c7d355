"""Routing table tests: (state, kernel record, peer) → decision."""

from __future__ import annotations

import socket

import pytest

from agent.proxy.routing import Local, Passthrough, Reject, Tunnel, route
from agent.proxy.state import parse_state
from tests.support.mesh import FlowOrigin as Origin



def doc():
    return {
        "version": 1, "generation": 1, "node": "node1", "trust_domain": "cluster.local",
        "identity": {"trust_domain": "cluster.local", "ca_socket": "/run/meshlet/node1/ca.sock",
                     "generation": 1, "cert_ttl": 86400},
        "listen": {"ipv4": "0.0.0.0", "ipv6": "::", "outbound_port": 15001, "tunnel_port": 15008},
        "nodes": {"node1": {"address": "198.18.0.1", "address6": "fd00:198:18::1"},
                  "node2": {"address": "198.18.0.2"}},
        "pods": [
            {"name": "pod1-1", "namespace": "default", "service_account": "pod1-1", "node": "node1",
             "ips": ["10.244.1.10", "fd00:244:1::10"], "cgroup_id": 4242, "mesh": True},
            {"name": "pod2-1", "namespace": "default", "node": "node2", "ips": ["10.244.2.10"], "cgroup_id": 4242},
            {"name": "plain", "namespace": "default", "node": "node1", "ips": ["10.244.1.99"],
             "cgroup_id": 77, "mesh": False},
        ],
    }


def _state():
    d = doc()
    d["pods"].append({"name": "pod1-2", "namespace": "web", "service_account": "web", "node": "node1",
                      "ips": ["10.244.1.11"], "cgroup_id": 4343})
    d["pods"].append({"name": "pod3-1", "namespace": "web", "node": "node3", "ips": ["fd00:244:3::10"]})
    d["nodes"]["node3"] = {"address6": "fd00:198:18::3"}
    d["pods"].append({"name": "lost", "namespace": "web", "node": "node9", "ips": ["10.244.9.10"]})
    return parse_state(d)


S = _state()
V4, V6 = socket.AF_INET, socket.AF_INET6
P1 = ("10.244.1.10", 40000)

CASES = [
    # (origin, peer, expected type, check)
    (Origin(V4, "10.244.1.11", 80, 4242), P1, Local, lambda d: d.addr == ("10.244.1.11", 80) and d.pod.key == "web/pod1-2"),
    (Origin(V4, "10.244.2.10", 8080, 4242), P1, Tunnel,
     lambda d: d.addr == ("198.18.0.2", 15008) and d.dst == ("10.244.2.10", 8080) and d.node == "node2"),
    (Origin(V6, "fd00:244:3::10", 443, 4242), ("fd00:244:1::10", 5, 0, 0), Tunnel,
     lambda d: d.addr == ("fd00:198:18::3", 15008)),
    (Origin(V4, "93.184.216.34", 443, 4242), P1, Passthrough, lambda d: d.addr == ("93.184.216.34", 443)),
    # non-mesh pod: connect directly
    (Origin(V4, "10.244.1.99", 80, 4242), P1, Passthrough, lambda d: d.addr == ("10.244.1.99", 80)),
    # IPv4-mapped peer is the same address
    (Origin(V6, "10.244.1.11", 80, 4242), ("::ffff:10.244.1.10", 1, 0, 0), Local, lambda d: True),
    # unknown cgroup; a cgroup id only known on another node; a non-mesh pod's cgroup
    (Origin(V4, "10.244.1.11", 80, 1), P1, Reject, lambda d: "unknown source cgroup 1" in d.reason),
    (Origin(V4, "10.244.1.11", 80, 77), ("10.244.1.99", 1), Reject, lambda d: "cgroup 77" in d.reason),
    # kernel record and address disagree
    (Origin(V4, "10.244.1.11", 80, 4242), ("10.244.1.11", 1), Reject, lambda d: "disagree" in d.reason),
    # the proxy itself
    (Origin(V4, "198.18.0.1", 15001, 4242), P1, Reject, lambda d: "loop" in d.reason),
    (Origin(V4, "127.0.0.1", 15008, 4242), P1, Reject, lambda d: "loop" in d.reason),
    (Origin(V6, "fd00:198:18::1", 15001, 4242), P1, Reject, lambda d: "loop" in d.reason),
    # same node address, other port: fine (node-local service)
    (Origin(V4, "198.18.0.1", 22, 4242), P1, Passthrough, lambda d: True),
    # a pod may not open a mesh tunnel itself (it could claim any identity)
    (Origin(V4, "198.18.0.2", 15008, 4242), P1, Reject, lambda d: "tunnel" in d.reason),
    (Origin(V6, "fd00:198:18::3", 15008, 4242), P1, Reject, lambda d: "tunnel" in d.reason),
    # destination pod on a node with no address
    (Origin(V4, "10.244.9.10", 80, 4242), P1, Reject, lambda d: "node9" in d.reason),
]


@pytest.mark.parametrize("origin, peer, kind, check", CASES)
def test_route(origin, peer, kind, check):
    d = route(S, origin, peer)
    assert type(d) is kind, d
    assert check(d), d
    if not isinstance(d, Reject) or "cgroup" not in d.reason:
        assert d.src is not None and d.src.key == "default/pod1-1"


# --- services ---------------------------------------------------------------------------

from agent.proxy.routing import ServiceRoute, endpoint_route  # noqa: E402


def _ep(pod, ip, port, node):
    return {"pod": pod, "ip": ip, "port": port, "node": node}


def _svc_state():
    d = doc()
    d["nodes"]["node3"] = {"address6": "fd00:198:18::3"}
    d["pods"] += [
        {"name": "be-1", "namespace": "shop", "node": "node1", "ips": ["10.244.1.20", "fd00:244:1::20"],
         "cgroup_id": 5151},
        {"name": "be-2", "namespace": "shop", "node": "node2", "ips": ["10.244.2.20"], "cgroup_id": 1},
        {"name": "be-3", "namespace": "shop", "node": "node3", "ips": ["fd00:244:3::20"]},
        {"name": "be-off", "namespace": "shop", "node": "node1", "ips": ["10.244.1.21"], "mesh": False},
        {"name": "be-lost", "namespace": "shop", "node": "node9", "ips": ["10.244.9.20"]},
    ]
    eps = [_ep("shop/be-1", "10.244.1.20", 8080, "node1"), _ep("shop/be-1", "fd00:244:1::20", 8080, "node1"),
           _ep("shop/be-2", "10.244.2.20", 8080, "node2"), _ep("shop/be-3", "fd00:244:3::20", 8080, "node3"),
           _ep("shop/be-off", "10.244.1.21", 8080, "node1"), _ep("shop/be-lost", "10.244.9.20", 8080, "node9")]
    d["services"] = [
        {"name": "be", "namespace": "shop", "vips": ["10.96.0.10", "fd00:96::10"],
         "ports": [{"port": 80, "target_port": 8080, "name": "http", "app_protocol": "http",
                    "endpoints": eps},
                   {"port": 9000, "target_port": 9000, "endpoints": []}]},
        {"name": "db", "namespace": "shop", "vips": ["10.96.0.10"],  # same VIP, another port
         "ports": [{"port": 5432, "target_port": 5432, "app_protocol": "opaque", "endpoints": []}]},
    ]
    return parse_state(d)


SS = _svc_state()


def test_vip_gives_a_service_route_with_the_endpoints_of_its_family():
    d = route(SS, Origin(V4, "10.96.0.10", 80, 4242), P1)
    assert type(d) is ServiceRoute, d
    assert (d.src.key, d.service, d.name, d.namespace, d.port, d.app_protocol, d.vip) == (
        "default/pod1-1", "shop/be", "be", "shop", 80, "http", ("10.96.0.10", 80))
    assert (d.target_port, d.port_name, d.cluster, d.family) == (8080, "http", "shop/be:80", V4)
    assert [p.key for p in d.endpoints] == ["shop/be-1", "shop/be-2", "shop/be-lost", "shop/be-off"]
    assert d.endpoints[0] is SS.pod_by_key["shop/be-1"]
    assert d.addr_of(d.endpoints[0]) == ("10.244.1.20", 8080)
    with pytest.raises(KeyError):
        d.addr_of(SS.pod_by_key["shop/be-3"])  # no IPv4 address: not an endpoint of the v4 VIP
    # the IPv6 VIP: IPv6 endpoints only
    d6 = route(SS, Origin(V6, "fd00:96::10", 80, 4242), ("fd00:244:1::10", 5, 0, 0))
    assert [p.key for p in d6.endpoints] == ["shop/be-1", "shop/be-3"]
    assert d6.addrs == ("fd00:244:1::20", "fd00:244:3::20") and d6.vip == ("fd00:96::10", 80)
    # IPv4-mapped VIP from a dual-stack socket: the IPv4 service, the client's family kept
    dm = route(SS, Origin(V6, "::ffff:10.96.0.10", 80, 4242), ("::ffff:10.244.1.10", 1, 0, 0))
    assert dm.vip == ("10.96.0.10", 80) and dm.family == V6 and dm.endpoints == d.endpoints
    # another service on the same VIP; a port with no endpoints (the caller refuses it)
    db = route(SS, Origin(V4, "10.96.0.10", 5432, 4242), P1)
    assert (db.service, db.app_protocol, db.endpoints) == ("shop/db", "opaque", ())
    assert route(SS, Origin(V4, "10.96.0.10", 9000, 4242), P1).app_protocol is None  # detect


def test_vip_on_an_undeclared_port_is_rejected():
    d = route(SS, Origin(V4, "10.96.0.10", 81, 4242), P1)
    assert type(d) is Reject and d.code == "no_service_port" and d.src.key == "default/pod1-1"
    assert "10.96.0.10 is a service VIP, but no service has port 81" in d.reason
    assert "80 (shop/be)" in d.reason and "5432 (shop/db)" in d.reason
    d6 = route(SS, Origin(V6, "fd00:96::10", 5432, 4242), ("fd00:244:1::10", 5, 0, 0))
    assert type(d6) is Reject and d6.code == "no_service_port"
    # the source checks still come first
    assert route(SS, Origin(V4, "10.96.0.10", 80, 999), P1).code == "unknown_source"


def _direct_cases():
    src = SS.pod_by_key["default/pod1-1"]
    for pod in SS.pods:
        for ip in pod.ips:
            for fam in (V4, V6):
                if fam == V4 and ":" in ip:
                    continue
                for port in (80, 8080, 15001, 15008):
                    yield src, pod, ip, fam, port


@pytest.mark.parametrize("src, pod, ip, fam, port", list(_direct_cases()),
                         ids=lambda v: getattr(v, "key", str(v)))
def test_endpoint_route_is_what_a_direct_connection_gets(src, pod, ip, fam, port):
    peer = P1 if fam == V4 else ("::ffff:10.244.1.10", 1, 0, 0)
    # what an IPv6 socket dialing an IPv4 address reports: IPv4-mapped
    dst = f"::ffff:{ip}" if fam == V6 and ":" not in ip else ip
    direct = route(SS, Origin(fam, dst, port, 4242), peer)
    assert endpoint_route(SS, src, pod, port, ip=ip, family=fam) == direct


def test_endpoint_route_decisions():
    src = SS.pod_by_key["default/pod1-1"]
    pk = SS.pod_by_key
    d = endpoint_route(SS, src, pk["shop/be-1"], 8080)
    assert type(d) is Local and d.addr == ("10.244.1.20", 8080)  # IPv4 preferred by default
    d = endpoint_route(SS, src, pk["shop/be-1"], 8080, ip="fd00:244:1::20")
    assert type(d) is Local and d.addr == ("fd00:244:1::20", 8080)
    d = endpoint_route(SS, src, pk["shop/be-2"], 8080)
    assert type(d) is Tunnel and d.addr == ("198.18.0.2", 15008) and d.dst == ("10.244.2.20", 8080)
    d = endpoint_route(SS, src, pk["shop/be-3"], 8080)
    assert type(d) is Tunnel and d.addr == ("fd00:198:18::3", 15008)
    # IPv6 client socket: the node's IPv6 tunnel address when it has one (as route())
    d = endpoint_route(SS, src, pk["default/pod2-1"], 80, family=V6)
    assert type(d) is Tunnel and d.addr == ("198.18.0.2", 15008)  # node2 has no IPv6
    d = endpoint_route(SS, src, pk["shop/be-off"], 8080)
    assert type(d) is Passthrough and d.addr == ("10.244.1.21", 8080)
    d = endpoint_route(SS, src, pk["shop/be-lost"], 8080)
    assert type(d) is Reject and d.code == "no_route" and "node9" in d.reason
    d = endpoint_route(SS, src, pk["shop/be-1"], 8080, ip="10.244.2.20")
    assert type(d) is Reject and "not an address of pod shop/be-1" in d.reason
    assert endpoint_route(SS, None, pk["shop/be-1"], 8080).src is None  # src carried as given
    # a ServiceRoute's endpoint, the way the proxy will use it
    sr = route(SS, Origin(V4, "10.96.0.10", 80, 4242), P1)
    picks = [endpoint_route(SS, sr.src, p, sr.target_port, ip=sr.addr_of(p)[0], family=sr.family)
             for p in sr.endpoints]
    assert [type(x).__name__ for x in picks] == ["Local", "Tunnel", "Reject", "Passthrough"]
