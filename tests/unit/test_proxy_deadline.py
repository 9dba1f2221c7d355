"""conn.Deadline: asyncio.timeout's behaviour with the loop given."""

from __future__ import annotations

import asyncio

import pytest

from agent.proxy.conn import Deadline
from tests.support.aio import run


def test_expiry_raises_timeout_error_and_the_task_goes_on():
    async def main():
        loop = asyncio.get_running_loop()
        never = loop.create_future()
        with pytest.raises(TimeoutError):
            async with Deadline(loop, 0.01):
                await never
        await asyncio.sleep(0)  # not cancelled any more
        return asyncio.current_task().cancelling()

    assert run(main()) == 0


def test_finishing_in_time_leaves_no_timer():
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, 7)
        async with Deadline(loop, 0.05) as d:
            got = await fut
        await asyncio.sleep(0.1)  # past the deadline: nothing fires
        return got, d._expired

    assert run(main()) == (7, False)


def test_a_cancel_from_elsewhere_passes_through():
    async def main():
        loop = asyncio.get_running_loop()

        async def waiter():
            async with Deadline(loop, 60):
                await loop.create_future()

        t = loop.create_task(waiter())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return t.cancelled()

    assert run(main()) is True


def test_inner_deadline_expires_inside_an_outer_timeout():
    async def main():
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):
            with pytest.raises(TimeoutError):
                async with Deadline(loop, 0.01):
                    await loop.create_future()
            return "outer still running"

    assert run(main()) == "outer still running"

