"""The hand-written ingest encoder against the protobuf library's own reading of it.

The engine side encodes frames without protobuf; the sidecar decodes them with the
generated stubs. These tests encode many random records (edge values included) and
check that ``ingest_pb2`` reads back exactly the fields written, that proto3 presence
rules hold (defaults omitted, ``optional`` fields present even when 0), and that the
bytes are the canonical encoding protobuf itself would produce.
"""

from __future__ import annotations

import random
import struct
from array import array

import pytest

from enginetime.engine_hooks import wire
from enginetime.engine_hooks.constants import HOOKS_VERSION, PROTOCOL_VERSION
from enginetime.v1 import ingest_pb2

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

TEXTS = [
    "",
    "r",
    "req-0001",
    "ünïcødé-✓",
    "日本語のリクエスト",
    "emoji-🚀-id",
    "x" * 300,
    "tab\tnew\nline",
    "\x00nul",
]


def payload(frame: bytes) -> bytes:
    """Strip the varint length prefix, checking it matches the rest exactly."""
    size, start = wire.decode_varint(frame, 0)
    assert size == len(frame) - start
    return frame[start:]


def decode(frame: bytes) -> ingest_pb2.IngestFrame:
    return ingest_pb2.IngestFrame.FromString(payload(frame))


def u32(rng: random.Random) -> int:
    return rng.choice([0, 1, 127, 128, 255, 256, 16383, 16384, U32_MAX - 1, U32_MAX, rng.randrange(U32_MAX)])


def u64(rng: random.Random) -> int:
    return rng.choice([0, 1, 2**32, 2**63, U64_MAX, rng.randrange(U64_MAX)])


def i64(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, -1, I64_MIN, I64_MAX, 1_795_000_000_000_000_000, -rng.randrange(2**62), rng.randrange(2**62)]
    )


def column(rng: random.Random, n: int) -> list[int]:
    return [u32(rng) for _ in range(n)]


def random_hello(rng: random.Random) -> dict:
    return dict(
        engine_id=rng.choice(TEXTS),
        shard=u32(rng),
        num_shards=u32(rng),
        coupling=rng.randrange(3),
        engine_kind=rng.choice(TEXTS),
        engine_version=rng.choice(TEXTS),
        hooks_version=rng.choice(TEXTS),
        wall_time_ns=i64(rng),
        monotonic_ns=i64(rng),
        timer_source=rng.randrange(3),
        device_name=rng.choice(TEXTS),
        recorder_epoch=u64(rng),
        protocol_version=u32(rng),
    )


def random_event(rng: random.Random) -> dict:
    return dict(
        handle=u32(rng),
        kind=rng.randrange(7),
        time_ns=i64(rng),
        request_id=rng.choice(TEXTS),
        prompt_tokens=u32(rng),
        cached_tokens=u32(rng),
        session_id=rng.choice(TEXTS),
        traceparent=rng.choice(TEXTS),
        routed_shard=rng.choice([None, 0, 1, U32_MAX]),
        finish_reason=rng.choice(TEXTS),
        output_tokens=u32(rng),
        replayed=rng.random() < 0.5,
    )


def random_step(rng: random.Random) -> dict:
    n = rng.choice([0, 1, 2, 7, 64, 300])
    as_array = rng.random() < 0.5
    cols = [column(rng, n) for _ in range(4)]
    peer = column(rng, rng.choice([0, 1, 8]))
    if as_array:
        cols = [array(wire.U32, c) for c in cols]
    return dict(
        seq=u64(rng),
        global_step=rng.choice([None, 0, 1, U64_MAX]),
        start_time_ns=i64(rng),
        end_time_ns=i64(rng),
        device_time_ns=i64(rng),
        timer_source=rng.randrange(3),
        kind=rng.randrange(5),
        handles=cols[0],
        prefill_tokens=cols[1],
        decode_tokens=cols[2],
        context_tokens=cols[3],
        peer_tokens=rng.choice([None, peer, tuple(peer)]),
    )


def random_heartbeat(rng: random.Random) -> dict:
    return dict(
        time_ns=i64(rng),
        dropped_frames=u64(rng),
        dropped_steps=u64(rng),
        dropped_events=u64(rng),
        sent_frames=u64(rng),
        reconnects=u64(rng),
    )


