"""agent/proxy/splice.py without root: the write-sequence reading the
half-close waits on, and the fallback to the userspace relay when no splice
maps are pinned (real loopback sockets, a real pin path that does not exist)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

from agent.datapath.splicemap import SpliceMaps, socket_cookie
from agent.proxy.splice import Splicer, written
from tests.support.aio import run
from tests.unit.test_relay import Harness


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    ls = socket.create_server(("127.0.0.1", 0))
    with ls:
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
    return a, b


def test_written_counts_every_byte_put_in_the_send_queue_acked_or_not():
    a, b = _tcp_pair()
    with a, b:
        base, base_b = written(a), written(b)
        a.sendall(b"x" * 100_000)  # fits in the queues: nobody reads yet
        assert written(a) - base == 100_000
        got = 0
        while got < 60_000:
            got += len(b.recv(65536))
        assert written(a) - base == 100_000  # acked or queued, the sum stays
        assert written(b) == base_b  # nothing sent that way


def test_socket_cookies_are_distinct_and_stable():
    a, b = _tcp_pair()
    with a, b:
        assert socket_cookie(a) == socket_cookie(a) != socket_cookie(b)


def test_without_pinned_maps_the_relay_stays_in_userspace(tmp_path):
    counters = {"spliced": 0, "splice_skipped": 0, "splice_failed": 0}
    payload = os.urandom(3 << 20)

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main():
        async with Harness(echo) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(b"hello")
            await writer.drain()
            assert await reader.readexactly(5) == b"hello"
            await h.relay_made.wait()
            splicer = Splicer(SpliceMaps(str(tmp_path / "no-such-pin-dir")), counters)
            relay = h.relays[0]
            splicer.splice(relay)
            for _ in range(100):  # a relay with bytes in flight waits for its buffers first
                if counters["splice_failed"] or counters["splice_skipped"]:
                    break
                await asyncio.sleep(0.01)
            assert relay.splice is None and not relay.hold

            async def send():
                for i in range(0, len(payload), 1 << 16):
                    writer.write(payload[i : i + (1 << 16)])
                    await writer.drain()
                writer.write_eof()

            t = asyncio.get_running_loop().create_task(send())
            got = hashlib.sha256()
            n = 0
            while data := await reader.read(1 << 20):
                got.update(data)
                n += len(data)
            await t
            writer.close()
            assert n == len(payload) and got.hexdigest() == hashlib.sha256(payload).hexdigest()
            splicer.close()

    run(main())
    assert counters == {"spliced": 0, "splice_skipped": 0, "splice_failed": 1}
