"""A proxy worker's command line (agent/proxy/__main__.py): the quick parse
that keeps argparse (and the shutil, bz2 and lzma its formatter imports) out
of every worker reads exactly what argparse reads, and hands everything
else (--help, errors, abbreviations) to argparse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import __main__ as worker

REPO = Path(__file__).resolve().parents[2]


def full_parse(argv: list[str]) -> dict:
    """argparse's reading of ``argv``, as a dict ({"error": code} when it exits)."""
    worker_quick = worker._quick_parse
    try:
        worker._quick_parse = lambda _argv: None
        return vars(worker.parse_args(argv))
    except SystemExit as e:
        return {"error": e.code}
    finally:
        worker._quick_parse = worker_quick


def test_the_supervisors_command_line_is_parsed_without_argparse():
    from agent import supervisor

    sup = supervisor.ProxySupervisor("/run/x", "/run/x/proxy-state.json", 2)
    argv = sup._argv(sup.workers[1])[sup._argv(sup.workers[1]).index("agent.proxy") + 1 :]
    quick = worker._quick_parse(argv)
    assert quick is not None and vars(quick) == full_parse(argv)
    assert quick.state == "/run/x/proxy-state.json" and quick.worker_id == 1
    assert quick.workers == 2  # the tunnel listener's slots: every worker of the node


VALUES = {
    "--state": st.sampled_from(["/run/s.json", "", "x=y"]),
    "--worker-id": st.sampled_from(["0", "3", "-1", "x", "1.5", " 7"]),
    "--workers": st.sampled_from(["1", "4", "0", "x"]),
    "--access-log": st.sampled_from(["/tmp/a.log", "-"]),
    "--log-level": st.sampled_from(["INFO", "DEBUG", "debug", "TRACE"]),
    "--shutdown-grace": st.sampled_from(["30", "0.5", "-2", "nan", "inf", "soon"]),
    "--ready-timeout": st.sampled_from(["3", "1e2", ""]),
}


@st.composite
def command_lines(draw) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["opt", "opt=", "flag", "odd"]))
        if kind == "flag":
            argv.append("--no-listener-migration")
        elif kind == "odd":
            argv.append(draw(st.sampled_from(["--help", "--stat", "--bogus", "pos", "-h", "--"])))
        else:
            name = draw(st.sampled_from(sorted(VALUES)))
            value = draw(VALUES[name])
            argv += [f"{name}={value}"] if kind == "opt=" else [name, value]
    return argv


@settings(max_examples=400, deadline=None)
@given(command_lines())
def test_the_quick_parse_reads_what_argparse_reads_or_leaves_it_to_argparse(argv):
    quick = worker._quick_parse(argv)
    if quick is not None:  # repr: nan is a value argparse reads too, and nan != nan
        assert {k: repr(v) for k, v in vars(quick).items()} == {
            k: repr(v) for k, v in full_parse(argv).items()
        }


@pytest.mark.parametrize(
    "argv",
    [
        ["--state", "s", "--worker-id", "x"],
        ["--worker-id", "1"],  # no --state
        ["--state", "s", "--state", "t"],
        ["--state", "s", "--log-level", "TRACE"],
        [
            "--state",
            "s",
            "--shutdown-grace",
            "-1",
        ],  # argparse takes a negative number; the quick parse does not try
        ["--stat", "s"],  # an abbreviation
        ["--help"],
    ],
)
def test_anything_unusual_goes_to_argparse(argv):
    assert worker._quick_parse(argv) is None


def test_help_and_errors_are_argparses():
    r = subprocess.run(
        [sys.executable, "-m", "agent.proxy", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--shutdown-grace" in r.stdout and "meshlet node proxy worker" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "agent.proxy", "--worker-id", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "the following arguments are required: --state" in r.stderr


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--worker-id", "2", "--workers", "2"], "--worker-id 2 of --workers 2"),
        (["--workers", "65"], "--worker-id 0 of --workers 65"),
        (["--workers", "0"], "--worker-id 0 of --workers 0"),
        (["--worker-id", "-1"], "--worker-id -1 of --workers 0"),
    ],
)
def test_a_worker_id_outside_the_workers_is_refused_before_anything_starts(tmp_path, argv, why):
    state = tmp_path / "state.json"  # never read: the check comes first
    r = subprocess.run(
        [sys.executable, "-m", "agent.proxy", "--state", str(state), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and why in r.stderr and "need 0 <= worker id < workers <= 64" in r.stderr
    assert "cannot load proxy state" not in r.stderr


def test_a_worker_parsing_the_supervisors_command_line_loads_no_argparse():
    import os

    from agent import sitepath

    code = (
        "import sys\n"
        "import agent.proxy.__main__ as worker\n"
        "worker.parse_args(['--state', '/run/s.json', '--worker-id', '1', '--shutdown-grace', '30'])\n"
        "print(sorted(m for m in ('argparse', 'shutil', 'bz2', 'lzma', 'gettext') if m in sys.modules))\n"
    )
    env = sitepath.child_env(os.environ, sys.path)
    r = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
