"""agent/policy/load.py: both API versions, trust-domain handling, every error
with its exact file:line:column and field path, files and directories, the
fingerprint, and fuzzing (bad input only ever raises SourceError)."""

from __future__ import annotations

import copy
import ipaddress

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.policy.load import load_policies, parse_policies, parse_principal
from agent.policy.model import Action, ConditionKey, MatchKind, PolicySet, StringMatch
from agent.yamlsrc import Problem, SourceError
from tests.support import mutate

GOOD = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: backend-readers
  namespace: shop
  labels: {team: payments}
spec:
  selector:
    matchLabels: {app: backend, tier: api}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["ns/shop/sa/web", "spiffe://other.org/ns/x/sa/y"]
        notNamespaces: ["kube-*"]
        ipBlocks: ["10.244.0.0/16", "fd00::1"]
    to:
    - operation:
        ports: [8080, "8443"]
        methods: ["GET", "HEAD"]
        paths: ["/api/*", "*.json", "/health"]
        hosts: ["API.example.com", "*.internal"]
    when:
    - key: request.headers[X-Tenant]
      values: ["acme", "beta-*"]
    - key: source.ip
      notValues: ["10.244.9.0/24"]
    - key: destination.port
      values: ["8080"]
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec:
  action: DENY
  rules: [{}]
