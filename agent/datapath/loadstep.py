"""The loader step: compile, load, attach and pin the datapath in a short-lived
process, so the long-running agent never imports bcc.

``import bcc`` maps libbcc, which embeds clang/LLVM (~60 MB, ~110 MB once a
program is compiled), and a process never gives that back.  So the agent
(``Datapath.open``) adopts a complete, current pin set itself through the
plain bpf(2) syscall, and for anything else (a fresh load, an upgrade of a
running datapath built from other C) runs

    python -m agent.datapath.loadstep      (the spec as JSON on stdin)

which does the work with bcc (``Datapath.load_or_upgrade``), pins everything
under bpffs and exits.  The agent then adopts what it pinned.

The contract with the agent:

- stdout: one JSON line, ``{"how": "loaded" | "upgraded" | "adopted"}`` on
  success or ``{"error": "<message with the fix>"}`` on a DatapathError
  (exit status 1);
- stderr: the step's log and whatever bcc and the verifier print; the agent
  copies it to its own stderr and puts its tail in the error message when the
  step fails without a message of its own (a crash, a signal);
- a fresh load either pins a complete datapath or removes what it pinned; an
  upgrade either swaps every program or leaves the running one as it was
  (both as ``Datapath`` guarantees them in one process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from typing import Any

from . import loader

log = logging.getLogger("meshlet.datapath")

#: Exit status of a step that failed with a DatapathError (its message is on stdout).
EXIT_REFUSED = 1
#: Exit status of a step started with input it cannot read.
EXIT_USAGE = 2
#: How much of a failed step's stderr goes into the agent's error message.
STDERR_TAIL = 3000


def spec_to_json(spec: loader.DatapathSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def spec_from_json(text: str) -> loader.DatapathSpec:
    """The DatapathSpec serialized by ``spec_to_json``; ValueError names what is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"spec on stdin: not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"spec on stdin: expected a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(loader.DatapathSpec)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"spec on stdin: unknown field(s) {', '.join(unknown)}")
    args: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return loader.DatapathSpec(**args)
    except TypeError as e:
        raise ValueError(f"spec on stdin: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m agent.datapath.loadstep``."""
    logging.basicConfig(
        level=os.environ.get("MESHLET_LOADSTEP_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s loadstep %(name)s %(levelname)s %(message)s",
    )
    try:
        spec = spec_from_json(sys.stdin.read())
    except ValueError as e:
        print(json.dumps({"error": f"loader step: {e}"}), flush=True)
        return EXIT_USAGE
    loader.allow_compile()
    d = loader.Datapath(spec)
    try:
        how = d.load_or_upgrade()
    except loader.DatapathError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return EXIT_REFUSED
    finally:
        d.close()
    print(json.dumps({"how": how}), flush=True)
    return 0


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict):
            return out
    return None


def run(spec: loader.DatapathSpec, python: str = sys.executable) -> str:
    """Run the loader step for ``spec`` in a child process and return how the
    datapath now is ('loaded', 'upgraded', 'adopted').  Raises DatapathError
    with the step's own message, or with the tail of its stderr when it died
    without one.  A fresh load the step could not finish (it was killed) is
    removed here, so nothing half-attached stays behind."""
    was_attached = loader.Datapath(spec)._attached()
    env = dict(os.environ)
    env["MESHLET_LOADSTEP_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    try:
        proc = subprocess.run(
            [python, "-m", "agent.datapath.loadstep"],
            input=spec_to_json(spec),
            capture_output=True,
            text=True,
            env=env,
        )
    except OSError as e:
        raise loader.DatapathError(f"cannot start the datapath loader step ({python}): {e}") from e
    if proc.stderr:
        sys.stderr.write(proc.stderr)
        sys.stderr.flush()
    out = _last_json(proc.stdout)
    if proc.returncode == 0 and out is not None and out.get("how") in ("loaded", "upgraded", "adopted"):
        return str(out["how"])
    if out is not None and isinstance(out.get("error"), str):
        raise loader.DatapathError(out["error"])
    # Died without a verdict (a signal, an out-of-memory kill, a bug).
    tail = proc.stderr[-STDERR_TAIL:].strip()
    how = (
        f"was killed by signal {-proc.returncode}"
        if proc.returncode < 0
        else f"exited with {proc.returncode}"
    )
    if was_attached:
        what = (
            "the datapath that was running stays attached as the step left it; start the agent "
            "again to finish the upgrade, or run 'meshlet doctor'"
        )
    else:
        loader.remove_pins(spec.pin_dir, keep_clsact=True)
        what = "what it had pinned was removed: nothing new is attached"
    raise loader.DatapathError(
        f"the datapath loader step (python -m agent.datapath.loadstep) {how} without a result; "
        f"{what}. Its last output:\n{tail or '(nothing)'}"
    )


if __name__ == "__main__":
    sys.exit(main())
