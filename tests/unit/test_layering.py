"""Layering, checked by a test rather than by memory: only agent/datapath may
import bcc or pyroute2, and the proxy and the simulator never import the
agent's heavy parts."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "agent"


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_only_datapath_imports_bcc_or_pyroute2(path):
    if path.parent.name == "datapath":
        return
    heavy = {m for m in imports(path) if m.split(".")[0] in ("bcc", "pyroute2")}
    assert not heavy, f"{path} imports {heavy}; only agent/datapath may"


@pytest.mark.parametrize("path", sorted((ROOT / "proxy").rglob("*.py")),
                         ids=lambda p: p.name)
def test_proxy_does_not_import_the_agent(path):
    bad = {m for m in imports(path)
           if m in ("agent.app", "agent.cli", "agent.datapath.loader", "agent.doctor")}
    assert not bad, f"{path} imports {bad}"


def test_the_check_sees_imports():
    # guard against the scanner silently finding nothing
    assert "bcc" in imports(ROOT / "datapath" / "loader.py")
    assert FILES and len(FILES) > 10
