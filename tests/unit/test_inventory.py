"""Node inventory: the model (agent/workloads/model.py) and the YAML reader
(agent/workloads/yamlfile.py): models and helpers,
cross-entry checks, exact error positions, diff, and fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.workloads.model import Inventory, InventoryDiff, NamespaceSettings, Node, Pod, diff
from agent.workloads.yamlfile import load_inventory, parse_inventory
from agent.yamlsrc import Problem, SourceError
from tests.support import mutate

GOOD = """\
nodes:
  - name: node1
    address: 198.18.0.1
    address6: fd00:198:18::1
  - name: node2
    address: 198.18.0.2
pods:
  - name: pod1-1
    namespace: shop
    serviceAccount: web.sa
    labels: {app: web, app.kubernetes.io/name: web, empty: ""}
    node: node1
    ips: [10.244.1.10, "fd00:244:1:0::10"]
    cgroup: /sys/fs/cgroup/unified/x/node1/pod1-1
  - name: pod1-2
    node: node1
    ips: [10.244.1.11]
    cgroup: /sys/fs/cgroup/unified/x/node1/pod1-2
    mesh: false
  - name: pod2-1
    node: node2
    ips: ["fd00:244:2::10"]
    cgroup: /x/pod2-1
namespaces:
  shop: {mode: strict}
  quiet:
services:
  - name: web
    namespace: shop
    vip: [10.96.0.10, "fd00:96::10"]
    selector: {app: web}
    ports:
      - {port: 80, targetPort: 8080, name: http, appProtocol: http}
      - {port: 9000}
  - name: plain
    vip: 10.96.0.11
    selector: {tier: none}
    ports: [{port: 5432, appProtocol: opaque}]
