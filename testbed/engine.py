"""The testbed engine: N data-parallel shards, each a scheduler thread over one model.

Coupling (DESIGN.md §2):

* ``INDEPENDENT`` — every shard loops on its own and sleeps when it has no work.
* ``LOCKSTEP`` — emulates DP attention in front of MoE layers: every step ends in a
  barrier that all shards reach (the collective), so a step lasts as long as the
  slowest shard's. While any shard has work the others run IDLE steps (SGLang's
  idle batches); when no shard has work every shard sleeps on a condition. Before
  the barrier each shard writes its token count into a shared list; the barrier
  action snapshots it (``peer_tokens``, SGLang's ``global_num_tokens``) together with
  the shared ``global_step`` and the decision whether to sleep, so every shard
  takes the same decision at the same step and none can deadlock another.

Threads: torch releases the GIL inside its kernels, so shard threads compute in
parallel. Each op gets ``intra_op_threads`` threads (default: cores // shards, at
least 1): with 4 shards on 2 cores, 1 thread per op keeps the OS from
time-slicing 8 busy OpenMP threads onto 2 cores, which would make one shard's
prefill slow down its peers' decodes for reasons that have nothing to do with the
coupling being demonstrated. ``torch.set_num_threads`` is process-wide.

Every forward is one step: ``step_begin`` before it, ``step_end`` after the barrier
(the wait for peers is part of a lockstep step, as it is inside a real collective).
The engine keeps its own bounded step log (``Engine.step_log``), measured the same
way with or without hooks, for the demo's per-shard throughput.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from enginetime.engine_hooks import Coupling, StepKind

from .adapter import ShardHooks
from .model import ModelConfig, TinyTransformer
from .scheduler import POLICIES, Plan, Request, Scheduler, Status

log = logging.getLogger("enginetime.testbed")

#: Default model: on 2 CPU cores (1 intra-op thread per shard) a 512-token prefill
#: chunk takes ~65 ms at short context and ~230 ms at 16K, a decode step of a few
#: requests ~4 ms — the ≥10x ratio the incident needs. Attention is narrow
#: (4 heads x 32) so that a 16K-token storm prefills in ~5 s, not minutes.
DEFAULT_MODEL = ModelConfig()


class InvalidRequest(ValueError):
    """The request cannot be served as sent (HTTP 400); the message says why and what to send."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


@dataclass
class EngineConfig:
    num_shards: int = 4
    coupling: Coupling | str = Coupling.LOCKSTEP
    policy: str = "prefill-first"
    chunk_size: int = 512
    max_running_requests: int = 1024
    prefix_cache_tokens: int = 1 << 18  # per shard
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    hooks: bool = True
    ingest: str | None = None  # None: $ENGINETIME_INGEST or the default socket
    engine_id: str = "testbed"
    intra_op_threads: int = 0  # 0: max(1, cores // num_shards)
    step_log_size: int = 50_000  # per shard

    def __post_init__(self) -> None:
        self.coupling = Coupling.parse(self.coupling)
        if self.coupling not in (Coupling.INDEPENDENT, Coupling.LOCKSTEP):
            raise ValueError("coupling must be 'independent' or 'lockstep'")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be ≥ 1, got {self.num_shards}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be ≥ 1, got {self.chunk_size}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


@dataclass(slots=True, frozen=True)
class StepLog:
    """One step of one shard as the engine saw it (perf_counter seconds)."""

    shard: int
    seq: int
    global_step: int | None
    kind: StepKind
    start: float
    end: float
    rids: tuple[str, ...]
    prefill_tokens: tuple[int, ...]
    decode_tokens: tuple[int, ...]
    context_tokens: tuple[int, ...]

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def decoded(self) -> int:
        return sum(self.decode_tokens)

    @property
    def prefilled(self) -> int:
        return sum(self.prefill_tokens)


