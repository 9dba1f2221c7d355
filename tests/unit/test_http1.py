"""HTTP/1 sans-IO parser and serializers: scripted byte streams, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from agent.proxy.http1 import (
    CHUNKED_END, Body, EndOfMessage, ParseError, RequestHead, RequestParser, ResponseHead,
    ResponseParser, chunk, forward_headers, forwarded_head, serialize_response_head,
)


def req(data: bytes, **kw):
    return RequestParser(**kw).feed(data)


def only_error(events):
    assert len(events) == 1 and isinstance(events[0], ParseError), events
    return events[0]


def test_simple_get_normalized():
    ev = req(b"GET /a/./b/../c//d?q=%7e HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n")
    head, eom = ev
    assert isinstance(head, RequestHead) and eom == EndOfMessage()
    assert head.method == b"GET" and head.target == b"/a/./b/../c//d?q=%7e"
    assert head.path.target == "/a/c/d?q=%7e"
    assert head.headers == [(b"Host", b"svc"), (b"X-A", b"1")]
    assert head.host == b"svc" and head.version == b"1.1" and head.keep_alive
    assert head.framing == "none" and not head.expect_continue and head.upgrade is None


def test_content_length_body_split_across_feeds():
    p = RequestParser()
    ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
    assert ev[0].framing == "content-length" and ev[0].content_length == 10
    assert ev[1:] == [Body(b"01234")]
    assert p.in_message
    assert p.feed(b"56789GET") == [Body(b"56789"), EndOfMessage()]
    assert p.in_head  # the next request has begun
    assert [type(e) for e in p.feed(b" / HTTP/1.1\r\nHost: a\r\n\r\n")] == [RequestHead, EndOfMessage]


def test_chunked_body_decoded_and_trailers_dropped():
    p = RequestParser()
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert ev[0].framing == "chunked"
    assert b"".join(e.data for e in ev if isinstance(e, Body)) == b"hello world"
    assert ev[-1] == EndOfMessage()
    assert ev[0].headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]


def test_pipelined_requests_in_one_feed():
    data = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
    heads = [e for e in req(data) if isinstance(e, RequestHead)]
    assert [h.path.path for h in heads] == [f"/{i}" for i in range(5)]


def test_byte_at_a_time_equals_one_feed():
    data = (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    p = RequestParser()
    ev = []
    for i in range(len(data)):
        ev += p.feed(data[i:i + 1])
    whole = req(data)
    assert [type(e) for e in ev if not isinstance(e, Body)] == [type(e) for e in whole if not isinstance(e, Body)]
    assert b"".join(e.data for e in ev if isinstance(e, Body)) == b"abc"


def test_http10_keep_alive_and_no_host():
    (h, _) = req(b"GET / HTTP/1.0\r\n\r\n")
    assert h.version == b"1.0" and not h.keep_alive and h.host is None
    (h, _) = req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert h.keep_alive
    (h, _) = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not h.keep_alive


def test_expect_continue_flag():
    p = RequestParser()
    (h,) = p.feed(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert h.expect_continue
    assert only_error(req(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\n\r\n")).status == 417


@pytest.mark.parametrize("raw,status,why", [
    (b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400, "Transfer-Encoding"),
    (b"GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n", 400, "escaped slash"),
    (b"GET /..;/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "path parameters"),
    (b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "absolute-form"),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400, ""),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "version"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400, ""),
    (b"\x16\x03\x01\x02\x00", 400, ""),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "target"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "header lines"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", 431, "bytes of headers"),
    (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
     b"Content-Length: 2\r\n\r\nab", 400, "Upgrade"),
])
def test_framing_rejections(raw, status, why):
    err = only_error(req(raw))
    assert err.status == status and why in err.reason


def test_rejection_is_final_and_nothing_before_it_is_lost():
    p = RequestParser()
    ev = p.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [type(e) for e in ev] == [RequestHead, EndOfMessage, ParseError]
    assert p.failed and p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_endless_header_refused_while_streaming():
    p = RequestParser()
    assert p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ") == []
    ev = []
    for _ in range(100):
        ev += p.feed(b"y" * 1024)
        if ev:
            break
    assert only_error(ev).status == 431


def test_endless_target_refused_while_streaming():
    p = RequestParser()
    ev = p.feed(b"GET /")
    for _ in range(20):
        ev += p.feed(b"a" * 1024)
    assert only_error(ev).status == 414


def test_upgrade_keeps_raw_bytes_and_decline_resumes_http():
    p = RequestParser()
    ev = p.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi")
    assert ev[0].upgrade == b"websocket" and ev[1] == EndOfMessage()
    assert p.feed(b"more") == []
    assert p.take_raw() == b"\x81\x02himore"
    p2 = RequestParser()
    p2.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /n")
    assert p2.feed(b"ext HTTP/1.1\r\nHost: a\r\n\r\n") == []
    ev = p2.upgrade_declined()
    assert ev[0].path.path == "/next" and ev[1] == EndOfMessage()


def test_eof_mid_request_is_an_error():
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    assert only_error(p.feed_eof()).status == 400
    assert RequestParser().feed_eof() == []


# ---- responses

def resp(method: bytes, data: bytes):
    p = ResponseParser()
    p.expect(method)
    return p, p.feed(data)


def test_response_content_length_and_interim():
    _, ev = resp(b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert [type(e) for e in ev] == [ResponseHead, ResponseHead, Body, EndOfMessage]
    assert ev[0].status == 100 and ev[0].interim
    assert ev[1].status == 200 and ev[1].framing == "content-length" and ev[1].content_length == 3


def test_response_chunked_and_until_close():
    _, ev = resp(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert ev[0].framing == "chunked" and ev[1] == Body(b"abc") and ev[2] == EndOfMessage()
    p, ev = resp(b"GET", b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert ev[0].framing == "until-close" and not ev[0].keep_alive and ev[1:] == [Body(b"abc")]
    assert p.feed_eof() == [EndOfMessage()]


def test_response_without_body():
    for status in (204, 304):
        _, ev = resp(b"GET", b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)
        assert ev[0].framing == "none" and ev[-1] == EndOfMessage()
    p, ev = resp(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert ev[0].framing == "none" and ev[0].content_length == 100 and ev[1] == EndOfMessage()
    p.expect(b"GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert ev[1:] == [Body(b"ok"), EndOfMessage()]


def test_response_101_then_raw():
    p, ev = resp(b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x01x")
    assert ev[0].status == 101 and p.take_raw() == b"\x81\x01x"


def test_response_errors_are_502():
    p, ev = resp(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    assert only_error(p.feed_eof()).status == 502
    _, ev = resp(b"GET", b"garbage\r\n\r\n")
    assert only_error(ev).status == 502


# ---- serialization

def test_serializers_round_trip():
    (h, _) = req(b"GET /a/../b HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
                 b"Keep-Alive: 5\r\nTE: trailers\r\nX-End: 2\r\n\r\n")
    fwd = forward_headers(h.headers)
    assert fwd == [(b"Host", b"a"), (b"X-End", b"2")]
    out = forwarded_head(b"GET %s HTTP/1.1\r\n" % h.path.target.encode(), h.headers, [(b"Content-Length", b"0")])
    assert out == b"GET /b HTTP/1.1\r\nHost: a\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n"
    (h2, _) = req(out)
    assert h2.path.path == "/b" and h2.content_length == 0
    r = serialize_response_head(200, b"OK", [(b"Transfer-Encoding", b"chunked")])
    body = b"".join(chunk(b"hello")) + b"".join(chunk(b"x" * 300)) + CHUNKED_END
    _, ev = resp(b"GET", r + body)
    assert b"".join(e.data for e in ev if isinstance(e, Body)) == b"hello" + b"x" * 300
    assert ev[-1] == EndOfMessage()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_request_parser_never_raises(data, step):
    p = RequestParser()
    for i in range(0, len(data), step):
        for e in p.feed(data[i:i + step]):
            assert isinstance(e, (RequestHead, Body, EndOfMessage, ParseError))
            if isinstance(e, ParseError):
                assert e.status in (400, 414, 417, 431, 505)
    p.feed_eof()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
    b"\r\n", b"abc", b"3\r\nabc\r\n", b"0\r\n\r\n", b"Connection: upgrade\r\nUpgrade: x\r\n", b"\x00",
]), max_size=12), st.sampled_from([b"GET", b"HEAD"]))
def test_parsers_never_raise_on_structured_junk(parts, method):
    data = b"".join(parts)
    RequestParser().feed(data)
    p = ResponseParser()
    p.expect(method)
    p.feed(data.replace(b"GET / HTTP/1.1", b"HTTP/1.1 200 OK"))
    p.feed_eof()


# ---- single-pass header handling agrees with the straightforward versions

_HNAMES = st.sampled_from([b"Host", b"Connection", b"connection", b"Keep-Alive", b"X-Hop", b"x-hop", b"TE",
                           b"Upgrade", b"Content-Length", b"Transfer-Encoding", b"traceparent", b"X-Request-Id",
                           b"Proxy-Connection", b"Trailer", b"X", b"Expect",
                           # as long as a name forward_headers drops, but kept (it lower-cases by length)
                           b"CONNECTION", b"Content-Type", b"X-Custom-1", b"x-custom-1"])
_HVALUES = st.sampled_from([b"", b"keep-alive", b"close", b"X-Hop", b"x-hop, te", b" , X ,", b"upgrade", b"5",
                            b"chunked", b"Chunked", b" 7 ", b"a", b"traceparent", b"Host", b"gzip, chunked",
                            b"keep-alive, X-Request-Id", b"X-CUSTOM-1", b"close, x-custom-1"])


def _forward_reference(headers, drop=frozenset()):
    from agent.proxy.http1 import HOP_BY_HOP, connection_tokens
    named = connection_tokens(headers)
    return [(n, v) for n, v in headers
            if n.lower() not in HOP_BY_HOP and n.lower() not in named and n.lower() not in drop]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_HNAMES, _HVALUES), max_size=8),
       st.sampled_from([frozenset(), frozenset({b"traceparent", b"tracestate", b"x-request-id"}), frozenset({b"x"})]))
def test_forward_headers_equals_the_reference(headers, drop):
    assert forward_headers(headers, drop=drop) == _forward_reference(headers, drop)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_HNAMES, _HVALUES), max_size=8),
       st.sampled_from([frozenset(), frozenset({b"traceparent", b"tracestate", b"x-request-id"}), frozenset({b"y"})]),
       st.lists(st.tuples(_HNAMES, _HVALUES), max_size=3))
def test_forwarded_head_is_the_reference_headers_serialized(headers, drop, extra):
    """The head serializer the L7 session uses: the first line, the
    headers forward_headers keeps, the proxy's own, the blank line."""
    first = b"GET /x HTTP/1.1\r\n"
    kept = _forward_reference(headers, drop) + extra
    want = first + b"".join(b"%s: %s\r\n" % h for h in kept) + b"\r\n"
    assert forwarded_head(first, headers, extra, drop=drop) == want
    assert forwarded_head(first, headers, extra, drop=drop) == want  # again: forward_headers cached the drop set


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_HNAMES, _HVALUES), max_size=6), st.sampled_from([200, 204, 304, 101, 100]),
       st.sampled_from([b"GET", b"HEAD"]))
