"""Agent config loader (agent/config.py) and the YAML front end it shares
with the inventory (agent/yamlsrc.py): every error names file:line:col and
the field path; good files round-trip; garbage only ever raises SourceError."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, default_workers, load_config, parse_config
from agent.yamlsrc import MAX_SHOWN, Problem, SourceError
from tests.support import mutate

MINIMAL = """\
node: node1
inventory: inventory.yaml
cgroup: meshlet/node1
identity:
  bundle: ca/bundle.pem
  caCert: ca/nodes/node1/ca.pem
  caKey: ca/nodes/node1/ca-key.pem
proxy:
  redirectIPv4: 10.244.1.1
"""

FULL = """\
node: node1
inventory: /etc/meshlet/inventory.yaml
cgroup: /sys/fs/cgroup/unified/x/node1
bpf:
  pinDir: /sys/fs/bpf/m/node1
proxy:
  redirectIPv4: 10.244.1.1
  redirectIPv6: "fd00:244:1::1"
  outboundPort: 16001
  inboundPort: 16006
  tunnelPort: 16008
  workers: 4
  connectTimeout: 2.5
  meshMark: 0x10
  bufferSize: 65536
mesh:
  mode: strict
  excludePorts: [22, 10250, 22]
  excludeCIDRs: ["169.254.0.0/16", "fe80::/10"]
admin:
  socket: /tmp/admin.sock
identity:
  trustDomain: prod.example
  bundle: /etc/meshlet/ca/bundle.pem
  caCert: /etc/meshlet/ca/node1.pem
  caKey: /etc/meshlet/ca/node1-key.pem
  certTTL: 3600
