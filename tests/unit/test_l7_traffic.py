"""Traffic management inside the L7 session, over real loopback sockets.

Clients ⇄ L7Session ⇄ small asyncio upstreams written here that count what
they receive (connections, requests, bodies) and fail on demand: 503,
connection reset, slowness, or not listening at all. Each test checks the
client's answers *and* what the upstreams saw, so a broken feature fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time

from agent.proxy.http1 import Body, EndOfMessage, ParseError, RequestParser, ResponseHead, ResponseParser
from agent.proxy.l7 import L7Settings, UpstreamPool, session_factory
from agent.proxy.relay import reset_transport
from agent.traffic.breaker import Limit
from agent.traffic.upstream_cluster import Cluster
from agent.traffic.trafficpolicy import (
    Budget, CircuitBreaker, OutlierDetection, Retries, Timeouts, TrafficSettings,
)
from tests.support import aio


def run(coro, timeout=50):
    return aio.run(coro, timeout)


def settings(*, retries=None, budget=None, timeouts=None, breaker=None, outlier=None) -> TrafficSettings:
    return TrafficSettings(retries or Retries(), budget or Budget(), timeouts or Timeouts(),
                           breaker or CircuitBreaker(), outlier or OutlierDetection())


NO_OUTLIER = OutlierDetection(consecutive_5xx=0, consecutive_connect_failures=0)


# ---- upstreams

class _UpProto(asyncio.Protocol):
    def __init__(self, srv: "Upstream") -> None:
        self.srv = srv
        self.parser = RequestParser()
        self.body: list[bytes] = []
        self.head = None

    def connection_made(self, transport) -> None:
        self.t = transport
        self.srv.connections += 1
        self.srv.transports.add(transport)

    def connection_lost(self, exc) -> None:
        self.srv.transports.discard(self.t)

    def data_received(self, data: bytes) -> None:
        for ev in self.parser.feed(data):
            if isinstance(ev, ParseError):
                self.t.close()
                return
            if isinstance(ev, Body):
                self.body.append(ev.data)
            elif isinstance(ev, EndOfMessage):
                self._answer(self.head, b"".join(self.body))
                self.body.clear()
            else:
                self.head = ev

    def _answer(self, head, body: bytes) -> None:
        srv = self.srv
        srv.requests += 1
        srv.bodies.append(body)
        failing = srv.broken or srv.requests <= srv.fail_first
        mode = srv.mode if failing else "ok"
        if mode == "reset":
            reset_transport(self.t)
            return
        if mode == "503":
            self._send(503, b"unavailable")
            return
        reply = b"%s %s %d" % (srv.name.encode(), hashlib.sha256(body).hexdigest().encode(), len(body))
        if mode == "slow":
            asyncio.get_running_loop().call_later(srv.delay, self._send, 200, reply)
        else:
            self._send(200, reply)

    def _send(self, status: int, body: bytes) -> None:
        if not self.t.is_closing():
            self.t.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))


class Upstream:
    """``mode`` (ok | 503 | reset | slow) applies to the first ``fail_first``
    requests, or to all while ``broken`` is set; others get 200 with
    ``<name> <sha256 of the body> <length>``."""

    def __init__(self, name: str, mode: str = "ok", *, fail_first: int = 0, broken: bool = False,
                 delay: float = 0.0) -> None:
        self.name, self.mode, self.fail_first, self.broken, self.delay = name, mode, fail_first, broken, delay
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []
        self.transports: set = set()

    async def __aenter__(self) -> "Upstream":
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _UpProto(self), "127.0.0.1", 0)
        self.target = ("127.0.0.1", self.server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self.server.close()
        for t in list(self.transports):
            t.close()

    async def __aexit__(self, *exc) -> None:
        self.stop()


def dead_target() -> tuple[str, int]:
    """An address where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()
    return addr


# ---- the proxy and a client

