"""Protocol sniffing from the first bytes: table tests and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.sniff import DEFAULT_LIMIT, Verdict, sniff

H, N, M, H2 = Verdict.HTTP1, Verdict.NOT_HTTP, Verdict.NEED_MORE, Verdict.HTTP2
GET = b"GET /index.html?q=1 HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("data,verdict", [
    (GET, H),
    (b"GET / HTTP/1.0\r\n", H),
    (b"GET / HTTP/1.1\n", H),
    (b"OPTIONS * HTTP/1.1\r\n", H),
    (b"PURGE /x HTTP/1.1\r\n", H),
    (b"", M),
    (b"G", M),
    (b"GET", M),
    (b"GET ", M),
    (b"GET /a", M),
    (b"GET /a ", M),
    (b"GET /a HTTP/1", M),
    (b"GET /a HTTP/1.1", M),
    (b"GET /a HTTP/1.1\r", M),
    (b"\x16\x03\x01\x02\x00\x01\x00", N),  # TLS ClientHello
    (b"\x16", N),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04", H2),  # a SETTINGS frame follows
    (b"PRI ", M),
    (b"PRI * HTTP/2.0\r\n", M),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", N),
    (b"GET / HTTP/2.0\r\n", N),
    (b"GET / HTTP/1.1 \r\n", N),
    (b"GET  / HTTP/1.1\r\n", N),
    (b" GET / HTTP/1.1\r\n", N),
    (b"GET /\x00 HTTP/1.1\r\n", N),
    (b"SSH-2.0-OpenSSH_9.2\r\n", N),
    (b"\x00\x00\x00\x01", N),
    (b"GET /\xff HTTP/1.1\r\n", N),
    (b"A" * 33 + b" / HTTP/1.1\r\n", N),
    (b"\r\n", N),
])
def test_table(data, verdict):
    assert sniff(data) is verdict


def test_limit():
    long_target = b"GET /" + b"a" * 200
    assert sniff(long_target) is M
    assert sniff(long_target, limit=100) is N
    assert sniff(b"GET /" + b"a" * DEFAULT_LIMIT) is N


def test_every_prefix_of_a_request_needs_more():
    line = b"POST /api/v1/items?x=%20 HTTP/1.1\r\n"
    for i in range(len(line)):
        assert sniff(line[:i]) is M, line[:i]
    assert sniff(line) is H


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_never_raises(data):
    assert sniff(data) in (H, N, M, H2)
    assert sniff(data, limit=16) in (H, N, M, H2)


@settings(max_examples=300, deadline=None)
@given(st.from_regex(rb"\A[A-Z]{1,10} /[a-z0-9/._~%?=&-]{0,40} HTTP/1\.[01]\r\n\Z"), st.binary(max_size=50))
def test_request_lines_are_http(line, rest):
    assert sniff(line + rest) is H
    assert sniff(line[:-1]) is M
