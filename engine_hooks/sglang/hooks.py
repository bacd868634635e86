"""The SGLang hooks: AROUND wrappers on the scheduler's step loop, one adapter per scheduler.

Each hook has the signature of SGLang's ``HookType.AROUND`` hooks,
``hook(original, *args, **kwargs)``, so the same functions serve the plugin
(``HookRegistry.register``, SGLang >= 0.5.11) and the launcher for older SGLang
(``install_direct`` patches the classes itself). Every hook calls SGLang's method
exactly once and returns its result unchanged; our part is guarded (counted, logged
once, never raised).

=============================================  =====================================================
``Scheduler.handle_generate_request``          ARRIVED: rid, prompt length, session id, traceparent,
                                               the DP rank the request asked for
``Scheduler.run_batch``                        the step: columns read before the forward, a CUDA
                                               event pair around it (on the forward stream under
                                               overlap scheduling), ``forward_ct`` as global_step
``Scheduler.launch_batch_sample_if_needed``    under overlap with delayed sampling, the step's
                                               clock stops after its sampling launches; paired by
                                               the *result* object (the batch is copied)
``Scheduler.process_batch_result``             FINISHED / ABORTED for requests that finished
``Scheduler.abort_request``                    ABORTED for requests still waiting in the queue
``ScheduleBatch.retract_decode``               PREEMPTED (retracted for memory); RESUMED when the
                                               request is scheduled again
=============================================  =====================================================

Only the scheduler that owns its DP rank reports (attention-TP rank 0, PP rank 0);
the other TP ranks run the same batches and stay silent.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
import threading
import time
import weakref
from itertools import repeat
from typing import Any

from ..adapter_common import AdapterSettings, Guard, HeldBatch, InFlight, as_int, int_list, traceparent_of
from ..constants import StepKind
from ..recorder import Recorder
from .batch import StepRead, known_tokens, mode_name, read_batch

log = logging.getLogger("enginetime.engine_hooks")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
SCHEDULE_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_MAX_PENDING = 8
_WORKER_PREFIX = re.compile(r"^\d+_(.+)$")

_FINISHED_REASON = operator.attrgetter("finished_reason")  # Req.finished() is "is not None" of it
_RID = operator.attrgetter("rid")
_ORIGIN_IDS = operator.attrgetter("origin_input_ids")
_OUTPUT_IDS = operator.attrgetter("output_ids")
_add = operator.add
_sub = operator.sub

_guard = Guard()
_current: weakref.ref[SGLangAdapter] | None = None  # this process's adapter (one scheduler each)
_lock = threading.Lock()


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return ""


def shard_layout(scheduler: Any) -> tuple[int, int, str, bool, str]:
    """(shard, num_shards, coupling, reports, engine-id suffix) of this scheduler process.

    0.5.23 publishes the topology in ``sglang.srt.runtime_context.get_parallel()``;
    0.5.4 keeps it on the scheduler (``attn_dp_rank``, ``attn_tp_rank``, ``dp_rank``,
    ``server_args.enable_dp_attention``/``dp_size``). DP attention = LOCKSTEP ranks;
    plain DP replicas (no DP attention) are INDEPENDENT shards.
    """
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        attn_dp_size = int(par.attn_dp_size)
        attn_dp_rank = int(par.attn_dp_rank)
        reports = int(par.attn_tp_rank) == 0 and int(getattr(par, "pp_rank", 0) or 0) == 0
        try:
            reports = reports and int(par.attn_cp_rank) == 0
        except Exception:
            pass
        dp_rank = getattr(par, "dp_rank", None)
        dp_size = int(getattr(par, "dp_size", 1) or 1)
        if attn_dp_size > 1:
            suffix = f"-r{dp_rank}" if dp_size > 1 and dp_rank is not None else ""
            return attn_dp_rank, attn_dp_size, "lockstep", reports, suffix
        return int(dp_rank or 0), dp_size, "independent", reports, ""
    except Exception:
        pass
    args = getattr(scheduler, "server_args", None)
    dp_size = int(getattr(args, "dp_size", 1) or 1)
    reports = (
        int(getattr(scheduler, "attn_tp_rank", 0) or 0) == 0
        and int(getattr(scheduler, "pp_rank", 0) or 0) == 0
    )
    if getattr(args, "enable_dp_attention", False) and dp_size > 1:
        return int(getattr(scheduler, "attn_dp_rank", 0) or 0), dp_size, "lockstep", reports, ""
    return int(getattr(scheduler, "dp_rank", None) or 0), dp_size, "independent", reports, ""


class _Batch(HeldBatch):
    """The requests of the last batch read, kept so an unchanged decode batch is not read again."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list[Any], handles: list[int], rids: list[str]) -> None:
        super().__init__(rids, handles)
        self.reqs = reqs


