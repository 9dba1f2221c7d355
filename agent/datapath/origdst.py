"""Original-destination lookup for the proxy, over pinned maps (no bcc).

The connect hooks record where an enrolled app wanted to go; sockops files it
under the 4-tuple the proxy sees on accept.  ``FlowTable.pop`` finds and
removes that record.  Safe to use from proxy worker processes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from . import abi, bpfsys

_ENOTSUPP = 524  # the kernel's internal "operation not supported" (no name in errno)


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
        self._one_call = True  # BPF_MAP_LOOKUP_AND_DELETE_ELEM works here (until it says otherwise)

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

    def _take(self, fd: int, key: bytes) -> bytes | None:
        size = ctypes.sizeof(abi.MlOrigDst)
        if self._one_call:
            try:
                return bpfsys.map_lookup_and_delete(fd, key, size)
            except bpfsys.BPFError as e:
                if e.errno not in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                    raise
                self._one_call = False  # an older kernel: two calls from now on
        raw = bpfsys.map_lookup(fd, key, size)
        if raw is not None:
            bpfsys.map_delete(fd, key)
        return raw

    def pop(self, peer: tuple, local: tuple) -> FlowOrigin | None:
        """Find and remove the record of the connection ``peer`` → ``local``.

        The map is used as opened until a lookup misses: only then is the
        pin checked (one stat) and, if the agent replaced it, reopened and
        asked again, so a hit costs one bpf(2) call and no file system call
        (issue #13: this runs on the loop for every new pod connection)."""
        key = bytes(abi.flow_key(peer, local))
        if self._fd is None:
            raw = self._take(self._open(), key)
        else:
            raw = self._take(self._fd, key)
            if raw is None:
                before = self._ino
                fd = self._open()  # reopens if the pin was replaced
                if self._ino != before:
                    raw = self._take(fd, key)
        if raw is None:
            return None
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
