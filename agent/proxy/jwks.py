"""JWKS files for RequestAuthentication (``jwksFile``), cached per proxy worker.

The destination proxy verifies tokens on its event loop with keys it already
holds; reading and parsing a key file happens elsewhere:

- the first request that needs a file reads it (bounded:
  :data:`agent.policy.jwtauth.MAX_JWKS_BYTES`), once;
- after that, at most every :attr:`JwksFiles.interval` seconds a request
  that uses the file schedules a check in a worker thread (``stat``: inode,
  mtime, size; a changed file is read and parsed there), and the new key set
  replaces the old in one assignment.  Requests meanwhile use the previous
  keys: a rotation never blocks traffic.

A file that cannot be read or parsed is logged; a file that was never good
gives no keys (its tokens are refused with 401: fail closed); a file that
goes bad after being good keeps its last good keys until it is fixed or
removed (a key rotation half-written by an editor does not lock users out),
and a removed file gives no keys.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from agent.policy.jwtauth import MAX_JWKS_BYTES, JwksError, KeySet, parse_jwks

__all__ = ["JwksFiles", "JWKS_FILES"]

log = logging.getLogger("meshlet.proxy")

_Stat = tuple[int, int, int]


class JwksFiles:
    """path -> the file's :class:`KeySet` (see the module docstring)."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._keys: dict[str, tuple[_Stat | None, KeySet | None]] = {}
        self._checked: dict[str, float] = {}
        self._pending: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self.reloads = 0
        self.errors = 0

    def get(self, path: str) -> KeySet | None:
        entry = self._keys.get(path)
        now = self._clock()
        if entry is None:
            self._checked[path] = now
            self._load(path, None)
            entry = self._keys.get(path)
        elif now - self._checked.get(path, 0.0) >= self.interval and path not in self._pending:
            self._checked[path] = now
            self._pending.add(path)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwks")
            self._pool.submit(self._reload, path)
        return entry[1] if entry is not None else None

    def _reload(self, path: str) -> None:
        try:
            self._load(path, self._keys.get(path))
        finally:
            self._pending.discard(path)

    def _load(self, path: str, old: tuple[_Stat | None, KeySet | None] | None) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            if old is None or old[0] is not None:
                log.warning("JWKS file %s: %s; tokens of its issuer are refused", path, e.strerror)
                self.errors += 1
            self._keys[path] = (None, None)
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if old is not None and old[0] == key:
            return
        try:
            if st.st_size > MAX_JWKS_BYTES:
                raise JwksError(f"{st.st_size} bytes; at most {MAX_JWKS_BYTES}")
            with open(path, "rb") as f:
                ks = parse_jwks(f.read(MAX_JWKS_BYTES + 1))
        except (OSError, JwksError) as e:
            self.errors += 1
            kept = old[1] if old is not None else None
            log.warning(
                "JWKS file %s does not load (%s); %s",
                path,
                e,
                "keeping its previous keys" if kept is not None else "tokens of its issuer are refused",
            )
            self._keys[path] = (key, kept)
            return
        self._keys[path] = (key, ks)
        self.reloads += 1
        log.info("JWKS file %s: %d keys loaded", path, len(ks.keys))


#: The worker's cache (one per process; the proxy passes ``JWKS_FILES.get``).
JWKS_FILES = JwksFiles()
