"""agent/proxy/h2session.py without sockets: scripted conversations with
``h2`` as the peer (its bytes in, our events and bytes out)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes

from agent.proxy import h2session as hs


def peer(client_side: bool = True) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client_side, header_encoding=None,
        validate_outbound_headers=False, normalize_outbound_headers=False))
    c.initiate_connection()
    return c


def pair(limits: hs.H2Limits | None = None):
    """(our server side, the h2 client), settings exchanged."""
    ours = hs.ServerSide(limits)
    cl = peer()
    assert ours.feed(cl.data_to_send(), 0.0) == []
    cl.receive_data(ours.data_to_send())
    ours.feed(cl.data_to_send(), 0.0)
    return ours, cl


def exchange(ours: hs._Side, cl: h2.connection.H2Connection, now: float = 0.0) -> list:
    evs = ours.feed(cl.data_to_send(), now)
    back = cl.receive_data(ours.data_to_send())
    ours.feed(cl.data_to_send(), now)
    return evs, back


GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc.ns:80"), (b":path", b"/a/../b?x=1")]


def test_settings_are_advertised():
    ours, cl = pair(hs.H2Limits(max_concurrent_streams=7, max_header_list_size=1234, stream_window=99999))
    rs = cl.remote_settings
    assert (rs.max_concurrent_streams, rs.max_header_list_size, rs.initial_window_size) == (7, 1234, 99999)


def test_a_request_is_normalized_like_http1():
    ours, cl = pair()
    cl.send_headers(1, GET + [(b"x-a", b"1"), (b"te", b"trailers")], end_stream=True)
    evs, _ = exchange(ours, cl)
    (req, end) = evs
    assert isinstance(req, hs.Request) and req.end and end == hs.End(1)
    h = req.head
    assert (h.method, h.path.path, h.path.query, h.host, h.target) == (b"GET", "/b", "x=1", b"svc.ns:80", b"/a/../b?x=1")
    assert h.headers == [(b"x-a", b"1"), (b"te", b"trailers")] and not h.grpc


def test_grpc_head_and_timeout():
    ours, cl = pair()
    cl.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/M"),
                        (b"host", b"svc"), (b"content-type", b"application/grpc+proto"),
                        (b"grpc-timeout", b"250m")])
    (req,), _ = exchange(ours, cl)
    assert req.head.grpc and req.head.timeout == pytest.approx(0.25) and req.head.host == b"svc"


@pytest.mark.parametrize("value, seconds", [
    (b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"4m", 0.004), (b"5u", 5e-6), (b"6n", 6e-9),
    (b"12345678S", 12345678.0), (b"123456789S", None), (b"S", None), (b"1x", None), (b"-1S", None), (b"", None),
])
def test_grpc_timeout_values(value, seconds):
    got = hs.grpc_timeout(value)
    assert got == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize("headers, why", [
    ([(b":method", b"GET"), (b":scheme", b"http")], "missing"),
    (GET + [(b":path", b"/x")], "duplicate"),
    (GET + [(b":status", b"200")], "unknown pseudo-header"),
    (GET + [(b"X-A", b"1")], "lowercase"),
    (GET + [(b"keep-alive", b"1")], "connection-specific"),
    (GET + [(b"upgrade", b"h2c")], "connection-specific"),
    (GET + [(b"te", b"gzip")], "te other than trailers"),
    (GET + [(b"x-a", b" padded")], "bad value"),
    (GET + [(b"host", b"evil")], "host differs"),
    ([(b":method", b"CONNECT"), (b":authority", b"a:1")], "CONNECT"),
    ([(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")], "after a regular"),
])
def test_malformed_requests_are_stream_errors(headers, why):
    ours, cl = pair()
    cl.send_headers(1, headers, end_stream=True)
    evs, back = exchange(ours, cl)
    assert isinstance(evs[0], hs.Refused) and evs[0].status is None and why in evs[0].reason, evs
    assert any(isinstance(e, h2.events.StreamReset) and e.error_code == ErrorCodes.PROTOCOL_ERROR
               for e in back)
    # the connection goes on
    cl.send_headers(3, GET, end_stream=True)
    evs, _ = exchange(ours, cl)
    assert isinstance(evs[0], hs.Request) and evs[0].stream_id == 3


def test_a_path_that_cannot_be_normalized_gets_its_status():
    ours, cl = pair()
    cl.send_headers(1, GET[:3] + [(b":path", b"/a%2Fb")], end_stream=True)
    evs, _ = exchange(ours, cl)
    assert isinstance(evs[0], hs.Refused) and evs[0].status == 400


def test_stream_window_comes_back_only_when_credited():
    ours, cl = pair(hs.H2Limits(stream_window=1000))
    cl.send_headers(1, [(b":method", b"POST"), *GET[1:]])
    cl.send_data(1, b"x" * 1000)
    evs, _ = exchange(ours, cl)
    body = [e for e in evs if isinstance(e, hs.Body)]
    assert body == [hs.Body(1, b"x" * 1000, 1000)]
    assert cl.local_flow_control_window(1) == 0  # not given back: the bytes have not gone on
    ours.credit(1, 1000)
    cl.receive_data(ours.data_to_send())
    assert cl.local_flow_control_window(1) == 1000


def test_stream_credit_goes_back_by_half_windows_and_not_after_the_peer_ended():
    """No WINDOW_UPDATE per DATA frame: credit waits for half the window
    (the sender still has the other half); none for a stream that ended."""
    ours, cl = pair(hs.H2Limits(stream_window=1000))
    cl.send_headers(1, [(b":method", b"POST"), *GET[1:]])
    cl.send_data(1, b"x" * 1000)
    exchange(ours, cl)
    ours.credit(1, 300)
    assert ours.data_to_send() == b""  # kept
    assert cl.local_flow_control_window(1) == 0
    ours.credit(1, 300)
    cl.receive_data(ours.data_to_send())
    assert cl.local_flow_control_window(1) == 600  # both credits, one frame
    cl.send_data(1, b"y" * 10, end_stream=True)
    exchange(ours, cl)
    ours.credit(1, 400)
    ours.credit(1, 10)
    assert ours.data_to_send() == b""  # the client sends nothing more on it
    assert not ours._owed


def test_output_waits_for_the_window_and_reports_its_credit():
    ours, cl = pair()
    cl.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    cl.send_headers(1, GET, end_stream=True)
    exchange(ours, cl)
    ours.respond(1, 200, [(b"content-type", b"text/plain")], False)
    ours.send_data(1, b"0123456789abcdef", True, credit="token")
    assert ours.buffered == 6 and ours.drained() == []
    back = cl.receive_data(ours.data_to_send())
    assert b"".join(e.data for e in back if isinstance(e, h2.events.DataReceived)) == b"0123456789"
    cl.increment_flow_control_window(100, stream_id=1)
    exchange(ours, cl)
    assert ours.buffered == 0 and ours.drained() == ["token"]


def test_trailers_go_after_the_buffered_data():
    ours, cl = pair()
    cl.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4})
    cl.send_headers(1, GET, end_stream=True)
    exchange(ours, cl)
    ours.respond(1, 200, [(b"content-type", b"application/grpc")], False)
    ours.send_data(1, b"12345678")
    ours.send_trailers(1, [(b"grpc-status", b"0")])
    back = cl.receive_data(ours.data_to_send())
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in back)
    cl.increment_flow_control_window(10, stream_id=1)
    _, back = exchange(ours, cl)
    tr = [e for e in back if isinstance(e, h2.events.TrailersReceived)]
    assert tr and tr[0].headers == [(b"grpc-status", b"0")]


def test_rapid_reset_bucket():
    ours, cl = pair(hs.H2Limits(resets_burst=5, resets_per_s=1.0))
    got = []
    for i in range(10):
        cl.send_headers(1 + 2 * i, GET, end_stream=False)
        cl.reset_stream(1 + 2 * i)
        got += ours.feed(cl.data_to_send(), 0.0)
    assert isinstance(got[-1], hs.Broken) and "rapid reset" in got[-1].reason
    back = cl.receive_data(ours.data_to_send())
    assert [e.error_code for e in back if isinstance(e, h2.events.ConnectionTerminated)] == [
        ErrorCodes.ENHANCE_YOUR_CALM]


def test_resets_at_a_sustainable_rate_are_fine():
    ours, cl = pair(hs.H2Limits(resets_burst=5, resets_per_s=10.0))
    for i in range(50):
        cl.send_headers(1 + 2 * i, GET, end_stream=False)
        cl.reset_stream(1 + 2 * i)
        evs = ours.feed(cl.data_to_send(), i * 0.2)  # 5 a second
        assert not any(isinstance(e, hs.Broken) for e in evs)


def _over_the_limit(limit: int):
    """Our side advertising ``limit`` streams; an h2 client told it may open 1000."""
    ours, cl = pair(hs.H2Limits(max_concurrent_streams=limit))
    cl.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    cl.remote_settings.acknowledge()
    return ours, cl


def test_a_stream_past_the_limit_is_refused_and_the_others_go_on():
    ours, cl = _over_the_limit(2)
    hdr = [*GET, (b"x-big", b"v" * 300)]  # indexed by the peer's encoder: HPACK must stay in step
    for sid in (1, 3, 5):
        cl.send_headers(sid, hdr, end_stream=False)
    cl.send_data(5, b"x" * 1000, end_stream=True)  # sent before the client could see the refusal
    evs = ours.feed(cl.data_to_send(), 0.0)
    assert [e.stream_id for e in evs if isinstance(e, hs.Request)] == [1, 3]
    assert not any(isinstance(e, (hs.Broken, hs.Body)) for e in evs), evs  # stream 5's DATA dropped
    back = cl.receive_data(ours.data_to_send())
    assert [(e.stream_id, e.error_code) for e in back if isinstance(e, h2.events.StreamReset)] == [
        (5, ErrorCodes.REFUSED_STREAM)]
    ours.respond(1, 200, [], True)  # stream 1 ends both ways: a slot is free again
    cl.end_stream(1)
    evs = ours.feed(cl.data_to_send(), 0.0)
    cl.receive_data(ours.data_to_send())
    cl.send_headers(7, hdr, end_stream=True)  # a slot is free again: served, headers decoded right
    evs = ours.feed(cl.data_to_send(), 0.0)
    reqs = [e for e in evs if isinstance(e, hs.Request)]
    assert [r.stream_id for r in reqs] == [7] and reqs[0].head.path.path == "/b"
    assert ours.h2.refused_streams == 1


def test_a_client_that_keeps_opening_past_the_limit_is_calmed():
    ours, cl = _over_the_limit(1)
    ours.limits = hs.H2Limits(max_concurrent_streams=1)
    ours._resets = hs._Bucket(5, 1.0)  # noqa: SLF001 - a small rapid-reset bucket
    cl.send_headers(1, GET, end_stream=False)
    got = ours.feed(cl.data_to_send(), 0.0)
    for i in range(1, 10):
        cl.send_headers(1 + 2 * i, GET, end_stream=True)
        got += ours.feed(cl.data_to_send(), 0.0)
    assert isinstance(got[-1], hs.Broken) and "concurrent-stream limit" in got[-1].reason
    back = cl.receive_data(ours.data_to_send())
    assert [e.error_code for e in back if isinstance(e, h2.events.ConnectionTerminated)] == [
        ErrorCodes.ENHANCE_YOUR_CALM]


def test_client_side_response_trailers_and_goaway():
    ours = hs.ClientSide()
    srv = peer(client_side=False)
    srv.receive_data(ours.data_to_send())
    ours.feed(srv.data_to_send(), 0.0)
    srv.receive_data(ours.data_to_send())
    sid = ours.open_stream(GET, True)
    srv.receive_data(ours.data_to_send())
    srv.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    srv.send_data(sid, b"abc")
    srv.send_headers(sid, [(b"grpc-status", b"14"), (b"grpc-message", b"down")], end_stream=True)
    srv.close_connection(last_stream_id=sid)
    evs = ours.feed(srv.data_to_send(), 0.0)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["ResponseHead", "Body", "Trailers", "End", "GoAway"], kinds
    assert evs[2].headers == [(b"grpc-status", b"14"), (b"grpc-message", b"down")]
    assert ours.capacity == 0  # no new stream on a connection that is going away
    ours.credit(sid, 3)  # still possible after the peer's GOAWAY (h2 alone would refuse)


def test_a_never_indexed_field_is_forwarded_never_indexed():
    """RFC 7541 7.1.3: an intermediary re-encodes a never-indexed field (a
    client's credential, say) never-indexed; the field reaches the
    upstream so, and neither table holds it."""
    from hpack import HeaderTuple, NeverIndexedHeaderTuple

    ours, cl = pair()
    cl.send_headers(1, [*GET, NeverIndexedHeaderTuple(b"authorization", b"Bearer s3cret"),
                        (b"accept", b"*/*")], end_stream=True)
    evs, _ = exchange(ours, cl)
    (req,) = [e for e in evs if isinstance(e, hs.Request)]
    fwd = hs.forward_headers(req.head.headers)
    assert [type(h) for h in fwd] == [NeverIndexedHeaderTuple, HeaderTuple]
    up = hs.ClientSide()
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    srv.initiate_connection()
    up.feed(srv.data_to_send(), 0.0)
    pseudo = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    up.open_stream([*pseudo, *fwd], True)
    got = [e for e in srv.receive_data(up.data_to_send()) if isinstance(e, h2.events.RequestReceived)]
    auth = [h for h in got[0].headers if h[0] == b"authorization"]
    assert auth == [(b"authorization", b"Bearer s3cret")] and isinstance(auth[0], NeverIndexedHeaderTuple)
    assert all(n != b"authorization" for n, _ in up.h2.encoder.header_table.dynamic_entries)
    assert all(n != b"authorization" for n, _ in srv.decoder.header_table.dynamic_entries)
