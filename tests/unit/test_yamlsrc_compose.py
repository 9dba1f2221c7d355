"""yamlsrc's composer (one loop over libyaml's events) builds exactly the
node trees of PyYAML's own composer over the same events (libyaml's C one,
``yaml.compose_all`` with ``CSafeLoader``): tags, values, styles, marks,
anchors shared by aliases; and refuses what it refuses."""

from __future__ import annotations

import glob
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import yamlsrc as y

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shape(node, seen=None):
    """A node tree as comparable data (shared nodes by identity, once)."""
    seen = {} if seen is None else seen
    if id(node) in seen:
        return ("alias", seen[id(node)])
    seen[id(node)] = len(seen)
    marks = (node.start_mark.line, node.start_mark.column, node.end_mark.line, node.end_mark.column)
    if isinstance(node, yaml.ScalarNode):
        return ("scalar", node.tag, node.value, node.style, marks)
    if isinstance(node, yaml.MappingNode):
        kids = [(shape(k, seen), shape(v, seen)) for k, v in node.value]
    else:
        kids = [shape(c, seen) for c in node.value]
    return (type(node).__name__, node.tag, node.flow_style, marks, kids)


def reference(text: str):
    return [shape(n) for n in yaml.compose_all(text, Loader=yaml.CSafeLoader)]


def ours(text: str):
    return [shape(n) for _, n in y.compose_all(text, "f.yaml")]


TEXTS = [
    "",
    "a: 1\n",
    "---\n---\n",
    "a: &x [1, 2]\nb: *x\n---\n--- !!map {c: !!str 3, d: ~}\n",
    "- &a x\n- *a\n- !foo y\n- ! z\n",
    "key: |\n  text\n? complex\n: v\n'q': \"d\"\n",
    "- - - x\n  - y\n- {a: [b, {c: d}]}\n",
    "a: &m {x: 1}\nb:\n  <<: *m\n  y: 2\n",
    "[" * 64 + "]" * 64,
]


@pytest.mark.parametrize("text", TEXTS)
def test_same_trees_as_pyyaml(text):
    assert ours(text) == reference(text)


def test_same_trees_for_every_yaml_file_of_the_repository():
    files = sorted(glob.glob(os.path.join(ROOT, "policies", "**", "*.y*ml"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "deploy", "**", "*.y*ml"), recursive=True))
    assert files
    for f in files:
        with open(f) as fh:
            text = fh.read()
        assert ours(text) == reference(text), f


def test_document_starts_and_anchors_per_document():
    got = y.compose_all("a: 1\n---\nb: &x 2\n--- &x\nc: 3\n", "f.yaml")  # an anchor name may come again
    assert [start for start, _ in got] == [(1, 1), (2, 1), (4, 1)]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("a: &a 1\nb: &a 2\n", 2, "duplicate anchor"),
        ("a: *nope\n", 1, "undefined alias"),
        ("a: [1, 2\n", 2, ""),
        ("a:\n  - b\n c: d\n", 3, ""),
    ],
)
def test_refuses_what_pyyaml_refuses_naming_the_line(text, line, words):
    with pytest.raises(yaml.YAMLError):
        reference(text)
    with pytest.raises(y.SourceError) as e:
        y.compose_all(text, "f.yaml")
    (p,) = e.value.errors
    assert (p.file, p.line) == ("f.yaml", line)
    assert words in p.message


def test_bounds_pyyaml_does_not_have():
    deep = "a:\n  b: " + "[" * 64 + "]" * 64 + "\n"
    assert reference(deep)
    with pytest.raises(y.SourceError, match="nested more than 64 deep") as e:
        y.compose_all(deep, "f.yaml")
    assert (e.value.errors[0].line, e.value.errors[0].column) == (2, 68)  # 63rd "[": level 65
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcd", "bcde", strict=True)
    )
    with pytest.raises(y.SourceError, match="alias bomb") as e:
        y.compose_all(bomb, "f.yaml")
    assert e.value.errors[0].line == 4


_plain = st.text(alphabet="abcxyz019-_ ", min_size=1, max_size=6).map(str.strip).filter(bool)
_values = st.recursive(
    st.one_of(_plain, st.integers(-5, 5), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_plain, inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(_values, st.booleans())
def test_same_trees_as_pyyaml_on_random_documents(value, flow):
    text = yaml.safe_dump_all([value, value], default_flow_style=flow)
    assert ours(text) == reference(text)
