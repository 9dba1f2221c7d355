"""The ctypes mirrors in agent/datapath/abi.py must match what bcc compiled
from bpf/include/meshlet.h: same sizes, same field offsets, same maps."""

from __future__ import annotations

import ctypes
import os
import re
import tempfile

import pytest

from tests.support.privileged import require_privileged

require_privileged()

from agent.datapath import abi, bpfsys  # noqa: E402
from agent.datapath.loader import (  # noqa: E402
    BPF_SOURCES, DatapathSpec, bpf_dir, possible_cpus, remove_pins, render,
)

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def compiled():
    bcc = pytest.importorskip("bcc")
    pin_dir = tempfile.mkdtemp(prefix="abi-", dir="/sys/fs/bpf")
    os.rmdir(pin_dir)
    os.makedirs(pin_dir)
    spec = DatapathSpec(node="abi", pin_dir=pin_dir, cgroup="/", redirect_ip4="10.0.0.1",
                        redirect_ip6=None, outbound_port=15001, mesh_mark=1)
    r = render(spec)
    b = bcc.BPF(text=r.text.encode(), cflags=list(r.cflags))
    try:
        yield b, pin_dir
    finally:
        b.cleanup()
        remove_pins(pin_dir)


def layout(t) -> tuple:
    fields = []
    for name, *_ in getattr(t, "_fields_", []):
        f = getattr(t, name)
        fields.append((name, f.offset, f.size))
    return ctypes.sizeof(t), tuple(fields)


@pytest.mark.parametrize("name", sorted(abi.MAPS))
def test_map_layouts_match(compiled, name):
    b, pin_dir = compiled
    key_t, val_t = abi.MAPS[name]
    table = b.get_table(name.encode())
    assert layout(table.Key) == layout(key_t), f"{name} key"
    if name == "ml_stats":  # per-CPU: bcc's Leaf holds one value per possible CPU
        assert ctypes.sizeof(table.Leaf) == ctypes.sizeof(val_t) * possible_cpus()
    else:
        assert layout(table.Leaf) == layout(val_t), f"{name} value"
    fd = bpfsys.obj_get(os.path.join(pin_dir, name))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    assert info.key_size == ctypes.sizeof(key_t)
    assert info.value_size == ctypes.sizeof(val_t)


def test_every_pinned_map_is_mirrored(compiled):
    _, pin_dir = compiled
    pinned = {n for n in os.listdir(pin_dir) if not os.path.isdir(os.path.join(pin_dir, n))}
    assert pinned == set(abi.MAPS)


def test_stat_names_match_the_enum():
    with open(os.path.join(bpf_dir(), "include", "meshlet.h")) as f:
        text = f.read()
    enum = text.split("enum ml_stat {", 1)[1].split("};", 1)[0]
    names = [ln.strip().split()[0].rstrip(",").split("=")[0].strip()
             for ln in enum.splitlines() if ln.strip().startswith("ML_STAT_")]
    names = [n for n in names if n != "ML_STAT_MAX"]
    assert [n.removeprefix("ML_STAT_").lower() for n in names] == abi.STATS


def test_ring_buffers_are_pinned_apart_and_mirrored(compiled):
    # Ring buffers have no keys to list, so they are pinned under events/
    # (tools that walk the pinned hash maps never meet them); each one's
    # record type is mirrored in abi.RINGBUFS and checked through the map
    # that holds the same struct (ml_live_flows for struct ml_flow).
    _, pin_dir = compiled
    events = os.path.join(pin_dir, abi.EVENTS_DIR)
    assert set(os.listdir(events)) == set(abi.RINGBUFS)
    for name in abi.RINGBUFS:
        fd = bpfsys.obj_get(os.path.join(events, name))
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        assert info.type_name == "ringbuf" and info.key_size == 0 and info.value_size == 0
        assert info.max_entries & (info.max_entries - 1) == 0
    assert abi.RINGBUFS["ml_flow_events"] is abi.MAPS["ml_live_flows"][1]


