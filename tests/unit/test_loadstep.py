"""The loader step's contract with the agent (agent/datapath/loadstep.py),
without root: the spec it reads, what it answers to input it cannot use, and
how the agent side reports a step that died without a verdict.  The kernel
side (refused programs, a step killed half-way) is in
tests/privileged/test_loadstep.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.datapath import loadstep
from agent.datapath.loader import Datapath, DatapathError, DatapathSpec, render


def spec(tmp_path, **kw) -> DatapathSpec:
    return DatapathSpec(node="n1", pin_dir=str(tmp_path / "pins"), cgroup=str(tmp_path / "cg"),
                        redirect_ip4="10.0.0.1", redirect_ip6="fd00::1", outbound_port=15001,
                        mesh_mark=0x4000, **kw)


def test_the_spec_survives_the_trip_to_the_step(tmp_path):
    s = spec(tmp_path, exclude_ports=(22, 7999), exclude_cidrs=("10.1.0.0/16",), flow_tracking=False,
             tc_attach="clsact")
    assert loadstep.spec_from_json(loadstep.spec_to_json(s)) == s


@pytest.mark.parametrize("text, says", [
    ("{", "not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"node": "n1", "pin_dirr": "/x"}', "unknown field(s) pin_dirr"),
    ('{"node": "n1"}', "missing"),
])
def test_a_spec_the_step_cannot_use_is_named(text, says):
    with pytest.raises(ValueError, match="spec on stdin") as e:
        loadstep.spec_from_json(text)
    assert says in str(e.value)


def test_the_step_answers_bad_input_with_a_json_error_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "agent.datapath.loadstep"], input='{"node": 1',
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == loadstep.EXIT_USAGE
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"].startswith("loader step: spec on stdin: not JSON")


def test_compiling_outside_the_step_is_refused(tmp_path):
    """The agent's own process never imports bcc: Datapath refuses to compile
    unless the loader step allowed it."""
    s = spec(tmp_path)
    with pytest.raises(DatapathError, match="outside the datapath loader step"):
        Datapath(s)._compile(render(s))


def test_a_step_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(DatapathError, match="cannot start the datapath loader step"):
        loadstep.run(spec(tmp_path), python=str(tmp_path / "no-such-python"))


def test_a_step_that_dies_without_a_verdict_is_cleaned_up_and_reported(tmp_path):
    """A step that exits without its JSON line (a crash): the agent puts the
    tail of its stderr in the error and removes what a fresh load pinned."""
    s = spec(tmp_path)
    os.makedirs(os.path.join(s.pin_dir, "progs"))
    open(os.path.join(s.pin_dir, "progs", "ml_connect4"), "w").close()  # as a killed step left it
    crash = tmp_path / "crash"
    crash.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.read()\n"
                     "print('Segmentation fault in libLLVM', file=sys.stderr)\nsys.exit(139)\n")
    crash.chmod(0o755)
    with pytest.raises(DatapathError) as e:
        loadstep.run(s, python=str(crash))
    msg = str(e.value)
    assert "exited with 139 without a result" in msg
    assert "Segmentation fault in libLLVM" in msg
    assert "nothing new is attached" in msg
    assert not os.path.exists(s.pin_dir)


def test_a_step_that_reports_an_error_raises_it_verbatim(tmp_path):
    s = spec(tmp_path)
    step = tmp_path / "step"
    step.write_text(f"#!{sys.executable}\nimport json, sys\nsys.stdin.read()\n"
                    "print(json.dumps({'error': 'the kernel refused the datapath: fix X'}))\nsys.exit(1)\n")
    step.chmod(0o755)
    with pytest.raises(DatapathError, match="^the kernel refused the datapath: fix X$"):
        loadstep.run(s, python=str(step))
