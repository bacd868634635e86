"""Repeat steps: an unchanged decode batch costs the engine thread a fixed-size record.

``Recorder.step_repeat`` writes a header and no columns; the shipper (process or thread)
expands it into the full step before the sidecar sees it. What the user cares about:
the sidecar receives exactly the steps ``step_end`` with the columns would have sent;
a repeat whose previous step was lost is never expanded against the wrong one — the
recorder refuses it (the adapter then sends the full step) or it is dropped and counted.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import test_hooks_recorder as hooks_recorder
from test_hooks_recorder import delivered
from test_hooks_timers import FakeGpu, engine_thread_passes, fake_timer, gpu_step

from enginetime.engine_hooks import Recorder, StepKind, TimerSource, wire

sockdir = hooks_recorder.sockdir
server = hooks_recorder.server

SHIPPERS = ["process", "thread"]


def _cols(step) -> tuple:
    return (
        step.kind,
        list(step.handles),
        list(step.prefill_tokens),
        list(step.decode_tokens),
        list(step.context_tokens),
        list(step.peer_tokens),
        step.global_step if step.HasField("global_step") else None,
    )


@pytest.mark.parametrize("shipper", SHIPPERS)
def test_repeats_reach_the_sidecar_as_the_full_steps_they_stand_for(server, shipper):
    """A prefill, then decode repeats (with a two-token speculative repeat and peers): every
    step the server decodes has the columns the engine would have passed to step_end."""
    with Recorder("eng-rep", address=server.address, timer="cpu", shipper=shipper) as rec:
        hs = [rec.request_arrived(f"r{i}") for i in range(3)]
        tok = rec.step_begin()
        rec.step_end(
            tok,
            kind=StepKind.PREFILL,
            handles=hs,
            prefill_tokens=[100, 7, 30],
            decode_tokens=[0, 0, 0],
            context_tokens=[0, 50, 4],
            global_step=10,
        )
        results = []
        for i, (per, peer) in enumerate([(1, None), (1, [3, 1]), (2, None), (1, [4, 4])]):
            tok = rec.step_begin()
            results.append(rec.step_repeat(tok, decode_tokens=per, global_step=11 + i, peer_tokens=peer))
        assert delivered(rec, server)
        st = rec.stats()
    assert results == [True] * 4
    assert st.dropped_steps == 0 and st.errors == 0 and st.steps == 5 and st.repeat_steps == 4
    steps = server.of("step")
    assert [s.seq for s in steps] == [0, 1, 2, 3, 4]
    D = int(StepKind.DECODE)
    assert [_cols(s) for s in steps[1:]] == [
        (D, hs, [0, 0, 0], [1, 1, 1], [100, 57, 34], [], 11),  # context = previous + prefill
        (D, hs, [0, 0, 0], [1, 1, 1], [101, 58, 35], [3, 1], 12),
        (D, hs, [0, 0, 0], [2, 2, 2], [102, 59, 36], [], 13),
        (D, hs, [0, 0, 0], [1, 1, 1], [104, 61, 38], [4, 4], 14),  # grew by the 2 just decoded
    ]
    assert all(s.end_time_ns >= s.start_time_ns > 0 and s.device_time_ns > 0 for s in steps)


@pytest.mark.parametrize("shipper", SHIPPERS)
def test_a_repeat_needs_the_step_right_before_it(server, shipper):
    """No step yet, a step lost to bad columns, a disabled recorder: step_repeat refuses,
    records nothing and leaves the token for step_end (the adapter's fallback)."""
    with Recorder("eng-rep2", address=server.address, timer="cpu", shipper=shipper) as rec:
        h = rec.request_arrived("r")
        tok = rec.step_begin()
        assert rec.step_repeat(tok) is False  # nothing to repeat yet
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[h], prefill_tokens=0, decode_tokens=1, context_tokens=[9]
        )
        tok = rec.step_begin()
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[h], prefill_tokens=[0, 0], decode_tokens=1, context_tokens=[9]
        )
        tok = rec.step_begin()
        assert rec.step_repeat(tok) is False  # the step before was dropped (unequal columns)
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[h], prefill_tokens=0, decode_tokens=1, context_tokens=[11]
        )
        tok = rec.step_begin()
        assert rec.step_repeat(tok, decode_tokens=-1) is False  # not a token count
        assert rec.step_repeat(tok, decode_tokens=70000) is False
        assert rec.step_repeat(tok) is True
        assert delivered(rec, server)
        st = rec.stats()
    assert st.steps == 4 and st.dropped_steps == 1 and st.repeat_steps == 1
    steps = server.of("step")
    assert [(s.seq, list(s.context_tokens)) for s in steps] == [(0, [9]), (2, [11]), (3, [12])]


