"""The import path of a process started with ``python -S`` (no `site`).

The node's long-running processes, the agent (``agent.daemon``) and its
proxy workers (``agent.proxy``), start with ``-S``: `site` would run the
installation's ``.pth`` hooks (an editable install's finder, a
distribution's certificate shims), which import pathlib, tempfile, zipfile
and more into a process that never uses them, memory it keeps for the
node's life (issue #13 item 6), and code a privileged process need not run.
Without `site`, the third-party directories are not on ``sys.path``, so the
parent passes its own path in the environment (``child_env``) and the child
appends it after its standard library, where `site` would have put it
(``adopt``), before it imports anything else.  Standard library only: this
module is imported before the path is complete.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["SITE_PATH_ENV", "adopt", "child_env", "child_site_path"]

SITE_PATH_ENV = "MESHLET_SITE_PATH"  # os.pathsep-separated: what the child appends to sys.path
# The directory holding the ``agent`` package: first on PYTHONPATH, so that
# ``-m agent...`` resolves before the rest of the path is adopted.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_site_path(path: list[str]) -> list[str]:
    """The entries of ``path`` (the parent's ``sys.path``) that a child
    started with ``-S`` lacks: everything but the standard library's own
    directories (site-packages, dist-packages, .pth entries, PYTHONPATH), in
    order, each once."""
    import sysconfig  # the parent's side only: a child never loads it

    stdlib = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    stdlib |= {os.path.join(d, "lib-dynload") for d in list(stdlib)}
    zipped = f"python{sys.version_info[0]}{sys.version_info[1]}.zip"
    out: list[str] = []
    for p in path:
        if not p or p in stdlib or os.path.basename(p) == zipped or p in out:
            continue
        out.append(p)
    return out


def child_env(env: Mapping[str, str], path: list[str]) -> dict[str, str]:
    """``env`` for a child started with ``-S -m agent...``: ``PACKAGE_ROOT``
    first on ``PYTHONPATH`` (once), and ``SITE_PATH_ENV`` from ``path`` (the
    parent's ``sys.path``)."""
    out = dict(env)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_ROOT]
    out["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *rest])
    out[SITE_PATH_ENV] = os.pathsep.join(child_site_path(path))
    return out


def adopt(env: Mapping[str, str], path: list[str]) -> None:
    """Append the entries of ``env[SITE_PATH_ENV]`` that ``path`` (the
    child's ``sys.path``) lacks, in order: the child's first step, before it
    imports anything outside the standard library.  Without the variable (a
    process started by hand, with `site`) nothing changes."""
    for p in env.get(SITE_PATH_ENV, "").split(os.pathsep):
        if p and p not in path:
            path.append(p)
