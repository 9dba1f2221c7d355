"""What an in-place datapath upgrade does with each pinned map (pure:
agent.datapath.loader.plan_upgrade), and the cgroup helpers the unknown-pod
guard relies on.  The kernel side is tests/privileged/test_lifecycle.py."""

from __future__ import annotations

import pytest

from agent import cgroup as cg
from agent.datapath.bpfsys import MapInfo
from agent.datapath.loader import DatapathError, plan_upgrade

HASH, ARRAY, PERCPU_ARRAY = 1, 2, 6


def info(typ: int = HASH, key: int = 8, value: int = 8, entries: int = 4096, flags: int = 0) -> MapInfo:
    return MapInfo(typ, 1, key, value, entries, flags, "m")


def test_same_layout_is_shared_new_is_created_gone_is_dropped():
    old = {"ml_enrolled": info(), "ml_config": info(ARRAY, 4, 32, 1), "ml_gone": info()}
    new = {"ml_enrolled": info(), "ml_config": info(ARRAY, 4, 32, 1), "ml_cgroup_guard": info(value=4)}
    plan = plan_upgrade(old, new)
    assert plan.shared == ("ml_config", "ml_enrolled")
    assert plan.created == ("ml_cgroup_guard",)
    assert plan.migrate == ()
    assert plan.dropped == ("ml_gone",)


def test_a_resized_map_is_migrated():
    # ABI 3 -> 4: one more counter in ml_stats; a bigger exclude table
    old = {"ml_stats": info(PERCPU_ARRAY, 4, 8, 16), "ml_excl_ports": info(HASH, 2, 1, 256)}
    new = {"ml_stats": info(PERCPU_ARRAY, 4, 8, 17), "ml_excl_ports": info(HASH, 2, 1, 512, flags=1)}
    assert plan_upgrade(old, new).migrate == ("ml_excl_ports", "ml_stats")


@pytest.mark.parametrize(
    "old, new, words",
    [
        (info(value=8), info(value=16), ["ml_x", "value 8 B", "value 16 B"]),
        (info(key=8), info(key=4), ["ml_x", "key 8 B", "key 4 B"]),
        (info(HASH), info(ARRAY), ["ml_x", "hash", "array"]),
    ],
)
def test_a_changed_entry_layout_is_refused_with_both_layouts(old, new, words):
    with pytest.raises(DatapathError) as e:
        plan_upgrade({"ml_x": old}, {"ml_x": new})
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "left as it was" in msg and "meshlet uninstall" in msg


@pytest.mark.parametrize("name", ["ml_flows", "ml_flow_links", "events/ml_flow_events"])
def test_maps_the_proxy_holds_open_are_never_replaced(name):
    with pytest.raises(DatapathError, match="proxy workers hold it open"):
        plan_upgrade({name: info(entries=65536)}, {name: info(entries=131072)})


def test_is_within():
    assert cg.is_within("/a/b/c", "/a/b")
    assert cg.is_within("/a/b", "/a/b/")
    assert not cg.is_within("/a/bc", "/a/b")
    assert not cg.is_within("/a", "/a/b")


def test_own_cgroup_reads_the_v2_line():
    assert cg.own_cgroup(pid=999_999_999) is None  # no such process
    me = cg.own_cgroup(root="/sys/fs/cgroup-test")
    assert me is None or me.startswith("/sys/fs/cgroup-test")
