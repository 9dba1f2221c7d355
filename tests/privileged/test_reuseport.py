"""The tunnel listener's least-loaded pick (agent/datapath/reuseport.py) on
a real kernel: real listeners sharing a port with SO_REUSEPORT on loopback,
the real SK_REUSEPORT program through this kernel's verifier, real pinned
maps in bpffs.

Without the program the kernel's hash of each connection's addresses picks
the listener, so the exact sequences asserted here (12 connections) happen
by chance with probability 3**-11 or less: these tests fail when the
program is not what decides.
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


def workers(pin_dir, group, family, count, kind="tunnel"):
    """``count`` listeners on one port, each filed by its own worker's
    TunnelSpread (listener group ``kind``) in slot i of ``count``; closed
    by the fixtures."""
    first = group(family)
    socks = [first] + [group(family, first.getsockname()[1]) for _ in range(count - 1)]
    spreads = []
    for slot, s in enumerate(socks):
        sp = reuseport.TunnelSpread(pin_dir, slot, count, kind)
        sp.add_listener(s)
        spreads.append(sp)
    return socks, spreads


@pytest.fixture
def spreads():
    made: list[reuseport.TunnelSpread] = []
    yield made
    for sp in made:
        sp.close()


def loads(pin_dir, count, kind="tunnel"):
    fd = bpfsys.obj_get(reuseport.load_path(pin_dir, kind))
    try:
        return [struct.unpack("=Q", bpfsys.map_lookup(fd, struct.pack("=I", k), 8))[0] for k in range(count)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_equal_loads_take_turns(pin_dir, group, spreads, family):
    socks, made = workers(pin_dir, group, family, 3)
    spreads += made
    assert accepted_by(socks, 12) == [0, 1, 2] * 4
    assert loads(pin_dir, 3) == [4, 4, 4]  # what the program reserved, until the workers write theirs
    names = sorted(os.listdir(os.path.join(pin_dir, reuseport.PIN_SUBDIR)))
    assert names == sorted(["tunnel-load", os.path.basename(reuseport.pin_path(pin_dir, family))])
    fd = bpfsys.obj_get(reuseport.pin_path(pin_dir, family))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    assert info.type_name == "reuseport_sockarray" and info.max_entries == reuseport.MAX_SLOTS


def test_new_tunnels_go_to_the_least_loaded_worker(pin_dir, group, spreads):
    """Workers 0 and 2 hold 5 tunnels each, worker 1 none (it restarted, or
    was added): the next 5 go to worker 1, then they take turns."""
    socks, made = workers(pin_dir, group, socket.AF_INET, 3)
    spreads += made
    for sp, n in zip(made, (5, 0, 5), strict=True):
        assert sp.publish(n)
    got = accepted_by(socks, 8)
    assert got[:5] == [1] * 5, got
    assert sorted(got[5:]) == [0, 1, 2], got  # all at 5 again: one each


def test_an_empty_slot_leaves_the_pick_to_the_hash_and_refuses_nothing(pin_dir, group, spreads):
    """A worker that exits (or restarts) empties its slot: the kernel takes
    a closed listener out of the array, and a pick of that slot falls back
    to the hash among the listeners left."""
    socks, made = workers(pin_dir, group, socket.AF_INET, 3)
    spreads += made
    socks[1].close()
    got = accepted_by(socks, 12)
    assert None not in got and 1 not in got, got
    assert got.count(0) >= 4 and got.count(2) >= 4, got  # their own turns at least


def test_a_successor_takes_its_predecessors_slot(pin_dir, group, spreads):
    """A hand-over: the new process files its listener in the same slot;
    new connections go to it and none to the old one, which sees the slot
    gone and stops writing the slot's load."""
    socks, made = workers(pin_dir, group, socket.AF_INET, 2)
    spreads += made
    new0 = group(socket.AF_INET, socks[0].getsockname()[1])
    successor = reuseport.TunnelSpread(pin_dir, 0, 2)
    spreads.append(successor)
    successor.add_listener(new0)
    assert not made[0].owns_slot() and made[0].publish(7) is False
    assert successor.owns_slot() and made[1].owns_slot()
    got = accepted_by([socks[0], socks[1], new0], 12)
    assert got.count(0) == 0 and sorted(set(got)) == [1, 2], got
    assert got in ([1, 2] * 6, [2, 1] * 6), got


def test_something_else_pinned_there_is_refused_with_what_to_do(pin_dir, group, spreads):
    s = group(socket.AF_INET)
    path = reuseport.pin_path(pin_dir, socket.AF_INET)
    os.makedirs(os.path.dirname(path))
    fd = bpfsys.map_create(reuseport.MAP_TYPE_ARRAY, 4, 8, 4, "not_ours")
    try:
        bpfsys.obj_pin(fd, path)
    finally:
        os.close(fd)
    sp = reuseport.TunnelSpread(pin_dir, 0, 1)
    spreads.append(sp)
    with pytest.raises(
        reuseport.SpreadError, match=r"is a array map .*not the 64-slot reuseport_sockarray.*remove it"
    ):
        sp.add_listener(s)
    # and the listener still serves: the kernel's hash, without a program
    assert accepted_by([s], 2) == [0, 0]


def test_the_array_holds_each_workers_listener_in_its_own_slot(pin_dir, group, spreads):
    socks, made = workers(pin_dir, group, socket.AF_INET, 2)
    spreads += made
    fd = bpfsys.obj_get(reuseport.pin_path(pin_dir, socket.AF_INET))
    try:
        # a sockarray's lookup from user space answers the socket's cookie
        cookies = [bpfsys.map_lookup(fd, struct.pack("=I", k), 8) for k in range(3)]
    finally:
        os.close(fd)
    from agent.datapath.splicemap import socket_cookie

    assert cookies[:2] == [struct.pack("=Q", socket_cookie(s)) for s in socks]
    assert cookies[2] is None


def test_the_outbound_group_picks_by_its_own_loads_beside_the_tunnel_group(pin_dir, group, spreads):
    """Two listener groups of the same workers (tunnel and outbound, each on
    a port of its own) keep maps of their own: loads published for one never
    steer the other."""
    tun_socks, tun = workers(pin_dir, group, socket.AF_INET, 2)
    out_socks, out = workers(pin_dir, group, socket.AF_INET, 2, "outbound")
    spreads += tun + out
    assert tun[0].publish(0) and tun[1].publish(6)  # worker 1 holds the tunnels
    assert out[0].publish(6) and out[1].publish(0)  # worker 0 holds the pods' connections
    assert accepted_by(tun_socks, 4) == [0, 0, 0, 0]
    assert accepted_by(out_socks, 4) == [1, 1, 1, 1]
    assert loads(pin_dir, 2) == [4, 6] and loads(pin_dir, 2, "outbound") == [6, 4]
    names = sorted(os.listdir(os.path.join(pin_dir, reuseport.PIN_SUBDIR)))
    assert names == ["outbound-load", "outbound-v4", "tunnel-load", "tunnel-v4"]
    fd = bpfsys.obj_get(reuseport.pin_path(pin_dir, socket.AF_INET, "outbound"))
    try:
        assert bpfsys.map_info(fd).type_name == "reuseport_sockarray"
    finally:
        os.close(fd)
