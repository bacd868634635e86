"""Step timers: how a step's device time is measured without stalling the engine.

The engine thread calls ``begin``/``end`` around a forward pass; the shipper thread
later asks ``ready``/``resolve`` and hands the handle back with ``release``.

* ``CpuTimer``: the engine thread's monotonic clock (CPU engines, the testbed on
  CPU). It has no device handle: the recorder's own perf_counter_ns stamps are the
  measurement, so ``begin`` returns None and the other methods are never needed.
* ``CudaEventTimer``: a pool of ``torch.cuda.Event(enable_timing=True)`` pairs
  recorded on the engine's stream. Recording is asynchronous, so the engine thread
  never waits for the GPU; the shipper resolves a pair only once ``end.query()``
  says the GPU has passed it, then reads ``start.elapsed_time(end)``. Nothing here
  calls ``synchronize()``. When every pair is still in flight (the GPU is far
  behind) the pool grows up to a cap, then ``begin`` returns None: that step falls
  back to CPU timing and ``fallbacks`` counts it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .constants import TimerSource

log = logging.getLogger("enginetime.engine_hooks")


class CpuTimer:
    """Monotonic clock on the engine thread: the step's duration is its CPU wall span."""

    source = TimerSource.MONOTONIC
    device_name = "cpu"

    def __init__(self) -> None:
        self.fallbacks = 0

    def begin(self, stream: Any = None) -> None:
        """No device handle: the recorder's perf_counter_ns stamps are the measurement."""
        return None

    def end(self, handle: Any, stream: Any = None) -> None:  # pragma: no cover - never called with None
        return None

    def ready(self, handle: Any) -> bool:  # pragma: no cover
        return True

    def resolve(self, handle: Any) -> int | None:  # pragma: no cover
        return None

    def release(self, handle: Any) -> None:  # pragma: no cover
        return None


class EventPair:
    """A start/end event pair from the pool, plus the stream it was recorded on."""

    __slots__ = ("start", "end", "stream")

    def __init__(self, start: Any, end: Any) -> None:
        self.start = start
        self.end = end
        self.stream: Any = None


def _torch_event_factory() -> Callable[[], Any]:
    import torch  # lazily: the CPU path never imports torch

    def make() -> Any:
        return torch.cuda.Event(enable_timing=True)

    return make


def _torch_is_capturing() -> Callable[[], bool]:
    import torch

    return torch.cuda.is_current_stream_capturing


