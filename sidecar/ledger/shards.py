"""Per-engine and per-shard state of the ledger (connections, handle maps, models, rates)."""

from __future__ import annotations

from collections import deque

import numpy as np

from enginetime.engine_hooks.constants import Coupling
from enginetime.sidecar.ingest.records import Event
from enginetime.sidecar.ledger.costmodel import CostModel, Slowdown, TieNoise
from enginetime.sidecar.ledger.join import LockstepJoin
from enginetime.sidecar.ledger.store import Request

#: Handles below this index a dense numpy map; larger ones (unusual) fall back to a dict.
DENSE_HANDLE_LIMIT = 1 << 20
#: Records a shard keeps for its rates (steps, ended requests) within the rate window: 2 s of
#: 0.1 ms steps fit; beyond, the oldest go and the rate reads low rather than memory growing.
RATE_RECORDS_KEPT = 1 << 15


class EngineState:
    """One engine: its coupling, shards, the LOCKSTEP cost model and the lockstep join."""

    __slots__ = (
        "engine_id",
        "coupling",
        "num_shards",
        "shards",
        "model",
        "noise",
        "slowdown",
        "join",
        "left_ns",
        "_expected",
    )

    def __init__(
        self, engine_id: str, coupling: int, num_shards: int, model: CostModel, wait_ns: int
    ) -> None:
        self.engine_id = engine_id
        self.coupling = coupling
        self.num_shards = num_shards
        self.shards: dict[int, ShardState] = {}
        self.model = model  # used when LOCKSTEP (one model per engine)
        self.noise = TieNoise()  # LOCKSTEP step jitter (costmodel.TieNoise)
        self.slowdown = Slowdown()  # LOCKSTEP pace against the model (costmodel.Slowdown)
        self._expected: set[int] = set()
        self.join = LockstepJoin(wait_ns, self.expected)
        self.left_ns = 0  # when its last connected shard disconnected (0: one is connected, or never was)

    @property
    def lockstep(self) -> bool:
        return self.coupling == Coupling.LOCKSTEP and self.num_shards > 1

    def tie_factor(self, k: int) -> float:
        """Own work at normal speed over the measured step of k shards tied at the top of a
        group: the jitter bias of the slowest of k, and the engine's slowdown."""
        return self.noise.factor(k) / self.slowdown.factor

    def expected(self) -> set[int]:
        return self._expected

    def refresh_expected(self) -> None:
        self._expected = {no for no, sh in self.shards.items() if sh.connected}


