"""W3C trace context for a proxy hop: table tests and fuzzing."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from agent.proxy.tracing import (
    MAX_TRACESTATE, HopContext, TraceParent, hop, new_span_id, new_trace_id, parse_traceparent,
)

TID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PID = b"00f067aa0ba902b7"
VALID = b"00-%s-%s-01" % (TID, PID)


@pytest.mark.parametrize("value,ok", [
    (VALID, True),
    (VALID.decode(), True),
    (b" " + VALID + b" ", True),
    (b"00-%s-%s-00" % (TID, PID), True),
    (b"01-%s-%s-01-future" % (TID, PID), True),  # higher version, extra field
    (b"01-%s-%s-01" % (TID, PID), True),
    (b"01-%s-%s-01x" % (TID, PID), False),
    (b"00-%s-%s-01-x" % (TID, PID), False),  # version 00 is exactly 55 chars
    (b"ff-%s-%s-01" % (TID, PID), False),
    (b"00-%s-%s-01" % (b"0" * 32, PID), False),
    (b"00-%s-%s-01" % (TID, b"0" * 16), False),
    (b"00-%s-%s-01" % (TID.upper(), PID), False),
    (b"00-%s-%s-01" % (TID[:-1], PID), False),
    (b"00-%s-%s-1" % (TID, PID), False),
    (b"00_%s-%s-01" % (TID, PID), False),
    (b"", False),
    ("00-\u00e9", False),
])
def test_parse_table(value, ok):
    tp = parse_traceparent(value)
    assert (tp is not None) is ok
    if ok:
        assert tp.trace_id == TID and tp.parent_id == PID


def test_flags_and_header():
    tp = parse_traceparent(VALID)
    assert tp.sampled and tp.header() == VALID
    assert not parse_traceparent(b"00-%s-%s-00" % (TID, PID)).sampled
    c = tp.child(b"1" * 16)
    assert c.trace_id == TID and c.parent_id == b"1" * 16 and c.flags == b"01"


def test_hop_propagates_trace_with_a_new_span():
    ctx = hop([(b"Host", b"a"), (b"TraceParent", VALID), (b"tracestate", b"a=1"), (b"tracestate", b"b=2"),
               (b"X-Request-Id", b"abc-123")])
    assert ctx.incoming.parent_id == PID
    assert ctx.traceparent.trace_id == TID and ctx.traceparent.flags == b"01"
    assert ctx.span_id != PID and re.fullmatch(rb"[0-9a-f]{16}", ctx.span_id)
    assert ctx.tracestate == b"a=1,b=2"
    assert ctx.request_id == b"abc-123" and not ctx.request_id_generated
    names = [n for n, _ in ctx.headers()]
    assert names == [b"traceparent", b"tracestate", b"x-request-id"]
    assert parse_traceparent(ctx.headers()[0][1]) == ctx.traceparent


@pytest.mark.parametrize("headers", [
    [],
    [(b"traceparent", b"garbage"), (b"tracestate", b"a=1")],
    [(b"traceparent", VALID), (b"traceparent", VALID)],  # two lines: invalid
])
def test_hop_starts_a_new_trace(headers):
    ctx = hop(headers)
    assert ctx.incoming is None and ctx.tracestate is None
    assert ctx.traceparent.flags == b"00" and ctx.traceparent.trace_id != TID
    assert parse_traceparent(ctx.traceparent.header()) == ctx.traceparent
    assert ctx.request_id_generated and uuid.UUID(ctx.request_id.decode()).version == 4


def test_new_ids_differ():
    assert len({new_trace_id() for _ in range(50)}) == 50
    assert len({new_span_id() for _ in range(50)}) == 50


@pytest.mark.parametrize("rid", [b"", b"a" * 129, b"has space", b"\x01"])
def test_bad_request_id_replaced(rid):
    ctx = hop([(b"x-request-id", rid)])
    assert ctx.request_id_generated and ctx.request_id != rid


def test_tracestate_bounded():
    members = [b"k%d=%s" % (i, b"v" * 20) for i in range(40)]
    ctx = hop([(b"traceparent", VALID), (b"tracestate", b",".join(members))])
    assert len(ctx.tracestate) <= MAX_TRACESTATE
    kept = ctx.tracestate.split(b",")
    assert kept == members[:len(kept)] and len(kept) <= 32
    assert hop([(b"traceparent", VALID), (b"tracestate", b"a=\x01")]).tracestate is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_parse_never_raises(data):
    tp = parse_traceparent(data)
    if tp is not None:
        assert tp.trace_id != b"0" * 32 and tp.parent_id != b"0" * 16


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"traceparent", b"tracestate", b"x-request-id", b"x"]),
                          st.binary(max_size=80)), max_size=6))
def test_hop_always_valid(headers):
    ctx = hop(headers)
    assert isinstance(ctx, HopContext)
    assert parse_traceparent(ctx.traceparent.header()) == ctx.traceparent
    assert ctx.tracestate is None or len(ctx.tracestate) <= MAX_TRACESTATE
    assert re.fullmatch(rb"[\x21-\x7e]{1,128}", ctx.request_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16).map(lambda b: b.hex().encode()),
       st.binary(min_size=8, max_size=8).map(lambda b: b.hex().encode()),
       st.binary(min_size=1, max_size=1).map(lambda b: b.hex().encode()))
def test_valid_round_trip(t, p, f):
    tp = parse_traceparent(b"00-%s-%s-%s" % (t, p, f))
    if t == b"0" * 32 or p == b"0" * 16:
        assert tp is None
    else:
        assert tp == TraceParent(t, p, f)


def _parse_reference(value):
    """parse_traceparent as first written (regex groups): the slicing version must agree."""
    tp_re = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    value = value.strip(b" \t")
    m = tp_re.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == b"ff":
        return None
    if version == b"00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55:56] != b"-":
        return None
    if trace_id == b"0" * 32 or parent_id == b"0" * 16:
        return None
    return TraceParent(trace_id, parent_id, flags)


_TP_PIECES = st.sampled_from([b"00", b"01", b"ff", b"fe", b"0A", b"-", b"-", b"-", TID, PID, b"0" * 32, b"0" * 16,
                              b"01", b"x", b" ", b"\t", b"-future", TID.upper(), b"a", b"0"])


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.lists(_TP_PIECES, max_size=9).map(b"".join),
                 st.tuples(st.sampled_from([b"00", b"01", b"ff", b"cc"]), st.sampled_from([TID, b"0" * 32, TID[:-1]]),
                           st.sampled_from([PID, b"0" * 16]), st.sampled_from([b"00", b"01", b"1"]),
                           st.sampled_from([b"", b"-", b"-x", b"x", b" ", b"-0-"])).map(
                     lambda t: b"%s-%s-%s-%s%s" % t),
                 st.binary(max_size=70), st.text(max_size=60)))
def test_parse_equals_the_reference(value):
    assert parse_traceparent(value) == _parse_reference(value)


def test_request_id_is_uuid4_text():
    from agent.proxy.tracing import new_request_id
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200
    for rid in ids:
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == rid


def test_the_first_hop_ids_come_from_one_draw_and_stay_valid(monkeypatch):
    """A request with neither traceparent nor x-request-id (the usual first
    hop) gets all three ids from one random draw: each as valid and as
    distinct as the separate generators' (uuid4 request id included)."""
    from agent.proxy import tracing
    ctxs = [hop([(b"host", b"x")]) for _ in range(200)]
    for c in ctxs:
        assert re.fullmatch(rb"[0-9a-f]{32}", c.traceparent.trace_id) and c.traceparent.trace_id != b"0" * 32
        assert re.fullmatch(rb"[0-9a-f]{16}", c.traceparent.parent_id) and c.traceparent.parent_id != b"0" * 16
        u = uuid.UUID(c.request_id.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == c.request_id
        assert c.request_id_generated and c.incoming is None
    for part in (lambda c: c.traceparent.trace_id, lambda c: c.traceparent.parent_id, lambda c: c.request_id):
        assert len({part(c) for c in ctxs}) == 200
    # a draw whose trace or span id would be all zeros falls back to the generators
    monkeypatch.setattr(tracing, "_bits", lambda n: 0 if n == 320 else (1 << n) - 1)
    c = hop([])
    assert c.traceparent.trace_id == b"f" * 32 and c.traceparent.parent_id == b"f" * 16
    assert uuid.UUID(c.request_id.decode()).version == 4


def test_forked_children_do_not_repeat_ids():
    import os
    r, w = os.pipe()
    pids = []
    try:
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    os.write(w, new_trace_id() + new_span_id())
                finally:
                    os._exit(0)
            pids.append(pid)
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    assert len(data) == 96
    assert data[:48] != data[48:]
    assert new_trace_id() not in (data[:32], data[48:80])
