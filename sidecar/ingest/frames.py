"""Incremental decoder for the ingest stream (varint length + IngestFrame).

The protobuf wire format is parsed by hand instead of through ``ingest_pb2``:
a step's columns are packed ``fixed32`` fields, so each column becomes one
``np.frombuffer`` over the frame's bytes with no per-entry Python work, and no
protobuf object is ever built on the hot path. The parser follows the proto3
wire rules so that any conforming encoder works: unknown fields (and unknown
frame variants) are skipped by wire type, repeated ``fixed32`` fields are
accepted packed or unpacked, a field that appears twice keeps the last value,
and an embedded message that appears twice is merged.

Connection-level rules live here too, because they are part of the wire
contract: the first frame must be an EngineHello whose protocol version this
sidecar speaks, and a step's entry columns must all have the same length.
Every violation raises :class:`FrameError` with a short machine ``reason``
(used as a counter label and in the log line) and a message for a human.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from enginetime.engine_hooks.constants import MAX_FRAME_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from enginetime.sidecar.ingest.limits import (
    MAX_DURATION_NS,
    MAX_TEXT_BYTES,
    PRE_HELLO_FRAME_BYTES,
    TIME_MAX_NS,
    clip_text,
    quote,
)
from enginetime.sidecar.ingest.records import Beat, Event, Frame, Hello, Step

#: Reasons a connection can be rejected for (counter labels; stable strings).
MALFORMED = "malformed"
TRUNCATED = "truncated"
OVERSIZED = "oversized"
BAD_VERSION = "bad_version"
NO_HELLO = "no_hello"
DUPLICATE_HELLO = "duplicate_hello"
BAD_HELLO = "bad_hello"
COLUMN_MISMATCH = "column_mismatch"
BAD_VALUE = "bad_value"

REASONS: tuple[str, ...] = (
    MALFORMED,
    TRUNCATED,
    OVERSIZED,
    BAD_VERSION,
    NO_HELLO,
    DUPLICATE_HELLO,
    BAD_HELLO,
    COLUMN_MISMATCH,
    BAD_VALUE,
)

_U32 = np.dtype("<u4")
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_SIGN64 = 1 << 63


class FrameError(Exception):
    """The byte stream broke the ingest contract; the connection must be closed.

    ``reason`` is one of :data:`REASONS`; ``message`` says what was wrong and
    what to do. ``frames`` holds the valid frames decoded from the same
    :meth:`FrameDecoder.feed` call before the bad one, so the caller can still
    ingest them.
    """

    def __init__(self, reason: str, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.frames: list[Frame] = frames if frames is not None else []


def _malformed(what: str) -> FrameError:
    return FrameError(
        MALFORMED,
        f"{what}; the stream is not length-delimited enginetime.v1.IngestFrame messages "
        "(is something other than an enginetime recorder writing to the ingest socket?)",
    )


# --------------------------------------------------------------------------- wire primitives


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a base-128 varint at ``pos``; return (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _malformed("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _malformed("a varint is longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int):
    """Yield (field number, wire type, value) for each field of a message.

    value is an int for varint/fixed64/fixed32 fields and a (start, stop) slice
    for length-delimited ones. Groups (wire types 3/4, proto2 only) are skipped.
    """
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos, end)
        number = tag >> 3
        wt = tag & 7
        if number == 0:
            raise _malformed("a field has number 0")
        if wt == 0:
            b = buf[pos] if pos < end else 0x80
            if b < 0x80 and pos < end:
                yield number, 0, b
                pos += 1
            else:
                value, pos = _varint(buf, pos, end)
                yield number, 0, value
        elif wt == 2:
            n = buf[pos] if pos < end else 0x80
            if n < 0x80 and pos < end:
                pos += 1
            else:
                n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _malformed(f"field {number} declares {n} bytes but its message ends sooner")
            yield number, 2, (pos, stop)
            pos = stop
        elif wt == 5:
            if pos + 4 > end:
                raise _malformed(f"fixed32 field {number} runs past the end of its message")
            yield number, 5, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wt == 1:
            if pos + 8 > end:
                raise _malformed(f"fixed64 field {number} runs past the end of its message")
            yield number, 1, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == 3:
            pos = _skip_group(buf, pos, end, number)
        else:
            raise _malformed(f"field {number} has invalid wire type {wt}")


def _skip_group(buf: bytes, pos: int, end: int, number: int) -> int:
    """Skip a (deprecated) group up to its matching end-group tag."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        wt = tag & 7
        if wt == 4:
            if tag >> 3 != number:
                raise _malformed("a group ends with the wrong field number")
            return pos
        if wt == 0:
            _, pos = _varint(buf, pos, end)
        elif wt == 1:
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            pos += n
        elif wt == 5:
            pos += 4
        elif wt == 3:
            pos = _skip_group(buf, pos, end, tag >> 3)
        else:
            raise _malformed(f"invalid wire type {wt} inside a group")
    raise _malformed("a group is not closed before the end of its message")


