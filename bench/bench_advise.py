"""Advise latency on loopback while the sidecar ingests a LOCKSTEP engine.

Advise is meant to be called before every turn of a session, so its latency under
ingest load is what a session server adds to each turn. A real ``enginetime sidecar``
process; a second process pushes pre-encoded frames of 8 shards x batch 256 (the
bench_ingest workload, storms included, every request with a session id) paced at
``--rate`` entries/s; this process calls Advise for random sessions of that engine
over gRPC through the blocking client, first with ingest idle, then while it runs,
and prints p50/p90/p99/max of each beside GetRequest's (the cheapest unary call) in
the same run. Goal: Advise p99 < 2 ms under load.

Beside it, in turn with each Advise call, the same call to a do-nothing gRPC server in
its own process (the *floor*: what this host, gRPC and the client add to any such call
under the same load; the sidecar cannot be faster than that).

The pusher writes as recorders do: each shard every 20 ms (staggered), the steps its
engine made since (``--cadence 0``: four steps of every shard at once, burstier).

Run: ``.venv/bin/python bench/bench_advise.py [--rate 300000] [--seconds 8]``
(``--rate 68000,300000`` runs each rate in turn, alternated with ``--repeat``);
``--slices 0,0.0005 --repeat 2`` runs the sidecar with each ``--ingest-slice`` in turn
(0: each read of ingest fed to the ledger whole, as before slicing; alternated, ``--repeat``
rounds) and prints each run and all runs of a setting pooled.

``--pin caller`` runs the caller (this process) on the first CPU and everything on the
server's side (the sidecar with all its threads, the pusher, the floor server) on the
others, as a session server on another host (or other cores) calls a sidecar: on a 2-core
machine the caller otherwise competes with the ingest work it is measured under.
``--pin sidecar`` gives the sidecar the last CPU to itself and runs the rest on the others,
as a deployment that reserves a core for the sidecar: its ingest work still competes with
its calls (in its own process), nothing else does.
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

from bench_getrequest import BATCH, SHARDS, SHIPPER_CADENCE_S, paced_pusher, percentiles  # noqa: E402
from pinning import pin_process  # noqa: E402

from enginetime.clients import AccountingClient, RequestNotFound  # noqa: E402
from enginetime.sidecar import launcher  # noqa: E402
from enginetime.sidecar.config import SidecarConfig  # noqa: E402


def measure(
    calls: list[Callable[[random.Random], object]],
    until: Callable[[], bool],
    minimum: int,
    rate: float = 0.0,
) -> list[list[float]]:
    """Latencies of each of ``calls``, taken in turn, until ``until()`` (and ``minimum`` each).

    ``rate`` > 0 paces the calls (calls/s), as a session server asks once per turn; 0 calls
    back to back, which on a 2-core machine also makes the client a third busy process.
    """
    rng = random.Random(1)
    out: list[list[float]] = [[] for _ in calls]
    period = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    while len(out[-1]) < minimum or not until():
        for call, lat in zip(calls, out, strict=True):
            if period:
                next_at += period
            t = time.perf_counter()
            call(rng)
            lat.append(time.perf_counter() - t)
            if period:
                time.sleep(max(0.0, next_at - time.perf_counter()))
    return out


def settle(ready: Callable[[], object], deadline: float, what: str) -> None:
    """Poll ``ready()`` (a request not known yet counts as not ready) until ``deadline``."""
    while True:
        try:
            if ready():
                return
        except RequestNotFound:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(what)
        time.sleep(0.01)


def advise_on(client: AccountingClient) -> Callable[[random.Random], object]:
    """An Advise call for a random session of the bench engine, to ``client``'s server."""

    def advise(rng: random.Random) -> object:
        k, h = rng.randrange(SHARDS), rng.randrange(1, BATCH + 1)
        adv = client.advise(engine_id="bench", session_id=f"sess-{k}-{h}", prompt_tokens=8192)
        assert len(adv.shards) == SHARDS
        return adv

    return advise


