"""The SK_REUSEPORT program (agent/datapath/reuseport.py), run by a small
interpreter of the instructions it uses: which slot it picks for given
loads, how equal loads take turns, what it reserves.  The kernel's verifier
and a real reuseport group run it in tests/privileged/test_reuseport.py."""

from __future__ import annotations

import socket
import struct

import pytest

from agent.datapath import reuseport

COUNTER, LOAD, SOCKS = 11, 12, 13
U64 = (1 << 64) - 1


def run(prog: bytes, maps: dict[int, dict[int, int]]) -> tuple[int, int | None]:
    """Execute ``prog``; returns (r0, the slot passed to
    bpf_sk_select_reuseport or None).  ``maps``: fd -> {key: u64 value};
    a key missing from a map is a failed lookup."""
    insns = [struct.unpack_from("<BBhi", prog, i) for i in range(0, len(prog), 8)]
    reg: list = [0] * 11
    stack = bytearray(512)
    reg[1] = "ctx"
    reg[10] = ("fp", 512)
    selected = None
    pc = 0
    steps = 0

    def key_at(ptr) -> int:
        assert ptr[0] == "fp"
        return struct.unpack_from("<I", stack, ptr[1])[0]

    while True:
        steps += 1
        assert steps < 100_000
        code, regs, off, imm = insns[pc]
        dst, src = regs & 0xF, regs >> 4
        pc += 1
        if code == 0x18:  # ld_imm64 (a map fd)
            assert src == 1
            reg[dst] = ("map", imm)
            pc += 1
        elif code == 0xBF:
            reg[dst] = reg[src]
        elif code == 0xB7:
            reg[dst] = imm & U64
        elif code == 0x07:
            if isinstance(reg[dst], tuple):
                reg[dst] = (reg[dst][0], reg[dst][1] + imm)
            else:
                reg[dst] = (reg[dst] + imm) & U64
        elif code == 0x97:
            reg[dst] = reg[dst] % imm
        elif code == 0x62:  # *(u32 *)(dst + off) = imm
            struct.pack_into("<I", stack, reg[dst][1] + off, imm & 0xFFFFFFFF)
        elif code == 0x63:  # *(u32 *)(dst + off) = src
            struct.pack_into("<I", stack, reg[dst][1] + off, reg[src] & 0xFFFFFFFF)
        elif code == 0x61:  # dst = *(u32 *)(src + off)
            reg[dst] = struct.unpack_from("<I", stack, reg[src][1] + off)[0]
        elif code == 0x79:  # dst = *(u64 *)(src + off): a map value
            kind, fd, key = reg[src]
            assert kind == "value" and off == 0
            reg[dst] = maps[fd][key]
        elif code == 0xDB:  # atomic add (imm 0: no fetch)
            assert imm == 0
            kind, fd, key = reg[dst]
            maps[fd][key] = (maps[fd][key] + reg[src]) & U64
        elif code == 0x15:
            if reg[dst] == imm:
                pc += off
        elif code == 0x3D:
            if reg[dst] >= reg[src]:
                pc += off
        elif code == 0x85:
            if imm == 1:  # map_lookup_elem(map, &key)
                fd, key = reg[1][1], key_at(reg[2])
                reg[0] = ("value", fd, key) if key in maps[fd] else 0
            elif imm == 82:  # sk_select_reuseport(ctx, map, &key, flags)
                assert reg[1] == "ctx" and reg[2] == ("map", SOCKS) and reg[4] == 0
                selected = key_at(reg[3])
                reg[0] = 0
            else:
                raise AssertionError(f"helper {imm}")
            reg[1:6] = [None] * 5
        elif code == 0x95:
            return reg[0], selected
        else:
            raise AssertionError(f"opcode {code:#x}")


def pick(loads: list[int], counter: int = 0) -> tuple[int | None, list[int], int]:
    """One SYN: (the slot picked, the loads after, the counter after)."""
    maps = {COUNTER: {0: counter}, LOAD: dict(enumerate(loads)), SOCKS: {}}
    prog = reuseport.program(COUNTER, LOAD, SOCKS, len(loads))
    r0, slot = run(prog, maps)
    assert r0 == reuseport.SK_PASS
    return slot, [maps[LOAD][i] for i in range(len(loads))], maps[COUNTER][0]


