"""GetRequest latency on loopback while the sidecar ingests a LOCKSTEP engine.

A real ``enginetime sidecar`` process; a second process pushes pre-encoded
frames of 8 shards x batch 256 (the bench_ingest workload, storms included)
paced at ``--rate`` entries/s; this process calls GetRequest for random live
requests over gRPC, first with ingest idle, then while it runs, and prints
p50/p90/p99/max of each together with the ingest rate the sidecar achieved.

Run: ``.venv/bin/python bench/bench_getrequest.py [--rate 300000] [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import socket
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ingest import encode  # noqa: E402  (the same pre-encoded workload)

from enginetime.sidecar import launcher  # noqa: E402
from enginetime.v1 import accounting_pb2 as pb  # noqa: E402
from enginetime.v1 import accounting_pb2_grpc as pb_grpc  # noqa: E402

SHARDS = 8
BATCH = 256


#: How often each recorder's shipper writes what its engine stepped (engine_hooks.shipper).
SHIPPER_CADENCE_S = 0.02


def paced_pusher(
    path: str, groups: int, rate: float, ready, go, cadence_s: float = SHIPPER_CADENCE_S
) -> None:
    """Child process: encode, connect, send setup; on go, push ``rate`` entries/s until done.

    Lockstep step ``g`` is due at ``(g + 1) × step`` (``step`` = batch × shards / rate).
    ``cadence_s`` > 0 writes as the recorders do: each shard wakes every ``cadence_s``, its
    wake-ups staggered across the shards, and writes its steps due by then in one write (so
    a lockstep group completes when its last shard's write lands). 0: every shard writes
    four steps at once, all shards together, every four steps (burstier than any engine).
    """
    setup, units, _entries = encode(SHARDS, BATCH, groups)
    conns = []
    for k in range(SHARDS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(setup[k])
        conns.append(s)
    ready.set()
    go.wait()
    step = SHARDS * BATCH / rate
    began = time.perf_counter()
    if cadence_s <= 0:
        per = 4
        for i, g in enumerate(range(0, groups, per)):
            for k, s in enumerate(conns):
                s.sendall(b"".join(units[k][g : g + per]))
            delay = began + (i + 1) * per * step - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    else:
        sent = [0] * SHARDS  # steps each shard has written
        wake = [began + cadence_s * (k + 1) / SHARDS for k in range(SHARDS)]
        while min(sent) < groups:
            k = min(range(SHARDS), key=wake.__getitem__)
            delay = wake[k] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            due = min(groups, int((wake[k] - began) / step))
            if due > sent[k]:
                conns[k].sendall(b"".join(units[k][sent[k] : due]))
                sent[k] = due
            wake[k] += cadence_s
    for s in conns:
        s.close()


def percentiles(samples: list[float]) -> str:
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))] * 1e3

    return (
        f"p50 {q(0.50):.2f} ms  p90 {q(0.90):.2f} ms  p99 {q(0.99):.2f} ms  "
        f"max {s[-1] * 1e3:.2f} ms  (n={len(s)})"
    )


def measure(stub, until, minimum: int) -> list[float]:
    """GetRequest latencies for random live requests until ``until()`` (and at least ``minimum`` calls)."""
    rng = random.Random(1)
    out = []
    while len(out) < minimum or not until():
        rid = f"b{rng.randrange(SHARDS)}-{rng.randrange(1, BATCH + 1)}"
        t = time.perf_counter()
        resp = stub.GetRequest(pb.GetRequestRequest(request_id=rid), timeout=10)
        out.append(time.perf_counter() - t)
        assert resp.request.request_id == rid
    return out


def total_steps(stub) -> int:
    return sum(s.steps for s in stub.GetShards(pb.GetShardsRequest(engine_id="bench"), timeout=10).shards)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rate", type=float, default=300_000, help="ingest entries/s to push (default 300000)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the loaded phase")
    args = parser.parse_args()

    groups = int(args.rate * args.seconds / (SHARDS * BATCH))
    sidecar = launcher.start_sidecar("--log-level", "warning")
    proc, target = sidecar.proc, sidecar.grpc_target
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=paced_pusher, args=(sidecar.socket_path, groups, args.rate, ready, go))
    child.start()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.AccountingServiceStub(channel)
            if not ready.wait(120):
                raise SystemExit("the pusher did not get ready")
            deadline = time.monotonic() + 30
            while (
                sum(1 for s in stub.GetShards(pb.GetShardsRequest(), timeout=5).shards if s.connected)
                < SHARDS
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the engine's shards never all connected")
                time.sleep(0.01)
            stub.GetRequest(
                pb.GetRequestRequest(request_id=f"b{SHARDS - 1}-{BATCH}"), timeout=10
            )  # all arrived

            idle_until = time.monotonic() + 2.0
            idle = measure(stub, lambda: time.monotonic() > idle_until, 500)

            steps0 = total_steps(stub)
            began = time.perf_counter()
            go.set()
            done = threading.Event()
            threading.Thread(target=lambda: (child.join(), done.set()), daemon=True).start()
            loaded = measure(stub, done.is_set, 500)
            while total_steps(stub) < steps0 + groups * SHARDS and time.perf_counter() - began < 60:
                time.sleep(0.01)
            elapsed = time.perf_counter() - began
            attributed = total_steps(stub) - steps0
    finally:
        if child.is_alive():
            child.kill()
        sidecar.stop(30)
        sidecar.close()

    achieved = attributed * BATCH / elapsed  # storms add a few entries; close enough for a rate
    print(
        f"bench_getrequest: sidecar pid {proc.pid}, {SHARDS} shards x batch {BATCH} LOCKSTEP, loopback gRPC"
    )
    print(f"  ingest idle      {percentiles(idle)}")
    print(f"  ingest running   {percentiles(loaded)}")
    print(
        f"  ingest rate      {achieved:,.0f} entries/s achieved (target {args.rate:,.0f}), "
        f"{attributed:,} steps attributed in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