def _int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value & _SIGN64 else value


def _int32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value & 0x80000000 else value


def _text(buf: bytes, span: tuple[int, int], field: str) -> str:
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{field} is not valid UTF-8") from None


# --------------------------------------------------------------------------- messages


def _parse_clock(buf: bytes, start: int, end: int, hello: Hello) -> None:
    for number, wt, value in _fields(buf, start, end):
        if wt == 0:
            if number == 1:
                hello.wall_time_ns = _int64(value)
            elif number == 2:
                hello.monotonic_ns = _int64(value)
            elif number == 3:
                hello.timer_source = _int32(value)
        elif wt == 2 and number == 4:
            hello.device_name = _text(buf, value, "ClockInfo.device_name")


def _parse_hello(buf: bytes, start: int, end: int) -> Hello:
    hello = Hello(protocol_version=0, engine_id="", shard=0, num_shards=0, coupling=0)
    clock: list[tuple[int, int]] = []
    for number, wt, value in _fields(buf, start, end):
        if wt == 0:
            if number == 1:
                hello.protocol_version = value & _MASK32
            elif number == 3:
                hello.shard = value & _MASK32
            elif number == 4:
                hello.num_shards = value & _MASK32
            elif number == 5:
                hello.coupling = _int32(value)
            elif number == 10:
                hello.recorder_epoch = value & _MASK64
        elif wt == 2:
            if number == 2:
                hello.engine_id = _text(buf, value, "EngineHello.engine_id")
            elif number == 6:
                hello.engine_kind = _text(buf, value, "EngineHello.engine_kind")
            elif number == 7:
                hello.engine_version = _text(buf, value, "EngineHello.engine_version")
            elif number == 8:
                hello.hooks_version = _text(buf, value, "EngineHello.hooks_version")
            elif number == 9:
                clock.append(value)
            elif number == 11:
                hello.token = _text(buf, value, "EngineHello.token")
    for span in clock:  # an embedded message seen twice merges, in order
        _parse_clock(buf, span[0], span[1], hello)
    return hello


def _parse_event(buf: bytes, start: int, end: int) -> Event:
    ev = Event(handle=0, kind=0, time_ns=0)
    for number, wt, value in _fields(buf, start, end):
        if wt == 0:
            if number == 1:
                ev.handle = value & _MASK32
            elif number == 3:
                ev.kind = _int32(value)
            elif number == 4:
                ev.time_ns = _int64(value)
            elif number == 5:
                ev.prompt_tokens = value & _MASK32
            elif number == 6:
                ev.cached_tokens = value & _MASK32
            elif number == 9:
                ev.routed_shard = value & _MASK32
            elif number == 11:
                ev.output_tokens = value & _MASK32
            elif number == 12:
                ev.replayed = value != 0
        elif wt == 2:
            if number == 2:
                ev.request_id = _text(buf, value, "RequestEvent.request_id")
            elif number == 7:
                ev.session_id = _text(buf, value, "RequestEvent.session_id")
            elif number == 8:
                ev.traceparent = _text(buf, value, "RequestEvent.traceparent")
            elif number == 10:
                ev.finish_reason = _text(buf, value, "RequestEvent.finish_reason")
    return ev