class CudaEventTimer:
    """Device time from CUDA event pairs, resolved off the engine thread.

    Device binding: any CUDA runtime call from a thread with no current device
    binds device 0 to that thread, which would create a second CUDA context (hundreds
    of MiB) on GPU 0 in a DP rank that runs on another GPU. So the engine thread's
    device is read on the first ``begin`` (where CUDA is certainly initialised), and
    the shipper thread sets that device for itself before it touches any event.
    Nothing CUDA is called at construction either, so a Recorder may be built before
    the engine initialises CUDA (or forks).

    ``event_factory``, ``is_capturing``, ``current_device`` and ``set_device`` exist so
    tests on machines without a GPU can drive the pooling, resolution and binding
    logic with stand-ins; by default they are ``torch.cuda.Event(enable_timing=True)``,
    ``torch.cuda.is_current_stream_capturing``, ``torch.cuda.current_device`` and
    ``torch.cuda.set_device``.
    """

    source = TimerSource.CUDA_EVENT

    def __init__(
        self,
        *,
        pool_cap: int = 1024,
        prealloc: int = 32,
        event_factory: Callable[[], Any] | None = None,
        is_capturing: Callable[[], bool] | None = None,
        current_device: Callable[[], int] | None = None,
        set_device: Callable[[int], None] | None = None,
        device_name: str | None = None,
    ) -> None:
        self._make_event = event_factory or _torch_event_factory()
        self._is_capturing = is_capturing if is_capturing is not None else _torch_is_capturing()
        self._current_device = current_device or _torch_attr("current_device")
        self._set_device = set_device or _torch_attr("set_device")
        self.pool_cap = max(1, int(pool_cap))
        # Free pairs. The engine thread pops, the shipper appends: both are atomic on a deque.
        self._free: deque[EventPair] = deque()
        self.allocated = 0
        self.fallbacks = 0  # steps timed on the CPU because no pair was free (engine thread)
        self.capture_skips = 0  # steps during CUDA-graph capture (engine thread)
        self.device_index: int | None = None  # the engine thread's device, read at the first begin
        self._bound_threads: set[int] = set()
        for _ in range(min(int(prealloc), self.pool_cap)):
            self._free.append(self._new_pair())  # torch creates the CUDA event lazily, at record
        self._name_given = device_name is not None
        self.device_name = device_name if device_name is not None else _initialised_device_name()
        #: Called (on the engine thread, once) when the first begin learns the device's name.
        self.on_device: Callable[[], None] | None = None

    def _new_pair(self) -> EventPair:
        self.allocated += 1
        return EventPair(self._make_event(), self._make_event())

    @property
    def free(self) -> int:
        return len(self._free)

    def begin(self, stream: Any = None) -> EventPair | None:
        """Record a start event on ``stream`` (the current stream if None).

        Returns None when the step must be timed on the CPU instead: every pair is
        in flight and the pool is at its cap, or a CUDA graph is being captured
        (a timing event recorded into a capture would break it).
        """
        if self.device_index is None:
            self._learn_device(stream)
        if self._is_capturing():
            self.capture_skips += 1
            return None
        try:
            pair = self._free.pop()
        except IndexError:
            if self.allocated >= self.pool_cap:
                self.fallbacks += 1
                return None
            pair = self._new_pair()
        pair.stream = stream
        try:
            pair.start.record(stream)
        except Exception:
            self._free.append(pair)
            raise
        return pair

    def _learn_device(self, stream: Any) -> None:
        """Once, on the engine thread: which device do the steps run on, and its name."""
        index = getattr(getattr(stream, "device", None), "index", None)
        self.device_index = int(index) if index is not None else int(self._current_device())
        if not self._name_given:
            self.device_name = _cuda_device_name(self.device_index)
            if self.on_device is not None:
                self.on_device()

    def _bind_thread(self) -> None:
        ident = threading.get_ident()
        if ident not in self._bound_threads and self.device_index is not None:
            self._set_device(self.device_index)
            self._bound_threads.add(ident)

    def end(self, pair: EventPair, stream: Any = None) -> None:
        """Record the end event on the stream the start went to (or ``stream``)."""
        pair.end.record(stream if stream is not None else pair.stream)

    def ready(self, pair: EventPair) -> bool:
        """Has the GPU passed the end event? Never blocks."""
        self._bind_thread()
        return bool(pair.end.query())

    def resolve(self, pair: EventPair) -> int | None:
        """Elapsed device time in ns; call only after ``ready``. None if CUDA refuses."""
        try:
            self._bind_thread()
            ms = pair.start.elapsed_time(pair.end)
        except Exception as exc:  # e.g. events recorded on different devices
            log.debug("enginetime: cannot read CUDA event time: %s", exc)
            return None
        return max(0, int(round(ms * 1_000_000)))

    def release(self, pair: EventPair) -> None:
        """Return a pair to the pool (shipper thread, or the engine thread on a drop)."""
        pair.stream = None
        self._free.append(pair)


def _torch_attr(name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        import torch

        return getattr(torch.cuda, name)(*args)

    return call


def _cuda_device_name(index: int) -> str:
    try:
        import torch

        return str(torch.cuda.get_device_name(index))
    except Exception:
        return "cuda"


def _initialised_device_name() -> str:
    """The current device's name if this process already initialised CUDA, else "cuda"."""
    try:
        import torch

        if torch.cuda.is_initialized():
            return _cuda_device_name(torch.cuda.current_device())
    except Exception:
        pass
    return "cuda"


def cuda_available() -> bool:
    """torch importable and a CUDA device present (never raises)."""
    try:
        import torch
    except Exception:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


Timer = CpuTimer | CudaEventTimer


def make_timer(kind: str | Timer = "auto", **cuda_options: Any) -> Timer:
    """Build the timer a recorder should use.

    A timer object (``CpuTimer``/``CudaEventTimer``, e.g. one with a custom pool cap)
    is returned as it is. ``"auto"``: CUDA events when torch is importable and ``torch.cuda.is_available()``,
    else the CPU clock. ``"cuda"`` on a machine without CUDA logs a warning and falls
    back to the CPU clock rather than failing the engine. Anything else is an error
    that is logged, not raised (hooks never raise into the engine).
    """
    if isinstance(kind, CpuTimer | CudaEventTimer):
        return kind
    choice = str(kind).strip().lower()
    if choice not in ("auto", "cpu", "cuda"):
        log.error("enginetime: unknown timer %r (use 'auto', 'cpu' or 'cuda'); timing steps on the CPU", kind)
        return CpuTimer()
    if choice == "cpu":
        return CpuTimer()
    if not cuda_available():
        if choice == "cuda":
            log.warning(
                "enginetime: timer='cuda' but torch.cuda is not available in this process; "
                "timing steps with the CPU monotonic clock instead"
            )
        return CpuTimer()
    try:
        return CudaEventTimer(**cuda_options)
    except Exception as exc:
        log.warning("enginetime: cannot set up CUDA event timing (%s); timing steps on the CPU", exc)
        return CpuTimer()
