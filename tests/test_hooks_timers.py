"""Step timers: CPU clock, and the CUDA event pool and its off-thread resolution.

This machine has no GPU, so the CUDA path's pooling and resolution logic is driven
with ``FakeEvent``, a stand-in that mimics ``torch.cuda.Event``'s ``record(stream)``,
``query()`` and ``elapsed_time(end)`` over ``FakeGpu``, one simulated in-order stream
whose progress the test controls (events complete only when the test lets the
"GPU" pass them, exactly the asynchrony real events have). ``FakeEvent.synchronize``
fails the test: the hooks must never wait for the device. The test at the bottom
runs the real ``torch.cuda.Event`` path and only runs where CUDA is available
(``bench/cuda_timer_check.py`` is the standalone version of it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import pytest
from test_hooks_recorder import FrameServer, delivered

from enginetime.engine_hooks import Recorder, StepKind, TimerSource, timers
from enginetime.engine_hooks.timers import CpuTimer, CudaEventTimer, cuda_available, make_timer

pytestmark = pytest.mark.timeout(60)


class FakeGpu:
    """One in-order device stream: launched work is 'done' only up to ``done_ns``."""

    def __init__(self) -> None:
        self.enqueued_ns = 0
        self.done_ns = 0
        self.capturing = False
        self.streams: list[object] = []
        self.device = 3  # the engine runs on cuda:3, not cuda:0
        self.bound: dict[int, tuple[str, int]] = {}  # thread id -> (thread name, device it set)
        self._lock = threading.Lock()

    def set_device(self, index: int) -> None:
        self.bound[threading.get_ident()] = (threading.current_thread().name, index)

    def check_bound(self) -> None:
        """A CUDA call from a thread that never set the engine's device would bind cuda:0."""
        if self.bound.get(threading.get_ident(), ("", -1))[1] != self.device:
            raise AssertionError("CUDA event read from a thread not bound to the engine's device")

    def launch(self, ns: int) -> None:
        with self._lock:
            self.enqueued_ns += ns

    def run_until(self, ns: int) -> None:
        with self._lock:
            self.done_ns = ns

    def run_all(self) -> None:
        self.run_until(self.enqueued_ns)


