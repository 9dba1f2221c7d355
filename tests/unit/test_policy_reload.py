"""Large policy sets without stalls (issue #12 item 5), the pure and
in-process parts:

- the compiled data in policies.json rebuilds exactly the set the agent
  validated (agent/policy/compiled.py), checked by its version, so a proxy
  worker never parses the YAML again;
- the store reads each applied text once (no re-validation of the merged
  store, no re-reading of what it just wrote);
- a worker loads a new set in a thread: its event loop keeps running
  while the load is under way, and the set is swapped in one step."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import yamlsrc
from agent.policy import load as policy_load
from agent.policy.compiled import CompiledError, from_data, policies_to_data
from agent.policy.load import load_policies, parse_policies, policy_set
from agent.policy.model import PolicySet
from agent.policy.store import COMPILED_FILE, PolicyStore
from agent.proxy.authz import PolicyFileError, PolicyWatcher, load_policy_file
from agent.proxy.watch import FileWatcher
from agent.traffic.trafficpolicy import TRAFFIC_KIND
from tests.support.aio import run
from tests.unit.test_policy_index import _policies

REPO_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "policies"


def _roundtrip(ps: PolicySet) -> PolicySet:
    data = json.loads(json.dumps(policies_to_data(ps.policies, ps.authentications)))
    return from_data(data, trust_domain=ps.trust_domain, root_namespace=ps.root_namespace, version=ps.version)


def test_compiled_data_rebuilds_the_repo_policies_exactly():
    ps = load_policies(REPO_POLICIES)
    got = _roundtrip(ps)
    assert got == ps and got.version == ps.version
    # what equality ignores is kept too: origins, principals as written, apiVersion
    for a, b in zip(ps.policies, got.policies, strict=True):
        assert (a.origin, a.api_version) == (b.origin, b.api_version)
        assert [r.origin for r in a.rules] == [r.origin for r in b.rules]
        assert [str(p) for r in a.rules for s in r.sources for p in s.principals] == [
            str(p) for r in b.rules for s in r.sources for p in s.principals
        ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies)
def test_compiled_data_rebuilds_random_sets(pols):
    ps = policy_set(pols, "cluster.local", "istio-system")
    assert _roundtrip(ps) == ps


def test_compiled_data_that_means_something_else_is_refused():
    ps = load_policies(REPO_POLICIES)
    data = policies_to_data(ps.policies)
    text = json.dumps(data)
    assert '"ports": [8080]' in text
    tampered = json.loads(text.replace('"ports": [8080]', '"ports": [8081]', 1))
    with pytest.raises(CompiledError, match="version"):
        from_data(tampered, trust_domain=ps.trust_domain, root_namespace=ps.root_namespace,
                  version=ps.version, where="policies.json")
    with pytest.raises(CompiledError, match="not a compiled policy set"):
        from_data([{"name": "x"}], trust_domain="cluster.local", root_namespace="istio-system",
                  version=ps.version)


def _store(tmp_path) -> PolicyStore:
    return PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load()


def _sources() -> list[tuple[str, str]]:
    return [(str(f), f.read_text()) for f in sorted(REPO_POLICIES.glob("*.yaml"))]


def test_the_proxy_rebuilds_from_the_compiled_data_not_the_yaml(tmp_path):
    s = _store(tmp_path)
    s.apply(_sources())
    path = tmp_path / COMPILED_FILE
    doc = json.loads(path.read_text())
    assert doc["compiledFormat"] == 1
    # without the YAML (which the worker no longer parses) it loads the same set
    path.write_text(json.dumps({**doc, "yaml": "{not: [yaml"}))
    assert load_policy_file(str(path)) == s.policyset
    # a file from an older agent (no compiled data) still loads, from the YAML
    old = {k: v for k, v in doc.items() if k not in ("compiledFormat", "policies")}
    path.write_text(json.dumps(old))
    assert load_policy_file(str(path)).version == s.policyset.version
    # compiled data that does not match its version: refused, the worker keeps its set
    bad = json.loads(json.dumps(doc).replace('"action": "DENY"', '"action": "ALLOW"', 1))
    path.write_text(json.dumps(bad))
    with pytest.raises(PolicyFileError, match="version"):
        load_policy_file(str(path))


def test_apply_reads_each_text_once(tmp_path, monkeypatch):
    composed: list[str] = []
    real = yamlsrc.compose_all

    def counting(text, filename):
        composed.append(filename)
        return real(text, filename)

    monkeypatch.setattr(policy_load.y, "compose_all", counting)
    s = _store(tmp_path)
    sources = _sources()
    s.apply(sources)
    assert sorted(composed) == sorted(f for f, _ in sources)  # not the merged store again
    extra = parse_policies_doc("extra")
    composed.clear()
    s.apply([("more.yaml", extra)])
    assert composed == ["more.yaml"]  # the 'stored' policies are not read again either
    # and the result is what reading everything again gives
    assert s.policyset == PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load().policyset
    assert s.policyset.get("shop", "extra") is not None


def parse_policies_doc(name: str) -> str:
    text = (f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: shop}}\nspec:\n  action: DENY\n"
            f"  rules:\n  - to: [{{operation: {{paths: ['/x*']}}}}]\n")
    parse_policies(text)  # valid on its own
    return text


def test_a_reload_runs_off_the_event_loop_and_swaps_in_one_step(tmp_path):
    """The load blocks until the event loop has run a task; if it ran on the
    loop, that could never happen (the test would time out)."""
    (tmp_path / "f").write_text("1")
    loop_ran = threading.Event()
    seen_during_load: list[str] = []

    def slow_load(path: str) -> str:
        assert loop_ran.wait(10), "the event loop did not run while the file loaded"
        return pathlib.Path(path).read_text()

    w = FileWatcher(str(tmp_path / "f"), slow_load, "0", what="test file")

    async def main():
        async def other_traffic():
            seen_during_load.append(w.current)  # the old value until the swap
            loop_ran.set()

        task = asyncio.get_running_loop().create_task(other_traffic())
        changed = await w.check_async()
        await task
        return changed

    assert run(main(), timeout=20) is True
    assert seen_during_load == ["0"] and w.current == "1" and w.reloads == 1


def test_a_policy_reload_builds_the_local_pods_indexes_before_the_swap(tmp_path):
    s = _store(tmp_path)
    s.apply(_sources())
    pods = [("shop", {"app": "backend"}), ("shop", {"app": "frontend"})]
    w = PolicyWatcher(str(tmp_path / COMPILED_FILE), lambda: pods)
    assert w.current.version == s.policyset.version
    assert {k for k in w.current._compiled} == {(ns, frozenset(lb.items())) for ns, lb in pods}


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**20),
    st.sampled_from(["8080", "yes", "No", "null", "~", "true", "1.5", ".inf", "0x1F", "*", "/admin*", "*.json",
                     "a: b", "a #b", "- x", "[x]", "{x}", "'q'", '"q"', "", " lead", "trail ", "multi\nline",
                     "tab\there", "ünïcode", "\u2028", "cluster.local/ns/shop/sa/web", "@x", "%x", "!x", "&a",
                     "|", ">", "?", "=", "<<", "250ms", "3s", "2002-12-14", "1e3", "0o17", "1_000", "0.5",
                     "12:30", "-1", "+1", "1.0e+3"]),
    st.text(max_size=12),
)
_plain_docs = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["on", "8080", "a b", "kind"])), inner,
                    max_size=4),
), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), _plain_docs, min_size=1, max_size=5))
def test_the_stores_yaml_emitter_reads_back_as_the_same_data(doc):
    from agent.policy.store import _dump

    assert yamlsrc.load_plain_all(_dump(doc)) == [doc]


def test_documents_as_data_come_from_the_parsed_nodes_as_safe_load_gives_them():
    import yaml

    from agent.policy.load import collect_documents, policy_kinds

    for f in sorted(REPO_POLICIES.glob("*.yaml")):
        plain: list = []
        collect_documents([(str(f), f.read_text())], policy_kinds(), plain=plain)
        assert plain == [d for d in yaml.safe_load_all(f.read_text()) if d is not None]

