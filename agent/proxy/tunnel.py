"""The meshlet tunnel header: what an outbound proxy tells the remote node.

Sans-IO and pure: bytes in, messages out. Nothing here touches sockets, and
nothing depends on whether the tunnel is plaintext or wrapped in mTLS (the
header is simply the first bytes of the byte stream, TLS or not).

Rules of the wire format (everything that affects parsing lives here):

- A message is ``MAGIC (4) | VERSION (1) | KIND (1) | LENGTH (2, big endian)``
  followed by LENGTH bytes of TLVs. The whole message is at most
  ``MAX_HEADER`` (4 KiB) bytes.
- KIND is ``KIND_REQUEST`` (client → inbound node) or ``KIND_RESPONSE``.
- A TLV is ``TYPE (2) | LEN (2) | VALUE (LEN)``, big endian. The top bit of
  TYPE (``MUST_UNDERSTAND``) says a receiver that does not know the type must
  reject the message (fail closed); unknown types without it are skipped.
- Each known type appears at most once. Bytes after the message belong to
  the relayed stream (the client may pipeline them right after the header).
- Addresses are ``FAMILY (1: 4 or 6) | PORT (2) | ADDRESS (4 or 16)``.

Errors raise ``TunnelError``, carrying the ``Status`` the receiver should
answer with (like h11's error status hints).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "AF_INET",
    "AF_INET6",
    "MAGIC",
    "VERSION",
    "MAX_HEADER",
    "Status",
    "Address",
    "TunnelRequest",
    "TunnelResponse",
    "NeedMore",
    "NEED_MORE",
    "Decoded",
    "TunnelError",
    "RequestDecoder",
    "ResponseDecoder",
    "encode_request",
    "encode_response",
    "spiffe_id",
]

# Linux's address family numbers (socket.AF_INET, socket.AF_INET6), spelled
# out so that this sans-IO module imports no socket; a unit test checks they agree.
AF_INET = 2
AF_INET6 = 10

MAGIC = b"MLTN"
VERSION = 1
MAX_HEADER = 4096
KIND_REQUEST = 1
KIND_RESPONSE = 2
MUST_UNDERSTAND = 0x8000

_PREFIX = struct.Struct("!4sBBH")  # magic, version, kind, length
_TLV = struct.Struct("!HH")
_MAX_STRING = 1024
_MAX_REASON = 256

# TLV types (value of the low 15 bits + must-understand bit where it applies).
T_DST = MUST_UNDERSTAND | 0x01  # original destination address
T_SRC_ADDR = 0x02  # client's source address (informational)
T_SRC_WORKLOAD = 0x03  # "<namespace>/<name>" (informational)
T_SRC_IDENTITY = MUST_UNDERSTAND | 0x04  # spiffe://<td>/ns/<ns>/sa/<sa>
T_PROTOCOL = 0x05  # "http/1.1": the stream is HTTP/1 (the sender parsed it); a hint, skippable
T_STATUS = MUST_UNDERSTAND | 0x10  # response status code (1 byte)
T_REASON = 0x11  # short human-readable reason (UTF-8)


class Status(enum.IntEnum):
    """Outcome reported by the inbound side."""

    OK = 0
    REFUSED = 1  # destination actively refused (RST)
    UNREACHABLE = 2  # no route / host unreachable
    TIMEOUT = 3  # connect to destination timed out
    NOT_LOCAL = 4  # destination is not a mesh pod on the receiving node
    BAD_REQUEST = 5  # malformed header
    UNSUPPORTED = 6  # unsupported version / must-understand TLV
    FORBIDDEN = 7  # policy says no
    INTERNAL = 8  # bug or resource problem on the inbound side


class TunnelError(ValueError):
    """A message could not be decoded or encoded. ``status`` is the answer."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Address:
    family: int  # AF_INET or AF_INET6
    ip: str
    port: int

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass(frozen=True)
class TunnelRequest:
    dst: Address
    identity: str  # spiffe://<trust_domain>/ns/<ns>/sa/<sa>
    namespace: str = ""  # source workload
    name: str = ""
    src: Address | None = None  # client's own address (informational)
    protocol: str = ""  # "http/1.1" when the sender knows the stream is HTTP/1 (skip sniffing)


