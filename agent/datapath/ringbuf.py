"""A BPF ring buffer consumer over mmap — no bcc, no libbpf.

The agent reads closed flows from the pinned ``ml_flow_events`` ring even
after a restart, when the datapath was adopted from bpffs and no bcc object
exists.  The layout follows kernel/bpf/ringbuf.c:

* page 0 (mapped read-write): ``consumer_pos`` (u64), the only thing the
  consumer writes;
* page 1 (read-only): ``producer_pos`` (u64);
* from page 2 (read-only): the data area, ``size`` bytes (a power of two),
  mapped twice in a row by the kernel so a record that wraps is contiguous.

Every record starts with an 8-byte header ``{u32 len; u32 pg_off}``.  While
the producer writes, ``len`` has the BUSY bit (1 << 31): the consumer stops
there.  A discarded record has the DISCARD bit (1 << 30): it is skipped.
Records are 8-byte aligned: the next one starts at
``pos + round_up(len + 8, 8)``.  Positions grow forever; ``pos & (size - 1)``
is the offset in the data area.

:class:`RingBuffer` works on any buffers (tests use bytearrays and handle
wrap-around without the double mapping); :func:`open_pinned` maps a pinned
ring buffer.
"""

from __future__ import annotations

import mmap
import os
import select
import struct

from . import bpfsys

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
MAP_TYPE_RINGBUF = 27

_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")


def record_span(hdr_len: int) -> int:
    """Bytes a record with header word ``hdr_len`` occupies, header included."""
    n = (hdr_len & ~(BUSY_BIT | DISCARD_BIT)) + HDR_SIZE
    return (n + 7) & ~7


class RingBuffer:
    """Consumer side of one ring buffer.

    ``consumer``: writable buffer holding consumer_pos at offset 0.
    ``producer``: buffer holding producer_pos at offset 0 and the data area
    at ``data_offset`` (``size`` bytes, optionally followed by its mirror).
    """

    def __init__(
        self, consumer, producer, size: int, data_offset: int, fd: int | None = None, maps: tuple = ()
    ):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {size}")
        self.consumer = consumer
        self.producer = producer
        self.size = size
        self.mask = size - 1
        self.data_offset = data_offset
        self.fd = fd
        self._maps = maps
        self._poll: select.poll | None = None

    # --- positions -----------------------------------------------------------------

    @property
    def consumer_pos(self) -> int:
        return _U64.unpack_from(self.consumer, 0)[0]

    @property
    def producer_pos(self) -> int:
        return _U64.unpack_from(self.producer, 0)[0]

    def pending(self) -> int:
        """Bytes written by the producer and not consumed yet."""
        return self.producer_pos - self.consumer_pos

    # --- reading --------------------------------------------------------------------

    def _read(self, off: int, n: int) -> bytes:
        """``n`` bytes at data offset ``off``, wrapping at ``size``."""
        start = self.data_offset + off
        if off + n <= self.size:
            return bytes(self.producer[start : start + n])
        first = self.size - off
        return bytes(self.producer[start : start + first]) + bytes(
            self.producer[self.data_offset : self.data_offset + n - first]
        )

    def drain(self, limit: int | None = None) -> list[bytes]:
        """Consume committed records (at most ``limit``) and return their
        payloads in order.  Stops at the first record still being written.
        consumer_pos advances past every record consumed, discarded ones
        included, so the kernel can reuse the space."""
        out: list[bytes] = []
        cons = self.consumer_pos
        while limit is None or len(out) < limit:
            prod = self.producer_pos
            if cons >= prod:
                break
            off = cons & self.mask
            hdr = _U32.unpack_from(self.producer, self.data_offset + off)[0]
            if hdr & BUSY_BIT:
                break
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            if not hdr & DISCARD_BIT:
                out.append(self._read((off + HDR_SIZE) & self.mask, length))
            cons += record_span(hdr)
            _U64.pack_into(self.consumer, 0, cons)
        return out

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the kernel signals data
        (poll on the map fd).  True if data may be there."""
        if self.pending() > 0:
            return True
        if self.fd is None:
            return False
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        return bool(self._poll.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps = ()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_pinned(path: str) -> RingBuffer:
    """Map the ring buffer pinned at ``path`` for consuming."""
    fd = bpfsys.obj_get(path)
    try:
        info = bpfsys.map_info(fd)
        if info.type != MAP_TYPE_RINGBUF:
            raise ValueError(f"{path} is a {info.type_name} map, not a ring buffer")
        page = mmap.PAGESIZE
        size = info.max_entries
        cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            cons.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    return RingBuffer(cons, prod, size, page, fd=fd, maps=(cons, prod))
