"""Property-based fuzzing of what a hostile ingest peer controls: the frame decoder and the ledger.

- Any bytes, and valid streams with bytes flipped, inserted, dropped or cut, in any
  chunking: the decoder returns frames or raises ``FrameError``, nothing else; once it
  failed it keeps failing; it never buffers more than one frame.
- Any sequence of frames the decoder lets through (several connections, any order of
  events and steps, extreme but in-range values): the ledger either takes each frame
  or refuses it with ValueError (the ingest server closes that connection), its store
  stays within ``max_requests``, and every request it holds can still be listed and
  encoded (one poisoned request used to break every unfiltered ListRequests).

Example counts are bounded so ``make test`` stays fast; raise them locally with
``--hypothesis-seed``/``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import os

from helpers import arrived, event, heartbeat, hello, step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginetime.engine_hooks import wire
from enginetime.sidecar.api.convert import request_to_proto
from enginetime.sidecar.ingest.frames import FrameDecoder, FrameError
from enginetime.sidecar.ingest.limits import MAX_DURATION_NS, TIME_MAX_NS
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.ledger.views import RequestQuery

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

MAX_FRAME = 64 * 1024

# ----------------------------------------------------------------------------- valid streams

times = st.one_of(
    st.integers(0, TIME_MAX_NS - 1),
    st.integers(1_700_000_000_000_000_000, 1_700_000_100_000_000_000),
    st.integers(-(2**63), 2**63 - 1),  # out of range: the decoder refuses them (bad_value)
)
handles = st.integers(1, 6)
request_ids = st.sampled_from(["r1", "r2", "r3", "", "é漢🙂", "x" * 700])


@st.composite
def event_frames(draw) -> bytes:
    kind = draw(st.integers(0, 7))
    h = draw(handles)
    t = draw(times)
    if kind == 1:
        return arrived(
            h,
            draw(request_ids),
            prompt_tokens=draw(st.integers(0, 2**32 - 1)),
            time_ns=t,
            session_id=draw(st.sampled_from(["", "s1", "s2"])),
            replayed=draw(st.booleans()),
        )
    return event(h, kind, t, request_id=draw(request_ids), output_tokens=draw(st.integers(0, 10)))


@st.composite
def step_frames(draw) -> bytes:
    hs = draw(st.lists(handles, max_size=5))
    n = len(hs)
    prefill = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
    return step(
        draw(st.integers(0, 12)),
        hs,
        prefill=prefill,
        decode=draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
        context=draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)),
        device_time_ns=draw(st.integers(0, MAX_DURATION_NS)),
        start_time_ns=min(draw(times), 2**63 - 1 - MAX_DURATION_NS),  # end = start + device
        global_step=draw(st.none() | st.integers(0, 12)),
        peer_tokens=draw(st.lists(st.integers(0, 2**32 - 1), max_size=3)),
        packed=draw(st.booleans()),  # recorders send IngestFrame.packed_step; v1 ones StepRecord
    )


@st.composite
def connections(draw) -> list[tuple[int, bytes]]:
    """(connection number, frame) in arrival order, over up to three connections."""
    out: list[tuple[int, bytes]] = []
    nconn = draw(st.integers(1, 3))
    for conn in range(nconn):
        engine = draw(st.sampled_from(["a", "b"]))
        out.append(
            (
                conn,
                hello(
                    engine,
                    shard=draw(st.integers(0, 1)),
                    num_shards=2,
                    coupling=draw(st.sampled_from([1, 2])),
                    recorder_epoch=draw(st.integers(1, 3)),
                ),
            )
        )
    body = st.one_of(event_frames(), step_frames(), st.just(heartbeat(dropped_frames=1)))
    for _ in range(draw(st.integers(0, 40))):
        out.append((draw(st.integers(0, nconn - 1)), draw(body)))
    return out


# ----------------------------------------------------------------------------- decoder


def _feed_all(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(MAX_FRAME)
    pos = 0
    failed: FrameError | None = None
    for cut in [*sorted(cuts), len(data)]:
        chunk = data[pos:cut]
        pos = max(pos, cut)
        try:
            decoder.feed(chunk)
        except FrameError as exc:
            if failed is not None:
                assert exc is failed  # a failed decoder keeps failing the same way
            failed = exc
        assert decoder.buffered <= MAX_FRAME + 10
    try:
        decoder.finish()
    except FrameError:
        pass


@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=8))
def test_random_bytes_only_ever_raise_frame_error(data: bytes, cuts: list[int]) -> None:
    _feed_all(data, cuts)


@given(
    connections(),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("fid")), max_size=6),
    st.lists(st.integers(0, 10**6), max_size=6),
)
def test_mutated_valid_streams_only_ever_raise_frame_error(
    stream: list[tuple[int, bytes]], mutations, cuts: list[int]
) -> None:
    data = bytearray(b"".join(f for _, f in stream))
    for where, value, how in mutations:
        if not data:
            break
        i = where % len(data)
        if how == "f":
            data[i] ^= value or 1
        elif how == "i":
            data.insert(i, value)
        else:
            del data[i]
    _feed_all(bytes(data), [c % (len(data) + 1) for c in cuts])


# ----------------------------------------------------------------------------- ledger


@given(
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
    st.integers(-70, 70),
)
def test_packed_steps_with_lying_headers_only_ever_raise_frame_error(
    version: int, n: int, n_peer: int, tail: bytes, cut: int
) -> None:
    """A packed step's header claims any counts; its body is any length: frames or FrameError only."""
    head = wire.PACKED_HEADER.pack(version, 1, 0, 2, n, n_peer, 7, 7, 10, 20, 10, 1)
    body = head + tail
    if cut < 0:
        body = body[: max(0, len(body) + cut)]
    data = hello("a") + wire.packed_prefix(len(body)) + body
    decoder = FrameDecoder(MAX_FRAME)
    try:
        frames = decoder.feed(data)
    except FrameError:
        return
    for f in frames:
        if isinstance(f, Step):  # accepted only when the counts match the bytes exactly
            assert version == wire.PACKED_VERSION and len(body) == 60 + 16 * n + 4 * n_peer
            assert len(f.handles) == n and len(f.peer_tokens) == n_peer


