"""RequestAccounting as wire bytes, thousands of requests at a time: the fan-out's encoder.

Streaming 10,000 requests' figures ten times a second is 100,000 messages a
second. Building each as a ``RequestView`` and then a protobuf object costs ~20 us
(two dozen attribute reads and a dozen nested message constructions in Python),
which would take two cores. This module writes the same bytes the protobuf
library would parse into ``convert.request_to_proto(view)``, in three parts:

* the **figures that steps change** (state, the six durations and their ``*_ns``
  twins, token counts, steps, last step time) are read from the ledger's numpy
  columns for all requests at once and encoded as protobuf varints with array
  operations: every field is a (tag, varint) item, a nested message's header is
  an item whose value is the byte length of the items after it, and one boolean
  mask over a (rows, items, bytes) matrix drops absent fields and unused varint
  bytes, leaving every row's bytes back to back in one buffer;
* the **fields that only events change** (ids, session, arrival, finish, flags)
  are encoded once per request and kept on the ``Request`` with the values they
  were made from; they are re-encoded when any of those values differ;
* **blame** (victims only) is encoded per request from the ledger's blame table.

Protobuf lets fields come in any order, so a message is simply the three parts
concatenated. Each result is *framed* as field 1 of its container
(``StreamUpdatesResponse.updates``), so a response is the frames joined plus
its own few fields: nothing is parsed or copied again per subscriber.
``tests/test_accounting_wire.py`` checks every field against
``request_to_proto`` over ledger states of every kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from enginetime.sidecar.ledger.store import ABORTED, EMPTY, FINISHED, Request
from enginetime.sidecar.ledger.views import BlameView

NS_PER_S = 1_000_000_000
_U64 = (1 << 64) - 1

# ---------------------------------------------------------------------------- scalar (per request)

_SMALL = [bytes((i,)) for i in range(128)]


def varint(value: int) -> bytes:
    """Base-128 varint; negative values as their 64-bit two's complement (int64 rule)."""
    if 0 <= value < 128:
        return _SMALL[value]
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _len_field(tag_bytes: bytes, body: bytes) -> bytes:
    return tag_bytes + varint(len(body)) + body


def _str_field(tag_bytes: bytes, text: str) -> bytes:
    return _len_field(tag_bytes, text.encode()) if text else b""


def _int_field(tag_bytes: bytes, value: int) -> bytes:
    return tag_bytes + varint(value) if value else b""


def _seconds_nanos(tag_bytes: bytes, ns: int) -> bytes:
    """A Timestamp/Duration of ``ns`` (seconds and nanos carry the same sign), always present."""
    if ns >= 0:
        sec, nanos = divmod(ns, NS_PER_S)
    else:
        sec, nanos = divmod(-ns, NS_PER_S)
        sec, nanos = -sec, -nanos
    return _len_field(tag_bytes, _int_field(b"\x08", sec) + _int_field(b"\x10", nanos))


_T_REQUEST_ID = tag(1, 2)
_T_SESSION_ID = tag(2, 2)
_T_ENGINE_ID = tag(3, 2)
_T_SHARD = tag(4, 0)
_T_ARRIVAL = tag(6, 2)
_T_PREEMPTIONS = tag(14, 0)
_T_TOP_BLAME = tag(15, 2)
_T_PARTIAL = tag(16, 0)
_T_MIGRATED = tag(18, 0)
_T_FINISH_TIME = tag(20, 2)
_T_FINISH_REASON = tag(21, 2)
_T_ROUTED_SHARD = tag(22, 0)
_T_TRACEPARENT = tag(29, 2)

# Blame fields.
_TB_REQUEST_ID = tag(1, 2)
_TB_SHARD = tag(2, 0)
_TB_DURATION = tag(3, 2)
_TB_SAME_SHARD = tag(4, 0)
_TB_ENGINE_ID = tag(5, 2)
_TB_ARRIVAL = tag(6, 2)


