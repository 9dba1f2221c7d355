"""``ProxySupervisor.listening()``, what the DaemonSet's readiness counts: a
worker is listening once its stats socket (a real Unix socket here) says
``ready`` for its own pid; it is asked until then and never after.  Before,
readiness counted a worker that was alive but still waiting for its
certificates, so the node said ready while its pods' connections were
refused."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from agent import supervisor


class StatsSocket:
    """A worker's stats socket: answers every connection with ``doc``."""

    def __init__(self, path: str) -> None:
        self.doc: dict = {}
        self.asked = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                self.asked += 1
                c.sendall(json.dumps(self.doc).encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sup(tmp_path):
    s = supervisor.ProxySupervisor(str(tmp_path), str(tmp_path / "state.json"), 2)
    for w in s.workers:
        w.pid = os.getpid()  # a live pid: this test's own process
    socks = [StatsSocket(s.stats_socket(w)) for w in s.workers]
    yield s, socks
    for k in socks:
        k.close()


def test_a_worker_waiting_for_its_certificates_is_alive_but_not_listening(sup):
    s, (a, b) = sup
    pid = os.getpid()
    a.doc = {"pid": pid, "ready": True}
    b.doc = {"pid": pid, "ready": False}
    assert s.alive() == [True, True]
    assert s.listening() == [True, False]
    b.doc = {"pid": pid, "ready": True}
    assert s.listening() == [True, True]


def test_once_listening_a_pid_is_not_asked_again(sup):
    s, (a, b) = sup
    a.doc = b.doc = {"pid": os.getpid(), "ready": True}
    assert s.listening() == [True, True]
    asked = (a.asked, b.asked)
    assert s.listening() == [True, True]
    assert (a.asked, b.asked) == asked


def test_another_pids_answer_or_none_is_not_listening(sup):
    s, (a, b) = sup
    a.doc = {"pid": os.getpid() + 1, "ready": True}  # the slot's previous process
    b.close()  # no answer
    assert s.listening() == [False, False]


def test_a_restarted_worker_is_asked_again(sup):
    s, (a, b) = sup
    a.doc = b.doc = {"pid": os.getpid(), "ready": True}
    assert s.listening() == [True, True]
    s.workers[0].pid = os.getppid()  # a new process in slot 0, not listening yet
    a.doc = {"pid": os.getppid(), "ready": False}
    assert s.listening() == [False, True]
    s.workers[1].pid = None  # no process
    assert s.listening() == [False, False]
