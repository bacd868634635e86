"""Recorder: the per-shard API an engine adapter calls.

One Recorder per shard (scheduler loop). Request events may come from any thread
(HTTP handlers, the scheduler); steps come from the engine thread. Every public
method is cheap and catches everything: a bug or bad argument is counted in
``stats().errors`` and logged once per kind, never raised into the engine. The
engine thread's part of a step is two clock reads, maybe a CUDA event record, the
step encoded into one ``bytes`` (its columns copied once: the copy it must make
anyway), a tuple and a deque append. The shipper thread only batches and writes
frames (and appends a CUDA step's device time once its events resolve): a thread of
ours in the engine's process takes the GIL from the engine thread whenever it runs
Python, so it is given as little Python to run as possible.

Typical use in an adapter::

    rec = Recorder("engine-0", shard=rank, num_shards=dp, coupling="lockstep", engine_kind="sglang")
    h = rec.request_arrived(rid, prompt_tokens=len(ids))       # keep h with the request
    tok = rec.step_begin()                                      # before the forward
    ...forward...
    rec.step_end(tok, kind=StepKind.DECODE, handles=[...], prefill_tokens=[...],
                 decode_tokens=[...], context_tokens=[...], global_step=forward_ct)
    rec.request_finished(h, reason="stop", output_tokens=n)

Columns passed to ``step_end`` are encoded before it returns (lists and
``array('I')`` are fastest), so the caller may reuse its buffers.
"""

from __future__ import annotations

import atexit
import logging
import os
import struct
import threading
import time
import weakref
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import shm_ring, wire
from .constants import (
    HOOKS_VERSION,
    PROTOCOL_VERSION,
    SHIPPER_ENV,
    TLS_CA_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    Coupling,
    EventKind,
    StepKind,
    TimerSource,
    ingest_address,
    parse_address,
)
from .ring_transport import ProcessShipper
from .shipper import EVENT, REPEAT, STEP, STEP_OVERHEAD, ErrorLog, LiveRequest, Shipper
from .timers import CpuTimer, CudaEventTimer, make_timer

log = logging.getLogger("enginetime.engine_hooks")

_U32_MAX = 0xFFFFFFFF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_LIVE_WARN = 100_000

_MONOTONIC = int(TimerSource.MONOTONIC)
_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_U32 = wire.U32
_BIG_ENDIAN = wire.BIG_ENDIAN
_pack_header = wire.PACKED_HEADER.pack
_HEADER_SIZE = wire.PACKED_HEADER.size
_PREFIXES = wire._PACKED_PREFIXES
_REPEAT_FLAG = wire.PACKED_REPEAT
_REPEAT_RECORD = shm_ring.REPEAT


@dataclass(slots=True)
class RecorderStats:
    """A snapshot of a recorder's health (cumulative since it started)."""

    connected: bool
    sent_frames: int  # every frame written: hello, events, steps, heartbeats, replays
    dropped_frames: int  # dropped_steps + dropped_events
    dropped_steps: int  # lost to a full buffer, an outage, or invalid input
    dropped_events: int
    reconnects: int  # successful connections after the first
    pending: int  # items not yet written (ring + encoded backlog + in-flight batch)
    shipper_cpu_ns: int  # CPU time of the shipper thread (time.thread_time_ns)
    timer_fallbacks: int  # steps that wanted CUDA timing but were timed on the CPU
    errors: int  # bad arguments / internal failures (each kind logged once)
    steps: int = 0  # step_end and step_repeat calls
    repeat_steps: int = 0  # of them, recorded as repeats (no columns; the shipper expands them)
    live_requests: int = 0  # arrived, not yet finished/aborted
    address: str = ""
    shipper: str = "thread"  # where the shipping runs: "process" (its own) or "thread" (the engine's)
    shipper_pid: int | None = None  # the shipper process, when there is one
    shipper_restarts: int = 0  # shipper processes started again after one died


