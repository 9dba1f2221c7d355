"""agent/policy stays pure: no sockets, no event loop, no datapath or proxy.
The one exception is agent.datapath.abi, plain data (the kernel map layouts
and constants, no bcc): kernel.py compiles to its entries and takes the
ML_L4_* verdict values from it rather than copying them."""

from __future__ import annotations

import ast
import pathlib

import pytest

POLICY = pathlib.Path(__file__).resolve().parents[2] / "agent" / "policy"
ALLOWED_AGENT = {"agent.yamlsrc", "agent.identity.spiffe", "agent.labels", "agent",
                 "agent.datapath.abi"}
FORBIDDEN = {"socket", "asyncio", "uvloop", "ssl", "select", "subprocess", "threading", "bcc",
             "pyroute2", "click"}


def imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(POLICY.glob("*.py")), ids=lambda p: p.name)
def test_policy_modules_are_pure(path):
    got = imports(path)
    assert not {m for m in got if m.split(".")[0] in FORBIDDEN}, got
    assert {m for m in got if m.startswith("agent")} <= ALLOWED_AGENT, got


def test_the_check_sees_modules():
    assert len(list(POLICY.glob("*.py"))) >= 6
    assert "agent.identity.spiffe" in imports(POLICY / "load.py")
