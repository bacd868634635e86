"""A lockstep group's attribution stopped between its phases (``Ledger.on_step(pause=...)``).

Ingest stops a group's attribution between phases when a gRPC call waits, serves the call,
then resumes. What the call reads must be the accounting before the group (never a group
half-applied), and the final accounting must be exactly what uninterrupted attribution gives.
"""

from __future__ import annotations

from dataclasses import astuple, replace

import pytest
from simulator import MS, Sim, new_ledger
from truth_sim import replay_into_ledger, warm_engine

from enginetime.engine_hooks.constants import Coupling, EventKind
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, ShardKey
from enginetime.sidecar.ledger.views import RequestQuery, RequestState


def _reader_view(led: Ledger, engine_id: str) -> tuple:
    """What a unary call reads: every request's view (its version number left out: it counts
    updates) and every shard's."""
    requests = {v.request_id: astuple(replace(v, version=0)) for v in led.query(RequestQuery())}
    return requests, tuple(astuple(s) for s in led.shards(engine_id))


class _Interrupting:
    """Feeds a ledger the way ingest does when calls keep arriving: every group's attribution
    is stopped after each phase; between phases a reader looks (every ``look_every``-th group),
    and what is left after two phases is finished by the next record (the ledger settles it)."""

    def __init__(self, led: Ledger, engine_id: str, look_every: int = 7) -> None:
        self.led = led
        self.engine_id = engine_id
        self.look_every = look_every
        self.parked_groups = 0
        self.looks = 0
        self.unchanged_looks = 0

    def connect(self, hello: Hello) -> ShardKey:
        return self.led.connect(hello)

    def on_event(self, key: ShardKey, ev: Event) -> None:
        self.led.on_event(key, ev)

    def on_step(self, key: ShardKey, step: Step) -> None:
        led = self.led
        look = self.parked_groups % self.look_every == 0
        before = _reader_view(led, self.engine_id) if look else None
        led.on_step(key, step, pause=lambda _b: True)
        if not led.parked:
            return  # the step waits in the lockstep join: nothing attributed yet
        self.parked_groups += 1
        if look:
            self.looks += 1
            # Stopped after resolving handles, gathering, predicting, dividing: a reader sees
            # the ledger as before the group. After the accounting: every figure of it at once.
            same = _reader_view(led, self.engine_id) == before
            for _ in range(3):
                led.resume(lambda _b: True)
                same = same and _reader_view(led, self.engine_id) == before
            led.resume(lambda _b: True)
            requests, _ = _reader_view(led, self.engine_id)
            stepped = {rid for rid, v in requests.items() if v != before[0].get(rid)}
            in_group = {
                v.request_id for v in led.query(RequestQuery()) if v.last_step_time_ns == step.end_time_ns
            }
            self.unchanged_looks += same and stepped >= in_group > set()
        else:
            led.resume(lambda _b: True)
        # Left parked: the next record's on_event/on_step (or flush) must finish it first.

    def flush(self) -> None:
        self.led.flush()


def test_a_group_stopped_between_phases_ends_exactly_as_one_attributed_whole() -> None:
    eng = warm_engine("phases")
    eng.add("storm0", 0, at_step=60, prompt=16384, output=4)
    eng.add("storm1", 2, at_step=90, prompt=12288, output=4)
    eng.run()
    end = max(op.time_ns for op in eng.ops)  # one fixed "now" for both ledgers' views
    whole = new_ledger(None, clock=lambda: end)
    replay_into_ledger([eng], whole)
    led = new_ledger(None, clock=lambda: end)
    feeder = _Interrupting(led, eng.engine_id)
    replay_into_ledger([eng], feeder)
    assert not led.parked
    assert feeder.parked_groups == whole.counters.lockstep_groups > 100
    # Readers between the first phases never saw a group half-applied.
    assert feeder.looks > 10 and feeder.unchanged_looks == feeder.looks
    # The end result is the same, figure for figure: accounting, shards, storms, the model.
    assert _reader_view(led, eng.engine_id) == _reader_view(whole, eng.engine_id)
    assert [astuple(e) for e in led.take_interference()] == [astuple(e) for e in whole.take_interference()]
    assert led.counters == whole.counters
    a = led.advise(eng.engine_id, "", 8192)
    b = whole.advise(eng.engine_id, "", 8192)
    assert a == b and a.calibrated


def _parked_last_step(nxt: str) -> tuple[Sim, int, int]:
    """Two lockstep shards decode one request each for a few groups; the last group is fed
    with ``pause`` and left parked. Returns the sim and the two requests' steps so far."""
    sim = Sim(shards=2, coupling=Coupling.LOCKSTEP)
    sim.arrive(0, 1, "a")
    sim.arrive(1, 2, "b")
    for i in range(6):
        sim.group({0: [(1, 0, 1, 100 + i)], 1: [(2, 0, 1, 100 + i)]})
    before = (sim.ledger.get("a").steps, sim.ledger.get("b").steps)
    start, d = sim.now, 4 * MS
    sim.now += d
    for k, h in ((0, 1), (1, 2)):
        st = sim.make_step(k, [(h, 0, 1, 110)], d, start, sim.gs)
        sim.ledger.on_step(sim.keys[k], st, pause=lambda _b: True)
    assert sim.ledger.parked, nxt
    return sim, *before


@pytest.mark.parametrize("nxt", ["event", "heartbeat", "step", "tick", "disconnect", "flush", "forget"])
def test_every_record_and_timer_finishes_a_parked_group_first(nxt: str) -> None:
    """Whatever comes next while a group is parked (a FINISHED event, a heartbeat, another
    step, the ticker, a disconnect, a flush, ingest forgetting an idle engine) finishes the
    group first and builds on it: a request that finishes right after its last step keeps
    that step, and its FINISHED is not applied to a half-attributed request."""
    sim, a_steps, b_steps = _parked_last_step(nxt)
    led = sim.ledger
    assert (led.get("a").steps, led.get("b").steps) == (a_steps, b_steps)  # a reader: not yet
    if nxt == "event":
        sim.event(0, 1, EventKind.FINISHED)
    elif nxt == "heartbeat":
        led.on_heartbeat(sim.keys[0], Beat(sim.now))
    elif nxt == "step":
        sim.group({0: [(1, 0, 1, 111)], 1: [(2, 0, 1, 111)]})
        a_steps += 1
        b_steps += 1
    elif nxt == "tick":
        led.tick()
    elif nxt == "disconnect":
        led.disconnect(sim.keys[1])
    elif nxt == "flush":
        led.flush()
    else:
        assert led.forget_idle_engine() is None  # connected engines are never forgotten
    assert not led.parked, nxt
    assert (led.get("a").steps, led.get("b").steps) == (a_steps + 1, b_steps + 1), nxt
    if nxt == "event":
        assert led.get("a").state is RequestState.FINISHED


def test_resume_stops_at_each_phase_boundary_and_ends_with_nothing_parked() -> None:
    sim, a_steps, _ = _parked_last_step("resume")
    led = sim.ledger
    stops = 1  # on_step ran the first part
    while not led.resume(lambda _b: True):
        stops += 1
    # Eight parts, stop-able after each (handles, gather, predict, divide, accounting, shard
    # stats and storms, the step into the model, the model's refit when due): seven stops,
    # the last resume returns True. Never inside the accounting, which a reader sees whole.
    assert stops == 7
    assert not led.parked and led.get("a").steps == a_steps + 1
    assert led.resume() and led.resume(lambda _b: True)  # nothing parked: nothing to do
