"""Hand-written protobuf encoder for proto/enginetime/v1/ingest.proto.

The engine process must not need the protobuf library (SGLang/vLLM environments pin
their own protobuf, and importing it costs start-up time and memory), so the hooks
write the few ingest messages by hand. The encoder follows proto3 wire rules:

* scalar fields equal to their default (0, "", False) are omitted;
* ``optional`` fields (global_step, routed_shard) are written whenever they are not
  None, even when 0, so the reader's ``HasField`` says whether the engine knew them;
* step columns are packed ``repeated fixed32``: one ``array('I').tobytes()`` each
  (little-endian on the wire; swapped on big-endian hosts);
* fields are written in field-number order (canonical encoding).

Recorders send steps as ``IngestFrame.packed_step`` (a fixed layout, documented at
``frame_packed_step`` below), which the engine thread writes with one ``struct.pack``;
``frame_step`` (a protobuf StepRecord) is what protocol v1 recorders sent.

Every ``frame_*`` function returns one length-delimited frame: the base-128 varint
byte length of an ``IngestFrame`` message, then the message. Out-of-range values
raise ValueError naming the field: the recorder sanitises user input before it gets
here, so a ValueError from this module means a bug, never silent truncation.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence, Sized

from .constants import HOOKS_VERSION, PROTOCOL_VERSION

# Wire types.
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_I32_MIN = -(1 << 31)
_I32_MAX = (1 << 31) - 1


def _pick_u32_typecode() -> str:
    """The array typecode whose items are 4-byte unsigned ints on this platform."""
    for code in ("I", "L"):
        if array(code).itemsize == 4:
            return code
    raise ImportError("no 4-byte unsigned array typecode on this platform")  # pragma: no cover


#: Typecode of a fixed32 column. Pass columns as ``array(U32, ...)`` to skip a conversion.
U32 = _pick_u32_typecode()
_BIG_ENDIAN = sys.byteorder == "big"

_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def encode_varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int below 2**64."""
    if 0 <= value < 128:
        return _SMALL_VARINTS[value]
    if value < 0 or value > _U64_MAX:
        raise ValueError(f"varint out of range: {value}")
    out: list[int] = []
    append = out.append
    while value > 0x7F:
        append((value & 0x7F) | 0x80)
        value >>= 7
    append(value)
    return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Read a varint at ``pos``; return (value, next position).

    Raises IndexError when the buffer ends inside the varint (wait for more bytes)
    and ValueError when it is longer than 10 bytes (a corrupt stream).
    """
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes: corrupt frame stream")


def split_frames(buf: bytes | bytearray) -> tuple[list[bytes], int]:
    """Split complete length-delimited frames off the front of ``buf``.

    Returns (IngestFrame payloads, bytes consumed); a trailing partial frame is left
    for the caller to complete with more bytes. Used by tests and diagnostics; the
    sidecar has its own reader.
    """
    frames: list[bytes] = []
    pos = 0
    end = len(buf)
    while pos < end:
        try:
            size, start = decode_varint(buf, pos)
        except IndexError:
            break
        if start + size > end:
            break
        frames.append(bytes(buf[start : start + size]))
        pos = start + size
    return frames, pos


def _tag(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def _u32(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name}={value} does not fit uint32")
    return value


def _u64(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name}={value} does not fit uint64")
    return value


def _i64(name: str, value: int) -> int:
    value = int(value)
    if not _I64_MIN <= value <= _I64_MAX:
        raise ValueError(f"{name}={value} does not fit int64")
    return value & _U64_MAX  # two's complement: negatives take 10 bytes


def _enum(name: str, value: int) -> int:
    value = int(value)
    if not _I32_MIN <= value <= _I32_MAX:
        raise ValueError(f"{name}={value} does not fit an enum (int32)")
    return value & _U64_MAX


def _put_varint(parts: list[bytes], tag: bytes, value: int) -> None:
    """Append a varint field unless it is the proto3 default."""
    if value:
        parts.append(tag)
        parts.append(encode_varint(value))


def _put_bytes(parts: list[bytes], tag: bytes, data: bytes) -> None:
    if data:
        parts.append(tag)
        parts.append(encode_varint(len(data)))
        parts.append(data)


def _put_str(parts: list[bytes], tag: bytes, text: str) -> None:
    if text:
        # proto3 strings must be valid UTF-8: lone surrogates become "?"
        # instead of making the reader reject the whole frame.
        _put_bytes(parts, tag, str(text).encode("utf-8", "replace"))


def column_bytes(name: str, column: Iterable[int]) -> bytes:
    """Little-endian fixed32 bytes of a column (list, tuple, array or any iterable of ints)."""
    if isinstance(column, array) and column.typecode == U32:
        arr = column
    else:
        try:
            arr = array(U32, column)
        except OverflowError:
            raise ValueError(f"{name} has a value outside uint32 (0..{_U32_MAX})") from None
        except TypeError as exc:
            raise ValueError(f"{name} must hold ints: {exc}") from None
    if _BIG_ENDIAN:
        arr = array(U32, arr)
        arr.byteswap()
    return arr.tobytes()


def _wrap(frame_field: int, inner: bytes) -> bytes:
    """IngestFrame{oneof frame = inner} with its varint length prefix."""
    tag = _FRAME_TAGS[frame_field]
    body = b"".join((tag, encode_varint(len(inner)), inner))
    return encode_varint(len(body)) + body


# IngestFrame oneof members.
FRAME_HELLO = 1
FRAME_REQUEST_EVENT = 2
FRAME_STEP = 3
FRAME_HEARTBEAT = 4
_FRAME_TAGS = {f: _tag(f, _LEN) for f in (FRAME_HELLO, FRAME_REQUEST_EVENT, FRAME_STEP, FRAME_HEARTBEAT)}

# ClockInfo
_CLOCK_WALL = _tag(1, _VARINT)
_CLOCK_MONO = _tag(2, _VARINT)
_CLOCK_SOURCE = _tag(3, _VARINT)
_CLOCK_DEVICE = _tag(4, _LEN)

# EngineHello
_HELLO_PROTO = _tag(1, _VARINT)
_HELLO_ENGINE_ID = _tag(2, _LEN)
_HELLO_SHARD = _tag(3, _VARINT)
_HELLO_NUM_SHARDS = _tag(4, _VARINT)
_HELLO_COUPLING = _tag(5, _VARINT)
_HELLO_KIND = _tag(6, _LEN)
_HELLO_VERSION = _tag(7, _LEN)
_HELLO_HOOKS = _tag(8, _LEN)
_HELLO_CLOCK = _tag(9, _LEN)
_HELLO_EPOCH = _tag(10, _VARINT)
_HELLO_TOKEN = _tag(11, _LEN)


def frame_hello(
    *,
    engine_id: str,
    shard: int,
    num_shards: int,
    coupling: int,
    engine_kind: str = "",
    engine_version: str = "",
    hooks_version: str = HOOKS_VERSION,
    wall_time_ns: int = 0,
    monotonic_ns: int = 0,
    timer_source: int = 0,
    device_name: str = "",
    recorder_epoch: int = 0,
    protocol_version: int = PROTOCOL_VERSION,
    token: str = "",
) -> bytes:
    """One framed EngineHello (with its ClockInfo); ``token`` authenticates TCP ingest."""
    clock: list[bytes] = []
    _put_varint(clock, _CLOCK_WALL, _i64("wall_time_ns", wall_time_ns))
    _put_varint(clock, _CLOCK_MONO, _i64("monotonic_ns", monotonic_ns))
    _put_varint(clock, _CLOCK_SOURCE, _enum("timer_source", timer_source))
    _put_str(clock, _CLOCK_DEVICE, device_name)

    parts: list[bytes] = []
    _put_varint(parts, _HELLO_PROTO, _u32("protocol_version", protocol_version))
    _put_str(parts, _HELLO_ENGINE_ID, engine_id)
    _put_varint(parts, _HELLO_SHARD, _u32("shard", shard))
    _put_varint(parts, _HELLO_NUM_SHARDS, _u32("num_shards", num_shards))
    _put_varint(parts, _HELLO_COUPLING, _enum("coupling", coupling))
    _put_str(parts, _HELLO_KIND, engine_kind)
    _put_str(parts, _HELLO_VERSION, engine_version)
    _put_str(parts, _HELLO_HOOKS, hooks_version)
    # A set message field is written even when empty, so the reader sees it present.
    clock_bytes = b"".join(clock)
    parts += (_HELLO_CLOCK, encode_varint(len(clock_bytes)), clock_bytes)
    _put_varint(parts, _HELLO_EPOCH, _u64("recorder_epoch", recorder_epoch))
    _put_str(parts, _HELLO_TOKEN, token)
    return _wrap(FRAME_HELLO, b"".join(parts))


# RequestEvent
_EV_HANDLE = _tag(1, _VARINT)
_EV_REQUEST_ID = _tag(2, _LEN)
_EV_KIND = _tag(3, _VARINT)
_EV_TIME = _tag(4, _VARINT)
_EV_PROMPT = _tag(5, _VARINT)
_EV_CACHED = _tag(6, _VARINT)
_EV_SESSION = _tag(7, _LEN)
_EV_TRACEPARENT = _tag(8, _LEN)
_EV_ROUTED = _tag(9, _VARINT)
_EV_REASON = _tag(10, _LEN)
_EV_OUTPUT = _tag(11, _VARINT)
_EV_REPLAYED = _tag(12, _VARINT)


def frame_event(
    *,
    handle: int,
    kind: int,
    time_ns: int,
    request_id: str = "",
    prompt_tokens: int = 0,
    cached_tokens: int = 0,
    session_id: str = "",
    traceparent: str = "",
    routed_shard: int | None = None,
    finish_reason: str = "",
    output_tokens: int = 0,
    replayed: bool = False,
) -> bytes:
    """One framed RequestEvent."""
    parts: list[bytes] = []
    _put_varint(parts, _EV_HANDLE, _u32("handle", handle))
    _put_str(parts, _EV_REQUEST_ID, request_id)
    _put_varint(parts, _EV_KIND, _enum("kind", kind))
    _put_varint(parts, _EV_TIME, _i64("time_ns", time_ns))
    _put_varint(parts, _EV_PROMPT, _u32("prompt_tokens", prompt_tokens))
    _put_varint(parts, _EV_CACHED, _u32("cached_tokens", cached_tokens))
    _put_str(parts, _EV_SESSION, session_id)
    _put_str(parts, _EV_TRACEPARENT, traceparent)
    if routed_shard is not None:  # optional: present even when 0
        parts += (_EV_ROUTED, encode_varint(_u32("routed_shard", routed_shard)))
    _put_str(parts, _EV_REASON, finish_reason)
    _put_varint(parts, _EV_OUTPUT, _u32("output_tokens", output_tokens))
    if replayed:
        parts += (_EV_REPLAYED, b"\x01")
    return _wrap(FRAME_REQUEST_EVENT, b"".join(parts))


# StepRecord
_ST_SEQ = _tag(1, _VARINT)
_ST_GLOBAL = _tag(2, _VARINT)
_ST_START = _tag(3, _VARINT)
_ST_END = _tag(4, _VARINT)
_ST_DEVICE = _tag(5, _VARINT)
_ST_SOURCE = _tag(6, _VARINT)
_ST_KIND = _tag(7, _VARINT)
_ST_HANDLES = _tag(8, _LEN)
_ST_PREFILL = _tag(9, _LEN)
_ST_DECODE = _tag(10, _LEN)
_ST_CONTEXT = _tag(11, _LEN)
_ST_PEER = _tag(12, _LEN)


def _column_length(handles: Sized, prefill_tokens: Sized, decode_tokens: Sized, context_tokens: Sized) -> int:
    """The entries of a step's four columns; ValueError naming each length when they differ."""
    n = len(handles)
    if len(prefill_tokens) != n or len(decode_tokens) != n or len(context_tokens) != n:
        raise ValueError(
            f"step columns differ in length: handles={n} prefill_tokens={len(prefill_tokens)} "
            f"decode_tokens={len(decode_tokens)} context_tokens={len(context_tokens)}"
        )
    return n