def event_fields(req: Request, terminal: bool) -> bytes:
    """The fields only events change, cached on ``req`` with the values they were made from."""
    shard = req.shard
    finish = req.finish_ns if terminal else 0
    key = (
        req.request_id,
        req.session_id,
        req.traceparent,
        req.finish_reason,
        req.routed_shard,
        req.preemptions,
        req.partial,
        req.migrated,
        req.arrival_ns,
        finish,
        shard,
    )
    cached = req.wire
    if cached is not None and cached[0] == key:
        return cached[1]
    data = b"".join(
        (
            _str_field(_T_REQUEST_ID, req.request_id),
            _str_field(_T_SESSION_ID, req.session_id),
            _str_field(_T_ENGINE_ID, shard.engine_id),
            _int_field(_T_SHARD, shard.shard),
            _seconds_nanos(_T_ARRIVAL, req.arrival_ns),
            _int_field(_T_PREEMPTIONS, req.preemptions),
            _int_field(_T_PARTIAL, int(req.partial)),
            _int_field(_T_MIGRATED, int(req.migrated)),
            _seconds_nanos(_T_FINISH_TIME, finish) if finish else b"",
            _str_field(_T_FINISH_REASON, req.finish_reason),
            b"" if req.routed_shard is None else _T_ROUTED_SHARD + varint(req.routed_shard),
            _str_field(_T_TRACEPARENT, req.traceparent),
        )
    )
    req.wire = (key, data)
    return data


def blame_fields(blame: Sequence[BlameView]) -> bytes:
    """``top_blame`` entries (field 15), largest first as the ledger gives them."""
    return b"".join(
        _len_field(
            _T_TOP_BLAME,
            b"".join(
                (
                    _str_field(_TB_REQUEST_ID, b.request_id),
                    _int_field(_TB_SHARD, b.shard),
                    _seconds_nanos(_TB_DURATION, b.seconds_ns),
                    _int_field(_TB_SAME_SHARD, int(b.same_shard)),
                    _str_field(_TB_ENGINE_ID, b.engine_id),
                    _seconds_nanos(_TB_ARRIVAL, b.arrival_ns) if b.arrival_ns >= 0 else b"",
                )
            ),
        )
        for b in blame
    )


# ---------------------------------------------------------------------------- vectorised (all requests)

#: Item layout of the step-changed part. Each item is (tag, presence) where presence is
#: "always" (nested message headers that request_to_proto always sets), "nonzero" (proto3
#: scalars: omitted at 0) or "header:<n>" (a header present when the timestamp it wraps is set).
#: A header's value is the byte length of the ``n`` items after it.
_FRAME, _STATE = 0, 1
_ITEMS: list[tuple[int, int, str, int]] = []  # (field, wire type, presence, header span)


def _item(field: int, wire: int, presence: str = "nonzero", span: int = 0) -> int:
    _ITEMS.append((field, wire, presence, span))
    return len(_ITEMS) - 1


_item(1, 2, "always", -1)  # the frame: field 1 of the container; spans every other item
_item(5, 0)  # state
_DURATIONS = []
for _field in (7, 8, 9, 10, 11, 19):  # queue, engine, gpu, interference, wall, other
    _DURATIONS.append(_item(_field, 2, "always", 2))
    _item(1, 0)
    _item(2, 0)
_TOKENS = _item(12, 2, "always", 4)
for _field in (1, 2, 3, 4):  # prompt, cached, prefilled, decoded
    _item(_field, 0)
_STEPS = _item(13, 0)
_LAST_STEP = _item(17, 2, "present", 2)
_item(1, 0)
_item(2, 0)
_EXCLUDED = _item(23, 0)
_NS = [_item(f, 0) for f in (24, 25, 26, 27, 28, 30)]  # queue, engine, gpu, interference, wall, other
_N_ITEMS = len(_ITEMS)

