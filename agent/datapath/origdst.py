"""Original-destination lookup for the proxy, over pinned maps (no bcc).

The connect hooks record where an enrolled app wanted to go; sockops files it
under the 4-tuple the proxy sees on accept.  ``FlowTable.pop`` finds and
removes that record.  Safe to use from proxy worker processes.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from . import abi, bpfsys


@dataclass(frozen=True)
class FlowOrigin:
    family: int  # socket.AF_INET / AF_INET6
    dst_ip: str  # original destination address
    dst_port: int
    cgroup_id: int  # cgroup of the task that called connect()
    workload_id: int = 0


class FlowTable:
    def __init__(self, pin_dir: str):
        self.path = os.path.join(pin_dir, "ml_flows")
        self._fd: int | None = None
        self._ino: int | None = None

    def _open(self) -> int:
        # Reopen when the pin was replaced (the agent reloaded the datapath).
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            self.close()
            raise
        if self._fd is None or ino != self._ino:
            self.close()
            self._fd = bpfsys.obj_get(self.path)
            self._ino = ino
        return self._fd

    def pop(self, peer: tuple, local: tuple) -> FlowOrigin | None:
        fd = self._open()
        key = bytes(abi.flow_key(peer, local))
        raw = bpfsys.map_lookup(fd, key, ctypes.sizeof(abi.MlOrigDst))
        if raw is None:
            return None
        bpfsys.map_delete(fd, key)
        od = abi.MlOrigDst.from_buffer_copy(raw)
        return FlowOrigin(
            family=2 if od.family == abi.AF_INET else 10,
            dst_ip=abi.unpack_addr(od.family, od.dst_be),
            dst_port=od.dst_port,
            cgroup_id=od.cgroup_id,
            workload_id=od.workload_id,
        )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