class ShardState:
    """One shard (scheduler loop) of an engine, as seen through its recorder's connection."""

    __slots__ = (
        "engine",
        "engine_id",
        "shard",
        "index",
        "pseudo",
        "connected",
        "ever_connected",
        "epoch",
        "coupling",
        "engine_kind",
        "engine_version",
        "hooks_version",
        "device_name",
        "timer_source",
        "_hmap",
        "_hdict",
        "live",
        "running",
        "running_ver",
        "_running_arr",
        "_running_arr_ver",
        "last_seq",
        "done_seq",
        "held",
        "steps",
        "last_step_ns",
        "first_step_ns",
        "rates",
        "ends",
        "drops_seen",
        "dropped_frames",
        "unattributed_ns",
        "imbalance_ns",
        "model",
        "runs",
        "restart_ns",
    )

    def __init__(self, engine: EngineState, shard: int, index: int, model: CostModel) -> None:
        self.engine = engine
        self.engine_id = engine.engine_id
        self.shard = shard
        self.index = index  # position in the ledger's shard table
        self.pseudo = -(index + 1)  # aggressor id of "this shard" in blame
        self.connected = False
        self.ever_connected = False
        self.epoch = 0
        self.coupling = engine.coupling
        self.engine_kind = ""
        self.engine_version = ""
        self.hooks_version = ""
        self.device_name = ""
        self.timer_source = 0
        self._hmap = np.full(64, -1, dtype=np.int64)
        self._hdict: dict[int, int] = {}
        self.live: dict[int, Request] = {}  # slot -> request (not terminal)
        self.running: set[int] = set()  # slots RUNNING and already stepped: excluded-step candidates
        self.running_ver = 0
        self._running_arr = np.zeros(0, dtype=np.int64)
        self._running_arr_ver = -1
        self.last_seq: int | None = None
        # LOCKSTEP: the highest seq attributed so far, and the request events that came after
        # steps still waiting in the join (applied once those steps are attributed).
        self.done_seq: int | None = None
        self.held: deque[tuple[int, Event]] = deque()
        self.steps = 0
        self.last_step_ns = 0
        self.first_step_ns = 0
        # Both are pruned to the rate window by the records' own times and capped in length, so a
        # peer whose clock stands still cannot make them grow without bound.
        #: (end_ns, device_ns, prefill, decode) of the steps within the rate window.
        self.rates: deque[tuple[int, int, int, int]] = deque(maxlen=RATE_RECORDS_KEPT)
        #: Requests that ended within the rate window: (end_ns, ended aborted), for ORCA's rates.
        self.ends: deque[tuple[int, bool]] = deque(maxlen=RATE_RECORDS_KEPT)
        self.drops_seen = 0
        self.dropped_frames = 0
        self.unattributed_ns = 0.0
        self.imbalance_ns = 0.0  # wait charged to no request: decode imbalance and tied-shard jitter
        self.model = model  # used when INDEPENDENT (one model per shard)
        self.runs: dict = {}  # slot -> PrefillRun (ledger_storms)
        self.restart_ns = 0  # when its recorder last came back with a new epoch (its KV cache is gone)

    # ---- handle map --------------------------------------------------------------------
    def map_handle(self, handle: int, slot: int) -> None:
        if handle < DENSE_HANDLE_LIMIT:
            if handle >= self._hmap.size:
                size = self._hmap.size
                while size <= handle:
                    size *= 2
                grown = np.full(size, -1, dtype=np.int64)
                grown[: self._hmap.size] = self._hmap
                self._hmap = grown
            self._hmap[handle] = slot
        else:
            self._hdict[handle] = slot

    def unmap_handle(self, handle: int, slot: int) -> None:
        if self.slot_of(handle) == slot:
            if handle < DENSE_HANDLE_LIMIT:
                self._hmap[handle] = -1
            else:
                self._hdict.pop(handle, None)

    def slot_of(self, handle: int) -> int:
        if handle < self._hmap.size:
            return int(self._hmap[handle])
        return self._hdict.get(handle, -1)

    def lookup(self, handles: np.ndarray) -> np.ndarray:
        """Slots of a step's handles (int64, -1 where unknown)."""
        if handles.size == 0:
            return np.zeros(0, dtype=np.int64)
        hmap = self._hmap
        if int(handles.max()) < hmap.size:
            return hmap[handles]
        return np.array([self.slot_of(int(h)) for h in handles], dtype=np.int64)

    def reset_stream(self) -> None:
        """A new recorder (engine restart): its handles and sequence numbers start over."""
        self._hmap = np.full(64, -1, dtype=np.int64)
        self._hdict.clear()
        self.last_seq = None
        self.done_seq = None
        self.drops_seen = 0
        self.dropped_frames = 0

    # ---- running set -------------------------------------------------------------------
    def running_array(self) -> np.ndarray:
        if self._running_arr_ver != self.running_ver:
            self._running_arr = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
            self._running_arr_ver = self.running_ver
        return self._running_arr

    def add_running(self, slot: int) -> None:
        if slot not in self.running:
            self.running.add(slot)
            self.running_ver += 1

    def drop_running(self, slot: int) -> None:
        if slot in self.running:
            self.running.discard(slot)
            self.running_ver += 1


def append_in_window(records: deque, record: tuple, horizon: int) -> None:
    """Append ``record`` (time first) to a shard's rate records and drop those before ``horizon``.

    The records feed the shard's rates over the last ``--rate-window``; the deque's maxlen
    bounds them besides.
    """
    records.append(record)
    while records[0][0] < horizon:
        records.popleft()
