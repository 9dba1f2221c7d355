"""HTTP/2 (h2c, prior knowledge) on one downstream connection: the socket
glue around :mod:`agent.proxy.h2session` and one
:class:`~agent.proxy.exchange.HttpExchange` per stream.

The HTTP/1.1 session (``l7``) serves one request at a time; here every
stream is a request of its own, served side by side:

- ``h2session``: frames, flow control, request checks, attack bounds
  (sans-IO); ``agent.policy.http``: normalization; ``tracing``: trace
  headers;
- ``on_request``/``choose`` (the caller's hooks, the same as ``l7``'s): a
  :class:`~agent.proxy.l7.Response` short-circuits the stream (a gRPC
  request gets it the gRPC way: HTTP 200, ``grpc-status`` and
  ``grpc-message``, as Envoy answers gRPC clients), else a cluster;
- ``exchange``: everything per request that does not depend on the wire
  (breaker, endpoint choice per request, retries, budget, outlier
  feedback, deadlines, the proxy's own 502/503/504, response flags). The
  "wire bytes" the exchange keeps are opaque here: the head it is given is
  empty (the shell keeps the header list), the replay pieces are DATA;
- :class:`H2Pool`: upstream HTTP/2 connections per target, each carrying
  many streams (of any downstream connection of this worker), opened with
  the same ``open_socket`` as the HTTP/1.1 pool (marked sockets, or the
  legs of a service's source pod) and counted in the cluster's breaker as
  connections;
- this module: it carries the exchange's commands out on streams.

The client's protocol is kept: a stream goes upstream as an HTTP/2 stream
(no translation), and across the tunnel the leg says ``h2``.

gRPC: ``grpc-timeout`` bounds the request (the exchange's request
deadline, the earlier of the two; the shell sets ``req_until``, one of the
fields the exchange lets the shell write); ``grpc-status`` of the response
(its trailers, or a trailers-only head) is kept for the metrics and the
access log (``H2Head``-side: ``Exchange.grpc_status``).

Backpressure: a stream's bytes wait in ``h2session``'s buffers until the
reader's window opens, and the window of the sender is given back only
then, so each stream holds at most its window in the proxy; the
connection windows are given back at once (one slow stream never starves
the others). A full client socket (``pause_writing``) stops reading it.

Errors: a malformed request is a stream error (RST_STREAM) or its status
(400/414); a connection error (GOAWAY) closes the connection after the
frame went out; a crash on one connection resets that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from agent.proxy import h2session as hs
from agent.proxy import tracing
from agent.proxy.exchange import (
    CLIENT_LOST,
    DEADLINE,
    FORWARD,
    Connect,
    Connected,
    ConnectFailed,
    Fail,
    HttpExchange,
    Refused,
    ResetClient,
    ResetUpstream,
    Respond,
    State,
    UpstreamLost,
    Wake,
)
from agent.proxy.l7 import L7Settings, Response
from agent.proxy.pool import UpstreamPool, _ConnectSlot
from agent.proxy.relay import reset_transport, set_nodelay
from agent.traffic.breaker import Limit
from agent.traffic.upstream_cluster import Cluster, Target, target_str

__all__ = ["H2Pool", "H2Session", "GRPC_STATUS_BY_HTTP"]

log = logging.getLogger("meshlet.proxy.h2")

_monotonic = time.monotonic

#: The gRPC status a proxy-made HTTP answer becomes for a gRPC client
#: (Envoy's mapping; 504 is a deadline here).
GRPC_STATUS_BY_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 408: 4, 413: 8, 429: 14, 502: 14, 503: 14, 504: 4}


def grpc_status_of(headers) -> int | None:
    for n, v in headers:
        if n == b"grpc-status":
            return int(v) if v.isdigit() and len(v) <= 2 else None
    return None


class _Stream:
    """One request on the downstream connection."""

    __slots__ = (
        "sid",
        "head",
        "ex",
        "up",
        "usid",
        "task",
        "pending",
        "up_head",
        "wake",
        "answered_end",
        "trailers",
        "got_bytes",
        "grpc_status",
        "ended",
        "local",
    )

    def __init__(self, sid: int, head: hs.H2Head, ex: HttpExchange) -> None:
        self.sid = sid
        self.head = head
        self.ex = ex
        self.up: _H2Upstream | None = None
        self.usid = 0
        self.task: asyncio.Task | None = None
        self.pending: list | None = None  # [(piece, credit)] for an upstream being connected
        self.up_head: list = []
        self.wake: float | None = None
        self.answered_end = False  # the response's END_STREAM went (with its head or its last DATA)
        self.trailers = False
        self.got_bytes = False
        self.grpc_status: int | None = None
        self.ended = False  # reported and forgotten
        self.local = False  # answered by the proxy itself


# --------------------------------------------------------------------------
# Upstream connections


class _H2Upstream(asyncio.Protocol):
    """One upstream HTTP/2 connection; its streams belong to downstream sessions."""

    def __init__(self, pool: H2Pool, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.side = hs.ClientSide(pool.limits)
        self.streams: dict[int, _Stream] = {}
        self.owners: dict[int, H2Session] = {}
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.breaker: Any = None
        self.idle_since = _monotonic()

    def usable(self) -> bool:
        return not self.lost and self.side.capacity > 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        self.flush()

    def flush(self) -> None:
        data = self.side.data_to_send()
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)
        for owner, sid, n in self.side.drained():
            owner.give(sid, n)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.side.feed(data, _monotonic())
            touched = set()
            for ev in events:
                t = type(ev)
                if t is hs.Broken:
                    log.info("upstream %s: %s", target_str(self.target), ev.reason)
                    self.flush()
                    self._fail(ev.reason, graceful=True)
                    return
                if t is hs.GoAway:
                    for usid in [u for u in self.streams if u > ev.last_stream_id]:
                        st, owner = self._orphan(usid)
                        owner.up_lost(st, "upstream went away (GOAWAY) before this stream", False)
                        touched.add(owner)
                    continue
                sid = ev.stream_id
                got = self.streams.get(sid)
                if got is None:
                    if t is hs.Body:
                        self.side.credit(sid, ev.credit)
                    continue
                owner = self.owners[sid]
                owner.up_event(got, ev)
                touched.add(owner)
            self.flush()
            for o in touched:
                o.flush()
            if self.side.goaway_received and not self.streams:
                self.close()
        except Exception:  # one connection's bug never kills the proxy
            log.exception("upstream HTTP/2 connection failed; resetting it")
            self._fail("proxy error")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self._fail(None if exc is None else str(exc))

    def _orphan(self, usid: int) -> tuple[_Stream, H2Session]:
        """Take stream ``usid`` off this connection; the client windows its
        buffered bytes held are given back."""
        st = self.streams.pop(usid)
        owner = self.owners.pop(usid)
        for o, sid, n in self.side.forget(usid):
            o.give(sid, n)
        return st, owner

    def _fail(self, why: str | None, *, graceful: bool = False) -> None:
        if self.lost:
            return
        self.lost = True
        self.pool.forget(self)
        b = self.breaker
        if b is not None:
            self.breaker = None
            b.release(Limit.CONNECTIONS)
        touched = set()
        for usid in list(self.streams):
            st, owner = self._orphan(usid)
            owner.up_lost(st, why, st.got_bytes)
            touched.add(owner)
        for o in touched:
            o.flush()
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                reset_transport(self.transport)

    def give(self, sid: int, n: int) -> None:
        """Stream window back: its bytes reached the client."""
        self.side.credit(sid, n)
        self.pool.dirty(self)

    def detach(self, st: _Stream, *, reset: bool) -> None:
        usid = st.usid
        if self.streams.get(usid) is st:
            del self.streams[usid]
            del self.owners[usid]
            for owner, sid, n in self.side.forget(usid):
                owner.give(sid, n)
            if reset:
                self.side.reset(usid, ErrorCodes.CANCEL)
            self.pool.dirty(self)
        if not self.streams:
            self.idle_since = _monotonic()
            if self.side.goaway_received:
                self.close()

    def close(self) -> None:
        if not self.lost and self.transport is not None:
            self.side.goaway()
            data = self.side.data_to_send()
            if data:
                self.transport.write(data)
            self.transport.close()
        self.lost = True
        self.pool.forget(self)
        b = self.breaker
        if b is not None:
            self.breaker = None
            b.release(Limit.CONNECTIONS)


class H2Pool:
    """Upstream HTTP/2 connections per target, shared by this worker's
    sessions; ``base`` gives the socket opener, the connect timeout, the
    deadline ticker and the clusters of bare targets."""

    def __init__(self, base: UpstreamPool, limits: hs.H2Limits | None = None) -> None:
        self.base = base
        self.limits = limits or hs.H2Limits()
        self.conns: dict[Target, list[_H2Upstream]] = {}
        self.connecting: dict[Target, asyncio.Future] = {}
        self.joiners: dict[Target, int] = {}  # streams waiting for that connect
        self.connects = 0
        self.reuses = 0
        self._dirty: set[_H2Upstream] = set()
        self._tick_key: int | None = None

    @property
    def ticker(self):
        return self.base.ticker

    def direct(self, target: Target) -> Cluster:
        return self.base.direct(target)

    def take(self, target: Target) -> _H2Upstream | None:
        for up in self.conns.get(target, ()):
            if up.usable():
                self.reuses += 1
                return up
        return None

    async def connect(self, target: Target, timeout: float | None) -> _H2Upstream:
        loop = asyncio.get_running_loop()
        base = self.base
        limit = base.connect_timeout if timeout is None else timeout
        if base.open_socket is None:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: _H2Upstream(self, target), target[0], target[1]), limit
            )
        else:
            async with asyncio.timeout(limit):
                sock = await base.open_socket(target)
                try:
                    _, up = await loop.create_connection(lambda: _H2Upstream(self, target), sock=sock)
                except BaseException:
                    sock.close()
                    raise
        self.connects += 1
        self.conns.setdefault(target, []).append(up)
        self._arm()
        return up

    def forget(self, up: _H2Upstream) -> None:
        lst = self.conns.get(up.target)
        if lst and up in lst:
            lst.remove(up)
            if not lst:
                del self.conns[up.target]

    def dirty(self, up: _H2Upstream) -> None:
        """``up`` has frames to send: written once, at the end of this loop iteration."""
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush_dirty)
        self._dirty.add(up)

    def _flush_dirty(self) -> None:
        d = self._dirty
        self._dirty = set()
        for up in d:
            up.flush()

    def _arm(self) -> None:
        t = self.ticker
        k = t.key(t._loop.time() + self.base.idle_timeout / 2)
        if self._tick_key is None:
            self._tick_key = t.move(self, None, k)

    def _on_tick(self, now: float) -> None:
        """Close connections without streams for the pool's idle timeout."""
        m = _monotonic()
        for lst in list(self.conns.values()):
            for up in list(lst):
                if not up.streams and m - up.idle_since >= self.base.idle_timeout:
                    up.close()
        if self.conns:
            self._arm()

    def close(self) -> None:
        for lst in list(self.conns.values()):
            for up in list(lst):
                up.close()
        self.conns.clear()
        if self._tick_key is not None:
            self.ticker.remove(self, self._tick_key)
            self._tick_key = None


