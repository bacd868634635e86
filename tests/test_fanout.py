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
from enginetime.sidecar.api import convert, fanout
from enginetime.sidecar.api.fanout import MAX_RESPONSE_BYTES, FanOut, FanOutLimits, InterferenceFilter
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


def test_deferral_never_starves_a_request_whose_neighbours_change_every_cycle():
    # 2,000 requests all step before every publish and the budget covers one chunk a cycle:
    # every request still reaches the subscriber within ceil(2000 / chunk) cycles (a guard
    # must see a runaway's engine time, however many others keep changing around it).
    async def main() -> None:
        sim = _engine(2000)
        fan = FanOut(sim.ledger, FanOutLimits(min_share=0.0))
        sub = fan.subscribe_requests(RequestQuery())
        fan.publish()  # the arrivals, with the loop idle: all of them
        assert len(_updates(fan.take(sub))) == 2000
        fan.ingest_busy_s = lambda: 1e9  # from now on ingest is saturated
        seen: dict[str, int] = {}
        cycles = -(-2000 // fanout._BUILD_CHUNK)
        for c in range(cycles):
            _step_all(sim, range(1000))
            fan._budget_s, fan._row_s = 0.0, 1.0  # only the minimum chunk fits
            fan.publish()
            for u in _updates(fan.take(sub)):
                seen[u.request_id] = u.steps
            # Each cycle takes up where the last stopped: nobody twice before everybody once.
            assert len(seen) == min(2000, (c + 1) * fanout._BUILD_CHUNK)
        assert fan.encoded == 2000 + cycles * fanout._BUILD_CHUNK  # the arrivals, then one chunk a cycle
        assert len(seen) == 2000, f"{2000 - len(seen)} requests never sent"
        assert all(steps >= 1 for steps in seen.values())

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


# -- subscribers' bounds, wake-ups and the loop-time budget ------------------------------------------


def test_an_ids_subscriber_is_cut_off_only_past_max_pending_unsent_ids():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger, FanOutLimits(max_pending=3))
        three = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-0", "r0-1", "r0-2"})))
        four = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r1-0", "r1-1", "r1-2", "r1-3"})))
        fan.publish()
        assert not three.overflow  # exactly max_pending unsent: still served
        assert four.overflow  # one more: cut off, and woken so that its handler ends the stream
        await asyncio.wait_for(four.wait(), 1)
        assert sorted(u.request_id for u in _updates(fan.take(three))) == ["r0-0", "r0-1", "r0-2"]

    run(main())


def test_an_id_two_streams_follow_stays_followed_until_both_end_and_then_costs_nothing():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        query = RequestQuery(request_ids=frozenset({"r0-0"}))
        first, second = fan.subscribe_requests(query), fan.subscribe_requests(query)
        other = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-1"})))
        fan.publish()
        fan.take(first), fan.take(second), fan.take(other)
        assert fan.encoded == 2  # the two arrivals
        fan.unsubscribe(first)
        _step_all(sim, range(2))
        fan.publish()
        [u] = _updates(fan.take(second))
        assert u == _expected(sim, "r0-0") and u.steps == 1
        assert fan.encoded == 4
        fan.unsubscribe(second)
        _step_all(sim, range(2))
        fan.publish()
        assert fan.encoded == 5  # r0-0 is followed by nobody now: only r0-1 is encoded
        [u] = _updates(fan.take(other))
        assert u == _expected(sim, "r0-1") and u.steps == 2

    run(main())


def test_a_stream_that_ends_does_not_disturb_one_that_has_not_taken_yet():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        leaving = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r0-0"})))
        staying = fan.subscribe_requests(RequestQuery())
        _step_all(sim, range(10))
        fan.publish()
        fan.unsubscribe(leaving)
        got = _updates(fan.take(staying))
        assert not staying.overflow and len(got) == 20

    run(main())


def test_without_a_log_a_subscriber_to_everything_is_cut_off_at_the_first_change_it_has_not_taken():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger, FanOutLimits(max_log_entries=0))
        fan.publish()  # the arrivals, before anyone subscribed
        sub = fan.subscribe_requests(RequestQuery())
        sim.event(0, 1, EventKind.FINISHED)  # one request changes
        fan.publish()
        assert sub.overflow

    run(main())


