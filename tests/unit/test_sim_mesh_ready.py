"""``Mesh.wait_ready`` (the simulated cluster's harness) returns only once
every proxy worker listens.  A worker reports stats with ``ready: false``
while it waits for its certificates; a test that sent traffic then had its
redirected connections refused (a CI run failed on exactly that)."""

from __future__ import annotations

import types

import pytest

from agent.sim import mesh as sim_mesh


def _harness(statuses: list[dict]) -> tuple[types.SimpleNamespace, list[dict]]:
    seen: list[dict] = []

    def status(name: str) -> dict:
        st = statuses[min(len(seen), len(statuses) - 1)]
        seen.append(st)
        return st

    ap = types.SimpleNamespace(popen=None)
    fake = types.SimpleNamespace(agents={"node1": ap}, status=status, agent_log=lambda name: "")
    return fake, seen


def _worker(stats: dict | None, alive: bool = True) -> dict:
    return {"alive": alive, "stats": stats}


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    monkeypatch.setattr(sim_mesh.time, "sleep", lambda s: None)


def test_waits_past_a_worker_that_reports_stats_but_does_not_listen_yet():
    not_listening = {"proxy": [_worker({"ready": False, "connections": 0})]}
    listening = {"proxy": [_worker({"ready": True, "connections": 0})]}
    fake, seen = _harness([not_listening, not_listening, listening])
    st = sim_mesh.Mesh.wait_ready(fake, "node1", timeout=30)
    assert st is listening
    assert len(seen) == 3


def test_every_worker_must_be_ready():
    half = {"proxy": [_worker({"ready": True}), _worker({"ready": False})]}
    both = {"proxy": [_worker({"ready": True}), _worker({"ready": True})]}
    fake, seen = _harness([half, both])
    assert sim_mesh.Mesh.wait_ready(fake, "node1", timeout=30) is both


def test_a_worker_without_stats_or_dead_is_not_ready(monkeypatch):
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(sim_mesh.time, "monotonic", lambda: float(next(clock)))
    never = {"proxy": [_worker(None), _worker({"ready": True}, alive=False)]}
    fake, _ = _harness([never])
    with pytest.raises(TimeoutError, match="not ready"):
        sim_mesh.Mesh.wait_ready(fake, "node1", timeout=5)


def test_listening_false_settles_for_stats():
    waiting = {"proxy": [_worker({"ready": False})]}
    fake, seen = _harness([{"proxy": [_worker(None)]}, waiting])
    assert sim_mesh.Mesh.wait_ready(fake, "node1", timeout=30, listening=False) is waiting