class _RepeatRead:
    """A repeat step's read (StepRead's fields the repeat path uses; cheaper to make)."""

    __slots__ = ("batch", "peer_tokens")

    def __init__(self, batch: _Batch, peer_tokens: list[int] | None) -> None:
        self.batch = batch
        self.peer_tokens = peer_tokens


class _Pending:
    __slots__ = ("result", "token", "read", "global_step")

    def __init__(
        self, result: Any, token: Any, read: StepRead | _RepeatRead, global_step: int | None
    ) -> None:
        self.result = result
        self.token = token
        self.read = read
        self.global_step = global_step


def multinode_rendezvous(server_args: Any) -> str | None:
    """``--dist-init-addr`` of an SGLang engine spanning several nodes (``--nnodes`` > 1), else None."""
    try:
        nnodes = int(getattr(server_args, "nnodes", 1) or 1)
    except (TypeError, ValueError):
        return None
    addr = getattr(server_args, "dist_init_addr", None)
    return str(addr) if nnodes > 1 and isinstance(addr, str) and addr else None


class SGLangAdapter:
    """Recording for one SGLang scheduler (one DP rank)."""

    def __init__(
        self, scheduler: Any, *, settings: AdapterSettings | None = None, recorder: Recorder | None = None
    ) -> None:
        args = getattr(scheduler, "server_args", None)
        # Default engine id: host plus the server's port, unique per SGLang instance on a host;
        # a multi-node engine: its --dist-init-addr, the same on every node.
        base = settings or AdapterSettings.from_env("sglang")
        group = multinode_rendezvous(args)
        self.settings = base.for_group(group) if group else base.for_instance(getattr(args, "port", None))
        self.guard = Guard()
        shard, num, coupling, reports, suffix = shard_layout(scheduler)
        self.shard, self.num_shards, self.reports = shard, num, reports
        self.coupling = self.settings.coupling or coupling
        if recorder is None and reports:
            recorder = Recorder(
                self.settings.engine_id + suffix,
                shard=shard,
                num_shards=num,
                coupling=self.coupling,
                address=self.settings.address,
                engine_kind="sglang",
                engine_version=_sglang_version(),
                timer=self.settings.timer,
            )
        self.recorder = recorder
        args = getattr(scheduler, "server_args", None)
        self.strip_worker_prefix = int(getattr(args, "tokenizer_worker_num", 1) or 1) > 1
        self.overlap = bool(getattr(scheduler, "enable_overlap", False))
        self.handles: dict[str, int] = {}
        self.seen: set[str] = set()
        self.preempted: set[str] = set()
        self.in_flight = InFlight(self._send_terminal)  # what steps in flight hold; ends waiting for them
        self.pending: dict[int, _Pending] = {}
        self.pinned_elsewhere = 0
        self._last: _Batch | None = None  # the last batch read in full
        self._emitted: _Batch | None = None  # the batch of the last step recorded
        self.repeats = 0  # steps recorded as repeats (no per-request work on the engine thread)
        self.decode_reads = 0  # changed decode batches read in C (map over the requests)

    # ------------------------------------------------------------------ requests

    def user_rid(self, rid: str) -> str:
        if self.strip_worker_prefix:
            m = _WORKER_PREFIX.match(rid)
            if m:
                return m.group(1)
        return rid

    def on_request(self, recv_req: Any) -> None:
        rid = getattr(recv_req, "rid", None)
        if self.recorder is None or not isinstance(rid, str) or rid in self.handles:
            return
        session = getattr(recv_req, "session_id", None)
        if not session:
            session = getattr(getattr(recv_req, "session_params", None), "id", None)
        trace = traceparent_of(getattr(recv_req, "trace_context", None)) or traceparent_of(
            getattr(recv_req, "external_trace_header", None)
        )
        routed = getattr(recv_req, "routed_dp_rank", None)
        if routed is None:
            routed = getattr(recv_req, "data_parallel_rank", None)  # SGLang < 0.5.5
        routed = routed if isinstance(routed, int) and routed >= 0 else None
        ids = getattr(recv_req, "input_ids", None)
        self._arrive(rid, len(ids) if ids is not None else 0, str(session or ""), trace, routed, None)

    def _arrive(
        self, rid: str, prompt: int, session: str, trace: str, routed: int | None, time_ns: int | None
    ) -> int:
        rec = self.recorder
        if rec is None:
            return 0
        handle = rec.request_arrived(
            self.user_rid(rid),
            prompt_tokens=prompt,
            session_id=session,
            traceparent=trace,
            routed_shard=routed,
            time_ns=time_ns,
        )
        self.handles[rid] = handle
        if routed is not None and routed != self.shard:
            # The request asked for a DP rank and runs on another one: the sidecar marks it
            # migrated; say so here too, once, since a silently ignored pin is a config bug.
            self.pinned_elsewhere += 1
            self.guard.report(
                "request pinned to another DP rank",
                (
                    f"request {rid} asked for DP rank {routed} but runs on rank {self.shard}; "
                    "the sidecar reports it as migrated (counted per request)"
                ),
            )
        return handle

    def handle_of(self, req: Any) -> int:
        rid = req.rid
        handle = self.handles.get(rid)
        if handle is None:  # a request we did not see arrive (retried, disaggregated, ...)
            ids = getattr(req, "origin_input_ids", None)
            handle = self._arrive(rid, len(ids) if ids is not None else 0, "", "", None, None)
        return handle

    def terminal(self, req: Any, aborted: bool | None = None) -> None:
        rid = req.rid
        if rid not in self.handles:
            return
        reason_obj = getattr(req, "finished_reason", None)
        reason = "abort" if aborted else "stop"
        try:
            if reason_obj is not None:
                reason = str(reason_obj.to_json().get("type", reason))
        except Exception:
            reason = type(reason_obj).__name__.lower()
        if aborted is None:
            aborted = reason == "abort"
        try:
            out_tokens = len(req.output_ids)
        except Exception:
            out_tokens = 0
        event = (aborted, reason, out_tokens, time.time_ns())
        self.in_flight.end(rid, event)

    def _send_terminal(self, rid: str, event: tuple[bool, str, int, int]) -> None:
        handle = self.handles.pop(rid, 0)
        self.seen.discard(rid)
        self.preempted.discard(rid)
        if not handle or self.recorder is None:
            return
        aborted, reason, out_tokens, t = event
        if aborted:
            self.recorder.request_aborted(handle, reason=reason, output_tokens=out_tokens, time_ns=t)
        else:
            self.recorder.request_finished(handle, reason=reason, output_tokens=out_tokens, time_ns=t)

    def on_retracted(self, reqs: Any) -> None:
        rec = self.recorder
        if rec is None:
            return
        for req in reqs or ():
            handle = self.handles.get(req.rid)
            if handle and req.rid not in self.preempted:
                self.preempted.add(req.rid)
                rec.request_preempted(handle)

    # ------------------------------------------------------------------ steps

    def begin(self, scheduler: Any, batch: Any) -> tuple[StepRead | _RepeatRead, Any] | None:
        rec = self.recorder
        if rec is None:
            return None
        stream = getattr(scheduler, "forward_stream", None) if self.overlap else None
        reqs = getattr(batch, "reqs", None)
        if type(reqs) is list and reqs and mode_name(batch) == "DECODE":
            last = self._last
            peer = int_list(getattr(batch, "global_num_tokens", None))
            # The steady decode step: the same requests, in the same order, as the last batch
            # read (compared by identity, in C). Nothing is read per request.
            if last is not None and len(reqs) == len(last.reqs) and reqs == last.reqs:
                self.in_flight.hold_batch(last)
                return _RepeatRead(last, peer), rec.step_begin(stream)
            # A decode batch that changed (a request joined or left): its columns in C.
            fast = self._decode_read(reqs, peer)
            if fast is not None:
                return fast, rec.step_begin(stream)
        read = read_batch(batch)
        if read is None:
            return None
        reqs_read = read.reqs
        wall = time.time_ns()
        for req in reqs_read:
            rid = req.rid
            handle = self.handle_of(req)
            read.handles.append(handle)
            read.rids.append(rid)
            self.in_flight.hold_id(rid)
            if rid in self.preempted and id(req) in read.first_prefix:
                self.preempted.discard(rid)
                rec.request_resumed(handle, time_ns=wall)
            elif rid not in self.seen:
                self.seen.add(rid)
                hit = read.first_prefix.get(id(req))
                if hit is None:
                    hit = as_int(getattr(req, "cached_tokens", 0))
                rec.request_scheduled(handle, cached_tokens=hit, time_ns=wall)
        read.reqs = []  # the step holds handles and ids from here on, not the requests
        if reqs_read:
            read.batch = self._last = _Batch(reqs_read, read.handles, read.rids)
        return read, rec.step_begin(stream)

    def _decode_read(self, reqs: list[Any], peer: list[int] | None) -> StepRead | None:
        """A DECODE batch read with map() over the requests (no Python per request), or None.

        None sends the batch down the general path: a request this adapter has not seen
        scheduled (it reports SCHEDULED there), an attribute missing or of the wrong type.
        Its requests are held by the batch, not one by one (a FINISHED waits for the step).
        """
        try:
            rids = list(map(_RID, reqs))
            got = list(map(self.handles.get, rids))
            if None in got or not self.seen.issuperset(rids):
                return None
            handles: list[int] = got  # type: ignore[assignment]  # no None left
            known = map(_add, map(len, map(_ORIGIN_IDS, reqs)), map(len, map(_OUTPUT_IDS, reqs)))
            context = list(map(_sub, known, repeat(1)))  # the KV before the step (batch.py)
        except (AttributeError, TypeError):
            return None
        if min(context) < 0:
            return None
        b = self._last = _Batch(list(reqs), handles, rids)
        self.in_flight.hold_batch(b)
        read = StepRead(StepKind.DECODE, "DECODE", prefill=0, decode=1, peer_tokens=peer, batch=b)
        read.context = context
        read.handles = handles
        read.rids = rids
        read.held = True
        self.decode_reads += 1
        return read

    def after_run(
        self, scheduler: Any, batch: Any, result: Any, pre: tuple[StepRead | _RepeatRead, Any]
    ) -> None:
        rec = self.recorder
        if rec is None:  # never: ``pre`` came from begin(), which needs the recorder
            return
        read, token = pre
        global_step = getattr(batch, "forward_iter", None)
        if not isinstance(global_step, int):
            global_step = getattr(scheduler, "forward_ct", None)
            global_step = global_step if isinstance(global_step, int) else None
        if result is not None and getattr(result, "delay_sample_func", None) is not None:
            # Sampling launches later (launch_batch_sample_if_needed): stop the clock there.
            old = self.pending.pop(id(result), None)
            if old is not None:
                self._emit(old.read, rec.step_stop(old.token), old.global_step, batch)
            self.pending[id(result)] = _Pending(result, token, read, global_step)
            if len(self.pending) > _MAX_PENDING:
                stale = self.pending.pop(next(iter(self.pending)))
                self.guard.report("delayed sample never launched", "recording the step without it")
                self._emit(stale.read, rec.step_stop(stale.token), stale.global_step, batch)
            return
        self._emit(read, rec.step_stop(token), global_step, batch)

    def after_sample(self, batch_result: Any) -> None:
        pending = self.pending.pop(id(batch_result), None)
        rec = self.recorder
        if pending is not None and pending.result is batch_result and rec is not None:
            self._emit(pending.read, rec.step_stop(pending.token), pending.global_step, None)

    def _emit(self, read: StepRead | _RepeatRead, stopped: Any, global_step: int | None, batch: Any) -> None:
        rec = self.recorder
        if rec is None:  # never: a step was begun
            return
        if isinstance(read, _RepeatRead):
            self._emit_repeat(rec, read, stopped, global_step)
            return
        self._emitted = read.batch
        handles = read.handles
        rec.step_end(
            stopped,
            kind=read.kind if handles else StepKind.IDLE,
            handles=handles,
            prefill_tokens=read.prefill,
            decode_tokens=read.decode,
            context_tokens=read.context,
            global_step=global_step,
            peer_tokens=read.peer_tokens,
        )
        self._release(read)

    def _release(self, read: StepRead | _RepeatRead) -> None:
        """The step was recorded or forgotten: it no longer holds its requests."""
        if isinstance(read, StepRead) and not read.held:
            self.in_flight.release_ids(read.rids)
        else:  # a repeat, or a decode batch read in C: held by its batch
            self.in_flight.release_batch(read.batch)

    def _emit_repeat(self, rec: Recorder, read: _RepeatRead, stopped: Any, global_step: int | None) -> None:
        same = read.batch
        # The recorder's previous step must be this batch's: steps are recorded in the order
        # begun, so it is unless a different batch was recorded in between.
        if self._emitted is same and rec.step_repeat(
            stopped, decode_tokens=1, global_step=global_step, peer_tokens=read.peer_tokens
        ):
            self.repeats += 1
        else:  # the full step (a rare path): read the requests now
            self._emitted = same
            rec.step_end(
                stopped,
                kind=StepKind.DECODE,
                handles=same.handles,
                prefill_tokens=0,
                decode_tokens=1,
                context_tokens=[max(0, known_tokens(req) - 1) for req in same.reqs],
                global_step=global_step,
                peer_tokens=read.peer_tokens,
            )
        self._release(read)

    def abort(self, pre: tuple[StepRead | _RepeatRead, Any]) -> None:
        """The forward raised: give the clock back and forget the step (it never ran)."""
        read, token = pre
        if self.recorder is not None:
            self.recorder.step_abort(token)
        self._release(read)

    def after_process(self, batch: Any) -> None:
        reqs = getattr(batch, "reqs", None) or ()
        try:  # most steps finish nothing: look at every request's finished_reason in C first
            if type(reqs) is list and not any(map(_FINISHED_REASON, reqs)):
                return
        except AttributeError:
            pass
        for req in reqs:
            try:
                if req.rid in self.handles and req.finished():
                    self.terminal(req)
            except Exception as exc:
                self.guard.report("reading a finished request", exc)


