"""Fan-out: ledger changes -> every streaming subscriber, without slowing ingest.

One publisher step (``FanOut.publish``, run every ~50 ms beside the ledger
tick) takes the ids the ledger changed (``take_changed``, whose only consumer is
this module) and the interference events, and offers them to every subscriber.
Offering is cheap and never waits: a request subscriber keeps a bounded
*pending* map keyed by request id, so a request that changes 100 times before
its subscriber sends is sent once, with its latest figures (counted as
``coalesced``). Each subscriber's RPC handler sends at its own interval.

The figures are read from the ledger when a subscriber sends, through a
per-cycle cache: a request's view is built and converted to protobuf at most
once per publish cycle, shared by every subscriber that sends in that cycle,
and a subscriber that never sends costs one dict insert per change. Filters on
figures (state, shard, session, engine) are checked on those views at send
time, so offering stays an id-only operation. Building views is the expensive
part (~25 us a request); it runs within a budget of loop time per publish
period — what ingest left idle, never less than ``min_share`` — so under
saturation subscribers get coarser batches while ingest keeps its pace.

A subscriber whose pending map overflows, or whose write does not complete
within the lag limit (the client stopped reading), is cut off by its handler
with RESOURCE_EXHAUSTED; nothing a subscriber does can block the ledger or the
ingest path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from enginetime.sidecar import convert
from enginetime.sidecar.views import InterferencePhase, InterferenceView, RequestQuery, RequestView
from enginetime.v1 import accounting_pb2 as pb

log = logging.getLogger("enginetime.sidecar.fanout")

#: Publish period: how often changes are collected from the ledger.
PUBLISH_PERIOD_S = 0.05
#: Views built between checks of the loop-time budget.
_BUILD_CHUNK = 64


@dataclass(slots=True)
class FanOutLimits:
    """Per-subscriber bounds.

    max_pending: request ids (or interference events) a subscriber may have
    waiting before it is cut off. lag_limit_s: how long one write may stay
    blocked before the subscriber is cut off; None = max(10 intervals, 5 s).
    min_share: see below.
    """

    max_pending: int = 100_000
    lag_limit_s: float | None = None
    #: Least share of the event loop that building views for subscribers may use when ingest is
    #: saturated; otherwise it gets what ingest leaves idle.
    min_share: float = 0.25

    def lag_limit(self, interval_s: float) -> float:
        if self.lag_limit_s is not None:
            return self.lag_limit_s
        return max(10.0 * interval_s, 5.0)


class _Subscriber:
    """Common state: a wake-up event, a close reason and an overflow flag."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.overflow = False
        #: Set by FanOut.close(): why the stream must end (shutdown).
        self.closed: str | None = None
        self._wake = asyncio.Event()

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
    """A WatchRequest or StreamUpdates stream: the ids changed since it last sent."""

    def __init__(self, query: RequestQuery, max_pending: int) -> None:
        super().__init__(max_pending)
        self.query = query
        #: Only these ids (None: any id).
        self.ids: frozenset[str] | None = query.request_ids or None
        #: The filter looks at figures (state, shard, ...), not just the id: checked when sending.
        by_figures = query.states or query.shard is not None or query.session_id or query.engine_id
        self.view_filter: RequestQuery | None = query if by_figures else None
        self.pending: dict[str, None] = {}
        self.coalesced = 0

    def _has_work(self) -> bool:
        return bool(self.pending)

    def offer(self, request_id: str) -> None:
        pending = self.pending
        if request_id in pending:
            self.coalesced += 1
            return
        if len(pending) >= self.max_pending:
            self.overflow = True
            self._wake.set()
            return
        pending[request_id] = None
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
            if v.phase != InterferencePhase.ENDED:
                self._following.add(key)
            return True
        return False

    def offer(self, event: pb.InterferenceEvent) -> None:
        if len(self.queue) >= self.max_pending:
            self.overflow = True
        else:
            self.queue.append(event)
        self._wake.set()

    def drain(self) -> list[pb.InterferenceEvent]:
        events = list(self.queue)
        self.queue.clear()
        return events


