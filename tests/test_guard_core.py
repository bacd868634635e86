"""The guard's pure tracker (clients/_guard_core.py) on a fake clock: every limit fires exactly at
its value and not a tick before.

The tracker takes every time as an argument (local monotonic ``now``, local wall ``wall_ns``),
so "the clock" here is just the numbers passed in: no sleeps, no sidecar. These are the rules a
user feels — a guard that fires late lets a runaway burn the engine, one that fires early kills
a healthy request — so each test checks both sides of its limit. End-to-end coverage of the same
limits against a real engine and sidecar is in test_guard.py.
"""

from __future__ import annotations

import collections

import pytest

from enginetime.clients import BudgetReason, EngineBudget
from enginetime.clients import _convert as cv
from enginetime.clients._guard_core import NS, Tracker, group_by_engine, shard_lookup
from enginetime.v1 import accounting_pb2 as pb

pytestmark = pytest.mark.timeout(30)  # a due() that never returns must fail, not hang

#: One tick of the fake clock: far below anything the guard could mean, far above float noise.
TICK = 1e-6
#: Where the fake monotonic clock starts (not 0: a bug that treats 0 as "unset" must show).
T0 = 1000.0
#: Local wall clock at T0 (ns).
WALL0 = 1_700_000_000 * NS

QUEUED = pb.REQUEST_STATE_QUEUED
RUNNING = pb.REQUEST_STATE_RUNNING
PREEMPTED = pb.REQUEST_STATE_PREEMPTED
FINISHED = pb.REQUEST_STATE_FINISHED


def acct(rid: str = "r", state: int = RUNNING, **kw) -> pb.RequestAccounting:
    kw.setdefault("engine_id", "e")
    return pb.RequestAccounting(request_id=rid, state=state, **kw)


def wall_at(now: float, skew_s: float = 0.0) -> int:
    """Local wall clock (ns) at fake monotonic ``now``; ``skew_s`` shifts it to another host's clock."""
    return WALL0 + round((now - T0 + skew_s) * NS)


def tracker(budget: EngineBudget, *, up_at: float | None = T0, **kw) -> Tracker:
    t = Tracker(budget, **kw)
    if up_at is not None:
        t.on_up(up_at)
    return t


def batch(t: Tracker, now: float, *updates, sidecar_skew_s: float = 0.0):
    """Deliver one StreamUpdates batch at ``now``; the sidecar's clock runs ``sidecar_skew_s`` ahead."""
    return t.on_batch(list(updates), wall_at(now, sidecar_skew_s), now, wall_at(now))


def shard(last_step_ns: int | None, connected: bool = True, engine_id: str = "e", index: int = 0):
    m = pb.ShardStatus(engine_id=engine_id, shard=index, connected=connected)
    if last_step_ns is not None:
        m.last_step_time.FromNanoseconds(last_step_ns)
    return cv.shard_from_pb(m)


# ---------------------------------------------------------------------------- engine_time


@pytest.mark.parametrize("field", ["engine_time_ns", "engine_time"])
def test_engine_time_fires_at_the_limit_and_not_one_nanosecond_before(field):
    t = tracker(EngineBudget(engine_time=0.5))
    t.add("r", T0)

    def update(ns: int) -> pb.RequestAccounting:
        m = acct(steps=1)
        if field == "engine_time_ns":
            m.engine_time_ns = ns
        else:  # a sidecar that sends only the Duration
            m.engine_time.FromNanoseconds(ns)
        return m

    assert batch(t, T0 + 1, update(500_000_000 - 1)) == []
    fires = batch(t, T0 + 2, update(500_000_000))
    assert len(fires) == 1
    f = fires[0]
    assert f.reason is BudgetReason.ENGINE_TIME and f.limit == 0.5 and f.observed == 0.5 and f.telemetry
    # Fired once: later updates over the limit fire nothing more.
    assert batch(t, T0 + 3, update(900_000_000)) == []
    assert t.stats.updates == 3


def test_engine_time_observed_is_what_the_sidecar_reported():
    t = tracker(EngineBudget(engine_time=0.5))
    t.add("r", T0)
    (f,) = batch(t, T0 + 1, acct(engine_time_ns=730_000_000))
    assert f.observed == pytest.approx(0.73)
    err = f.error(T0 + 1.5, aborted=False)
    assert err.reason is BudgetReason.ENGINE_TIME and err.elapsed == pytest.approx(1.5)
    assert err.accounting is not None and err.accounting.request_id == "r"


