"""The fan-out on a real ledger: what each kind of subscriber takes, shares, misses and costs.

``FanOut`` is driven directly (publish, take) over a ``Ledger`` fed by the
synthetic engine of test_attribution, so every expectation is exact: the bytes a
subscriber takes parse to what ``request_to_proto`` gives for the same request at
the publish that encoded it. The gRPC side of the same streams is covered over
real sockets in test_sidecar_service.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from simulator import Sim

from enginetime.engine_hooks.constants import EventKind
from enginetime.sidecar.api import convert
from enginetime.sidecar.api.fanout import MAX_RESPONSE_BYTES, FanOut, FanOutLimits
from enginetime.sidecar.ledger.views import RequestQuery, RequestState
from enginetime.v1 import accounting_pb2 as pb

MS = 1_000_000


def run(coro):
    return asyncio.run(coro)


def _engine(requests: int = 20) -> Sim:
    sim = Sim(shards=2)
    for k in range(2):
        for h in range(requests // 2):
            sim.arrive(k, h, f"r{k}-{h}", prompt_tokens=10 + h, session_id=f"s{h % 2}")
    return sim


def _step_all(sim: Sim, handles: range) -> None:
    for k in range(2):
        sim.step(k, [(h, 0, 1, 100) for h in handles], d=2 * MS)


def _updates(bodies: list[bytes]) -> list[pb.RequestAccounting]:
    out = []
    for body in bodies:
        assert len(body) <= MAX_RESPONSE_BYTES
        out.extend(pb.StreamUpdatesResponse.FromString(body).updates)
    return out


def _expected(sim: Sim, rid: str) -> pb.RequestAccounting:
    return convert.request_to_proto(sim.view(rid))


def test_each_subscriber_takes_each_changed_request_once_with_its_latest_figures():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        every = fan.subscribe_requests(RequestQuery())
        mine = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-1", "r1-2", "nobody"})))
        fan.publish()  # the arrivals
        _step_all(sim, range(10))
        fan.publish()
        _step_all(sim, range(3))  # r0-1 runs again; the others wait (their figures change too)
        fan.publish()
        offered = [rid for _, ids in fan._log for rid in ids]
        got = _updates(fan.take(every))
        ids = [u.request_id for u in got]
        assert sorted(ids) == sorted(f"r{k}-{h}" for k in range(2) for h in range(10))
        for u in got:
            assert u == _expected(sim, u.request_id)
        # Three publishes, each id sent once: the repeats were coalesced away and counted.
        assert len(offered) > 40 and every.coalesced == len(offered) - 20 and not every._has_work()
        got = {u.request_id: u for u in _updates(fan.take(mine))}
        assert sorted(got) == ["r0-1", "r1-2"]
        assert got["r0-1"].steps == 2 and got["r0-1"] == _expected(sim, "r0-1")
        assert mine.coalesced == offered.count("r0-1") + offered.count("r1-2") - 2
        assert fan.take(every) == [] and fan.take(mine) == []

    run(main())


def test_subscribers_sending_alike_share_the_encoded_bodies():
    async def main() -> None:
        sim = _engine(40)
        fan = FanOut(sim.ledger)
        subs = [fan.subscribe_requests(RequestQuery()) for _ in range(5)]
        fan.publish()
        _step_all(sim, range(20))
        fan.publish()
        encoded = fan.encoded
        bodies = [fan.take(s) for s in subs]
        assert all(b is bodies[0] for b in bodies)  # one list of bytes for all five
        assert len(_updates(bodies[0])) == 40
        assert fan.encoded == encoded  # taking encodes nothing

    run(main())


def test_only_followed_requests_are_encoded_when_nobody_follows_everything():
    async def main() -> None:
        sim = _engine(40)
        fan = FanOut(sim.ledger)
        fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-0", "r1-0"})))
        fan.publish()
        _step_all(sim, range(20))
        fan.publish()
        assert fan.encoded == 4  # two ids, changed in two publishes

    run(main())


def test_filters_on_figures_see_the_state_shard_and_session_at_publish():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        running = fan.subscribe_requests(RequestQuery(states=frozenset({RequestState.RUNNING})))
        shard1 = fan.subscribe_requests(RequestQuery(shard=1))
        session = fan.subscribe_requests(RequestQuery(session_id="s1"))
        finished = fan.subscribe_requests(
            RequestQuery(request_ids=frozenset({"r0-0", "r0-1"}), states=frozenset({RequestState.FINISHED}))
        )
        fan.publish()
        _step_all(sim, range(4))
        sim.event(0, 0, EventKind.FINISHED)
        fan.publish()
        ids = sorted(u.request_id for u in _updates(fan.take(running)))
        assert ids == sorted(["r0-1", "r0-2", "r0-3", "r1-0", "r1-1", "r1-2", "r1-3"])
        assert {u.shard for u in _updates(fan.take(shard1))} == {1}
        assert {u.session_id for u in _updates(fan.take(session))} == {"s1"}
        [done] = _updates(fan.take(finished))
        assert done.request_id == "r0-0" and done.state == pb.REQUEST_STATE_FINISHED

    run(main())


def test_the_log_keeps_only_what_a_subscriber_has_not_taken():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        a = fan.subscribe_requests(RequestQuery())
        b = fan.subscribe_requests(RequestQuery())
        for _ in range(3):
            _step_all(sim, range(10))
            fan.publish()
        fan.take(a)
        fan.publish()
        assert len(fan._log) == 3  # b has not taken them yet
        fan.take(b)
        fan.publish()
        assert not fan._log and not fan._latest
        fan.unsubscribe(a)
        fan.unsubscribe(b)
        _step_all(sim, range(10))
        fan.publish()
        assert not fan._log and fan.encoded == 60  # no subscriber: nothing encoded

    run(main())


def test_a_subscriber_to_everything_that_falls_behind_the_log_is_cut_off():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger, FanOutLimits(max_log_entries=45))
        slow = fan.subscribe_requests(RequestQuery())
        fast = fan.subscribe_requests(RequestQuery())
        by_id = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-3"})))
        for _ in range(4):
            _step_all(sim, range(10))
            fan.publish()
            fan.take(fast)
        assert slow.overflow and not fast.overflow
        await asyncio.wait_for(slow.wait(), 1)  # woken so that its handler ends the stream
        # An ids subscriber whose entries fell out is served by encoding them again.
        assert not by_id.overflow
        [u] = _updates(fan.take(by_id))
        assert u == _expected(sim, "r0-3") and u.steps == 4

    run(main())


def test_encoding_beyond_the_time_budget_is_deferred_never_lost():
    async def main() -> None:
        sim = _engine(2000)
        fan = FanOut(sim.ledger, FanOutLimits(min_share=0.0))
        fan.ingest_busy_s = lambda: 1e9  # ingest "saturated": the budget is min_share = 0
        sub = fan.subscribe_requests(RequestQuery())
        fan._budget_s = 0.0
        fan._row_s = 1.0  # claims a request costs a second: only the minimum chunk fits
        fan.publish()
        first = fan.encoded
        assert 0 < first < 2000 and fan.deferred == 2000 - first
        seen = {u.request_id for u in _updates(fan.take(sub))}
        for _ in range(10):
            fan._row_s = 1.0
            fan.publish()
            seen |= {u.request_id for u in _updates(fan.take(sub))}
        assert len(seen) == 2000

    run(main())


def test_a_stream_starts_with_every_live_request_or_the_named_ones():
    async def main() -> None:
        sim = _engine(10)
        sim.event(0, 0, EventKind.FINISHED)
        fan = FanOut(sim.ledger)
        live = RequestQuery(states=frozenset({RequestState.QUEUED, RequestState.RUNNING}))
        ids = [u.request_id for u in _updates(await fan.initial(live))]
        assert sorted(ids) == sorted(f"r{k}-{h}" for k in range(2) for h in range(5) if (k, h) != (0, 0))
        named = await fan.initial(RequestQuery(request_ids=frozenset({"r0-0", "gone"})))
        [u] = _updates(named)
        assert u == _expected(sim, "r0-0") and u.state == pb.REQUEST_STATE_FINISHED
        # Named ids with a filter on figures: the first batch holds those that pass it.
        both = frozenset({"r0-0", "r0-1"})
        queued = await fan.initial(RequestQuery(request_ids=both, states=frozenset({RequestState.QUEUED})))
        assert [u.request_id for u in _updates(queued)] == ["r0-1"]

    run(main())


@pytest.mark.parametrize("count", [2, 400, 1000])
def test_large_batches_split_below_the_response_limit(count: int):
    async def main() -> None:
        sim = _engine(count)
        fan = FanOut(sim.ledger)
        sub = fan.subscribe_requests(RequestQuery())
        fan.publish()
        bodies = fan.take(sub)
        assert len(_updates(bodies)) == count  # each body at most MAX_RESPONSE_BYTES (checked there)
        assert all(len(b) > MAX_RESPONSE_BYTES - 200 for b in bodies[:-1])  # and filled before splitting

    run(main())


def test_subscribers_to_everything_that_cannot_take_cost_no_encoding_and_lose_nothing():
    async def main() -> None:
        sim = _engine(20)
        fan = FanOut(sim.ledger)
        sub = fan.subscribe_requests(RequestQuery())
        mine = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-0"})))
        sub.writing = True  # its handler is blocked writing to a client that stopped reading
        _step_all(sim, range(10))
        fan.publish()
        assert fan.encoded == 1  # only what the ids subscriber follows
        assert [u.request_id for u in _updates(fan.take(mine))] == ["r0-0"]
        sub.writing = False
        sub.due_at = time.monotonic() + 3600  # resting: its next batch is an hour away
        _step_all(sim, range(10))
        fan.publish()
        assert fan.encoded == 2
        sub.due_at = 0.0  # due now: everything changed meanwhile is encoded once, and sent
        fan.publish()
        assert fan.encoded == 2 + 19  # r0-0's latest figures were encoded for the ids subscriber
        got = {u.request_id: u for u in _updates(fan.take(sub))}
        assert len(got) == 20 and all(u == _expected(sim, rid) for rid, u in got.items())

    run(main())
