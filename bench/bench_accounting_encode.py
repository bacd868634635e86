"""RequestAccounting encoding for streams: views + protobuf objects vs the vectorised encoder.

A ledger holds N running requests (S INDEPENDENT shards, every request in every
step, a few steps taken). Side by side, alternating, it times what a publish
cycle costs per request:

* ``view+proto``: ``ledger.get`` (a RequestView) + ``convert.request_to_proto`` +
  ``SerializeToString`` — how the fan-out worked before;
* ``vectorised``: ``accounting_wire.encode`` — framed bytes from the ledger's
  columns, what the fan-out does now.

Prints the median µs per request of each and their ratio. Run:
``.venv/bin/python bench/bench_accounting_encode.py [--requests 10000] [--reps 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from enginetime.engine_hooks.constants import PROTOCOL_VERSION, Coupling, EventKind, StepKind
from enginetime.sidecar.api import convert
from enginetime.sidecar.ingest.records import Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.ledger.views import RequestQuery


def build(requests: int, shards: int) -> Ledger:
    ledger = Ledger(LedgerConfig(max_requests=max(LedgerConfig.max_requests, 2 * requests)))
    per = requests // shards
    t = time.time_ns()
    for k in range(shards):
        key = ledger.connect(Hello(PROTOCOL_VERSION, "bench", k, shards, int(Coupling.INDEPENDENT)))
        for h in range(per):
            ev = Event(handle=h, kind=EventKind.ARRIVED, time_ns=t, request_id=f"r{k}-{h}", prompt_tokens=64)
            ledger.on_event(key, ev)
        for seq in range(3):
            end = time.time_ns()
            ledger.on_step(
                key,
                Step(
                    seq=seq,
                    start_time_ns=end - 5_000_000,
                    end_time_ns=end,
                    device_time_ns=5_000_000,
                    kind=int(StepKind.DECODE),
                    handles=np.arange(per, dtype=np.uint32),
                    prefill_tokens=np.zeros(per, np.uint32),
                    decode_tokens=np.ones(per, np.uint32),
                    context_tokens=np.full(per, 64 + seq, np.uint32),
                ),
            )
    ledger.tick()
    ledger.flush()
    return ledger


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    ledger = build(args.requests, args.shards)
    slots = np.sort(ledger.select(RequestQuery()))  # every request, in slot (creation) order
    ids = ledger.ids_of(slots)
    n = len(ids)

    def view_proto() -> None:
        for rid in ids:
            convert.request_to_proto(ledger.get(rid)).SerializeToString()

    def vectorised() -> None:
        ledger.encode(slots)  # accounting_wire.encode at the ledger's clock

    vectorised()  # first use encodes and caches the event-only fields, as the first publish does
    times: dict[str, list[float]] = {"view+proto": [], "vectorised": []}
    for _ in range(args.reps):
        for name, fn in (("view+proto", view_proto), ("vectorised", vectorised)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    old, new = (statistics.median(times[k]) for k in ("view+proto", "vectorised"))
    print(f"RequestAccounting encoding, {n} running requests, median of {args.reps} alternating runs:")
    print(f"  view + request_to_proto + serialize: {old:6.2f} us/request")
    print(f"  accounting_wire.encode (vectorised): {new:6.2f} us/request")
    print(f"  speed-up: {old / new:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