def frame_step(
    *,
    seq: int,
    start_time_ns: int,
    end_time_ns: int,
    device_time_ns: int,
    timer_source: int,
    kind: int,
    handles: Sequence[int] | array = (),
    prefill_tokens: Sequence[int] | array = (),
    decode_tokens: Sequence[int] | array = (),
    context_tokens: Sequence[int] | array = (),
    peer_tokens: Sequence[int] | array | None = (),
    global_step: int | None = None,
) -> bytes:
    """One framed StepRecord. Columns must have equal lengths (peer_tokens excepted)."""
    n = _column_length(handles, prefill_tokens, decode_tokens, context_tokens)
    # This runs once per step on the shipper thread (which shares the GIL with the
    # engine), so the common case is written out flat: plain ints in range.
    if not (type(seq) is int and 0 <= seq <= _U64_MAX):
        seq = _u64("seq", seq)
    if not (type(start_time_ns) is int and 0 <= start_time_ns <= _I64_MAX):
        start_time_ns = _i64("start_time_ns", start_time_ns)
    if not (type(end_time_ns) is int and 0 <= end_time_ns <= _I64_MAX):
        end_time_ns = _i64("end_time_ns", end_time_ns)
    if not (type(device_time_ns) is int and 0 <= device_time_ns <= _I64_MAX):
        device_time_ns = _i64("device_time_ns", device_time_ns)
    timer_source = _enum("timer_source", timer_source)
    kind = _enum("kind", kind)
    varint = encode_varint
    parts: list[bytes] = []
    if seq:
        parts += (_ST_SEQ, varint(seq))
    if global_step is not None:  # optional: present even when 0
        parts += (_ST_GLOBAL, varint(_u64("global_step", global_step)))
    if start_time_ns:
        parts += (_ST_START, varint(start_time_ns))
    if end_time_ns:
        parts += (_ST_END, varint(end_time_ns))
    if device_time_ns:
        parts += (_ST_DEVICE, varint(device_time_ns))
    if timer_source:
        parts += (_ST_SOURCE, varint(timer_source))
    if kind:
        parts += (_ST_KIND, varint(kind))
    if n:
        size = varint(4 * n)  # the four per-entry columns share one length
        parts += (
            _ST_HANDLES,
            size,
            column_bytes("handles", handles),
            _ST_PREFILL,
            size,
            column_bytes("prefill_tokens", prefill_tokens),
            _ST_DECODE,
            size,
            column_bytes("decode_tokens", decode_tokens),
            _ST_CONTEXT,
            size,
            column_bytes("context_tokens", context_tokens),
        )
    if peer_tokens:
        _put_bytes(parts, _ST_PEER, column_bytes("peer_tokens", peer_tokens))
    return _wrap(FRAME_STEP, b"".join(parts))


