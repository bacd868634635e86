"""The guard's bookkeeping, shared by the threaded and the asyncio guard: no I/O, no threads, no locks.

``Tracker`` holds one ``Entry`` per watched request and a heap of deadlines. The
guards feed it the raw ``RequestAccounting`` messages of their one StreamUpdates
stream (``on_batch``), tell it when the stream goes down or comes back, and ask it
what is due (``due``). It answers with ``Fire``\\ s (a limit was crossed) and
liveness *suspects* (no sign of progress for ``liveness`` seconds: the guard
confirms with GetShards before anything is killed, see ``confirm_liveness``).

Costs, because a session server may follow thousands of requests:

* an update is a dict lookup and a few integer compares on the protobuf message —
  nothing is converted to dataclasses unless a limit fires;
* each entry has at most one wall, one liveness and one queue item in the heap;
  progress does not push anything (a liveness item that comes due early is re-armed
  from the latest progress instead);
* engine_time is checked when an update arrives (it only changes then).

Clocks: every deadline is on the local monotonic clock. The only comparison with the
sidecar's clock is the liveness confirmation (a shard's last step time, stamped by the
engine on the sidecar's host), which uses the skew between the sidecar's batch times
and the local wall clock, so a session server on another machine with a skewed clock
still measures the staleness right.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _convert as cv
from .budget import BudgetReason, EngineBudget, EngineBudgetExceeded
from .types import RequestAccounting, RequestState, ShardStatus

if TYPE_CHECKING:
    from enginetime.v1 import accounting_pb2 as pb

NS = 1_000_000_000

# RequestState numbers as plain ints: compared on raw messages, where a plain int compare is cheapest.
_UNSPECIFIED = int(RequestState.UNSPECIFIED)
_QUEUED = int(RequestState.QUEUED)
_RUNNING = int(RequestState.RUNNING)
_PREEMPTED = int(RequestState.PREEMPTED)
_FINISHED = int(RequestState.FINISHED)
_ADMITTED = (_RUNNING, _PREEMPTED)

# Heap item kinds.
_WALL, _LIVENESS, _QUEUE, _UNKNOWN = 0, 1, 2, 3


@dataclass(eq=False, slots=True)
class Entry:
    """One watched request. ``owner`` is the guard's watch object (it knows how to cancel)."""

    request_id: str
    budget: EngineBudget
    started: float
    owner: object = None
    engine_limit_ns: int | None = None
    #: Latest raw accounting (enginetime.v1.RequestAccounting) and when it arrived (monotonic).
    msg: pb.RequestAccounting | None = None
    received: float = 0.0
    state: int = _UNSPECIFIED
    #: steps + excluded_steps: grows with every step of the request's shard while it runs.
    progress: int = -1
    progress_at: float = 0.0
    live_armed: bool = False
    queue_armed: bool = False
    done: bool = False
    fired: bool = False
    #: The engine serving it: named by the watch, or the first that reported the id.
    engine_id: str = ""
    engine_named: bool = False
    #: Another engine reported the same id and the watch named none: never fire on figures.
    ambiguous: bool = False
    #: The sidecar whose stream last reported it ("" with one sidecar, or before any did).
    source: str = ""

    def accounting(self) -> RequestAccounting | None:
        return None if self.msg is None else cv.request_from_pb(self.msg)


@dataclass(slots=True)
class Fire:
    """A limit crossed: what the guard turns into EngineBudgetExceeded and a cancel."""

    entry: Entry
    reason: BudgetReason
    limit: float
    observed: float
    telemetry: bool

    def error(self, now: float, *, aborted: bool) -> EngineBudgetExceeded:
        e = self.entry
        return EngineBudgetExceeded(
            e.request_id,
            self.reason,
            limit=self.limit,
            observed=self.observed,
            budget=e.budget,
            accounting=e.accounting(),
            elapsed=now - e.started,
            telemetry=self.telemetry,
            aborted=aborted,
        )


@dataclass(slots=True)
class Due:
    """What came due in one ``Tracker.due`` call."""

    fires: list[Fire] = field(default_factory=list)
    #: Entries whose shard showed no progress for their liveness limit: confirm with GetShards.
    suspects: list[Entry] = field(default_factory=list)
    #: Entries the sidecar has not reported ``unknown_after`` seconds after the watch began.
    unknown: list[Entry] = field(default_factory=list)


@dataclass(slots=True)
class TrackerStats:
    updates: int = 0
    #: Updates for requests this guard does not watch (dropped locally).
    foreign: int = 0
    batches: int = 0
    fires: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in BudgetReason})
    #: Watches that saw their id reported by two engines without naming one (they never fire
    #: on figures; pass engine_id to guard.watch).
    ambiguous: int = 0
    liveness_checks: int = 0
    liveness_cleared: int = 0


