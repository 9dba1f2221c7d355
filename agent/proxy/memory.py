"""How a proxy worker hands memory back after a burst of connections.

Measured (``scripts/bench_conns.py``, 10,000 cross-node connections held and
closed; issue #12 item 7), a worker's RSS stayed high after the connections
closed for three reasons, each with its fix:

1. **A leak in CPython's ssl** (< 3.12.7, python/cpython#116810): each read
   of ``SSLObject.session`` leaks a copy of the session.  Fixed at the
   source in ``tls`` (a client fetches a session only when its cache needs
   one, and keeps a refused one for a while: behind a multi-worker proxy
   half the offers are refused), not here.  The copies leaked during a
   burst were also what kept its heap pages resident afterwards (point 3).
2. **pymalloc arenas.**  CPython serves objects of up to 512 bytes from its
   own 1 MiB arenas and returns an arena to the system only when every
   object in it is gone; a few survivors of a burst (a cache entry, a
   reloaded state object) keep whole arenas resident, and ``malloc_trim``
   cannot touch them.  Workers therefore run with ``PYTHONMALLOC=malloc``
   (``worker_env``): Python objects come from glibc's heap, where
   ``malloc_trim`` returns every free *page*, so a survivor pins 4 KiB, not
   1 MiB.  Measured cost: none visible in held RSS per connection or in the
   connection rates (see README, "Connection scale").  An operator's own
   ``PYTHONMALLOC`` is kept (``PYTHONMALLOC=pymalloc`` restores CPython's
   default).
3. **Free heap pages kept by glibc.**  ``trim`` (``malloc_trim(0)``) gives
   them back; the server calls it when ``TrimSchedule`` says a burst is over
   (``ProxyServer._maintain``): once half of it has closed, and again when
   the live connections fall below a low-water mark, so the pages the last
   half freed are not kept until the next burst.

Measured on a cold 10,000 burst (README, "Connection scale"), without
effect on held memory: a fixed ``MALLOC_MMAP_THRESHOLD_`` (65536, which
also stops glibc raising the threshold) with ``MALLOC_TRIM_THRESHOLD_``,
and ``MALLOC_ARENA_MAX=1``.  But see point 6 for bulk transfers.

4. **The collector's view of the heap.**  Not memory handed back, but the
   pauses it costs: a worker holds a few hundred thousand long-lived
   objects (modules, cryptography, state, policy) and every full (oldest
   generation) collection walked all of them: 100-200 ms with the event
   loop stopped, on the 2-core benchmark machine, each time a burst of
   connections opened or closed (``scripts/p99_probe.py --churn``: two per
   5 s of new connections, and one from the trim after each wrk run).
   ``freeze_heap`` (``gc.freeze`` after a full collection, once the worker
   has loaded everything and before it listens) moves those objects out of
   the collector's sight: the same collections then took 0.7-8 ms.  Frozen
   objects are still freed by reference counting; only cycles among them
   are never collected, and there are none that matter among what exists
   before the first connection.  ``report`` shows the frozen count.

5. **The agent's threads.**  glibc gives each thread that allocates its own
   arena (up to 8 per core), and each keeps its own free pages.  The agent
   runs its tick, metrics, Kubernetes watches and CA work in threads, none
   of them hot, so it caps them at start (``agent_arena_limit``,
   ``limit_arenas``: ``mallopt(M_ARENA_MAX)``, the ``MALLOC_ARENA_MAX``
   setting without needing the variable at exec; an operator's own
   ``MALLOC_ARENA_MAX`` is kept).  Measured (``scripts/bench_footprint.py
   --pods 100 --workers 1``, A/B alternated): agent RSS 1.1-1.3 MB lower.
   The workers are not capped: at idle it changed nothing there (see
   above), and it was not measured under load.

6. **Bulk transfers and glibc's own trimming** (issue #13).  A relayed
   mTLS stream allocates and frees buffers of about 256 KiB several times
   per read (the read, the TLS output, the decrypted chunk).  With glibc's
   defaults they came from the top of the heap, which glibc shrank
   (``brk``) each time more than its trim threshold was free and grew
   again at the next read: 50,000-95,000 minor page faults per GB relayed
   on the sending worker (each a zeroed 4 KiB page).  ``worker_env`` fixes
   ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB (the buffers come from the heap)
   and ``MALLOC_TRIM_THRESHOLD_`` at 4 MiB (at most that much is kept free
   at the top between bursts; ``trim`` still hands everything back after
   one): faults fell to under 500 per GB, and the worker's CPU per GB by
   10-15% on each side (A/B in the same minutes, iperf3 cross-node).  An
   operator's own values are kept.  (Both thresholds since raised: point 7.)

7. **Idle after traffic, and big batches** (issue #13).  ``TrimSchedule``
   follows connection counts, so one long stream (a bulk transfer) or a few
   keep-alive connections never make a "burst", and what they freed stayed
   with glibc.  ``IdleTrim`` watches the process's own CPU time instead:
   once the worker has worked (``IDLE_WORK`` of CPU since the last trim)
   and then stayed quiet (under ``IDLE_BUSY`` of each second for
   ``IDLE_AFTER`` seconds), the maintenance round collects and trims; it
   does too when a pooled tunnel connection closed (its TLS buffers, grown
   to the largest batch it sent, go only with the collector).  Measured
   (``scripts/bench_footprint.py --nodes 2 --traffic``): a worker back at
   its start-up RSS once its pooled connection expired (46 MB; 50-52 before).
   With the worker handing memory back when idle, glibc may keep more while
   traffic runs: a bulk stream's TLS output comes out of the memory BIO in
   batches of up to a few MiB per flush, and with point 6's 1 MiB mmap
   threshold each batch was a fresh ``mmap`` (zeroed pages: 247,000 minor
   faults per GB in a loop of 4 MiB batches through an ``SSLObject``,
   against 2,400 with a 32 MiB threshold; the same ~200,000 per GB showed
   on the sending worker in some first bulk runs of a fresh mesh).  So
   ``MALLOC_TUNING`` now raises the mmap threshold to 32 MiB (glibc's
   maximum): the batches are reused from the heap.  And the first bulk run
   of a fresh worker frees more than 64 MiB at the top of the heap at
   times (what a stream has in flight between the pod, the tunnel window
   and the TLS output), so with a 64 MiB trim threshold glibc still shrank
   and regrew it: 80,000-216,000 faults per GB in 3 of 4 first runs; with
   1 GiB, 3,200-4,200 in 3 of 3 (``scripts/bulk_ab.py``, iperf3 -t3 in a
   fresh 2-node mesh).  So the trim threshold is 1 GiB: glibc on its own
   no longer gives the heap back at all, the trims here do (after a burst,
   once idle), and memory held *during* traffic is the high-water mark.

8. **Start-up garbage** (issue #13 item 6).  Both processes free a good
   part of what start-up allocates (the sources compiled, YAML and JSON
   parsed, the loader child spawned), in holes glibc keeps: the workers'
   trim threshold (point 7) never gives them back, and glibc trims only
   the top of the agent's heap.  So each trims once when start-up is over:
   a worker after ``freeze_heap``, before it listens; the agent after its
   first tick (``release_startup``).  Measured (``scripts/bench_footprint.py
   --pods 2,100 --workers 1``, alternated with the code before): node
   distinct pages 72.5/74.4 -> 71.4/74.0 MB, the worker's free heap at
   idle 0.7 -> 0.4 MB.

Not glibc (musl, or another allocator preloaded): ``trim`` and
``limit_arenas`` are no-ops and say why once in the log; ``heap`` returns
None.  libc is reached through ctypes only in this module.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "AGENT_ARENAS",
    "WORKER_ALLOCATOR",
    "Heap",
    "IdleTrim",
    "TrimSchedule",
    "agent_arena_limit",
    "freeze_heap",
    "heap",
    "limit_arenas",
    "release_startup",
    "report",
    "rss_kb",
    "trim",
    "worker_env",
]

log = logging.getLogger("meshlet.proxy")

WORKER_ALLOCATOR = "malloc"  # PYTHONMALLOC for proxy workers: see the module docstring
AGENT_ARENAS = 2  # glibc malloc arenas the agent's threads share: see the module docstring, point 5
_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
MALLOC_TUNING = {  # glibc, for proxy workers: see points 6 and 7 of the module docstring
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
}
WORKER_SITE_ENV = "MESHLET_WORKER_SITE"  # "1": workers start with `site` after all
TRIM_AFTER = 256  # connections finished before free memory is handed back mid-burst
TRIM_LOW_WATER = 16  # live connections at or below which a burst is over
IDLE_WORK = 0.2  # CPU seconds since the last trim that make a quiet spell worth a trim
IDLE_BUSY = 0.05  # CPU seconds per second under which a process is quiet (a scrape now and then)
IDLE_AFTER = 1.5  # seconds of quiet before the trim


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for a proxy worker: ``env`` plus ``PYTHONMALLOC=malloc``
    unless ``env`` already chooses an allocator, and glibc's thresholds of
    ``MALLOC_TUNING`` unless ``env`` sets them."""
    out = dict(env)
    if not out.get("PYTHONMALLOC"):
        out["PYTHONMALLOC"] = WORKER_ALLOCATOR
    for k, v in MALLOC_TUNING.items():
        if not out.get(k):
            out[k] = v
    return out