@dataclass(slots=True, frozen=True)
class _Group:
    """What the lockstep barrier action decided for the step that just ended."""

    step: int
    tokens: tuple[int, ...]
    sleep: bool
    epoch: int
    stop: bool


class Shard:
    """One DP rank: a scheduler, its hooks, and the thread that runs its steps."""

    def __init__(self, engine: Engine, index: int) -> None:
        cfg = engine.config
        self.engine = engine
        self.index = index
        self.sched = Scheduler(
            engine.model,
            policy=cfg.policy,
            chunk_size=cfg.chunk_size,
            max_running_requests=cfg.max_running_requests,
            prefix_cache_tokens=cfg.prefix_cache_tokens,
        )
        self.hooks: ShardHooks | None = None
        if cfg.hooks:
            self.hooks = ShardHooks(
                cfg.engine_id,
                index,
                cfg.num_shards,
                Coupling.parse(cfg.coupling),  # a Coupling already (__post_init__); typed for the checker
                address=cfg.ingest,
                timer="cuda" if engine.cuda else "cpu",
            )
        self.inbox: list[Request] = []  # guarded by engine._cv
        self.aborts: list[Request] = []  # guarded by engine._cv
        self.load = 0  # live requests routed here; guarded by engine._cv
        self.seq = 0
        self.step_log: deque[StepLog] = deque(maxlen=cfg.step_log_size)
        self.stream = torch.cuda.Stream(device=engine.device) if engine.cuda else None
        self.thread = threading.Thread(target=self._main, name=f"testbed-shard-{index}", daemon=True)
        self.error: BaseException | None = None

    def has_work_locked(self) -> bool:
        return bool(self.inbox) or bool(self.aborts) or self.sched.has_work()

    # ------------------------------------------------------------------ thread

    def _main(self) -> None:
        try:
            if self.stream is not None:
                # All of this thread's CUDA work (KV copies in the prefix cache included) goes on
                # the shard's own stream, so ordering within a shard needs no cross-stream sync.
                torch.cuda.set_stream(self.stream)
            with torch.inference_mode():
                if self.engine.config.coupling is Coupling.LOCKSTEP:
                    self._run_lockstep()
                else:
                    self._run_independent()
        except threading.BrokenBarrierError:
            pass  # shutdown
        except BaseException as exc:  # a bug: say so, release peers, fail requests
            self.error = exc
            log.exception("testbed shard %d crashed", self.index)
            self.engine._fail(f"shard {self.index} crashed: {exc!r}")

    def _run_independent(self) -> None:
        eng = self.engine
        while True:
            with eng._cv:
                while not eng._stop and not self.has_work_locked():
                    eng._cv.wait()
                if eng._stop:
                    return
            self._step(None)

    def _run_lockstep(self) -> None:
        eng = self.engine
        slept_at = 0
        while True:
            with eng._cv:
                while not eng._stop and eng._wake_epoch <= slept_at:
                    eng._cv.wait()
                if eng._stop:
                    return
            while True:
                group = self._step(eng._barrier)
                if group is None or group.stop:
                    return
                if group.sleep:
                    slept_at = group.epoch
                    break

    # ------------------------------------------------------------------ one step

    def _drain(self) -> None:
        """Take new requests and aborts handed over by other threads."""
        eng = self.engine
        with eng._cv:
            new, self.inbox = self.inbox, []
            aborts, self.aborts = self.aborts, []
        for req in new:
            if req.abort_requested:
                req.status = Status.ABORTED
                req.finish_reason = "abort"
                req.finish_message = "aborted before it was scheduled"
                self._release(req, aborted=True)
            else:
                self.sched.waiting.append(req)
        for req in aborts:
            if self.sched.remove(req, "abort", "aborted by /abort_request"):
                self._release(req, aborted=True)

    def _forward(self, plan: Plan) -> list[int]:
        sched = self.sched
        # greedy() ends in .tolist(): the engine needs the tokens now (on CUDA, a stream sync
        # before the lockstep barrier, as a real collective would wait for the GPU).
        return sched.model.greedy(sched.model.forward(sched.forward_inputs(plan)))

    def _step(self, barrier: threading.Barrier | None) -> _Group | None:
        eng = self.engine
        hooks = self.hooks
        self._drain()
        plan = self.sched.plan()
        if barrier is None and not plan.entries:
            return None  # independent shard with nothing runnable (e.g. only an abort)
        if hooks is not None:
            for req in plan.admitted:
                hooks.scheduled(req)
        token = hooks.step_begin(self.stream) if hooks is not None else None
        start = time.perf_counter()
        finished: list[Request] = []
        failed: list[Request] = []
        if plan.entries:
            try:
                finished = self.sched.complete(plan, self._forward(plan))
            except Exception as exc:  # never take the shard (and its lockstep peers) down
                log.exception("testbed shard %d: forward failed", self.index)
                for e in plan.entries:
                    if self.sched.remove(e.req, "abort", f"engine error: {exc}"):
                        failed.append(e.req)
        group = None
        if barrier is not None:
            eng._tokens[self.index] = plan.num_tokens
            barrier.wait()  # BrokenBarrierError on shutdown: handled in _main
            group = eng._group
        end = time.perf_counter()
        if hooks is not None:
            if group is not None:
                hooks.step_end(token, plan, global_step=group.step, peer_tokens=group.tokens)
            else:
                hooks.step_end(token, plan)
        entries = plan.entries
        self.step_log.append(
            StepLog(
                self.index,
                self.seq,
                None if group is None else group.step,
                plan.kind if entries else StepKind.IDLE,
                start,
                end,
                tuple(e.req.rid for e in entries),
                tuple(e.prefill_tokens for e in entries),
                tuple(e.decode_tokens for e in entries),
                tuple(e.context_tokens for e in entries),
            )
        )
        self.seq += 1
        for e in entries:
            e.req.note_step(end)
        for req in finished:
            self._release(req, aborted=False)
        for req in failed:
            self._release(req, aborted=True)
        if eng._progress_waiters:
            with eng._progress:
                eng._progress.notify_all()
        return group

    def _release(self, req: Request, *, aborted: bool) -> None:
        """A request left the shard: report it, forget it, wake whoever waits for it."""
        if self.hooks is not None:
            if aborted:
                self.hooks.aborted(req)
            else:
                self.hooks.finished(req)
        req.finish_perf = time.perf_counter()
        self.engine._forget(req, self)
        req.done.set()


