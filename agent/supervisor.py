"""Proxy worker supervision: start, adopt, restart (with back-off) and stop
the node proxy's worker processes.

Workers run in their own session, so the agent can die and restart without
touching traffic: each worker's pid is kept in ``runDir/proxy-<i>.pid`` and a
restarted agent adopts a live worker serving the same state file instead of
starting another.  A worker that exits is restarted after a back-off of
``min(30, 2**restarts)`` seconds since its last start.  Every step is a
plain blocking method; the agent calls them from its tick.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .adminclient import unix_request
from .fsutil import write_atomic

log = logging.getLogger("meshlet.agent")

__all__ = ["ProxyWorker", "ProxySupervisor", "proxy_stats"]


@dataclass
class ProxyWorker:
    """One worker process slot."""

    index: int
    pid: int | None = None
    popen: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    adopted: bool = False


class ProxySupervisor:
    """The ``count`` workers of one node, serving ``state_path``, with their
    pid files, logs and stats sockets in ``run_dir``."""

    def __init__(self, run_dir: str, state_path: str, count: int):
        self.run_dir, self.state_path = run_dir, state_path
        self.workers = [ProxyWorker(i) for i in range(count)]

    def _pidfile(self, w: ProxyWorker) -> str:
        return os.path.join(self.run_dir, f"proxy-{w.index}.pid")

    def stats_socket(self, w: ProxyWorker) -> str:
        return os.path.join(self.run_dir, f"proxy-{w.index}.sock")

    def _argv(self, w: ProxyWorker) -> list[str]:
        # The access log's path, sampling and on/off come from the state file.
        return [sys.executable, "-m", "agent.proxy", "--state", self.state_path, "--worker-id", str(w.index)]

    def supervise(self) -> None:
        """Adopt running workers, reap and restart dead ones."""
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
            if w.restarts and time.time() - w.started < min(30, 2**w.restarts):
                continue  # back off
            logf = open(os.path.join(self.run_dir, f"proxy-{w.index}.log"), "ab")
            try:
                w.popen = subprocess.Popen(
                    self._argv(w),
                    stdout=logf,
                    stderr=logf,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd="/",
                    env=_proxy_env(),
                )
            finally:
                logf.close()
            w.pid, w.started, w.adopted = w.popen.pid, time.time(), False
            write_atomic(self._pidfile(w), str(w.pid))
            log.info("started proxy worker %d (pid %d)", w.index, w.pid)

    def wait_loaded(self, generation: int, timeout: float = 3.0) -> bool:
        """Until every running worker reports state ``generation`` (bounded)."""
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
                return True
            time.sleep(0.05)
        log.warning(
            "proxy workers %s did not load state generation %d within %.0fs; enrolling anyway",
            pending,
            generation,
            timeout,
        )
        return False

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
        """SIGTERM every worker, SIGKILL those still alive after ``timeout``."""
        pids = [w.pid for w in self.workers if w.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        for w in self.workers:
            if not w.pid:
                continue
            while time.time() < deadline and _pid_alive(w.pid, w.popen):
                time.sleep(0.05)
            if _pid_alive(w.pid, w.popen):
                os.kill(w.pid, signal.SIGKILL)
            if w.popen is not None:
                w.popen.wait(timeout=2)
            try:
                os.unlink(self._pidfile(w))
            except FileNotFoundError:
                pass
            w.pid = w.popen = None

    def worker_stats(self) -> list[dict | None]:
        """Every worker's stats socket (None: did not answer)."""
        return [proxy_stats(self.stats_socket(w)) for w in self.workers]

    def status(self) -> list[dict]:
        """Per worker: pid, adopted, alive, restarts and its stats."""
        return [
            {
                "worker": w.index,
                "pid": w.pid,
                "adopted": w.adopted,
                "alive": bool(w.pid and _pid_alive(w.pid, w.popen)),
                "restarts": w.restarts,
                "stats": proxy_stats(self.stats_socket(w)),
            }
            for w in self.workers
        ]


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
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
