"""agent/policy/store.py: atomic apply (one bad document changes nothing),
created/configured/unchanged, delete, diff, persistence and reload, and the
compiled policies.json the proxy will read; TrafficPolicy documents in the
same store (one version, traffic.json, atomic across both kinds)."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from agent.policy.load import load_policies, parse_policies, policy_files
from agent.policy.store import COMPILED_FILE, STORE_FILE, Ambiguous, PolicyStore, store_version
from agent.traffic.trafficpolicy import (
    PUBLISHED_FILE, TRAFFIC_KIND, load_traffic_policies, parse_traffic_policies,
)
from agent.yamlsrc import SourceError
from tests.support.policy import BAD

REPO_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "policies"


def doc(name: str, ns: str = "shop", action: str = "DENY", path: str = "/admin*") -> str:
    return f"""\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: {action}
  rules:
  - to: [{{operation: {{paths: ["{path}"]}}}}]
"""


def repo_sources() -> list[tuple[str, str]]:
    return [(f, pathlib.Path(f).read_text()) for f in policy_files(REPO_POLICIES)]


def results(changes) -> dict[str, str]:
    return {f"{c.namespace}/{c.name}": c.result for c in changes}


def test_apply_created_configured_unchanged(tmp_path):
    s = PolicyStore(str(tmp_path))
    empty = s.version
    assert results(s.apply([("a.yaml", doc("a") + "---\n" + doc("b"))])) == {
        "shop/a": "created", "shop/b": "created"}
    v1 = s.version
    assert v1 != empty and len(s.policyset) == 2
    assert results(s.apply([("a.yaml", doc("a") + "---\n" + doc("b", path="/x*"))])) == {
        "shop/a": "unchanged", "shop/b": "configured"}
    assert s.version != v1
    v2 = s.version
    # formatting and comments only: unchanged, same version
    flow = "# a comment\n" + doc("a").replace("metadata: {name: a, namespace: shop}",
                                               "metadata:\n  namespace: shop\n  name: a")
    assert results(s.apply([("c.yaml", flow)])) == {"shop/a": "unchanged"}
    assert s.version == v2
    # apply never deletes what is not mentioned
    assert results(s.apply([("d.yaml", doc("c"))])) == {"shop/c": "created"}
    assert [p["name"] for p in s.list()] == ["a", "b", "c"]


def test_apply_is_atomic_with_a_bad_document(tmp_path):
    s = PolicyStore(str(tmp_path))
    s.apply([("good.yaml", doc("a"))])
    before = (s.version, (tmp_path / STORE_FILE).read_text(), (tmp_path / COMPILED_FILE).read_text())
    d = tmp_path / "in"
    d.mkdir()
    (d / "1-new.yaml").write_text(doc("new"))
    (d / "2-change.yaml").write_text(doc("a", path="/changed*"))
    (d / "3-bad.yaml").write_text(BAD)
    with pytest.raises(SourceError) as e:
        s.apply([(f, pathlib.Path(f).read_text()) for f in policy_files(d)])
    assert f"{d / '3-bad.yaml'}:7:" in str(e.value)
    assert "colour" in str(e.value)
    assert s.version == before[0]
    assert [p["name"] for p in s.list()] == ["a"]
    assert s.get("shop", "a")["spec"]["rules"][0]["to"][0]["operation"]["paths"] == ["/admin*"]
    assert ((tmp_path / STORE_FILE).read_text(), (tmp_path / COMPILED_FILE).read_text()) == before[1:]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_duplicate_across_sources_and_yaml_errors_change_nothing(tmp_path):
    s = PolicyStore(str(tmp_path))
    with pytest.raises(SourceError, match="defined twice"):
        s.apply([("x.yaml", doc("a")), ("y.yaml", doc("a", path="/b*"))])
    with pytest.raises(SourceError, match=r"^z\.yaml:\d+:\d+: YAML syntax error"):
        s.apply([("z.yaml", "a: [1,\n")])
    with pytest.raises(SourceError):
        s.apply([])
    assert s.list() == [] and not (tmp_path / STORE_FILE).exists()


def test_repo_policies_apply_and_reload(tmp_path):
    s = PolicyStore(str(tmp_path))
    changes = s.apply(repo_sources())
    expected = load_policies(REPO_POLICIES)
    assert {c.result for c in changes} == {"created"}
    assert len(changes) == len(expected) + len(expected.authentications)
    # the store's version is the version of the same policies read from the files
    assert s.version == expected.version
    again = PolicyStore(str(tmp_path)).load()
    assert again.version == s.version and again.list() == s.list()
    assert results(again.apply(repo_sources())) == {k: "unchanged" for k in results(changes)}
    # the stored file names its version; the compiled file gives the same set back
    text = (tmp_path / STORE_FILE).read_text()
    assert text.startswith(f"# meshlet policy store: version {s.version}\n")
    compiled = json.loads((tmp_path / COMPILED_FILE).read_text())
    assert compiled["format"] == 1 and compiled["version"] == s.version
    assert compiled["count"] == len(expected) + len(expected.authentications)
    assert parse_policies(compiled["yaml"]).version == s.version
    assert [(p["namespace"], p["name"]) for p in compiled["policies"]] == [
        (p.namespace, p.name) for p in (*expected.policies, *expected.authentications)]


def test_delete_persists(tmp_path):
    s = PolicyStore(str(tmp_path))
    s.apply([("a.yaml", doc("a") + "---\n" + doc("b", ns="data"))])
    assert s.delete("shop", "a") is True
    assert s.delete("shop", "a") is False
    assert s.get("shop", "a") is None
    r = PolicyStore(str(tmp_path)).load()
    assert [(p["namespace"], p["name"]) for p in r.list()] == [("data", "b")]
    assert r.delete("data", "b")
    empty = PolicyStore(str(tmp_path)).load()
    assert empty.list() == [] and empty.version == PolicyStore(None).version
    assert json.loads((tmp_path / COMPILED_FILE).read_text())["count"] == 0


def test_diff(tmp_path):
    s = PolicyStore(str(tmp_path))
    s.apply([("a.yaml", doc("a"))])
    version = s.version
    text, changes = s.diff([("a.yaml", doc("a", path="/secret*") + "---\n" + doc("n"))])
    assert results(changes) == {"shop/a": "configured", "shop/n": "created"}
    assert "--- a/shop/a\n+++ b/shop/a\n" in text
    assert "-        - /admin*\n" in text and "+        - /secret*\n" in text
    assert "--- /dev/null\n+++ b/shop/n\n" in text
    assert s.version == version and [p["name"] for p in s.list()] == ["a"]
    text, changes = s.diff([("a.yaml", doc("a"))])
    assert text == "" and results(changes) == {"shop/a": "unchanged"}
    with pytest.raises(SourceError, match="bad.yaml:7:"):
        s.diff([("bad.yaml", BAD)])


def test_corrupt_store_file_is_an_error_not_an_empty_set(tmp_path):
    (tmp_path / STORE_FILE).write_text("# meshlet policy store: version x\n" + BAD)
    with pytest.raises(SourceError, match=STORE_FILE):
        PolicyStore(str(tmp_path)).load()


def test_get_returns_a_copy(tmp_path):
    s = PolicyStore(None)
    s.apply([("a.yaml", doc("a"))])
    d = s.get("shop", "a")
    d["spec"]["action"] = "ALLOW"
    assert s.get("shop", "a")["spec"]["action"] == "DENY"
    assert s.get_yaml("shop", "a").startswith("apiVersion: meshlet.io/v1alpha1\n")


# --- TrafficPolicy in the same store ----------------------------------------------------

TRAFFIC_EXAMPLES = REPO_POLICIES / "traffic"


def traffic(name: str, service: str = "backend", ns: str = "shop", attempts: int = 2,
            port: int | None = None) -> str:
    return (f"apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  service: {service}\n" + (f"  port: {port}\n" if port else "")
            + f"  retries: {{attempts: {attempts}}}\n")


def both(tmp_path) -> PolicyStore:
    return PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND])


def published(tmp_path) -> dict:
    return json.loads((tmp_path / PUBLISHED_FILE).read_text())


def test_both_kinds_round_trip_one_version(tmp_path):
    s = both(tmp_path)
    changes = s.apply([("mixed.yaml", doc("a") + "---\n" + traffic("a") + "---\n" + traffic("b", "db"))])
    assert [(c.kind, c.name, c.result) for c in changes] == [
        ("AuthorizationPolicy", "a", "created"), ("TrafficPolicy", "a", "created"),
        ("TrafficPolicy", "b", "created")]
    assert s.count == 3 and len(s.policyset) == 1
    assert s.summary() == {"version": s.version, "count": 3,
                           "byKind": {"AuthorizationPolicy": 1, "TrafficPolicy": 2}}
    # policies.json stays authorization-only (the proxies' PolicyWatcher reads it as it is)
    compiled = json.loads((tmp_path / COMPILED_FILE).read_text())
    assert compiled["count"] == 1 and "TrafficPolicy" not in compiled["yaml"]
    assert parse_policies(compiled["yaml"]).version == compiled["version"] == s.policyset.version
    # traffic.json: the TrafficPolicy documents, with a version a reader can check
    t = published(tmp_path)
    assert t["count"] == 2 and [p["name"] for p in t["policies"]] == ["a", "b"]
    assert parse_traffic_policies(t["yaml"]).version == t["version"]
    # one store version over both kinds, different from the authorization one alone
    assert s.version == store_version(s.policyset.version, {"TrafficPolicy": (t["version"], 2)})
    assert s.version != s.policyset.version
    assert (tmp_path / STORE_FILE).read_text().startswith(f"# meshlet policy store: version {s.version}\n")
    # list: every row has its kind
    assert [(p["kind"], p["name"]) for p in s.list()] == [
        ("AuthorizationPolicy", "a"), ("TrafficPolicy", "a"), ("TrafficPolicy", "b")]
    assert s.list()[2]["service"] == "db"

    # a restarted agent gets everything back, and rewrites both published files
    (tmp_path / PUBLISHED_FILE).unlink()
    again = both(tmp_path).load()
    assert again.version == s.version and again.list() == s.list()
    assert published(tmp_path) == t
    # a traffic-only change leaves policies.json alone (the proxies do not reload it)
    before = os.stat(tmp_path / COMPILED_FILE).st_ino
    again.apply([("t.yaml", traffic("b", "db", attempts=5))])
    assert os.stat(tmp_path / COMPILED_FILE).st_ino == before
    assert published(tmp_path)["version"] != t["version"] and again.version != s.version


def test_a_bad_traffic_policy_in_a_batch_changes_nothing(tmp_path):
    s = both(tmp_path)
    s.apply([("ok.yaml", doc("a") + "---\n" + traffic("t"))])
    version, stored = s.version, (tmp_path / STORE_FILE).read_text()
    t = published(tmp_path)
    bad = traffic("u").replace("attempts: 2", "attempts: 2, colour: red")
    with pytest.raises(SourceError) as ei:
        s.apply([("new.yaml", doc("b") + "---\n" + traffic("t", attempts=4)), ("bad.yaml", bad)])
    assert [str(p) for p in ei.value.errors] == [
        "bad.yaml:6:26: spec.retries.colour: unknown field 'colour'; known fields: attempts, "
        "perTryTimeout, retryOn, retryNonIdempotent, maxBodyBytes"]
    assert s.version == version and (tmp_path / STORE_FILE).read_text() == stored
    assert published(tmp_path) == t and [p["name"] for p in s.list()] == ["a", "t"]
    # an unknown kind fails closed too, naming the kinds the store takes
    with pytest.raises(SourceError, match=r"x.yaml:2:7: kind: 'TrafficPolicyy' is not one of: "
                       r"AuthorizationPolicy, RequestAuthentication, TrafficPolicy \(did you mean 'TrafficPolicy'\?\)"):
        s.apply([("x.yaml", traffic("v").replace("kind: TrafficPolicy", "kind: TrafficPolicyy"))])
    # two TrafficPolicies for one service, across two sources: refused
    with pytest.raises(SourceError, match="already has a traffic policy"):
        s.apply([("one.yaml", traffic("p1", "x")), ("two.yaml", traffic("p2", "x"))])
    assert s.version == version


def test_a_store_without_the_traffic_kind_refuses_it(tmp_path):
    with pytest.raises(SourceError, match="kind: 'TrafficPolicy' is not one of: AuthorizationPolicy"):
        PolicyStore(str(tmp_path)).apply([("t.yaml", traffic("t"))])


def test_same_name_in_both_kinds_needs_the_kind(tmp_path):
    s = both(tmp_path)
    s.apply([("m.yaml", doc("backend") + "---\n" + traffic("backend"))])
    with pytest.raises(Ambiguous) as ei:
        s.get("shop", "backend")
    assert ei.value.kinds == ["AuthorizationPolicy", "TrafficPolicy"]
    with pytest.raises(Ambiguous):
        s.delete("shop", "backend")
    assert s.get("shop", "backend", "TrafficPolicy")["spec"]["service"] == "backend"
    assert s.get_yaml("shop", "backend", "AuthorizationPolicy").startswith("apiVersion:")
    assert s.delete("shop", "backend", "TrafficPolicy") is True
    assert s.get("shop", "backend")["kind"] == "AuthorizationPolicy"  # no longer ambiguous
    assert published(tmp_path)["count"] == 0  # written empty: the proxies drop the set
    assert s.version == s.policyset.version  # no traffic policies: the authorization version


def test_diff_names_the_kind(tmp_path):
    s = both(tmp_path)
    s.apply([("t.yaml", traffic("t"))])
    text, changes = s.diff([("t.yaml", traffic("t", attempts=3))])
    assert "--- a/trafficpolicy/shop/t\n+++ b/trafficpolicy/shop/t\n" in text
    assert "   retries:\n-    attempts: 2\n+    attempts: 3\n" in text
    assert [c.to_dict() for c in changes] == [
        {"kind": "TrafficPolicy", "namespace": "shop", "name": "t", "result": "configured"}]


def test_repo_examples_apply_together(tmp_path):
    s = both(tmp_path)
    files = repo_sources() + [(f, pathlib.Path(f).read_text())
                              for f in policy_files(TRAFFIC_EXAMPLES)]
    s.apply(files)
    assert len(s.policyset) == len(load_policies(REPO_POLICIES))
    assert published(tmp_path)["count"] == len(load_traffic_policies(TRAFFIC_EXAMPLES))
