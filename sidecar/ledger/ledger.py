"""The ledger: turns engine steps and request events into per-request accounting.

Inputs are decoded ingest frames (``records``); outputs are immutable snapshots
(``views``). Single-threaded: one asyncio loop drives it, so there are no locks.

Attribution (DESIGN §6) per step ``s`` of shard ``k`` with measured duration ``d``
and entries ``i`` whose predicted marginal costs are ``e_i`` (``costmodel``), with
``P = β0 + Σe`` the step's predicted duration:

* **own work** ``w``: INDEPENDENT ``w = d``. LOCKSTEP: the steps of one
  ``global_step`` form a group (``ledger_join``); the *critical* shard is the one
  with the largest predicted ``P`` (most tokens while the model is uncalibrated; a
  missing shard's ``peer_tokens`` can make it critical); it gets ``w = d``, every
  other shard ``w = min(d, P)`` — except shards predicted within 5 %
  (``ledger_attribution.CRITICAL_BAND``) of the critical one, which did not wait for
  it and also get ``w = d``. ``wait = d − w`` is time spent waiting for the critical
  shard. A step without entries (IDLE) has ``w = 0``: all of it is wait.
  A decode-only critical shard whose complete group measured over
  ``attribution.UNDERPRICED`` times its prediction while another shard prefilled means
  the model underpriced that prefill (an extrapolation): ``reprice_prefill`` scales it
  up to the measured step, so the prefilling shard is critical and its step is the one
  fitted (docs/ARCHITECTURE.md item 21).
* **layered wait split**: shard j's wait is caused by every shard predicted heavier
  than j; ``by[j, k]`` is k's part, the Shapley value of the max (each layer between
  consecutive predicted durations is shared equally by the shards at or above it;
  ``attribution.layered_shares``). Shards tied at the top are charged the step's
  expected own work under the engine's learnt jitter (``costmodel.TieNoise``); the
  rest of their step is their own noise.
* **gpu_time**: ``w`` is split over the step's entries in proportion to their
  predicted cost (``e_i`` plus an even share of β0); ``by[j, k]`` is charged to shard
  k's prefill entries by predicted prefill cost; when k ran no prefill (decode
  imbalance) and for tied shards' noise it goes to the waiting shard's
  ``imbalance_ns``. Wait with nobody to charge (critical shard missing) goes to the
  waiting shard's ``unattributed_ns``. So the shares of every step plus those buckets
  sum to its ``d`` exactly (conservation, tested).
* **engine_time** of entry i: ``w − (w/P)·(predicted prefill cost of the OTHER
  entries)`` — the step without other requests' prefill and without the wait.
  **interference** = ``d − engine_time``: the others' prefill (blamed on those
  requests, same shard) plus the wait (blamed cross-shard on each heavier shard's
  prefill entries by its layered part and their predicted cost, or on that shard
  itself as a pseudo-aggressor ``""`` when its work was decode or it is missing).
* **excluded steps**: every request RUNNING on shard k that already had a step and
  is not in ``s`` adds ``d`` to its interference, blamed on ``s``'s entries by
  predicted cost (``w`` part, same shard) and on the critical shard (wait part).
  Requests that were SCHEDULED but never stepped are still in their queue time, so
  counting excluded steps for them would count the same wall time twice.
* Per step only the top ``NAMED_PER_STEP`` aggressors of each cause are named; the
  rest is lumped into the shard's pseudo-aggressor, so a 256-entry batch never
  creates 256×256 blame entries. Each victim keeps at most ``4·top_blame``
  aggressors (``SlotColumns.add_blame``).

Lockstep imbalance: when the critical shard ran only decode, the other shards' wait
is still interference (DESIGN §2: "the wait for a slower coupled shard"), blamed on
the critical shard as pseudo-aggressor ``""`` — no single request caused it, and an
engine-time budget should not be spent on a peer's batch size. It is small in
practice (``min(d, P)`` is the shard's own predicted decode).

Per-request identity: ``wall = queue + engine_time + interference + other``. Views
clamp so that the identity is exact in integer ns and every term is ≥ 0, giving
priority in this order: engine_time (clamped to wall), queue_time (to what remains),
interference (to what remains); ``other`` is the remainder. With one clock on one
host the clamps do not bite: steps of a shard do not overlap, excluded steps only
count after the first step, and queue time ends at the first step's start. Preempted
time lands in ``other`` (a preempted request is not an excluded-step victim).

Where things live: ``ledger_attribution`` (the per-group arithmetic),
``ledger_join`` (lockstep grouping), ``ledger_store`` (slots, columns, blame table),
``ledger_shards`` (connections, handle maps, models), ``ledger_storms`` (storm
detection and interference events), ``costmodel`` (the step-cost model).
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np

from enginetime.engine_hooks.constants import Coupling, EventKind, StepKind
from enginetime.sidecar.config import LedgerConfig
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger import advice
from enginetime.sidecar.ledger.accounting_wire import encode as encode_accounting
from enginetime.sidecar.ledger.attribution import (
    Batch,
    Division,
    Prediction,
    divide,
    predict,
    reprice_prefill,
    step_scalars,
)
from enginetime.sidecar.ledger.costmodel import CostModel, step_features, warm_up
from enginetime.sidecar.ledger.join import Group
from enginetime.sidecar.ledger.modelstate import ModelStateFile, dump_model, model_key
from enginetime.sidecar.ledger.shards import EngineState, ShardState, append_in_window
from enginetime.sidecar.ledger.store import (
    ABORTED,
    EMPTY,
    FINISHED,
    PREEMPTED,
    QUEUED,
    RUNNING,
    SLOT_BITS,
    SLOT_MASK,
    Request,
    SlotColumns,
)
from enginetime.sidecar.ledger.storms import StormTracker
from enginetime.sidecar.ledger.trace import (
    MARK_PREEMPTED,
    MARK_RESUMED,
    Mark,
    RequestTrace,
    add_mark,
    mark_tuple,
    record_to_trace,
)
from enginetime.sidecar.ledger.views import (
    AmbiguousRequestError,
    BlameView,
    InterferenceView,
    RequestQuery,
    RequestState,
    RequestView,
    ShardView,
)

log = logging.getLogger(__name__)

ShardKey = tuple[str, int]

#: Aggressors named per cause per step; the rest is lumped on the shard's pseudo-aggressor.
NAMED_PER_STEP = 3
_TERMINAL = (FINISHED, ABORTED)
_STATES = {int(s): s for s in RequestState}
_REQUEST_ID = operator.attrgetter("request_id")


def _clamped(
    arrival: int, end: int, engine: float, first_start: int, interf: float
) -> tuple[int, int, int, int]:
    """(wall, engine_time, queue_time, interference) with wall = the rest + other, every term >= 0."""
    wall = end - arrival if end > arrival else 0
    eng = min(max(round(engine), 0), wall)
    queue = first_start - arrival if first_start >= 0 else wall
    queue = min(max(queue, 0), wall - eng)
    return wall, eng, queue, min(max(round(interf), 0), wall - eng - queue)


@dataclass
class LedgerCounters:
    """Cumulative counts (all ints) of what the ledger saw and what it could not account."""

    steps: int = 0  # step records attributed
    entries: int = 0  # entries in those steps
    events: int = 0  # request events received
    unknown_handles: int = 0  # steps/events naming a handle never announced
    partial_requests: int = 0  # requests marked partial (each once)
    evicted_active: int = 0  # live requests evicted to stay under max_requests
    evicted_finished: int = 0  # finished requests evicted to stay under max_requests
    expired_finished: int = 0  # finished requests dropped after retention_s
    lockstep_groups: int = 0  # LOCKSTEP groups attributed
    lockstep_timeouts: int = 0  # groups attributed without every shard after the bounded wait
    seq_gaps: int = 0  # step sequence gaps (dropped steps)
    reported_drops: int = 0  # frames the recorders reported dropping (heartbeats)
    late_steps: int = 0  # LOCKSTEP steps whose group was already attributed
    unjoined_steps: int = 0  # LOCKSTEP steps without global_step (attributed alone)
    invalid_steps: int = 0  # malformed step records skipped
    duplicate_entries: int = 0  # a handle twice in one step (recorder bug): extra copies dropped
    unknown_events: int = 0  # terminal events for unknown handles (nothing to account)
    handle_reuses: int = 0  # ARRIVED on a handle whose request never ended (its end was lost)
    engine_restarts: int = 0  # a shard reconnected with a new recorder epoch
    engines_forgotten: int = 0  # idle engines forgotten to admit a new engine id (forget_idle_engine)
    forgotten_requests: int = 0  # requests those engines still held, dropped with them
    storms: int = 0  # storms started
    storms_predicted: int = 0  # admissions whose predicted prefill stall crossed the storm threshold
    model_fits: int = 0  # cost-model refits
    unattributed_ns: int = 0  # device time no request could be charged with


#: What a forgotten engine's shard leaves in the shard table until a new shard takes its
#: place: never connected, so listings skip it, and no request or blame names its index.
_FORGOTTEN = ShardState(EngineState("", int(Coupling.INDEPENDENT), 1, CostModel(), 0), -1, -1, CostModel())


class Ledger:
    """Attribution, cost models, lockstep join and the bounded request store."""

    def __init__(self, config: LedgerConfig | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        self.config = config or LedgerConfig()
        cfg = self.config
        self._clock = clock
        self.counters = LedgerCounters()
        self._cols = SlotColumns(min(1024, cfg.max_requests + 16), 4 * cfg.top_blame)
        self._reqs: list[Request | None] = []
        self._by_id: dict[str, Request] = {}  # request id -> its newest request, any engine
        # request id -> {engine id: that engine's newest request with the id}: a request is
        # (engine_id, request_id), and two engines sharing a sidecar may use the same ids.
        self._by_engine_id: dict[str, dict[str, Request]] = {}
        self._active: dict[int, Request] = {}  # rid -> live request, creation order
        self._finished: deque[Request] = deque()  # terminal requests, finish order
        self._n_finished = 0
        self._sessions: dict[str, dict[int, Request]] = {}  # session_id -> {rid: request}
        self._session_shard: dict[tuple[str, str], int] = {}  # (engine, session) -> shard of last turn
        self._engines: dict[str, EngineState] = {}
        self._shards: dict[ShardKey, ShardState] = {}
        self._shard_table: list[ShardState] = []
        self._free_shard_indices: list[int] = []  # table positions of forgotten engines' shards
        self._forget_listeners: list[Callable[[str], None]] = []
        # evicted aggressor -> (id, shard idx, arrival ns, traceparent)
        self._ghosts: OrderedDict[int, tuple[str, int, int, str]] = OrderedDict()
        #: Called with a request's key when it reaches FINISHED/ABORTED (see add_terminal_listener).
        self._terminal_listeners: list[Callable[[int], None]] = []
        self._storms = StormTracker(self._cols, cfg.storm_threshold_s * 1e9)
        self._version = 0
        self._stamp_base = 1
        #: The rest of lockstep groups' attribution that ``on_step(pause=...)`` stopped between
        #: two phases (``resume``); every other entry point that changes the ledger resumes it
        #: to the end first, so nothing runs between two phases of a group.
        self._parked: Iterator[bool] | None = None
        # Scratch passed from _blame to _track_storms within one attribution (_phases):
        # shard position -> (the victims waiting for it, their shard numbers).
        self._wait_victims: dict[int, tuple[np.ndarray, set[int]]] = {}
        self._wait_ns = int(cfg.lockstep_wait_s * 1e9)
        self._retention_ns = int(cfg.retention_s * 1e9)
        self._rate_ns = max(1, int(cfg.rate_window_s * 1e9))
        self._model_state = ModelStateFile(cfg.model_state_path) if cfg.model_state_path else None
        self._state_every_ns = int(cfg.model_state_interval_s * 1e9)
        self._state_saved_ns = clock()
        warm_up()

    # =====================================================================================
    # connections
    # =====================================================================================
    def connect(self, hello: Hello) -> ShardKey:
        """First frame of a connection: register (or re-register) the shard it speaks for."""
        if self._parked is not None:
            self.resume()
        if not hello.engine_id:
            raise ValueError(
                "EngineHello has no engine_id: set ENGINETIME engine id in the hooks (e.g. the "
                "server's host:port) so the sidecar can tell engines apart"
            )
        num = max(1, int(hello.num_shards))
        if not 0 <= int(hello.shard) < num:
            raise ValueError(
                f"EngineHello shard {hello.shard} is outside 0..{num - 1} (num_shards={num}): "
                "the adapter reports a wrong DP rank or shard count"
            )
        coupling = int(hello.coupling) or int(Coupling.INDEPENDENT)
        eng = self._engines.get(hello.engine_id)
        if eng is None:
            eng = EngineState(hello.engine_id, coupling, num, self._new_model(), self._wait_ns)
            self._engines[hello.engine_id] = eng
        else:
            eng.coupling = coupling
            eng.num_shards = num
        shard = self._shard_state(eng, int(hello.shard))
        if shard.ever_connected and hello.recorder_epoch != shard.epoch:
            self._restart(shard, hello.wall_time_ns or self._clock())
        shard.connected = True
        shard.ever_connected = True
        eng.left_ns = 0
        shard.epoch = hello.recorder_epoch
        shard.coupling = coupling
        shard.engine_kind = hello.engine_kind
        shard.engine_version = hello.engine_version
        shard.hooks_version = hello.hooks_version
        shard.device_name = hello.device_name
        shard.timer_source = int(hello.timer_source)
        if self._model_state is not None:
            self._restore_models(eng, shard)
        eng.refresh_expected()
        self._enforce_bound()
        return (eng.engine_id, shard.shard)

    def live_requests(self, key: ShardKey) -> int:
        """Live (not yet finished) requests of one shard (ingest's per-shard limit)."""
        shard = self._shards.get(key)
        return len(shard.live) if shard is not None else 0

    def census(self, engine_id: str = "", shard: int = -1) -> tuple[int, int, bool, bool]:
        """Engine ids and shards the ledger holds state for, and whether it knows these two."""
        return (
            len(self._engines),
            len(self._shards),
            engine_id in self._engines,
            (engine_id, shard) in self._shards,
        )

    def _model_keys(self, eng: EngineState, shard: ShardState) -> tuple[str, str]:
        """(the engine's LOCKSTEP model key, the shard's own model key) for the state file."""
        common = (eng.engine_id, shard.engine_kind, shard.device_name, int(eng.coupling), eng.num_shards)
        return model_key(*common, -1), model_key(*common, shard.shard)

    def _restore_models(self, eng: EngineState, shard: ShardState) -> None:
        """Warm start: load the saved models this hello matches, into models that saw nothing."""
        state = self._model_state
        assert state is not None
        eng_key, shard_key = self._model_keys(eng, shard)
        if eng.lockstep and eng.model.observations == 0 and state.restore(eng_key, eng.model, eng.noise):
            log.info("engine %s: cost model restored from %s", eng.engine_id, state.path)
        if not eng.lockstep and shard.model.observations == 0 and state.restore(shard_key, shard.model):
            log.info(
                "engine %s shard %d: cost model restored from %s", eng.engine_id, shard.shard, state.path
            )

    def save_models(self) -> None:
        """Write every cost model to ``--model-state`` (periodically from ``tick``, and at shutdown)."""
        state = self._model_state
        if state is None:
            return
        if self._parked is not None:
            self.resume()
        out = {}
        for eng in self._engines.values():
            for shard in eng.shards.values():
                if not shard.ever_connected:
                    continue
                eng_key, shard_key = self._model_keys(eng, shard)
                if eng.lockstep:
                    if eng.model.observations:
                        out[eng_key] = dump_model(eng.model, eng.noise)
                elif shard.model.observations:
                    out[shard_key] = dump_model(shard.model)
        state.save(out)
        self._state_saved_ns = self._clock()

    def disconnect(self, key: ShardKey) -> None:
        if self._parked is not None:
            self.resume()
        shard = self._shards.get(key)
        if shard is None:
            return
        shard.connected = False
        eng = shard.engine
        eng.refresh_expected()
        if not eng.expected():
            eng.left_ns = max(1, self._clock())
        if eng.join.pending:
            for group, timed_out in eng.join.release_ready():
                self._attribute_group(eng, group, timed_out)
            self._enforce_bound()

    def _restart(self, shard: ShardState, time_ns: int) -> None:
        """New recorder epoch: the engine process restarted; its live requests are gone."""
        self.counters.engine_restarts += 1
        shard.restart_ns = time_ns
        self._release_held(shard, everything=True)
        for req in list(shard.live.values()):
            self._mark_partial(req)
            self._terminate(req, ABORTED, time_ns, "engine restarted")
        self._storms.end_shard(shard, time_ns)
        shard.reset_stream()
        # A new process numbers global_step from scratch: attribute what is pending with
        # the old numbering, then start the join over (its peers restart alongside).
        eng = shard.engine
        for group, timed_out in eng.join.flush():
            self._attribute_group(eng, group, timed_out)
        eng.join.reset()

    def _shard_state(self, eng: EngineState, no: int) -> ShardState:
        key = (eng.engine_id, no)
        shard = self._shards.get(key)
        if shard is None:
            if self._free_shard_indices:
                index = self._free_shard_indices.pop()
                shard = ShardState(eng, no, index, self._new_model())
                self._shard_table[index] = shard
            else:
                shard = ShardState(eng, no, len(self._shard_table), self._new_model())
                self._shard_table.append(shard)
            self._shards[key] = shard
            eng.shards[no] = shard
        return shard

    def forget_idle_engine(self, keep: str = "") -> tuple[str, int] | None:
        """Forget one engine none of whose shards is connected, to make room for a new one.

        Picks the engine whose last shard left longest ago and drops it with every request
        it still holds (finished ones kept for ``--retention`` included; counted in
        ``forgotten_requests``); its cost models stay in the model-state file. Returns (its
        id, requests dropped), or None when every engine has a shard connected. Ingest calls
        it when a new engine id would pass ``--max-engines`` or ``--max-shards``: engines
        that come and go under fresh ids (short-lived rollout engines on random ports) must
        not lock later ones out, and an engine that is connected is never forgotten. ``keep``
        (the newcomer's own engine id, when it reconnects with a new shard) is not forgotten.
        """
        if self._parked is not None:
            self.resume()
        idle = [e for e in self._engines.values() if e.left_ns and not e.expected() and e.engine_id != keep]
        if not idle:
            return None
        eng = min(idle, key=lambda e: e.left_ns)
        now = self._clock()
        shards = list(eng.shards.values())
        indices = np.array([sh.index for sh in shards], dtype=np.int32)
        cols = self._cols
        used = cols.used
        held = np.flatnonzero(cols.alive[:used] & np.isin(cols.shard_idx[:used], indices))
        for slot in held.tolist():
            req = self._reqs[slot]
            if req is not None:
                self._evict(req)
        gone = set(indices.tolist())
        for rid in [rid for rid, ghost in self._ghosts.items() if ghost[1] in gone]:
            del self._ghosts[rid]  # nobody left can name them: their victims were this engine's
        for key in [key for key in self._session_shard if key[0] == eng.engine_id]:
            del self._session_shard[key]
        for sh in shards:
            self._storms.end_shard(sh, now)
            del self._shards[(eng.engine_id, sh.shard)]
            self._shard_table[sh.index] = _FORGOTTEN
            self._free_shard_indices.append(sh.index)
        del self._engines[eng.engine_id]
        self.counters.engines_forgotten += 1
        self.counters.forgotten_requests += held.size
        for listener in self._forget_listeners:
            listener(eng.engine_id)
        return eng.engine_id, int(held.size)

    def add_forget_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(engine_id)`` when ``forget_idle_engine`` forgets an engine (metrics
        drop its series). Runs inside ingest's admission: O(1)-ish and must not raise."""
        self._forget_listeners.append(listener)

    def _new_model(self) -> CostModel:
        return CostModel(self.config.model_window, self.config.refit_every)

    def _shard(self, key: ShardKey) -> ShardState:
        shard = self._shards.get(key)
        if shard is None or not shard.ever_connected:
            raise KeyError(
                f"no EngineHello for engine {key[0]!r} shard {key[1]}: call Ledger.connect() with "
                "the connection's first frame before passing its events and steps"
            )
        return shard

    # =====================================================================================
    # heartbeats and events
    # =====================================================================================
    def on_heartbeat(self, key: ShardKey, beat: Beat) -> None:
        if self._parked is not None:
            self.resume()
        shard = self._shard(key)
        shard.dropped_frames = int(beat.dropped_frames)
        total = max(int(beat.dropped_frames), int(beat.dropped_steps) + int(beat.dropped_events))
        if total > shard.drops_seen:
            self.counters.reported_drops += total - shard.drops_seen
            self._mark_shard_partial(shard)
        shard.drops_seen = max(shard.drops_seen, total)

    def on_event(self, key: ShardKey, ev: Event) -> None:
        if self._parked is not None:
            self.resume()
        shard = self._shard(key)
        self.counters.events += 1
        if (
            int(ev.kind) != EventKind.ARRIVED
            and shard.engine.lockstep
            and (shard.held or (shard.last_seq is not None and _seq(shard.done_seq) < shard.last_seq))
        ):
            # The shard's earlier steps still wait in the lockstep join: a FINISHED applied now
            # would end the request (and a storm) before its last step is attributed.
            shard.held.append((_seq(shard.last_seq), ev))
            return
        self._apply_event(shard, ev)

    def _release_held(self, shard: ShardState, everything: bool = False) -> None:
        """Apply the held events whose preceding steps have all been attributed."""
        held = shard.held
        done = _seq(shard.done_seq)
        while held and (everything or held[0][0] <= done):
            self._apply_event(shard, held.popleft()[1])

    def _apply_event(self, shard: ShardState, ev: Event) -> None:
        kind = int(ev.kind)
        if kind == EventKind.ARRIVED:
            self._arrived(shard, ev)
            self._enforce_bound()
            return
        slot = shard.slot_of(int(ev.handle))
        req = self._reqs[slot] if slot >= 0 else None
        if req is None:
            self.counters.unknown_handles += 1
            if kind in (EventKind.FINISHED, EventKind.ABORTED) or kind not in EventKind._value2member_map_:
                self.counters.unknown_events += 1
                return
            req = self._create(
                shard, int(ev.handle), ev.request_id or self._anon_id(shard, ev.handle), int(ev.time_ns)
            )
            self._mark_partial(req)
        elif (
            ev.request_id
            and req.request_id != ev.request_id
            and req.request_id == self._anon_id(shard, ev.handle)
        ):
            # Its ARRIVED was lost (it finished while the sidecar was away, so the recorder no
            # longer re-announces it) and steps created it nameless: every event names it.
            self._rename(req, ev.request_id)
        cols = self._cols
        slot = req.slot
        state = int(cols.state[slot])
        if state in _TERMINAL:
            return
        if kind == EventKind.SCHEDULED or kind == EventKind.RESUMED:
            if ev.cached_tokens:  # engines learn prefix-cache hits when they admit the request
                req.cached_tokens = cols.cached[slot] = int(ev.cached_tokens)
            if state == PREEMPTED:
                # A new run: the one the preemption ended keeps its first decoding step in the mark.
                add_mark(req, Mark(MARK_RESUMED, int(ev.time_ns), int(cols.decode_start[slot])))
                cols.decode_start[slot] = -1
                cols.resumed_at[slot] = int(ev.time_ns)
            cols.state[slot] = RUNNING
            if cols.first_start[slot] >= 0:
                self._set_running(req, True)
            elif state == QUEUED and shard.engine.lockstep:
                self._predict_storm(shard, req, int(ev.time_ns))
        elif kind == EventKind.PREEMPTED:
            if state != PREEMPTED:
                req.preemptions += 1
                add_mark(req, Mark(MARK_PREEMPTED, int(ev.time_ns)))
            cols.state[slot] = PREEMPTED
            self._set_running(req, False)
            if cols.in_run[slot]:
                self._storms.end(slot, int(ev.time_ns))
        elif kind == EventKind.FINISHED or kind == EventKind.ABORTED:
            if ev.output_tokens:
                req.output_tokens = int(ev.output_tokens)
            reason = ev.finish_reason or ("abort" if kind == EventKind.ABORTED else "")
            self._terminate(req, FINISHED if kind == EventKind.FINISHED else ABORTED, int(ev.time_ns), reason)
            self._enforce_bound()
            return
        else:
            self.counters.unknown_events += 1
        self._touch(slot)
        self._enforce_bound()

    def _pending_prefill(self, req: Request) -> tuple[int, int]:
        """(tokens still to prefill, tokens already in its context) of a live request (0, x: none)."""
        cols = self._cols
        slot = req.slot
        prompt = req.prompt_tokens or int(cols.prompt[slot])
        done = int(cols.cached[slot]) + int(cols.prefilled[slot])
        return max(0, prompt - done), done

    def _predicted_stall(self, shard: ShardState, req: Request, running_total: int) -> tuple[float, float]:
        """(predicted prefill ns, predicted stall ns on the other lockstep shards) of ``req``'s
        remaining prefill: the Advise rule (``advice``), prefill × requests running elsewhere."""
        eng = shard.engine
        if not eng.lockstep or not eng.model.calibrated:
            return 0.0, 0.0
        todo, done = self._pending_prefill(req)
        if todo <= 0:
            return 0.0, 0.0
        pf = eng.model.prefill_cost(float(todo), float(done))
        return pf, pf * (running_total - len(shard.running))

    def _predict_storm(self, shard: ShardState, req: Request, time_ns: int) -> None:
        """A request is admitted on a LOCKSTEP engine: warn (PREDICTED) when its prefill is
        predicted to stall the other shards' running requests past the storm threshold."""
        eng = shard.engine
        others = [sh for sh in eng.shards.values() if sh is not shard and sh.connected and sh.running]
        running_total = len(shard.running) + sum(len(sh.running) for sh in others)
        pf, stall = self._predicted_stall(shard, req, running_total)
        if stall < self._storms.threshold_ns:
            return
        todo, _ = self._pending_prefill(req)
        self.counters.storms_predicted += 1
        self._storms.predicted(
            req,
            shard,
            prefill_tokens=todo,
            stall_ns=round(stall),
            victims=running_total - len(shard.running),
            victim_shards=tuple(sorted(sh.shard for sh in others)),
            time_ns=time_ns,
        )

    def _arrived(self, shard: ShardState, ev: Event) -> None:
        handle = int(ev.handle)
        request_id = ev.request_id or self._anon_id(shard, handle)
        slot = shard.slot_of(handle)
        existing = self._reqs[slot] if slot >= 0 else None
        if existing is not None and int(self._cols.state[slot]) in _TERMINAL:
            existing = None
        if ev.replayed and existing is not None and existing.request_id == request_id:
            req = existing
            self._mark_partial(req)
        else:
            if existing is not None:
                # The handle is reused while its request never ended: its end was lost.
                self.counters.handle_reuses += 1
                self._mark_partial(existing)
                self._terminate(existing, ABORTED, int(ev.time_ns), "lost (handle reused)")
            req = self._create(shard, handle, request_id, int(ev.time_ns))
            if ev.replayed:
                self._mark_partial(req)
            self._note_session(req, ev.session_id, ev.routed_shard)
        cols = self._cols
        if ev.prompt_tokens:
            req.prompt_tokens = cols.prompt[req.slot] = int(ev.prompt_tokens)
        if ev.cached_tokens:
            req.cached_tokens = cols.cached[req.slot] = int(ev.cached_tokens)
        if ev.traceparent:
            req.traceparent = ev.traceparent
        self._touch(req.slot)

    def _note_session(self, req: Request, session_id: str, routed_shard: int | None) -> None:
        shard = req.shard
        if routed_shard is not None:
            req.routed_shard = int(routed_shard)
            if int(routed_shard) != shard.shard:
                req.migrated = True
        if not session_id:
            return
        session_id = sys.intern(session_id)
        req.session_id = session_id
        key = (shard.engine_id, session_id)
        last = self._session_shard.pop(key, None)
        if last is not None and last != shard.shard:
            req.migrated = True
        self._session_shard[key] = shard.shard
        if len(self._session_shard) > self.config.max_requests:
            self._session_shard.pop(next(iter(self._session_shard)))
        self._sessions.setdefault(session_id, {})[req.rid] = req

    # =====================================================================================
    # request lifecycle
    # =====================================================================================
    @staticmethod
    def _anon_id(shard: ShardState, handle: int) -> str:
        return f"{shard.engine_id}/{shard.shard}#{int(handle)}"

    def _rename(self, req: Request, request_id: str) -> None:
        self._unindex(req)
        req.request_id = request_id
        self._index(req)
        self._mark_partial(req)
        self._touch(req.slot)

    def _create(self, shard: ShardState, handle: int, request_id: str, arrival_ns: int) -> Request:
        cols = self._cols
        slot = cols.alloc()
        req = Request(cols.rid(slot), slot, request_id, shard, handle, arrival_ns)
        if slot == len(self._reqs):
            self._reqs.append(req)
        else:
            self._reqs[slot] = req
        cols.arrival[slot] = arrival_ns
        cols.shard_idx[slot] = shard.index
        self._index(req)
        self._active[req.rid] = req
        shard.live[slot] = req
        shard.map_handle(handle, slot)
        return req

    def _index(self, req: Request) -> None:
        """The newest request with an id answers for it (per engine, and overall)."""
        self._by_id[req.request_id] = req
        self._by_engine_id.setdefault(req.request_id, {})[req.shard.engine_id] = req

    def _unindex(self, req: Request) -> None:
        rid = req.request_id
        if self._by_id.get(rid) is req:
            del self._by_id[rid]
        held = self._by_engine_id.get(rid)
        if held is not None:
            eng = req.shard.engine_id
            if held.get(eng) is req:
                del held[eng]
            if not held:
                del self._by_engine_id[rid]
            elif rid not in self._by_id:
                self._by_id[rid] = max(held.values(), key=lambda r: r.arrival_ns)

    def find(self, request_id: str, engine_id: str = "") -> Request | None:
        """The request ``request_id`` (of ``engine_id`` when given); None when not held.

        Raises ``AmbiguousRequestError`` for a bare id that several engines hold.
        """
        held = self._by_engine_id.get(request_id)
        if not held:
            return None
        if engine_id:
            return held.get(engine_id)
        if len(held) > 1:
            raise AmbiguousRequestError(request_id, list(held))
        return next(iter(held.values()))

    def request_end(self, request_id: str, engine_id: str) -> tuple[int, bool] | None:
        """``(key, ended)`` for ``engine_id``'s request ``request_id``; None when not held.

        ``key`` is what terminal listeners are called with, so a caller waiting for the
        request to end (Advise's ``after_request_id``) can wait for that one key.
        """
        req = self.find(request_id, engine_id)
        if req is None or req.slot < 0:
            return None
        return req.rid, int(self._cols.state[req.slot]) in _TERMINAL

    def engines_holding(self, request_id: str) -> list[str]:
        """Engines holding a request with this id (sorted)."""
        return sorted(self._by_engine_id.get(request_id, ()))

    def _touch(self, slot: int) -> None:
        self._version += 1
        self._cols.version[slot] = self._version
        self._cols.changed[slot] = True

    def _mark_partial(self, req: Request) -> None:
        if not req.partial:
            req.partial = True
            self.counters.partial_requests += 1
            if req.slot >= 0:
                self._touch(req.slot)

    def _mark_shard_partial(self, shard: ShardState) -> None:
        for req in shard.live.values():
            self._mark_partial(req)

    def _set_running(self, req: Request, running: bool) -> None:
        slot = req.slot
        self._cols.running[slot] = running
        if running:
            req.shard.add_running(slot)
        else:
            req.shard.drop_running(slot)

    def _terminate(self, req: Request, state: int, time_ns: int, reason: str) -> None:
        slot = req.slot
        cols = self._cols
        cols.state[slot] = state
        req.finish_ns = time_ns
        req.finish_reason = sys.intern(reason) if reason else ""
        self._set_running(req, False)
        req.shard.live.pop(slot, None)
        self._active.pop(req.rid, None)
        self._finished.append(req)
        self._n_finished += 1
        append_in_window(req.shard.ends, (time_ns, state == ABORTED), time_ns - self._rate_ns)
        if cols.in_run[slot]:
            self._storms.end(slot, time_ns)
        self._touch(slot)
        for listener in self._terminal_listeners:
            listener(req.rid)

    def _evict(self, req: Request) -> None:
        slot = req.slot
        cols = self._cols
        shard = req.shard
        if cols.in_run[slot]:
            self._storms.end(slot, 0)
        if int(cols.state[slot]) in _TERMINAL:
            self._n_finished -= 1
        self._set_running(req, False)
        shard.live.pop(slot, None)
        shard.unmap_handle(req.handle, slot)
        self._unindex(req)
        self._active.pop(req.rid, None)
        if req.session_id:
            group = self._sessions.get(req.session_id)
            if group is not None:
                group.pop(req.rid, None)
                if not group:
                    del self._sessions[req.session_id]
        if cols.caused[slot] > 0.0:
            self._ghosts[req.rid] = (req.request_id, shard.index, req.arrival_ns, req.traceparent)
            if len(self._ghosts) > self.config.max_requests:
                self._ghosts.popitem(last=False)
        cols.free(slot)
        self._reqs[slot] = None
        req.slot = -1

    def _enforce_bound(self) -> None:
        limit = self.config.max_requests
        while len(self._active) + self._n_finished > limit:
            if self._n_finished > 0 and self._finished:
                req = self._finished.popleft()
                if req.slot < 0:
                    continue
                self._evict(req)
                self.counters.evicted_finished += 1
            else:
                req = next(iter(self._active.values()))
                self._evict(req)
                self.counters.evicted_active += 1

    # =====================================================================================
    # steps
    # =====================================================================================
    def on_step(self, key: ShardKey, step: Step, pause: Callable[[bool], bool] | None = None) -> None:
        """Attribute ``step`` (INDEPENDENT) or add it to its lockstep group, attributing the groups
        it completes.

        With ``pause``, the attribution of completed groups may stop after any of its parts
        (~0.1 ms apart) when ``pause(True)`` is true (``parked``; ``resume`` goes on): a group
        of 8 x 256 entries is ~0.7 ms of work, and ingest's slices use this to let a unary
        call in before the rest of it. A parked group changed nothing a reader sees before its
        accounting part, which runs whole; the shard and model aggregates follow (``_phases``).
        Inside the accounting ``pause(False)`` is called too and its answer ignored: the
        caller may give up the CPU there (to other threads of the process) but not the
        ledger. Without ``pause`` everything is attributed before this returns.
        """
        if self._parked is not None:
            self.resume()
        shard = self._shard(key)
        n = step.handles.size
        if not (
            step.prefill_tokens.size == n and step.decode_tokens.size == n and step.context_tokens.size == n
        ):
            self.counters.invalid_steps += 1
            log.warning(
                "engine %s shard %s: step seq=%s has columns of different lengths (%d handles, %d prefill,"
                " %d decode, %d context); skipped — the recorder is emitting malformed steps",
                shard.engine_id,
                shard.shard,
                step.seq,
                n,
                step.prefill_tokens.size,
                step.decode_tokens.size,
                step.context_tokens.size,
            )
            return
        last = shard.last_seq
        if last is not None and step.seq != last + 1:
            self.counters.seq_gaps += 1
            self._mark_shard_partial(shard)
        shard.last_seq = int(step.seq)
        eng = shard.engine
        if eng.lockstep:
            if step.global_step is None:
                self.counters.unjoined_steps += 1
                _run_through(self._phases(eng, [(shard, step)], complete=False, lockstep=True))
            else:
                ready, late = eng.join.add(shard, step, self._clock())
                if late:
                    self.counters.late_steps += 1
                    _run_through(self._phases(eng, [(shard, step)], complete=False, lockstep=True))
                if ready and pause is not None:
                    self._parked = self._groups(eng, ready)
                    self.resume(pause)
                    return
                for group, timed_out in ready:
                    self._attribute_group(eng, group, timed_out)
        else:
            lockstep = eng.coupling == Coupling.LOCKSTEP
            _run_through(self._phases(eng, [(shard, step)], complete=True, lockstep=lockstep))
        self._enforce_bound()

    @property
    def parked(self) -> bool:
        """Attribution stopped between two phases by ``on_step``'s ``pause`` (``resume`` it)."""
        return self._parked is not None

    def resume(self, pause: Callable[[bool], bool] | None = None) -> bool:
        """Go on with parked attribution, stopping again between phases when ``pause(True)``
        is true; True when nothing is left parked. At least one part runs per call."""
        work = self._parked
        if work is None:
            return True
        self._parked = None  # what it calls must not resume it again
        for boundary in work:
            if pause is not None and pause(boundary) and boundary:
                self._parked = work
                return False
        return True

    def _groups(self, eng: EngineState, ready: list[tuple[Group, bool]]) -> Iterator[bool]:
        for group, timed_out in ready:
            yield from self._group_phases(eng, group, timed_out)
        self._enforce_bound()

    def tick(self, now_ns: int | None = None) -> None:
        """Attribute LOCKSTEP groups whose wait expired; expire finished requests past retention."""
        if self._parked is not None:
            self.resume()
        now = self._clock() if now_ns is None else int(now_ns)
        for eng in self._engines.values():
            if eng.join.pending:
                for group, timed_out in eng.join.expire(now):
                    self._attribute_group(eng, group, timed_out)
        if self._model_state is not None and now - self._state_saved_ns >= self._state_every_ns:
            self.save_models()
        horizon = now - self._retention_ns
        fin = self._finished
        while fin and (fin[0].slot < 0 or fin[0].finish_ns <= horizon):
            req = fin.popleft()
            if req.slot >= 0:
                self._evict(req)
                self.counters.expired_finished += 1
        self._enforce_bound()

    def flush(self) -> None:
        """Attribute every pending LOCKSTEP group now (tests, shutdown)."""
        if self._parked is not None:
            self.resume()
        for eng in self._engines.values():
            for group, timed_out in eng.join.flush():
                self._attribute_group(eng, group, timed_out)
        self._enforce_bound()

    def _attribute_group(self, eng: EngineState, group: Group, timed_out: bool) -> None:
        _run_through(self._group_phases(eng, group, timed_out))

    def _group_phases(self, eng: EngineState, group: Group, timed_out: bool) -> Iterator[bool]:
        self.counters.lockstep_groups += 1
        if timed_out:
            self.counters.lockstep_timeouts += 1
        got = group.parts
        parts = [got[no] for no in sorted(got)]
        complete = len(got) >= eng.num_shards and all(no in got for no in range(eng.num_shards))
        # A group that lacks only shards which never connected (or left) still measures its
        # critical shard's own work, unless peer_tokens say an absent shard was heavier.
        fit_ok = complete or (not timed_out and eng.expected() <= got.keys())
        yield from self._phases(eng, parts, complete, lockstep=True, fit_ok=fit_ok)

    def _resolve(self, shard: ShardState, step: Step) -> np.ndarray:
        """Slots of a step's handles; unknown handles become partial requests.

        A handle whose request ended before this step started names a new request
        whose ARRIVED was lost (the recorder reused the handle): also unknown.
        """
        slots = shard.lookup(step.handles)
        if not slots.size:
            return slots
        known = slots >= 0
        if known.all():
            st = self._cols.state[slots]
            ended = (st == FINISHED) | (st == ABORTED)
        else:
            st = self._cols.state[slots[known]]
            ended = np.zeros(slots.size, dtype=bool)
            ended[known] = (st == FINISHED) | (st == ABORTED)
        if ended.any():
            start = int(step.start_time_ns)
            for i in np.flatnonzero(ended):
                req = self._live[int(slots[i])]
                if req.finish_ns < start:
                    shard.unmap_handle(req.handle, req.slot)
                    slots[i] = -1
        if slots.min() < 0:
            for i in np.flatnonzero(slots < 0):
                handle = int(step.handles[i])
                found = shard.slot_of(handle)  # an earlier duplicate in this step may have created it
                if found < 0:
                    self.counters.unknown_handles += 1
                    req = self._create(shard, handle, self._anon_id(shard, handle), int(step.start_time_ns))
                    self._mark_partial(req)
                    found = req.slot
                slots[i] = found
        return slots

    def _phases(
        self,
        eng: EngineState,
        parts: list[tuple[ShardState, Step]],
        complete: bool,
        lockstep: bool,
        fit_ok: bool | None = None,
    ) -> Iterator[bool]:
        """Attribute one step (INDEPENDENT) or one lockstep group of steps (see module docstring).

        ``complete``: every shard of the engine is in ``parts``; ``fit_ok``: the critical
        step may be fed to the cost model (defaults to ``complete``). ``_run_through`` runs
        it whole; ``yield True`` marks where ``on_step``'s ``pause`` may stop it (~0.1 ms
        apart at 8 x 256 entries), ``yield False`` a point inside the per-request phase,
        where it may not.

        Resolving handles, gathering, predicting and dividing change nothing a reader sees
        (a step's unknown handles become partial requests, as they would anyway); then every
        per-request figure of the group, whole (~0.25 ms); then what the group adds to its
        shards and storms, and to the cost model. Nothing else runs in the ledger between
        them (every other entry point first finishes parked work), so the result is the same
        as the phases run back to back.
        """
        model = eng.model if lockstep else parts[0][0].model
        slots = [self._resolve(sh, st) for sh, st in parts]
        yield True
        batch, base = self._gather(parts, slots)
        yield True
        pred = predict(batch, model)
        if lockstep and complete:
            pred = reprice_prefill(batch, pred, eng.slowdown.factor)
        critical = pred.critical
        crit_shard = parts[critical][0] if critical >= 0 else None
        if lockstep and not complete and batch.m < eng.num_shards:
            missing = self._missing_critical(eng, parts, crit_shard)
            if missing is not None:
                critical, crit_shard = -1, missing
        yield True
        div = divide(batch, pred, critical, eng.tie_factor if lockstep and complete else None)
        yield True
        if div.uncharged:
            for j in np.flatnonzero(div.wait > 0.0):
                parts[j][0].unattributed_ns += float(div.wait[j])
            self.counters.unattributed_ns += round(div.wait_total)
        elif div.by is not None:
            for j in np.flatnonzero(div.imbalance > 0.0):
                parts[j][0].imbalance_ns += float(div.imbalance[j])
        self._set_stepped_running(batch.slots)
        self._version += 1
        self._accumulate(batch, div)
        yield False
        excluded = self._excluded(parts, batch, base)
        caused = self._blame(parts, batch, pred, div, excluded, critical, crit_shard)
        self._cols.caused[batch.slots] += caused
        yield True
        self._track_storms(parts, batch, pred, excluded, caused)
        self._shard_stats(parts, batch, pred)
        yield True
        self.counters.steps += batch.m
        self.counters.entries += batch.slots.size
        for sh, st in parts:
            if sh.done_seq is None or st.seq > sh.done_seq:
                sh.done_seq = int(st.seq)
            if sh.held:
                self._release_held(sh)
        fit_j = critical if lockstep else 0
        if fit_ok is None:
            fit_ok = complete
        if fit_j >= 0 and batch.counts[fit_j] > 0 and (fit_ok or not lockstep):
            if int(parts[fit_j][1].kind) != StepKind.IDLE:
                lo, hi = int(batch.offs[fit_j]), int(batch.offs[fit_j + 1])
                x = step_features(pred.p[lo:hi], pred.q[lo:hi], pred.c[lo:hi])
                y = float(batch.d[fit_j])
                if lockstep and batch.m > 1:
                    # The step of k tied shards is the slowest of k noisy ones: learn the jitter
                    # from its scatter and fit the model on the expected own work, not the max.
                    k_top = int(np.count_nonzero(div.top_set))
                    if model.fitted and k_top >= 1 and complete:
                        top_p = float(pred.big_p[div.top_set].max())
                        if top_p > 0.0:
                            ratio = float(batch.d[div.top_set].max()) / top_p
                            eng.noise.observe(k_top, ratio / eng.slowdown.factor - 1.0)
                            if float(pred.pf_sum[div.top_set].sum()) <= 0.0:
                                eng.slowdown.observe(ratio * eng.noise.factor(k_top))
                    y *= eng.tie_factor(k_top)
                model.record(x, y)
                yield True  # a refit is ~1 ms (every refit_every groups): a part of its own
                if model.fit_if_due():
                    self.counters.model_fits += 1

    def _gather(self, parts: list[tuple[ShardState, Step]], resolved: list[np.ndarray]) -> tuple[Batch, int]:
        """Concatenate the steps' columns and their ``resolved`` slots, drop duplicate handles.

        Returns the batch and the stamp base: after this, ``stamp[slot] >= base`` marks
        exactly the slots in the batch (used to find excluded victims).
        """
        m = len(parts)
        counts = np.fromiter((st.handles.size for _, st in parts), dtype=np.int64, count=m)
        if m == 1:
            st0 = parts[0][1]
            slots = resolved[0]
            p_raw, q_raw, c_raw = st0.prefill_tokens, st0.decode_tokens, st0.context_tokens
        else:
            slots = np.concatenate(resolved)
            p_raw = np.concatenate([st.prefill_tokens for _, st in parts])
            q_raw = np.concatenate([st.decode_tokens for _, st in parts])
            c_raw = np.concatenate([st.context_tokens for _, st in parts])
        cols = self._cols  # after _resolve: arrays may have grown
        total = slots.size
        seg = np.repeat(np.arange(m), counts)
        # A handle twice in one step would make fancy-index updates lose entries: keep the last copy.
        base = self._stamp_base
        self._stamp_base += total + 1
        pos = np.arange(base, base + total, dtype=np.int64)
        cols.stamp[slots] = pos
        keep = cols.stamp[slots] == pos
        if not keep.all():
            self.counters.duplicate_entries += int(total - np.count_nonzero(keep))
            slots, p_raw, q_raw, c_raw, seg = slots[keep], p_raw[keep], q_raw[keep], c_raw[keep], seg[keep]
            counts = np.bincount(seg, minlength=m).astype(np.int64)
        d, starts, ends = step_scalars([st for _, st in parts])
        return Batch(slots, p_raw, q_raw, c_raw, seg, counts, d, starts, ends), base

    def _set_stepped_running(self, slots: np.ndarray) -> None:
        """Everyone in a step is RUNNING (unless already ended) and an excluded-step candidate."""
        cols = self._cols
        st = cols.state[slots]
        fresh = np.flatnonzero(~cols.running[slots] & (st != FINISHED) & (st != ABORTED))
        reqs = self._live
        for i in fresh:
            slot = int(slots[i])
            cols.state[slot] = RUNNING
            cols.running[slot] = True
            reqs[slot].shard.add_running(slot)

    def _accumulate(self, batch: Batch, div: Division) -> None:
        cols = self._cols
        slots, seg = batch.slots, batch.seg
        cols.engine[slots] += div.engine
        cols.interf[slots] += div.interference
        cols.gpu[slots] += div.gpu
        cols.prefilled[slots] += batch.p_raw
        cols.decoded[slots] += batch.q_raw
        cols.steps[slots] += 1
        # Phase boundaries (spans): the first step that decodes for a request in a run (since
        # its arrival or last resumption) starts the run's decode phase; the step before its
        # first decoding step sampled its first token. A step that began before the
        # resumption (held by the lockstep join until after the event) belongs to an
        # earlier run and does not count.
        new_dec = (cols.decode_start[slots] < 0) & (batch.q_raw > 0)
        if new_dec.any():
            starts = batch.starts[seg[new_dec]]
            ds = slots[new_dec]
            current = starts >= cols.resumed_at[ds]
            ds, starts = ds[current], starts[current]
            cols.decode_start[ds] = starts
            first = cols.first_token[ds] == 0
            if first.any():
                prev_end = cols.last_step[ds[first]]
                cols.first_token[ds[first]] = np.where(prev_end > 0, prev_end, starts[first])
        cols.last_step[slots] = batch.ends[seg]
        cols.version[slots] = self._version
        cols.changed[slots] = True
        new_first = cols.first_start[slots] < 0
        if new_first.any():
            cols.first_start[slots[new_first]] = batch.starts[seg][new_first]

    def _excluded(
        self, parts: list[tuple[ShardState, Step]], batch: Batch, base: int
    ) -> list[np.ndarray | None]:
        """Running requests of each shard that its step left out: each gets the step's d."""
        cols = self._cols
        excluded: list[np.ndarray | None] = [None] * batch.m
        in_step = np.bincount(batch.seg, weights=cols.running[batch.slots], minlength=batch.m)
        for j, (shard, _) in enumerate(parts):
            if len(shard.running) > in_step[j]:
                ra = shard.running_array()
                ex = ra[cols.stamp[ra] < base]
                if ex.size:
                    excluded[j] = ex
                    cols.interf[ex] += batch.d[j]
                    cols.excluded[ex] += 1
                    cols.version[ex] = self._version
                    cols.changed[ex] = True
        return excluded

    def _blame(
        self,
        parts: list[tuple[ShardState, Step]],
        batch: Batch,
        pred: Prediction,
        div: Division,
        excluded: list[np.ndarray | None],
        critical: int,
        crit_shard: ShardState | None,
    ) -> np.ndarray:
        """Record who caused each victim's interference; returns the blame each entry caused."""
        slots, seg, offs, counts = batch.slots, batch.seg, batch.offs, batch.counts
        pf, scale = pred.pf, div.scale
        rid_of = self._rid
        add_blame = self._cols.add_blame
        # (a) Other entries' prefill in the same step (same shard).
        caused = div.scale[seg] * pf * (counts[seg] - 1)
        for j in np.flatnonzero((pred.pf_sum > 0.0) & (counts > 1)).tolist():
            lo, hi = int(offs[j]), int(offs[j + 1])
            seg_pf = pf[lo:hi]
            seg_slots = slots[lo:hi]
            idx = np.flatnonzero(seg_pf > 0.0)
            top = idx[np.argsort(-seg_pf[idx], kind="stable")[:NAMED_PER_STEP]]
            sj = float(scale[j])
            named = 0.0
            for t in top:
                amt = sj * float(seg_pf[t])
                if amt > 0.0:
                    add_blame(np.delete(seg_slots, t), rid_of(int(seg_slots[t])), amt)
                named += float(seg_pf[t])
            if idx.size > top.size:
                unnamed = seg_pf.copy()
                unnamed[top] = 0.0
                lump = sj * (float(pred.pf_sum[j]) - named) - sj * unnamed
                sel = lump > 0.0
                add_blame(seg_slots[sel], parts[j][0].pseudo, lump[sel])
        # (b) Excluded victims, own-work part: the step's entries by predicted cost (same shard).
        for j in range(batch.m):
            ex = excluded[j]
            w = float(div.w[j])
            if ex is None or w <= 0.0:
                continue
            lo, hi = int(offs[j]), int(offs[j + 1])
            seg_share = div.share[lo:hi]
            top = np.argsort(-seg_share, kind="stable")[:NAMED_PER_STEP]
            named = 0.0
            for t in top:
                amt = float(seg_share[t])
                if amt > 0.0:
                    add_blame(ex, rid_of(int(slots[lo + t])), amt)
                    named += amt
            if w - named > 1e-9 * w:
                add_blame(ex, parts[j][0].pseudo, w - named)
            caused[lo:hi] += seg_share * float(ex.size)
        # (c) Lockstep waits (cross-shard): shard j's wait is caused by every heavier shard k,
        # in the layered (Shapley) parts ``div.by[j, k]``; k's part goes to its prefill entries
        # by predicted prefill cost, or to k itself (pseudo-aggressor) when it ran only decode.
        self._wait_victims = {}
        if div.wait_total <= 0.0:
            return caused
        waiting = [
            slots[int(offs[j]) : int(offs[j + 1])]
            if excluded[j] is None
            else np.concatenate([slots[int(offs[j]) : int(offs[j + 1])], excluded[j]])
            for j in range(batch.m)
        ]
        by = div.by
        if by is None:
            for j in np.flatnonzero(div.wait > 0.0).tolist():
                vs = waiting[j]
                if vs.size:
                    who = parts[j][0] if crit_shard is None else crit_shard  # None: nobody worked
                    add_blame(vs, who.pseudo, float(div.wait[j]))
            return caused
        # Waits for shards that ran only decode, and tied shards' jitter, blame no request: one
        # entry per victim on the heaviest shard (the group's pace), not one per heavier shard.
        has_pf = pred.pf_sum > 0.0
        paceless = by @ (~has_pf).astype(np.float64) + div.noise
        js = [
            j for j in np.flatnonzero(paceless > 1e-9 * np.maximum(batch.d, 1.0)).tolist() if waiting[j].size
        ]
        if js and critical >= 0:
            wv = np.concatenate([waiting[j] for j in js]) if len(js) > 1 else waiting[js[0]]
            wa = np.repeat(paceless[js], [waiting[j].size for j in js])
            add_blame(wv, parts[critical][0].pseudo, wa)
        for k in np.flatnonzero((by.sum(axis=0) > 0.0) & has_pf).tolist():
            js = [j for j in np.flatnonzero(by[:, k] > 0.0).tolist() if waiting[j].size]
            if not js:
                continue
            wv = np.concatenate([waiting[j] for j in js]) if len(js) > 1 else waiting[js[0]]
            wa = np.repeat(by[js, k], [waiting[j].size for j in js])
            agg_shard = parts[k][0]
            lo, hi = int(offs[k]), int(offs[k + 1])
            cw = div.pf_weight[lo:hi]
            idx = np.flatnonzero(cw > 0.0)
            top = idx[np.argsort(-cw[idx], kind="stable")[:NAMED_PER_STEP]]
            named = 0.0
            for t in top:
                add_blame(wv, rid_of(int(slots[lo + t])), wa * float(cw[t]))
                named += float(cw[t])
            if 1.0 - named > 1e-12:
                add_blame(wv, agg_shard.pseudo, wa * (1.0 - named))
            caused[lo:hi] += float(wa.sum()) * cw
            self._wait_victims[k] = (wv, {parts[j][0].shard for j in js})
        return caused

    def _track_storms(
        self,
        parts: list[tuple[ShardState, Step]],
        batch: Batch,
        pred: Prediction,
        excluded: list[np.ndarray | None],
        caused: np.ndarray,
    ) -> None:
        """Feed prefill runs: chunks, the blame they caused and their victims; end stopped runs."""
        storms = self._storms
        slots, seg, offs, ends = batch.slots, batch.seg, batch.offs, batch.ends
        p = pred.p
        for i in np.flatnonzero(self._cols.in_run[slots] & (p <= 0.0)):
            storms.end(int(slots[i]), int(ends[seg[i]]))  # in a step without prefill: it decodes now
        prefilled: list[set[int]] = [set() for _ in range(batch.m)]
        wait = self._wait_victims
        reqs = self._live
        for i in np.flatnonzero(p > 0.0):
            j = int(seg[i])
            shard = parts[j][0]
            slot = int(slots[i])
            prefilled[j].add(slot)
            run = storms.chunk(reqs[slot], shard, int(batch.p_raw[i]), int(batch.starts[j]), int(ends[j]))
            amount = float(caused[i])
            if amount <= 0.0:
                continue
            lo, hi = int(offs[j]), int(offs[j + 1])
            victims: list[np.ndarray] = []
            vshards: set[int] = set()
            if hi - lo > 1 and pred.pf[i] > 0.0:
                victims.append(np.delete(slots[lo:hi], i - lo))
                vshards.add(shard.shard)
            ex = excluded[j]
            if ex is not None:
                victims.append(ex)
                vshards.add(shard.shard)
            waited = wait.get(j)
            if waited is not None and pred.pf[i] > 0.0:
                victims.append(waited[0])
                vshards |= waited[1]
            storms.caused(run, amount, victims, vshards, int(ends[j]))
        for j, (shard, _) in enumerate(parts):
            if shard.runs:
                storms.shard_step(shard, prefilled[j], int(ends[j]))
        self._wait_victims = {}
        self.counters.storms = storms.storms_started

    def _shard_stats(self, parts: list[tuple[ShardState, Step]], batch: Batch, pred: Prediction) -> None:
        window = self._rate_ns
        m = batch.m
        psum = np.bincount(batch.seg, weights=pred.p, minlength=m)
        qsum = np.bincount(batch.seg, weights=pred.q, minlength=m)
        for j, (shard, _) in enumerate(parts):
            end = int(batch.ends[j])
            shard.steps += 1
            if not shard.first_step_ns:
                shard.first_step_ns = int(batch.starts[j])
            shard.last_step_ns = max(shard.last_step_ns, end)
            # Busy means steps with work of the shard's own: an IDLE lockstep step only waits for peers.
            busy = int(batch.d[j]) if batch.counts[j] else 0
            append_in_window(shard.rates, (end, busy, int(psum[j]), int(qsum[j])), end - window)

    def _missing_critical(
        self, eng: EngineState, parts: list[tuple[ShardState, Step]], crit: ShardState | None
    ) -> ShardState | None:
        """A shard absent from the group whose ``peer_tokens`` load exceeds the critical one's."""
        peers = None
        for _, st in parts:
            if st.peer_tokens.size == eng.num_shards:
                peers = st.peer_tokens
                break
        if peers is None:
            return None
        present = {sh.shard for sh, _ in parts}
        best = int(peers[crit.shard]) if crit is not None else 0
        found = None
        for no in range(eng.num_shards):
            if no not in present and int(peers[no]) > best:
                best = int(peers[no])
                found = no
        return self._shard_state(eng, found) if found is not None else None

    @property
    def _live(self) -> list[Request]:
        """``_reqs`` as read at live slots, the only ones it is indexed at through this (no None there)."""
        return cast("list[Request]", self._reqs)

    def _rid(self, slot: int) -> int:
        return (int(self._cols.gen[slot]) << SLOT_BITS) | slot

    # =====================================================================================
    # views
    # =====================================================================================
    def get(self, request_id: str, engine_id: str = "") -> RequestView | None:
        """The newest request with this id (of ``engine_id``); raises AmbiguousRequestError
        when no engine is named and several engines hold the id."""
        req = self.find(request_id, engine_id)
        if req is None:
            return None
        return self._view(req, self._clock())

    def query(self, q: RequestQuery, limit: int | None = None, offset: int = 0) -> list[RequestView]:
        """Requests matching ``q``, newest arrival first, paged by ``offset``/``limit``."""
        slots = self._select(q)
        start = max(0, int(offset))
        stop = None if limit is None else start + max(0, int(limit))
        slots = slots[start:stop]
        now = self._clock()
        reqs = self._live
        return [self._view(reqs[int(s)], now) for s in slots]

    def count(self, q: RequestQuery) -> int:
        return int(self._select(q).size)

    def _select(self, q: RequestQuery) -> np.ndarray:
        cols = self._cols
        if q.request_ids or q.session_id:
            if q.request_ids:
                cands = [
                    r for r in (self.find(i, q.engine_id) for i in sorted(q.request_ids)) if r is not None
                ]
            else:
                cands = list(self._sessions.get(q.session_id, {}).values())
            sel = np.array([r.slot for r in cands if r.slot >= 0], dtype=np.int64)
            mask = np.ones(sel.size, dtype=bool)
        else:
            used = cols.used
            sel = np.arange(used, dtype=np.int64)
            mask = cols.alive[:used].copy()
        if sel.size == 0:
            return sel
        if q.states:
            mask &= np.isin(cols.state[sel], np.array([int(s) for s in q.states], dtype=np.int8))
        if q.shard is not None or q.engine_id:
            ok = np.array(
                [
                    (q.shard is None or sh.shard == q.shard)
                    and (not q.engine_id or sh.engine_id == q.engine_id)
                    for sh in self._shard_table
                ],
                dtype=bool,
            )
            mask &= ok[cols.shard_idx[sel]]
        if q.session_id:
            reqs = self._live
            mask &= np.array([reqs[s].session_id == q.session_id for s in sel], dtype=bool)
        sel = sel[mask]
        # Newest arrival first; ties: most recently created first.
        order = np.lexsort((-cols.created[sel], -cols.arrival[sel]))
        return sel[order]

    # -- the fan-out's feed: requests by slot, encoded as wire bytes ----------------------

    def take_changed_slots(self) -> np.ndarray:
        """Slots of live requests changed since the last take (one consumer: the fan-out)."""
        cols = self._cols
        idx = np.flatnonzero(cols.changed[: cols.used])
        cols.changed[idx] = False
        return idx[cols.alive[idx]]

    def mark_changed(self, slots: np.ndarray) -> None:
        """Hand slots back to the next take (the fan-out defers what its time budget did not cover)."""
        cols = self._cols
        slots = slots[cols.alive[slots]]
        cols.changed[slots] = True

    def select(self, q: RequestQuery) -> np.ndarray:
        """Slots of the requests matching ``q``, newest arrival first (``query`` without the views)."""
        return self._select(q)

    def slots_of(self, request_ids: list[str], engine_id: str = "") -> np.ndarray:
        """Slots of those ids the ledger holds, in the order given (unknown and evicted ids skipped).

        With ``engine_id``, that engine's requests; without, an id several engines hold
        gives each engine's newest request with it (the fan-out filters by engine later).
        """
        out: list[int] = []
        held = self._by_engine_id
        for rid in request_ids:
            mine = held.get(rid)
            if not mine:
                continue
            if engine_id:
                r = mine.get(engine_id)
                if r is not None and r.slot >= 0:
                    out.append(r.slot)
            else:
                out.extend(r.slot for r in mine.values() if r.slot >= 0)
        return np.array(out, dtype=np.int64)

    def requests_at(self, slots: np.ndarray) -> list[Request]:
        """The requests in live ``slots`` (same order)."""
        return list(map(self._live.__getitem__, slots.tolist()))

    def ids_of(self, slots: np.ndarray) -> list[str]:
        return list(map(_REQUEST_ID, self.requests_at(slots)))

    def states_of(self, slots: np.ndarray) -> list[int]:
        return self._cols.state[slots].tolist()

    def encode(self, slots: np.ndarray, reqs: list[Request] | None = None) -> list[bytes]:
        """Framed RequestAccounting bytes of each live slot (``reqs``: its requests, if known).

        The bytes parse to what ``GetRequest`` would answer now (``accounting_wire``).
        """
        return encode_accounting(self, slots, self._clock(), reqs)

    def take_interference(self) -> list[InterferenceView]:
        return self._storms.take()

    def add_terminal_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(key)`` once when a request reaches FINISHED or ABORTED.

        A second feed beside ``take_changed`` (whose one consumer is the fan-out), for
        consumers that want each finished request once: span export and metrics. The
        listener runs inside the ledger's event handling, so it must be O(1) and must
        not raise (append ``key`` somewhere and return). Its figures may still change
        for up to ``lockstep_wait_s`` (a LOCKSTEP group holding its last step), so read
        them later with ``request_trace(key)``.
        """
        self._terminal_listeners.append(listener)

    def request_trace(self, key: int) -> RequestTrace | None:
        """The request ``key`` (from a terminal listener) with its phase marks; None once evicted."""
        record = self.finished_record(key)
        return None if record is None else record_to_trace(record)

    def finished_record(self, key: int) -> tuple | None:
        """``request_trace`` as plain tuples (layout in ``ledger_trace``): what the finished feed sends.

        The same figures as ``get()`` (the same clamping), read with scalar ``item()``s
        and packed without dataclasses: about a third of the cost of a RequestTrace, and
        a tenth to pickle, which matters at thousands of finished requests a second.
        """
        slot = key & SLOT_MASK
        cols = self._cols
        if slot >= cols.used or not cols.alive.item(slot) or cols.gen.item(slot) != key >> SLOT_BITS:
            return None
        req = self._reqs[slot]
        if req is None:
            return None
        state = cols.state.item(slot)
        terminal = state == FINISHED or state == ABORTED
        arrival = req.arrival_ns
        first = cols.first_start.item(slot)
        wall, eng, queue, interf = _clamped(
            arrival,
            req.finish_ns if terminal else self._clock(),
            cols.engine.item(slot),
            first,
            cols.interf.item(slot),
        )
        shard = req.shard
        blame: tuple = ()
        aggressors: tuple = ()
        if cols.blame_agg.item(slot, 0) != EMPTY:
            # One pass over the blame row gives the view's top blame and the aggressors' identities.
            bl, ag = [], []
            for agg, ns in cols.blame_row(slot, self.config.top_blame):
                ref = self._aggressor_ref(agg)
                if ref is None:
                    continue
                rid, other, at, parent = ref
                seconds_ns = round(ns)
                engine_id, no, same = other.engine_id, other.shard, other is shard
                bl.append((rid, engine_id, no, seconds_ns, same))
                if rid and at >= 0:
                    ag.append((rid, engine_id, no, at, parent, seconds_ns, same))
            blame, aggressors = tuple(bl), tuple(ag)
        view = (  # RequestView's fields in order, less state and top_blame (ledger_trace.VIEW_FIELDS)
            req.request_id,
            shard.engine_id,
            shard.shard,
            arrival,
            queue,
            eng,
            max(0, round(cols.gpu.item(slot))),
            interf,
            wall,
            wall - eng - queue - interf,
            req.prompt_tokens,
            req.cached_tokens,
            cols.prefilled.item(slot),
            cols.decoded.item(slot),
            cols.steps.item(slot),
            cols.excluded.item(slot),
            req.preemptions,
            req.partial,
            req.migrated,
            req.session_id,
            req.traceparent,
            cols.last_step.item(slot),
            req.finish_ns if terminal else 0,
            req.finish_reason,
            req.routed_shard,
            cols.version.item(slot),
        )
        marks = tuple(map(mark_tuple, req.marks)) if req.marks else ()
        return (
            view,
            state,
            blame,
            first,
            cols.decode_start.item(slot),
            cols.first_token.item(slot),
            marks,
            aggressors,
        )

    def _aggressor_ref(self, agg: int) -> tuple[str, ShardState, int, str] | None:
        """(request id, shard, arrival ns, traceparent) of an aggressor, as ``_aggressor`` resolves it.

        A shard as pseudo-aggressor is ("", shard, -1, ""); None when it cannot be resolved.
        """
        if agg == EMPTY:
            return None
        if agg < 0:
            return "", self._shard_table[-agg - 1], -1, ""
        slot = agg & SLOT_MASK
        cols = self._cols
        if slot < cols.used and cols.alive.item(slot) and cols.gen.item(slot) == agg >> SLOT_BITS:
            req = self._live[slot]
            return req.request_id, req.shard, req.arrival_ns, req.traceparent
        ghost = self._ghosts.get(agg)
        if ghost is not None:
            return ghost[0], self._shard_table[ghost[1]], ghost[2], ghost[3]
        return None

    def shards(self, engine_id: str = "") -> list[ShardView]:
        now = self._clock()
        out = []
        state = self._cols.state
        first_start = self._cols.first_start
        running_total: dict[str, int] = {}  # engine -> requests running on its connected shards
        for sh in self._shard_table:
            if sh.connected:
                running_total[sh.engine_id] = running_total.get(sh.engine_id, 0) + len(sh.running)
        seen: dict[str, int] = {}
        for sh in self._shard_table:
            if sh.ever_connected:
                seen[sh.engine_id] = seen.get(sh.engine_id, 0) + 1
        for sh in self._shard_table:
            if not sh.ever_connected or (engine_id and sh.engine_id != engine_id):
                continue
            horizon = now - self._rate_ns
            dev = pre = dec = 0
            for end, d, p, q in sh.rates:
                if end >= horizon:
                    dev += d
                    pre += p
                    dec += q
            span_ns = self._rate_ns
            if sh.first_step_ns and now - sh.first_step_ns < span_ns:
                span_ns = max(now - sh.first_step_ns, 1)
            span_s = span_ns / 1e9
            ended = aborted = 0
            for end, was_aborted in sh.ends:
                if end >= horizon:
                    ended += 1
                    aborted += was_aborted
            active = queued = 0
            oldest = now
            predicted = 0.0
            for slot in sh.live:
                s = int(state[slot])
                if s == RUNNING:
                    active += 1
                    if sh.connected and sh.engine.lockstep:  # its prefill still to come, if any
                        req = self._reqs[slot]
                        if req is not None:
                            predicted += self._predicted_stall(sh, req, running_total[sh.engine_id])[1]
                elif s == QUEUED or s == PREEMPTED:
                    queued += 1
                    req = self._reqs[slot]
                    if s == QUEUED and req is not None and first_start[slot] < 0:
                        oldest = min(oldest, req.arrival_ns)
            out.append(
                ShardView(
                    engine_id=sh.engine_id,
                    shard=sh.shard,
                    coupling=int(sh.engine.coupling),
                    decode_tokens_per_second=dec / span_s,
                    prefill_tokens_per_second=pre / span_s,
                    busy_fraction=min(1.0, dev / span_ns),
                    ended_per_second=ended / span_s,
                    aborted_per_second=aborted / span_s,
                    active_requests=active,
                    queued_requests=queued,
                    current_storm=self._storms.current(sh),
                    last_step_time_ns=sh.last_step_ns,
                    steps=sh.steps,
                    connected=sh.connected,
                    dropped_frames=sh.dropped_frames,
                    engine_kind=sh.engine_kind,
                    device_name=sh.device_name,
                    timer_source=sh.timer_source,
                    unattributed_ns=round(sh.unattributed_ns),
                    imbalance_ns=round(sh.imbalance_ns),
                    slowdown=sh.engine.slowdown.factor if sh.engine.lockstep else 1.0,
                    predicted_stall_ns=round(predicted),
                    oldest_queued_ns=max(0, now - oldest),
                    num_shards=sh.engine.num_shards,
                    shards_seen=seen[sh.engine_id],
                    partial_view=seen[sh.engine_id] < sh.engine.num_shards,
                )
            )
        return out

    def advise(self, engine_id: str, session_id: str, prompt_tokens: int) -> advice.AdviceView:
        """Where ``session_id``'s next turn of ``prompt_tokens`` should run on ``engine_id`` (``advice``).

        KeyError when the engine is unknown; ValueError when it has no connected shard.
        """
        eng = self._engines.get(engine_id)
        if eng is None:
            raise KeyError(engine_id)
        now = self._clock()
        cols = self._cols
        turns = []
        for req in self._sessions.get(session_id, {}).values() if session_id else ():
            sh = req.shard
            slot = req.slot
            if sh.engine is not eng or slot < 0:
                continue
            terminal = int(cols.state[slot]) in _TERMINAL
            last = req.finish_ns if terminal else now
            prompt = req.prompt_tokens or int(cols.prompt[slot])
            done = int(cols.cached[slot]) + int(cols.prefilled[slot])
            prefix = (min(prompt, done) if prompt else done) + max(int(cols.decoded[slot]), req.output_tokens)
            turns.append(advice.Turn(sh.shard, prefix, last, sh.connected and last > sh.restart_ns))
        loads = [
            advice.ShardLoad(
                no,
                len(sh.running),
                eng.model if eng.coupling == Coupling.LOCKSTEP else sh.model,
            )
            for no, sh in eng.shards.items()
            if sh.connected
        ]
        return advice.advise(
            prompt_tokens=int(prompt_tokens),
            turns=turns,
            loads=loads,
            lockstep=eng.lockstep,
            storm_active=any(self._storms.current(sh) is not None for sh in eng.shards.values()),
            now_ns=now,
        )

    def model(self, key: ShardKey) -> CostModel:
        """The cost model attributing ``key``'s steps (the engine's one when LOCKSTEP)."""
        shard = self._shard(key)
        return shard.engine.model if shard.engine.coupling == Coupling.LOCKSTEP else shard.model

    @property
    def size(self) -> int:
        """Requests held (active + finished)."""
        return len(self._active) + self._n_finished

    def _view(self, req: Request, now: int) -> RequestView:
        cols = self._cols
        s = req.slot
        state = int(cols.state[s])
        terminal = state == FINISHED or state == ABORTED
        end = req.finish_ns if terminal else now
        arrival = req.arrival_ns
        wall, eng, queue, interf = _clamped(
            arrival, end, float(cols.engine[s]), int(cols.first_start[s]), float(cols.interf[s])
        )
        shard = req.shard
        return RequestView(
            request_id=req.request_id,
            engine_id=shard.engine_id,
            shard=shard.shard,
            state=_STATES[state],
            arrival_time_ns=arrival,
            queue_time_ns=queue,
            engine_time_ns=eng,
            gpu_time_ns=max(0, round(float(cols.gpu[s]))),
            interference_ns=interf,
            wall_ns=wall,
            other_ns=wall - eng - queue - interf,
            prompt_tokens=req.prompt_tokens,
            cached_tokens=req.cached_tokens,
            prefilled_tokens=int(cols.prefilled[s]),
            decoded_tokens=int(cols.decoded[s]),
            steps=int(cols.steps[s]),
            excluded_steps=int(cols.excluded[s]),
            preemptions=req.preemptions,
            top_blame=self._blame_views(req) if cols.blame_agg[s, 0] != EMPTY else (),
            partial=req.partial,
            migrated=req.migrated,
            session_id=req.session_id,
            traceparent=req.traceparent,
            last_step_time_ns=int(cols.last_step[s]),
            finish_time_ns=req.finish_ns if terminal else 0,
            finish_reason=req.finish_reason,
            routed_shard=req.routed_shard,
            version=int(cols.version[s]),
        )

    def _blame_views(self, req: Request) -> tuple[BlameView, ...]:
        out = []
        own = req.shard
        for agg, ns in self._cols.blame_row(req.slot, self.config.top_blame):
            ref = self._aggressor_ref(agg)
            if ref is None:
                continue
            rid, shard, arrival, _ = ref
            out.append(BlameView(rid, shard.engine_id, shard.shard, round(ns), shard is own, arrival))
        return tuple(out)

    def _aggressor(self, agg: int) -> tuple[str, ShardState | None]:
        if agg == EMPTY:
            return "", None
        if agg < 0:
            return "", self._shard_table[-agg - 1]
        slot = agg & SLOT_MASK
        cols = self._cols
        if slot < cols.used and cols.alive[slot] and int(cols.gen[slot]) == agg >> SLOT_BITS:
            req = self._live[slot]
            return req.request_id, req.shard
        ghost = self._ghosts.get(agg)
        if ghost is not None:
            return ghost[0], self._shard_table[ghost[1]]
        return "", None


__all__ = ["Ledger", "LedgerConfig", "LedgerCounters", "ShardKey"]


def _run_through(work: Iterator[bool]) -> None:
    """Run attribution phases (``Ledger._phases``) to the end without stopping."""
    for _ in work:
        pass


def _seq(seq: int | None) -> int:
    """A shard's seq for comparisons: -1 before its first step."""
    return -1 if seq is None else seq
