"""agent/proxy/splice.py without root: the write-sequence reading the
half-close waits on, and the fallback to the userspace relay when no splice
maps are pinned (real loopback sockets, a real pin path that does not exist)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
import yaml

from agent.config import parse_config
from agent.datapath.splicemap import SpliceMaps, socket_cookie
from agent.proxy.splice import Splicer, written
from agent.yamlsrc import SourceError
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


CONFIG = """\
node: node1
inventory: inventory.yaml
cgroup: meshlet/node1
identity:
  bundle: ca/bundle.pem
  caCert: ca/nodes/node1/ca.pem
  caKey: ca/nodes/node1/ca-key.pem
proxy:
  redirectIPv4: 10.244.1.1
"""


def test_proxy_splice_knob_off_by_default_and_round_trips():
    assert parse_config(CONFIG, "c.yaml").proxy.splice is False
    c = parse_config(CONFIG + "  splice: true\n", "c.yaml")
    assert c.proxy.splice is True
    assert parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c


def test_proxy_splice_knob_must_be_a_boolean_named_by_file_and_line():
    with pytest.raises(SourceError) as ei:
        parse_config(CONFIG + "  splice: maybe\n", "c.yaml")
    assert "c.yaml:10" in str(ei.value) and "splice" in str(ei.value), str(ei.value)
