"""Is this connection HTTP/1.x or HTTP/2? Decided from its first bytes, sans-IO.

``sniff(data)`` looks only at the request line, with C regexes (no per-byte
Python work), and answers:

- ``HTTP1``: a complete ``METHOD SP target SP HTTP/1.x`` line (CRLF or LF).
- ``HTTP2``: the whole HTTP/2 prior-knowledge (h2c) connection preface
  ``PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`` (RFC 9113 3.4).
- ``NOT_HTTP``: cannot become one: a TLS record (0x16 0x03...), something
  that starts like the preface and then differs, a byte no request line may
  hold, or ``limit`` bytes without a complete request line.
- ``NEED_MORE``: still a prefix of a request line or of the preface. The
  shell reads more, under a short timeout of its own.

It never raises for any input.
"""

from __future__ import annotations

import enum
import re

__all__ = ["Verdict", "sniff", "DEFAULT_LIMIT"]

DEFAULT_LIMIT = 8192 + 64
"""Bytes of a request line (an 8 KiB target plus method and version)."""


class Verdict(enum.Enum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    NOT_HTTP = "not-http"
    NEED_MORE = "need-more"


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FULL = re.compile(rb"%s{1,32} [\x21-\x7e]+ HTTP/1\.[0-9]\r?\n" % _TOKEN)
# Every proper prefix of a request line.
_PREFIX = re.compile(
    rb"%s{1,32}(?: (?:[\x21-\x7e]+(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?\Z"
    % _TOKEN
)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def sniff(data: bytes, *, limit: int = DEFAULT_LIMIT) -> Verdict:
    """Classify the first bytes of a connection (module docstring)."""
    if not data:
        return Verdict.NEED_MORE
    if data[0] == 0x16:  # TLS handshake record
        return Verdict.NOT_HTTP
    head = data[: len(_H2_PREFACE)]
    if _H2_PREFACE.startswith(head) and len(head) >= 4:  # "PRI " onwards
        return Verdict.HTTP2 if len(head) == len(_H2_PREFACE) else Verdict.NEED_MORE
    if head.startswith(b"PRI * HTTP/2.0"):  # the preface, then something else
        return Verdict.NOT_HTTP
    window = data[:limit]
    if _FULL.match(window):
        return Verdict.HTTP1
    if len(window) >= limit:
        return Verdict.NOT_HTTP
    if _PREFIX.match(window):
        return Verdict.NEED_MORE
    return Verdict.NOT_HTTP