runDir: /var/run/meshlet
logLevel: debug
"""


def errors(text: str, filename: str = "c.yaml") -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_config(textwrap.dedent(text), filename, base_dir="/cfg")
    assert str(ei.value) == "\n".join(str(p) for p in ei.value.errors)
    assert all(isinstance(p, Problem) for p in ei.value.errors)
    return [str(p) for p in ei.value.errors]


# -- good files -------------------------------------------------------------


def test_minimal_gets_defaults():
    c = parse_config(MINIMAL, "/etc/meshlet/config.yaml")
    assert c.node == "node1"
    assert c.inventory == "/etc/meshlet/inventory.yaml"  # relative to the config's directory
    assert c.cgroup == "meshlet/node1"  # kept as written
    assert c.bpf.pin_dir == "/sys/fs/bpf/meshlet/node1"
    assert c.run_dir == "/run/meshlet/node1"
    assert c.admin.socket == "/run/meshlet/node1/admin.sock"
    assert c.log_level == "info"
    p = c.proxy
    assert p.redirect_ipv4 == ipaddress.IPv4Address("10.244.1.1")
    assert p.redirect_ipv6 is None
    assert (p.outbound_port, p.inbound_port, p.tunnel_port) == (15001, 15006, 15008)
    assert (p.workers, p.connect_timeout, p.mesh_mark, p.buffer_size) == (
        default_workers(), 5.0, 0x4D4C0000, 262144)
    assert 2 <= default_workers() <= 4  # siblings by default: a crash never leaves no listener
    assert (c.mesh.mode, c.mesh.exclude_ports, c.mesh.exclude_cidrs) == ("permissive", (), ())


def test_path_parameters_default_and_setting():
    assert parse_config(MINIMAL, "c.yaml").proxy.path_parameters == "reject"
    c = parse_config(MINIMAL + "  pathParameters: strip\n", "c.yaml")
    assert c.proxy.path_parameters == "strip"
    assert parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c  # round trip


def test_full_file():
    c = parse_config(FULL, "c.yaml")
    assert c.inventory == "/etc/meshlet/inventory.yaml"
    assert c.bpf.pin_dir == "/sys/fs/bpf/m/node1"
    assert c.proxy.redirect_ipv6 == ipaddress.IPv6Address("fd00:244:1::1")
    assert c.proxy.mesh_mark == 0x10 and c.proxy.connect_timeout == 2.5
    assert c.mesh.exclude_ports == (22, 10250)  # sorted, unique
    assert [str(n) for n in c.mesh.exclude_cidrs] == ["169.254.0.0/16", "fe80::/10"]
    assert c.admin.socket == "/tmp/admin.sock"
    assert c.run_dir == "/var/run/meshlet" and c.log_level == "debug"


def test_observability_defaults():
    c = parse_config(MINIMAL + "runDir: /var/run/m\n", "c.yaml")
    assert (c.metrics.enabled, str(c.metrics.address), c.metrics.port) == (True, "0.0.0.0", 15020)
    assert (c.access_log.enabled, c.access_log.sampling) == (True, 1.0)
    assert c.access_log.path == c.access_log_path == "/var/run/m/access.log"


def test_observability_settings():
    c = parse_config(MINIMAL + "metrics:\n  address: '::'\n  port: 9102\n  enabled: false\n"
                     "accessLog:\n  enabled: false\n  sampling: 0.25\n  path: /var/log/a.log\n",
                     "c.yaml")
    assert (c.metrics.enabled, str(c.metrics.address), c.metrics.port) == (False, "::", 9102)
    assert (c.access_log.enabled, c.access_log.sampling, c.access_log.path) == \
        (False, 0.25, "/var/log/a.log")
    again = parse_config(yaml.safe_dump(c.to_dict()), "/x/c.yaml")
    assert again == c


def test_metrics_port_must_not_be_a_proxy_port():
    got = errors(MINIMAL + "metrics:\n  port: 15008\n")
    assert got == ["c.yaml:11:9: metrics.port: port 15008 is also a proxy listener port; "
                   "choose another (default 15020)"]


def test_admin_socket_defaults_under_run_dir():
    c = parse_config(MINIMAL + "runDir: /var/run/m\n", "c.yaml")
    assert c.admin.socket == "/var/run/m/admin.sock"


@pytest.mark.parametrize("text", [MINIMAL, FULL])
def test_round_trip(text):
    c = parse_config(text, "/etc/meshlet/config.yaml")
    again = parse_config(yaml.safe_dump(c.to_dict()), "/elsewhere/config.yaml")
    assert again == c
    assert again.to_dict() == c.to_dict()


def test_config_is_frozen_and_hashable():
    c = parse_config(FULL, "c.yaml")
    with pytest.raises(AttributeError):
        c.node = "x"  # type: ignore[misc]
    assert hash(c) == hash(parse_config(FULL, "c.yaml"))


@pytest.mark.parametrize("value,expected", [
    ("0x4d4c0000", 0x4D4C0000), ('"0x4d4c0000"', 0x4D4C0000), ('"0X10"', 16),
    ("1234", 1234), ('"1234"', 1234),
])
def test_mesh_mark_forms(value, expected):
    c = parse_config(MINIMAL + f"  meshMark: {value}\n", "c.yaml")
    assert c.proxy.mesh_mark == expected


def test_bare_address_is_a_host_cidr():
    c = parse_config(MINIMAL + "mesh:\n  excludeCIDRs: [10.0.0.1, 'fd00::1']\n", "c.yaml")
    assert [str(n) for n in c.mesh.exclude_cidrs] == ["10.0.0.1/32", "fd00::1/128"]


def test_connect_timeout_accepts_int():
    c = parse_config(MINIMAL + "  connectTimeout: 3\n", "c.yaml")
    assert c.proxy.connect_timeout == 3.0 and isinstance(c.proxy.connect_timeout, float)


def test_null_sections_and_fields_count_as_absent():
    c = parse_config(MINIMAL + "bpf:\nmesh:\n  mode:\nadmin: ~\n", "c.yaml")
    assert c.bpf.pin_dir == "/sys/fs/bpf/meshlet/node1" and c.mesh.mode == "permissive"


def test_load_config_reads_file_and_resolves_inventory(tmp_path):
    (tmp_path / "config.yaml").write_text(MINIMAL)
    c = load_config(tmp_path / "config.yaml")
    assert c.inventory == str(tmp_path / "inventory.yaml")


def test_load_config_missing_file(tmp_path):
    with pytest.raises(SourceError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert str(ei.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read file: ")


def test_load_config_not_utf8(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"node: node1\ncgroup: \xff\n")
    with pytest.raises(SourceError) as ei:
        load_config(f)
    assert str(ei.value) == f"{f}:2:9: file is not valid UTF-8"


# -- errors: one table, exact file:line:col and path ---------------------------

ERRORS = [
    # whole-file problems
    ("", "c.yaml:1:1: file is empty; expected a mapping of fields"),
    ("# only a comment\n", "c.yaml:1:1: file is empty; expected a mapping of fields"),
    ("---\n", "c.yaml:1:1: file is empty; expected a mapping of fields"),
    ("- a\n- b\n", "c.yaml:1:1: top level must be a mapping of fields, got a list"),
    ("just text\n", "c.yaml:1:1: top level must be a mapping of fields, got a string"),
    ("node: a\n---\nnode: b\n",
     "c.yaml:2:1: a second YAML document starts here; put everything in one document (remove the '---')"),
    ("node: [a\n", "c.yaml:2:1: YAML syntax error: did not find expected ',' or ']' "
                   "(while parsing a flow sequence)"),
    ("node: a\n  b: c\n", "c.yaml:2:4: YAML syntax error: mapping values are not allowed in this context"),
    ("node: a\n\tcgroup: x\n", "c.yaml:2:1: YAML syntax error: found a tab character that violates "
                               "indentation (while scanning a plain scalar)"),
    ("node: *nope\n", "c.yaml:1:7: YAML syntax error: found undefined alias 'nope'"),
    ("node: a\x07\n", "c.yaml:1:8: YAML syntax error: character 0x7 is not allowed"),
    # types and values
    ("node: Node_1\n",
     "c.yaml:1:7: node: 'Node_1' is not a valid name: use lower-case letters, digits and '-', "
     "starting and ending with a letter or digit"),
    ("node: " + "a" * 64 + "\n", "c.yaml:1:7: node: 'aaaaaaaaaaaaaaaaaaaa'... is 64 characters; names are at most 63"),
    ("node: 12:30\n", "c.yaml:1:7: node: expected a name, got an integer '12:30' (quote it)"),
    ("node: yes\n", "c.yaml:1:7: node: expected a name, got a boolean ('yes'; quote it if you meant a string)"),
    ("cgroup: ''\n", "c.yaml:1:9: cgroup: must not be empty"),
    ("cgroup: [a]\n", "c.yaml:1:9: cgroup: expected a single value, got a list"),
    ("inventory: 2024-01-01\n", "c.yaml:1:12: inventory: expected a string, got a date '2024-01-01' (quote it)"),
    ("inventory: !custom x\n", "c.yaml:1:12: inventory: unsupported YAML tag '!custom'"),
    ("inventory: !!int x\n", "c.yaml:1:12: inventory: cannot read 'x' as int: invalid literal for int() "
                             "with base 10: 'x'"),
    ("logLevel: verbose\n", "c.yaml:1:11: logLevel: 'verbose' is not one of: debug, info, warning, error"),
    ("logLevel: Info\n",
     "c.yaml:1:11: logLevel: 'Info' is not one of: debug, info, warning, error (did you mean 'info'?)"),
    ("runDir: run/m\n", "c.yaml:1:9: runDir: 'run/m' must be an absolute path (start with '/')"),
    ("bpf:\n  pinDir: 3\n", "c.yaml:2:11: bpf.pinDir: expected a string, got an integer '3' (quote it)"),
    ("bpf: [x]\n", "c.yaml:1:6: bpf: expected a mapping, got a list"),
    ("bpf: !!set {a}\n", "c.yaml:1:6: bpf: unsupported YAML tag 'tag:yaml.org,2002:set'"),
    ("proxy:\n  redirectIPv4: 10.244.1.300\n",
     "c.yaml:2:17: proxy.redirectIPv4: '10.244.1.300' is not an IPv4 address"),
    ("proxy:\n  redirectIPv4: fd00::1\n", "c.yaml:2:17: proxy.redirectIPv4: 'fd00::1' is not an IPv4 address"),
    ("proxy:\n  redirectIPv6: 10.0.0.1\n", "c.yaml:2:17: proxy.redirectIPv6: '10.0.0.1' is not an IPv6 address"),
    ("proxy:\n  redirectIPv6: 'fe80::1%eth0'\n",
     "c.yaml:2:17: proxy.redirectIPv6: 'fe80::1%eth0': zone indexes ('%...') are not allowed"),
    ("proxy:\n  outboundPort: 70000\n", "c.yaml:2:17: proxy.outboundPort: 70000 is not a port number (1..65535)"),
    ("proxy:\n  inboundPort: '15006'\n",
     "c.yaml:2:16: proxy.inboundPort: expected a port number, got a string '15006'"),
    ("proxy:\n  tunnelPort: 15001\n",
     "c.yaml:2:15: proxy.tunnelPort: port 15001 is also outboundPort; the proxy listeners need three "
     "different ports"),
    ("proxy:\n  outboundPort: 15006\n",
     "c.yaml:2:17: proxy.outboundPort: port 15006 is also inboundPort; the proxy listeners need three "
     "different ports"),
    ("proxy:\n  workers: 0\n", "c.yaml:2:12: proxy.workers: 0 is out of range (1..64)"),
    ("proxy:\n  workers: 1.5\n", "c.yaml:2:12: proxy.workers: expected an integer, got a number '1.5'"),
    ("proxy:\n  connectTimeout: 0\n",
     "c.yaml:2:19: proxy.connectTimeout: 0 must be greater than 0 and at most 120"),
    ("proxy:\n  connectTimeout: 121\n", "c.yaml:2:19: proxy.connectTimeout: 121 is out of range (0..120)"),
    ("proxy:\n  connectTimeout: .nan\n", "c.yaml:2:19: proxy.connectTimeout: '.nan' is not a finite number"),
    ("proxy:\n  meshMark: 0\n", "c.yaml:2:13: proxy.meshMark: 0 is out of range (1..4294967295)"),
    ("proxy:\n  meshMark: 0x100000000\n",
     "c.yaml:2:13: proxy.meshMark: 4294967296 is out of range (1..4294967295)"),
    ("proxy:\n  meshMark: '0xzz'\n",
     "c.yaml:2:13: proxy.meshMark: '0xzz' is not an integer (decimal or 0x hex)"),
    ("proxy:\n  bufferSize: 100\n", "c.yaml:2:15: proxy.bufferSize: 100 is out of range (4096..67108864)"),
    ("proxy:\n  pathParameters: strp\n",
     "c.yaml:2:19: proxy.pathParameters: 'strp' is not one of: reject, strip, keep (did you mean 'strip'?)"),
    ("mesh:\n  mode: strct\n",
     "c.yaml:2:9: mesh.mode: 'strct' is not one of: permissive, strict (did you mean 'strict'?)"),
    ("mesh:\n  excludePorts: 22\n", "c.yaml:2:17: mesh.excludePorts: expected a list, got an integer"),
    ("mesh:\n  excludePorts:\n    - 22\n    - 0\n",
     "c.yaml:4:7: mesh.excludePorts[1]: 0 is not a port number (1..65535)"),
    ("mesh:\n  excludeCIDRs: [10.0.0.1/8]\n",
     "c.yaml:2:18: mesh.excludeCIDRs[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)"),
    ("mesh:\n  excludeCIDRs: [fd00::/129]\n",
     "c.yaml:2:18: mesh.excludeCIDRs[0]: 'fd00::/129' is not a CIDR (like 10.0.0.0/8 or fd00::/8)"),
    ("admin:\n  socket: /" + "s" * 107 + "\n",
     "c.yaml:2:11: admin.socket: path is 108 bytes; Unix socket paths are limited to 107, choose a "
     "shorter one"),
    ("runDir: /" + "r" * 100 + "\n",
     f"c.yaml:1:9: runDir: the default admin socket '/{'r' * 100}/admin.sock' is longer than 107 bytes; "
     "shorten runDir or set admin.socket"),
    # unknown fields, hints, duplicates, keys
    ("logLvel: info\n", "c.yaml:1:1: logLvel: unknown field 'logLvel' (did you mean 'logLevel'?)"),
    ("run_dir: /x\n", "c.yaml:1:1: run_dir: unknown field 'run_dir' (did you mean 'runDir'?)"),
    ("proxy:\n  redirectIpv4: 10.0.0.1\n",
     "c.yaml:2:3: proxy.redirectIpv4: unknown field 'redirectIpv4' (did you mean 'redirectIPv4'?)"),
    ("zzz: 1\n", "c.yaml:1:1: zzz: unknown field 'zzz'; known fields: node, inventory, cgroup, runDir, "
                 "handoverDir, logLevel, bpf, proxy, mesh, admin, identity, metrics, accessLog, workloads, tracing"),
    # workload source (#11)
    ("workloads:\n  source: k8s\n",
     "c.yaml:2:11: workloads.source: 'k8s' is not one of: file, kubernetes"),
    ("workloads:\n  watchTimeout: 0\n", "c.yaml:2:17: workloads.watchTimeout: 0 is out of range (1..3600)"),
    ("workloads:\n  kubconfig: k\n",
     "c.yaml:2:3: workloads.kubconfig: unknown field 'kubconfig' (did you mean 'kubeconfig'?)"),
    ("logLevel: info\nlogLevel: debug\n",
     "c.yaml:2:1: logLevel: duplicate key 'logLevel' (first given at line 1)"),
    ("mesh:\n  mode: strict\n  mode: strict\n",
     "c.yaml:3:3: mesh.mode: duplicate key 'mode' (first given at line 2)"),
    ("1: x\n", "c.yaml:1:1: field names must be strings, got an integer '1' (quote it)"),
    ("? [a]\n: x\n", "c.yaml:1:3: field names must be strings, got a list '...' (quote it)"),
    ("identity:\n  trustDomain: Cluster.Local\n",
     "c.yaml:2:16: identity.trustDomain: 'Cluster.Local' is not a SPIFFE trust domain: lowercase "
     "letters, digits, '.', '-' and '_' only (e.g. cluster.local)"),
    ("identity:\n  certTTL: 5\n", "c.yaml:2:12: identity.certTTL: 5 is out of range (10..7776000)"),
    # observability (#6)
    ("metrics:\n  port: 0\n", "c.yaml:2:9: metrics.port: 0 is not a port number (1..65535)"),
    ("metrics:\n  address: 224.0.0.1\n",
     "c.yaml:2:12: metrics.address: '224.0.0.1' cannot be listened on; use a unicast address, "
     "0.0.0.0 or ::"),
    ("metrics:\n  address: localhost\n",
     "c.yaml:2:12: metrics.address: 'localhost' is not an IP address (use 0.0.0.0 for every IPv4 "
     "address, :: for every address)"),
    ("metrics:\n  enabled: 1\n", "c.yaml:2:12: metrics.enabled: expected true or false, got an integer '1'"),
    ("metrics:\n  prot: 1\n", "c.yaml:2:3: metrics.prot: unknown field 'prot' (did you mean 'port'?)"),
    ("accessLog:\n  sampling: 1.5\n", "c.yaml:2:13: accessLog.sampling: 1.5 is out of range (0..1)"),
    ("accessLog:\n  sampling: -0.1\n", "c.yaml:2:13: accessLog.sampling: -0.1 is out of range (0..1)"),
    ("accessLog:\n  path: logs/a.log\n",
     "c.yaml:2:9: accessLog.path: 'logs/a.log' must be an absolute path (start with '/')"),
    ("mesh:\n  <<: {mode: strict}\n",
     "c.yaml:2:3: mesh: merge keys ('<<') are not supported; write the fields out"),
]

@pytest.mark.parametrize("text,expected", ERRORS, ids=[e[1].split(": ", 1)[1][:50] for e in ERRORS])
def test_error_table(text, expected):
    got = errors(text)
    # The cases are fragments: ignore the required fields they leave out.
    if "required field is missing" not in expected:
        got = [g for g in got if not g.endswith("required field is missing")]
    assert got == [expected]


def test_missing_required_fields_reported_together():
    got = errors("logLevel: info\n")
    assert got == [
        "c.yaml:1:1: node: required field is missing",
        "c.yaml:1:1: inventory: required field is missing",
        "c.yaml:1:1: cgroup: required field is missing",
        "c.yaml:1:1: proxy.redirectIPv4: required field is missing",
        "c.yaml:1:1: identity.bundle: required field is missing",
        "c.yaml:1:1: identity.caCert: required field is missing",
        "c.yaml:1:1: identity.caKey: required field is missing",
    ]


def test_missing_field_in_section_points_at_section():
    got = errors("node: n\ninventory: i\ncgroup: c\nproxy:\n  workers: 2\n"
                 "identity:\n  bundle: b\n  caCert: c\n")
    assert got == ["c.yaml:5:3: proxy.redirectIPv4: required field is missing",
                   "c.yaml:7:3: identity.caKey: required field is missing"]


def test_many_errors_collected_in_file_order():
    text = """\
        node: BAD
        inventory: 1
        cgroup: c
        proxy:
          redirectIPv4: x
          workers: 99
          wrkers: 1
        mesh:
          excludePorts: [0, 1, 2, 99999]
        logLevel: loud
    """
    got = [g for g in errors(text) if not g.startswith("c.yaml:1:1: identity.")]
    assert [g.split(": ", 2)[0:2] for g in got] == [
        ["c.yaml:1:7", "node"], ["c.yaml:2:12", "inventory"], ["c.yaml:5:17", "proxy.redirectIPv4"],
        ["c.yaml:6:12", "proxy.workers"], ["c.yaml:7:3", "proxy.wrkers"],
        ["c.yaml:9:18", "mesh.excludePorts[0]"], ["c.yaml:9:27", "mesh.excludePorts[3]"],
        ["c.yaml:10:11", "logLevel"],
    ]


def test_error_message_is_capped_but_errors_kept():
    text = MINIMAL + "".join(f"unknown{i}: 1\n" for i in range(30))
    with pytest.raises(SourceError) as ei:
        parse_config(text, "c.yaml")
    assert len(ei.value.errors) == 30
    lines = str(ei.value).splitlines()
    assert len(lines) == MAX_SHOWN + 1 and lines[-1] == "... and 10 more problems"
    assert isinstance(ei.value, ValueError)


def test_error_path_quotes_odd_keys():
    got = errors(MINIMAL + "'a.b/c': 1\n")
    assert got[0].startswith("c.yaml:10:1: ['a.b/c']: unknown field 'a.b/c'")


# -- robustness: only SourceError, whatever the input ---------------------------


def _only_source_error(text: str) -> None:
    try:
        cfg = parse_config(text, "fuzz.yaml", base_dir="/cfg")
    except SourceError as e:
        assert e.errors and all(isinstance(p, Problem) for p in e.errors)
        str(e)
    else:
        assert isinstance(cfg, AgentConfig)
        cfg.to_dict()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_garbage_text_only_raises_source_error(text):
    _only_source_error(text)


_YAML_BITS = st.sampled_from(
    [":", " ", "\n", "  ", "-", "[", "]", "{", "}", ",", "'", '"', "#", "&a", "*a", "!!int", "!x",
     "---", "~", "0x", "::", "1", "10.0.0.1", "<<", "?", "|", ">", "\t", "é", "\x00"])


@st.composite
def _mutated(draw, base: str) -> str:
    """Delete a short span and insert a few YAML-significant bits, 1-4 times."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        text = text[:i] + "".join(draw(st.lists(_YAML_BITS, max_size=3))) + text[j:]
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated(FULL), _mutated(MINIMAL)))
def test_mutated_documents_only_raise_source_error(text):
    _only_source_error(text)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                     st.text(max_size=20), st.sampled_from(["10.0.0.1", "fd00::1", "10.0.0.0/8", "0x10"]))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


