"""Small file-system helpers shared by the agent and the policy store.

Files the agent and the proxy write hold what an attacker on the node would
like to read: every pod with its address and labels (the proxy state file),
the policies, identities and HTTP paths (the access log).  So they are
created private from the first byte — never created world-readable and
tightened afterwards:

- ``write_atomic`` files (proxy state, policies.json/policies.yaml, pid and
  identity files): ``0600`` unless the caller asks otherwise;
- append-only logs (``open_append``: the access log, the proxy workers'
  logs): ``0640``, so a log shipper in the file's group may read them.

A file that already exists with wider permissions (left by an older
version) is narrowed when it is opened or replaced.
"""

from __future__ import annotations

import os

__all__ = ["PRIVATE", "LOG_MODE", "write_atomic", "open_append", "narrow_mode"]

PRIVATE = 0o600
"""State, policies, pid files: the owner only."""
LOG_MODE = 0o640
"""Logs: the owner writes, the group (a log shipper) reads, others nothing."""


def write_atomic(path: str, data: str, *, mode: int = PRIVATE) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the
    new one, never a part: write a temporary file beside it, fsync, rename.

    The temporary file (``<path>.tmp.<pid>``) is created with ``mode`` (so
    the replaced file has it from its first byte, whatever it had before)
    and removed when anything fails (a full disk, a missing directory's
    race, an interrupt); the error is re-raised and ``path`` is untouched."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        try:
            os.unlink(tmp)  # a leftover of a crash: O_EXCL below must create a fresh inode
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as f:
            narrow_mode(f.fileno(), mode)  # umask can only narrow; this makes the mode exact-or-narrower
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def open_append(path: str, *, mode: int = LOG_MODE, binary: bool = False, buffering: int = -1):
    """Open ``path`` for appending, creating it with ``mode``; an existing
    file with wider permissions is narrowed to ``mode``.  Text files are
    UTF-8."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        narrow_mode(fd, mode)
        if binary:
            return os.fdopen(fd, "ab", buffering=buffering)
        return os.fdopen(fd, "a", buffering=buffering, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def narrow_mode(fd: int, mode: int) -> None:
    """Clear every permission bit of the open file ``fd`` that ``mode`` does
    not grant (never widens: a stricter umask stays in force)."""
    current = os.fstat(fd).st_mode & 0o7777
    if current & ~mode:
        os.fchmod(fd, current & mode)
