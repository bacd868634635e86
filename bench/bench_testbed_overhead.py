"""Hook overhead on real compute: testbed decode throughput with engine_hooks on vs off.

    .venv/bin/python bench/bench_testbed_overhead.py [--batches 64,256] [--reps 5] [--tokens 64]
        [--shards 1] [--coupling independent] [--sink sidecar|drain] [--threads N]

Two testbed engines with the same model live in one process: one with hooks (one
Recorder per shard, shipping to a real ``enginetime sidecar`` subprocess that
attributes every step), one without (no adapter at all: what the engine is without
enginetime). Repetitions alternate between them (on/off, then off/on, ...), so
drift in the machine's load hits both alike. Each repetition submits ``batch``
requests (32-token random prompts, prefix cache off) and lets them decode
``--tokens`` tokens; decode throughput is decode tokens / time from the first to
the last decode step, read from the engine's own step log (prefill excluded). The
figure is the median over repetitions of the paired ratio on/off (goal ≥ 0.98).

On a shared or busy host the wall-clock ratio is noisy; two figures that are not:
"CPU/token off/on" (this process's CPU time per generated token, engine + shipper
thread, hooks off over hooks on; exact with ``--threads 1``, since idle OpenMP
workers spin) and the shard thread's time inside the adapter per step.

What the ratio includes: the adapter building four columns per step, the Recorder
calls on the engine thread, and the shipper thread's encoding and socket writes
competing for the GIL and the cores; the sidecar process competes for the cores
too (on a GPU host it would have CPU to spare).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

from enginetime.testbed.demo import SidecarProcess
from enginetime.testbed.engine import Engine, EngineConfig


class DrainSink:
    """An ingest socket that reads and discards: the hooks' cost without the sidecar's."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="et-drain-", dir="/tmp")
        self.ingest = f"unix:{self.dir}/drain.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(os.path.join(self.dir, "drain.sock"))
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        while conn.recv(1 << 20):
            pass

    def stop(self) -> None:
        self._sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def decode_throughput(
    engine: Engine, batch: int, tokens: int, rng: random.Random, shards: int
) -> tuple[float, float]:
    """(decode tokens/s, this process's CPU seconds per generated token) for one repetition."""
    vocab = engine.config.model.vocab_size
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    reqs = [
        engine.submit([rng.randrange(vocab) for _ in range(32)], tokens, routed_shard=i % shards)
        for i in range(batch)
    ]
    for r in reqs:
        if not r.wait(600):
            raise RuntimeError("a request did not finish in 600 s")
    steps = [s for s in engine.step_log() if s.start >= t0 and s.decoded > 0 and s.prefilled == 0]
    first = min(s.start for s in steps)
    last = max(s.end for s in steps)
    cpu_per_token = (time.process_time() - cpu0) / (batch * tokens)
    return sum(s.decoded for s in steps) / (last - first), cpu_per_token


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per request per repetition")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--coupling", default="independent", choices=("independent", "lockstep"))
    ap.add_argument(
        "--sink",
        choices=("sidecar", "drain"),
        default="sidecar",
        help="where the hooks ship: a real sidecar subprocess (default) or an in-process "
        "socket that discards (the hooks' own cost, without the sidecar's CPU)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per op (0: cores // shards)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    sink = SidecarProcess() if args.sink == "sidecar" else DrainSink()
    common = dict(
        num_shards=args.shards,
        coupling=args.coupling,
        prefix_cache_tokens=0,
        max_running_requests=4096,
        step_log_size=200_000,
        intra_op_threads=args.threads,
    )
    on = Engine(EngineConfig(hooks=True, ingest=sink.ingest, engine_id="bench-hooks-on", **common)).start()
    off = Engine(EngineConfig(hooks=False, engine_id="bench-hooks-off", **common)).start()
    engines = {"on": on, "off": off}
    results: dict[int, dict] = {}
    try:
        rng = random.Random(0)
        for eng in (on, off):  # warm both: first-call allocations, thread pools
            decode_throughput(eng, 8, 8, rng, args.shards)
        print(
            f"testbed decode throughput, hooks on vs off: {args.shards} shard(s), {args.coupling}, "
            f"{args.tokens} decode tokens per request, {args.reps} interleaved repetitions, "
            f"{on.intra_op_threads} torch thread(s) per op, hooks ship to {args.sink}"
        )
        print(
            f"{'batch':>6} {'off tok/s':>10} {'on tok/s':>10} {'ratio (median of pairs)':>24} "
            f"{'min':>6} {'max':>6} {'CPU/token off/on':>17}"
        )
        for batch in batches:
            tput: dict[str, list[float]] = {"on": [], "off": []}
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            ratios = []
            for rep in range(args.reps):
                order = ("on", "off") if rep % 2 == 0 else ("off", "on")
                got = {}
                for mode in order:
                    got[mode], per_token = decode_throughput(
                        engines[mode], batch, args.tokens, rng, args.shards
                    )
                    tput[mode].append(got[mode])
                    cpu[mode].append(per_token)
                ratios.append(got["on"] / got["off"])
            med = statistics.median(ratios)
            results[batch] = {
                "off_tok_s": statistics.median(tput["off"]),
                "on_tok_s": statistics.median(tput["on"]),
                "ratio": med,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "cpu_ratio": statistics.median(cpu["off"]) / statistics.median(cpu["on"]),
            }
            r = results[batch]
            print(
                f"{batch:>6} {r['off_tok_s']:>10.0f} {r['on_tok_s']:>10.0f} {med:>24.3f} "
                f"{min(ratios):>6.3f} {max(ratios):>6.3f} {r['cpu_ratio']:>17.3f}"
            )
        assert on.flush_hooks(10), "hooks did not flush"
        stats = [sh.hooks.stats() for sh in on.shards]
        sent = sum(s.sent_frames for s in stats)
        dropped = sum(s.dropped_frames for s in stats)
        steps = sum(s.steps for s in stats)
        cpu = sum(s.shipper_cpu_ns for s in stats)
        inline = sum(sh.hooks.shard_thread_ns for sh in on.shards)
        busy = sum(s.duration for s in on.step_log())
        print(f"hooks on: {steps} steps recorded, {sent} frames sent, {dropped} dropped")
        sidecar_cpu = sink.cpu_seconds() if isinstance(sink, SidecarProcess) else None
        if sidecar_cpu is not None:
            per_step = 1e3 * sidecar_cpu / max(steps, 1)
            print(
                f"  sidecar process CPU: {sidecar_cpu:.2f} s in all, {per_step:.2f} ms/step "
                "(on this host it competes with the engine for the same cores)"
            )
        print(
            f"  on the shard thread: {inline / max(steps, 1) / 1000:.1f} us/step in the adapter "
            f"({100 * inline / 1e9 / max(busy, 1e-9):.2f}% of step time); shipper thread CPU "
            f"{cpu / max(steps, 1) / 1000:.1f} us/step (encoding, socket writes; off the engine loop)"
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "batches": results,
                        "steps": steps,
                        "frames_sent": sent,
                        "dropped": dropped,
                        "adapter_us_per_step": inline / max(steps, 1) / 1000,
                        "shipper_cpu_us_per_step": cpu / max(steps, 1) / 1000,
                    }
                )
            )
        if dropped:
            print("WARNING: frames were dropped; the hooks-on figure is optimistic", file=sys.stderr)
    finally:
        on.close()
        off.close()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