_COLUMN_NAMES = {
    8: "handles",
    9: "prefill_tokens",
    10: "decode_tokens",
    11: "context_tokens",
    12: "peer_tokens",
}


def _column(buf: bytes, parts: list) -> np.ndarray:
    """Assemble a repeated fixed32 column from its packed spans and unpacked values."""
    if len(parts) == 1 and type(parts[0]) is tuple:
        start, stop = parts[0]
        return np.frombuffer(buf, dtype=_U32, count=(stop - start) >> 2, offset=start)
    chunks: list[np.ndarray] = []
    loose: list[int] = []
    for part in parts:
        if type(part) is tuple:
            if loose:
                chunks.append(np.array(loose, dtype=_U32))
                loose = []
            start, stop = part
            chunks.append(np.frombuffer(buf, dtype=_U32, count=(stop - start) >> 2, offset=start))
        else:
            loose.append(part)
    if loose:
        chunks.append(np.array(loose, dtype=_U32))
    return np.concatenate(chunks)


def _parse_step(buf: bytes, start: int, end: int) -> Step:
    step = Step(seq=0, start_time_ns=0, end_time_ns=0, device_time_ns=0, kind=0)
    columns: dict[int, list] = {}
    for number, wt, value in _fields(buf, start, end):
        if 8 <= number <= 12:
            if wt == 2:
                if (value[1] - value[0]) & 3:
                    raise _malformed(
                        f"packed StepRecord.{_COLUMN_NAMES[number]} is {value[1] - value[0]} bytes, "
                        "not a multiple of 4"
                    )
                columns.setdefault(number, []).append(value)
            elif wt == 5:
                columns.setdefault(number, []).append(value)
        elif wt == 0:
            if number == 1:
                step.seq = value & _MASK64
            elif number == 2:
                step.global_step = value & _MASK64
            elif number == 3:
                step.start_time_ns = _int64(value)
            elif number == 4:
                step.end_time_ns = _int64(value)
            elif number == 5:
                step.device_time_ns = _int64(value)
            elif number == 6:
                step.timer_source = _int32(value)
            elif number == 7:
                step.kind = _int32(value)
    if columns:
        for number, parts in columns.items():
            setattr(step, _COLUMN_NAMES[number], _column(buf, parts))
        n = len(step.handles)
        if len(step.prefill_tokens) != n or len(step.decode_tokens) != n or len(step.context_tokens) != n:
            raise FrameError(
                COLUMN_MISMATCH,
                f"step seq={step.seq} has columns of different lengths (handles={n}, "
                f"prefill_tokens={len(step.prefill_tokens)}, decode_tokens={len(step.decode_tokens)}, "
                f"context_tokens={len(step.context_tokens)}); every entry needs one value in each "
                "column — this is a bug in the recorder that sent it",
            )
    return step


def _parse_beat(buf: bytes, start: int, end: int) -> Beat:
    beat = Beat(time_ns=0)
    for number, wt, value in _fields(buf, start, end):
        if wt == 0:
            if number == 1:
                beat.time_ns = _int64(value)
            elif number == 2:
                beat.dropped_frames = value & _MASK64
            elif number == 3:
                beat.dropped_steps = value & _MASK64
            elif number == 4:
                beat.dropped_events = value & _MASK64
            elif number == 5:
                beat.sent_frames = value & _MASK64
            elif number == 6:
                beat.reconnects = value & _MASK64
    return beat


#: IngestFrame.packed_step's fixed header (engine_hooks/wire.py documents the layout).
_PACKED = struct.Struct("<BBHiIIQQqqqi")
_PACKED_VERSION = 1