def check_hello(fields: dict, msg: ingest_pb2.IngestFrame) -> None:
    assert msg.WhichOneof("frame") == "hello"
    h = msg.hello
    for name in (
        "engine_id",
        "shard",
        "num_shards",
        "coupling",
        "engine_kind",
        "engine_version",
        "hooks_version",
        "recorder_epoch",
        "protocol_version",
    ):
        assert getattr(h, name) == fields[name], name
    assert h.HasField("clock")
    assert h.clock.wall_time_ns == fields["wall_time_ns"]
    assert h.clock.monotonic_ns == fields["monotonic_ns"]
    assert h.clock.timer_source == fields["timer_source"]
    assert h.clock.device_name == fields["device_name"]


def check_event(fields: dict, msg: ingest_pb2.IngestFrame) -> None:
    assert msg.WhichOneof("frame") == "request_event"
    e = msg.request_event
    for name in (
        "handle",
        "kind",
        "time_ns",
        "request_id",
        "prompt_tokens",
        "cached_tokens",
        "session_id",
        "traceparent",
        "finish_reason",
        "output_tokens",
        "replayed",
    ):
        assert getattr(e, name) == fields[name], name
    if fields["routed_shard"] is None:
        assert not e.HasField("routed_shard")
    else:
        assert e.HasField("routed_shard") and e.routed_shard == fields["routed_shard"]


def check_step(fields: dict, msg: ingest_pb2.IngestFrame) -> None:
    assert msg.WhichOneof("frame") == "step"
    s = msg.step
    for name in ("seq", "start_time_ns", "end_time_ns", "device_time_ns", "timer_source", "kind"):
        assert getattr(s, name) == fields[name], name
    if fields["global_step"] is None:
        assert not s.HasField("global_step")
    else:
        assert s.HasField("global_step") and s.global_step == fields["global_step"]
    for name in ("handles", "prefill_tokens", "decode_tokens", "context_tokens"):
        assert list(getattr(s, name)) == list(fields[name]), name
    assert list(s.peer_tokens) == list(fields["peer_tokens"] or [])


def check_heartbeat(fields: dict, msg: ingest_pb2.IngestFrame) -> None:
    assert msg.WhichOneof("frame") == "heartbeat"
    for name, value in fields.items():
        assert getattr(msg.heartbeat, name) == value, name


def protobuf_bytes(which: str, fields: dict) -> bytes:
    """What protobuf itself serialises for the same content (the canonical encoding)."""
    frame = ingest_pb2.IngestFrame()
    if which == "hello":
        f = dict(fields)
        clock = {k: f.pop(k) for k in ("wall_time_ns", "monotonic_ns", "timer_source", "device_name")}
        frame.hello.CopyFrom(ingest_pb2.EngineHello(**f, clock=ingest_pb2.ClockInfo(**clock)))
    elif which == "request_event":
        f = {k: v for k, v in fields.items() if v is not None}
        frame.request_event.CopyFrom(ingest_pb2.RequestEvent(**f))
    elif which == "step":
        f = {
            k: (list(v) if isinstance(v, list | tuple | array) else v)
            for k, v in fields.items()
            if v is not None
        }
        frame.step.CopyFrom(ingest_pb2.StepRecord(**f))
    else:
        frame.heartbeat.CopyFrom(ingest_pb2.Heartbeat(**fields))
    return frame.SerializeToString(deterministic=True)


CASES = [
    ("hello", random_hello, wire.frame_hello, check_hello),
    ("request_event", random_event, wire.frame_event, check_event),
    ("step", random_step, wire.frame_step, check_step),
    ("heartbeat", random_heartbeat, wire.frame_heartbeat, check_heartbeat),
]


@pytest.mark.parametrize("which, make, encode, check", CASES, ids=[c[0] for c in CASES])
def test_random_records_decode_to_exactly_the_fields_encoded(which, make, encode, check):
    rng = random.Random(f"wire-{which}")
    for _ in range(400):
        fields = make(rng)
        frame = encode(**fields)
        check(fields, decode(frame))
        assert payload(frame) == protobuf_bytes(which, fields)


