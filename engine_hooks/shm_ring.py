"""A shared-memory record ring between an engine process and its shipper process.

Why: a shipper *thread* in the engine's process holds the engine's GIL whenever it
runs Python, and the engine thread waits for it each time it comes back from a kernel
launch or a collective. With the ring, the engine process runs no thread of ours: its
threads copy each record into an anonymous shared mapping (``os.memfd_create``) and the
shipper process (``ship_process.py``) reads it, owns the socket and does everything
else on its own interpreter.

Layout: a 256-byte header of little-endian u64 fields (below), then ``capacity``
bytes of records. A record is ``u32 size`` (of the whole record) ``| u8 type |
payload``; a record never wraps: when it does not fit before the end, the writer
puts a u32 0 there (if 4 bytes fit) and starts again at offset 0. Positions are
absolute byte counts (offset = position % capacity); the writer owns ``write_pos``,
the reader ``read_pos``. Single producer (the recorder serialises its threads with a
lock), single consumer. A full ring refuses the record (the writer counts it as
dropped): the reader owns everything not yet read, so nothing it is reading is
overwritten. Records are written before ``write_pos`` moves past them; aligned 8-byte
stores and loads are single instructions on the 64-bit hosts engines run on, and x86
keeps stores in order (the ring assumes that memory model; on weaker ones the reader
could see a position before its bytes).
"""

from __future__ import annotations

import mmap
import os
import struct

MAGIC = b"ETRING01"
HEADER_SIZE = 256

# Header fields (byte offsets of u64s).
CAPACITY = 8
WRITE_POS = 16
READ_POS = 24
PRODUCER_DROPPED_STEPS = 32
PRODUCER_DROPPED_EVENTS = 40
FLUSH_DONE_ID = 48
FLUSH_DONE_OK = 56
CONNECTED = 64
SENT_FRAMES = 72
RECONNECTS = 80
PENDING = 88
CPU_NS = 96
CONSUMER_DROPPED_STEPS = 104
CONSUMER_DROPPED_EVENTS = 112
CONSUMER_PID = 120
CONSUMER_PASSES = 128  # bumped on every pass of the shipper loop: it is alive
CHAIN_BREAKS = 136  # steps the shipper process lost before expanding (a repeat after one cannot be)

# Record types.
FRAME = 1  # a finished ingest frame (a step), forwarded as it is
EVENT = 2  # a request event: marshal of the recorder's event tuple
HELLO = 3  # the hello's fields: marshal of a dict (the shipper stamps the clocks at each connect)
MARK = 4  # a flush marker: u64 id, acknowledged in FLUSH_DONE_ID once written or lost
REPEAT = 5  # a repeat step's body (wire.py): expanded against the step before it

RECORD_HEAD = struct.Struct("<IB")
RECORD_HEAD_SIZE = RECORD_HEAD.size
_U64 = struct.Struct("<Q")
_WRAP = b"\0\0\0\0"
MIN_CAPACITY = 64 << 10


def create(capacity: int) -> tuple[int, mmap.mmap]:
    """A new ring in an anonymous memfd: (fd, mapping). Raises OSError where unsupported."""
    capacity = max(MIN_CAPACITY, int(capacity))
    fd = os.memfd_create("enginetime-ring", getattr(os, "MFD_CLOEXEC", 0))
    try:
        os.ftruncate(fd, HEADER_SIZE + capacity)
        mm = mmap.mmap(fd, HEADER_SIZE + capacity)
    except BaseException:
        os.close(fd)
        raise
    # Touch every page now: a page's first write is a page fault (~3 µs a step at batch
    # 256 on the first lap), which the engine thread would otherwise pay.
    zeros = bytes(1 << 16)
    for at in range(HEADER_SIZE, HEADER_SIZE + capacity, len(zeros)):
        end = min(at + len(zeros), HEADER_SIZE + capacity)
        mm[at:end] = zeros[: end - at]
    mm[0:8] = MAGIC
    _U64.pack_into(mm, CAPACITY, capacity)
    return fd, mm


