"""Load our SGLang plugin through SGLang's own loader and drive its hooks with real objects.

Runs inside the SGLang 0.5.23 engine venv (tests/engine_envs.py) as a subprocess of
tests/test_adapter_sglang.py, with our package importable through the shim and
ENGINETIME_INGEST pointing at the test's listening socket.

A whole ``Scheduler`` needs a model worker (not on a CPU machine), so:
* the plugin is loaded by ``sglang.srt.plugins.load_plugins()`` — SGLang's
  ``HookRegistry`` applies our AROUND hooks to the real classes;
* the scheduler is a real ``Scheduler`` instance made without ``__init__`` and given
  the few attributes a scheduler has by then (``forward_ct``, ``enable_overlap``,
  ``server_args``, ``waiting_queue``); the DP topology is published in SGLang's
  real ``ParallelContext`` (DP attention: this process is attention-DP rank 1 of 2);
* requests are real ``TokenizedGenerateReqInput`` / ``Req`` objects and batches real
  ``ScheduleBatch`` objects carrying the fields SGLang's ``prepare_for_extend`` /
  ``prepare_for_decode`` / ``mix_with_running`` set; results are real
  ``GenerationBatchResult`` objects;
* our hook functions are called the way ``HookRegistry``'s AROUND wrapper calls
  them, with a stand-in for the forward (``original``) that does what ``run_batch``
  does to the scheduler's counters.

Prints one JSON line with the expected steps/events (from the scenario, not from our
adapter) and plugin facts.
"""

from __future__ import annotations

import json
import os
import pkgutil
import sys
import time


