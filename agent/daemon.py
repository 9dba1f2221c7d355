"""The node agent's long-running process: ``python -S -P -m agent.daemon --config FILE``.

``meshlet run`` checks the config (a bad one is reported by file, line and
field, as every command reports it) and then *replaces itself* with this
process (``exec``: the same pid, so a DaemonSet's container, systemd or a
shell's job control sees one process, and signals reach the agent).  What
runs for the node's life so carries neither click and the CLI's modules nor
what `site` loads (``agent.sitepath``): about 2 MB less of the agent's
memory (issue #13 item 6; README, "Footprint").  ``-P``: the working
directory is not put first on the import path (``-m`` would), so a stray
``yaml.py`` where the agent was started cannot shadow a module.

``MESHLET_AGENT_SITE=1`` keeps ``meshlet run`` in its own process, with
`site` (a sitecustomize, coverage or a profiler of one's own in the agent).

Only the standard library is imported at module level: ``main`` first
completes ``sys.path`` from the environment.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["AGENT_SITE_ENV", "argv", "exec_daemon", "main", "serve"]

AGENT_SITE_ENV = "MESHLET_AGENT_SITE"  # "1": `meshlet run` runs the agent in-process, with `site`
USAGE = "usage: python -S -P -m agent.daemon --config FILE  (started by `meshlet run --config FILE`)"


def argv(config_path: str) -> list[str]:
    """The daemon's command line for ``config_path``."""
    return [sys.executable, "-S", "-P", "-m", "agent.daemon", "--config", config_path]


def exec_daemon(config_path: str) -> NoReturn:
    """Replace this process with the daemon (never returns; an exec that
    fails raises OSError)."""
    from .sitepath import child_env

    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv(config_path), child_env(os.environ, sys.path))


def _fail(msg: str, code: int = 1) -> NoReturn:
    # The CLI's error form (agent.cli.common.die), without click.
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def serve(cfg) -> NoReturn:
    """Run the agent for ``cfg`` (an ``AgentConfig``) until SIGTERM/SIGINT and
    exit with its status; an agent or datapath error is one ``error:`` line
    and exit 1.  ``meshlet run`` calls this in-process under
    ``MESHLET_AGENT_SITE=1``, the daemon always."""
    import logging

    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {cfg.node} %(name)s %(levelname)s %(message)s",
    )
    from .app import AgentError, run_agent
    from .datapath.loader import DatapathError

    try:
        sys.exit(run_agent(cfg))
    except (AgentError, DatapathError) as e:
        _fail(str(e))


def _config_path(args: list[str]) -> str:
    if len(args) == 2 and args[0] == "--config" and args[1]:
        return args[1]
    if len(args) == 1 and args[0].startswith("--config=") and len(args[0]) > len("--config="):
        return args[0].split("=", 1)[1]
    _fail(f"expected --config FILE, got {' '.join(args) or 'nothing'}\n{USAGE}", 2)


def main(args: list[str]) -> NoReturn:
    from .sitepath import adopt

    adopt(os.environ, sys.path)  # before anything outside the standard library
    path = _config_path(args)
    from .config import load_config
    from .yamlsrc import SourceError

    try:
        cfg = load_config(path)
    except SourceError as e:  # changed since `meshlet run` checked it
        _fail(f"invalid config:\n{e}")
    except OSError as e:
        _fail(f"cannot read config {path}: {e.strerror}")
    serve(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