_TAGS = np.zeros((_N_ITEMS, 2), dtype=np.uint8)
_TAG_LEN = np.zeros(_N_ITEMS, dtype=np.int64)
for _i, (_field, _wire, _presence, _span) in enumerate(_ITEMS):
    _t = tag(_field, _wire)
    assert len(_t) <= 2
    _TAGS[_i, : len(_t)] = np.frombuffer(_t, dtype=np.uint8)
    _TAG_LEN[_i] = len(_t)
_LOW7 = np.uint64(0x7F)
_ALWAYS = np.array([p == "always" for _, _, p, _ in _ITEMS])
_HEADERS = [(i, span) for i, (_, _, _, span) in enumerate(_ITEMS) if span > 0]
#: 128**k for k = 1..9: a value needs 1 + (number of these it reaches) varint bytes.
_THRESHOLDS = [np.uint64(1 << (7 * k)) for k in range(1, 10)]


def _varint_len(u: np.ndarray) -> np.ndarray:
    n = np.ones(u.shape, dtype=np.int64)
    for t in _THRESHOLDS:
        ge = u >= t
        if not ge.any():
            break
        n += ge
    return n


def step_fields(values: np.ndarray, present: np.ndarray, extra_len: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Encode the item matrix; returns (all rows back to back, row byte lengths).

    ``values`` is (rows, items) int64 with header items' values still unset;
    ``present`` marks the items to write; ``extra_len`` is each row's length of the
    parts appended after this one (event fields, blame), counted in the frame's length.

    Work is sized by what the batch holds, not by the item list: items no row writes
    are left out, and each item gets as many byte columns as its largest value needs
    (most need one; timestamps and nanoseconds five), so a row is laid out as its items'
    tag and varint bytes side by side and one ``compress()`` keeps the written ones.
    """
    rows = values.shape[0]
    used = np.flatnonzero(present.any(axis=0))  # the frame and nested headers always are
    u = values.view(np.uint64)[:, used]
    pres = present[:, used]
    tag_len = _TAG_LEN[used]
    vlen = _varint_len(u)
    item_len = np.where(pres, tag_len + vlen, 0)
    pos = np.full(_N_ITEMS, -1, dtype=np.int64)
    pos[used] = np.arange(used.size)

    def set_length(i: int, total: np.ndarray) -> None:
        u[:, i] = total
        vlen[:, i] = _varint_len(u[:, i])
        item_len[:, i] = np.where(pres[:, i], tag_len[i] + vlen[:, i], 0)

    for h, span in reversed(_HEADERS):  # inner headers first (none nest here, but keep it general)
        if pos[h] >= 0:
            inner = pos[h + 1 : h + 1 + span]
            set_length(int(pos[h]), item_len[:, inner[inner >= 0]].sum(axis=1))
    set_length(0, item_len[:, 1:].sum(axis=1) + extra_len)  # the frame is item 0, always used

    widest = vlen.max(axis=0) if rows else np.ones(used.size, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(tag_len + widest)[:-1]))
    cells = np.empty((rows, int((tag_len + widest).sum())), dtype=np.uint8)
    keep = np.empty(cells.shape, dtype=bool)
    tags = _TAGS[used]
    cells[:, starts] = tags[:, 0]
    keep[:, starts] = pres
    two = np.flatnonzero(tag_len == 2)
    cells[:, starts[two] + 1] = tags[two, 1]
    keep[:, starts[two] + 1] = pres[:, two]
    written = np.where(pres, vlen, 0)
    first_byte = starts + tag_len
    for j in range(int(widest.max()) if rows else 0):
        cols = np.flatnonzero(widest > j)
        v = u[:, cols] if j == 0 else (u[:, cols] >> np.uint64(7 * j))
        byte = (v & _LOW7).astype(np.uint8)
        w = written[:, cols]
        byte |= (w > j + 1).view(np.uint8) << 7
        at = first_byte[cols] + j
        cells[:, at] = byte
        keep[:, at] = w > j
    return cells.reshape(-1).compress(keep.reshape(-1)).tobytes(), item_len.sum(axis=1)


#: Rows encoded per array pass: large enough to amortise numpy's per-call cost, small
#: enough that the (rows, items, bytes) matrices stay in cache (measured best at 1-4k).
CHUNK_ROWS = 2048


def encode(ledger, slots: np.ndarray, now_ns: int, reqs: list[Request] | None = None) -> list[bytes]:
    """Framed RequestAccounting bytes of the requests in ``slots`` (live slots of ``ledger``).

    The figures are those ``ledger._view(request, now_ns)`` would give. ``reqs``: the
    requests in those slots, when the caller has them already.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if reqs is None:
        reqs = ledger.requests_at(slots)
    if slots.size <= CHUNK_ROWS:
        return _encode(ledger, slots, reqs, now_ns)
    out: list[bytes] = []
    for i in range(0, slots.size, CHUNK_ROWS):
        out += _encode(ledger, slots[i : i + CHUNK_ROWS], reqs[i : i + CHUNK_ROWS], now_ns)
    return out


def _encode(ledger, slots: np.ndarray, reqs: list[Request], now_ns: int) -> list[bytes]:
    n = slots.size
    if n == 0:
        return []
    cols = ledger._cols
    state = cols.state[slots].astype(np.int64)
    terminal = (state == FINISHED) | (state == ABORTED)
    arrival = cols.arrival[slots]
    end = np.full(n, now_ns, dtype=np.int64)
    ended = np.flatnonzero(terminal).tolist()
    if ended:
        end[ended] = [reqs[i].finish_ns for i in ended]
    wall = np.maximum(end - arrival, 0)
    eng = np.minimum(np.maximum(np.rint(cols.engine[slots]).astype(np.int64), 0), wall)
    first_start = cols.first_start[slots]
    queue = np.where(first_start >= 0, first_start - arrival, wall)
    queue = np.minimum(np.maximum(queue, 0), wall - eng)
    interf = np.minimum(np.maximum(np.rint(cols.interf[slots]).astype(np.int64), 0), wall - eng - queue)
    other = wall - eng - queue - interf
    gpu = np.maximum(np.rint(cols.gpu[slots]).astype(np.int64), 0)
    last_step = cols.last_step[slots]

    values = np.zeros((n, _N_ITEMS), dtype=np.int64)
    values[:, _STATE] = state
    for h, ns in zip(_DURATIONS, (queue, eng, gpu, interf, wall, other), strict=True):
        values[:, h + 1], values[:, h + 2] = np.divmod(ns, NS_PER_S)  # all >= 0 here
    values[:, _TOKENS + 1] = cols.prompt[slots]
    values[:, _TOKENS + 2] = cols.cached[slots]
    values[:, _TOKENS + 3] = cols.prefilled[slots]
    values[:, _TOKENS + 4] = cols.decoded[slots]
    values[:, _STEPS] = cols.steps[slots]
    values[:, _LAST_STEP + 1], values[:, _LAST_STEP + 2] = np.divmod(last_step, NS_PER_S)
    values[:, _EXCLUDED] = cols.excluded[slots]
    for i, ns in zip(_NS, (queue, eng, gpu, interf, wall, other), strict=True):
        values[:, i] = ns

    present = values != 0
    present[:, _ALWAYS] = True
    present[:, _LAST_STEP] = last_step != 0

    events = [event_fields(r, t) for r, t in zip(reqs, terminal.tolist(), strict=True)]
    blamed = np.flatnonzero(cols.blame_agg[slots, 0] != EMPTY).tolist()
    tails = events
    if blamed:
        tails = list(events)
        for i in blamed:
            tails[i] = events[i] + blame_fields(ledger._blame_views(reqs[i]))
    extra = np.fromiter(map(len, tails), dtype=np.int64, count=n)
    data, lengths = step_fields(values, present, extra)
    ends = np.cumsum(lengths).tolist()
    out = []
    start = 0
    for stop, tail in zip(ends, tails, strict=True):
        out.append(data[start:stop] + tail)
        start = stop
    return out