_FULL_DICT = yaml.safe_load(FULL)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(mutate.paths(_FULL_DICT))), _values)
def test_structurally_mutated_documents_only_raise_source_error(path, value):
    _only_source_error(yaml.safe_dump(mutate.replace(_FULL_DICT, path, value)))


def test_proxy_l7_mode():
    assert parse_config(MINIMAL, "c.yaml").proxy.l7 == "auto"  # L7 where HTTP policies need it
    for text, want in (("true", True), ("false", False), ("auto", "auto")):
        c = parse_config(MINIMAL + f"  l7: {text}\n", "c.yaml")
        assert c.proxy.l7 == want and type(c.proxy.l7) is type(want)
        assert c.to_dict()["proxy"]["l7"] == want
        assert parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c
    assert errors(MINIMAL + "  l7: 1\n") == [
        "c.yaml:10:7: proxy.l7: expected true, false or auto, got an integer '1'"]
    assert errors(MINIMAL + "  l7: sometimes\n") == [
        "c.yaml:10:7: proxy.l7: expected true, false or auto, got a string 'sometimes'"]


def test_bpf_tc_attach():
    assert parse_config(MINIMAL, "c.yaml").bpf.tc_attach == "auto"
    c = parse_config(MINIMAL + "bpf:\n  tcAttach: clsact\n", "c.yaml")
    assert c.bpf.tc_attach == "clsact" and c.to_dict()["bpf"]["tcAttach"] == "clsact"
    msg = errors(MINIMAL + "bpf:\n  tcAttach: tc\n")[0]
    assert msg.startswith("c.yaml:") and "bpf.tcAttach" in msg and "auto, tcx, clsact" in msg, msg


