"""The hand-written ingest decoder agrees with protobuf and rejects every broken stream.

Parity: random IngestFrames encoded by the generated ``ingest_pb2`` classes
(and hand-built variants protobuf also accepts: unpacked columns, unknown
fields, repeated sub-messages) decode to the same values, whatever the chunking
of the byte stream. Errors: each FrameError reason is raised for the stream
that deserves it, with the good frames before it kept.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from helpers import frame, hello, step, varint

from enginetime.engine_hooks import wire
from enginetime.engine_hooks.constants import PROTOCOL_VERSION
from enginetime.sidecar.ingest.frames import FrameDecoder, FrameError, decode_frame, encode_varint
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.v1 import ingest_pb2 as pb

# ----------------------------------------------------------------------------- random messages

INT64 = (-(2**63), 2**63 - 1)
# What the stream decoder accepts (docs/SECURITY.md): times in [0, 2**62), a step's device
# time up to an hour. decode_frame alone parses any int64 (test_decode_frame_parses_any_int64).
TIME = (0, 2**62 - 1)
DURATION = (0, 3600 * 10**9)


def _text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-_/:é漢🙂"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))


def _random_hello(rng: random.Random, version: int = PROTOCOL_VERSION) -> pb.EngineHello:
    num = rng.randint(1, 64)
    msg = pb.EngineHello(
        protocol_version=version,
        engine_id=_text(rng) or "e",
        shard=rng.randrange(num),
        num_shards=num,
        coupling=rng.randint(0, 2),
        engine_kind=_text(rng),
        engine_version=_text(rng),
        hooks_version=_text(rng),
        recorder_epoch=rng.randint(0, 2**64 - 1),
    )
    if rng.random() < 0.8:
        msg.clock.CopyFrom(
            pb.ClockInfo(
                wall_time_ns=rng.randint(*TIME),
                monotonic_ns=rng.randint(*INT64),
                timer_source=rng.randint(0, 2),
                device_name=_text(rng),
            )
        )
    return msg


def _random_event(rng: random.Random) -> pb.RequestEvent:
    msg = pb.RequestEvent(
        handle=rng.randint(0, 2**32 - 1),
        request_id=_text(rng),
        kind=rng.randint(0, 6),
        time_ns=rng.randint(*TIME),
        prompt_tokens=rng.randint(0, 2**32 - 1),
        cached_tokens=rng.randint(0, 2**32 - 1),
        session_id=_text(rng),
        traceparent=_text(rng),
        finish_reason=_text(rng),
        output_tokens=rng.randint(0, 2**32 - 1),
        replayed=rng.random() < 0.5,
    )
    if rng.random() < 0.5:
        msg.routed_shard = rng.randint(0, 2**32 - 1)  # 0 included: present-but-zero must survive
    return msg


def _random_step(rng: random.Random) -> pb.StepRecord:
    n = rng.choice([0, 1, 2, 7, 256, 1000])

    def col() -> list[int]:
        return [rng.randint(0, 2**32 - 1) for _ in range(n)]

    msg = pb.StepRecord(
        seq=rng.randint(0, 2**64 - 1),
        start_time_ns=rng.randint(*TIME),
        end_time_ns=rng.randint(*TIME),
        device_time_ns=rng.randint(*DURATION),
        timer_source=rng.randint(0, 2),
        kind=rng.randint(0, 4),
        handles=col(),
        prefill_tokens=col(),
        decode_tokens=col(),
        context_tokens=col(),
        peer_tokens=[rng.randint(0, 2**32 - 1) for _ in range(rng.choice([0, 1, 8]))],
    )
    if rng.random() < 0.5:
        msg.global_step = rng.randint(0, 2**64 - 1)
    return msg


def _random_beat(rng: random.Random) -> pb.Heartbeat:
    return pb.Heartbeat(
        time_ns=rng.randint(*TIME),
        dropped_frames=rng.randint(0, 2**64 - 1),
        dropped_steps=rng.randint(0, 2**64 - 1),
        dropped_events=rng.randint(0, 2**64 - 1),
        sent_frames=rng.randint(0, 2**64 - 1),
        reconnects=rng.randint(0, 2**64 - 1),
    )


def _random_frame(rng: random.Random) -> pb.IngestFrame:
    kind = rng.choice(["event", "step", "heartbeat"])
    if kind == "event":
        return pb.IngestFrame(request_event=_random_event(rng))
    if kind == "step":
        return pb.IngestFrame(step=_random_step(rng))
    return pb.IngestFrame(heartbeat=_random_beat(rng))


# ----------------------------------------------------------------------------- expected values


def assert_same(decoded, message: pb.IngestFrame) -> None:
    """``decoded`` (a sidecar record) carries exactly the values protobuf parsed."""
    which = message.WhichOneof("frame")
    if which == "hello":
        m = message.hello
        assert type(decoded) is Hello
        assert (decoded.protocol_version, decoded.engine_id, decoded.shard, decoded.num_shards) == (
            m.protocol_version,
            m.engine_id,
            m.shard,
            m.num_shards,
        )
        assert (decoded.coupling, decoded.engine_kind, decoded.engine_version, decoded.hooks_version) == (
            m.coupling,
            m.engine_kind,
            m.engine_version,
            m.hooks_version,
        )
        assert decoded.recorder_epoch == m.recorder_epoch
        assert (decoded.wall_time_ns, decoded.monotonic_ns, decoded.timer_source, decoded.device_name) == (
            m.clock.wall_time_ns,
            m.clock.monotonic_ns,
            m.clock.timer_source,
            m.clock.device_name,
        )
    elif which == "request_event":
        m = message.request_event
        assert type(decoded) is Event
        for name in (
            "handle",
            "request_id",
            "kind",
            "time_ns",
            "prompt_tokens",
            "cached_tokens",
            "session_id",
            "traceparent",
            "finish_reason",
            "output_tokens",
            "replayed",
        ):
            assert getattr(decoded, name) == getattr(m, name), name
        assert decoded.routed_shard == (m.routed_shard if m.HasField("routed_shard") else None)
    elif which == "step":
        m = message.step
        assert type(decoded) is Step
        for name in ("seq", "start_time_ns", "end_time_ns", "device_time_ns", "timer_source", "kind"):
            assert getattr(decoded, name) == getattr(m, name), name
        assert decoded.global_step == (m.global_step if m.HasField("global_step") else None)
        for name in ("handles", "prefill_tokens", "decode_tokens", "context_tokens", "peer_tokens"):
            column = getattr(decoded, name)
            assert column.dtype == np.uint32, name
            assert column.tolist() == list(getattr(m, name)), name
    else:
        m = message.heartbeat
        assert type(decoded) is Beat
        for name in (
            "time_ns",
            "dropped_frames",
            "dropped_steps",
            "dropped_events",
            "sent_frames",
            "reconnects",
        ):
            assert getattr(decoded, name) == getattr(m, name), name


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """Split a stream at random points, including 1-byte pieces inside length prefixes."""
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 7, 64, 1000, 100_000])
        out.append(data[pos : pos + n])
        pos += n
    return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_decode_like_protobuf_in_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    messages = [pb.IngestFrame(hello=_random_hello(rng))] + [_random_frame(rng) for _ in range(150)]
    stream = b"".join(frame(m) for m in messages)
    decoder = FrameDecoder()
    decoded = []
    for chunk in _chunks(stream, rng):
        decoded.extend(decoder.feed(chunk))
    decoder.finish()  # ended on a frame boundary: no error
    assert len(decoded) == len(messages)
    for got, want in zip(decoded, messages, strict=True):
        assert_same(got, want)
    assert decoder.hello is decoded[0]
    assert decoder.buffered == 0


def _tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + varint(len(payload)) + payload


def _unknown_fields() -> bytes:
    """One unknown field of every wire type (numbers no message uses), including a nested group."""
    return (
        _tag(90, 0)
        + varint(2**63 + 5)
        + _tag(91, 1)
        + (123).to_bytes(8, "little")
        + _len_field(92, b"future payload")
        + _tag(93, 5)
        + (7).to_bytes(4, "little")
        + _tag(94, 3)
        + _tag(1, 0)
        + varint(1)
        + _tag(95, 3)
        + _tag(95, 4)
        + _tag(94, 4)
    )


def test_unknown_fields_and_frame_variants_are_skipped() -> None:
    rng = random.Random(7)
    hello = pb.IngestFrame(hello=_random_hello(rng))
    step = pb.IngestFrame(step=_random_step(rng))
    # Unknown fields inside a message and at the frame level, placed before and after known ones.
    step_body = _unknown_fields() + step.step.SerializeToString() + _unknown_fields()
    wire = _unknown_fields() + _len_field(3, step_body) + _unknown_fields()
    parsed = pb.IngestFrame.FromString(wire)
    parsed.DiscardUnknownFields()
    assert parsed.step == step.step  # protobuf agrees it is the same step
    future_variant = _len_field(9, b"\x08\x01")  # a frame kind a newer recorder might send
    decoder = FrameDecoder()
    decoded = decoder.feed(frame(hello) + frame(wire) + frame(future_variant) + frame(b""))
    assert len(decoded) == 2
    assert_same(decoded[0], hello)
    assert_same(decoded[1], step)
    assert decoder.skipped == 2


def test_unpacked_and_mixed_column_encodings_are_accepted() -> None:
    handles, prefill = [5, 6, 7], [100, 0, 0]
    body = _tag(1, 0) + varint(42)
    for h in handles:  # unpacked: one fixed32 field per element
        body += _tag(8, 5) + h.to_bytes(4, "little")
    body += _len_field(9, np.array(prefill[:1], "<u4").tobytes())  # packed, split in two runs
    body += _tag(9, 5) + prefill[1].to_bytes(4, "little")
    body += _len_field(9, np.array(prefill[2:], "<u4").tobytes())
    body += _len_field(10, np.array([0, 1, 1], "<u4").tobytes())
    body += _len_field(11, np.array([0, 50, 60], "<u4").tobytes())
    wire = _len_field(3, body)
    expected = pb.IngestFrame.FromString(wire)
    assert list(expected.step.handles) == handles and list(expected.step.prefill_tokens) == prefill
    decoder = FrameDecoder()
    decoded = decoder.feed(frame(pb.IngestFrame(hello=_random_hello(random.Random(1)))) + frame(wire))
    assert_same(decoded[1], expected)


def test_repeated_fields_follow_protobuf_merge_rules() -> None:
    rng = random.Random(3)
    a, b = _random_event(rng), _random_event(rng)
    b.ClearField("routed_shard")
    # Same oneof member twice: the messages merge (later scalars win, unset ones keep earlier values).
    wire = _len_field(2, a.SerializeToString()) + _len_field(2, b.SerializeToString())
    expected = pb.IngestFrame.FromString(wire)
    assert_same(decode_frame(wire), expected)
    # A different member later wins.
    beat = _random_beat(rng)
    wire = _len_field(2, a.SerializeToString()) + _len_field(4, beat.SerializeToString())
    assert_same(decode_frame(wire), pb.IngestFrame.FromString(wire))
    # A ClockInfo given twice inside a hello merges too; a scalar given twice keeps the last.
    hello = _random_hello(rng)
    body = hello.SerializeToString() + _len_field(9, pb.ClockInfo(device_name="later").SerializeToString())
    body += _tag(3, 0) + varint(0)
    wire = _len_field(1, body)
    assert_same(decode_frame(wire), pb.IngestFrame.FromString(wire))


# ----------------------------------------------------------------------------- errors


def _hello_frame(**kw) -> bytes:
    fields = {"protocol_version": PROTOCOL_VERSION, "engine_id": "e", "shard": 0, "num_shards": 2} | kw
    return frame(pb.IngestFrame(hello=pb.EngineHello(**fields)))


def _step_frame(seq: int = 1, n: int = 2) -> bytes:
    return frame(
        pb.IngestFrame(
            step=pb.StepRecord(
                seq=seq,
                handles=range(n),
                prefill_tokens=[0] * n,
                decode_tokens=[1] * n,
                context_tokens=[9] * n,
            )
        )
    )


def _error(*chunks: bytes, finish: bool = False, **decoder_kw) -> FrameError:
    decoder = FrameDecoder(**decoder_kw)
    with pytest.raises(FrameError) as info:
        for chunk in chunks:
            decoder.feed(chunk)
        if finish:
            decoder.finish()
    err = info.value
    assert err.reason in str(err) and err.message
    # A spent decoder keeps failing instead of resynchronising on garbage.
    with pytest.raises(FrameError):
        decoder.feed(_step_frame())
    return err


@pytest.mark.parametrize(
    "body, what",
    [
        (_tag(3, 7), "invalid wire type"),
        (_tag(3, 2) + varint(50) + b"short", "declares 50 bytes"),
        (b"\xff\xff", "varint runs past"),
        (_len_field(2, _len_field(2, b"\xff\xfe")), "not valid UTF-8"),
        (_len_field(3, _len_field(8, b"\x01\x02\x03")), "is 3 bytes, not a multiple of 4"),
        (_tag(0, 0) + b"\x01", "number 0"),
    ],
)
def test_malformed_frames(body: bytes, what: str) -> None:
    err = _error(_hello_frame() + frame(body))
    assert err.reason == "malformed"
    assert what in err.message


def test_truncated_when_the_connection_closes_mid_frame() -> None:
    whole = _step_frame(n=50)
    err = _error(_hello_frame(), whole[:-10], finish=True)
    assert err.reason == "truncated"
    assert f"{len(whole) - 10 - 2} bytes into a {len(whole) - 2}-byte frame" in err.message
    # Cut inside the length prefix itself.
    assert _error(_hello_frame(), b"\x80", finish=True).reason == "truncated"
    # Ending exactly on a frame boundary is a normal close.
    decoder = FrameDecoder()
    decoder.feed(_hello_frame() + whole)
    decoder.finish()


def test_oversized_is_rejected_from_the_length_prefix_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=4096)
    decoder.feed(_hello_frame())
    with pytest.raises(FrameError) as info:
        decoder.feed(varint(4097))  # only the prefix has arrived: nothing of the body is buffered
    assert info.value.reason == "oversized"
    assert "4097" in info.value.message and "4096" in info.value.message
    # Exactly at the limit is fine.
    body = _len_field(4, b"\x08\x01") + _len_field(99, b"x" * 4000)
    body += _len_field(98, b"y" * (4096 - len(body) - 3))
    assert len(body) == 4096
    ok = FrameDecoder(max_frame_bytes=4096)
    assert len(ok.feed(_hello_frame() + frame(body))) == 2


def test_bad_version_names_both_versions() -> None:
    err = _error(_hello_frame(protocol_version=PROTOCOL_VERSION + 1))
    assert err.reason == "bad_version"
    assert f"v{PROTOCOL_VERSION + 1}" in err.message and f"v{PROTOCOL_VERSION}" in err.message
    assert "upgrade the sidecar" in err.message
    old = _error(_hello_frame(protocol_version=0))
    assert old.reason == "bad_version" and "upgrade the enginetime hooks" in old.message


def test_first_frame_must_be_a_hello() -> None:
    assert _error(_step_frame()).reason == "no_hello"
    assert _error(frame(b"")).reason == "no_hello"  # an empty (unknown) frame first
    assert _error(_hello_frame() + _hello_frame()).reason == "duplicate_hello"


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"engine_id": ""}, "engine_id is empty"),
        ({"num_shards": 0}, "num_shards is 0"),
        ({"shard": 2, "num_shards": 2}, "shard 2 is not below num_shards 2"),
    ],
)
def test_unusable_hello(fields: dict, problem: str) -> None:
    err = _error(_hello_frame(**fields))
    assert err.reason == "bad_hello" and problem in err.message


def test_column_mismatch_keeps_the_frames_before_it() -> None:
    bad = frame(
        pb.IngestFrame(
            step=pb.StepRecord(
                seq=9,
                handles=[1, 2, 3],
                prefill_tokens=[0, 0, 0],
                decode_tokens=[1, 1],
                context_tokens=[5, 5, 5],
            )
        )
    )
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(_hello_frame() + _step_frame(seq=1) + _step_frame(seq=2) + bad + _step_frame(seq=3))
    err = info.value
    assert err.reason == "column_mismatch"
    assert "seq=9" in err.message and "decode_tokens=2" in err.message
    assert [type(f).__name__ for f in err.frames] == ["Hello", "Step", "Step"]
    assert [f.seq for f in err.frames[1:]] == [1, 2]


# ----------------------------------------------------------------------------- value limits


def test_decode_frame_parses_any_int64() -> None:
    """The wire parser keeps protobuf's full ranges; only the stream decoder enforces limits."""
    rng = random.Random(3)
    for _ in range(50):
        msg = pb.IngestFrame(
            request_event=pb.RequestEvent(handle=1, kind=1, time_ns=rng.randint(*INT64), request_id="r")
        )
        assert decode_frame(msg.SerializeToString()).time_ns == msg.request_event.time_ns