# Heartbeat
_HB_TIME = _tag(1, _VARINT)
_HB_DROPPED = _tag(2, _VARINT)
_HB_DROPPED_STEPS = _tag(3, _VARINT)
_HB_DROPPED_EVENTS = _tag(4, _VARINT)
_HB_SENT = _tag(5, _VARINT)
_HB_RECONNECTS = _tag(6, _VARINT)


def frame_heartbeat(
    *,
    time_ns: int,
    dropped_frames: int = 0,
    dropped_steps: int = 0,
    dropped_events: int = 0,
    sent_frames: int = 0,
    reconnects: int = 0,
) -> bytes:
    """One framed Heartbeat (counters cumulative since the recorder started)."""
    parts: list[bytes] = []
    _put_varint(parts, _HB_TIME, _i64("time_ns", time_ns))
    _put_varint(parts, _HB_DROPPED, _u64("dropped_frames", dropped_frames))
    _put_varint(parts, _HB_DROPPED_STEPS, _u64("dropped_steps", dropped_steps))
    _put_varint(parts, _HB_DROPPED_EVENTS, _u64("dropped_events", dropped_events))
    _put_varint(parts, _HB_SENT, _u64("sent_frames", sent_frames))
    _put_varint(parts, _HB_RECONNECTS, _u64("reconnects", reconnects))
    return _wrap(FRAME_HEARTBEAT, b"".join(parts))


