"""L7 authorization in the node proxy (issue #4): in-process on loopback with
the two-node harness of tests/support/mesh.py and ``l7: true``. A denied request
gets 403 and the same connection serves the next one; the backend never sees
what was denied (asserted on what it received)."""

from __future__ import annotations

import asyncio

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


# ---- each refused request's access-log line says denied, by what, with its flags

async def _h2_requests(reader, writer, paths):
    """Send every request on one HTTP/2 (prior knowledge) connection at once, then
    read until each stream has ended; -> {path: status}."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sids = {}
    for p in paths:
        sid = conn.get_next_available_stream_id()
        sids[sid] = p
        conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"db"),
                                (b":path", p.encode())], end_stream=True)
    writer.write(conn.data_to_send())
    status, ended = {}, set()
    async with asyncio.timeout(10):
        while len(ended) < len(sids):
            data = await reader.read(65536)
            assert data, "the proxy closed the HTTP/2 connection"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    status[sids[e.stream_id]] = int(dict(e.headers)[b":status"])
                elif isinstance(e, h2.events.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended.add(e.stream_id)
            writer.write(conn.data_to_send())
    return status


@pytest.mark.parametrize("proto", ["http/1.1", "h2"])
def test_each_refused_request_is_logged_as_denied_with_its_policy_rule_and_flags(tmp_path, proto):
    """An ALLOW policy that no rule of matches (e.g. a request without the end
    user it requires) and a named DENY rule: each refused request's line says
    ``denied``, which policy and rule (none: no ALLOW matched) and ``RBAC``,
    even though the connection itself was allowed; on HTTP/2 two refused
    streams in flight at once keep their own reasons."""

    async def main():
        async with Cluster(tmp_path, l7=True, labels=LABELS) as c:
            await apply(c,
                        doc("data", "db-api", "db", "ALLOW", "[{to: [{operation: {paths: [/api/*]}}]}]"),
                        doc("data", "db-no-admin", "db", "DENY",
                            "[{to: [{operation: {methods: [PUT]}}]}, {to: [{operation: {paths: [/api/admin]}}]}]"))
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", 9, 1001))  # nothing is forwarded
            if proto == "h2":
                got = await _h2_requests(r, w, ["/other", "/api/admin"])
            else:
                got = {p: (await request(r, w, "GET", p))[0] for p in ("/other", "/api/admin")}
            await close_writer(w)
            srv = c.servers[1]
            async with asyncio.timeout(10):  # request lines are flushed with the connection's
                while srv.stats()["active_connections"]:
                    await asyncio.sleep(0.01)
            return got, srv.stats(), c.access("node2")

    got, stats, log = run(main())
    assert got == {"/other": 403, "/api/admin": 403}
    lines = {e["path"]: e for e in log if e.get("kind") == "request" and e["dst_pod"] == "data/db-1"}
    want = {
        "/other": ("denied", "policy", None, None, "no ALLOW policy match", "RBAC", "RBAC"),
        "/api/admin": ("denied", "policy", "data/db-no-admin", 1, "policy data/db-no-admin rule 1", "RBAC", "RBAC"),
    }
    assert {p: (e["verdict"], e["deny_reason"], e["policy"], e["rule"], e["reason"], e["response_flags"],
                e["result"]) for p, e in lines.items()} == want
    hm = stats["http_metrics"]
    assert hm["denied_policies"] == {"": 1, "data/db-no-admin": 1}
    flags = {dict(zip(hm["labels"], row[0]))["response_flags"] for row in hm["series"]}
    assert flags == {"RBAC"}
    assert stats["counters"]["requests_denied"] == 2