class TrimSchedule:
    """When a worker hands free memory back (pure; fed by the maintenance
    round with the live connection count and the running count of finished
    ones).  Due when, since the last trim, either

    - at least ``after`` connections finished and the live ones are down to
      half of the most seen (a burst is closing, not a steady churn), or
    - any finished and the live ones fell to ``low_water`` or below after
      having been above it (the burst is over: the pages freed after a
      mid-burst trim are handed back too, not kept until the next burst).

    A steady churn below the mark trims only every ``after`` connections."""

    def __init__(self, after: int = TRIM_AFTER, low_water: int = TRIM_LOW_WATER) -> None:
        self.after = after
        self.low_water = low_water
        self.peak = 0  # most live connections seen since the last trim
        self.finished_at = 0  # finished connections at the last trim

    def due(self, live: int, finished: int) -> bool:
        self.peak = max(self.peak, live)
        pending = finished - self.finished_at
        closing = pending >= self.after and live * 2 <= self.peak
        drained = pending > 0 and live <= self.low_water < self.peak
        if not (closing or drained):
            return False
        self.finished_at, self.peak = finished, live
        return True


class IdleTrim:
    """When a process hands free memory back because it went quiet after
    work (pure; fed with the process's CPU seconds and a monotonic clock,
    e.g. ``time.process_time()`` and ``time.monotonic()``, at any pace):
    due once it used at least ``work`` CPU seconds since the last trim and
    then under ``busy`` CPU seconds per second for ``after`` seconds.  Point
    7 of the module docstring.  An idle process is never due again: a trim
    needs fresh work first."""

    def __init__(self, work: float = IDLE_WORK, busy: float = IDLE_BUSY, after: float = IDLE_AFTER) -> None:
        self.work = work
        self.busy = busy
        self.after = after
        self._trimmed_cpu: float | None = None  # CPU seconds at the last trim (the first sample at start)
        self._quiet_cpu = 0.0  # CPU seconds and time when the current quiet spell began
        self._quiet_since: float | None = None
        self._last: tuple[float, float] | None = None

    def due(self, cpu: float, now: float) -> bool:
        if self._trimmed_cpu is None or self._last is None:
            self._trimmed_cpu = cpu
            self._last = (cpu, now)
            return False
        last_cpu, last_now = self._last
        self._last = (cpu, now)
        if now - last_now <= 0:
            return False
        if cpu - last_cpu > self.busy * (now - last_now):  # working: any quiet spell ends
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since, self._quiet_cpu = last_now, last_cpu
        quiet_for = now - self._quiet_since
        if quiet_for < self.after or self._quiet_cpu - self._trimmed_cpu < self.work:
            return False
        self._trimmed_cpu = cpu
        return True


