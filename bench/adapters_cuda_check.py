"""GPU check of the SGLang and vLLM adapters' CUDA-event timing paths (no engine needed).

    python bench/adapters_cuda_check.py [--steps 40] [--forward-ms 3] [--sample-ms 1] [--json]

Needs torch with CUDA, and numpy for decoding (the sidecar's frame decoder); neither
SGLang nor vLLM. Each adapter's real hook code runs with stand-in engine objects whose
"forward" and "sampling" are GPU kernels of a known length (``torch.cuda._sleep``,
calibrated first), launched the way the engine launches them:

* vLLM: the worker wrappers around ``execute_model`` / ``sample_tokens`` (installed on a
  stand-in Worker class by the plugin's own patch function) and the scheduler recording,
  updated one step late as under async scheduling (two outputs in flight);
  ``execute_dummy_batch`` as a DP IDLE step.
* SGLang: ``around_run_batch`` with overlap scheduling (kernels on the scheduler's
  forward stream), alternating plain steps and delayed-sampling steps closed by
  ``around_launch_batch_sample_if_needed``; an IDLE batch.
* CUDA-graph capture around a hooked step: the step must not be CUDA-timed (a timing
  event inside a capture would break it) and the capture must succeed.

Frames go to a local Unix socket and are decoded with the sidecar's decoder. Printed per
adapter: the device time the step records carry vs the kernels' calibrated length, how
long the engine thread took to launch all steps vs how long the GPU took (launching far
ahead of the GPU shows that nothing synchronized), and the hooks' own CPU cost per step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path


def _enginetime_importable() -> None:
    """Use the installed package, or this checkout's tree mapped as enginetime."""
    try:
        import enginetime.engine_hooks  # noqa: F401

        return
    except ImportError:
        for name in [m for m in sys.modules if m == "enginetime" or m.startswith("enginetime.")]:
            del sys.modules[name]
    root = Path(__file__).resolve().parent.parent
    shim = Path(tempfile.mkdtemp(prefix="et-shim-")) / "enginetime"
    shim.mkdir()
    for item in (root / "enginetime").iterdir():
        (shim / item.name).symlink_to(item)
    for name, rel in (
        ("engine_hooks", "engine_hooks"),
        ("sidecar", "sidecar"),
        ("v1", "proto/enginetime/v1"),
    ):
        (shim / name).symlink_to(root / rel)
    sys.path.insert(0, str(shim.parent))


