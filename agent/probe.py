"""The DaemonSet's exec probes: ``python -m agent.probe ready|live [--run-dir DIR]``.

Why not an HTTP probe of the metrics port: the agent runs on the host
network, and during an upgrade two agent pods of a node share its ports, so
the kubelet's probe of the new pod could be answered by the old agent (and
say "ready" before the new one is).  Each pod has its own run dir (an
emptyDir), where its agent keeps ``health.json`` (``Agent.write_health``):
the verdict of ``/readyz`` and the time of its last loop tick.

- ``live``: the agent's loop ticked within :data:`WINDOW` seconds (the
  file is rewritten at least every 5 s while it ticks).
- ``ready``: live, and the last verdict was ready: this agent owns the node
  (agent/handover.py) and its proxy workers run, with its identity loaded.

Exit 0 or 1 with the reason on stdout (the kubelet shows it in the pod's
events).  Standard library only: it runs every few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["WINDOW", "DEFAULT_RUN_DIR", "verdict", "main"]

DEFAULT_RUN_DIR = "/run/meshlet"
"""The DaemonSet's runDir (deploy/configmap.yaml)."""

WINDOW = 60.0
"""As /healthz (agent.observe.prometheus.LIVENESS_WINDOW): a loop silent this
long is stuck."""


def verdict(kind: str, doc: object, now: float, window: float = WINDOW) -> tuple[bool, str]:
    """Pure: ``kind`` is ``live`` or ``ready``; ``doc`` the parsed health file."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tick"), (int, float)):
        return False, "health file without a tick time"
    age = now - float(doc["tick"])
    if age > window:
        return False, f"the agent's loop has not ticked for {age:.0f}s"
    if kind == "live":
        return True, "ok"
    if doc.get("ready") is True:
        return True, "ok"
    return False, str(doc.get("why") or "not ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.probe", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("live", "ready"))
    ap.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="the agent's runDir (default %(default)s)")
    args = ap.parse_args(argv)
    path = os.path.join(args.run_dir, "health.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        print(f"{path} does not exist yet: the agent has not finished starting")
        return 1
    except (OSError, ValueError) as e:
        print(f"cannot read {path}: {e}")
        return 1
    ok, why = verdict(args.kind, doc, time.time())
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