def test_a_repeat_after_a_ring_overflow_is_refused_then_resumes(sockdir):
    """Thread shipper, nothing reading: the ring drops its oldest step, so the step a repeat
    would expand against may be gone — the recorder sends full steps until one is written."""
    rec = Recorder(
        "eng-rep3",
        address=f"unix:{sockdir}/nobody.sock",
        timer="cpu",
        shipper="thread",
        buffer_size=4,
        start=False,
    )
    try:
        tok = rec.step_begin()
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=0, decode_tokens=1, context_tokens=[5]
        )
        for _ in range(3):
            assert rec.step_repeat(rec.step_begin()) is True
        assert rec.step_repeat(rec.step_begin()) is True  # the fifth item pushes the first one out
        assert rec.stats().dropped_steps == 1
        tok = rec.step_begin()
        assert rec.step_repeat(tok) is False  # a step was lost: no more repeats on this chain
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=0, decode_tokens=1, context_tokens=[10]
        )
        assert rec.step_repeat(rec.step_begin()) is True  # a new chain starts at the full step
    finally:
        rec.close(0)


def test_the_thread_shipper_drops_a_repeat_whose_step_it_never_saw(sockdir):
    """The overflowed chain above, shipped: the repeats after the lost step are dropped and
    counted, never expanded against an older step; the full step after them ships."""
    srv = hooks_recorder.FrameServer.unix(sockdir)
    rec = Recorder("eng-rep4", address=srv.address, timer="cpu", shipper="thread", buffer_size=3, start=False)
    try:
        tok = rec.step_begin()
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=0, decode_tokens=1, context_tokens=[5]
        )
        for _ in range(3):
            rec.step_repeat(rec.step_begin())  # the third pushes the full step out
        tok = rec.step_begin()
        assert rec.step_repeat(tok) is False
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=0, decode_tokens=1, context_tokens=[40]
        )
        assert rec.step_repeat(rec.step_begin()) is True
        srv.start()
        rec.start()
        assert delivered(rec, srv)
        st = rec.stats()
    finally:
        rec.close()
        srv.stop()
    # Lost: seq 0 and 1 pushed out of the ring, seq 2 and 3 could not be expanded.
    assert [(s.seq, list(s.context_tokens)) for s in srv.of("step")] == [(4, [40]), (5, [41])]
    assert st.dropped_steps == 4


def test_a_new_shipper_process_gets_a_full_step_before_any_repeat(server):
    """A respawned shipper process has seen no step: the recorder's next repeat is refused."""
    with Recorder("eng-rep5", address=server.address, timer="cpu", shipper="process") as rec:
        h = rec.request_arrived("r")
        tok = rec.step_begin()
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[h], prefill_tokens=0, decode_tokens=1, context_tokens=[5]
        )
        assert rec.step_repeat(rec.step_begin()) is True
        assert delivered(rec, server)
        os.kill(rec.stats().shipper_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        refused = 0
        ctx = 7
        while rec.stats().shipper_restarts == 0 and time.monotonic() < deadline:
            tok = rec.step_begin()
            if not rec.step_repeat(tok):
                refused += 1
                rec.step_end(
                    tok,
                    kind=StepKind.DECODE,
                    handles=[h],
                    prefill_tokens=0,
                    decode_tokens=1,
                    context_tokens=[ctx],
                )
            ctx += 1
            time.sleep(0.01)
        tok = rec.step_begin()
        assert rec.step_repeat(tok) is False  # restarted since the last full step
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[h], prefill_tokens=0, decode_tokens=1, context_tokens=[500]
        )
        assert rec.step_repeat(rec.step_begin()) is True
        assert delivered(rec, server)
    assert refused == 0  # the dead process was not yet noticed: repeats went into the ring
    assert [list(s.context_tokens) for s in server.of("step", 2)][-2:] == [[500], [501]]