def pinned(cpus: set[int] | None, target: Callable[..., None], *args: object) -> None:
    """Child process: run ``target(*args)`` on ``cpus`` (None: wherever the OS puts it)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    target(*args)


def floor_server(port, stop) -> None:
    """Child process: a gRPC server answering Advise with a fixed 8-shard answer and nothing else.

    Called beside the sidecar under the same load, it measures what this host adds to any
    unary call of that size (scheduling, gRPC, the client): the floor under the sidecar's figure.
    """
    import asyncio

    import grpc

    from enginetime.v1 import accounting_pb2 as pb

    async def main() -> None:
        answer = pb.AdviseResponse()
        answer.advice.recommended_shard = 1
        answer.advice.reason = "shard 1 holds ~8000 of the 8192 prompt tokens: predicted prefill 1.0 ms"
        for k in range(SHARDS):
            answer.advice.shards.add(shard=k, cached_tokens=8000 if k == 1 else 0)

        async def advise(request, context):
            return answer

        handler = grpc.method_handlers_generic_handler(
            "enginetime.v1.AccountingService",
            {
                "Advise": grpc.unary_unary_rpc_method_handler(
                    advise,
                    request_deserializer=pb.AdviseRequest.FromString,
                    response_serializer=pb.AdviseResponse.SerializeToString,
                )
            },
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handler])
        port.value = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(0)

    asyncio.run(main())


def run(args, slice_s: float, rate: float) -> dict[str, list[float] | int]:
    """One sidecar with ``--ingest-slice slice_s``: latencies idle, then under ingest at ``rate``."""
    groups = int(rate * args.seconds / (SHARDS * BATCH))
    sidecar = launcher.start_sidecar("--log-level", "warning", "--ingest-slice", f"{slice_s:g}")
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    if args.sidecar_cpus:
        pin_process(sidecar.proc.pid, args.sidecar_cpus)
    child = ctx.Process(
        target=pinned,
        args=(args.helper_cpus, paced_pusher, sidecar.socket_path, groups, rate, ready, go, args.cadence),
    )
    port, stop = ctx.Value("i", 0), ctx.Event()
    floor = ctx.Process(target=pinned, args=(args.helper_cpus, floor_server, port, stop))
    floor.start()
    child.start()

    def get(rng: random.Random) -> object:
        return client.get_request(f"b{rng.randrange(SHARDS)}-{rng.randrange(1, BATCH + 1)}")

    try:
        with AccountingClient(sidecar.grpc_target, timeout=10) as client:
            if not ready.wait(120):
                raise SystemExit("the pusher did not get ready")
            deadline = time.monotonic() + 30
            settle(
                lambda: sum(1 for s in client.get_shards("bench") if s.connected) == SHARDS,
                deadline,
                "the engine's shards never all connected",
            )
            # Every request arrived (ingest may still be feeding the setup).
            settle(
                lambda: client.get_request(f"b{SHARDS - 1}-{BATCH}"),
                deadline,
                "the engine's requests never all arrived",
            )
            settle(lambda: port.value, deadline, "the floor server never started")
            with AccountingClient(f"127.0.0.1:{port.value}", timeout=10) as bare:
                advise, floor_advise = advise_on(client), advise_on(bare)

                idle_until = time.monotonic() + 1.5
                idle_adv, idle_floor = measure(
                    [advise, floor_advise], lambda: time.monotonic() > idle_until, 500
                )
                idle_until = time.monotonic() + 1.5
                (idle_get,) = measure([get], lambda: time.monotonic() > idle_until, 500)
                go.set()
                done = threading.Event()
                threading.Thread(target=lambda: (child.join(), done.set()), daemon=True).start()
                half = time.monotonic() + args.seconds / 2
                # At least 300 calls of each kind, or what a quarter of the loaded phase holds at
                # the call rate: more than the pusher's load lasts would be measured without it
                # (and once it disconnected, Advise has no shard to advise on).
                least = (
                    max(20, min(300, int(args.seconds * args.call_rate / 4))) if args.call_rate > 0 else 300
                )
                loaded_adv, loaded_floor = measure(
                    [advise, floor_advise],
                    lambda: time.monotonic() > half or done.is_set(),
                    least,
                    args.call_rate,
                )
                (loaded_get,) = measure([get], done.is_set, least, args.call_rate)
            steps = sum(s.steps for s in client.get_shards("bench"))
    finally:
        stop.set()
        floor.join(10)
        for proc in (child, floor):
            if proc.is_alive():
                proc.kill()
        sidecar.stop(30)
        sidecar.close()
    return {
        "idle_adv": idle_adv,
        "idle_get": idle_get,
        "idle_floor": idle_floor,
        "loaded_floor": loaded_floor,
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
        default=f"{SidecarConfig.ingest_slice_s:g}",
        help="comma-separated sidecar --ingest-slice values to run side by side (0: each read fed whole, "
        "the behaviour before slicing), e.g. 0,0.0005",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every setting, alternated")
    parser.add_argument(
        "--call-rate",
        type=float,
        default=200.0,
        help="Advise/GetRequest calls per second under load (a session server asks once per turn); "
        "0: back to back (default 200)",
    )
    parser.add_argument(
        "--cadence",
        type=float,
        default=SHIPPER_CADENCE_S,
        help=f"seconds between one shard's writes, as a recorder's shipper (default {SHIPPER_CADENCE_S:g}); "
        "0: four steps of every shard written at once",
    )
    parser.add_argument(
        "--pin",
        choices=("caller", "sidecar"),
        help="caller: the caller (this process) alone on the first CPU, the sidecar, the pusher and the "
        "floor server on the others (a session server on another host); sidecar: the sidecar (every "
        "thread) alone on the last CPU, the rest on the others (a sidecar given a core of its own)",
    )
    args = parser.parse_args()
    args.sidecar_cpus = args.helper_cpus = None  # None: wherever the OS puts them
    placement = ""
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        if args.pin == "caller":
            caller, args.sidecar_cpus = {cpus[0]}, set(cpus[1:])
            args.helper_cpus = args.sidecar_cpus
            placement = f"; caller on CPU {cpus[0]}, sidecar, pusher and floor on {cpus[1:]}"
        else:
            args.sidecar_cpus, caller = {cpus[-1]}, set(cpus[:-1])
            args.helper_cpus = caller
            placement = f"; sidecar alone on CPU {cpus[-1]}, caller, pusher and floor on {cpus[:-1]}"
        os.sched_setaffinity(0, caller)  # before the client's gRPC threads start: they inherit it

    slices = [float(x) for x in args.slices.split(",")]
    rates = [float(x) for x in args.rate.split(",")]
    runs: dict[tuple[float, float], list[dict]] = {(rate, sl): [] for rate in rates for sl in slices}
    for _ in range(args.repeat):
        for rate in rates:
            for sl in slices:
                runs[rate, sl].append(run(args, sl, rate))
    pace = f"{args.call_rate:g} calls/s under load" if args.call_rate > 0 else "calls back to back"
    how = f"each shard writes every {args.cadence * 1e3:g} ms" if args.cadence > 0 else "bursts of 4 steps"
    print(
        f"bench_advise: {SHARDS} shards x batch {BATCH} LOCKSTEP ({how}), loopback gRPC, blocking client, "
        f"{pace}{placement}"
    )
    for (rate, sl), rs in runs.items():
        setting = f"--ingest-slice {sl:g}"
        for i, r in enumerate(rs):
            print(f" ingest at {rate:,.0f} entries/s, {setting} (run {i + 1} of {len(rs)})")
            print(f"  Advise     ingest idle     {percentiles(r['idle_adv'])}")
            print(f"  floor      ingest idle     {percentiles(r['idle_floor'])}")
            print(f"  GetRequest ingest idle     {percentiles(r['idle_get'])}")
            print(f"  Advise     ingest running  {percentiles(r['loaded_adv'])}")
            print(f"  floor      ingest running  {percentiles(r['loaded_floor'])}")
            print(f"  GetRequest ingest running  {percentiles(r['loaded_get'])}")
            print(f"  ingest: {r['groups']} groups pushed; {r['steps']:,} steps attributed so far")
        pooled = [x for r in rs for x in r["loaded_adv"]]  # type: ignore[union-attr]
        worst = max(p99(r["loaded_adv"]) for r in rs)  # type: ignore[arg-type]
        floor = [x for r in rs for x in r["loaded_floor"]]  # type: ignore[union-attr]
        print(f"  Advise     all {len(rs)} runs     {percentiles(pooled)}")
        print(f"  floor      all {len(rs)} runs     {percentiles(floor)}")
        print(
            f"  goal Advise p99 < 2 ms under {rate:,.0f} entries/s, {setting}: "
            f"{'met' if p99(pooled) < 2.0 else 'MISSED'} (all runs pooled {p99(pooled):.2f} ms, "
            f"worst run {worst:.2f} ms; the floor's pooled p99 {p99(floor):.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
