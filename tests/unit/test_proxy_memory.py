"""agent.proxy.memory: the workers' allocator choice (pure) and the heap trim
(real glibc, in this process)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from agent.proxy import memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim and mallinfo2 are glibc's")


def test_workers_get_the_malloc_allocator_unless_the_operator_chose_one():
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/x"}
    env = memory.worker_env(base)
    assert env == {**base, "PYTHONMALLOC": "malloc", **memory.MALLOC_TUNING}
    assert "PYTHONMALLOC" not in base  # a copy, not the caller's mapping
    for chosen in ("pymalloc", "malloc_debug"):
        assert memory.worker_env({**base, "PYTHONMALLOC": chosen})["PYTHONMALLOC"] == chosen
    assert memory.worker_env({"PYTHONMALLOC": ""})["PYTHONMALLOC"] == "malloc"  # empty: CPython's default


def test_workers_get_glibc_thresholds_that_stop_heap_churn_unless_the_operator_set_them():
    env = memory.worker_env({})
    # a relay's 256 KiB buffers and a TLS flush of a few MiB come from the heap, not from a fresh mmap
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 8 * 1024 * 1024
    # glibc does not shrink the heap under a bulk transfer (the idle trim hands it back afterwards)
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) > int(env["MALLOC_MMAP_THRESHOLD_"])
    assert memory.worker_env({"MALLOC_TRIM_THRESHOLD_": "131072"})["MALLOC_TRIM_THRESHOLD_"] == "131072"


#: What `site` or a stdlib shortcut would load into every worker, for nothing:
#: ctypes.util's find_library pulls tempfile and shutil, and runs ldconfig.
NOT_LOADED = ("site", "pathlib", "zipfile", "tempfile", "shutil", "ctypes.util", "platform")


def test_a_worker_started_the_supervisors_way_imports_its_modules_without_site():
    """The argv and environment the supervisor uses: -S, and the path through
    the environment.  Everything the worker imports at start and under
    traffic resolves (uvloop, cryptography, the server), and no `site` hook
    ran (the memory it saves is the reason for -S), nor NOT_LOADED."""
    from agent import supervisor

    sup = supervisor.ProxySupervisor("/run/x", "/run/x/proxy-state.json", 1)
    assert sup._argv(sup.workers[0])[:4] == [sys.executable, "-S", "-m", "agent.proxy"]
    with pytest.MonkeyPatch.context() as mp:  # the operator's way back to `site` (hooks of their own)
        mp.setenv(memory.WORKER_SITE_ENV, "1")
        assert sup._argv(sup.workers[0])[:3] == [sys.executable, "-m", "agent.proxy"]
    code = (
        "import os, sys\n"
        "from agent.sitepath import adopt\n"
        "adopt(os.environ, sys.path)\n"
        "import agent.proxy.server, agent.proxy.muxglue, agent.proxy.l7, uvloop, cryptography.x509\n"
        "agent.proxy.memory.heap()\n"  # glibc through ctypes, as the worker's stats do
        "print(sorted(m for m in NOT_LOADED if m in sys.modules))\n".replace("NOT_LOADED", repr(NOT_LOADED))
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=supervisor._proxy_env(),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


_BATCHES = """
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    batch = bytes([i]) * (4 << 20)  # a TLS flush of 4 MiB: allocated, written, freed
    del batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@glibc
