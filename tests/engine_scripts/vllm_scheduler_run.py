"""Drive vLLM's real v1 scheduler, wrapped by our scheduler class, through a scenario.

Runs inside the vLLM engine venv (tests/engine_envs.py), as a subprocess of
tests/test_adapter_vllm.py, with our package importable through the shim and
ENGINETIME_INGEST pointing at the test's listening socket. No model runs: each
step's ``ModelRunnerOutput`` is made by hand (one sampled token for every request
whose scheduled tokens reach the end of its known tokens), exactly what
``update_from_output`` would get from a worker.

Scenario (block size 16, 48-token step budget, chunked prefill, prefix caching):
  * ``long``: 120-token prompt -> prefilled in chunks, then decodes, finishes by length;
  * ``share``: arrives after ``long``'s prompt is cached, shares its first 64 tokens
    -> a prefix-cache hit of 64 tokens;
  * ``grow-*``: with ``--preempt``, enough requests on a small KV cache that a
    decode cannot get a block and vLLM preempts the newest request (recompute);
  * ``gone``: aborted by the client (finish_requests) while running.

With ``--async`` the engine loop is emulated the way vLLM's batch queue runs it:
step N+1 is scheduled before step N's output is applied.

Prints one JSON line: what the scheduler actually scheduled (read from each
``SchedulerOutput``), which requests finished how, and plugin-loader facts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import deque


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--async", dest="async_", action="store_true")
    ap.add_argument("--preempt", action="store_true")
    ap.add_argument("--blocks", type=int, default=64)
    args = ap.parse_args()
    t0 = time.monotonic()

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    import vllm
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.plugins import load_general_plugins
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    # vLLM's own plugin loader finds our entry point (the shim's dist-info) and runs it.
    load_general_plugins()
    from enginetime.engine_hooks.vllm import worker as et_worker

    block = 16
    model_dir = tempfile.mkdtemp(prefix="et-vllm-model-")
    with open(os.path.join(model_dir, "config.json"), "w") as fh:
        json.dump(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": 1000,
                "max_position_embeddings": 4096,
                "torch_dtype": "float32",
                "rms_norm_eps": 1e-5,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            fh,
        )
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, max_model_len=1024, dtype="float32")
    sched_name = "AsyncScheduler" if args.async_ else "Scheduler"
    scheduler_config = SchedulerConfig(
        max_model_len=1024,
        is_encoder_decoder=False,
        max_num_batched_tokens=48,
        max_num_seqs=8,
        enable_chunked_prefill=True,
        async_scheduling=args.async_,
        scheduler_cls=f"enginetime.engine_hooks.vllm.scheduler.{sched_name}",
    )
    cache_config = CacheConfig(block_size=block, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = args.blocks  # what the engine sets after profiling memory
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        device_config=DeviceConfig(device="cpu"),
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=args.blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer.0"],
                FullAttentionSpec(block_size=block, num_kv_heads=4, head_size=16, dtype=torch.float32),
            )
        ],
    )
    # The class vLLM itself resolves from --scheduler-cls (our lazily built subclass).
    scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
    sched = scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block,
        log_stats=True,
    )

    init_none_hash(sha256)
    hasher = get_request_block_hasher(block, sha256)
    prompts: dict[str, list[int]] = {}
    max_tokens: dict[str, int] = {}

    def add(rid: str, ids: list[int], n_out: int, session: str | None = None) -> None:
        prompts[rid] = ids
        max_tokens[rid] = n_out
        req = Request(
            rid,
            ids,
            SamplingParams(max_tokens=n_out, ignore_eos=True),
            None,
            arrival_time=time.time(),
            block_hasher=hasher,
            session_id=session,
            trace_headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"},
        )
        sched.add_request(req)

    shared = list(range(1, 65))  # the first 64 tokens (4 full blocks) of `long`
    steps: list[dict] = []
    finished: dict[str, dict] = {}
    queue: deque = deque()

    def make_output(out) -> ModelRunnerOutput:
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            # a step samples a token unless it is a partial prefill chunk
            sampled.append([] if sched.requests[rid].is_prefill_chunk else [7])
        return ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled
        )

    def record_schedule(out) -> None:
        cached = out.scheduled_cached_reqs
        before = {nr.req_id: nr.num_computed_tokens for nr in out.scheduled_new_reqs}
        before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        steps.append(
            {
                "scheduled": dict(out.num_scheduled_tokens),
                "new": {nr.req_id: nr.num_computed_tokens for nr in out.scheduled_new_reqs},
                "before": before,
                "resumed": sorted(getattr(cached, "resumed_req_ids", ()) or ()),
                "preempted": sorted(out.preempted_req_ids or ()),
            }
        )

    def apply(out, mro) -> None:
        result = sched.update_from_output(out, mro)
        for eco in result.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = {"reason": str(o.finish_reason)}

    def step() -> bool:
        if sched.has_requests():
            out = sched.schedule()
            record_schedule(out)
            queue.appendleft((out, make_output(out)))
            if args.async_ and len(queue) < 2:
                return True
        if not queue:
            return False
        out, mro = queue.pop()
        apply(out, mro)
        return True

    add("long", list(range(1, 121)), 4, session="s-long")
    n = 0
    while "long" not in finished and n < 100:
        step()
        n += 1
        if n == 2:
            add("gone", list(range(500, 540)), 50)
        if n == 4 and "gone" in sched.requests:
            sched.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
            finished["gone"] = {"reason": "abort"}
    add("share", shared + list(range(900, 910)), 3, session="s-share")
    # A request the way the engine core gets it: the user's X-Request-Id in
    # external_req_id, vLLM's internal id with a random suffix, a requested DP rank.
    from vllm.v1.engine import EngineCoreRequest

    internal = "user-42-1a2b3c4d"
    ecr = EngineCoreRequest(
        request_id=internal,
        prompt_token_ids=list(range(3000, 3020)),
        mm_features=None,
        sampling_params=SamplingParams(max_tokens=2, ignore_eos=True),
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=0,
        external_req_id="user-42",
    )
    req = Request.from_engine_core_request(ecr, hasher)  # patched by our plugin: keeps the user's id
    prompts[internal] = list(ecr.prompt_token_ids)
    max_tokens[internal] = 2
    sched.add_request(req)
    if args.preempt:
        for i in range(4):
            add(f"grow-{i}", list(range(2000 + 100 * i, 2000 + 100 * i + 60)), 40)
    while (sched.has_requests() or queue) and n < 2000:
        step()
        n += 1
    while queue:
        step()

    # The worker-side hooks apply when a process imports these modules (post-import hook).
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.worker.gpu_worker  # noqa: F401

    recording = sched._enginetime
    # The DP engine core's step counter becomes global_step: link a real DPEngineCoreProc
    # (not started: made without __init__) through the patched _process_engine_step.
    from vllm.v1.engine.core import DPEngineCoreProc

    core = DPEngineCoreProc.__new__(DPEngineCoreProc)
    core.scheduler, core.step_counter, core.current_wave = sched, 5, 3
    try:
        core._process_engine_step()
    except Exception:
        pass  # the real step needs a running engine; the link is made before it runs
    global_step = recording.global_step()
    rec = recording.recorder
    flushed = rec.flush(10.0)
    stats = rec.stats()
    rec.close(5.0)
    print(
        json.dumps(
            {
                "vllm_version": vllm.__version__,
                "scheduler_mro": [c.__module__ + "." + c.__qualname__ for c in type(sched).__mro__[:4]],
                "prompts": {k: len(v) for k, v in prompts.items()},
                "max_tokens": max_tokens,
                "steps": steps,
                "finished": finished,
                "flushed": flushed,
                "errors": stats.errors,
                "dropped": stats.dropped_frames,
                "unpaired": recording.unpaired,
                "repeats": recording.repeats,
                "decode_reads": recording.decode_reads,
                "mixed_reads": recording.mixed_reads,
                "patched": sorted(et_worker.patched),
                "worker_timing": recording.worker_timing,
                "external": {internal: getattr(req, "_enginetime_external_id", None)},
                "external_dp_rank": getattr(req, "_enginetime_dp_rank", None),
                "global_step": global_step,
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
