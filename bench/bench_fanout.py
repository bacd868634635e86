"""StreamUpdates fan-out: N subscribers x M active requests changing at R Hz.

A real ``enginetime sidecar`` process. A feeder process is a synthetic engine: S
INDEPENDENT shards, M/S running requests each, every shard stepping R times a second
with all of its requests in every step (so every request changes every 1/R s, as in
a decode-heavy engine). This process opens N ``StreamUpdates`` streams (interval
1/R s) and measures, over ``--seconds``:

* the sidecar's CPU (user+system from /proc, in cores) — goal: under one core;
* each subscriber's lag: for every update received, receipt time minus the end of
  the step the update reflects (``last_step_time``), in intervals — goal: no
  subscriber more than 2 intervals behind. Also the staleness of each request at
  the end (newest step seen vs newest step sent) to catch a subscriber that is
  simply not receiving.

Two subscription shapes:

* ``partitioned`` — each subscriber follows its own M/N request ids (a guard with
  ``follow="ids"``: many session servers sharing one engine);
* ``broadcast`` — each subscriber follows every request (``follow="all"``: each
  receives all M updates per interval).

Subscribers parse responses with the generated protobuf classes only (no conversion
to dataclasses), so the figures are the sidecar's and the wire's, not a slow client's.
The lag of a response is that of its oldest update (``--lag-from all``, the default
for ``partitioned``) or of its first (``--lag-from first``, the default for
``broadcast``, where one Python process reading 100 x 10,000 updates per interval
cannot afford a Python loop over each: a batch lists its updates oldest change
first, so the first update of a batch's first response is its oldest).

Run: ``.venv/bin/python bench/bench_fanout.py [--subscribers 100] [--requests 10000] [--hz 10]
[--mode partitioned|broadcast|both] [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import grpc

from enginetime.sidecar import launcher
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc

# ---------------------------------------------------------------------------- feeder (its own process)


def feed(ingest_path: str, shards: int, requests: int, hz: float, seconds: float) -> None:
    """A synthetic engine: ARRIVED for every request, then every shard steps ``hz`` times a second."""
    from array import array

    from synthetic_engine import hello_and_arrivals

    from enginetime.engine_hooks import wire
    from enginetime.engine_hooks.constants import Coupling, StepKind, TimerSource

    per = requests // shards
    socks = []
    now = time.time_ns()
    for k in range(shards):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(ingest_path)
        s.sendall(
            hello_and_arrivals(
                engine_id="fanout",
                shard=k,
                num_shards=shards,
                coupling=int(Coupling.INDEPENDENT),
                handles=range(1, per + 1),
                time_ns=now,
                request_id=lambda h, k=k: f"r{k}-{h}",
                prompt_tokens=64,
            )
        )
        socks.append(s)
    handles = array(wire.U32, range(1, per + 1))
    zeros = array(wire.U32, [0] * per)
    ones = array(wire.U32, [1] * per)
    period = 1.0 / hz
    seq = [0] * shards
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        tick += 1
        for k, s in enumerate(socks):
            end = time.time_ns()
            ctx = array(wire.U32, [64 + tick] * per)
            s.sendall(
                wire.frame_step(
                    seq=seq[k],
                    start_time_ns=end - 5_000_000,
                    end_time_ns=end,
                    device_time_ns=5_000_000,
                    timer_source=int(TimerSource.MONOTONIC),
                    kind=int(StepKind.DECODE),
                    handles=handles,
                    prefill_tokens=zeros,
                    decode_tokens=ones,
                    context_tokens=ctx,
                )
            )
            seq[k] += 1
        delay = start + tick * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    for s in socks:
        s.close()


# ---------------------------------------------------------------------------- subscribers


class Sub:
    def __init__(self) -> None:
        self.max_lag_s = 0.0
        self.lags: list[float] = []
        self.updates = 0
        self.batches = 0
        self.error = ""


async def subscribe(
    stub,
    ids: list[str],
    interval: float,
    sub: Sub,
    stop: asyncio.Event,
    warmup_until: float,
    lag_from: str,
):
    req = pb.StreamUpdatesRequest()
    req.interval.FromNanoseconds(int(interval * 1e9))
    req.filter.request_ids.extend(ids)
    call = stub.StreamUpdates(req)
    try:
        async for resp in call:
            now = time.time_ns()
            if time.monotonic() < warmup_until:
                continue
            sub.batches += 1
            worst = 0
            updates = resp.updates
            for u in updates if lag_from == "all" else updates[:1]:
                ls = u.last_step_time
                t = ls.seconds * 1_000_000_000 + ls.nanos
                if t and now - t > worst:
                    worst = now - t
            sub.updates += len(updates)
            lag = worst / 1e9
            sub.lags.append(lag)
            sub.max_lag_s = max(sub.max_lag_s, lag)
            if stop.is_set():
                break
    except grpc.aio.AioRpcError as exc:
        sub.error = f"{exc.code().name}: {exc.details()}"
    finally:
        call.cancel()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    mode: str, subscribers: int, requests: int, hz: float, shards: int, seconds: float, lag_from: str
) -> dict:
    max_requests = str(max(100_000, 2 * requests))
    sidecar = launcher.start_sidecar("--log-level", "warning", "--max-requests", max_requests)
    target = sidecar.grpc_target
    warm = 2.0
    feeder = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "feeder",
            "--ingest",
            sidecar.socket_path,
            "--shards",
            str(shards),
            "--requests",
            str(requests),
            "--hz",
            str(hz),
            "--seconds",
            str(seconds + warm + 1),
        ]
    )
    per_shard = requests // shards
    all_ids = [f"r{k}-{h}" for k in range(shards) for h in range(1, per_shard + 1)]
    subs = [Sub() for _ in range(subscribers)]
    interval = 1.0 / hz

    async def main() -> tuple[float, float]:
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 26)])
            for _ in range(max(1, subscribers // 10))
        ]
        stop = asyncio.Event()
        warmup_until = time.monotonic() + warm
        tasks = []
        for i, sub in enumerate(subs):
            ids = all_ids[i::subscribers] if mode == "partitioned" else []
            stub = pb_grpc.AccountingServiceStub(channels[i % len(channels)])
            tasks.append(
                asyncio.create_task(subscribe(stub, ids, interval, sub, stop, warmup_until, lag_from))
            )
        await asyncio.sleep(warm)
        c0, t0 = cpu_seconds(sidecar.proc.pid), time.monotonic()
        o0 = cpu_seconds(os.getpid()), cpu_seconds(feeder.pid)
        await asyncio.sleep(seconds)
        c1, t1 = cpu_seconds(sidecar.proc.pid), time.monotonic()
        others["subscribers"] = (cpu_seconds(os.getpid()) - o0[0]) / (t1 - t0)
        others["feeder"] = (cpu_seconds(feeder.pid) - o0[1]) / (t1 - t0)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        return (c1 - c0) / (t1 - t0), t1 - t0

    others: dict[str, float] = {}
    try:
        cores, span = asyncio.run(main())
    finally:
        feeder.terminate()
        feeder.wait()
        sidecar.stop()
        sidecar.close()
    lags = sorted(lag for s in subs for lag in s.lags)
    worst = max((s.max_lag_s for s in subs), default=0.0)
    return {
        "mode": mode,
        "lag_from": lag_from,
        "subscribers": subscribers,
        "requests": requests,
        "hz": hz,
        "seconds": round(span, 1),
        "sidecar_cores": round(cores, 3),
        "subscribers_cores": round(others.get("subscribers", 0.0), 3),
        "feeder_cores": round(others.get("feeder", 0.0), 3),
        "updates_per_s": round(sum(s.updates for s in subs) / span),
        "lag_p50_intervals": round(lags[len(lags) // 2] / interval, 2) if lags else None,
        "lag_p99_intervals": round(lags[int(len(lags) * 0.99)] / interval, 2) if lags else None,
        "lag_max_intervals": round(worst / interval, 2),
        "subscribers_over_2_intervals": sum(1 for s in subs if s.max_lag_s > 2 * interval),
        "errors": sorted({s.error for s in subs if s.error}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="bench", choices=("bench", "feeder"))
    ap.add_argument("--ingest", default="")
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mode", default="both", choices=("partitioned", "broadcast", "both"))
    ap.add_argument(
        "--lag-from",
        default="",
        choices=("", "all", "first"),
        help="lag of a response from all its updates or its first (default: all for partitioned, "
        "first for broadcast)",
    )
    args = ap.parse_args()
    if args.role == "feeder":
        feed(args.ingest, args.shards, args.requests, args.hz, args.seconds)
        return 0
    modes = ("partitioned", "broadcast") if args.mode == "both" else (args.mode,)
    print(
        f"StreamUpdates fan-out: {args.subscribers} subscribers x {args.requests} active requests, "
        f"every request changing at {args.hz:g} Hz (stream interval {1 / args.hz:g} s), "
        f"{args.shards} shards, {os.cpu_count()} cores"
    )
    for mode in modes:
        lag_from = args.lag_from or ("all" if mode == "partitioned" else "first")
        r = run(mode, args.subscribers, args.requests, args.hz, args.shards, args.seconds, lag_from)
        ok = r["sidecar_cores"] < 1.0 and r["lag_max_intervals"] <= 2.0
        print(
            f"  {mode:<11} sidecar CPU {r['sidecar_cores']:.2f} cores "
            f"(subscribers {r['subscribers_cores']:.2f}, feeder {r['feeder_cores']:.2f})   "
            f"updates delivered {r['updates_per_s']:>9,}/s   "
            f"lag p50 {r['lag_p50_intervals']} / p99 {r['lag_p99_intervals']} / max {r['lag_max_intervals']} "
            f"intervals (lag from {lag_from} updates)   "
            f"subscribers > 2 intervals: {r['subscribers_over_2_intervals']}   "
            f"{'GOAL MET' if ok else 'goal missed'}" + (f"   errors: {r['errors']}" if r["errors"] else "")
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