def test_a_stream_sleeps_until_something_changes_and_wakes_at_once_when_it_must_end():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger)
        fan.publish()
        every = fan.subscribe_requests(RequestQuery())
        mine = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r1-1"})))
        waiting = asyncio.ensure_future(every.wait())
        waiting_mine = asyncio.ensure_future(mine.wait())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiting.done() and not waiting_mine.done()  # a new subscriber has nothing to send yet
        _step_all(sim, range(2))
        fan.publish()
        await asyncio.wait_for(waiting, 1)
        await asyncio.wait_for(waiting_mine, 1)
        await asyncio.wait_for(mine.wait(), 1)  # not taken yet: a handler asking again goes on at once
        assert len(_updates(fan.take(every))) == 4
        # A subscriber cut off (or closed) returns from wait() and pause() at once, however long
        # the stream's interval: its handler must end the stream now.
        every.end(overflow=True)
        await asyncio.wait_for(every.wait(), 1)
        await asyncio.wait_for(every.pause(3600), 1)
        resting = fan.subscribe_requests(RequestQuery())
        pausing = asyncio.ensure_future(resting.pause(3600))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not pausing.done()  # a live stream rests its whole interval
        fan.close("shutting down")
        await asyncio.wait_for(pausing, 1)
        assert resting.closed == "shutting down"
        await asyncio.wait_for(resting.wait(), 1)
        late = fan.subscribe_requests(RequestQuery())  # a stream opened during shutdown ends at once
        await asyncio.wait_for(late.pause(3600), 1)
        await asyncio.wait_for(late.wait(), 1)

    run(main())