@pytest.mark.parametrize(
    "bad, field",
    [
        (pb.IngestFrame(request_event=pb.RequestEvent(handle=1, kind=1, time_ns=-(2**63))), "time_ns"),
        (pb.IngestFrame(request_event=pb.RequestEvent(handle=1, kind=1, time_ns=2**62)), "time_ns"),
        (pb.IngestFrame(step=pb.StepRecord(seq=1, start_time_ns=-1, end_time_ns=1)), "start_time_ns"),
        (pb.IngestFrame(step=pb.StepRecord(seq=1, end_time_ns=2**63 - 1)), "end_time_ns"),
        (pb.IngestFrame(step=pb.StepRecord(seq=1, device_time_ns=-5)), "device_time_ns"),
        (pb.IngestFrame(step=pb.StepRecord(seq=1, device_time_ns=3601 * 10**9)), "device_time_ns"),
        (pb.IngestFrame(heartbeat=pb.Heartbeat(time_ns=-1)), "Heartbeat.time_ns"),
    ],
)
def test_out_of_range_times_are_bad_value(bad: pb.IngestFrame, field: str) -> None:
    rng = random.Random(1)
    good = pb.IngestFrame(request_event=_random_event(rng))
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as err:
        decoder.feed(frame(pb.IngestFrame(hello=_random_hello(rng))) + frame(good) + frame(bad))
    assert err.value.reason == "bad_value" and field in err.value.message
    assert [type(f) for f in err.value.frames] == [Hello, Event]  # the good ones before it survive


