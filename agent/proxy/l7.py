"""HTTP/1.1 forwarding for one downstream connection: the thin asyncio shell.

Protocol decisions live in ``http1`` (parsing, framing, serialization),
``tracing`` (trace headers) and ``agent.policy.http`` (normalization). This
module moves bytes between sockets and owns the timers. Not wired into the
server yet: ``server.py`` will hand it connections that ``sniff`` calls HTTP.

One request at a time per downstream connection (pipelined requests wait,
already parsed, with reading paused):

1. ``RequestHead`` → ``on_request(head)``: a :class:`Response` short-circuits
   (e.g. a 403); else ``choose(head)`` gives the upstream address.
2. An idle pooled connection to it is reused, else one is opened (the head
   and early body bytes wait, bounded, meanwhile).
3. The head goes out with hop-by-hop headers removed (RFC 9110 7.6.1), trace
   headers propagated or created, and our own framing header; the body is
   streamed chunk by chunk (chunked in → chunked out), never buffered whole.
   Backpressure: a full upstream pauses reading the client and vice versa.
4. Interim 1xx responses are relayed (so ``Expect: 100-continue`` works);
   the final response is streamed back, re-chunked when its length is
   unknown, so the client connection stays alive.
5. Then ``on_response(head, status, elapsed)``, the upstream connection goes
   back to the pool if both sides allow it, and the next request is served.

Upgrade: after the upstream's 101 both sockets are handed to the L4
:class:`~agent.proxy.relay.Relay` with the bytes already read.

Errors: a malformed request gets the parser's status (400/414/431...) with
``Connection: close`` and never reaches an upstream; connect refused or a
reset before a response → 502; no response head within
``response_timeout`` of the last byte sent → 504; a client that does not
finish its head within ``header_timeout`` gets 408 and is closed (slowloris);
an idle keep-alive client is closed after ``idle_timeout``. A failure after
the response head was sent can only be signalled by resetting the client.
A crash on one connection is logged and resets that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import time
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.proxy import tracing
from agent.proxy.http1 import (
    CHUNKED_END, Body, EndOfMessage, ParseError, RequestHead, RequestParser, ResponseHead,
    ResponseParser, chunk, forward_headers, serialize_request_head, serialize_response_head,
)
from agent.proxy.relay import Endpoint, Relay, reset_transport, set_nodelay

__all__ = ["L7Settings", "Response", "Exchange", "UpstreamPool", "L7Session", "session_factory"]

log = logging.getLogger("meshlet.proxy.l7")

Address = tuple[str, int]


@dataclass(frozen=True)
class L7Settings:
    header_timeout: float = 10.0
    """Seconds from a request's first byte to the end of its head (else 408)."""
    idle_timeout: float = 60.0
    """Seconds a keep-alive client may stay silent between requests."""
    response_timeout: float = 30.0
    """Seconds without a response head after the last request byte sent (else 504)."""
    buffer_size: int = 256 * 1024
    """Write high-water mark per socket; also bounds bytes held while connecting."""