def test_bpf_switches_for_flow_tracking_and_kernel_policy():
    c = parse_config(MINIMAL, "c.yaml")
    assert c.bpf.flow_tracking is True and c.bpf.kernel_policy is True
    text = MINIMAL + "bpf:\n  flowTracking: false\n  kernelPolicy: false\n"
    c = parse_config(text, "c.yaml")
    assert c.bpf.flow_tracking is False and c.bpf.kernel_policy is False
    assert parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c
    assert errors(MINIMAL + "bpf:\n  flowTracking: sometimes\n")[0].endswith(
        "bpf.flowTracking: expected true or false, got a string 'sometimes'")


def test_bpf_flow_history():
    c = parse_config(MINIMAL, "c.yaml")
    assert c.bpf.flow_history == 4096 and c.to_dict()["bpf"]["flowHistory"] == 4096
    c = parse_config(MINIMAL + "bpf:\n  flowHistory: 0\n", "c.yaml")
    assert c.bpf.flow_history == 0 and parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c
    assert errors(MINIMAL + "bpf:\n  flowHistory: 2000000\n")[0].startswith("c.yaml:")
    assert "bpf.flowHistory" in errors(MINIMAL + "bpf:\n  flowHistory: lots\n")[0]


def test_workloads_default_is_the_file_source():
    c = parse_config(MINIMAL, "/etc/meshlet/config.yaml")
    assert c.workloads.source == "file"
    assert c.inventory == "/etc/meshlet/inventory.yaml"