def test_long_text_fields_are_clipped_to_a_prefix_and_hash() -> None:
    from enginetime.sidecar.ingest.limits import clip_text

    long_id = "r" * 5000
    decoder = FrameDecoder(max_text_bytes=256)
    frames = decoder.feed(
        frame(
            pb.IngestFrame(
                hello=pb.EngineHello(protocol_version=PROTOCOL_VERSION, engine_id="e" * 999, num_shards=1)
            )
        )
        + frame(
            pb.IngestFrame(
                request_event=pb.RequestEvent(
                    handle=1, kind=1, request_id=long_id, session_id="s" * 300, traceparent="t"
                )
            )
        )
    )
    hello, ev = frames
    assert len(hello.engine_id.encode()) <= 256 and hello.engine_id.startswith("e" * 100)
    assert ev.request_id == clip_text(long_id, 256) and len(ev.request_id.encode()) <= 256
    assert ev.request_id != clip_text("r" * 5001, 256)  # the hash tells long ids apart
    assert ev.traceparent == "t"
    assert decoder.clipped == 3


def test_a_big_frame_before_the_hello_is_oversized() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as err:
        decoder.feed(varint(100_000) + b"x" * 10)
    assert err.value.reason == "oversized"


def test_hello_token_is_decoded_but_never_shown() -> None:
    msg = pb.IngestFrame(
        hello=pb.EngineHello(protocol_version=PROTOCOL_VERSION, engine_id="e", num_shards=1, token="s3cret")
    )
    (hello,) = FrameDecoder().feed(frame(msg))
    assert hello.token == "s3cret" and "s3cret" not in repr(hello)