"""


def errors(text: str, filename: str = "p.yaml", **kw) -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_policies(text, filename, **kw)
    assert all(isinstance(p, Problem) for p in ei.value.errors)
    return [str(p) for p in ei.value.errors]


def doc(spec: str, api: str = "meshlet.io/v1alpha1", name: str = "p", ns: str = "shop") -> str:
    return (f"apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n"
            f"  namespace: {ns}\nspec:\n{spec}")


# -- good documents ---------------------------------------------------------------

def test_good_documents_become_models():
    ps = parse_policies(GOOD, "good.yaml")
    assert isinstance(ps, PolicySet) and len(ps) == 2
    deny, allow = ps.policies  # ordered by (namespace, name)
    assert (deny.key, deny.action, deny.rules[0].sources) == ("istio-system/deny-all", Action.DENY, ())
    assert allow.key == "shop/backend-readers" and allow.action is Action.ALLOW
    assert allow.selector == (("app", "backend"), ("tier", "api"))
    assert allow.origin == "good.yaml:1:1"
    r0, r1 = allow.rules
    assert r0.origin == "good.yaml:12:5" and r1.origin == "good.yaml:30:5"
    assert r1.sources == r1.operations == r1.conditions == ()
    src = r0.sources[0]
    assert [p.match.value for p in src.principals] == ["cluster.local/ns/shop/sa/web", "other.org/ns/x/sa/y"]
    assert src.not_namespaces == (StringMatch(MatchKind.PREFIX, "kube-"),)
    assert src.ip_blocks == (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00::1/128"))
    op = r0.operations[0]
    assert op.ports == (8080, 8443)
    assert [str(p) for p in op.paths] == ["/api/*", "*.json", "/health"]
    assert [str(h) for h in op.hosts] == ["api.example.com", "*.internal"]  # hosts compare case-insensitively
    c_hdr, c_ip, c_port = r0.conditions
    assert (c_hdr.key, c_hdr.header, c_hdr.is_l7) == (ConditionKey.REQUEST_HEADER, "x-tenant", True)
    assert c_ip.not_values == (ipaddress.ip_network("10.244.9.0/24"),) and not c_ip.is_l7
    assert c_port.values == (8080,)
    assert r0.l7_fields == ("methods", "paths", "hosts", "request.headers[x-tenant]")
    assert allow.selects("shop", {"app": "backend", "tier": "api", "x": "y"}, ps.root_namespace)
    assert not allow.selects("shop", {"app": "backend"}, ps.root_namespace)
    assert deny.selects("anywhere", {}, ps.root_namespace)  # root namespace: mesh-wide


def test_absent_spec_and_empty_spec_allow_nothing():
    a = parse_policies("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
                       "metadata: {name: a, namespace: n}\n")
    b = parse_policies("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
                       "metadata: {name: a, namespace: n}\nspec: {}\n")
    for ps in (a, b):
        (p,) = ps.policies
        assert p.action is Action.ALLOW and p.rules == () and p.selector == ()


# -- principals and the trust domain ---------------------------------------------------

@pytest.mark.parametrize("written, td, istio, kind, value", [
    ("ns/a/sa/b", "cluster.local", False, MatchKind.EXACT, "cluster.local/ns/a/sa/b"),
    ("ns/a/sa/b", "example.org", False, MatchKind.EXACT, "example.org/ns/a/sa/b"),
    ("ns/a/sa/*", "example.org", False, MatchKind.PREFIX, "example.org/ns/a/sa/"),
    ("cluster.local/ns/a/sa/b", "example.org", True, MatchKind.EXACT, "example.org/ns/a/sa/b"),
    ("cluster.local/ns/a/sa/*", "example.org", True, MatchKind.PREFIX, "example.org/ns/a/sa/"),
    ("cluster.local/ns/a/*", "example.org", True, MatchKind.PREFIX, "cluster.local/ns/a/"),  # 4 parts: literal, as Istio
    ("other.org/ns/a/sa/b", "example.org", True, MatchKind.EXACT, "other.org/ns/a/sa/b"),
    ("spiffe://cluster.local/ns/a/sa/b", "example.org", False, MatchKind.EXACT, "cluster.local/ns/a/sa/b"),
    ("*/ns/a/sa/b", "example.org", True, MatchKind.SUFFIX, "/ns/a/sa/b"),
    ("*", "example.org", True, MatchKind.PRESENCE, ""),
])
def test_principal_forms(written, td, istio, kind, value):
    p = parse_principal(written, trust_domain=td, istio=istio)
    assert (p.match.kind, p.match.value, str(p)) == (kind, value, written)


@pytest.mark.parametrize("written, istio, says", [
    ("ns/a/sa/b", True, "Istio principals start with the trust domain"),
    ("spiffe://cluster.local/ns/a/sa/b", True, "no 'spiffe://' scheme"),
    ("Cluster.local/ns/a/sa/b", False, "uppercase"),
    ("cluster.local/ns/a/sa/b/", False, "must not end with '/'"),
    ("cluster.local/ns/a*/sa/b", False, "'*' is only allowed"),
    ("ns/a b/sa/*", False, "principals use only"),
    ("cluster.local//ns/*", False, "principals use only"),
])
def test_principal_errors(written, istio, says):
    with pytest.raises(ValueError, match=says):
        parse_principal(written, istio=istio)


# -- errors, each at its exact place ------------------------------------------------------

RULE = "  rules:\n  - from:\n    - source:\n"


@pytest.mark.parametrize("spec, expected", [
    ("  acton: DENY\n",
     "p.yaml:7:3: spec.acton: unknown field 'acton' (did you mean 'action'?)"),
    ("  action: CUSTOM\n  rules: [{}]\n",
     "p.yaml:7:11: spec.action: action CUSTOM (external authorization) is not supported; use ALLOW, DENY or AUDIT"),
    ("  action: allow\n",
     "p.yaml:7:11: spec.action: 'allow' is not one of: ALLOW, DENY, AUDIT, CUSTOM (did you mean 'ALLOW'?)"),
    ("  provider: {name: ext}\n",
     "p.yaml:7:3: spec.provider: CUSTOM (external authorization) providers are not supported"),
    ("  targetRefs: []\n",
     "p.yaml:7:3: spec.targetRefs: targetRefs (gateway/waypoint attachment) are not supported; use selector"),
    ("  action: DENY\n",
     "p.yaml:7:3: spec.rules: a DENY policy without rules never matches; add the rules, or an empty rule {} to deny everything"),
    ("  action: DENY\n  rules: []\n",
     "p.yaml:8:10: spec.rules: a DENY policy without rules never matches; add the rules, or an empty rule {} to deny everything"),
    ("  selector: {matchLabels: {app: 'web*'}}\n",
     "p.yaml:7:33: spec.selector.matchLabels.app: wildcards are not supported in selectors: 'web*'"),
    ("  selector: {app: web}\n",
     "p.yaml:7:14: spec.selector.app: unknown field 'app'; known fields: matchLabels"),
    ("  rules:\n  - from: []\n",
     "p.yaml:8:11: spec.rules[0].from: `from` must not be an empty list; remove it to match any source"),
    ("  rules:\n  - to:\n    - operation: {}\n",
     "p.yaml:9:18: spec.rules[0].to[0].operation: `operation` must not be empty; remove the whole entry to match any operation"),
    ("  rules:\n  - to:\n    - {}\n",
     "p.yaml:9:7: spec.rules[0].to[0].operation: `operation` is required and must not be empty"),
    (RULE + "        principals: []\n",
     "p.yaml:10:21: spec.rules[0].from[0].source.principals: an empty list would match anything; remove the field or list values"),
    (RULE + "        principals: [ns/a/sa/b, 'ns/*/sa/x']\n",
     "p.yaml:10:33: spec.rules[0].from[0].source.principals[1]: 'ns/*/sa/x': '*' is only allowed alone, "
     "as the first character (suffix match) or as the last character (prefix match)"),
    (RULE + "        requestPrincipals: []\n",
     "p.yaml:10:28: spec.rules[0].from[0].source.requestPrincipals: an empty list would match anything; remove the field or list values"),
    (RULE + "        remoteIpBlocks: [1.2.3.4]\n",
     "p.yaml:10:9: spec.rules[0].from[0].source.remoteIpBlocks: remoteIpBlocks (X-Forwarded-For) are not supported; use ipBlocks"),
    (RULE + "        ipBlocks: [10.0.0.1/8]\n",
     "p.yaml:10:20: spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)"),
    (RULE + "        namespaces: [Shop]\n",
     "p.yaml:10:22: spec.rules[0].from[0].source.namespaces[0]: 'Shop' is not a namespace pattern: "
     "namespaces use lower-case letters, digits and '-'"),
    ("  rules:\n  - to:\n    - operation:\n        paths: ['/api/{*}']\n",
     "p.yaml:10:17: spec.rules[0].to[0].operation.paths[0]: '/api/{*}': path templates ('{*}', '{**}') are not supported"),
    ("  rules:\n  - to:\n    - operation:\n        notPaths: ['/a/./b']\n",
     "p.yaml:10:20: spec.rules[0].to[0].operation.notPaths[0]: '/a/./b' can never match a normalized path: "
     "dot segment '.' never survives normalization"),
    ("  rules:\n  - to:\n    - operation:\n        paths: ['/%61dmin']\n",
     "p.yaml:10:17: spec.rules[0].to[0].operation.paths[0]: '/%61dmin' can never match a normalized path: "
     "%61 is decoded before matching; write 'a' instead"),
    ("  rules:\n  - to:\n    - operation:\n        ports: ['80', 0]\n",
     "p.yaml:10:23: spec.rules[0].to[0].operation.ports[1]: 0 is not a port number (1..65535)"),
    ("  rules:\n  - to:\n    - operation:\n        methods: ['GET POST']\n",
     "p.yaml:10:19: spec.rules[0].to[0].operation.methods[0]: 'GET POST' is not an HTTP method (letters, no spaces)"),
    ("  rules:\n  - when:\n    - key: request.auth.claims\n      values: [x]\n",
     "p.yaml:9:12: spec.rules[0].when[0].key: request.auth.claims needs a claim name: "
     "request.auth.claims[<name>] (nested: [a][b])"),
    ("  rules:\n  - when:\n    - key: request.auth.type\n      values: [x]\n",
     "p.yaml:9:12: spec.rules[0].when[0].key: `when` key 'request.auth.type' is not supported by meshlet; "
     "supported: request.headers[<name>], source.ip, source.namespace, source.principal, destination.port, "
     "request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>]"),
    ("  rules:\n  - when:\n    - key: source.namepsace\n      values: [x]\n",
     "p.yaml:9:12: spec.rules[0].when[0].key: unknown `when` key 'source.namepsace' (did you mean 'source.namespace'?)"),
    ("  rules:\n  - when:\n    - key: request.headers[x-a]\n",
     "p.yaml:9:7: spec.rules[0].when[0]: a `when` condition needs `values` or `notValues`"),
])
def test_error_positions(spec, expected):
    assert errors(doc(spec)) == [expected]


def test_ports_report_every_bad_item():
    errs = errors(doc("  rules:\n  - to:\n    - operation:\n        ports: ['80', 0, true, x]\n"))
    assert [e.split(": ", 2)[1] for e in errs] == [
        "spec.rules[0].to[0].operation.ports[1]", "spec.rules[0].to[0].operation.ports[2]",
        "spec.rules[0].to[0].operation.ports[3]"]


@pytest.mark.parametrize("text, expected", [
    ("", "p.yaml:1:1: no policy documents in this file; expected AuthorizationPolicy or RequestAuthentication documents"),
    ("---\n---\n", "p.yaml:1:1: no policy documents in this file; expected AuthorizationPolicy or RequestAuthentication documents"),
    ("- a\n", "p.yaml:1:1: a policy document must be a mapping, got a list"),
    ("a: [\n", "p.yaml:2:1: YAML syntax error: did not find expected node content "
               "(while parsing a flow node)"),
    ("apiVersion: v1\nkind: AuthorizationPolicy\n", "p.yaml:1:13: apiVersion: 'v1' is not one of: "
     "meshlet.io/v1alpha1, security.istio.io/v1, security.istio.io/v1beta1"),
    ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec: {mtls: {mode: STRICT}}\n",
     "p.yaml:2:7: kind: 'PeerAuthentication' is not one of: AuthorizationPolicy, RequestAuthentication "
     "(did you mean 'RequestAuthentication'?)"),
    ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nspec: {}\n",
     "p.yaml:1:1: metadata: required field is missing (name and namespace)"),
    ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n",
     "p.yaml:3:11: metadata.namespace: required field is missing"),
    ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: n, uid: x}\n",
     "p.yaml:3:35: metadata.uid: unknown field 'uid'; known fields: name, namespace, labels, annotations"),
    ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nstatus: {}\nmetadata: {name: a, namespace: n}\n",
     "p.yaml:3:1: status: unknown field 'status'; known fields: apiVersion, kind, metadata, spec"),
])
def test_document_errors(text, expected):
    assert errors(text) == [expected]


def test_every_problem_in_every_document_is_reported_in_order():
    text = doc("  action: DENY\n", name="a") + "---\n" + doc("  rules:\n  - from: []\n", name="b")
    errs = errors(text)
    assert [e.split(":")[1] for e in errs] == ["7", "16"]


def test_duplicate_policy_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(doc("  rules: [{}]\n", name="same"))
    (tmp_path / "b.yml").write_text("# again\n" + doc("  rules: [{}]\n", name="same"))
    (tmp_path / ".hidden.yaml").write_text("not: read")
    (tmp_path / "notes.txt").write_text("not read either")
    with pytest.raises(SourceError) as ei:
        load_policies(tmp_path)
    assert [str(p) for p in ei.value.errors] == [
        f"{tmp_path}/b.yml:5:9: metadata.name: policy shop/same is defined twice (first at {tmp_path}/a.yaml:1:1)"]


def test_directory_without_yaml_and_unreadable_file(tmp_path):
    with pytest.raises(SourceError, match="directory has no .yaml or .yml files"):
        load_policies(tmp_path)
    with pytest.raises(SourceError, match="cannot read file"):
        load_policies(tmp_path / "missing.yaml")


def test_load_several_paths_and_options(tmp_path):
    (tmp_path / "a.yaml").write_text(doc("  rules: [{from: [{source: {principals: [ns/a/sa/b]}}]}]\n"))
    ps = load_policies([tmp_path / "a.yaml"], trust_domain="example.org", root_namespace="mesh-root")
    assert ps.trust_domain == "example.org" and ps.root_namespace == "mesh-root"
    assert ps.policies[0].rules[0].sources[0].principals[0].match.value == "example.org/ns/a/sa/b"
    with pytest.raises(ValueError):
        load_policies([tmp_path / "a.yaml"], trust_domain="Bad")


# -- the fingerprint ---------------------------------------------------------------------

def test_fingerprint_follows_meaning_not_formatting():
    a = parse_policies(GOOD, "one.yaml")
    docs = GOOD.split("---\n")
    reordered = docs[1] + "---\n# a comment\n" + docs[0]
    b = parse_policies(reordered, "other.yaml")
    assert a.version == b.version and len(a.version) == 16
    c = parse_policies(GOOD.replace("/health", "/healthz"))
    d = parse_policies(GOOD, trust_domain="example.org")
    assert len({a.version, c.version, d.version}) == 3


# -- fuzzing: bad input only ever raises SourceError -----------------------------------------

def _check(text: str) -> None:
    try:
        parse_policies(text, "fuzz.yaml")
    except SourceError as e:
        assert e.errors and all(isinstance(p, Problem) for p in e.errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_only_raises_source_error(text):
    _check(text)


_GOOD_DOCS = list(yaml.safe_load_all(GOOD))
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
    st.sampled_from(["*", "ns/a/sa/*", "/api/*", "GET", "DENY", "AUDIT", "CUSTOM", "10.0.0.0/8",
                     "request.headers[x]", "source.ip", "spiffe://x/ns/a/sa/b", "/a/../b", "{*}"]),
    st.lists(st.text(max_size=6), max_size=3), st.just({}), st.just([]), st.just([{}]),
)


_ALL_PATHS = [(d, p) for d in range(len(_GOOD_DOCS)) for p in mutate.paths(_GOOD_DOCS[d]) if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), _values, st.booleans()), min_size=1, max_size=4))
def test_mutated_documents_only_raise_source_error(mutations):
    docs = copy.deepcopy(_GOOD_DOCS)
    for (d, path), value, rename in mutations:
        node = docs[d]
        try:
            for k in path[:-1]:
                node = node[k]
            last = path[-1]
            if rename and isinstance(node, dict) and last in node:
                node[str(value)[:10] or "x"] = node.pop(last)
            else:
                node[last] = value
        except (KeyError, IndexError, TypeError):
            continue
    _check(yaml.safe_dump_all(docs))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD)), st.integers(0, 40), st.text(max_size=8))
def test_spliced_text_only_raises_source_error(at, cut, insert):
    _check(GOOD[:at] + insert + GOOD[at + cut:])


def test_the_authorization_loader_alone_refuses_other_kinds():
    """parse_policies reads AuthorizationPolicy only (the store and the CLI add
    TrafficPolicy through the shared collector); a TrafficPolicy here is an
    error at its `kind`, never skipped."""
    text = ("apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\n"
            "metadata: {name: t, namespace: shop}\nspec: {service: backend}\n")
    with pytest.raises(SourceError) as ei:
        parse_policies(text, "t.yaml")
    assert [str(p) for p in ei.value.errors] == [
        "t.yaml:2:7: kind: 'TrafficPolicy' is not one of: AuthorizationPolicy, RequestAuthentication"]
