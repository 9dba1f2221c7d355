"""A worker's resources (issue #12 items 4 and 7), with the whole proxy
in-process on loopback (tests/support/mesh.py): descriptors running out,
TLS handshakes piling up from one source, the open-files limit, memory
trimming, and a successor taking over the stats socket.

The kernel-level versions (a real 1024 soft limit, real EMFILE, workers
killed and handed over) are in tests/privileged/test_proxy_workers.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import subprocess
import sys

from agent.proxy import limits
from agent.proxy.server import ProxyServer
from agent.proxy.state import StateWatcher
from tests.support.aio import run
from tests.support.mesh import REPO, V4, Cluster, FlowOrigin, exchange, expect_reset


def test_no_descriptor_to_spare_sheds_at_accept_counted_as_overload(tmp_path, caplog):
    async def main():
        async with Cluster(tmp_path) as c:
            live = c.servers[0].live
            cap, live.fd_cap = live.fd_cap, 0  # every descriptor is "within the reserve"
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            await expect_reset(r, w)
            live.fd_cap = cap
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            assert await exchange(r, w, b"again") == b"again|bye from 127.0.0.5"
            await asyncio.sleep(0.05)
            return c.servers[0].stats(), c.access("node1")

    stats, log = run(main())
    assert stats["counters"]["result_overload"] == 1 and stats["counters"]["result_ok"] == 1
    assert stats["overloads"] == 1 and stats["counters"]["internal_errors"] == 0
    assert [e["result"] for e in log] == ["overload", "ok"]
    assert "at accept" in log[0]["reason"]
    assert "out of file descriptors" in caplog.text and "this is a bug" not in caplog.text


def test_emfile_while_serving_is_an_overload_not_a_bug(tmp_path, caplog):
    async def main():
        async with Cluster(tmp_path) as c:
            up = c.servers[0].upstream

            async def no_fds(addr, state, **kw):  # socket() for the upstream leg fails as at the limit
                raise OSError(errno.EMFILE, "Too many open files")

            up.open_socket, orig = no_fds, up.open_socket
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            await expect_reset(r, w)
            up.open_socket = orig
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            assert await exchange(r, w, b"still") == b"still|bye from 127.0.0.5"
            return c.servers[0].stats()["counters"]

    counters = run(main())
    assert counters["result_overload"] == 1 and counters["internal_errors"] == 0
    assert "overload: out of file descriptors" in caplog.text and "this is a bug" not in caplog.text


def test_pending_handshakes_per_source_are_capped(tmp_path):
    """Connections from a node address that never finish their handshake:
    past the cap, new ones from that address are reset at once (counted);
    once the pending ones go away, the tunnel works again."""
    async def main():
        async with Cluster(tmp_path) as c:
            node2 = c.servers[1]
            node2.inbound.max_handshakes = 3
            stalled = []
            for _ in range(3):
                stalled.append(
                    await asyncio.open_connection("127.0.0.2", c.tun_port, local_addr=("127.0.0.1", 0)))
            for _ in range(50):  # the three reached the handshake
                if node2.inbound.handshaking.get("127.0.0.1") == 3:
                    break
                await asyncio.sleep(0.02)
            assert node2.inbound.handshaking == {"127.0.0.1": 3}
            r, w = await asyncio.open_connection("127.0.0.2", c.tun_port, local_addr=("127.0.0.1", 0))
            await expect_reset(r, w)
            shed = node2.stats()["counters"]["handshakes_shed"]
            for _, sw in stalled:
                sw.transport.abort()
            for _ in range(100):
                if not node2.inbound.handshaking:
                    break
                await asyncio.sleep(0.02)
            left = dict(node2.inbound.handshaking)
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            got = await exchange(r, w, b"tunnel")
            return shed, left, got, node2.stats()["counters"]

    shed, left, got, counters = run(main())
    assert shed == 1 and left == {}
    assert got == b"tunnel|bye from 127.0.0.7"
    assert counters["result_overload"] == 1 and counters["result_ok"] == 1


def test_a_successor_keeps_its_stats_socket_when_the_old_worker_stops(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            state = str(tmp_path / "node1" / "state.json")
            old = ProxyServer(StateWatcher(state), flow_table=c.flows1, worker_id=7)
            await old.start()
            new = ProxyServer(StateWatcher(state), flow_table=c.flows1, worker_id=7)
            await new.start()  # binds proxy-7.sock over the old one's, as a hand-over does
            assert old.ready and new.ready
            await old.stop(0)
            try:
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "node1" / "proxy-7.sock"))
                doc = json.loads(await reader.readline())
                writer.close()
            finally:
                await new.stop(0)
            return doc, new, old

    doc, new, old = run(main())
    assert doc["worker"] == 7 and doc["ready"] is True  # the successor's socket survived the old one's stop
    assert not old.ready and not new.ready


def test_open_files_soft_limit_is_raised_to_the_hard_limit():
    code = "from agent.proxy.limits import raise_nofile; import json; print(json.dumps(raise_nofile()))"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, preexec_fn=low, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == [min(256, hard), hard]


def test_fd_exhausted_names_only_descriptor_errors():
    assert limits.fd_exhausted(OSError(errno.EMFILE, "x")) and limits.fd_exhausted(OSError(errno.ENFILE, "x"))
    assert not limits.fd_exhausted(OSError(errno.ECONNRESET, "x"))
    assert not limits.fd_exhausted(ValueError("x"))


def test_listener_migration_sysctl_is_set_once(tmp_path, caplog):
    path = tmp_path / "tcp_migrate_req"
    path.write_text("0\n")
    assert limits.enable_listener_migration(str(path)) and path.read_text() == "1\n"
    assert limits.enable_listener_migration(str(path))  # already on
    assert not limits.enable_listener_migration(str(tmp_path / "missing" / "x"))
    assert "cannot enable" in caplog.text and "sibling worker" in caplog.text
