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


def test_an_idle_log_writes_at_once_a_busy_one_by_its_timer(tmp_path, monkeypatch):
    monkeypatch.setattr(access_log, "FLUSH_DELAY", 0.5)  # far longer than three writes take
    path = tmp_path / "access.log"

    async def main():
        log = AccessLog(str(path))
        log.flush_after(asyncio.get_running_loop().call_later)
        log.write({"n": 0})  # no write(2) for a while: written at once, as without a timer
        first = _lines(path)
        log.write({"n": 1})
        log.write({"n": 2})
        held = _lines(path)  # within FLUSH_DELAY of the last write(2): they wait for the timer
        await until(lambda: len(_lines(path)) == 3, timeout=10)
        log.close()
        return first, held

    first, held = run(main())
    assert first == [{"n": 0}] and held == [{"n": 0}]
    assert _lines(path) == [{"n": i} for i in range(3)]


def test_close_writes_the_buffered_lines(tmp_path):
    path = tmp_path / "access.log"
    timers = []  # a scheduler whose timers never fire: only close() can write what waits
    log = AccessLog(str(path))
    log.flush_after(lambda delay, fn: timers.append(fn))
    log.write({"n": 1})
    log.write({"n": 2})
    log.write({"n": 3})
    assert len(timers) == 1 and _lines(path) == [{"n": 1}]
    log.close()
    assert _lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]
    timers[0]()  # the timer firing after the close finds nothing to do
    assert _lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_request_lines_wait_for_the_timer(tmp_path):
    path = tmp_path / "access.log"
    timers = []
    log = AccessLog(str(path))
    log.flush_after(lambda delay, fn: timers.append((delay, fn)))
    log.write({"kind": "request"}, flush=False)
    assert _lines(path) == [] and len(timers) == 1 and timers[0][0] == 0.0  # no write(2) yet: due now
    timers[0][1]()
    assert _lines(path) == [{"kind": "request"}]
    log.close()


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
                c.servers[0].inputs.access.write({"busy": True})  # a write(2) just now: the next line waits
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
    assert before == [{"busy": True}]
    assert [(e["route"], e["result"], e["dst_pod"]) for e in after[1:]] == [("local", "ok", "default/web-1")]