class FakeEvent:
    """Stand-in for torch.cuda.Event(enable_timing=True): record / query / elapsed_time."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.t: int | None = None

    def record(self, stream=None) -> None:
        self.t = self.gpu.enqueued_ns
        self.gpu.streams.append(stream)

    def query(self) -> bool:
        self.gpu.check_bound()
        return self.t is None or self.gpu.done_ns >= self.t

    def elapsed_time(self, end: FakeEvent) -> float:
        self.gpu.check_bound()
        if self.t is None or end.t is None:
            raise RuntimeError("event not recorded")
        if not (self.query() and end.query()):
            raise RuntimeError("cudaErrorNotReady")  # what CUDA says for an unfinished event
        return (end.t - self.t) / 1e6

    def synchronize(self) -> None:  # pragma: no cover - failing here is the point
        raise AssertionError("the hooks must never synchronize with the device")


def fake_timer(gpu: FakeGpu, device_name: str | None = "FakeGPU", **kw) -> CudaEventTimer:
    """A CUDA-event timer on the fake GPU (``device_name`` None: learnt at the first step)."""
    return CudaEventTimer(
        event_factory=lambda: FakeEvent(gpu),
        is_capturing=lambda: gpu.capturing,
        current_device=lambda: gpu.device,
        set_device=gpu.set_device,
        device_name=device_name,
        **kw,
    )


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(dir="/tmp", prefix="et-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def server(sockdir):
    srv = FrameServer.unix(sockdir).start()
    yield srv
    srv.stop()


def gpu_step(rec: Recorder, gpu: FakeGpu, ns: int, handles=(1,), stream=None) -> None:
    tok = rec.step_begin(stream)
    gpu.launch(ns)  # the forward pass, queued on the device
    n = len(handles)
    rec.step_end(
        tok,
        kind=StepKind.DECODE,
        handles=list(handles),
        prefill_tokens=[0] * n,
        decode_tokens=[1] * n,
        context_tokens=[10] * n,
    )


def test_pool_reuses_pairs_and_falls_back_at_its_cap():
    gpu = FakeGpu()
    timer = fake_timer(gpu, pool_cap=4, prealloc=2)
    assert (timer.allocated, timer.free) == (2, 2)
    pairs = []
    for _ in range(4):
        p = timer.begin("stream-a")
        gpu.launch(1_000)
        timer.end(p)
        pairs.append(p)
    assert timer.allocated == 4  # grew to the cap
    assert timer.begin() is None and timer.fallbacks == 1  # GPU far behind: CPU timing this step
    assert not timer.ready(pairs[0])
    gpu.run_all()
    assert all(timer.ready(p) for p in pairs)
    assert [timer.resolve(p) for p in pairs] == [1_000] * 4
    for p in pairs:
        timer.release(p)
    assert timer.free == 4
    again = timer.begin()
    assert again in pairs and timer.allocated == 4  # reused, not allocated
    assert gpu.streams[:2] == ["stream-a", "stream-a"]  # start and end went to the engine's stream


def engine_thread_passes(rec: Recorder) -> None:
    """What an engine does next anyway (begin a step; here abandoned, so it takes no seq).

    With the shipper in its own process, device times are read here, on the engine
    thread, when it passes a hook: CUDA events belong to the process that recorded them.
    """
    rec.step_abort(rec.step_begin())


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_cuda_steps_resolve_later_in_order_without_synchronize(server, shipper):
    gpu = FakeGpu()
    timer = fake_timer(gpu)
    with Recorder("eng-cuda", address=server.address, timer=timer, shipper=shipper) as rec:
        gpu_step(rec, gpu, 3_000_000, stream="engine-stream")
        gpu_step(rec, gpu, 7_000_000)
        gpu_step(rec, gpu, 11_000_000)
        # The GPU has finished nothing: the shipper must wait, not send and not block.
        assert rec.flush(0.2) is False
        assert server.of("step") == [] and server.of("hello")
        assert rec.stats().pending >= 3
        gpu.run_until(3_000_000)  # the first step is done on the device
        if shipper == "process":
            engine_thread_passes(rec)
        assert server.wait_for(lambda: len(server.of("step")) == 1)
        time.sleep(0.05)
        if shipper == "process":
            engine_thread_passes(rec)
        assert len(server.of("step")) == 1  # the others are still running
        gpu.run_all()
        assert delivered(rec, server)
        st = rec.stats()
    steps = server.of("step")
    assert [s.seq for s in steps] == [0, 1, 2]
    assert [s.device_time_ns for s in steps] == [3_000_000, 7_000_000, 11_000_000]
    assert all(s.timer_source == TimerSource.CUDA_EVENT for s in steps)
    assert st.timer_fallbacks == 0 and st.errors == 0
    assert timer.free == timer.allocated  # every pair went back to the pool
    if (
        shipper == "thread"
    ):  # the shipper thread, which reads the events, first bound itself to the engine's device
        assert ("enginetime-shipper", 3) in gpu.bound.values() and timer.device_index == 3
    hello = server.of("hello")[0]
    assert hello.clock.timer_source == TimerSource.CUDA_EVENT and hello.clock.device_name == "FakeGPU"
    assert gpu.streams[:2] == ["engine-stream", "engine-stream"]


def test_pool_exhaustion_falls_back_to_cpu_timing_and_keeps_order(server):
    gpu = FakeGpu()
    timer = fake_timer(gpu, pool_cap=3, prealloc=0)
    with Recorder("eng-cuda", address=server.address, timer=timer) as rec:
        for _ in range(8):
            gpu_step(rec, gpu, 1_000_000)
        assert rec.stats().timer_fallbacks == 5
        gpu.run_all()
        assert delivered(rec, server)
    steps = server.of("step")
    assert [s.seq for s in steps] == list(range(8))  # CPU-timed steps did not overtake the GPU ones
    assert [s.timer_source for s in steps] == [TimerSource.CUDA_EVENT] * 3 + [TimerSource.MONOTONIC] * 5
    assert all(s.device_time_ns == 1_000_000 for s in steps[:3])
    assert all(s.device_time_ns > 0 for s in steps[3:])


def test_step_abort_returns_the_pair():
    gpu = FakeGpu()
    timer = fake_timer(gpu, pool_cap=2, prealloc=0)
    rec = Recorder("eng-cuda", address="unix:/nonexistent/dir/x.sock", timer=timer, start=False)
    for _ in range(10):  # a forward that keeps raising: the adapter aborts each step
        rec.step_abort(rec.step_begin())
    assert timer.allocated == 1 and timer.free == 1 and rec.stats().timer_fallbacks == 0
    rec.step_abort("garbage")
    assert rec.stats().errors == 1
    rec.close()


def test_cuda_graph_capture_is_timed_on_the_cpu(server):
    gpu = FakeGpu()
    timer = fake_timer(gpu)
    with Recorder("eng-cuda", address=server.address, timer=timer) as rec:
        gpu.capturing = True
        gpu_step(rec, gpu, 1_000)
        gpu.capturing = False
        gpu_step(rec, gpu, 2_000)
        gpu.run_all()
        assert delivered(rec, server)
        assert rec.stats().timer_fallbacks == 1
    assert [s.timer_source for s in server.of("step")] == [TimerSource.MONOTONIC, TimerSource.CUDA_EVENT]
    assert gpu.streams == [None, None]  # nothing was recorded during the capture


def test_unreadable_event_time_falls_back_and_is_counted(server):
    gpu = FakeGpu()

    class BrokenEvent(FakeEvent):
        def elapsed_time(self, end):
            raise RuntimeError("events on different devices")

    timer = CudaEventTimer(
        event_factory=lambda: BrokenEvent(gpu),
        is_capturing=lambda: False,
        current_device=lambda: gpu.device,
        set_device=gpu.set_device,
        device_name="FakeGPU",
    )
    with Recorder("eng-cuda", address=server.address, timer=timer) as rec:
        gpu_step(rec, gpu, 5_000)
        gpu.run_all()
        assert delivered(rec, server)
        st = rec.stats()
    (step,) = server.of("step")
    assert step.timer_source == TimerSource.MONOTONIC and step.device_time_ns > 0
    assert st.timer_fallbacks == 1
    assert timer.free == timer.allocated


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_dropped_steps_give_their_event_pairs_back(sockdir, shipper):
    gpu = FakeGpu()
    timer = fake_timer(gpu, pool_cap=64, prealloc=0)
    # Nothing listens, the GPU is stalled, the ring holds 4: the oldest steps are dropped.
    rec = Recorder(
        "eng-cuda",
        address="unix:" + os.path.join(sockdir, "nobody.sock"),
        buffer_size=4,
        timer=timer,
        shipper=shipper,
    )
    try:
        for _ in range(200):
            gpu_step(rec, gpu, 1_000)
        st = rec.stats()
        assert st.timer_fallbacks == 0  # drops recycled their pairs: the pool never ran dry
        assert timer.allocated <= 8
        assert st.dropped_steps >= 195
        gpu.run_all()
        if shipper == "process":
            engine_thread_passes(rec)
        wait = time.monotonic() + 5
        while timer.free != timer.allocated and time.monotonic() < wait:
            time.sleep(0.01)
        assert timer.free == timer.allocated  # resolved while disconnected, pairs returned
        assert not rec.stats().connected
    finally:
        rec.close(0.1)


def test_cpu_timer_measures_the_step_on_the_engine_thread(server):
    with Recorder("eng-cpu", address=server.address, timer="cpu") as rec:
        tok = rec.step_begin()
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:  # 20 ms of real work on this thread
            pass
        rec.step_end(
            tok,
            kind=StepKind.PREFILL,
            handles=[1],
            prefill_tokens=[10],
            decode_tokens=[0],
            context_tokens=[0],
        )
        assert delivered(rec, server)
    (step,) = server.of("step")
    assert step.timer_source == TimerSource.MONOTONIC
    assert 20_000_000 <= step.device_time_ns <= step.end_time_ns - step.start_time_ns + 1_000_000


def test_make_timer_choices(caplog):
    caplog.set_level(logging.WARNING, logger="enginetime.engine_hooks")
    assert isinstance(make_timer("cpu"), CpuTimer)
    auto = make_timer("auto")
    assert isinstance(auto, CudaEventTimer if cuda_available() else CpuTimer)
    bogus = make_timer("gpu-please")
    assert isinstance(bogus, CpuTimer)
    assert "unknown timer 'gpu-please'" in caplog.text
    given = fake_timer(FakeGpu())
    assert make_timer(given) is given
    if not cuda_available():
        caplog.clear()
        assert isinstance(make_timer("cuda"), CpuTimer)
        assert "torch.cuda is not available" in caplog.text


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_real_cuda_events_time_real_matmuls(server):
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    for _ in range(3):  # warm up cuBLAS: the first matmul pays for its set-up
        a @ a
    torch.cuda.synchronize()  # the test's own setup, not the hooks
    with Recorder("eng-real-cuda", address=server.address, timer="cuda") as rec:
        assert isinstance(rec._timer, CudaEventTimer)
        for reps in (1, 4, 16):
            tok = rec.step_begin()
            for _ in range(reps):
                a @ a
            rec.step_end(
                tok,
                kind=StepKind.DECODE,
                handles=[1],
                prefill_tokens=[0],
                decode_tokens=[1],
                context_tokens=[1],
            )
        assert delivered(rec, server)
        st = rec.stats()
    steps = server.of("step")
    assert all(s.timer_source == TimerSource.CUDA_EVENT for s in steps) and st.timer_fallbacks == 0
    assert server.of("hello")[0].clock.device_name == torch.cuda.get_device_name()
    d = [s.device_time_ns for s in steps]
    assert 0 < d[0] < d[1] < d[2]
    assert 8 < d[2] / d[0] < 32  # 16 matmuls take about 16x one


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_device_name_learnt_at_the_first_step_is_in_every_later_hello(sockdir, monkeypatch, shipper):
    """The timer learns its device's name at the first step (CUDA initialised late); a
    reconnect after that says it in the hello, with the shipper in its own process too."""
    monkeypatch.setattr(timers, "_cuda_device_name", lambda index: f"FakeGPU-{index}")
    gpu = FakeGpu()
    gpu.device = 3
    timer = fake_timer(gpu, device_name=None)
    srv = FrameServer.unix(sockdir).start()
    try:
        with Recorder("eng-name", address=srv.address, timer=timer, shipper=shipper) as rec:
            assert srv.wait_for(lambda: srv.of("hello"))
            gpu_step(rec, gpu, 1_000_000)  # the first begin learns device 3's name
            gpu.run_all()
            engine_thread_passes(rec)
            assert delivered(rec, srv)
            srv.stop()  # the sidecar goes away and comes back: a new connection, a new hello
            srv = FrameServer.unix(sockdir).start()
            deadline = time.monotonic() + 10
            while not srv.of("hello") and time.monotonic() < deadline:  # its writes find the old one gone
                gpu_step(rec, gpu, 1_000_000)
                gpu.run_all()
                engine_thread_passes(rec)
                rec.flush(0.2)
            hello = srv.of("hello")[0]
    finally:
        srv.stop()
    assert hello.clock.device_name == "FakeGPU-3"
