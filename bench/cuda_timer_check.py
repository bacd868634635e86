"""Check the CUDA event timer on a real GPU: device time vs wall time per step.

    python bench/cuda_timer_check.py [--size 4096]

Runs real fp16 matmuls through a Recorder with ``timer="cuda"`` against a real socket
sink (a stdlib server thread decoding the frames, no sidecar), then prints, per step,
the device time the hooks measured (CUDA event pair, resolved on the shipper thread
with query(), never synchronize()), the engine thread's wall span between step_begin
and step_end (just the asynchronous kernel launches), and a reference time for the
same work measured separately by this script with synchronize(). It then checks:
every step is CUDA-timed, device time tracks the reference, a step on a side stream
is timed on that stream, the pool grows and falls back (counted) when the GPU is far
behind, and what step_begin + step_end cost the engine thread with CUDA events.

Exits 2 with a message when there is no CUDA device, 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from enginetime.engine_hooks import Recorder, StepKind, TimerSource
from enginetime.engine_hooks.timers import CudaEventTimer, cuda_available
from enginetime.engine_hooks.wire import decode_varint, split_frames, unpack_step


def _steps_from_payload(payload: bytes) -> dict | None:
    """Step fields from one IngestFrame: a packed step (what recorders send) or a StepRecord."""
    key, pos = decode_varint(payload, 0)
    if key == (5 << 3 | 2):  # IngestFrame.packed_step
        size, pos = decode_varint(payload, pos)
        f = unpack_step(payload[pos : pos + size])
        return {
            "seq": f["seq"],
            "start": f["start_time_ns"],
            "end": f["end_time_ns"],
            "device": f["device_time_ns"],
            "source": f["timer_source"],
        }
    if key != (3 << 3 | 2):
        return None
    size, pos = decode_varint(payload, pos)
    end, fields = pos + size, {}
    while pos < end:
        key, pos = decode_varint(payload, pos)
        if key & 7 == 0:
            value, pos = decode_varint(payload, pos)
            fields[key >> 3] = value - (1 << 64) if value >= 1 << 63 else value
        else:
            size, pos = decode_varint(payload, pos)
            pos += size
    return {
        "seq": fields.get(1, 0),
        "start": fields.get(3, 0),
        "end": fields.get(4, 0),
        "device": fields.get(5, 0),
        "source": fields.get(6, 0),
    }


class Sink:
    """A stand-in sidecar: reads frames off a Unix socket and keeps the step records."""

    def __init__(self, path: str) -> None:
        self.steps: list[dict] = []
        self._cond = threading.Condition()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self._listener.accept()
        buf = b""
        while data := conn.recv(1 << 20):
            buf += data
            payloads, used = split_frames(buf)
            buf = buf[used:]
            got = [s for s in map(_steps_from_payload, payloads) if s is not None]
            if got:
                with self._cond:
                    self.steps += got
                    self._cond.notify_all()

    def wait_steps(self, n: int, timeout: float = 30.0) -> list[dict]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.steps) >= n, timeout)
            return list(self.steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="square fp16 matmul size")
    args = parser.parse_args(argv)
    if not cuda_available():
        print(
            "cuda_timer_check: no CUDA device in this process (torch missing or torch.cuda.is_available() "
            "is False); nothing to check. Run it on a GPU machine."
        )
        return 2
    import torch

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("  ok   " if ok else "  FAIL ") + what)
        if not ok:
            failures.append(what)

    tmp = tempfile.mkdtemp(dir="/tmp", prefix="et-cuda-")
    path = os.path.join(tmp, "ingest.sock")
    sink = Sink(path)
    dev = torch.device("cuda")
    a = torch.randn(args.size, args.size, device=dev, dtype=torch.float16)
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()

    def reference_ms(n: int, reps: int = 5) -> float:
        """This script's own measurement (synchronize() is fine here, not in the hooks)."""
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                a @ a
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    plan = [1, 2, 4, 8, 16, 8, 4, 2, 1]
    refs = {n: reference_ms(n) for n in sorted(set(plan))}
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # warm up cuBLAS on the side stream too
        for _ in range(3):
            a @ a
    torch.cuda.synchronize()
    # The same loop without hooks: how long the engine thread spends launching each step.
    bare_ms = []
    for n in plan:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            a @ a
        bare_ms.append((time.perf_counter_ns() - t0) / 1e6)
    torch.cuda.synchronize()
    timer = CudaEventTimer(pool_cap=64)
    rec = Recorder("cuda-check", address="unix:" + path, timer=timer, engine_kind="bench")
    hooked_ms = []
    for n in plan:  # the engine loop: launch and move on, never wait for the GPU
        t0 = time.perf_counter_ns()
        tok = rec.step_begin()
        for _ in range(n):
            a @ a
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=[0], decode_tokens=[1], context_tokens=[n]
        )
        hooked_ms.append((time.perf_counter_ns() - t0) / 1e6)
    # One step on a side stream, timed on that stream.
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tok = rec.step_begin(stream=side)
        for _ in range(8):
            a @ a
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=[0], decode_tokens=[1], context_tokens=[8]
        )
    steps = sink.wait_steps(len(plan) + 1)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  matmul {args.size}^2 fp16")
    print("device ms: the hooks' CUDA events; reference ms: the same work timed with synchronize();")
    print("engine loop ms: the engine thread's time for the step (launches are async) with / without hooks")
    print(
        f"{'seq':>4} {'matmuls':>8} {'device ms':>10} {'reference ms':>13} {'ratio':>6} "
        f"{'loop ms, hooks':>15} {'loop ms, bare':>14}"
    )
    for i, (s, n) in enumerate(zip(steps, plan + [8], strict=False)):
        ref = refs[n]
        hooked = f"{hooked_ms[i]:.3f}" if i < len(plan) else "(side)"
        bare = f"{bare_ms[i]:.3f}" if i < len(plan) else ""
        print(
            f"{s['seq']:>4} {n:>8} {s['device'] / 1e6:>10.3f} {ref:>13.3f} {s['device'] / 1e6 / ref:>6.2f} "
            f"{hooked:>15} {bare:>14}"
        )
    print("checks:")
    check(len(steps) == len(plan) + 1, f"all {len(plan) + 1} steps arrived ({len(steps)})")
    check(all(s["source"] == TimerSource.CUDA_EVENT for s in steps), "every step timed with CUDA events")
    ratios = [s["device"] / 1e6 / refs[n] for s, n in zip(steps, plan + [8], strict=False)]
    check(all(0.7 < r < 1.3 for r in ratios[1:]), "device time within 30% of the synchronized reference")
    check(steps[-1]["device"] / 1e6 > 0.7 * refs[8], "the side-stream step measured its own stream's work")
    growth = steps[4]["device"] / steps[1]["device"]
    check(5 < growth < 11, f"device time follows the work: 16 matmuls / 2 matmuls = {growth:.1f} (expect ~8)")

    # The GPU far behind: launch much more than it can run; the pool grows to its cap, then falls back.
    before = rec.stats()
    for _ in range(200):
        tok = rec.step_begin()
        for _ in range(4):
            a @ a
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[1], prefill_tokens=[0], decode_tokens=[1], context_tokens=[4]
        )
    st_mid = rec.stats()
    torch.cuda.synchronize()  # this script waiting, so the counts below are final
    rec.flush(30)
    st = rec.stats()
    print(
        f"pool: allocated={timer.allocated} cap={timer.pool_cap} free={timer.free} "
        f"fallbacks={st.timer_fallbacks - before.timer_fallbacks}"
    )
    check(
        timer.allocated == timer.pool_cap and st_mid.timer_fallbacks > before.timer_fallbacks,
        "pool grew to its cap, then fell back to CPU timing (counted)",
    )
    check(timer.free == timer.allocated, "every event pair returned to the pool")

    # Engine-thread cost of the hooks with CUDA events (tiny kernels, GPU keeps up).
    x = torch.zeros(256, device=dev)
    handles = list(range(256))
    costs = []
    for i in range(4000):
        t0 = time.perf_counter_ns()
        tok = rec.step_begin()
        rec.step_end(
            tok,
            kind=StepKind.DECODE,
            handles=handles,
            prefill_tokens=handles,
            decode_tokens=handles,
            context_tokens=handles,
        )
        costs.append(time.perf_counter_ns() - t0)
        x.add_(1)
        if i % 500 == 499:
            rec.flush(10)
    costs.sort()
    rec.flush(10)
    st = rec.stats()
    print(
        f"engine thread, step_begin+step_end with CUDA events, batch 256: median "
        f"{statistics.median(costs) / 1e3:.2f} µs, p99 {costs[int(0.99 * len(costs))] / 1e3:.2f} µs; "
        f"shipper CPU total {st.shipper_cpu_ns / 1e6:.1f} ms for {st.steps} steps; "
        f"dropped {st.dropped_steps}"
    )
    rec.close()
    os.unlink(path)
    os.rmdir(tmp)
    print("cuda_timer_check:", "FAILED: " + "; ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
