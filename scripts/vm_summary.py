"""Summarize a VM test run (scripts/vm.sh) for the CI log: both kernels,
the features each one got (the doctor's checks side by side), the demo's
verdict and the guest's pytest counts.  Exit 1 when the run is not a pass.

    python scripts/vm_summary.py vm-results/<time>

Reads, from that directory: result.json, doctor.json, junit.xml, demo.log
(copied out of the guest) and host-doctor.json (this machine).
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET


def _load_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def features(doctor: dict | None) -> dict[str, tuple[bool, str]]:
    if not doctor:
        return {}
    return {c["name"]: (c["ok"], c["detail"]) for c in doctor["checks"]}


def junit_counts(path: str) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts (tests, failures, errors, skipped) and the failed / skipped test ids."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            sk = case.find("skipped")
            if sk is not None:
                skipped.append(f"{name}: {sk.get('message', '')}")
    return counts, failed, skipped


def main(run: str) -> int:
    problems = []
    result = _load_json(os.path.join(run, "result.json"))
    guest = _load_json(os.path.join(run, "doctor.json"))
    host = _load_json(os.path.join(run, "host-doctor.json"))
    print("\n== VM test summary " + "=" * 52)
    print(f"host kernel:  {os.uname().release}")
    print(f"guest kernel: {result['kernel'] if result else '?'}")

    hf, gf = features(host), features(guest)
    if gf:
        print(f"\n{'feature (meshlet doctor)':<26} {'host':<6} guest")
        for name in list(hf) + [n for n in gf if n not in hf]:
            h, g = hf.get(name), gf.get(name)
            mark = lambda x: "-" if x is None else ("ok" if x[0] else "NO")  # noqa: E731
            line = f"{name:<26} {mark(h):<6} {mark(g)}"
            if name == "strict mode attach" or (h and g and h[0] != g[0]):
                line += f"   host: {h[1] if h else '-'} | guest: {g[1] if g else '-'}"
            print(line)
    else:
        problems.append("no doctor output from the guest")

    if result is None:
        problems.append("the guest produced no result.json (it did not get to the end)")
    else:
        print(f"\ndemo in the guest: exit {result['demo_rc']} in {result['demo_s']} s")
        try:
            with open(os.path.join(run, "demo.log")) as f:
                lines = [ln.rstrip() for ln in f]
            key = [ln for ln in lines if "client connections made" in ln or
                   ln.startswith("== OK") or ln.startswith("== FAILED") or ln.startswith("- ")]
            for ln in key[-6:]:
                print(f"  {ln}")
        except OSError:
            problems.append("no demo.log from the guest")
        if result["demo_rc"] != 0:
            problems.append(f"the demo failed in the guest (exit {result['demo_rc']})")

    junit = os.path.join(run, "junit.xml")
    if os.path.exists(junit):
        counts, failed, skipped = junit_counts(junit)
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        secs = f" in {result['pytest_s']} s" if result else ""
        scope = "whole privileged tier" if result and result.get("full") else "datapath selection"
        print(f"\npytest in the guest ({scope}): {passed} passed, {counts['failures']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped{secs}")
        for s in skipped:
            print(f"  skipped {s}")
        for f in failed:
            print(f"  FAILED {f}")
        if counts["tests"] == 0:
            problems.append("pytest ran no tests in the guest")
        if failed or counts["failures"] or counts["errors"]:
            problems.append(f"{len(failed)} test(s) failed in the guest")
    else:
        problems.append("no junit.xml from the guest")
    if result and result["pytest_rc"] != 0 and not any("failed in the guest" in p for p in problems):
        problems.append(f"pytest exited {result['pytest_rc']} in the guest")

    if problems:
        print("\nVM TEST FAILED:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nVM test passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
