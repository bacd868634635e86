"""Prefill storms: runs of prefill chunks of one request that stall other requests.

Every request that prefills starts a *run* (its consecutive prefill steps on its
shard). The ledger tells the tracker, per step, how much blame each prefilling entry
caused and who the victims were. When a run's summed caused blame crosses the storm
threshold it becomes a storm: the shard's ``current_storm`` and an
``InterferenceView`` STARTED; while it grows, ONGOING at most once per second (of
step time); ENDED when the request stops prefilling — a step includes it without
prefill, it finishes, or its shard runs two steps without its prefill.

A warning comes before all this: when a request is admitted on a LOCKSTEP engine and the
cost model predicts its prefill will stall the other shards' running requests past the
threshold (``Ledger._predict_storm``), a PREDICTED event carries the predicted figures
(prefill tokens still to compute, victims running elsewhere now, their summed predicted
stall), before its first chunk runs. No run state is kept for it: if the storm happens,
STARTED follows as usual.

Victim counts are distinct requests since the run began, tracked with a per-slot mark
(``SlotColumns.victim_mark``); two storms sharing victims at the same time may count
a victim twice, which is acceptable for a visibility figure.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from enginetime.sidecar.ledger.store import Request, SlotColumns
from enginetime.sidecar.ledger.trace import MARK_STORM_ENDED, MARK_STORM_STARTED, Mark, add_mark
from enginetime.sidecar.ledger.views import InterferencePhase, InterferenceView, StormView

if TYPE_CHECKING:
    from enginetime.sidecar.ledger.shards import ShardState

ONGOING_INTERVAL_NS = 1_000_000_000
#: A run ends after its shard ran this many steps without its prefill.
MISSES_TO_END = 2


class PrefillRun:
    __slots__ = (
        "req",
        "shard",
        "run_id",
        "start_ns",
        "last_end_ns",
        "chunks",
        "tokens",
        "caused_ns",
        "misses",
        "victim_shards",
        "victims",
        "storm",
        "last_emit_ns",
        "emitted_caused",
    )

    def __init__(self, req: Request, shard: ShardState, run_id: int, start_ns: int) -> None:
        self.req = req
        self.shard = shard  # ShardState
        self.run_id = run_id
        self.start_ns = start_ns
        self.last_end_ns = start_ns
        self.chunks = 0
        self.tokens = 0
        self.caused_ns = 0.0
        self.misses = 0
        self.victim_shards: set[int] = set()
        self.victims = 0
        self.storm = False
        self.last_emit_ns = 0
        self.emitted_caused = 0.0

    def storm_view(self) -> StormView:
        return StormView(
            request_id=self.req.request_id,
            shard=self.shard.shard,
            prefill_tokens=self.tokens,
            prompt_tokens=self.req.prompt_tokens,
            chunks=self.chunks,
            start_time_ns=self.start_ns,
            stall_ns=round(self.caused_ns),
        )


class StormTracker:
    """Owns the prefill runs of every shard and the interference event queue."""

    def __init__(self, cols: SlotColumns, threshold_ns: float, max_events: int = 10_000) -> None:
        self.cols = cols
        self.threshold_ns = float(threshold_ns)
        self.runs: dict[int, PrefillRun] = {}  # by slot
        self.events: deque[InterferenceView] = deque(maxlen=max_events)
        self.storms_started = 0
        self._next_run_id = 0

    # ---- per step ----------------------------------------------------------------------
    def chunk(self, req: Request, shard: ShardState, tokens: int, start_ns: int, end_ns: int) -> PrefillRun:
        """A prefill chunk of ``req`` ran in a step on ``shard``."""
        run = self.runs.get(req.slot)
        if run is None:
            self._next_run_id += 1
            run = PrefillRun(req, shard, self._next_run_id, start_ns)
            self.runs[req.slot] = run
            shard.runs[req.slot] = run
            self.cols.in_run[req.slot] = True
        run.chunks += 1
        run.tokens += tokens
        run.misses = 0
        run.last_end_ns = end_ns
        return run

    def caused(
        self,
        run: PrefillRun,
        amount_ns: float,
        victims: list[np.ndarray],
        victim_shards: set[int],
        end_ns: int,
    ) -> None:
        """Record blame ``run``'s request caused in one step and the victims it hit."""
        if amount_ns <= 0.0:
            return
        run.caused_ns += amount_ns
        run.victim_shards |= victim_shards
        mark = self.cols.victim_mark
        rid = run.run_id
        for v in victims:
            if v.size:
                new = v[mark[v] != rid]
                run.victims += int(new.size)
                mark[new] = rid
        if not run.storm:
            if run.caused_ns >= self.threshold_ns:
                run.storm = True
                self.storms_started += 1
                run.last_emit_ns = end_ns
                run.emitted_caused = run.caused_ns
                self._emit(run, InterferencePhase.STARTED, 0)
        elif end_ns - run.last_emit_ns >= ONGOING_INTERVAL_NS and run.caused_ns > run.emitted_caused:
            run.last_emit_ns = end_ns
            run.emitted_caused = run.caused_ns
            self._emit(run, InterferencePhase.ONGOING, 0)

    def shard_step(self, shard: ShardState, prefilled_slots: set[int], end_ns: int) -> None:
        """After a step of ``shard``: runs whose request did not prefill in it count a miss."""
        if not shard.runs:
            return
        for slot, run in list(shard.runs.items()):
            if slot in prefilled_slots:
                continue
            run.misses += 1
            if run.misses >= MISSES_TO_END:
                self.end(slot, run.last_end_ns)

    def end(self, slot: int, end_ns: int) -> None:
        """The request in ``slot`` stopped prefilling (decoded, finished, evicted, missed steps)."""
        run = self.runs.pop(slot, None)
        if run is None:
            return
        run.shard.runs.pop(slot, None)
        self.cols.in_run[slot] = False
        if run.storm:
            self._emit(run, InterferencePhase.ENDED, end_ns or run.last_end_ns)

    def end_shard(self, shard: ShardState, end_ns: int) -> None:
        for slot in list(shard.runs):
            self.end(slot, end_ns)

    def predicted(
        self,
        req: Request,
        shard: ShardState,
        *,
        prefill_tokens: int,
        stall_ns: int,
        victims: int,
        victim_shards: tuple[int, ...],
        time_ns: int,
    ) -> None:
        """A storm warning at admission (PREDICTED): the figures are the cost model's, not measured."""
        self.events.append(
            InterferenceView(
                phase=InterferencePhase.PREDICTED,
                engine_id=shard.engine_id,
                aggressor_request_id=req.request_id,
                aggressor_shard=shard.shard,
                aggressor_session_id=req.session_id,
                prefill_tokens=prefill_tokens,
                chunks=0,
                victim_shards=victim_shards,
                victim_requests=victims,
                victim_ns=stall_ns,
                start_time_ns=time_ns,
                end_time_ns=0,
                cross_shard=bool(victim_shards),
            )
        )

    # ---- views -------------------------------------------------------------------------
    def current(self, shard: ShardState) -> StormView | None:
        """The shard's largest ongoing storm, if any."""
        best = None
        for run in shard.runs.values():
            if run.storm and (best is None or run.caused_ns > best.caused_ns):
                best = run
        return best.storm_view() if best is not None else None

    def take(self) -> list[InterferenceView]:
        out = list(self.events)
        self.events.clear()
        return out

    def _emit(self, run: PrefillRun, phase: InterferencePhase, end_ns: int) -> None:
        shard_no = run.shard.shard
        view = InterferenceView(
            phase=phase,
            engine_id=run.shard.engine_id,
            aggressor_request_id=run.req.request_id,
            aggressor_shard=shard_no,
            aggressor_session_id=run.req.session_id,
            prefill_tokens=run.tokens,
            chunks=run.chunks,
            victim_shards=tuple(sorted(run.victim_shards)),
            victim_requests=run.victims,
            victim_ns=round(run.caused_ns),
            start_time_ns=run.start_ns,
            end_time_ns=end_ns,
            cross_shard=any(s != shard_no for s in run.victim_shards),
        )
        self.events.append(view)
        # The aggressor's span shows its storms as events (sidecar.tracing).
        if phase == InterferencePhase.STARTED:
            add_mark(run.req, Mark(MARK_STORM_STARTED, run.start_ns, storm=view))
        elif phase == InterferencePhase.ENDED:
            add_mark(run.req, Mark(MARK_STORM_ENDED, view.end_time_ns, storm=view))