@given(connections(), st.integers(2, 8))
def test_the_ledger_takes_or_refuses_any_decoded_stream_and_stays_listable(
    stream: list[tuple[int, bytes]], max_requests: int
) -> None:
    ledger = Ledger(LedgerConfig(max_requests=max_requests, lockstep_wait_s=0.0))
    decoders: dict[int, FrameDecoder] = {}
    keys: dict[int, tuple[str, int]] = {}
    dead: set[int] = set()
    for conn, data in stream:
        if conn in dead:
            continue
        decoder = decoders.setdefault(conn, FrameDecoder())
        try:
            frames = decoder.feed(data)
        except FrameError:
            dead.add(conn)
            continue
        for f in frames:
            try:
                if type(f) is Hello:
                    keys[conn] = ledger.connect(f)
                elif type(f) is Event:
                    ledger.on_event(keys[conn], f)
                elif type(f) is Step:
                    ledger.on_step(keys[conn], f)
                elif type(f) is Beat:
                    ledger.on_heartbeat(keys[conn], f)
            except ValueError:  # refused: the ingest server closes this connection
                dead.add(conn)
                break
        assert ledger.size <= max_requests
    ledger.tick()
    ledger.flush()
    views = ledger.query(RequestQuery())
    assert len(views) == ledger.size <= max_requests
    for v in views:
        request_to_proto(v)  # every held request can be served
        assert 0 <= v.arrival_time_ns < TIME_MAX_NS
        assert v.gpu_time_ns >= 0 and v.steps >= 0
        # Not asserted: ledger.get(v.request_id) finds v. Two requests of one shard that end up
        # with the same id (a nameless one renamed by a later event) leave one of them unfindable
        # once the other is evicted; request identity is being reworked in the ledger.
    ledger.encode(ledger.select(RequestQuery()))  # and streamed
    for conn in keys:
        if conn not in dead:
            ledger.disconnect(keys[conn])
    ledger.shards()