@dataclass(frozen=True)
class Heap:
    """glibc's view of this process's heap (``mallinfo2``), in bytes."""

    arena: int  # obtained from the system with brk/mmap for the heaps (main and thread arenas)
    in_use: int  # allocated chunks in those heaps
    free: int  # free chunks in those heaps (resident or not)
    mmapped: int  # large allocations served by their own mmap


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc: ctypes.CDLL | None = None
_why_not: str | None = None  # set once we know glibc's malloc is not there


def _glibc() -> ctypes.CDLL | None:
    global _libc, _why_not
    if _libc is not None or _why_not is not None:
        return _libc
    try:  # "glibc 2.36"; musl has no such name
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError):
        name, version = "", ""
    if name != "glibc":
        _why_not = f"the C library is {name or 'not glibc'}, not glibc"
    else:
        try:
            lib = ctypes.CDLL(None)  # the C library already loaded (see datapath.bpfsys)
        except OSError as e:
            lib, _why_not = None, f"cannot load libc ({e})"
        if lib is not None and not all(hasattr(lib, f) for f in ("malloc_trim", "mallinfo2", "mallopt")):
            _why_not = f"glibc {version} lacks malloc_trim/mallinfo2/mallopt (needs >= 2.33)"
        elif lib is not None:
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_trim.restype = ctypes.c_int
            lib.mallinfo2.restype = _MallInfo2
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.mallopt.restype = ctypes.c_int
            _libc = lib
    if _why_not is not None:
        log.info("memory: not trimming the heap after bursts: %s", _why_not)
    return _libc


