"""HTTP/1.1 request-target normalization and framing checks, sans-IO.

Rules (everything that decides what a path or a request *is* lives here):

- A request is normalized **once**; the normalized target is both what policy
  matches and what the proxy forwards.  Matching one form and forwarding
  another is how path-confusion bypasses happen.
- Errors are :class:`HttpError` with an h11-style status hint: 400 for a
  malformed or ambiguous request, 414 for a too-long target, 431 for too many
  or too large headers, 505 for an HTTP version we do not speak.  Nothing else
  is ever raised for bad input.

Path normalization, in this order (RFC 3986 section 6.2.2 plus the mesh's
safety rules; ``normalize_path``):

1. Only origin-form targets (``/path?query``).  Absolute-form, authority-form
   (CONNECT) and ``*`` are refused with 400 (not supported yet).
2. Every byte must be visible ASCII: NUL, control characters, space, DEL and
   raw non-ASCII bytes are refused with 400.  A ``#`` (a fragment never belongs
   in a request) is refused with 400.
3. The query (after the first ``?``) is never part of the path match.  It is
   forwarded with the same character checks, otherwise untouched.
4. Percent-escapes: a malformed escape (``%4``, ``%zz``) is 400.  Escapes of
   unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded; every other
   escape is kept with its hex in upper case.  Escaped NUL/control characters
   and escapes that do not decode as valid UTF-8 (overlong ``%c0%ae``) are 400:
   some backends decode them into ``/`` or ``.``.
5. ``%2F`` and ``%5C`` (escaped ``/`` and ``\\``) and a raw ``\\`` follow
   ``escaped_slash``: ``"reject"`` (default) refuses them with 400; ``"keep"``
   keeps ``%2F``/``%5C`` as data (a raw ``\\`` is forwarded as ``%5C``);
   ``"decode_and_merge"`` turns all three into ``/`` before the steps below.
6. Other characters RFC 3986 does not allow in a path (``" < > ^ ` { | }``)
   are percent-encoded.
7. ``merge_slashes`` (default on) collapses ``//`` into ``/``.
8. Path parameters (``;`` in a segment, ``/admin;x=y``) follow
   ``path_parameters`` (``proxy.pathParameters``), because servlet-style
   backends (Tomcat, Jetty, Spring) strip them before routing, so
   ``/admin;x=y`` *is* ``/admin`` to them while a plain string match says
   it is not: a ``DENY /admin`` would not stop it.  ``"reject"`` (default,
   as Spring Security's StrictHttpFirewall does) refuses a ``;`` and an
   escaped ``%3B`` anywhere in the path with 400.  ``"strip"`` removes each
   segment's parameters (``;`` up to the next ``/``) before the steps
   below, so policy matches and the backend receives ``/admin``; an escaped
   ``%3B`` is data, as servlet containers treat it.  ``"keep"`` forwards
   them as they are (a prefix rule ``/admin*`` matches ``/admin;x``, an
   exact rule ``/admin`` does not): only for backends that never strip
   them.  (Istio and Envoy keep them and document no option for them; the
   query never counts.)
9. Dot segments are removed (RFC 3986 section 5.2.4); ``..`` never climbs
   above ``/``.  A segment whose part before ``;`` is ``.`` or ``..``
   (``/..;/admin``, reachable only with ``keep``) is 400: servlet
   containers treat it as a dot segment.

Paths are **case-sensitive**, as in Istio: ``/Admin`` is not ``/admin``.

Hosts (``normalize_host``): lower-cased, a trailing dot dropped, the scheme's
default port (and an empty port) removed, IPv6 literals in canonical form;
anything that is not a reg-name or IP literal with an optional port is 400.

Framing (``check_framing``) refuses with 400: both Content-Length and
Transfer-Encoding, differing or malformed Content-Length, any
Transfer-Encoding other than exactly ``chunked``, Transfer-Encoding in
HTTP/1.0, a missing (HTTP/1.1) or repeated Host, invalid header names or
values.  Too many headers, or too many header bytes, is 431.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HttpError",
    "NormalizedPath",
    "FramingResult",
    "EscapedSlash",
    "ESCAPED_SLASH_ACTIONS",
    "PathParameters",
    "PATH_PARAMETER_ACTIONS",
    "set_default_path_parameters",
    "normalize_path",
    "normalize_host",
    "check_framing",
    "header_multimap",
    "scan_request_headers",
    "path_pattern_problem",
    "MAX_TARGET_LENGTH",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
]

EscapedSlash = Literal["reject", "keep", "decode_and_merge"]
ESCAPED_SLASH_ACTIONS: tuple[str, ...] = ("reject", "keep", "decode_and_merge")
PathParameters = Literal["reject", "strip", "keep"]
PATH_PARAMETER_ACTIONS: tuple[str, ...] = ("reject", "strip", "keep")

# What ``normalize_path`` does with path parameters when its caller does not
# say: the node's ``proxy.pathParameters``, set once per worker from the proxy
# state (``set_default_path_parameters``), so parsers that are built without
# options follow the node's setting.
_default_path_parameters: PathParameters = "reject"


def set_default_path_parameters(action: str) -> None:
    """The process-wide ``path_parameters`` default (``proxy.pathParameters``)."""
    global _default_path_parameters
    if action not in PATH_PARAMETER_ACTIONS:
        raise ValueError(f"path_parameters must be one of {PATH_PARAMETER_ACTIONS}, not {action!r}")
    _default_path_parameters = action  # type: ignore[assignment]  # checked just above


MAX_TARGET_LENGTH = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
"""Sum of name + value lengths over all header lines."""


class HttpError(Exception):
    """The request must be refused; ``status`` is the response to send."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(slots=True)  # made per request: not frozen (see proxy.http1.RequestHead), never changed
