"""Logging for proxy workers: stderr diagnostics and the JSON access log.

The access log has one JSON line per finished connection and, for HTTP
served by the L7 session, one per request (``"kind": "request"``), written
when the response is complete.  A request line repeats the connection's
fields (route, pods, identities, addresses, workload labels) and replaces
the per-connection numbers with the request's own: ``bytes_sent`` /
``bytes_received`` are the request / response body bytes, ``duration_ms``
is the request's time, ``result`` is ``ok`` or the response flags.  Then:
``method``, ``path`` (normalized, no query), ``authority``, ``status``,
``upstream``, ``cluster``, ``attempts``, ``response_flags``,
``request_id`` (x-request-id) and ``trace_id`` (W3C).

A request the destination proxy refused itself (:class:`RequestDenial`)
says so on its own line, whatever the connection's verdict was:
``verdict`` ``denied``, ``deny_reason`` and ``reason`` say why, ``policy``
/ ``rule`` what decided it.  Refused by authorization policy (403; gRPC
PERMISSION_DENIED): ``deny_reason`` ``policy``, ``response_flags`` ``RBAC``
(Envoy's flag), ``policy`` null and ``reason`` ``no ALLOW policy match``
when ALLOW policies apply and none matched (e.g. no request principal).
Refused by end-user authentication (401, an invalid JWT; gRPC
UNAUTHENTICATED): ``deny_reason`` ``authentication``, ``reason`` the
token's fault, ``policy``/``rule`` null and ``response_flags`` ``-``:
Envoy's jwt_authn sets no response flag either, and ``RBAC`` stays what it
means in Envoy, a refusal by authorization.

Sampling: connections by their original 4-tuple (both node proxies agree),
requests by their x-request-id when they carry one (else the connection's
key plus the request's number), at the same rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from agent.proxy.exchange import Exchange

from agent.fsutil import open_append

__all__ = [
    "setup_logging",
    "AccessLog",
    "LineBase",
    "RequestDenial",
    "sampled",
    "request_record",
    "request_ids",
]


class RequestDenial(NamedTuple):
    """Why the destination proxy refused one request (see the module docstring)."""

    deny_reason: str  # "policy" (authorization, 403) | "authentication" (end-user JWT, 401)
    policy: str | None  # the deciding policy; None: no ALLOW policy matched / authentication
    rule: int | None
    reason: str  # for people: "policy ns/name rule 0", "no ALLOW policy match", "Jwt is expired"


def sampled(key: str, rate: float) -> bool:
    """Whether the connection named ``key`` is logged at sampling ``rate``.

    Deterministic: the same key gives the same answer, so both node proxies
    of a cross-node connection (keyed by its original 4-tuple) agree; over
    many keys the fraction logged is ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < rate * (1 << 64)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return v.decode("latin-1")
    return str(v)


def _header(headers: Any, lname: bytes) -> bytes | None:
    for n, v in headers or ():
        if len(n) == len(lname) and n.lower() == lname:
            return v.strip(b" \t")
    return None


def request_ids(head: Any, exchange: Exchange) -> tuple[str | None, str | None]:
    """(x-request-id, trace id) of a request: what the exchange forwarded
    (generated ids included) if it forwarded the request, else what the
    client sent (x-request-id, the traceparent's trace-id)."""
    rid = tid = None
    trace = exchange.trace
    if trace is not None:
        rid = _text(trace.request_id)
        tid = _text(trace.traceparent.trace_id)
    headers = head.headers
    if rid is None:
        v = _header(headers, b"x-request-id")
        rid = _text(v[:128]) if v else None
    if tid is None:
        v = _header(headers, b"traceparent")
        if v:
            parts = v.split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                tid = _text(parts[1].lower())
    return rid, tid


