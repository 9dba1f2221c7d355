"""The layering rules are import-linter contracts ([tool.importlinter] in
pyproject.toml).  Here: they hold for the tree, and each one fails when a
module breaks it -- a contract that cannot fail checks nothing.

Each failing case runs the real ``lint-imports`` on a copy of agent/ with one
import added, limited to the contract under test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.proxy import tunnel

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: run bash scripts/bootstrap.sh (test extra)"
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    for c in contracts:
        args += ["--contract", c]
    return subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120)


def contract_ids() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        cfg = tomllib.load(f)
    return {c["id"]: c["name"] for c in cfg["tool"]["importlinter"]["contracts"]}


# contract id -> violations: (file under agent/, import line appended to it).
# The second case of a contract, where there is one, goes through another
# agent module: contracts are transitive unless they say otherwise.
VIOLATIONS = {
    "datapath-only": [
        ("proxy/sniff.py", "import bcc"),
        ("policy/model.py", "from bcc import BPF"),
    ],
    "no-pyroute2": [
        ("datapath/netlink.py", "from pyroute2 import IPRoute"),
        ("proxy/sniff.py", "import pyroute2"),
    ],
    "no-prometheus-client": [
        ("observe/prometheus.py", "from prometheus_client import generate_latest"),
        ("proxy/stats.py", "import prometheus_client"),
    ],
    "otel-in-spans": [
        ("proxy/tracing.py", "import opentelemetry.trace"),
        ("proxy/stats.py", "from opentelemetry.sdk.trace import ReadableSpan"),
    ],
    "proxy-not-agent": [
        ("proxy/http1.py", "import agent.doctor"),
        ("proxy/tracing.py", "from agent.datapath import loader"),
    ],
    "daemon-no-cli": [
        ("daemon.py", "import click"),
        ("supervisor.py", "from agent.cli import common"),  # app -> supervisor -> cli
    ],
    "policy-pure": [
        ("policy/model.py", "import threading"),
        ("yamlsrc.py", "import socket"),  # policy -> yamlsrc -> socket
    ],
    "policy-deps": [
        ("policy/evaluate.py", "import agent.config"),
        ("policy/model.py", "from agent.identity import ca"),  # spiffe only
    ],
    "traffic-pure": [
        ("traffic/lb.py", "import time"),
        ("workloads/yamlfile.py", "import asyncio"),
        ("workloads/kubeobjects.py", "import socket"),
    ],
    "traffic-deps": [
        ("traffic/retry.py", "from agent.proxy import state"),
        ("workloads/model.py", "import agent.observe.prometheus"),
        ("workloads/kubeobjects.py", "from agent import cgroup"),
    ],
    "csr-rules-pure": [
        ("identity/csrpolicy.py", "import time"),
        ("identity/csrpolicy.py", "from agent.workloads import kubeclient"),
        ("identity/svid.py", "import threading"),  # csrpolicy -> svid -> threading
    ],
    "proxy-no-yaml": [
        ("proxy/state.py", "import yaml"),
        ("proxy/authz.py", "from agent.policy import store"),  # the fallback's import is the only one allowed
        ("traffic/settings.py", "from agent import labels"),  # proxy -> traffic.settings -> labels -> yamlsrc
        ("policy/compiled.py", "from .load import KIND"),  # proxy.authz -> policy.compiled -> policy.load
    ],
    "proxy-sans-io": [
        ("proxy/http1.py", "import asyncio"),
        ("proxy/sniff.py", "import socket"),
        ("proxy/tunnel.py", "import ssl"),
        ("policy/http.py", "import ssl"),  # http1 -> policy.http -> ssl
        ("proxy/l7authz.py", "from agent.proxy import relay"),  # relay imports asyncio
        ("proxy/exchange.py", "from agent.proxy import pool"),  # the shell's pool: asyncio, socket
        ("proxy/tracing.py", "import threading"),  # spans are exported by agent.proxy.spans
    ],
}


def test_every_contract_has_failing_cases():
    assert set(VIOLATIONS) == set(contract_ids())


def test_the_tree_keeps_every_contract():
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Contracts: {len(contract_ids())} kept, 0 broken." in r.stdout


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("contracts") / "pristine"
    shutil.copytree(REPO / "agent", d / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", d / "pyproject.toml")
    return d


@pytest.mark.parametrize(
    "contract,path,line",
    [(c, p, ln) for c, cases in VIOLATIONS.items() for p, ln in cases],
    ids=lambda v: str(v),
)
def test_a_violating_import_breaks_the_contract(pristine: Path, tmp_path: Path, contract, path, line):
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    target = root / "agent" / path
    target.write_text(target.read_text() + f"\n{line}\n")
    r = lint_imports(root, contract)
    assert r.returncode == 1, f"{contract} kept with {line!r} in {path}:\n{r.stdout}{r.stderr}"
    assert "Contracts: 0 kept, 1 broken." in r.stdout, r.stdout
    # the report names the module whose import broke it (the last link of a chain)
    assert f"agent.{path.removesuffix('.py').replace('/', '.')} -> " in r.stdout, r.stdout


def test_the_unbroken_copy_keeps_each_contract(pristine: Path):
    # the failures above are due to the added import, not to the copy
    r = lint_imports(pristine)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_stale_exception_fails(pristine: Path, tmp_path: Path):
    # proxy-sans-io lets agent.proxy.state import agent.proxy.watch until the
    # state watcher moves out; once that import is gone, the ignore must go too.
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    state = root / "agent" / "proxy" / "state.py"
    src = state.read_text()
    assert "from agent.proxy.watch import FileWatcher" in src
    state.write_text(src.replace("from agent.proxy.watch import FileWatcher", "FileWatcher = object"))
    r = lint_imports(root, "proxy-sans-io")
    assert r.returncode != 0
    assert "No matches for ignored import agent.proxy.state -> agent.proxy.watch" in r.stdout + r.stderr


def test_tunnel_address_families_are_the_kernels():
    # tunnel spells them out so that it needs no socket import
    assert tunnel.AF_INET == socket.AF_INET
    assert tunnel.AF_INET6 == socket.AF_INET6