class Engine:
    """The testbed engine. Thread-safe: submit/abort from any thread (HTTP handlers)."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.cuda = cfg.device.startswith("cuda")
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch reports no CUDA device here; use --device cpu")
        self.device = torch.device(cfg.device)
        threads = cfg.intra_op_threads or max(1, (os.cpu_count() or 1) // cfg.num_shards)
        torch.set_num_threads(threads)
        self.intra_op_threads = threads
        self.model = TinyTransformer(cfg.model, device=self.device)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._cv = threading.Condition()
        self._progress = threading.Condition()
        self._progress_waiters = 0
        self._stop = False
        self._closed = False
        self._started = False
        self._wake_epoch = 0
        self._live: dict[str, Request] = {}
        self._rr = 0
        self._tokens = [0] * cfg.num_shards
        self._global_step = 0
        self._group = _Group(-1, (), True, 0, False)
        self._barrier = (
            threading.Barrier(cfg.num_shards, action=self._after_group)
            if cfg.coupling is Coupling.LOCKSTEP
            else None
        )
        self.shards = [Shard(self, k) for k in range(cfg.num_shards)]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if not self._started:
            self._started = True
            _LIVE_ENGINES.add(self)
            for sh in self.shards:
                sh.thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every shard, abort what is left (clients get finish_reason abort), close hooks."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._stop = True
            self._cv.notify_all()
        if self._barrier is not None:
            self._barrier.abort()
        deadline = time.monotonic() + timeout_s
        for sh in self.shards:
            if sh.thread.is_alive():
                sh.thread.join(max(0.0, deadline - time.monotonic()))
        self._fail("engine shut down")
        for sh in self.shards:
            if sh.hooks is not None:
                sh.hooks.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, message: str) -> None:
        """Abort every live request (shutdown or a crashed shard) and release lockstep peers."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            live = list(self._live.values())
        if self._barrier is not None:
            self._barrier.abort()
        for req in live:
            if req.done.is_set():
                continue
            req.status = Status.ABORTED
            req.finish_reason = "abort"
            req.finish_message = message
            sh = self.shards[req.shard]
            if sh.hooks is not None:
                sh.hooks.aborted(req)
            req.finish_perf = time.perf_counter()
            self._forget(req, sh)
            req.done.set()

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 128,
        *,
        rid: str | None = None,
        routed_shard: int | None = None,
        session_id: str = "",
        traceparent: str = "",
    ) -> Request:
        """Queue a generate request; returns it at once (``req.wait()`` for the result).

        Raises InvalidRequest (bad ids, lengths, shard) with a message for the client.
        """
        cfg = self.config
        ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidRequest(
                f"sampling_params.max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}"
            )
        total = len(ids) + max_new_tokens
        if total > cfg.model.max_context:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {cfg.model.max_context} tokens; send fewer tokens"
            )
        if routed_shard is not None and (
            isinstance(routed_shard, bool)
            or not isinstance(routed_shard, int)
            or not 0 <= routed_shard < cfg.num_shards
        ):
            raise InvalidRequest(
                f"routed_dp_rank must be an integer in 0..{cfg.num_shards - 1} (this engine has "
                f"{cfg.num_shards} DP shards), got {routed_shard!r}"
            )
        if rid is None:
            rid = uuid.uuid4().hex
        elif not isinstance(rid, str) or not rid:
            raise InvalidRequest(f"rid must be a non-empty string, got {rid!r}")
        with self._cv:
            if self._closed or self._stop:
                raise EngineClosed("the engine is shutting down")
            if rid in self._live:
                raise InvalidRequest(f"rid {rid!r} is already running; request ids must be unique")
            shard = self.shards[routed_shard] if routed_shard is not None else self._least_loaded()
            req = Request(
                rid,
                ids,
                max_new_tokens,
                shard.index,
                session_id=session_id or "",
                traceparent=traceparent or "",
                routed_shard=routed_shard,
            )
            self._live[rid] = req
            shard.load += 1
        if shard.hooks is not None:
            shard.hooks.arrived(req)  # before the shard can put it in a step
        with self._cv:
            shard.inbox.append(req)
            self._wake_epoch += 1
            self._cv.notify_all()
        return req

    def generate(
        self, input_ids: Sequence[int], max_new_tokens: int = 128, *, timeout: float | None = None, **kwargs
    ) -> Request:
        """submit + wait: the finished request (TimeoutError when it is not done in time)."""
        req = self.submit(input_ids, max_new_tokens, **kwargs)
        if not req.wait(timeout):
            raise TimeoutError(f"request {req.rid} did not finish within {timeout} s")
        return req

    def _check_ids(self, input_ids: Sequence[int]) -> list[int]:
        vocab = self.config.model.vocab_size
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
            raise InvalidRequest("input_ids must be a list of token ids (integers)")
        if not input_ids:
            raise InvalidRequest("input_ids is empty: send at least one token id")
        ids = list(input_ids)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidRequest(f"input_ids[{i}] is {t!r}: token ids must be integers")
            if not 0 <= t < vocab:
                raise InvalidRequest(f"input_ids[{i}] = {t} is outside the vocabulary 0..{vocab - 1}")
        return ids

    def _least_loaded(self) -> Shard:
        n = len(self.shards)
        start = self._rr
        self._rr = (self._rr + 1) % n
        return min((self.shards[(start + i) % n] for i in range(n)), key=lambda s: s.load)

    def abort(self, rid: str) -> bool:
        """Abort a live request (its client gets finish_reason abort). False: no such live request."""
        with self._cv:
            req = self._live.get(rid)
            if req is None:
                return False
            req.abort_requested = True
            self.shards[req.shard].aborts.append(req)
            self._wake_epoch += 1
            self._cv.notify_all()
        return True

    def abort_all(self) -> int:
        with self._cv:
            rids = list(self._live)
        return sum(self.abort(r) for r in rids)

    def get(self, rid: str) -> Request | None:
        with self._cv:
            return self._live.get(rid)

    def _forget(self, req: Request, shard: Shard) -> None:
        with self._cv:
            if self._live.get(req.rid) is req:
                del self._live[req.rid]
                shard.load -= 1

    # ------------------------------------------------------------------ lockstep

    def _after_group(self) -> None:
        """Barrier action (runs once per lockstep step, every shard waiting): snapshot and decide."""
        with self._cv:
            work = any(sh.has_work_locked() for sh in self.shards)
            self._group = _Group(
                self._global_step,
                tuple(self._tokens),
                not work and not self._stop,
                self._wake_epoch,
                self._stop,
            )
            self._global_step += 1

    # ------------------------------------------------------------------ observation

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until predicate() is true, re-checked after every step of any shard."""
        deadline = time.monotonic() + timeout
        with self._progress:
            self._progress_waiters += 1
            try:
                while not predicate():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._progress.wait(min(left, 0.05))
                return True
            finally:
                self._progress_waiters -= 1

    def step_log(self, shard: int | None = None) -> list[StepLog]:
        """Recent steps of one shard (or all, by start time)."""
        if shard is not None:
            return list(self.shards[shard].step_log)
        out = [s for sh in self.shards for s in list(sh.step_log)]
        out.sort(key=lambda s: (s.start, s.shard))
        return out

    def flush_hooks(self, timeout_s: float = 5.0) -> bool:
        ok = True
        for sh in self.shards:
            if sh.hooks is not None:
                ok = sh.hooks.flush(timeout_s) and ok
        return ok

    def info(self) -> dict:
        cfg = self.config
        shards = []
        for sh in self.shards:
            pc = sh.sched.prefix_cache
            shards.append(
                {
                    "shard": sh.index,
                    "load": sh.load,
                    "steps": sh.seq,
                    "waiting": len(sh.sched.waiting),
                    "running": len(sh.sched.running),
                    "prefix_cache_tokens": pc.tokens,
                    "prefix_cache_hits": pc.hits,
                    "prefix_cache_hit_tokens": pc.hit_tokens,
                    "hooks": None if sh.hooks is None else _stats_dict(sh.hooks),
                }
            )
        return {
            "engine": "enginetime-testbed",
            "engine_id": cfg.engine_id,
            "dp_size": cfg.num_shards,
            "coupling": Coupling.parse(cfg.coupling).name.lower(),
            "policy": cfg.policy,
            "chunked_prefill_size": cfg.chunk_size,
            "max_running_requests": cfg.max_running_requests,
            "device": str(self.device),
            "intra_op_threads": self.intra_op_threads,
            "hooks": cfg.hooks,
            "model": cfg.model.to_dict(),
            "shards": shards,
        }


#: Engines still running at interpreter exit are closed first: a shard thread killed in the
#: middle of a torch op aborts the process ("terminate called without an active exception").
_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_engines_at_exit() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close(5.0)


def _stats_dict(hooks: ShardHooks) -> dict:
    st = hooks.stats()
    return {
        "connected": st.connected,
        "sent_frames": st.sent_frames,
        "dropped_frames": st.dropped_frames,
        "errors": st.errors,
        "address": st.address,
    }
