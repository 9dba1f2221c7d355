"""HTTP/1.1 on one downstream connection: the parser and socket glue around
one :class:`~agent.proxy.exchange.HttpExchange` per request.

Who decides what:

- ``http1``: parsing, framing checks, serialization (sans-IO);
  ``agent.policy.http``: normalization; ``tracing``: trace headers;
- ``on_request``/``choose`` (the caller's hooks): a :class:`Response`
  short-circuits (e.g. a 403); else a
  :class:`~agent.traffic.upstream_cluster.Cluster` (a bare target tuple is wrapped in
  the pool's :meth:`~agent.proxy.pool.UpstreamPool.direct` cluster);
- ``exchange``: everything per request that does not depend on the wire
  format -- breaker, endpoint choice, retries and their budget, outlier
  feedback, deadlines, the proxy's own 502/503/504 and the response flags
  (states, events and commands are tabled there);
- ``pool``: idle upstream connections, connects, the deadline ticker;
- this module: it feeds the exchange what the sockets say and carries out
  its commands, and everything HTTP/1.1 about the wire.

One request at a time per downstream connection (pipelined requests wait,
already parsed, with reading paused):

1. ``RequestHead`` → hooks (a :class:`Response` is sent as it is; a
   ``choose`` that raises gives 502) → the exchange's ``start``
   (:class:`~agent.proxy.exchange.Start`): it answers ``Connect`` (or
   ``Respond`` 503). An idle pooled connection to the target is reused
   (unless the exchange asks for a fresh one), else one is opened, counted
   in the cluster's breaker (``max-pending-requests``, ``max-connections``;
   a refusal goes back to the exchange as ``Refused``); the head and early
   body bytes wait, bounded by :attr:`L7Settings.buffer_size`, meanwhile.
2. The head goes out with hop-by-hop headers removed (RFC 9110 7.6.1), trace
   headers propagated or created, and our own framing header; the body is
   streamed chunk by chunk (chunked in → chunked out), never buffered whole
   (the exchange keeps a bounded copy for replay when a retry is possible).
   Backpressure: a full upstream pauses reading the client and vice versa.
3. Interim 1xx responses are relayed to HTTP/1.1 clients (so ``Expect:
   100-continue`` works); the final response head goes to the exchange
   (``Forward``, a retry, or a failure), then is streamed back, re-chunked
   when its length is unknown, so the client connection stays alive (an
   HTTP/1.0 client reads it until close instead).
4. Then the upstream connection goes back to the pool if it can serve
   another request (the request went out whole, the upstream keeps it
   alive), ``on_response(head, status, elapsed, exchange)`` gets the
   exchange's :class:`~agent.proxy.exchange.Exchange` record, and the next
   request is served.

Upgrade (only to :data:`UPGRADES`): after the upstream's 101 both sockets are
handed to the L4 :class:`~agent.proxy.relay.Relay` with the bytes already
read.

Session-level timeouts (:class:`L7Settings`), because the cluster is not
known before the head has arrived: ``header_timeout`` (``requestHeaders``: a
client that does not finish its head in time gets 408 and is closed --
slowloris) and ``idle_timeout`` (a silent keep-alive client is closed). The
per-request timeouts are the exchange's; the :class:`~agent.proxy.pool.Ticker`
wakes the session for both, up to one tick late, never early.

Errors: a malformed request head gets the parser's status (400/414/431...)
with ``Connection: close`` and never reaches an upstream; a body found
malformed after the head was accepted (a bad chunk) fails the exchange the
same way (flag DPE). A failure after the response head was sent can only be
signalled by resetting the client. A crash on one connection is logged and
resets that connection only.

Size: the session is one class because its socket callbacks share all of its
state; what could leave (pool, exchange) has.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.proxy import tracing
from agent.proxy.exchange import (
    CLIENT_LOST,
    DEADLINE,
    FORWARD,
    SWITCH_PROTOCOLS,
    BadRequest,
    BadResponse,
    Connect,
    Connected,
    ConnectFailed,
    Exchange,
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
from agent.proxy.http1 import (
    CHUNKED_END,
    Body,
    EndOfMessage,
    ParseError,
    RequestHead,
    RequestParser,
    ResponseHead,
    chunk,
    forward_headers,
    forwarded_head,
    serialize_response_head,
)
from agent.proxy.pool import TICK, Ticker, UpstreamPool, _ConnectSlot, _Upstream
from agent.proxy.relay import Endpoint, Relay, reset_transport, set_nodelay
from agent.traffic.breaker import Limit
from agent.traffic.upstream_cluster import Cluster, Target, target_str

__all__ = [
    "L7Settings",
    "Response",
    "Exchange",
    "UpstreamPool",
    "L7Session",
    "session_factory",
    "Ticker",
    "TICK",
]

log = logging.getLogger("meshlet.proxy.l7")


@dataclass(frozen=True)
class L7Settings:
    header_timeout: float = 10.0
    """Seconds from a request's first byte to the end of its head (else 408).
    This is ``requestHeaders``: session-level, the cluster is not known yet."""
    idle_timeout: float = 60.0
    """Seconds a keep-alive client may stay silent between requests."""
    buffer_size: int = 256 * 1024
    """Write high-water mark per socket; also bounds bytes held while connecting."""


@dataclass(frozen=True)
class Response:
    """A response made by the proxy itself (``on_request``/``choose`` short-circuit)."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _simple_response(status: int, body: bytes, headers=(), *, close: bool, head_only: bool = False) -> bytes:
    """``head_only``: the answer to a HEAD request has no body (RFC 9110 9.3.2),
    else a kept-alive client would read it as the next response."""
    hs = list(headers) + [(b"Content-Length", b"%d" % len(body))]
    if close:
        hs.append((b"Connection", b"close"))
    return serialize_response_head(status, _reason(status), hs) + (b"" if head_only else body)


