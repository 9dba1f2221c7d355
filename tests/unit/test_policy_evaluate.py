"""agent/policy/evaluate.py: Istio's documented semantics as table tests
(written in our own words), HTTP-only fields on TCP, headers, trust domains,
the root namespace, and compile_l4 never contradicting evaluate (Hypothesis)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, compile_l4, evaluate, explain
from agent.policy.load import parse_principal, parse_policies
from agent.policy.model import (
    Action, Condition, ConditionKey, Operation, Policy, PolicySet, Rule, Source, StringMatch,
)

WEB = "spiffe://cluster.local/ns/shop/sa/web"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"


def policies(*docs: str, **kw) -> PolicySet:
    """Documents written compactly: 'ns/name ACTION selector-json rules-yaml'."""
    out = []
    for i, d in enumerate(docs):
        head, _, body = d.partition("\n")
        key, action, *sel = head.split(maxsplit=2)
        ns, name = key.split("/")
        selector = f"  selector: {{matchLabels: {sel[0]}}}\n" if sel else ""
        out.append(f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
                   f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: {action}\n"
                   f"{selector}{body}")
    return parse_policies("---\n".join(out), "t.yaml", **kw)


def tcp(port=8080, src=WEB, ip="10.244.1.5", ns="shop", labels=None) -> Request:
    return Request(ns, labels if labels is not None else {"app": "backend"}, port,
                   parse_spiffe_id(src) if src else None, ipaddress.ip_address(ip) if ip else None)


def http(method="GET", path="/", port=8080, src=WEB, host=None, headers=None, **kw) -> Request:
    base = tcp(port, src, **kw)
    return Request(base.destination_namespace, base.destination_labels, port, base.source_principal,
                   base.source_ip, True, method, path, host, headers or {})


def allowed(ps, req) -> bool:
    return evaluate(ps, req).allowed


# -- which policies apply, and in what order ------------------------------------------

def test_no_policy_allows_everything():
    d = evaluate(PolicySet(()), tcp())
    assert (d.allowed, d.action, d.policy) == (True, "NO_POLICY", None)


def test_allow_nothing_policy_denies_its_namespace_only():
    ps = policies("shop/deny-all ALLOW\n  rules: []\n")
    d = evaluate(ps, tcp())
    assert (d.allowed, d.action) == (False, "NO_MATCH")
    assert allowed(ps, tcp(ns="other"))


def test_spec_without_rules_versus_one_empty_rule():
    nothing = parse_policies("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
                             "metadata: {name: a, namespace: shop}\nspec: {}\n")
    everything = policies("shop/all ALLOW\n  rules: [{}]\n")
    assert not allowed(nothing, tcp()) and not allowed(nothing, http())
    assert allowed(everything, tcp()) and allowed(everything, http("DELETE", "/x"))
    deny_all = policies("shop/all ALLOW\n  rules: [{}]\n", "shop/none DENY\n  rules: [{}]\n")
    d = evaluate(deny_all, http())
    assert (d.allowed, d.action, d.policy, d.rule) == (False, "DENY", "shop/none", 0)


def test_deny_wins_over_allow():
    ps = policies(
        "shop/readers ALLOW\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
        "shop/no-admin DENY\n  rules:\n  - to: [{operation: {paths: ['/admin*']}}]\n")
    assert allowed(ps, http("GET", "/api"))
    d = evaluate(ps, http("GET", "/admin/x"))
    assert (d.allowed, d.policy, d.action) == (False, "shop/no-admin", "DENY")
    assert d.origin == "t.yaml:15:5"
    assert not allowed(ps, http("POST", "/api"))  # an ALLOW applies, nothing matches


def test_selector_limits_the_workloads():
    ps = policies("shop/backend-only ALLOW {app: backend}\n  rules: []\n")
    assert not allowed(ps, tcp(labels={"app": "backend", "v": "2"}))
    assert allowed(ps, tcp(labels={"app": "frontend"}))
    assert allowed(ps, tcp(labels={}))


def test_root_namespace_applies_everywhere():
    ps = policies("istio-system/mesh-deny DENY {app: backend}\n  rules: [{}]\n")
    assert not allowed(ps, tcp(ns="shop")) and not allowed(ps, tcp(ns="data"))
    assert allowed(ps, tcp(ns="shop", labels={"app": "web"}))
    other_root = policies("istio-system/mesh-deny DENY\n  rules: [{}]\n", root_namespace="mesh")
    assert allowed(other_root, tcp(ns="shop"))


def test_any_allow_policy_matching_is_enough():
    ps = policies("shop/a ALLOW\n  rules:\n  - to: [{operation: {ports: [1]}}]\n",
                  "shop/b ALLOW\n  rules:\n  - to: [{operation: {ports: [2]}}]\n")
    assert evaluate(ps, tcp(2)).policy == "shop/b"
    assert not allowed(ps, tcp(3))


def test_audit_is_reported_and_never_decides():
    ps = policies("shop/audit-all AUDIT\n  rules: [{}]\n",
                  "shop/audit-post AUDIT\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n",
                  "shop/audit-none AUDIT\n  rules: []\n")
    d = evaluate(ps, http("POST", "/"))
    assert d.allowed and d.action == "NO_POLICY"
    assert [(a.policy, a.rule) for a in d.audited] == [("shop/audit-all", 0), ("shop/audit-post", 0)]
    ps2 = policies("shop/audit-all AUDIT\n  rules: [{}]\n", "shop/deny DENY\n  rules: [{}]\n")
    d = evaluate(ps2, tcp())
    assert not d.allowed and [a.policy for a in d.audited] == ["shop/audit-all"]


# -- sources -------------------------------------------------------------------------------

SRC = "shop/p ALLOW\n  rules:\n  - from:\n    - source: {%s}\n"


@pytest.mark.parametrize("source, src, ip, ok", [
    ("principals: [ns/shop/sa/web]", WEB, "10.0.0.1", True),
    ("principals: [ns/shop/sa/web]", ADMIN, "10.0.0.1", False),
    ("principals: [ns/shop/sa/web]", None, "10.0.0.1", False),     # plaintext peer
    ("principals: ['*']", WEB, "10.0.0.1", True),                  # any authenticated peer
    ("principals: ['*']", None, "10.0.0.1", False),
    ("notPrincipals: ['*']", None, "10.0.0.1", True),              # only plaintext peers
    ("notPrincipals: ['*']", WEB, "10.0.0.1", False),
    ("principals: ['cluster.local/ns/shop/*']", WEB, "10.0.0.1", True),
    ("principals: ['*/sa/web']", WEB, "10.0.0.1", True),
    ("principals: ['*/sa/we']", WEB, "10.0.0.1", False),
    ("principals: ['spiffe://cluster.local/ns/shop/sa/web']", WEB, "10.0.0.1", True),
    ("notPrincipals: [ns/ops/sa/admin]", WEB, "10.0.0.1", True),
    ("notPrincipals: [ns/ops/sa/admin]", ADMIN, "10.0.0.1", False),
    ("namespaces: [shop]", WEB, "10.0.0.1", True),
    ("namespaces: [shop]", None, "10.0.0.1", False),               # namespace comes from the identity
    ("namespaces: ['sh*']", WEB, "10.0.0.1", True),
    ("notNamespaces: [shop]", ADMIN, "10.0.0.1", True),
    ("notNamespaces: [shop]", None, "10.0.0.1", True),
    ("ipBlocks: [10.0.0.0/8]", WEB, "10.0.0.1", True),
    ("ipBlocks: [10.0.0.0/8]", WEB, "11.0.0.1", False),
    ("ipBlocks: [10.0.0.0/8]", WEB, None, False),                  # unknown source IP
    ("ipBlocks: ['fd00::/8']", WEB, "10.0.0.1", False),
    ("ipBlocks: ['fd00::/8']", WEB, "fd00::5", True),
    ("notIpBlocks: [10.0.0.0/8]", WEB, "11.0.0.1", True),
    ("notIpBlocks: [10.0.0.0/8]", WEB, None, True),
    # every field of one source must match
    ("principals: [ns/shop/sa/web], ipBlocks: [11.0.0.0/8]", WEB, "10.0.0.1", False),
    ("namespaces: [shop], notPrincipals: [ns/shop/sa/web]", WEB, "10.0.0.1", False),
])
def test_source_fields(source, src, ip, ok):
    assert allowed(policies(SRC % source), tcp(src=src, ip=ip)) is ok


def test_one_of_several_sources_is_enough():
    ps = policies("shop/p ALLOW\n  rules:\n  - from:\n    - source: {namespaces: [ops]}\n"
                  "    - source: {ipBlocks: [10.0.0.0/8]}\n")
    assert allowed(ps, tcp(src=ADMIN, ip="11.0.0.1"))
    assert allowed(ps, tcp(src=None, ip="10.0.0.1"))
    assert not allowed(ps, tcp(src=WEB, ip="11.0.0.1"))
    _, traces = explain(ps, tcp(src=WEB, ip="11.0.0.1"))
    assert traces[0].detail == ("from: [0] namespaces: shop is not ops; "
                                "[1] ipBlocks: 11.0.0.1 is not 10.0.0.0/8")


# -- operations ------------------------------------------------------------------------------

OP = "shop/p ALLOW\n  rules:\n  - to:\n    - operation: {%s}\n"


@pytest.mark.parametrize("op, req, ok", [
    ("ports: [8080]", tcp(8080), True),
    ("ports: [8080]", tcp(9090), False),
    ("notPorts: [22]", tcp(8080), True),
    ("notPorts: [22]", tcp(22), False),
    ("methods: [GET]", http("GET"), True),
    ("methods: [GET]", http("get"), False),                  # methods are case-sensitive
    ("methods: ['P*']", http("PUT"), True),
    ("notMethods: [DELETE]", http("DELETE"), False),
    ("paths: ['/api/*']", http(path="/api/x"), True),
    ("paths: ['/api/*']", http(path="/api"), False),
    ("paths: ['/api/*']", http(path="/API/x"), False),       # paths are case-sensitive
    ("paths: ['/health']", http(path="/health"), True),
    ("paths: ['*.json']", http(path="/a/b.json"), True),
    ("paths: ['*']", http(path="/"), True),
    ("notPaths: ['/admin*']", http(path="/admin/x"), False),
    ("notPaths: ['/admin*']", http(path="/api"), True),
    ("hosts: [API.Example.com]", http(host="api.example.com"), True),   # hosts are not
    ("hosts: ['*.example.com']", http(host="www.example.com"), True),
    ("hosts: [api.example.com]", http(host="api.example.com:8080"), False),
    ("hosts: [api.example.com]", http(host=None), False),
    ("notHosts: [evil.com]", http(host=None), True),
    ("ports: [8080], methods: [GET]", http("GET", port=8080), True),
    ("ports: [8080], methods: [GET]", http("GET", port=9090), False),
])
def test_operation_fields(op, req, ok):
    assert allowed(policies(OP % op), req) is ok


def test_from_to_and_when_must_all_match():
    ps = policies("shop/p ALLOW\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n"
                  "    to: [{operation: {ports: [8080]}}]\n"
                  "    when: [{key: source.ip, values: [10.0.0.0/8]}]\n")
    assert allowed(ps, tcp(8080, ip="10.0.0.1"))
    for req in (tcp(8080, src=ADMIN, ip="10.0.0.1"), tcp(9090, ip="10.0.0.1"), tcp(8080, ip="11.0.0.1")):
        assert not allowed(ps, req)


# -- conditions ------------------------------------------------------------------------------

WHEN = "shop/p ALLOW\n  rules:\n  - when:\n    - {%s}\n"


@pytest.mark.parametrize("cond, req, ok", [
    ("key: 'request.headers[X-Role]', values: [admin]", http(headers={"x-role": ("admin",)}), True),
    ("key: 'request.headers[X-Role]', values: [admin]", http(headers={"x-role": ("user",)}), False),
    ("key: 'request.headers[X-Role]', values: [admin]", http(), False),            # absent
    # a repeated header is matched line by line
    ("key: 'request.headers[X-Role]', values: [admin]", http(headers={"x-role": ("user", "admin")}), True),
    ("key: 'request.headers[X-Role]', notValues: [admin]", http(headers={"x-role": ("user", "admin")}), False),
    ("key: 'request.headers[X-Role]', notValues: [admin]", http(), True),
    ("key: 'request.headers[X-Role]', values: ['*']", http(headers={"x-role": ("",)}), False),  # presence: non-empty
    ("key: 'request.headers[X-Role]', values: ['*']", http(headers={"x-role": ("a",)}), True),
    ("key: 'request.headers[X-Role]', values: ['adm*'], notValues: [admin]",
     http(headers={"x-role": ("admx",)}), True),
    ("key: source.namespace, values: [shop]", tcp(), True),
    ("key: source.namespace, values: [shop]", tcp(src=None), False),
    ("key: source.principal, values: [ns/shop/sa/web]", tcp(), True),
    ("key: source.principal, notValues: ['*']", tcp(src=None), True),
    ("key: source.ip, values: [10.244.0.0/16]", tcp(), True),
    ("key: destination.port, values: ['8080']", tcp(8080), True),
    ("key: destination.port, notValues: ['8080']", tcp(8080), False),
])
def test_conditions(cond, req, ok):
    assert allowed(policies(WHEN % cond), req) is ok


# -- HTTP-only fields on a connection that is not HTTP (Istio's TCP task) -----------------------

def test_allow_rule_with_http_fields_is_ignored_on_tcp():
    ps = policies("foo/tcp ALLOW {app: backend}\n  rules:\n"
                  "  - to: [{operation: {methods: [GET], ports: ['9000']}}]\n", )
    d = evaluate(ps, tcp(9000, ns="foo"))
    assert (d.allowed, d.action) == (False, "NO_MATCH") and "ignored" in d.reason
    assert not allowed(ps, tcp(9001, ns="foo"))
    assert allowed(ps, http("GET", port=9000, ns="foo"))   # the same rule works on HTTP


def test_allow_rule_with_only_l4_fields_still_allows_tcp():
    ps = policies("foo/tcp ALLOW\n  rules:\n  - to: [{operation: {ports: ['9000', '9001']}}]\n")
    assert allowed(ps, tcp(9000, ns="foo")) and allowed(ps, tcp(9001, ns="foo"))
    assert not allowed(ps, tcp(9002, ns="foo"))


def test_deny_rule_with_only_http_fields_denies_all_tcp():
    ps = policies("foo/tcp DENY\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n")
    for port in (9000, 9001):
        d = evaluate(ps, tcp(port, ns="foo"))
        assert not d.allowed and "dropped" in d.reason
    assert allowed(ps, http("POST", port=9000, ns="foo"))


def test_deny_rule_with_http_and_port_fields_denies_that_port_on_tcp():
    ps = policies("foo/tcp DENY\n  rules:\n  - to: [{operation: {methods: [GET], ports: ['9000']}}]\n")
    assert not allowed(ps, tcp(9000, ns="foo"))
    assert allowed(ps, tcp(9001, ns="foo"))


def test_header_condition_on_tcp():
    allow = policies("foo/a ALLOW\n  rules:\n  - when: [{key: 'request.headers[x]', values: ['1']}]\n")
    deny = policies("foo/d DENY\n  rules:\n  - from: [{source: {namespaces: [ops]}}]\n"
                    "    when: [{key: 'request.headers[x]', values: ['1']}]\n")
    assert not allowed(allow, tcp(ns="foo"))
    assert not allowed(deny, tcp(src=ADMIN, ns="foo")) and allowed(deny, tcp(src=WEB, ns="foo"))


def test_audit_rule_with_http_fields_audits_tcp():
    ps = policies("foo/a AUDIT\n  rules:\n  - to: [{operation: {paths: ['/x']}}]\n")
    assert evaluate(ps, tcp(ns="foo")).audited


# -- trust domains -------------------------------------------------------------------------------

def test_istio_cluster_local_means_the_mesh_trust_domain():
    doc = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
           "metadata: {name: p, namespace: shop}\nspec:\n  rules:\n"
           "  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n")
    ps = parse_policies(doc, trust_domain="example.org")
    assert allowed(ps, tcp(src="spiffe://example.org/ns/shop/sa/web"))
    assert not allowed(ps, tcp(src="spiffe://cluster.local/ns/shop/sa/web"))
    assert not allowed(ps, tcp(src="spiffe://other.org/ns/shop/sa/web"))


def test_spiffe_form_is_literal_and_short_form_is_local():
    ps = policies("shop/p ALLOW\n  rules:\n  - from: [{source: {principals: "
                  "['spiffe://cluster.local/ns/a/sa/b', 'ns/shop/sa/web']}}]\n", trust_domain="example.org")
    assert allowed(ps, tcp(src="spiffe://cluster.local/ns/a/sa/b"))
    assert not allowed(ps, tcp(src="spiffe://example.org/ns/a/sa/b"))
    assert allowed(ps, tcp(src="spiffe://example.org/ns/shop/sa/web"))


# -- requests and decisions ---------------------------------------------------------------------

def test_request_checks_its_shape():
    with pytest.raises(ValueError):
        Request("shop", {}, 0)
    with pytest.raises(ValueError):
        Request("shop", {}, 80, method="GET")
    with pytest.raises(ValueError):
        Request("shop", {}, 80, is_http=True)
    r = Request("shop", {"a": "b"}, 80, is_http=True, method="GET", path="/", headers={"X-A": ("1",)})
    assert dict(r.headers) == {"x-a": ("1",)} and r.source_namespace is None


def test_decision_and_trace_name_the_rule():
    ps = policies("shop/p ALLOW\n  rules:\n  - to: [{operation: {ports: [1]}}]\n  - {}\n")
    d, traces = explain(ps, tcp())
    assert (d.allowed, d.action, d.policy, d.rule, d.origin) == (True, "ALLOW", "shop/p", 1, "t.yaml:8:5")
    assert [(t.rule, t.outcome) for t in traces] == [(0, "no match"), (1, "matched")]
    assert d.to_dict()["policy"] == "shop/p"


# -- compile_l4 -----------------------------------------------------------------------------------

def test_compile_l4_splits_pure_l4_rules():
    ps = policies(
        "shop/deny-ops DENY\n  rules:\n  - from: [{source: {namespaces: [ops]}}]\n",
        "shop/deny-admin DENY\n  rules:\n  - to: [{operation: {ports: [8080], paths: ['/admin*']}}]\n",
        "shop/allow-db ALLOW\n  rules:\n  - to: [{operation: {ports: [5432]}}]\n",
        "shop/allow-api ALLOW\n  rules:\n  - to: [{operation: {ports: [8080], methods: [GET]}}]\n",
        "shop/audit AUDIT\n  rules: [{}]\n")
    plan = compile_l4(ps, "shop", {})
    assert [r.ref.policy for r in plan.deny] == ["shop/deny-ops"]
    assert [r.ref.policy for r in plan.l7_deny] == ["shop/deny-admin"]
    assert [r.ref.policy for r in plan.allow] == ["shop/allow-db"]
    assert [r.ref.policy for r in plan.l7_allow] == ["shop/allow-api"]
    assert not plan.exact
    assert plan.verdict(tcp(5432, src=ADMIN)).verdict == "deny"
    assert plan.verdict(tcp(5432)).verdict == "allow"
    assert plan.verdict(tcp(8080)).verdict == "l7"
    assert plan.verdict(tcp(9999)).verdict == "deny"
    assert compile_l4(PolicySet(()), "shop", {}).verdict(tcp()).verdict == "allow"
    assert compile_l4(PolicySet(()), "shop", {}).allow is None


_PRINCIPALS = [None, WEB, ADMIN, "spiffe://cluster.local/ns/shop/sa/db"]
_pr = st.sampled_from(["ns/shop/sa/web", "ns/ops/sa/*", "*", "*/sa/db"]).map(parse_principal)
_ns = st.sampled_from(["shop", "ops", "sh*", "*"]).map(StringMatch.parse)
_nets = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]).map(ipaddress.ip_network)
_ports = st.sampled_from([80, 443, 5432])
_methods = st.sampled_from(["GET", "POST", "P*"]).map(StringMatch.parse)
_paths = st.sampled_from(["/a", "/a*", "*.json", "*"]).map(StringMatch.parse)


def _tup(s):
    return st.lists(s, max_size=2).map(tuple)


_sources = st.builds(Source, principals=_tup(_pr), not_principals=_tup(_pr), namespaces=_tup(_ns),
                     not_namespaces=_tup(_ns), ip_blocks=_tup(_nets), not_ip_blocks=_tup(_nets))
_ops = st.builds(Operation, ports=_tup(_ports), not_ports=_tup(_ports), methods=_tup(_methods),
                 not_methods=_tup(_methods), paths=_tup(_paths))
_conds = st.one_of(
    st.builds(Condition, st.just(ConditionKey.REQUEST_HEADER), st.just("x"),
              _tup(st.sampled_from(["1", "2*"]).map(StringMatch.parse)),
              _tup(st.sampled_from(["1", "*"]).map(StringMatch.parse))),
    st.builds(Condition, st.just(ConditionKey.DESTINATION_PORT), st.none(), _tup(_ports), _tup(_ports)),
    st.builds(Condition, st.just(ConditionKey.SOURCE_IP), st.none(), _tup(_nets), _tup(_nets)),
)
_rules = st.builds(Rule, _tup(_sources), _tup(_ops), _tup(_conds))
_policies = st.lists(st.builds(
    Policy, name=st.sampled_from(["a", "b", "c", "d"]), namespace=st.just("shop"),
    action=st.sampled_from(list(Action)), selector=st.just(()),
    rules=st.lists(_rules, max_size=3).map(tuple)), max_size=4, unique_by=lambda p: p.name)
_requests = st.builds(
    lambda principal, ip, port, is_http, method, path, hdr: Request(
        "shop", {}, port, parse_spiffe_id(principal) if principal else None,
        ipaddress.ip_address(ip) if ip else None, is_http,
        method if is_http else None, path if is_http else None, None,
        ({"x": hdr} if hdr else {}) if is_http else {}),
    st.sampled_from(_PRINCIPALS), st.sampled_from([None, "10.1.2.3", "10.9.9.9", "11.0.0.1", "fd00::1"]),
    _ports, st.booleans(), st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(["/a", "/a/b.json", "/b"]), st.lists(st.sampled_from(["1", "22", ""]), max_size=2).map(tuple))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _requests)
def test_compile_l4_never_contradicts_evaluate(pols, req):
    ps = PolicySet(tuple(sorted(pols, key=lambda p: p.name)))
    plan = compile_l4(ps, "shop", {})
    v = plan.verdict(req)
    if plan.exact:
        assert v.verdict != "l7"
    if v.verdict == "l7":
        return
    assert evaluate(ps, req).allowed is (v.verdict == "allow")
    # the verdict looks at L4 only, so it must also hold for the same connection as plain TCP
    as_tcp = Request("shop", {}, req.destination_port, req.source_principal, req.source_ip)
    assert evaluate(ps, as_tcp).allowed is (v.verdict == "allow")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _requests)
def test_evaluate_gives_exactly_the_decision_explain_gives(pols, req):
    """evaluate() is the per-request fast path; explain() the reference."""
    ps = PolicySet(tuple(sorted(pols, key=lambda p: p.name)))
    assert evaluate(ps, req) == explain(ps, req)[0]
    as_tcp = Request("shop", {}, req.destination_port, req.source_principal, req.source_ip)
    assert evaluate(ps, as_tcp) == explain(ps, as_tcp)[0]
