"""The SK_REUSEPORT program's instructions (agent/datapath/reuseport.py),
decoded: what the verifier and the kernel get.  The kernel runs it in
tests/privileged/test_reuseport.py."""

from __future__ import annotations

import socket
import struct

import pytest

from agent.datapath import reuseport


def decode(prog: bytes) -> list[tuple[int, int, int, int, int]]:
    out = []
    for i in range(0, len(prog), 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", prog, i)
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


@pytest.mark.parametrize("slots", [1, 2, 7, 64])
def test_the_program_picks_counter_mod_slots_and_always_passes(slots):
    insns = decode(reuseport.program(counter_fd=11, sockarray_fd=12, slots=slots))
    assert len(insns) == 21  # 19 instructions, two of them 16-byte map loads
    maps = [imm for code, _, src, _, imm in insns if code == 0x18 and src == 1]
    assert maps == [11, 12]  # the counter first, then the array the helper picks from
    calls = [imm for code, *_, imm in insns if code == 0x85]
    assert calls == [1, 82]  # map_lookup_elem, sk_select_reuseport
    (mod,) = [imm for code, *_, imm in insns if code == 0x97]
    assert mod == slots
    # the null check jumps to the one exit path, which answers SK_PASS (never SK_DROP)
    (jump,) = [i for i, (code, *_) in enumerate(insns) if code == 0x15]
    target = jump + 1 + insns[jump][3]
    assert insns[target] == (0xB7, 0, 0, 0, reuseport.SK_PASS) and insns[target + 1][0] == 0x95
    assert target == len(insns) - 2
    # the counter is bumped with an atomic fetch-add, so concurrent SYNs get distinct slots
    (atomic,) = [x for x in insns if x[0] == 0xDB]
    assert atomic[4] == 0x01  # BPF_ADD | BPF_FETCH


@pytest.mark.parametrize("slots", [0, 65, -1])
def test_slots_outside_what_the_array_holds_are_refused(slots):
    with pytest.raises(ValueError, match="slots must be 1..64"):
        reuseport.program(1, 2, slots)


@pytest.mark.parametrize(("slot", "slots"), [(2, 2), (-1, 2), (0, 65)])
def test_a_slot_outside_the_workers_is_refused_before_any_syscall(slot, slots):
    with socket.socket() as s, pytest.raises(ValueError, match="need 0 <= slot < slots <= 64"):
        reuseport.spread_listener(s, "/nonexistent", slot, slots)


def test_each_family_has_its_own_array():
    v4 = reuseport.pin_path("/sys/fs/bpf/meshlet/n1", socket.AF_INET)
    v6 = reuseport.pin_path("/sys/fs/bpf/meshlet/n1", socket.AF_INET6)
    assert v4 == "/sys/fs/bpf/meshlet/n1/reuseport/tunnel-v4" and v6.endswith("/reuseport/tunnel-v6")