def test_worker_tuning_reuses_big_batches_instead_of_faulting_in_fresh_pages():
    """A 4 MiB buffer allocated and freed 40 times (a bulk stream's TLS
    output, flushed in batches): with the workers' thresholds glibc reuses
    heap pages; with a 1 MiB mmap threshold each batch is a fresh mmap, 1,024
    zeroed pages faulted in (40,960 in all).  Page faults, not time."""

    def faults(env: dict[str, str]) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _BATCHES], env=env, capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = faults(memory.worker_env(base))
    mapped = faults({**memory.worker_env(base), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert mapped > 30 * 1024, mapped  # the case at stake: a fresh mapping per batch
    assert tuned < 4 * 1024, (tuned, mapped)  # about one batch's pages, faulted in once


def test_trim_schedule_trims_mid_burst_and_again_once_the_burst_is_over():
    s = memory.TrimSchedule(after=100, low_water=10)
    assert not s.due(live=1000, finished=0)  # the burst is held
    assert not s.due(live=600, finished=400)  # closing, but not yet half of the peak
    assert s.due(live=500, finished=500)  # half closed: trim now
    # the rest close: fewer than ``after`` since, but below the low-water mark
    assert not s.due(live=300, finished=700)  # 200 finished since, but 300 live > half of 500
    assert s.due(live=0, finished=1000)
    assert not s.due(live=0, finished=1000)  # nothing finished since: never twice


def test_trim_schedule_ignores_a_steady_churn_below_the_mark():
    s = memory.TrimSchedule(after=100, low_water=10)
    finished = 0
    trims = 0
    for _ in range(50):  # 5 live at a time, 5 finished per round: 250 connections
        finished += 5
        trims += s.due(live=5, finished=finished)
    assert trims == 0  # never above the mark, never a half-emptied peak
    s2 = memory.TrimSchedule(after=100, low_water=10)
    assert not s2.due(live=50, finished=0)
    assert s2.due(live=3, finished=40)  # above the mark, then below it: over
    assert not s2.due(live=8, finished=45)  # below the mark since the trim


@glibc
def test_idle_trim_is_due_once_quiet_after_work_and_not_again_until_more_work():
    t = memory.IdleTrim(work=0.2, busy=0.02, after=1.5)
    assert not t.due(cpu=1.0, now=100.0)  # the first sample: start-up work does not count
    assert not t.due(cpu=3.0, now=102.0)  # traffic: a second of CPU per second
    assert not t.due(cpu=3.01, now=103.0)  # quiet for 1 s: not yet
    assert t.due(cpu=3.02, now=104.0)  # quiet for 2 s after 2 s of CPU
    for i in range(100):  # idle from then on: a scrape now and then, never a second trim
        assert not t.due(cpu=3.02 + 0.005 * i, now=106.0 + 2 * i)


def test_idle_trim_waits_out_a_long_stream_and_ignores_light_work():
    t = memory.IdleTrim(work=0.2, busy=0.02, after=1.5)
    cpu = 0.5
    t.due(cpu, 0.0)
    for i in range(1, 50):  # one bulk stream for 100 s: busy all along, never due
        cpu += 1.5
        assert not t.due(cpu, 2.0 * i)
    assert not t.due(cpu + 0.01, 99.0)  # it ends: quiet for 1 s
    assert t.due(cpu + 0.01, 100.0)
    light = memory.IdleTrim(work=0.2, busy=0.02, after=1.5)
    light.due(0.0, 0.0)
    assert not light.due(0.1, 2.0)  # a little work (under ``work``) ...
    assert not any(light.due(0.1, 2.0 + 2 * i) for i in range(1, 20))  # ... is not worth a trim
    assert not light.due(0.1, 2.0)  # a clock that did not move changes nothing


def test_trim_returns_the_free_pages_between_live_blocks():
    """A burst of 2 KiB blocks (glibc's heap, not mmap, not pymalloc), one in
    32 kept: glibc keeps the freed holes resident (its automatic trim only
    cuts the top of the heap); ``trim`` gives every free page back."""
    before = memory.heap()
    assert before is not None and before.in_use > 0
    blocks = [os.urandom(2048) for _ in range(40_000)]  # ~80 MiB, touched
    grown = memory.heap()
    assert grown is not None and grown.in_use - before.in_use > 60 << 20
    kept = blocks[::32]
    del blocks
    memory.trim()  # whatever the rest of this process had free
    resident = memory.rss_kb()
    holes = memory.heap()
    assert holes is not None and holes.in_use - before.in_use < 8 << 20  # freed: only the kept ones
    assert len(kept) == 1250
    # the freed blocks were not resident anymore only if trim worked: allocate
    # the same burst again, free it, and compare with and without trim
    again = [os.urandom(2048) for _ in range(40_000)]
    del again
    untrimmed = memory.rss_kb()
    assert untrimmed - resident > 40 << 10, (resident, untrimmed)  # glibc kept the holes
    assert memory.trim() is True
    assert untrimmed - memory.rss_kb() > 40 << 10, (untrimmed, memory.rss_kb())


@glibc
def test_release_startup_collects_the_cycles_then_returns_their_pages():
    """Start-up garbage held in cycles (only the collector frees it), among
    survivors: ``release_startup`` frees it and hands the pages back."""
    import gc

    memory.trim()
    kept = []
    gc.disable()  # the garbage stays until release_startup collects it
    try:
        for i in range(40_000):
            cycle: list = [os.urandom(2048)]  # ~80 MiB in 2 KiB blocks, from glibc's heap
            cycle.append(cycle)
            if i % 32 == 0:
                kept.append(cycle[0])
        del cycle
        loaded = memory.rss_kb()
        assert memory.release_startup() is True
    finally:
        gc.enable()
    assert loaded - memory.rss_kb() > 40 << 10, (loaded, memory.rss_kb())
    assert len(kept) == 1250


@glibc
def test_report_splits_rss_into_program_and_allocator():
    r = memory.report()
    assert r["rss_kb"] > 0 and r["heap_in_use_kb"] > 0  # type: ignore[operator]
    assert r["heap_free_kb"] is not None and r["mmapped_kb"] is not None
    assert r["allocator"] == (os.environ.get("PYTHONMALLOC") or "pymalloc")


_FREEZE_PROBE = """
import gc, json, weakref
from agent.proxy import memory

class Node:
    pass

survivor = Node()
survivor.me = survivor  # alive at the freeze: frozen
garbage = Node()
garbage.me = garbage  # a cycle nobody refers to: collected first, never frozen
freed = []
weakref.finalize(garbage, freed.append, True)
del garbage
frozen = memory.freeze_heap()
later = Node()
later.me = later
tracked = gc.get_objects()
print(json.dumps({
    "frozen": frozen,
    "garbage_freed": freed,
    "survivor_tracked": any(o is survivor for o in tracked),
    "later_tracked": any(o is later for o in tracked),
    "reported": memory.report()["gc_frozen"],
}))
"""


def test_freeze_heap_collects_the_garbage_then_hides_the_survivors_from_the_collector():
    # In a process of its own: freezing pytest's heap would outlive this test.
    out = subprocess.run(
        [sys.executable, "-c", _FREEZE_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    r = json.loads(out.stdout)
    assert r["garbage_freed"] == [True]  # the collection ran before the freeze
    assert r["frozen"] > 1000 and r["reported"] == r["frozen"]
    assert r["survivor_tracked"] is False  # out of the collector's sight: full collections skip it
    assert r["later_tracked"] is True  # objects made afterwards are collected as usual


_ARENAS = r"""
import ctypes, os, sys, threading, tempfile
from agent.proxy import memory
if sys.argv[1] != "none":
    assert memory.limit_arenas(int(sys.argv[1]))
go, done = threading.Barrier(9), threading.Event()
def work():
    keep = [bytearray(4000) for _ in range(50)]  # > 512 bytes: glibc's malloc, not pymalloc
    go.wait()  # all alive and holding memory at once
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
go.wait()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "info.xml")
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(open(path).read().count("<heap nr="))
done.set()
for t in threads:
    t.join()
"""


def _arenas(limit: str) -> int:
    env = {**os.environ, "PYTHONMALLOC": "pymalloc"}
    env.pop("MALLOC_ARENA_MAX", None)
    out = subprocess.run(
        [sys.executable, "-c", _ARENAS, limit], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@glibc
def test_limit_arenas_caps_the_arenas_threads_get():
    # Eight threads holding malloc memory at once: glibc gives them arenas of
    # their own, unless the cap (the agent's setting) makes them share.
    assert _arenas("none") > 2
    assert _arenas(str(memory.AGENT_ARENAS)) <= memory.AGENT_ARENAS
    assert _arenas("1") == 1
    with pytest.raises(ValueError, match="at least 1"):
        memory.limit_arenas(0)


def test_the_agent_keeps_an_operators_arena_setting():
    assert memory.agent_arena_limit({"PATH": "/usr/bin"}) == memory.AGENT_ARENAS
    assert memory.agent_arena_limit({"MALLOC_ARENA_MAX": "8"}) is None  # glibc applies it itself
    assert memory.agent_arena_limit({"MALLOC_ARENA_MAX": ""}) == memory.AGENT_ARENAS  # empty: unset
