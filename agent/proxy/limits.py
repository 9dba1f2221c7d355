"""Process-wide resources of one proxy worker: open files, listener
hand-over, memory.

- **Open files.** Every proxied connection holds two descriptors (the
  accepted socket and the upstream one).  The common default soft limit
  (1024) caps a worker at about 500 connections, so a worker raises its
  soft ``RLIMIT_NOFILE`` to the hard limit at start (``raise_nofile``).
  ``fd_exhausted`` recognises the errors that mean "out of descriptors"
  (EMFILE: this process, ENFILE: the whole system), which the roles count
  as an overload, never as a bug.
- **Listener hand-over.** Workers share their listeners with SO_REUSEPORT.
  When one of them closes its listener (a drain on upgrade, or a crash),
  the connections the kernel had already queued on that listener are lost
  unless ``net.ipv4.tcp_migrate_req`` is 1: then the kernel moves them to a
  sibling listener (Linux ≥ 5.14).  ``enable_listener_migration`` sets it
  for the worker's network namespace (it is a per-namespace setting and
  changes nothing for sockets without SO_REUSEPORT siblings).
- **Memory.** ``trim_memory`` is ``memory.trim`` (``malloc_trim(0)``),
  kept here under its old name; ``agent.proxy.memory`` says why.

All of it is best effort: a worker that cannot raise its limit or set the
sysctl still serves, and says so once in its log.
"""

from __future__ import annotations

import errno
import logging
import resource

from agent.proxy.memory import trim as trim_memory

__all__ = [
    "FD_ERRNOS",
    "MIGRATE_REQ_PATH",
    "enable_listener_migration",
    "fd_exhausted",
    "nofile_limit",
    "raise_nofile",
    "trim_memory",
]

log = logging.getLogger("meshlet.proxy")

FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
MIGRATE_REQ_PATH = "/proc/sys/net/ipv4/tcp_migrate_req"


def fd_exhausted(exc: BaseException) -> bool:
    """True for "too many open files" (this process or the system)."""
    return isinstance(exc, OSError) and exc.errno in FD_ERRNOS


def nofile_limit() -> int:
    """The current soft RLIMIT_NOFILE (RLIM_INFINITY as a large number)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning(
            "cannot raise the open-files soft limit from %d to the hard limit %d (%s): "
            "this worker can hold about %d connections",
            soft,
            hard,
            e,
            soft // 2,
        )
        return soft, soft
    return soft, hard


def enable_listener_migration(path: str = MIGRATE_REQ_PATH) -> bool:
    """Set ``net.ipv4.tcp_migrate_req=1`` in this network namespace; True
    when it is on (already, or now)."""
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return True
        with open(path, "w") as f:
            f.write("1\n")
        return True
    except OSError as e:
        log.warning(
            "cannot enable %s (%s): connections queued on a worker's listener when it stops "
            "or crashes are reset instead of moving to a sibling worker (needs Linux >= 5.14 "
            "and CAP_NET_ADMIN)",
            path,
            e.strerror or e,
        )
        return False
