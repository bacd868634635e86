"""The SGLang and vLLM adapters' own per-step cost, on objects shaped like the engines'.

The adapters read a batch off the engine's objects by attribute; these stand-ins carry
exactly the attributes the adapters read (the real classes need the engines' CUDA
builds to construct in bulk; the adapter tests run the same adapter code on the real
classes, tests/test_adapter_sglang.py and tests/test_adapter_vllm.py). Each step is
timed on the calling thread from the first hook of the step to the last:

* SGLang: ``around_run_batch``'s two halves (``begin`` before the forward,
  ``after_run`` after it) and ``after_process`` (``process_batch_result``);
* vLLM: ``on_schedule`` (after ``Scheduler.schedule``) and ``on_update`` (after
  ``update_from_output``).

"unchanged": a decode batch of the same requests as the step before, which the
adapters record as a repeat; "changed": every step one request leaves and another
joins, so the batch is read in full each time (the cost before repeat steps, and of
any step whose batch changed). vLLM also "mixed": the unchanged decodes plus a new
request's whole 100-token prompt in one schedule, the step vLLM's chunked prefill makes
whenever a request arrives (its decodes are read in C, the new request one by one).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from enginetime.engine_hooks import Recorder
from enginetime.engine_hooks.adapter_common import AdapterSettings
from enginetime.engine_hooks.sglang.hooks import SGLangAdapter
from enginetime.engine_hooks.vllm.recording import VllmRecording


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name


class SGReq:
    """The Req attributes the SGLang adapter reads."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.origin_input_ids = list(range(100))
        self.output_ids = [1] * 50
        self.cached_tokens = 0
        self.finished_reason = None
        self.is_retracted = False

    def finished(self) -> bool:
        return self.finished_reason is not None


class _Holder:
    """A weak-referenceable attribute bag (the vLLM adapter holds its scheduler weakly)."""


class VReq:
    """The vLLM Request attributes the adapter reads."""

    def __init__(self, rid: str) -> None:
        self.request_id = rid
        self.num_prompt_tokens = 100
        self.num_tokens = 150
        self.num_computed_tokens = 149
        self.arrival_time = time.time()
        self.num_output_tokens = 50
        self.status = SimpleNamespace(name="RUNNING")

    def is_finished(self) -> bool:
        return False


def _time_blocks(
    rec: Recorder,
    steps: int,
    step: Callable[[str, int, int], Callable[[], None]],
    labels: tuple[str, ...] = ("unchanged", "changed"),
) -> dict:
    """Median µs of ``step``'s timed part, blocks of 100 steps of each label in turn.

    ``step(label, i, n)`` prepares step ``n`` (untimed: what the engine does between
    hooks) and returns the hooks' calls, which are timed. The first two steps of a block
    change over from the other kind and are not counted.
    """
    out: dict[str, list[int]] = {label: [] for label in labels}
    perf = time.perf_counter_ns
    done = 0
    while done < steps:
        for label, times in out.items():
            for i in range(100):
                hooks = step(label, i, done)
                t0 = perf()
                hooks()
                t1 = perf()
                if i >= 2:
                    times.append(t1 - t0)
                done += 1
        rec.flush(10)
    return {k: statistics.median(v) / 1e3 for k, v in out.items()}


def sglang_steps(address: str, batch: int, steps: int) -> dict[str, float]:
    """Median µs per step of the SGLang adapter, batch unchanged and changed every step."""
    rec = Recorder("bench-sglang", address=address, timer="cpu", engine_kind="bench")
    try:
        sched: Any = _Holder()
        sched.server_args = SimpleNamespace(port=1, tokenizer_worker_num=1)
        sched.enable_overlap = False
        ad = SGLangAdapter(sched, settings=AdapterSettings.from_env("sglang"), recorder=rec)
        reqs = [SGReq(f"sg{batch}-{i}") for i in range(batch + 1)]
        for r in reqs:
            ad.on_request(SimpleNamespace(rid=r.rid, input_ids=r.origin_input_ids, session_id="s"))
        decode = _Mode("DECODE")
        a = SimpleNamespace(forward_mode=decode, reqs=reqs[:batch], global_num_tokens=None, spec_info=None)
        b = SimpleNamespace(forward_mode=decode, reqs=reqs[1:], global_num_tokens=None, spec_info=None)
        rec.flush(10)

        def step(label: str, i: int, n: int) -> Callable[[], None]:
            bt = a if label == "unchanged" or i % 2 else b
            bt.forward_iter = n

            def hooks() -> None:
                pre = ad.begin(sched, bt)
                ad.after_run(sched, bt, None, pre)
                ad.after_process(bt)

            return hooks

        return _time_blocks(rec, steps, step) | {"repeats": ad.repeats}
    finally:
        rec.close()


def vllm_steps(address: str, batch: int, steps: int) -> dict[str, float]:
    """Median µs per step of the vLLM adapter, schedule unchanged and changed every step."""
    rec = Recorder("bench-vllm", address=address, timer="cpu", engine_kind="bench")
    try:
        requests = {f"v{batch}-{i}": VReq(f"v{batch}-{i}") for i in range(batch + 1)}
        # One per mixed step (_time_blocks runs whole blocks of 100 of each label: up to 300 more).
        arrivals = [VReq(f"v{batch}-new-{i}") for i in range(steps + 300)]
        for r in arrivals:
            r.num_computed_tokens, r.num_tokens, r.num_output_tokens = 0, 100, 0
        sched: Any = _Holder()
        sched.requests = requests
        sched.vllm_config = None
        sched.finished_req_ids = set()
        vr = VllmRecording(sched, recorder=rec, settings=AdapterSettings.from_env("vllm"))
        for rid in requests:
            vr.on_add_request(rid)
        ids = list(requests)
        a_ids, b_ids = ids[:batch], ids[1:]
        rec.flush(10)

        def step(label: str, i: int, n: int) -> Callable[[], None]:
            run = a_ids if label != "changed" or i % 2 else b_ids
            for r in requests.values():  # what the engine computed meanwhile
                r.num_computed_tokens += 1
                r.num_tokens += 1
            scheduled = dict.fromkeys(run, 1)
            new_reqs = []
            if label == "mixed":  # a new request's whole 100-token prompt rides with the decodes
                new = arrivals[n]
                requests[new.request_id] = new
                vr.on_add_request(new.request_id)
                scheduled[new.request_id] = 100
                new_reqs = [SimpleNamespace(req_id=new.request_id, num_computed_tokens=0)]
            output = SimpleNamespace(
                num_scheduled_tokens=scheduled,
                scheduled_new_reqs=new_reqs,
                preempted_req_ids=set(),
                scheduled_cached_reqs=SimpleNamespace(
                    req_ids=run,
                    num_computed_tokens=[requests[r].num_computed_tokens for r in run],
                    resumed_req_ids=set(),
                ),
            )

            def hooks() -> None:
                vr.on_schedule(output)
                vr.on_update(output)

            return hooks

        labels = ("unchanged", "changed", "mixed")
        return _time_blocks(rec, steps, step, labels) | {"repeats": vr.repeats}
    finally:
        rec.close()