class NormalizedPath:
    """A normalized origin-form request target."""

    path: str
    """What policy matches: normalized, never contains '?', '#' or dot segments."""
    query: str | None
    """The query without its '?', or None when there was no '?'."""

    @property
    def target(self) -> str:
        """What the proxy forwards as the request-target."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar minus unreserved and pct-encoded: sub-delims, ':' and '@' (RFC 3986 section 3.3)
_PATH_OK = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_QUERY_OK = _PATH_OK | frozenset("?")
_HEX = frozenset("0123456789abcdefABCDEF")


def _check_chars(s: str, what: str) -> None:
    for ch in s:
        o = ord(ch)
        if o == 0:
            raise HttpError(400, f"NUL character in the {what}")
        if o < 0x20 or o == 0x7F:
            raise HttpError(400, f"control character {o:#04x} in the {what}")
        if o == 0x20:
            raise HttpError(400, f"space in the {what}")
        if o > 0x7E:
            raise HttpError(400, f"non-ASCII character in the {what} (percent-encode it)")


def _escapes(s: str, what: str) -> list[tuple[int, int]]:
    """Positions and byte values of every %XX in ``s`` (400 if malformed)."""
    out = []
    i = s.find("%")
    while i >= 0:
        h = s[i + 1 : i + 3]
        if len(h) != 2 or not all(c in _HEX for c in h):
            raise HttpError(400, f"malformed percent-escape {s[i : i + 3]!r} in the {what}")
        out.append((i, int(h, 16)))
        i = s.find("%", i + 3)
    return out


def _check_escaped_utf8(s: str, escapes: list[tuple[int, int]]) -> None:
    """Runs of consecutive escapes must decode to valid UTF-8 (rejects overlong forms)."""
    run: list[int] = []
    prev_end = -1

    def flush() -> None:
        if run:
            try:
                bytes(run).decode("utf-8", "strict")
            except UnicodeDecodeError:
                raise HttpError(
                    400, "percent-escapes in the path are not valid UTF-8 (overlong or truncated sequence)"
                ) from None
            run.clear()

    for pos, b in escapes:
        if pos != prev_end:
            flush()
        run.append(b)
        prev_end = pos + 3
    flush()


# Targets that normalization returns unchanged (the fast path of normalize_path):
# a path of pchars without '%' or '\\', then an optional query of query
# characters and well-formed escapes. Such a path has no escapes to decode or
# re-case, nothing to percent-encode, no control/space/non-ASCII byte and no
# '#', and no ';' (path parameters depend on an option). The two substring
# tests done next ('//' and '/.') exclude merged slashes and every segment that
# is or starts with '.'; what is left is returned as is by every step of the
# slow path, for every option value. Anything else takes the slow path.
_ALREADY_NORMAL = re.compile(
    r"(/[A-Za-z0-9\-._~!$&'()*+,=:@/]*)"
    r"(?:\?((?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*))?"
)
_ALREADY_NORMAL_B = re.compile(_ALREADY_NORMAL.pattern.encode("ascii"))
# Fast-path results by raw target (bytes). They depend on no option, only on
# max_length (checked on every lookup); NormalizedPath is immutable. Bounded:
# short targets only, emptied when full.
_FAST_CACHE: dict[bytes, NormalizedPath] = {}
_FAST_CACHE_MAX = 4096
_FAST_CACHE_KEY_MAX = 256


def normalize_path(
    raw: str | bytes,
    *,
    merge_slashes: bool = True,
    escaped_slash: EscapedSlash = "reject",
    max_length: int = MAX_TARGET_LENGTH,
    path_parameters: PathParameters | None = None,
) -> NormalizedPath:
    """Normalize an origin-form request target (rules in the module docstring).

    ``path_parameters`` None: the process default (``set_default_path_parameters``).

    Raises :class:`HttpError` (400, or 414 when longer than ``max_length``)
    and nothing else for any input.

    Targets that are already normal (the common case) are recognized by one
    regex and returned as they are; the result is the same as
    :func:`_normalize_path_slow`'s (a property test checks this)."""
    if escaped_slash not in ESCAPED_SLASH_ACTIONS:
        raise ValueError(f"escaped_slash must be one of {ESCAPED_SLASH_ACTIONS}")
    if type(raw) is bytes:  # `type() is`, not isinstance: a hot path, and mypy narrows it
        hit = _FAST_CACHE.get(raw)
        if hit is not None and len(raw) <= max_length:
            return hit
        mb = _ALREADY_NORMAL_B.fullmatch(raw)
        if mb is not None and len(raw) <= max_length:
            path_b = mb.group(1)
            if b"//" not in path_b and b"/." not in path_b:
                q_b = mb.group(2)
                n = NormalizedPath(path_b.decode("ascii"), None if q_b is None else q_b.decode("ascii"))
                if len(raw) <= _FAST_CACHE_KEY_MAX:
                    if len(_FAST_CACHE) >= _FAST_CACHE_MAX:
                        _FAST_CACHE.clear()
                    _FAST_CACHE[raw] = n
                return n
    elif type(raw) is str:
        m = _ALREADY_NORMAL.fullmatch(raw)
        if m is not None and len(raw) <= max_length:
            path = m.group(1)
            if "//" not in path and "/." not in path:
                return NormalizedPath(path, m.group(2))
    return _normalize_path_slow(
        raw,
        merge_slashes=merge_slashes,
        escaped_slash=escaped_slash,
        max_length=max_length,
        path_parameters=path_parameters,
    )