def test_engine_time_is_not_checked_on_terminal_or_foreign_updates():
    t = tracker(EngineBudget(engine_time=0.5))
    t.add("r", T0)
    assert batch(t, T0 + 1, acct(state=FINISHED, engine_time_ns=10 * NS)) == []
    assert batch(t, T0 + 1, acct("other", engine_time_ns=10 * NS)) == []
    assert t.stats.foreign == 1


def test_a_removed_watch_never_fires():
    t = tracker(EngineBudget(engine_time=0.5, wall=1.0, liveness=1.0))
    e = t.add("r", T0)
    t.remove(e)
    assert batch(t, T0 + 0.5, acct(engine_time_ns=NS)) == []
    assert t.due(T0 + 100).fires == [] and t.next_due() is None


def test_a_request_id_is_watched_once():
    t = tracker(EngineBudget(engine_time=0.5))
    t.add("r", T0)
    with pytest.raises(ValueError, match="already watched"):
        t.add("r", T0)


def test_per_watch_budget_overrides_the_guards():
    t = tracker(EngineBudget(engine_time=10.0))
    t.add("tight", T0, EngineBudget(engine_time=0.2))
    t.add("loose", T0)
    fires = batch(t, T0 + 1, acct("tight", engine_time_ns=200_000_000), acct("loose", engine_time_ns=NS))
    assert [f.entry.request_id for f in fires] == ["tight"]


# ---------------------------------------------------------------------------- wall


def test_wall_fires_at_the_limit_and_not_a_tick_before():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=2.0))
    t.add("r", T0)
    assert t.next_due() == T0 + 2.0
    assert t.due(T0 + 2.0 - TICK).fires == []
    (f,) = t.due(T0 + 2.0).fires
    assert f.reason is BudgetReason.WALL and f.limit == 2.0 and f.observed == 2.0 and f.telemetry
    assert t.due(T0 + 10).fires == []  # once


def test_wall_fires_without_telemetry_and_says_so():
    t = tracker(EngineBudget(engine_time=5.0, liveness=1.0, wall=2.0), up_at=None)
    assert t.on_down(T0)  # the transition is reported once
    assert not t.on_down(T0)
    t.add("r", T0)
    (f,) = t.due(T0 + 2.0).fires
    assert f.reason is BudgetReason.WALL and not f.telemetry


# ---------------------------------------------------------------------------- queue


def test_queue_fires_when_queued_time_reaches_the_limit_counting_what_the_sidecar_saw():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=None, queue=1.0))
    t.add("r", T0)
    # At T0+0.5 the sidecar says the request has queued 0.3 s: it is due 0.7 s later.
    batch(t, T0 + 0.5, acct(state=QUEUED, queue_time_ns=300_000_000))
    assert t.next_due() == pytest.approx(T0 + 1.2)
    assert t.due(T0 + 1.2 - TICK).fires == []
    (f,) = t.due(T0 + 1.2).fires
    assert f.reason is BudgetReason.QUEUE and f.limit == 1.0
    assert f.observed == pytest.approx(1.0)


def test_queue_uses_the_duration_field_when_the_ns_field_is_absent():
    # 0.6 + (1000.4 - 1000.0) is 0.99999999999991 in floats: the tracker once re-armed at
    # now + 9e-14, which rounds back to now, and due() spun forever (a hung guard timer).
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=None, queue=1.0))
    t.add("r", T0)
    m = acct(state=QUEUED)
    m.queue_time.FromNanoseconds(600_000_000)
    batch(t, T0, m)
    assert t.due(T0 + 0.4 - TICK).fires == []
    (f,) = t.due(T0 + 0.4).fires
    assert f.observed == pytest.approx(1.0)


