"""What every command group shares: the ``-o`` option, errors and exit codes,
JSON and table rendering, and reaching the agent's admin API.

Heavy modules are imported inside the functions that need them, so that
``meshlet --help`` and the offline commands start fast.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import NoReturn

import click

OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def die(msg: str, code: int = 1) -> NoReturn:
    """``error: msg`` on stderr, then exit ``code`` (1: the command found a
    problem; 3: some commands' "inputs do not load")."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def echo_json(data, indent: int | None = 2, **kw) -> None:
    """``data`` as JSON on stdout: indented by default, one line with ``indent=None``."""
    click.echo(json.dumps(data, indent=indent, **kw))


def table_lines(rows: list[list[str]] | list[tuple[str, ...]]) -> list[str]:
    """Rows (the header first) as aligned lines: every column but the last
    padded to its widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)] + [0]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]


def load_config(path: str):
    """The agent config at ``path``, or exit 1 naming file:line:column and field."""
    from ..config import load_config as load
    from ..yamlsrc import SourceError

    try:
        return load(path)
    except SourceError as e:
        die(f"invalid config:\n{e}")
    except OSError as e:
        die(f"cannot read config {path}: {e.strerror}")


# --- the agent's admin API ---------------------------------------------------------------

AGENT_OPTS = [
    click.option(
        "--socket",
        "sock",
        help="Agent admin socket (default: the only one under /run/meshlet, or $MESHLET_ADMIN_SOCKET).",
    ),
    click.option("--node", help="Node name (socket /run/meshlet/<node>/admin.sock)."),
]


def agent_opts(f):
    """``--socket`` and ``--node``: which agent to ask (see :func:`admin_socket`)."""
    for opt in reversed(AGENT_OPTS):
        f = opt(f)
    return f


def admin_socket(sock: str | None, node: str | None) -> str:
    """The agent's admin socket: ``--socket``, else $MESHLET_ADMIN_SOCKET, else
    ``--node``'s, else the only one under /run/meshlet."""
    if sock:
        return sock
    if os.environ.get("MESHLET_ADMIN_SOCKET"):
        return os.environ["MESHLET_ADMIN_SOCKET"]
    if node:
        return f"/run/meshlet/{node}/admin.sock"
    found = sorted(glob.glob("/run/meshlet/*/admin.sock"))
    if len(found) == 1:
        return found[0]
    if not found:
        die("no agent admin socket under /run/meshlet/*/ (is `meshlet run` running?); pass --socket")
    die("several agents run here; pick one with --node or --socket")


def unreachable(sock: str, e: OSError, code: int = 1) -> NoReturn:
    die(f"cannot reach the agent at {sock}: {e.strerror or e}; is `meshlet run` running?", code)


def admin_call(
    sock: str, method: str, path: str, body: dict | None = None, *, timeout: float = 5.0, fail: int = 1
) -> tuple[int, dict]:
    """``method path`` on the agent: (HTTP status, JSON body); exit ``fail``
    when the agent cannot be reached or answers garbage."""
    from ..adminclient import admin_request

    try:
        return admin_request(sock, method, path, body, timeout=timeout)
    except OSError as e:
        unreachable(sock, e, fail)
    except ValueError as e:
        die(f"unexpected answer from {sock}: {e}", fail)


def admin_get(path: str, sock: str) -> dict:
    """GET ``path`` from the agent; exit 1 unless it answers 200."""
    status, data = admin_call(sock, "GET", path)
    if status != 200:
        die(f"agent answered {status}: {data.get('error')}")
    return data
