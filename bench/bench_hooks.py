"""Engine-thread cost of the hooks, and the shipper thread's CPU per step.

    .venv/bin/python bench/bench_hooks.py [--steps N] [--batches 1,64,256,512]

For each batch size it runs a Recorder against a draining socket server thread (a
stand-in sidecar that reads and discards) and times, on the calling thread,
``step_begin`` + building the four columns from Python request objects +
``step_end`` — what an adapter adds to the engine loop per step ("with columns") —
and, on alternate steps, ``step_begin`` + ``step_end`` with the lists already built
("hooks only"). The shipper's CPU
time (``time.thread_time_ns`` of its thread) divided by the steps it shipped is the
cost paid off the engine thread (encoding, socket writes). CPU timer: the CUDA
path adds one event record per begin/end (see bench/cuda_timer_check.py).

Steps are issued back to back, far faster than a real engine steps, with a flush
every ``--chunk`` steps (not timed) so the shipper keeps up and nothing is dropped;
the p99 includes the engine thread waiting for the GIL while the shipper encodes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from enginetime.engine_hooks import Recorder, StepKind


class DrainServer:
    """Accepts one connection on a Unix socket and discards what it reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                while True:
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    self.bytes += len(data)

    def close(self) -> None:
        self._listener.close()


class Req:
    """What an engine's request object looks like to an adapter."""

    __slots__ = ("handle", "extend", "prefix")

    def __init__(self, handle: int, extend: int, prefix: int) -> None:
        self.handle = handle
        self.extend = extend
        self.prefix = prefix


def run_batch(address: str, batch: int, steps: int, chunk: int) -> dict:
    rec = Recorder("bench", address=address, timer="cpu", engine_kind="bench")
    try:
        handles = [rec.request_arrived(f"r{i}", prompt_tokens=100) for i in range(batch)]
        reqs = [Req(h, 1, 1000 + i) for i, h in enumerate(handles)]
        if not rec.flush(5):
            raise SystemExit(f"bench: could not reach the drain server at {address}")
        cpu0 = rec.stats().shipper_cpu_ns
        perf = time.perf_counter_ns
        costs: list[int] = []  # step_begin + building columns + step_end
        hook_costs: list[int] = []  # step_begin + step_end alone, columns already built
        done = 0
        while done < steps:
            for _ in range(min(chunk, steps - done)):
                if done % 2:
                    t0 = perf()
                    tok = rec.step_begin()
                    rec.step_end(
                        tok,
                        kind=StepKind.DECODE,
                        handles=[r.handle for r in reqs],
                        prefill_tokens=[0] * batch,
                        decode_tokens=[r.extend for r in reqs],
                        context_tokens=[r.prefix for r in reqs],
                        global_step=done,
                    )
                    costs.append(perf() - t0)
                else:
                    handles = [r.handle for r in reqs]
                    prefill = [0] * batch
                    decode = [r.extend for r in reqs]
                    context = [r.prefix for r in reqs]
                    t0 = perf()
                    tok = rec.step_begin()
                    rec.step_end(
                        tok,
                        kind=StepKind.DECODE,
                        handles=handles,
                        prefill_tokens=prefill,
                        decode_tokens=decode,
                        context_tokens=context,
                        global_step=done,
                    )
                    hook_costs.append(perf() - t0)
                done += 1
            if not rec.flush(30):
                raise SystemExit("bench: the shipper did not drain within 30 s")
        st = rec.stats()
        shipped = st.steps - st.dropped_steps
        costs.sort()
        hook_costs.sort()
        return {
            "batch": batch,
            "steps": steps,
            "median_us": statistics.median(costs) / 1e3,
            "p99_us": costs[int(0.99 * (len(costs) - 1))] / 1e3,
            "hooks_median_us": statistics.median(hook_costs) / 1e3,
            "hooks_p99_us": hook_costs[int(0.99 * (len(hook_costs) - 1))] / 1e3,
            "shipper_us": (st.shipper_cpu_ns - cpu0) / max(1, shipped) / 1e3,
            "dropped": st.dropped_steps,
            "bytes_per_step": None,
        }
    finally:
        rec.close()