@dataclass(frozen=True)
class Response:
    """A response made by the proxy itself (``on_request`` short-circuit)."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Exchange:
    """What happened to one request, for ``on_response`` (metrics, access log).

    ``flags`` follow Envoy's response flags, comma-separated, "-" for none:
    UF upstream connect failure, UC upstream connection terminated, UT
    upstream (per-try or request) timeout, URX retries exhausted, UO circuit
    breaker overflow, NR no healthy upstream, DPE downstream protocol error,
    UAEX/RBAC denied by policy (the short-circuit said so)."""

    cluster: str | None = None
    """The service port (``ns/name:port``) or None for a direct pod address."""
    upstream: tuple | None = None
    """The last upstream target tried, or None if none was."""
    attempts: int = 0
    """Tries made (1 without retries; 0 when none was made)."""
    flags: str = "-"
    request_body_bytes: int = 0
    response_body_bytes: int = 0


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _simple_response(status: int, body: bytes, headers=(), *, close: bool) -> bytes:
    hs = list(headers) + [(b"Content-Length", b"%d" % len(body))]
    if close:
        hs.append((b"Connection", b"close"))
    return serialize_response_head(status, _reason(status), hs) + body


# --------------------------------------------------------------------------
# Upstream connections and their pool


class _Upstream(asyncio.Protocol):
    """One upstream connection; events go to the session it serves, if any."""

    def __init__(self, pool: "UpstreamPool", addr: Address) -> None:
        self.pool = pool
        self.addr = addr
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.session: L7Session | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.lost = False
        self.eof = False
        self.got_bytes = False  # since the current request was sent

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
        s = self.session
        if s is None:
            self.pool.drop(self)
        else:
            s._up_lost(self, exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session._pause(_P_UPSTREAM)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session._resume(_P_UPSTREAM)

    def usable(self) -> bool:
        t = self.transport
        return (not self.lost and not self.eof and t is not None and not t.is_closing()
                and not self.parser.in_message and not self.parser.failed)

    def close(self) -> None:
        self.session = None
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive upstream connections per address (LIFO, bounded, expiring)."""

    def __init__(self, *, max_idle: int = 16, idle_timeout: float = 30.0,
                 connect_timeout: float = 5.0, buffer_size: int = 256 * 1024,
                 open_socket: Callable[[Address], Awaitable[socket.socket]] | None = None) -> None:
        """``open_socket(addr)``, when given, returns a connected non-blocking
        socket (the node proxy's: marked with SO_MARK); it raises OSError or
        TimeoutError on failure. Without it, the loop connects by itself."""
        self.max_idle = max_idle
        self.open_socket = open_socket
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.connects = 0
        self.reuses = 0
        self._idle: dict[Address, list[_Upstream]] = {}

    def idle_count(self, addr: Address | None = None) -> int:
        if addr is not None:
            return len(self._idle.get(addr, ()))
        return sum(len(v) for v in self._idle.values())

    def take_idle(self, addr: Address) -> _Upstream | None:
        lst = self._idle.get(addr)
        while lst:
            up = lst.pop()
            if up.idle_handle is not None:
                up.idle_handle.cancel()
                up.idle_handle = None
            if up.usable():
                self.reuses += 1
                return up
            up.close()
        return None

    async def connect(self, addr: Address) -> _Upstream:
        loop = asyncio.get_running_loop()
        if self.open_socket is None:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self, addr), addr[0], addr[1]),
                self.connect_timeout)
        else:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self.open_socket(addr)
                try:
                    _, up = await loop.create_connection(lambda: _Upstream(self, addr), sock=sock)
                except BaseException:
                    sock.close()
                    raise
        self.connects += 1
        return up  # type: ignore[return-value]

    def release(self, up: _Upstream) -> None:
        up.session = None
        lst = self._idle.setdefault(up.addr, [])
        if not up.usable() or len(lst) >= self.max_idle:
            up.close()
            return
        up.got_bytes = False
        up.idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, up)
        lst.append(up)

    def _expire(self, up: _Upstream) -> None:
        up.idle_handle = None
        self.drop(up)
        up.close()

    def drop(self, up: _Upstream) -> None:
        lst = self._idle.get(up.addr)
        if lst and up in lst:
            lst.remove(up)
        if up.idle_handle is not None:
            up.idle_handle.cancel()
            up.idle_handle = None

    def close(self) -> None:
        for lst in self._idle.values():
            for up in lst:
                if up.idle_handle is not None:
                    up.idle_handle.cancel()
                up.close()
        self._idle.clear()


# --------------------------------------------------------------------------
# The downstream session

_P_PIPELINE, _P_UPSTREAM, _P_CONNECT = 1, 2, 4  # why reading the client is paused

