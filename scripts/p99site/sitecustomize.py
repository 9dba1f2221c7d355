"""Probe loaded into proxy workers by scripts/p99_probe.py (through PYTHONPATH),
only when ``MESHLET_P99_PROBE`` names a directory and the process is a proxy
worker (``python -m agent.proxy``).  Not part of meshlet: a measuring tool.

It records, in the worker itself:

- every garbage collection (``gc.callbacks``): count, total and longest
  pause per generation, and a histogram of the pauses;
- event-loop lag: a timer due every ``PERIOD`` s notes how late it fired
  (a callback, a GC pause or the scheduler keeping the loop away shows up
  here), as a histogram;

and writes the cumulative numbers to ``$MESHLET_P99_PROBE/<pid>.json``
every second (one small write), so the driver can diff phases.  With
``MESHLET_P99_GC=freeze`` it also froze the heap 3 s after start (the
experiment behind ``agent.proxy.memory.freeze_heap``).
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("MESHLET_P99_PROBE")
_argv = sys.orig_argv
_IS_WORKER = any(_argv[i : i + 2] == ["-m", "agent.proxy"] for i in range(1, len(_argv) - 1))

if _DIR and _IS_WORKER:
    import gc
    import json
    import time

    BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 1e9)
    PERIOD = 0.005

    def _hist() -> list[int]:
        return [0] * len(BUCKETS_MS)

    def _put(h: list[int], ms: float) -> None:
        for i, b in enumerate(BUCKETS_MS):
            if ms <= b:
                h[i] += 1
                return

    stats = {
        "pid": os.getpid(),
        "argv": sys.orig_argv,
        "gc": {str(g): {"n": 0, "total_ms": 0.0, "max_ms": 0.0, "collected": 0} for g in range(3)},
        "gc_hist": _hist(),
        "lag_hist": _hist(),
        "lag_n": 0,
        "lag_max_ms": 0.0,
        "lag_total_ms": 0.0,
        "thresholds": gc.get_threshold(),
        "frozen": 0,
    }
    _t0 = [0.0]

    def _on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _t0[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _t0[0]) * 1000
        g = stats["gc"][str(info["generation"])]
        g["n"] += 1
        g["total_ms"] += ms
        g["max_ms"] = max(g["max_ms"], ms)
        g["collected"] += info.get("collected", 0)
        _put(stats["gc_hist"], ms)

    gc.callbacks.append(_on_gc)

    def _start(loop) -> None:
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        state = {"due": loop.time() + PERIOD, "dump": loop.time() + 1.0}

        def tick() -> None:
            now = loop.time()
            ms = max(0.0, (now - state["due"]) * 1000)
            stats["lag_n"] += 1
            stats["lag_total_ms"] += ms
            stats["lag_max_ms"] = max(stats["lag_max_ms"], ms)
            _put(stats["lag_hist"], ms)
            if now >= state["dump"]:
                state["dump"] = now + 1.0
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(stats, f)
                os.replace(tmp, path)
            state["due"] = loop.time() + PERIOD
            loop.call_at(state["due"], tick)

        loop.call_at(state["due"], tick)
        if os.environ.get("MESHLET_P99_GC") == "freeze":  # the experiment before memory.freeze_heap
            loop.call_later(3.0, _freeze)

    def _freeze() -> None:
        gc.collect()
        gc.freeze()
        stats["frozen"] = gc.get_freeze_count()

    import uvloop

    _orig = uvloop.new_event_loop

    def _new_event_loop():
        loop = _orig()
        loop.call_soon(_start, loop)
        return loop

    uvloop.new_event_loop = _new_event_loop