def test_the_least_loaded_slot_is_picked_and_reserved():
    slot, after, _ = pick([3, 1, 2])
    assert slot == 1 and after == [3, 2, 2]


def test_equal_loads_take_turns_from_the_rotating_start():
    got, counter = [], 0
    for _ in range(6):
        slot, _, counter = pick([0, 0, 0], counter)
        got.append(slot)
    assert got == [0, 1, 2, 0, 1, 2]


def test_tunnels_dialled_together_spread_by_the_reservation():
    """Two SYNs before either worker wrote its new count: the first one's
    reservation steers the second elsewhere, whatever the start."""
    for counter in range(4):
        first, loads, _ = pick([0, 0], counter)
        second, loads, _ = pick(loads, counter)  # the same start: a racing read of the counter
        assert {first, second} == {0, 1} and loads == [1, 1]


def test_a_worker_added_beside_one_holding_the_tunnels_gets_the_next_ones():
    """The case plain round-robin got wrong: worker 0 holds the node's only
    tunnel when worker 1 starts; the next tunnel goes to worker 1."""
    for counter in range(4):
        slot, _, _ = pick([1, 0], counter)
        assert slot == 1


@pytest.mark.parametrize("slots", [1, 2, 7, 64])
def test_every_slot_count_loads_and_picks_a_slot_in_range(slots):
    prog = reuseport.program(COUNTER, LOAD, SOCKS, slots)
    assert len(prog) % 8 == 0
    loads = [5] * slots
    loads[slots // 2] = 4
    slot, after, counter = pick(loads, 1000)
    assert slot == slots // 2 and after[slot] == 5 and counter == 1001


def test_the_counter_map_missing_still_picks_the_least_loaded():
    maps = {COUNTER: {}, LOAD: {0: 2, 1: 0}, SOCKS: {}}
    r0, slot = run(reuseport.program(COUNTER, LOAD, SOCKS, 2), maps)
    assert r0 == reuseport.SK_PASS and slot == 1


@pytest.mark.parametrize("slots", [0, 65, -1])
def test_slots_outside_what_the_array_holds_are_refused(slots):
    with pytest.raises(ValueError, match="slots must be 1..64"):
        reuseport.program(1, 2, 3, slots)


@pytest.mark.parametrize(("slot", "slots"), [(2, 2), (-1, 2), (0, 65)])
def test_a_slot_outside_the_workers_is_refused_before_any_syscall(slot, slots):
    with pytest.raises(ValueError, match="need 0 <= slot < slots <= 64"):
        reuseport.TunnelSpread("/nonexistent", slot, slots)


def test_each_family_has_its_own_array():
    v4 = reuseport.pin_path("/sys/fs/bpf/meshlet/n1", socket.AF_INET)
    v6 = reuseport.pin_path("/sys/fs/bpf/meshlet/n1", socket.AF_INET6)
    assert v4 == "/sys/fs/bpf/meshlet/n1/reuseport/tunnel-v4" and v6.endswith("/reuseport/tunnel-v6")


def test_each_listener_group_has_maps_of_its_own():
    d = "/sys/fs/bpf/meshlet/n1"
    assert reuseport.pin_path(d, socket.AF_INET, "outbound") == f"{d}/reuseport/outbound-v4"
    assert reuseport.pin_path(d, socket.AF_INET6, "outbound") == f"{d}/reuseport/outbound-v6"
    assert reuseport.load_path(d, "outbound") == f"{d}/reuseport/outbound-load"
    assert reuseport.load_path(d) == f"{d}/reuseport/tunnel-load"
    assert all(len(f"ml_{tag}_socks") <= 15 for tag in reuseport.GROUPS.values())  # the kernel's name limit
    with pytest.raises(ValueError, match="unknown listener group 'inbound'"):
        reuseport.TunnelSpread("/nonexistent", 0, 2, "inbound")
