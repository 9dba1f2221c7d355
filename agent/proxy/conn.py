"""The connection record (``Conn``), the upstream-connect error, and the set
of live connections one proxy worker tracks.

``Conn`` is what the access log writes and what the metrics label; every
role of the proxy (``outbound``, ``inbound``, ``destination``) fills in the
part it knows.  ``Live`` runs each connection's handler as a task, keeps
the task → record map (shutdown waits on it, a policy change re-checks it,
``stats()`` counts it) and turns a crash into a reset of that one
connection.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.proxy import telemetry as m
from agent.proxy.l7authz import RequestAuthorizer
from agent.proxy.limits import fd_exhausted, nofile_limit
from agent.proxy.relay import Endpoint, Relay
from agent.proxy.state import Pod, ProxyState, normalize_ip
from agent.proxy.tls import TlsConnection
from agent.proxy.tunnel import Status

__all__ = [
    "Conn",
    "ConnectFailure",
    "Deadline",
    "Live",
    "STATUS_RESULT",
    "family_of",
    "fmt_addr",
    "norm_addr",
    "peer_of",
    "relayed",
    "set_ready",
]

log = logging.getLogger("meshlet.proxy")


def fmt_addr(addr: Any) -> str | None:
    if not addr:
        return None
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def norm_addr(addr: Any) -> str | None:
    try:
        return fmt_addr((normalize_ip(str(addr[0])), addr[1])) if addr else None
    except ValueError:
        return fmt_addr(addr)


@functools.lru_cache(maxsize=1024)  # per new connection, for the same few addresses
def family_of(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


_TS_CACHE: list = [0, ""]  # (whole second, its ISO-8601 text) for utc_ms


def utc_ms() -> str:
    """Now as ``2026-01-02T03:04:05.678+00:00`` (the access log's ``ts``,
    the text of ``datetime.now(UTC).isoformat(timespec="milliseconds")``),
    the seconds part formatted once per second: this runs for every
    connection and request."""
    now = time.time()
    sec = int(now)
    if sec != _TS_CACHE[0]:
        _TS_CACHE[0] = sec
        _TS_CACHE[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_TS_CACHE[1]}.{int((now - sec) * 1000):03d}+00:00"


def peer_of(state: ProxyState, pod: Pod | None, principal: str | None = None) -> m.Peer:
    if pod is None:
        return m.Peer(principal=principal or m.UNKNOWN)
    return m.Peer(
        workload=pod.workload,
        namespace=pod.namespace,
        principal=principal or state.identity(pod),
        app=pod.app or m.UNKNOWN,
    )


class ConnectFailure(Exception):
    """An upstream connect failed. ``result`` is the access-log result."""

    def __init__(self, result: str, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.status = status
        self.reason = reason


# A tunnel response status → the access-log result of the source side.
STATUS_RESULT = {
    Status.REFUSED: "refused",
    Status.UNREACHABLE: "refused",
    Status.TIMEOUT: "timeout",
}


@dataclass(slots=True)
class Conn:
    """Book-keeping for one proxied connection (the access-log record).
    Slotted: one per live connection, ~0.6 KB instead of ~1.8 KB with a dict
    (issue #13); attributes not declared here are an AttributeError."""

    direction: str
    client: Endpoint
    started: float = field(default_factory=time.monotonic)
    route: str | None = None
    src_pod: str | None = None
    src_identity: str | None = None
    src_addr: Any = None
    dst_addr: Any = None
    dst_pod: str | None = None
    dst_identity: str | None = None
    peer_verified: bool = False  # the peer proxy's certificate was verified (Tunnel, both ends)
    bytes_sent: int = 0  # source → destination
    bytes_received: int = 0  # destination → source
    result: str = "ok"
    reason: str = ""
    upstream: Endpoint | None = None
    relay: Relay | None = None
    tls: TlsConnection | None = None  # inbound: the TLS layer under ``client``
    seq: int = 0  # per-worker connection number (the metrics' handle)
    labels: list = field(default_factory=list)  # metric label sets, one per reporter
    deny_reason: str | None = None  # a metrics.DENY_REASONS value: the mesh refused it
    service: str | None = None  # destination_service: the IP address the client dialed
    mtls: bool = False  # the bytes crossed nodes in the mutual-TLS tunnel
    # Authorization (destination side only): what the policy saw, and its verdict.
    authz: tuple[str | None, str | None, str, int] | None = None  # (identity, src ip, dst pod key, port)
    verdict: str | None = None  # "allowed" | "denied"; None: not checked here
    policy: str | None = None  # the deciding policy (namespace/name)
    rule: int | None = None
    audit: list = field(default_factory=list)  # AUDIT matches: [{"policy", "rule"}]
    # L7 (destination side): requests are authorized one by one.
    l7_authz: RequestAuthorizer | None = None
    upgrade_head: Any = None  # the request that switched protocols (re-checked on reload)
    requests_denied: int = 0
    # Requests refused here and not yet reported (on_http_response): id(head)
    # -> (head, RequestDenial); several at once on an HTTP/2 connection.
    denials: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # Services: the upstream cluster (``ns/name:port``) a VIP connection went to.
    cluster: str | None = None
    log_base: dict | None = None  # record() for this connection's request lines (made once)
    log_key: str = ""  # its sample_key(), for request lines without an x-request-id
    # An upstream leg opened by a service's L7 session (a socketpair, not an
    # accepted socket): resolved once the destination is connected.
    ready: asyncio.Future | None = None
    leg_protocol: str = "http/1.1"  # what such a leg carries: "http/1.1" or "h2"
    # Istio request metrics' label handles, per routed cluster, made on the
    # first request (stats.Accounting.on_http_response).
    http_handles: dict | None = None
    # The TLS connection became a multiplexed tunnel (meshlet-mux/1): its streams
    # are the connections (each with its own record); this one is not logged.
    carrier: bool = False

    def fail(self, result: str, reason: str) -> None:
        self.result = result
        self.reason = reason

    def deny(self, code: str, reason: str) -> None:
        """Refused by the mesh itself (counted by ``code``)."""
        self.fail("rejected", reason)
        self.deny_reason = code

    def byte_counts(self) -> tuple[int, int]:
        """(source → destination, destination → source) so far."""
        r = self.relay
        if r is None:
            return self.bytes_sent, self.bytes_received
        a_to_b, b_to_a = r.forwarded()
        return max(self.bytes_sent, a_to_b), max(self.bytes_received, b_to_a)

    def fallback_labels(self, state: ProxyState) -> list[tuple[str, ...]]:
        """Labels for a connection that failed before both ends were known."""
        src = state.pod_by_key.get(self.src_pod or "")
        dst = state.pod_by_key.get(self.dst_pod or "")
        if dst is None and self.service:
            dst = state.pod_by_ip.get(self.service)  # refused before routing: whom it was for
        reporter = "source" if self.direction == "outbound" else "destination"
        return [
            m.labels_for(
                reporter,
                peer_of(state, src, self.src_identity),
                peer_of(state, dst, self.dst_identity),
                self.service or m.UNKNOWN,
                m.UNKNOWN,
                self.mtls,
            )
        ]

    def sample_key(self) -> str:
        """The original connection's 4-tuple: both node proxies see the same."""
        return f"{norm_addr(self.src_addr)}>{norm_addr(self.dst_addr)}"

    def reset_all(self) -> None:
        if self.relay is not None:
            self.relay.abort(self.reason or "reset")
        self.client.reset()
        if self.tls is not None:
            self.tls.abort()  # before the handshake completed, ``client`` has no transport
        if self.upstream is not None:
            self.upstream.reset()

    def record(self, worker: int) -> dict[str, Any]:
        return {
            "ts": utc_ms(),
            "worker": worker,
            "direction": self.direction,
            "route": self.route,
            "src_pod": self.src_pod,
            "src_identity": self.src_identity,
            "src_addr": fmt_addr(self.src_addr),
            "dst_addr": fmt_addr(self.dst_addr),
            "dst_pod": self.dst_pod,
            "dst_identity": self.dst_identity,
            "peer_verified": self.peer_verified,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "result": self.result,
            "reason": self.reason,
            "deny_reason": self.deny_reason,
            "connection_security_policy": "mutual_tls" if self.mtls else "none",
            **self._workload_fields(),
            **self._authz_fields(),
        }

    def _authz_fields(self) -> dict[str, Any]:
        if self.verdict is None:
            return {}
        out: dict[str, Any] = {"verdict": self.verdict, "policy": self.policy, "rule": self.rule}
        if self.audit:
            out["audit"] = list(self.audit)
        return out

    def _workload_fields(self) -> dict[str, Any]:
        """The workload labels the metrics use (first reporter's)."""
        if not self.labels:
            return {}
        lb = dict(zip(m.LABELS, self.labels[0], strict=True))
        return {
            k: lb[k]
            for k in (
                "source_workload",
                "source_workload_namespace",
                "source_principal",
                "destination_workload",
                "destination_workload_namespace",
                "destination_principal",
                "destination_service",
            )
        }


def set_ready(conn: Conn) -> None:
    """A service leg reached its destination: its session may send."""
    if conn.ready is not None and not conn.ready.done():
        conn.ready.set_result(None)


class Deadline:
    """``async with Deadline(loop, seconds):`` is ``async with
    asyncio.timeout(seconds):`` for the current task of ``loop`` (TimeoutError
    when the time is up, a cancellation from elsewhere passes through), with
    the loop given instead of looked up: CPython 3.11's C
    ``get_running_loop`` checks the process id with a getpid(2) on every
    call, and ``asyncio.timeout`` calls it three times (strace -c of a worker
    under connrate: about 9 getpid(2) per new connection)."""

    __slots__ = ("_loop", "_delay", "_task", "_handle", "_cancelling", "_expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_later(self._delay, self._expire)
        return self

    def _expire(self) -> None:
        self._expired = True
        self._handle = None
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class Live:
    """The live connections of one worker: task → record.

    ``finish`` (the accounting: counters, metrics, access log) is called
    once per connection, however it ended; ``internal_error`` counts a
    handler that crashed.  A handler that ran out of file descriptors did
    not crash: its connection ends with the result ``overload`` (counted
    by ``finish`` like every result) and one warning per ``OVERLOAD_LOG_EVERY``
    seconds says what to do."""

    OVERLOAD_LOG_EVERY = 10.0
    FD_RESERVE = 64  # descriptors kept free for the worker's own files (stats, logs, TLS key memfds)

    def __init__(self, finish: Callable[[Conn], None], internal_error: Callable[[], None]) -> None:
        self.tasks: dict[asyncio.Task[None], Conn] = {}
        self.stopping = False
        self._finish = finish
        self._internal_error = internal_error
        self._overload_logged = 0.0
        self.overloads = 0  # connections reset for want of file descriptors
        self.fd_cap = nofile_limit() - self.FD_RESERVE  # see no_fd_to_spare()
        # the worker's loop, set when its server starts (running_loop() without a getpid(2), see Deadline)
        self.loop: asyncio.AbstractEventLoop | None = None

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop: the one its server started on, else the running one."""
        return self.loop if self.loop is not None else asyncio.get_running_loop()

    def no_fd_to_spare(self, transport: Any) -> bool:
        """True when a just-accepted socket's descriptor is within
        ``FD_RESERVE`` of the open-files limit, so its connection must be shed.
        Descriptors are allocated lowest first: the new one's number is about
        the count in use."""
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock is not None and sock.fileno() >= self.fd_cap

    def shed(self, conn: Conn) -> None:
        """Reset a just-accepted connection there are no descriptors for; counted."""
        self.overloaded(
            conn,
            OSError(errno.EMFILE, os.strerror(errno.EMFILE)),
            f"at accept ({self.FD_RESERVE} of {self.fd_cap + self.FD_RESERVE} kept in reserve)",
        )
        self._finish(conn)

    def overloaded(self, conn: Conn, exc: OSError, where: str) -> None:
        """``conn`` cannot be served: the process (EMFILE) or the system
        (ENFILE) is out of file descriptors.  Reset it, count it, warn."""
        self.overloads += 1
        conn.fail("overload", f"out of file descriptors {where} ({exc.strerror or exc}); connection shed")
        conn.reset_all()
        now = time.monotonic()
        if now - self._overload_logged >= self.OVERLOAD_LOG_EVERY:
            self._overload_logged = now
            log.warning(
                "overload: out of file descriptors %s (%s) with %d live connection(s) and an "
                "open-files limit of %d; shedding connections (reset) until descriptors are free "
                "again: %d shed so far. Raise the hard limit (LimitNOFILE=) or add proxy workers "
                "(proxy.workers)",
                where,
                exc.strerror or exc,
                len(self.tasks),
                nofile_limit(),
                self.overloads,
            )

    def spawn(self, handler: Any, conn: Conn) -> None:
        """Run ``handler(conn)`` as a task of this worker."""
        task = self.running_loop().create_task(self.guard(handler, conn))
        self.tasks[task] = conn
        task.add_done_callback(self.tasks.pop)

    async def guard(self, handler: Any, conn: Conn) -> None:
        try:
            await handler(conn)
        except asyncio.CancelledError:
            conn.fail("reset", conn.reason or "cancelled at shutdown")
            conn.reset_all()
            raise
        except ConnectionError as e:
            # A peer (pod, node proxy or upstream) reset or broke the connection
            # at a point the handler had no reason to expect it: the network's
            # doing, not a bug in the proxy.  The connection ends as a reset.
            conn.fail("reset", conn.reason or f"connection broken by the peer: {e.strerror or e}")
            conn.reset_all()
        except OSError as e:
            if not fd_exhausted(e):
                self._crashed(conn)
            else:
                self.overloaded(conn, e, f"serving a {conn.direction} connection")
        except Exception:  # noqa: BLE001 - _crashed logs the traceback: a crash resets one connection only
            self._crashed(conn)
        finally:
            self._finish(conn)

    def _crashed(self, conn: Conn) -> None:
        self._internal_error()
        log.exception(
            "internal error on %s connection from %s; that connection was reset, the proxy keeps running "
            "(this is a bug: please report it with this traceback)",
            conn.direction,
            fmt_addr(conn.src_addr),
        )
        conn.fail("reset", "internal error")
        conn.reset_all()


async def relayed(conn: Conn, relay: Relay) -> None:
    """Wait for ``relay`` to end; record its byte counts and outcome on ``conn``."""
    result = await relay.done
    conn.bytes_sent = result.a_to_b
    conn.bytes_received = result.b_to_a
    if result.error and conn.result == "ok":
        conn.fail("reset", result.reason)
    elif not conn.reason:
        conn.reason = result.reason