def test_proto3_defaults_are_omitted_and_optional_zero_is_present():
    # All-default event: only the oneof tag and an empty message.
    assert payload(wire.frame_event(handle=0, kind=0, time_ns=0)) == b"\x12\x00"
    assert payload(wire.frame_heartbeat(time_ns=0)) == b"\x22\x00"
    with_zero = decode(wire.frame_event(handle=0, kind=0, time_ns=0, routed_shard=0)).request_event
    assert with_zero.HasField("routed_shard") and with_zero.routed_shard == 0
    step = decode(
        wire.frame_step(
            seq=0, start_time_ns=0, end_time_ns=0, device_time_ns=0, timer_source=0, kind=0, global_step=0
        )
    ).step
    assert step.HasField("global_step") and step.global_step == 0
    assert step.ByteSize() == 2  # just global_step = 0
    no_global = decode(
        wire.frame_step(seq=0, start_time_ns=0, end_time_ns=0, device_time_ns=0, timer_source=0, kind=0)
    ).step
    assert not no_global.HasField("global_step")
    # A hello always carries its clock, even an all-default one.
    hello = decode(
        wire.frame_hello(
            engine_id="", shard=0, num_shards=0, coupling=0, hooks_version="", protocol_version=0
        )
    ).hello
    assert hello.HasField("clock")


def test_columns_are_packed_little_endian_fixed32():
    frame = payload(
        wire.frame_step(
            seq=0,
            start_time_ns=0,
            end_time_ns=0,
            device_time_ns=0,
            timer_source=0,
            kind=0,
            handles=[1, U32_MAX],
            prefill_tokens=[2, 0],
            decode_tokens=[3, 0],
            context_tokens=[4, 0],
        )
    )
    step = frame[2:]  # tag 0x1a + length of the StepRecord
    # field 8 (handles), wire type 2: tag 0x42, 8 bytes, two little-endian uint32.
    assert step[:2] == b"\x42\x08"
    assert step[2:10] == struct.pack("<II", 1, U32_MAX)
    assert wire.column_bytes("c", [1, 2]) == struct.pack("<II", 1, 2)
    assert wire.column_bytes("c", array(wire.U32, [1, 2])) == struct.pack("<II", 1, 2)


def test_edge_values_round_trip():
    fields = dict(
        handle=U32_MAX,
        kind=6,
        time_ns=I64_MIN,
        request_id="ünïcødé/日本/🚀",
        prompt_tokens=U32_MAX,
        cached_tokens=0,
        session_id="s",
        traceparent="00-abc-def-01",
        routed_shard=U32_MAX,
        finish_reason="length",
        output_tokens=U32_MAX,
        replayed=True,
    )
    check_event(fields, decode(wire.frame_event(**fields)))
    step = dict(
        seq=U64_MAX,
        global_step=U64_MAX,
        start_time_ns=-1,
        end_time_ns=I64_MAX,
        device_time_ns=-5,
        timer_source=2,
        kind=4,
        handles=[],
        prefill_tokens=[],
        decode_tokens=[],
        context_tokens=[],
        peer_tokens=[0, U32_MAX],
    )
    check_step(step, decode(wire.frame_step(**step)))


def test_lone_surrogates_become_question_marks_not_unreadable_frames():
    msg = decode(wire.frame_event(handle=1, kind=1, time_ns=1, request_id="bad\ud800id")).request_event
    assert msg.request_id == "bad?id"


@pytest.mark.parametrize(
    "bad",
    [
        dict(handle=-1),
        dict(handle=U32_MAX + 1),
        dict(prompt_tokens=2**40),
        dict(time_ns=I64_MAX + 1),
        dict(routed_shard=-1),
        dict(kind=2**31),
    ],
)
def test_out_of_range_values_raise_naming_the_field(bad):
    fields = dict(handle=1, kind=1, time_ns=1) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        wire.frame_event(**fields)


def test_bad_columns_raise_value_error():
    base = dict(seq=1, start_time_ns=0, end_time_ns=0, device_time_ns=0, timer_source=1, kind=2)
    with pytest.raises(ValueError, match="differ in length"):
        wire.frame_step(
            **base, handles=[1, 2], prefill_tokens=[1], decode_tokens=[1, 2], context_tokens=[1, 2]
        )
    with pytest.raises(ValueError, match="prefill_tokens has a value outside uint32"):
        wire.frame_step(**base, handles=[1], prefill_tokens=[-1], decode_tokens=[1], context_tokens=[1])
    with pytest.raises(ValueError, match="handles must hold ints"):
        wire.frame_step(**base, handles=["a"], prefill_tokens=[1], decode_tokens=[1], context_tokens=[1])


def test_split_frames_handles_partial_input():
    rng = random.Random(7)
    frames = [wire.frame_step(**random_step(rng)) for _ in range(20)]
    frames += [wire.frame_heartbeat(**random_heartbeat(rng)) for _ in range(5)]
    stream = b"".join(frames)
    got: list[bytes] = []
    buf = b""
    pos = 0
    while pos < len(stream):  # feed it in awkward chunks
        step = rng.randint(1, 700)
        buf += stream[pos : pos + step]
        pos += step
        out, used = wire.split_frames(buf)
        got += out
        buf = buf[used:]
    assert buf == b""
    assert got == [payload(f) for f in frames]