# ----------------------------------------------------------------------------- boundaries


def _cols(n: int = 1) -> bytes:
    """Packed handles/prefill/decode columns of ``n`` entries (context comes last, per case)."""
    body = b""
    for number, value in ((8, 7), (9, 0), (10, 1)):
        body += _len_field(number, np.full(n, value, "<u4").tobytes())
    return body


# (variant, message body whose LAST field is of the named wire type, check on the decoded record)
_LAST_FIELD_CASES = {
    "varint": (2, _len_field(2, b"r-1") + _tag(4, 0) + varint(2**40 + 5), lambda r: r.time_ns == 2**40 + 5),
    "one-byte varint": (2, _len_field(2, b"r-1") + _tag(5, 0) + varint(9), lambda r: r.prompt_tokens == 9),
    "fixed32": (
        3,
        _tag(1, 0) + varint(3) + _cols() + _tag(11, 5) + (123456).to_bytes(4, "little"),
        lambda r: r.seq == 3 and list(r.context_tokens) == [123456],
    ),
    "fixed64": (
        4,
        _tag(1, 0) + varint(77) + _tag(50, 1) + (2**63 + 1).to_bytes(8, "little"),
        lambda r: r.time_ns == 77,
    ),
    "length-delimited": (
        2,
        _tag(1, 0) + varint(4) + _len_field(2, b"last-id"),
        lambda r: r.request_id == "last-id",
    ),
    "packed column": (
        3,
        _tag(1, 0) + varint(5) + _cols(2) + _len_field(11, np.array([10, 20], "<u4").tobytes()),
        lambda r: list(r.context_tokens) == [10, 20],
    ),
}