def _parse_packed_step(buf: bytes, start: int, end: int) -> Step:
    """A packed step: a fixed header, then the columns as little-endian uint32 arrays.

    The body's length must be exactly what its header's counts say, so a hostile count
    can never make a column read past the frame.
    """
    size = end - start
    if size < _PACKED.size:
        raise _malformed(f"a packed step is {size} bytes, shorter than its {_PACKED.size}-byte header")
    version, flags, reserved, kind, n, n_peer, seq, gstep, t0, t1, dev, source = _PACKED.unpack_from(
        buf, start
    )
    if version != _PACKED_VERSION:
        raise _malformed(
            f"a packed step has layout version {version}; this sidecar reads version {_PACKED_VERSION}"
        )
    if flags & ~1 or reserved:
        # Bit 1 marks a repeat step, which only the recorder's shipper reads: it expands every
        # one into the full step before sending, so one here was never expanded.
        raise _malformed(
            f"a packed step has flags {flags:#x} and reserved field {reserved} (this sidecar knows "
            "bit 0 only, and 0 there); a repeat step (bit 1) must be expanded by the shipper"
        )
    want = _PACKED.size + 16 * n + 4 * n_peer
    if size != want:
        raise FrameError(
            COLUMN_MISMATCH,
            f"packed step seq={seq} is {size} bytes but its header ({n} entries, {n_peer} peer counts) "
            f"needs {want}; this is a bug in the recorder that sent it",
        )
    step = Step(
        seq=seq,
        start_time_ns=t0,
        end_time_ns=t1,
        device_time_ns=dev,
        kind=kind,
        timer_source=source,
        global_step=gstep if flags & 1 else None,
    )
    pos = start + _PACKED.size
    if n:
        cols = np.frombuffer(buf, dtype=_U32, count=4 * n, offset=pos)
        step.handles = cols[:n]
        step.prefill_tokens = cols[n : 2 * n]
        step.decode_tokens = cols[2 * n : 3 * n]
        step.context_tokens = cols[3 * n :]
    if n_peer:
        step.peer_tokens = np.frombuffer(buf, dtype=_U32, count=n_peer, offset=pos + 16 * n)
    return step


_PARSERS: dict[int, Callable[[bytes, int, int], Frame]] = {
    1: _parse_hello,
    2: _parse_event,
    3: _parse_step,
    4: _parse_beat,
    5: _parse_packed_step,
}


def decode_frame(buf: bytes, start: int = 0, end: int | None = None) -> Frame | None:
    """Decode one IngestFrame message body; None for a variant this sidecar does not know.

    Follows oneof rules: the last variant on the wire wins; the same variant
    repeated is merged (its payloads parsed as one concatenated message).
    """
    if end is None:
        end = len(buf)
    variant = 0
    spans: list[tuple[int, int]] = []
    for number, wt, value in _fields(buf, start, end):
        if wt == 2 and number in _PARSERS:
            if number != variant:
                variant = number
                spans = [value]
            else:
                spans.append(value)
    if not variant:
        return None
    if len(spans) == 1 or variant == 5:  # packed_step is bytes, not a message: the last one wins
        span = spans[-1]
        return _PARSERS[variant](buf, span[0], span[1])
    if len(spans) == 1:
        return _PARSERS[variant](buf, spans[0][0], spans[0][1])
    merged = b"".join(buf[a:b] for a, b in spans)
    return _PARSERS[variant](merged, 0, len(merged))


# --------------------------------------------------------------------------- stream decoder