def _normalize_path_slow(
    raw: str | bytes,
    *,
    merge_slashes: bool = True,
    escaped_slash: EscapedSlash = "reject",
    max_length: int = MAX_TARGET_LENGTH,
    path_parameters: PathParameters | None = None,
) -> NormalizedPath:
    """The reference normalizer: every step of the module docstring, one by one."""
    if escaped_slash not in ESCAPED_SLASH_ACTIONS:
        raise ValueError(f"escaped_slash must be one of {ESCAPED_SLASH_ACTIONS}")
    params = _default_path_parameters if path_parameters is None else path_parameters
    if params not in PATH_PARAMETER_ACTIONS:
        raise ValueError(f"path_parameters must be one of {PATH_PARAMETER_ACTIONS}")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "non-ASCII byte in the request target (percent-encode it)") from None
    if not isinstance(raw, str):
        raise TypeError("request target must be str or bytes")
    if len(raw) > max_length:
        raise HttpError(414, f"request target is {len(raw)} bytes; at most {max_length} are allowed")
    if raw == "":
        raise HttpError(400, "empty request target")
    _check_chars(raw, "request target")
    if "#" in raw:
        raise HttpError(400, "a fragment ('#') is not allowed in a request target")
    if raw == "*":
        raise HttpError(400, "asterisk-form request target ('*') is not supported")
    if not raw.startswith("/"):
        if "://" in raw.split("?", 1)[0]:
            raise HttpError(400, "absolute-form request target is not supported; send origin-form (/path)")
        raise HttpError(400, "request target must start with '/'")

    path, sep, query = raw.partition("?")
    q = _normalize_query(query) if sep else None
    return NormalizedPath(_normalize_path_part(path, merge_slashes, escaped_slash, params), q)