class Tracker:
    """Watched requests, their deadlines and the telemetry state; see the module doc."""

    def __init__(self, budget: EngineBudget, *, unknown_after: float = 10.0) -> None:
        self.budget = budget
        self.unknown_after = unknown_after
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, int, Entry]] = []
        self._seq = itertools.count()
        #: Per sidecar ("" with one): its stream is delivering; absent before its first attempt finished.
        self._up: dict[str, bool] = {}
        #: Monotonic time a stream last came back after an outage (liveness counts from here).
        self.up_since = 0.0
        #: Sidecar clock minus local clock, ns (max of recent samples: latency only lowers a sample).
        self._skew_samples: deque[int] = deque(maxlen=32)
        self._skews: dict[str, deque[int]] = {"": self._skew_samples}
        self.stats = TrackerStats()

    # -- watching -----------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        now: float,
        budget: EngineBudget | None = None,
        owner=None,
        *,
        engine_id: str = "",
    ) -> Entry:
        if request_id in self.entries:
            raise ValueError(
                f"request {request_id!r} is already watched by this guard: request ids must be unique "
                "(the engine rejects a duplicate rid as well)"
            )
        b = budget or self.budget
        e = Entry(request_id, b, now, owner, engine_id=engine_id, engine_named=bool(engine_id))
        if b.engine_time is not None:
            e.engine_limit_ns = round(b.engine_time * NS)
        self.entries[request_id] = e
        if b.wall is not None:
            self._push(now + b.wall, _WALL, e)
        self._push(now + self.unknown_after, _UNKNOWN, e)
        return e

    def remove(self, entry: Entry) -> None:
        entry.done = True
        if self.entries.get(entry.request_id) is entry:
            del self.entries[entry.request_id]
        if not self.entries:
            self._heap.clear()  # nothing left to time: drop stale items at once

    def ids(self) -> list[str]:
        return list(self.entries)

    # -- telemetry ----------------------------------------------------------------------------

    @property
    def telemetry_up(self) -> bool | None:
        """Some sidecar's stream is delivering; None before any attempt finished."""
        if not self._up:
            return None
        return any(self._up.values())

    def source_up(self, source: str) -> bool:
        """The stream of this sidecar ("" with one) is delivering."""
        return self._up.get(source, False)

    def _entry_up(self, e: Entry) -> bool:
        """The telemetry for this entry flows: its sidecar (or, before any reported it, some) is up."""
        return self._up.get(e.source, False) if e.source else bool(self.telemetry_up)

    def on_down(self, now: float, source: str = "") -> bool:
        """A sidecar's stream failed (or the sidecar was removed). True on the transition (logged once).

        Only the requests that sidecar reported lose their telemetry: their liveness and
        queue limits wait, the wall backstop stays; other sidecars' requests are unaffected.
        """
        was = self._up.get(source)
        self._up[source] = False
        return was is not False

    def forget_source(self, source: str) -> None:
        """A sidecar left the fleet for good (DNS no longer lists it): drop its state."""
        self._up.pop(source, None)
        if source:
            self._skews.pop(source, None)

    def on_up(self, now: float, source: str = "") -> bool:
        """A (re)opened stream delivered its first batch. True when this ends an outage.

        After an outage the liveness clocks of that sidecar's requests (and of the ones no
        sidecar reported yet) restart: no progress could be seen while it was away, and
        that must never count against a request.
        """
        was = self._up.get(source)
        self._up[source] = True
        if was is not True:
            self.up_since = now
            for e in self.entries.values():
                if e.source == source or not e.source:
                    e.progress_at = max(e.progress_at, now)
        return was is False

    def skew_ns(self, source: str = "") -> int:
        samples = self._skews.get(source)
        return max(samples) if samples else 0

    # -- updates ------------------------------------------------------------------------------

    def on_batch(
        self, updates: Iterable, batch_time_ns: int, now: float, wall_ns: int, source: str = ""
    ) -> list[Fire]:
        """Apply one StreamUpdates batch (raw messages) from sidecar ``source``; return the fires."""
        st = self.stats
        st.batches += 1
        if batch_time_ns:
            samples = self._skews.get(source)
            if samples is None:
                samples = self._skews[source] = deque(maxlen=32)
            samples.append(batch_time_ns - wall_ns)
        fires: list[Fire] = []
        get = self.entries.get
        n = foreign = 0
        for m in updates:
            n += 1
            e = get(m.request_id)
            if e is None:
                foreign += 1
                continue
            if e.fired:
                continue
            if m.engine_id != e.engine_id:
                if e.engine_named:
                    foreign += 1  # the same id in another engine: not this request
                    continue
                if e.engine_id:
                    # Two engines report this id and the watch named neither: whose figures these
                    # are cannot be told, so they never kill the request.
                    if not e.ambiguous:
                        e.ambiguous = True
                        st.ambiguous += 1
                    continue
                e.engine_id = m.engine_id
            if e.ambiguous:
                continue
            e.msg = m
            e.received = now
            e.source = source
            state = e.state = m.state
            if state >= _FINISHED or state == _UNSPECIFIED:
                continue  # terminal: the HTTP call is returning on its own
            progress = m.steps + m.excluded_steps
            if progress != e.progress:
                e.progress = progress
                e.progress_at = now
            b = e.budget
            limit = e.engine_limit_ns
            if limit is not None:
                engine_ns = m.engine_time_ns or cv._dur_ns(m.engine_time)
                if engine_ns >= limit:
                    e.fired = True
                    assert b.engine_time is not None  # engine_limit_ns is set from it
                    fires.append(Fire(e, BudgetReason.ENGINE_TIME, b.engine_time, engine_ns / NS, True))
                    continue
            if state == _QUEUED:
                if b.queue is not None and not e.queue_armed:
                    e.queue_armed = True
                    queued = (m.queue_time_ns or cv._dur_ns(m.queue_time)) / NS
                    self._push(now + max(0.0, b.queue - queued), _QUEUE, e)
            elif state in _ADMITTED and b.liveness is not None and not e.live_armed:
                e.live_armed = True
                self._push(max(e.progress_at, self.up_since) + b.liveness, _LIVENESS, e)
        st.updates += n
        st.foreign += foreign
        return fires

    # -- time ---------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Due:
        out = Due()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, e = heapq.heappop(heap)
            if e.done or e.fired:
                continue
            b = e.budget
            # Each kind is armed only when its limit is set.
            if kind == _WALL:
                assert b.wall is not None
                e.fired = True
                out.fires.append(Fire(e, BudgetReason.WALL, b.wall, now - e.started, self._entry_up(e)))
            elif kind == _LIVENESS:
                assert b.liveness is not None
                e.live_armed = False
                if not self._entry_up(e) or e.state not in _ADMITTED or e.ambiguous:
                    continue  # re-armed by the next update that shows it admitted
                deadline = max(e.progress_at, self.up_since) + b.liveness
                if deadline > now:
                    e.live_armed = True
                    self._push(deadline, _LIVENESS, e)
                else:
                    e.live_armed = True  # held until confirm_liveness decides
                    out.suspects.append(e)
            elif kind == _QUEUE:
                assert b.queue is not None
                e.queue_armed = False
                if not self._entry_up(e) or e.state != _QUEUED or e.msg is None or e.ambiguous:
                    continue
                m = e.msg
                reported = (m.queue_time_ns or cv._dur_ns(m.queue_time)) / NS
                # The deadline from the latest figures, compared as a time: re-arming at
                # now + (limit - queued) could round back to ``now`` and spin this loop forever.
                deadline = e.received + max(0.0, b.queue - reported)
                if now >= deadline:
                    e.fired = True
                    queued = reported + (now - e.received)
                    out.fires.append(Fire(e, BudgetReason.QUEUE, b.queue, queued, True))
                else:
                    e.queue_armed = True
                    self._push(deadline, _QUEUE, e)
            elif kind == _UNKNOWN:
                if e.msg is None and self.telemetry_up:
                    out.unknown.append(e)
        return out

    def confirm_liveness(
        self, entry: Entry, shard: ShardStatus | None, now: float, wall_ns: int
    ) -> tuple[Fire | None, str]:
        """Decide a liveness suspect from its shard's status (None: the sidecar could not say).

        Fires only when the sidecar is answering, the shard's recorder is connected
        (a disconnected recorder is a telemetry outage, not a hung engine) and the
        shard's last step is older than the limit. Otherwise the shard's own last step
        restarts the request's liveness clock. Returns (fire or None, why not).
        """
        e = entry
        e.live_armed = False
        if e.done or e.fired:
            return None, "done"
        if e.ambiguous:
            return None, "request id reported by two engines"
        limit = e.budget.liveness
        assert limit is not None  # suspects come from liveness items, armed only with a limit
        self.stats.liveness_checks += 1
        if shard is None or not shard.connected:
            why = "sidecar did not answer" if shard is None else "recorder disconnected"
            e.progress_at = now
        else:
            if shard.last_step_time_ns is None:
                stale = now - e.started  # never stepped since it started: as old as the watch
            else:
                stale = max(0.0, (wall_ns + self.skew_ns(e.source) - shard.last_step_time_ns) / NS)
            if stale >= limit:
                e.fired = True
                return Fire(e, BudgetReason.LIVENESS, limit, stale, True), ""
            why = "shard stepping"
            self.stats.liveness_cleared += 1
            e.progress_at = max(e.progress_at, now - stale)
        if e.state in _ADMITTED:
            e.live_armed = True
            self._push(max(e.progress_at + limit, now + min(limit, 1.0)), _LIVENESS, e)
        return None, why

    def _push(self, when: float, kind: int, e: Entry) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, e))


def group_by_engine(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    """Suspects by the engine of their latest accounting: one GetShards per engine answers them all."""
    out: dict[str, list[Entry]] = {}
    for e in entries:
        out.setdefault("" if e.msg is None else e.msg.engine_id, []).append(e)
    return out


def group_by_source(entries: Iterable[Entry]) -> dict[tuple[str, str], list[Entry]]:
    """Suspects by (sidecar, engine): in a fleet, GetShards goes to the sidecar that reported them."""
    out: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        out.setdefault((e.source, "" if e.msg is None else e.msg.engine_id), []).append(e)
    return out


def shard_lookup(shards: Iterable[ShardStatus]) -> Callable[[str, int], ShardStatus | None]:
    table = {(s.engine_id, s.shard): s for s in shards}
    return lambda engine_id, shard: table.get((engine_id, shard))
