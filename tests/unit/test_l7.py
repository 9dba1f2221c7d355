"""L7 session over real loopback sockets: curl / raw clients ⇄ L7Session ⇄ real servers.

Upstreams: Python's ThreadingHTTPServer (HTTP/1.1, counts connections) and a
tiny asyncio server built on our own RequestParser (chunked echo, upgrade
echo, slow and until-close modes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.proxy.http1 import Body, EndOfMessage, ParseError, RequestParser, ResponseHead, ResponseParser
from agent.proxy.l7 import L7Settings, Response, UpstreamPool, session_factory
from agent.proxy.tracing import parse_traceparent
from agent.traffic.breaker import Limit
from agent.traffic.upstream_cluster import Cluster
from agent.traffic.trafficpolicy import Timeouts, TrafficSettings
from tests.support.aio import run

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- upstream 1: ThreadingHTTPServer

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, body: bytes, status=200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append(self.path)
        self._reply(json.dumps({"path": self.path, "headers": self.headers.items()}).encode())

    def do_HEAD(self):
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()

    def do_POST(self):
        self.server.requests.append(self.path)
        n = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(n) if n else b""
        self._reply(hashlib.sha256(data).hexdigest().encode() + b" %d" % len(data))

    def log_message(self, *a):
        pass


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.requests: list[str] = []

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)


@contextlib.contextmanager
def http_server():
    srv = CountingServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# ---- upstream 2: a tiny asyncio server on our own parser

class EchoServer:
    """POST: echo the body chunked; /ws: 101 then echo raw; /slow: sleep; /close: until-close."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.connections = 0
        self.requests: list[str] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.connections += 1
        p = RequestParser()
        head = None
        body = []
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in p.feed(data):
                    if isinstance(ev, ParseError):
                        return
                    if isinstance(ev, Body):
                        body.append(ev.data)
                    elif isinstance(ev, EndOfMessage):
                        self.requests.append(head.path.path)
                        if head.upgrade:
                            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\n\r\n")
                            rest = p.take_raw()
                            if rest:
                                writer.write(rest)
                            while data := await reader.read(65536):
                                writer.write(data)
                            writer.write_eof()
                            return
                        if head.path.path == "/slow":
                            await asyncio.sleep(self.delay)
                        if head.path.path == "/close":
                            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close body")
                            await writer.drain()
                            writer.close()
                            return
                        data = b"".join(body)
                        body.clear()
                        hdr = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Sha: %s\r\n"
                               b"X-Seen: %s\r\n\r\n" % (hashlib.sha256(data).hexdigest().encode(),
                                                        json.dumps([(n.decode(), v.decode()) for n, v in head.headers]).encode()))
                        writer.write(hdr)
                        for i in range(0, len(data), 100000):
                            writer.write(b"%x\r\n%s\r\n" % (len(data[i:i + 100000]), data[i:i + 100000]))
                        writer.write(b"0\r\n\r\n")
                        await writer.drain()
                    else:
                        head = ev
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


# ---- the proxy under test

