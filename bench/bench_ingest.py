"""Ingest throughput: a real Unix socket -> frame decoding -> ledger attribution.

One LOCKSTEP engine, 8 shards x batch 256 decoding requests, with a prefill storm
now and then (one shard runs 512-token chunks of a long prompt beside its
decodes; every shard's step lasts as long as the slowest one's). A separate
process pre-encodes every frame with the engine-side encoder
(``engine_hooks.wire``), then pushes them over 8 connections, round-robin a few
steps at a time as lockstep shards would. The sidecar side is the real
``Sidecar`` (ingest server, ledger with attribution on, ticker, fan-out, gRPC)
on one asyncio loop in this process; the clock runs from the first step byte
until the ledger has attributed every step (and flushed).

Goal (DESIGN §9): >= 300,000 entries/s on one core.

Run: ``.venv/bin/python bench/bench_ingest.py [--groups N] [--shards S] [--batch B]``;
``--slices 0,0.0005 --repeat 3`` compares ``--ingest-slice`` settings side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time

GOAL = 300_000
CHUNK = 512
STORM_EVERY = 200  # groups between storm starts
STORM_CHUNKS = 40  # 512-token chunks per storm


def step_cost_ns(prefill: int, decodes: int, context: int) -> int:
    """A plausible device time for a shard's step (what the cost model will learn)."""
    return int(
        3e6 + 4e3 * prefill + 0.02 * prefill * (context + prefill / 2) + 2e4 * decodes + 2.0 * 500 * decodes
    )


