"""The CLI's offline commands and its error paths (no root, no agent)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from agent.cli import main

INVENTORY = """\
nodes:
  - name: node1
    address: 198.18.0.1
pods:
  - name: web-1
    node: node1
    ips: [10.244.1.10]
    cgroup: /sys/fs/cgroup/x/web-1
"""


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_teaches():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("doctor", "run", "status", "bpf", "inventory", "workloads"):
        assert cmd in r.output


def test_inventory_validate_good_and_bad(tmp_path):
    good = tmp_path / "inventory.yaml"
    good.write_text(INVENTORY)
    r = run("inventory", "validate", str(good))
    assert r.exit_code == 0 and "valid (1 nodes, 1 pods)" in r.output
    r = run("inventory", "validate", str(good), "-o", "json")
    assert json.loads(r.output) == {"valid": True, "nodes": 1, "pods": 1}

    bad = tmp_path / "bad.yaml"
    bad.write_text(INVENTORY.replace("10.244.1.10", "10.244.1.300"))
    r = run("inventory", "validate", str(bad))
    assert r.exit_code == 1
    assert "bad.yaml:7:" in r.output and "pods[0].ips[0]" in r.output
    r = run("inventory", "validate", str(bad), "-o", "json")
    assert r.exit_code == 1 and json.loads(r.output)["valid"] is False


def test_config_validate_reports_unknown_fields(tmp_path):
    cfg = tmp_path / "node1.yaml"
    cfg.write_text(
        "node: node1\ninventory: inv.yaml\ncgroup: /sys/fs/cgroup/x\n"
        "proxy:\n  redirectIPv4: 10.244.1.1\n  outbondPort: 15001\n"
    )
    r = run("config", "validate", str(cfg))
    assert r.exit_code == 1
    assert "node1.yaml:6:3" in r.output and "outboundPort" in r.output


def test_config_validate_fills_defaults(tmp_path):
    cfg = tmp_path / "node1.yaml"
    cfg.write_text(
        "node: node1\ninventory: inv.yaml\ncgroup: /sys/fs/cgroup/x\n"
        "identity: {bundle: b.pem, caCert: c.pem, caKey: k.pem}\n"
        "proxy:\n  redirectIPv4: 10.244.1.1\n"
    )
    r = run("config", "validate", str(cfg), "-o", "json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert "15001" in json.dumps(d) and "/sys/fs/bpf/meshlet/node1" in json.dumps(d)


def test_bpf_render_prints_cflags_and_source():
    r = run("bpf", "render", "--node", "nodeX")
    assert r.exit_code == 0
    first = r.output.splitlines()[0]
    assert first.startswith("/* cflags:") and '-DML_PIN_DIR="/sys/fs/bpf/meshlet/nodeX"' in first
    for marker in (
        "int ml_connect4(",
        "int ml_connect6(",
        "int ml_sockops(",
        "int ml_tc_to_pod(",
        "struct ml_flow_key {",
    ):
        assert marker in r.output


def test_status_without_an_agent_says_what_to_do(tmp_path):
    r = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "none.sock")])
    assert r.exit_code == 1
    assert "cannot reach the agent" in r.output and "meshlet run" in r.output


def test_run_with_invalid_config_names_the_problem(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node: Node_1\n")
    r = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert r.exit_code == 1
    assert "c.yaml:1:" in r.output


def test_ca_init_rotate_and_errors(tmp_path):
    out = tmp_path / "ca"
    r = run("ca", "init", "--out", str(out), "--node", "node1", "--trust-domain", "prod.example")
    assert r.exit_code == 0, r.output
    assert (out / "bundle.pem").exists() and (out / "nodes" / "node1" / "ca-key.pem").exists()
    assert oct((out / "nodes" / "node1" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    r = CliRunner().invoke(main, ["ca", "init", "--out", str(out)])
    assert r.exit_code == 1 and "already holds a CA" in r.output
    r = run("ca", "rotate-root", "--dir", str(out))
    assert r.exit_code == 0 and "2 roots" in r.output
    r = run("ca", "reissue-node", "--dir", str(out), "node1")
    assert r.exit_code == 0 and "reissued node node1" in r.output
    r = CliRunner().invoke(main, ["ca", "retire-root", "--dir", str(out), "ffff0000ffff"])
    assert r.exit_code == 1 and "error:" in r.output


# --- the command tree: a lost command, option or output format fails here --------------

AGENT = ("--socket", "--node")
POLICY = ("--trust-domain", "--root-namespace")
TABLE_JSON = "-o/--output=table|json"
KUBE = ("--kubeconfig", "--context", "--in-cluster")
TABLE_WIDE_JSON = "-o/--output=table|wide|json"

COMMAND_TREE = {
    "": ("--version",),
    "bpf": (),
    "bpf render": ("--config", "--node"),
    "bpf status": ("--config", "--pin-dir", "--node", TABLE_JSON),
    "ca": (),
    "ca add-node": ("--dir", "NODE"),
    "ca controller": (
        "--root",
        "--trust-domain",
        "--signer",
        "--node-user",
        "--ttl",
        "--kubeconfig",
        "--context",
        "--metrics-port",
        "--metrics-address",
        "--leader-elect/--no-leader-elect",
        "--lease-name",
        "--lease-namespace",
        "--lease-duration",
        "--renew-deadline",
        "--retry-period",
        "--reissue-limit",
        "--reissue-window",
        "--log-level=debug|info|warning|error",
    ),
    "ca init": ("--trust-domain", "--out", "--node", "--force"),
    "ca reissue-node": ("--dir", "NODE"),
    "ca retire-root": ("--dir", "ROOT"),
    "ca rotate-root": ("--dir",),
    "certs": (*AGENT, TABLE_JSON),
    "config": (),
    "config validate": ("PATH", TABLE_JSON),
    "doctor": ("--config", *AGENT, TABLE_JSON),
    "flows": (
        *AGENT,
        "--pod",
        "--namespace",
        "--identity",
        "--port",
        "--state",
        "--since",
        "--sort=start|srtt|bytes|age|retrans",
        "--limit",
        TABLE_WIDE_JSON,
        "-f/--follow",
        "--max-seconds",
    ),
    "inventory": (),
    "inventory validate": ("PATH", TABLE_JSON),
    "policy": (),
    "policy apply": ("-f/--filename", *AGENT, *KUBE, "--wait/--no-wait", "--timeout", *POLICY, TABLE_JSON),
    "policy delete": ("NAME", "-n/--namespace", "--kind", *AGENT, *KUBE),
    "policy diff": ("-f/--filename", *AGENT, *KUBE, *POLICY),
    "policy explain": (
        "-f/--file",
        "--from",
        "--from-pod",
        "--source-ip",
        "--to-pod",
        "--to-namespace",
        "--to-labels",
        "--port",
        "--method",
        "--path",
        "--host",
        "--header",
        "--merge-slashes/--no-merge-slashes",
        "--escaped-slash=reject|keep|decode_and_merge",
        "--inventory",
        *POLICY,
        TABLE_JSON,
    ),
    "policy get": ("NAME", "-n/--namespace", "--kind", *AGENT, "-o/--output=yaml|json"),
    "policy lint": (
        "PATHS",
        "--inventory",
        "--http-ports",
        "--gateway",
        "--gateway-identity",
        *POLICY,
        TABLE_JSON,
    ),
    "policy list": (*AGENT, TABLE_JSON),
    "policy validate": ("PATHS", *POLICY, TABLE_JSON),
    "run": ("--config", "--keep-datapath"),
    "services": (*AGENT, TABLE_WIDE_JSON),
    "stats": (*AGENT, "--from", "--to", TABLE_JSON),
    "status": (*AGENT, TABLE_JSON),
    "uninstall": ("--config", "--force", TABLE_JSON),
    "workloads": (*AGENT, TABLE_JSON),
}


def _walk(cmd, path=()):
    import click

    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))


def _describe(param) -> str:
    """``-o/--output=table|json`` for an option, ``NAME`` for an argument."""
    import click

    if not isinstance(param, click.Option):
        return param.name.upper()
    names = "/".join(sorted(param.opts, key=lambda o: o.startswith("--")) + param.secondary_opts)
    if isinstance(param.type, click.Choice):
        names += "=" + "|".join(param.type.choices)
    return names


def test_command_tree_is_complete_and_every_command_has_help():
    seen = {}
    for path, cmd in _walk(main):
        assert (cmd.help or "").strip(), f"`meshlet {path}` has no help text"
        assert path not in seen, f"`meshlet {path}` is registered twice"
        seen[path] = tuple(_describe(p) for p in cmd.params)
    assert set(seen) == set(COMMAND_TREE), (
        f"missing: {sorted(set(COMMAND_TREE) - set(seen))}; "
        f"unexpected: {sorted(set(seen) - set(COMMAND_TREE))}"
    )
    for path, params in COMMAND_TREE.items():
        assert seen[path] == params, f"`meshlet {path}` options changed"


def test_every_command_answers_help():
    for path, _ in _walk(main):
        r = run(*path.split(), "--help")
        assert r.exit_code == 0, path
        assert r.output.startswith(f"Usage: main {path}".rstrip() + " "), r.output


def test_entry_points_reach_main():
    """pyproject's console script and ``python -m agent.cli`` both run this ``main``."""
    import importlib
    import pathlib
    import subprocess
    import sys
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["meshlet"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("meshlet, version "), r.stderr


def test_lazy_command_table_matches_the_modules():
    """root.COMMAND_MODULES names every command of each module and no other:
    a command added to a module but not to the table would be missing."""
    import importlib

    from agent.cli import root

    modules = set(root.COMMAND_MODULES.values())
    declared = {
        cmd.name: mod for mod in modules for cmd in importlib.import_module(f"agent.cli.{mod}").COMMANDS
    }
    assert declared == root.COMMAND_MODULES
    assert main.list_commands(None) == sorted(declared)  # type: ignore[arg-type]


def test_run_does_not_import_the_other_command_groups():
    """``meshlet run`` (the agent's own process) loads only agent.cli.node."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from agent.cli import main\n"
        "main.get_command(None, 'run')\n"
        "print(sorted(m for m in sys.modules if m.startswith('agent.cli.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['agent.cli.common', 'agent.cli.node', 'agent.cli.root']"


def _status_doc(spread: dict, outbound: dict | None = None) -> dict:
    """The least of /v1/status that ``meshlet status`` prints, one worker."""
    return {
        "node": "node1",
        "mode": "strict",
        "uptime_s": 5,
        "datapath": {
            "how": "adopted",
            "pin_dir": "/sys/fs/bpf/meshlet/node1",
            "counters": {},
            "tc_errors": [],
        },
        "inventory": {"path": "/etc/meshlet/inventory.yaml", "pods": 0, "error": None},
        "enrolled": [],
        "pending": [],
        "proxy": [
            {
                "worker": 0,
                "pid": 42,
                "alive": True,
                "adopted": False,
                "restarts": 0,
                "stats": {
                    "active_connections": 0,
                    "counters": {},
                    "tunnel_spread": spread,
                    "outbound_spread": outbound or {"workers": 2, "ipv4": "least-loaded"},
                },
            }
        ],
    }


def _status_output(monkeypatch, tunnel: dict, outbound: dict | None = None) -> str:
    """What ``meshlet status`` prints for one worker with these spreads."""
    import agent.cli.node as node_cli

    monkeypatch.setattr(node_cli, "admin_get", lambda path, sock: _status_doc(tunnel, outbound))
    r = CliRunner().invoke(main, ["status", "--socket", "/nonexistent.sock"])
    assert r.exit_code == 0, r.output
    return r.output


def test_status_says_when_tunnels_fall_back_to_the_kernels_hash(monkeypatch):
    spread = {
        "workers": 2,
        "ipv4": "least-loaded",
        "ipv6": "hash: cannot load the SK_REUSEPORT program at /x: Invalid argument",
    }
    out = _status_output(monkeypatch, spread)
    assert (
        "ipv6 tunnel connections spread by the kernel's hash, not by load "
        "(cannot load the SK_REUSEPORT program at /x: Invalid argument)"
    ) in out
    assert "ipv4 tunnel" not in out
    assert "kernel's hash" not in _status_output(monkeypatch, {"workers": 2, "ipv4": "least-loaded"})


def test_status_says_when_pod_connections_fall_back_to_the_kernels_hash(monkeypatch):
    outbound = {"workers": 2, "ipv4": "hash: no pin directory /sys/fs/bpf/meshlet/node1"}
    out = _status_output(monkeypatch, {"workers": 2, "ipv4": "least-loaded"}, outbound)
    assert (
        "ipv4 pod (outbound) connections spread by the kernel's hash, not by load "
        "(no pin directory /sys/fs/bpf/meshlet/node1)"
    ) in out
    assert "tunnel connections" not in out
