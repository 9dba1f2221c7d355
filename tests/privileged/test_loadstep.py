"""The datapath loader step (issue #13 item 6): bcc compiles, loads and pins
in a short-lived child (agent/datapath/loadstep.py), never in the agent.

On a real kernel, each in a cgroup and a pin dir of its own, removed even on
failure: a fresh load the kernel refuses, C that does not compile, and a step
killed half-way all leave nothing pinned and nothing attached, and the error
the agent raises carries the step's own message.  Whether a running agent
maps LLVM is checked in test_lifecycle.py, on the mesh it already runs
through load, in-place upgrade and adoption.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.privileged import llvm_mappings, require_privileged

require_privileged()

from agent import cgroup as cg  # noqa: E402
from agent.datapath import bpfsys, loadstep  # noqa: E402
from agent.datapath.loader import CGROUP_HOOKS, Datapath, DatapathError, DatapathSpec  # noqa: E402

pytestmark = pytest.mark.privileged

REPO_BPF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bpf")


@pytest.fixture
def node(tmp_path):
    """(spec, cgroup dir) of a datapath of this test's own, torn down after."""
    name = f"meshlet-test-loadstep-{os.getpid()}"
    pin_dir = f"/sys/fs/bpf/{name}"
    cgdir = os.path.join(cg.cgroup2_mount(), name)
    os.mkdir(cgdir)
    spec = DatapathSpec(node="loadstep", pin_dir=pin_dir, cgroup=cgdir, redirect_ip4="10.0.0.1",
                        redirect_ip6=None, outbound_port=15001, mesh_mark=0x4000)
    try:
        yield spec, cgdir
    finally:
        Datapath(spec).teardown()
        os.rmdir(cgdir)


def attached(cgdir: str) -> int:
    fd = os.open(cgdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sum(len(bpfsys.prog_query(fd, t)) for t in {h.attach_type for h in CGROUP_HOOKS})
    finally:
        os.close(fd)


def left_behind(spec: DatapathSpec) -> list[str]:
    out = []
    for root, _, files in os.walk(spec.pin_dir):
        out += [os.path.relpath(os.path.join(root, f), spec.pin_dir) for f in files]
    return sorted(out)


# Datapath.open() in a fresh interpreter, as the agent runs it: whether bcc
# was imported or LLVM mapped can only be told in a process no other test
# has imported bcc into (the suite's own process may have).
_CHILD = """
import json, os, sys
from agent.datapath import loadstep
from agent.datapath.loader import Datapath, DatapathError
from tests.support.privileged import llvm_mappings
try:
    out = {"how": Datapath(loadstep.spec_from_json(sys.stdin.read())).open()}
except DatapathError as e:
    out = {"error": str(e)}
out["bcc"] = "bcc" in sys.modules
out["llvm"] = llvm_mappings(os.getpid())
print(json.dumps(out))
"""


def open_in_child(spec: DatapathSpec) -> tuple[dict, str]:
    """(what the child's ``Datapath(spec).open()`` did, its stderr)."""
    p = subprocess.run([sys.executable, "-c", _CHILD], input=loadstep.spec_to_json(spec), capture_output=True,
                       text=True, timeout=300, cwd=os.path.dirname(REPO_BPF))
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def edited_bpf(tmp_path, rel: str, old: str, new: str) -> str:
    d = os.path.join(str(tmp_path), "bpf")
    shutil.copytree(REPO_BPF, d)
    path = os.path.join(d, rel)
    with open(path) as f:
        text = f.read()
    assert old in text, (rel, old)
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))
    return d


def test_a_program_the_kernel_refuses_leaves_nothing_and_says_why(node, tmp_path, monkeypatch):
    spec, cgdir = node
    monkeypatch.setenv("MESHLET_BPF_DIR", edited_bpf(
        tmp_path, "tc.c", "int ml_tc_to_pod(struct __sk_buff *skb)\n{",
        "int ml_tc_to_pod(struct __sk_buff *skb)\n{\n"
        "\tif (*(volatile char *)(long)skb->data == 1)\n\t\treturn ML_TC_DROP;"))
    out, err = open_in_child(spec)
    assert "refused the datapath's programs" in out.get("error", ""), out
    # The verifier's log, printed by bcc in the step, reached the agent's stderr.
    assert "ml_tc_to_pod" in err
    assert left_behind(spec) == [] and attached(cgdir) == 0
    assert not out["bcc"] and out["llvm"] == [], out  # the compile ran in the step, not in the agent


def test_c_that_does_not_compile_leaves_nothing(node, tmp_path, monkeypatch):
    spec, cgdir = node
    monkeypatch.setenv("MESHLET_BPF_DIR", edited_bpf(
        tmp_path, "sock.c", "int ml_connect4(struct bpf_sock_addr *ctx)\n{",
        "int ml_connect4(struct bpf_sock_addr *ctx)\n{\n\tthis is not C;"))
    with pytest.raises(DatapathError, match="bcc failed to compile the datapath"):
        Datapath(spec).open()
    assert left_behind(spec) == [] and attached(cgdir) == 0


KILLER = """\
import os, signal, subprocess, sys, time
# Runs the real loader step, kills it (SIGKILL) once it has pinned its maps,
# then dies the same way: a step that never reports.
step = subprocess.Popen([sys.executable] + sys.argv[1:])
meta = os.path.join(os.environ["PIN_DIR"], "ml_meta")
while step.poll() is None and not os.path.exists(meta):
    time.sleep(0.001)
step.kill()
step.wait()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_step_killed_half_way_leaves_nothing(node, tmp_path, monkeypatch):
    spec, cgdir = node
    killer = tmp_path / "killer"
    killer.write_text(f"#!{sys.executable}\n{KILLER}")
    killer.chmod(0o755)
    monkeypatch.setenv("PIN_DIR", spec.pin_dir)
    with pytest.raises(DatapathError) as e:
        loadstep.run(spec, python=str(killer))
    assert f"was killed by signal {int(signal.SIGKILL)}" in str(e.value)
    assert "nothing new is attached" in str(e.value)
    assert left_behind(spec) == [] and attached(cgdir) == 0


def test_the_step_loads_adopts_and_the_agent_side_stays_without_llvm(node):
    """One fresh load through the step and an adoption, then a positive
    control: the LLVM check does see bcc in a process that imported it."""
    spec, cgdir = node
    out, _ = open_in_child(spec)
    assert out == {"how": "loaded", "bcc": False, "llvm": []}, out
    assert attached(cgdir) == len([h for h in CGROUP_HOOKS if spec.flow_tracking or "flow" not in h.name])
    out, _ = open_in_child(spec)
    assert out == {"how": "adopted", "bcc": False, "llvm": []}, out
    importer = "import bcc, sys; print('in', flush=True); sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", importer], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "in"
            assert any("libbcc" in m for m in llvm_mappings(p.pid))
        finally:
            p.kill()
