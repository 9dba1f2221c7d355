"""The access log's buffering: lines reach the disk by a timer, one write(2)
for all the lines of its interval, and a clean stop (the SIGTERM drain)
writes out whatever is still buffered."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from agent.proxy import log as access_log
from agent.proxy.log import AccessLog
from tests.support.aio import run, until
from tests.support.mesh import V4, Cluster, FlowOrigin, exchange


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_timer_writes_the_lines_of_its_interval(tmp_path):
    path = tmp_path / "access.log"

    async def main():
        log = AccessLog(str(path))
        log.flush_after(asyncio.get_running_loop().call_later)
        for i in range(3):
            log.write({"n": i})
        on_disk_at_once = _lines(path)
        await until(lambda: len(_lines(path)) == 3, timeout=10)
        log.write({"n": 3})  # a new interval, a new timer
        await until(lambda: len(_lines(path)) == 4, timeout=10)
        log.close()
        return on_disk_at_once

    assert run(main()) == []  # buffered, not one write(2) per line
    assert _lines(path) == [{"n": i} for i in range(4)]


def test_close_writes_the_buffered_lines(tmp_path):
    path = tmp_path / "access.log"
    timers = []  # a scheduler whose timers never fire: only close() can write
    log = AccessLog(str(path))
    log.flush_after(lambda delay, fn: timers.append(fn))
    log.write({"n": 1})
    log.write({"n": 2})
    assert len(timers) == 1 and _lines(path) == []
    log.close()
    assert _lines(path) == [{"n": 1}, {"n": 2}]
    timers[0]()  # the timer firing after the close finds nothing to do
    assert _lines(path) == [{"n": 1}, {"n": 2}]


def test_without_a_timer_connection_lines_are_flushed_as_written(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write({"n": 1})
    assert _lines(path) == [{"n": 1}]
    log.close()


def test_sigterm_drain_writes_the_buffered_connection_line(tmp_path, monkeypatch):
    """A worker's SIGTERM handler sets its stop event and ``serve`` stops the
    server: the connection line still in the buffer (a timer far away) is on
    disk after the stop."""
    monkeypatch.setattr(access_log, "FLUSH_DELAY", 3600.0)

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            async with Cluster(tmp_path) as c:
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
                assert await exchange(r, w, b"to-web") == b"to-web|bye from 127.0.0.5"
                await until(lambda: c.servers[0].accounting.finished == 1)
                before = c.access("node1")
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(stop.wait(), 10)
                await c.servers[0].stop(1.0)  # what serve() does once stop is set
                return before, c.access("node1")
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    before, after = run(main())
    assert before == []
    assert [(e["route"], e["result"], e["dst_pod"]) for e in after] == [("local", "ok", "default/web-1")]
