"""Upstream connections for the L7 session: the keep-alive pool and the
coarse deadline ticker.

- :class:`UpstreamPool` keeps idle upstream connections per target (LIFO,
  bounded per target, expiring), opens new ones (through the node proxy's
  ``open_socket`` when given) and holds the long-lived single-endpoint
  :class:`~agent.traffic.upstream_cluster.Cluster` of each bare pod address.
- ``_Upstream`` is one upstream connection's protocol: it parses responses
  and hands events to the session it currently serves, if any; an idle one
  that speaks or closes is dropped from the pool.
- ``_ConnectSlot`` keeps the circuit breaker's ``max-pending-requests`` and
  ``max-connections`` counts of one connect honest, even when its task is
  cancelled before it ran.
- :class:`Ticker`: deadlines cost no timer per request (see its docstring).

Socket glue only: every per-request decision is in
:mod:`agent.proxy.exchange`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from agent.proxy.http1 import ResponseParser
from agent.proxy.relay import set_nodelay
from agent.traffic.breaker import Breaker, Limit
from agent.traffic.settings import DEFAULTS
from agent.traffic.upstream_cluster import Cluster, Target

__all__ = ["UpstreamPool", "Ticker", "TICK"]

log = logging.getLogger("meshlet.proxy.l7")

TICK = 0.05
"""Resolution of the deadline ticker (seconds): timeouts fire up to this late."""


# --------------------------------------------------------------------------
# Coarse deadlines


class Ticker:
    """Wakes objects at (about) their deadlines with one loop timer.

    ``move(obj, old_key, when)`` files ``obj`` in the slot of ``when``
    (rounded up to :data:`TICK`) and returns the slot key, which the object
    keeps; ``remove(obj, key)`` takes it out. When a slot is due, each of its
    objects gets ``obj._on_tick(now)`` (after its key was cleared), checks
    its own deadlines and files itself again if it still has one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = TICK) -> None:
        self._loop = loop
        self._res = resolution
        self._per_s = 1.0 / resolution
        self._slots: dict[int, dict[Any, None]] = {}
        self._heap: list[int] = []
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: int | None = None

    def key(self, when: float) -> int:
        return int(when * self._per_s) + 1

    def move(self, obj: Any, old: int | None, key: int) -> int:
        if old is not None:
            s = self._slots.get(old)
            if s is not None:
                s.pop(obj, None)
        s = self._slots.get(key)
        if s is None:
            self._slots[key] = {obj: None}
            heapq.heappush(self._heap, key)
            if self._armed_for is None or key < self._armed_for:
                self._arm(key)
        else:
            s[obj] = None
        return key

    def remove(self, obj: Any, key: int | None) -> None:
        if key is not None:
            s = self._slots.get(key)
            if s is not None:
                s.pop(obj, None)

    def _arm(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = key
        self._handle = self._loop.call_at(key * self._res, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_for = None
        now = self._loop.time()
        cur = int(now * self._per_s)
        due: list = []
        heap = self._heap
        while heap and heap[0] <= cur:
            s = self._slots.pop(heapq.heappop(heap), None)
            if s:
                due += s
        for obj in due:
            obj._tick_key = None
            try:
                obj._on_tick(now)
            except Exception:
                log.exception("deadline handler failed")
        while heap and not self._slots.get(heap[0]):
            self._slots.pop(heapq.heappop(heap), None)
        if heap:
            self._arm(heap[0])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = None
        self._slots.clear()
        self._heap.clear()


# --------------------------------------------------------------------------
# Upstream connections and their pool


class _Upstream(asyncio.Protocol):
    """One upstream connection; events go to the session it serves, if any."""

    __slots__ = (
        "pool",
        "target",
        "parser",
        "transport",
        "session",
        "idle_until",
        "lost",
        "eof",
        "got_bytes",
        "breaker",
    )

    def __init__(self, pool: UpstreamPool, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.parser = ResponseParser()
        # set by connection_made, which runs before create_connection returns us
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.session: Any = None  # the L7Session served (l7 imports this module, not vice versa)
        self.idle_until = 0.0
        self.lost = False
        self.eof = False
        self.got_bytes = False  # since the current request was sent
        self.breaker: Breaker | None = None  # counts this connection (max-connections)

    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        b = self.pool.buffer_size
        transport.set_write_buffer_limits(high=b, low=b // 2)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s is None:  # idle in the pool: unsolicited bytes, unusable
            self.pool.drop(self)
            self.close()
            return
        self.got_bytes = True
        s._up_data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        s = self.session
        if s is None:
            self.pool.drop(self)
        else:
            s._up_eof(self)
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.release_slot()
        s = self.session
        if s is None:
            self.pool.drop(self)
        else:
            s._up_lost(self, exc)

    def release_slot(self) -> None:
        b = self.breaker
        if b is not None:
            self.breaker = None
            b.release(Limit.CONNECTIONS)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session._up_pause()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session._up_resume()

    def usable(self) -> bool:
        t = self.transport
        return (
            not self.lost
            and not self.eof
            and t is not None
            and not t.is_closing()
            and not self.parser.in_message
            and not self.parser.failed
        )

    def close(self) -> None:
        self.session = None
        if self.transport is not None:
            self.transport.close()


class _ConnectSlot:
    """The breaker counts (pending + connection) held by one connect; released
    when the connect task ends unless handed over (the connection then holds
    its count until it is lost). A done-callback, so that a task cancelled
    before it ever ran releases too."""

    __slots__ = ("breaker", "pending", "conn")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.pending = True
        self.conn = True

    def release_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.breaker.release(Limit.PENDING)

    def done(self, _task: object = None) -> None:
        self.release_pending()
        if self.conn:
            self.conn = False
            self.breaker.release(Limit.CONNECTIONS)


class UpstreamPool:
    """Keep-alive upstream connections per target (LIFO, bounded, expiring).

    A target is a tuple ``(ip, port, *extra)``: connections are pooled per
    whole tuple and ``open_socket`` receives it whole."""

    def __init__(
        self,
        *,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        buffer_size: int = 256 * 1024,
        open_socket: Callable[[Target], Awaitable[socket.socket]] | None = None,
    ) -> None:
        """``open_socket(target)``, when given, returns a connected non-blocking
        socket (the node proxy's: marked with SO_MARK); it raises OSError or
        TimeoutError on failure. Without it, the loop connects to
        ``target[0]:target[1]`` by itself. ``max_idle`` is per target;
        ``idle_timeout`` caps every cluster's ``timeouts.idle``."""
        self.max_idle = max_idle
        self.open_socket = open_socket
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.connects = 0
        self.reuses = 0
        self._idle: dict[Target, list[_Upstream]] = {}
        self._direct: dict[Target, Cluster] = {}
        # bare targets: default traffic settings, but this pool's connect timeout
        self._direct_settings = dataclasses.replace(
            DEFAULTS, timeouts=dataclasses.replace(DEFAULTS.timeouts, connect=connect_timeout)
        )
        self._ticker: Ticker | None = None
        self._tick_key: int | None = None

    @property
    def ticker(self) -> Ticker:
        """The deadline ticker of the running loop (sessions share it)."""
        t = self._ticker
        if t is None:
            t = self._ticker = Ticker(asyncio.get_running_loop())
        return t

    def direct(self, target: Target) -> Cluster:
        """A long-lived single-endpoint cluster for a bare target (default
        settings, except the connect timeout: this pool's)."""
        c = self._direct.get(target)
        if c is None:
            if len(self._direct) >= 4096:
                self._direct.clear()
            c = self._direct[target] = Cluster.single(target, self._direct_settings)
        return c

    def idle_count(self, target: Target | None = None) -> int:
        if target is not None:
            return len(self._idle.get(target, ()))
        return sum(len(v) for v in self._idle.values())

    def take_idle(self, target: Target) -> _Upstream | None:
        lst = self._idle.get(target)
        while lst:
            up = lst.pop()
            if up.usable():
                self.reuses += 1
                return up
            up.close()
        return None

    async def connect(self, target: Target, timeout: float | None = None) -> _Upstream:
        """A new connection to ``target`` (``timeout``: the connect timeout,
        default the pool's). Raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout if timeout is None else timeout
        if self.open_socket is None:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self, target), target[0], target[1]), limit
            )
        else:
            async with asyncio.timeout(limit):
                sock = await self.open_socket(target)
                try:
                    _, up = await loop.create_connection(lambda: _Upstream(self, target), sock=sock)
                except BaseException:
                    sock.close()
                    raise
        self.connects += 1
        return up

    def release(self, up: _Upstream, idle: float | None = None) -> None:
        """Back to the pool for at most ``idle`` seconds (capped by the pool's)."""
        up.session = None
        lst = self._idle.get(up.target)
        if lst is None:
            lst = self._idle[up.target] = []
        if not up.usable() or len(lst) >= self.max_idle:
            up.close()
            return
        up.got_bytes = False
        t = self.idle_timeout if idle is None or idle > self.idle_timeout else idle
        up.idle_until = until = self.ticker._loop.time() + t
        lst.append(up)
        k = self._tick_key
        if k is None or self.ticker.key(until) < k:
            self._tick_key = self.ticker.move(self, k, self.ticker.key(until))

    def _on_tick(self, now: float) -> None:
        """Close connections idle past their time; file again for the next one."""
        nxt = None
        for target in list(self._idle):
            lst = self._idle[target]
            keep = []
            for up in lst:
                if up.idle_until <= now or not up.usable():
                    up.close()
                else:
                    keep.append(up)
                    if nxt is None or up.idle_until < nxt:
                        nxt = up.idle_until
            if keep:
                self._idle[target] = keep
            else:
                del self._idle[target]
        if nxt is not None:
            self._tick_key = self.ticker.move(self, None, self.ticker.key(nxt))

    def drop(self, up: _Upstream) -> None:
        lst = self._idle.get(up.target)
        if lst and up in lst:
            lst.remove(up)

    def close(self) -> None:
        for lst in self._idle.values():
            for up in lst:
                up.close()
        self._idle.clear()
        if self._ticker is not None:
            self._ticker.remove(self, self._tick_key)
            self._tick_key = None