def test_kubernetes_source_needs_no_inventory_and_round_trips():
    text = MINIMAL.replace("inventory: inventory.yaml\n", "") + (
        "workloads:\n  source: kubernetes\n  kubeconfig: kube/config\n  context: dev\n"
        "  kubeletCgroupRoot: /kubelet.slice\n  syncTimeout: 5\n  watchTimeout: 30\n"
    )
    c = parse_config(text, "/etc/meshlet/config.yaml")
    w = c.workloads
    assert c.inventory is None
    assert (w.source, w.kubeconfig, w.context) == ("kubernetes", "/etc/meshlet/kube/config", "dev")
    assert (w.kubelet_cgroup_root, w.sync_timeout, w.watch_timeout) == ("/kubelet.slice", 5, 30)
    again = parse_config(yaml.safe_dump(c.to_dict()), "/elsewhere/config.yaml")
    assert again == c


def test_node_ca_by_csr_is_the_default_in_kubernetes_mode_only():
    assert parse_config(MINIMAL, "/etc/meshlet/config.yaml").identity.node_ca == "files"
    kube = MINIMAL.replace("inventory: inventory.yaml\n", "") + "workloads:\n  source: kubernetes\n"
    assert parse_config(kube, "/etc/meshlet/config.yaml").identity.node_ca == "csr"
    key = "  caKey: ca/nodes/node1/ca-key.pem\n"
    files = kube.replace(key, key + "  nodeCA: files\n")
    assert parse_config(files, "/etc/meshlet/config.yaml").identity.node_ca == "files"
    csr = MINIMAL.replace(key, key + "  nodeCA: csr\n")
    (e,) = errors(csr)
    assert e.startswith("c.yaml:8:11: identity.nodeCA: csr needs the Kubernetes API"), e


def test_file_source_still_requires_the_inventory():
    text = MINIMAL.replace("inventory: inventory.yaml\n", "") + "workloads:\n  source: file\n"
    assert errors(text) == ["c.yaml:1:1: inventory: required field is missing"]