Chooser = Callable[[RequestHead], Address]
OnRequest = Callable[[RequestHead], "Response | None"]
OnResponse = Callable[[RequestHead, int, float, Exchange], None]


class L7Session(asyncio.Protocol):
    """Serves one downstream connection (module docstring)."""

    def __init__(self, choose: Chooser, pool: UpstreamPool, settings: L7Settings | None = None, *,
                 on_request: OnRequest | None = None, on_response: OnResponse | None = None) -> None:
        self.choose = choose
        self.pool = pool
        self.settings = settings or L7Settings()
        self.on_request = on_request
        self.on_response = on_response
        self.relay: Relay | None = None  # set after an upgrade
        self.requests = 0
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._parser = RequestParser()
        self._queue: collections.deque = collections.deque()
        self._paused = 0
        self._closed = False
        self._client_eof = False
        self._down_write_paused = False
        self._wait_timer: asyncio.TimerHandle | None = None
        self._wait_head = False
        self._pumping = False
        self._obuf: list[bytes] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._req: RequestHead | None = None
        self._req_done = False
        self._resp_done = False
        self._resp_started = False  # a final response head went to the client
        self._up: _Upstream | None = None
        self._pending: list[bytes] | None = None
        self._pending_size = 0
        self._connect_task: asyncio.Task | None = None
        self._chunk_up = False
        self._chunk_down = False
        self._discard = False
        self._keep_down = False
        self._head_bytes = b""
        self._reused = False
        self._resp_timer: asyncio.TimerHandle | None = None
        self._last_sent = 0.0
        self._t0 = 0.0
        self._status = 0
        self._upstream_reusable = False
        self._exchange = Exchange()

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
            if self._wait_timer is not None and not self._wait_head and self._parser.in_head:
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
        except Exception:  # noqa: BLE001
            self._crash()
        return True

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._cancel_wait()
        self._drop_upstream(reset=True)

    def pause_writing(self) -> None:
        self._down_write_paused = True
        up = self._up
        if up is not None and not up.lost:
            up.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._down_write_paused = False
        up = self._up
        if up is not None and not up.lost:
            up.transport.resume_reading()  # type: ignore[union-attr]

    # ---- helpers

    def _pause(self, why: int) -> None:
        if not self._paused and not self._closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused and not self._closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        if self._obuf is not None:
            self._obuf.append(data)
        elif not self._closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def _flush(self) -> None:
        out = self._obuf
        if out:
            if not self._closed:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]
            out.clear()

    def _close(self) -> None:
        self._flush()
        if not self._closed:
            self._closed = True
            self._cancel_wait()
            self.transport.close()  # type: ignore[union-attr]  # flushes first

    def _crash(self) -> None:
        log.exception("L7 session failed; resetting the connection")
        self._drop_upstream(reset=True)
        self._closed = True
        self._cancel_wait()
        reset_transport(self.transport)

    def _cancel_wait(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None

    def _arm_wait(self) -> None:
        """Waiting for the next request: idle timeout, or header timeout once it began."""
        self._cancel_wait()
        if self._closed:
            return
        if self._parser.in_head:
            self._arm_head_timer()
        else:
            self._wait_head = False
            self._wait_timer = self._loop.call_later(self.settings.idle_timeout, self._on_wait_timeout)

    def _arm_head_timer(self) -> None:
        self._cancel_wait()
        self._wait_head = True
        self._wait_timer = self._loop.call_later(self.settings.header_timeout, self._on_wait_timeout)

    def _on_wait_timeout(self) -> None:
        self._wait_timer = None
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
                if self._req is not None and self._req_done:
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
        self._cancel_wait()
        self.requests += 1
        self._req = head
        self._t0 = time.monotonic()
        if self.on_request is not None:
            r = self.on_request(head)
            if r is not None:
                self._short_circuit(r)
                return
        ctx = tracing.hop(head.headers)
        headers = forward_headers(head.headers, drop=tracing.TRACE_HEADERS)
        headers += ctx.headers()
        if head.upgrade is not None:
            headers += [(b"Connection", b"upgrade"), (b"Upgrade", head.upgrade)]
        if head.framing == "content-length":
            headers.append((b"Content-Length", b"%d" % head.content_length))
        elif head.framing == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
            self._chunk_up = True
        try:
            addr = self.choose(head)
        except Exception as e:  # noqa: BLE001 - the caller's decision failed
            log.warning("no upstream for %s %r: %s", head.method, head.target, e)
            self._fail(502, "no upstream for this request")
            return
        if head.host is None:  # HTTP/1.0 without Host: we forward 1.1, which needs one
            headers.insert(0, (b"Host", b"%s:%d" % (addr[0].encode(), addr[1])))
        self._head_bytes = out = serialize_request_head(head, headers)
        up = self.pool.take_idle(addr)
        if up is not None:
            self._attach(up, [out], reused=True)
        else:
            self._pending = [out]
            self._pending_size = len(out)
            self._connect_task = self._loop.create_task(self._connect(addr))

    async def _connect(self, addr: Address) -> None:
        try:
            up = await self.pool.connect(addr)
        except asyncio.TimeoutError:
            self._connect_task = None
            self._fail(504, f"upstream {addr[0]}:{addr[1]} did not accept the connection in time")
            return
        except OSError as e:
            self._connect_task = None
            self._fail(502, f"upstream {addr[0]}:{addr[1]} unreachable: {e.strerror or e}")
            return
        self._connect_task = None
        if self._closed or self._req is None:
            up.close()
            return
        pending = self._pending or []
        self._pending = None
        self._pending_size = 0
        self._resume(_P_CONNECT)
        self._attach(up, pending, reused=False)

    def _attach(self, up: _Upstream, data: list[bytes], *, reused: bool) -> None:
        self._up = up
        self._reused = reused
        up.session = self
        up.got_bytes = False
        up.parser.expect(self._req.method)  # type: ignore[union-attr]
        up.transport.write(data[0] if len(data) == 1 else b"".join(data))  # type: ignore[union-attr]
        if up.transport.get_write_buffer_size() > self.settings.buffer_size:  # type: ignore[union-attr]
            self._pause(_P_UPSTREAM)
        if self._down_write_paused:
            up.transport.pause_reading()  # type: ignore[union-attr]
        self._last_sent = self._loop.time()
        self._resp_timer = self._loop.call_later(self.settings.response_timeout, self._on_resp_timeout)

    def _req_body(self, data: bytes) -> None:
        if self._discard or self._req is None:
            return
        pieces = chunk(data) if self._chunk_up else (data,)
        up = self._up
        if up is not None:
            if not up.lost:
                up.transport.writelines(pieces)  # type: ignore[union-attr]
                self._last_sent = self._loop.time()
        elif self._pending is not None:
            self._pending.extend(pieces)
            self._pending_size += len(data)
            if self._pending_size > self.settings.buffer_size:
                self._pause(_P_CONNECT)

    def _req_end(self) -> None:
        if self._req is None:
            return
        self._req_done = True
        if not self._discard and self._chunk_up:
            if self._up is not None:
                if not self._up.lost:
                    self._up.transport.write(CHUNKED_END)  # type: ignore[union-attr]
            elif self._pending is not None:
                self._pending.append(CHUNKED_END)
        self._last_sent = self._loop.time()
        if self._resp_done:
            self._finish()

    def _req_error(self, err: ParseError) -> None:
        log.info("refused a malformed request: %d %s", err.status, err.reason)
        self._fail(err.status, err.reason)

    def _short_circuit(self, r: Response) -> None:
        head = self._req
        self._discard = True
        self._status = r.status
        has_body = head.framing != "none"  # type: ignore[union-attr]
        self._keep_down = head.keep_alive and not self._client_eof and not (has_body and head.expect_continue)  # type: ignore[union-attr]
        self._write(_simple_response(r.status, r.body, r.headers, close=not self._keep_down))
        self._resp_done = True
        self._resp_started = True
        if self._req_done or not self._keep_down:
            self._finish()

    def _fail(self, status: int, reason: str) -> None:
        """Answer with an error and close (reset if a response already began)."""
        self._drop_upstream(reset=True)
        if self._resp_started:
            self._obuf = None
            self._closed = True
            self._cancel_wait()
            reset_transport(self.transport)
            return
        self._status = status
        self._write(_simple_response(status, (reason + "\n").encode("utf-8", "replace"), close=True))
        self._report()
        self._close()

    def _drop_upstream(self, *, reset: bool) -> None:
        if self._resp_timer is not None:
            self._resp_timer.cancel()
            self._resp_timer = None
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        up = self._up
        self._up = None
        if up is not None:
            up.session = None
            if reset:
                reset_transport(up.transport)
            else:
                self.pool.release(up)

    def _report(self) -> None:
        if self.on_response is not None and self._req is not None:
            try:
                self.on_response(self._req, self._status, time.monotonic() - self._t0, self._exchange)
            except Exception:  # noqa: BLE001
                log.exception("on_response hook failed")

    def _finish(self) -> None:
        """The exchange is over: report, release the upstream, serve the next request."""
        up = self._up
        if up is not None:
            self._up = None
            if self._resp_timer is not None:
                self._resp_timer.cancel()
            if self._req_done and up.usable() and self._upstream_reusable:
                self.pool.release(up)
            else:
                up.session = None
                up.transport.close()  # type: ignore[union-attr]
        self._resp_timer = None
        self._report()
        keep = self._keep_down and self._req_done
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

    def _on_resp_timeout(self) -> None:
        self._resp_timer = None
        if self._resp_started or self._req is None:
            return
        left = self._last_sent + self.settings.response_timeout - self._loop.time()
        if left > 0.001:
            self._resp_timer = self._loop.call_later(left, self._on_resp_timeout)
            return
        self._fail(504, "upstream did not respond in time")

    def _up_data(self, up: _Upstream, data: bytes) -> None:
        try:
            self._up_events(up, up.parser.feed(data))
        except Exception:  # noqa: BLE001
            self._crash()

    def _up_eof(self, up: _Upstream) -> None:
        try:
            self._up_events(up, up.parser.feed_eof())
        except Exception:  # noqa: BLE001
            self._crash()

    def _up_lost(self, up: _Upstream, exc) -> None:
        if up is not self._up or self._closed:
            return
        if self._resp_started:
            self._fail(502, "upstream connection lost mid-response")
            return
        if self._reused and not up.got_bytes and self._req is not None and self._req.framing == "none":
            # A pooled connection the upstream closed just as we reused it: retry once, fresh.
            up.session = None
            self._up = None
            if self._resp_timer is not None:
                self._resp_timer.cancel()
                self._resp_timer = None
            self._pending = [self._head_bytes]
            self._pending_size = len(self._head_bytes)
            if self._req_done and self._chunk_up:
                self._pending.append(CHUNKED_END)
            self._connect_task = self._loop.create_task(self._connect(up.addr))
            return
        why = f": {exc}" if exc else ""
        self._fail(502, f"upstream closed the connection before responding{why}")

    def _up_events(self, up: _Upstream, events: list) -> None:
        # Everything one upstream read produced goes out in one write.
        self._obuf = out = []
        try:
            self._up_events_into(up, events, out)
        finally:
            self._obuf = None
            if out and not self._closed:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def _up_events_into(self, up: _Upstream, events: list, out: list) -> None:
        for ev in events:
            if up is not self._up or self._closed:
                return
            t = type(ev)
            if t is Body:
                if self._chunk_down:
                    out += chunk(ev.data)
                else:
                    out.append(ev.data)
            elif t is ResponseHead:
                self._resp_head(up, ev)
            elif t is EndOfMessage:
                self._resp_end(up)
            else:
                self._fail(ev.status, f"bad response from the upstream: {ev.reason}")

    def _resp_head(self, up: _Upstream, r: ResponseHead) -> None:
        req = self._req
        assert req is not None
        if r.status == 101:
            if req.upgrade is None:
                self._fail(502, "upstream switched protocols without being asked")
            else:
                self._switch_to_relay(up, r)
            return
        if r.interim:
            self._last_sent = self._loop.time()
            if req.version == b"1.1":
                self._write(serialize_response_head(r.status, r.reason, forward_headers(r.headers)))
            return
        if self._resp_timer is not None:
            self._resp_timer.cancel()
            self._resp_timer = None
        self._status = r.status
        self._resp_started = True
        keep = req.keep_alive and not self._client_eof
        headers = forward_headers(r.headers)
        if r.framing == "content-length":
            headers.append((b"Content-Length", b"%d" % r.content_length))
        elif r.framing == "none":
            if r.content_length is not None:  # HEAD: the length the GET would have
                headers.append((b"Content-Length", b"%d" % r.content_length))
        elif req.version == b"1.1":
            headers.append((b"Transfer-Encoding", b"chunked"))
            self._chunk_down = True
        else:
            keep = False  # an HTTP/1.0 client reads until close
        self._upstream_reusable = r.keep_alive and r.framing != "until-close"
        if not keep:
            headers.append((b"Connection", b"close"))
        elif req.version == b"1.0":
            headers.append((b"Connection", b"keep-alive"))
        self._keep_down = keep
        self._write(serialize_response_head(r.status, r.reason, headers))

    def _resp_end(self, up: _Upstream) -> None:
        if self._chunk_down:
            self._write(CHUNKED_END)
        self._flush()
        self._resp_done = True
        if not self._req_done:
            # Answered before the body was sent (e.g. 413): stop here.
            self._keep_down = False
        self._finish()

    def _switch_to_relay(self, up: _Upstream, r: ResponseHead) -> None:
        req = self._req
        assert req is not None
        headers = forward_headers(r.headers) + [(b"Connection", b"upgrade"),
                                                (b"Upgrade", _upgrade_value(r) or req.upgrade)]
        self._write(serialize_response_head(101, r.reason, headers))
        self._flush()
        self._status = 101
        if self._resp_timer is not None:
            self._resp_timer.cancel()
            self._resp_timer = None
        self._cancel_wait()
        up.session = None
        self._up = None
        self._report()
        down_raw = self._parser.take_raw()
        up_raw = up.parser.take_raw()
        client, upstream = Endpoint("client"), Endpoint("upstream")
        self.transport.set_protocol(client)  # type: ignore[union-attr]
        client.connection_made(self.transport)  # type: ignore[arg-type]
        client.unread(down_raw)
        client.eof = self._client_eof
        up.transport.set_protocol(upstream)  # type: ignore[union-attr]
        upstream.connection_made(up.transport)  # type: ignore[arg-type]
        upstream.unread(up_raw)
        if self._paused:
            self._paused = 0
        self.relay = Relay(client, upstream, buffer_size=self.settings.buffer_size)
        self.relay.start()
        self._closed = True  # this protocol is done; the relay owns both sockets


def _upgrade_value(r: ResponseHead) -> bytes | None:
    for n, v in r.headers:
        if n.lower() == b"upgrade":
            return v.strip()
    return None


def session_factory(choose: Chooser, pool: UpstreamPool, settings: L7Settings | None = None, *,
                    on_request: OnRequest | None = None,
                    on_response: OnResponse | None = None) -> Callable[[], L7Session]:
    """A protocol factory for ``loop.create_server``."""
    return lambda: L7Session(choose, pool, settings, on_request=on_request, on_response=on_response)
