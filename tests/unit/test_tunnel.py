"""Tunnel header codec: scripted bytes in, messages out, plus Hypothesis."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import tunnel as t


def _req(**kw):
    base = dict(
        dst=t.Address(socket.AF_INET, "10.244.2.20", 8080),
        identity="spiffe://cluster.local/ns/default/sa/pod1-1",
        namespace="default",
        name="pod1-1",
        src=t.Address(socket.AF_INET, "10.244.1.10", 40000),
    )
    base.update(kw)
    return t.TunnelRequest(**base)


def test_request_round_trip_with_pipelined_bytes():
    req = _req()
    wire = t.encode_request(req)
    assert wire.startswith(t.MAGIC + bytes([t.VERSION]))
    out = t.RequestDecoder().feed(wire + b"GET / HTTP/1.1\r\n")
    assert out == t.Decoded(req, b"GET / HTTP/1.1\r\n")


def test_request_ipv6_and_no_optional_fields():
    req = t.TunnelRequest(dst=t.Address(socket.AF_INET6, "fd00:244:2::20", 443), identity="spiffe://x/ns/a/sa/b")
    out = t.RequestDecoder().feed(t.encode_request(req))
    assert isinstance(out, t.Decoded) and out.message == req and out.leftover == b""


def test_byte_by_byte_feeding():
    wire = t.encode_request(_req())
    dec = t.RequestDecoder()
    for b in wire[:-1]:
        assert dec.feed(bytes([b])) is t.NEED_MORE
    out = dec.feed(wire[-1:] + b"x")
    assert isinstance(out, t.Decoded) and out.leftover == b"x"


def test_response_round_trip():
    for status in t.Status:
        resp = t.TunnelResponse(status, f"reason {status.name}")
        out = t.ResponseDecoder().feed(t.encode_response(resp) + b"\x00tail")
        assert out == t.Decoded(resp, b"\x00tail")


def test_unknown_response_status_is_a_failure():
    body = struct.pack("!HHB", t.T_STATUS, 1, 200)
    wire = struct.pack("!4sBBH", t.MAGIC, 1, t.KIND_RESPONSE, len(body)) + body
    out = t.ResponseDecoder().feed(wire)
    assert isinstance(out, t.Decoded) and not out.message.ok


def test_bad_magic_fails_on_first_byte():
    with pytest.raises(t.TunnelError):
        t.RequestDecoder().feed(b"G")


def test_wrong_version_is_unsupported():
    wire = bytearray(t.encode_request(_req()))
    wire[4] = 2
    with pytest.raises(t.TunnelError) as ei:
        t.RequestDecoder().feed(bytes(wire[:5]))
    assert ei.value.status is t.Status.UNSUPPORTED


def test_response_is_not_a_request():
    with pytest.raises(t.TunnelError):
        t.RequestDecoder().feed(t.encode_response(t.TunnelResponse(t.Status.OK)))


def _with_extra_tlv(extra: bytes) -> bytes:
    wire = t.encode_request(_req())
    body = wire[8:] + extra
    return struct.pack("!4sBBH", t.MAGIC, 1, t.KIND_REQUEST, len(body)) + body


def test_unknown_optional_tlv_is_skipped():
    out = t.RequestDecoder().feed(_with_extra_tlv(struct.pack("!HH", 0x0777, 3) + b"abc"))
    assert isinstance(out, t.Decoded) and out.message == _req()


def test_unknown_must_understand_tlv_fails_closed():
    with pytest.raises(t.TunnelError) as ei:
        t.RequestDecoder().feed(_with_extra_tlv(struct.pack("!HH", 0x8777, 0)))
    assert ei.value.status is t.Status.UNSUPPORTED


def test_duplicate_tlv_rejected():
    dup = struct.pack("!HH", t.T_SRC_WORKLOAD, 3) + b"a/b"
    with pytest.raises(t.TunnelError):
        t.RequestDecoder().feed(_with_extra_tlv(dup))


def test_missing_destination_rejected():
    body = struct.pack("!HH", t.T_SRC_IDENTITY, 12) + b"spiffe://x/y"
    wire = struct.pack("!4sBBH", t.MAGIC, 1, t.KIND_REQUEST, len(body)) + body
    with pytest.raises(t.TunnelError):
        t.RequestDecoder().feed(wire)


def test_oversize_header_rejected_before_body_arrives():
    prefix = struct.pack("!4sBBH", t.MAGIC, 1, t.KIND_REQUEST, 5000)
    with pytest.raises(t.TunnelError):
        t.RequestDecoder().feed(prefix)


def test_encoder_refuses_oversize():
    with pytest.raises(t.TunnelError):
        t.encode_request(_req(identity="spiffe://" + "a" * 1100))
    with pytest.raises(t.TunnelError):
        t.encode_request(_req(namespace="a" * 1000, name="b" * 1000, identity="spiffe://" + "c" * 1000,))


def test_encoder_rejects_unencodable_text():
    with pytest.raises(t.TunnelError):
        t.encode_request(_req(name="\ud800"))
    with pytest.raises(t.TunnelError):
        t.encode_request(_req(name="a\nb"))


def test_spiffe_id():
    assert t.spiffe_id("cluster.local", "ns1", "sa1") == "spiffe://cluster.local/ns/ns1/sa/sa1"


# ---------------------------------------------------------------- hypothesis

_text = st.text(st.characters(min_codepoint=0x20, blacklist_characters="\x7f", blacklist_categories=("Cs",)), max_size=60)
_name = _text.filter(lambda s: "/" not in s)
_v4 = st.builds(
    lambda ip, port: t.Address(socket.AF_INET, str(ipaddress.IPv4Address(ip)), port),
    st.integers(0, 2**32 - 1),
    st.integers(1, 65535),
)
_v6 = st.builds(
    lambda ip, port: t.Address(socket.AF_INET6, str(ipaddress.IPv6Address(ip)), port),
    st.integers(0, 2**128 - 1),
    st.integers(1, 65535),
)
_addr = _v4 | _v6
_requests = st.builds(
    t.TunnelRequest,
    dst=_addr,
    identity=_text.map(lambda s: "spiffe://" + s),
    namespace=_name,
    name=_text,
    src=st.none() | _addr,
)


@settings(max_examples=300)
@given(_requests, st.binary(max_size=64), st.integers(1, 64))
def test_request_round_trip_any_split(req, tail, chunk):
    wire = t.encode_request(req) + tail
    dec = t.RequestDecoder()
    out = t.NEED_MORE
    pos = 0
    while out is t.NEED_MORE:
        assert pos < len(wire), "decoder wanted more than the encoded header"
        out = dec.feed(wire[pos : pos + chunk])
        pos += chunk
    assert isinstance(out, t.Decoded)
    assert out.message == req
    assert out.leftover + wire[pos:] == tail


@given(st.sampled_from(list(t.Status)), _text)
def test_response_round_trip_any(status, reason):
    out = t.ResponseDecoder().feed(t.encode_response(t.TunnelResponse(status, reason)))
    assert isinstance(out, t.Decoded)
    assert out.message.status is status
    assert reason.startswith(out.message.reason)


@settings(max_examples=500)
@given(st.binary(max_size=5000), st.booleans())
def test_fuzz_random_bytes_only_raise_tunnel_error(data, as_response):
    dec = t.ResponseDecoder() if as_response else t.RequestDecoder()
    try:
        dec.feed(data)
    except t.TunnelError:
        pass


@settings(max_examples=500)
@given(st.binary(min_size=0, max_size=300), st.booleans())
def test_fuzz_valid_prefix_random_body(body, as_response):
    kind = t.KIND_RESPONSE if as_response else t.KIND_REQUEST
    wire = struct.pack("!4sBBH", t.MAGIC, 1, kind, len(body)) + body
    dec = t.ResponseDecoder() if as_response else t.RequestDecoder()
    try:
        out = dec.feed(wire)
    except t.TunnelError:
        return
    assert isinstance(out, t.Decoded)


@settings(max_examples=300)
@given(_requests, st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_mutated_valid_header(req, pos, byte):
    wire = bytearray(t.encode_request(req))
    wire[pos % len(wire)] = byte
    try:
        t.RequestDecoder().feed(bytes(wire))
    except t.TunnelError:
        pass


def test_the_memoized_codec_still_raises_every_time():
    """Addresses and strings are memoized per text (issue #13); a bad one must
    fail on every call, not only the first, and a good one round-trips the same."""
    for _ in range(2):
        with pytest.raises(t.TunnelError, match="not an IP address"):
            t.encode_request(t.TunnelRequest(dst=t.Address(socket.AF_INET, "10.0.0.300", 80),
                                             identity="spiffe://td/ns/a/sa/b"))
        with pytest.raises(t.TunnelError, match="is IPv6 but family"):
            t.encode_request(t.TunnelRequest(dst=t.Address(socket.AF_INET, "::1", 80),
                                             identity="spiffe://td/ns/a/sa/b"))
        with pytest.raises(t.TunnelError, match="control characters"):
            t.encode_request(t.TunnelRequest(dst=t.Address(socket.AF_INET, "10.0.0.3", 80),
                                             identity="spiffe://td/ns/a/sa/b\n"))
    for ip, fam in (("10.0.0.3", socket.AF_INET), ("fd00::3", socket.AF_INET6)) * 2:
        req = t.TunnelRequest(dst=t.Address(fam, ip, 80), identity="spiffe://td/ns/a/sa/b",
                              namespace="a", name="b", src=t.Address(fam, ip, 40000))
        out = t.RequestDecoder().feed(t.encode_request(req))
        assert isinstance(out, t.Decoded) and out.message == req