@pytest.mark.parametrize("case", sorted(_LAST_FIELD_CASES))
def test_every_field_type_decodes_at_the_very_end_of_a_message(case: str) -> None:
    variant, body, check = _LAST_FIELD_CASES[case]
    wire = _len_field(variant, body)
    pb.IngestFrame.FromString(wire)  # protobuf agrees the message is valid
    record = decode_frame(wire)
    assert record is not None and check(record), record
    # The same through the stream decoder, the frame arriving one byte short first.
    decoder = FrameDecoder()
    stream = _hello_frame() + frame(wire)
    assert len(decoder.feed(stream[:-1])) == 1 and decoder.buffered > 0
    (late,) = decoder.feed(stream[-1:])
    assert check(late)


@pytest.mark.parametrize("case", sorted(_LAST_FIELD_CASES))
def test_a_last_field_one_byte_short_is_malformed(case: str) -> None:
    variant, body, _ = _LAST_FIELD_CASES[case]
    wire = _len_field(variant, body[:-1])  # the message now ends inside its last field
    with pytest.raises(FrameError) as info:
        decode_frame(wire)
    assert info.value.reason == "malformed"
    assert "end" in info.value.message  # says the field runs past the end of its message


def test_a_frame_of_exactly_the_maximum_size_is_accepted_and_one_more_byte_is_not() -> None:
    limit = 2048
    hello = _hello_frame()

    def step_frame(size: int) -> bytes:
        body = _tag(1, 0) + varint(1) + _cols()
        body += _len_field(11, (1).to_bytes(4, "little"))
        # frame tag (1 byte) + 2-byte length, then an unknown field 99: 2-byte tag + 2-byte length + pad
        pad = size - len(body) - 7
        body += _tag(99, 2) + varint(pad) + b"p" * pad
        wire = _len_field(3, body)
        assert len(wire) == size, len(wire)
        return frame(wire)

    decoder = FrameDecoder(max_frame_bytes=limit)
    assert len(decoder.feed(hello + step_frame(limit))) == 2
    with pytest.raises(FrameError) as info:
        decoder.feed(step_frame(limit + 1))
    assert info.value.reason == "oversized"