_STEP_TAG = _FRAME_TAGS[FRAME_STEP]


def u32_column(column: object) -> array:
    """A step column as the ``array`` whose bytes are its packed fixed32 field.

    An ``array(U32)`` is used as it is (on little-endian hosts; the bytes are copied
    into the frame at once, so the caller may reuse it); anything else is converted.
    Raises ValueError naming the problem for values outside uint32 or non-ints.
    """
    if type(column) is array and column.typecode == U32 and not _BIG_ENDIAN:
        return column
    try:
        if type(column) is list:
            arr = array(U32)
            arr.fromlist(column)
        else:
            arr = array(U32, column)  # type: ignore[call-overload]
    except OverflowError:
        raise ValueError(f"a step column has a value outside uint32 (0..{_U32_MAX})") from None
    except TypeError as exc:
        raise ValueError(f"step columns must hold ints: {exc}") from None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


_COLUMN_TAGS: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}
_SOURCE_FIELDS = {k: (_ST_SOURCE + encode_varint(k) if k else b"") for k in range(8)}
_KIND_FIELDS = {k: (_ST_KIND + encode_varint(k) if k else b"") for k in range(8)}
_MONOTONIC_FIELD = _SOURCE_FIELDS[1]
_HIGH_VARINTS: dict[int, bytes] = {}