class FrameDecoder:
    """Turns the bytes of one ingest connection into decoded frames.

    Feed it whatever the socket returned; it buffers partial frames. It also
    enforces the connection contract: the first frame must be an EngineHello
    with ``protocol_version == expected_version`` (available as ``hello``
    afterwards), and no second hello may follow. After a FrameError the
    decoder is spent: close the connection.
    """

    def __init__(
        self,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        expected_version: int = PROTOCOL_VERSION,
        *,
        max_text_bytes: int = MAX_TEXT_BYTES,
    ) -> None:
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.expected_version = expected_version
        self.max_text_bytes = max(64, int(max_text_bytes))
        self.hello: Hello | None = None
        #: Frames decoded, and frames skipped because their variant is unknown here.
        self.frames = 0
        self.skipped = 0
        #: Text fields longer than max_text_bytes, kept clipped (prefix + hash).
        self.clipped = 0
        self._buf = bytearray()
        self._need = 0  # declared length of the frame being buffered (0: none yet)
        self._prefix = 0  # bytes of its length prefix
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (part of an incomplete frame)."""
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Decode every complete frame in the stream so far.

        Raises FrameError (with ``.frames`` = the good frames before the bad
        one) when the stream breaks the contract.
        """
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        buf += data
        out: list[Frame] = []
        size = len(buf)
        pos = 0
        try:
            view = memoryview(buf)
            try:
                while pos < size:
                    # Length prefix: varint, at most 10 bytes.
                    n = buf[pos]
                    if n < 0x80:
                        body = pos + 1
                    else:
                        n = 0
                        shift = 0
                        body = pos
                        while True:
                            if body >= size:
                                if body - pos >= 10:
                                    raise _malformed("a frame length prefix is longer than 10 bytes")
                                n = -1  # incomplete prefix
                                break
                            b = buf[body]
                            body += 1
                            n |= (b & 0x7F) << shift
                            if b < 0x80:
                                break
                            shift += 7
                            if shift >= 70:
                                raise _malformed("a frame length prefix is longer than 10 bytes")
                        if n < 0:
                            self._need = 0
                            break
                    if n > self.max_frame_bytes:
                        raise FrameError(
                            OVERSIZED,
                            f"a frame declares {n} bytes, more than the sidecar's limit of "
                            f"{self.max_frame_bytes} (--max-frame-bytes); a recorder never sends frames "
                            "this big, so the stream is corrupt or not from enginetime",
                        )
                    if self.hello is None and n > PRE_HELLO_FRAME_BYTES:
                        raise FrameError(
                            OVERSIZED,
                            f"the first frame declares {n} bytes; an EngineHello is under "
                            f"{PRE_HELLO_FRAME_BYTES} bytes, so the stream is corrupt or not from enginetime",
                        )
                    stop = body + n
                    if stop > size:
                        self._need = n
                        self._prefix = body - pos
                        break
                    frame_bytes = bytes(view[body:stop])
                    pos = stop
                    frame = decode_frame(frame_bytes)
                    if frame is None:
                        if self.hello is None:
                            raise FrameError(
                                NO_HELLO,
                                "the first frame is not an EngineHello; a recorder must introduce itself "
                                "before sending events or steps",
                            )
                        self.skipped += 1
                        continue
                    if type(frame) is Hello:
                        self._check_hello(frame)
                    elif self.hello is None:
                        raise FrameError(
                            NO_HELLO,
                            f"the first frame is a {type(frame).__name__}, not an EngineHello; a recorder "
                            "must introduce itself before sending events or steps",
                        )
                    elif type(frame) is Step:
                        self._check_step(frame)
                    elif type(frame) is Event:
                        self._check_event(frame)
                    elif type(frame) is Beat:
                        _check_time(frame.time_ns, "Heartbeat.time_ns")
                    self.frames += 1
                    out.append(frame)
            finally:
                view.release()
        except FrameError as exc:
            exc.frames = out
            self._failed = exc
            buf.clear()
            raise
        if pos:
            del buf[:pos]
            if not buf:
                self._need = self._prefix = 0
        return out

    def finish(self) -> None:
        """The peer closed the connection: raise ``truncated`` if it stopped mid-frame."""
        if self._failed is None and self._buf:
            if self._need:
                where = f"{len(self._buf) - self._prefix} bytes into a {self._need}-byte frame"
            else:
                where = f"inside a frame's length prefix ({len(self._buf)} bytes of it)"
            exc = FrameError(
                TRUNCATED,
                f"the connection closed {where}; the recorder died or was cut off mid-write, "
                "its last frame is lost",
            )
            self._failed = exc
            self._buf.clear()
            raise exc

    def _check_hello(self, hello: Hello) -> None:
        if self.hello is not None:
            raise FrameError(
                DUPLICATE_HELLO,
                f"a second EngineHello on one connection (engine {quote(hello.engine_id)} "
                f"shard {hello.shard}); "
                "a recorder that restarts must open a new connection",
            )
        if (
            not min(MIN_PROTOCOL_VERSION, self.expected_version)
            <= hello.protocol_version
            <= self.expected_version
        ):
            newer = hello.protocol_version > self.expected_version
            raise FrameError(
                BAD_VERSION,
                f"engine {quote(hello.engine_id)} shard {hello.shard} speaks ingest protocol "
                f"v{hello.protocol_version}, this sidecar speaks v{self.expected_version}: "
                + (
                    "upgrade the sidecar to the enginetime version of the engine's hooks"
                    if newer
                    else "upgrade the enginetime hooks in the engine's environment to the sidecar's version"
                ),
            )
        _check_time(hello.wall_time_ns, "ClockInfo.wall_time_ns")
        for name in ("engine_id", "engine_kind", "engine_version", "hooks_version", "device_name"):
            value = getattr(hello, name)
            if len(value) * 4 > self.max_text_bytes:
                clipped = clip_text(value, self.max_text_bytes)
                if clipped is not value:
                    self.clipped += 1
                    setattr(hello, name, clipped)
        problems = []
        if not hello.engine_id:
            problems.append("engine_id is empty")
        if hello.num_shards == 0:
            problems.append("num_shards is 0")
        elif hello.shard >= hello.num_shards:
            problems.append(f"shard {hello.shard} is not below num_shards {hello.num_shards}")
        if problems:
            raise FrameError(
                BAD_HELLO,
                "EngineHello is unusable: " + "; ".join(problems) + " (a bug in the engine adapter)",
            )
        self.hello = hello

    def _check_step(self, step: Step) -> None:
        _check_time(step.start_time_ns, "StepRecord.start_time_ns")
        _check_time(step.end_time_ns, "StepRecord.end_time_ns")
        if not 0 <= step.device_time_ns <= MAX_DURATION_NS:
            raise _bad_value("StepRecord.device_time_ns", step.device_time_ns, f"0..{MAX_DURATION_NS} ns")

    def _check_event(self, ev: Event) -> None:
        _check_time(ev.time_ns, "RequestEvent.time_ns")
        limit = self.max_text_bytes
        quarter = limit >> 2
        if (
            len(ev.request_id) > quarter
            or len(ev.session_id) > quarter
            or len(ev.traceparent) > quarter
            or len(ev.finish_reason) > quarter
        ):
            for name in ("request_id", "session_id", "traceparent", "finish_reason"):
                value = getattr(ev, name)
                clipped = clip_text(value, limit)
                if clipped is not value:
                    self.clipped += 1
                    setattr(ev, name, clipped)


def _bad_value(field: str, value: int, allowed: str) -> FrameError:
    return FrameError(
        BAD_VALUE,
        f"{field} is {value}, outside {allowed}; the recorder's clock or its adapter is broken "
        "(or the peer is not an enginetime recorder)",
    )


def _check_time(value: int, field: str) -> None:
    if not 0 <= value < TIME_MAX_NS:
        raise _bad_value(field, value, "0..2**62 ns since the epoch")


def encode_varint(value: int) -> bytes:
    """Base-128 varint (the frame length prefix); for tests and tools."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_prefixed(message: bytes) -> bytes:
    """Wrap a serialized IngestFrame as it travels on the wire."""
    return encode_varint(len(message)) + message
