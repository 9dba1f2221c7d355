"""agent/policy/index.py: the per-workload rule index evaluate() uses.

The index may only leave out rules that cannot match: evaluate() must give
exactly explain()'s decision (which walks every rule) over random sets with
many rules sharing and not sharing keys, selectors and the root namespace.
And it must leave out the unrelated rules, which is why it exists."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, evaluate, explain, workload_index
from agent.policy.index import build_workload_index
from agent.policy.load import parse_policies, parse_principal
from agent.policy.model import (
    Action, Condition, ConditionKey, Operation, Policy, PolicySet, Rule, Source, StringMatch,
)

_pr = st.sampled_from(["ns/shop/sa/web", "ns/shop/sa/w*", "ns/ops/sa/*", "ns/ops/sa/admin", "*",
                       "*/sa/web"]).map(parse_principal)
_ns = st.sampled_from(["shop", "ops", "sh*", "o*", "*", "*p"]).map(StringMatch.parse)
_ports = st.sampled_from([80, 443, 8080])
_methods = st.sampled_from(["GET", "POST", "G*", "*"]).map(StringMatch.parse)
_paths = st.sampled_from(["/a", "/a*", "/a/b", "/a/b*", "/", "/*", "*.json", "*", "/b*"]).map(StringMatch.parse)
_hosts = st.sampled_from(["web", "*.shop", "WEB*"]).map(lambda s: StringMatch.parse(s, ignore_case=True))
_nets = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16"]).map(ipaddress.ip_network)


def _tup(s, n=2):
    return st.lists(s, max_size=n).map(tuple)


_sources = st.builds(Source, principals=_tup(_pr), not_principals=_tup(_pr, 1), namespaces=_tup(_ns),
                     not_namespaces=_tup(_ns, 1), ip_blocks=_tup(_nets, 1))
_ops = st.builds(Operation, ports=_tup(_ports), not_ports=_tup(_ports, 1), methods=_tup(_methods),
                 not_methods=_tup(_methods, 1), paths=_tup(_paths, 3), not_paths=_tup(_paths, 1),
                 hosts=_tup(_hosts, 1))
_conds = st.one_of(
    st.builds(Condition, st.just(ConditionKey.REQUEST_HEADER), st.just("x"),
              _tup(st.sampled_from(["1", "2*"]).map(StringMatch.parse))),
    st.builds(Condition, st.just(ConditionKey.DESTINATION_PORT), st.none(), _tup(_ports), _tup(_ports)),
    st.builds(Condition, st.just(ConditionKey.SOURCE_NAMESPACE), st.none(), _tup(_ns), _tup(_ns)),
)
_rules = st.builds(Rule, _tup(_sources, 3), _tup(_ops, 3), _tup(_conds, 1))
_policies = st.lists(st.builds(
    Policy, name=st.sampled_from("abcdefgh"), namespace=st.sampled_from(["shop", "istio-system", "ops"]),
    action=st.sampled_from(list(Action)),
    selector=st.sampled_from([(), (("app", "web"),), (("app", "db"),)]),
    rules=st.lists(_rules, max_size=8).map(tuple)), max_size=8, unique_by=lambda p: (p.namespace, p.name))

_PRINCIPALS = [None, "spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/w",
               "spiffe://cluster.local/ns/ops/sa/admin", "spiffe://example.org/ns/shop/sa/web"]
_requests = st.builds(
    lambda principal, ip, port, is_http, method, path, host, hdr, labels: Request(
        "shop", labels, port, parse_spiffe_id(principal) if principal else None,
        ipaddress.ip_address(ip) if ip else None, is_http,
        method if is_http else None, path if is_http else None, host if is_http else None,
        ({"x": hdr} if hdr else {}) if is_http else {}),
    st.sampled_from(_PRINCIPALS), st.sampled_from([None, "10.1.2.3", "11.0.0.1"]), _ports, st.booleans(),
    st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(["/", "/a", "/a/b", "/a/bc", "/ab", "/b/x.json"]),
    st.sampled_from([None, "web", "a.shop"]), st.lists(st.sampled_from(["1", "22"]), max_size=2).map(tuple),
    st.sampled_from([{}, {"app": "web"}, {"app": "db", "v": "1"}]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _requests)
def test_indexed_evaluate_is_exactly_explain(pols, req):
    ps = PolicySet(tuple(sorted(pols, key=lambda p: (p.namespace, p.name))))
    assert evaluate(ps, req) == explain(ps, req)[0]
    as_tcp = Request("shop", req.destination_labels, req.destination_port, req.source_principal,
                     req.source_ip)
    assert evaluate(ps, as_tcp) == explain(ps, as_tcp)[0]


def _many(n: int) -> PolicySet:
    """n ALLOW rules for n different paths, principals and ports (one policy),
    plus one DENY rule."""
    rules = "".join(
        f"  - from: [{{source: {{principals: [ns/shop/sa/c{i}]}}}}]\n"
        f"    to: [{{operation: {{methods: [GET], paths: ['/svc-{i}/*'], ports: ['{8000 + i % 50}']}}}}]\n"
        for i in range(n)
    )
    return parse_policies(
        "apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: allow, namespace: shop}\nspec:\n  rules:\n" + rules +
        "---\napiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny, namespace: shop}\nspec:\n  action: DENY\n  rules:\n"
        "  - to: [{operation: {paths: ['/admin*']}}]\n")


def test_a_request_looks_only_at_rules_that_share_its_keys():
    ps = _many(2000)
    wi = workload_index(ps, "shop", {})
    allow = wi.http[Action.ALLOW]
    assert len(allow.entries) == 2000
    principal = "cluster.local/ns/shop/sa/c77"
    cands = list(allow.candidates(8027, principal, "shop", "GET", "/svc-77/x"))
    assert [e.index for e in cands] == [77]
    assert list(allow.candidates(8027, principal, "shop", "GET", "/other")) == []
    req = Request("shop", {}, 8027, parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/c77"), None, True,
                  "GET", "/svc-77/x", None, {})
    d = evaluate(ps, req)
    assert (d.allowed, d.policy, d.rule) == (True, "shop/allow", 77)
    assert evaluate(ps, Request("shop", {}, 8027, req.source_principal, None, True, "GET", "/admin/x",
                                None, {})).policy == "shop/deny"
    # the index is built once per workload and kept on the set
    assert workload_index(ps, "shop", {}) is wi


def test_rules_without_keys_are_always_candidates_in_order():
    ps = parse_policies(
        "apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\nspec:\n  rules:\n"
        "  - to: [{operation: {paths: ['/a']}}]\n"
        "  - to: [{operation: {paths: ['*.json']}}]\n"       # a suffix: no key
        "  - to: [{operation: {paths: ['/a*']}}, {operation: {methods: [GET]}}]\n"  # no shared dimension
        "  - from: [{source: {namespaces: [shop]}}]\n")
    wi = build_workload_index(ps.selecting("shop", {}))
    idx = wi.http[Action.ALLOW]
    assert [e.index for e in idx.candidates(80, None, None, "POST", "/zz")] == [1, 2]
    assert [e.index for e in idx.candidates(80, None, "shop", "POST", "/a")] == [0, 1, 2, 3]
    # not HTTP: ALLOW rules with HTTP fields are left out of the TCP index
    assert [e.index for e in wi.tcp[Action.ALLOW].candidates(80, None, "shop")] == [3]
    assert wi.ignored_on_tcp == 3 and wi.has_l7 and not wi.audit_l7


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _requests)
def test_the_kernel_plans_index_gives_the_verdicts_of_the_walk(pols, req):
    """compile_l4's plan looks long rule lists up through a RuleIndex (the
    kernel compile asks it per source, destination and port): same verdicts,
    same deciding rules, as walking every rule."""
    from unittest import mock

    from agent.policy import evaluate as ev

    ps = PolicySet(tuple(sorted(pols, key=lambda p: (p.namespace, p.name))))
    conn = Request("shop", req.destination_labels, req.destination_port, req.source_principal, req.source_ip)
    with mock.patch.object(ev, "_L4_INDEX_MIN", 0):
        indexed = ev.compile_l4(ps, "shop", req.destination_labels).verdict(conn)
    with mock.patch.object(ev, "_L4_INDEX_MIN", 10**9):
        walked = ev.compile_l4(ps, "shop", req.destination_labels).verdict(conn)
    assert indexed == walked
