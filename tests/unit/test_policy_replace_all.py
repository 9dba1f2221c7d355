"""PolicyStore.replace_all: the store holds exactly the set given --
creations, changes and deletions in one commit (one version, each file
written once), or nothing changes (a bad document; a set over the store's
size limit, named with the size and the limit)."""

from __future__ import annotations

import json
import os

import pytest

from agent.policy.store import (
    COMPILED_FILE,
    MAX_DOCUMENT_BYTES,
    MAX_STORE_BYTES,
    STORE_FILE,
    PolicyStore,
    StoreFull,
)
from agent.traffic.trafficpolicy import PUBLISHED_FILE, TRAFFIC_KIND
from agent.yamlsrc import SourceError
from tests.unit.test_policy_store import doc, traffic


class CountingStore(PolicyStore):
    """The real store, recording the version of every commit it makes."""

    def __init__(self, *a, **kw):
        self.commits: list[str] = []
        super().__init__(*a, **kw)

    def _commit(self, *a, **kw) -> None:
        super()._commit(*a, **kw)
        self.commits.append(self.version)


def srcs(*texts: str) -> list[tuple[str, str]]:
    return [(f"cluster:{i}", t) for i, t in enumerate(texts)]


def test_a_burst_of_creations_changes_and_deletions_is_one_commit(tmp_path):
    s = CountingStore(str(tmp_path), kinds=[TRAFFIC_KIND])
    s.apply(srcs(*(doc(f"p{i}") for i in range(20)), traffic("web")))
    s.commits.clear()
    v0 = s.version
    # keep p0 unchanged, change p1, add q, drop p2..p19 and the TrafficPolicy
    changes = s.replace_all(srcs(doc("p0"), doc("p1", path="/other*"), doc("q", ns="shop2")))
    got = {(c.kind, c.namespace, c.name): c.result for c in changes}
    assert got[("AuthorizationPolicy", "shop", "p0")] == "unchanged"
    assert got[("AuthorizationPolicy", "shop", "p1")] == "configured"
    assert got[("AuthorizationPolicy", "shop2", "q")] == "created"
    assert [k for k, r in got.items() if r == "deleted"] == [
        *(("AuthorizationPolicy", "shop", f"p{i}") for i in sorted(range(2, 20), key=str)),
        ("TrafficPolicy", "shop", "web"),
    ]
    assert len(s.commits) == 1 and s.commits[0] == s.version != v0  # one commit, one new version
    left = sorted((r["namespace"], r["name"]) for r in s.list())
    assert left == [("shop", "p0"), ("shop", "p1"), ("shop2", "q")]
    # what the proxies read agrees, and the store reloads to the same version
    published = json.loads((tmp_path / COMPILED_FILE).read_text())
    assert published["version"] == s.policyset.version and published["count"] == 3
    assert json.loads((tmp_path / PUBLISHED_FILE).read_text())["count"] == 0
    assert PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load().version == s.version


def test_the_same_set_again_writes_nothing(tmp_path):
    s = CountingStore(str(tmp_path))
    s.replace_all(srcs(doc("a"), doc("b")))
    before = os.stat(tmp_path / STORE_FILE).st_ino
    assert {c.result for c in s.replace_all(srcs(doc("b"), doc("a")))} == {"unchanged"}
    assert len(s.commits) == 1 and os.stat(tmp_path / STORE_FILE).st_ino == before


def test_an_empty_set_empties_the_store_in_one_commit(tmp_path):
    s = CountingStore(str(tmp_path))
    s.apply(srcs(doc("a"), doc("b"), doc("c")))
    empty = PolicyStore(None).version
    changes = s.replace_all([])
    assert {c.result for c in changes} == {"deleted"} and len(changes) == 3
    assert s.version == empty and s.count == 0 and s.commits == [s.commits[0], empty]
    assert PolicyStore(str(tmp_path)).load().count == 0
    assert s.replace_all([]) == [] and len(s.commits) == 2  # nothing to do: no commit


def test_a_bad_document_changes_nothing(tmp_path):
    s = CountingStore(str(tmp_path))
    s.apply(srcs(doc("a"), doc("b")))
    v, text = s.version, (tmp_path / STORE_FILE).read_text()
    with pytest.raises(SourceError, match="cluster:1"):
        s.replace_all(srcs(doc("a"), doc("b", action="MAYBE")))
    assert s.version == v and (tmp_path / STORE_FILE).read_text() == text and s.count == 2


def padded(name: str, size: int) -> str:
    """A valid document of about ``size`` bytes (a long comment: counted, not parsed into the set)."""
    body = doc(name)
    line = "# " + "x" * 78 + "\n"
    return body + line * max(0, (size - len(body)) // len(line))


def test_over_the_limit_nothing_changes_and_the_error_names_size_and_limit(tmp_path):
    s = CountingStore(str(tmp_path))
    s.apply(srcs(doc("a")))
    v, text, commits = s.version, (tmp_path / STORE_FILE).read_text(), len(s.commits)
    big = srcs(padded("a", 3 << 20), padded("b", 2 << 20))  # 5 MiB of text, each part under 4 MiB
    size = sum(len(t) for _, t in big)
    with pytest.raises(StoreFull) as e:
        s.replace_all(big, what="the cluster's policy set")
    msg = str(e.value)
    assert msg.startswith(f"the cluster's policy set: {size} bytes of policy text in 2 documents")
    assert f"the policy store's limit is {MAX_DOCUMENT_BYTES} bytes (workloads.maxPolicyBytes" in msg
    assert f"the previous set (version {v}) stays in force" in msg
    assert (e.value.size, e.value.limit) == (size, MAX_DOCUMENT_BYTES)
    assert s.version == v and len(s.commits) == commits and (tmp_path / STORE_FILE).read_text() == text
    # a store with a larger limit takes it
    large = PolicyStore(str(tmp_path / "large"), max_bytes=8 << 20)
    assert {c.result for c in large.replace_all(big)} == {"created"} and large.count == 2


def test_the_limit_is_bounded():
    with pytest.raises(ValueError, match=f"1..{MAX_STORE_BYTES} bytes"):
        PolicyStore(None, max_bytes=MAX_STORE_BYTES + 1)
    with pytest.raises(ValueError, match="not 0"):
        PolicyStore(None, max_bytes=0)


def test_the_config_knob_is_bounded_and_round_trips():
    import yaml

    from agent.config import parse_config
    from agent.yamlsrc import SourceError as ConfigError
    from tests.unit.test_config import MINIMAL

    base = MINIMAL.replace("inventory: inventory.yaml\n", "") + "workloads:\n  source: kubernetes\n"
    assert parse_config(base, "/etc/meshlet/c.yaml").workloads.max_policy_bytes == MAX_DOCUMENT_BYTES
    c = parse_config(base + "  maxPolicyBytes: 16777216\n", "/etc/meshlet/c.yaml")
    assert c.workloads.max_policy_bytes == 16 << 20
    assert parse_config(yaml.safe_dump(c.to_dict()), "/elsewhere/c.yaml") == c
    for bad in (1 << 20, 128 << 20):
        msg = r"workloads.maxPolicyBytes: \d+ is out of range \(4194304..67108864\)"
        with pytest.raises(ConfigError, match=msg):
            parse_config(base + f"  maxPolicyBytes: {bad}\n", "/etc/meshlet/c.yaml")
