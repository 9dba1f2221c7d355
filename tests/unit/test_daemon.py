"""`meshlet run` becomes ``python -S -P -m agent.daemon`` (agent/daemon.py):
the agent's long-running process carries neither click, the CLI's modules nor
what `site` loads.  Here: the import path a ``-S`` child gets
(agent/sitepath.py), the exec `run` makes, the daemon's own errors, and what
the daemon's process imports.  The daemon running a real agent is every
privileged mesh test (``tests.support.privileged.agent_llvm`` checks its
command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import daemon, sitepath
from agent.cli import main
from tests.unit.test_config import MINIMAL

REPO = Path(__file__).resolve().parents[2]


def test_the_child_site_path_is_everything_but_the_standard_library_in_order():
    stdlib = sysconfig.get_path("stdlib")
    path = [
        "",
        "/usr/lib/python311.zip",
        stdlib,
        os.path.join(stdlib, "lib-dynload"),
        "/venv/site-packages",
        "/usr/lib/python3/dist-packages",
        "/venv/site-packages",
        "/repo",
    ]
    assert sitepath.child_site_path(path) == [
        "/venv/site-packages",
        "/usr/lib/python3/dist-packages",
        "/repo",
    ]


def test_adopting_the_site_path_appends_only_what_is_missing():
    path = ["/repo", "/usr/lib/python3.11"]
    sitepath.adopt({sitepath.SITE_PATH_ENV: os.pathsep.join(["/a", "/repo", "", "/b"])}, path)
    assert path == ["/repo", "/usr/lib/python3.11", "/a", "/b"]
    sitepath.adopt({}, path)  # a process started by hand, with `site`: unchanged
    assert path == ["/repo", "/usr/lib/python3.11", "/a", "/b"]


def test_the_child_env_puts_the_package_root_first_once():
    root = sitepath.PACKAGE_ROOT
    env = sitepath.child_env({"PYTHONPATH": os.pathsep.join(["/x", root]), "KEEP": "1"}, ["/v/site-packages"])
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/x"]
    assert env[sitepath.SITE_PATH_ENV] == "/v/site-packages" and env["KEEP"] == "1"
    # the daemon passes its env on to the workers: still once
    again = sitepath.child_env(env, [root, "/v/site-packages"])
    assert again["PYTHONPATH"].split(os.pathsep) == [root, "/x"]
    assert sitepath.child_env({}, [])["PYTHONPATH"] == root


class Execed(Exception):
    pass


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(MINIMAL)
    return p


def test_run_checks_the_config_then_execs_the_daemon_in_its_place(config, monkeypatch):
    seen = {}

    def execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise Execed

    monkeypatch.delenv(daemon.AGENT_SITE_ENV, raising=False)
    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(Execed):
        CliRunner().invoke(main, ["run", "--config", str(config)], catch_exceptions=False)
    assert seen["path"] == sys.executable
    assert seen["argv"] == [sys.executable, "-S", "-P", "-m", "agent.daemon", "--config", str(config)]
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == sitepath.PACKAGE_ROOT
    assert seen["env"][sitepath.SITE_PATH_ENV] == os.pathsep.join(sitepath.child_site_path(sys.path))


def test_run_with_a_bad_config_never_execs(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("exec with a bad config"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node: node1\nnope: 1\n")
    r = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert r.exit_code == 1 and "c.yaml:2:" in r.output and "nope" in r.output


def test_run_says_when_the_exec_fails(config, monkeypatch):
    def execve(path, argv, env):
        raise PermissionError(13, "Permission denied")

    monkeypatch.delenv(daemon.AGENT_SITE_ENV, raising=False)
    monkeypatch.setattr(os, "execve", execve)
    r = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert r.exit_code == 1 and f"cannot start the agent ({sys.executable}): Permission denied" in r.output


def test_meshlet_agent_site_keeps_the_agent_in_the_cli_process(config, monkeypatch):
    served = []
    monkeypatch.setenv(daemon.AGENT_SITE_ENV, "1")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("exec under MESHLET_AGENT_SITE=1"))
    monkeypatch.setattr(daemon, "serve", lambda cfg: served.append(cfg.node) or sys.exit(0))
    r = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert r.exit_code == 0 and served == ["node1"]


def _daemon(*args: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """The daemon started as `meshlet run` starts it (its argv and environment)."""
    argv = daemon.argv("X")[:-2] + list(args)
    env = sitepath.child_env(os.environ, sys.path)
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_daemon_names_a_config_that_went_bad_after_run_checked_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node: Node_1\n")
    r = _daemon("--config", str(cfg))
    assert r.returncode == 1 and r.stderr.startswith("error: invalid config:") and "c.yaml:1:" in r.stderr
    r = _daemon(f"--config={tmp_path / 'gone.yaml'}")
    assert (
        r.returncode == 1
        and r.stderr.startswith("error: ")
        and "gone.yaml: cannot read file: No such file" in r.stderr
    )


@pytest.mark.parametrize(
    "args", [(), ("--config",), ("--config", ""), ("--conf", "x"), ("--config", "a", "b")]
)
def test_the_daemon_refuses_any_other_command_line(args):
    r = _daemon(*args)
    assert r.returncode == 2 and "expected --config FILE" in r.stderr and "meshlet run" in r.stderr


#: Never in the daemon's process: the CLI, `site`, and standard modules that
#: cost memory for the node's life where a few lines do (ctypes.util's
#: find_library pulls tempfile and shutil, shutil pulls bz2 and lzma).
NOT_IN_THE_DAEMON = (
    "click",
    "site",
    "sitecustomize",
    "agent.cli",
    "argparse",
    "gzip",
    "shutil",
    "tempfile",
    "uuid",
    "platform",
    "ctypes.util",
    "bz2",
    "lzma",
)


def test_the_daemons_process_loads_no_click_cli_or_site(tmp_path):
    """What the daemon imports to run an agent (its own module, the app, and
    what the agent loads at start, its preflight checks run) resolves with
    -S -P, and leaves out click, the CLI, `site` and NOT_IN_THE_DAEMON: the
    memory the exec is for.  A stray module in the working directory does
    not shadow a real one (-P)."""
    import gzip

    (tmp_path / "yaml.py").write_text("raise SystemExit('the working directory shadowed yaml')\n")
    (tmp_path / "config.gz").write_bytes(gzip.compress(b"CONFIG_BPF=y\n# CONFIG_X is not set\n"))
    code = (
        "import os, sys\n"
        "from agent.sitepath import adopt\n"
        "adopt(os.environ, sys.path)\n"
        "import agent.daemon, agent.app, agent.admin, agent.doctor, agent.config, agent.supervisor\n"
        "import agent.datapath.loader, agent.datapath.flowtable, agent.datapath.probe\n"
        "import agent.identity.issuer\n"
        "import agent.policy.store, agent.policy.kernel, agent.workloads.yamlfile, agent.handover, yaml\n"
        "from agent.proxy import memory\n"
        "assert agent.doctor._read_config('config.gz') == {'CONFIG_BPF': 'y'}\n"
        "assert agent.doctor.check_tools({'sh': 'dash'}).ok and len(agent.handover.new_instance()) == 12\n"
        "memory.heap()\n"
        f"print(sorted(m for m in sys.modules if m.startswith({NOT_IN_THE_DAEMON!r})))\n"
    )
    argv = [sys.executable, "-S", "-P", "-c", code]
    env = sitepath.child_env(os.environ, sys.path)
    r = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