def _normalize_query(query: str) -> str:
    _escapes(query, "query")
    return "".join(c if c in _QUERY_OK or c == "%" else f"%{ord(c):02X}" for c in query)


def _normalize_path_part(path: str, merge_slashes: bool, escaped_slash: str, params: str = "keep") -> str:
    escapes = _escapes(path, "path")
    _check_escaped_utf8(path, escapes)
    if params == "reject":
        if ";" in path:
            raise HttpError(
                400,
                "path parameters (';') are refused: servlet-style backends strip them, so policy could "
                "not see the path they route (proxy.pathParameters: reject; 'strip' removes them instead)",
            )
        if any(b == 0x3B for _, b in escapes):
            raise HttpError(400, "escaped ';' (%3B) in the path is refused (proxy.pathParameters: reject)")
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == "%":
            b = int(path[i + 1 : i + 3], 16)
            i += 3
            ch = chr(b)
            if b < 0x20 or b == 0x7F:
                raise HttpError(400, f"escaped control character %{b:02X} in the path")
            if ch in ("/", "\\"):
                if escaped_slash == "reject":
                    raise HttpError(
                        400, f"escaped {'slash' if ch == '/' else 'backslash'} %{b:02X} in the path"
                    )
                out.append("/" if escaped_slash == "decode_and_merge" else f"%{b:02X}")
            elif ch in _UNRESERVED:
                out.append(ch)
            else:
                out.append(f"%{b:02X}")
            continue
        i += 1
        if c == "\\":
            if escaped_slash == "reject":
                raise HttpError(400, "backslash in the path")
            out.append("/" if escaped_slash == "decode_and_merge" else "%5C")
        elif c in _PATH_OK:
            out.append(c)
        else:
            out.append(f"%{ord(c):02X}")
    decoded = "".join(out)
    if params == "strip":
        decoded = _PARAMS.sub("", decoded)  # raw ';' only: an escaped %3B is data
    if merge_slashes:
        decoded = re.sub(r"/{2,}", "/", decoded)
    return _remove_dot_segments(decoded)