def encode(
    shards: int, batch: int, groups: int, *, owned: range | None = None, token: str = ""
) -> tuple[list[bytes], list[list[bytes]], int]:
    """(per-shard setup bytes, per-shard bytes of each lockstep step, entries) — pre-encoded.

    ``units[k][g]`` is everything shard k sends for global step g: the step, and a
    storm's ARRIVED before its first chunk / FINISHED after its last. ``owned`` (default:
    all) limits the work to the shards one process ships (the others' lists stay empty and
    their entries uncounted); ``token`` goes in each hello (TCP ingest).
    """
    owned = range(shards) if owned is None else owned
    from array import array

    from synthetic_engine import hello_and_arrivals

    from enginetime.engine_hooks import wire
    from enginetime.engine_hooks.constants import Coupling, EventKind, StepKind, TimerSource

    t0 = time.time_ns() - 3_600_000_000_000
    setup = [
        hello_and_arrivals(
            engine_id="bench",
            shard=k,
            num_shards=shards,
            coupling=int(Coupling.LOCKSTEP),
            handles=range(1, batch + 1),
            time_ns=t0,
            request_id=lambda h, k=k: f"b{k}-{h}",
            prompt_tokens=200,
            session_id=lambda h, k=k: f"sess-{k}-{h}",
            token=token,
        )
        if k in owned
        else b""
        for k in range(shards)
    ]

    handles = array(wire.U32, range(1, batch + 1))
    zeros = array(wire.U32, [0] * batch)
    ones = array(wire.U32, [1] * batch)
    units: list[list[bytes]] = [[] for _ in range(shards)]
    entries = 0
    storm_handle = 100_000
    t = t0
    for g in range(groups):
        storm_shard = (g // STORM_EVERY) % shards
        chunk = g % STORM_EVERY
        storming = chunk < STORM_CHUNKS
        cost = step_cost_ns(CHUNK if storming else 0, batch, chunk * CHUNK)  # the slowest shard sets the pace
        context = array(wire.U32, [500 + g % 1000] * batch)
        for k in owned:
            parts = []
            if storming and k == storm_shard:
                if chunk == 0:
                    storm_handle = 100_001 + g // STORM_EVERY  # the same in every process
                    parts.append(
                        wire.frame_event(
                            handle=storm_handle,
                            kind=int(EventKind.ARRIVED),
                            time_ns=t,
                            request_id=f"storm-{storm_handle}",
                            prompt_tokens=CHUNK * STORM_CHUNKS,
                        )
                    )
                parts.append(
                    wire.frame_step(
                        seq=g + 1,
                        global_step=g,
                        start_time_ns=t,
                        end_time_ns=t + cost,
                        device_time_ns=cost,
                        timer_source=int(TimerSource.MONOTONIC),
                        kind=int(StepKind.MIXED),
                        handles=handles + array(wire.U32, [storm_handle]),
                        prefill_tokens=zeros + array(wire.U32, [CHUNK]),
                        decode_tokens=ones + array(wire.U32, [0]),
                        context_tokens=context + array(wire.U32, [chunk * CHUNK]),
                    )
                )
                entries += batch + 1
                if chunk == STORM_CHUNKS - 1:
                    parts.append(
                        wire.frame_event(
                            handle=storm_handle,
                            kind=int(EventKind.FINISHED),
                            time_ns=t + cost,
                            finish_reason="length",
                        )
                    )
            else:
                parts.append(
                    wire.frame_step(
                        seq=g + 1,
                        global_step=g,
                        start_time_ns=t,
                        end_time_ns=t + cost,
                        device_time_ns=cost,
                        timer_source=int(TimerSource.MONOTONIC),
                        kind=int(StepKind.DECODE),
                        handles=handles,
                        prefill_tokens=zeros,
                        decode_tokens=ones,
                        context_tokens=context,
                    )
                )
                entries += batch
            units[k].append(b"".join(parts))
        t += cost + 200_000
    return setup, units, entries


def pusher(path: str, shards: int, batch: int, groups: int, ready, go, info) -> None:
    """Child process: encode everything, connect, send setup, then (on go) the steps."""
    setup, units, entries = encode(shards, batch, groups)
    info.put((entries, sum(len(u) for shard in units for u in shard)))
    conns = []
    for k in range(shards):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        s.connect(path)
        s.sendall(setup[k])
        conns.append(s)
    ready.set()
    go.wait()
    per = 8  # lockstep shards advance together: a few steps of each shard in turn
    for g in range(0, groups, per):
        for k, s in enumerate(conns):
            s.sendall(b"".join(units[k][g : g + per]))
    for s in conns:
        s.close()


async def probe(lags: list[tuple[float, float]]) -> None:
    """Every 2 ms, a callback made ready and the time until it runs: what a gRPC call arriving
    then would wait for the loop. Wall time, and the loop thread's CPU time in that wait (the
    work in its way, without the time the OS ran other processes)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.002)
        ran = loop.create_future()
        t, c = time.perf_counter(), time.thread_time()
        loop.call_soon(ran.set_result, None)
        await ran
        lags.append((time.perf_counter() - t, time.thread_time() - c))


def _q(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] * 1e3 if values else float("nan")


async def wait_attributed(sidecar, steps0: int, want: int, timeout_s: float) -> None:
    """Wait until the in-process sidecar's ledger has attributed ``want`` steps, then flush it."""
    ledger = sidecar.ledger
    deadline = time.monotonic() + timeout_s
    while ledger.counters.steps < want:
        await asyncio.sleep(0.002)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {ledger.counters.steps - steps0} of {want - steps0} steps attributed after "
                f"{timeout_s:g} s; ingest counters: {sidecar.ingest.counters.summary()}"
            )
    ledger.flush()