def test_l4_verdict_constants_are_abi_s():
    # ml_l4_policy actions: the pure compiler takes them from the ctypes
    # mirror (checked against the C below), it does not copy them
    from agent.policy import kernel

    assert (kernel.L4_PASS, kernel.L4_DENY) == (abi.L4_PASS, abi.L4_DENY)
    assert "policy_denied" in abi.STATS
    assert abi.l4_key(7, "::ffff:10.0.0.1", 80).family == abi.AF_INET  # mapped folds into IPv4


# --- constants: abi.CONSTANTS against the header, in the compiler ------------------

def compile_errors(text: str, capfd) -> str | None:
    """Compile ``text`` with bcc and the datapath's own cflags (plus -I bpf);
    None if it compiled, else the compiler's diagnostics."""
    bcc = pytest.importorskip("bcc")
    pin_dir = tempfile.mkdtemp(prefix="abi-", dir="/sys/fs/bpf")
    spec = DatapathSpec(node="abi", pin_dir=pin_dir, cgroup="/", redirect_ip4="10.0.0.1",
                        redirect_ip6=None, outbound_port=15001, mesh_mark=1)
    capfd.readouterr()
    try:
        b = bcc.BPF(text=text.encode(), cflags=[*render(spec).cflags, f"-I{bpf_dir()}"])
    except Exception:  # noqa: BLE001 - bcc raises a bare Exception; clang's words are on stderr
        return capfd.readouterr().err or "bcc failed to compile (no diagnostics)"
    finally:
        remove_pins(pin_dir)
    b.cleanup()
    return None


def static_asserts(constants: dict[str, int]) -> str:
    return '#include "include/meshlet.h"\n' + "".join(
        f'_Static_assert({name} == {value}, "{name} is {value} in agent/datapath/abi.py");\n'
        for name, value in constants.items())


def test_constants_match_the_compiled_header(capfd):
    errors = compile_errors(static_asserts(abi.CONSTANTS), capfd)
    assert errors is None, "meshlet.h and abi.CONSTANTS disagree:\n" + errors


def test_a_drifted_constant_fails_to_compile(capfd):
    # the check above can fail: one value off and the compiler says which
    drifted = dict(abi.CONSTANTS, ML_ROLE_PROXY_TUNNEL=abi.ROLE_PROXY_TUNNEL + 1)
    errors = compile_errors(static_asserts(drifted), capfd)
    assert errors is not None and "ML_ROLE_PROXY_TUNNEL is 5" in errors, errors


def test_every_contract_define_is_mirrored():
    # a new ML_ROLE_/ML_MODE_/... define (or enum ml_stat entry) in the header
    # needs its abi.CONSTANTS entry, or the compiled check above never sees it
    with open(os.path.join(bpf_dir(), "include", "meshlet.h")) as f:
        text = f.read()
    defines = set(re.findall(r"^#define (ML_ABI_VERSION|ML_AF_\w+|ML_MODE_\w+|ML_ROLE_\w+|"
                             r"ML_FLOW_F_\w+|ML_L4_\w+|ML_GUARD_\w+)\s", text, re.M))
    stats = set(re.findall(r"^\s*(ML_STAT_\w+)", text.split("enum ml_stat {", 1)[1].split("};", 1)[0],
                           re.M))
    assert defines and stats
    assert defines | stats == set(abi.CONSTANTS)


@pytest.mark.parametrize("source", [s for s in BPF_SOURCES if s.endswith(".c")])
def test_each_c_file_compiles_on_its_own(source, capfd):
    # each .c includes the header it uses (the loader renders the header
    # first, and the include guard then skips it)
    with open(os.path.join(bpf_dir(), source)) as f:
        text = f.read()
    assert '#include "include/meshlet.h"' in text
    errors = compile_errors(text, capfd)
    assert errors is None, f"bpf/{source} alone:\n{errors}"
