"""L7 authorization in the node proxy (issue #4): in-process on loopback with
the two-node harness of tests/support/mesh.py and ``l7: true``. A denied request
gets 403 and the same connection serves the next one; the backend never sees
what was denied (asserted on what it received)."""

from __future__ import annotations

import pytest

from tests.support.aio import close_writer, run
from tests.support.http import Recorder, http_request as request
from tests.support.mesh import V4, Cluster, FlowOrigin
from tests.support.policy import LABELS, apply, doc


@pytest.mark.parametrize("dst_ip,node", [("127.0.0.5", 0), ("127.0.0.7", 1)], ids=["local", "tunnel"])
def test_denied_request_gets_403_and_the_connection_stays_usable(tmp_path, dst_ip, node):
    app, ns = ("web", "default") if node == 0 else ("db", "data")

    async def main():
        async with Cluster(tmp_path, l7=True, labels=LABELS) as c:
            backend = await Recorder(dst_ip).start()
            try:
                await apply(c, doc(ns, "deny-admin", app, "DENY",
                                   "[{to: [{operation: {paths: [/admin, /admin/*]}}]}]"))
                r, w = await c.connect(FlowOrigin(V4, dst_ip, backend.port, 1001))
                got = [await request(r, w, "GET", "/ok")]
                got.append(await request(r, w, "GET", "/admin/users"))
                got.append(await request(r, w, "GET", "/./x/../admin"))  # normalized, then denied
                got.append(await request(r, w, "GET", "/after"))  # same connection
                await close_writer(w)
                # A reload applies to the next request of a live connection.
                r, w = await c.connect(FlowOrigin(V4, dst_ip, backend.port, 1001))
                before = await request(r, w, "GET", "/admin")
                await apply(c, delete=((ns, "deny-admin"),))
                after = await request(r, w, "GET", "/admin")
                await close_writer(w)
                return got, before, after, list(backend.lines), c.servers[node].stats()
            finally:
                await backend.stop()

    got, before, after, lines, stats = run(main())
    assert [g[0] for g in got] == [200, 403, 403, 200]
    assert got[1][2] == b"RBAC: access denied"
    assert b"connection: close" not in got[1][1].lower()
    assert before[0] == 403 and after[0] == 200
    assert lines == [b"GET /ok HTTP/1.1", b"GET /after HTTP/1.1", b"GET /admin HTTP/1.1"]
    assert stats["counters"]["requests_denied"] == 3


def test_allow_by_method_and_path_and_default_deny(tmp_path):
    async def main():
        async with Cluster(tmp_path, l7=True, labels=LABELS) as c:
            backend = await Recorder("127.0.0.7").start()
            try:
                await apply(c, doc("data", "db-get-api", "db", "ALLOW",
                                   "[{to: [{operation: {methods: [GET], paths: [/api/*]}}]}]"))
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", backend.port, 1001))
                out = [(await request(r, w, m, p))[0]
                       for m, p in (("GET", "/api/a"), ("POST", "/api/a"), ("GET", "/other"), ("GET", "/api/b"))]
                await close_writer(w)
                return out, list(backend.lines)
            finally:
                await backend.stop()

    out, lines = run(main())
    assert out == [200, 403, 403, 200]
    assert lines == [b"GET /api/a HTTP/1.1", b"GET /api/b HTTP/1.1"]


def test_auto_mode_parses_http_only_for_pods_an_http_policy_selects(tmp_path):
    """proxy.l7: auto (the default): L4 relay until a policy with HTTP fields
    selects the destination; then its requests are decided one by one."""

    async def main():
        async with Cluster(tmp_path, l7="auto", labels=LABELS) as c:
            backend = await Recorder("127.0.0.5").start()
            try:
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", backend.port, 1001))
                before = await request(r, w, "GET", "/admin")
                await close_writer(w)
                l4 = c.servers[0].stats()["http"]["connections"]
                await apply(c, doc("default", "deny-admin", "web", "DENY", "[{to: [{operation: {paths: [/admin]}}]}]"))
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", backend.port, 1001))
                after = [await request(r, w, "GET", p) for p in ("/admin", "/ok")]
                await close_writer(w)
                return before, l4, after, c.servers[0].stats()["http"]["connections"], list(backend.lines)
            finally:
                await backend.stop()

    before, l4, after, l7, lines = run(main())
    assert before[0] == 200 and l4 == 0  # no HTTP policy: relayed as bytes
    assert [a[0] for a in after] == [403, 200] and l7 == 1
    assert lines == [b"GET /admin HTTP/1.1", b"GET /ok HTTP/1.1"]