def _short_varint(value: int) -> bytes:
    """``encode_varint`` with the one- to three-byte cases (seq, sizes, step times) written out."""
    if value < 0x80:
        return _SMALL_VARINTS[value] if value >= 0 else encode_varint(value)
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    return encode_varint(value)


def _time_varint(value: int) -> bytes:
    """``encode_varint`` of a non-negative int64, fast for nanosecond clock readings.

    A clock reading's bits above 2**28 change every 0.27 s, so their varint bytes are
    cached and only the low four 7-bit groups are computed per call.
    """
    if value < 0x10000000:
        return encode_varint(value)
    high = value >> 28
    tail = _HIGH_VARINTS.get(high)
    if tail is None:
        if len(_HIGH_VARINTS) > 64:
            _HIGH_VARINTS.clear()
        tail = _HIGH_VARINTS[high] = encode_varint(high)
    low = bytes(
        (
            (value & 0x7F) | 0x80,
            ((value >> 7) & 0x7F) | 0x80,
            ((value >> 14) & 0x7F) | 0x80,
            ((value >> 21) & 0x7F) | 0x80,
        )
    )
    return low + tail


def step_device_fields(device_time_ns: int, timer_source: int) -> bytes:
    """StepRecord's device_time_ns and timer_source fields, for ``wrap_step``."""
    if not (type(device_time_ns) is int and 0 <= device_time_ns <= _I64_MAX):
        device_time_ns = _i64("device_time_ns", device_time_ns)
    source = _SOURCE_FIELDS.get(
        timer_source if type(timer_source) is int else _enum("timer_source", timer_source)
    )
    if source is None:
        source = _ST_SOURCE + encode_varint(_enum("timer_source", timer_source))
    if device_time_ns:
        return _ST_DEVICE + encode_varint(device_time_ns) + source
    return source


def wrap_step(body: bytes, tail: bytes) -> bytes:
    """One framed StepRecord from ``encode_step``'s body (device time pending) and ``tail``.

    Protobuf readers accept fields in any order, so a step timed with CUDA events is
    encoded on the engine thread without its device time, and the shipper appends
    ``step_device_fields`` here once the events have resolved.
    """
    inner = len(body) + len(tail)
    tag_and_len = _STEP_TAG + encode_varint(inner)
    return b"".join((encode_varint(len(tag_and_len) + inner), tag_and_len, body, tail))


def encode_step(
    seq: int,
    global_step: int | None,
    start_time_ns: int,
    end_time_ns: int,
    device_time_ns: int | None,
    timer_source: int,
    kind: int,
    handles: array,
    prefill_tokens: array,
    decode_tokens: array,
    context_tokens: array,
    peer_tokens: array | None,
) -> bytes:
    """A step encoded on the engine thread, as one ``bytes`` (the columns copied once).

    With ``device_time_ns`` given: the complete frame, byte for byte what ``frame_step``
    writes. With None (a CUDA step whose events have not resolved yet): the StepRecord's
    fields without device_time_ns and timer_source, for ``wrap_step``. Columns come from
    ``u32_column``; the caller checks that the four per-entry columns are equally long.
    Written flat: the engine thread pays for every line. Raises ValueError for values
    out of range.
    """
    if not (type(seq) is int and 0 <= seq <= _U64_MAX):
        seq = _u64("seq", seq)
    if not (type(start_time_ns) is int and 0 <= start_time_ns <= _I64_MAX):
        start_time_ns = _i64("start_time_ns", start_time_ns)
    if not (type(end_time_ns) is int and 0 <= end_time_ns <= _I64_MAX):
        end_time_ns = _i64("end_time_ns", end_time_ns)
    kind_field = _KIND_FIELDS.get(kind)  # precomputed; an IntEnum member hashes as its int
    if kind_field is None:
        kind_field = _ST_KIND + encode_varint(_enum("kind", kind))
    varint = _short_varint
    head: list[bytes] = [_ST_SEQ, varint(seq)] if seq else []
    if global_step is not None:  # optional: present even when 0
        if not (type(global_step) is int and 0 <= global_step <= _U64_MAX):
            global_step = _u64("global_step", global_step)
        head += (_ST_GLOBAL, varint(global_step))
    if start_time_ns:
        head += (_ST_START, _time_varint(start_time_ns))
    if end_time_ns:
        head += (_ST_END, _time_varint(end_time_ns))
    if device_time_ns is not None:
        if timer_source == 1 and type(device_time_ns) is int and 0 < device_time_ns <= _I64_MAX:
            head += (_ST_DEVICE, varint(device_time_ns), _MONOTONIC_FIELD)  # the CPU timer's steps
        else:
            head.append(step_device_fields(device_time_ns, timer_source))
    head.append(kind_field)
    header = b"".join(head)
    size = len(header)
    parts: list = [b"", header]
    n = len(handles)
    if n:
        tags = _COLUMN_TAGS.get(n)
        if tags is None:
            if len(_COLUMN_TAGS) > 4096:
                _COLUMN_TAGS.clear()
            col_len = varint(4 * n)  # the four per-entry columns share one length
            tags = _COLUMN_TAGS[n] = (
                _ST_HANDLES + col_len,
                _ST_PREFILL + col_len,
                _ST_DECODE + col_len,
                _ST_CONTEXT + col_len,
            )
        parts += (tags[0], handles, tags[1], prefill_tokens, tags[2], decode_tokens, tags[3], context_tokens)
        size += 4 * (len(tags[0]) + 4 * n)
    if peer_tokens is not None and len(peer_tokens):
        peer_field = _ST_PEER + varint(4 * len(peer_tokens))
        parts += (peer_field, peer_tokens)
        size += len(peer_field) + 4 * len(peer_tokens)
    if device_time_ns is not None:
        tag_and_len = _STEP_TAG + varint(size)
        parts[0] = varint(len(tag_and_len) + size) + tag_and_len
    return b"".join(parts)


