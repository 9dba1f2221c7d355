"""L7 authorization in the node proxy (issue #4): in-process on loopback with
the two-node harness of test_proxy_server and ``l7: true``. A denied request
gets 403 and the same connection serves the next one; the backend never sees
what was denied (asserted on what it received)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_proxy_policy import LABELS, apply, doc
from tests.unit.test_proxy_server import V4, Cluster, FlowOrigin, close_writer, run


class Recorder:
    """Keep-alive HTTP/1.1 server that records every request line it gets."""

    def __init__(self, ip: str):
        self.ip = ip
        self.lines: list[bytes] = []

    async def start(self):
        self.srv = await asyncio.start_server(self._handle, self.ip, 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.srv.close()
        await self.srv.wait_closed()

    async def _handle(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                self.lines.append(head.split(b"\r\n", 1)[0])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()


async def request(r, w, method: str, path: str) -> tuple[int, bytes, bytes]:
    w.write(f"{method} {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:"))
    return status, head, await asyncio.wait_for(r.readexactly(length), 10)


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
