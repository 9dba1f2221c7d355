"""Relay over real loopback sockets: client ⇄ [Endpoint|Relay|Endpoint] ⇄ target."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct

import pytest

from agent.proxy.relay import Endpoint, Relay
from tests.support.aio import run

MB = 1024 * 1024


class Harness:
    """A target server, a relay front, and the relays it made."""

    def __init__(self, handler, *, buffer_size=256 * 1024, target_rcvbuf=None, before_relay=None):
        self.handler = handler
        self.buffer_size = buffer_size
        self.target_rcvbuf = target_rcvbuf
        self.before_relay = before_relay
        self.relays: list[Relay] = []
        self.relay_made = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        ls = socket.socket()
        if self.target_rcvbuf:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.target_rcvbuf)
        ls.bind(("127.0.0.1", 0))
        self.target = await asyncio.start_server(self.handler, sock=ls)
        self.target_port = ls.getsockname()[1]

        def on_made(ep):
            t = loop.create_task(self._relay(ep))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

        self.front = await loop.create_server(lambda: Endpoint("client", on_made=on_made), "127.0.0.1", 0)
        self.port = self.front.sockets[0].getsockname()[1]
        return self

    async def _relay(self, ep):
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Endpoint("upstream"), "127.0.0.1", self.target_port)
        relay = Relay(ep, up, buffer_size=self.buffer_size)
        if self.before_relay is not None:
            await self.before_relay(ep, up)
        relay.start()
        self.relays.append(relay)
        self.relay_made.set()

    async def __aexit__(self, *exc):
        for r in self.relays:
            if not r.done.done():
                r.abort("test over")
            await r.done
        self.front.close()
        self.target.close()
        await self.front.wait_closed()
        await self.target.wait_closed()
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t


async def _send_all(writer, data, chunk=MB):
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])
        await writer.drain()
    writer.write_eof()


async def _read_all_hash(reader):
    h = hashlib.sha256()
    n = 0
    while chunk := await reader.read(MB):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


async def _close(writer):
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def test_16mb_both_directions_at_once():
    up_data = os.urandom(16 * MB)
    down_data = os.urandom(16 * MB)
    got_by_server = {}

    async def handler(reader, writer):
        (n, h), _ = await asyncio.gather(_read_all_hash(reader), _send_all(writer, down_data))
        got_by_server["n"], got_by_server["h"] = n, h
        await _close(writer)

    async def main():
        async with Harness(handler) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            (n, h), _ = await asyncio.gather(_read_all_hash(reader), _send_all(writer, up_data))
            await _close(writer)
            result = await asyncio.wait_for(hx.relays[0].done, 10)
            return n, h, result

    n, h, result = run(main())
    assert (n, h) == (len(down_data), hashlib.sha256(down_data).hexdigest())
    assert got_by_server == {"n": len(up_data), "h": hashlib.sha256(up_data).hexdigest()}
    assert result.a_to_b == len(up_data) and result.b_to_a == len(down_data)
    assert not result.error


def test_half_close_keeps_other_direction():
    async def handler(reader, writer):
        data = await reader.read()  # until the client's EOF
        await asyncio.sleep(0.05)
        writer.write(b"reply:" + data)
        await writer.drain()
        await _close(writer)

    async def main():
        async with Harness(handler) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            writer.write(b"hello")
            writer.write_eof()
            reply = await reader.read()
            await _close(writer)
            result = await asyncio.wait_for(hx.relays[0].done, 10)
            return reply, result

    reply, result = run(main())
    assert reply == b"reply:hello"
    assert (result.a_to_b, result.b_to_a) == (5, 11)
    assert result.reason == "eof" and not result.error


def test_backpressure_bounds_relay_buffer():
    buffer_size = 64 * 1024
    data = os.urandom(32 * MB)
    start_reading = asyncio.Event
    state = {}

    async def handler(reader, writer):
        await state["go"].wait()
        state["server"] = await _read_all_hash(reader)
        await _close(writer)

    async def main():
        state["go"] = start_reading()
        async with Harness(handler, buffer_size=buffer_size, target_rcvbuf=64 * 1024) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            sender = asyncio.create_task(_send_all(writer, data))
            await hx.relay_made.wait()
            relay = hx.relays[0]
            peak = 0
            for _ in range(100):  # the target does not read for ~0.5 s
                await asyncio.sleep(0.005)
                peak = max(peak, relay.b.transport.get_write_buffer_size())
            stalled = not sender.done()
            state["go"].set()
            while not sender.done():
                await asyncio.sleep(0.002)
                if not relay.b.lost:
                    peak = max(peak, relay.b.transport.get_write_buffer_size())
            await sender
            assert await reader.read() == b""
            await _close(writer)
            result = await asyncio.wait_for(relay.done, 10)
            return peak, stalled, relay.a.pauses, result

    peak, stalled, pauses, result = run(main())
    assert stalled, "client finished sending 32 MB while the target did not read: no backpressure"
    assert pauses > 0
    # high-water mark plus at most one read (uvloop reads up to 256 KiB)
    assert peak <= buffer_size + 512 * 1024, peak
    assert state["server"] == (len(data), hashlib.sha256(data).hexdigest())
    assert result.a_to_b == len(data)


def test_reset_propagates_as_reset():
    async def handler(reader, writer):
        await reader.readexactly(4)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main():
        async with Harness(handler) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            writer.write(b"ping")
            try:
                data = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                data = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            result = await asyncio.wait_for(hx.relays[0].done, 10)
            return data, result

    data, result = run(main())
    assert data in (None, b"")
    assert result.error and "reset by upstream" in result.reason


def test_prebuffer_receive_and_unread():
    seen = {}

    async def before_relay(client, upstream):
        data = b""
        while b"|" not in data:
            data += await client.receive()
        head, _, rest = data.partition(b"|")
        seen["head"] = head
        client.unread(rest)

    async def handler(reader, writer):
        seen["server"] = await reader.read()
        await _close(writer)

    async def main():
        async with Harness(handler, before_relay=before_relay) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            writer.write(b"HEADER|pipelined")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"+more")
            writer.write_eof()
            assert await reader.read() == b""
            await _close(writer)
            return await asyncio.wait_for(hx.relays[0].done, 10)

    result = run(main())
    assert seen == {"head": b"HEADER", "server": b"pipelined+more"}
    assert result.a_to_b == len(b"pipelined+more")


def test_abort_sends_rst_to_both():
    async def handler(reader, writer):
        try:
            seen = await reader.read()
        except ConnectionResetError:
            seen = None
        await _close(writer)
        handler.seen = seen

    async def main():
        async with Harness(handler) as hx:
            reader, writer = await asyncio.open_connection("127.0.0.1", hx.port)
            writer.write(b"x")
            await hx.relay_made.wait()
            hx.relays[0].abort("test")
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return await hx.relays[0].done

    result = run(main())
    assert result.error and result.reason == "aborted: test"
