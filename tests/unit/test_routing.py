"""Routing table tests: (state, kernel record, peer) → decision."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from agent.proxy.routing import Local, Passthrough, Reject, Tunnel, route
from agent.proxy.state import parse_state



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


@dataclass(frozen=True)
class Origin:
    family: int
    dst_ip: str
    dst_port: int
    cgroup_id: int


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
