"""Proxy worker supervision: start, adopt, restart (with back-off) and stop
the node proxy's worker processes.

Workers run in their own session, so the agent can die and restart without
touching traffic: each worker's pid is kept in ``runDir/proxy-<i>.pid`` and a
restarted agent adopts a live worker serving the same state file instead of
starting another.  A worker that exits is restarted after a back-off of
``min(30, 2**restarts)`` seconds since its last start.  Every step is a
plain, short, blocking method; the agent calls them from its tick and
nothing here waits for a worker.

Workers share the listeners with SO_REUSEPORT, so while one restarts after
a crash its siblings keep serving (the default runs two or more, see
``config.default_workers``), and the kernel moves what was queued on the dead
worker's listener to a sibling (``proxy.limits.enable_listener_migration``).

**Hand-over** (``restart()``: an upgrade of the proxy code, or a new
setting that needs new processes; the agent calls it on SIGHUP).  Slot by
slot: start a successor, wait (over ticks) until its stats socket says
``ready`` (certificates loaded, listening), then SIGTERM the old worker.
The old worker stops accepting at once (its queued connections migrate to
the successor) and gives live connections ``drain_timeout`` seconds to
finish before it resets the rest; after that plus ``KILL_MARGIN`` it is
SIGKILLed.  New connections are never refused: there is always a ready
listener.

**Two agents on one node** (a DaemonSet upgrade, agent/handover.py): the
new agent's supervisor starts its workers in its own run dir; they bind the
same ports with SO_REUSEPORT and accept beside the old agent's workers once
:meth:`all_ready`.  The old agent, on SIGTERM, calls :meth:`drain`: its
workers stop accepting (their queues move to the new workers) and finish
their live connections, as a hand-over's old worker does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .adminclient import unix_request
from .fsutil import open_append, write_atomic
from .proxy.memory import WORKER_SITE_ENV, worker_env
from .sitepath import child_env

log = logging.getLogger("meshlet.agent")

__all__ = ["ProxyWorker", "ProxySupervisor", "proxy_stats", "DRAIN_TIMEOUT"]

DRAIN_TIMEOUT = 30.0  # seconds an old worker's live connections get to finish after a hand-over
KILL_MARGIN = 5.0  # then this long for the worker to exit by itself, before SIGKILL


@dataclass
class ProxyWorker:
    """One worker process slot."""

    index: int
    pid: int | None = None
    popen: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    adopted: bool = False
    successor: subprocess.Popen | None = None  # hand-over: the process that will take this slot
    successor_failures: int = 0
    listening_pid: int | None = None  # this pid said ``ready`` (listening) once: it stays so


@dataclass
class Draining:
    """An old worker finishing its live connections after a hand-over."""

    index: int
    pid: int
    popen: subprocess.Popen | None
    kill_at: float  # time.monotonic() after which it is SIGKILLed


class ProxySupervisor:
    """The ``count`` workers of one node, serving ``state_path``, with their
    pid files, logs and stats sockets in ``run_dir``."""

    def __init__(self, run_dir: str, state_path: str, count: int, *, drain_timeout: float = DRAIN_TIMEOUT):
        self.run_dir, self.state_path = run_dir, state_path
        self.workers = [ProxyWorker(i) for i in range(count)]
        self.drain_timeout = drain_timeout
        self.draining: list[Draining] = []
        self.handovers = 0  # workers replaced by a ready successor
        self._roll: set[int] = set()  # slots to hand over to a new process

    def restart(self) -> None:
        """Hand every worker over to a new process, without refusing a
        connection (see the module docstring).  Safe to call from a signal
        handler or another thread: the work happens in ``supervise()``."""
        self._roll.update(w.index for w in self.workers)
        log.info("handing the %d proxy worker(s) over to new processes", len(self.workers))

    def _pidfile(self, w: ProxyWorker) -> str:
        return os.path.join(self.run_dir, f"proxy-{w.index}.pid")

    def stats_socket(self, w: ProxyWorker) -> str:
        return os.path.join(self.run_dir, f"proxy-{w.index}.sock")

    def _argv(self, w: ProxyWorker) -> list[str]:
        # The access log's path, sampling and on/off come from the state file.
        # -S: no `site`.  The worker gets the import path the agent's `site`
        # built through the environment instead (``agent.sitepath``), so it
        # runs no .pth hooks: those (an editable install's finder, a
        # distribution's certificate shims) import pathlib, tempfile, zipfile
        # and more into every worker, about 0.7 MB it never uses.
        # MESHLET_WORKER_SITE=1 keeps `site` (a sitecustomize or .pth hook of
        # one's own in the workers: coverage, a profiler, scripts/p99_probe.py).
        site = [] if os.environ.get(WORKER_SITE_ENV) == "1" else ["-S"]
        return [
            sys.executable,
            *site,
            "-m",
            "agent.proxy",
            "--state",
            self.state_path,
            "--worker-id",
            str(w.index),
            "--workers",  # the tunnel listener's slots (agent.datapath.reuseport)
            str(len(self.workers)),
            "--shutdown-grace",
            f"{self.drain_timeout:g}",
        ]

    def _spawn(self, w: ProxyWorker) -> subprocess.Popen:
        logf = open_append(os.path.join(self.run_dir, f"proxy-{w.index}.log"), binary=True)  # 0640
        try:
            return subprocess.Popen(
                self._argv(w),
                stdout=logf,
                stderr=logf,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd="/",
                env=worker_env(_proxy_env()),  # PYTHONMALLOC=malloc: memory goes back after bursts
            )
        finally:
            logf.close()

    def supervise(self) -> None:
        """Adopt running workers, reap and restart dead ones, move hand-overs on."""
        self._reap_draining()
        self._supervise_slots()
        for w in self.workers:
            if w.index in self._roll:
                self._hand_over(w)

    def _supervise_slots(self) -> None:
        for w in self.workers:
            if w.popen is not None:
                if w.popen.poll() is None:
                    continue
                log.error(
                    "proxy worker %d (pid %d) exited with %s; restarting",
                    w.index,
                    w.popen.pid,
                    w.popen.returncode,
                )
                w.popen = None
                w.pid = None
                w.restarts += 1
            elif w.pid is not None and _alive_proxy(w.pid, self.state_path):
                continue
            elif w.pid is None:
                pid = _read_pid(self._pidfile(w))
                if pid and _alive_proxy(pid, self.state_path):
                    w.pid, w.adopted = pid, True
                    log.info("adopted running proxy worker %d (pid %d)", w.index, pid)
                    continue
            if w.successor is not None and w.successor.poll() is None:
                # The worker died during its hand-over: the successor takes the slot now.
                self._take_over(w, signal_old=False)
                continue
            if w.restarts and time.time() - w.started < min(30, 2**w.restarts):
                continue  # back off
            w.popen = self._spawn(w)
            w.pid, w.started, w.adopted = w.popen.pid, time.time(), False
            write_atomic(self._pidfile(w), str(w.pid))
            log.info("started proxy worker %d (pid %d)", w.index, w.pid)
            self._roll.discard(w.index)  # a fresh process: nothing to hand over

    def _hand_over(self, w: ProxyWorker) -> None:
        """One step of slot ``w``'s hand-over (see the module docstring)."""
        if not w.pid:
            return  # not running yet: supervise() starts it
        if w.successor is None:
            w.successor = self._spawn(w)
            log.info(
                "proxy worker %d: started successor pid %d; pid %d keeps serving until it is ready",
                w.index,
                w.successor.pid,
                w.pid,
            )
            return
        if w.successor.poll() is not None:
            w.successor_failures += 1
            log.error(
                "proxy worker %d: successor pid %d exited with %s before it was ready; pid %d keeps "
                "serving%s (see proxy-%d.log)",
                w.index,
                w.successor.pid,
                w.successor.returncode,
                w.pid,
                "; giving up this hand-over" if w.successor_failures >= 3 else ", trying again",
                w.index,
            )
            w.successor = None
            if w.successor_failures >= 3:
                w.successor_failures = 0
                self._roll.discard(w.index)
            return
        st = proxy_stats(self.stats_socket(w))
        if st and st.get("pid") == w.successor.pid and st.get("ready"):
            self._take_over(w, signal_old=True)

    def _take_over(self, w: ProxyWorker, *, signal_old: bool) -> None:
        """The successor (ready, or the only one left) becomes slot ``w``; the
        old worker, if alive, drains."""
        succ = w.successor
        assert succ is not None
        old_pid, old_popen = w.pid, w.popen
        if signal_old and old_pid and _pid_alive(old_pid, old_popen):
            try:
                os.kill(old_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            else:
                self.draining.append(
                    Draining(w.index, old_pid, old_popen, time.monotonic() + self.drain_timeout + KILL_MARGIN)
                )
        w.popen, w.pid, w.started, w.adopted = succ, succ.pid, time.time(), False
        w.successor, w.successor_failures = None, 0
        write_atomic(self._pidfile(w), str(w.pid))
        self._roll.discard(w.index)
        self.handovers += 1
        log.info(
            "proxy worker %d: pid %d is ready and serving; pid %s drains its connections (up to %gs)",
            w.index,
            w.pid,
            old_pid,
            self.drain_timeout,
        )

    def _reap_draining(self) -> None:
        now = time.monotonic()
        for d in list(self.draining):
            if not _pid_alive(d.pid, d.popen):
                self.draining.remove(d)
                log.info("proxy worker %d: old pid %d finished draining and exited", d.index, d.pid)
            elif now >= d.kill_at:
                log.warning(
                    "proxy worker %d: old pid %d still running %gs after its drain timeout; killing it",
                    d.index,
                    d.pid,
                    KILL_MARGIN,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pid, signal.SIGKILL)

    def wait_loaded(self, generation: int, timeout: float = 3.0) -> list[int]:
        """Until every running worker reports state ``generation`` (bounded);
        the indexes of the workers that did not (empty: all have it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = []
            for w in self.workers:
                if not w.pid or not _pid_alive(w.pid, w.popen):
                    continue  # not started yet: it will read the file at start-up
                st = proxy_stats(self.stats_socket(w))
                if not st or st.get("state_generation", -1) < generation:
                    pending.append(w.index)
            if not pending:
                return []
            time.sleep(0.05)
        log.warning(
            "proxy workers %s did not load state generation %d within %.0fs: the pods new in it are "
            "not enrolled yet (a worker would refuse their traffic as unknown); retrying",
            pending,
            generation,
            timeout,
        )
        return pending

    def running_pids(self) -> list[int]:
        """Pids of the live workers, whether this supervisor started them or
        a previous agent did (their pid files)."""
        out = []
        for w in self.workers:
            pid = w.pid or _read_pid(self._pidfile(w))
            if pid and _alive_proxy(pid, self.state_path):
                out.append(pid)
        return out

    def adopt_running(self) -> int:
        """Take over the workers a previous agent left running (their pid
        files), so that :meth:`stop` ends them too; returns how many."""
        n = 0
        for w in self.workers:
            pid = w.pid or _read_pid(self._pidfile(w))
            if pid and _alive_proxy(pid, self.state_path):
                if w.pid != pid:
                    log.info("adopted running proxy worker %d (pid %d)", w.index, pid)
                w.pid, w.adopted = pid, True
                n += 1
        return n

    def stop(self, timeout: float = 6.0) -> None:
        """SIGTERM every worker (successors and draining ones too), SIGKILL
        those still alive after ``timeout``."""
        extra: list[tuple[int, subprocess.Popen | None]] = [(d.pid, d.popen) for d in self.draining]
        extra += [(w.successor.pid, w.successor) for w in self.workers if w.successor is not None]
        pids = [w.pid for w in self.workers if w.pid] + [pid for pid, _ in extra]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        for pid, popen in extra:
            while time.time() < deadline and _pid_alive(pid, popen):
                time.sleep(0.05)
            if _pid_alive(pid, popen):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if popen is not None:
                popen.wait(timeout=2)
        self.draining.clear()
        self._roll.clear()
        for w in self.workers:
            w.successor = None
        for w in self.workers:
            if not w.pid:
                continue
            while time.time() < deadline and _pid_alive(w.pid, w.popen):
                time.sleep(0.05)
            if _pid_alive(w.pid, w.popen):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
            if w.popen is not None:
                w.popen.wait(timeout=2)
            try:
                os.unlink(self._pidfile(w))
            except FileNotFoundError:
                pass
            w.pid = w.popen = None

    def drain(self, on_wait: Callable[[], None] | None = None) -> None:
        """Every worker stops accepting and gets ``drain_timeout`` seconds for
        its live connections (the workers' ``--shutdown-grace``), then
        ``KILL_MARGIN`` to exit before it is SIGKILLed; returns when all are
        gone, calling ``on_wait`` about every half second meanwhile.  What
        the old agent of a node does when a new one took over."""
        procs = [(w.pid, w.popen) for w in self.workers if w.pid]
        procs += [(d.pid, d.popen) for d in self.draining]
        procs += [(w.successor.pid, w.successor) for w in self.workers if w.successor is not None]
        log.info(
            "draining proxy workers %s: they stop accepting and get up to %gs for their connections",
            [pid for pid, _ in procs],
            self.drain_timeout,
        )
        for pid, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + KILL_MARGIN
        next_call = 0.0
        while time.monotonic() < deadline and any(_pid_alive(pid, p) for pid, p in procs):
            if on_wait is not None and time.monotonic() >= next_call:
                on_wait()
                next_call = time.monotonic() + 0.5
            time.sleep(0.05)
        left = [pid for pid, p in procs if _pid_alive(pid, p)]
        if left:
            log.warning("proxy workers %s still running after the drain timeout; killing them", left)
        self.stop(timeout=0)  # SIGKILLs what is left, reaps, removes the pid files
        log.info("proxy workers %s finished draining", [pid for pid, _ in procs])

    def all_ready(self) -> bool:
        """Every slot's worker runs and says ``ready`` (listening, with its
        certificates) on its stats socket."""
        return all(self.listening())

    def worker_stats(self) -> list[dict | None]:
        """Every worker's stats socket (None: did not answer)."""
        return [proxy_stats(self.stats_socket(w)) for w in self.workers]

    def alive(self) -> list[bool]:
        """Per worker: is its process running (no stats round trip: for probes)."""
        return [bool(w.pid and _pid_alive(w.pid, w.popen)) for w in self.workers]

    def listening(self) -> list[bool]:
        """Per worker: is its process running and listening (it said
        ``ready`` on its stats socket)?  A worker listens from then on, so
        each pid is asked until it first says so, and never again: the
        probes pay a stats round trip only while a worker starts."""
        out = []
        for w in self.workers:
            up = bool(w.pid and _pid_alive(w.pid, w.popen))
            if up and w.listening_pid != w.pid:
                st = proxy_stats(self.stats_socket(w))
                if st and st.get("pid") == w.pid and st.get("ready"):
                    w.listening_pid = w.pid
            out.append(up and w.listening_pid == w.pid)
        return out

    def status(self) -> list[dict]:
        """Per worker: pid, adopted, alive, restarts and its stats."""
        return [
            {
                "worker": w.index,
                "pid": w.pid,
                "adopted": w.adopted,
                "alive": bool(w.pid and _pid_alive(w.pid, w.popen)),
                "restarts": w.restarts,
                "handing_over_to": w.successor.pid if w.successor is not None else None,
                "stats": proxy_stats(self.stats_socket(w)),
            }
            for w in self.workers
        ]

    def handover_status(self) -> dict:
        """Hand-overs done, in progress, and old workers still draining."""
        return {
            "completed": self.handovers,
            "pending": sorted(self._roll),
            "draining": [{"worker": d.index, "pid": d.pid} for d in self.draining],
        }


def proxy_stats(sock_path: str) -> dict | None:
    """A worker's stats (JSON over its Unix socket), or None."""
    try:
        return json.loads(unix_request(sock_path, timeout=0.5))
    except (OSError, ValueError):
        return None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive_proxy(pid: int, state_path: str) -> bool:
    """True when ``pid`` is a live proxy worker serving ``state_path``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return b"agent.proxy" in argv and state_path.encode() in argv


def _pid_alive(pid: int, popen: subprocess.Popen | None) -> bool:
    if popen is not None:
        return popen.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _proxy_env() -> dict:
    return child_env(os.environ, sys.path)
