"""Fan-out: ledger changes -> every streaming subscriber, without slowing ingest.

Every publish (``FanOut.publish``, every 25 ms beside the ledger tick) takes
the slots the ledger changed and encodes, once, the ``RequestAccounting`` bytes
of those a subscriber is about to take (all of them while a subscriber to every
request is due within a period and not blocked in a write; otherwise only those
whose ids someone follows, the rest staying marked changed in the ledger), with
``accounting_wire``'s vectorised encoder (~3 us a request instead of ~20 us for
a view plus a protobuf object). The bytes go into a shared *latest* map (request id -> the
cycle it last changed, its framed bytes, state) and the cycle's ids into a
short *log*. Nothing is encoded, copied or parsed per subscriber:

* a subscriber that follows **ids** keeps a bounded *pending* set of its ids
  that changed (an id changing in many cycles before it sends is sent once,
  with its latest bytes, and counted as ``coalesced``) and, when it sends,
  looks each one up in the latest map;
* a subscriber that follows **every request** (optionally filtered by state,
  shard, session or engine) remembers the last cycle it sent and, when it sends,
  takes the log's ids since then, each once at its latest cycle. Subscribers
  sending in the same cycle from the same cycle share that list and, unfiltered,
  the response bodies themselves.

Responses are the frames joined (``MAX_RESPONSE_BYTES`` at most each) plus a
few bytes of the response's own fields, written as bytes through a pass-through
serializer (``service.add_to_server``).

The log and the latest map keep only cycles some subscriber has not sent yet
(at most ``max_log_entries`` ids): a subscriber that falls further behind than
that is cut off with RESOURCE_EXHAUSTED (it follows every request) or gets its
missing ids encoded on demand (it follows ids). Encoding runs within a budget
of loop time per publish period — what ingest left idle, never less than
``min_share`` — and what does not fit is handed back to the ledger for the next
cycle, so under saturation subscribers get coarser batches while ingest keeps
its pace. A subscriber whose write stays blocked past the lag limit (its client
stopped reading) is cut off by its handler; nothing a subscriber does can
block the ledger or the ingest path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress, repeat

import numpy as np

from enginetime.sidecar.api import convert
from enginetime.sidecar.config import FanOutLimits
from enginetime.sidecar.ledger.protocols import ChangeFeed
from enginetime.sidecar.ledger.views import (
    AmbiguousRequestError,
    InterferencePhase,
    InterferenceView,
    RequestQuery,
    RequestView,
)
from enginetime.v1 import accounting_pb2 as pb

log = logging.getLogger("enginetime.sidecar.api.fanout")

#: Publish period: how often changes are collected from the ledger.
PUBLISH_PERIOD_S = 0.025
#: Largest StreamUpdatesResponse sent; a batch is split into as many responses as it takes.
#: Staying below HTTP/2's initial 64 KiB flow-control window matters: when a client stops
#: reading, a response bigger than its window is stuck half-sent, and a status sent after
#: it never reaches the client (grpc 1.8x) — the cut-off would leave the client hanging.
MAX_RESPONSE_BYTES = 32 * 1024
#: Rows encoded between checks of the loop-time budget (snapshots).
_BUILD_CHUNK = 512

#: latest-map entry: (cycle it last changed in, framed RequestAccounting bytes, state, Request)
Entry = tuple[int, bytes, int, object]
_REQUEST_ID = operator.attrgetter("request_id")


class _Subscriber:
    """Common state: a wake-up event, a close reason and an overflow flag."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.overflow = False
        #: Set by FanOut.close(): why the stream must end (shutdown).
        self.closed: str | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()  # set with overflow or closed: ends a pause at once

    def end(self, *, overflow: bool = False, closed: str | None = None) -> None:
        """Mark the subscriber as one whose stream must end, and wake its handler whatever it awaits."""
        if overflow:
            self.overflow = True
        if closed is not None:
            self.closed = closed
        self._stop.set()
        self._wake.set()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (the stream's interval) unless the stream must end sooner."""
        if seconds <= 0 or self.closed is not None or self.overflow:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    def _has_work(self) -> bool:
        raise NotImplementedError

    async def wait(self, timeout: float | None = None) -> None:
        """Return when there is something to send, the subscriber must end, or after ``timeout``."""
        if self._has_work() or self.closed is not None or self.overflow:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()


class RequestSubscriber(_Subscriber):
    """A WatchRequest or StreamUpdates stream.

    Following ids: ``pending`` holds its ids that changed since it last sent.
    Following every request: ``dirty`` says a publish encoded something since.
    Either way ``cycle`` is the last publish cycle whose changes it has taken.
    """

    def __init__(self, query: RequestQuery, max_pending: int, cycle: int) -> None:
        super().__init__(max_pending)
        self.query = query
        #: Only these ids (None: any id).
        self.ids: frozenset[str] | None = query.request_ids or None
        #: The filter looks at figures (state, shard, ...), not just the id: checked when sending.
        by_figures = query.states or query.shard is not None or query.session_id or query.engine_id
        self.view_filter: RequestQuery | None = query if by_figures else None
        self.pending: set[str] = set()
        self.dirty = False
        self.cycle = cycle
        self.coalesced = 0
        #: Set by the stream's handler: the monotonic time its next batch may be taken, and
        #: whether a write is in progress. The publisher encodes for subscribers to everything
        #: only while one of them is about to take (a blocked or resting one costs nothing).
        self.due_at = 0.0
        self.writing = False

    def _has_work(self) -> bool:
        return bool(self.pending) or self.dirty

    def offer(self, changed: set[str]) -> None:
        """Ids of this subscriber changed in this publish (``ids`` subscribers only)."""
        pending = self.pending
        mine = self.ids.intersection(changed)  # type: ignore[union-attr]
        if not mine:
            return
        before = len(pending)
        pending |= mine
        self.coalesced += before + len(mine) - len(pending)
        if len(pending) > self.max_pending:
            self.end(overflow=True)
        self._wake.set()

    def drain(self) -> list[str]:
        ids = list(self.pending)
        self.pending.clear()
        return ids


@dataclass(frozen=True, slots=True)
class InterferenceFilter:
    engine_id: str = ""
    shard: int | None = None
    min_stall_ns: int = 0


class InterferenceSubscriber(_Subscriber):
    """A StreamInterference stream: events in order, filtered per subscriber.

    An event passes when its victims' summed time reached ``min_stall_ns``, or
    when an earlier event of the same storm passed (so a subscriber that saw a
    storm start also sees it grow and end).
    """

    def __init__(self, flt: InterferenceFilter, max_pending: int) -> None:
        super().__init__(max_pending)
        self.filter = flt
        self.queue: deque[pb.InterferenceEvent] = deque()
        self._following: set[tuple] = set()

    def _has_work(self) -> bool:
        return bool(self.queue)

    def matches(self, v: InterferenceView) -> bool:
        f = self.filter
        if f.engine_id and v.engine_id != f.engine_id:
            return False
        if f.shard is not None and v.aggressor_shard != f.shard and f.shard not in v.victim_shards:
            return False
        key = (v.engine_id, v.aggressor_request_id, v.aggressor_shard, v.start_time_ns)
        if key in self._following:
            if v.phase == InterferencePhase.ENDED:
                self._following.discard(key)
            return True
        if v.victim_ns >= f.min_stall_ns:
            # A warning (PREDICTED) is not followed: a STARTED after it passes on its own figures.
            # (PREDICTED is the largest phase: a mutant's "<" for "!=" agrees, hence the pragma.)
            phase = v.phase
            if phase != InterferencePhase.ENDED and phase != InterferencePhase.PREDICTED:  # pragma: no mutate
                self._following.add(key)
            return True
        return False

    def offer(self, event: pb.InterferenceEvent) -> None:
        if len(self.queue) >= self.max_pending:
            self.end(overflow=True)
        else:
            self.queue.append(event)
        self._wake.set()

    def drain(self) -> list[pb.InterferenceEvent]:
        events = list(self.queue)
        self.queue.clear()
        return events


def batches(frames: list[bytes]) -> list[bytes]:
    """Frames joined into response bodies of at most MAX_RESPONSE_BYTES (one frame may exceed it)."""
    out: list[bytes] = []
    start = size = 0
    for i, frame in enumerate(frames):
        n = len(frame)
        if size and size + n > MAX_RESPONSE_BYTES:
            out.append(b"".join(frames[start:i]))
            start, size = i, 0
        size += n
    if start < len(frames):
        out.append(b"".join(frames[start:]))
    return out


def _passes(q: RequestQuery, entry: Entry) -> bool:
    req = entry[3]
    shard = req.shard  # type: ignore[attr-defined]
    return q.accepts(req.request_id, entry[2], shard.engine_id, shard.shard, req.session_id)  # type: ignore[attr-defined]


class FanOut:
    """Collects ledger changes and hands them to subscribers; see the module doc."""

    def __init__(self, ledger: ChangeFeed, limits: FanOutLimits | None = None) -> None:
        self.ledger = ledger
        self.limits = limits or FanOutLimits()
        self.request_subscribers: set[RequestSubscriber] = set()
        self.interference_subscribers: set[InterferenceSubscriber] = set()
        self._by_ids: set[RequestSubscriber] = set()
        self._every: set[RequestSubscriber] = set()
        #: ids followed by some ``ids`` subscriber -> how many follow it
        self._wanted: dict[str, int] = {}
        self._latest: dict[str, Entry] = {}
        self._log: deque[tuple[int, list[str]]] = deque()
        self._log_entries = 0
        #: Highest cycle dropped from the log (subscribers behind it missed changes).
        self._trimmed = 0
        #: This cycle, per "changed since cycle N": (rows, ids counted) and the unfiltered response
        #: bodies, shared by every subscriber that takes from the same N (cleared by publish).
        self._ranges: dict[int, tuple[list[Entry], int]] = {}
        self._bodies: dict[int, list[bytes]] = {}
        #: request id -> (view, message) for WatchRequest, built this publish cycle.
        self._cache: dict[tuple[str, str], tuple[RequestView, pb.RequestAccounting]] = {}
        self._closed: str | None = None
        self.cycles = 0
        self.cut_off = 0  # streams cut off for not reading (service.py counts, /metrics shows)
        #: Requests encoded, and requests deferred to a later cycle by the time budget.
        self.encoded = 0
        self.deferred = 0
        #: First slot of the next cycle's share when the budget does not cover every change:
        #: each cycle starts where the last one stopped, so a request whose neighbours with
        #: lower slots change every cycle is still sent within a few cycles, never starved.
        #: (Slots are >= 0: a start of -1 or 0 finds the same first slot.)
        self._next_slot = 0  # pragma: no mutate
        #: Cumulative seconds ingest spent decoding and feeding the ledger (set by the Sidecar).
        self.ingest_busy_s: Callable[[], float] | None = None
        self.share = 1.0
        self._budget_s = PUBLISH_PERIOD_S
        self._row_s = 5e-6  # measured cost of encoding one request (moving average)
        self._last_refill = time.perf_counter()
        self._last_busy = 0.0
        self._cycle = asyncio.Event()  # set (and replaced) by every publish

    def _refill(self) -> None:
        """Grant this period's loop time to encoding: what ingest left idle, at least min_share."""
        now = time.perf_counter()
        elapsed = now - self._last_refill
        self._last_refill = now
        busy = self.ingest_busy_s() if self.ingest_busy_s is not None else 0.0
        ingest_share = (busy - self._last_busy) / elapsed if elapsed > 0 else 0.0
        self._last_busy = busy
        # Generous while ingest is light, min_share once it is heavy (its demand is hard to see
        # exactly: an engine blocked on a full socket looks idle, so err on ingest's side).
        share = max(self.limits.min_share, 1.0 - 3.0 * ingest_share)
        self.share = share
        self._budget_s = min(self._budget_s + share * elapsed, share * PUBLISH_PERIOD_S)
        cycle, self._cycle = self._cycle, asyncio.Event()
        cycle.set()

    # -- subscriptions -------------------------------------------------------------------

    def subscribe_requests(self, query: RequestQuery) -> RequestSubscriber:
        sub = RequestSubscriber(query, self.limits.max_pending, self.cycles)
        sub.closed = self._closed
        self.request_subscribers.add(sub)
        if sub.ids is None:
            self._every.add(sub)
        else:
            self._by_ids.add(sub)
            wanted = self._wanted
            for rid in sub.ids:
                wanted[rid] = wanted.get(rid, 0) + 1
        return sub

    def subscribe_interference(self, flt: InterferenceFilter) -> InterferenceSubscriber:
        sub = InterferenceSubscriber(flt, self.limits.max_pending)
        sub.closed = self._closed
        self.interference_subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self.interference_subscribers.discard(sub)
        if sub not in self.request_subscribers:
            return
        self.request_subscribers.discard(sub)
        self._every.discard(sub)
        if sub in self._by_ids:
            self._by_ids.discard(sub)
            wanted = self._wanted
            for rid in sub.ids or ():
                n = wanted.get(rid, 0) - 1
                if n > 0:
                    wanted[rid] = n
                else:
                    wanted.pop(rid, None)
        if not self.request_subscribers:
            self._forget()

    @property
    def closing(self) -> bool:
        """close() was called: the sidecar is shutting down."""
        return self._closed is not None

    @property
    def subscribers(self) -> int:
        return len(self.request_subscribers) + len(self.interference_subscribers)

    def close(self, reason: str) -> None:
        """Ask every stream to end (sidecar shutdown); new subscribers end at once."""
        self._closed = reason
        self._cycle.set()
        for sub in (*self.request_subscribers, *self.interference_subscribers):
            sub.end(closed=reason)

    # -- publishing ----------------------------------------------------------------------

    def publish(self) -> None:
        """Encode the ledger's changes once and tell the subscribers they are there. Never blocks."""
        self.cycles += 1
        self._cache.clear()
        self._ranges.clear()
        self._bodies.clear()
        self._refill()
        ledger = self.ledger
        slots = ledger.take_changed_slots()
        if self.request_subscribers and slots.size:
            self._publish_requests(slots)
        for sub in self._by_ids:
            if not sub.pending:
                sub.cycle = self.cycles  # nothing outstanding: it needs no older cycle
        self._trim()
        events = ledger.take_interference()
        if events and self.interference_subscribers:
            messages = [convert.interference_to_proto(v) for v in events]
            for isub in self.interference_subscribers:
                for v, msg in zip(events, messages, strict=True):
                    if isub.matches(v):
                        isub.offer(msg)

    def _every_due(self) -> bool:
        """Whether a subscriber to everything may take within the next publish period."""
        soon = time.monotonic() + PUBLISH_PERIOD_S
        return any(not sub.writing and sub.due_at <= soon for sub in self._every)

    def _publish_requests(self, slots: np.ndarray) -> None:
        ledger = self.ledger
        reqs = ledger.requests_at(slots)
        ids = list(map(_REQUEST_ID, reqs))
        if not self._every_due():  # only what some subscriber follows by id, for now
            keep = np.fromiter(map(self._wanted.__contains__, ids), dtype=bool, count=len(ids))
            if not keep.all():
                if self._every:  # the rest waits, still marked changed, until one of them is due
                    ledger.mark_changed(slots[~keep])
                slots = slots[keep]
                reqs = list(compress(reqs, keep.tolist()))
                ids = list(compress(ids, keep.tolist()))
            if not slots.size:
                return
        fits = max(_BUILD_CHUNK, int(self._budget_s / self._row_s))
        if slots.size > fits:
            # Round robin over the slots (ascending from the ledger): rotate them to start at the
            # first slot the last deferral left out, then hand the tail back for the next cycle.
            start = int(np.searchsorted(slots, self._next_slot))
            if start:
                slots = np.concatenate((slots[start:], slots[:start]))
                reqs, ids = reqs[start:] + reqs[:start], ids[start:] + ids[:start]
            ledger.mark_changed(slots[fits:])
            self.deferred += int(slots.size - fits)
            self._next_slot = int(slots[fits - 1]) + 1
            slots, reqs, ids = slots[:fits], reqs[:fits], ids[:fits]
        started = time.perf_counter()
        frames = ledger.encode(slots, reqs)
        spent = time.perf_counter() - started
        self._budget_s -= spent
        self._row_s = 0.8 * self._row_s + 0.2 * spent / slots.size
        self.encoded += slots.size
        cycle = self.cycles
        self._latest.update(zip(ids, zip(repeat(cycle), frames, ledger.states_of(slots), reqs), strict=True))
        self._log.append((cycle, ids))
        self._log_entries += len(ids)
        if self._by_ids:
            changed = set(ids)
            for sub in self._by_ids:
                sub.offer(changed)
        for sub in self._every:
            sub.dirty = True
            sub._wake.set()

    def _trim(self) -> None:
        """Drop log cycles every subscriber has taken, and the oldest past max_log_entries."""
        if not self._log:
            return
        horizon = min((sub.cycle for sub in self.request_subscribers), default=self.cycles)
        log_, latest = self._log, self._latest
        limit = self.limits.max_log_entries or 0
        while log_ and (log_[0][0] <= horizon or self._log_entries > limit):
            cycle, ids = log_.popleft()
            self._log_entries -= len(ids)
            self._trimmed = cycle
            for rid in ids:
                entry = latest.get(rid)
                if entry is not None and entry[0] == cycle:
                    del latest[rid]
        if self._trimmed > horizon:
            for sub in self._every:
                if sub.cycle < self._trimmed:
                    sub.end(overflow=True)

    def _forget(self) -> None:
        self._log.clear()
        self._latest.clear()
        self._log_entries = 0
        self._trimmed = self.cycles

    # -- taking --------------------------------------------------------------------------

    def take(self, sub: RequestSubscriber) -> list[bytes]:
        """The response bodies of what changed for ``sub`` since it last took (may be empty)."""
        cycle = self.cycles
        if sub.ids is not None:
            rows = self._rows_for_ids(sub.drain())
            sub.cycle = cycle
            if sub.view_filter is not None:
                rows = [e for e in rows if _passes(sub.view_filter, e)]
            return batches([e[1] for e in rows])
        sub.dirty = False
        if sub.cycle < self._trimmed:
            sub.end(overflow=True)
            return []
        since = sub.cycle
        rows, counted = self._rows_since(since)
        sub.coalesced += counted - len(rows)
        sub.cycle = cycle
        if sub.view_filter is not None:
            return batches([e[1] for e in rows if _passes(sub.view_filter, e)])
        bodies = self._bodies.get(since)
        if bodies is None:
            bodies = self._bodies[since] = batches([e[1] for e in rows])
        return bodies

    def _rows_since(self, since: int) -> tuple[list[Entry], int]:
        """Each id changed after cycle ``since``, once, at its latest; and the ids counted."""
        hit = self._ranges.get(since)
        if hit is not None:
            return hit
        latest = self._latest
        rows: list[Entry] = []
        counted = 0
        for cycle, ids in reversed(self._log):
            if cycle <= since:
                break
            counted += len(ids)
            for rid in ids:
                entry = latest.get(rid)
                if entry is not None and entry[0] == cycle:
                    rows.append(entry)
        rows.reverse()  # oldest change first, as they happened
        self._ranges[since] = (rows, counted)
        return rows, counted

    def _rows_for_ids(self, ids: list[str]) -> list[Entry]:
        latest = self._latest
        rows: list[Entry] = []
        missing: list[str] = []
        for rid in ids:
            entry = latest.get(rid)
            if entry is None:
                missing.append(rid)
            else:
                rows.append(entry)
        if missing:  # fell out of the log (a very slow subscriber): encode them now
            rows += self._encode_ids(missing)
        return rows

    def _encode_ids(self, ids: list[str]) -> list[Entry]:
        ledger = self.ledger
        slots = ledger.slots_of(ids)
        reqs = ledger.requests_at(slots)
        return list(zip(repeat(self.cycles), ledger.encode(slots, reqs), ledger.states_of(slots), reqs))

    async def initial(self, query: RequestQuery) -> list[bytes]:
        """Response bodies of a stream's first batch, built within the loop-time budget.

        Every request matching ``query`` (for named ids: each the sidecar holds),
        newest arrival first. A request that changes while this is built is sent
        again in a later batch: it may show up twice, never not at all; one evicted
        meanwhile is left out.
        """
        ledger = self.ledger
        ids = ledger.ids_of(ledger.select(query))
        frames: list[bytes] = []
        for i in range(0, len(ids), _BUILD_CHUNK):
            await self._within_budget()
            started = time.perf_counter()
            frames += ledger.encode(ledger.slots_of(ids[i : i + _BUILD_CHUNK]))
            self._budget_s -= time.perf_counter() - started
            # Let ingest callbacks that became ready run in between (any delay <= 0 is one yield).
            await asyncio.sleep(0)  # pragma: no mutate
        return batches(frames)

    async def _within_budget(self) -> None:
        while self._budget_s <= 0.0 and self._closed is None:
            await self._cycle.wait()

    def current(
        self, request_ids: list[str], engine_id: str = ""
    ) -> list[tuple[RequestView, pb.RequestAccounting]]:
        """View and message of each id the ledger still holds (evicted ids are skipped).

        For WatchRequest: built at most once per publish cycle and shared by every
        watcher that sends in that cycle; a change made since is offered again by
        the next publish, so nothing is lost, it is at most one cycle old. Ids are
        looked up in ``engine_id`` (a bare id that several engines hold is skipped).
        """
        cache = self._cache
        get = self.ledger.get
        out = []
        for rid in request_ids:
            key = (engine_id, rid)
            hit = cache.get(key)
            if hit is None:
                try:
                    v = get(rid, engine_id)
                except AmbiguousRequestError:
                    continue
                if v is None:
                    continue
                hit = cache[key] = (v, convert.request_to_proto(v))
            out.append(hit)
        return out
