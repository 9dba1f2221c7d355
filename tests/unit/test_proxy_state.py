"""Proxy state file: parsing, validation, reload keeping the last good state."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest

from agent.proxy.state import StateError, StateWatcher, load_state, parse_state

DOC = {
    "version": 1,
    "generation": 7,
    "node": "node1",
    "trust_domain": "cluster.local",
    "identity": {"trust_domain": "cluster.local", "ca_socket": "/run/meshlet/node1/ca.sock",
                 "generation": 3, "cert_ttl": 86400},
    "pin_dir": "/sys/fs/bpf/meshlet/node1",
    "listen": {"ipv4": "0.0.0.0", "ipv6": "::", "outbound_port": 15001, "tunnel_port": 15008},
    "connect_timeout": 5.0,
    "mesh_mark": 1296826368,
    "buffer_size": 262144,
    "nodes": {
        "node1": {"address": "198.18.0.1", "address6": "fd00:198:18::1"},
        "node2": {"address": "198.18.0.2"},
    },
    "pods": [
        {"key": "default/pod1-1", "name": "pod1-1", "namespace": "default", "service_account": "pod1-1",
         "node": "node1", "ips": ["10.244.1.10", "fd00:244:1::10"], "cgroup_id": 4242, "mesh": True},
        {"key": "default/pod2-1", "name": "pod2-1", "namespace": "default", "service_account": "sa2",
         "node": "node2", "ips": ["10.244.2.10"], "cgroup_id": 4242, "mesh": True},
        {"key": "default/plain", "name": "plain", "namespace": "default", "service_account": "default",
         "node": "node1", "ips": ["10.244.1.99"], "cgroup_id": 77, "mesh": False},
    ],
}


def doc(**changes):
    d = copy.deepcopy(DOC)
    d.update(changes)
    return d


def test_parse_example():
    s = parse_state(doc())
    assert s.generation == 7 and s.node == "node1"
    assert s.listen.ipv6 == "::" and s.listen.tunnel_port == 15008
    assert s.pod_by_ip["fd00:244:1::10"].key == "default/pod1-1"
    assert s.pod_by_ip["10.244.2.10"].node == "node2"
    # cgroup ids are node-local: only this node's enrolled pods are indexed
    assert dict(s.pod_by_cgroup) == {4242: s.pod_by_ip["10.244.1.10"]}
    assert s.identity(s.pod_by_ip["10.244.2.10"]) == "spiffe://cluster.local/ns/default/sa/sa2"
    assert s.nodes["node2"].address_for(True) == "198.18.0.2"
    ic = s.identity_config
    assert (ic.trust_domain, ic.ca_socket, ic.generation, ic.cert_ttl) == (
        "cluster.local", "/run/meshlet/node1/ca.sock", 3, 86400)
    # the certificates this node needs: its enrolled pods only
    assert s.local_identities == {"spiffe://cluster.local/ns/default/sa/pod1-1"}
    with pytest.raises(TypeError):
        s.pod_by_ip["1.2.3.4"] = None  # type: ignore[index]


def test_ipv6_listener_optional():
    d = doc()
    d["listen"]["ipv6"] = None
    assert parse_state(d).listen.ipv6 is None


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(version=2), "state.version"),
        (lambda d: d.pop("node"), "state.node: missing"),
        (lambda d: d["listen"].update(outbound_port=0), "outbound_port"),
        (lambda d: d["listen"].update(ipv4="::1"), "state.listen.ipv4"),
        (lambda d: d["pods"][0].update(ips=["10.244.1.300"]), "state.pods[0].ips[0]"),
        (lambda d: d["pods"][1].update(ips=["10.244.1.10"]), "also the address of pod default/pod1-1"),
        (lambda d: d["pods"][0].update(cgroup_id="x"), "state.pods[0].cgroup_id"),
        (lambda d: d["pods"][0].update(mesh="yes"), "state.pods[0].mesh"),
        (lambda d: d.update(generation=True), "state.generation"),
        (lambda d: d.update(buffer_size=10), "state.buffer_size"),
        (lambda d: d.update(identity=[]), "state.identity: expected an object"),
        (lambda d: d["identity"].pop("ca_socket"), "state.identity.ca_socket: missing"),
        (lambda d: d["identity"].update(ca_socket="ca.sock"), "state.identity.ca_socket: must be an absolute"),
        (lambda d: d["identity"].update(ca_socket="/" + "x" * 120), "state.identity.ca_socket: path too long"),
        (lambda d: d["identity"].update(generation="3"), "state.identity.generation"),
        (lambda d: d["identity"].update(generation=-1), "state.identity.generation"),
        (lambda d: d["identity"].update(cert_ttl=True), "state.identity.cert_ttl"),
        (lambda d: d["identity"].update(cert_ttl=5), "state.identity.cert_ttl"),
        (lambda d: d["identity"].update(trust_domain="Cluster.local"), "state.identity.trust_domain: invalid"),
        (lambda d: d["identity"].update(trust_domain="other.td"), "differs from state.trust_domain"),
        (lambda d: d.update(trust_domain="a/b"), "state.trust_domain: invalid"),
    ],
)
def test_invalid_documents_name_the_field(mutate, fragment):
    d = doc()
    mutate(d)
    with pytest.raises(StateError) as ei:
        parse_state(d)
    assert fragment in str(ei.value)


def _write(path, d):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(d if isinstance(d, str) else json.dumps(d))
    os.replace(tmp, path)


def test_watcher_reloads_and_keeps_last_good(tmp_path, caplog):
    path = str(tmp_path / "proxy-state.json")
    _write(path, doc())
    seen = []
    w = StateWatcher(path, on_change=lambda old, new: seen.append((old.generation, new.generation)))
    assert w.current.generation == 7
    assert w.check() is False  # unchanged

    _write(path, doc(generation=8))
    assert w.check() is True and w.current.generation == 8
    assert seen == [(7, 8)]

    with caplog.at_level(logging.ERROR, logger="meshlet.proxy.state"):
        _write(path, "{ not json")
        assert w.check() is False
    assert w.current.generation == 8 and w.errors == 1
    assert "keeping generation 8" in caplog.text

    _write(path, doc(generation=9, pods="nope"))
    assert w.check() is False and w.current.generation == 8

    os.unlink(path)
    assert w.check() is False and w.current.generation == 8

    _write(path, doc(generation=10))
    assert w.check() is True and w.current.generation == 10


def test_identity_section_is_required_in_state_files(tmp_path):
    d = doc()
    del d["identity"]
    path = str(tmp_path / "s.json")
    _write(path, d)
    with pytest.raises(StateError, match=r"s\.json: state\.identity: missing"):
        load_state(path)
    # the top-level trust domain may be left out once the identity section has it
    d = doc()
    del d["trust_domain"]
    assert parse_state(d, require_identity=True).trust_domain == "cluster.local"


def test_load_state_errors_mention_path(tmp_path):
    path = str(tmp_path / "s.json")
    _write(path, "[]")
    with pytest.raises(StateError, match="s.json"):
        load_state(path)


# --- services: what the agent publishes, as the proxy reads it -------------------------

SVC_CFG = """\
node: node1
inventory: inv.yaml
cgroup: meshlet/node1
identity: {bundle: b.pem, caCert: c.pem, caKey: k.pem}
proxy: {redirectIPv4: 10.244.1.1}
runDir: /run/m
"""
SVC_INV = """\
nodes:
  - {name: node1, address: 198.18.0.1}
  - {name: node2, address: 198.18.0.2}