def test_queue_rearms_from_newer_figures_and_fires_exactly_at_the_limit():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=None, queue=1.0))
    t.add("r", T0)
    batch(t, T0, acct(state=QUEUED, queue_time_ns=0))
    # A newer update reports less queue time than local time suggests (the request arrived at
    # the engine later than the watch began): the first deadline re-arms instead of firing.
    batch(t, T0 + 0.9, acct(state=QUEUED, queue_time_ns=500_000_000))
    assert t.due(T0 + 1.0).fires == []
    assert t.due(T0 + 1.4 - TICK).fires == []
    (f,) = t.due(T0 + 1.4).fires
    assert f.observed == pytest.approx(1.0)


def test_queue_never_fires_once_admitted_or_while_telemetry_is_down():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=None, queue=1.0))
    t.add("a", T0)
    t.add("b", T0)
    batch(t, T0, acct("a", state=QUEUED), acct("b", state=QUEUED))
    batch(t, T0 + 0.5, acct("a", state=RUNNING, steps=1))
    t.on_down(T0 + 0.6)
    assert t.due(T0 + 5).fires == []  # a admitted; b unknown while the stream is down


def test_queue_is_off_by_default():
    t = tracker(EngineBudget(engine_time=1.0, liveness=None, wall=None))
    t.add("r", T0)
    batch(t, T0, acct(state=QUEUED, queue_time_ns=100 * NS))
    assert t.next_due() == T0 + t.unknown_after  # only the "not reported" check is timed
    assert t.due(T0 + 1000).fires == []


# ---------------------------------------------------------------------------- liveness


def liveness_tracker(limit: float = 2.0) -> Tracker:
    return tracker(EngineBudget(engine_time=None, liveness=limit, wall=None))


def test_liveness_suspects_exactly_one_limit_after_the_last_progress():
    t = liveness_tracker(2.0)
    t.add("r", T0)
    batch(t, T0 + 1, acct(steps=5))
    assert t.due(T0 + 3 - TICK).suspects == []
    assert [e.request_id for e in t.due(T0 + 3).suspects] == ["r"]


def test_liveness_progress_pushes_the_deadline_back():
    t = liveness_tracker(2.0)
    t.add("r", T0)
    batch(t, T0 + 1, acct(steps=5))
    batch(t, T0 + 2, acct(steps=5))  # no progress: same steps
    batch(t, T0 + 2.5, acct(steps=5, excluded_steps=1))  # an excluded step is progress too
    assert t.due(T0 + 3).suspects == []  # re-armed from T0+2.5
    assert t.due(T0 + 4.5 - TICK).suspects == []
    assert len(t.due(T0 + 4.5).suspects) == 1


@pytest.mark.parametrize("state", [QUEUED, FINISHED])
def test_liveness_does_not_apply_to_queued_or_finished_requests(state):
    t = liveness_tracker(1.0)
    t.add("r", T0)
    batch(t, T0, acct(state=state, steps=1))
    assert t.due(T0 + 100).suspects == []


def test_liveness_applies_to_preempted_requests():
    t = liveness_tracker(1.0)
    t.add("r", T0)
    batch(t, T0, acct(state=PREEMPTED, steps=3))
    assert len(t.due(T0 + 1).suspects) == 1


def test_liveness_clock_restarts_after_a_telemetry_outage():
    t = liveness_tracker(2.0)
    t.add("r", T0)
    batch(t, T0 + 1, acct(steps=5))
    t.on_down(T0 + 1.5)
    assert t.due(T0 + 3).suspects == []  # no judging a request while the stream is down
    assert t.on_up(T0 + 10)  # back: ends an outage
    batch(t, T0 + 10, acct(steps=5))
    assert t.due(T0 + 12 - TICK).suspects == []
    assert len(t.due(T0 + 12).suspects) == 1