# ----------------------------------------------------------------------------- what mutation testing found


def test_a_known_field_number_with_another_wire_type_is_skipped_as_protobuf_does() -> None:
    """A newer recorder may change a field's type; the old number with a new wire type is an
    unknown field to protobuf, and to this decoder, in every message kind."""
    i32 = (7).to_bytes(4, "little")
    i64 = (9).to_bytes(8, "little")
    # Each wrong-typed field comes after the real one, so a decoder that took it would show it.
    clock = _len_field(4, b"cpu") + _tag(1, 0) + varint(5) + _tag(4, 5) + i32  # device_name as fixed32
    hello_body = (
        _tag(1, 0)
        + varint(PROTOCOL_VERSION)
        + _len_field(2, b"eng")
        + _tag(3, 0)
        + varint(1)
        + _tag(4, 0)
        + varint(2)
        + _len_field(9, clock)
        + _len_field(1, b"v")
        + _len_field(3, b"xx")
        + _tag(2, 5)
        + i32  # version, shard, engine_id
    )
    event_body = (
        _tag(1, 0)
        + varint(4)
        + _len_field(2, b"rid")
        + _tag(4, 0)
        + varint(8)
        + _len_field(10, b"stop")
        + _len_field(1, b"zz")
        + _tag(2, 5)
        + i32
        + _tag(2, 0)
        + varint(6)
        + _len_field(4, b"t")
        + _tag(10, 1)
        + i64
    )
    step_body = (
        _tag(1, 0)
        + varint(6)
        + _tag(7, 0)
        + varint(2)
        + _cols()
        + _len_field(11, (2).to_bytes(4, "little"))
        + _len_field(1, b"s")
        + _tag(3, 5)
        + i32
        + _len_field(7, b"k")
        + _tag(11, 0)
        + varint(5)
    )
    beat_body = _tag(1, 0) + varint(11) + _len_field(1, b"b") + _tag(2, 5) + i32
    for variant, body in ((1, hello_body), (2, event_body), (3, step_body), (4, beat_body)):
        wire = _len_field(variant, body)
        expected = pb.IngestFrame.FromString(wire)
        assert_same(decode_frame(wire), expected)


