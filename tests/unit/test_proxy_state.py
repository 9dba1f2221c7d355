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
