"""The ledger's bounded store: slots and blame table, retention, eviction, queries, change feed."""

from __future__ import annotations

import numpy as np
import pytest
from simulator import MS, T0, Clock, S, connect, new_ledger

from enginetime.engine_hooks.constants import PROTOCOL_VERSION, Coupling, EventKind, StepKind
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.ledger.store import EMPTY, SlotColumns
from enginetime.sidecar.ledger.views import RequestQuery, RequestState


def make_ledger(**cfg) -> tuple[Ledger, Clock, list]:
    clock = Clock()
    led = new_ledger(clock=clock, **cfg)
    return led, clock, connect(led, "eng", 2, Coupling.INDEPENDENT, recorder_epoch=0)


def arrive(led: Ledger, key, handle: int, rid: str, t: int, **kw) -> None:
    led.on_event(key, Event(handle=handle, kind=EventKind.ARRIVED, time_ns=t, request_id=rid, **kw))


def finish(led: Ledger, key, handle: int, t: int) -> None:
    led.on_event(key, Event(handle=handle, kind=EventKind.FINISHED, time_ns=t, finish_reason="stop"))


_seq: dict = {}


def step(led: Ledger, key, handles: list[int], prefill: list[int], t: int, d: int = MS) -> None:
    n = len(handles)
    seq = _seq.get((id(led), key), 0)
    _seq[(id(led), key)] = seq + 1
    led.on_step(
        key,
        Step(
            seq=seq,
            start_time_ns=t,
            end_time_ns=t + d,
            device_time_ns=d,
            kind=int(StepKind.MIXED),
            handles=np.array(handles, dtype=np.uint32),
            prefill_tokens=np.array(prefill, dtype=np.uint32),
            decode_tokens=np.array([0 if p else 1 for p in prefill], dtype=np.uint32),
            context_tokens=np.zeros(n, dtype=np.uint32),
        ),
    )


# ---- SlotColumns ---------------------------------------------------------------------
def test_slots_are_reused_with_a_new_generation_and_zeroed():
    cols = SlotColumns(4, blame_width=3)
    a = cols.alloc()
    rid_a = cols.rid(a)
    cols.engine[a] = 5.0
    cols.add_blame(np.array([a]), 77, 1.0)
    cols.free(a)
    b = cols.alloc()
    assert b == a and cols.rid(b) != rid_a
    assert cols.engine[b] == 0.0 and (cols.blame_agg[b] == EMPTY).all()
    # Growth keeps existing rows.
    slots = [cols.alloc() for _ in range(40)]
    cols.engine[slots[3]] = 2.5
    assert cols.capacity >= 41 and cols.engine[slots[3]] == 2.5 and cols.first_start[slots[-1]] == -1


def test_blame_table_accumulates_fills_and_replaces_the_smallest():
    cols = SlotColumns(8, blame_width=3)
    v = np.array([cols.alloc(), cols.alloc()])
    cols.add_blame(v, 11, np.array([1.0, 2.0]))
    cols.add_blame(v, 11, 1.0)
    cols.add_blame(v[:1], 12, 5.0)
    cols.add_blame(v[:1], 13, 0.5)
    assert cols.blame_row(v[0], 10) == [(12, 5.0), (11, 2.0), (13, 0.5)]
    assert cols.blame_row(v[1], 10) == [(11, 3.0)]
    cols.add_blame(v[:1], 14, 4.0)  # full: replaces 13 (0.5), which is dropped
    assert cols.blame_row(v[0], 10) == [(12, 5.0), (14, 4.0), (11, 2.0)]
    assert cols.blame_dropped[v[0]] == 0.5
    cols.add_blame(v[:1], 15, 0.1)  # smaller than everything: dropped itself
    assert cols.blame_row(v[0], 2) == [(12, 5.0), (14, 4.0)]
    assert cols.blame_dropped[v[0]] == pytest.approx(0.6)


