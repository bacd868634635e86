"""vLLM v1: turn what the scheduler scheduled into enginetime step records.

``VllmRecording`` sits beside one v1 scheduler (one DP rank) and is driven by the
scheduler subclass in ``scheduler.py``:

* ``on_add_request``: ARRIVED with vLLM's own arrival time, prompt length, session
  id, the ``traceparent`` of the request's trace headers, the DP rank the request
  asked for, and the id the user sent (``external_req_id``, i.e. ``X-Request-Id``)
  when it is not ambiguous.
* ``on_schedule(output)``: a snapshot of the ``SchedulerOutput`` — for every
  scheduled request, its tokens split into prefill (prompt, or recompute after a
  preemption) and decode (the newest token plus speculative tokens), and its KV
  length before the step; SCHEDULED with the prefix-cache hits for first-time
  requests, PREEMPTED / RESUMED from the output's own sets.
* ``on_update(output)``: ``update_from_output`` of that output — the step record.
  Snapshots are paired with updates by the ``SchedulerOutput`` object, never by
  order: under async scheduling the engine schedules step N+1 before it updates N.
* Terminal events (FINISHED / ABORTED) are sent once no in-flight step still holds
  the request, so the sidecar never sees a step of a request that already ended
  (async scheduling routinely schedules one more token for a request that turns out
  to have stopped).

Timing: when this process also runs the worker (TP=PP=1, vLLM's ``UniProcExecutor``,
the usual layout of each DP rank) the worker hooks in ``worker.py`` stop a CUDA-event
clock right after the step's forward and sampling launches, and hand the stopped
token over via ``device_stopped``. Otherwise the duration is estimated on the CPU:
from the later of "scheduled" and "the previous step's output arrived" to "this
step's output arrived" — the span in which the device worked on this step alone.

Nothing here imports vLLM; the scheduler objects are read by attribute (checked
against vLLM 0.33.0's classes in tests/test_adapter_vllm.py).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from itertools import compress, count, filterfalse, islice
from typing import Any

from ..adapter_common import AdapterSettings, Guard, HeldBatch, InFlight, traceparent_of
from ..constants import StepKind
from ..recorder import Recorder

log = logging.getLogger("enginetime.engine_hooks")

_MAX_PENDING = 16  # SchedulerOutputs awaiting update_from_output (async scheduling holds 2)

#: Recordings alive in this process, so worker hooks (same process under
#: UniProcExecutor) find the scheduler they time. Weak: a dead engine drops out.
_ACTIVE: list[weakref.ref[VllmRecording]] = []
_ACTIVE_LOCK = threading.Lock()


def active() -> VllmRecording | None:
    """The recording of this process's scheduler, if any (one per engine core)."""
    for ref in reversed(_ACTIVE):
        rec = ref()
        if rec is not None and not rec.closed:
            return rec
    return None


class _Batch(HeldBatch):
    """The requests of the last schedule read, so an unchanged decode batch is not read again.

    ``exact``: every entry of that schedule computed exactly what it was scheduled (no
    speculative tokens, which may be rejected) and is past its prompt, so a next step of
    one token each is a decode whose context is known without reading it.
    """

    __slots__ = ("exact",)

    def __init__(self, req_ids: list[str], handles: list[int], exact: bool) -> None:
        super().__init__(req_ids, handles)
        self.exact = exact


class _Snapshot:
    __slots__ = (
        "output",
        "batch",
        "repeat",
        "held",
        "req_ids",
        "handles",
        "prefill",
        "decode",
        "context",
        "kind",
        "wall",
        "perf",
        "global_step",
    )

    def __init__(self, output: Any, wall: int, perf: int, global_step: int | None) -> None:
        self.output = output  # keeps id(output) unique while we wait for its update
        self.batch: _Batch | None = None
        self.repeat = False  # the same requests as ``batch``'s previous step, one decode token each
        self.held = False  # its requests are held in flight by ``batch``, not one by one
        self.req_ids: list[str] = []
        self.handles: list[int] = []
        self.prefill: list[int] | int = []  # an int: every entry's value
        self.decode: list[int] | int = []
        self.context: list[int] = []
        self.kind = StepKind.UNSPECIFIED
        self.wall = wall
        self.perf = perf
        self.global_step = global_step


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:
        return ""