class _FakeTime:
    """The fan-out's clocks (perf_counter for the budget, monotonic for when streams are due)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_nothing_is_deferred_while_ingest_leaves_the_loop_idle_and_the_log_holds_one_cycle(monkeypatch):
    async def main() -> None:
        clock = _FakeTime()
        monkeypatch.setattr(fanout, "time", clock)
        sim = _engine(2000)
        fan = FanOut(sim.ledger)  # no ingest clock: the loop is the fan-out's
        encode = sim.ledger.encode

        def costly(slots, *rest):  # encoding costs 4 us a row on the budget's clock
            clock.now += 4e-6 * len(slots)
            return encode(slots, *rest)

        sim.ledger.encode = costly  # type: ignore[method-assign]
        sub = fan.subscribe_requests(RequestQuery())
        fan.subscribe_requests(RequestQuery(request_ids=frozenset({"nobody"})))  # idle: holds nothing back
        for i in range(8):  # 2,000 rows a period cost 8 ms of its 25: all of them fit, every time
            _step_all(sim, range(1000))
            clock.now += 0.025
            fan.publish()
            assert len(_updates(fan.take(sub))) == 2000, i
            assert fan.share == 1.0
            assert len(fan._log) == 1  # only the cycle just taken: the next publish drops it
        assert fan.share == 1.0 and fan.deferred == 0 and fan.encoded == 16000
        assert fan._row_s == pytest.approx(4e-6, rel=0.05)  # the cost it budgets with is the measured one
        assert fan.subscribers == 2
        fan.subscribe_interference(InterferenceFilter())
        assert fan.subscribers == 3

    run(main())


def test_encoding_gets_the_loop_time_ingest_leaves_idle_for_as_long_as_it_was_idle(monkeypatch):
    async def main() -> None:
        clock = _FakeTime()
        monkeypatch.setattr(fanout, "time", clock)
        sim = _engine(4000)
        fan = FanOut(sim.ledger, FanOutLimits(min_share=0.25))
        busy = [0.0]
        fan.ingest_busy_s = lambda: busy[0]
        sub = fan.subscribe_requests(RequestQuery())

        def burst(idle_s: float, row_s: float) -> int:
            """Budget spent, ``idle_s`` pass, every request changes: how many are encoded now."""
            _step_all(sim, range(2000))
            fan._budget_s, fan._row_s = 0.0, row_s
            clock.now += idle_s
            before = fan.encoded
            fan.publish()
            taken = len(_updates(fan.take(sub)))
            assert taken == fan.encoded - before
            return taken

        fan.publish()
        fan.take(sub)
        # Idle 5 ms with rows said to cost 2 us: 2,500 rows fit, the rest waits.
        assert burst(0.005, 2e-6) in (2499, 2500) and fan.share == 1.0  # (2499: float rounding)
        # Idle ten seconds: still one period's budget (25 ms: 2,500 rows at 10 us), no more.
        assert burst(10.0, 1e-5) in (2499, 2500)
        # Ingest busy 10 % of the last period (and again in the next): encoding gets the rest
        # less a margin (1 - 3 x 10 %); at 40 % it would get min_share.
        for _ in range(2):
            busy[0] += 0.01
            burst(0.1, 1e-5)
            assert fan.share == pytest.approx(0.7)
        busy[0] += 0.04
        burst(0.1, 1e-5)
        assert fan.share == 0.25
        burst(0.0, 1e-5)  # two publishes in the same instant: no time, no ingest share
        assert fan.share == 1.0

    run(main())


def test_changes_are_encoded_for_a_stream_due_within_the_next_period_and_wait_for_one_resting(monkeypatch):
    async def main() -> None:
        clock = _FakeTime()
        monkeypatch.setattr(fanout, "time", clock)
        sim = _engine()
        fan = FanOut(sim.ledger)
        sub = fan.subscribe_requests(RequestQuery())
        fan.publish()
        fan.take(sub)
        sub.due_at = clock.now + 0.03  # resting beyond the next period: nothing encoded yet
        _step_all(sim, range(10))
        fan.publish()
        assert fan.encoded == 20
        sub.due_at = clock.now + 0.02  # due before the next publish: its batch is ready for it
        fan.publish()
        assert fan.encoded == 40 and len(_updates(fan.take(sub))) == 20

    run(main())


def test_a_first_batch_waits_for_the_loop_time_budget():
    async def main() -> None:
        sim = _engine(10)
        fan = FanOut(sim.ledger)
        fan._budget_s = -1e-3  # this period's encoding time is spent, and then some
        first = asyncio.ensure_future(fan.initial(RequestQuery()))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not first.done()
        fan._last_refill -= 0.01
        fan.publish()  # the next period grants budget (10 ms of it)
        assert len(_updates(await asyncio.wait_for(first, 1))) == 10

    run(main())


@pytest.mark.parametrize("after_a_departure", [False, True])
def test_a_subscriber_is_cut_off_only_when_it_missed_a_change_not_at_the_edge_of_the_log(
    after_a_departure: bool,
):
    async def main() -> None:
        sim = _engine()  # 20 requests: every publish logs 20 ids
        fan = FanOut(sim.ledger, FanOutLimits(max_log_entries=40))
        if after_a_departure:
            gone = fan.subscribe_requests(RequestQuery())
            fan.publish()
            fan.unsubscribe(gone)  # the log starts over
        else:
            fan.publish()  # the arrivals, before anyone subscribed
        slow = fan.subscribe_requests(RequestQuery())
        edge = fan.subscribe_requests(RequestQuery())
        for _ in range(2):
            _step_all(sim, range(10))
            fan.publish()
        assert not slow.overflow  # exactly max_log_entries behind: nothing lost yet
        fan.take(edge)
        for _ in range(2):
            _step_all(sim, range(10))
            fan.publish()
        # The log now starts after the cycle ``edge`` took last: it missed nothing, slow did.
        assert slow.overflow and not edge.overflow
        got = _updates(fan.take(edge))
        assert len(got) == 20 and all(u == _expected(sim, u.request_id) for u in got)

    run(main())


def test_an_id_whose_change_fell_out_of_the_log_is_encoded_when_its_subscriber_takes():
    async def main() -> None:
        sim = _engine()
        fan = FanOut(sim.ledger, FanOutLimits(max_log_entries=20))
        quiet = fan.subscribe_requests(RequestQuery(request_ids=frozenset({"r1-9"})))
        busy = fan.subscribe_requests(RequestQuery())
        _step_all(sim, range(10))
        sim.event(1, 9, EventKind.FINISHED)
        fan.publish()  # r1-9's last change
        for _ in range(3):
            _step_all(sim, range(9))
            fan.publish()
            fan.take(busy)
        assert "r1-9" not in fan._latest  # trimmed away
        [u] = _updates(fan.take(quiet))
        assert u == _expected(sim, "r1-9") and u.steps == 1

    run(main())


def test_a_large_first_batch_yields_to_the_loop_between_chunks_without_sleeping():
    async def main() -> None:
        sim = _engine(2600)  # six chunks of 512
        fan = FanOut(sim.ledger)
        ticks = 0

        async def other_work() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async def publisher() -> None:  # the sidecar's publish tick, which refills the budget
            while True:
                await asyncio.sleep(0.025)
                fan.publish()

        other = asyncio.ensure_future(other_work())
        tick = asyncio.ensure_future(publisher())
        # Generous bound (about 50 ms of work): a pause of a second per chunk would exceed it.
        bodies = await asyncio.wait_for(fan.initial(RequestQuery()), 5)
        other.cancel()
        tick.cancel()
        assert len(_updates(bodies)) == 2600 and ticks >= 5

    run(main())


# -- interference streams -------------------------------------------------------------------------


def _storm(fan: FanOut, sim: Sim) -> None:
    """A prefill storm on shard 1 with ten decodes waiting: STARTED, ONGOING, ENDED."""
    for h in range(10):
        sim.arrive(1, 100 + h, f"d{h}")
    sim.arrive(1, 200, "big", prompt_tokens=70 * 512)
    sim.step(1, [(100 + h, 100, 0, 0) for h in range(10)], 3 * MS)
    fan.publish()
    for i in range(70):
        sim.step(1, [(200, 512, 0, 512 * i)], 20 * MS)
        if i in (0, 69):
            fan.publish()
    sim.step(1, [(100 + h, 0, 1, 100) for h in range(10)] + [(200, 0, 1, 70 * 512)], 3 * MS)
    fan.publish()


def test_watch_views_skip_an_id_the_ledger_does_not_hold_and_keep_the_ones_after_it():
    """WatchRequest's views (``current``): an id the ledger no longer holds (evicted, never
    seen) is skipped, and the ids after it are still answered, in order, with their figures."""
    sim = _engine()
    _step_all(sim, range(10))
    fan = FanOut(sim.ledger)
    got = fan.current(["r0-1", "never-seen", "r1-2", "r0-3"])
    assert [v.request_id for v, _ in got] == ["r0-1", "r1-2", "r0-3"]
    assert [msg for _, msg in got] == [_expected(sim, rid) for rid in ("r0-1", "r1-2", "r0-3")]


def test_interference_streams_get_the_storms_their_filter_asks_for():
    async def main() -> None:
        from enginetime.sidecar.ledger.ledger import LedgerConfig

        sim = Sim(shards=2, config=LedgerConfig(storm_threshold_s=0.05), engine="eng-b")
        fan = FanOut(sim.ledger)
        subs = {
            "all": InterferenceFilter(),
            "engine": InterferenceFilter(engine_id="eng-b"),
            "engine before": InterferenceFilter(engine_id="eng-a"),
            "engine after": InterferenceFilter(engine_id="eng-c"),
            "shard 1": InterferenceFilter(shard=1),
            "shard 0": InterferenceFilter(shard=0),
            # The first chunk stalls ten decodes 20 ms each (0.2 s): a stall threshold above it
            # sees the storm from the report whose total reached it (ONGOING), then its end.
            "stall 1 s": InterferenceFilter(min_stall_ns=1_000_000_000),
            "stall 0.2 s": InterferenceFilter(min_stall_ns=200 * MS),
            "stall 100 s": InterferenceFilter(min_stall_ns=100_000_000_000),
            # Only the storm's total (14 s) reaches 13 s: the stream sees its end alone.
            "stall 13 s": InterferenceFilter(min_stall_ns=13_000_000_000),
        }
        streams = {name: fan.subscribe_interference(f) for name, f in subs.items()}
        _storm(fan, sim)
        got = {name: [(e.phase, e.aggressor_request_id) for e in s.drain()] for name, s in streams.items()}
        whole = [
            (pb.InterferenceEvent.PHASE_STARTED, "big"),
            (pb.InterferenceEvent.PHASE_ONGOING, "big"),
            (pb.InterferenceEvent.PHASE_ENDED, "big"),
        ]
        assert got["all"] == whole
        assert got["engine"] == whole and got["shard 1"] == whole and got["stall 0.2 s"] == whole
        assert got["engine before"] == got["engine after"] == got["shard 0"] == got["stall 100 s"] == []
        assert got["stall 1 s"] == whole[1:]
        assert got["stall 13 s"] == whole[2:]
        assert not any(sub._following for sub in streams.values())  # an ended storm is forgotten

    run(main())


def test_an_interference_stream_is_cut_off_only_past_max_pending_unsent_events():
    async def main() -> None:
        from enginetime.sidecar.ledger.ledger import LedgerConfig

        for max_pending, cut in ((3, False), (2, True)):  # the storm makes three events
            sim = Sim(shards=2, config=LedgerConfig(storm_threshold_s=0.05))
            fan = FanOut(sim.ledger, FanOutLimits(max_pending=max_pending))
            sub = fan.subscribe_interference(InterferenceFilter())
            _storm(fan, sim)
            assert sub.overflow is cut, max_pending
            assert len(sub.queue) == min(3, max_pending)
            await asyncio.wait_for(sub.wait(), 1)

    run(main())
