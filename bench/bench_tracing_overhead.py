"""Span export overhead: sidecar ingest throughput with tracing on vs off, interleaved.

    .venv/bin/python bench/bench_tracing_overhead.py [--groups 3000] [--rounds 2] [--life 256,1024]

The core's ingest load (``bench_ingest.py``: one LOCKSTEP engine, 8 shards x
batch 256, a 40-chunk prefill storm every 200 steps) plus what makes spans:
requests finish. Each request lives 256..1024 decode steps (its prompt is
prefilled in its first step), then FINISHED and a new request ARRIVED take its
place in the batch — about 3 finished requests per lockstep step, so thousands
of requests (four spans each: queue, prefill, decode and the request; storm
victims also carry span links) finish during a trial.

A child process pre-encodes every frame once with the engine-side encoder and
pushes them over 8 Unix sockets to a fresh in-process ``Sidecar`` per trial.
Trials alternate off/on, on/off, ... (``--rounds`` pairs in ABBA order) so a
drift in the machine's load hits both arms alike. With tracing on, the sidecar
exports over OTLP/gRPC (its span export process: the SDK's tracer,
BatchSpanProcessor and exporter) to a receiver in another process that accepts
each Export without decoding it and runs at the lowest priority (it stands for a
collector on another host); the link threshold is 10 ms so victims of the storms
get links. The clock starts once the span export process is up (a one-time
start-up cost, not a per-request one).

Throughput is entries attributed per second of wall time from the first step
byte until the ledger attributed every step (as in bench_ingest); spans built
while the clock runs compete for the same GIL and cores. After the clock, the
trial waits for the tracer to export what it built and reports the counts
(nothing may be dropped). Goal: tracing-on / tracing-off >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time

GOAL = 0.9
CHUNK = 512
PROMPT = 200
STORM_EVERY = 200
STORM_CHUNKS = 40
LIFE = (256, 1024)  # decode steps a request lives


def step_cost_ns(prefill: int, decodes: int, context: int) -> int:
    return int(
        3e6 + 4e3 * prefill + 0.02 * prefill * (context + prefill / 2) + 2e4 * decodes + 2.0 * 500 * decodes
    )


def encode(shards: int, batch: int, groups: int, life_range: tuple[int, int] = LIFE, seed: int = 1):
    """(per-shard setup bytes, per-shard bytes per lockstep step, entries, requests finished)."""
    from array import array

    from enginetime.engine_hooks import wire
    from enginetime.engine_hooks.constants import Coupling, EventKind, StepKind, TimerSource

    rng = random.Random(seed)
    mono = int(TimerSource.MONOTONIC)
    # Recent enough that finished requests are within the store's retention (their spans need them).
    t0 = time.time_ns() - 60_000_000_000
    next_handle = [batch + 1] * shards
    handles = [list(range(1, batch + 1)) for _ in range(shards)]
    # Staggered: the first requests are already part-way through their lives.
    life = [[rng.randint(1, life_range[1]) for _ in range(batch)] for _ in range(shards)]
    fresh = [[True] * batch for _ in range(shards)]  # next step prefills its prompt
    age = [[0] * batch for _ in range(shards)]  # tokens decoded so far
    setup = []
    for k in range(shards):
        parts = [
            wire.frame_hello(
                engine_id="bench",
                shard=k,
                num_shards=shards,
                coupling=int(Coupling.LOCKSTEP),
                engine_kind="bench",
                timer_source=mono,
                device_name="cpu",
                recorder_epoch=1,
                wall_time_ns=t0,
            )  # fmt: skip
        ]
        parts += [
            wire.frame_event(
                handle=h,
                kind=int(EventKind.ARRIVED),
                time_ns=t0,
                request_id=f"b{k}-{h}",
                prompt_tokens=PROMPT,
                session_id=f"sess-{k}-{h}",
            )  # fmt: skip
            for h in handles[k]
        ]
        setup.append(b"".join(parts))
    units: list[list[bytes]] = [[] for _ in range(shards)]
    entries = finished = 0
    storm_handle = 1 << 30
    t = t0
    for g in range(groups):
        storm_shard = (g // STORM_EVERY) % shards
        chunk = g % STORM_EVERY
        storming = chunk < STORM_CHUNKS
        cost = step_cost_ns(CHUNK if storming else 0, batch, chunk * CHUNK)
        for k in range(shards):
            parts = []
            hs, pre, dec, ctx = handles[k], [], [], []
            for i in range(batch):
                if fresh[k][i]:
                    pre.append(PROMPT)
                    dec.append(0)
                    ctx.append(0)
                else:
                    pre.append(0)
                    dec.append(1)
                    ctx.append(PROMPT + age[k][i])
            step_handles = list(hs)
            if storming and k == storm_shard:
                if chunk == 0:
                    storm_handle += 1
                    parts.append(wire.frame_event(handle=storm_handle, kind=int(EventKind.ARRIVED),
                                                  time_ns=t, request_id=f"storm-{storm_handle}",
                                                  prompt_tokens=CHUNK * STORM_CHUNKS))  # fmt: skip
                step_handles.append(storm_handle)
                pre.append(CHUNK)
                dec.append(0)
                ctx.append(chunk * CHUNK)
            kind = int(StepKind.MIXED if any(pre) else StepKind.DECODE)
            parts.append(
                wire.frame_step(seq=g + 1, global_step=g, start_time_ns=t, end_time_ns=t + cost,
                                device_time_ns=cost, timer_source=mono, kind=kind,
                                handles=array(wire.U32, step_handles), prefill_tokens=array(wire.U32, pre),
                                decode_tokens=array(wire.U32, dec), context_tokens=array(wire.U32, ctx))
            )  # fmt: skip
            entries += len(step_handles)
            if storming and k == storm_shard and chunk == STORM_CHUNKS - 1:
                parts.append(wire.frame_event(handle=storm_handle, kind=int(EventKind.FINISHED),
                                              time_ns=t + cost, finish_reason="length"))  # fmt: skip
                finished += 1
            # Requests whose life ended finish after this step; a new one takes the slot.
            for i in range(batch):
                if fresh[k][i]:
                    fresh[k][i] = False
                    continue
                life[k][i] -= 1
                age[k][i] += 1
                if life[k][i] <= 0:
                    old, new = hs[i], next_handle[k]
                    next_handle[k] += 1
                    parts.append(wire.frame_event(handle=old, kind=int(EventKind.FINISHED),
                                                  time_ns=t + cost, finish_reason="length"))  # fmt: skip
                    parts.append(wire.frame_event(handle=new, kind=int(EventKind.ARRIVED), time_ns=t + cost,
                                                  request_id=f"b{k}-{new}", prompt_tokens=PROMPT,
                                                  session_id=f"sess-{k}-{new}"))  # fmt: skip
                    hs[i] = new
                    life[k][i] = rng.randint(*life_range)
                    fresh[k][i] = True
                    age[k][i] = 0
                    finished += 1
            units[k].append(b"".join(parts))
        t += cost + 200_000
    return setup, units, entries, finished


def pusher(shards: int, batch: int, groups: int, life: tuple[int, int], commands, replies) -> None:
    """Child: encode once; then per trial connect to the given socket, send setup, wait, push."""
    setup, units, entries, finished = encode(shards, batch, groups, life)
    replies.put((entries, finished, sum(len(u) for shard in units for u in shard)))
    while True:
        path = commands.get()
        if path is None:
            return
        conns = []
        for k in range(shards):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            s.connect(path)
            s.sendall(setup[k])
            conns.append(s)
        replies.put("ready")
        assert commands.get() == "go"
        per = 8
        for g in range(0, groups, per):
            for k, s in enumerate(conns):
                s.sendall(b"".join(units[k][g : g + per]))
        for s in conns:
            s.close()


def receiver(port_out, stop) -> None:
    """Child: an OTLP/gRPC TraceService that accepts every Export without decoding it.

    It stands for a collector on another host, so it runs at the lowest priority: on a
    2-core machine its CPU would otherwise be charged to the sidecar under test.
    """
    from concurrent import futures

    os.nice(19)

    import grpc

    def export(request: bytes, context) -> bytes:
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port_out.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(0)


async def trial(tracing: bool, args, commands, replies, otlp_port: int, shards: int, groups: int) -> dict:
    from enginetime.sidecar.ledger.ledger import LedgerConfig
    from enginetime.sidecar.server import Sidecar, SidecarConfig

    sockdir = tempfile.mkdtemp(prefix="et-bench-", dir="/tmp")
    path = f"{sockdir}/ingest.sock"
    config = SidecarConfig(
        ingest=f"unix:{path}",
        listen="127.0.0.1:0",
        ledger=LedgerConfig(retention_s=3600.0),  # trials run minutes after the frames were encoded
        otlp_endpoint=f"http://127.0.0.1:{otlp_port}" if tracing else "",
        trace_link_threshold_s=0.01,
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    if sidecar.tracer is not None:  # steady state: the export process has started (a one-time cost)
        assert await asyncio.to_thread(sidecar.tracer.wait_ready, 60), "the span export process did not start"
    try:
        commands.put(path)
        assert await asyncio.to_thread(replies.get, True, 120) == "ready"
        ledger = sidecar.ledger
        while ledger.counters.events < shards * args.batch:
            await asyncio.sleep(0.005)
        steps0 = ledger.counters.steps
        want = steps0 + shards * groups
        cpu0, wall0 = time.process_time(), time.perf_counter()
        commands.put("go")
        deadline = time.monotonic() + 300
        while ledger.counters.steps < want:
            await asyncio.sleep(0.002)
            if time.monotonic() > deadline:
                got = ledger.counters.steps - steps0
                raise RuntimeError(f"only {got} of {want - steps0} steps attributed after 300 s")
        ledger.flush()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        spans = {}
        if sidecar.tracer is not None:
            c = sidecar.tracer.counters
            spans["built_during_clock"] = c.created
        result = {"wall_s": wall, "cpu_s": cpu, "storms": ledger.counters.storms}
    finally:
        sidecar.request_stop()
        await sidecar.shutdown()  # pumps the finished feed, exports what is left (span_flush_s)
        shutil.rmtree(sockdir, ignore_errors=True)
    if sidecar.tracer is not None:
        c = sidecar.tracer.counters
        spans |= {
            "requests": c.requests,
            "created": c.created,
            "exported": sidecar.tracer.exported,
            "links": c.links,
            "dropped": sum(c.dropped.values()),
            "dropped_by": {k: v for k, v in c.dropped.items() if v},
        }
    result["spans"] = spans
    return result


async def main_async(args) -> int:
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    push = ctx.Process(
        target=pusher, args=(args.shards, args.batch, args.groups, args.life, commands, replies), daemon=True
    )
    port_q, stop = ctx.Queue(), ctx.Event()
    recv = ctx.Process(target=receiver, args=(port_q, stop), daemon=True)
    push.start()
    recv.start()
    try:
        entries, finished, frame_bytes = await asyncio.to_thread(replies.get, True, 600)
        otlp_port = await asyncio.to_thread(port_q.get, True, 60)
        order = []
        for r in range(args.rounds):
            order += [False, True] if r % 2 == 0 else [True, False]
        results: dict[bool, list[dict]] = {False: [], True: []}
        print(
            f"bench_tracing_overhead: {args.shards} shards x batch {args.batch} LOCKSTEP, "
            f"{args.groups} steps/shard, requests of {args.life[0]}..{args.life[1]} decode steps: "
            f"{entries:,} entries, {finished:,} requests finish per trial, pid {os.getpid()}"
        )
        for tracing in order:
            r = await trial(tracing, args, commands, replies, otlp_port, args.shards, args.groups)
            r["entries_per_s"] = entries / r["wall_s"]
            results[tracing].append(r)
            sp = r["spans"]
            extra = (
                f"  spans built {sp['created']:,} ({sp['requests']:,} requests, {sp['links']:,} links), "
                f"exported {sp['exported']:,}, dropped {sp['dropped']:,} {sp['dropped_by'] or ''}; "
                f"{sp['built_during_clock']:,} built before the clock stopped"
                if sp
                else ""
            )
            print(
                f"  tracing {'on ' if tracing else 'off'}  {r['entries_per_s']:>10,.0f} entries/s  "
                f"{r['wall_s']:.2f} s wall  {r['cpu_s']:.2f} s CPU{extra}"
            )
        commands.put(None)
    finally:
        stop.set()
        push.join(10)
        recv.join(10)
    off = statistics.median(r["entries_per_s"] for r in results[False])
    on = statistics.median(r["entries_per_s"] for r in results[True])
    cpu_off = statistics.median(r["cpu_s"] for r in results[False])
    cpu_on = statistics.median(r["cpu_s"] for r in results[True])
    ratio = on / off
    print(f"  median off       {off:,.0f} entries/s ({cpu_off:.2f} s CPU)")
    print(f"  median on        {on:,.0f} entries/s ({cpu_on:.2f} s CPU)")
    ok = ratio >= GOAL
    print(f"  ratio on/off     {ratio:.3f}  (goal >= {GOAL}: {'met' if ok else 'NOT met'})")
    dropped = sum(r["spans"]["dropped"] for r in results[True])
    print(f"  spans dropped    {dropped} over {len(results[True])} traced trials")
    return 0 if ok and dropped == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--groups", type=int, default=3000, help="lockstep steps per trial")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (ABBA order)")
    parser.add_argument(
        "--life",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=LIFE,
        help=f"decode steps a request lives, MIN,MAX (default {LIFE[0]},{LIFE[1]})",
    )
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
