"""``Upstream.open_socket`` over real loopback sockets on uvloop: the
connect the destination side makes to a pod for every new connection."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from agent.proxy.conn import ConnectFailure
from agent.proxy.relay import Endpoint
from agent.proxy.tunnel import Status
from agent.proxy.upstream import Upstream
from tests.support.aio import run


def _state(timeout: float = 5.0) -> SimpleNamespace:
    return SimpleNamespace(mesh_mark=0, connect_timeout=timeout)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


def test_open_socket_connects_and_the_socket_carries_a_transport():
    """Many connects in a row, each socket then wrapped by the loop (the
    writer registered while connecting must be gone) and echoing."""

    async def main():
        up = Upstream(SimpleNamespace(), {})
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            for i in range(20):
                sock = await up.open_socket(("127.0.0.1", port), _state())
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert not sock.getblocking()
                _, ep = await loop.create_connection(lambda: Endpoint("pod"), sock=sock)
                ep.write(b"ping %d" % i)
                assert await ep.receive() == b"ping %d" % i
                ep.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_open_socket_refused_is_a_connect_failure():
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        up = Upstream(SimpleNamespace(), {})
        with pytest.raises(ConnectFailure) as e:
            await up.open_socket(("127.0.0.1", port), _state())
        assert e.value.result == "refused"
        assert e.value.status is Status.REFUSED
        assert f"127.0.0.1:{port} refused" in e.value.reason

    run(main())


def _full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: a connect to it hangs (SYN dropped)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(full.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    return full, fillers


def test_open_socket_times_out_or_is_cancelled_cleanly():
    """A connect in progress waits with one timer of its own: it expires as
    a timeout ConnectFailure; a connect cancelled from outside (the caller's
    own deadline, a shutdown) passes the cancellation through.  Either way
    the socket is closed and the next connect works."""

    async def main():
        full, fillers = _full_listener()
        up = Upstream(SimpleNamespace(), {})
        loop = asyncio.get_running_loop()
        try:
            with pytest.raises(ConnectFailure) as e:
                await up.open_socket(full.getsockname(), _state(timeout=0.2))
            assert e.value.result == "timeout" and e.value.status is Status.TIMEOUT
            assert "timed out after 0.2s" in e.value.reason
            task = loop.create_task(up.open_socket(full.getsockname(), _state(timeout=30)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # and the loop still connects afterwards (no writer left behind on a reused fd)
            server = await asyncio.start_server(_echo, "127.0.0.1", 0)
            try:
                sock = await up.open_socket(server.sockets[0].getsockname(), _state())
                _, ep = await loop.create_connection(lambda: Endpoint("pod"), sock=sock)
                ep.write(b"after")
                assert await ep.receive() == b"after"
                ep.close()
            finally:
                server.close()
                await server.wait_closed()
        finally:
            full.close()
            for s in fillers:
                s.close()

    run(main())


def test_open_socket_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")

    async def main():
        try:
            server = await asyncio.start_server(_echo, "::1", 0)
        except OSError as e:
            pytest.skip(f"no IPv6 loopback here: {e}")
        port = server.sockets[0].getsockname()[1]
        try:
            sock = await Upstream(SimpleNamespace(), {}).open_socket(("::1", port), _state())
            assert sock.getpeername()[:2] == ("::1", port)
            sock.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_accepted_and_connected_tcp_transports_have_nodelay():
    """``set_nodelay`` leaves uvloop's TCP transports alone because uvloop
    sets TCP_NODELAY itself: on an accepted socket and on one it wraps."""

    async def main():
        loop = asyncio.get_running_loop()
        accepted: list[Endpoint] = []
        server = await loop.create_server(lambda: Endpoint("client", on_made=accepted.append), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)  # loopback: at once
            sock.setblocking(False)
            assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            tr, _ = await loop.create_connection(lambda: Endpoint("pod"), sock=sock)
            for _ in range(100):
                if accepted:
                    break
                await asyncio.sleep(0.01)
            for t in (tr, accepted[0].transport):
                assert t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            for ep in accepted:
                ep.close()
            if tr is not None:
                tr.close()
            await asyncio.sleep(0)
            server.close()
            await server.wait_closed()

    run(main())