pods:
  - {name: be-1, namespace: shop, labels: {app: be}, node: node1, ips: [10.244.1.10, "fd00:244:1::10"],
     cgroup: /c/1}
  - {name: be-2, namespace: shop, labels: {app: be}, node: node2, ips: [10.244.2.10], cgroup: /c/2}
  - {name: be-x, namespace: other, labels: {app: be}, node: node2, ips: [10.244.2.11], cgroup: /c/3}
services:
  - name: be
    namespace: shop
    vip: [10.96.0.10, "fd00:96::10"]
    selector: {app: be}
    ports:
      - {port: 80, targetPort: 8080, name: http, appProtocol: http}
      - {port: 5432, appProtocol: opaque}
  - {name: empty, namespace: shop, vip: 10.96.0.11, selector: {app: none}, ports: [{port: 1}]}
"""


def published() -> dict:
    from agent.app import proxy_state
    from agent.config import parse_config
    from agent.workloads.yamlfile import parse_inventory

    d = proxy_state(parse_config(SVC_CFG, "/etc/m/c.yaml"), parse_inventory(SVC_INV, "inv.yaml"),
                    {"shop/be-1": 11}, 1)
    return json.loads(json.dumps(d))  # exactly what the file holds


def test_agent_publishes_services_and_the_proxy_indexes_them():
    d = published()
    assert d["services"][0]["ports"][0] == {
        "port": 80, "target_port": 8080, "name": "http", "app_protocol": "http",
        "endpoints": [{"pod": "shop/be-1", "ip": "10.244.1.10", "port": 8080, "node": "node1"},
                      {"pod": "shop/be-2", "ip": "10.244.2.10", "port": 8080, "node": "node2"},
                      {"pod": "shop/be-1", "ip": "fd00:244:1::10", "port": 8080, "node": "node1"}]}
    s = parse_state(d)
    be, empty = s.services
    assert (be.key, be.name, be.namespace, be.vips) == ("shop/be", "be", "shop",
                                                        ("10.96.0.10", "fd00:96::10"))
    assert s.service_by_key["shop/empty"] is empty and empty.ports[0].endpoints == ()
    http, pg = be.ports
    assert (pg.port, pg.target_port, pg.name, pg.app_protocol) == (5432, 5432, None, "opaque")
    assert [(e.pod, e.ip, e.port, e.node, e.v6) for e in http.endpoints] == [
        ("shop/be-1", "10.244.1.10", 8080, "node1", False),
        ("shop/be-1", "fd00:244:1::10", 8080, "node1", True),
        ("shop/be-2", "10.244.2.10", 8080, "node2", False)]
    assert s.service_by_vip[("10.96.0.10", 80)] == (be, http)
    assert s.service_by_vip[("fd00:96::10", 5432)] == (be, pg)
    assert ("10.96.0.10", 81) not in s.service_by_vip
    # any text form of the VIP: IPv4-mapped IPv6 (dual-stack sockets), IPv6 spellings
    assert s.service_at("::ffff:10.96.0.10", 80) == (be, http)
    assert s.service_at("FD00:96:0::10", 80) == (be, http)
    assert s.service_at("10.96.0.10", 81) is None and s.service_at("junk", 80) is None
    assert s.service_by_ip["10.96.0.11"] == (empty,)


def test_services_are_optional_in_the_state():
    s = parse_state(doc())
    assert s.services == () and dict(s.service_by_vip) == {}


def _svc(mutate):
    d = published()
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(services={}), "state.services: expected list"),
    (lambda d: d["services"][0].update(vips=[]), "state.services[0].vips: expected 1 or 2"),
    (lambda d: d["services"][0].update(vips=["10.96.0.1", "10.96.0.2"]),
     "state.services[0].vips: at most one address per family"),
    (lambda d: d["services"][0].update(vips=["10.244.2.10"]),
     "state.services[0].vips[0]: 10.244.2.10 is also the address of pod shop/be-2"),
    (lambda d: d["services"][0].update(vips=["not-an-ip"]),
     "state.services[0].vips[0]: not an IP address"),
    (lambda d: d["services"][1].update(vips=["10.96.0.10"], ports=[{"port": 80}]),
     "state.services[1]: 10.96.0.10:80 is already served by service shop/be"),
    (lambda d: d["services"][1].update(name="be"), "state.services[1].key: 'shop/empty' is not shop/be"),
    (lambda d: d["services"].append(d["services"][0]), "state.services[2].key: duplicate service"),
    (lambda d: d["services"][0].update(ports=[]), "state.services[0].ports: a service needs"),
    (lambda d: d["services"][0]["ports"][1].update(port=80),
     "state.services[0].ports[1].port: port 80 is listed twice"),
    (lambda d: d["services"][0]["ports"][0].update(target_port=0),
     "state.services[0].ports[0].target_port: port out of range"),
    (lambda d: d["services"][0]["ports"][0].update(app_protocol="grpc"),
     "state.services[0].ports[0].app_protocol: 'grpc' is not one of http, tcp, opaque"),
    (lambda d: d["services"][0]["ports"][0]["endpoints"][0].update(pod="shop/gone"),
     "state.services[0].ports[0].endpoints[0].pod: 'shop/gone' is not in state.pods"),
    (lambda d: d["services"][0]["ports"][0]["endpoints"][0].update(ip="10.244.2.10"),
     "state.services[0].ports[0].endpoints[0].ip: 10.244.2.10 is not an address of pod shop/be-1"),
    (lambda d: d["services"][0]["ports"][0]["endpoints"][0].update(port=9),
     "state.services[0].ports[0].endpoints[0].port: 9 differs from the port's target_port 8080"),
    (lambda d: d["services"][0]["ports"][0]["endpoints"][0].update(node="node2"),
     "state.services[0].ports[0].endpoints[0].node: 'node2' but pod shop/be-1 is on 'node1'"),
    (lambda d: d["services"][0]["ports"][0]["endpoints"].append(
        d["services"][0]["ports"][0]["endpoints"][0]),
     "state.services[0].ports[0].endpoints: an endpoint is listed twice"),
])
def test_invalid_services_name_the_field(mutate, fragment):
    with pytest.raises(StateError) as ei:
        parse_state(_svc(mutate))
    assert fragment in str(ei.value)


def test_watcher_keeps_last_good_services(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(published()))
    w = StateWatcher(str(path))
    assert [s.key for s in w.current.services] == ["shop/be", "shop/empty"]
    bad = _svc(lambda d: d["services"][0]["ports"][0]["endpoints"][0].update(pod="shop/gone"))
    bad["generation"] = 2
    tmp = tmp_path / "tmp.json"
    tmp.write_text(json.dumps(bad) + " " * 7)  # another size: the watcher sees a change
    os.replace(tmp, path)
    assert not w.check() and w.errors == 1 and "shop/gone" in (w.last_error or "")
    assert [s.key for s in w.current.services] == ["shop/be", "shop/empty"]