class Sink:
    """A listening Unix socket that keeps every byte each connection sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="et-cuda-", dir="/tmp")
        self.path = os.path.join(self.dir, "ingest.sock")
        self.address = f"unix:{self.path}"
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.bufs: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            buf = bytearray()
            self.bufs.append(buf)
            t = threading.Thread(target=self._read, args=(conn, buf), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _read(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            while chunk := conn.recv(1 << 16):
                buf.extend(chunk)

    def steps(self) -> list:
        from enginetime.sidecar.ingest.frames import FrameDecoder
        from enginetime.sidecar.ingest.records import Step

        for t in self.threads:
            t.join(5)
        out = []
        for buf in self.bufs:
            out.extend(f for f in FrameDecoder().feed(bytes(buf)) if isinstance(f, Step))
        return out


def calibrate(torch) -> float:
    """Cycles of torch.cuda._sleep per millisecond on this GPU (synchronized: setup only)."""
    torch.cuda._sleep(1_000_000)  # warm up
    torch.cuda.synchronize()
    best = None
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        best = ms if best is None else min(best, ms)
    return 20_000_000 / best


def summarize(
    name: str, steps: list, expected_ms: list[float], launch_s: float, gpu_s: float, hook_us: list[float]
) -> dict:
    """``expected_ms``: the calibrated kernel time of each recorded step, in order."""
    rows = [(s.device_time_ns / 1e6, want) for s, want in zip(steps, expected_ms, strict=False)]
    ratios = [got / want for got, want in rows]
    return {
        "adapter": name,
        "steps_recorded": len(steps),
        "timer_source": sorted({int(s.timer_source) for s in steps}),
        "device_ms_median": round(statistics.median(g for g, _ in rows), 3) if rows else None,
        "expected_ms": sorted(set(round(w, 3) for _, w in rows)),
        "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
        "engine_thread_launch_s": round(launch_s, 4),
        "gpu_busy_s": round(gpu_s, 4),
        "hook_cpu_us_median": round(statistics.median(hook_us), 1) if hook_us else None,
    }


def check_vllm(torch, cycles_per_ms: float, args, sink: Sink) -> dict:
    from enginetime.engine_hooks import Recorder, StepKind
    from enginetime.engine_hooks.vllm import recording as vrec
    from enginetime.engine_hooks.vllm import worker as vworker

    fwd, smp = int(args.forward_ms * cycles_per_ms), int(args.sample_ms * cycles_per_ms)

    inside = [0.0]  # seconds spent inside the stand-in originals (not the hooks' cost)

    class Worker:  # what the wrappers see of vLLM's GPU worker
        def execute_model(self, scheduler_output):
            t = time.perf_counter()
            torch.cuda._sleep(fwd)
            inside[0] += time.perf_counter() - t
            return None  # sampling follows

        def sample_tokens(self, grammar_output):
            t = time.perf_counter()
            torch.cuda._sleep(smp)
            inside[0] += time.perf_counter() - t
            return "sampled"

        def execute_dummy_batch(self):
            t = time.perf_counter()
            torch.cuda._sleep(fwd)
            inside[0] += time.perf_counter() - t

    vworker._patch_worker(types.SimpleNamespace(Worker=Worker))

    class Req:
        def __init__(self, rid: str) -> None:
            self.request_id, self.num_prompt_tokens, self.num_tokens = rid, 64, 65
            self.arrival_time, self.session_id, self.trace_headers = time.time(), None, None
            self.num_output_tokens, self.status = 1, types.SimpleNamespace(name="RUNNING")

        def is_finished(self) -> bool:
            return False

    class Sched:
        def __init__(self) -> None:
            self.vllm_config = types.SimpleNamespace(
                parallel_config=types.SimpleNamespace(data_parallel_rank=0, data_parallel_size=1),
                model_config=types.SimpleNamespace(is_moe=False),
                device_config=types.SimpleNamespace(device_type="cuda"),
            )
            self.requests = {f"r{i}": Req(f"r{i}") for i in range(8)}

    sched = Sched()
    rec = Recorder("cuda-check-vllm", address=sink.address, engine_kind="vllm", timer="cuda")
    recording = vrec.VllmRecording(sched, recorder=rec)
    assert recording.worker_timing, "the recorder did not pick CUDA events"
    for rid in sched.requests:
        recording.on_add_request(rid)

    def output() -> types.SimpleNamespace:
        return types.SimpleNamespace(
            num_scheduled_tokens={r: 1 for r in sched.requests},
            total_num_scheduled_tokens=len(sched.requests),
            scheduled_new_reqs=[],
            preempted_req_ids=set(),
            scheduled_cached_reqs=types.SimpleNamespace(
                req_ids=list(sched.requests),
                num_computed_tokens=[64] * len(sched.requests),
                resumed_req_ids=set(),
            ),
        )

    w = Worker()
    torch.cuda.synchronize()
    hook_us: list[float] = []
    gpu0 = torch.cuda.Event(enable_timing=True)
    gpu1 = torch.cuda.Event(enable_timing=True)
    gpu0.record()
    t0 = time.perf_counter()
    previous = None
    for i in range(args.steps):
        out = output()
        inside[0] = 0.0
        h = time.perf_counter()
        recording.on_schedule(out)
        w.execute_model(out)
        w.sample_tokens(None)
        if previous is not None:  # async scheduling: step N is updated after N+1 launched
            recording.on_update(previous)
        previous = out
        if i % 10 == 9:
            w.execute_dummy_batch()  # a DP dummy batch: an IDLE step
        hook_us.append((time.perf_counter() - h - inside[0]) * 1e6)
    recording.on_update(previous)
    launch_s = time.perf_counter() - t0
    gpu1.record()
    gpu1.synchronize()  # the check's own reference, after every hook call
    gpu_s = gpu0.elapsed_time(gpu1) / 1e3
    rec.flush(10.0)
    stats = rec.stats()
    rec.close()
    time.sleep(0.2)
    steps = sink.steps()
    # Records arrive in update order: each DECODE step is forward + sampling; an IDLE
    # (dummy) step is a forward alone.
    expected = [
        args.forward_ms if int(s.kind) == int(StepKind.IDLE) else args.forward_ms + args.sample_ms
        for s in steps
    ]
    res = summarize("vllm", steps, expected, launch_s, gpu_s, hook_us)
    res["timer_fallbacks"] = stats.timer_fallbacks
    res["errors"] = stats.errors
    return res


def check_sglang(torch, cycles_per_ms: float, args, sink: Sink) -> dict:
    os.environ["ENGINETIME_INGEST"] = sink.address
    os.environ["ENGINETIME_TIMER"] = "cuda"
    os.environ["ENGINETIME_ENGINE_ID"] = "cuda-check-sglang"
    from enginetime.engine_hooks import StepKind
    from enginetime.engine_hooks.sglang import hooks

    fwd, smp = int(args.forward_ms * cycles_per_ms), int(args.sample_ms * cycles_per_ms)

    class Sched:
        def __init__(self) -> None:
            self.forward_ct = 0
            self.enable_overlap = True
            self.forward_stream = torch.cuda.Stream()
            self.server_args = types.SimpleNamespace(
                tokenizer_worker_num=1, dp_size=1, enable_dp_attention=False
            )
            self.waiting_queue = []
            self.attn_tp_rank = self.attn_dp_rank = self.pp_rank = 0
            self.dp_rank = None

    class Req:
        def __init__(self, rid: str) -> None:
            self.rid, self.origin_input_ids, self.output_ids = rid, [1] * 64, [2]
            self.cached_tokens, self.finished_reason = 0, None

        def finished(self) -> bool:
            return False

    sched = Sched()
    reqs = [Req(f"s{i}") for i in range(8)]

    inside = [0.0]

    def run_batch(self, batch):  # launches the forward on the forward stream, like SGLang's overlap path
        t = time.perf_counter()
        self.forward_ct += 1
        with torch.cuda.stream(self.forward_stream):
            torch.cuda._sleep(fwd)
        inside[0] += time.perf_counter() - t
        delayed = batch.delayed
        return types.SimpleNamespace(delay_sample_func=(lambda: None) if delayed else None)

    def launch_sample(self, result):
        if result.delay_sample_func is None:
            return  # SGLang returns early too: sampling ran inside the forward
        t = time.perf_counter()
        with torch.cuda.stream(self.forward_stream):
            torch.cuda._sleep(smp)
        inside[0] += time.perf_counter() - t

    torch.cuda.synchronize()
    hook_us: list[float] = []
    gpu0, gpu1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu0.record(sched.forward_stream)
    t0 = time.perf_counter()
    for i in range(args.steps):
        idle = i % 10 == 9
        batch = types.SimpleNamespace(
            forward_mode=types.SimpleNamespace(name="IDLE" if idle else "DECODE"),
            reqs=[] if idle else reqs,
            global_num_tokens=[0 if idle else len(reqs), 8],
            delayed=i % 2 == 1,
        )
        inside[0] = 0.0
        h = time.perf_counter()
        result = hooks.around_run_batch(run_batch, sched, batch)
        hooks.around_launch_batch_sample_if_needed(launch_sample, sched, result)
        hook_us.append((time.perf_counter() - h - inside[0]) * 1e6)
    launch_s = time.perf_counter() - t0
    gpu1.record(sched.forward_stream)
    gpu1.synchronize()
    gpu_s = gpu0.elapsed_time(gpu1) / 1e3
    ad = sched.__dict__["_enginetime"]
    ad.recorder.flush(10.0)
    stats = ad.recorder.stats()

    # CUDA-graph capture around a hooked step: must capture cleanly, the step CPU-timed.
    capture = "not run"
    try:
        x = torch.randn(256, 256, device="cuda")

        def captured_forward(self, batch):
            self.forward_ct += 1
            return types.SimpleNamespace(delay_sample_func=None, y=x @ x)

        sched.enable_overlap = False
        before = ad.recorder.stats().timer_fallbacks
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x @ x  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            hooks.around_run_batch(
                captured_forward,
                sched,
                types.SimpleNamespace(
                    forward_mode=types.SimpleNamespace(name="DECODE"),
                    reqs=reqs[:1],
                    global_num_tokens=None,
                    delayed=False,
                ),
            )
        graph.replay()
        torch.cuda.synchronize()
        skipped = ad.recorder.stats().timer_fallbacks - before
        capture = f"ok, {skipped} step(s) kept off CUDA events during capture"
    except Exception as exc:  # report, do not hide
        capture = f"FAILED: {exc!r}"[:300]
    ad.recorder.close()
    time.sleep(0.2)
    steps = [s for s in sink.steps() if int(s.timer_source) == 2][: args.steps]  # not the captured one
    # odd steps sample late: their clock runs until the sampling kernel launched after them
    expected = [args.forward_ms + (args.sample_ms if i % 2 == 1 else 0.0) for i in range(len(steps))]
    res = summarize("sglang", steps, expected, launch_s, gpu_s, hook_us)
    delayed = [s.device_time_ns / 1e6 for s in steps[1::2]]
    res["delayed_sample_steps_ms_median"] = round(statistics.median(delayed), 3) if delayed else None
    res["kinds"] = sorted({StepKind(int(s.kind)).name for s in steps})
    res["delayed_sample_expected_ms"] = args.forward_ms + args.sample_ms
    res["graph_capture"] = capture
    res["timer_fallbacks"] = stats.timer_fallbacks
    res["errors"] = stats.errors
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--forward-ms", type=float, default=3.0)
    ap.add_argument("--sample-ms", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("adapters_cuda_check: torch sees no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    _enginetime_importable()
    cycles_per_ms = calibrate(torch)
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sleep_cycles_per_ms": round(cycles_per_ms),
        "steps": args.steps,
        "forward_ms": args.forward_ms,
        "sample_ms": args.sample_ms,
    }
    results = []
    for check in (check_vllm, check_sglang):
        sink = Sink()
        results.append(check(torch, cycles_per_ms, args, sink))
    out["results"] = results
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['device']}  torch {out['torch']}  forward {args.forward_ms} ms, "
            f"sample {args.sample_ms} ms, {args.steps} steps per adapter"
        )
        for r in results:
            print(
                f"\n[{r['adapter']}] {r['steps_recorded']} CUDA-timed steps recorded, timer sources "
                f"{r['timer_source']}, errors {r['errors']}, timer fallbacks {r['timer_fallbacks']}"
            )
            print(
                f"  device time per step: median {r['device_ms_median']} ms "
                f"(expected {r['expected_ms']} ms), ratio median {r['ratio_median']} "
                f"min/max {r['ratio_min_max']}"
            )
            print(
                f"  engine thread launched all steps in {r['engine_thread_launch_s']} s; the GPU was busy "
                f"{r['gpu_busy_s']} s (launch << busy: nothing synchronized)"
            )
            print(f"  hook CPU per step: median {r['hook_cpu_us_median']} us")
            if "delayed_sample_steps_ms_median" in r:
                print(
                    f"  delayed-sampling steps: median {r['delayed_sample_steps_ms_median']} ms "
                    f"(expected {r['delayed_sample_expected_ms']} ms)"
                )
                print(f"  CUDA-graph capture around a hooked step: {r['graph_capture']}")
    ok = all(r["errors"] == 0 and r["ratio_median"] and 0.9 <= r["ratio_median"] <= 1.2 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