def trim() -> bool:
    """``malloc_trim(0)``: return every free heap page to the system.  True
    when glibc released memory; False when it had none to release or glibc
    is not the allocator (logged once)."""
    lib = _glibc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def release_startup() -> bool:
    """Once start-up is over: collect, then hand the free heap back
    (``trim``; point 8 of the module docstring).  True when glibc released
    memory."""
    gc.collect()
    return trim()


def agent_arena_limit(env: Mapping[str, str]) -> int | None:
    """How many malloc arenas the agent caps itself to: ``AGENT_ARENAS``,
    or None (no cap from us) when ``env`` already sets ``MALLOC_ARENA_MAX``,
    which glibc applies by itself."""
    return None if env.get("MALLOC_ARENA_MAX") else AGENT_ARENAS


def limit_arenas(n: int) -> bool:
    """Let this process's threads share at most ``n`` glibc malloc arenas
    (``mallopt(M_ARENA_MAX, n)``; point 5 of the module docstring).  Call
    before the threads start: arenas made earlier stay.  True when glibc
    took it."""
    if n < 1:
        raise ValueError(f"limit_arenas: {n} arenas; need at least 1")
    lib = _glibc()
    return bool(lib.mallopt(_M_ARENA_MAX, n)) if lib is not None else False


def freeze_heap() -> int:
    """Collect, then freeze (``gc.freeze``) every object alive now, so later
    collections (the oldest generation's above all) no longer walk them:
    see the module docstring, point 4.  Call once, with no connection open
    yet (their transports and protocols form cycles that only the collector
    frees).  Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def heap() -> Heap | None:
    """The allocator's numbers (None where glibc is not the allocator)."""
    lib = _glibc()
    if lib is None:
        return None
    m = lib.mallinfo2()
    return Heap(arena=m.arena, in_use=m.uordblks, free=m.fordblks, mmapped=m.hblkhd)


def rss_kb(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), KiB."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def report() -> dict[str, int | str | None]:
    """This process's memory for the worker's stats: RSS, and glibc's split
    of the heap into what the program holds (``heap_in_use_kb``) and what
    the allocator keeps (``heap_free_kb``; resident or not)."""
    h = heap()
    return {
        "rss_kb": rss_kb(),
        "allocator": os.environ.get("PYTHONMALLOC") or "pymalloc",
        "heap_in_use_kb": h.in_use // 1024 if h else None,
        "heap_free_kb": h.free // 1024 if h else None,
        "mmapped_kb": h.mmapped // 1024 if h else None,
        "gc_frozen": gc.get_freeze_count(),
    }