def test_varint_round_trip():
    for value in [0, 1, 127, 128, 300, 2**32, 2**63, U64_MAX]:
        enc = wire.encode_varint(value)
        assert wire.decode_varint(enc) == (value, len(enc))
    with pytest.raises(ValueError):
        wire.encode_varint(-1)
    with pytest.raises(ValueError):
        wire.decode_varint(b"\xff" * 11)


def test_defaults_name_this_protocol_and_hooks_version():
    hello = decode(wire.frame_hello(engine_id="e", shard=0, num_shards=1, coupling=1)).hello
    assert hello.protocol_version == PROTOCOL_VERSION
    assert hello.hooks_version == HOOKS_VERSION


def test_steps_encoded_on_the_engine_thread_match_frame_step():
    """encode_step writes frame_step's bytes; a CUDA step's body + wrap_step parses to the same record."""
    rng = random.Random(15)
    for trial in range(300):
        n = rng.choice([0, 1, 3, 256])
        cols = [[rng.getrandbits(32) for _ in range(n)] for _ in range(4)]
        peer = rng.choice([None, [], [rng.getrandbits(32) for _ in range(rng.randint(1, 5))]])
        seq = rng.getrandbits(rng.randint(1, 64)) if trial % 3 else 0
        global_step = rng.choice([None, 0, rng.getrandbits(40)])
        start, end = rng.getrandbits(62), rng.getrandbits(62)
        device = rng.choice([0, rng.getrandbits(40)])
        source = rng.choice([0, 1, 2])
        kind = rng.choice([0, 1, 2, 3, 4, 9, 200])
        arrays = [wire.u32_column(c) for c in cols]
        peer_array = None if peer is None else wire.u32_column(peer)
        expected = wire.frame_step(
            seq=seq,
            global_step=global_step,
            start_time_ns=start,
            end_time_ns=end,
            device_time_ns=device,
            timer_source=source,
            kind=kind,
            handles=cols[0],
            prefill_tokens=cols[1],
            decode_tokens=cols[2],
            context_tokens=cols[3],
            peer_tokens=peer,
        )
        whole = wire.encode_step(seq, global_step, start, end, device, source, kind, *arrays, peer_array)
        assert type(whole) is bytes and whole == expected
        body = wire.encode_step(seq, global_step, start, end, None, source, kind, *arrays, peer_array)
        late = wire.wrap_step(body, wire.step_device_fields(device, source))
        assert decode(late) == decode(expected)


def test_u32_column_refuses_values_outside_uint32():
    for bad in ([1, -1], [1 << 32], ["a"], [1.5]):
        with pytest.raises(ValueError):
            wire.u32_column(bad)
    assert list(wire.u32_column((1, 2, 3))) == [1, 2, 3]


def test_the_sidecar_reads_a_cuda_step_whose_device_time_comes_last():
    """A CUDA step is encoded without its device time, which the shipper appends after the columns."""
    frames = pytest.importorskip("enginetime.sidecar.ingest.frames")  # the sidecar extra (numpy)
    cols = [wire.u32_column([7, 8, 9]) for _ in range(4)]
    body = wire.encode_step(41, 40, 1_000, 3_000_000, None, 2, 2, *cols, None)
    step = frames.decode_frame(payload(wire.wrap_step(body, wire.step_device_fields(1_234_567, 2))))
    assert (step.seq, step.global_step, step.device_time_ns, step.timer_source) == (41, 40, 1_234_567, 2)
    assert (step.start_time_ns, step.end_time_ns, step.kind) == (1_000, 3_000_000, 2)
    assert list(step.handles) == [7, 8, 9] and list(step.context_tokens) == [7, 8, 9]


