"""scripts/vm_summary.py decides whether the VM test passed: a failed demo,
a failed test, no test at all or a guest that never finished must fail it."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "vm_summary", os.path.join(HERE, "..", "..", "scripts", "vm_summary.py"))
vm_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vm_summary)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="{failures}" skipped="1" tests="{tests}">
<testcase classname="tests.privileged.test_mesh" name="test_a" time="1.0"/>
<testcase classname="tests.privileged.test_doctor_kernel" name="test_tcx" time="0.1">
  <skipped message="no tcx before 6.6"/></testcase>
{extra}
</testsuite></testsuites>
"""
FAILED_CASE = """<testcase classname="tests.privileged.test_mesh" name="test_b" time="2.0">
  <failure message="boom">assert 1 == 2</failure></testcase>"""


def doctor(tcx_ok: bool) -> dict:
    return {"ready": True, "checks": [
        {"name": "tcx links", "ok": tcx_ok, "detail": "works" if tcx_ok else "kernel 6.1 < 6.6",
         "fix": None, "required": False},
        {"name": "strict mode attach", "ok": True,
         "detail": "tcx links" if tcx_ok else "clsact/cls_bpf (no tcx on this kernel)",
         "fix": None, "required": False}]}


def make_run(tmp_path, *, demo_rc=0, pytest_rc=0, tests=3, failed=False, result=True,
             junit=True) -> str:
    run = tmp_path / "run"
    run.mkdir()
    if result:
        (run / "result.json").write_text(json.dumps(
            {"kernel": "6.1.0-57-amd64", "demo_rc": demo_rc, "demo_s": 80,
             "pytest_rc": pytest_rc, "pytest_s": 300, "full": False}))
    (run / "doctor.json").write_text(json.dumps(doctor(False)))
    (run / "host-doctor.json").write_text(json.dumps(doctor(True)))
    (run / "demo.log").write_text("client connections made: 9; redirected by eBPF: 9\n"
                                  "== OK: every connection went through ==\n")
    if junit:
        (run / "junit.xml").write_text(JUNIT.format(
            failures=1 if failed else 0, tests=tests, extra=FAILED_CASE if failed else ""))
    return str(run)


def test_a_clean_run_passes_and_shows_both_kernels(tmp_path, capsys):
    assert vm_summary.main(make_run(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "guest kernel: 6.1.0-57-amd64" in out
    assert "tcx links" in out and "clsact/cls_bpf (no tcx on this kernel)" in out
    assert "2 passed, 0 failed, 0 errors, 1 skipped" in out
    assert "skipped tests.privileged.test_doctor_kernel::test_tcx: no tcx before 6.6" in out
    assert "redirected by eBPF: 9" in out and "VM test passed" in out


@pytest.mark.parametrize("kwargs,why", [
    ({"failed": True, "pytest_rc": 1}, "1 test(s) failed in the guest"),
    ({"demo_rc": 1}, "the demo failed in the guest"),
    ({"tests": 0}, "pytest ran no tests in the guest"),
    ({"result": False}, "no result.json"),
    ({"junit": False}, "no junit.xml"),
    ({"pytest_rc": 2}, "pytest exited 2 in the guest"),
])
def test_anything_short_of_a_clean_run_fails(tmp_path, capsys, kwargs, why):
    assert vm_summary.main(make_run(tmp_path, **kwargs)) == 1
    out = capsys.readouterr().out
    assert "VM TEST FAILED" in out and why in out, out