def _fmt_upstream(addr: Any) -> str | None:
    if not addr:
        return None
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def request_record(
    base: dict[str, Any],
    head: Any,
    status: int,
    elapsed: float,
    exchange: Any,
    ids: tuple[str | None, str | None],
    flags: str | None = None,
    denial: RequestDenial | None = None,
) -> dict[str, Any]:
    """One request's access-log line: the connection's record ``base``
    (Conn.record) with the request's own numbers and fields.  ``flags``
    overrides the exchange's response flags; ``denial``: why the proxy
    refused the request itself (None: it did not)."""
    path = getattr(head, "path", None)
    flags = flags or getattr(exchange, "flags", "-") or "-"
    rec = dict(base)
    rec.update(
        {
            "bytes_sent": getattr(exchange, "request_body_bytes", 0),
            "bytes_received": getattr(exchange, "response_body_bytes", 0),
            "duration_ms": round(elapsed * 1000.0, 3),
            "result": "ok" if flags == "-" else flags,
            "reason": "",
            "kind": "request",
            "method": _text(getattr(head, "method", None)),
            "path": getattr(path, "path", None) if path is not None else None,
            "authority": _text(getattr(head, "host", None)),
            "status": status,
            "upstream": _fmt_upstream(getattr(exchange, "upstream", None)),
            "cluster": getattr(exchange, "cluster", None),
            "attempts": getattr(exchange, "attempts", 0),
            "response_flags": flags,
            "request_id": ids[0],
            "trace_id": ids[1],
        }
    )
    g = getattr(exchange, "grpc_status", None)
    if g is not None:  # a gRPC call (HTTP/2): its grpc-status
        rec["grpc_status"] = g
    if denial is not None:
        rec["verdict"] = "denied"
        rec["deny_reason"] = denial.deny_reason
        rec["policy"] = denial.policy
        rec["rule"] = denial.rule
        rec["reason"] = denial.reason
    return rec


# The fields request_record() sets, in its order ("ts" is the base's own,
# set by the caller for each request).
# In the order of a connection record (Conn.record), which has the first
# five: LineBase's template then takes its values in this order.
_REQUEST_FIELDS = (
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "result",
    "reason",
    "kind",
    "method",
    "path",
    "authority",
    "status",
    "upstream",
    "cluster",
    "attempts",
    "response_flags",
    "request_id",
    "trace_id",
)
_encode = json.JSONEncoder(separators=(",", ":")).encode
_encode_str = json.encoder.encode_basestring_ascii  # what dumps() does with ensure_ascii
_INF = float("inf")
_KIND_REQUEST = '"request"'


def _json_value(v: Any) -> str:
    """``v`` as json.dumps(v) writes it (the common types without the encoder's set-up)."""
    t = type(v)
    if t is str:
        return _encode_str(v)
    if v is None:
        return "null"
    if t is int:
        return int.__repr__(v)
    if t is float and v == v and -_INF < v < _INF:
        return float.__repr__(v)
    return _encode(v)


def _percents(text: str) -> str:
    """``text`` as a literal in a printf-style template."""
    return text.replace("%", "%%")


class LineBase(dict):
    """A connection's record (Conn.record) that its request lines repeat
    (``AccessLog.write_request``).  It keeps the JSON text of its constant
    fields, made with the first request line: a request line then encodes
    only its own fields, where json.dumps of the whole record cost about a
    sixth of the destination proxy's CPU per request.  Only "ts" may
    change after that (the caller sets it per request); the line is the same
    text as ``json.dumps(request_record(...), separators=(",", ":"))``."""

    __slots__ = ("template", "order")

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record)
        self.template: str | None = None
        self.order: tuple[int, ...] | None = None

    def line(self, texts: tuple[str, ...]) -> str:
        """The request line (no newline) from the JSON ``texts`` of this
        record's "ts", then of the request's fields (``_REQUEST_FIELDS``)."""
        t = self.template
        if t is None:
            t, order = self._make_template()
            self.template = t
            self.order = order
        o = self.order
        return t % (texts if o is None else tuple([texts[i] for i in o]))

    def _make_template(self) -> tuple[str, tuple[int, ...] | None]:
        # A printf-style template (``%`` formats 17 strings about twice as
        # fast as str.format) and which of ``line``'s values its ``%s`` take,
        # in order (None: all, as given): 0 "ts", then 1.. the request's
        # fields.  As dict(base).update(...): a request field the record has
        # stays in its place, the others follow.
        slot = {k: i for i, k in enumerate(("ts",) + _REQUEST_FIELDS)}
        parts = []
        order = []
        for k, v in self.items():
            if k in slot:
                order.append(slot[k])
                val = "%s"
            else:
                val = _percents(_json_value(v))
            parts.append(f"{_percents(_encode_str(k))}:{val}")
        for k in _REQUEST_FIELDS:
            if k not in self:
                order.append(slot[k])
                parts.append(f"{_encode_str(k)}:%s")
        t = "{" + ",".join(parts) + "}"
        # None: every value, in the order given (a record that has "ts" and
        # the request's fields it repeats in _REQUEST_FIELDS' order)
        return t, (None if order == list(range(len(slot))) else tuple(order))