class Proxy:
    def __init__(self, cluster: Cluster, pool: UpstreamPool | None = None, settings: L7Settings | None = None):
        self.cluster = cluster
        self.pool = pool or UpstreamPool()
        self.settings = settings
        self.exchanges: list = []
        self.clients: list = []

    def client(self) -> "Client":
        """A client closed with the proxy, even when the test fails."""
        c = Client(self.port)
        self.clients.append(c)
        return c

    async def __aenter__(self) -> "Proxy":
        self.server = await asyncio.get_running_loop().create_server(
            session_factory(lambda head: self.cluster, self.pool, self.settings,
                            on_response=lambda h, st, el, ex: self.exchanges.append((st, ex))),
            "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.close()
        self.server.close()
        self.pool.close()
        await asyncio.sleep(0)


class Client:
    """One keep-alive client connection (reconnects if the proxy closed it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str = "GET", path: str = "/", body: bytes = b"", *,
                      chunked: bool = False, timeout: float = 10.0):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: svc\r\n".encode()
        if chunked:
            data = head + b"Transfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 16384):
                piece = body[i:i + 16384]
                data += b"%x\r\n%s\r\n" % (len(piece), piece)
            data += b"0\r\n\r\n"
        elif body or method in ("POST", "PUT"):
            data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        else:
            data = head + b"\r\n"
        self.writer.write(data)
        p = ResponseParser()
        p.expect(method.encode())
        status, headers, out = None, [], []
        async with asyncio.timeout(timeout):
            while True:
                chunk = await self.reader.read(65536)
                evs = p.feed(chunk) if chunk else p.feed_eof()
                done = False
                for ev in evs:
                    if isinstance(ev, ResponseHead):
                        status, headers = ev.status, ev.headers
                    elif isinstance(ev, Body):
                        out.append(ev.data)
                    elif isinstance(ev, EndOfMessage):
                        done = True
                if done or not chunk:
                    break
        if not chunk or (b"Connection", b"close") in headers:
            self.close()
        return status, dict((n.lower(), v) for n, v in headers), b"".join(out)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def idle_breaker(c: Cluster, pool: UpstreamPool | None = None) -> bool:
    """No request in flight or waiting; open connections are the pooled ones."""
    a = c.breaker.active
    conns = 0 if pool is None else pool.idle_count()
    return a[Limit.REQUESTS] == 0 and a[Limit.PENDING] == 0 and a[Limit.CONNECTIONS] == conns


# ---- load balancing

def test_requests_spread_over_endpoints_and_connections_are_reused():
    async def main():
        async with Upstream("a") as a, Upstream("b") as b, Upstream("c") as c:
            cluster = Cluster("shop/web:80", [a.target, b.target, c.target], rng=random.Random(7))
            async with Proxy(cluster) as px:
                clients = [px.client() for _ in range(4)]

                async def worker(cl):
                    for _ in range(15):
                        st, _, body = await cl.request("GET", "/x")
                        assert st == 200, body
                await asyncio.gather(*(worker(cl) for cl in clients))
                for cl in clients:
                    cl.close()
                counts = [a.requests, b.requests, c.requests]
                assert sum(counts) == 60 and min(counts) >= 8, counts
                # keep-alive upstream: at most one connection per concurrent client per endpoint
                assert a.connections + b.connections + c.connections <= 12
                assert px.pool.reuses >= 48 and px.pool.connects == a.connections + b.connections + c.connections
                assert {ex.cluster for _, ex in px.exchanges} == {"shop/web:80"}
                assert all(ex.attempts == 1 and ex.flags == "-" for _, ex in px.exchanges)
                assert idle_breaker(cluster, px.pool) and all(cluster.lb.outstanding(t) == 0 for t in cluster.targets)
    run(main())


def test_a_stopped_endpoint_stops_receiving_requests():
    async def main():
        async with Upstream("a") as a, Upstream("b") as b:
            cluster = Cluster("shop/web:80", [a.target, b.target], rng=random.Random(3),
                              settings=settings(outlier=OutlierDetection(
                                  consecutive_connect_failures=1, max_ejection_percent=50)))
            async with Proxy(cluster) as px:
                cl = px.client()
                busy = [cluster.lb.start(b.target)]  # b looks busy: P2C picks a while it can
                for _ in range(5):
                    st, _, body = await cl.request()
                    assert st == 200 and body.startswith(b"a ")
                a.stop()  # closes its pooled connections too: new connects are refused
                await asyncio.sleep(0.05)
                for _ in range(20):
                    st, _, body = await cl.request()
                    assert st == 200 and body.startswith(b"b ")  # retried to b when a was tried
                assert a.requests == 5 and b.requests == 20
                assert cluster.outlier.ejected(time.monotonic()) == {a.target}
                exs = [ex for _, ex in px.exchanges[5:]]
                assert exs[0].attempts == 2 and "UF" not in exs[0].flags  # a refused, b answered
                assert all(ex.upstream == b.target and ex.attempts == 1 for ex in exs[1:])
                cluster.lb.finish(busy[0], True, 0.0)
    run(main())


# ---- retries

def _retry_modes():
    return ["503", "reset", "refused"]


def test_failing_endpoint_is_retried_on_another_one():
    for mode in _retry_modes():
        async def main():
            async with Upstream("bad", "503" if mode == "refused" else mode, broken=True) as bad, \
                    Upstream("good") as good:
                bad_target = dead_target() if mode == "refused" else bad.target
                cluster = Cluster("shop/web:80", [bad_target, good.target], rng=random.Random(5),
                                  settings=settings(outlier=NO_OUTLIER))
                async with Proxy(cluster) as px:
                    cl = px.client()
                    for i in range(20):
                        st, _, body = await cl.request("GET", f"/r{i}")
                        assert st == 200 and body.startswith(b"good "), (mode, st, body)
                    cl.close()
                    retried = [ex for _, ex in px.exchanges if ex.attempts > 1]
                    assert retried, mode  # P2C picked the bad endpoint at least once
                    assert all(ex.attempts == 2 and ex.upstream == good.target for ex in retried)
                    if mode != "refused":
                        assert bad.requests == len(retried)
                    assert good.requests == 20
                    assert idle_breaker(cluster, px.pool)
        run(main())


def test_fails_first_n_then_succeeds_on_the_only_endpoint():
    async def main():
        async with Upstream("one", "503", fail_first=2) as up:
            cluster = Cluster.single(up.target)
            async with Proxy(cluster) as px:
                cl = px.client()
                st, _, body = await cl.request("GET", "/")
                assert st == 200 and up.requests == 3
                assert px.exchanges[0][1].attempts == 3 and px.exchanges[0][1].flags == "-"
                cl.close()
    run(main())


def test_post_is_not_retried_by_default_but_put_is_with_its_body_replayed():
    async def main():
        async with Upstream("bad", "503", broken=True) as bad, Upstream("good") as good:
            cluster = Cluster("shop/web:80", [bad.target, good.target], settings=settings(outlier=NO_OUTLIER))
            # make the first pick the bad endpoint: it has less outstanding work than a busy good one
            async with Proxy(cluster) as px:
                cl = px.client()
                body = bytes(range(256)) * 40
                tok = cluster.lb.start(good.target)  # good looks busy: bad wins every P2C draw
                st, _, _ = await cl.request("POST", "/p", body)
                assert st == 503 and bad.requests == 1 and good.requests == 0
                assert px.exchanges[-1][1].attempts == 1
                st, _, reply = await cl.request("PUT", "/p", body)
                assert st == 200 and bad.requests == 2 and good.requests == 1
                assert reply == b"good %s %d" % (hashlib.sha256(body).hexdigest().encode(), len(body))
                assert good.bodies[-1] == body and bad.bodies[-1] == body
                st, _, reply = await cl.request("PUT", "/c", body, chunked=True)  # chunked, small: replayed
                assert st == 200 and good.bodies[-1] == body and px.exchanges[-1][1].attempts == 2
                assert px.exchanges[-1][1].request_body_bytes == len(body)
                cluster.lb.finish(tok, True, 0.0)
                cl.close()
    run(main())


def test_a_body_larger_than_max_body_bytes_is_not_retried():
    async def main():
        async with Upstream("one", "503", broken=True) as up:
            cluster = Cluster.single(up.target, settings(retries=Retries(max_body_bytes=4096)))
            async with Proxy(cluster) as px:
                cl = px.client()
                assert (await cl.request("PUT", "/small", b"x" * 4096))[0] == 503
                assert up.requests == 3  # first try + 2 retries, body replayed
                assert up.bodies == [b"x" * 4096] * 3
                big = b"y" * 100_000
                assert (await cl.request("PUT", "/big", big))[0] == 503
                assert up.requests == 4 and up.bodies[-1] == big
                assert (await cl.request("PUT", "/bigchunked", big, chunked=True))[0] == 503
                assert up.requests == 5 and up.bodies[-1] == big
                assert [ex.attempts for _, ex in px.exchanges] == [3, 1, 1]
                assert px.exchanges[0][1].flags == "URX"
                cl.close()
    run(main())


def test_retry_budget_caps_attempts_under_a_failing_upstream():
    async def main():
        async with Upstream("one", "503", broken=True) as up:
            cluster = Cluster.single(up.target, settings(
                retries=Retries(attempts=3), budget=Budget(percent=20, min_per_second=2)))
            async with Proxy(cluster) as px:
                cl = px.client()
                t0 = time.monotonic()
                n = 60
                for _ in range(n):
                    assert (await cl.request())[0] == 503
                elapsed = time.monotonic() - t0
                cl.close()
                retries = up.requests - n
                # without a budget: 3 retries each (180); with it: 20 % of n plus 2/s (+ the initial 2)
                assert 0 < retries <= 0.2 * n + 2 * (elapsed + 1) + 1, (retries, elapsed)
                assert cluster.budget.denied > 0
                assert any("URX" in ex.flags for _, ex in px.exchanges)
    run(main())


# ---- timeouts

def test_per_try_timeout_retries_elsewhere_and_request_timeout_ends_it():
    async def main():
        async with Upstream("slow", "slow", broken=True, delay=5.0) as slow, Upstream("fast") as fast:
            per_try = settings(retries=Retries(per_try_timeout=0.2, on=frozenset({"timeout"})),
                               outlier=NO_OUTLIER)
            cluster = Cluster("shop/web:80", [slow.target, fast.target], per_try)
            async with Proxy(cluster) as px:
                cl = px.client()
                tok = cluster.lb.start(fast.target)  # the slow endpoint is picked first
                t0 = time.monotonic()
                st, _, body = await cl.request()
                assert st == 200 and body.startswith(b"fast ")
                assert 0.2 <= time.monotonic() - t0 < 2.0
                assert px.exchanges[-1][1].attempts == 2 and slow.requests == 1
                cluster.lb.finish(tok, True, 0.0)
                cl.close()
            # both slow: each try times out, then the request timeout ends it with 504
            both = Cluster("shop/web:80", [slow.target, slow.target[:1] + (slow.target[1],)], settings(
                retries=Retries(attempts=5, per_try_timeout=0.2, on=frozenset({"timeout"})),
                timeouts=Timeouts(request=0.5), outlier=NO_OUTLIER))
            async with Proxy(both) as px:
                cl = px.client()
                t0 = time.monotonic()
                st, headers, _ = await cl.request()
                took = time.monotonic() - t0
                assert st == 504 and 0.45 <= took < 2.0, took
                ex = px.exchanges[-1][1]
                assert "UT" in ex.flags and ex.attempts in (2, 3)
                cl.close()
                # no per-try timeout: the request timeout alone
                px.cluster = Cluster.single(slow.target, settings(timeouts=Timeouts(request=0.3)))
                cl = px.client()
                t0 = time.monotonic()
                assert (await cl.request())[0] == 504
                assert 0.25 <= time.monotonic() - t0 < 2.0
                assert px.exchanges[-1][1].attempts == 1 and px.exchanges[-1][1].flags == "UT"
                cl.close()
                assert idle_breaker(px.cluster, px.pool)
    run(main())


def test_stream_idle_timeout_fires_on_a_silent_exchange():
    async def main():
        async with Upstream("slow", "slow", broken=True, delay=5.0) as slow:
            cluster = Cluster.single(slow.target, settings(timeouts=Timeouts(request=None, stream_idle=0.3)))
            async with Proxy(cluster) as px:
                cl = px.client()
                t0 = time.monotonic()
                assert (await cl.request())[0] == 504
                assert 0.25 <= time.monotonic() - t0 < 2.0
                assert px.exchanges[-1][1].flags == "UT"
                cl.close()
    run(main())


# ---- circuit breaking

def test_breaker_trips_at_each_limit_with_the_header_and_releases():
    async def main():
        async with Upstream("slow", "slow", broken=True, delay=0.4) as slow:
            for limit, cb in [(Limit.REQUESTS, CircuitBreaker(max_requests=1)),
                              (Limit.CONNECTIONS, CircuitBreaker(max_connections=1)),
                              (Limit.PENDING, CircuitBreaker(max_pending_requests=1))]:
                gate = asyncio.Event()

                async def open_socket(target):
                    if limit is Limit.PENDING:
                        await gate.wait()  # the first connect stays pending
                    s = socket.socket()
                    s.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(s, target[:2])
                    return s

                cluster = Cluster.single(slow.target, settings(breaker=cb, retries=Retries(attempts=0)))
                async with Proxy(cluster, UpstreamPool(open_socket=open_socket)) as px:
                    c1, c2 = px.client(), px.client()
                    first = asyncio.create_task(c1.request("GET", "/1"))
                    await asyncio.sleep(0.1)
                    st, headers, body = await c2.request("GET", "/2")
                    assert st == 503, limit
                    assert headers[b"x-meshlet-overloaded"] == limit.value.encode()
                    assert "UO" in px.exchanges[-1][1].flags
                    gate.set()
                    assert (await first)[0] == 200
                    # the refused client's connection stays usable
                    assert (await c2.request("GET", "/3"))[0] == 200
                    assert cluster.breaker.overloaded[limit] == 1
                    c1.close()
                    c2.close()
                    await asyncio.sleep(0.05)
                    assert cluster.breaker.active[Limit.REQUESTS] == 0
                    assert cluster.breaker.active[Limit.PENDING] == 0
                px.pool.close()
                await asyncio.sleep(0.05)
                assert idle_breaker(cluster), cluster.breaker.active
    run(main())


def test_breaker_counts_are_released_when_the_client_resets_mid_request():
    async def main():
        async with Upstream("slow", "slow", broken=True, delay=0.5) as slow:
            cluster = Cluster.single(slow.target)
            async with Proxy(cluster) as px:
                r, w = await asyncio.open_connection("127.0.0.1", px.port)
                w.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                await asyncio.sleep(0.1)
                assert cluster.breaker.active[Limit.REQUESTS] == 1
                assert cluster.breaker.active[Limit.CONNECTIONS] == 1
                reset_transport(w.transport)
                await asyncio.sleep(0.1)
                assert cluster.breaker.active[Limit.REQUESTS] == 0
                # the upstream connection was reset with it (a response was pending)
                assert cluster.breaker.active[Limit.CONNECTIONS] == 0
    run(main())


# ---- outlier detection

def test_outlier_ejection_removes_a_failing_endpoint_and_readmits_it_after_it_heals():
    async def main():
        async with Upstream("a", "503", broken=True) as a, Upstream("b") as b:
            cluster = Cluster("shop/web:80", [a.target, b.target], rng=random.Random(11), settings=settings(
                retries=Retries(attempts=0),
                outlier=OutlierDetection(consecutive_5xx=2, base_ejection_time=0.5, max_ejection_percent=50)))
            async with Proxy(cluster) as px:
                cl = px.client()
                busy = cluster.lb.start(b.target)  # b looks busy: P2C picks a while it can
                for _ in range(40):
                    await cl.request()
                    if cluster.outlier.ejected(time.monotonic()):
                        break
                assert cluster.outlier.ejected(time.monotonic()) == {a.target}
                seen = a.requests
                for _ in range(15):
                    st, _, body = await cl.request()
                    assert st == 200 and body.startswith(b"b ")
                assert a.requests == seen  # ejected: not tried at all
                cluster.lb.finish(busy, True, 0.001)
                a.broken = False  # heals
                await asyncio.sleep(0.6)
                for _ in range(30):
                    assert (await cl.request())[0] == 200
                assert a.requests > seen  # re-admitted
                assert cluster.outlier.ejected(time.monotonic()) == frozenset()
                cl.close()
    run(main())


def test_no_endpoint_is_503_nr_and_keeps_the_client():
    async def main():
        cluster = Cluster("shop/empty:80", [])
        async with Proxy(cluster) as px:
            cl = px.client()
            st, _, body = await cl.request()
            assert st == 503 and b"no healthy upstream" in body
            assert cl.writer is not None  # keep-alive
            assert px.exchanges[-1][1].flags == "NR" and px.exchanges[-1][1].attempts == 0
            cl.close()
            assert idle_breaker(cluster)
    run(main())


def test_cluster_update_keeps_serving_and_pool_keys_on_the_whole_target():
    async def main():
        async with Upstream("a") as a:
            opened = []

            async def open_socket(target):
                opened.append(target)
                s = socket.socket()
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, target[:2])
                return s

            t1, t2 = a.target + ("spiffe://x/ns/a/sa/one",), a.target + ("spiffe://x/ns/a/sa/two",)
            cluster = Cluster("shop/web:80", [t1])
            async with Proxy(cluster, UpstreamPool(open_socket=open_socket)) as px:
                cl = px.client()
                assert (await cl.request())[0] == 200
                assert (await cl.request())[0] == 200
                cluster.update([t2], cluster.settings, time.monotonic())
                assert (await cl.request())[0] == 200
                assert opened == [t1, t2] and a.connections == 2
                assert px.exchanges[-1][1].upstream == t2
                cl.close()
    run(main())


# ---- deadlines

def test_ticker_wakes_never_early_at_most_about_a_tick_late_and_forgets_removed():
    async def main():
        from agent.proxy.l7 import TICK, Ticker
        loop = asyncio.get_running_loop()
        ticker = Ticker(loop)
        woke: dict[str, float] = {}

        class Obj:
            def __init__(self, name, after):
                self.name, self._tick_key = name, None
                self.when = loop.time() + after
                self._tick_key = ticker.move(self, None, ticker.key(self.when))

            def _on_tick(self, now):
                woke[self.name] = now

        a, b, c = Obj("a", 0.12), Obj("b", 0.3), Obj("c", 0.2)
        ticker.remove(c, c._tick_key)
        b._tick_key = ticker.move(b, b._tick_key, ticker.key(loop.time() + 0.05))  # earlier now
        b.when = loop.time() + 0.05
        await asyncio.sleep(0.5)
        assert set(woke) == {"a", "b"}
        for o in (a, b):
            assert o.when <= woke[o.name] < o.when + TICK + 0.1
        ticker.close()
    run(main())


def test_idle_pooled_upstream_connections_expire_per_cluster_setting():
    async def main():
        async with Upstream("a") as a:
            cluster = Cluster.single(a.target, settings(timeouts=Timeouts(idle=0.2)))
            async with Proxy(cluster) as px:
                cl = px.client()
                assert (await cl.request())[0] == 200
                assert px.pool.idle_count() == 1 and len(a.transports) == 1
                for _ in range(50):
                    if not a.transports:
                        break
                    await asyncio.sleep(0.02)
                assert px.pool.idle_count() == 0 and not a.transports  # closed by the proxy
                assert cluster.breaker.active[Limit.CONNECTIONS] == 0
                assert (await cl.request())[0] == 200 and a.connections == 2
    run(main())


def test_bare_targets_get_a_long_lived_single_cluster_with_the_pools_connect_timeout():
    pool = UpstreamPool(connect_timeout=1.5)
    c = pool.direct(("10.0.0.1", 80))
    assert c is pool.direct(("10.0.0.1", 80)) and c.name is None and c.targets == (("10.0.0.1", 80),)
    assert c.settings.timeouts.connect == 1.5
    assert c.settings.retries == Retries() and c.settings.timeouts.request == Timeouts().request