class FanOut:
    """Collects ledger changes and hands them to subscribers; see the module doc."""

    def __init__(self, ledger, limits: FanOutLimits | None = None) -> None:
        self.ledger = ledger
        self.limits = limits or FanOutLimits()
        self.request_subscribers: set[RequestSubscriber] = set()
        self.interference_subscribers: set[InterferenceSubscriber] = set()
        #: request id -> (view, message), built this publish cycle; cleared by publish().
        self._cache: dict[str, tuple[RequestView, pb.RequestAccounting]] = {}
        self._closed: str | None = None
        self.cycles = 0
        self.cut_off = 0
        #: Cumulative seconds ingest spent decoding and feeding the ledger (set by the Sidecar).
        self.ingest_busy_s: Callable[[], float] | None = None
        self.share = 1.0
        self._budget_s = PUBLISH_PERIOD_S
        self._last_refill = time.perf_counter()
        self._last_busy = 0.0
        self._cycle = asyncio.Event()  # set (and replaced) by every publish

    def _refill(self) -> None:
        """Grant this period's loop time to building views: what ingest left idle, at least min_share."""
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
        sub = RequestSubscriber(query, self.limits.max_pending)
        sub.closed = self._closed
        self.request_subscribers.add(sub)
        return sub

    def subscribe_interference(self, flt: InterferenceFilter) -> InterferenceSubscriber:
        sub = InterferenceSubscriber(flt, self.limits.max_pending)
        sub.closed = self._closed
        self.interference_subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self.request_subscribers.discard(sub)  # type: ignore[arg-type]
        self.interference_subscribers.discard(sub)  # type: ignore[arg-type]

    @property
    def subscribers(self) -> int:
        return len(self.request_subscribers) + len(self.interference_subscribers)

    def close(self, reason: str) -> None:
        """Ask every stream to end (sidecar shutdown); new subscribers end at once."""
        self._closed = reason
        self._cycle.set()
        for sub in (*self.request_subscribers, *self.interference_subscribers):
            sub.closed = reason
            sub._wake.set()

    # -- publishing ----------------------------------------------------------------------

    def publish(self) -> None:
        """Take the ledger's changes and offer them to every subscriber. Never blocks."""
        self.cycles += 1
        self._cache.clear()
        self._refill()
        ledger = self.ledger
        changed = ledger.take_changed()
        events = ledger.take_interference()
        if changed and self.request_subscribers:
            self._offer_changes(changed)
        if events and self.interference_subscribers:
            messages = [convert.interference_to_proto(v) for v in events]
            for sub in self.interference_subscribers:
                for v, msg in zip(events, messages, strict=True):
                    if sub.matches(v):
                        sub.offer(msg)

    def _offer_changes(self, changed: set[str]) -> None:
        for sub in self.request_subscribers:
            offer = sub.offer
            for rid in changed if sub.ids is None else (changed & sub.ids):
                offer(rid)

    async def build(
        self, request_ids: list[str], view_filter: RequestQuery | None = None
    ) -> list[tuple[RequestView, pb.RequestAccounting]]:
        """``current()`` for many ids, within the fan-out's share of the event loop.

        Works in chunks; when the share of this publish period is spent it waits
        for the next period, so however many subscribers want however many
        requests, ingest keeps the rest of the core (see FanOutLimits.min_share).
        Ids whose latest figures fail ``view_filter`` are dropped.
        """
        out: list[tuple[RequestView, pb.RequestAccounting]] = []
        for i in range(0, len(request_ids), _BUILD_CHUNK):
            await self._within_budget()
            started = time.perf_counter()
            for v, m in self.current(request_ids[i : i + _BUILD_CHUNK]):
                if view_filter is None or view_filter.matches(v):
                    out.append((v, m))
            self._budget_s -= time.perf_counter() - started
            await asyncio.sleep(0)  # let ingest callbacks that became ready run in between
        return out

    async def snapshot(self, query: RequestQuery) -> list[tuple[RequestView, pb.RequestAccounting]]:
        """Every request matching ``query`` now (a stream's first batch), within the budget.

        Pages through ``ledger.query`` so that even 100k matching requests never
        hold the loop for long; an arrival during paging may show up twice, never
        not at all (newest-first order only shifts older requests further back).
        """
        out: list[tuple[RequestView, pb.RequestAccounting]] = []
        offset = 0
        page = 4 * _BUILD_CHUNK
        while True:
            await self._within_budget()
            started = time.perf_counter()
            views = self.ledger.query(query, limit=page, offset=offset)
            out.extend((v, convert.request_to_proto(v)) for v in views)
            self._budget_s -= time.perf_counter() - started
            if len(views) < page:
                return out
            offset += len(views)
            await asyncio.sleep(0)

    async def _within_budget(self) -> None:
        while self._budget_s <= 0.0 and self._closed is None:
            await self._cycle.wait()

    def current(self, request_ids: list[str]) -> list[tuple[RequestView, pb.RequestAccounting]]:
        """View and message of each id the ledger still holds (evicted ids are skipped).

        Built at most once per publish cycle and shared by every subscriber that
        sends in that cycle; a change made since is offered again by the next
        publish, so nothing is lost, it is at most one cycle old.
        """
        cache = self._cache
        get = self.ledger.get
        out = []
        for rid in request_ids:
            hit = cache.get(rid)
            if hit is None:
                v = get(rid)
                if v is None:
                    continue
                hit = cache[rid] = (v, convert.request_to_proto(v))
            out.append(hit)
        return out
