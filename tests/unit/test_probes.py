"""The DaemonSet's probes on the metrics port: /healthz and /readyz verdicts
(pure), and the server answering them, and /metrics, over real loopback."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from agent.observe.prometheus import LIVENESS_WINDOW, MetricsServer, liveness, readiness

ALIVE = {
    "tick_age": 0.4,
    "workers": [{"alive": True}, {"alive": True}],
    "identity_configured": True,
    "identity_loaded": True,
}


def test_liveness_follows_the_loop():
    assert liveness(0.2) == (True, "ok")
    ok, why = liveness(LIVENESS_WINDOW + 1)
    assert not ok and "stuck" in why
    assert liveness(None)[0] is False


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tick_age": LIVENESS_WINDOW * 2}, "stuck"),
        ({"workers": [{"alive": True}, {"alive": False}]}, "1 of 2 proxy workers not running"),
        ({"workers": []}, "no proxy worker"),
        ({"identity_loaded": False}, "identity"),
    ],
)
def test_readiness_names_what_is_missing(change, reason):
    assert readiness(ALIVE) == (True, "ok")
    ok, why = readiness({**ALIVE, **change})
    assert not ok and reason in why


def test_no_identity_configured_is_ready_without_one():
    assert readiness({**ALIVE, "identity_configured": False, "identity_loaded": False}) == (True, "ok")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_server_answers_probes_without_scraping():
    scrapes = []
    state = {"ready": (False, "1 of 1 proxy workers not running")}

    def snapshot():
        scrapes.append(1)
        return {}

    def broken():
        raise RuntimeError("boom")

    srv = MetricsServer(
        snapshot, "127.0.0.1", 0, live=lambda: (True, "ok"), ready=lambda: state["ready"]
    ).start()
    try:
        assert _get(srv.port, "/healthz") == (200, "ok\n")
        assert _get(srv.port, "/readyz") == (503, "1 of 1 proxy workers not running\n")
        state["ready"] = (True, "ok")
        assert _get(srv.port, "/readyz") == (200, "ok\n")
        assert scrapes == []  # probes never run the snapshot
        status, body = _get(srv.port, "/metrics")
        assert status == 200 and "meshlet_metrics_scrape_errors" in body and scrapes == [1]
        srv.probes["/healthz"] = broken
        status, body = _get(srv.port, "/healthz")
        assert status == 503 and "boom" in body
    finally:
        srv.stop()


def test_without_probes_every_path_is_metrics():
    srv = MetricsServer(dict, "127.0.0.1", 0).start()
    try:
        status, body = _get(srv.port, "/healthz")
        assert status == 200 and "meshlet_metrics_scrape_errors" in body
    finally:
        srv.stop()
