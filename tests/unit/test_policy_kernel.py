"""agent/policy/kernel.py: which connections the kernel may refuse at
connect() time.  Table tests for the entries, and a Hypothesis property over
random policy sets: whatever the kernel refuses, evaluate() refuses too (as
TCP and as any HTTP request), and where no HTTP rule applies the kernel
decides exactly what evaluate() decides."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.identity.spiffe import workload_id as spiffe_id
from agent.policy.evaluate import Request, compile_l4, evaluate
from agent.policy.kernel import (
    L4_DENY, L4_PASS, NO_POLICY_ID, KernelDestination, KernelSource, compile_kernel, policy_id,
    view_from_pods,
)
from agent.policy.load import parse_policies, parse_principal
from agent.policy.model import (
    Action, Condition, ConditionKey, Operation, Policy, PolicySet, Rule, Source, StringMatch,
)

TD = "cluster.local"


def pod(name, node="node1", ns="default", ips=None, mesh=True, labels=None, sa=None):
    n = int(name.rsplit("-", 1)[-1]) if name[-1].isdigit() else 9
    return SimpleNamespace(
        name=name, key=f"{ns}/{name}", namespace=ns, service_account=sa or name,
        labels=labels if labels is not None else {"app": name}, node=node, mesh=mesh,
        ips=ips if ips is not None else (ipaddress.ip_address(f"10.244.1.{n}"),
                                         ipaddress.ip_address(f"fd00:244:1::{n}")))


A, B, C = pod("a-1"), pod("b-2", node="node2"), pod("c-3")
OUT = pod("x-4", mesh=False)          # not in the mesh
NEW = pod("n-5")                       # on this node, not enrolled (no cgroup yet)
PODS = [A, B, C, OUT, NEW]
ENROLLED = {A.key: 101, C.key: 103}


def ps(text: str) -> PolicySet:
    docs = []
    for d in text.strip().split("\n---\n"):
        head, _, body = d.partition("\n")
        name, action, sel = head.split(maxsplit=2)
        docs.append(f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
                    f"metadata: {{name: {name}, namespace: default}}\nspec:\n  action: {action}\n"
                    f"  selector: {{matchLabels: {sel}}}\n{body}\n")
    return parse_policies("---\n".join(docs), "t.yaml", trust_domain=TD)


def compiled(policies: PolicySet, capacity: int = 1000):
    srcs, dsts = view_from_pods(PODS, "node1", TD, ENROLLED)
    return compile_kernel(policies, srcs, dsts, capacity)


def by_dst(plan, dst=B) -> dict:
    ips = {str(ip) for ip in dst.ips}
    return {k: v for k, v in plan.entries.items() if k[1] in ips}


def kernel_refuses(entries, wid, ip, port) -> bool:
    """What connect4/6 do: the exact port, else port 0; DENY refuses."""
    v = entries.get((wid, ip, port))
    if v is None:
        v = entries.get((wid, ip, 0))
    return v is not None and v[0] == L4_DENY


B4, B6 = str(B.ips[0]), str(B.ips[1])


def test_view_only_enrolled_mesh_pods_are_sources_and_only_mesh_pods_destinations():
    srcs, dsts = view_from_pods(PODS, "node1", TD, ENROLLED)
    assert sorted(s.key for s in srcs) == [A.key, C.key]
    assert {s.workload_id for s in srcs} == {101, 103}
    assert srcs[0].principal == spiffe_id(TD, "default", "a-1")
    assert sorted(d.key for d in dsts) == sorted(p.key for p in (A, B, C, NEW))


def test_no_policies_no_entries():
    plan = compiled(PolicySet(()))
    assert plan.entries == {} and not plan.overflow


def test_deny_by_principal_any_port_both_families():
    plan = compiled(ps("deny-a DENY {app: b-2}\n  rules:\n  - from: [{source: {principals: [ns/default/sa/a-1]}}]"))
    pid = policy_id("default/deny-a")
    assert by_dst(plan) == {(101, B4, 0): (L4_DENY, pid), (101, B6, 0): (L4_DENY, pid)}
    assert plan.policies == {pid: "default/deny-a"}
    assert len(plan.entries) == 2  # nothing for other destinations or for c-3


def test_deny_by_namespace():
    plan = compiled(ps("deny-ns DENY {app: b-2}\n  rules:\n  - from: [{source: {namespaces: [default]}}]"))
    assert set(by_dst(plan)) == {(w, ip, 0) for w in (101, 103) for ip in (B4, B6)}
    plan = compiled(ps("deny-ns DENY {app: b-2}\n  rules:\n  - from: [{source: {notNamespaces: [default]}}]"))
    assert plan.entries == {}


def test_deny_by_port_only_that_port():
    plan = compiled(ps("deny-7002 DENY {app: b-2}\n  rules:\n  - to: [{operation: {ports: ['7002']}}]"))
    pid = policy_id("default/deny-7002")
    assert set(by_dst(plan).values()) == {(L4_DENY, pid)}
    assert set(by_dst(plan)) == {(w, ip, 7002) for w in (101, 103) for ip in (B4, B6)}
    assert not kernel_refuses(plan.entries, 101, B4, 7001)
    assert kernel_refuses(plan.entries, 101, B4, 7002)


def test_deny_not_ports_refuses_every_other_port():
    plan = compiled(ps("deny-not DENY {app: b-2}\n  rules:\n  - to: [{operation: {notPorts: ['7001']}}]"))
    e = by_dst(plan)
    assert e[(101, B4, 0)][0] == L4_DENY and e[(101, B4, 7001)] == (L4_PASS, NO_POLICY_ID)
    assert not kernel_refuses(plan.entries, 101, B4, 7001)
    assert kernel_refuses(plan.entries, 101, B4, 7002) and kernel_refuses(plan.entries, 101, B4, 22)


def test_default_deny_allow_policy():
    plan = compiled(ps(
        "allow-a ALLOW {app: b-2}\n  rules:\n  - from: [{source: {principals: [ns/default/sa/a-1]}}]\n"
        "    to: [{operation: {ports: ['7001']}}]"))
    e = by_dst(plan)
    # a-1: allowed on 7001 (the proxy decides it), refused elsewhere; c-3: refused everywhere
    assert e[(101, B4, 0)] == (L4_DENY, NO_POLICY_ID)
    assert e[(101, B4, 7001)] == (L4_PASS, NO_POLICY_ID)
    assert e[(103, B4, 0)] == (L4_DENY, NO_POLICY_ID) and (103, B4, 7001) not in e
    assert not kernel_refuses(plan.entries, 101, B4, 7001)
    assert kernel_refuses(plan.entries, 101, B4, 7002)
    assert kernel_refuses(plan.entries, 103, B4, 7001)


def test_allow_nothing_refuses_everyone_and_allow_all_nothing():
    plan = compiled(ps("nothing ALLOW {app: b-2}\n  rules: []"))
    assert set(by_dst(plan)) == {(w, ip, 0) for w in (101, 103) for ip in (B4, B6)}
    plan = compiled(ps("nothing ALLOW {app: b-2}\n  rules: []\n---\nall ALLOW {app: b-2}\n  rules: [{}]"))
    assert plan.entries == {}


def test_deny_wins_with_its_own_attribution():
    plan = compiled(ps(
        "allow-a ALLOW {app: b-2}\n  rules:\n  - from: [{source: {principals: [ns/default/sa/a-1]}}]\n"
        "---\ndeny-7002 DENY {app: b-2}\n  rules:\n  - to: [{operation: {ports: ['7002']}}]"))
    e = by_dst(plan)
    assert e[(101, B4, 7002)] == (L4_DENY, policy_id("default/deny-7002"))
    assert (101, B4, 0) not in e                      # a-1 is allowed elsewhere
    assert e[(103, B4, 0)] == (L4_DENY, NO_POLICY_ID)  # c-3 matches no ALLOW
    assert e[(103, B4, 7002)] == (L4_DENY, policy_id("default/deny-7002"))


def test_l7_allow_rule_keeps_its_sources_out_of_the_kernel():
    # a-1 may be allowed for GET: only the proxy can tell.  c-3 can never be
    # allowed (the rule's L4 part names a-1), so the kernel may refuse it.
    plan = compiled(ps(
        "allow-get ALLOW {app: b-2}\n  rules:\n  - from: [{source: {principals: [ns/default/sa/a-1]}}]\n"
        "    to: [{operation: {methods: [GET]}}]"))
    e = by_dst(plan)
    assert not any(k[0] == 101 for k in e)
    assert e[(103, B4, 0)] == (L4_DENY, NO_POLICY_ID)
    # an HTTP-only ALLOW that anyone may match: nothing at all
    plan = compiled(ps("allow-get ALLOW {app: b-2}\n  rules:\n  - to: [{operation: {methods: [GET]}}]"))
    assert plan.entries == {}
    plan = compiled(ps("allow-hdr ALLOW {app: b-2}\n  rules:\n"
                       "  - when: [{key: 'request.headers[x-user]', values: [admin]}]"))
    assert plan.entries == {}


def test_l7_deny_rule_is_left_to_the_proxy():
    # On TCP the proxy refuses every connection (HTTP fields dropped, denies more),
    # but an HTTP request to another path is allowed: the kernel must not refuse.
    policies = ps("deny-admin DENY {app: b-2}\n  rules:\n  - to: [{operation: {paths: ['/admin*']}}]")
    assert not evaluate(policies, Request("default", {"app": "b-2"}, 7001,
                                          spiffe_id(TD, "default", "a-1"))).allowed
    assert compiled(policies).entries == {}


def test_ip_blocks_decide_per_family():
    plan = compiled(ps("deny-net DENY {app: b-2}\n  rules:\n  - from: [{source: {ipBlocks: [10.244.1.0/24]}}]"))
    e = by_dst(plan)
    assert set(e) == {(101, B4, 0), (103, B4, 0)}  # IPv6 sources are outside the block


def test_source_without_an_address_of_the_family_gets_nothing():
    v4only = pod("v-6", ips=(ipaddress.ip_address("10.244.1.6"),))
    srcs, dsts = view_from_pods([v4only, B], "node1", TD, {v4only.key: 106})
    plan = compile_kernel(ps("deny-all DENY {app: b-2}\n  rules: [{}]"), srcs, dsts, 100)
    assert set(plan.entries) == {(106, B4, 0)}


def test_audit_only_and_other_workloads_get_nothing():
    plan = compiled(ps("audit AUDIT {app: b-2}\n  rules: [{}]"))
    assert plan.entries == {}
    plan = compiled(ps("deny-all DENY {app: nobody}\n  rules: [{}]"))
    assert plan.entries == {}


def test_plaintext_and_unknown_sources_and_non_mesh_destinations_get_nothing():
    plan = compiled(ps("deny-all DENY {}\n  rules: [{}]"))
    wids = {k[0] for k in plan.entries}
    assert wids == {101, 103}   # n-5 (not enrolled) and x-4 (not in the mesh) never
    dst_ips = {k[1] for k in plan.entries}
    assert not dst_ips & {str(ip) for ip in OUT.ips}   # the proxy never sees x-4's traffic


def test_overflow_emits_nothing_and_says_so():
    policies = ps("deny-all DENY {}\n  rules: [{}]")
    full = compiled(policies)
    assert len(full.entries) == 16  # 2 sources x 4 mesh pods x 2 families
    plan = compiled(policies, capacity=15)
    assert plan.overflow and plan.entries == {}
    s = plan.summary()
    assert s["overflow"] and s["entries"] == 0 and "proxy decides" in s["reason"]
    assert not compiled(policies, capacity=16).overflow


def test_policy_ids_are_stable_and_never_zero():
    assert policy_id("default/a") == policy_id("default/a") != policy_id("default/b")
    assert policy_id("default/a") != NO_POLICY_ID


# -- the property ---------------------------------------------------------------------

_pr = st.sampled_from(["ns/shop/sa/web", "ns/ops/sa/*", "*", "*/sa/db"]).map(parse_principal)
_ns = st.sampled_from(["shop", "ops", "sh*", "*"]).map(StringMatch.parse)
_nets = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]).map(ipaddress.ip_network)
_ports = st.sampled_from([80, 443, 5432])
_methods = st.sampled_from(["GET", "POST"]).map(StringMatch.parse)
_paths = st.sampled_from(["/a", "/a*"]).map(StringMatch.parse)


def _tup(s):
    return st.lists(s, max_size=2).map(tuple)


_sources = st.builds(Source, principals=_tup(_pr), not_principals=_tup(_pr), namespaces=_tup(_ns),
                     not_namespaces=_tup(_ns), ip_blocks=_tup(_nets), not_ip_blocks=_tup(_nets))
_ops = st.builds(Operation, ports=_tup(_ports), not_ports=_tup(_ports), methods=_tup(_methods),
                 not_methods=_tup(_methods), paths=_tup(_paths))
_conds = st.one_of(
    st.builds(Condition, st.just(ConditionKey.REQUEST_HEADER), st.just("x"),
              _tup(st.sampled_from(["1", "2*"]).map(StringMatch.parse)), st.just(())),
    st.builds(Condition, st.just(ConditionKey.DESTINATION_PORT), st.none(), _tup(_ports), _tup(_ports)),
    st.builds(Condition, st.just(ConditionKey.SOURCE_IP), st.none(), _tup(_nets), _tup(_nets)),
    st.builds(Condition, st.just(ConditionKey.SOURCE_NAMESPACE), st.none(), _tup(_ns), _tup(_ns)),
)
_rules = st.builds(Rule, _tup(_sources), _tup(_ops), _tup(_conds))
_policies = st.lists(st.builds(
    Policy, name=st.sampled_from(["a", "b", "c", "d"]), namespace=st.just("shop"),
    action=st.sampled_from(list(Action)),
    selector=st.sampled_from([(), (("app", "db"),), (("app", "web"),)]),
    rules=st.lists(_rules, max_size=3).map(tuple)), max_size=4, unique_by=lambda p: p.name)

_SRCS = [
    KernelSource("shop/web", 1, spiffe_id(TD, "shop", "web"),
                 (ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::3"))),
    KernelSource("ops/admin", 2, spiffe_id(TD, "ops", "admin"), (ipaddress.ip_address("11.0.0.1"),)),
    KernelSource("shop/db-client", 3, spiffe_id(TD, "shop", "db"), (ipaddress.ip_address("10.9.9.9"),)),
]
_DSTS = [
    KernelDestination("shop/db", "shop", {"app": "db"},
                      (ipaddress.ip_address("10.2.0.1"), ipaddress.ip_address("fd00::21"))),
    KernelDestination("shop/web", "shop", {"app": "web"}, (ipaddress.ip_address("10.2.0.2"),)),
]
_PROBE_PORTS = (80, 443, 5432, 1, 8080)
_HTTP = [("GET", "/a", {}), ("POST", "/b", {"x": ("1",)}), ("PUT", "/a/x", {"x": ("22",)})]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies)
def test_kernel_never_refuses_what_the_proxy_allows(pols):
    policies = PolicySet(tuple(sorted(pols, key=lambda p: p.name)), trust_domain=TD)
    plan = compile_kernel(policies, _SRCS, _DSTS, 10_000)
    assert not plan.overflow
    for src in _SRCS:
        for dst in _DSTS:
            exact = compile_l4(policies, dst.namespace, dst.labels).exact
            for dip in dst.ips:
                sip = next((ip for ip in src.ips if ip.version == dip.version), None)
                for port in _PROBE_PORTS:
                    refused = kernel_refuses(plan.entries, src.workload_id, str(dip), port)
                    if sip is None:
                        assert not refused
                        continue
                    tcp = Request(dst.namespace, dst.labels, port, src.principal, sip)
                    tcp_allowed = evaluate(policies, tcp).allowed
                    if refused:
                        assert not tcp_allowed, (src.key, dst.key, port)
                        for method, path, headers in _HTTP:
                            req = Request(dst.namespace, dst.labels, port, src.principal, sip, True,
                                          method, path, None, headers)
                            assert not evaluate(policies, req).allowed, (src.key, dst.key, port, method)
                    elif exact:
                        # no HTTP rule applies: the kernel decides exactly like the proxy
                        assert tcp_allowed, (src.key, dst.key, port)