class Recorder:
    """Records one shard's request events and steps and ships them to the sidecar.

    Construction never raises: a bad address, coupling or timer is logged (ERROR)
    and the recorder keeps working as far as it can (with a bad address it records
    nothing and counts every step as dropped).

    ``address``: ``unix:PATH`` or ``tcp:HOST:PORT``; default $ENGINETIME_INGEST, else
    ``unix:/tmp/enginetime-<uid>/ingest.sock``. ``timer``: "auto" (CUDA events when torch
    sees a GPU, else the CPU clock; an engine whose forward runs on the CPU in a
    process that can see a GPU must say "cpu"), "cpu", "cuda", or a timer object.
    ``buffer_size`` (items, each) and ``buffer_bytes`` (memory, default 64 MiB, half
    each) bound the ring the engine thread appends to and the shipper's backlog of
    frames; beyond them the oldest records are dropped and counted. ``token`` (TCP ingest's
    shared secret) defaults to the contents of $ENGINETIME_TOKEN_FILE, else
    $ENGINETIME_TOKEN; ``tls_ca`` (a CA bundle: TCP ingest over TLS) to
    $ENGINETIME_TLS_CA. ``seq`` starts at 0 and every ``step_end`` call takes one, so a
    step that could not be recorded shows to the sidecar as a gap.

    ``shipper`` (default $ENGINETIME_SHIPPER, else "auto"): where the socket work runs.
    "process" (what "auto" picks where ``os.memfd_create`` exists, i.e. Linux): the engine's
    threads copy records into a shared-memory ring read by a small shipper process this
    recorder spawns, so no thread of ours runs in the engine's interpreter; "thread": a
    daemon thread in the engine process (the only choice elsewhere, and the fallback when
    the process cannot be started).
    """

    def __init__(
        self,
        engine_id: str,
        shard: int = 0,
        num_shards: int = 1,
        coupling: Coupling | str | int = "independent",
        *,
        address: str | None = None,
        engine_kind: str = "unknown",
        engine_version: str = "",
        buffer_size: int = 65536,
        buffer_bytes: int = 64 << 20,
        timer: str | CpuTimer | CudaEventTimer = "auto",
        heartbeat_interval_s: float = 1.0,
        start: bool = True,
        token: str | None = None,
        tls_ca: str | None = None,
        shipper: str | None = None,
    ) -> None:
        # Safe defaults first: whatever fails below, every method still works.
        self._errors = ErrorLog()
        self._lock = threading.Lock()
        self._by_handle: dict[int, LiveRequest] = {}
        self._by_id: dict[str, LiveRequest] = {}
        self._next_handle = 1  # 0 is "no handle" (the proto3 default)
        self._seq = 0
        # The last step recorded whole, which step_repeat may repeat: its seq, entries, and
        # the shipper's chain mark when it was written (a step lost since then breaks the chain).
        self._base_seq = -1
        self._base_n = 0
        self._base_mark = -1
        self._repeats = 0
        self._closed = False
        self._enabled = False
        self._cuda = False
        self._timer: Any = CpuTimer()
        self._live_warned = False
        self._ps: ProcessShipper | None = None
        self.engine_id = str(engine_id)
        self.shard = 0
        self.num_shards = 1
        self.coupling = Coupling.UNSPECIFIED
        self.engine_kind = str(engine_kind)
        self.engine_version = str(engine_version)
        self.epoch = (int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)) | 1
        self.address = ""
        self._token = ""
        tls = None
        tls_ca_path = ""
        target = None
        try:
            self.shard = self._u32("shard", shard)
            self.num_shards = max(1, self._u32("num_shards", num_shards))
            if self.shard >= self.num_shards:
                self._errors.report(
                    "shard out of range",
                    f"shard={self.shard} but num_shards={self.num_shards}",
                    level=logging.ERROR,
                )
            try:
                self.coupling = Coupling.parse(coupling)
            except ValueError as exc:
                self._errors.report(
                    "bad coupling", f"{exc}; reporting COUPLING_UNSPECIFIED", level=logging.ERROR
                )
            self.address = ingest_address(address)
            try:
                target = parse_address(self.address)
            except ValueError as exc:
                self._errors.report(
                    "cannot use the ingest address",
                    f"{exc}. This recorder will send nothing (steps are counted as dropped); pass "
                    "address='unix:/path/ingest.sock' or set ENGINETIME_INGEST to the sidecar's --ingest",
                    level=logging.ERROR,
                )
            if target is not None:
                self._token = self._read_token(token)
                if target[0] == "tcp":
                    tls_ca_path = tls_ca if tls_ca is not None else os.environ.get(TLS_CA_ENV, "")
                    tls = self._tls_context(tls_ca_path)
                self._timer = make_timer(timer)
        except Exception as exc:
            self._errors.report("Recorder setup", exc, level=logging.ERROR)
            target = None
        self._cuda = target is not None and not isinstance(self._timer, CpuTimer)
        self._target = target
        self._tls = tls
        self._buffer_size = buffer_size
        self._buffer_bytes = buffer_bytes
        self._heartbeat_s = heartbeat_interval_s
        if target is not None and self._shipper_mode(shipper) == "process":
            try:
                self._ps = ProcessShipper(
                    address=self.address,
                    hello_fields=self._hello_fields,
                    live=self._live_snapshot,
                    timer=self._timer,
                    errors=self._errors,
                    capacity=buffer_size,
                    backlog_bytes=buffer_bytes,
                    heartbeat_interval_s=heartbeat_interval_s,
                    tls_ca=tls_ca_path,
                )
            except Exception as exc:
                self._errors.report(
                    "cannot set up the shipper process",
                    f"{exc}; shipping from a thread in this process instead",
                )
        self._shipper: Any = self._ps
        if self._ps is not None and hasattr(self._timer, "on_device"):
            # The hello's device name is learnt at the first step: the shipper process holds the
            # hello's fields for its reconnects, so it is told (the thread reads them each time).
            self._timer.on_device = self._refresh_hello
        self._ring: deque[tuple] = deque()  # the thread shipper's ring; unused with the process
        self._cap = self._cap_bytes = 0
        if self._ps is None:
            self._use_thread_shipper()
        self._enabled = target is not None
        _RECORDERS.add(self)
        if start:
            self.start()

    def _shipper_mode(self, requested: str | None) -> str:
        mode = (requested if requested is not None else os.environ.get(SHIPPER_ENV, "")).strip().lower()
        if mode not in ("", "auto", "process", "thread"):
            self._errors.report(
                "bad shipper choice",
                f"shipper={mode!r} (or ${SHIPPER_ENV}): use 'process', 'thread' or 'auto'; using 'auto'",
                level=logging.ERROR,
            )
            mode = "auto"
        if mode == "thread":
            return "thread"
        if hasattr(os, "memfd_create"):
            return "process"
        if mode == "process":
            self._errors.report(
                "no shipper process here",
                "this OS has no os.memfd_create (Linux only); shipping from a thread instead",
            )
        return "thread"

    def _use_thread_shipper(self) -> None:
        """Ship from a thread in this process: no process shipper here, or it could not start."""
        self._ps = None
        self._shipper = sh = Shipper(
            address=self.address,
            target=self._target,
            hello=self._hello_frame,
            live=self._live_snapshot,
            timer=self._timer,
            errors=self._errors,
            capacity=self._buffer_size,
            backlog_bytes=self._buffer_bytes,
            heartbeat_interval_s=self._heartbeat_s,
            tls=self._tls,
        )
        self._ring = sh.ring
        self._cap = sh.capacity
        self._cap_bytes = sh.ring_bytes_cap

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the shipper process or thread (done by the constructor unless start=False)."""
        try:
            if self._enabled and not self._closed:
                self._shipper.start()
        except Exception as exc:
            if self._ps is None:
                self._errors.report("start shipper thread", exc, level=logging.ERROR)
                return
            self._errors.report(
                "cannot start the shipper process", f"{exc}; shipping from a thread in this process instead"
            )
            self._use_thread_shipper()
            self.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written to the socket (tests, shutdown).

        True when it was; False on timeout, with no connection, or when part of it was
        dropped. Never call this from the engine loop.
        """
        try:
            return self._shipper.flush(float(timeout_s))
        except Exception as exc:
            self._errors.report("flush", exc)
            return False

    def close(self, timeout_s: float = 1.0) -> None:
        """Best-effort flush, then stop the shipper thread. Idempotent."""
        try:
            if self._closed:
                return
            deadline = time.monotonic() + max(0.0, float(timeout_s))
            if self._shipper.running:
                self._shipper.flush(max(0.0, deadline - time.monotonic()))
            self._closed = True
            self._enabled = False
            self._shipper.stop(max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            self._errors.report("close", exc)
        finally:
            _RECORDERS.discard(self)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> RecorderStats:
        try:
            sh = self._shipper
            ps = self._ps
            steps, events = ps.dropped() if ps is not None else (sh.dropped_steps, sh.dropped_events)
            timer = self._timer
            fallbacks = getattr(timer, "fallbacks", 0) + getattr(timer, "capture_skips", 0)
            return RecorderStats(
                connected=sh.connected,
                sent_frames=sh.sent_frames,
                dropped_frames=steps + events,
                dropped_steps=steps,
                dropped_events=events,
                reconnects=sh.reconnects,
                pending=sh.pending,
                shipper_cpu_ns=sh.cpu_ns,
                timer_fallbacks=fallbacks + sh.resolve_fallbacks,
                errors=self._errors.count,
                steps=self._seq,
                live_requests=len(self._by_handle),
                address=self.address,
                shipper="process" if ps is not None else "thread",
                shipper_pid=None if ps is None else ps.pid,
                shipper_restarts=0 if ps is None else ps.restarts,
                repeat_steps=self._repeats,
            )
        except Exception as exc:  # pragma: no cover - defensive
            self._errors.report("stats", exc)
            return RecorderStats(False, 0, 0, 0, 0, 0, 0, 0, 0, self._errors.count)

    # ------------------------------------------------------------------ steps (engine thread)

    def step_begin(self, stream: Any = None) -> tuple[int, int, Any]:
        """Mark the start of a forward pass; returns a token for ``step_end``.

        With CUDA timing, records a start event on ``stream`` (the current stream if
        None) — asynchronous, the GPU is not waited for.
        """
        wall = _wall_ns()
        perf = _perf_ns()
        dev = None
        if self._cuda:
            ps = self._ps
            if ps is not None and ps._pending:
                ps.service()  # earlier steps whose CUDA events have completed go out now
            try:
                dev = self._timer.begin(stream)
            except Exception as exc:
                self._errors.report("CUDA start event", exc)
        return (wall, perf, dev)

    def step_end(
        self,
        token: Any,
        *,
        kind: StepKind | int,
        handles: Any,
        prefill_tokens: Any,
        decode_tokens: Any,
        context_tokens: Any,
        global_step: int | None = None,
        peer_tokens: Any = None,
    ) -> None:
        """Mark the end of the forward pass begun with ``token`` and record its batch.

        Columns hold one int per entry (request) and must be equally long; a step whose
        columns differ is dropped and counted, never raised. ``prefill_tokens`` and
        ``decode_tokens`` may instead be one int, every entry's value (a decode batch: 0
        and 1): the adapter then builds two lists per step instead of four, which is half
        of its share of the engine thread's hook time. ``peer_tokens`` (indexed by shard)
        may have any length.
        """
        perf = _perf_ns()
        wall = _wall_ns()
        seq = self._seq
        self._seq = seq + 1  # every call takes a seq: a lost step shows as a gap
        dev = None
        try:
            if len(token) == 5:  # stopped by step_stop: the clock already ended there
                start_wall, start_perf, dev, wall, perf = token
            else:
                start_wall, start_perf, dev = token
                if dev is not None:
                    self._timer.end(dev)
            if not self._enabled:
                self._lost_step(dev, None, None)
                return
            n = len(handles)
            if type(prefill_tokens) is int:
                prefill_tokens = [prefill_tokens] * n  # C speed; range-checked with the rest
            if type(decode_tokens) is int:
                decode_tokens = [decode_tokens] * n
            if len(prefill_tokens) != n or len(decode_tokens) != n or len(context_tokens) != n:
                self._lost_step(
                    dev,
                    "step columns of unequal length",
                    (
                        f"handles={n} prefill_tokens={len(prefill_tokens)} "
                        f"decode_tokens={len(decode_tokens)} context_tokens={len(context_tokens)}; "
                        "every column needs one value per request"
                    ),
                )
                return
            try:
                if (
                    type(handles) is list
                    and type(prefill_tokens) is list
                    and type(decode_tokens) is list
                    and type(context_tokens) is list
                    and not _BIG_ENDIAN
                ):
                    # The common case in C: one array of all four columns, no per-request Python.
                    cols: Any = array(_U32)
                    put = cols.fromlist
                    put(handles)
                    put(prefill_tokens)
                    put(decode_tokens)
                    put(context_tokens)
                else:
                    u32 = wire.u32_column
                    cols = b"".join(
                        (u32(handles), u32(prefill_tokens), u32(decode_tokens), u32(context_tokens))
                    )
                peer: Any = b"" if peer_tokens is None else wire.u32_column(peer_tokens)
                n_peer = len(peer)
                head = _pack_header(
                    1,
                    0 if global_step is None else 1,
                    0,
                    kind,
                    n,
                    n_peer,
                    seq,
                    0 if global_step is None else global_step,
                    start_wall,
                    wall,
                    0 if dev is not None else perf - start_perf,
                    0 if dev is not None else _MONOTONIC,
                )
                size = _HEADER_SIZE + 16 * n + 4 * n_peer
                if dev is None:
                    prefix = _PREFIXES.get(size) or wire.packed_prefix(size)
                    payload = b"".join((prefix, head, cols, peer))
                else:  # the shipper fills in the device time once the CUDA events resolve
                    payload = b"".join((head, cols, peer))
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                self._lost_step(dev, "invalid step record dropped", exc)
                return
            ps = self._ps
            if ps is not None:  # taken before: a refusal of this very step moves it
                mark = ps.chain_mark()
                ps.put_step(dev, payload, perf - start_perf, perf)
            else:  # the append drops the oldest items, never this one: the mark is taken after it
                self._put_thread((STEP, seq, dev, payload, perf - start_perf))
                mark = self._shipper.chain_mark()
            self._base_seq = seq
            self._base_n = n
            self._base_mark = mark
        except Exception as exc:
            self._lost_step(dev, "bad step_end arguments", exc)

    def _put_thread(self, item: tuple) -> None:
        """Append a step item to the thread shipper's ring, dropping the oldest when full."""
        ring = self._ring
        sh = self._shipper
        size = STEP_OVERHEAD + len(item[3])
        while ring and (len(ring) >= self._cap or sh.ring_bytes + size > self._cap_bytes):
            sh.overflow()
        sh.add_ring_bytes(size)
        ring.append(item)

    def step_repeat(
        self,
        token: Any,
        *,
        decode_tokens: int = 1,
        kind: StepKind | int = StepKind.DECODE,
        global_step: int | None = None,
        peer_tokens: Any = None,
    ) -> bool:
        """Record the step begun with ``token`` as its predecessor's batch, decoding again.

        For the steady decode step, where nothing in the batch changed: the same requests
        in the same order as this recorder's previous step, each prefilling nothing and
        decoding ``decode_tokens``, each context grown by what the previous step computed.
        The engine thread then builds no column and writes a fixed-size record; the
        shipper expands it into the full step before it reaches the sidecar, so what the
        sidecar sees is exactly what ``step_end`` with the columns would have sent.

        Returns False, having recorded nothing and left ``token`` for ``step_end``, when
        the previous step was not recorded whole (none yet, dropped, or a shipper that may
        have lost it): the caller then records the step with ``step_end``. Otherwise True,
        including when the step itself could not be recorded (counted, as ``step_end``).
        Never raises.
        """
        try:
            if self._base_seq != self._seq - 1 or not self._enabled:
                return False
            if (
                self._shipper.chain_mark() != self._base_mark
                or type(decode_tokens) is not int
                or not 0 <= decode_tokens <= 0xFFFF
            ):
                return False
        except Exception:
            return False
        perf = _perf_ns()
        wall = _wall_ns()
        seq = self._seq
        self._seq = seq + 1
        dev = None
        try:
            if len(token) == 5:
                start_wall, start_perf, dev, wall, perf = token
            else:
                start_wall, start_perf, dev = token
                if dev is not None:
                    self._timer.end(dev)
            try:
                peer: Any = b"" if peer_tokens is None else wire.u32_column(peer_tokens)
                n_peer = len(peer)
                head = _pack_header(
                    1,
                    (0 if global_step is None else 1) | _REPEAT_FLAG,
                    decode_tokens,
                    kind,
                    self._base_n,
                    n_peer,
                    seq,
                    0 if global_step is None else global_step,
                    start_wall,
                    wall,
                    0 if dev is not None else perf - start_perf,
                    0 if dev is not None else _MONOTONIC,
                )
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                self._lost_step(dev, "invalid step record dropped", exc)
                return True
            body = head + peer if n_peer else head
            ps = self._ps
            if ps is not None:
                ps.put_step(dev, body, perf - start_perf, perf, _REPEAT_RECORD)
            else:
                self._put_thread((REPEAT, seq, dev, body, perf - start_perf))
            self._base_seq = seq
            self._repeats += 1
        except Exception as exc:
            self._lost_step(dev, "bad step_repeat arguments", exc)
        return True

    def record_step(
        self,
        *,
        start_ns: int,
        end_ns: int,
        device_ns: int | None = None,
        kind: StepKind | int,
        handles: Any,
        prefill_tokens: Any,
        decode_tokens: Any,
        context_tokens: Any,
        global_step: int | None = None,
        peer_tokens: Any = None,
    ) -> None:
        """Record a step that was timed elsewhere: the replay entry point.

        For simulators, replays of engine logs and tests. ``start_ns``/``end_ns`` are
        ``time.time_ns()``-based wall stamps; ``device_ns`` is the step's device time
        (default ``end_ns - start_ns``). Columns as in ``step_end``. Takes a seq like
        ``step_end``; never raises (bad stamps are counted as a lost step).
        """
        try:
            start = int(start_ns)
            end = int(end_ns)
            dev = end - start if device_ns is None else int(device_ns)
            if not (_I64_MIN <= start <= _I64_MAX and _I64_MIN <= end <= _I64_MAX) or dev < 0:
                raise ValueError(
                    f"start_ns={start_ns!r} end_ns={end_ns!r} device_ns={device_ns!r}: need int64 "
                    "time.time_ns() stamps and a device time >= 0"
                )
            token = (start, 0, None, end, dev)
        except Exception as exc:
            self._seq += 1  # a step that could not be recorded still shows as a gap
            self._lost_step(None, "bad record_step stamps", exc)
            return
        self.step_end(
            token,
            kind=kind,
            handles=handles,
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            context_tokens=context_tokens,
            global_step=global_step,
            peer_tokens=peer_tokens,
        )

    def step_stop(self, token: Any, stream: Any = None) -> tuple[int, int, Any, int, int]:
        """Stop a step's clock now and record its batch later with ``step_end``.

        For engines where the forward's end and the knowledge of its batch are in
        different places (vLLM under async scheduling: the worker knows when the
        forward ends, the scheduler learns what it did one step later). Records the
        CUDA end event on ``stream`` (the start's stream if None) and takes the end
        stamps; returns a stopped token ``(start_wall, start_perf, device, end_wall,
        end_perf)``. ``step_end`` given a stopped token keeps these stamps. An adapter
        that measured a step some other way may build such a token itself (device
        None, the four stamps from ``time.time_ns``/``time.perf_counter_ns``).
        """
        perf = _perf_ns()
        wall = _wall_ns()
        try:
            start_wall, start_perf, dev = token
            if dev is not None:
                try:
                    self._timer.end(dev, stream)
                except Exception as exc:
                    self._errors.report("CUDA end event", exc)
                    self._timer.release(dev)
                    dev = None
            return (start_wall, start_perf, dev, wall, perf)
        except Exception as exc:
            self._errors.report("bad step_stop token", exc)
            return (wall, perf, None, wall, perf)

    def step_abort(self, token: Any) -> None:
        """Forget a step begun with ``step_begin`` whose forward raised.

        Gives its CUDA event pair back to the pool (a token that never reaches
        ``step_end`` or ``step_abort`` keeps its pair forever). Takes no seq.
        """
        try:
            dev = token[2]
            if dev is not None:
                self._timer.release(dev)
        except Exception as exc:
            self._errors.report("bad step_abort token", exc)

    def _lost_step(self, dev: Any, kind: str | None, detail: object) -> None:
        try:
            if dev is not None:
                self._timer.release(dev)
            if not self._closed:
                self._shipper.count_dropped(steps=1)
            if kind is not None:
                self._errors.report(kind, detail)
        except Exception:  # pragma: no cover - defensive
            pass

    # ------------------------------------------------------------------ request events (any thread)

    def request_arrived(
        self,
        request_id: str,
        *,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        session_id: str = "",
        traceparent: str = "",
        routed_shard: int | None = None,
        time_ns: int | None = None,
    ) -> int:
        """Intern ``request_id`` and report its arrival; returns its handle (0 on failure).

        Calling it again for a request that is still live returns the same handle and
        reports nothing new.
        """
        try:
            rid = request_id if type(request_id) is str else str(request_id)
            info = self._by_id.get(rid)
            if info is not None:
                return info.handle
            t = self._time("request_arrived", time_ns)
            prompt = self._u32("prompt_tokens", prompt_tokens)
            cached = self._u32("cached_tokens", cached_tokens)
            routed = None if routed_shard is None else self._u32("routed_shard", routed_shard)
            session = self._text("session_id", session_id)
            trace = self._text("traceparent", traceparent)
            with self._lock:
                info = self._by_id.get(rid)
                if info is not None:
                    return info.handle
                handle = self._new_handle()
                info = LiveRequest(handle, rid, t, prompt, cached, session, trace, routed)
                self._by_id[rid] = info
                self._by_handle[handle] = info
                live = len(self._by_handle)
            if live > _LIVE_WARN and not self._live_warned:
                self._live_warned = True
                self._errors.report(
                    "many live requests",
                    (
                        f"{live} requests arrived without FINISHED/ABORTED; is the adapter calling "
                        "request_finished/request_aborted?"
                    ),
                )
            self._push_event(info, EventKind.ARRIVED, t)
            return handle
        except Exception as exc:
            self._errors.report("bad request_arrived arguments", exc)
            return 0

    def request_scheduled(
        self, h: int, *, cached_tokens: int | None = None, time_ns: int | None = None
    ) -> None:
        """The request entered the running batch (admitted); ``cached_tokens`` if known now."""
        try:
            info = self._lookup(h, "request_scheduled")
            if info is not None:
                cached = None if cached_tokens is None else self._u32("cached_tokens", cached_tokens)
                self._push_event(info, EventKind.SCHEDULED, self._time("request_scheduled", time_ns), cached)
        except Exception as exc:
            self._errors.report("bad request_scheduled arguments", exc)

    def request_preempted(self, h: int, *, time_ns: int | None = None) -> None:
        """The request was taken out of the running batch (its KV cache evicted or kept)."""
        self._simple_event(h, EventKind.PREEMPTED, time_ns, "request_preempted")

    def request_resumed(self, h: int, *, time_ns: int | None = None) -> None:
        """A preempted request is running again."""
        self._simple_event(h, EventKind.RESUMED, time_ns, "request_resumed")

    def request_finished(
        self, h: int, *, reason: str = "stop", output_tokens: int = 0, time_ns: int | None = None
    ) -> None:
        """The request completed; forgets its handle."""
        self._terminal(h, EventKind.FINISHED, reason, output_tokens, time_ns, "request_finished")

    def request_aborted(
        self, h: int, *, reason: str = "abort", output_tokens: int = 0, time_ns: int | None = None
    ) -> None:
        """The request was cancelled (client gone, /abort_request, error); forgets its handle."""
        self._terminal(h, EventKind.ABORTED, reason, output_tokens, time_ns, "request_aborted")

    # ------------------------------------------------------------------ internals

    def _simple_event(self, h: Any, kind: EventKind, time_ns: Any, method: str) -> None:
        try:
            info = self._lookup(h, method)
            if info is not None:
                self._push_event(info, kind, self._time(method, time_ns))
        except Exception as exc:
            self._errors.report(f"bad {method} arguments", exc)

    def _terminal(
        self, h: Any, kind: EventKind, reason: Any, output_tokens: Any, time_ns: Any, method: str
    ) -> None:
        try:
            t = self._time(method, time_ns)
            out = self._u32("output_tokens", output_tokens)
            why = self._text("reason", reason)
            with self._lock:
                info = self._by_handle.pop(h, None)
                if info is not None:
                    info.live = False
                    if self._by_id.get(info.request_id) is info:
                        del self._by_id[info.request_id]
            if info is None:
                self._unknown_handle(h, method)
                return
            self._push_event(info, kind, t, None, why, out)
        except Exception as exc:
            self._errors.report(f"bad {method} arguments", exc)

    def _lookup(self, h: Any, method: str) -> LiveRequest | None:
        info = self._by_handle.get(h)
        if info is None:
            self._unknown_handle(h, method)
        return info

    def _unknown_handle(self, h: Any, method: str) -> None:
        self._errors.report(
            f"{method}: unknown handle",
            (
                f"handle {h!r} is not a live request of this recorder (use the int returned by "
                "request_arrived; events after FINISHED/ABORTED are ignored)"
            ),
        )

    def _push_event(
        self,
        info: LiveRequest,
        kind: EventKind,
        t: int,
        cached: int | None = None,
        reason: str = "",
        output: int = 0,
    ) -> None:
        if not self._enabled:
            if not self._closed:
                self._shipper.count_dropped(events=1)
            return
        self._shipper.push((EVENT, info, kind, t, cached, reason, output))

    def _new_handle(self) -> int:
        """Next free handle (caller holds the lock). Wraps at 2**32-1, skipping live ones."""
        handle = self._next_handle
        while handle in self._by_handle:
            handle = handle % _U32_MAX + 1
        self._next_handle = handle % _U32_MAX + 1
        return handle

    def _u32(self, name: str, value: Any) -> int:
        """An int in uint32 range; garbage becomes 0, out-of-range is clamped (both counted)."""
        try:
            v = int(value)
        except (TypeError, ValueError, OverflowError):
            self._errors.report(f"{name} is not an int", f"{name}={value!r}; using 0")
            return 0
        if 0 <= v <= _U32_MAX:
            return v
        self._errors.report(f"{name} out of range", f"{name}={v} is outside 0..{_U32_MAX}; clamped")
        return min(max(v, 0), _U32_MAX)

    def _time(self, method: str, value: Any) -> int:
        if value is None:
            return _wall_ns()
        try:
            v = int(value)
            if _I64_MIN <= v <= _I64_MAX:
                return v
        except (TypeError, ValueError, OverflowError):
            pass
        self._errors.report(
            f"{method}: bad time_ns", f"time_ns={value!r} is not an int64 of time.time_ns(); using now"
        )
        return _wall_ns()

    def _text(self, name: str, value: Any) -> str:
        if type(value) is str:
            return value
        if value is None:
            return ""
        self._errors.report(f"{name} is not a str", f"{name}={value!r}; using str()")
        return str(value)

    def _live_snapshot(self) -> list[LiveRequest]:
        with self._lock:
            return list(self._by_handle.values())

    def _read_token(self, token: str | None) -> str:
        """The TCP ingest token: argument, else $ENGINETIME_TOKEN_FILE's contents, else $ENGINETIME_TOKEN."""
        if token is not None:
            return str(token)
        path = os.environ.get(TOKEN_FILE_ENV, "")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                self._errors.report(
                    "cannot read the ingest token",
                    f"{TOKEN_FILE_ENV}={path}: {exc}; connecting without a token (the sidecar will refuse "
                    "it if it requires one)",
                    level=logging.ERROR,
                )
                return ""
        return os.environ.get(TOKEN_ENV, "").strip()

    def _tls_context(self, path: str) -> Any:
        """An ssl context verifying the sidecar against the CA bundle at ``path`` (empty: plain TCP)."""
        if not path:
            return None
        import ssl

        try:
            return ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            self._errors.report(
                "cannot use the TLS CA",
                f"{TLS_CA_ENV}={path}: {exc}; this recorder will not connect (a plain connection would "
                "send the token in the clear)",
                level=logging.ERROR,
            )
            raise

    def _hello_frame(self) -> bytes:
        return wire.frame_hello(
            wall_time_ns=_wall_ns(), monotonic_ns=time.monotonic_ns(), **self._hello_fields()
        )

    def _refresh_hello(self) -> None:
        try:
            ps = self._ps
            if ps is not None:
                ps.update_hello(self._hello_fields())
        except Exception as exc:
            self._errors.report("hello refresh", exc)

    def _hello_fields(self) -> dict[str, Any]:
        """The hello's fields but its clocks (the shipper stamps those when it connects)."""
        return dict(
            engine_id=self.engine_id,
            shard=self.shard,
            num_shards=self.num_shards,
            coupling=int(self.coupling),
            engine_kind=self.engine_kind,
            engine_version=self.engine_version,
            hooks_version=HOOKS_VERSION,
            timer_source=int(self._timer.source),
            device_name=getattr(self._timer, "device_name", ""),
            recorder_epoch=self.epoch,
            protocol_version=PROTOCOL_VERSION,
            token=self._token,
        )


# Recorders still open at interpreter exit get a short best-effort flush.
_RECORDERS: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for rec in list(_RECORDERS):
        rec.close(0.5)


def _silence_in_forked_child() -> None:
    """A process forked from the engine holds copies of its recorders: they must not write.

    The copy shares the parent's shared-memory ring (a second writer would corrupt it)
    and its shipper process belongs to the parent. The child's copies record nothing and
    count nothing; a forked worker that records makes its own Recorder.
    """
    for rec in list(_RECORDERS):
        if rec._ps is not None:
            rec._closed = True
            rec._enabled = False
            rec._cuda = False
            _RECORDERS.discard(rec)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_silence_in_forked_child)
