"""Structural mutation of parsed YAML documents, for the Hypothesis tests that
check a loader raises only its own error (with file:line) on any bad input."""

from __future__ import annotations

from typing import Any, Iterator


def paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (a tuple of keys and indexes) in ``node``, the root () first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def replace(node: Any, path: tuple, value: Any) -> Any:
    """A copy of ``node`` with the value at ``path`` replaced (``node`` is untouched)."""
    if not path:
        return value
    node = dict(node) if isinstance(node, dict) else list(node)
    node[path[0]] = replace(node[path[0]], path[1:], value)
    return node
