"""The same-node splice maps, for the proxy (no bcc: plain bpf(2)).

The agent's loader pins them under ``<pin dir>/splice/`` only when the
kernel has the hooks and ``proxy.splice`` is on (bpf/splice.c says how they
work together).  A proxy worker uses four of them:

- ``ml_splice_tgt`` (SOCKHASH, socket cookie -> socket): its own two sockets
  of a spliced connection, the targets pods' messages are redirected to;
- ``ml_splice_peers`` (cookie -> MlSplicePeer): per target, the bytes the
  kernel sent out of it straight from a pod (the access log's counts);
- ``ml_splice_arm`` (a pod socket's 4-tuple -> MlSpliceArm): which target a
  pod socket's messages may go to, and how many of its bytes the proxy has
  relayed itself (the kernel redirects only when it has passed exactly as
  many to the proxy);
- ``ml_splice`` (SOCKHASH, a pod socket's 4-tuple -> socket): sock_ops files
  every pod socket of a proxied connection there (it cannot tell where the
  connection will go); the proxy takes out the ones it will never splice
  (another node, L7), whose sends would otherwise keep taking the sk_msg
  path for nothing.

When they are absent the worker keeps every connection on the userspace relay.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

from . import abi, bpfsys

__all__ = ["SpliceMaps", "bytes_acked", "pod_key", "socket_cookie"]

SO_COOKIE = 57  # <asm-generic/socket.h>; Python's socket module has no name for it

_U64 = struct.Struct("=Q")
_PEER_SIZE = ctypes.sizeof(abi.MlSplicePeer)
_CNT_SIZE = ctypes.sizeof(abi.MlSpliceCnt)


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for ``sock`` (what bpf_get_socket_cookie returns)."""
    return _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked) (Linux >= 4.1)


def bytes_acked(sock: socket.socket) -> int:
    """tcpi_bytes_acked: what sock_ops' bytes_acked reads (splice.c keeps it
    per target from RTT samples; this is its value before the first one)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_ACKED + 8)
    if len(info) < _TCPI_BYTES_ACKED + 8:
        raise OSError("TCP_INFO has no tcpi_bytes_acked on this kernel")
    return int(_U64.unpack_from(info, _TCPI_BYTES_ACKED)[0])


_TCP_ESTABLISHED = 1  # <net/tcp_states.h>; tcpi_state is tcp_info's first byte


def established(sock: socket.socket) -> bool:
    """Whether ``sock`` is still an established TCP connection: a SOCKHASH
    takes no other (the insert fails with EOPNOTSUPP once it is reset or
    closing)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return False
    return len(info) == 1 and info[0] == _TCP_ESTABLISHED


def pod_key(sock: socket.socket) -> bytes:
    """The ml_splice key of the pod socket at the other end of the proxy's
    ``sock``: that socket's own 4-tuple (its local address is our peer's),
    spelled as splice.c spells it (IPv4-mapped IPv6 folds into IPv4)."""
    peer, local = sock.getpeername(), sock.getsockname()
    fam, saddr = abi.pack_addr(peer[0])
    fam2, daddr = abi.pack_addr(local[0])
    if fam != fam2:
        raise OSError(f"mixed address families on one socket: {peer[0]} / {local[0]}")
    key = abi.MlFlowKey()
    key.saddr_be[:] = saddr
    key.daddr_be[:] = daddr
    key.sport, key.dport, key.family = peer[1], local[1], fam
    return bytes(key)