class Proxy:
    """The L7 session on a loopback port. ``cluster`` None: the chooser returns
    the bare address (wrapped by the pool in a default single cluster)."""

    def __init__(self, addr, settings=None, on_request=None, cluster=None):
        self.addr = addr
        self.settings = settings or L7Settings()
        self.responses: list[tuple[str, int]] = []
        self.exchanges = []
        self.on_request = on_request
        self.cluster = cluster

    def _on_response(self, h, st, el, ex):
        self.responses.append((h.path.path, st))
        self.exchanges.append(ex)

    async def __aenter__(self):
        self.pool = UpstreamPool()
        choose = (lambda head: tuple(self.addr)) if self.cluster is None else (lambda head: self.cluster)
        self.server = await asyncio.get_running_loop().create_server(
            session_factory(choose, self.pool, self.settings,
                            on_request=self.on_request, on_response=self._on_response),
            "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        self.pool.close()


async def curl(*args, stdin=None):
    p = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-v", "--max-time", "20", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate(stdin)
    return p.returncode, out, err.decode("utf-8", "replace")


async def raw_exchange(port, data: bytes, *, n_responses=1, method=b"GET", timeout=5.0):
    """Send bytes, parse responses; returns (events, closed_by_proxy)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    p = ResponseParser()
    p.expect(method)
    events, done = [], 0
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while done < n_responses:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    events += p.feed_eof()
                    break
                evs = p.feed(chunk)
                events += evs
                done += sum(isinstance(e, EndOfMessage) for e in evs)
            if not closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3):
                        closed = await reader.read(1) == b""
    finally:
        writer.close()
    return events, closed


def heads(events):
    return [e for e in events if isinstance(e, ResponseHead)]


# ---- tests

def test_keep_alive_reuses_one_upstream_connection_and_propagates_tracing():
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                rc, out, err = await curl(f"{px.url}/a/../b", f"{px.url}/c", f"{px.url}/d?x=1",
                                          "-H", f"traceparent: {TP}", "-H", "Connection: keep-alive, X-Hop",
                                          "-H", "X-Hop: secret")
                assert rc == 0, err
                assert err.count("Re-using existing connection") == 2  # downstream keep-alive
                assert srv.requests == ["/b", "/c", "/d?x=1"]  # normalized target forwarded
                assert srv.connections == 1 and px.pool.connects == 1 and px.pool.reuses == 2
                bodies = out.decode().replace("}{", "}\n{").splitlines()
                seen = [dict((k.lower(), v) for k, v in json.loads(b)["headers"]) for b in bodies]
                spans = set()
                for h in seen:
                    tp = parse_traceparent(h["traceparent"])
                    assert tp.trace_id == TP.split("-")[1].encode() and tp.parent_id != b"00f067aa0ba902b7"
                    spans.add(tp.parent_id)
                    assert len(h["x-request-id"]) == 36
                    assert "x-hop" not in h and "connection" not in h
                assert len(spans) == 3
                assert px.responses == [("/b", 200), ("/c", 200), ("/d", 200)]
                ex = px.exchanges[0]
                assert (ex.cluster, ex.upstream, ex.attempts, ex.flags) == (
                    None, tuple(srv.server_address), 1, "-")
                assert ex.request_body_bytes == 0 and ex.response_body_bytes == len(bodies[0])
                # the record carries what was forwarded (the access log's ids): generated request ids too
                assert [x.trace.request_id.decode() for x in px.exchanges] == [h["x-request-id"] for h in seen]
                assert {x.trace.traceparent.parent_id for x in px.exchanges} == spans
    run(main())


def test_chunked_upload_streamed_both_ways():
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main():
        async with EchoServer() as up, Proxy(up.addr) as px:
            rc, out, err = await curl("-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                                      "-o", "/dev/null", "-D", "-", f"{px.url}/up", stdin=payload)
            assert rc == 0, err
            text = out.decode()
            assert f"x-sha: {hashlib.sha256(payload).hexdigest()}" in text.lower()
            assert "transfer-encoding: chunked" in text.lower()
            seen = dict((k.lower(), v) for k, v in json.loads(text.split("X-Seen: ")[1].split("\r\n")[0]))
            assert seen["transfer-encoding"] == "chunked" and "content-length" not in seen
    run(main())


def test_expect_100_continue_relays_the_interim_response(tmp_path):
    f = tmp_path / "body"
    payload = os.urandom(2 * 1024 * 1024)
    f.write_bytes(payload)

    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                t0 = time.monotonic()
                rc, out, err = await curl("-H", "Expect: 100-continue", "--expect100-timeout", "10",
                                          "--data-binary", f"@{f}", f"{px.url}/upload")
                assert rc == 0, err
                assert "< HTTP/1.1 100 Continue" in err
                assert out.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
                assert time.monotonic() - t0 < 8  # the 100 came from upstream, no curl timeout
    run(main())


def test_pipelined_requests_answered_in_order():
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
                events, closed = await raw_exchange(px.port, reqs, n_responses=5)
                paths = [json.loads(e.data)["path"] for e in events if isinstance(e, Body)]
                assert paths == [f"/p{i}" for i in range(5)]
                assert [h.status for h in heads(events)] == [200] * 5 and not closed
                assert srv.connections == 1
    run(main())


def test_websocket_style_upgrade_switches_to_a_byte_relay():
    async def main():
        async with EchoServer() as up, Proxy(up.addr) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                         b"\x81\x05early")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"upgrade: websocket" in head.lower()
            assert await asyncio.wait_for(reader.readexactly(7), 5) == b"\x81\x05early"
            frame = b"\x82\x7e\x00\x10" + bytes(range(16)) + b"\x00\xff GET / HTTP/1.1\r\n\r\n"
            writer.write(frame)
            assert await asyncio.wait_for(reader.readexactly(len(frame)), 5) == frame
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert px.responses == [("/ws", 101)]
            cluster = px.pool.direct(tuple(up.addr))
            assert cluster.breaker.active[Limit.REQUESTS] == 0  # released at the 101
            for _ in range(50):  # the tunnel's connection count ends with the relay
                if cluster.breaker.active[Limit.CONNECTIONS] == 0:
                    break
                await asyncio.sleep(0.02)
            assert cluster.breaker.active[Limit.CONNECTIONS] == 0
    run(main())


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET /a%2f..%2fetc HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    (b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
])
def test_malformed_requests_refused_and_never_forwarded(raw, status):
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                events, closed = await raw_exchange(px.port, raw)
                (h,) = heads(events)
                assert h.status == status
                assert (b"Connection", b"close") in h.headers and closed
                assert srv.connections == 0 and px.pool.connects == 0
    run(main())


def test_malformed_second_request_after_a_good_one():
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                events, closed = await raw_exchange(
                    px.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\n\r\n", n_responses=2)
                assert [h.status for h in heads(events)] == [200, 400] and closed
                assert srv.requests == ["/ok"]
    run(main())


def test_upstream_down_is_503_uf_after_retries():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()  # nothing listens there now

    async def main():
        async with Proxy(addr) as px:
            events, closed = await raw_exchange(px.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert [h.status for h in heads(events)] == [503] and closed
            assert px.responses == [("/", 503)]
            # connect-failure is retried by default (same, only endpoint): 3 tries, then URX
            assert px.exchanges[0].attempts == 3 and px.exchanges[0].flags == "UF,URX"
    run(main())


def test_slow_upstream_is_504():
    async def main():
        async with EchoServer(delay=3.0) as up:
            cluster = Cluster.single(tuple(up.addr), TrafficSettings(timeouts=Timeouts(request=0.3)))
            async with Proxy(up.addr, cluster=cluster) as px:
                t0 = time.monotonic()
                events, closed = await raw_exchange(px.port, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
                assert [h.status for h in heads(events)] == [504] and closed
                assert 0.25 < time.monotonic() - t0 < 2.5
                assert px.exchanges[0].flags == "UT" and px.exchanges[0].attempts == 1
                assert cluster.breaker.active == dict.fromkeys(cluster.breaker.active, 0)
    run(main())


def test_slowloris_client_closed_by_header_timeout():
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address, L7Settings(header_timeout=0.4)) as px:
                reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
                t0 = time.monotonic()
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
                got = b""
                for i in range(30):  # one header byte every 0.1 s, never finishing
                    try:
                        writer.write(b"X-%d: y\r\n" % i)
                        await writer.drain()
                    except ConnectionError:
                        break
                    try:
                        got += await asyncio.wait_for(reader.read(4096), 0.1)
                    except TimeoutError:
                        continue
                    if got:
                        break
                with contextlib.suppress(ConnectionError):
                    got += await asyncio.wait_for(reader.read(), 2)
                writer.close()
                assert got.startswith(b"HTTP/1.1 408 ")
                assert time.monotonic() - t0 < 2.5
                assert srv.connections == 0
    run(main())


def test_on_request_short_circuits_and_connection_stays_usable():
    def policy(head):
        return Response(403, b"denied\n") if head.path.path.startswith("/admin") else None

    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address, on_request=policy) as px:
                events, closed = await raw_exchange(
                    px.port, b"GET /x/../admin HTTP/1.1\r\nHost: a\r\n\r\n"
                             b"POST /admin HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
                             b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n", n_responses=3)
                assert [h.status for h in heads(events)] == [403, 403, 200] and not closed
                assert srv.requests == ["/ok"]
                assert px.responses == [("/admin", 403), ("/admin", 403), ("/ok", 200)]
    run(main())


def test_until_close_response_rechunked_for_http11_and_raw_for_http10():
    async def main():
        async with EchoServer() as up, Proxy(up.addr) as px:
            events, closed = await raw_exchange(
                px.port, b"GET /close HTTP/1.1\r\nHost: a\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n",
                n_responses=2)
            hs = heads(events)
            assert hs[0].framing == "chunked" and hs[1].status == 200 and not closed
            assert b"".join(e.data for e in events if isinstance(e, Body)).startswith(b"until-close body")
            assert up.connections == 2  # the until-close connection is never pooled
            events, closed = await raw_exchange(px.port, b"GET /close HTTP/1.0\r\n\r\n")
            assert heads(events)[0].framing == "until-close" and closed
            assert [e.data for e in events if isinstance(e, Body)] == [b"until-close body"]
    run(main())


def test_head_request_gets_no_body():
    async def main():
        with http_server() as srv:
            async with Proxy(srv.server_address) as px:
                rc, out, err = await curl("-I", f"{px.url}/h", f"{px.url}/h2")
                assert err.count("Re-using existing connection") == 1
                assert rc == 0, err
                assert out.count(b"HTTP/1.1 200") == 2
                assert out.lower().count(b"content-length: 12345") == 2  # the GET's length, no body
                assert srv.connections == 1 and srv.requests == ["/h", "/h2"]
    run(main())