_PARAMS = re.compile(r";[^/]*")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path, by segments."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for idx, seg in enumerate(segments):
        last = idx == len(segments) - 1
        base = seg.split(";", 1)[0]
        if ";" in seg and base in (".", ".."):
            raise HttpError(400, f"dot segment with parameters {seg!r} in the path")
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def path_pattern_problem(literal: str, kind: str) -> str | None:
    """Why a policy path literal can never equal a normalized path, or None.

    ``kind`` is "exact" or "prefix" (suffix literals are only checked for
    characters).  Checked against the default normalization with escaped
    slashes kept, so ``%2F`` in a pattern stays legal."""
    if "?" in literal:
        return "a path pattern never contains '?': the query is not part of the path match"
    if "#" in literal:
        return "a path pattern never contains '#': fragments are refused"
    try:
        _check_chars(literal, "path")
        esc = _escapes(literal, "path")
    except HttpError as e:
        return e.reason
    for pos, b in esc:
        written = literal[pos : pos + 3]
        if chr(b) in _UNRESERVED:
            return f"{written} is decoded before matching; write {chr(b)!r} instead"
        if written != written.upper():
            return f"percent-escapes are upper case after normalization; write {written.upper()}"
    if "\\" in literal:
        return "a normalized path never contains a raw backslash"
    if kind == "suffix":
        return None
    if not literal.startswith("/"):
        return "a path pattern must start with '/' (or '*' for a suffix match)"
    if "//" in literal:
        return "'//' never survives normalization (slashes are merged)"
    segments = literal.split("/")[1:]
    complete = segments if kind == "exact" else segments[:-1]
    for seg in complete:
        if seg in (".", "..") or seg.split(";", 1)[0] in (".", ".."):
            return f"dot segment {seg!r} never survives normalization"
    return None


# --------------------------------------------------------------------------
# Hosts

_REG_NAME = re.compile(r"[a-z0-9\-._~!$&'()*+,;=]+")


def normalize_host(host: str | bytes, scheme_default_port: int = 80) -> str:
    """Canonical form of a Host header value for matching (see module docstring)."""
    if isinstance(host, (bytes, bytearray)):
        try:
            host = bytes(host).decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "non-ASCII byte in Host") from None
    if not isinstance(host, str):
        raise TypeError("host must be str or bytes")
    if host == "":
        raise HttpError(400, "empty Host")
    _check_chars(host, "Host")
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise HttpError(400, "unterminated IPv6 literal in Host")
        literal, rest = host[1:end], host[end + 1 :]
        try:
            addr = ipaddress.IPv6Address(literal)
        except ValueError:
            raise HttpError(400, f"invalid IPv6 literal in Host: {literal[:64]!r}") from None
        if addr.scope_id:
            raise HttpError(400, "zone identifiers are not allowed in Host")
        name = f"[{addr.compressed}]"
    else:
        name, colon, port = host.rpartition(":")
        if not colon:
            name, rest = host, ""
        else:
            rest = ":" + port
        name = name.lower()
        # Empty labels are refused before the one trailing dot (the root) is
        # dropped: "a.." or ".." would otherwise turn into "a." or ".", which
        # normalize to something else again.
        if ".." in name or name.startswith("."):
            raise HttpError(400, f"invalid host name in Host: {host[:64]!r}")
        if name.endswith("."):
            name = name[:-1]
        if not name or not _REG_NAME.fullmatch(name):
            raise HttpError(400, f"invalid host name in Host: {host[:64]!r}")
    if rest:
        if not rest.startswith(":"):
            raise HttpError(400, f"junk after the host in Host: {host[:64]!r}")
        port = rest[1:]
        if port == "":
            return name
        if not port.isdigit() or len(port) > 5 or not 0 < int(port) <= 65535:
            raise HttpError(400, f"invalid port in Host: {host[:64]!r}")
        if int(port) != scheme_default_port:
            return f"{name}:{int(port)}"
    return name


