"""asyncio on uvloop for tests: every run and every wait has a bound."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop


def run(coro, timeout=60):
    """Run ``coro`` to completion on a fresh uvloop loop, failing after
    ``timeout`` seconds (a bound against hangs, never a timing claim)."""
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


async def until(pred, timeout=10.0, step=0.02):
    """Poll ``pred`` every ``step`` seconds until it is true (bounded)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(step)


async def close_writer(writer):
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
