"""HTTP/1.1 message parsing and serialization, sans-IO, on httptools (llhttp).

Bytes in, events out; no sockets here. The asyncio shell (``l7``) feeds what
it reads and acts on the events. Rules (everything that decides what a
message *is* lives here or in ``agent.policy.http``):

- Events: :class:`RequestHead` / :class:`ResponseHead`, then :class:`Body`
  chunks (chunked coding already removed), then :class:`EndOfMessage`; a
  :class:`ParseError` carries the status to answer with and ends parsing for
  good. Several pipelined requests in one ``feed`` give several event runs.
- Requests are checked once, at the end of the head, by
  :func:`agent.policy.http.scan_request_headers` (the checks of
  :func:`~agent.policy.http.check_framing` in the same single pass that
  picks up Host, Expect and Upgrade: both CL and TE, differing CL,
  unknown TE, missing/duplicate Host on 1.1 → 400; too many or too large
  headers → 431) and :func:`~agent.policy.http.normalize_path` (400/414). The
  normalized target is what the proxy forwards. llhttp is strict too: what it
  refuses first is a 400.
- Limits while the head is still arriving: a target longer than
  ``max_target`` → 414 at once; more than ``max_headers`` lines or
  ``max_header_bytes`` bytes → 431 at once; a head that keeps growing without
  completing is refused after ``max_head`` bytes (431; 414 if still in the
  request line). So a parser holds at most ``max_head`` + one read.
- Framing of a request: ``content-length`` | ``chunked`` | ``none``; of a
  response also ``until-close``. 1xx, 204, 304 and responses to HEAD have no
  body (:meth:`ResponseParser.expect` says which request is answered).
- Upgrade: a request with ``Connection: upgrade`` + ``Upgrade`` ends the HTTP
  stream; bytes after it are kept raw (:meth:`RequestParser.take_raw`) until
  the upstream answers. On 101 the shell switches to a byte relay; on any
  other answer :meth:`RequestParser.upgrade_declined` resumes parsing the
  kept bytes as HTTP. A response parser stops at a 101 the same way.
- ``Expect: 100-continue`` sets ``RequestHead.expect_continue``; interim 1xx
  responses are a :class:`ResponseHead` with no body and no EndOfMessage.
- Trailers of chunked messages are dropped; chunk extensions too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import httptools

from agent.policy.http import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_TARGET_LENGTH,
    EscapedSlash,
    HttpError,
    NormalizedPath,
    normalize_path,
    scan_request_headers,
)

__all__ = [
    "RequestHead",
    "ResponseHead",
    "Body",
    "EndOfMessage",
    "ParseError",
    "Event",
    "RequestParser",
    "ResponseParser",
    "Framing",
    "serialize_response_head",
    "chunk",
    "CHUNKED_END",
    "HOP_BY_HOP",
    "forward_headers",
    "header_value",
    "connection_tokens",
]

Framing = Literal["content-length", "chunked", "none", "until-close"]
Headers = list[tuple[bytes, bytes]]

MAX_HEAD = MAX_TARGET_LENGTH + MAX_HEADER_BYTES + 4 * MAX_HEADERS + 256
"""Bytes a request head may take on the wire before it is refused."""


# The events below are made for every request and response: plain slotted
# dataclasses, not frozen ones, whose __init__ sets each field through
# object.__setattr__ (11 fields: ~860 ns against ~170).  Treat them as
# immutable all the same: a hook that changes a head returns a new one
# (dataclasses.replace), as L7Session.on_request documents.


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    """The request-target as received."""
    path: NormalizedPath
    """The normalized target (what policy matches and the proxy forwards)."""
    version: bytes  # b"1.1" or b"1.0"
    headers: Headers
    """Header lines as received, (name, value) raw bytes, in order."""
    host: bytes | None
    keep_alive: bool
    framing: Framing
    content_length: int | None
    expect_continue: bool
    upgrade: bytes | None
    """The Upgrade header value when the request asks to switch protocols."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    framing: Framing
    content_length: int | None

    @property
    def interim(self) -> bool:
        """1xx other than 101: more responses follow for the same request."""
        return self.status < 200 and self.status != 101


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class ParseError:
    status: int
    """The response to send (requests: 400/414/431/505; responses: 502)."""
    reason: str


