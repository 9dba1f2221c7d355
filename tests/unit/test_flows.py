"""Flow table logic without a kernel: ring buffer records on a fake mapping,
record decoding, leg linking, resolution, filters, sorting, formatting."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.datapath import abi, bpfsys, flowtable
from agent.datapath.flowtable import FLOW_SIZE, FlowReader, decode_flow
from agent.datapath.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, RingBuffer, record_span
from agent.observe.flowviews import (
    FlowFilter,
    Resolver,
    build_views,
    format_table,
    human_bytes,
    human_us,
    link_legs,
    parse_since,
    sort_views,
)

# --- ring buffer -------------------------------------------------------------------------


class FakeRing:
    """A producer writing the kernel's record layout into plain bytearrays
    (data area mapped once: the consumer must handle wrap-around itself)."""

    PAGE = 4096

    def __init__(self, size: int = 256):
        self.size = size
        self.cons = bytearray(8)
        self.prod = bytearray(self.PAGE + size)
        self.pos = 0
        self.rb = RingBuffer(self.cons, self.prod, size, self.PAGE)

    def _write(self, off: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.prod[self.PAGE + (off + i) % self.size] = b

    def reserve(self, payload: bytes, flags: int = BUSY_BIT) -> int:
        start = self.pos
        self._write(start % self.size, struct.pack("=II", len(payload) | flags, 0))
        self._write((start + HDR_SIZE) % self.size, payload)
        self.pos += record_span(len(payload))
        struct.pack_into("=Q", self.prod, 0, self.pos)
        return start

    def commit(self, start: int, length: int, discard: bool = False) -> None:
        self._write(start % self.size,
                    struct.pack("=I", length | (DISCARD_BIT if discard else 0)))

    def push(self, payload: bytes, discard: bool = False) -> int:
        start = self.reserve(payload)
        self.commit(start, len(payload), discard)
        return start


def test_ring_drains_records_in_order_and_advances_consumer():
    r = FakeRing()
    r.push(b"one")
    r.push(b"second!!")
    assert r.rb.drain() == [b"one", b"second!!"]
    assert r.rb.consumer_pos == record_span(3) + record_span(8) == 16 + 16
    assert r.rb.drain() == []


def test_ring_record_spans_are_8_byte_aligned():
    assert [record_span(n) for n in (0, 1, 8, 9, 144)] == [8, 16, 16, 24, 152]
    assert record_span(5 | BUSY_BIT | DISCARD_BIT) == 16


def test_ring_stops_at_a_busy_record_and_resumes_after_commit():
    r = FakeRing()
    r.push(b"a" * 10)
    busy = r.reserve(b"b" * 20)
    r.push(b"c" * 5)  # committed, but behind a busy one: must wait
    assert r.rb.drain() == [b"a" * 10]
    assert r.rb.pending() > 0
    r.commit(busy, 20)
    assert r.rb.drain() == [b"b" * 20, b"c" * 5]
    assert r.rb.pending() == 0


def test_ring_skips_discarded_records_but_consumes_their_space():
    r = FakeRing()
    r.push(b"gone", discard=True)
    r.push(b"kept")
    assert r.rb.drain() == [b"kept"]
    assert r.rb.consumer_pos == r.pos


def test_ring_wraps_around_the_end_of_the_data_area():
    r = FakeRing(size=64)
    for i in range(20):  # 20 * 24 bytes: wraps the 64-byte area many times
        payload = bytes([i]) * 13
        r.push(payload)
        assert r.rb.drain() == [payload]
    assert r.rb.consumer_pos == 20 * record_span(13)


def test_ring_header_split_never_happens_but_payload_split_does():
    r = FakeRing(size=64)
    r.push(b"x" * 40)        # 48 bytes: next header at 48
    r.rb.drain()
    payload = bytes(range(30))
    r.push(payload)          # header at 48..55, payload 56..63 then 0..21
    assert r.rb.drain() == [payload]


def test_ring_limit_and_resume():
    r = FakeRing(size=1024)
    for i in range(5):
        r.push(bytes([i]))
    assert r.rb.drain(limit=2) == [b"\x00", b"\x01"]
    assert r.rb.drain() == [b"\x02", b"\x03", b"\x04"]


def test_ring_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        RingBuffer(bytearray(8), bytearray(4096 + 100), 100, 4096)


# --- records -----------------------------------------------------------------------------

def make_raw(role=abi.ROLE_CLIENT, local=("10.244.1.10", 40000), remote=("10.244.1.1", 15001),
             orig=("10.244.1.11", 7000), cookie=1, end_ns=0, **kw) -> bytes:
    f = abi.MlFlow()
    f.cookie = cookie
    f.role = role
    fam, lw = abi.pack_addr(local[0])
    _, rw = abi.pack_addr(remote[0])
    f.family = fam
    for i in range(4):
        f.saddr_be[i], f.daddr_be[i] = lw[i], rw[i]
    f.sport, f.dport = local[1], remote[1]
    if orig:
        ofam, ow = abi.pack_addr(orig[0])
        f.orig_family = ofam
        for i in range(4):
            f.orig_dst_be[i] = ow[i]
        f.orig_dport = orig[1]
    f.start_ns = 1_000_000_000
    f.update_ns = f.end_ns = end_ns
    f.state = abi.TCP_CLOSE if end_ns else 1
    for k, v in kw.items():
        setattr(f, k, v)
    return bytes(f)


def test_flow_struct_is_8_byte_aligned_and_decodes():
    assert FLOW_SIZE == 144 and FLOW_SIZE % 8 == 0
    raw = make_raw(end_ns=3_000_000_000, bytes_acked=10, bytes_received=20, srtt_us=50,
                   rtt_min_us=30, total_retrans=2, workload_id=7)
    f = decode_flow(raw, wall_offset=1000.0)
    assert f["role"] == "client" and f["family"] == 4
    assert f["local"] == ["10.244.1.10", 40000] and f["remote"] == ["10.244.1.1", 15001]
    assert f["orig_dst"] == ["10.244.1.11", 7000]
    assert f["start"] == 1001.0 and f["end"] == 1003.0
    assert (f["bytes_acked"], f["bytes_received"], f["srtt_us"], f["min_rtt_us"],
            f["retransmits"], f["state"], f["workload_id"]) == (10, 20, 50, 30, 2, "CLOSE", 7)
    assert f["evicted"] is False


def test_decode_open_ipv6_flow_and_evicted_flag():
    raw = make_raw(role=abi.ROLE_SERVER, local=("fd00:244:1::11", 7000),
                   remote=("fd00:244:1::1", 50000), orig=None, flags=abi.FLOW_F_EVICTED,
                   rtt_min_us=0xFFFFFFFF)
    f = decode_flow(raw, 0.0)
    assert f["family"] == 6 and f["local"] == ["fd00:244:1::11", 7000]
    assert f["end"] is None and f["state"] == "ESTABLISHED" and f["orig_dst"] is None
    assert f["evicted"] is True and f["min_rtt_us"] == 0


def test_ring_carries_flow_records():
    r = FakeRing(size=512)
    raws = [make_raw(cookie=i, end_ns=2_000_000_000) for i in range(1, 6)]  # wraps 512
    got = []
    for raw in raws:
        r.push(raw)
        got += r.rb.drain()
    assert [decode_flow(g, 0)["cookie"] for g in got] == [1, 2, 3, 4, 5]


def test_reader_keeps_a_bounded_history_of_raw_records_and_decodes_when_read(tmp_path):
    """The closed-flow history holds the kernel's records as bytes (the agent
    keeps it for the node's life: a dict per flow held ~5x the memory), at
    most ``closed_limit`` of them, and hands them out decoded, in order."""
    r = FakeRing(size=1024)
    reader = FlowReader(str(tmp_path), closed_limit=3)
    reader._open_ring = lambda: r.rb  # type: ignore[method-assign]
    live: list[bytes] = []  # what the kernel's live map would hold
    reader._live_raw = lambda: list(live)  # type: ignore[method-assign]
    reader.links = lambda: {}  # type: ignore[method-assign]
    start = reader.cursor()
    raws = [make_raw(cookie=i, end_ns=2_000_000_000, bytes_acked=i * 10) for i in range(1, 6)]
    for raw in raws:
        r.push(raw)
    assert reader.drain() == 5
    assert all(type(x) is bytes and len(x) == FLOW_SIZE for x in reader._closed)
    snap = reader.snapshot()
    assert snap["closed"] == [decode_flow(raw, reader._wall) for raw in raws[2:]]
    assert snap["live"] == [] and snap["reader"]["closed_buffered"] == 3
    assert snap["reader"]["closed_dropped_from_history"] == 2
    seq, events = reader.poll_events(start)
    assert seq == 5 and [(k, f["cookie"]) for k, f in events] == [("closed", 3), ("closed", 4), ("closed", 5)]
    assert reader.poll_events(seq) == (5, [])
    assert reader.poll_events(4) == (5, [("closed", decode_flow(raws[4], reader._wall))])
    live.append(make_raw(cookie=9))
    assert reader.poll_events(seq) == (6, [("new", decode_flow(live[0], reader._wall))])
    assert reader.snapshot()["live"] == [decode_flow(live[0], reader._wall)]
    r.push(b"short")  # not a struct ml_flow: counted, not kept
    assert reader.drain() == 1 and reader.status()["errors"] == 1 and len(reader._closed) == 3


def test_a_live_pod_socket_counts_the_bytes_the_splice_sent_past_it(tmp_path):
    """flowtrack.c adds splice.c's redirected bytes to a pod socket's record
    at close only; the live view adds them too, matched by the socket's own
    4-tuple (the splice maps' key), to that socket only."""
    reader = FlowReader(str(tmp_path))
    spliced = make_raw(cookie=1, bytes_acked=31)
    other = make_raw(cookie=2, local=("10.244.1.10", 40001), bytes_acked=5)
    reader._live_raw = lambda: [spliced, other]  # type: ignore[method-assign]
    key = flowtable.flow_key(spliced)
    k = abi.MlFlowKey.from_buffer_copy(key)
    assert (k.sport, k.dport, k.family) == (40000, 15001, abi.AF_INET) and bytes(k.pad) == b"\0" * 3
    assert abi.unpack_addr(k.family, k.saddr_be) == "10.244.1.10"
    reader._splice_redirected = lambda: {key: 16_000_000}  # type: ignore[method-assign]
    got = {f["cookie"]: f["bytes_acked"] for f in reader.live()}
    assert got == {1: 16_000_031, 2: 5}
    reader._splice_redirected = lambda: {}  # type: ignore[method-assign]
    assert {f["cookie"]: f["bytes_acked"] for f in reader.live()} == {1: 31, 2: 5}
    # and without the splice maps pinned (splice off), nothing to add
    assert FlowReader(str(tmp_path))._splice_redirected() == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs CAP_BPF")
def test_nothing_pinned_is_a_file_not_found(tmp_path):
    """What the readers' ``except FileNotFoundError`` rely on (the live map,
    the links, the splice counts and the ring of a datapath without them)."""
    with pytest.raises(FileNotFoundError) as e:
        bpfsys.obj_get(str(tmp_path / "nothing"))
    assert isinstance(e.value, bpfsys.BPFError) and e.value.errno == errno.ENOENT
    assert FlowReader(str(tmp_path)).links() == {} and FlowReader(str(tmp_path))._live_raw() == []


# --- linking, resolution, views ---------------------------------------------------------------

def rec(cookie, role, local, remote, orig=None, **kw) -> dict:
    d = {"cookie": cookie, "peer_cookie": None, "role": role, "family": 4,
         "local": list(local), "remote": list(remote), "orig_dst": list(orig) if orig else None,
         "workload_id": None, "cgroup_id": None, "start": 100.0, "updated": 100.0, "end": None,
         "bytes_acked": 0, "bytes_received": 0, "srtt_us": 0, "min_rtt_us": 0,
         "retransmits": 0, "state": "ESTABLISHED", "evicted": False}
    d.update(kw)
    return d


POD_A, POD_B, GW = "10.244.1.10", "10.244.1.11", "10.244.1.1"


def relayed() -> list[dict]:
    """pod-a -> pod-b through node1's proxy: the four legs."""
    return [
        rec(1, "client", (POD_A, 40000), (GW, 15001), (POD_B, 7000), bytes_acked=101,
            bytes_received=51),
        rec(2, "proxy-outbound", (GW, 15001), (POD_A, 40000), bytes_acked=51,
            bytes_received=100),
        rec(3, "proxy-upstream", (GW, 50000), (POD_B, 7000), bytes_acked=101, bytes_received=51),
        rec(4, "server", (POD_B, 7000), (GW, 50000), bytes_acked=51, bytes_received=100,
            srtt_us=40),
    ]


def resolver() -> Resolver:
    r = Resolver()
    r.add_pod("shop/a", "shop", "web", "node1", [POD_A], "cluster.local", workload_id=11)
    r.add_pod("db/b", "db", "pg", "node1", [POD_B, "fd00::b"], "cluster.local", workload_id=12)
    r.add_address(GW, "proxy", "node1")
    r.add_address("198.18.0.2", "node", "node2")
    return r


def test_link_legs_by_reversed_tuple_and_proxy_links():
    flows = relayed()
    g = link_legs(flows)
    assert g[1] == {2} and g[2] == {1} and g[3] == {4} and g[4] == {3}
    g = link_legs(flows, {2: 3, 3: 2})
    assert g[2] == {1, 3} and g[3] == {2, 4}
    # a closed record carries its peer cookie itself
    flows[1]["peer_cookie"] = 3
    assert link_legs(flows)[3] == {2, 4}
    # links to flows not in the set are ignored
    assert link_legs(flows[:1], {1: 99})[1] == set()


def test_views_resolve_pods_identities_and_orient_bytes():
    views = {v["cookie"]: v for v in build_views(relayed(), resolver(), "node1", 110.0)}
    c = views[1]
    assert c["source"]["pod"] == "shop/a" and c["destination"]["pod"] == "db/b"
    assert c["destination"]["port"] == 7000 and c["via"]["kind"] == "proxy"
    assert c["source"]["identity"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert (c["sent"], c["received"]) == (101, 51) and c["direction"] == "egress"
    s = views[4]
    # source is the delivering proxy until the proxy links its two legs
    assert s["source"]["label"] == "proxy/node1" and s["destination"]["pod"] == "db/b"
    assert (s["sent"], s["received"]) == (100, 51) and s["direction"] == "ingress"
    assert s["duration_s"] == 10.0 and s["open"] and s["verdict"] == "allowed"
    a = views[2]
    assert a["source"]["pod"] == "shop/a" and a["destination"]["label"] == "proxy/node1"
    linked = {v["cookie"]: v for v in build_views(relayed(), resolver(), "node1", 110.0,
                                                   {2: 3, 3: 2})}
    assert linked[4]["source"]["pod"] == "shop/a" and linked[4]["via"]["kind"] == "proxy"


def test_unknown_addresses_and_direct_plaintext_have_no_verdict():
    flows = [rec(9, "server", (POD_B, 7000), ("10.9.9.9", 1234))]
    v = build_views(flows, resolver(), "node1", 200.0)[0]
    assert v["source"]["label"] == "10.9.9.9" and v["source"]["pod"] is None
    assert v["verdict"] == "-"


def test_resolver_folds_ipv4_mapped_and_uses_workload_ids():
    r = resolver()
    assert r.endpoint("::ffff:10.244.1.10", 1).pod == "shop/a"
    assert r.endpoint("10.1.1.1", 1, workload_id=12).pod == "db/b"
    assert r.endpoint("198.18.0.2", 15008).label == "node/node2"


def test_resolver_from_inventory():
    from agent.workloads.yamlfile import parse_inventory

    inv = parse_inventory("""
nodes:
  - {name: node1, address: 198.18.0.1}
pods:
  - {name: a, namespace: shop, serviceAccount: web, node: node1, ips: [10.244.1.10],
     cgroup: /x/a}
""", "inv.yaml")
    r = Resolver.from_inventory(inv, "example.org", {GW: "node1"}, lambda key: len(key))
    e = r.endpoint(POD_A, 80)
    assert (e.pod, e.namespace, e.identity, e.node) == \
        ("shop/a", "shop", "spiffe://example.org/ns/shop/sa/web", "node1")
    assert r.endpoint(GW, 15001).label == "proxy/node1"
    assert r.endpoint("198.18.0.1", 15008).label == "node/node1"
    assert r.endpoint("1.2.3.4", 5, workload_id=len("shop/a")).pod == "shop/a"


# --- filters and sorting -------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1.5h", 5400), ("2d", 172800),
                                          ("250ms", 0.25), ("42", 42), (" 10 s ", 10)])