# ---- retention and bounds ------------------------------------------------------------
def test_finished_requests_expire_after_retention():
    led, clock, keys = make_ledger(retention_s=10.0)
    arrive(led, keys[0], 1, "a", T0)
    arrive(led, keys[0], 2, "b", T0)
    step(led, keys[0], [1, 2], [10, 10], T0)
    finish(led, keys[0], 1, T0 + 2 * MS)
    led.tick(T0 + 2 * MS + 9 * S)
    assert led.get("a") is not None
    led.tick(T0 + 2 * MS + 10 * S)
    assert led.get("a") is None and led.get("b") is not None  # live requests never expire
    assert led.counters.expired_finished == 1
    assert led.count(RequestQuery()) == 1


def test_max_requests_evicts_oldest_finished_first_then_oldest_active():
    led, clock, keys = make_ledger(max_requests=3)
    for h, rid in enumerate(["a1", "a2", "a3"]):
        arrive(led, keys[0], h, rid, T0 + h)
    finish(led, keys[0], 1, T0 + 10)  # a2 finished
    arrive(led, keys[0], 3, "a4", T0 + 20)
    assert led.get("a2") is None and led.counters.evicted_finished == 1
    arrive(led, keys[0], 4, "a5", T0 + 30)  # nothing finished left: oldest active goes
    assert led.get("a1") is None and led.counters.evicted_active == 1
    assert [v.request_id for v in led.query(RequestQuery())] == ["a5", "a4", "a3"]
    assert led.size == 3
    # The evicted handle is free: a step naming it is an unknown handle now.
    step(led, keys[0], [0], [0], T0 + 40)
    assert led.counters.unknown_handles == 1


def test_blame_still_names_an_evicted_aggressor():
    led, clock, keys = make_ledger(max_requests=3)
    arrive(led, keys[0], 1, "victim", T0)
    arrive(led, keys[0], 2, "aggr", T0)
    step(led, keys[0], [1], [10], T0)
    step(led, keys[0], [2], [512], T0 + MS, d=10 * MS)  # victim excluded: blamed on aggr
    finish(led, keys[0], 2, T0 + 11 * MS)
    arrive(led, keys[0], 3, "x", T0 + 12 * MS)
    arrive(led, keys[0], 4, "y", T0 + 13 * MS)  # evicts the finished aggressor
    assert led.get("aggr") is None
    top = led.get("victim").top_blame[0]
    assert (top.request_id, top.shard, top.seconds_ns) == ("aggr", 0, 10 * MS)


# ---- queries and the change feed -------------------------------------------------------
def test_query_filters_orders_and_pages():
    led, clock, keys = make_ledger()
    for i in range(10):
        arrive(led, keys[i % 2], i, f"r{i}", T0 + i * MS, session_id=f"s{i % 3}")
    step(led, keys[0], [0, 2, 4], [5, 5, 5], T0 + 20 * MS)
    finish(led, keys[0], 0, T0 + 30 * MS)
    everyone = led.query(RequestQuery())
    assert [v.request_id for v in everyone] == [f"r{i}" for i in range(9, -1, -1)]  # newest arrival first
    assert [v.request_id for v in led.query(RequestQuery(), limit=3, offset=2)] == ["r7", "r6", "r5"]
    assert led.count(RequestQuery(shard=1)) == 5
    running = led.query(RequestQuery(states=frozenset({RequestState.RUNNING})))
    assert [v.request_id for v in running] == ["r4", "r2"]
    assert led.count(RequestQuery(states=frozenset({RequestState.FINISHED}))) == 1
    assert [v.request_id for v in led.query(RequestQuery(session_id="s0"))] == ["r9", "r6", "r3", "r0"]
    assert led.count(RequestQuery(session_id="s0", shard=0)) == 2
    assert [v.request_id for v in led.query(RequestQuery(request_ids=frozenset({"r1", "r8", "nope"})))] == [
        "r8",
        "r1",
    ]
    assert led.count(RequestQuery(engine_id="other")) == 0
    assert led.count(RequestQuery(engine_id="eng", shard=0)) == 5


