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
        (
            {"workers": [{"alive": True, "listening": True}, {"alive": True, "listening": False}]},
            "1 of 2 proxy workers not listening yet",
        ),
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


def _raw(port: int, request: bytes) -> bytes:
    """What the server answers to ``request`` sent as is, up to its close."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.fixture
def server():
    srv = MetricsServer(dict, "127.0.0.1", 0, live=lambda: (True, "ok")).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_metrics_are_the_text_format_with_its_content_type_and_length(server):
    head, _, body = _raw(server.port, b"GET /metrics?name[]=x HTTP/1.1\r\nHost: x\r\n\r\n").partition(
        b"\r\n\r\n"
    )
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in lines and "Connection: close" in lines
    assert (
        f"Content-Length: {len(body)}" in lines
        and b"# TYPE meshlet_metrics_scrape_errors_total counter" in body
    )


def test_head_answers_the_headers_only(server):
    out = _raw(server.port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(
        b"Content-Length: 3\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405 Method Not Allowed"),
        (b"GET /metrics\r\n\r\n", b"400 Bad Request"),  # HTTP/0.9
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"400 Bad Request"),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400 Bad Request"),  # a TLS client hello
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"431 Request Header Fields Too Large"),
    ],
)
def test_what_is_not_a_plain_get_is_refused_with_a_status(server, request_bytes, status):
    out = _raw(server.port, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status + b"\r\n"), out[:80]
    if status.startswith(b"405"):
        assert b"\r\nAllow: GET, HEAD\r\n" in out


def test_an_idle_client_does_not_hold_up_the_next_one(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5):  # connects, sends nothing
        assert _get(server.port, "/healthz") == (200, "ok\n")
