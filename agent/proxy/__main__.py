"""Proxy worker entry point: ``python -m agent.proxy --state FILE``.

Runs one worker process on uvloop. Several workers may run side by side
(``--worker-id``): they share the listeners through SO_REUSEPORT. The worker
never imports bcc; it reaches the pinned flow map through the bpf() syscall.

At start the worker raises its open-files soft limit to the hard limit and
turns on listener migration for its network namespace (``limits``); it
listens only once its certificates are loaded (``ProxyServer.start``).  On
SIGTERM it stops accepting and drains: live connections get
``--shutdown-grace`` seconds to finish (the supervisor's drain timeout on an
upgrade).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import types
from typing import TYPE_CHECKING, Union

from agent.sitepath import adopt

# The supervisor starts workers with -S: the third-party import path comes
# from the environment, before anything outside the standard library loads.
adopt(os.environ, sys.path)

from agent.datapath.reuseport import MAX_SLOTS as MAX_WORKERS  # noqa: E402
from agent.proxy.limits import enable_listener_migration, raise_nofile  # noqa: E402
from agent.proxy.log import setup_logging  # noqa: E402
from agent.proxy.state import StateError, StateWatcher  # noqa: E402

if TYPE_CHECKING:
    import argparse

#: The parsed command line: a plain namespace from the quick parse, argparse's otherwise.
Args = Union[types.SimpleNamespace, "argparse.Namespace"]

log = logging.getLogger("meshlet.proxy")


#: The options: name -> (dest, type, default, help).  The quick parse reads
#: them; argparse, for --help and errors, is built from them too.
_OPTIONS: dict[str, tuple[str, type, object, str]] = {
    "--state": ("state", str, None, "proxy state file written by the agent (JSON)"),
    "--worker-id": ("worker_id", int, 0, "worker number (default 0)"),
    "--workers": (
        "workers",
        int,
        None,
        "how many workers share the listeners (default: worker id + 1): new tunnel "
        "connections go to the least loaded of that many slots",
    ),
    "--access-log": ("access_log", str, None, "append one JSON line per finished connection here"),
    "--log-level": ("log_level", str, "INFO", "log level (default INFO)"),
    "--shutdown-grace": (
        "shutdown_grace",
        float,
        5.0,
        "seconds active connections may take to finish on SIGTERM (default 5)",
    ),
    "--ready-timeout": (
        "ready_timeout",
        float,
        30.0,
        "seconds to wait for the workload certificates before listening anyway (default 30)",
    ),
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _quick_parse(argv: list[str]) -> types.SimpleNamespace | None:
    """The command line the supervisor gives, parsed without argparse: its
    formatter imports shutil, which imports bz2 and lzma, about 1.5 MB a
    worker keeps for its life.  None for anything unusual (--help, an
    unknown or repeated option, a bad value, a missing --state): argparse
    then parses it and says what is wrong."""
    out: dict[str, object] = {dest: default for dest, _, default, _ in _OPTIONS.values()}
    out["listener_migration"] = True
    seen: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--no-listener-migration" and arg not in seen:
            out["listener_migration"] = False
            seen.add(arg)
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS or name in seen:
            return None
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            value = argv[i + 1]
            i += 1
        dest, kind, _, _ = _OPTIONS[name]
        try:
            out[dest] = kind(value)
        except ValueError:
            return None
        seen.add(name)
        i += 1
    if out["state"] is None or out["log_level"] not in _LOG_LEVELS:
        return None
    return types.SimpleNamespace(**out)


def parse_args(argv: list[str] | None) -> Args:
    quick = _quick_parse(sys.argv[1:] if argv is None else argv)
    if quick is not None:
        return quick
    import argparse as full  # only for --help and errors: see _quick_parse

    p = full.ArgumentParser(prog="python -m agent.proxy", description="meshlet node proxy worker")
    for name, (dest, kind, default, help_text) in _OPTIONS.items():
        p.add_argument(
            name,
            dest=dest,
            type=kind,
            default=default,
            help=help_text,
            required=name == "--state",
            choices=_LOG_LEVELS if name == "--log-level" else None,
        )
    p.add_argument(
        "--no-listener-migration",
        dest="listener_migration",
        action="store_false",
        help="leave net.ipv4.tcp_migrate_req of this network namespace as it is",
    )
    return p.parse_args(argv)


async def _amain(args: Args, watcher: StateWatcher) -> int:
    from agent.proxy.server import ProxyServer

    server = ProxyServer(
        watcher,
        worker_id=args.worker_id,
        workers=args.workers,
        access_log=args.access_log,
        ready_timeout=args.ready_timeout,
        freeze_heap=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except ImportError as e:
        log.error("cannot load the flow table module (%s); is meshlet installed completely?", e)
        return 1
    except OSError as e:
        log.error("cannot start: %s", e)
        await server.stop(grace=0)
        return 1
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: stopped accepting, waiting up to %.1f s for active connections",
            args.shutdown_grace,
        )
        await server.stop(args.shutdown_grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.worker_id, getattr(logging, args.log_level))
    if args.workers is None:
        args.workers = args.worker_id + 1
    if not 1 <= args.workers <= MAX_WORKERS or not 0 <= args.worker_id < args.workers:
        log.error(
            "--worker-id %d of --workers %d: need 0 <= worker id < workers <= %d",
            args.worker_id,
            args.workers,
            MAX_WORKERS,
        )
        return 2
    try:
        watcher = StateWatcher(args.state)
    except (OSError, StateError) as e:
        log.error("cannot load proxy state: %s (is the agent running, and did it write this file?)", e)
        return 2
    before, after = raise_nofile()
    if after != before:
        log.info("open-files limit raised from %d to %d (about %d connections)", before, after, after // 2)
    if args.listener_migration:
        enable_listener_migration()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_amain(args, watcher))


if __name__ == "__main__":
    sys.exit(main())