# --------------------------------------------------------------------------
# Framing

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class FramingResult:
    """How the body is delimited, and the one Host."""

    host: bytes | None
    """The Host header value as sent (normalize with :func:`normalize_host`)."""
    content_length: int | None
    """Body length when delimited by Content-Length."""
    chunked: bool
    """Body in chunked transfer coding."""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def check_framing(
    headers: Sequence[tuple[bytes, bytes]],
    version: str | bytes = b"1.1",
    *,
    max_headers: int = MAX_HEADERS,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> FramingResult:
    """Check a request's header list for unambiguous framing (module docstring).

    ``headers`` are (name, value) pairs as received; values are stripped of
    surrounding whitespace here.  Raises :class:`HttpError` (400/431/505)."""
    host, content_length, chunked, _, _ = scan_request_headers(
        headers, version, max_headers=max_headers, max_header_bytes=max_header_bytes
    )
    return FramingResult(host, content_length, chunked)


# lower-case name -> what scan_request_headers does with it
_HOST, _CL, _TE, _EXPECT, _UPGRADE = range(5)
_SCANNED = {
    b"host": _HOST,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
}


def scan_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    version: str | bytes = b"1.1",
    *,
    max_headers: int = MAX_HEADERS,
    max_header_bytes: int = MAX_HEADER_BYTES,
    header_bytes: int | None = None,
) -> tuple[bytes | None, int | None, bool, bytes | None, bytes | None]:
    """:func:`check_framing` in one pass that also picks up Expect and Upgrade.

    Returns ``(host, content_length, chunked, expect, upgrade)``: the first
    three as in :class:`FramingResult`, then the first Expect and Upgrade
    values (stripped), or None.  Same checks, in the same order, with the
    same errors as :func:`check_framing`.  ``header_bytes`` is the sum of
    name + value lengths when the caller already counted it."""
    v = (
        version
        if type(version) is str
        else (version.decode("ascii", "replace") if isinstance(version, (bytes, bytearray)) else version)
    )
    if v != "1.1" and v != "1.0":
        raise HttpError(505, f"HTTP version {v[:16]!r} is not supported")
    if len(headers) > max_headers:
        raise HttpError(431, f"{len(headers)} header lines; at most {max_headers} are allowed")
    total = sum(len(n) + len(val) for n, val in headers) if header_bytes is None else header_bytes
    if total > max_header_bytes:
        raise HttpError(431, f"{total} bytes of headers; at most {max_header_bytes} are allowed")

    token = _TOKEN.fullmatch
    bad_value = _BAD_VALUE.search
    scanned = _SCANNED.get
    host = None
    n_hosts = 0
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expect = upgrade = None
    for name, value in headers:
        if token(name) is None:
            raise HttpError(400, f"invalid header name {name[:64]!r}")
        # the stripped blanks are not control characters: searching the raw value is the same
        if bad_value(value) is not None:
            raise HttpError(400, f"control character in the value of header {name.decode()!r}")
        kind = scanned(name.lower())
        if kind is None:
            continue
        value = value.strip(b" \t")
        if kind == _HOST:
            if not n_hosts:
                host = value
            n_hosts += 1
        elif kind == _CL:
            lengths += [p.strip(b" \t") for p in value.split(b",")]
        elif kind == _TE:
            codings += [p.strip(b" \t").lower() for p in value.split(b",")]
        elif kind == _EXPECT:
            if expect is None:
                expect = value
        elif upgrade is None:
            upgrade = value

    if n_hosts > 1:
        raise HttpError(400, "more than one Host header")
    if v == "1.1" and not n_hosts:
        raise HttpError(400, "HTTP/1.1 request without a Host header")
    if lengths and codings:
        raise HttpError(400, "both Content-Length and Transfer-Encoding (ambiguous framing)")
    content_length = None
    if lengths:
        if any(not x.isdigit() or len(x) > 18 for x in lengths):
            raise HttpError(400, "malformed Content-Length")
        if len(lengths) > 1 and len(set(lengths)) > 1 and len({int(x) for x in lengths}) > 1:
            raise HttpError(400, "differing Content-Length values")
        content_length = int(lengths[0])
    chunked = False
    if codings:
        if v == "1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings != [b"chunked"]:
            raise HttpError(
                400,
                "unsupported Transfer-Encoding "
                f"{b', '.join(codings).decode('ascii', 'replace')[:64]!r}; "
                "only 'chunked' is accepted",
            )
        chunked = True
    return host, content_length, chunked, expect, upgrade


def header_multimap(headers: Sequence[tuple[bytes, bytes]]) -> Mapping[str, tuple[str, ...]]:
    """Header lines as {lowercase name: (value, ...)} in order, one entry per line.

    Values are decoded as ISO-8859-1 and stripped; a repeated header keeps
    every value separately (policy matches each of them)."""
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.strip(b" \t").decode("latin-1"))
    return {k: tuple(v) for k, v in out.items()}