@dataclass(frozen=True)
class TunnelResponse:
    status: Status
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class NeedMore:
    """The decoder needs more bytes."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class Decoded:
    message: TunnelRequest | TunnelResponse
    leftover: bytes  # bytes after the header: they belong to the stream


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# --------------------------------------------------------------------------
# encoding


def _tlv(t: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise TunnelError(f"TLV {t:#x} too long ({len(value)} bytes)", Status.INTERNAL)
    return _TLV.pack(t, len(value)) + value


def _encode_address(addr: Address) -> bytes:
    if not 0 <= addr.port <= 0xFFFF:
        raise TunnelError(f"port out of range: {addr.port}", Status.INTERNAL)
    fam, packed = _packed_ip(addr.ip)
    if fam == 4:
        if addr.family != AF_INET:
            raise TunnelError(f"{addr.ip} is IPv4 but family is {addr.family}", Status.INTERNAL)
    elif addr.family != AF_INET6:
        raise TunnelError(f"{addr.ip} is IPv6 but family is {addr.family}", Status.INTERNAL)
    return struct.pack("!BH", fam, addr.port) + packed


# The codec runs for every new connection with the same few addresses and
# strings (the pods of a node pair): their parsing and checks are memoized,
# bounded (issue #13).  Errors are not cached: they raise every time.
_MEMO = 4096


@functools.lru_cache(maxsize=_MEMO)
def _packed_ip(ip: str) -> tuple[int, bytes]:
    """(4 or 6, the address in network order) of the text ``ip``."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError as e:
        raise TunnelError(f"not an IP address: {ip!r}", Status.INTERNAL) from e
    return a.version, a.packed


@functools.lru_cache(maxsize=_MEMO)
def _ip_text(raw: bytes) -> str:
    """The text of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address."""
    return str(ipaddress.ip_address(raw))


@functools.lru_cache(maxsize=_MEMO)
def _encode_str(s: str, limit: int) -> bytes:
    if any(c < " " or c == "\x7f" for c in s):
        raise TunnelError(f"string contains control characters: {s[:80]!r}", Status.INTERNAL)
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TunnelError(f"string is not encodable as UTF-8: {s[:80]!r}", Status.INTERNAL) from e
    if len(b) > limit:
        raise TunnelError(f"string too long ({len(b)} > {limit} bytes)", Status.INTERNAL)
    return b


def _frame(kind: int, body: bytes) -> bytes:
    if _PREFIX.size + len(body) > MAX_HEADER:
        raise TunnelError(
            f"header too large ({_PREFIX.size + len(body)} > {MAX_HEADER} bytes)", Status.INTERNAL
        )
    return _PREFIX.pack(MAGIC, VERSION, kind, len(body)) + body


def encode_request(req: TunnelRequest) -> bytes:
    if not req.identity:
        raise TunnelError("request needs a source identity", Status.INTERNAL)
    if "/" in req.namespace:
        raise TunnelError(f"namespace must not contain '/': {req.namespace!r}", Status.INTERNAL)
    parts = [
        _tlv(T_DST, _encode_address(req.dst)),
        _tlv(T_SRC_IDENTITY, _encode_str(req.identity, _MAX_STRING)),
    ]
    if req.namespace or req.name:
        parts.append(_tlv(T_SRC_WORKLOAD, _encode_str(f"{req.namespace}/{req.name}", _MAX_STRING)))
    if req.protocol:
        parts.append(_tlv(T_PROTOCOL, _encode_str(req.protocol, 32)))
    if req.src is not None:
        parts.append(_tlv(T_SRC_ADDR, _encode_address(req.src)))
    return _frame(KIND_REQUEST, b"".join(parts))