Event = RequestHead | ResponseHead | Body | EndOfMessage | ParseError
_EOM = EndOfMessage()

# parser states
_IDLE, _HEAD, _BODY, _UPGRADE, _ERROR = range(5)


def header_value(headers: Sequence[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    """The first value of a header (name given in lower case), stripped."""
    for n, v in headers:
        if len(n) == len(lname) and n.lower() == lname:
            return v.strip(b" \t")
    return None


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-cased tokens of every Connection header line."""
    out: set[bytes] = set()
    for n, v in headers:
        if len(n) == 10 and n.lower() == b"connection":
            out.update(t.strip(b" \t").lower() for t in v.split(b","))
    out.discard(b"")
    return out


class _Parser:
    """State and limits shared by both directions; subclasses own llhttp."""

    _error_status = 400

    def __init__(
        self,
        *,
        max_headers: int = MAX_HEADERS,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_target: int = MAX_TARGET_LENGTH,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_target = max_target
        self.max_head = max_head
        self._events: list[Event] = []
        self._state = _IDLE
        self._raw = bytearray()
        self._fail: HttpError | None = None
        self._reset_message()
        self._p = self._new_llhttp()

    def _new_llhttp(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset_message(self) -> None:
        self._headers: Headers = []
        self._hbytes = 0
        self._head_wire = 0  # bytes fed while this head was incomplete
        self._began_in_feed = False

    @property
    def in_message(self) -> bool:
        """Bytes of a message have arrived and it is not complete yet."""
        return self._state in (_HEAD, _BODY)

    @property
    def in_head(self) -> bool:
        return self._state == _HEAD

    @property
    def failed(self) -> bool:
        return self._state == _ERROR

    # ---- llhttp callbacks

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._reset_message()
        self._began_in_feed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state != _HEAD:
            return  # trailer: dropped
        self._headers.append((name, value))
        self._hbytes += len(name) + len(value)
        if len(self._headers) > self.max_headers:
            self._raise(431, f"more than {self.max_headers} header lines")
        if self._hbytes > self.max_header_bytes:
            self._raise(431, f"more than {self.max_header_bytes} bytes of headers")

    def on_body(self, data: bytes) -> None:
        self._events.append(Body(data))

    def _raise(self, status: int, reason: str) -> None:
        self._fail = HttpError(status, reason)
        raise self._fail

    # ---- feeding

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; returns the events it completed (possibly none)."""
        if self._state == _UPGRADE:
            self._raw += data
            return []
        if self._state == _ERROR or not data:
            return []
        events = self._events = []
        self._began_in_feed = False
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._raw += data[e.args[0] :]
            self._state = _UPGRADE
        except httptools.HttpParserError as e:
            self._error(e)
            return events
        if self._state == _HEAD:
            # Only bytes surely belonging to this head are counted (a feed that
            # also finished an earlier message counts from the next feed on).
            if not self._began_in_feed or not any(type(ev) is EndOfMessage for ev in events):
                self._head_wire += len(data)
            if self._head_wire > self.max_head:
                self._head_too_long()
                return events
        return events

    def _head_too_long(self) -> None:
        self._state = _ERROR
        self._events.append(
            ParseError(
                431 if self._error_status == 400 else 502, f"message head longer than {self.max_head} bytes"
            )
        )

    def _error(self, e: Exception) -> None:
        fail = self._fail
        if fail is None:
            ctx = e.__context__
            if isinstance(ctx, HttpError):
                fail = ctx
        self._state = _ERROR
        if fail is not None:
            status = fail.status if self._error_status == 400 else 502
            self._events.append(ParseError(status, fail.reason))
        else:
            msg = str(e) or type(e).__name__
            self._events.append(ParseError(self._error_status, f"malformed HTTP message: {msg}"))

    def take_raw(self) -> bytes:
        """After an upgrade: the bytes that followed the head (raw protocol)."""
        data = bytes(self._raw)
        self._raw.clear()
        return data


class RequestParser(_Parser):
    """Parses a client's request stream (module docstring for the rules)."""

    def __init__(
        self, *, merge_slashes: bool = True, escaped_slash: EscapedSlash = "reject", **limits
    ) -> None:
        self.merge_slashes = merge_slashes
        self.escaped_slash = escaped_slash
        super().__init__(**limits)

    def _new_llhttp(self):
        return httptools.HttpRequestParser(self)

    def _reset_message(self) -> None:
        super()._reset_message()
        self._url = b""

    def on_message_begin(self) -> None:
        # _Parser.on_message_begin with _reset_message inlined (once per request)
        self._state = _HEAD
        self._headers = []
        self._hbytes = 0
        self._head_wire = 0
        self._url = b""
        self._began_in_feed = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.max_target:
            self._raise(414, f"request target longer than {self.max_target} bytes")

    def on_headers_complete(self) -> None:
        p = self._p
        headers = self._headers
        version_s = p.get_http_version()
        try:
            # one pass over the headers: framing checks + Host, Expect, Upgrade
            host, content_length, chunked, expect, upgrade_v = scan_request_headers(
                headers,
                version_s,
                max_headers=self.max_headers,
                max_header_bytes=self.max_header_bytes,
                header_bytes=self._hbytes,
            )
            path = normalize_path(
                self._url,
                merge_slashes=self.merge_slashes,
                escaped_slash=self.escaped_slash,
                max_length=self.max_target,
            )
        except HttpError as e:
            self._fail = e
            raise
        version = b"1.1" if version_s == "1.1" else version_s.encode()
        upgrade = None
        if p.should_upgrade():
            upgrade = upgrade_v
            if chunked or content_length:
                self._raise(400, "a request body together with Upgrade is not supported")
            if upgrade is None:  # CONNECT is refused by normalize_path already
                self._raise(400, "upgrade without an Upgrade header")
        expect_continue = False
        if expect is not None:
            if expect.lower() != b"100-continue":
                self._raise(417, f"unsupported Expect {expect[:64]!r}")
            expect_continue = version == b"1.1"
        if chunked:
            framing: Framing = "chunked"
        elif content_length:
            framing = "content-length"
        else:
            framing = "none"
        self._state = _BODY
        self._events.append(
            RequestHead(
                p.get_method(),
                self._url,
                path,
                version,
                headers,
                host,
                p.should_keep_alive(),
                framing,
                content_length,
                expect_continue,
                upgrade,
            )
        )

    def on_message_complete(self) -> None:
        self._events.append(_EOM)
        self._state = _IDLE

    def upgrade_declined(self) -> list[Event]:
        """The upstream refused the upgrade: parse the kept bytes as HTTP again."""
        if self._state != _UPGRADE:
            return []
        self._state = _IDLE
        self._p = self._new_llhttp()
        return self.feed(self.take_raw())

    def feed_eof(self) -> list[Event]:
        """The client half-closed: an unfinished request is an error."""
        if self._state in (_HEAD, _BODY):
            self._state = _ERROR
            return [ParseError(400, "connection closed in the middle of a request")]
        return []


class ResponseParser(_Parser):
    """Parses an upstream's responses; call :meth:`expect` before each request."""

    _error_status = 502

    def __init__(self, **limits) -> None:
        self._head_request = False
        super().__init__(**limits)

    def _new_llhttp(self):
        return httptools.HttpResponseParser(self)

    def _reset_message(self) -> None:
        super()._reset_message()
        self._reason = b""

    def expect(self, method: bytes) -> None:
        """The next response answers a request with this method."""
        self._head_request = method == b"HEAD"

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_headers_complete(self) -> None:
        p = self._p
        status = p.get_status_code()
        headers = self._headers
        cl = None
        if status < 200 or status in (204, 304) or self._head_request:
            framing: Framing = "none"
            if self._head_request and status >= 200:
                cl_v = header_value(headers, b"content-length")
                cl = int(cl_v) if cl_v is not None and cl_v.isdigit() else None
        else:
            te = cl_v = None
            for n, v in headers:  # one pass: the first of each
                ln = len(n)
                if ln == 17 and te is None and n.lower() == b"transfer-encoding":
                    te = v.strip(b" \t")
                elif ln == 14 and cl_v is None and n.lower() == b"content-length":
                    cl_v = v.strip(b" \t")
            if te is not None:
                framing = "chunked" if te.lower().rsplit(b",", 1)[-1].strip() == b"chunked" else "until-close"
            elif cl_v is not None:
                if not cl_v.isdigit():
                    self._raise(502, "malformed Content-Length from the upstream")
                cl = int(cl_v)
                framing = "content-length"
            else:
                framing = "until-close"
        self._framing = framing
        self._state = _BODY
        self._events.append(
            ResponseHead(
                status,
                self._reason,
                p.get_http_version().encode(),
                headers,
                p.should_keep_alive(),
                framing,
                cl,
            )
        )

    def on_message_complete(self) -> None:
        st = self._p.get_status_code()
        self._state = _IDLE
        if st < 200 and st != 101:
            return  # interim: the final response follows
        self._head_request = False
        self._events.append(_EOM)

    def feed(self, data: bytes) -> list[Event]:
        if self._head_request and self._state in (_IDLE, _HEAD):
            return self._feed_head_response(data)
        return super().feed(data)

    def _feed_head_response(self, data: bytes) -> list[Event]:
        # llhttp would wait for the body a HEAD response announces: feed it only
        # the head, then start a fresh parser for what follows.
        self._raw += data
        out: list[Event] = []
        while self._head_request and self._state not in (_ERROR, _UPGRADE):
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                if len(self._raw) > self.max_head:
                    self._state = _ERROR
                    out.append(ParseError(502, f"response head longer than {self.max_head} bytes"))
                return out
            head = bytes(self._raw[: end + 4])
            del self._raw[: end + 4]
            out += super().feed(head)
            if self._state == _BODY:  # a final response to HEAD: no body
                self._p = self._new_llhttp()
                self._state = _IDLE
                self._head_request = False
                out.append(_EOM)
        if self._state == _UPGRADE:
            return out
        rest = self.take_raw()
        if rest and self._state != _ERROR:
            out += super().feed(rest)
        return out

    def feed_eof(self) -> list[Event]:
        """The upstream closed: ends an until-close body, else an error if mid-message."""
        if self._state == _BODY and self._framing == "until-close":
            self._state = _IDLE
            return [_EOM]
        if self._state in (_HEAD, _BODY):
            self._state = _ERROR
            return [ParseError(502, "upstream closed the connection in the middle of a response")]
        return []


# --------------------------------------------------------------------------
# Serialization

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
"""Removed when forwarding (RFC 9110 section 7.6.1). Content-Length too: the
proxy always writes its own framing header."""


# per ``drop`` set: the names to skip, and their lengths (a header whose
# name has none of them is kept without lower-casing it)
_SKIP_CACHE: dict[frozenset[bytes], tuple[frozenset[bytes], frozenset[int]]] = {}


def forward_headers(
    headers: Sequence[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()
) -> Headers:
    """Headers minus hop-by-hop ones, those named in Connection and ``drop``."""
    sk = _SKIP_CACHE.get(drop)
    if sk is None:
        skip = HOP_BY_HOP | drop
        sk = (skip, frozenset(map(len, skip)))
        if len(_SKIP_CACHE) < 64:
            _SKIP_CACHE[drop] = sk
    skip, lengths = sk
    out: Headers = []
    named: set[bytes] | None = None
    for h in headers:
        n = h[0]
        if len(n) in lengths:
            ln = n.lower()
            if ln in skip:
                if ln == b"connection":
                    if named is None:
                        named = set()
                    named.update(t.strip(b" \t").lower() for t in h[1].split(b","))
                continue
        out.append(h)
    if named:
        named -= skip  # already gone (e.g. the usual "keep-alive")
        named.discard(b"")
        if named:
            out = [h for h in out if h[0].lower() not in named]
    return out


def forwarded_head(
    first: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    extra: Sequence[tuple[bytes, bytes]] = (),
    *,
    drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """The head as forwarded: ``first`` (the request or status line, with
    its CRLF), ``headers`` as :func:`forward_headers` keeps them, then
    ``extra`` (the proxy's own: framing, trace context), then the blank
    line.  The L7 session serializes every request and response head with
    it.  (One pass that also serializes saves only ~0.1 µs a head.)"""
    kept = forward_headers(headers, drop=drop)  # a new list: ours to extend
    kept += extra
    return _head(first, kept)


def _head(first: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    parts = [first]
    for n, v in headers:
        parts += (n, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def serialize_response_head(
    status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]], version: bytes = b"1.1"
) -> bytes:
    return _head(b"HTTP/%s %d %s\r\n" % (version, status, reason), headers)


CHUNKED_END = b"0\r\n\r\n"


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of the chunked coding, as pieces for ``writelines``."""
    return (b"%x\r\n" % len(data), data, b"\r\n")
