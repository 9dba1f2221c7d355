"""``FlowTable.pop`` against a real pinned LRU hash map (no bcc): one
bpf(2) call per hit, the old two-call path where the kernel lacks
lookup-and-delete, and a pin replaced by the agent (reloaded datapath)
found on the next miss."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile

import pytest

from tests.support.privileged import require_privileged

require_privileged()

from agent.datapath import abi, bpfsys  # noqa: E402
from agent.datapath.origdst import FlowTable  # noqa: E402

pytestmark = pytest.mark.privileged

_MAP_CREATE = 0
_LRU_HASH = 9


def _lru_map() -> int:
    attr = bpfsys._attr(
        "=IIIII", _LRU_HASH, ctypes.sizeof(abi.MlFlowKey), ctypes.sizeof(abi.MlOrigDst), 64, 0
    )
    return bpfsys.bpf(_MAP_CREATE, attr)


def _record(fd: int, peer: tuple, local: tuple, dst: tuple) -> None:
    od = abi.MlOrigDst()
    fam, words = abi.pack_addr(dst[0])
    od.family = fam
    for i, w in enumerate(words):
        od.dst_be[i] = w
    od.dst_port = dst[1]
    od.cgroup_id = 77
    bpfsys.map_update(fd, bytes(abi.flow_key(peer, local)), bytes(od))


@pytest.fixture
def pin_dir():
    d = tempfile.mkdtemp(prefix="origdst-", dir="/sys/fs/bpf")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pin(pin_dir: str) -> int:
    fd = _lru_map()
    path = os.path.join(pin_dir, "ml_flows")
    if os.path.exists(path):
        os.unlink(path)
    bpfsys.obj_pin(fd, path)
    return fd


PEER = ("10.1.0.5", 40000)
LOCAL = ("10.1.0.1", 15001)


@pytest.mark.parametrize("one_call", [True, False])
def test_pop_finds_removes_and_follows_a_replaced_pin(pin_dir, one_call):
    fd = _pin(pin_dir)
    table = FlowTable(pin_dir)
    table._one_call = one_call  # False: the lookup + delete path of kernels before 5.14
    try:
        _record(fd, PEER, LOCAL, ("10.2.0.9", 8080))
        got = table.pop(PEER, LOCAL)
        assert got is not None and (got.dst_ip, got.dst_port, got.cgroup_id) == ("10.2.0.9", 8080, 77)
        assert bpfsys.map_lookup(fd, bytes(abi.flow_key(PEER, LOCAL)), ctypes.sizeof(abi.MlOrigDst)) is None
        assert table.pop(PEER, LOCAL) is None  # popped once only

        # The agent reloads the datapath: a new map under the same pin; a
        # record there is found although the table still holds the old map.
        fd2 = _pin(pin_dir)
        try:
            _record(fd2, PEER, LOCAL, ("10.2.0.10", 9090))
            got = table.pop(PEER, LOCAL)
            assert got is not None and (got.dst_ip, got.dst_port) == ("10.2.0.10", 9090)
            assert table.pop(PEER, LOCAL) is None
        finally:
            os.close(fd2)
    finally:
        table.close()
        os.close(fd)


def test_lookup_and_delete_is_one_call_on_this_kernel(pin_dir):
    """The kernel here (6.x) has BPF_MAP_LOOKUP_AND_DELETE_ELEM for LRU hash
    maps: the table keeps using it (no fallback after a hit and a miss)."""
    fd = _pin(pin_dir)
    table = FlowTable(pin_dir)
    try:
        _record(fd, PEER, LOCAL, ("10.2.0.9", 8080))
        assert table.pop(PEER, LOCAL) is not None
        assert table.pop(PEER, LOCAL) is None
        assert table._one_call
    finally:
        table.close()
        os.close(fd)
