"""The agent's admin server (agent/admin.py) for a stand-in agent, in its own
thread and event loop, so a test can talk to it synchronously (the CLI, the
admin client)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Iterator


@contextlib.contextmanager
def admin_server(agent) -> Iterator[None]:
    """Serve ``admin.start_admin(agent)`` (its socket is ``agent.cfg.admin.socket``)
    until the block ends; the server is closed and the thread joined even
    when the block fails."""
    from agent import admin as admin_api

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def serve():
        holder["server"] = await admin_api.start_admin(agent)
        holder["stop"] = asyncio.Event()
        ready.set()
        await holder["stop"].wait()
        holder["server"].close()
        await holder["server"].wait_closed()

    t = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        t.join(5)
        loop.close()