# ---------------------------------------------------------------------- adapter lookup


def adapter_for(scheduler: Any) -> SGLangAdapter | None:
    """The scheduler's adapter, created on first use (None when disabled or broken)."""
    global _current
    try:
        ad = scheduler.__dict__.get("_enginetime", False)
    except Exception:
        return None
    if ad is not False:
        return ad
    with _lock:
        ad = scheduler.__dict__.get("_enginetime", False)
        if ad is not False:
            return ad
        ad = None
        try:
            settings = AdapterSettings.from_env("sglang")
            if not settings.disabled:
                ad = SGLangAdapter(scheduler, settings=settings)
                _current = weakref.ref(ad)
        except Exception as exc:
            log.exception(
                "enginetime: cannot set up SGLang recording (%s); this scheduler runs unrecorded", exc
            )
            ad = None
        scheduler.__dict__["_enginetime"] = ad
        return ad


def current() -> SGLangAdapter | None:
    return _current() if _current is not None else None


# ---------------------------------------------------------------------- AROUND hooks


def around_handle_generate_request(original: Any, self: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    out = original(self, recv_req, *args, **kwargs)
    ad = adapter_for(self)
    if ad is not None:
        ad.guard.call("sglang handle_generate_request hook", ad.on_request, recv_req)
    return out


def around_run_batch(original: Any, self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    ad = adapter_for(self)
    if ad is None or ad.recorder is None:
        return original(self, batch, *args, **kwargs)
    pre = ad.guard.call("sglang run_batch hook (reading the batch)", ad.begin, self, batch)
    try:
        result = original(self, batch, *args, **kwargs)
    except BaseException:
        if pre is not None:
            ad.guard.call("sglang run_batch hook", ad.abort, pre)
        raise
    if pre is not None:
        ad.guard.call("sglang run_batch hook", ad.after_run, self, batch, result, pre)
    return result


def around_launch_batch_sample_if_needed(
    original: Any, self: Any, batch_result: Any, *args: Any, **kwargs: Any
) -> Any:
    out = original(self, batch_result, *args, **kwargs)
    if batch_result is not None:
        ad = adapter_for(self)
        if ad is not None and ad.pending:
            ad.guard.call("sglang launch_batch_sample_if_needed hook", ad.after_sample, batch_result)
    return out


def around_process_batch_result(original: Any, self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    out = original(self, batch, *args, **kwargs)
    ad = adapter_for(self)
    if ad is not None and ad.recorder is not None:
        ad.guard.call("sglang process_batch_result hook", ad.after_process, batch)
    return out


def around_abort_request(original: Any, self: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    ad = adapter_for(self)
    waiting: list[Any] = []
    if ad is not None and ad.recorder is not None:
        try:
            waiting = [r for r in self.waiting_queue if r.rid in ad.handles]
        except Exception as exc:
            ad.guard.report("sglang abort_request hook", exc)
    out = original(self, recv_req, *args, **kwargs)
    if waiting and ad is not None:
        adapter = ad  # (a closure does not see the narrowing of ``ad``)

        def gone() -> None:
            still = {id(r) for r in self.waiting_queue}
            for req in waiting:
                if id(req) not in still:
                    adapter.terminal(req, aborted=True)

        adapter.guard.call("sglang abort_request hook", gone)
    return out


def around_retract_decode(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    out = original(self, *args, **kwargs)
    ad = current()
    if ad is not None:
        ad.guard.call("sglang retract_decode hook", lambda: ad.on_retracted(out[0]))
    return out


#: What the adapter reads off SGLang's objects, by class name ("a|b": either one, for
#: names that differ between releases). Checked against each release's source in
#: tests/test_adapter_sglang.py; every read is a getattr with a fallback, so a name
#: missing in some release degrades one field, never the engine.
READS: dict[str, tuple[str, ...]] = {
    "Scheduler": (
        "server_args",
        "enable_overlap",
        "forward_stream",
        "forward_ct",
        "waiting_queue",
        "handle_generate_request",
        "run_batch",
        "launch_batch_sample_if_needed",
        "process_batch_result",
        "abort_request",
    ),
    "ServerArgs": ("tokenizer_worker_num", "dp_size", "enable_dp_attention"),
    "ScheduleBatch": (
        "forward_mode",
        "reqs",
        "extend_lens",
        "prefix_lens",
        "decoding_reqs",
        "global_num_tokens",
        "retract_decode",
    ),
    "Req": ("rid", "origin_input_ids", "output_ids", "cached_tokens", "finished_reason", "finished"),
    "TokenizedGenerateReqInput": (
        "rid",
        "input_ids",
        "session_id|session_params",
        "routed_dp_rank|data_parallel_rank",
    ),
    "GenerationBatchResult": ("delay_sample_func",),
    "FINISH_LENGTH": ("to_json",),
    "FINISH_ABORT": ("to_json",),
    "ForwardMode": ("EXTEND", "DECODE", "MIXED", "IDLE", "TARGET_VERIFY"),
}
#: Read only where get_parallel() is absent (SGLang before the runtime context).
READS_WITHOUT_RUNTIME_CONTEXT: dict[str, tuple[str, ...]] = {
    "Scheduler": ("attn_tp_rank", "attn_dp_rank", "dp_rank", "pp_rank"),
}
#: ParallelContext fields read through sglang.srt.runtime_context.get_parallel().
PARALLEL_FIELDS = (
    "attn_dp_size",
    "attn_dp_rank",
    "attn_tp_rank",
    "attn_cp_rank",
    "pp_rank",
    "dp_rank",
    "dp_size",
)

#: (target for HookRegistry, hook). Every one is an AROUND hook.
HOOKS: tuple[tuple[str, Any], ...] = (
    (f"{SCHEDULER}.handle_generate_request", around_handle_generate_request),
    (f"{SCHEDULER}.run_batch", around_run_batch),
    (f"{SCHEDULER}.launch_batch_sample_if_needed", around_launch_batch_sample_if_needed),
    (f"{SCHEDULER}.process_batch_result", around_process_batch_result),
    (f"{SCHEDULER}.abort_request", around_abort_request),
    (f"{SCHEDULE_BATCH}.retract_decode", around_retract_decode),
)


def install_direct() -> list[str]:
    """Patch the classes without SGLang's plugin system (SGLang < 0.5.11). Idempotent.

    Returns the targets patched now. A missing method is logged once and skipped.
    """
    import importlib

    done = []
    for target, hook in HOOKS:
        module_name, cls_name, attr = target.rsplit(".", 2)
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            original = cls.__dict__.get(attr) or getattr(cls, attr)
        except Exception as exc:
            _guard.report(f"cannot hook {target}", exc)
            continue
        if getattr(original, "__enginetime_hook__", None) is not None:
            continue

        def make(orig: Any = original, h: Any = hook) -> Any:
            @functools.wraps(orig)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return h(orig, *args, **kwargs)

            wrapper.__enginetime_hook__ = h  # type: ignore[attr-defined]
            return wrapper

        setattr(cls, attr, make())
        done.append(target)
    return done
