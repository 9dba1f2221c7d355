"""The helpers the agent, the workload model and the policy loader share:
write_atomic (agent/fsutil.py), IP normalisation (agent/netaddr.py) and
Kubernetes label syntax (agent/labels.py)."""

from __future__ import annotations

import ipaddress
import os
import textwrap

import pytest

from agent import labels
from agent.fsutil import write_atomic
from agent.netaddr import normalize_ip
from agent.policy.load import parse_policies
from agent.workloads.yamlfile import parse_inventory
from agent.yamlsrc import SourceError

# --- write_atomic ---------------------------------------------------------------


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(str(path), "one")
    ino = path.stat().st_ino
    write_atomic(str(path), "two")
    assert path.read_text() == "two"
    assert path.stat().st_ino != ino  # a new file renamed over the old one
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_removes_its_temp_file_when_the_rename_fails(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()                # a file cannot replace a directory
    (target / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        write_atomic(str(target), "data")
    assert sorted(os.listdir(tmp_path)) == ["busy"]
    assert os.listdir(target) == ["keep"]


def test_write_atomic_removes_its_temp_file_when_the_write_fails(tmp_path):
    path = tmp_path / "policies.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(str(path), b"not text")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["policies.json"]


# --- normalize_ip ------------------------------------------------------------------

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


@pytest.mark.parametrize("text, want", [
    ("10.0.0.1", V4("10.0.0.1")),
    (" 10.0.0.1\n", V4("10.0.0.1")),
    ("FD00:0:0::1", V6("fd00::1")),
    ("::ffff:10.0.0.1", V4("10.0.0.1")),          # dual-stack sockets report IPv4 peers so
    ("fe80::1%eth0", V6("fe80::1")),              # the zone of a link-local peer is dropped
    ("::ffff:10.0.0.1%eth0", V4("10.0.0.1")),
    ("fd00::1%3", V6("fd00::1")),
    ("10.0.0.1%eth0", None),                      # zones exist only for IPv6
    ("fe80::1%", None),
    ("10.0.0.256", None),
    ("", None),
    ("web", None),
])
def test_normalize_ip(text, want):
    got = normalize_ip(text)
    assert got == want and type(got) is type(want)
    assert got is None or "%" not in str(got)


def test_normalize_ip_objects():
    assert normalize_ip(V6("fe80::1%eth0")) == V6("fe80::1")
    assert str(normalize_ip(V6("fe80::1%eth0"))) == "fe80::1"
    assert normalize_ip(V6("::ffff:10.1.2.3")) == V4("10.1.2.3")
    assert normalize_ip(V4("10.1.2.3")) == V4("10.1.2.3")


INV = """\
nodes: [{name: node1, address: 198.18.0.1}]
pods:
  - {name: web, node: node1, ips: [10.244.1.10, "fd00:244:1::10"], cgroup: /x/web,
     labels: {app: web}}
services:
  - {name: web, vip: [10.96.0.10, "fd00:96::10"], selector: {app: web}, ports: [{port: 80}]}
"""


@pytest.mark.parametrize("pod_ip, vip", [
    ("10.244.1.10", "10.96.0.10"),
    ("::ffff:10.244.1.10", "::ffff:10.96.0.10"),
    ("fd00:244:1::10%eth0", "fd00:96::10%eth0"),
    ("10.244.1.10%eth0", "10.96.0.10%eth0"),
    ("FD00:244:1:0::10", "FD00:96:0::10"),
])
def test_pods_and_vips_normalise_alike(pod_ip, vip):
    """Inventory.pod_by_ip and ServiceIndex.by_vip agree on every spelling
    (they once disagreed on IPv4 text with a %zone)."""
    inv = parse_inventory(INV, "inv.yaml")
    pod = inv.pod_by_ip(pod_ip)
    svc = inv.service_index.by_vip(vip, 80)
    assert (pod is None) == (svc is None)
    assert (pod is None) == ("." in pod_ip and "%" in pod_ip)


# --- labels ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["app", "app.kubernetes.io/name", "a", "A_b-c.d", "x" * 63,
                                 "example.com/" + "x" * 63])
def test_label_keys_ok(key):
    assert labels.key_problem(key) is None


@pytest.mark.parametrize("key", ["", "-app", "app-", "x" * 64, "Example.com/app",
                                 "a/b/c", "app*", "exa_mple.com/app"])
def test_label_keys_bad(key):
    assert "is not a valid label key" in (labels.key_problem(key) or "")


@pytest.mark.parametrize("value, ok", [("", True), ("web", True), ("1.2_3-x", True),
                                       ("x" * 63, True), ("x" * 64, False), ("-x", False),
                                       ("a b", False), ("web*", False)])
def test_label_values(value, ok):
    assert (labels.value_problem(value) is None) == ok


def test_inventory_and_policies_share_the_label_rule():
    long = "x" * 64
    with pytest.raises(SourceError) as e:
        parse_inventory(INV.replace("labels: {app: web}", f"labels: {{{long}: web}}"), "inv.yaml")
    assert "is not a valid label key" in str(e.value)
    policy = textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: shop}}
        spec:
          selector: {{matchLabels: {{{long}: web}}}}
          action: ALLOW
        """)
    with pytest.raises(SourceError) as e:
        parse_policies(policy, "p.yaml")
    assert "is not a valid label key" in str(e.value)
    with pytest.raises(SourceError) as e:
        parse_policies(policy.replace(long, "app*"), "p.yaml")
    assert "wildcards are not supported in selectors: 'app*'" in str(e.value)