# --------------------------------------------------------------------------
# The downstream session

Chooser = Callable[[Any], "Cluster | Response | Target"]
OnRequest = Callable[[Any], "Response | None"]
OnResponse = Callable[[Any, int, float, Any], None]


class H2Session(asyncio.Protocol):
    """Serves one downstream HTTP/2 connection (module docstring)."""

    def __init__(
        self,
        choose: Chooser,
        pool: H2Pool,
        settings: L7Settings | None = None,
        *,
        on_request: OnRequest | None = None,
        on_response: OnResponse | None = None,
        limits: hs.H2Limits | None = None,
    ) -> None:
        self.choose = choose
        self.pool = pool
        self.settings = settings or L7Settings()
        self.on_request = on_request
        self.on_response = on_response
        self.side = hs.ServerSide(limits or pool.limits)
        self.streams: dict[int, _Stream] = {}
        self.requests = 0
        self.bytes_out = 0  # written to the client
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._loop = asyncio.get_running_loop()
        self._ticker = pool.ticker
        self._per_s = self._ticker._per_s
        self._tick_key: int | None = None
        self._closed = False
        self._goaway = False
        self._idle_until: float | None = None
        self._write_paused = False
        self._read_paused = False
        self._dirty = False
        self._buffered = 0  # bytes waiting for the client's window at the last flush
        self._stalled_since: float | None = None  # since when none of them went out

    # ---- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        b = self.settings.buffer_size
        transport.set_write_buffer_limits(high=b, low=b // 2)
        self.flush()
        self._idle()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            for ev in self.side.feed(data, _monotonic()):
                if self._closed:
                    return
                self._event(ev)
            self.flush()
        except Exception:  # noqa: BLE001 - one connection's bug never kills the proxy
            self._crash()

    def eof_received(self) -> bool:
        self._goaway = True
        if not self.streams:
            self._close()
        return True

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._disarm()
        for st in list(self.streams.values()):
            self._drop_up(st, reset=True)
            st.ex.handle(CLIENT_LOST, _monotonic())
            st.ex.release()
        self.streams.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        if not self._read_paused and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and not self._closed:
            self._read_paused = False
            self.transport.resume_reading()

    # ---- output

    def flush(self) -> None:
        self._dirty = False
        if self._closed:
            return
        data = self.side.data_to_send()
        if data:
            self.bytes_out += len(data)
            self.transport.write(data)
        for owner, sid, n in self.side.drained():
            owner.give(sid, n)
        if self.side.closed:
            self._close()
            return
        b = self.side.buffered
        if b != self._buffered:
            self._check_stall(b)

    def _check_stall(self, b: int) -> None:
        """Bytes waiting for the client's window: bounded in size and in time."""
        lim = self.side.limits
        if b > lim.max_buffered:
            log.warning(
                "HTTP/2 client holds %d bytes behind its window (max %d): closing", b, lim.max_buffered
            )
            self._calm()
            return
        if b == 0:
            self._stalled_since = None
        elif b < self._buffered or self._stalled_since is None:
            self._stalled_since = now = _monotonic()  # progress (or a first wait)
            self._arm(now + lim.stall_timeout)
        self._buffered = b

    def _calm(self) -> None:
        self.side.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self._close()

    def give(self, sid: int, n: int) -> None:
        """Stream window back to the client: its bytes went upstream."""
        self.side.credit(sid, n)
        if not self._dirty:
            self._dirty = True
            self._loop.call_soon(self.flush)

    def _close(self) -> None:
        if self._closed:
            return
        data = self.side.data_to_send()
        if data:
            self.transport.write(data)
        self._closed = True
        self._disarm()
        for st in list(self.streams.values()):
            self._drop_up(st, reset=True)
            st.ex.handle(CLIENT_LOST, _monotonic())
            st.ex.release()
        self.streams.clear()
        self.transport.close()

    def _crash(self) -> None:
        log.exception("HTTP/2 session failed; resetting the connection")
        for st in list(self.streams.values()):
            self._drop_up(st, reset=True)
            st.ex.handle(CLIENT_LOST, _monotonic())
            st.ex.release()
        self.streams.clear()
        self._closed = True
        self._disarm()
        reset_transport(self.transport)

    # ---- downstream events

    def _event(self, ev: Any) -> None:
        t = type(ev)
        if t is hs.Body:
            self._body(ev)
        elif t is hs.Request:
            self._start(ev.stream_id, ev.head, ev.end)
        elif t is hs.End:
            self._req_end(ev.stream_id)
        elif t is hs.PeerReset:
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                self._drop_up(st, reset=True)
                st.ex.handle(CLIENT_LOST, _monotonic())
                st.ex.release()
                st.ended = True
        elif t is hs.Refused:
            log.info("refused a malformed HTTP/2 request: %s", ev.reason)
            if ev.status is not None:
                self.side.respond(ev.stream_id, ev.status, [(b"content-type", b"text/plain")], False)
                self.side.send_data(ev.stream_id, (ev.reason + "\n").encode("utf-8", "replace"), True)
        elif t is hs.Trailers:
            st = self.streams.get(ev.stream_id)
            if st is not None and st.up is not None and not st.ex.discarding:
                st.trailers = True
                st.up.side.send_trailers(st.usid, ev.headers)
                self.pool.dirty(st.up)
        elif t is hs.GoAway:
            self._goaway = True
            if not self.streams:
                self._close()
        elif t is hs.Broken:
            log.info("HTTP/2 client connection closed: %s", ev.reason)
            self._close()

    def _start(self, sid: int, head: hs.H2Head, end: bool) -> None:
        self._idle_until = None
        self.requests += 1
        now = _monotonic()
        n: int | None = None
        if end:
            n = 0
        else:
            for k, v in head.headers:
                if k == b"content-length" and v.isdigit():
                    n = int(v)
        ex = HttpExchange(head.method, n, now)
        st = self.streams[sid] = _Stream(sid, head, ex)
        if self.on_request is not None:
            r = self.on_request(head)
            if isinstance(r, hs.H2Head):  # forward this head instead (JWT: token removed, claim headers set)
                head = st.head = r
            elif r is not None:
                ex.answer(r.status)
                self._answer(st, r.status, r.body, r.headers)
                return
        try:
            c = self.choose(head)
        except Exception as e:  # noqa: BLE001 - the caller's decision failed
            log.warning("no upstream for %s %r: %s", head.method, head.target, e)
            self._run(st, ex.fail(502, "no upstream for this request", now))
            return
        if type(c) is not Cluster:
            if isinstance(c, Response):
                ex.answer(c.status)
                self._answer(st, c.status, c.body, c.headers)
                return
            c = self.pool.direct(c) if isinstance(c, tuple) else c
        cmds = ex.start(c, lambda target: self._up_head(st, target), now)
        self._grpc_deadline(st)
        self._run(st, cmds)

    def _up_head(self, st: _Stream, target: Target) -> bytes:
        """The upstream stream's header list (kept on the stream; the exchange gets no bytes)."""
        head = st.head
        ctx = tracing.hop(head.headers)
        st.ex.trace = ctx
        host = head.host if head.host is not None else target_str(target).encode()
        st.up_head = [
            (b":method", head.method),
            (b":scheme", head.scheme),
            (b":authority", host),
            (b":path", head.path.target.encode("ascii") if head.path.path != "*" else b"*"),
            *hs.forward_headers(head.headers, tracing.TRACE_HEADERS),
            # unique per request: never in the HPACK tables (indexing them only
            # churned out the fields that repeat, and made every lookup longer)
            *[NeverIndexedHeaderTuple(n, v) for n, v in ctx.headers()],
        ]
        return b""

    def _grpc_deadline(self, st: _Stream) -> None:
        """``grpc-timeout``: the request deadline, unless the cluster's is earlier."""
        t = st.head.timeout
        ex = st.ex
        if t is None or ex.state is not State.CONNECTING and ex.state is not State.WAITING:
            return
        d = ex.t0 + t
        if ex.req_until is None or d < ex.req_until:
            ex.req_until = d
            self._wake(st, d)

    def _body(self, ev: hs.Body) -> None:
        st = self.streams.get(ev.stream_id)
        if st is None:
            self.side.credit(ev.stream_id, ev.credit)
            return
        ex = st.ex
        data = ev.data
        if not data:  # padding only
            self.side.credit(ev.stream_id, ev.credit)
            return
        ex.request_body(len(data), (data,))
        if ex.discarding or ex.state is State.FAILED:
            self.side.credit(ev.stream_id, ev.credit)
            return
        credit = (self, st.sid, ev.credit)
        if st.up is not None:
            st.up.side.send_data(st.usid, data, False, credit)
            ex.last_io = _monotonic()
            self.pool.dirty(st.up)
        elif st.pending is not None:
            st.pending.append((data, credit))
        else:
            self.side.credit(ev.stream_id, ev.credit)

    def _req_end(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        ex = st.ex
        cmds = ex.request_end(_monotonic())
        self._grpc_deadline(st)
        if ex.response_done:
            self._finish(st)
            return
        if st.up is not None and not st.trailers:
            st.up.side.end_stream(st.usid)
            self.pool.dirty(st.up)
        if cmds:
            self._run(st, cmds)

    # ---- commands from a stream's exchange

    def _run(self, st: _Stream, cmds) -> None:
        for c in cmds:
            if self._closed or st.ended:
                return
            t = type(c)
            if t is Wake:
                self._wake(st, c.at)
            elif t is Connect:
                self._connect_cmd(st, c)
            elif t is ResetUpstream:
                self._drop_up(st, reset=True)
            elif t is Respond or t is Fail:
                self._drop_up(st, reset=True)
                self._answer(st, c.status, c.body, c.headers)
            elif t is ResetClient:
                self._drop_up(st, reset=True)
                self.side.reset(st.sid, ErrorCodes.INTERNAL_ERROR)
                self._finish(st)
            else:  # Forward only answers a response head (up_event); no upgrade in HTTP/2
                raise AssertionError(f"unexpected command {c!r}")

    def _answer(self, st: _Stream, status: int, body: bytes, headers=()) -> None:
        """The proxy's own answer on this stream (gRPC clients: the gRPC way)."""
        sid = st.sid
        if st.head.grpc:
            code = GRPC_STATUS_BY_HTTP.get(status, 2)
            msg = body.decode("utf-8", "replace").strip()
            if status == 403 and not msg.startswith("RBAC"):
                msg = "RBAC: access denied"
            st.grpc_status = code
            self.side.respond(
                sid,
                200,
                [
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"%d" % code),
                    (b"grpc-message", _grpc_message(msg)),
                ],
                True,
            )
        else:
            hs_ = [(n.lower(), v) for n, v in headers]
            if body:
                hs_.append((b"content-length", b"%d" % len(body)))
            head_only = st.head.method == b"HEAD"
            self.side.respond(sid, status, hs_, not body or head_only)
            if body and not head_only:
                self.side.send_data(sid, body, True)
        st.local = True
        if not st.ex.req_done:
            self._reset_after(st)  # RFC 9113 8.1: complete; the client may stop sending
        self._finish(st)

    def _reset_after(self, st: _Stream) -> None:
        sid = st.sid
        if not self.side.pending(sid):
            self.side.reset(sid, ErrorCodes.NO_ERROR)

    def _connect_cmd(self, st: _Stream, c: Connect) -> None:
        st.pending = [(p, None) for p in c.data[1:] if p]
        self._open(st, c.target, c.timeout, c.fresh)

    def _open(self, st: _Stream, target: Target, timeout: float | None, fresh: bool) -> None:
        """A stream for ``st`` on a connection with room (unless ``fresh``),
        else on the connection being opened, else on a new one."""
        if not fresh:
            up = self.pool.take(target)
            if up is not None:
                self._attach(st, up, reused=True)
                return
            fut = self.pool.connecting.get(target)
            if fut is not None and self.pool.joiners.get(target, 0) < self.pool.limits.max_concurrent_streams:
                self.pool.joiners[target] = self.pool.joiners.get(target, 0) + 1
                st.task = self._loop.create_task(self._join(st, target, fut, timeout))
                return
        ex = st.ex
        assert ex.cluster is not None
        b = ex.cluster.breaker
        over = b.acquire(Limit.PENDING)
        if over is None:
            over = b.acquire(Limit.CONNECTIONS)
            if over is not None:
                b.release(Limit.PENDING)
        if over is not None:
            self._run(st, ex.handle(Refused(over), _monotonic()))
            return
        slot = _ConnectSlot(b)
        fut = self._loop.create_future()
        if not fresh:
            self.pool.connecting[target] = fut
            self.pool.joiners[target] = 0
        task = st.task = self._loop.create_task(self._connect(st, target, timeout, slot, fut))
        task.add_done_callback(slot.done)

    async def _connect(self, st: _Stream, target: Target, timeout, slot: _ConnectSlot, fut) -> None:
        ex = st.ex
        try:
            up = await self.pool.connect(target, timeout)
        except BaseException as e:
            if self.pool.connecting.get(target) is fut:
                del self.pool.connecting[target]
            if not fut.done():
                fut.set_result(None)
            if not isinstance(e, (TimeoutError, OSError)):
                raise  # cancelled: whoever cancelled has dropped the stream
            st.task = None
            slot.release_pending()
            if isinstance(e, TimeoutError):
                why = f"upstream {target_str(target)} did not accept the connection in time"
            else:
                why = f"upstream {target_str(target)} unreachable: {e.strerror or e}"
            self._run(st, ex.handle(ConnectFailed(why), _monotonic()))
            self.flush()
            return
        if self.pool.connecting.get(target) is fut:
            del self.pool.connecting[target]
        slot.release_pending()
        slot.conn = False  # the connection holds its count from now on
        up.breaker = slot.breaker
        if up.lost:
            up.breaker = None
            slot.breaker.release(Limit.CONNECTIONS)
        fut.set_result(up)
        st.task = None
        ex.handle(Connected(target), _monotonic())
        if self._closed or st.ended or ex.target != target or up.lost:
            if up.lost:
                self._run(st, ex.handle(UpstreamLost("closed at once", False), _monotonic()))
                self.flush()
            return
        self._attach(st, up, reused=False)
        self.flush()

    async def _join(self, st: _Stream, target: Target, fut: asyncio.Future, timeout: float | None) -> None:
        """Wait for another stream's connect to ``target`` and share it."""
        up = await asyncio.shield(fut)
        st.task = None
        if self._closed or st.ended or st.ex.target != target:
            return
        if up is None:
            reason = f"upstream {target_str(target)} unreachable"
            self._run(st, st.ex.handle(ConnectFailed(reason), _monotonic()))
        elif up.usable():
            self._attach(st, up, reused=True)
        else:  # full already: another one
            self._open(st, target, timeout, False)
        self.flush()

    def _attach(self, st: _Stream, up: _H2Upstream, *, reused: bool) -> None:
        ex = st.ex
        if not up.usable() and not up.lost:  # full (its peer's limit): another connection
            self._open(st, up.target, ex.cluster.settings.timeouts.connect if ex.cluster else None, False)
            return
        pending = st.pending or []
        st.pending = None
        end_now = ex.req_done and not pending
        try:
            usid = up.side.open_stream(st.up_head, end_now)
        except Exception as e:  # noqa: BLE001 - h2 refused the stream (no room): as a lost connection
            self._run(st, ex.handle(UpstreamLost(f"cannot open a stream: {e}", False), _monotonic()))
            return
        st.up = up
        st.usid = usid
        st.got_bytes = False
        up.streams[usid] = st
        up.owners[usid] = self
        side = up.side
        for piece, credit in pending:
            side.send_data(usid, piece, False, credit)
        if ex.req_done and pending and not st.trailers:
            side.end_stream(usid)
        self.pool.dirty(up)
        cmds = ex.attached(reused, _monotonic())
        if cmds:
            self._run(st, cmds)

    def _drop_up(self, st: _Stream, *, reset: bool) -> None:
        if st.task is not None:
            st.task.cancel()
            st.task = None
        if st.pending:
            for _piece, credit in st.pending:
                if credit is not None:
                    credit[0].give(credit[1], credit[2])
        st.pending = None
        up = st.up
        st.up = None
        if up is not None:
            up.detach(st, reset=reset)

    # ---- upstream events (from _H2Upstream)

    def up_event(self, st: _Stream, ev: Any) -> None:
        if st.ended:
            return
        ex = st.ex
        t = type(ev)
        st.got_bytes = True
        ex.last_io = _monotonic()
        if t is hs.Body:
            if ex.state is State.RESPONDING:
                ex.resp_bytes += len(ev.data)
                end = ev.end and not st.trailers  # the End that follows sends nothing then
                self.side.send_data(st.sid, ev.data, end, (st.up, st.usid, ev.credit))
                if end:
                    st.answered_end = True
            elif st.up is not None:
                st.up.side.credit(st.usid, ev.credit)
        elif t is hs.ResponseHead:
            self._resp_head(st, ev)
        elif t is hs.Trailers:
            g = grpc_status_of(ev.headers)
            if g is not None:
                st.grpc_status = g
            if ex.state is State.RESPONDING:
                st.trailers = True
                self.side.send_trailers(st.sid, hs.forward_headers(ev.headers))
        elif t is hs.End:
            if ex.state is not State.RESPONDING:
                return
            ex.response_end()
            if not st.trailers and not st.answered_end:
                self.side.end_stream(st.sid)
            up = st.up
            st.up = None
            if up is not None:
                up.detach(st, reset=False)
            if ex.req_done:
                self._finish(st)
            else:
                self._reset_after(st)
                self._finish(st)
        elif t is hs.PeerReset:
            reason = f"upstream reset the stream ({_code_name(ev.code)})"
            self._drop_up(st, reset=False)
            self._run(st, ex.handle(UpstreamLost(reason, ev.code != ErrorCodes.REFUSED_STREAM), _monotonic()))

    def up_lost(self, st: _Stream, why: str | None, got_bytes: bool) -> None:
        if st.ended or st.up is None:
            return
        st.up = None
        self._run(st, st.ex.handle(UpstreamLost(why, got_bytes), _monotonic()))

    def _resp_head(self, st: _Stream, r: hs.ResponseHead) -> None:
        ex = st.ex
        if ex.state is not State.WAITING:
            return
        g = grpc_status_of(r.headers) if r.end and st.head.grpc and r.status == 200 else None
        cmds = ex.response(r.status, _monotonic()) if g is None else ex.grpc_response(g, _monotonic())
        if cmds[0] is not FORWARD:
            self._run(st, cmds)  # a retry (this response is discarded) or a failure
            return
        if r.end:
            g = grpc_status_of(r.headers)
            if g is not None:
                st.grpc_status = g
            st.answered_end = True
        self.side.respond(st.sid, r.status, r.headers, r.end)

    # ---- the end of a stream

    def _finish(self, st: _Stream) -> None:
        if st.ended:
            return
        st.ended = True
        self.streams.pop(st.sid, None)
        self._drop_up(st, reset=not st.ex.response_done)
        ex = st.ex
        ex.release()
        if self.on_response is not None:
            rec = ex.record()
            rec.grpc_status = st.grpc_status
            # a gRPC client got the proxy's answer as HTTP 200 (and its grpc-status)
            status = 200 if st.local and st.head.grpc else ex.status or 0
            try:
                self.on_response(st.head, status, _monotonic() - ex.t0, rec)
            except Exception:
                log.exception("on_response hook failed")
        if not self.streams:
            if self._goaway:
                self._close()
            else:
                self._idle()

    # ---- deadlines

    def _wake(self, st: _Stream, at: float) -> None:
        if st.wake is None or at < st.wake:
            st.wake = at
        self._arm(at)

    def _arm(self, when: float) -> None:
        # exchange deadlines are on time.monotonic; the ticker runs on the loop's clock
        when = when - _monotonic() + self._loop.time()
        k = int(when * self._per_s) + 1
        old = self._tick_key
        if old is None or k < old:
            self._tick_key = self._ticker.move(self, old, k)

    def _disarm(self) -> None:
        if self._tick_key is not None:
            self._ticker.remove(self, self._tick_key)
            self._tick_key = None

    def _idle(self) -> None:
        self._idle_until = w = _monotonic() + self.settings.idle_timeout
        self._arm(w)

    def _on_tick(self, _now: float) -> None:
        if self._closed:
            return
        now = _monotonic()
        nxt = None
        for st in list(self.streams.values()):
            w = st.wake
            if w is None:
                continue
            if now >= w:
                st.wake = None
                self._run(st, st.ex.handle(DEADLINE, now))
                w = st.wake
            if w is not None and (nxt is None or w < nxt):
                nxt = w
        ss = self._stalled_since
        if ss is not None:
            if now >= ss + self.side.limits.stall_timeout:
                log.warning("HTTP/2 client gave no window for %gs: closing", self.side.limits.stall_timeout)
                self._calm()
                return
            nxt = (
                ss + self.side.limits.stall_timeout
                if nxt is None
                else min(nxt, ss + self.side.limits.stall_timeout)
            )
        iu = self._idle_until
        if iu is not None and not self.streams:
            if now >= iu:
                self.side.goaway()
                self._close()
                return
            nxt = iu if nxt is None or iu < nxt else nxt
        self.flush()
        if nxt is not None:
            self._arm(nxt)


def _grpc_message(msg: str) -> bytes:
    """Percent-encoded as gRPC over HTTP/2 says (printable ASCII except %)."""
    out = bytearray()
    for b in msg.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
