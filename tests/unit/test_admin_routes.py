"""The admin API's route table (agent/admin.py): which handler serves which
method and target, and the 404/405 answers, without a socket."""

from __future__ import annotations

import pytest

from agent import admin


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
