"""The speed-ups of a large policy apply (issue #12 item 5) keep their
guarantees:

- the version (a hash of the meaning, computed by a type-dispatched walk)
  changes when and only when what the policies mean changes;
- a bad document in a 10,000-rule file changes nothing (file:line names
  it, the previous set and files stay), and the garbage collector, paused
  while a set is built, runs again afterwards, on success and on error;
- the apply says where its time went (per stage, wall and CPU), and so does
  a worker's last load."""

from __future__ import annotations

import dataclasses
import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import yamlsrc
from agent.policy.load import parse_policies, policy_set
from agent.policy.model import Action, MatchKind, Operation, Policy, Rule, Source, StringMatch
from agent.policy.store import COMPILED_FILE, STORE_FILE, PolicyStore
from agent.proxy.authz import PolicyWatcher
from agent.traffic.trafficpolicy import TRAFFIC_KIND
from tests.unit.test_policy_index import _policies


def _version(pols) -> str:
    return policy_set(list(pols), "cluster.local", "istio-system").version


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _policies, st.randoms(use_true_random=False))
def test_the_version_changes_when_and_only_when_the_meaning_does(a, b, rnd):
    # b: a with some of its policies replaced by others of the same namespace/name
    # (often equal in meaning, often not)
    swap = {(p.namespace, p.name): p for p in b}
    mixed = [swap.get((p.namespace, p.name), p) if rnd.random() < 0.5 else p for p in a]
    same = tuple(sorted(a, key=lambda p: (p.namespace, p.name))) == tuple(
        sorted(mixed, key=lambda p: (p.namespace, p.name))
    )
    assert (_version(a) == _version(mixed)) == same
    # what is not meaning leaves it alone: order, origins, apiVersion, principals as written
    renamed = [
        dataclasses.replace(
            p,
            origin="elsewhere.yaml:9:9",
            api_version="security.istio.io/v1",
            rules=tuple(dataclasses.replace(r, origin="x:1:1") for r in p.rules),
        )
        for p in reversed(a)
    ]
    assert _version(renamed) == _version(a)


def _op(**kw) -> Policy:
    rule = Rule(operations=(Operation(**kw),))
    return Policy("p", "shop", Action.DENY, (), (rule,))


def test_fields_are_told_apart_and_empty_means_absent():
    m = (StringMatch(MatchKind.PREFIX, "/a"),)
    assert _version([_op(paths=m)]) != _version([_op(not_paths=m)])
    assert _version([_op(ports=(80,))]) != _version([_op(not_ports=(80,))])
    assert _version([_op(methods=(StringMatch(MatchKind.EXACT, "80"),))]) != _version([_op(ports=(80,))])
    assert _version([_op(paths=m, hosts=())]) == _version([_op(paths=m)])
    # "from: [{}]" (one source that matches all) is not "no from"
    with_source = Policy("p", "shop", Action.DENY, (), (Rule(sources=(Source(),)),))
    assert _version([with_source]) != _version([Policy("p", "shop", Action.DENY, (), (Rule(),))])
    assert len({_version([]), _version([_op()]), _version([_op(ports=(80,))])}) == 3


def test_reformatting_and_short_principals_keep_the_version():
    block = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: shop
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [ns/shop/sa/web]
    to:
    - operation:
        methods: [GET]
        ports: ["8080"]
"""
    flow = (
        "# the same, written otherwise\n"
        "kind: AuthorizationPolicy\napiVersion: meshlet.io/v1alpha1\n"
        "metadata: {namespace: shop, name: p}\n"
        "spec: {rules: [{to: [{operation: {ports: ['8080'], methods: [GET]}}],"
        " from: [{source: {principals: ['cluster.local/ns/shop/sa/web']}}]}], action: ALLOW}\n"
    )
    assert parse_policies(block, "a.yaml").version == parse_policies(flow, "b.yaml").version
    assert parse_policies(block).version != parse_policies(block.replace("GET", "PUT")).version


def _big(n_rules: int, bad_at: int | None = None) -> str:
    docs = []
    for p in range(0, n_rules, 100):
        lines = [
            "apiVersion: security.istio.io/v1",
            "kind: AuthorizationPolicy",
            f"metadata: {{name: allow-{p}, namespace: shop}}",
            "spec:",
            "  selector: {matchLabels: {app: backend}}",
            "  rules:",
        ]
        for i in range(p, min(p + 100, n_rules)):
            port = "80800" if i == bad_at else "8080"
            lines += [
                f"  - from: [{{source: {{principals: ['cluster.local/ns/shop/sa/c-{i}']}}}}]",
                f"    to: [{{operation: {{methods: [GET], paths: ['/s-{i}/*'], ports: ['{port}']}}}}]",
            ]
        docs.append("\n".join(lines) + "\n")
    return "---\n".join(docs)


def test_a_bad_rule_in_a_10k_file_changes_nothing(tmp_path):
    store = PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load()
    store.apply([("small.yaml", _big(200))])

    def state():
        return store.version, (tmp_path / STORE_FILE).read_bytes(), (tmp_path / COMPILED_FILE).read_bytes()

    before = state()
    text = _big(10_000, bad_at=9_999)
    with pytest.raises(yamlsrc.SourceError) as e:
        store.apply([("big.yaml", text)])
    (p,) = e.value.errors
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if "'80800'" in ln)
    assert (p.file, p.line) == ("big.yaml", line) and "80800" in p.message
    assert state() == before
    assert len(store.policyset) == 2
    assert gc.isenabled()  # paused while building, back on after the error
    store.apply([("big.yaml", _big(10_000))])
    assert len(store.policyset) == 100 and store.version != before[0]
    assert gc.isenabled()
    assert set(store.timings) == {"parse", "plan", "compile", "write"}
    assert all(t["ms"] >= 0 and t["cpu_ms"] >= 0 for t in store.timings.values())
    # a worker loads it, and says what its load took
    w = PolicyWatcher(str(tmp_path / COMPILED_FILE), lambda: [("shop", {"app": "backend"})])
    assert w.current == store.policyset and set(w.last_load) == {"ms", "cpu_ms"}
    assert gc.isenabled()