"""


def errors(text: str, filename: str = "inventory.yaml") -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_inventory(text, filename)
    assert all(isinstance(p, Problem) for p in ei.value.errors)
    return [str(p) for p in ei.value.errors]


# -- good files -------------------------------------------------------------


def test_good_file_models_and_defaults():
    inv = parse_inventory(GOOD, "inventory.yaml")
    assert inv.nodes == (
        Node("node1", ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv6Address("fd00:198:18::1")),
        Node("node2", ipaddress.IPv4Address("198.18.0.2")),
    )
    p1, p2, p3 = inv.pods
    assert p1.key == "shop/pod1-1" and p1.service_account == "web.sa"
    assert dict(p1.labels) == {"app": "web", "app.kubernetes.io/name": "web", "empty": ""}
    assert p1.ipv4 == ipaddress.IPv4Address("10.244.1.10")
    assert p1.ipv6 == ipaddress.IPv6Address("fd00:244:1::10")
    assert (p2.namespace, p2.service_account, dict(p2.labels), p2.mesh) == ("default", "default", {}, False)
    assert p3.mesh is True and p3.ipv4 is None
    assert inv.namespaces == {"shop": NamespaceSettings("strict"), "quiet": NamespaceSettings(None)}


def test_helpers():
    inv = parse_inventory(GOOD, "inventory.yaml")
    p1, p2, p3 = inv.pods
    assert inv.node("node2") == inv.nodes[1] and inv.node("nodeX") is None
    assert inv.pods_on("node1") == (p1, p2) and inv.pods_on(inv.nodes[1]) == (p3,)
    assert inv.pods_on("nodeX") == ()
    assert inv.pod("shop/pod1-1") is p1 and inv.pod("default/pod1-1") is None
    assert inv.pod_by_ip("10.244.1.10") is p1
    assert inv.pod_by_ip("fd00:244:1:0:0:0:0:10") is p1  # IPv6 text normalised
    assert inv.pod_by_ip("FD00:244:1::10") is p1
    assert inv.pod_by_ip("::ffff:10.244.1.11") is p2  # IPv4-mapped, as dual-stack sockets report
    assert inv.pod_by_ip(ipaddress.IPv6Address("fd00:244:2::10")) is p3
    assert inv.pod_by_ip("10.244.1.99") is None and inv.pod_by_ip("not an ip") is None
    assert inv.mode_for(p1, "permissive") == "strict"
    assert inv.mode_for(p2, "permissive") == "permissive"  # namespace "default" not listed
    assert inv.mode_for(p2, "strict") == "strict"


def test_models_are_frozen_and_hashable():
    inv = parse_inventory(GOOD, "inventory.yaml")
    with pytest.raises(AttributeError):
        inv.pods[0].name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        inv.pods[0].labels["x"] = "y"  # type: ignore[index]
    assert len({*inv.pods, *parse_inventory(GOOD, "other.yaml").pods}) == 3
    assert hash(inv) == hash(parse_inventory(GOOD, "inventory.yaml"))


def test_round_trip():
    inv = parse_inventory(GOOD, "inventory.yaml")
    again = parse_inventory(yaml.safe_dump(inv.to_dict()), "again.yaml")
    assert again == inv and again.to_dict() == inv.to_dict()


def test_empty_sections_are_fine():
    inv = parse_inventory("nodes: []\npods:\nnamespaces: {}\n", "i.yaml")
    assert inv == Inventory()


def test_load_inventory(tmp_path):
    f = tmp_path / "inventory.yaml"
    f.write_text(GOOD)
    assert load_inventory(f) == parse_inventory(GOOD, str(f))
    f.write_text(GOOD.replace("10.244.1.11", "10.244.1.300"))
    with pytest.raises(SourceError) as ei:
        load_inventory(f)
    assert str(ei.value) == f"{f}:17:11: pods[1].ips[0]: '10.244.1.300' is not an IP address"


# -- errors -------------------------------------------------------------------

NODE = "nodes:\n  - {name: node1, address: 198.18.0.1}\n"  # lines 1-2
ERRORS = [
    ("pods: {}\n", "inventory.yaml:1:7: pods: expected a list, got a mapping"),
    ("nodes: [x]\n", "inventory.yaml:1:9: nodes[0]: expected a mapping, got a string"),
    ("nodes:\n  - name: node1\n",
     "inventory.yaml:2:5: nodes[0].address: required field is missing"),
    ("nodes:\n  - name: node1\n    address: fd00::1\n",
     "inventory.yaml:3:14: nodes[0].address: 'fd00::1' is not an IPv4 address"),
    ("nodes:\n  - name: node1\n    address: 198.18.0.1\n    address6: 198.18.0.2\n",
     "inventory.yaml:4:15: nodes[0].address6: '198.18.0.2' is not an IPv6 address"),
    ("nodes:\n  - {name: node1, address: 198.18.0.1}\n  - {name: node1, address: 198.18.0.2}\n",
     "inventory.yaml:3:12: nodes[1].name: node 'node1' is listed twice (first at line 2)"),
    ("nodes:\n  - {name: node1, address: 198.18.0.1}\n  - {name: node2, address: 198.18.0.1}\n",
     "inventory.yaml:3:28: nodes[1].address: 198.18.0.1 is already the address of node 'node1' (line 2)"),
    ("nodes:\n  - {name: node1, address: 198.18.0.1, adress6: 'fd00::1'}\n",
     "inventory.yaml:2:40: nodes[0].adress6: unknown field 'adress6' (did you mean 'address6'?)"),
    (NODE + "pods:\n  - name: Pod_1\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n",
     "inventory.yaml:4:11: pods[0].name: 'Pod_1' is not a valid name: use lower-case letters, digits "
     "and '-', starting and ending with a letter or digit"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n",
     "inventory.yaml:4:5: pods[0].cgroup: required field is missing"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: []\n    cgroup: /c\n",
     "inventory.yaml:6:10: pods[0].ips: needs at least 1 item"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: 10.0.0.1\n    cgroup: /c\n",
     "inventory.yaml:6:10: pods[0].ips: expected a list, got a string"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1, 10.0.0.2]\n    cgroup: /c\n",
     "inventory.yaml:6:21: pods[0].ips[1]: a pod has at most one IPv4 address (ips[0] is 10.0.0.1)"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1, '10.244.1.300']\n    cgroup: /c\n",
     "inventory.yaml:6:21: pods[0].ips[1]: '10.244.1.300' is not an IP address"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: ['::ffff:10.0.0.1']\n    cgroup: /c\n",
     "inventory.yaml:6:11: pods[0].ips[0]: '::ffff:10.0.0.1' is an IPv4-mapped IPv6 address; write "
     "10.0.0.1 instead"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [0.0.0.0]\n    cgroup: /c\n",
     "inventory.yaml:6:11: pods[0].ips[0]: '0.0.0.0' is unspecified; a unicast address is needed here"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: ['ff02::1']\n    cgroup: /c\n",
     "inventory.yaml:6:11: pods[0].ips[0]: 'ff02::1' is multicast; a unicast address is needed here"),
    (NODE + "pods:\n  - name: p\n    node: node2\n    ips: [10.0.0.1]\n    cgroup: /c\n",
     "inventory.yaml:5:11: pods[0].node: node 'node2' is not in nodes[] (did you mean 'node1'?)"),
    (NODE + "pods:\n  - name: p\n    node: other\n    ips: [10.0.0.1]\n    cgroup: /c\n",
     "inventory.yaml:5:11: pods[0].node: node 'other' is not in nodes[]; known nodes: node1"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n    mesh: 1\n",
     "inventory.yaml:8:11: pods[0].mesh: expected true or false, got an integer '1'"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n    labels: [a]\n",
     "inventory.yaml:8:13: pods[0].labels: expected a mapping, got a list"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n    labels: {v: 1}\n",
     "inventory.yaml:8:17: pods[0].labels.v: expected a string, got an integer '1' (quote it)"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n"
            "    labels: {app: x, app: y}\n",
     "inventory.yaml:8:22: pods[0].labels.app: duplicate key 'app' (first given at line 8)"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n"
            "    labels: {'a b': x}\n",
     "inventory.yaml:8:14: pods[0].labels['a b']: 'a b' is not a valid label key: [dns.prefix/]name, "
     "name at most 63 characters of letters, digits, '-', '_', '.'"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n"
            "    labels: {a: -x}\n",
     "inventory.yaml:8:17: pods[0].labels.a: '-x' is not a valid label value: at most 63 characters of "
     "letters, digits, '-', '_', '.', starting and ending with a letter or digit"),
    (NODE + "pods:\n  - name: p\n    node: node1\n    ips: [10.0.0.1]\n    cgroup: /c\n"
            "    serviceAcount: x\n",
     "inventory.yaml:8:5: pods[0].serviceAcount: unknown field 'serviceAcount' (did you mean "
     "'serviceAccount'?)"),
    (NODE + "pods:\n  - {name: p, node: node1, ips: [10.0.0.1], cgroup: /c}\n"
            "  - {name: p, node: node1, ips: [10.0.0.2], cgroup: /c}\n",
     "inventory.yaml:5:12: pods[1].name: pod 'default/p' is listed twice (first at line 4)"),
    (NODE + "pods:\n  - {name: p, node: node1, ips: [10.0.0.1], cgroup: /c}\n"
            "  - {name: q, node: node1, ips: ['fd00::1', 10.0.0.1], cgroup: /c}\n",
     "inventory.yaml:5:45: pods[1].ips[1]: 10.0.0.1 is already used by pod default/p (line 4)"),
    (NODE + "pods:\n  - {name: p, node: node1, ips: ['fd00::1'], cgroup: /c}\n"
            "  - {name: q, node: node1, ips: ['fd00:0::1'], cgroup: /c}\n",
     "inventory.yaml:5:34: pods[1].ips[0]: fd00::1 is already used by pod default/p (line 4)"),
    ("namespaces: [shop]\n", "inventory.yaml:1:13: namespaces: expected a mapping, got a list"),
    ("namespaces:\n  Shop: {mode: strict}\n",
     "inventory.yaml:2:3: namespaces.Shop: 'Shop' is not a valid name: use lower-case letters, digits "
     "and '-', starting and ending with a letter or digit"),
    ("namespaces:\n  shop: {mode: Strict}\n",
     "inventory.yaml:2:16: namespaces.shop.mode: 'Strict' is not one of: permissive, strict "
     "(did you mean 'strict'?)"),
    ("namespaces:\n  shop: {mod: strict}\n",
     "inventory.yaml:2:10: namespaces.shop.mod: unknown field 'mod' (did you mean 'mode'?)"),
    ("namespaces:\n  shop: strict\n", "inventory.yaml:2:9: namespaces.shop: expected a mapping, got a string"),
    ("nodes: []\nnodes: []\n", "inventory.yaml:2:1: nodes: duplicate key 'nodes' (first given at line 1)"),
    ("node: []\n", "inventory.yaml:1:1: node: unknown field 'node' (did you mean 'nodes'?)"),
    ("nodes: []\n---\n", "inventory.yaml:2:1: a second YAML document starts here; put everything in one "
                         "document (remove the '---')"),
    ("", "inventory.yaml:1:1: file is empty; expected a mapping of fields"),
    ("nodes: [\n", "inventory.yaml:2:1: YAML syntax error: did not find expected node "
                   "content (while parsing a flow node)"),
]


@pytest.mark.parametrize("text,expected", ERRORS, ids=[e[1].split(": ", 1)[1][:50] for e in ERRORS])
def test_error_table(text, expected):
    assert errors(text) == [expected]


def test_all_errors_reported_together_in_file_order():
    text = GOOD.replace("10.244.1.11", "10.244.1.10").replace("node: node2", "node: node3") \
        .replace("mesh: false", "mesh: false\n    color: blue").replace("{mode: strict}", "{mode: lax}")
    got = errors(text)
    assert [g.split(": ", 2)[:2] for g in got] == [
        ["inventory.yaml:17:11", "pods[1].ips[0]"],
        ["inventory.yaml:20:5", "pods[1].color"],
        ["inventory.yaml:22:11", "pods[2].node"],
        ["inventory.yaml:26:16", "namespaces.shop.mode"],
    ]
    assert "10.244.1.10 is already used by pod shop/pod1-1 (line 13)" in got[0]


def test_invalid_node_suppresses_unknown_node_noise():
    text = "nodes:\n  - {name: Node1, address: 198.18.0.1}\npods:\n" \
           "  - {name: p, node: node1, ips: [10.0.0.1], cgroup: /c}\n"
    got = errors(text)
    assert len(got) == 1 and got[0].startswith("inventory.yaml:2:12: nodes[0].name: 'Node1'")


# -- diff ---------------------------------------------------------------------


def test_diff():
    old = parse_inventory(GOOD, "i.yaml")
    new_text = (GOOD.replace("  - name: pod1-2\n", "  - name: pod1-3\n")
                .replace("{app: web, ", "{app: shop, ").replace("shop: {mode: strict}", "shop: {}"))
    new = parse_inventory(new_text, "i.yaml")
    d = diff(old, new)
    assert [p.key for p in d.added] == ["default/pod1-3"]
    assert [p.key for p in d.removed] == ["default/pod1-2"]
    assert [(a.key, a.labels["app"], b.labels["app"]) for a, b in d.changed] == [("shop/pod1-1", "web", "shop")]
    assert d.namespaces_changed == ("shop",)
    assert d and not diff(new, new) and diff(old, old) == InventoryDiff()
    back = diff(new, old)
    assert back.added == d.removed and back.removed == d.added


def test_diff_sees_mesh_flag_and_ip_changes():
    old = parse_inventory(GOOD, "i.yaml")
    new = parse_inventory(GOOD.replace("mesh: false", "mesh: true").replace("fd00:244:2::10", "fd00:244:2::11"),
                          "i.yaml")
    assert [b.key for _, b in diff(old, new).changed] == ["default/pod1-2", "default/pod2-1"]


# -- robustness -----------------------------------------------------------------


def _only_source_error(text: str) -> None:
    try:
        inv = parse_inventory(text, "fuzz.yaml")
    except SourceError as e:
        assert e.errors and all(isinstance(p, Problem) for p in e.errors)
        str(e)
    else:
        assert isinstance(inv, Inventory)
        for p in inv.pods:
            assert isinstance(p, Pod) and inv.pod_by_ip(str(p.ips[0])) is not None
        yaml.safe_dump(inv.to_dict())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_garbage_text_only_raises_source_error(text):
    _only_source_error(text)


_BITS = st.sampled_from(
    [":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "'", '"', "#", "&a ", "*a", "!!str ", "!x ",
     "---", "~", "::1", "1", "10.244.1.10", "<<: ", "? ", "|", "\t", "node1", "pods", "ips", "\x00"])


@st.composite
def _mutated(draw) -> str:
    text = GOOD
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        text = text[:i] + "".join(draw(st.lists(_BITS, max_size=3))) + text[j:]
    return text


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_mutated_documents_only_raise_source_error(text):
    _only_source_error(text)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(),
                     st.text(max_size=12),
                     st.sampled_from(["node1", "node2", "10.244.1.10", "fd00:244:2::10", "198.18.0.1",
                                      "strict", "default", "pod1-1"]))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.sampled_from(["name", "node", "ips", "mode", "labels", "x"])
                                         | st.text(max_size=6), c, max_size=4), max_leaves=12)


_GOOD_DICT = yaml.safe_load(GOOD)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(list(mutate.paths(_GOOD_DICT))), _values), min_size=1, max_size=3))
def test_structurally_mutated_documents_only_raise_source_error(patches):
    doc = _GOOD_DICT
    for path, value in patches:
        try:
            doc = mutate.replace(doc, path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier patch removed that path
    _only_source_error(yaml.safe_dump(doc))


# -- services ---------------------------------------------------------------------


def test_services_section_and_endpoints():
    inv = parse_inventory(GOOD, "inventory.yaml")
    web, plain = inv.services
    assert (web.key, plain.key) == ("shop/web", "default/plain")
    assert web.vips == (ipaddress.ip_address("10.96.0.10"), ipaddress.ip_address("fd00:96::10"))
    assert [(p.port, p.target_port, p.name, p.app_protocol) for p in web.ports] == [
        (80, 8080, "http", "http"), (9000, 9000, None, None)]
    idx = inv.service_index
    assert idx is inv.service_index  # built once
    assert idx.by_vip("::ffff:10.96.0.10", 80) == (web, web.ports[0])
    assert [(e.pod, str(e.ip), e.port, e.node) for e in idx.endpoints(web, 80)] == [
        ("shop/pod1-1", "10.244.1.10", 8080, "node1")]
    assert [str(e.ip) for e in idx.endpoints(web, 80, family=6)] == ["fd00:244:1::10"]
    assert idx.endpoints(plain, 5432) == []  # no pod carries tier=none: valid, just empty
    assert inv.to_dict()["services"][0] == {
        "name": "web", "namespace": "shop", "vip": ["10.96.0.10", "fd00:96::10"],
        "selector": {"app": "web"},
        "ports": [{"port": 80, "targetPort": 8080, "name": "http", "appProtocol": "http"},
                  {"port": 9000, "targetPort": 9000}]}


def test_diff_sees_service_changes():
    old = parse_inventory(GOOD, "i.yaml")
    assert diff(old, old).services_changed == ()
    for new_text, want in [
        (GOOD.replace("{app: web}\n    ports", "{app: shop}\n    ports"), ("shop/web",)),  # selector
        (GOOD.replace("- {port: 9000}", "- {port: 9001}"), ("shop/web",)),
        (GOOD.replace("vip: 10.96.0.11", "vip: 10.96.0.12"), ("default/plain",)),
        (GOOD.split("services:")[0], ("default/plain", "shop/web")),  # section removed
    ]:
        d = diff(old, parse_inventory(new_text, "i.yaml"))
        assert d.services_changed == want and d and not d.added and not d.changed


# Errors of the services section as part of an inventory: nodes and pods on
# lines 1-4, services from line 5 on.
SVC_BASE = ("nodes:\n  - {name: node1, address: 198.18.0.1, address6: 'fd00:198:18::1'}\n"
            "pods:\n  - {name: p, namespace: shop, labels: {app: a}, node: node1, "
            "ips: [10.244.1.10, 'fd00:244:1::10'], cgroup: /c}\n")


def svc(vip: str = "10.96.0.1", ports: str = "[{port: 80}]", extra: str = "",
        selector: str = "{app: a}") -> str:
    return (SVC_BASE + "services:\n  - name: a\n    namespace: shop\n"
            f"    vip: {vip}\n    selector: {selector}\n    ports: {ports}\n{extra}")


SVC_ERRORS = [
    (svc(vip="10.244.1.10"),
     "inventory.yaml:8:10: services[0].vip: VIP 10.244.1.10 is also the IP of pod shop/p; "
     "pick an unused address"),
    (svc(vip="[10.96.0.1, 'fd00:244:1::10']"),
     "inventory.yaml:8:22: services[0].vip[1]: VIP fd00:244:1::10 is also the IP of pod shop/p; "
     "pick an unused address"),
    (svc(vip="198.18.0.1"),
     "inventory.yaml:8:10: services[0].vip: VIP 198.18.0.1 is also the address of node node1; "
     "pick an unused address"),
    (svc(vip="[10.96.0.1, 'fd00:198:18::1']"),
     "inventory.yaml:8:22: services[0].vip[1]: VIP fd00:198:18::1 is also the address of node "
     "node1; pick an unused address"),
    (svc(vip="127.0.0.10"),
     "inventory.yaml:8:10: services[0].vip: 127.0.0.10 is a loopback address; a VIP needs an "
     "address no host owns, e.g. from 10.96.0.0/16 or fd00:96::/112"),
    (svc(vip="['fe80::1']"),
     "inventory.yaml:8:11: services[0].vip[0]: fe80::1 is a link-local address; a VIP needs an "
     "address no host owns, e.g. from 10.96.0.0/16 or fd00:96::/112"),
    (svc(vip="224.0.0.1"),
     "inventory.yaml:8:10: services[0].vip: '224.0.0.1' is multicast; a unicast address is "
     "needed here"),
    (svc(vip="[]"), "inventory.yaml:8:10: services[0].vip: needs at least 1 item"),
    (svc(vip="[10.96.0.1, 'fd00:96::1', 10.96.0.2]"),
     "inventory.yaml:8:10: services[0].vip: a service has at most two VIPs (one IPv4, one IPv6)"),
    (svc(ports="[{port: 0}]"),
     "inventory.yaml:10:20: services[0].ports[0].port: 0 is not a port number (1..65535)"),
    (svc(ports="[{port: 80, targetPort: 70000}]"),
     "inventory.yaml:10:36: services[0].ports[0].targetPort: 70000 is not a port number (1..65535)"),
    (svc(ports="[{port: 80, name: a}, {port: 81, name: a}]"),
     "inventory.yaml:10:51: services[0].ports[1].name: port name 'a' is used twice (first at "
     "line 10)"),
    (svc(selector="{app: -x}"),
     "inventory.yaml:9:21: services[0].selector.app: '-x' is not a valid label value: at most 63 "
     "characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit"),
    (svc(extra="    selecter: {app: a}\n"),
     "inventory.yaml:11:5: services[0].selecter: unknown field 'selecter' (did you mean "
     "'selector'?)"),
    (SVC_BASE + "services: {a: 1}\n",
     "inventory.yaml:5:11: services: expected a list, got a mapping"),
    (SVC_BASE + "services:\n  - {name: a, vip: 10.96.0.1, ports: [{port: 80}]}\n",
     "inventory.yaml:6:5: services[0].selector: required field is missing"),
    (svc(extra="  - name: a\n    namespace: shop\n    vip: 10.96.0.2\n    selector: {app: a}\n"
               "    ports: [{port: 80}]\n"),
     "inventory.yaml:11:11: services[1].name: service 'shop/a' is listed twice (first at line 6)"),
]


@pytest.mark.parametrize("text,expected", SVC_ERRORS,
                         ids=[e[1].split(": ", 1)[1][:50] for e in SVC_ERRORS])
def test_service_errors(text, expected):
    assert errors(text) == [expected]


def test_service_vip_checks_wait_for_clean_pods_and_services():
    # a broken pod is reported, and its IP is not used to blame a VIP too
    text = svc(vip="10.244.1.10").replace("cgroup: /c", "cgroup: /c, colour: red")
    got = errors(text)
    assert len(got) == 1 and "pods[0].colour" in got[0]
    # a broken service elsewhere in the section: no VIP check echoes
    text = svc(vip="10.244.1.10", extra="  - {name: b}\n")
    assert all("also the IP" not in e for e in errors(text))