def attach(fd: int) -> mmap.mmap:
    """Map a ring created by ``create`` (the shipper process's side)."""
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size)
    if mm[0:8] != MAGIC or get(mm, CAPACITY) + HEADER_SIZE != size:
        mm.close()
        raise ValueError(f"fd {fd} is not an enginetime ring of this version")
    return mm


def get(mm: mmap.mmap, field: int) -> int:
    return _U64.unpack_from(mm, field)[0]


def put(mm: mmap.mmap, field: int, value: int) -> None:
    _U64.pack_into(mm, field, value & 0xFFFFFFFFFFFFFFFF)


class RingWriter:
    """The producer's side. Callers serialise their writes themselves (one producer)."""

    __slots__ = ("mm", "capacity", "pos")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.capacity = get(mm, CAPACITY)
        self.pos = get(mm, WRITE_POS)

    def write(self, rtype: int, payload: bytes) -> bool:
        """Write one record whole; False (nothing written) when the ring is full."""
        mm = self.mm
        cap = self.capacity
        size = RECORD_HEAD_SIZE + len(payload)
        pos = self.pos
        off = pos % cap
        pad = cap - off if off + size > cap else 0  # it does not fit before the end: start at 0
        if pos + pad + size - _U64.unpack_from(mm, READ_POS)[0] > cap or size > cap:
            return False
        if pad:
            if pad >= 4:
                mm[HEADER_SIZE + off : HEADER_SIZE + off + 4] = _WRAP
            pos += pad
            off = 0
        at = HEADER_SIZE + off
        RECORD_HEAD.pack_into(mm, at, size, rtype)
        mm[at + RECORD_HEAD_SIZE : at + size] = payload
        self.pos = pos + size
        _U64.pack_into(mm, WRITE_POS, self.pos)
        return True

    def unread(self) -> list[int]:
        """Types of the records written and not yet read (for counting what a dead reader lost)."""
        reader = RingReader(self.mm)
        return [rtype for rtype, _ in reader.records(limit=None)]

    def discard_unread(self) -> None:
        """Move the reader to the writer (only while no reader is attached)."""
        put(self.mm, READ_POS, self.pos)


class RingReader:
    """The consumer's side: records in order, bounds-checked (the writer may be buggy)."""

    __slots__ = ("mm", "capacity", "pos")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.capacity = get(mm, CAPACITY)
        self.pos = get(mm, READ_POS)

    def records(self, limit: int | None = 4096) -> list[tuple[int, bytes]]:
        """Up to ``limit`` unread records as (type, payload), advancing this reader (not ``read_pos``)."""
        mm = self.mm
        cap = self.capacity
        end = get(mm, WRITE_POS)
        out: list[tuple[int, bytes]] = []
        pos = self.pos
        if end - pos > cap:  # a writer that is not ours: refuse rather than read garbage
            raise ValueError(f"ring positions are inconsistent (read {pos}, write {end}, capacity {cap})")
        while pos < end and (limit is None or len(out) < limit):
            off = pos % cap
            if cap - off < RECORD_HEAD_SIZE:
                pos += cap - off
                continue
            size, rtype = RECORD_HEAD.unpack_from(mm, HEADER_SIZE + off)
            if size == 0:
                pos += cap - off
                continue
            if size < RECORD_HEAD_SIZE or off + size > cap or pos + size > end:
                raise ValueError(f"corrupt ring record at {pos}: size {size}")
            out.append((rtype, mm[HEADER_SIZE + off + RECORD_HEAD_SIZE : HEADER_SIZE + off + size]))
            pos += size
        self.pos = pos
        return out

    def release(self) -> None:
        """Hand the space of every record returned so far back to the writer."""
        put(self.mm, READ_POS, self.pos)
