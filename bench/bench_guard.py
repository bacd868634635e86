"""The engine-time guard's CPU cost per tracked-request update.

What a session server pays for following N in-flight requests: every StreamUpdates
batch carries one ``RequestAccounting`` per changed request, which the guard's
tracker checks against the budget (engine_time, progress for liveness, queue). This
measures, in CPU microseconds per update (``time.process_time``):

* ``dispatch`` — ``Tracker.on_batch`` on parsed messages of watched requests;
* ``foreign`` — updates of requests this guard does not watch (``follow="all"``
  on an engine shared with other session servers): a dict miss each;
* ``parse+dispatch`` — plus decoding the batch from the wire (what the gRPC
  stream's deserializer does), i.e. the guard's whole per-update cost;
* ``to dataclass`` — for comparison, converting each update to a ``RequestAccounting``
  dataclass, which the guard avoids on the hot path (it converts only when it fires).

Run: ``.venv/bin/python bench/bench_guard.py [--watched 10000] [--batches 50]``.
"""

from __future__ import annotations

import argparse
import time

from enginetime.clients import EngineBudget
from enginetime.clients import _convert as cv
from enginetime.clients._guard_core import Tracker
from enginetime.v1 import accounting_pb2 as pb


def message(rid: str, k: int) -> pb.RequestAccounting:
    m = pb.RequestAccounting(
        request_id=rid,
        session_id=f"s-{rid}",
        engine_id="bench",
        shard=k % 8,
        state=pb.REQUEST_STATE_RUNNING,
        steps=10 + k,
        excluded_steps=k % 3,
        engine_time_ns=1_000_000 * (k % 500),
        queue_time_ns=2_000_000,
        interference_ns=3_000_000,
        wall_ns=9_000_000,
        gpu_time_ns=1_000_000,
        other_ns=1000,
    )
    m.engine_time.FromNanoseconds(m.engine_time_ns)
    m.queue_time.FromNanoseconds(m.queue_time_ns)
    m.interference.FromNanoseconds(m.interference_ns)
    m.wall.FromNanoseconds(m.wall_ns)
    m.last_step_time.FromNanoseconds(time.time_ns())
    m.arrival_time.FromNanoseconds(time.time_ns() - 9_000_000)
    m.tokens.prompt, m.tokens.decoded = 512, 10 + k
    for j in range(3):
        b = m.top_blame.add(request_id=f"storm-{j}", shard=j, same_shard=j == 0, engine_id="bench")
        b.duration.FromNanoseconds(1_000_000 * (j + 1))
    return m


def per_update_us(fn, n_updates: int) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) / n_updates * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watched", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    n, batches = args.watched, args.batches
    tracker = Tracker(EngineBudget(engine_time=600, queue=30, liveness=60, wall=3600))
    now = time.monotonic()
    for i in range(n):
        tracker.add(f"req-{i}", now)
    # Each batch: every watched request changed once (its progress and engine time grow).
    raw = []
    for b in range(batches):
        resp = pb.StreamUpdatesResponse(updates=[message(f"req-{i}", i + b) for i in range(n)])
        resp.time.FromNanoseconds(time.time_ns())
        raw.append(resp.SerializeToString())
    parsed = [pb.StreamUpdatesResponse.FromString(r) for r in raw]
    foreign = [pb.StreamUpdatesResponse(updates=[message(f"other-{i}", i) for i in range(n)])]
    total = n * batches
    wall_ns = time.time_ns()

    def dispatch() -> None:
        for resp in parsed:
            tracker.on_batch(resp.updates, wall_ns, time.monotonic(), wall_ns)

    def parse_dispatch() -> None:
        for r in raw:
            resp = pb.StreamUpdatesResponse.FromString(r)
            tracker.on_batch(resp.updates, wall_ns, time.monotonic(), wall_ns)

    def foreign_dispatch() -> None:
        for _ in range(batches):
            tracker.on_batch(foreign[0].updates, wall_ns, time.monotonic(), wall_ns)

    def convert() -> None:
        for resp in parsed[: max(1, batches // 5)]:
            for m in resp.updates:
                cv.request_from_pb(m)

    dispatch()  # warm up (first sight arms liveness/queue items)
    d = per_update_us(dispatch, total)
    pd = per_update_us(parse_dispatch, total)
    f = per_update_us(foreign_dispatch, total)
    c = per_update_us(convert, n * max(1, batches // 5))
    fires = sum(tracker.stats.fires.values())
    print(
        f"engine-time guard, {n} watched requests, {batches} batches of {n} updates "
        f"({len(raw[0]) / n:.0f} B each on the wire), CPU per update:"
    )
    print(f"  dispatch         {d:6.2f} us   (Tracker.on_batch on parsed messages)")
    print(f"  parse+dispatch   {pd:6.2f} us   (the guard's whole cost: protobuf decode + dispatch)")
    print(f"  foreign          {f:6.2f} us   (an update of a request this guard does not watch)")
    print(f"  to dataclass     {c:6.2f} us   (converting to RequestAccounting: avoided until a limit fires)")
    print(
        f"  => one core follows ~{1e6 / pd:,.0f} updates/s: {n} requests at {1e6 / pd / n:.0f} Hz "
        f"(fires during the run: {fires})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
