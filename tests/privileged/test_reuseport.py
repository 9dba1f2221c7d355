"""The tunnel listener's round-robin (agent/datapath/reuseport.py) on a real
kernel: real listeners sharing a port with SO_REUSEPORT on loopback, the
real SK_REUSEPORT program, a real pinned REUSEPORT_SOCKARRAY in bpffs.

Without the program the kernel's hash of each connection's addresses picks
the listener, so a run of strict alternation over 12 connections happens by
chance with probability 2 * (1/2)**12 (two listeners) or less: these tests
fail when the program is not what decides.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import time
import uuid

import pytest

from tests.support.privileged import require_privileged

require_privileged()

from agent.datapath import bpfsys, reuseport  # noqa: E402

pytestmark = pytest.mark.privileged

LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


@pytest.fixture
def pin_dir():
    d = f"/sys/fs/bpf/meshlet-test-rr-{uuid.uuid4().hex[:8]}"
    os.mkdir(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def group():
    """Listeners on one loopback port (port 0 picked by the first), closed after the test."""
    made: list[socket.socket] = []

    def listener(family: int, port: int = 0) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        made.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((LOOPBACK[family], port))
        s.listen(64)
        s.setblocking(False)
        return s

    yield listener
    for s in made:
        s.close()


def accepted_by(listeners: list[socket.socket], count: int) -> list[int | None]:
    """Open ``count`` connections one after the other to the group's port;
    for each, the index of the listener that accepted it (None: not within
    5 s, i.e. refused or lost)."""
    family = listeners[0].family
    port = listeners[0].getsockname()[1]
    out: list[int | None] = []
    for _ in range(count):
        with socket.create_connection((LOOPBACK[family], port), timeout=5):
            got = None
            deadline = time.monotonic() + 5
            while got is None and time.monotonic() < deadline:
                for i, s in enumerate(listeners):
                    if s.fileno() < 0:
                        continue
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = s.accept()
                        conn.close()
                        got = i
                        break
                else:
                    time.sleep(0.001)
            out.append(got)
    return out


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_new_connections_are_dealt_round_robin_over_the_slots(pin_dir, group, family):
    first = group(family)
    socks = [first] + [group(family, first.getsockname()[1]) for _ in range(2)]
    for slot, s in enumerate(socks):
        reuseport.spread_listener(s, pin_dir, slot, 3)
    assert accepted_by(socks, 12) == [0, 1, 2] * 4
    # one pinned array per family, shared by every worker of the node
    assert os.listdir(os.path.join(pin_dir, reuseport.PIN_SUBDIR)) == [
        os.path.basename(reuseport.pin_path(pin_dir, family))
    ]
    fd = bpfsys.obj_get(reuseport.pin_path(pin_dir, family))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    assert info.type_name == "reuseport_sockarray" and info.max_entries == reuseport.MAX_SLOTS


def test_an_empty_slot_leaves_the_pick_to_the_hash_and_refuses_nothing(pin_dir, group):
    """A worker that exits (or restarts) empties its slot: the kernel takes
    a closed listener out of the array, and the pick falls back to the hash."""
    first = group(socket.AF_INET)
    socks = [first] + [group(socket.AF_INET, first.getsockname()[1]) for _ in range(2)]
    for slot, s in enumerate(socks):
        reuseport.spread_listener(s, pin_dir, slot, 3)
    socks[1].close()
    got = accepted_by(socks, 12)
    assert None not in got and 1 not in got, got
    # slots 0 and 2 still get their own turns: the program still decides those
    assert [g for i, g in enumerate(got) if i % 3 != 1] == [0, 2] * 4


def test_a_successor_takes_its_predecessors_slot(pin_dir, group):
    """A hand-over: the new process files its listener in the same slot;
    new connections go to it, and none to the old one, which keeps only
    what it already had."""
    old0 = group(socket.AF_INET)
    old1 = group(socket.AF_INET, old0.getsockname()[1])
    reuseport.spread_listener(old0, pin_dir, 0, 2)
    reuseport.spread_listener(old1, pin_dir, 1, 2)
    new0 = group(socket.AF_INET, old0.getsockname()[1])
    reuseport.spread_listener(new0, pin_dir, 0, 2)
    got = accepted_by([old0, old1, new0], 12)
    assert got.count(0) == 0 and sorted(set(got)) == [1, 2], got
    assert got in ([1, 2] * 6, [2, 1] * 6), got  # the successor's own program (a fresh counter)


def test_something_else_pinned_there_is_refused_with_what_to_do(pin_dir, group):
    s = group(socket.AF_INET)
    path = reuseport.pin_path(pin_dir, socket.AF_INET)
    os.makedirs(os.path.dirname(path))
    fd = bpfsys.map_create(reuseport.MAP_TYPE_ARRAY, 4, 8, 4, "not_ours")
    try:
        bpfsys.obj_pin(fd, path)
    finally:
        os.close(fd)
    with pytest.raises(reuseport.SpreadError, match=r"is a array map .*remove it"):
        reuseport.spread_listener(s, pin_dir, 0, 1)
    # and the listener still serves: the kernel's hash, without a program
    assert accepted_by([s], 2) == [0, 0]


def test_the_array_holds_each_workers_listener_in_its_own_slot(pin_dir, group):
    a = group(socket.AF_INET)
    b = group(socket.AF_INET, a.getsockname()[1])
    reuseport.spread_listener(a, pin_dir, 0, 2)
    reuseport.spread_listener(b, pin_dir, 1, 2)
    fd = bpfsys.obj_get(reuseport.pin_path(pin_dir, socket.AF_INET))
    try:
        # a sockarray's lookup from user space answers the socket's cookie
        cookies = [bpfsys.map_lookup(fd, struct.pack("=I", k), 8) for k in range(3)]
    finally:
        os.close(fd)
    from agent.datapath.splicemap import socket_cookie

    assert cookies[:2] == [struct.pack("=Q", socket_cookie(a)), struct.pack("=Q", socket_cookie(b))]
    assert cookies[2] is None