def test_response_framing_equals_the_reference(headers, status, method):
    """Response framing from the first Transfer-Encoding / Content-Length line, as header_value finds them."""
    from agent.proxy.http1 import header_value
    assume_ok = all(b"\r" not in n + v and b"\n" not in n + v for n, v in headers)
    if not assume_ok:
        return
    wire = b"HTTP/1.1 %d X\r\n" % status + b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers) + b"\r\n"
    p = ResponseParser()
    p.expect(method)
    ev = p.feed(wire)
    heads = [e for e in ev if isinstance(e, ResponseHead)]
    if not heads:
        return  # llhttp refused it (e.g. both framings, bad length): nothing to compare
    h = heads[0]
    if status < 200 or status in (204, 304):
        assert h.framing == "none"
        return
    te = header_value(h.headers, b"transfer-encoding")
    cl = header_value(h.headers, b"content-length")
    if method == b"HEAD":
        assert h.framing == "none"
        assert h.content_length == (int(cl) if cl is not None and cl.isdigit() else None)
    elif te is not None:
        want = "chunked" if te.lower().rsplit(b",", 1)[-1].strip() == b"chunked" else "until-close"
        assert h.framing == want
    elif cl is not None:
        assert h.framing == "content-length" and h.content_length == int(cl)
    else:
        assert h.framing == "until-close"