def _status_name(req: Any) -> str:
    status = getattr(req, "status", None)
    return getattr(status, "name", str(status))


def multinode_rendezvous(pc: Any) -> str | None:
    """``<DP address>:<DP RPC port>`` of a vLLM engine whose DP ranks span nodes, else None.

    Multi-node: fewer DP ranks on this node (``--data-parallel-size-local``) than in the
    engine (``--data-parallel-size``). Every node is started with the same
    ``--data-parallel-address`` and ``--data-parallel-rpc-port`` (the master port when no
    RPC port is set).
    """
    try:
        size = int(getattr(pc, "data_parallel_size", 1) or 1)
        local = int(getattr(pc, "data_parallel_size_local", size) or size)
    except (TypeError, ValueError):
        return None
    ip = getattr(pc, "data_parallel_master_ip", None)
    port = getattr(pc, "data_parallel_rpc_port", None) or getattr(pc, "data_parallel_master_port", None)
    if local >= size or not isinstance(ip, str) or not ip or not isinstance(port, int | str) or not port:
        return None
    return f"{ip}:{port}"


class VllmRecording:
    """Step and request recording for one vLLM v1 scheduler (one DP rank)."""

    def __init__(
        self, scheduler: Any, *, recorder: Recorder | None = None, settings: AdapterSettings | None = None
    ) -> None:
        cfg = getattr(scheduler, "vllm_config", None)
        pc = getattr(cfg, "parallel_config", None)
        # Default engine id: host plus an id every DP rank of this instance shares
        # (VllmConfig.instance_id, random per instance; else the DP master port).
        instance = getattr(cfg, "instance_id", None) or getattr(pc, "data_parallel_master_port", None)
        # A multi-node engine: its DP address and port, the same on every node.
        base = settings or AdapterSettings.from_env("vllm")
        group = multinode_rendezvous(pc)
        self.settings = (
            base.for_group(group)
            if group
            else base.for_instance(instance if isinstance(instance, int | str) else None)
        )
        self.guard = Guard()
        self.scheduler_ref = weakref.ref(scheduler)
        self.shard = int(getattr(pc, "data_parallel_rank", 0) or 0)
        self.num_shards = max(1, int(getattr(pc, "data_parallel_size", 1) or 1))
        is_moe = bool(getattr(getattr(cfg, "model_config", None), "is_moe", False))
        # vLLM runs DP ranks in lockstep (dummy batches, step_counter) only for MoE models.
        coupling = self.settings.coupling or ("lockstep" if self.num_shards > 1 and is_moe else "independent")
        self.recorder = recorder or Recorder(
            self.settings.engine_id,
            shard=self.shard,
            num_shards=self.num_shards,
            coupling=coupling,
            address=self.settings.address,
            engine_kind="vllm",
            engine_version=_vllm_version(),
            timer=self.settings.timer,
        )
        device_type = str(getattr(getattr(cfg, "device_config", None), "device_type", "") or "")
        # Worker-side stamps are the step's device time with CUDA events, or its real
        # duration when the forward runs synchronously on the CPU.
        self.worker_timing = bool(self.recorder._cuda) or device_type == "cpu"
        self.core_ref: weakref.ref[Any] | None = None  # DPEngineCoreProc, for global_step
        self.closed = False
        self._reqs: dict[str, Any] = {}  # internal request id -> vLLM Request (live)
        self._handles: dict[str, int] = {}
        self._preempted: set[str] = set()
        self._pending: dict[int, _Snapshot] = {}
        self._device: dict[int, tuple[Any, Any]] = {}  # id(output) -> (output, stopped token)
        self._in_flight = InFlight(self._send_terminal)  # what steps in flight hold; ends waiting
        self._last_done_perf = 0
        self._last: _Batch | None = None  # the last schedule read in full
        self._emitted: _Batch | None = None  # the batch of the last step recorded
        self._decoding: set[str] = set()  # requests past their prompt: a 1-token step is a decode
        self.repeats = 0  # steps recorded as repeats (nothing read per request)
        self.decode_reads = 0  # decode schedules read in C (map over the requests)
        self.mixed_reads = 0  # schedules read in C up to their first non-decode, the rest one by one
        self.unpaired = 0  # snapshots evicted without an update (counted, not raised)
        with _ACTIVE_LOCK:
            _ACTIVE[:] = [r for r in _ACTIVE if r() is not None]
            _ACTIVE.append(weakref.ref(self))

    # ------------------------------------------------------------------ requests

    def on_add_request(self, request_id: str) -> None:
        try:
            sched = self.scheduler_ref()
            req = sched.requests.get(request_id) if sched is not None else None
            if req is not None and request_id not in self._handles:
                self._arrive(request_id, req)
        except Exception as exc:
            self.guard.report("vllm add_request hook", exc)

    def _arrive(self, rid: str, req: Any) -> int:
        arrival = getattr(req, "arrival_time", None)
        time_ns = int(arrival * 1e9) if isinstance(arrival, (int, float)) and arrival > 0 else None
        routed = getattr(req, "_enginetime_dp_rank", None)
        name = rid
        external = getattr(req, "_enginetime_external_id", None)
        if external and external not in self.recorder._by_id:
            name = external  # the X-Request-Id the user knows; the internal id has a random suffix
        handle = self.recorder.request_arrived(
            name,
            prompt_tokens=int(getattr(req, "num_prompt_tokens", 0) or 0),
            session_id=str(getattr(req, "session_id", None) or ""),
            traceparent=traceparent_of(getattr(req, "trace_headers", None)),
            routed_shard=routed if isinstance(routed, int) and routed >= 0 else None,
            time_ns=time_ns,
        )
        if isinstance(routed, int) and routed >= 0 and routed != self.shard:
            self.guard.report(
                "request pinned to another DP rank",
                (
                    f"request {rid} asked for data_parallel_rank={routed} but runs on rank {self.shard} "
                    "(the sidecar flags it as migrated)"
                ),
            )
        self._reqs[rid] = req
        self._handles[rid] = handle
        return handle

    def on_finish_requests(self, request_ids: Any) -> None:
        """After ``Scheduler.finish_requests`` (client aborts, stop from outside)."""
        try:
            if request_ids is None:
                ids: Iterable[str] = list(self._reqs)
            elif isinstance(request_ids, str):
                ids = (request_ids,)
            else:
                ids = request_ids
            for rid in ids:
                req = self._reqs.get(rid)
                if req is not None and req.is_finished():
                    self._terminal(rid, req)
        except Exception as exc:
            self.guard.report("vllm finish_requests hook", exc)

    def _terminal(self, rid: str, req: Any) -> None:
        status = _status_name(req)
        reason_obj = None
        try:
            reason_obj = req.get_finished_reason()
        except Exception:
            pass
        reason = str(reason_obj) if reason_obj is not None else status.lower()
        aborted = status == "FINISHED_ABORTED" or reason == "abort"
        out_tokens = int(getattr(req, "num_output_tokens", 0) or 0)
        event = (aborted, reason, out_tokens, time.time_ns())
        self._reqs.pop(rid, None)
        self._in_flight.end(rid, event)  # sent once no step in flight holds it

    def _send_terminal(self, rid: str, event: tuple[bool, str, int, int]) -> None:
        handle = self._handles.pop(rid, 0)
        self._preempted.discard(rid)
        self._decoding.discard(rid)
        if not handle:
            return
        aborted, reason, out_tokens, t = event
        if aborted:
            self.recorder.request_aborted(handle, reason=reason, output_tokens=out_tokens, time_ns=t)
        else:
            self.recorder.request_finished(handle, reason=reason, output_tokens=out_tokens, time_ns=t)

    # ------------------------------------------------------------------ steps

    def global_step(self) -> int | None:
        """(wave << 32) | step_counter of the DP engine core: equal on every DP rank."""
        core = self.core_ref() if self.core_ref is not None else None
        if core is None:
            return None
        counter = getattr(core, "step_counter", None)
        if not isinstance(counter, int):
            return None
        wave = getattr(core, "current_wave", 0)
        return ((int(wave) & 0xFFFFFFFF) << 32) | (counter & 0xFFFFFFFF)

    def on_schedule(self, output: Any) -> None:
        try:
            self._snapshot(output)
        except Exception as exc:
            self.guard.report("vllm schedule hook", exc)

    def _snapshot(self, output: Any) -> None:
        wall, perf = time.time_ns(), time.perf_counter_ns()
        rec = self.recorder
        for rid in getattr(output, "preempted_req_ids", None) or ():
            self._decoding.discard(rid)  # recomputed from its prompt when it resumes
            handle = self._handles.get(rid)
            if handle:
                self._preempted.add(rid)
                rec.request_preempted(handle, time_ns=wall)
        num_scheduled: dict[str, int] = output.num_scheduled_tokens
        if not num_scheduled:
            return  # nothing runs on the device for an empty schedule
        if self._decode_snapshot(output, num_scheduled, wall, perf):
            return
        sched = self.scheduler_ref()
        requests = sched.requests if sched is not None else {}
        before: dict[str, int] = {}
        first_time: set[str] = set()
        for nr in output.scheduled_new_reqs:
            before[nr.req_id] = int(nr.num_computed_tokens)
            first_time.add(nr.req_id)
        cached = output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        snap = _Snapshot(output, wall, perf, self.global_step())
        n_prefill = n_decode = 0
        exact = True
        entries: Iterable[tuple[str, int]] = num_scheduled.items()
        head = self._decoding_head(num_scheduled, cached)
        h = 0
        if head is not None:
            # The running decodes, read in C (as _decode_snapshot reads them); the entries
            # after them go through the loop below, held with them as one batch.
            snap.req_ids, snap.handles, snap.context = head
            h = n_decode = len(snap.handles)
            prefill: list[int] = [0] * h
            decode: list[int] = [1] * h
            snap.held = True
            entries = islice(entries, h, None)
            self.mixed_reads += 1
        else:
            prefill, decode = [], []
        for rid, computed in islice(zip(cached.req_ids, cached.num_computed_tokens, strict=False), h, None):
            before[rid] = int(computed)
        snap.prefill, snap.decode = prefill, decode
        hold = not snap.held
        for rid, n in entries:
            req = requests.get(rid)
            handle = self._handles.get(rid)
            if handle is None:
                handle = self._arrive(rid, req) if req is not None else 0
            start = before.get(rid)
            if start is None:  # not in either list: read it off the request (already advanced)
                start = max(0, int(getattr(req, "num_computed_tokens", n)) - n)
            # Tokens below prefill_end are prompt (or recompute after a preemption):
            # prefill. The newest token and speculative tokens are decode.
            prompt = int(getattr(req, "num_prompt_tokens", 0) or 0)
            known = int(getattr(req, "num_tokens", prompt) or prompt)
            prefill_end = max(prompt, known - 1)
            p = min(n, max(0, prefill_end - start))
            d = n - p
            n_prefill += p
            n_decode += d
            if start + n >= prefill_end:
                self._decoding.add(rid)
            else:  # more of its prompt to come: its next 1-token step may be prefill
                self._decoding.discard(rid)
                exact = False
            if d > 1:  # speculative tokens: how many were accepted is known only afterwards
                exact = False
            snap.req_ids.append(rid)
            snap.handles.append(handle)
            prefill.append(p)
            decode.append(d)
            snap.context.append(start)
            if hold:
                self._in_flight.hold_id(rid)
            if handle:
                if rid in first_time and rid not in self._preempted:
                    rec.request_scheduled(handle, cached_tokens=start, time_ns=wall)
                elif rid in self._preempted and (rid in resumed or rid in first_time):
                    self._preempted.discard(rid)
                    rec.request_resumed(handle, time_ns=wall)
        snap.kind = (
            StepKind.MIXED if n_prefill and n_decode else StepKind.PREFILL if n_prefill else StepKind.DECODE
        )
        snap.batch = self._last = _Batch(snap.req_ids, snap.handles, exact)
        if snap.held:
            self._in_flight.hold_batch(snap.batch)
        self._keep(snap)

    def _decoding_head(
        self, num_scheduled: dict[str, int], cached: Any
    ) -> tuple[list[str], list[int], list[int]] | None:
        """(ids, handles, contexts) of the running decodes that lead a schedule, else None.

        vLLM schedules its running requests first, in the order of the cached requests'
        lists (decodes, then the one still prefilling its prompt in chunks, which was
        admitted last), then the waiting ones (new prompts, resumed requests): with chunked
        prefill the usual "mixed" step. The leading run of cached requests that each decode
        one token past their prompt is read in C, as a decode-only schedule is; the entries
        after it, one by one. Where that run ends is found in C: one list compare when every
        cached request is one, else iterators stopping at the first entry that does not
        qualify. None: no such run (the schedule is read entry by entry).
        """
        ids = cached.req_ids
        k = len(ids)
        if not k:
            return None
        # The first entry scheduled other than one token (a prompt chunk, a recompute,
        # speculative tokens), or past the cached requests, ends the head; so does the first
        # not decoding yet. The head must be the cached requests' first ones, in order.
        counts = list(islice(num_scheduled.values(), k))  # (the common case, all ones: one compare)
        h = k if counts == [1] * k else next(compress(count(), map((1).__ne__, counts)), len(counts))
        front = ids if h == k else ids[:h]
        if h and not self._decoding.issuperset(front):
            h = ids.index(next(filterfalse(self._decoding.__contains__, front)))
            front = ids[:h]
        if not h:
            return None
        head = list(islice(num_scheduled, h))
        if head != front:  # not in the scheduled order
            return None
        got = list(map(self._handles.get, head))
        if None in got:
            return None
        handles: list[int] = got  # type: ignore[assignment]  # no None left
        return head, handles, list(map(int, islice(cached.num_computed_tokens, h)))

    def _decode_snapshot(self, output: Any, num_scheduled: dict[str, int], wall: int, perf: int) -> bool:
        """A decode-only schedule, read in C; True when it was one (its snapshot is kept).

        Every request scheduled one token, all of them past their prompt, nothing new or
        resumed, the scheduled order the cached requests' order. Then each entry decodes one
        token from its computed tokens, what the per-request path would find. The same
        requests in the same order as the last schedule, after a step with no speculative
        tokens: a repeat, nothing read at all. Otherwise False: the schedule is read in full.
        """
        cached = output.scheduled_cached_reqs
        if (
            sum(num_scheduled.values()) != len(num_scheduled)  # every one 1 token (none has 0)
            or output.scheduled_new_reqs
            or getattr(cached, "resumed_req_ids", None)
        ):
            return False
        ids = list(num_scheduled)
        last = self._last
        snap = _Snapshot(output, wall, perf, self.global_step())
        snap.kind = StepKind.DECODE
        snap.held = True
        if last is not None and last.exact and ids == last.ids:
            snap.batch = last
            snap.req_ids = last.ids
            snap.repeat = True
        else:
            if ids != cached.req_ids or not self._decoding.issuperset(ids):
                return False
            got = list(map(self._handles.get, ids))
            if None in got:
                return False
            handles: list[int] = got  # type: ignore[assignment]  # no None left
            snap.req_ids = ids
            snap.handles = handles
            snap.prefill, snap.decode = 0, 1
            snap.context = list(map(int, cached.num_computed_tokens))
            snap.batch = self._last = _Batch(ids, handles, True)
            self.decode_reads += 1
        self._in_flight.hold_batch(snap.batch)
        self._keep(snap)
        return True

    def _keep(self, snap: _Snapshot) -> None:
        """Hold a snapshot until its update (by output object; the oldest goes past _MAX_PENDING)."""
        output = snap.output
        pending = self._pending
        pending[id(output)] = snap
        if len(pending) > _MAX_PENDING:  # an output that never came back: forget it
            old = pending.pop(next(iter(pending)))
            self.unpaired += 1
            self.guard.report("SchedulerOutput never updated", "dropping its step (counted)")
            self._release(old)

    def device_stopped(self, output: Any, token: Any) -> None:
        """Worker hook: the step for ``output`` was launched; ``token`` is its stopped clock."""
        try:
            old = self._device.pop(id(output), None)
            if old is not None:
                self.recorder.step_abort(old[1])
            self._device[id(output)] = (output, token)
            if len(self._device) > _MAX_PENDING:
                stale = self._device.pop(next(iter(self._device)))
                self.recorder.step_abort(stale[1])
        except Exception as exc:
            self.guard.report("vllm worker timing hook", exc)

    def record_idle(self, token: Any) -> None:
        """Worker hook: a DP dummy batch ran (this rank had no work but its peers did)."""
        try:
            self._emitted = None  # the recorder's previous step is no longer a batch of ours
            self.recorder.step_end(
                token,
                kind=StepKind.IDLE,
                handles=[],
                prefill_tokens=[],
                decode_tokens=[],
                context_tokens=[],
                global_step=self.global_step(),
            )
        except Exception as exc:
            self.guard.report("vllm dummy batch hook", exc)

    def on_update(self, output: Any) -> None:
        try:
            self._record(output)
        except Exception as exc:
            self.guard.report("vllm update_from_output hook", exc)

    def _record(self, output: Any) -> None:
        snap = self._pending.pop(id(output), None)
        device = self._device.pop(id(output), None)
        if snap is None or snap.output is not output:
            if device is not None:
                self.recorder.step_abort(device[1])
            return
        end_wall, end_perf = time.time_ns(), time.perf_counter_ns()
        if device is not None and device[0] is output:
            token = device[1]
        else:
            # CPU estimate: the device worked on this step alone from the later of
            # "scheduled" and "previous output arrived" until "this output arrived".
            start_perf = max(snap.perf, min(self._last_done_perf, end_perf))
            token = (snap.wall + (start_perf - snap.perf), start_perf, None, end_wall, end_perf)
        self._last_done_perf = end_perf
        if snap.repeat:
            self._record_repeat(snap, token)
            return
        self._emitted = snap.batch
        self.recorder.step_end(
            token,
            kind=snap.kind,
            handles=snap.handles,
            prefill_tokens=snap.prefill,
            decode_tokens=snap.decode,
            context_tokens=snap.context,
            global_step=snap.global_step,
        )
        self._after_step(snap)

    def _record_repeat(self, snap: _Snapshot, token: Any) -> None:
        batch = snap.batch
        assert batch is not None  # a repeat snapshot always has its batch
        rec = self.recorder
        if self._emitted is batch and rec.step_repeat(token, decode_tokens=1, global_step=snap.global_step):
            self.repeats += 1
        else:  # the full step (rare): contexts from the output, as a full snapshot reads them
            self._emitted = batch
            cached = snap.output.scheduled_cached_reqs
            computed = dict(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
            rec.step_end(
                token,
                kind=StepKind.DECODE,
                handles=batch.handles,
                prefill_tokens=0,
                decode_tokens=1,
                context_tokens=[int(computed.get(rid, 0)) for rid in batch.ids],
                global_step=snap.global_step,
            )
        self._after_step(snap)

    def _after_step(self, snap: _Snapshot) -> None:
        self._unhold(snap)
        self._finished_since(snap.req_ids)
        # A request that finished while another step of it is still in flight is deferred
        # by _terminal; it is sent when that step is recorded.

    def _finished_since(self, step_ids: list[str]) -> None:
        """Report the requests update_from_output just finished.

        vLLM adds each request it frees to ``Scheduler.finished_req_ids`` (cleared at the
        next schedule), so this looks at the few that finished, not at every request of
        the step; without that set (another vLLM), each request of the step is asked.
        """
        sched = self.scheduler_ref()
        finished = getattr(sched, "finished_req_ids", None)
        reqs = self._reqs
        ids: Iterable[str] = list(finished) if isinstance(finished, set) else step_ids
        for rid in ids:
            req = reqs.get(rid)
            if req is not None and req.is_finished():
                self._terminal(rid, req)

    def _release(self, snap: _Snapshot) -> None:
        dev = self._device.pop(id(snap.output), None)
        if dev is not None:
            self.recorder.step_abort(dev[1])
        self._unhold(snap)

    def _unhold(self, snap: _Snapshot) -> None:
        """The step was recorded or forgotten: it no longer holds its requests."""
        if snap.held and snap.batch is not None:
            self._in_flight.release_batch(snap.batch)
        else:
            self._in_flight.release_ids(snap.req_ids)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.guard.call("vllm recorder close", self.recorder.close, 2.0)