# --------------------------------------------------------------------------- packed steps
#
# IngestFrame.packed_step (field 5, bytes): a StepRecord in a fixed layout the engine thread
# writes with one ``struct.pack`` and one ``array`` of its columns, instead of proto3 varints
# built in Python (after the engine's GPU wait its caches are cold and every Python operation
# costs several times its warm price; the varint header alone cost ~20 µs there). Layout,
# little-endian:
#
#   offset size field
#        0    1 layout version (1)
#        1    1 flags: bit 0 = global_step present (proto3 ``optional``)
#        2    2 reserved (0)
#        4    4 kind (int32, StepKind)
#        8    4 n: entries (requests) in the step
#       12    4 n_peer: entries of peer_tokens
#       16    8 seq (uint64)
#       24    8 global_step (uint64; 0 when absent)
#       32    8 start_time_ns (int64)
#       40    8 end_time_ns (int64)
#       48    8 device_time_ns (int64)
#       56    4 timer_source (int32, TimerSource)
#       60   4n handles, 4n prefill_tokens, 4n decode_tokens, 4n context_tokens (uint32 each)
#          4n_peer peer_tokens (uint32)
#
# The body is exactly 60 + 16 n + 4 n_peer bytes; a reader rejects any other length.

PACKED_VERSION = 1
FRAME_PACKED_STEP = 5
PACKED_HEADER = struct.Struct("<BBHiIIQQqqqi")
PACKED_DEVICE_OFFSET = 48  # device_time_ns, then timer_source: what a CUDA step fills in late
_PACKED_DEVICE = struct.Struct("<qi")
_PACKED_TAG = _tag(FRAME_PACKED_STEP, _LEN)
_PACKED_PREFIXES: dict[int, bytes] = {}
BIG_ENDIAN = _BIG_ENDIAN


def packed_prefix(body_len: int) -> bytes:
    """The frame's length prefix and IngestFrame tag for a packed step body of ``body_len`` bytes.

    Cached by length: an engine's batch sizes repeat, so the engine thread looks it up.
    """
    prefix = _PACKED_PREFIXES.get(body_len)
    if prefix is None:
        inner = _PACKED_TAG + encode_varint(body_len)
        prefix = encode_varint(len(inner) + body_len) + inner
        if len(_PACKED_PREFIXES) > 4096:
            _PACKED_PREFIXES.clear()
        _PACKED_PREFIXES[body_len] = prefix
    return prefix


def wrap_packed(body: bytes, device_time_ns: int, timer_source: int) -> bytes:
    """One framed packed step from a body written with its device time pending (a CUDA step).

    The shipper calls this once the step's events have resolved; raises struct.error when
    the device time does not fit int64.
    """
    return packed_prefix(len(body)) + fill_device(body, device_time_ns, timer_source)


