"""The YAML front end refuses hostile input at its line, and stays fast.

Issue #12 (6): a 13 KB file whose anchors expand to 10^9 paths hung the
loader; 50,000 nested brackets reported no position (and crash libyaml's own
recursive composer outright). Every case here goes through the real loaders
(inventory, config, policies) and checks the file:line:column message."""

from __future__ import annotations

import gc

import pytest

from agent import yamlsrc as y
from agent.policy import load


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _error(text: str, filename: str = "f.yaml") -> str:
    with pytest.raises(y.SourceError) as e:
        y.compose_all(text, filename)
    return str(e.value)


def test_alias_bomb_is_refused_at_the_alias_that_crosses_the_bound():
    text = _bomb()
    assert len(text) < 1000
    # aliases add 90 + 819 + 7380 nodes on lines 2-4; line 5's first *a3
    # (6643 more) crosses 10,000
    assert _error(text) == ("f.yaml:5:10: alias '*a3' takes what aliases expand to past 10000 "
                            "nodes (an alias bomb?); write the values out or use fewer aliases")


def test_a_policy_file_with_an_alias_bomb_names_file_and_line():
    text = ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
            "metadata: {name: p, namespace: shop}\nspec:\n  rules:\n"
            + "".join("  " + line + "\n" for line in ["- x: 1"])
            + _bomb().replace("a0:", "x0:", 1))
    with pytest.raises(y.SourceError) as e:
        load.parse_policies(text, "bomb.yaml")
    assert str(e.value).startswith("bomb.yaml:11:10: alias '*a3'")


def test_aliases_within_the_bound_are_expanded():
    text = "shared: &p [a, b, c]\nx: *p\ny: *p\n"
    docs = y.compose_all(text, "f.yaml")
    root = docs[0][1]
    values = {k.value: v for k, v in root.value}
    assert [n.value for n in values["y"].value] == ["a", "b", "c"]
    assert values["x"] is values["shared"]  # shared, never copied


def test_alias_of_alias_counts_what_it_expands_to():
    # b is 1 + 3*(1+3) = 13 nodes; each *b adds 13, so the bound is met by
    # the alias count times the expanded size, not by the number of aliases.
    inner = "[" + ",".join(["1"] * 100) + "]"
    text = f"a: &a {inner}\nb: &b [{','.join(['*a'] * 90)}]\nc: [*b, *b]\n"
    assert _error(text).startswith("f.yaml:3:5: alias '*b'")


@pytest.mark.parametrize("depth", [65, 50_000])
def test_deep_flow_nesting_is_refused_with_a_position(depth):
    text = "a: " + "[" * depth + "]" * depth + "\n"
    assert _error(text) == "f.yaml:1:67: lists and mappings are nested more than 64 deep"


def test_deep_block_nesting_is_refused_with_a_position():
    text = "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(100))
    assert _error(text) == "f.yaml:65:65: lists and mappings are nested more than 64 deep"


def test_nesting_up_to_the_bound_is_fine():
    text = "[" * 64 + "]" * 64 + "\n"
    assert len(y.compose_all(text, "f.yaml")) == 1


def test_oversized_text_is_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(y, "MAX_TEXT_BYTES", 1000)
    assert _error("a: " + "x" * 2000 + "\n") == \
        "f.yaml:1:1: file is 0.0 MB; meshlet reads at most 0 MB per file (split it)"


@pytest.mark.parametrize("text, expected", [
    ("a: ééé\x07\n", "f.yaml:1:7: YAML syntax error: character 0x7 is not allowed"),
    ("# ééééé\na: ééé: x\n", "f.yaml:2:7: YAML syntax error: mapping values are not allowed in this context"),
])
def test_positions_count_characters_not_utf8_bytes(text, expected):
    assert _error(text) == expected


def test_document_starts_are_reported():
    docs = y.compose_all("a: 1\n---\nb: 2\n", "f.yaml")
    assert [start for start, _ in docs] == [(1, 1), (2, 1)]


def test_inventory_and_config_loaders_use_the_bounds():
    from agent.config import parse_config
    with pytest.raises(y.SourceError) as e:
        parse_config("node: " + "[" * 100 + "]" * 100 + "\n", "c.yaml")
    assert "c.yaml:1:70: lists and mappings are nested more than 64 deep" in str(e.value)


def test_gc_paused_restores_the_collector_even_on_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), y.gc_paused():
        assert not gc.isenabled()
        with y.gc_paused():
            pass
        assert not gc.isenabled()  # inner block leaves it paused
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with y.gc_paused():
            pass
        assert not gc.isenabled()  # not re-enabled by us if it was off
    finally:
        gc.enable()