def changed_ids(led) -> set[str]:
    return set(led.ids_of(led.take_changed_slots()))


def test_take_changed_reports_each_change_once():
    led, clock, keys = make_ledger()
    arrive(led, keys[0], 1, "a", T0)
    arrive(led, keys[1], 1, "b", T0)
    assert changed_ids(led) == {"a", "b"}
    assert changed_ids(led) == set()
    v0 = led.get("a").version
    step(led, keys[0], [1], [10], T0 + MS)
    assert changed_ids(led) == {"a"}
    assert led.get("a").version > v0
    finish(led, keys[1], 1, T0 + 2 * MS)
    assert changed_ids(led) == {"b"}


def test_running_views_grow_wall_and_other_with_the_clock():
    led, clock, keys = make_ledger()
    arrive(led, keys[0], 1, "a", T0)
    step(led, keys[0], [1], [10], T0 + MS, d=2 * MS)
    clock.now = T0 + 10 * MS
    v = led.get("a")
    assert (v.wall_ns, v.queue_time_ns, v.engine_time_ns, v.other_ns) == (10 * MS, MS, 2 * MS, 7 * MS)
    clock.now = T0 + 20 * MS
    assert led.get("a").other_ns == 17 * MS


def test_shard_view_rates_and_counts():
    led, clock, keys = make_ledger(rate_window_s=1.0)
    for h in range(4):
        arrive(led, keys[0], h, f"r{h}", T0)
    arrive(led, keys[0], 9, "queued", T0)
    step(led, keys[0], [0, 1, 2, 3], [100, 100, 100, 100], T0, d=100 * MS)
    t = T0 + 100 * MS
    for _ in range(9):
        step(led, keys[0], [0, 1, 2, 3], [0, 0, 0, 0], t, d=50 * MS)
        t += 100 * MS
    clock.now = T0 + S
    sv = next(s for s in led.shards() if s.shard == 0)
    assert sv.prefill_tokens_per_second == pytest.approx(400.0)
    assert sv.decode_tokens_per_second == pytest.approx(36.0)
    assert sv.busy_fraction == pytest.approx(0.55)
    assert (sv.active_requests, sv.queued_requests, sv.steps, sv.connected) == (4, 1, 10, True)
    assert sv.engine_kind == "" and sv.coupling == int(Coupling.INDEPENDENT)
    clock.now = T0 + 10 * S  # idle shard: rates decay to zero
    sv = next(s for s in led.shards() if s.shard == 0)
    assert sv.decode_tokens_per_second == 0.0 and sv.busy_fraction == 0.0
    led.disconnect(keys[0])
    assert not next(s for s in led.shards() if s.shard == 0).connected
    assert [s.shard for s in led.shards(engine_id="eng")] == [0, 1] and led.shards(engine_id="x") == []


def test_bad_input_gets_clear_errors():
    led, clock, keys = make_ledger()
    with pytest.raises(KeyError, match="connect"):
        led.on_step(("nope", 0), Step(seq=0, start_time_ns=T0, end_time_ns=T0, device_time_ns=0, kind=1))
    with pytest.raises(ValueError, match="engine_id"):
        led.connect(Hello(PROTOCOL_VERSION, "", 0, 1, 1))
    with pytest.raises(ValueError, match="num_shards"):
        led.connect(Hello(PROTOCOL_VERSION, "e", 3, 2, 1))
    bad = Step(
        seq=0,
        start_time_ns=T0,
        end_time_ns=T0 + 1,
        device_time_ns=1,
        kind=1,
        handles=np.zeros(2, np.uint32),
        prefill_tokens=np.zeros(1, np.uint32),
        decode_tokens=np.zeros(2, np.uint32),
        context_tokens=np.zeros(2, np.uint32),
    )
    led.on_step(keys[0], bad)
    assert led.counters.invalid_steps == 1 and led.counters.steps == 0
    with pytest.raises(ValueError, match="max_requests"):
        LedgerConfig(max_requests=0)


