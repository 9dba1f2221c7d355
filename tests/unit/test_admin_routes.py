"""The admin API's route table (agent/admin.py): which handler serves which
method and target, and the 404/405 answers, without a socket."""

from __future__ import annotations

import dataclasses
import time
import types

import pytest

from agent import admin
from agent.adminclient import admin_get
from tests.support.admin import admin_server


def handler(method: str, target: str):
    found = admin.route_for(method, target)
    return found.handler if isinstance(found, admin.Route) else found[0]


@pytest.mark.parametrize("method, target, want", [
    ("GET", "/v1/status", admin._status),
    ("GET", "/v1/workloads", admin._workloads_h),
    ("GET", "/v1/services", admin._services_h),
    ("GET", "/v1/bpf", admin._bpf),
    ("GET", "/v1/stats", admin._stats),
    ("GET", "/v1/stats?from=a&to=b", admin._stats),
    ("GET", "/v1/flows?limit=3", admin._flows),
    ("GET", "/v1/flows/follow?max_seconds=1", admin._flows),
    ("GET", "/v1/policies", admin._policies),
    ("GET", "/v1/policies/shop/deny?kind=TrafficPolicy", admin._policies),
    ("POST", "/v1/policies:apply", admin._policies),
    ("POST", "/v1/policies:diff", admin._policies),
    ("DELETE", "/v1/policies/shop/deny", admin._policies),
    ("GET", "/v1/policies:apply", admin._policies),    # the policy handler says "needs POST"
    ("GET", "/v1/status?verbose=1", 404),              # these four match the whole target
    ("GET", "/v1/status/", 404),
    ("GET", "/v1/flows/other", 404),
    ("GET", "/", 404),
    ("PUT", "/v1/policies", 405),
    ("POST", "/v1/status", 405),
    ("POST", "/v1/nowhere", 405),                      # a method other than GET: 405 first
    ("", "", 405),
])
def test_routes(method, target, want):
    assert handler(method, target) == want


def test_unknown_paths_list_the_routes():
    code, body = admin.route_for("GET", "/v2/status")
    assert code == 404 and body["error"] == "unknown path '/v2/status'"
    assert body["paths"] == sorted(admin.ROUTES) and "/v1/status" in body["paths"]
    code, body = admin.route_for("PATCH", "/v1/status")
    assert (code, body) == (405, {"error": "PATCH is not supported here"})
    assert admin.route_for("", "")[1] == {"error": "this request is not supported here"}


def test_every_listed_path_has_a_route():
    for path in admin.ROUTES:
        method, _, target = path.rpartition(" ")
        target = target.split("[", 1)[0].replace("<namespace>", "ns").replace("<name>", "n")
        assert isinstance(admin.route_for(method or "GET", target), admin.Route), path


def test_big_answers_release_the_heap_once_sent(tmp_path, monkeypatch):
    """A route marked ``release`` (the flow history decoded: /v1/flows,
    /v1/stats) hands the agent's free heap back after its answer is sent;
    other answers do not.  Over a real socket, with the status route marked
    for the test."""
    assert {r.path for r in admin.ROUTE_TABLE if r.release} == {"/v1/flows", "/v1/stats"}
    released: list[bool] = []
    monkeypatch.setattr(admin, "release_heap", lambda: released.append(True))
    table = tuple(dataclasses.replace(r, release=r.path == "/v1/status") for r in admin.ROUTE_TABLE)
    monkeypatch.setattr(admin, "ROUTE_TABLE", table)
    sock = str(tmp_path / "admin.sock")

    class Agent:  # the status route's part of agent.admin.AdminAgent
        cfg = types.SimpleNamespace(admin=types.SimpleNamespace(socket=sock))

        def status(self) -> dict:
            return {"node": "node1"}

    with admin_server(Agent()):
        assert admin_get(sock, "/v1/nowhere")[0] == 404
        assert admin_get(sock, "/v1/status") == (200, {"node": "node1"})
        deadline = time.monotonic() + 5  # released in a thread after the answer: wait for it
        while not released and time.monotonic() < deadline:
            time.sleep(0.02)
        assert released == [True]