def encode_response(resp: TunnelResponse) -> bytes:
    reason = resp.reason.encode("utf-8", "replace")[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    body = _tlv(T_STATUS, bytes([int(resp.status)]))
    if reason:
        body += _tlv(T_REASON, reason)
    return _frame(KIND_RESPONSE, body)


# --------------------------------------------------------------------------
# decoding


def _decode_address(value: bytes, what: str) -> Address:
    if len(value) < 3:
        raise TunnelError(f"{what}: address TLV too short")
    fam, port = struct.unpack_from("!BH", value)
    raw = value[3:]
    if fam == 4 and len(raw) == 4:
        return Address(AF_INET, _ip_text(raw), port)
    if fam == 6 and len(raw) == 16:
        return Address(AF_INET6, _ip_text(raw), port)
    raise TunnelError(f"{what}: bad address (family {fam}, {len(raw)} address bytes)")


@functools.lru_cache(maxsize=_MEMO)
def _decode_str(value: bytes, what: str, limit: int) -> str:
    if len(value) > limit:
        raise TunnelError(f"{what}: too long ({len(value)} bytes)")
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TunnelError(f"{what}: not UTF-8") from e
    if any(c < " " or c == "\x7f" for c in s):
        raise TunnelError(f"{what}: contains control characters")
    return s


def _parse_tlvs(body: bytes, known: frozenset[int]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    n = len(body)
    while off < n:
        if n - off < _TLV.size:
            raise TunnelError("truncated TLV header")
        t, ln = _TLV.unpack_from(body, off)
        off += _TLV.size
        if n - off < ln:
            raise TunnelError(f"TLV {t:#06x} overruns the header ({ln} bytes)")
        value = body[off : off + ln]
        off += ln
        if t in known:
            if t in out:
                raise TunnelError(f"duplicate TLV {t:#06x}")
            out[t] = value
        elif t & MUST_UNDERSTAND:
            raise TunnelError(
                f"unknown must-understand TLV {t:#06x}: the peer runs a newer meshlet", Status.UNSUPPORTED
            )
        # unknown optional TLV: skipped
    return out


_REQ_TYPES = frozenset({T_DST, T_SRC_ADDR, T_SRC_WORKLOAD, T_SRC_IDENTITY, T_PROTOCOL})
_RESP_TYPES = frozenset({T_STATUS, T_REASON})


def _request_from(tlvs: dict[int, bytes]) -> TunnelRequest:
    if T_DST not in tlvs:
        raise TunnelError("request has no destination")
    if T_SRC_IDENTITY not in tlvs:
        raise TunnelError("request has no source identity")
    dst = _decode_address(tlvs[T_DST], "destination")
    if dst.port == 0:
        raise TunnelError("destination port is 0")
    identity = _decode_str(tlvs[T_SRC_IDENTITY], "identity", _MAX_STRING)
    if not identity.startswith("spiffe://"):
        raise TunnelError(f"identity is not a SPIFFE ID: {identity[:80]!r}")
    namespace = name = ""
    if T_SRC_WORKLOAD in tlvs:
        wl = _decode_str(tlvs[T_SRC_WORKLOAD], "workload", _MAX_STRING)
        namespace, sep, name = wl.partition("/")
        if not sep:
            raise TunnelError("workload must be '<namespace>/<name>'")
    src = _decode_address(tlvs[T_SRC_ADDR], "source") if T_SRC_ADDR in tlvs else None
    protocol = _decode_str(tlvs[T_PROTOCOL], "protocol", 32) if T_PROTOCOL in tlvs else ""
    return TunnelRequest(
        dst=dst, identity=identity, namespace=namespace, name=name, src=src, protocol=protocol
    )


def _response_from(tlvs: dict[int, bytes]) -> TunnelResponse:
    raw = tlvs.get(T_STATUS)
    if raw is None or len(raw) != 1:
        raise TunnelError("response has no (or a malformed) status")
    reason = ""
    if T_REASON in tlvs:
        reason = tlvs[T_REASON].decode("utf-8", "replace")[:_MAX_REASON]
    try:
        status = Status(raw[0])
    except ValueError:
        # A newer peer's failure code: it is still a failure (fail closed).
        return TunnelResponse(Status.INTERNAL, f"unknown status {raw[0]}: {reason}".rstrip(": "))
    return TunnelResponse(status, reason)


class _Decoder:
    _kind: int
    _types: frozenset[int]

    def __init__(self, max_size: int = MAX_HEADER) -> None:
        self._buf = bytearray()
        self._max = min(max_size, MAX_HEADER)
        self._done = False

    def feed(self, data: bytes) -> NeedMore | Decoded:
        """Add bytes; return NEED_MORE, or the message plus the bytes after it.

        Raises TunnelError on malformed input (fail fast: a wrong magic is
        detected from the first byte, an oversize length as soon as known).
        """
        if self._done:
            raise TunnelError("decoder already produced a message", Status.INTERNAL)
        self._buf += data
        buf = self._buf
        have = len(buf)
        m = min(have, len(MAGIC))
        if bytes(buf[:m]) != MAGIC[:m]:
            raise TunnelError("not a meshlet tunnel header (bad magic): is the peer a meshlet proxy?")
        if have >= 5 and buf[4] != VERSION:
            raise TunnelError(
                f"unsupported tunnel version {buf[4]} (this proxy speaks {VERSION})", Status.UNSUPPORTED
            )
        if have >= 6 and buf[5] != self._kind:
            raise TunnelError(f"unexpected message kind {buf[5]} (wanted {self._kind})")
        if have < _PREFIX.size:
            return NEED_MORE
        _, _, _, length = _PREFIX.unpack_from(buf)
        total = _PREFIX.size + length
        if total > self._max:
            raise TunnelError(f"header too large ({total} > {self._max} bytes)")
        if have < total:
            return NEED_MORE
        tlvs = _parse_tlvs(bytes(buf[_PREFIX.size : total]), self._types)
        msg = self._build(tlvs)
        leftover = bytes(buf[total:])
        self._buf = bytearray()
        self._done = True
        return Decoded(msg, leftover)

    def _build(self, tlvs: dict[int, bytes]) -> TunnelRequest | TunnelResponse:  # pragma: no cover
        raise NotImplementedError


class RequestDecoder(_Decoder):
    _kind = KIND_REQUEST
    _types = _REQ_TYPES

    def _build(self, tlvs: dict[int, bytes]) -> TunnelRequest:
        return _request_from(tlvs)


class ResponseDecoder(_Decoder):
    _kind = KIND_RESPONSE
    _types = _RESP_TYPES

    def _build(self, tlvs: dict[int, bytes]) -> TunnelResponse:
        return _response_from(tlvs)