def test_packed_steps_read_as_the_step_records_they_stand_for():
    """A packed step (what recorders send) decodes in the sidecar to what frame_step's record does,
    and a CUDA step's body with its device time filled in late (wrap_packed) to the same."""
    frames = pytest.importorskip("enginetime.sidecar.ingest.frames")  # the sidecar extra (numpy)
    rng = random.Random(1515)
    for trial in range(300):
        n = rng.choice([0, 1, 3, 256])
        cols = [[rng.getrandbits(32) for _ in range(n)] for _ in range(4)]
        peer = rng.choice([[], [rng.getrandbits(32) for _ in range(rng.randint(1, 5))]])
        fields = {
            "seq": rng.getrandbits(rng.randint(1, 64)) if trial % 3 else 0,
            "global_step": rng.choice([None, 0, rng.getrandbits(40)]),
            "start_time_ns": rng.getrandbits(62),
            "end_time_ns": rng.getrandbits(62),
            "device_time_ns": rng.choice([0, rng.getrandbits(40)]),
            "timer_source": rng.choice([0, 1, 2]),
            "kind": rng.choice([0, 1, 2, 3, 4, 9, 200]),
            "handles": cols[0],
            "prefill_tokens": cols[1],
            "decode_tokens": cols[2],
            "context_tokens": cols[3],
            "peer_tokens": peer,
        }
        expected = frames.decode_frame(payload(wire.frame_step(**fields)))
        packed = wire.frame_packed_step(**fields)
        assert decode(packed).WhichOneof("frame") == "packed_step"
        got = frames.decode_frame(payload(packed))
        for name in ("seq", "global_step", "start_time_ns", "end_time_ns", "device_time_ns", "timer_source"):
            assert getattr(got, name) == getattr(expected, name), name
        assert got.kind == expected.kind
        for name in ("handles", "prefill_tokens", "decode_tokens", "context_tokens", "peer_tokens"):
            assert list(getattr(got, name)) == list(getattr(expected, name)), name
        assert wire.unpack_step(decode(packed).packed_step) == fields
        pending = wire.frame_packed_step(**{**fields, "device_time_ns": 0, "timer_source": 0})
        body = decode(pending).packed_step
        late = wire.wrap_packed(body, fields["device_time_ns"], fields["timer_source"])
        assert late == packed


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_the_recorder_sends_packed_steps_byte_for_byte(tmp_path, shipper):
    """step_end's inlined encoder writes frame_packed_step's bytes (lists and arrays alike)."""
    import socket as _socket

    from enginetime.engine_hooks import Recorder, shm_ring

    path = str(tmp_path / "s.sock")
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    rec = Recorder("eng-packed", address="unix:" + path, timer="cpu", start=False, shipper=shipper)
    try:
        h = rec.request_arrived("r", prompt_tokens=3)
        cases = [
            ([h, h], [0, 4], [1, 0], [9, 10], None, 7),
            (array(wire.U32, [h]), (5,), [0], array("q", [11]), [1, 2, 3], None),
            ([], [], [], [], [], 0),
        ]
        for handles, prefill, dec, ctx, peer, gstep in cases:
            tok = rec.step_begin()
            rec.step_end(
                tok,
                kind=2,
                handles=handles,
                prefill_tokens=prefill,
                decode_tokens=dec,
                context_tokens=ctx,
                peer_tokens=peer,
                global_step=gstep,
            )
        # The shipper is not started: read what the engine thread put in its ring.
        if shipper == "thread":
            items = [item[3] for item in rec._ring if item[0] == 0]
        else:
            items = [p for t, p in shm_ring.RingReader(rec._ps.mm).records() if t == shm_ring.FRAME]
        assert len(items) == 3
        for (handles, prefill, dec, ctx, peer, gstep), item in zip(cases, items, strict=True):
            got = wire.unpack_step(decode(item).packed_step)
            want = wire.frame_packed_step(
                seq=got["seq"],
                global_step=gstep,
                start_time_ns=got["start_time_ns"],
                end_time_ns=got["end_time_ns"],
                device_time_ns=got["device_time_ns"],
                timer_source=1,
                kind=2,
                handles=list(handles),
                prefill_tokens=list(prefill),
                decode_tokens=list(dec),
                context_tokens=list(ctx),
                peer_tokens=peer,
            )
            assert item == want
            assert got["end_time_ns"] >= got["start_time_ns"] and got["device_time_ns"] >= 0
    finally:
        rec.close(0)
        listener.close()


def test_unpack_step_refuses_bodies_that_disagree_with_their_header():
    good = decode(
        wire.frame_packed_step(
            seq=1,
            start_time_ns=1,
            end_time_ns=2,
            device_time_ns=1,
            timer_source=1,
            kind=2,
            handles=[1],
            prefill_tokens=[0],
            decode_tokens=[1],
            context_tokens=[5],
        )
    ).packed_step
    for bad in (good[:59], good[:-1], good + b"\0\0\0\0", b"\x02" + good[1:]):
        with pytest.raises(ValueError):
            wire.unpack_step(bad)