def test_duplicate_handle_in_a_step_is_counted_once():
    led, clock, keys = make_ledger()
    arrive(led, keys[0], 1, "a", T0)
    arrive(led, keys[0], 2, "b", T0)
    step(led, keys[0], [1, 2, 1], [0, 0, 0], T0, d=3 * MS)
    assert led.counters.duplicate_entries == 1
    a, b = led.get("a"), led.get("b")
    assert a.steps == 1 and a.gpu_time_ns + b.gpu_time_ns == 3 * MS


# ---- robustness --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_abuse_never_raises_and_keeps_the_invariants(seed):
    """Garbage the ingest path can deliver — unknown kinds and handles, duplicate handles,
    seq gaps, late and unjoined lockstep steps, restarts, drops, tiny bounds — must not
    raise, must keep the store within its bound and every view's identity exact."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    coupling = int(Coupling.LOCKSTEP) if seed != 1 else int(Coupling.INDEPENDENT)
    shards = 3
    led = Ledger(
        LedgerConfig(
            max_requests=25, retention_s=0.5, storm_threshold_s=0.01, lockstep_wait_s=0.05, top_blame=2
        ),
        clock=clock,
    )
    keys = [
        led.connect(Hello(PROTOCOL_VERSION, "e", k, shards, coupling, recorder_epoch=1))
        for k in range(shards)
    ]
    epoch = [1] * shards
    seq = [0] * shards
    gs = 0
    for _ in range(1200):
        r = rng.random()
        k = int(rng.integers(shards))
        if r < 0.25:
            led.on_event(
                keys[k],
                Event(
                    handle=int(rng.integers(0, 30)),
                    kind=int(rng.integers(0, 8)),
                    time_ns=clock.now + int(rng.integers(-5 * MS, 5 * MS)),
                    request_id=str(rng.choice(["", f"r{int(rng.integers(60))}"])),
                    session_id=str(rng.choice(["", "s1", "s2"])),
                    routed_shard=[None, 0, 1][int(rng.integers(3))],
                    replayed=bool(rng.random() < 0.1),
                ),
            )
        elif r < 0.9:
            n = int(rng.integers(0, 10))
            d = int(rng.integers(0, 20 * MS))
            for kk in range(shards) if rng.random() < 0.8 else [k]:
                if rng.random() < 0.05:
                    continue  # dropped step
                seq[kk] += int(rng.random() < 0.03)
                h = rng.integers(0, 30, n).astype(np.uint32)
                if rng.random() < 0.05:
                    h = np.concatenate([h, h[:1]])
                m = h.size
                late = int(rng.random() < 0.05)
                led.on_step(
                    keys[kk],
                    Step(
                        seq=seq[kk],
                        start_time_ns=clock.now,
                        end_time_ns=clock.now + d,
                        device_time_ns=d,
                        kind=int(rng.integers(0, 5)),
                        global_step=None if rng.random() < 0.05 else gs - late,
                        handles=h,
                        prefill_tokens=(rng.integers(0, 600, m) * (rng.random(m) < 0.3)).astype(np.uint32),
                        decode_tokens=rng.integers(0, 2, m).astype(np.uint32),
                        context_tokens=rng.integers(0, 50_000, m).astype(np.uint32),
                        peer_tokens=rng.integers(0, 2000, shards if rng.random() < 0.5 else 0).astype(
                            np.uint32
                        ),
                    ),
                )
                seq[kk] += 1
            gs += 1
            clock.now += d + int(rng.integers(0, 2 * MS))
        elif r < 0.93:
            led.tick(clock.now + int(rng.integers(0, 100 * MS)))
        elif r < 0.95:
            led.on_heartbeat(keys[k], Beat(time_ns=clock.now, dropped_frames=int(rng.integers(0, 5))))
        elif r < 0.97:
            led.disconnect(keys[k])
            epoch[k] += int(rng.random() < 0.5)
            led.connect(Hello(PROTOCOL_VERSION, "e", k, shards, coupling, recorder_epoch=epoch[k]))
        else:
            led.take_changed_slots()
            led.take_interference()
            led.shards()
        assert led.size <= 25
        assert led.size == int(led._cols.alive.sum())
    led.flush()
    views = led.query(RequestQuery())
    assert len(views) == led.size == led.count(RequestQuery())
    for v in views:
        assert v.wall_ns == v.queue_time_ns + v.engine_time_ns + v.interference_ns + v.other_ns
        assert min(v.queue_time_ns, v.engine_time_ns, v.interference_ns, v.other_ns, v.gpu_time_ns) >= 0
        assert len(v.top_blame) <= 2
    assert led.counters.steps > 500 and led.counters.unknown_handles > 0


# ---- forgetting an engine that left ----------------------------------------------------
def test_forgetting_an_idle_engine_drops_it_whole_and_nothing_else():
    """The engine forgotten is the one that left longest ago, with every request it held
    (blame on its evicted aggressors included); connected engines, the newcomer's own id and
    other engines' requests and blame are untouched; its shard-table places are reused."""
    led, clock, keys = make_ledger()  # engine "eng", 2 shards, connected
    gone = connect(led, "gone", 1)
    arrive(led, gone[0], 1, "g-victim", T0)
    arrive(led, gone[0], 2, "g-aggr", T0)
    step(led, gone[0], [1], [10], T0)
    step(led, gone[0], [2], [512], T0 + MS, d=10 * MS)  # the victim waits on g-aggr
    finish(led, gone[0], 2, T0 + 11 * MS)
    arrive(led, keys[0], 1, "e-victim", T0)
    arrive(led, keys[0], 2, "e-aggr", T0)
    step(led, keys[0], [1], [10], T0)
    step(led, keys[0], [2], [512], T0 + MS, d=10 * MS)

    def figures(v):  # what does not move with the clock
        return (v.engine_time_ns, v.gpu_time_ns, v.interference_ns, v.steps, v.top_blame)

    clock.now = T0 + S
    before = figures(led.get("e-victim"))
    assert before[4] and before[4][0].request_id == "e-aggr"
    assert led.forget_idle_engine() is None  # everyone is connected
    led.disconnect(gone[0])
    later = connect(led, "later", 1)
    clock.now = T0 + 2 * S
    led.disconnect(later[0])
    assert led.forget_idle_engine(keep="gone") == ("later", 0)  # the newcomer's own id is kept
    dropped: list[str] = []
    led.add_forget_listener(dropped.append)
    assert led.forget_idle_engine() == ("gone", 2)
    assert dropped == ["gone"]
    assert led.get("g-victim") is None and led.get("g-aggr") is None
    assert not led._ghosts  # g-aggr's ghost went with its victim: nobody left could name it
    assert {s.engine_id for s in led.shards()} == {"eng"}
    assert figures(led.get("e-victim")) == before  # the other engine's figures and blame, unchanged
    assert (led.counters.engines_forgotten, led.counters.forgotten_requests) == (2, 2)
    assert led.forget_idle_engine() is None
    again = connect(led, "gone", 1)  # comes back: a fresh engine in a reused table place
    assert led.census("gone", 0)[2:] == (True, True)
    assert led.shards("gone")[0].steps == 0
    arrive(led, again[0], 1, "g-victim", T0 + 3 * S)
    assert led.get("g-victim").engine_time_ns == 0
    assert len(led._shard_table) == 4  # eng ×2, gone, later: no place added for the newcomer