@pytest.mark.parametrize("shipper", SHIPPERS)
def test_a_repeat_timed_with_cuda_events_gets_its_device_time(server, shipper):
    """A repeat's device time arrives later, as a step's does: in order, once its events are
    done on the (fake) GPU, never by waiting for it."""
    gpu = FakeGpu()
    with Recorder("eng-rep6", address=server.address, timer=fake_timer(gpu), shipper=shipper) as rec:
        h = rec.request_arrived("r")
        gpu_step(rec, gpu, 3_000_000, handles=[h])  # context 10, decode 1
        tok = rec.step_begin()
        gpu.launch(7_000_000)
        assert rec.step_repeat(tok) is True
        assert rec.flush(0.2) is False  # the GPU has finished neither step: nothing is sent yet
        gpu.run_all()
        engine_thread_passes(rec)
        assert delivered(rec, server)
    steps = server.of("step")
    assert [(list(s.context_tokens), s.device_time_ns, s.timer_source) for s in steps] == [
        ([10], 3_000_000, TimerSource.CUDA_EVENT),
        ([11], 7_000_000, TimerSource.CUDA_EVENT),
    ]


def _step_frame(context: list[int]) -> bytes:
    """A framed packed decode step (seq 4) of two entries with these contexts."""
    return wire.frame_packed_step(
        seq=4,
        start_time_ns=1,
        end_time_ns=2,
        device_time_ns=1,
        timer_source=1,
        kind=2,
        handles=[7, 8],
        prefill_tokens=[0, 0],
        decode_tokens=[1, 1],
        context_tokens=context,
    )


def test_expand_repeat_refuses_a_repeat_that_is_not_the_next_step():
    base = _step_frame([10, 20])
    head = wire.PACKED_HEADER.pack(1, wire.PACKED_REPEAT, 1, 2, 2, 0, 5, 0, 3, 4, 1, 1)
    full = wire.unpack_step(wire.split_frames(wire.expand_repeat(base, head))[0][0][2:])
    assert full["seq"] == 5 and full["handles"] == [7, 8] and full["context_tokens"] == [11, 21]
    wrong_seq = wire.PACKED_HEADER.pack(1, wire.PACKED_REPEAT, 1, 2, 2, 0, 6, 0, 3, 4, 1, 1)
    wrong_n = wire.PACKED_HEADER.pack(1, wire.PACKED_REPEAT, 1, 2, 3, 0, 5, 0, 3, 4, 1, 1)
    not_repeat = wire.PACKED_HEADER.pack(1, 0, 1, 2, 2, 0, 5, 0, 3, 4, 1, 1)
    for body in (wrong_seq, wrong_n, not_repeat, head + b"\0\0"):
        with pytest.raises(ValueError):
            wire.expand_repeat(base, body)
    with pytest.raises(OverflowError):  # a context past u32: the entry-by-entry path raises
        wire.expand_repeat(_step_frame([10, 0xFFFFFFFF]), head)
    # Contexts past the lane masks (>= 2^31) still add exactly, entry by entry.
    big = wire.expand_repeat(_step_frame([10, 0x80000000]), head)
    assert wire.unpack_step(wire.split_frames(big)[0][0][2:])["context_tokens"] == [11, 0x80000001]