@pytest.mark.parametrize("skew_s", [0.0, 300.0, -300.0])
def test_liveness_confirms_exactly_at_the_limit_whatever_the_sidecars_clock(skew_s):
    """The shard's last step is stamped on the sidecar's host; the guard's host clock is off by
    ``skew_s`` (both ways). Staleness must still be measured right: fire at the limit, not before."""
    limit = 2.0
    t = liveness_tracker(limit)
    e = t.add("r", T0)
    batch(t, T0 + 1, acct(steps=5), sidecar_skew_s=skew_s)
    assert t.skew_ns() == round(skew_s * NS)
    now = T0 + 3
    assert t.due(now).suspects == [e]
    sidecar_now = wall_at(now, skew_s)

    # The shard last stepped one tick less than a limit ago: still alive, the clock restarts.
    fire, why = t.confirm_liveness(e, shard(sidecar_now - round((limit - TICK) * NS)), now, wall_at(now))
    assert fire is None and why == "shard stepping"
    assert t.stats.liveness_cleared == 1
    assert e.progress_at == pytest.approx(now - (limit - TICK))

    # Exactly a limit ago: fires, with the staleness measured on one clock.
    fire, _ = t.confirm_liveness(e, shard(sidecar_now - round(limit * NS)), now, wall_at(now))
    assert fire is not None and fire.reason is BudgetReason.LIVENESS
    assert fire.limit == limit and fire.observed == pytest.approx(limit)


def test_liveness_skew_is_the_largest_recent_sample():
    """Latency only makes a batch look older, so the largest sample is the truest skew."""
    t = liveness_tracker(2.0)
    for k, lag in enumerate([0.2, 0.0, 0.05]):
        t.on_batch([], wall_at(T0 + k, 7.0 - lag), T0 + k, wall_at(T0 + k))
    assert t.skew_ns() == 7 * NS


def test_liveness_never_fires_on_a_disconnected_recorder_or_a_silent_sidecar():
    t = liveness_tracker(1.0)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 1).suspects == [e]
    fire, why = t.confirm_liveness(e, shard(wall_at(T0) - 100 * NS, connected=False), T0 + 1, wall_at(T0 + 1))
    assert fire is None and why == "recorder disconnected"
    # The clock restarted at the check; the re-check is one limit later, not sooner.
    assert t.due(T0 + 2 - TICK).suspects == []
    assert t.due(T0 + 2).suspects == [e]
    fire, why = t.confirm_liveness(e, None, T0 + 2, wall_at(T0 + 2))
    assert fire is None and why == "sidecar did not answer"


def test_liveness_on_a_shard_that_never_stepped_counts_from_the_watch():
    t = liveness_tracker(2.0)
    e = t.add("r", T0)
    batch(t, T0 + 0.5, acct(steps=0))
    assert t.due(T0 + 2.5).suspects == [e]
    fire, _ = t.confirm_liveness(e, shard(None), T0 + 2.0 - TICK, wall_at(T0 + 2.0))
    assert fire is None
    e2 = t.add("r2", T0)
    fire, _ = t.confirm_liveness(e2, shard(None), T0 + 2.0, wall_at(T0 + 2.0))
    assert fire is not None and fire.observed == pytest.approx(2.0)


def test_suspects_group_by_engine_and_look_up_their_shard():
    t = liveness_tracker(1.0)
    a, b, c = t.add("a", T0), t.add("b", T0), t.add("c", T0)
    batch(t, T0, acct("a", engine_id="x"), acct("b", engine_id="y", shard=1), acct("c", engine_id="x"))
    groups = group_by_engine([a, b, c])
    assert groups == {"x": [a, c], "y": [b]}
    lookup = shard_lookup([shard(1, engine_id="y", index=1), shard(2, engine_id="x")])
    assert lookup("y", 1).last_step_time_ns == 1 and lookup("y", 0) is None


# ---------------------------------------------------------------------------- unknown requests


def test_a_request_the_sidecar_never_reported_is_flagged_once_after_unknown_after():
    t = tracker(EngineBudget(engine_time=1.0, liveness=None, wall=None), unknown_after=10.0)
    t.add("seen", T0)
    e = t.add("never", T0)
    batch(t, T0 + 1, acct("seen"))
    assert t.due(T0 + 10 - TICK).unknown == []
    assert t.due(T0 + 10).unknown == [e]
    assert t.due(T0 + 20).unknown == []


# ---------------------------------------------------------------------------- what else users feel
# (each of these was a surviving mutant of `make mutate`: a change no test noticed)


@pytest.mark.parametrize("state", [FINISHED, pb.REQUEST_STATE_ABORTED, pb.REQUEST_STATE_UNSPECIFIED])
def test_terminal_and_unknown_states_stop_every_limit_but_the_wall(state):
    t = tracker(EngineBudget(engine_time=0.5, liveness=1.0, queue=1.0, wall=50.0))
    t.add("r", T0)
    batch(t, T0, acct(state=QUEUED))
    assert batch(t, T0 + 0.1, acct(state=state, steps=3, engine_time_ns=10 * NS)) == []
    due = t.due(T0 + 49)
    assert due.fires == [] and due.suspects == []
    assert [f.reason for f in t.due(T0 + 50).fires] == [BudgetReason.WALL]