def test_parse_since(text, seconds):
    assert parse_since(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5x", "-3s", "1e3s"])
def test_parse_since_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_since(text)


def views_for_filters() -> list[dict]:
    flows = relayed()
    flows[0].update(end=105.0, state="CLOSE")
    flows.append(rec(5, "client", (POD_B, 41000), (GW, 15001), ("10.9.9.9", 443),
                     start=50.0, end=60.0, state="CLOSE", retransmits=4, srtt_us=900,
                     bytes_acked=10_000))
    return build_views(flows, resolver(), "node1", 110.0)


def ids(vs) -> list[int]:
    return sorted(v["cookie"] for v in vs)


def test_filters():
    vs = views_for_filters()
    now = 110.0

    def sel(**kw):
        return ids(v for v in vs if FlowFilter(**kw).matches(v, now))
    assert sel(pod="shop/a") == [1, 2]
    assert sel(pod="a") == [1, 2]                 # bare name matches any namespace
    assert sel(pod="db/b") == [1, 3, 4, 5]
    assert sel(namespace="db") == [1, 3, 4, 5]
    assert sel(identity="spiffe://cluster.local/ns/shop/sa/web") == [1, 2]
    assert sel(port=443) == [5]
    assert sel(port=7000) == [1, 3, 4]
    assert sel(state="open") == [2, 3, 4]
    assert sel(state="closed") == [1, 5]
    assert sel(state="ESTABLISHED") == [2, 3, 4]
    assert sel(since=30) == [1, 2, 3, 4]          # 5 closed 50s ago
    assert sel(since=1) == [2, 3, 4]
    assert sel(pod="db/b", state="closed", port=443) == [5]


def test_filter_params_round_trip_and_errors():
    f = FlowFilter.from_params({"pod": "a", "port": "80", "state": "open", "since": "5m"})
    assert (f.pod, f.port, f.state, f.since) == ("a", 80, "open", 300)
    assert FlowFilter.from_params(f.to_params()) == f
    with pytest.raises(ValueError, match="port"):
        FlowFilter.from_params({"port": "http"})
    with pytest.raises(ValueError, match="state"):
        FlowFilter(state="sleepy")


def test_sorting():
    vs = views_for_filters()
    assert [v["cookie"] for v in sort_views(vs, "srtt")][:2] == [5, 4]
    assert sort_views(vs, "bytes")[0]["cookie"] == 5
    assert sort_views(vs, "retrans")[0]["cookie"] == 5
    assert [v["cookie"] for v in sort_views(vs, "start")][0] == 5
    assert sort_views(vs, "age")[0]["cookie"] in (2, 3, 4)  # open for 10s, 5 lived 10s too
    with pytest.raises(ValueError):
        sort_views(vs, "colour")


# --- formatting -----------------------------------------------------------------------------

def test_human_units():
    assert [human_bytes(n) for n in (0, 1023, 2048, 5 << 20, 3 << 30)] == \
        ["0B", "1023B", "2.0KiB", "5.0MiB", "3.0GiB"]
    assert [human_us(n) for n in (0, 45, 1500, 2_500_000)] == ["-", "45us", "1.50ms", "2.50s"]


def test_table_and_wide_columns():
    vs = sort_views(build_views(relayed(), resolver(), "node1", 110.0), "start")
    t = format_table(vs).splitlines()
    assert t[0].split()[:3] == ["SOURCE", "DESTINATION", "ROLE"]
    assert "VERDICT" in t[0] and len(t) == 5
    assert t[1].split()[:3] == ["shop/a", "db/b:7000", "egress"]
    w = format_table(vs, wide=True).splitlines()
    assert "COOKIE" in w[0] and "shop/a(10.244.1.10:40000)" in w[1]
    f = format_table(vs[:1], prefix=["+new"], fixed=True, header=False)
    assert f.startswith("+new") and "\n" not in f


def test_cli_flows_rejects_bad_options_as_usage_errors():
    r = CliRunner().invoke(main, ["flows", "--socket", "/nonexistent", "--since", "soon"])
    assert r.exit_code == 2 and "invalid duration" in r.output
    r = CliRunner().invoke(main, ["flows", "--socket", "/nonexistent", "--state", "sleepy"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["flows", "--socket", "/nonexistent"])
    assert r.exit_code == 1 and "cannot reach the agent" in r.output


def test_json_is_serializable():
    vs = build_views(relayed(), resolver(), "node1", 110.0)
    assert json.loads(json.dumps(vs))[0]["cookie"] == 1


def test_ml_flow_mirror_layout_is_stable():
    # offsets the ring buffer consumer relies on (the privileged ABI test
    # compares the whole struct with what bcc compiled)
    assert abi.MlFlow.cookie.offset == 0 and abi.MlFlow.saddr_be.offset == 64
    assert abi.MlFlow.sport.offset == 128 and ctypes.sizeof(abi.MlFlow) == 144
