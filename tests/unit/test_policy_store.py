"""agent/policy/store.py: atomic apply (one bad document changes nothing),
created/configured/unchanged, delete, diff, persistence and reload, and the
compiled policies.json the proxy will read."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from agent.policy.load import load_policies, parse_policies, policy_files
from agent.policy.store import COMPILED_FILE, STORE_FILE, PolicyStore
from agent.yamlsrc import SourceError

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


BAD = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {colour: [red]}}]
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
    assert len(changes) == len(expected)
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
    assert compiled["count"] == len(expected)
    assert parse_policies(compiled["yaml"]).version == s.version
    assert [(p["namespace"], p["name"]) for p in compiled["policies"]] == [
        (p.namespace, p.name) for p in expected.policies]


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
