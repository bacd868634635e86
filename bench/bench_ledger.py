"""Ledger throughput and memory: the figures DESIGN §9 sizes the sidecar by.

1. entries/s: one LOCKSTEP engine, 8 shards × batch 256, decode with a periodic
   prefill storm (one shard at a time runs 512-token chunks of a long prompt in a
   mixed batch), attribution on, single thread. Step objects are pre-built so only
   the ledger is timed (``on_step`` for every shard step, ``tick`` every 50 ms of
   simulated time, as the ingest server would).
2. RSS of a process holding 100,000 retained finished requests (measured in a fresh
   subprocess: RSS before creating them and after).

Run: ``.venv/bin/python bench/bench_ledger.py [--groups N] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import subprocess
import sys
import time

import numpy as np

from enginetime.engine_hooks.constants import Coupling, EventKind, StepKind
from enginetime.sidecar.ingest.records import Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig

SHARDS = 8
BATCH = 256
CHUNK = 512
STORM_EVERY = 200  # groups between storm starts
STORM_CHUNKS = 60  # chunks per storm


def true_cost_ns(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> float:
    dec = np.where(p > 0, 0, q)
    return float(
        3e6 + 4e3 * p.sum() + 0.02 * (p * (c + p / 2)).sum() + 2e4 * dec.sum() + 2.0 * (dec * c).sum()
    )


def build(groups: int, seed: int = 0) -> tuple[list[tuple[int, Event]], list[tuple[int, Event | Step]]]:
    """Requests announced before timing, then the frames (steps and storm events) in arrival order."""
    rng = np.random.default_rng(seed)
    t = 1_700_000_000_000_000_000
    setup: list[tuple[int, Event]] = []
    for k in range(SHARDS):
        for h in range(BATCH):
            setup.append(
                (
                    k,
                    Event(
                        handle=h,
                        kind=EventKind.ARRIVED,
                        time_ns=t,
                        request_id=f"s{k}-r{h}",
                        prompt_tokens=200,
                        session_id=f"sess{k}-{h}",
                    ),
                )
            )
    ctx = [rng.integers(200, 4000, BATCH).astype(np.uint32) for _ in range(SHARDS)]
    handles = np.arange(BATCH + 1, dtype=np.uint32)
    frames: list[tuple[int, Event | Step]] = []
    storm_handle = BATCH  # the storm request's handle on its shard (reused after it finishes)
    for g in range(groups):
        phase = g % STORM_EVERY
        storm_shard = (g // STORM_EVERY) % SHARDS if phase < STORM_CHUNKS else -1
        if phase == 0:
            frames.append(
                (
                    storm_shard,
                    Event(
                        handle=storm_handle,
                        kind=EventKind.ARRIVED,
                        time_ns=t,
                        request_id=f"storm-{g}",
                        prompt_tokens=CHUNK * STORM_CHUNKS,
                    ),
                )
            )
        steps = []
        for k in range(SHARDS):
            if k == storm_shard:  # mixed batch: 256 decodes + the storm's next 512-token chunk
                hs = handles
                pre = np.zeros(BATCH + 1, dtype=np.uint32)
                pre[-1] = CHUNK
                dec = (pre == 0).astype(np.uint32)
                c = np.append(ctx[k], np.uint32(phase * CHUNK))
            else:
                hs = handles[:BATCH]
                pre = np.zeros(BATCH, dtype=np.uint32)
                dec = np.ones(BATCH, dtype=np.uint32)
                c = ctx[k].copy()
            steps.append((hs, pre, dec, c))
        d = int(
            max(true_cost_ns(s[1].astype(float), s[2].astype(float), s[3].astype(float)) for s in steps)
            * (1 + 0.03 * abs(rng.standard_normal()))
        )
        for k, (hs, pre, dec, c) in enumerate(steps):
            frames.append(
                (
                    k,
                    Step(
                        seq=g,
                        start_time_ns=t,
                        end_time_ns=t + d,
                        device_time_ns=d,
                        kind=StepKind.MIXED if pre.any() else StepKind.DECODE,
                        global_step=g,
                        handles=hs,
                        prefill_tokens=pre,
                        decode_tokens=dec,
                        context_tokens=c,
                    ),
                )
            )
            ctx[k] += 1
        t += d + 50_000
        if phase == STORM_CHUNKS - 1:
            frames.append(
                (
                    storm_shard,
                    Event(
                        handle=storm_handle,
                        kind=EventKind.FINISHED,
                        time_ns=t,
                        finish_reason="length",
                        output_tokens=1,
                    ),
                )
            )
    return setup, frames


def bench_throughput(groups: int, profile: bool) -> dict:
    setup, frames = build(groups)
    clock = [0]
    ledger = Ledger(LedgerConfig(), clock=lambda: clock[0])
    keys = [
        ledger.connect(Hello(1, "bench", k, SHARDS, int(Coupling.LOCKSTEP), engine_kind="bench"))
        for k in range(SHARDS)
    ]
    for k, ev in setup:
        ledger.on_event(keys[k], ev)
    entries = sum(f.handles.size for _, f in frames if isinstance(f, Step))
    tick_every = 50_000_000
    next_tick = 0
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for k, frame in frames:
        if isinstance(frame, Step):
            now = frame.end_time_ns
            clock[0] = now
            ledger.on_step(keys[k], frame)
            if now >= next_tick:
                ledger.tick(now)
                next_tick = now + tick_every
        else:
            ledger.on_event(keys[k], frame)
    ledger.flush()
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    victim = ledger.get("s1-r3")
    return {
        "groups": groups,
        "entries": entries,
        "seconds": round(elapsed, 3),
        "entries_per_s": round(entries / elapsed),
        "storms": ledger.counters.storms,
        "model_fits": ledger.counters.model_fits,
        "victim": victim,
    }


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(n: int) -> dict:
    """In a fresh process: RSS before and after the ledger holds ``n`` finished requests.

    Requests look like real ones: 30-character ids, a traceparent each, a session per
    four turns, steps with prefill and decode, blame from a prefill on another shard.
    """
    clock = [1_700_000_000_000_000_000]
    ledger = Ledger(LedgerConfig(max_requests=n), clock=lambda: clock[0])
    keys = [ledger.connect(Hello(1, "mem", k, SHARDS, int(Coupling.LOCKSTEP))) for k in range(SHARDS)]
    gc.collect()
    before = rss_mb()
    t = clock[0]
    rng = np.random.default_rng(1)
    b = 64
    gs = 0
    for base in range(0, n, SHARDS * b):
        count = [0] * SHARDS
        for k in range(SHARDS):
            for h in range(b):
                i = base + k * b + h
                if i >= n:
                    break
                count[k] += 1
                trace = f"00-{int(rng.integers(1 << 62)):032x}-{int(rng.integers(1 << 62)):016x}-01"
                ledger.on_event(
                    keys[k],
                    Event(
                        handle=h,
                        kind=EventKind.ARRIVED,
                        time_ns=t,
                        request_id=f"req-{i:08d}-{int(rng.integers(1 << 62)):016x}",
                        prompt_tokens=1000,
                        session_id=f"session-{i // 4:07d}",
                        traceparent=trace,
                    ),
                )
        for g in range(6):
            for k in range(SHARDS):
                m = count[k]
                pre = np.full(m, 1000 if g == 0 else 0, np.uint32)
                if g > 0 and k == g % SHARDS and m:
                    pre[0] = 512
                d = 5_000_000 + 1_000_000 * (k == g % SHARDS)
                ledger.on_step(
                    keys[k],
                    Step(
                        seq=gs,
                        start_time_ns=t,
                        end_time_ns=t + d,
                        device_time_ns=d,
                        kind=int(StepKind.MIXED),
                        global_step=gs,
                        handles=np.arange(m, dtype=np.uint32),
                        prefill_tokens=pre,
                        decode_tokens=(pre == 0).astype(np.uint32),
                        context_tokens=np.full(m, 1000, np.uint32),
                    ),
                )
            gs += 1
            t += 6_100_000
        ledger.flush()
        for k in range(SHARDS):
            for h in range(count[k]):
                ledger.on_event(
                    keys[k], Event(handle=h, kind=EventKind.FINISHED, time_ns=t, finish_reason="length")
                )
    clock[0] = t
    ledger.tick(t)
    gc.collect()
    after = rss_mb()
    evicted = ledger.counters.evicted_finished + ledger.counters.evicted_active
    return {
        "requests": ledger.size,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "evicted": evicted,
    }


def bench_memory(n: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2000, help="lockstep groups to time (8 x 256 entries each)")
    ap.add_argument("--requests", type=int, default=100_000, help="finished requests held for the RSS figure")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the throughput run")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child)))
        return 0
    thr = bench_throughput(args.groups, args.profile)
    print(
        f"ledger throughput: {thr['entries_per_s']:,} entries/s "
        f"({thr['entries']:,} entries, {thr['groups']} groups of {SHARDS}x{BATCH}, LOCKSTEP, "
        f"{thr['storms']} storms, {thr['model_fits']} model fits, {thr['seconds']} s; goal >= 300,000)"
    )
    v = thr["victim"]
    if v is not None:
        blame = ", ".join(
            f"{b.request_id or '(shard)'}@{b.shard}={b.seconds_ns / 1e9:.2f}s" for b in v.top_blame[:3]
        )
        print(
            f"  sample victim {v.request_id}: wall {v.wall_ns / 1e9:.2f}s "
            f"engine {v.engine_time_ns / 1e9:.2f}s interference {v.interference_ns / 1e9:.2f}s; blame {blame}"
        )
    if not args.skip_memory:
        mem = bench_memory(args.requests)
        print(
            f"ledger memory: {mem['requests']:,} retained finished requests: RSS {mem['rss_before_mb']} MB "
            f"before -> {mem['rss_after_mb']} MB after (goal <= 250 MB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