def test_one_batch_is_applied_in_full_whatever_comes_first():
    """Foreign, already-fired and terminal updates must not stop the rest of their batch."""
    t = tracker(EngineBudget(engine_time=0.5))
    for rid in ("done", "fired", "a", "b", "c"):
        t.add(rid, T0)
    assert len(batch(t, T0, acct("fired", engine_time_ns=NS))) == 1
    fires = batch(
        t,
        T0 + 1,
        acct("stranger", engine_time_ns=NS),
        acct("a", engine_time_ns=NS),
        acct("fired", engine_time_ns=NS),
        acct("b", engine_time_ns=NS),
        acct("done", state=FINISHED),
        acct("c", engine_time_ns=NS),
    )
    assert [f.entry.request_id for f in fires] == ["a", "b", "c"]
    assert (t.stats.batches, t.stats.updates, t.stats.foreign) == (2, 7, 1)


def test_every_due_item_is_handled_even_after_a_removed_one():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=1.0))
    gone, kept = t.add("gone", T0), t.add("kept", T0 + 0.5)
    t.remove(gone)
    assert "gone" not in t.ids() and t.ids() == ["kept"]
    # One late call: the removed watch's wall item comes first and is dropped, not fired; the
    # kept one's still fires in the same call.
    assert [f.entry for f in t.due(T0 + 1.5).fires] == [kept]


def test_items_that_no_longer_apply_do_not_hold_up_the_rest_of_the_call():
    t = tracker(EngineBudget(engine_time=None, liveness=None, wall=None, queue=1.0))
    t.add("was-running", T0, EngineBudget(engine_time=None, liveness=1.0, wall=None))
    t.add("was-queued", T0)
    late = t.add("late", T0, EngineBudget(engine_time=None, liveness=None, wall=3.0))
    batch(t, T0, acct("was-running", steps=1), acct("was-queued", state=QUEUED))
    # Both change state before their items come due: the items no longer apply.
    batch(t, T0 + 0.5, acct("was-running", state=QUEUED, steps=1), acct("was-queued", steps=1))
    due = t.due(T0 + 3)
    assert [f.entry for f in due.fires] == [late] and due.suspects == []


def test_a_fired_watch_never_fires_again():
    t = tracker(EngineBudget(engine_time=0.5, liveness=1.0, wall=3.0))
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 1).suspects == [e]
    fire, _ = t.confirm_liveness(e, shard(wall_at(T0 + 1) - 5 * NS), T0 + 1, wall_at(T0 + 1))
    assert fire is not None and fire.telemetry
    assert batch(t, T0 + 2, acct(engine_time_ns=NS)) == []
    assert t.due(T0 + 10).fires == []
    w = t.add("w", T0 + 10)
    assert [f.entry for f in t.due(T0 + 13).fires] == [w]
    assert batch(t, T0 + 14, acct("w", engine_time_ns=NS)) == []


def test_a_limit_that_came_due_while_nobody_looked_still_fires():
    """``due`` is called late (a busy event loop): everything overdue fires or is suspected."""
    t = tracker(EngineBudget(engine_time=None, liveness=1.0, queue=1.0, wall=None))
    t.add("q", T0)
    live = t.add("l", T0)
    batch(t, T0, acct("q", state=QUEUED), acct("l", steps=1))
    due = t.due(T0 + 30)
    assert [f.reason for f in due.fires] == [BudgetReason.QUEUE] and due.fires[0].observed == pytest.approx(
        30
    )
    assert due.suspects == [live]


def test_progress_is_any_change_of_steps_plus_excluded_steps():
    t = liveness_tracker(2.0)
    t.add("r", T0)
    batch(t, T0, acct(steps=5, excluded_steps=2))
    batch(t, T0 + 1, acct(steps=6, excluded_steps=3))  # both grew: progress
    assert t.due(T0 + 3 - TICK).suspects == []
    batch(t, T0 + 2, acct(steps=0, excluded_steps=0))  # counts reset (a restarted sidecar): still a change
    assert t.due(T0 + 4 - TICK).suspects == []
    assert len(t.due(T0 + 4).suspects) == 1