def setup_logging(worker_id: int, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s meshlet-proxy[{worker_id}] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLog:
    """One JSON document per line, per finished connection. Path None: off.

    Lines are buffered.  Without a timer (:meth:`flush_after`), connection
    lines are flushed as they are written and request lines with the next
    connection line, when the buffer fills, or by the server's
    :meth:`flush`.  With one (the proxy server's loop), at most one write(2)
    per ``FLUSH_DELAY`` seconds: a connection line is written at once when
    the last write was longer ago than that, else it waits with the lines
    after it for a timer at most ``FLUSH_DELAY`` after that write (request
    lines always wait for it).  So a line is on disk within ``FLUSH_DELAY``,
    an idle worker writes each line as before, and a busy one writes the
    lines of many connections at once (strace -c: one of the four write(2)
    per new connection of a worker was its access-log line).  :meth:`close`
    (a clean stop, the SIGTERM drain) writes out what is buffered.  A failing
    disk logs one error and disables the access log rather than breaking
    connections.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._f = open_append(path, buffering=_BUFFER) if path else None
        self._ino = _inode(self._f)
        self._dirty = False
        self._call_later: Callable[[float, Callable[[], None]], object] | None = None
        self._timer = False  # a flush is scheduled (never cancelled: it finds nothing to do)
        self._written_at = -FLUSH_DELAY  # time.monotonic() of the last write(2) (with a timer)

    def flush_after(self, call_later: Callable[[float, Callable[[], None]], object] | None) -> None:
        """Write buffered lines out at most every ``FLUSH_DELAY`` seconds,
        with ``call_later`` (``loop.call_later``) for the lines that wait;
        None: connection lines are flushed as they are written."""
        self._call_later = call_later
        self._timer = False

    def _flush_due(self) -> None:
        self._timer = False
        if self._f is not None and self._dirty:
            try:
                self._f.flush()
                self._dirty = False
                self._written_at = time.monotonic()
            except (OSError, ValueError) as e:
                self._failed(e)

    def _buffered(self, line_done: bool) -> None:
        """A line went into the buffer: write it out now (``line_done``: a
        connection line, and no write(2) within ``FLUSH_DELAY``) or make
        sure a timer will."""
        self._dirty = True
        call_later = self._call_later
        if call_later is None or self._timer:
            return
        wait = self._written_at + FLUSH_DELAY - time.monotonic()
        if line_done and wait <= 0:
            self._flush_due()
            return
        self._timer = True
        call_later(max(wait, 0.0), self._flush_due)

    def reopen(self, path: str | None) -> None:
        """Switch to ``path`` (None: off).  A path that cannot be opened
        logs an error and leaves the access log off."""
        if path == self.path and (self._f is not None or path is None):
            return
        self.close()
        self.path = path
        try:
            self._f = open_append(path, buffering=_BUFFER) if path else None
            self._ino = _inode(self._f)
        except OSError as e:
            logging.getLogger("meshlet.proxy").error("cannot open access log %s: %s", path, e)

    def rotated(self) -> bool:
        """Whether the file was renamed or removed under us (logrotate
        without copytruncate): then the next lines go to a new file at the
        same path, created ``0640`` like the first.  The server checks it
        with its periodic flush."""
        if self._f is None or self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self._ino

    def reopen_if_rotated(self) -> None:
        """Flush to the old file, then continue in a new one if it was rotated."""
        if not self.rotated():
            return
        path = self.path
        self.close()
        self.path = None
        self.reopen(path)

    def write_request(
        self,
        base: dict[str, Any],
        key: str,
        rate: float,
        head: Any,
        status: int,
        elapsed: float,
        exchange: Any,
        *,
        flags: str | None = None,
        denial: RequestDenial | None = None,
    ) -> bool:
        """One request line, if sampled (see the module docstring); ``key``:
        the fallback sampling key.  Whether it was written."""
        if self._f is None:
            return False
        ids = request_ids(head, exchange)
        if not sampled(ids[0] or key, rate):
            return False
        if type(base) is LineBase and denial is None and getattr(exchange, "grpc_status", None) is None:
            # the common line: request_record's fields, encoded into the base's template
            # (json.dumps' text of each, without a call per value for the usual types)
            flags = flags or getattr(exchange, "flags", "-") or "-"
            es, jv = _encode_str, _json_value
            ts = base.get("ts")
            path = getattr(head, "path", None)
            path = getattr(path, "path", None) if path is not None else None
            method = _text(getattr(head, "method", None))
            host = _text(getattr(head, "host", None))
            up = _fmt_upstream(getattr(exchange, "upstream", None))
            cluster = getattr(exchange, "cluster", None)
            rid, tid = ids
            line = base.line(
                (
                    es(ts) if type(ts) is str else jv(ts),
                    jv(getattr(exchange, "request_body_bytes", 0)),
                    jv(getattr(exchange, "response_body_bytes", 0)),
                    jv(round(elapsed * 1000.0, 3)),
                    '"ok"' if flags == "-" else jv(flags),
                    '""',
                    _KIND_REQUEST,
                    es(method) if type(method) is str else jv(method),
                    es(path) if type(path) is str else jv(path),
                    es(host) if type(host) is str else jv(host),
                    jv(status),
                    es(up) if type(up) is str else jv(up),
                    es(cluster) if type(cluster) is str else jv(cluster),
                    jv(getattr(exchange, "attempts", 0)),
                    es(flags) if type(flags) is str else jv(flags),
                    es(rid) if type(rid) is str else jv(rid),
                    es(tid) if type(tid) is str else jv(tid),
                )
            )
            self._write_line(line)
            return True
        self.write(request_record(base, head, status, elapsed, exchange, ids, flags, denial), flush=False)
        return True

    def _write_line(self, line: str) -> None:
        """A buffered request line (flushed as ``write(..., flush=False)``)."""
        if self._f is None:
            return
        try:
            self._f.write(line + "\n")
            self._buffered(False)
        except (OSError, ValueError) as e:
            self._failed(e)

    def write(self, record: dict[str, Any], *, flush: bool = True) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            if flush and self._call_later is None:
                self._f.flush()
                self._dirty = False
            else:
                self._buffered(flush)
        except (OSError, ValueError) as e:
            self._failed(e)

    def flush(self) -> None:
        """Write out buffered request lines (the server calls it periodically),
        then follow a rotation (``reopen_if_rotated``)."""
        if self._f is None:
            return
        if self._dirty:
            try:
                self._f.flush()
                self._dirty = False
            except (OSError, ValueError) as e:
                self._failed(e)
                return
        self.reopen_if_rotated()

    def _failed(self, e: Exception) -> None:
        logging.getLogger("meshlet.proxy").error(
            "access log %s disabled after write error: %s (check disk space and permissions)", self.path, e
        )
        self.close()

    def close(self) -> None:
        f, self._f = self._f, None
        self._ino = None
        self._dirty = False
        if f is not None:  # closing writes out the buffered lines
            try:
                f.close()
            except OSError:
                pass


_BUFFER = 64 * 1024
FLUSH_DELAY = 0.01  # seconds a line may wait in the buffer when a timer flushes (AccessLog.flush_after)


def _inode(f: Any) -> tuple[int, int] | None:
    if f is None:
        return None
    st = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino)