def main() -> int:
    t0 = time.monotonic()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torchvision_standin

    torchvision_standin.install()

    import msgspec
    import sglang
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_parallel

    # DP attention, 2 attention-DP ranks; this scheduler is rank 1 (attention-TP rank 0).
    get_parallel().override_permanently(
        tp_size=2,
        attn_tp_size=1,
        attn_dp_size=2,
        attn_cp_size=1,
        attn_dp_rank=1,
        attn_tp_rank=0,
        attn_cp_rank=0,
        pp_rank=0,
        pp_size=1,
        dp_size=1,
        dp_rank=None,
    )

    import sglang.srt.managers.scheduler as scheduler_mod

    load_plugins()  # SGLang's own loader: finds our entry point, runs it, applies the hooks

    from enginetime.engine_hooks.sglang import hooks

    targets = {
        t: pkgutil.resolve_name(t.rsplit(".", 1)[0]).__dict__.get(t.rsplit(".", 1)[1]) is not None
        for t, _ in hooks.HOOKS
    }
    applied = sorted(t for t, _ in hooks.HOOKS if t in HookRegistry._patched)
    wrapped = sorted(
        t for t, _ in hooks.HOOKS if getattr(pkgutil.resolve_name(t), "__wrapped__", None) is not None
    )

    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
    from sglang.srt.managers.utils import GenerationBatchResult
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    Scheduler = scheduler_mod.Scheduler
    sched = Scheduler.__new__(Scheduler)
    sched.forward_ct = 0
    sched.enable_overlap = False
    sched.waiting_queue = []

    class _Args:  # the ServerArgs fields the adapter reads
        tokenizer_worker_num = 1
        dp_size = 1
        enable_dp_attention = True

    sched.server_args = _Args()

    def tokenized(rid: str, n: int, **kw) -> TokenizedGenerateReqInput:
        sp = SamplingParams(max_new_tokens=8)
        sp.normalize(None)
        values = {f.name: None for f in msgspec.structs.fields(TokenizedGenerateReqInput) if f.required}
        values.update(
            rid=rid,
            input_text="",
            input_ids=list(range(1, n + 1)),
            sampling_params=sp,
            return_logprob=False,
            logprob_start_len=-1,
            top_logprobs_num=0,
            stream=False,
            **kw,
        )
        return TokenizedGenerateReqInput(**values)

    def req(recv: TokenizedGenerateReqInput) -> Req:
        r = Req(recv.rid, "", list(recv.input_ids), recv.sampling_params, eos_token_ids={2}, vocab_size=1000)
        return r

    expected_steps: list[dict] = []
    results: list = []

    def run(batch: ScheduleBatch, *, delay: bool = False, expect: dict) -> GenerationBatchResult:
        def forward(self, b):  # what run_batch does to the counters; the model is not run
            self.forward_ct += 1
            b.forward_iter = self.forward_ct
            time.sleep(0.002)
            return GenerationBatchResult(delay_sample_func=(lambda: None) if delay else None)

        result = hooks.around_run_batch(forward, sched, batch)
        expect["global_step"] = sched.forward_ct
        expected_steps.append(expect)
        results.append(result)
        return result

    # -- arrivals (through the hook around handle_generate_request)
    recv_a = tokenized("a", 40, session_id="sess-a")
    recv_b = tokenized("b", 24, routed_dp_rank=0)  # pinned to rank 0, runs on rank 1
    recv_c = tokenized("c", 12, routed_dp_rank=1)
    for recv in (recv_a, recv_b, recv_c):
        hooks.around_handle_generate_request(lambda self, r: sched.waiting_queue.append(req(r)), sched, recv)
    ra, rb, rc = sched.waiting_queue
    sched.waiting_queue.remove(ra)
    sched.waiting_queue.remove(rb)

    # -- step 1: chunked prefill of a (32 of 40) + b with a 16-token prefix-cache hit
    run(
        ScheduleBatch(
            reqs=[ra, rb],
            forward_mode=ForwardMode.EXTEND,
            extend_lens=[32, 8],
            prefix_lens=[0, 16],
            global_num_tokens=[7, 40],
        ),
        expect={"kind": "PREFILL", "entries": {"a": [32, 0, 0], "b": [8, 0, 16]}, "peer": [7, 40]},
    )
    rb.output_ids.append(5)
    # -- step 2: mixed chunk: a's last 8 prompt tokens + b decoding in the same forward
    run(
        ScheduleBatch(
            reqs=[ra, rb],
            forward_mode=ForwardMode.MIXED,
            extend_lens=[8, 1],
            prefix_lens=[32, 24],
            decoding_reqs=[rb],
            global_num_tokens=[3, 9],
        ),
        expect={"kind": "MIXED", "entries": {"a": [8, 0, 32], "b": [0, 1, 24]}, "peer": [3, 9]},
    )
    ra.output_ids.append(6)
    rb.output_ids.append(6)
    # -- step 3: decode, overlap scheduling with delayed sampling: recorded at the sample launch.
    # The same requests as step 2: the adapter reads nothing per request and records a repeat
    # (its shipper expands it: context = step 2's context + what step 2 computed).
    sched.enable_overlap = True
    res3 = run(
        ScheduleBatch(reqs=[ra, rb], forward_mode=ForwardMode.DECODE, global_num_tokens=[2, 2]),
        delay=True,
        expect={"kind": "DECODE", "entries": {"a": [0, 1, 40], "b": [0, 1, 25]}, "peer": [2, 2]},
    )
    time.sleep(0.025)  # the previous batch's results are processed meanwhile; then sampling launches
    hooks.around_launch_batch_sample_if_needed(lambda self, r, b=None: None, sched, res3)
    sched.enable_overlap = False
    # -- step 4: the same requests decode again (a new ScheduleBatch, same Req objects): a repeat
    ra.output_ids.append(7)
    rb.output_ids.append(7)
    run(
        ScheduleBatch(reqs=[ra, rb], forward_mode=ForwardMode.DECODE, global_num_tokens=[2, 3]),
        expect={"kind": "DECODE", "entries": {"a": [0, 1, 41], "b": [0, 1, 26]}, "peer": [2, 3]},
    )
    # -- b is retracted for memory (preempted), then re-prefilled (resumed)
    retract_batch = ScheduleBatch(reqs=[ra, rb], forward_mode=ForwardMode.DECODE)
    hooks.around_retract_decode(lambda self: ([rb], 0.5, []), retract_batch)
    ra.output_ids.append(8)
    run(
        ScheduleBatch(reqs=[ra], forward_mode=ForwardMode.DECODE, global_num_tokens=[1, 1]),
        expect={"kind": "DECODE", "entries": {"a": [0, 1, 42]}, "peer": [1, 1]},
    )
    run(
        ScheduleBatch(
            reqs=[rb],
            forward_mode=ForwardMode.EXTEND,
            extend_lens=[26],
            prefix_lens=[0],
            global_num_tokens=[26, 0],
        ),
        expect={"kind": "PREFILL", "entries": {"b": [26, 0, 0]}, "peer": [26, 0]},
    )
    # -- an IDLE step: this rank has nothing, its peer prefills (the wait shows up here)
    run(
        ScheduleBatch(reqs=[], forward_mode=ForwardMode.IDLE, global_num_tokens=[0, 512]),
        expect={"kind": "IDLE", "entries": {}, "peer": [0, 512]},
    )
    # -- a finishes by length: reported after process_batch_result
    ra.finished_reason = FINISH_LENGTH(length=3)
    last = ScheduleBatch(reqs=[ra, rb], forward_mode=ForwardMode.DECODE)
    hooks.around_process_batch_result(lambda self, b, r: None, sched, last, results[-1])
    # -- c is aborted while still waiting in the queue
    hooks.around_abort_request(lambda self, r: sched.waiting_queue.remove(rc), sched, object())

    adapter = sched.__dict__["_enginetime"]
    rec = adapter.recorder
    flushed = rec.flush(10.0)
    stats = rec.stats()
    rec.close(5.0)
    print(
        json.dumps(
            {
                "sglang_version": sglang.__version__,
                "targets_exist": targets,
                "applied": applied,
                "wrapped": wrapped,
                "expected_steps": expected_steps,
                "expected_finished": {"a": {"reason": "length", "output_tokens": len(ra.output_ids)}},
                "expected_aborted": ["c"],
                "prompts": {"a": 40, "b": 24, "c": 12},
                "layout": [adapter.shard, adapter.num_shards, adapter.coupling, adapter.reports],
                "pinned_elsewhere": adapter.pinned_elsewhere,
                "repeats": adapter.repeats,
                "decode_reads": adapter.decode_reads,
                "errors": stats.errors,
                "guard_errors": adapter.guard.errors.count,
                "dropped": stats.dropped_frames,
                "flushed": flushed,
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