def fill_device(body: bytes | memoryview, device_time_ns: int, timer_source: int) -> bytes:
    """A packed body (a step or a repeat) with its device time written in, unframed.

    Raises struct.error when the device time does not fit int64.
    """
    off = PACKED_DEVICE_OFFSET
    view = memoryview(body)
    return b"".join(
        (view[:off], _PACKED_DEVICE.pack(device_time_ns, timer_source), view[off + _PACKED_DEVICE.size :])
    )


# --------------------------------------------------------------------------- repeat steps
#
# A decode batch that did not change since the previous step (the same requests in the same
# order, each decoding the same number of tokens) is most steps of a long generation. The
# engine thread then writes only a packed header with ``flags`` bit 1 (PACKED_REPEAT) set,
# the tokens each entry decoded in the reserved u16, ``n`` as in the previous step, and the
# peer column; no entry columns. The shipper (thread or process) expands it into a full
# packed step against the previous step it shipped: the same handles, prefill 0, decode the
# u16, context = the previous step's context + prefill + decode. Repeats never reach the
# sidecar: the wire carries full steps only. A repeat whose previous step (seq - 1) the
# shipper did not see cannot be expanded and is dropped, counted; the recorder sends a full
# step next time it learns of such a break.

PACKED_REPEAT = 2  # flags bit 1: a repeat body (recorder -> shipper only)
_FLAGS_OFFSET = 1


_U32_BYTES = struct.Struct("<I")
_LANE_MASKS: dict[int, tuple[int, int]] = {}


def _lane_masks(n: int) -> tuple[int, int]:
    """Big-integer masks of n u32 lanes: the top bit of each, the top two bits of each."""
    masks = (int.from_bytes(b"\0\0\0\x80" * n, "little"), int.from_bytes(b"\0\0\0\xc0" * n, "little"))
    if len(_LANE_MASKS) > 1024:
        _LANE_MASKS.clear()
    _LANE_MASKS[n] = masks
    return masks


def _lanes_added(*columns: bytes) -> bytes:
    """Little-endian u32 columns added entry by entry; OverflowError past u32."""
    arrays = []
    for col in columns:
        a = array(U32)
        a.frombytes(col)
        if _BIG_ENDIAN:  # pragma: no cover - columns are little-endian on the wire
            a.byteswap()
        arrays.append(a)
    out = array(U32, map(sum, zip(*arrays, strict=True)))
    if _BIG_ENDIAN:  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def _body_offset(frame: bytes) -> int:
    """Where the packed body starts in a framed packed step (after its length and tag)."""
    _, pos = decode_varint(frame, 0)
    if frame[pos : pos + len(_PACKED_TAG)] != _PACKED_TAG:
        raise ValueError("not a packed step frame")
    _, pos = decode_varint(frame, pos + len(_PACKED_TAG))
    return pos


def repeat_seq(body: bytes | memoryview) -> int:
    """The seq a repeat body (or any packed body) carries."""
    return int(PACKED_HEADER.unpack_from(body)[6])