#: Upgrade tokens the proxy switches to a tunnel after a 101 (as Istio's
#: Envoy does by default).  Others (h2c, ...) are not forwarded: the request
#: goes on as a plain one, so what follows stays parsed, authorized HTTP/1.1
#: and cannot smuggle requests past the per-request policy.
UPGRADES = frozenset({b"websocket"})


def _upgrade_allowed(value: bytes | None) -> bool:
    return value is not None and value.strip().lower() in UPGRADES


# --------------------------------------------------------------------------
# The downstream session: HTTP/1.1 on the client socket, one HttpExchange per request

_P_PIPELINE, _P_UPSTREAM, _P_CONNECT = 1, 2, 4  # why reading the client is paused

Chooser = Callable[[RequestHead], "Cluster | Response | Target"]
OnRequest = Callable[[RequestHead], "Response | RequestHead | None"]
OnResponse = Callable[[RequestHead, int, float, Exchange], None]

_monotonic = time.monotonic  # the exchanges' clock (the ticker's is the loop's)


class L7Session(asyncio.Protocol):
    """Serves one downstream connection (module docstring)."""

    def __init__(
        self,
        choose: Chooser,
        pool: UpstreamPool,
        settings: L7Settings | None = None,
        *,
        on_request: OnRequest | None = None,
        on_response: OnResponse | None = None,
    ) -> None:
        self.choose = choose
        self.pool = pool
        self.settings = settings or L7Settings()
        self.on_request = on_request
        self.on_response = on_response
        self.relay: Relay | None = None  # set after an upgrade
        self.requests = 0
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._loop = asyncio.get_running_loop()
        self._ticker = pool.ticker
        self._per_s = self._ticker._per_s
        self._tick_key: int | None = None
        self._parser = RequestParser()
        self._queue: collections.deque = collections.deque()
        self._paused = 0
        self._closed = False
        self._client_eof = False
        self._down_write_paused = False
        self._wait_until: float | None = None
        self._wait_head = False
        self._pumping = False
        self._obuf: list[bytes] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        # The request's decisions live in the exchange; here only the wire and socket state.
        self._req: RequestHead | None = None
        self._ex: HttpExchange | None = None
        self._up: _Upstream | None = None
        self._pending: list[bytes] | None = None  # bytes for an upstream being connected
        self._pending_size = 0
        self._connect_task: asyncio.Task | None = None
        self._chunk_up = False
        self._chunk_down = False
        self._keep_down = False
        self._upstream_reusable = False

    # ---- asyncio.Protocol (client side)

    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        b = self.settings.buffer_size
        transport.set_write_buffer_limits(high=b, low=b // 2)
        self._arm_wait()

    def data_received(self, data: bytes) -> None:
        try:
            self._queue.extend(self._parser.feed(data))
            if self._wait_until is not None and not self._wait_head and self._parser.in_head:
                self._arm_head_timer()
            self._pump()
        except Exception:  # noqa: BLE001 - one connection's bug never kills the proxy
            self._crash()

    def eof_received(self) -> bool:
        self._client_eof = True
        try:
            self._queue.extend(self._parser.feed_eof())
            self._pump()
            if self._req is None and not self._queue:
                self._close()
        except Exception:  # noqa: BLE001 - one connection's bug never kills the proxy
            self._crash()
        return True

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._cancel_wait()
        self._disarm()
        self._drop_upstream(reset=True)
        self._client_lost()

    def _up_pause(self) -> None:
        """The upstream's write buffer is full: stop reading the client."""
        self._pause(_P_UPSTREAM)

    def _up_resume(self) -> None:
        self._resume(_P_UPSTREAM)

    def pause_writing(self) -> None:
        self._down_write_paused = True
        up = self._up
        if up is not None and not up.lost:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._down_write_paused = False
        up = self._up
        if up is not None and not up.lost:
            up.transport.resume_reading()

    # ---- helpers

    def _pause(self, why: int) -> None:
        if not self._paused and not self._closed:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused and not self._closed:
                self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self._obuf is not None:
            self._obuf.append(data)
        elif not self._closed:
            self.transport.write(data)

    def _flush(self) -> None:
        out = self._obuf
        if out:
            if not self._closed:
                self.transport.write(b"".join(out))
            out.clear()

    def _close(self) -> None:
        self._flush()
        if not self._closed:
            self._closed = True
            self._cancel_wait()
            self._disarm()
            self.transport.close()  # flushes first

    def _crash(self) -> None:
        log.exception("L7 session failed; resetting the connection")
        self._drop_upstream(reset=True)
        self._client_lost()
        self._closed = True
        self._cancel_wait()
        self._disarm()
        reset_transport(self.transport)

    def _client_lost(self) -> None:
        ex = self._ex
        if ex is not None:
            ex.handle(CLIENT_LOST, _monotonic())

    # ---- commands from the exchange

    def _run(self, cmds) -> None:
        for c in cmds:
            if self._closed:
                return
            t = type(c)
            if t is Wake:
                self._arm(c.at)
            elif t is Connect:
                self._connect_cmd(c)
            elif t is ResetUpstream:  # a retry follows
                self._drop_upstream(reset=True)
                self._resume(_P_UPSTREAM | _P_CONNECT)
                self._upstream_reusable = False
            elif t is Respond:
                self._drop_upstream(reset=True)
                self._answer(c.status, c.body, c.headers)
            elif t is Fail:
                self._drop_upstream(reset=True)
                self._write(_simple_response(c.status, c.body, c.headers, close=True))
                self._report()
                self._close()
            elif t is ResetClient:
                self._drop_upstream(reset=True)
                self._report()
                self._obuf = None
                self._closed = True
                self._cancel_wait()
                self._disarm()
                reset_transport(self.transport)
            else:  # Forward / SwitchProtocols only answer a response head (_resp_head)
                raise AssertionError(f"unexpected command {c!r}")

    def _answer(self, status: int, body: bytes, headers=()) -> None:
        """The proxy's own response (the exchange is ANSWERED): keep the client
        if it allows, discard the rest of the request body."""
        head = self._req
        assert head is not None and self._ex is not None
        has_body = head.framing != "none"
        self._keep_down = head.keep_alive and not self._client_eof and not (has_body and head.expect_continue)
        self._write(
            _simple_response(
                status, body, headers, close=not self._keep_down, head_only=head.method == b"HEAD"
            )
        )
        if self._ex.req_done or not self._keep_down:
            self._finish()

    def _connect_cmd(self, c: Connect) -> None:
        """An idle pooled connection to the target (unless ``fresh``), else a
        new one (counted in the breaker)."""
        target = c.target
        if not c.fresh:
            up = self.pool.take_idle(target)
            if up is not None:
                self._pending = None
                self._attach(up, c.data, reused=True)
                return
        ex = self._ex
        assert ex is not None and ex.cluster is not None
        b = ex.cluster.breaker
        over = b.acquire(Limit.PENDING)
        if over is None:
            over = b.acquire(Limit.CONNECTIONS)
            if over is not None:
                b.release(Limit.PENDING)
        if over is not None:
            self._run(ex.handle(Refused(over), _monotonic()))
            return
        slot = _ConnectSlot(b)
        p = self._pending = list(c.data)
        self._pending_size = sum(map(len, p))
        task = self._connect_task = self._loop.create_task(self._connect(target, c.timeout, slot))
        task.add_done_callback(slot.done)

    # ---- deadlines

    def _arm(self, when: float) -> None:
        """Make sure the ticker wakes this session no later than ``when``."""
        k = int(when * self._per_s) + 1  # == Ticker.key(when), inlined: several calls per request
        old = self._tick_key
        if old is None or k < old:
            self._tick_key = self._ticker.move(self, old, k)

    def _disarm(self) -> None:
        if self._tick_key is not None:
            self._ticker.remove(self, self._tick_key)
            self._tick_key = None

    def _on_tick(self, now: float) -> None:
        if self._closed:
            return
        ex = self._ex
        if ex is None:
            w = self._wait_until
            if w is not None:
                if now >= w:
                    self._on_wait_timeout()
                else:
                    self._arm(w)
            return
        # The exchange's deadlines are on its own (monotonic) clock, which
        # never runs behind the loop's: a wake-up is never early for it.
        cmds = ex.handle(DEADLINE, _monotonic())
        if cmds:
            self._run(cmds)

    def _cancel_wait(self) -> None:
        self._wait_until = None  # the ticker entry is dropped lazily

    def _arm_wait(self) -> None:
        """Waiting for the next request: idle timeout, or header timeout once it began."""
        if self._closed:
            return
        if self._parser.in_head:
            self._arm_head_timer()
        else:
            self._wait_head = False
            self._wait_until = w = self._loop.time() + self.settings.idle_timeout
            self._arm(w)

    def _arm_head_timer(self) -> None:
        self._wait_head = True
        self._wait_until = w = self._loop.time() + self.settings.header_timeout
        self._arm(w)

    def _on_wait_timeout(self) -> None:
        self._wait_until = None
        if self._wait_head:
            self._write(_simple_response(408, b"request header timeout\n", close=True))
        self._close()

    # ---- request events

    def _pump(self) -> None:
        if self._pumping:
            return  # the loop below picks up what was queued (no recursion)
        self._pumping = True
        try:
            q = self._queue
            while q and not self._closed:
                ex = self._ex
                if ex is not None and ex.req_done:
                    self._pause(_P_PIPELINE)  # the next request waits for this response
                    return
                ev = q.popleft()
                t = type(ev)
                if t is Body:
                    self._req_body(ev.data)
                elif t is RequestHead:
                    self._start(ev)
                elif t is EndOfMessage:
                    self._req_end()
                else:
                    self._req_error(ev)
            self._resume(_P_PIPELINE)
        finally:
            self._pumping = False

    def _start(self, head: RequestHead) -> None:
        self._wait_until = None
        self.requests += 1
        self._req = head
        now = _monotonic()
        fr = head.framing
        ex = self._ex = HttpExchange(
            head.method,
            0 if fr == "none" else head.content_length if fr == "content-length" else None,
            now,
            CHUNKED_END if fr == "chunked" else b"",
            head.upgrade is not None and _upgrade_allowed(head.upgrade),
        )
        if self.on_request is not None:
            r = self.on_request(head)
            if isinstance(r, RequestHead):  # forward this head instead (e.g. JWT: token removed)
                head = self._req = r
            elif r is not None:
                ex.answer(r.status)
                self._answer(r.status, r.body, r.headers)
                return
        try:
            c = self.choose(head)
        except Exception as e:  # noqa: BLE001 - the caller's decision failed
            log.warning("no upstream for %s %r: %s", head.method, head.target, e)
            self._run(ex.fail(502, "no upstream for this request", now))
            return
        if type(c) is not Cluster:
            if isinstance(c, Response):
                ex.answer(c.status)
                self._answer(c.status, c.body, c.headers)
                return
            c = self.pool.direct(c) if isinstance(c, tuple) else c  # a bare target
        self._chunk_up = fr == "chunked"
        self._run(ex.start(c, self._head_bytes, now))

    def _head_bytes(self, target: Target) -> bytes:
        """The request head as forwarded (for the first target; retries reuse it)."""
        head: RequestHead = self._req  # type: ignore[assignment]  # _start() set it, then called us
        ctx = tracing.hop(head.headers)
        ex = self._ex
        if ex is not None:  # logged with the request (generated ids included)
            ex.trace = ctx
        extra = ctx.headers()
        u = head.upgrade
        if u is not None and _upgrade_allowed(u):  # as _start() decided the exchange's ``upgrade``
            extra += [(b"Connection", b"upgrade"), (b"Upgrade", u)]
        if head.framing == "content-length":
            # that framing comes with the length (http1); no check per request
            extra.append((b"Content-Length", b"%d" % head.content_length))  # type: ignore[str-format]
        elif head.framing == "chunked":
            extra.append((b"Transfer-Encoding", b"chunked"))
        first = b"%s %s HTTP/1.1\r\n" % (head.method, head.path.target.encode("ascii"))
        if head.host is None:  # HTTP/1.0 without Host: we forward 1.1, which needs one (first)
            first += b"Host: %s\r\n" % target_str(target).encode()
        return forwarded_head(first, head.headers, extra, drop=tracing.TRACE_HEADERS)

    async def _connect(self, target: Target, timeout: float | None, slot: _ConnectSlot) -> None:
        ex = self._ex
        assert ex is not None
        try:
            up = await self.pool.connect(target, timeout)
        except TimeoutError:
            self._connect_task = None
            slot.release_pending()
            self._run(
                ex.handle(
                    ConnectFailed(f"upstream {target_str(target)} did not accept the connection in time"),
                    _monotonic(),
                )
            )
            return
        except OSError as e:
            self._connect_task = None
            slot.release_pending()
            self._run(
                ex.handle(
                    ConnectFailed(f"upstream {target_str(target)} unreachable: {e.strerror or e}"),
                    _monotonic(),
                )
            )
            return
        slot.release_pending()
        slot.conn = False  # the connection holds its count from now on
        up.breaker = slot.breaker
        if up.lost:
            up.release_slot()
        self._connect_task = None
        ex.handle(Connected(target), _monotonic())
        if self._closed or self._ex is not ex or ex.target != target:
            self.pool.release(up)
            return
        self._resume(_P_CONNECT)
        self._attach(up, None, reused=False)

    def _attach(self, up: _Upstream, data, *, reused: bool) -> None:
        """``up`` serves the current attempt: write ``data`` (None: what was
        pending while connecting) and tell the exchange."""
        ex: HttpExchange = self._ex  # type: ignore[assignment]  # our callers' request is in flight
        self._up = up
        up.session = self
        up.got_bytes = False
        up.parser.expect(ex.method)  # the request's
        if data is None:
            data = self._pending
            self._pending = None
            self._pending_size = 0
        t = up.transport
        t.write(data[0] if len(data) == 1 else b"".join(data))
        if t.get_write_buffer_size() > self.settings.buffer_size:
            self._pause(_P_UPSTREAM)
        if self._down_write_paused:
            t.pause_reading()
        cmds = ex.attached(reused, _monotonic())
        if cmds:
            self._run(cmds)

    def _req_body(self, data: bytes) -> None:
        ex = self._ex
        if ex is None or ex.state is State.ANSWERED:
            return
        pieces = chunk(data) if self._chunk_up else (data,)
        ex.request_body(len(data), pieces)  # counts, and keeps the replay copy
        up = self._up
        if up is not None:
            if not up.lost:
                up.transport.writelines(pieces)
                ex.last_io = _monotonic()
        elif self._pending is not None:
            self._pending.extend(pieces)
            self._pending_size += len(data)
            if self._pending_size > self.settings.buffer_size:
                self._pause(_P_CONNECT)

    def _req_end(self) -> None:
        ex = self._ex
        if ex is None:
            return
        cmds = ex.request_end(_monotonic())
        if self._chunk_up and ex.state is not State.ANSWERED:
            if self._up is not None:
                if not self._up.lost:
                    self._up.transport.write(CHUNKED_END)
            elif self._pending is not None:
                self._pending.append(CHUNKED_END)
        if ex.state is State.ANSWERED:  # and now the request is complete too
            self._finish()
            return
        if cmds:
            self._run(cmds)

    def _req_error(self, err: ParseError) -> None:
        log.info("refused a malformed request: %d %s", err.status, err.reason)
        ex = self._ex
        if ex is None:  # between requests: nothing to report
            self._write(
                _simple_response(err.status, (err.reason + "\n").encode("utf-8", "replace"), close=True)
            )
            self._close()
            return
        self._run(ex.handle(BadRequest(err.status, err.reason), _monotonic()))

    def _drop_upstream(self, *, reset: bool) -> None:
        """Forget the current upstream (and any connect in progress); the
        exchange has already accounted for the attempt."""
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        self._pending = None
        self._pending_size = 0
        up = self._up
        self._up = None
        if up is not None:
            up.session = None
            if reset:
                reset_transport(up.transport)
            else:
                self.pool.release(up)

    def _report(self) -> None:
        ex = self._ex
        if ex is None:
            return
        ex.release()
        if self.on_response is not None:
            try:
                # _start() sets _req with _ex: no None check per request
                self.on_response(self._req, ex.status, _monotonic() - ex.t0, ex.record())  # type: ignore[arg-type]
            except Exception:
                log.exception("on_response hook failed")

    def _finish(self) -> None:
        """The exchange is over: release the upstream, report, serve the next request."""
        ex: HttpExchange = self._ex  # type: ignore[assignment]  # our callers' request is in flight
        up = self._up
        if up is not None:
            self._up = None
            if ex.req_done and self._upstream_reusable:  # release() checks it is usable
                # an upstream was attached, so start() had set the cluster
                self.pool.release(up, ex.cluster.settings.timeouts.idle)  # type: ignore[union-attr]
            else:
                up.session = None
                up.transport.close()
        self._report()
        keep = self._keep_down and ex.req_done
        declined = self._req is not None and self._req.upgrade is not None
        self._reset_request()
        if not keep or self._closed:
            self._close()
            return
        if declined:
            self._queue.extend(self._parser.upgrade_declined())
        if self._client_eof and not self._queue:
            self._close()
            return
        self._resume(_P_UPSTREAM | _P_CONNECT)
        self._arm_wait()
        self._pump()

    # ---- upstream events

    def _up_data(self, up: _Upstream, data: bytes) -> None:
        try:
            self._up_events(up, up.parser.feed(data))
        except Exception:  # noqa: BLE001 - one connection's bug never kills the proxy
            self._crash()

    def _up_eof(self, up: _Upstream) -> None:
        try:
            self._up_events(up, up.parser.feed_eof())
        except Exception:  # noqa: BLE001 - one connection's bug never kills the proxy
            self._crash()

    def _up_lost(self, up: _Upstream, exc) -> None:
        if up is not self._up or self._closed:
            return
        ex = self._ex
        assert ex is not None
        up.session = None  # lost: nothing to reset or pool
        self._up = None
        self._run(ex.handle(UpstreamLost(None if exc is None else str(exc), up.got_bytes), _monotonic()))

    def _up_events(self, up: _Upstream, events: list) -> None:
        # Everything one upstream read produced goes out in one write.
        out: list[bytes]
        self._obuf = out = []
        try:
            self._up_events_into(up, events, out)
        finally:
            self._obuf = None
            if out and not self._closed:
                self.transport.write(b"".join(out))

    def _up_events_into(self, up: _Upstream, events: list, out: list[bytes]) -> None:
        cur = self._ex
        if cur is not None:
            cur.last_io = _monotonic()
        for ev in events:
            if up is not self._up or self._closed:
                return
            # up is self._up: it serves the request in flight (_attach); no None check per event
            ex: HttpExchange = self._ex  # type: ignore[assignment]
            t = type(ev)
            if t is Body:
                ex.resp_bytes += len(ev.data)
                if self._chunk_down:
                    out += chunk(ev.data)
                else:
                    out.append(ev.data)
            elif t is ResponseHead:
                self._resp_head(up, ev)
            elif t is EndOfMessage:
                self._resp_end(up)
            else:
                self._run(ex.handle(BadResponse(ev.status, ev.reason), _monotonic()))

    def _resp_head(self, up: _Upstream, r: ResponseHead) -> None:
        # up is self._up (_up_events_into): its request is in flight, no None checks per response
        req: RequestHead = self._req  # type: ignore[assignment]
        ex: HttpExchange = self._ex  # type: ignore[assignment]  # ditto
        st = r.status
        if r.interim:
            if req.version == b"1.1":
                self._write(serialize_response_head(st, r.reason, forward_headers(r.headers)))
            return
        cmds = ex.response(st, _monotonic())
        c = cmds[0]
        if c is SWITCH_PROTOCOLS:
            self._switch_to_relay(up, r)
            return
        if c is not FORWARD:
            self._run(cmds)  # a retry (this response is discarded) or a failure
            return
        keep = req.keep_alive and not self._client_eof
        extra: list[tuple[bytes, bytes]] = []  # the proxy's framing, after the upstream's headers
        if r.framing == "content-length":
            # that framing comes with the length (http1); no check per response
            extra.append((b"Content-Length", b"%d" % r.content_length))  # type: ignore[str-format]
        elif r.framing == "none":
            if r.content_length is not None:  # HEAD: the length the GET would have
                extra.append((b"Content-Length", b"%d" % r.content_length))
        elif req.version == b"1.1":
            extra.append((b"Transfer-Encoding", b"chunked"))
            self._chunk_down = True
        else:
            keep = False  # an HTTP/1.0 client reads until close
        self._upstream_reusable = r.keep_alive and r.framing != "until-close"
        if not keep:
            extra.append((b"Connection", b"close"))
        elif req.version == b"1.0":
            extra.append((b"Connection", b"keep-alive"))
        self._keep_down = keep
        self._write(forwarded_head(b"HTTP/1.1 %d %s\r\n" % (st, r.reason), r.headers, extra))

    def _resp_end(self, up: _Upstream) -> None:
        if self._chunk_down:
            self._write(CHUNKED_END)
        self._flush()
        ex: HttpExchange = self._ex  # type: ignore[assignment]  # up is self._up: its request is in flight
        ex.response_end()
        if not ex.req_done:
            # Answered before the body was sent (e.g. 413): stop here.
            self._keep_down = False
        self._finish()

    def _switch_to_relay(self, up: _Upstream, r: ResponseHead) -> None:
        req = self._req
        # SWITCH_PROTOCOLS comes only for a request that asked (the exchange's ``upgrade``)
        assert req is not None and req.upgrade is not None
        headers = forward_headers(r.headers) + [
            (b"Connection", b"upgrade"),
            (b"Upgrade", _upgrade_value(r) or req.upgrade),
        ]
        self._write(serialize_response_head(101, r.reason, headers))
        self._flush()
        self._cancel_wait()
        self._disarm()
        up.session = None
        self._up = None
        self._report()
        down_raw = self._parser.take_raw()
        up_raw = up.parser.take_raw()
        client, upstream = Endpoint("client"), Endpoint("upstream")
        self.transport.set_protocol(client)
        client.connection_made(self.transport)
        client.unread(down_raw)
        client.eof = self._client_eof
        up.transport.set_protocol(upstream)
        upstream.connection_made(up.transport)
        upstream.unread(up_raw)
        if self._paused:
            self._paused = 0
        slot = up.breaker  # the tunnel keeps counting as a connection until it ends
        if slot is not None:
            up.breaker = None
        self.relay = Relay(client, upstream, buffer_size=self.settings.buffer_size)
        self.relay.start()
        if slot is not None:
            self.relay.done.add_done_callback(lambda _f: slot.release(Limit.CONNECTIONS))
        self._closed = True  # this protocol is done; the relay owns both sockets


def _upgrade_value(r: ResponseHead) -> bytes | None:
    for n, v in r.headers:
        if n.lower() == b"upgrade":
            return v.strip()
    return None


def session_factory(
    choose: Chooser,
    pool: UpstreamPool,
    settings: L7Settings | None = None,
    *,
    on_request: OnRequest | None = None,
    on_response: OnResponse | None = None,
) -> Callable[[], L7Session]:
    """A protocol factory for ``loop.create_server``."""
    return lambda: L7Session(choose, pool, settings, on_request=on_request, on_response=on_response)
