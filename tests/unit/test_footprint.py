"""What a process imports is memory it keeps (issue #13 item 6): a proxy
worker imports the HTTP/2 stack and PyJWT only when it needs them, and the
agent's modules never pull in bcc (LLVM) or pyroute2.  Each check runs in a
fresh interpreter, so nothing another test imported can hide a regression.
The running agent's mappings are checked on a real mesh in
tests/privileged/test_lifecycle.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Imported on demand only: the first HTTP/2 client, the first JWKS, a
#: collector to export spans to.  Never: bcc (the loader step's), pyroute2.
ON_DEMAND = ("h2", "hpack", "hyperframe", "jwt", "opentelemetry", "prometheus_client", "bcc", "pyroute2")


def imported_after(code: str) -> list[str]:
    probe = code + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(ON_DEMAND)!r}))))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_proxy_worker_starts_without_h2_jwt_or_exporters():
    assert imported_after("import agent.proxy.__main__, agent.proxy.server") == []


def test_h2_and_jwt_come_when_first_used():
    got = imported_after(
        "from agent.proxy import destination, h2glue\n"
        "assert issubclass(destination._proxy_h2_session(), h2glue.H2Session)\n"
        "from agent.policy.jwtauth import _algorithms\n"
        "assert 'RS256' in _algorithms()\n"
    )
    assert {"h2", "jwt"} <= set(got), got


def test_the_agent_imports_neither_bcc_nor_pyroute2():
    code = (
        "import agent.app, agent.cli, agent.admin, agent.doctor\n"
        "import agent.datapath.loader, agent.datapath.loadstep\n"
        "import agent.datapath.netlink, agent.datapath.probe, agent.datapath.status\n"
    )
    got = imported_after(code)
    assert "bcc" not in got and "pyroute2" not in got, got