def test_a_group_holding_every_wire_type_is_skipped() -> None:
    group = (
        _tag(50, 3)
        + _tag(1, 0)
        + varint(300)
        + _tag(2, 1)
        + bytes(8)
        + _len_field(3, b"abc")
        + _tag(4, 5)
        + bytes(4)
        + _tag(5, 3)
        + _tag(5, 4)
        + _tag(50, 4)
    )
    wire = _len_field(4, group + _tag(1, 0) + varint(42))
    assert decode_frame(wire).time_ns == 42


@pytest.mark.parametrize("longer", ["prefill_tokens", "decode_tokens", "context_tokens"])
def test_a_column_longer_than_the_handles_is_a_mismatch(longer: str) -> None:
    cols = {8: [1], 9: [0], 10: [1], 11: [5]}
    cols[{"prefill_tokens": 9, "decode_tokens": 10, "context_tokens": 11}[longer]] += [6]
    body = (
        _tag(1, 0)
        + varint(1)
        + b"".join(_len_field(n, np.array(v, "<u4").tobytes()) for n, v in cols.items())
    )
    err = _error(_hello_frame() + frame(_len_field(3, body)))
    assert err.reason == "column_mismatch" and f"{longer}=2" in err.message


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**14, 2**32 - 1, 2**63, 2**64 - 1])
def test_encode_varint_is_the_protobuf_varint(value: int) -> None:
    assert encode_varint(value) == varint(value)
    assert pb.Heartbeat.FromString(_tag(2, 0) + encode_varint(value)).dropped_frames == value


def _packed_body(
    n: int = 2, n_peer: int = 1, version: int = 1, claim: int | None = None, flags: int = 1, reserved: int = 0
) -> bytes:
    """A packed step body with ``n`` entries; ``claim``: the entry count its header states."""
    stated = n if claim is None else claim
    head = wire.PACKED_HEADER.pack(version, flags, reserved, 2, stated, n_peer, 9, 8, 1_000, 2_000, 1_000, 1)
    return head + bytes(4 * (4 * n + n_peer))


def _packed_stream(body: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return hello("eng", protocol_version=version) + wire.packed_prefix(len(body)) + body


def test_packed_steps_decode_and_v1_recorders_are_still_accepted():
    """Recorders send packed steps (protocol v2); a v1 recorder's hello and StepRecords still work."""
    frames = FrameDecoder().feed(_packed_stream(_packed_body()))
    st = frames[-1]
    assert type(st) is Step and (st.seq, st.global_step, st.kind, st.device_time_ns) == (9, 8, 2, 1_000)
    assert len(st.handles) == 2 and len(st.peer_tokens) == 1
    v1 = FrameDecoder()
    got = v1.feed(hello("old", protocol_version=1) + step(3, [1, 2]))
    assert v1.hello is not None and v1.hello.protocol_version == 1
    assert [type(f) for f in got] == [Hello, Step] and list(got[1].handles) == [1, 2]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_packed_body()[:59], "malformed"),  # shorter than the header
        (_packed_body(version=2), "malformed"),  # a layout this sidecar does not know
        (_packed_body()[:-4], "column_mismatch"),  # fewer bytes than the counts say
        (_packed_body() + b"\0\0\0\0", "column_mismatch"),  # more
        (_packed_body(n=1, claim=2**32 - 1), "column_mismatch"),  # a hostile count
        (_packed_body(flags=1 | wire.PACKED_REPEAT, reserved=1), "malformed"),  # a repeat never expanded
        (_packed_body(flags=0x81), "malformed"),  # a flag this sidecar does not know
        (_packed_body(reserved=7), "malformed"),
    ],
)
def test_packed_steps_whose_bytes_disagree_with_their_header_are_refused(body: bytes, reason: str):
    with pytest.raises(FrameError) as err:
        FrameDecoder().feed(_packed_stream(body))
    assert err.value.reason == reason


