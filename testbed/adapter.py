"""The testbed's engine_hooks adapter: what an SGLang/vLLM adapter does, for this engine.

One Recorder per shard. The engine calls the adapter at the same points a real
adapter hooks: request arrival (HTTP thread), admission into the running batch
(with the prefix-cache hits known then), one step record per forward per shard
(columns built from the step's batch; ``global_step`` and ``peer_tokens`` on
LOCKSTEP shards), and finish/abort. The engine never sees the Recorder itself,
so ``--no-hooks`` is simply "no adapter".

``shard_thread_ns`` sums the time the shard thread spent inside the adapter (two
clock reads per call): the hooks' direct cost to the engine loop, which the
overhead benchmark reports next to the throughput ratio.
"""

from __future__ import annotations

import time
from typing import Any

from enginetime import __version__
from enginetime.engine_hooks import Coupling, Recorder, RecorderStats, StepKind

from .scheduler import Plan, Request


class ShardHooks:
    """engine_hooks calls for one shard; every method is cheap and never raises."""

    def __init__(
        self,
        engine_id: str,
        shard: int,
        num_shards: int,
        coupling: Coupling,
        *,
        address: str | None,
        timer: str = "auto",
        start: bool = True,
    ) -> None:
        self.recorder = Recorder(
            engine_id,
            shard=shard,
            num_shards=num_shards,
            coupling=coupling.name.lower(),
            address=address,
            engine_kind="testbed",
            engine_version=__version__,
            timer=timer,
            start=start,
        )
        self.shard_thread_ns = 0  # time the shard thread spent in this adapter
        self.repeats = 0  # decode steps recorded with step_repeat (the batch of the step before)
        self._prev: list[Request] = []  # the requests of the last step recorded

    # requests ---------------------------------------------------------------

    def arrived(self, req: Request) -> None:
        req.handle = self.recorder.request_arrived(
            req.rid,
            prompt_tokens=req.prompt_tokens,
            session_id=req.session_id,
            traceparent=req.traceparent,
            routed_shard=req.routed_shard,
            time_ns=req.arrival_ns,
        )

    def scheduled(self, req: Request) -> None:
        t = time.perf_counter_ns()
        self.recorder.request_scheduled(req.handle, cached_tokens=req.cached_tokens)
        self.shard_thread_ns += time.perf_counter_ns() - t

    def finished(self, req: Request) -> None:
        t = time.perf_counter_ns()
        self.recorder.request_finished(
            req.handle, reason=req.finish_reason or "stop", output_tokens=len(req.output_ids)
        )
        self.shard_thread_ns += time.perf_counter_ns() - t

    def aborted(self, req: Request) -> None:
        self.recorder.request_aborted(
            req.handle, reason=req.finish_reason or "abort", output_tokens=len(req.output_ids)
        )

    # steps ------------------------------------------------------------------

    def step_begin(self, stream: Any = None) -> Any:
        t = time.perf_counter_ns()
        token = self.recorder.step_begin(stream)
        self.shard_thread_ns += time.perf_counter_ns() - t
        return token

    def step_end(
        self,
        token: Any,
        plan: Plan,
        *,
        global_step: int | None = None,
        peer_tokens: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        t = time.perf_counter_ns()
        entries = plan.entries
        reqs = [e.req for e in entries]
        # A decode step of the same requests as the step before (every entry decodes one
        # token, and its context is the last one plus what that step computed): a repeat,
        # as the SGLang and vLLM adapters record their steady decode steps.
        if (
            entries
            and plan.kind == StepKind.DECODE
            and reqs == self._prev
            and self.recorder.step_repeat(token, global_step=global_step, peer_tokens=peer_tokens)
        ):
            self.repeats += 1
        else:
            self.recorder.step_end(
                token,
                kind=plan.kind if entries else StepKind.IDLE,
                handles=[r.handle for r in reqs],
                prefill_tokens=[e.prefill_tokens for e in entries],
                decode_tokens=[e.decode_tokens for e in entries],
                context_tokens=[e.context_tokens for e in entries],
                global_step=global_step,
                peer_tokens=peer_tokens,
            )
        self._prev = reqs
        self.shard_thread_ns += time.perf_counter_ns() - t

    # lifecycle --------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.recorder.flush(timeout_s)

    def stats(self) -> RecorderStats:
        return self.recorder.stats()

    def close(self, timeout_s: float = 1.0) -> None:
        self.recorder.close(timeout_s)
