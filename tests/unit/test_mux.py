"""meshlet-mux/1 framing (agent.proxy.mux): scripted conversations between a
client and a server state machine, no sockets; malformed input fuzzed."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import mux as m
from agent.proxy import tunnel


def pair(
    max_streams: int = m.DEFAULT_MAX_STREAMS, bulk_window: int = m.BULK_WINDOW
) -> tuple[m.MuxConnection, m.MuxConnection]:
    return (
        m.MuxConnection(client=True, bulk_window=bulk_window),
        m.MuxConnection(client=False, max_streams=max_streams, bulk_window=bulk_window),
    )


def pump(a: m.MuxConnection, b: m.MuxConnection) -> list[m.Event]:
    """Move a's pending bytes to b; b's events."""
    return b.receive(a.data_to_send())


def data_of(events: list[m.Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, m.DataReceived) and e.stream_id == sid)


def header() -> bytes:
    return tunnel.encode_request(
        tunnel.TunnelRequest(
            dst=tunnel.Address(tunnel.AF_INET, "10.0.0.2", 80),
            identity="spiffe://cluster.local/ns/a/sa/b",
        )
    )


def test_open_carries_the_tunnel_header_then_data_both_ways():
    c, s = pair()
    sid = c.open_stream(header())
    assert c.send_data(sid, b"GET / HTTP/1.1\r\n\r\n") == 18
    ev = pump(c, s)
    assert ev[0] == m.StreamOpened(sid, header())
    assert data_of(ev, sid) == b"GET / HTTP/1.1\r\n\r\n"
    assert isinstance(tunnel.RequestDecoder().feed(ev[0].data), tunnel.Decoded)
    s.send_data(sid, b"HTTP/1.1 200 OK\r\n\r\n")
    assert data_of(pump(s, c), sid) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_streams_interleave_and_frames_split_at_any_byte():
    c, s = pair()
    ids = [c.open_stream(b"h%d" % i) for i in range(3)]
    for round_ in range(4):
        for sid in reversed(ids):
            c.send_data(sid, b"%d:%d;" % (sid, round_))
    wire = c.data_to_send()
    events: list[m.Event] = []
    for i in range(len(wire)):  # one byte at a time: frames straddle every boundary
        events += s.receive(wire[i : i + 1])
    assert [e.stream_id for e in events if isinstance(e, m.StreamOpened)] == ids
    for sid in ids:
        assert data_of(events, sid) == b"".join(b"%d:%d;" % (sid, r) for r in range(4))


def test_half_close_each_way_keeps_the_other_direction():
    c, s = pair()
    sid = c.open_stream()
    c.send_data(sid, b"request")
    c.send_fin(sid)
    ev = pump(c, s)
    assert ev[-1] == m.StreamEnded(sid) and data_of(ev, sid) == b"request"
    assert c.send_data(sid, b"more") == 0  # our side is finished
    s.send_data(sid, b"response after the client's FIN")
    assert data_of(pump(s, c), sid) == b"response after the client's FIN"
    assert sid in c.streams and sid in s.streams
    s.send_fin(sid)
    assert pump(s, c) == [m.StreamEnded(sid)]
    assert sid not in c.streams and sid not in s.streams  # both directions done: forgotten


def test_server_half_closes_first():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    s.send_fin(sid)
    assert pump(s, c) == [m.StreamEnded(sid)]
    c.send_data(sid, b"still sending")
    assert data_of(pump(c, s), sid) == b"still sending"


def test_reset_propagates_and_late_frames_are_ignored():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, b"in flight")
    in_flight = c.data_to_send()
    s.reset_stream(sid, m.ErrorCode.CANCEL, "pod went away")
    ev = pump(s, c)
    assert ev == [m.StreamReset(sid, m.ErrorCode.CANCEL, "pod went away")]
    assert s.receive(in_flight) == []  # the DATA crossed the RST: ignored, not an error
    assert c.send_data(sid, b"x") == 0


def test_window_exhaustion_then_update_and_a_stream_larger_than_the_window():
    c, s = pair(bulk_window=m.INITIAL_WINDOW)  # a receiver that never grows the window (an older peer)
    sid = c.open_stream()
    pump(c, s)
    blob = bytes(range(256)) * (3 * m.INITIAL_WINDOW // 256 + 7)  # > 3 windows
    sent = c.send_data(sid, blob)
    assert sent == m.INITIAL_WINDOW and c.send_window(sid) == 0
    got = bytearray(data_of(pump(c, s), sid))
    assert len(got) == m.INITIAL_WINDOW
    assert c.send_data(sid, blob[sent:]) == 0  # nothing more until the receiver credits
    credited = 0
    rounds = 0
    while sent < len(blob):
        rounds += 1
        s.consumed(sid, len(got) - credited)  # the application took everything delivered
        credited = len(got)
        ev = pump(s, c)
        assert ev == [m.WindowUpdated(sid)]
        n = c.send_data(sid, blob[sent:])
        assert 0 < n <= m.INITIAL_WINDOW
        sent += n
        got += data_of(pump(c, s), sid)
    assert rounds >= 3
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()


def test_data_beyond_the_window_is_refused_even_from_a_well_formed_peer():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, b"x" * m.INITIAL_WINDOW)
    pump(c, s)
    with pytest.raises(m.MuxError) as ei:
        s.receive(m.frame(m.FrameType.DATA, 0, sid, b"y"))  # a peer that ignores the window
    assert ei.value.code == m.ErrorCode.FLOW_CONTROL


def test_a_paused_bulk_stream_does_not_block_a_request_stream():
    c, s = pair()
    bulk = c.open_stream()
    req = c.open_stream()
    pump(c, s)
    c.send_data(bulk, b"B" * (2 * m.INITIAL_WINDOW))  # the receiver never consumes it
    pump(c, s)
    assert c.send_window(bulk) == 0
    assert c.send_data(req, b"small request") == 13
    assert data_of(pump(c, s), req) == b"small request"


def test_updates_are_batched():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, b"x" * 100)
    pump(c, s)
    s.consumed(sid, 100)
    assert s.data_to_send() == b""  # below the batch size: no WINDOW_UPDATE per read


def test_many_streams_and_the_concurrency_limit():
    c, s = pair(max_streams=10)
    c.max_streams = 1000
    ids = [c.open_stream(b"%d" % i) for i in range(12)]
    ev = pump(c, s)
    opened = [e.stream_id for e in ev if isinstance(e, m.StreamOpened)]
    assert opened == ids[:10] and s.refused == 2
    back = pump(s, c)
    assert [e.stream_id for e in back if isinstance(e, m.StreamReset)] == ids[10:]
    assert all(e.code == m.ErrorCode.REFUSED for e in back if isinstance(e, m.StreamReset))


def test_client_respects_its_limit():
    c = m.MuxConnection(client=True, max_streams=3)
    for _ in range(3):
        c.open_stream()
    assert not c.can_open()
    with pytest.raises(m.MuxError):
        c.open_stream()


def test_a_thousand_streams_each_with_its_own_bytes():
    c, s = pair(max_streams=1000)
    c.max_streams = 1000
    ids = [c.open_stream() for _ in range(1000)]
    for sid in ids:
        c.send_data(sid, sid.to_bytes(4, "big") * 3)
        c.send_fin(sid)
    ev = pump(c, s)
    for sid in ids:
        assert data_of(ev, sid) == sid.to_bytes(4, "big") * 3
    assert sum(isinstance(e, m.StreamEnded) for e in ev) == 1000


def test_goaway_drains():
    c, s = pair()
    a = c.open_stream()
    pump(c, s)
    s.goaway(m.ErrorCode.NO_ERROR, "certificate rotated")
    ev = pump(s, c)
    assert ev == [m.GoAwayReceived(a, m.ErrorCode.NO_ERROR, "certificate rotated")]
    assert not c.can_open()
    c.send_data(a, b"open streams finish")
    assert data_of(pump(c, s), a) == b"open streams finish"


def test_open_after_goaway_is_refused():
    c, s = pair()
    c.open_stream()
    pump(c, s)
    s.goaway()
    s.data_to_send()
    b = c.open_stream()  # crossed the GOAWAY on the wire
    assert pump(c, s) == []
    ev = s.data_to_send()
    assert c.receive(ev) == [m.StreamReset(b, m.ErrorCode.REFUSED, "draining (GOAWAY sent)")]


def test_a_drain_notice_serves_opens_already_on_the_wire():
    """The graceful drain: the notice (LAST_STREAM = max) stops new streams,
    yet an OPEN that crossed it on the wire is served, not refused; the
    final GOAWAY then names the real last stream."""
    c, s = pair()
    a = c.open_stream()
    pump(c, s)
    s.goaway_notice("worker hand-over")
    notice = s.data_to_send()
    b = c.open_stream()  # crossed the notice on the wire
    ev = pump(c, s)
    assert [e for e in ev if isinstance(e, m.StreamOpened)] == [m.StreamOpened(b, b"")]
    assert s.data_to_send() == b""  # no RST REFUSED
    assert c.receive(notice) == [m.GoAwayReceived(m._MAX_STREAM_ID, m.ErrorCode.NO_ERROR, "worker hand-over")]
    assert not c.can_open()
    s.goaway(m.ErrorCode.NO_ERROR, "worker hand-over")
    assert pump(s, c) == [m.GoAwayReceived(b, m.ErrorCode.NO_ERROR, "worker hand-over")]
    for sid in (a, b):  # both finish
        c.send_data(sid, b"done")
        assert data_of(pump(c, s), sid) == b"done"


def test_a_mutable_buffer_is_copied_and_immutable_bytes_are_not():
    """send_data keeps views of bytes (no copy before the one join) but
    copies a buffer its caller may reuse: what was sent never changes."""
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    buf = bytearray(b"x" * 100)
    c.send_data(sid, buf)
    buf[:] = b"y" * 100  # the caller reuses its buffer before the bytes went out
    c.send_data(sid, memoryview(b"abcdef")[2:])
    assert data_of(pump(c, s), sid) == b"x" * 100 + b"cdef"


def test_ping_is_echoed():
    c, s = pair()
    c.ping(b"12345678")
    assert pump(c, s) == []
    assert pump(s, c) == [m.PingAcked(b"12345678")]


# ---- connection errors: fail closed


def _server_after_open() -> m.MuxConnection:
    c, s = pair()
    c.open_stream()
    pump(c, s)
    return s


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (m.frame(9, 0, 1), m.ErrorCode.PROTOCOL),  # unknown type
        (m.frame(m.FrameType.DATA, 0, 7, b"x"), m.ErrorCode.PROTOCOL),  # never-opened stream
        (m.frame(m.FrameType.WINDOW_UPDATE, 0, 5, struct.pack("!I", 1)), m.ErrorCode.PROTOCOL),
        (m.frame(m.FrameType.DATA, 0, 0, b"x"), m.ErrorCode.PROTOCOL),  # stream frame on stream 0
        (m.frame(m.FrameType.OPEN, 0, 1), m.ErrorCode.PROTOCOL),  # id reused
        (m.frame(m.FrameType.PING, 0, 1, b"12345678"), m.ErrorCode.PROTOCOL),  # PING on a stream
        (m.frame(m.FrameType.PING, 0, 0, b"1234"), m.ErrorCode.FRAME_SIZE),
        (m.frame(m.FrameType.FIN, 0, 1, b"x"), m.ErrorCode.FRAME_SIZE),
        (m.frame(m.FrameType.RST, 0, 1, b"x"), m.ErrorCode.FRAME_SIZE),
        (m.frame(m.FrameType.WINDOW_UPDATE, 0, 1, struct.pack("!I", 0)), m.ErrorCode.PROTOCOL),
        (m.frame(m.FrameType.WINDOW_UPDATE, 0, 1, struct.pack("!I", 2**31 - 1)), m.ErrorCode.FLOW_CONTROL),
        (m.frame(m.FrameType.DATA, 0, 1, b"x" * m.MAX_FRAME) * 5, m.ErrorCode.FLOW_CONTROL),  # > window
        (m.frame(m.FrameType.OPEN, 0, 2, b"h" * (m.MAX_OPEN_PAYLOAD + 1)), m.ErrorCode.FRAME_SIZE),
        (m.frame(m.FrameType.DATA, 0, 0x80000001, b"x"), m.ErrorCode.PROTOCOL),  # reserved bit
        (m.frame(m.FrameType.FIN, 0, 1) * 2, m.ErrorCode.PROTOCOL),  # second FIN
        (m.frame(m.FrameType.FIN, 0, 1) + m.frame(m.FrameType.DATA, 0, 1, b"late"), m.ErrorCode.PROTOCOL),
    ],
)
def test_malformed_input_is_a_connection_error(wire, code):
    s = _server_after_open()
    with pytest.raises(m.MuxError) as ei:
        s.receive(wire)
    assert ei.value.code == code
    # fail closed: a GOAWAY naming the error is queued, and nothing more is accepted
    out = s.data_to_send()
    assert out[3] == m.FrameType.GOAWAY and struct.unpack("!I", out[13:17])[0] == code
    with pytest.raises(m.MuxError):
        s.receive(m.frame(m.FrameType.PING, 0, 0, b"12345678"))


def test_oversized_frame_is_refused_from_its_header_alone():
    s = _server_after_open()
    n = m.MAX_FRAME + 1
    with pytest.raises(m.MuxError) as ei:
        s.receive(bytes([n >> 16, (n >> 8) & 0xFF, n & 0xFF, m.FrameType.DATA, 0, 0, 0, 0, 1]))
    assert ei.value.code == m.ErrorCode.FRAME_SIZE


def test_the_server_opens_nothing():
    c, s = pair()
    c.open_stream()
    pump(c, s)
    with pytest.raises(m.MuxError):
        c.receive(m.frame(m.FrameType.OPEN, 0, 2))
    with pytest.raises(m.MuxError):
        s.open_stream()


def test_goaway_may_not_raise_its_last_stream():
    c, s = pair()
    c.open_stream()
    pump(c, s)
    c.receive(m.frame(m.FrameType.GOAWAY, 0, 0, struct.pack("!II", 0, 0)))
    with pytest.raises(m.MuxError):
        c.receive(m.frame(m.FrameType.GOAWAY, 0, 0, struct.pack("!II", 1, 0)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_never_crashes_otherwise(data):
    s = _server_after_open()
    try:
        events = s.receive(data)
    except m.MuxError:
        assert s.closed
        return
    assert all(isinstance(e, m.Event.__args__) for e in events)  # type: ignore[attr-defined]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=3000)), max_size=40), st.integers(1, 4096))
def test_random_interleavings_deliver_every_stream_intact(writes, chunk):
    c, s = pair()
    ids = [c.open_stream() for _ in range(4)]
    want = {sid: bytearray() for sid in ids}
    for i, payload in writes:
        n = c.send_data(ids[i], payload)
        want[ids[i]] += payload[:n]
    wire = c.data_to_send()
    events: list[m.Event] = []
    for off in range(0, len(wire), chunk):
        events += s.receive(wire[off : off + chunk])
    for sid in ids:
        assert data_of(events, sid) == bytes(want[sid])


def test_a_bulk_stream_gets_the_bigger_window_once_and_no_more():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    assert c.send_data(sid, b"x" * (2 * m.BULK_WINDOW)) == m.INITIAL_WINDOW
    pump(c, s)
    s.consumed(sid, m.INITIAL_WINDOW - 1)  # not yet a whole initial window: credited as usual
    assert pump(s, c) == [m.WindowUpdated(sid)]
    assert c.send_window(sid) == m.INITIAL_WINDOW - 1
    s.consumed(sid, 1)  # the whole initial window moved: the grant (the byte waits for its batch)
    assert pump(s, c) == [m.WindowUpdated(sid)]
    assert c.send_window(sid) == m.BULK_WINDOW - 1
    s.consumed(sid, 10)  # no second grant
    assert s.data_to_send() == b""
    # The sender may fill exactly the grown window, and not a byte more.
    assert c.send_data(sid, b"y" * (2 * m.BULK_WINDOW)) == m.BULK_WINDOW - 1
    pump(c, s)
    with pytest.raises(m.MuxError) as ei:
        s.receive(m.frame(m.FrameType.DATA, 0, sid, b"z"))
    assert ei.value.code == m.ErrorCode.FLOW_CONTROL


def test_a_bulk_stream_is_credited_half_its_window_at_a_time():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, b"x" * m.INITIAL_WINDOW)
    pump(c, s)
    s.consumed(sid, m.INITIAL_WINDOW)
    pump(s, c)
    per_update = m.BULK_WINDOW // 2 // 65536
    updates = []
    for _ in range(2 * per_update):
        c.send_data(sid, b"x" * 65536)
        pump(c, s)
        s.consumed(sid, 65536)
        wire = s.data_to_send()
        updates.append(len(wire))
        c.receive(wire)
    # 64 KiB reads: one WINDOW_UPDATE per half of the grown window, not per
    # read (the first comes 4 reads early: the initial window's last 256 KiB
    # were still unacknowledged when the window grew)
    first = [0] * (per_update - 5) + [m.HEADER_SIZE + 4]
    one = [0] * (per_update - 1) + [m.HEADER_SIZE + 4]
    assert updates[: len(first) + per_update] == first + one


def test_grown_windows_stay_within_the_connection_budget_and_come_back_when_streams_end():
    extra = m.BULK_WINDOW - m.INITIAL_WINDOW
    c = m.MuxConnection(client=True)
    s = m.MuxConnection(client=False, bulk_budget=extra + extra // 2)
    ids = [c.open_stream() for _ in range(4)]
    pump(c, s)

    def make_bulk(sid: int) -> int:
        c.send_data(sid, b"x" * m.INITIAL_WINDOW)
        pump(c, s)
        s.consumed(sid, m.INITIAL_WINDOW)
        pump(s, c)
        window = s.streams[sid].window
        # nothing in flight: what the sender may send is the window less what waits for its batch
        assert c.send_window(sid) == window - s.streams[sid].unacked
        return window

    assert make_bulk(ids[0]) == m.BULK_WINDOW  # the whole grant
    assert make_bulk(ids[1]) == m.INITIAL_WINDOW + extra // 2  # what is left of the budget
    assert make_bulk(ids[2]) == m.INITIAL_WINDOW  # none left: it stays at the initial window
    assert s.granted == s.bulk_budget
    c.reset_stream(ids[0])  # the first ends: its grant goes back
    pump(c, s)
    assert s.granted == extra // 2
    assert make_bulk(ids[3]) == m.BULK_WINDOW
    for sid in ids[1:]:  # both directions finished: forgotten, grants back
        c.send_fin(sid)
        s.send_fin(sid)
    pump(c, s)
    pump(s, c)
    assert s.granted == 0 and not s.streams


def test_a_growing_receiver_and_a_fixed_window_peer_interoperate_both_ways():
    # The grant is plain WINDOW_UPDATE credit: a peer of the last release (whose
    # receive window stays at INITIAL_WINDOW) sends and receives unchanged.
    for c, s in (
        (m.MuxConnection(client=True, bulk_window=m.INITIAL_WINDOW), m.MuxConnection(client=False)),
        (m.MuxConnection(client=True), m.MuxConnection(client=False, bulk_window=m.INITIAL_WINDOW)),
    ):
        _roundtrip_1mib(c, s)


def _roundtrip_1mib(c: m.MuxConnection, s: m.MuxConnection) -> None:
    sid = c.open_stream()
    pump(c, s)
    got = bytearray()
    blob = bytes(range(256)) * 4096  # 1 MiB
    sent = 0
    while sent < len(blob):
        sent += c.send_data(sid, blob[sent : sent + 100_000])
        part = data_of(pump(c, s), sid)
        got += part
        s.consumed(sid, len(part))
        pump(s, c)
    assert got == blob


def test_a_data_frame_split_across_reads_is_delivered_as_it_arrives_without_copies():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, bytes(range(256)) * 256)  # one 64 KiB frame
    wire = c.data_to_send()
    first = wire[: m.HEADER_SIZE + 1000]
    ev1 = s.receive(first)
    assert ev1 == [m.DataReceived(sid, wire[9:1009])]
    assert isinstance(ev1[0].data, memoryview) and ev1[0].data.obj is first  # a view, not a copy
    rest = wire[m.HEADER_SIZE + 1000 :]
    ev2 = s.receive(rest[:5]) + s.receive(rest[5:])
    assert b"".join(e.data for e in ev2) == wire[1009:]
    assert s._buf == b""  # nothing carried over: payload bytes are never buffered


def test_a_mutable_read_buffer_is_not_aliased_by_delivered_payloads():
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.send_data(sid, b"abc")
    buf = bytearray(c.data_to_send())
    ev = s.receive(buf)
    buf[-3:] = b"XYZ"  # the caller reuses its buffer
    assert data_of(ev, sid) == b"abc"