@pytest.mark.parametrize("steps", [0, 1])
def test_the_first_update_starts_the_liveness_clock_whatever_its_step_count(steps):
    t = liveness_tracker(2.0)
    t.add("r", T0)
    batch(t, T0 + 5, acct(steps=steps))  # first seen 5 s after the stream came up
    assert t.due(T0 + 7 - TICK).suspects == []
    assert len(t.due(T0 + 7).suspects) == 1


def test_a_suspect_is_held_for_its_confirmation_and_re_checked_no_sooner_than_a_second():
    t = liveness_tracker(2.0)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 2).suspects == [e]
    batch(t, T0 + 2.1, acct(steps=1))  # no progress while the GetShards is in flight
    assert t.due(T0 + 10).suspects == []  # not suspected twice
    now = T0 + 10
    fire, why = t.confirm_liveness(e, shard(wall_at(now) - round((2.0 - TICK) * NS)), now, wall_at(now))
    assert fire is None and why == "shard stepping"
    assert t.stats.liveness_checks == 1 and t.stats.liveness_cleared == 1
    # The shard stepped just under a limit ago: the next check waits a second, not a microsecond.
    assert t.due(now + 1.0 - TICK).suspects == []
    assert t.due(now + 1.0).suspects == [e]
    fire, _ = t.confirm_liveness(e, shard(wall_at(now) - round(1.5 * NS)), now + 1.0, wall_at(now + 1.0))
    assert fire is not None and fire.observed == pytest.approx(2.5)  # past the limit fires too
    assert t.stats.liveness_checks == 2


def test_a_suspect_requeued_before_its_confirmation_is_re_armed_when_admitted_again():
    t = liveness_tracker(1.0)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 1).suspects == [e]
    batch(t, T0 + 1.1, acct(state=QUEUED, steps=1))
    fire, _ = t.confirm_liveness(e, shard(wall_at(T0) - 10 * NS), T0 + 1.2, wall_at(T0 + 1.2))
    assert fire is not None  # stale shard: fires even though the last update said queued
    t2 = liveness_tracker(1.0)
    e2 = t2.add("r", T0)
    batch(t2, T0, acct(steps=1))
    assert t2.due(T0 + 1).suspects == [e2]
    batch(t2, T0 + 1.1, acct(state=QUEUED, steps=1))
    fire, why = t2.confirm_liveness(e2, None, T0 + 1.2, wall_at(T0 + 1.2))
    assert fire is None and t2.next_due() is None or t2.due(T0 + 50).suspects == []  # queued: not timed
    batch(t2, T0 + 60, acct(steps=2))  # admitted again: liveness is armed again
    assert t2.due(T0 + 61).suspects == [e2]


