"""Advise latency on loopback while the sidecar ingests a LOCKSTEP engine.

Advise is meant to be called before every turn of a session, so its latency under
ingest load is what a session server adds to each turn. A real ``enginetime sidecar``
process; a second process pushes pre-encoded frames of 8 shards x batch 256 (the
bench_ingest workload, storms included, every request with a session id) paced at
``--rate`` entries/s; this process calls Advise for random sessions of that engine
over gRPC through the blocking client, first with ingest idle, then while it runs,
and prints p50/p90/p99/max of each beside GetRequest's (the cheapest unary call) in
the same run. Goal: Advise p99 < 2 ms under load.

Run: ``.venv/bin/python bench/bench_advise.py [--rate 300000] [--seconds 8]``
(``--rate 68000,300000`` runs each rate in turn, alternated with ``--repeat``);
``--slices 0,0.0005 --repeat 2`` runs the sidecar with each ``--ingest-slice`` in turn
(0: each read of ingest fed to the ledger whole, as before slicing) and prints both.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_getrequest import BATCH, SHARDS, paced_pusher, percentiles  # noqa: E402

from enginetime.clients import AccountingClient  # noqa: E402
from enginetime.sidecar import launcher  # noqa: E402


def measure(
    call: Callable[[random.Random], object], until: Callable[[], bool], minimum: int, rate: float = 0.0
) -> list[float]:
    """Latencies of ``call`` until ``until()`` (and at least ``minimum`` calls).

    ``rate`` > 0 paces the calls (calls/s), as a session server asks once per turn; 0 calls
    back to back, which on a 2-core machine also makes the client a third busy process.
    """
    rng = random.Random(1)
    out = []
    period = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    while len(out) < minimum or not until():
        if period:
            next_at += period
        t = time.perf_counter()
        call(rng)
        out.append(time.perf_counter() - t)
        if period:
            time.sleep(max(0.0, next_at - time.perf_counter()))
    return out


def run(args, slice_s: float, rate: float) -> dict[str, list[float] | int]:
    """One sidecar with ``--ingest-slice slice_s``: latencies idle, then under ingest at ``rate``."""
    groups = int(rate * args.seconds / (SHARDS * BATCH))
    sidecar = launcher.start_sidecar("--log-level", "warning", "--ingest-slice", f"{slice_s:g}")
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=paced_pusher, args=(sidecar.socket_path, groups, rate, ready, go))
    child.start()

    def advise(rng: random.Random) -> object:
        k, h = rng.randrange(SHARDS), rng.randrange(1, BATCH + 1)
        adv = client.advise(engine_id="bench", session_id=f"sess-{k}-{h}", prompt_tokens=8192)
        assert len(adv.shards) == SHARDS
        return adv

    def get(rng: random.Random) -> object:
        return client.get_request(f"b{rng.randrange(SHARDS)}-{rng.randrange(1, BATCH + 1)}")

    try:
        with AccountingClient(sidecar.grpc_target, timeout=10) as client:
            if not ready.wait(120):
                raise SystemExit("the pusher did not get ready")
            deadline = time.monotonic() + 30
            while sum(1 for s in client.get_shards("bench") if s.connected) < SHARDS:
                if time.monotonic() > deadline:
                    raise SystemExit("the engine's shards never all connected")
                time.sleep(0.01)
            client.get_request(f"b{SHARDS - 1}-{BATCH}")  # all arrived
            idle_until = time.monotonic() + 1.5
            idle_adv = measure(advise, lambda: time.monotonic() > idle_until, 500)
            idle_until = time.monotonic() + 1.5
            idle_get = measure(get, lambda: time.monotonic() > idle_until, 500)
            go.set()
            done = threading.Event()
            threading.Thread(target=lambda: (child.join(), done.set()), daemon=True).start()
            half = time.monotonic() + args.seconds / 2
            loaded_adv = measure(
                advise, lambda: time.monotonic() > half or done.is_set(), 300, args.call_rate
            )
            loaded_get = measure(get, done.is_set, 300, args.call_rate)
            steps = sum(s.steps for s in client.get_shards("bench"))
    finally:
        if child.is_alive():
            child.kill()
        sidecar.stop(30)
        sidecar.close()
    return {
        "idle_adv": idle_adv,
        "idle_get": idle_get,
        "loaded_adv": loaded_adv,
        "loaded_get": loaded_get,
        "steps": steps,
        "groups": groups,
    }


def p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rate",
        default="300000",
        help="ingest entries/s to push (default 300000); comma-separated rates run alternated in one "
        "run, e.g. 50000,100000,300000 (a real 8-rank engine at batch 256 and 30 ms steps makes ~68 k/s)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the loaded phase")
    parser.add_argument(
        "--slices",
        default="0.0005",
        help="comma-separated sidecar --ingest-slice values to run side by side (0: each read fed whole, "
        "the behaviour before slicing), e.g. 0,0.0005",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each slice, alternated")
    parser.add_argument(
        "--call-rate",
        type=float,
        default=200.0,
        help="Advise/GetRequest calls per second under load (a session server asks once per turn); "
        "0: back to back (default 200)",
    )
    args = parser.parse_args()

    slices = [float(x) for x in args.slices.split(",")]
    rates = [float(x) for x in args.rate.split(",")]
    runs: dict[tuple[float, float], list[dict]] = {(rate, sl): [] for rate in rates for sl in slices}
    for _ in range(args.repeat):
        for rate in rates:
            for sl in slices:
                runs[rate, sl].append(run(args, sl, rate))
    pace = f"{args.call_rate:g} calls/s under load" if args.call_rate > 0 else "calls back to back"
    print(f"bench_advise: {SHARDS} shards x batch {BATCH} LOCKSTEP, loopback gRPC, blocking client, {pace}")
    for (rate, sl), rs in runs.items():
        for i, r in enumerate(rs):
            print(f" ingest at {rate:,.0f} entries/s, --ingest-slice {sl:g} (run {i + 1} of {len(rs)})")
            print(f"  Advise     ingest idle     {percentiles(r['idle_adv'])}")
            print(f"  GetRequest ingest idle     {percentiles(r['idle_get'])}")
            print(f"  Advise     ingest running  {percentiles(r['loaded_adv'])}")
            print(f"  GetRequest ingest running  {percentiles(r['loaded_get'])}")
            print(f"  ingest: {r['groups']} groups pushed; {r['steps']:,} steps attributed so far")
        worst = max(p99(r["loaded_adv"]) for r in rs)  # type: ignore[arg-type]
        print(
            f"  goal Advise p99 < 2 ms under {rate:,.0f} entries/s, --ingest-slice {sl:g}: "
            f"{'met' if worst < 2.0 else 'MISSED'} (worst run {worst:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