async def run(args) -> dict:
    from enginetime.sidecar.ledger.ledger import LedgerConfig
    from enginetime.sidecar.server import Sidecar, SidecarConfig

    sockdir = tempfile.mkdtemp(prefix="et-bench-", dir="/tmp")
    path = f"{sockdir}/ingest.sock"
    sidecar = Sidecar(
        SidecarConfig(
            ingest=f"unix:{path}",
            listen="127.0.0.1:0",
            ledger=LedgerConfig(),
            ingest_slice_s=args.ingest_slice,
        )
    )
    await sidecar.start()
    ctx = mp.get_context("spawn")
    ready, go, info = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=pusher, args=(path, args.shards, args.batch, args.groups, ready, go, info))
    child.start()
    try:
        entries, frame_bytes = await asyncio.to_thread(info.get, True, 300)
        await asyncio.to_thread(ready.wait, 300)
        ledger = sidecar.ledger
        # Setup (hellos + arrivals) is ingested before the clock starts.
        want_events = args.shards * args.batch
        while ledger.counters.events < want_events:
            await asyncio.sleep(0.005)
        steps0 = ledger.counters.steps
        want = steps0 + args.shards * args.groups
        lags: list[tuple[float, float]] = []
        probing = asyncio.create_task(probe(lags))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        go.set()
        await wait_attributed(sidecar, steps0, want, 120)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        probing.cancel()
        c = ledger.counters
        result = {
            "entries": entries,
            "steps": c.steps - steps0,
            "wall_s": wall,
            "cpu_s": cpu,
            "entries_per_s": entries / wall,
            "entries_per_cpu_s": entries / cpu if cpu else float("inf"),
            "mb_per_s": frame_bytes / wall / 1e6,
            "lockstep_groups": c.lockstep_groups,
            "lockstep_timeouts": c.lockstep_timeouts,
            "storms": c.storms,
            "rejected": dict(sidecar.ingest.counters.rejected),
            "lag_wall": sorted(w for w, _ in lags),
            "lag_cpu": sorted(c for _, c in lags),
        }
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
        sidecar.request_stop()
        await sidecar.shutdown()
        shutil.rmtree(sockdir, ignore_errors=True)
    return result


def main() -> int:
    from enginetime.sidecar.config import SidecarConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--groups", type=int, default=2000, help="lockstep steps (each: one step per shard)")
    parser.add_argument(
        "--slices",
        default=f"{SidecarConfig.ingest_slice_s:g}",
        help="comma-separated --ingest-slice values (seconds; 0 = each read fed whole) to run side by side, "
        f"alternating (default {SidecarConfig.ingest_slice_s:g}; e.g. 0,{SidecarConfig.ingest_slice_s:g})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each slice, alternated")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from enginetime.sidecar.server import tune_gc

    tune_gc()  # as `enginetime sidecar` does: without it, full collections stop the loop for 20-40 ms
    slices = [float(x) for x in args.slices.split(",")]
    results: dict[float, list[dict]] = {sl: [] for sl in slices}
    for _ in range(args.repeat):
        for sl in slices:
            args.ingest_slice = sl
            results[sl].append(asyncio.run(run(args)))
    ok = True
    for sl in slices:
        runs = results[sl]
        r = sorted(runs, key=lambda x: x["entries_per_s"])[len(runs) // 2]  # the median run
        print(
            f"bench_ingest: {args.shards} shards x batch {args.batch} LOCKSTEP, {args.groups} steps/shard, "
            f"{r['storms']} storms, --ingest-slice {sl:g}, median of {len(runs)}, pid {os.getpid()}"
        )
        print(
            f"  entries          {r['entries']:,} in {r['wall_s']:.2f} s wall, "
            f"{r['cpu_s']:.2f} s CPU (sidecar process)"
        )
        print(
            f"  throughput       {r['entries_per_s']:,.0f} entries/s  "
            f"({r['entries_per_cpu_s']:,.0f} per CPU-second); all runs: "
            + ", ".join(f"{x['entries_per_s']:,.0f}" for x in runs)
        )
        print(
            f"  steps            {r['steps']:,} attributed ({r['steps'] / r['wall_s']:,.0f} steps/s), "
            f"{r['mb_per_s']:.1f} MB/s of frames"
        )
        for what in ("wall", "cpu"):
            v = r[f"lag_{what}"]
            print(
                f"  loop wait ({what:<4}) p50 {_q(v, 0.5):.2f} ms  p99 {_q(v, 0.99):.2f} ms  "
                f"max {_q(v, 1.0):.2f} ms  (a ready callback's wait, n={len(v)})"
            )
        print(
            f"  lockstep groups  {r['lockstep_groups']:,} ({r['lockstep_timeouts']} timed out), "
            f"rejected {r['rejected'] or 'none'}"
        )
        met = r["entries_per_s"] >= GOAL
        ok = ok and met
        print(f"  goal             >= {GOAL:,} entries/s on one core: {'met' if met else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