class SpliceMaps:
    """The pinned splice maps of one datapath (``OSError`` when not pinned)."""

    def __init__(self, pin_dir: str) -> None:
        self.dir = os.path.join(pin_dir, abi.SPLICE_DIR)
        self._fds: tuple[int, int, int, int] | None = None
        self._pending_fd: int | None = None  # ml_splice_pending, opened by the first unfile()

    def available(self) -> bool:
        try:
            self._open()
        except OSError:
            return False
        return True

    def _open(self) -> tuple[int, int, int, int]:
        # Opened once and kept: the maps a worker filed its sockets in stay
        # valid while it holds them, even when the agent removes or replaces
        # the pins (proxy.splice turned off, a reload).
        if self._fds is None:
            fds: list[int] = []
            try:
                for name in (abi.SPLICE_TARGETS, abi.SPLICE_PEERS, abi.SPLICE_ARM, abi.SPLICE_SOCKHASH):
                    fds.append(bpfsys.obj_get(os.path.join(self.dir, name)))
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            self._fds = (fds[0], fds[1], fds[2], fds[3])
        return self._fds

    def current(self) -> bool:
        """The maps held are the ones pinned now (False: the agent replaced
        or removed them, e.g. proxy.splice turned off and on again; a new
        SpliceMaps is needed for new connections)."""
        if self._fds is None:
            return self.available()
        try:
            fd = bpfsys.obj_get(os.path.join(self.dir, abi.SPLICE_TARGETS))
        except OSError:
            return False
        try:
            return bpfsys.map_info(fd).id == bpfsys.map_info(self._fds[0]).id
        finally:
            os.close(fd)

    def add_targets(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """Put the proxy's two sockets of one connection in the target
        SOCKHASH with zeroed byte counts; returns their cookies.  On failure
        nothing of theirs is left in the maps."""
        tfd, pfd, _, _ = self._open()
        ca, cb = socket_cookie(a), socket_cookie(b)
        done: list[tuple[int, int]] = []
        try:
            for fd, key, val in (
                (pfd, ca, bytes(abi.MlSplicePeer(cb, 0, bytes_acked(a)))),
                (pfd, cb, bytes(abi.MlSplicePeer(ca, 0, bytes_acked(b)))),
                (tfd, ca, struct.pack("=i", a.fileno())),
                (tfd, cb, struct.pack("=i", b.fileno())),
            ):
                bpfsys.map_update(fd, _U64.pack(key), val, bpfsys.BPF_ANY)
                done.append((fd, key))
        except OSError:
            for fd, key in reversed(done):
                bpfsys.map_delete(fd, _U64.pack(key))
            raise
        return ca, cb

    def arm(self, key: bytes, target: int, relayed: int) -> None:
        """Let the pod socket ``key`` send straight out of ``target`` once
        it has passed exactly ``relayed`` bytes to the proxy."""
        _, _, afd, _ = self._open()
        bpfsys.map_update(afd, key, bytes(abi.MlSpliceArm(target, relayed)), bpfsys.BPF_ANY)

    def disarm(self, key: bytes) -> None:
        """Its later messages go to the proxy again (through TCP)."""
        _, _, afd, _ = self._open()
        bpfsys.map_delete(afd, key)

    def unfile(self, key: bytes) -> bool:
        """Take the pod socket ``key`` out of ml_splice: the proxy will never
        splice its connection.  Out of every sockmap, the socket drops its
        psock and gets the plain TCP operations back (its sendmsg no longer
        runs the sk_msg program).  A pod's accepted socket not yet filed
        (sock_ops files it when the proxy's ACK reaches it, which can come
        after the proxy's connect() returned) loses its pending filing
        first, so it is never filed.  False: it was not filed."""
        if self._pending_fd is None:
            self._pending_fd = bpfsys.obj_get(os.path.join(self.dir, abi.SPLICE_PENDING))
        bpfsys.map_delete(self._pending_fd, key)
        return bpfsys.map_delete(self._open()[3], key)

    def redirected(self, target: int) -> int:
        """Bytes the kernel sent out of ``target`` straight from a pod so far."""
        _, pfd, _, _ = self._open()
        raw = bpfsys.map_lookup(pfd, _U64.pack(target), _PEER_SIZE)
        return 0 if raw is None else abi.MlSplicePeer.from_buffer_copy(raw).bytes

    def remove(self, target: int) -> int:
        """Take a target socket out of the maps; returns its final count.
        (Closing the socket also drops it from the SOCKHASH.)"""
        tfd, pfd, _, _ = self._open()
        n = self.redirected(target)
        bpfsys.map_delete(tfd, _U64.pack(target))
        bpfsys.map_delete(pfd, _U64.pack(target))
        return n

    def counts(self, key: bytes) -> tuple[int, int] | None:
        """(passed, redirected) of a pod socket, from splice.c's own map (for
        tests and diagnostics; None: not filed)."""
        fd = bpfsys.obj_get(os.path.join(self.dir, abi.SPLICE_CNT))
        try:
            raw = bpfsys.map_lookup(fd, key, _CNT_SIZE)
        finally:
            os.close(fd)
        if raw is None:
            return None
        c = abi.MlSpliceCnt.from_buffer_copy(raw)
        return c.passed, c.redirected

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None