def test_each_watch_has_at_most_one_item_per_kind_in_the_heap():
    """The module's cost promise: progress pushes nothing; re-arming replaces, never adds."""
    t = tracker(EngineBudget(engine_time=100.0, liveness=2.0, queue=5.0, wall=1000.0))
    t.add("q", T0)
    t.add("l", T0)
    now = T0
    for k in range(200):
        now = T0 + 0.1 * k
        batch(t, now, acct("q", state=QUEUED, queue_time_ns=0), acct("l", steps=k // 3))
        t.due(now)
    per_kind = collections.Counter((item[3].request_id, item[2]) for item in t._heap)
    assert max(per_kind.values()) == 1, per_kind


def test_skew_is_exact_without_samples_and_forgets_a_sample_after_32_batches():
    t = liveness_tracker(2.0)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 2).suspects == [e]
    now = T0 + 2
    t._skew_samples.clear()
    assert t.skew_ns() == 0
    fire, _ = t.confirm_liveness(e, shard(wall_at(now) - 2 * NS + 1), now, wall_at(now))
    assert fire is None  # one nanosecond short of the limit
    t2 = liveness_tracker(2.0)
    t2.on_batch([], WALL0 + 9 * NS, T0, WALL0)  # one old sample 9 s ahead
    for k in range(31):
        t2.on_batch([], wall_at(T0 + 1 + k), T0 + 1 + k, wall_at(T0 + 1 + k))
    assert t2.skew_ns() == 9 * NS  # still among the last 32
    t2.on_batch([], wall_at(T0 + 40), T0 + 40, wall_at(T0 + 40))
    assert t2.skew_ns() == 0  # aged out


def test_defaults_users_read_about():
    """A request unreported for 10 s is logged (docs/GUARD.md); no fire counted before any fired."""
    t = Tracker(EngineBudget(engine_time=1.0))
    t.add("r", T0)
    assert t.next_due() == T0 + 10.0
    assert set(t.stats.fires.values()) == {0} and set(t.stats.fires) == {r.value for r in BudgetReason}
    assert (t.stats.batches, t.stats.updates, t.stats.liveness_checks) == (0, 0, 0)


def test_a_stepping_shard_clears_a_suspect_and_the_next_check_is_one_limit_after_its_last_step():
    t = liveness_tracker(2.0)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 2).suspects == [e]
    now = T0 + 2
    fire, _ = t.confirm_liveness(e, shard(wall_at(now) - round(0.2 * NS)), now, wall_at(now))
    assert fire is None
    batch(t, now + 0.1, acct(steps=1))  # no progress: must not arm a second check
    assert t.due(now + 1.8 - TICK).suspects == []
    assert t.due(now + 1.8).suspects == [e]  # once


def test_a_shard_clock_ahead_of_the_skew_estimate_never_counts_as_stale_or_as_future_progress():
    t = liveness_tracker(0.5)
    e = t.add("r", T0)
    batch(t, T0, acct(steps=1))
    assert t.due(T0 + 0.5).suspects == [e]
    now = T0 + 0.5
    fire, _ = t.confirm_liveness(e, shard(wall_at(now)), now, wall_at(now))  # stepped just now
    assert fire is None
    t2 = liveness_tracker(2.0)
    e2 = t2.add("r", T0)
    batch(t2, T0, acct(steps=1))
    assert t2.due(T0 + 2).suspects == [e2]
    now = T0 + 2
    # The shard's last step looks 0.5 s in the future: staleness 0, progress now (not later).
    fire, _ = t2.confirm_liveness(e2, shard(wall_at(now) + NS // 2), now, wall_at(now))
    assert fire is None
    assert t2.due(now + 2.0 - TICK).suspects == []
    assert t2.due(now + 2.0).suspects == [e2]


def test_queue_is_re_armed_after_an_outage():
    t = tracker(EngineBudget(engine_time=1.0, liveness=None, wall=None, queue=1.0))
    t.add("r", T0)
    batch(t, T0, acct(state=QUEUED))
    t.on_down(T0 + 0.5)
    assert t.due(T0 + 1.0).fires == []  # the stream is down: not judged
    t.on_up(T0 + 5)
    batch(t, T0 + 5, acct(state=QUEUED, queue_time_ns=5 * NS))
    (f,) = t.due(T0 + 5).fires
    assert f.reason is BudgetReason.QUEUE and f.telemetry and f.observed == pytest.approx(5.0)
    # Fired once: neither an engine-time update nor a new queued spell fires it again.
    assert batch(t, T0 + 6, acct(engine_time_ns=100 * NS)) == []
    batch(t, T0 + 7, acct(state=QUEUED, queue_time_ns=50 * NS))
    assert t.due(T0 + 100).fires == []


def test_a_removed_or_fired_suspect_is_never_confirmed():
    t = liveness_tracker(1.0)
    a, b = t.add("a", T0), t.add("b", T0)
    batch(t, T0, acct("a", steps=1), acct("b", steps=1))
    assert t.due(T0 + 1).suspects == [a, b]
    t.remove(a)
    stale = shard(wall_at(T0) - 10 * NS)
    assert t.confirm_liveness(a, stale, T0 + 1, wall_at(T0 + 1)) == (None, "done")
    fire, _ = t.confirm_liveness(b, stale, T0 + 1, wall_at(T0 + 1))
    assert fire is not None
    assert t.confirm_liveness(b, stale, T0 + 1, wall_at(T0 + 1)) == (None, "done")
    assert t.stats.liveness_checks == 1
