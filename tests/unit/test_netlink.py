"""agent/datapath/netlink.py's rtnetlink client, on this process's own
network namespace (reads only, no root needed): the route lookup and the
interface check the agent runs on every sync, and the attribute walker.
Writing clsact qdiscs and filters needs root: tests/privileged/test_strict_clsact.py."""

from __future__ import annotations

import socket
import struct

from agent.datapath import netlink


def test_the_route_to_loopback_goes_out_of_lo():
    lo = socket.if_nametoindex("lo")
    assert netlink.route_oif("127.0.0.1") == (lo, "lo")
    assert netlink.route_oif("127.1.2.3") == (lo, "lo")


def test_an_interface_is_alive_only_under_its_own_name():
    lo = socket.if_nametoindex("lo")
    assert netlink.ifindex_alive(lo, "lo")
    assert not netlink.ifindex_alive(lo, "eth-not-lo")
    assert not netlink.ifindex_alive(2**31 - 1, "lo")


def test_no_filter_of_ours_is_found_where_none_was_added():
    assert netlink.clsact_filters("meshlet:/no/such/datapath") == {}


def test_attributes_are_walked_with_padding_and_stop_at_a_bad_length():
    buf = netlink._attr(7, b"abc\0") + netlink._attr(11, struct.pack("=I", 42)) + netlink._attr(3, b"x")
    assert [(t, v) for t, v in netlink._attrs(buf, 0, len(buf))] == [
        (7, b"abc\0"), (11, struct.pack("=I", 42)), (3, b"x"),
    ]
    broken = struct.pack("=HH", 2, 1) + b"rest"  # a length shorter than the header
    assert list(netlink._attrs(broken, 0, len(broken))) == []
    truncated = struct.pack("=HH", 40, 1) + b"short"  # runs past the end
    assert list(netlink._attrs(truncated, 0, len(truncated))) == []
