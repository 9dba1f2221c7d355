"""The same-node splice maps, for the proxy (no bcc: plain bpf(2)).

The agent's loader pins ``<pin dir>/splice/ml_splice`` (a SOCKHASH with
bpf/splice.c's sk_skb verdict attached) and ``ml_splice_peers`` (socket
cookie -> peer cookie and bytes redirected) only when the kernel has the
hooks and ``proxy.splice`` is on.  A proxy worker opens them here; when they
are absent it keeps every connection on the userspace relay.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

from . import abi, bpfsys

__all__ = ["SpliceMaps", "socket_cookie"]

SO_COOKIE = 57  # <asm-generic/socket.h>; Python's socket module has no name for it

_U64 = struct.Struct("=Q")
_PEER_SIZE = ctypes.sizeof(abi.MlSplicePeer)


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for ``sock`` (what bpf_get_socket_cookie returns)."""
    return _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


class SpliceMaps:
    """The pinned splice maps of one datapath (``OSError`` when not pinned)."""

    def __init__(self, pin_dir: str) -> None:
        self.dir = os.path.join(pin_dir, abi.SPLICE_DIR)
        self._fds: tuple[int, int] | None = None

    def available(self) -> bool:
        try:
            self._open()
        except OSError:
            return False
        return True

    def _open(self) -> tuple[int, int]:
        # Opened once and kept: the sockets a worker spliced stay in the map
        # it put them in (the map keeps its verdict attached), even when the
        # agent removes or replaces the pins (proxy.splice turned off, a
        # reload); were the map freed, they would drop out of it mid-stream.
        if self._fds is None:
            hfd = bpfsys.obj_get(os.path.join(self.dir, abi.SPLICE_SOCKHASH))
            try:
                pfd = bpfsys.obj_get(os.path.join(self.dir, abi.SPLICE_PEERS))
            except OSError:
                os.close(hfd)
                raise
            self._fds = (hfd, pfd)
        return self._fds

    def insert(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """File ``a`` and ``b`` as each other's peer and put both in the
        SOCKHASH (from then on the kernel relays their bytes).  Returns their
        cookies.  On failure nothing of theirs is left in the maps."""
        hfd, pfd = self._open()
        ca, cb = socket_cookie(a), socket_cookie(b)
        done: list[tuple[int, int]] = []
        try:
            for fd, key, val in (
                (pfd, ca, bytes(abi.MlSplicePeer(cb, 0))),
                (pfd, cb, bytes(abi.MlSplicePeer(ca, 0))),
                (hfd, ca, struct.pack("=i", a.fileno())),
                (hfd, cb, struct.pack("=i", b.fileno())),
            ):
                bpfsys.map_update(fd, _U64.pack(key), val, bpfsys.BPF_NOEXIST)
                done.append((fd, key))
        except OSError:
            for fd, key in reversed(done):
                bpfsys.map_delete(fd, _U64.pack(key))
            raise
        return ca, cb

    def redirected(self, cookie: int) -> int:
        """Bytes the kernel sent from this socket to its peer so far."""
        _, pfd = self._open()
        raw = bpfsys.map_lookup(pfd, _U64.pack(cookie), _PEER_SIZE)
        return 0 if raw is None else abi.MlSplicePeer.from_buffer_copy(raw).bytes

    def remove(self, cookie: int) -> int:
        """Take a socket out of both maps; returns its final redirected byte
        count.  (Closing the socket also drops it from the SOCKHASH.)"""
        hfd, pfd = self._open()
        n = self.redirected(cookie)
        bpfsys.map_delete(hfd, _U64.pack(cookie))
        bpfsys.map_delete(pfd, _U64.pack(cookie))
        return n

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
