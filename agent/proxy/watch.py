"""Watching the files the agent publishes for the proxy workers.

The agent replaces each file atomically (write + rename); a worker polls it
by its :func:`agent.filesig.file_sig` signature (inode, size, mtime) and, when
that changes, loads it again.  :class:`FileWatcher` is that loop, once:

- ``current`` is always a good value: a file that does not load is logged,
  counted (``errors``, ``last_error``) and the previous value stays in force;
- ``reloads`` counts the times ``current`` was replaced;
- with ``version``, a reload that yields the same version is not a change;
- with ``missing``, a vanished file means a value (for policies: none apply);
  without it, a vanished file is an error and the last good value stays;
- ``on_change(old, new)`` runs after a change; if it raises, the exception
  is logged and the new value stays (the file is good; the callback is not).

It reads files, so it lives with the proxy, but it has no event loop in it
apart from :meth:`run`.  Users: ``StateWatcher`` (agent/proxy/state.py),
``PolicyWatcher`` (agent/proxy/authz.py) and :class:`TrafficWatcher` here.

:class:`TrafficWatcher` gives a worker the current
:class:`~agent.traffic.trafficpolicy.TrafficPolicySet` from ``traffic.json``, which
the agent's policy store writes next to the proxy state file (shape:
:func:`agent.traffic.trafficpolicy.compile_traffic`).  No file means no traffic
policies (every service gets :data:`~agent.traffic.trafficpolicy.DEFAULTS`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from agent.filesig import file_sig
from agent.traffic.settings import (
    DATA_FORMAT,
    PUBLISHED_FILE,
    PUBLISHED_FORMAT,
    TrafficDataError,
    TrafficPolicySet,
    policies_from_data,
    traffic_set,
)

__all__ = ["FileWatcher", "TrafficWatcher", "TrafficFileError", "load_traffic_file", "traffic_path"]

T = TypeVar("T")

_UNSEEN = (-1, -1, -1)  # a signature no file has: the first check() always loads


class FileWatcher(Generic[T]):
    """Polls one file and keeps the last good value loaded from it (see the
    module docstring).

    ``load(path)`` returns the value or raises one of ``errors``;
    ``describe(value)`` words the value in log lines ("generation 7");
    ``what`` names the file's content ("proxy state").  The constructor does
    not read the file: call :meth:`check` (or :meth:`prime`) first.
    """

    def __init__(
        self,
        path: str,
        load: Callable[[str], T],
        initial: T,
        *,
        what: str,
        errors: tuple[type[BaseException], ...] = (OSError, ValueError),
        missing: Callable[[T], T] | None = None,
        version: Callable[[T], Hashable] | None = None,
        describe: Callable[[T], str] = str,
        hint: str = "",
        on_change: Callable[[T, T], None] | None = None,
        interval: float = 0.5,
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = path
        self.current: T = initial
        self.interval = interval
        self.on_change = on_change
        self.reloads = 0
        self.errors = 0
        self.last_error: str | None = None
        self._load = load
        self._load_errors = errors
        self._missing = missing
        self._version = version
        self._describe = describe
        self._what = what
        self._hint = hint
        self._log = logger or logging.getLogger("meshlet.proxy")
        self._sig: tuple[int, int, int] | None = _UNSEEN

    def prime(self) -> None:
        """Load the file now, raising what ``load`` raises (no last good value
        to keep yet); for users that must not start without one."""
        sig = self._stat()
        self.current = self._load(self.path)
        self._sig = sig

    def _stat(self) -> tuple[int, int, int] | None:
        return file_sig(self.path)

    def check(self) -> bool:
        """Reload if the file changed.  True if ``current`` was replaced."""
        sig = self._stat()
        if sig == self._sig:
            return False
        self._sig = sig
        if sig is None:
            return self._gone()
        try:
            new = self._load(self.path)
        except self._load_errors as e:
            self._load_failed(e)
            return False
        return self._swap(new)

    async def check_async(self) -> bool:
        """:meth:`check`, with the file read and loaded in a worker thread:
        the event loop keeps serving while a large file loads (10,000
        policy rules), and the new value replaces ``current`` in one step,
        on the loop.  A file replaced again during the load is loaded again
        at the next check (its signature changed)."""
        sig = self._stat()
        if sig == self._sig:
            return False
        if sig is None:
            self._sig = sig
            return self._gone()
        try:
            new = await asyncio.to_thread(self._load, self.path)
        except self._load_errors as e:
            self._sig = sig
            self._load_failed(e)
            return False
        self._sig = sig
        return self._swap(new)

    def _gone(self) -> bool:
        if self._missing is None:
            self._error(f"{self._what} file {self.path} disappeared; keeping {self._describe(self.current)}")
            return False
        new = self._missing(self.current)
        if self._changed(new):
            self._log.warning("%s is gone: %s", self.path, self._describe(new))
        return self._swap(new, loaded=False)

    def _load_failed(self, e: BaseException) -> None:
        self._error(
            f"cannot reload {self._what}: {e}; keeping "
            f"{self._describe(self.current)}" + (f". {self._hint}" if self._hint else "")
        )

    def _swap(self, new: T, loaded: bool = True) -> bool:
        """Make ``new`` current if it is a change; True if it was."""
        if loaded:
            self.last_error = None
        if not self._changed(new):
            return False
        old, self.current = self.current, new
        self.reloads += 1
        self._log.info("loaded %s %s (was %s)", self._what, self._describe(new), self._describe(old))
        if self.on_change is not None:
            try:
                self.on_change(old, new)
            except Exception:  # noqa: BLE001 - the new value is good; keep it
                self._log.exception("%s change callback failed", self._what)
        return True

    def _changed(self, new: T) -> bool:
        return self._version is None or self._version(new) != self._version(self.current)

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        self._log.error("%s", msg)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_async()


# --------------------------------------------------------------------------
# TrafficPolicy


class TrafficFileError(ValueError):
    pass


def traffic_path(state_path: str) -> str:
    """``traffic.json`` next to the proxy state file (both live in runDir)."""
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), PUBLISHED_FILE)


def load_traffic_file(path: str) -> TrafficPolicySet:
    """Read ``traffic.json``.  Raises TrafficFileError (or OSError)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise TrafficFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != PUBLISHED_FORMAT:
        raise TrafficFileError(f"{path}: expected an object with format {PUBLISHED_FORMAT}")
    text, version = doc.get("yaml"), doc.get("version")
    if not isinstance(text, str) or not isinstance(version, str):
        raise TrafficFileError(f"{path}: yaml and version must be strings")
    if "data" in doc:
        if doc.get("dataFormat") != DATA_FORMAT:
            raise TrafficFileError(
                f"{path}: dataFormat {doc.get('dataFormat')!r} is not {DATA_FORMAT} "
                "(is the agent from the same release?)"
            )
        try:
            return policies_from_data(doc["data"], version=version, source=path)
        except TrafficDataError as e:
            raise TrafficFileError(str(e)) from None
    if text.strip():
        # a file without data (an agent from before it was published): the
        # YAML front end, loaded only for this
        from agent.traffic.trafficpolicy import parse_traffic_policies

        try:
            ts = parse_traffic_policies(text, path)
        except ValueError as e:  # SourceError
            raise TrafficFileError(f"{path}: the embedded traffic policies do not load: {e}") from None
    else:
        ts = traffic_set(())
    if ts.version != version:
        raise TrafficFileError(
            f"{path}: the embedded traffic policies have version {ts.version}, "
            f"but the file says {version} (is the agent from the same release?)"
        )
    return ts