def expand_repeat(base_frame: bytes, body: bytes | memoryview) -> bytes:
    """The framed full step a repeat body stands for, given the framed step before it.

    Raises ValueError when ``base_frame`` is not the step right before (seq - 1) or holds a
    different number of entries, or ``body`` is not a well-formed repeat; OverflowError
    when a context no longer fits u32.
    """
    off = _body_offset(base_frame)
    _, _, _, _, n, base_peer, base_seq = PACKED_HEADER.unpack_from(base_frame, off)[:7]
    version, flags, per, _kind, n_rep, n_peer, seq = PACKED_HEADER.unpack_from(body)[:7]
    if version != PACKED_VERSION or not flags & PACKED_REPEAT:
        raise ValueError(f"not a repeat body (version {version}, flags {flags})")
    if len(body) != PACKED_HEADER.size + 4 * n_peer:
        raise ValueError(
            f"repeat body is {len(body)} bytes, its header says {PACKED_HEADER.size + 4 * n_peer}"
        )
    if seq != base_seq + 1 or n_rep != n:
        raise ValueError(
            f"repeat step seq {seq} of {n_rep} entries follows step seq {base_seq} of {n} entries; "
            "it needs the step right before it"
        )
    cols = off + PACKED_HEADER.size
    width = 4 * n
    if len(base_frame) != cols + 4 * width + 4 * base_peer:
        raise ValueError("base step frame is truncated")
    ctx = base_frame[cols + 3 * width : cols + 4 * width]
    pre = base_frame[cols + width : cols + 2 * width]
    dec = base_frame[cols + 2 * width : cols + 3 * width]
    # Every lane at once: the columns as little-endian big integers, added. Exact while no
    # lane carries into the next, which the lane masks guarantee (context < 2^31, prefill
    # and decode < 2^30 a step); anything else takes the per-entry path, which raises on
    # a real u32 overflow.
    masks = _LANE_MASKS.get(n) or _lane_masks(n)
    c = int.from_bytes(ctx, "little")
    p = int.from_bytes(pre, "little")
    d = int.from_bytes(dec, "little")
    if c & masks[0] or (p | d) & masks[1]:
        nxt = _lanes_added(ctx, pre, dec)
    else:
        nxt = (c + p + d).to_bytes(width, "little")
    decode = _U32_BYTES.pack(per) * n
    new_head = bytearray(body[: PACKED_HEADER.size])
    new_head[_FLAGS_OFFSET] = flags & ~PACKED_REPEAT
    new_head[2:4] = b"\0\0"
    full = b"".join(
        (
            new_head,
            base_frame[cols : cols + width],
            bytes(width),
            decode,
            nxt,
            body[PACKED_HEADER.size :],
        )
    )
    return packed_prefix(len(full)) + full


def frame_packed_step(
    *,
    seq: int,
    start_time_ns: int,
    end_time_ns: int,
    device_time_ns: int,
    timer_source: int,
    kind: int,
    handles: Sequence[int] | array = (),
    prefill_tokens: Sequence[int] | array = (),
    decode_tokens: Sequence[int] | array = (),
    context_tokens: Sequence[int] | array = (),
    peer_tokens: Sequence[int] | array | None = (),
    global_step: int | None = None,
) -> bytes:
    """One framed packed step: the reference encoder (the recorder inlines the same steps)."""
    n = _column_length(handles, prefill_tokens, decode_tokens, context_tokens)
    peer = b"" if not peer_tokens else column_bytes("peer_tokens", peer_tokens)
    try:
        head = PACKED_HEADER.pack(
            PACKED_VERSION,
            0 if global_step is None else 1,
            0,
            kind,
            n,
            len(peer) >> 2,
            seq,
            0 if global_step is None else global_step,
            start_time_ns,
            end_time_ns,
            device_time_ns,
            timer_source,
        )
    except struct.error as exc:
        raise ValueError(f"packed step field out of range: {exc}") from None
    body = b"".join(
        (
            head,
            column_bytes("handles", handles),
            column_bytes("prefill_tokens", prefill_tokens),
            column_bytes("decode_tokens", decode_tokens),
            column_bytes("context_tokens", context_tokens),
            peer,
        )
    )
    return packed_prefix(len(body)) + body


def unpack_step(body: bytes | memoryview) -> dict:
    """A packed step body as ``frame_step``'s keyword arguments (tests and diagnostics).

    Raises ValueError for a body whose length or version does not match its header.
    """
    size = len(body)
    if size < PACKED_HEADER.size:
        raise ValueError(f"packed step is {size} bytes, shorter than its {PACKED_HEADER.size}-byte header")
    version, flags, _, kind, n, n_peer, seq, gstep, start, end, dev, source = PACKED_HEADER.unpack_from(body)
    if version != PACKED_VERSION:
        raise ValueError(f"packed step layout version {version}, this reader knows {PACKED_VERSION}")
    if size != PACKED_HEADER.size + 16 * n + 4 * n_peer:
        raise ValueError(
            f"packed step is {size} bytes, its header says {PACKED_HEADER.size + 16 * n + 4 * n_peer}"
        )
    cols = array(U32)
    cols.frombytes(bytes(body[PACKED_HEADER.size :]))
    if _BIG_ENDIAN:
        cols.byteswap()
    return {
        "seq": seq,
        "global_step": gstep if flags & 1 else None,
        "start_time_ns": start,
        "end_time_ns": end,
        "device_time_ns": dev,
        "timer_source": source,
        "kind": kind,
        "handles": list(cols[:n]),
        "prefill_tokens": list(cols[n : 2 * n]),
        "decode_tokens": list(cols[2 * n : 3 * n]),
        "context_tokens": list(cols[3 * n : 4 * n]),
        "peer_tokens": list(cols[4 * n :]),
    }
