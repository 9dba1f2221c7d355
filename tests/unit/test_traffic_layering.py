"""agent/traffic and the workload model and YAML reader (agent/workloads/
model.py, yamlfile.py and the services.py names) stay pure: no sockets, no
event loop, no clock, no datapath or proxy imports."""

from __future__ import annotations

import ast
import pathlib

import pytest

AGENT = pathlib.Path(__file__).resolve().parents[2] / "agent"
FILES = sorted((AGENT / "traffic").glob("*.py")) + [
    AGENT / "workloads" / name for name in ("model.py", "yamlfile.py", "services.py", "inventory.py")]
FORBIDDEN = {"socket", "asyncio", "uvloop", "ssl", "select", "subprocess", "threading", "time",
             "bcc", "pyroute2", "click"}
ALLOWED_AGENT = {"agent", "agent.yamlsrc", "agent.config", "agent.labels", "agent.netaddr",
                 "agent.policy.load", "agent.workloads.inventory", "agent.workloads.model",
                 "agent.workloads.yamlfile"}


def imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_traffic_modules_are_pure(path):
    got = imports(path)
    assert not {m for m in got if m.split(".")[0] in FORBIDDEN}, got
    assert {m for m in got if m.startswith("agent")} <= ALLOWED_AGENT, got


def test_the_check_sees_modules():
    assert len(FILES) >= 8
    assert "agent.policy.load" in imports(AGENT / "traffic" / "policy.py")