def run_engine_loop(address: str | None, batch: int, steps: int, ops: int) -> list[int]:
    """Step times of a loop shaped like a torch engine: ops that release the GIL, plus hooks.

    Each "op" is a sha256 of 64 KiB (hashlib drops the GIL for it, as torch does inside
    every op), so the shipper thread can take the GIL whenever the engine thread is in
    an op; the engine thread then waits for it when the op returns. With address=None
    the loop runs without a recorder (the baseline).
    """
    buf = os.urandom(64 * 1024)
    rec = Recorder("bench", address=address, timer="cpu") if address else None
    reqs = [Req(i + 1, 1, 1000 + i) for i in range(batch)]
    times: list[int] = []
    perf = time.perf_counter_ns
    try:
        for step in range(steps):
            t0 = perf()
            tok = rec.step_begin() if rec else None
            for _ in range(ops):
                hashlib.sha256(buf).digest()
            if rec:
                rec.step_end(
                    tok,
                    kind=StepKind.DECODE,
                    handles=[r.handle for r in reqs],
                    prefill_tokens=[0] * batch,
                    decode_tokens=[r.extend for r in reqs],
                    context_tokens=[r.prefix for r in reqs],
                    global_step=step,
                )
            times.append(perf() - t0)
    finally:
        if rec:
            rec.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000, help="steps per batch size (default 20000)")
    parser.add_argument("--chunk", type=int, default=500, help="steps between (untimed) flushes")
    parser.add_argument("--batches", default="1,64,256,512")
    parser.add_argument("--loop-steps", type=int, default=3000, help="steps of the engine-shaped loop")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    tmp = tempfile.mkdtemp(dir="/tmp", prefix="et-bench-")
    path = os.path.join(tmp, "drain.sock")
    server = DrainServer(path)
    started = time.monotonic()
    rows = []
    try:
        for batch in batches:
            before = server.bytes
            row = run_batch("unix:" + path, batch, args.steps, args.chunk)
            time.sleep(0.05)
            row["bytes_per_step"] = (server.bytes - before) / args.steps
            rows.append(row)
        loops = {}
        for label, addr in (("no hooks", None), ("hooks, batch 256", "unix:" + path)):
            loops[label] = sorted(run_engine_loop(addr, 256, args.loop_steps, ops=16))
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(tmp)
    print(
        f"enginetime hooks: engine-thread cost per step (step_begin + columns from lists + step_end), "
        f"CPU timer, {args.steps} steps per batch, Python {sys.version.split()[0]}"
    )
    print(f"{'':>6} {'with columns':>21} {'hooks only':>21}")
    print(
        f"{'batch':>6} {'median µs':>10} {'p99 µs':>10} {'median µs':>10} {'p99 µs':>10} "
        f"{'shipper CPU µs/step':>20} {'bytes/step':>11} {'dropped':>8}"
    )
    for r in rows:
        print(
            f"{r['batch']:>6} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} {r['hooks_median_us']:>10.2f} "
            f"{r['hooks_p99_us']:>10.2f} {r['shipper_us']:>20.2f} {r['bytes_per_step']:>11.0f} "
            f"{r['dropped']:>8}"
        )
    print()
    base = loops["no hooks"]
    print(
        f"engine-shaped loop (16 GIL-releasing ops, ~{base[len(base) // 2] / 16e3:.0f} µs each, "
        f"{args.loop_steps} steps): step wall time with the shipper thread running beside it"
    )
    print(f"{'':>18} {'median µs':>10} {'mean µs':>9} {'p99 µs':>9}")
    for label, t in loops.items():
        print(
            f"{label:>18} {t[len(t) // 2] / 1e3:>10.1f} {statistics.fmean(t) / 1e3:>9.1f} "
            f"{t[int(0.99 * (len(t) - 1))] / 1e3:>9.1f}"
        )
    print(f"(took {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