def test_decode_frame_parses_any_int32_as_protobuf_does() -> None:
    """Enum and int32 fields keep their sign (a negative kind from a broken peer is seen as
    negative and rejected as such, not as a 4-billion kind)."""
    for value in (-1, -(2**31), 2**31 - 1, 7):
        ev = pb.IngestFrame(request_event=pb.RequestEvent(handle=1, kind=value, time_ns=1, request_id="r"))
        assert decode_frame(ev.SerializeToString()).kind == value
        st = pb.IngestFrame(step=pb.StepRecord(seq=1, kind=value, timer_source=value))
        got = decode_frame(st.SerializeToString())
        assert (got.kind, got.timer_source) == (value, value)


def test_a_text_field_over_the_limit_is_clipped_whichever_it_is() -> None:
    from enginetime.sidecar.ingest.limits import clip_text

    for name in ("request_id", "session_id", "traceparent", "finish_reason"):
        decoder = FrameDecoder(max_text_bytes=256)
        fields = {"request_id": "r", name: "x" * 300}
        [_, ev] = decoder.feed(
            _hello_frame() + frame(pb.IngestFrame(request_event=pb.RequestEvent(handle=1, kind=1, **fields)))
        )
        assert getattr(ev, name) == clip_text("x" * 300, 256), name
        assert decoder.clipped == 1, name


def test_an_error_with_no_good_frame_before_it_carries_an_empty_list() -> None:
    """The ingest server ingests ``err.frames`` before closing: a list, empty when nothing was good."""
    assert _error(_step_frame()).frames == []
    assert _error(_hello_frame(), _step_frame(n=5)[:-2], finish=True).frames == []


def test_unknown_fields_numbered_above_the_known_ones_leave_them_as_they_were() -> None:
    """A newer recorder adds fields 12, 20, ...: they are skipped, never read as field 10."""
    hello_body = (
        _tag(1, 0)
        + varint(PROTOCOL_VERSION)
        + _len_field(2, b"eng")
        + _tag(4, 0)
        + varint(1)
        + _tag(10, 0)
        + varint(77)
        + _tag(12, 0)
        + varint(5)
        + _tag(20, 0)
        + varint(6)
    )
    event_body = (
        _tag(1, 0) + varint(4) + _len_field(10, b"stop") + _len_field(12, b"x") + _len_field(30, b"y")
    )
    for variant, body in ((1, hello_body), (2, event_body)):
        wire = _len_field(variant, body)
        assert_same(decode_frame(wire), pb.IngestFrame.FromString(wire))


def test_a_frame_variant_number_with_another_wire_type_is_skipped_as_protobuf_does() -> None:
    hello = _len_field(
        1, _tag(1, 0) + varint(PROTOCOL_VERSION) + _len_field(2, b"eng") + _tag(4, 0) + varint(1)
    )
    for odd in (_tag(1, 5) + (7).to_bytes(4, "little"), _tag(3, 0) + varint(9), _tag(2, 1) + bytes(8)):
        wire = hello + odd
        assert_same(decode_frame(wire), pb.IngestFrame.FromString(wire))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 7, 9])
def test_a_packed_column_whose_length_is_not_whole_values_is_malformed(size: int) -> None:
    err = _error(_hello_frame(), frame(_len_field(3, _len_field(8, bytes(size)))))
    assert err.reason == "malformed" and f"is {size} bytes, not a multiple of 4" in err.message


def test_truncated_after_whole_frames_in_the_same_chunk_names_the_cut_frame() -> None:
    whole = _step_frame(n=50)
    err = _error(_hello_frame() + _step_frame(seq=7) + whole[:-10], finish=True)
    assert err.reason == "truncated"
    assert f"{len(whole) - 10 - 2} bytes into a {len(whole) - 2}-byte frame" in err.message