def _describe_traffic(ts: TrafficPolicySet) -> str:
    return f"traffic policies version {ts.version} ({len(ts)} policies)"


class TrafficWatcher(FileWatcher[TrafficPolicySet]):
    """Polls ``traffic.json`` and keeps the last good TrafficPolicySet.

    ``current.settings_for(namespace, service, port)`` is what the L7 path
    asks per request (or per connection).  Loads once at construction; a
    missing file is the empty set.  Stats: ``current.version``, ``len(current)``,
    ``reloads``, ``errors``, ``last_error``."""

    def __init__(
        self,
        path: str,
        *,
        interval: float = 0.5,
        on_change: Callable[[TrafficPolicySet, TrafficPolicySet], None] | None = None,
    ) -> None:
        super().__init__(
            path,
            load_traffic_file,
            traffic_set(()),
            what="traffic policies",
            errors=(OSError, TrafficFileError),
            missing=lambda _old: traffic_set(()),
            version=lambda ts: ts.version,
            describe=_describe_traffic,
            on_change=on_change,
            interval=interval,
        )
        self.check()

    @classmethod
    def for_state(cls, state_path: str, **kw) -> TrafficWatcher:
        """The watcher of the ``traffic.json`` next to ``state_path``."""
        return cls(traffic_path(state_path), **kw)

    def stats(self) -> dict:
        return {
            "version": self.current.version,
            "count": len(self.current),
            "reloads": self.reloads,
            "errors": self.errors,
            "last_error": self.last_error,
        }
