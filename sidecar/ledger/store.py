"""Per-request storage of the ledger: small slotted objects plus struct-of-arrays columns.

Attribution touches thousands of requests per step, so every figure a step changes
(engine time, gpu time, interference, token counts, blame) lives in a numpy column
indexed by the request's *slot*: a step updates them with a handful of vectorised
operations instead of a Python loop per entry. What only events change (ids, session,
finish reason) stays on a ``Request`` object with ``__slots__`` — about 200 bytes
each, so 100,000 retained requests fit the sidecar's memory budget.

Blame is a fixed-width table per slot: up to ``width`` (aggressor id, ns) pairs.
Aggressor ids are ``RequestId``s of the aggressor (``generation << 32 | slot``, so an
evicted and reused slot is never confused with its previous tenant) or, for causes
that are not one request (a lump of small aggressors, a lockstep peer's own decode,
a dead shard), ``-(shard_index + 1)`` — the shard as a pseudo-aggressor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from enginetime.sidecar.ledger.views import RequestState

if TYPE_CHECKING:  # shards.py imports this module
    from enginetime.sidecar.ledger.shards import ShardState

#: Blame table value meaning "no aggressor in this column".
EMPTY = 0
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1

QUEUED = int(RequestState.QUEUED)
RUNNING = int(RequestState.RUNNING)
PREEMPTED = int(RequestState.PREEMPTED)
FINISHED = int(RequestState.FINISHED)
ABORTED = int(RequestState.ABORTED)


class Request:
    """What events tell about a request; figures live in ``SlotColumns`` row ``slot``."""

    __slots__ = (
        "rid",
        "slot",
        "request_id",
        "shard",
        "handle",
        "arrival_ns",
        "finish_ns",
        "finish_reason",
        "prompt_tokens",
        "cached_tokens",
        "output_tokens",
        "session_id",
        "traceparent",
        "routed_shard",
        "partial",
        "migrated",
        "preemptions",
        "marks",
        "wire",
    )

    def __init__(
        self, rid: int, slot: int, request_id: str, shard: ShardState, handle: int, arrival_ns: int
    ) -> None:
        self.rid = rid  # aggressor id: generation << 32 | slot
        self.slot = slot  # -1 once evicted
        self.request_id = request_id
        self.shard = shard
        self.handle = handle
        self.arrival_ns = arrival_ns
        self.finish_ns = 0
        self.finish_reason = ""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.session_id = ""
        self.traceparent = ""
        self.routed_shard: int | None = None
        self.partial = False
        self.migrated = False
        self.preemptions = 0
        #: Phase boundaries and storms for span export (``ledger_trace.add_mark``); None until the first.
        self.marks: list | None = None
        #: (values, bytes) of the fields only events change, as the fan-out last encoded them
        #: (``accounting_wire.event_fields``); None until a subscriber first wants this request.
        self.wire: tuple | None = None


_F8 = ("engine", "gpu", "interf", "caused", "blame_dropped")
_I8 = (
    "created",
    "prefilled",
    "decoded",
    "steps",
    "excluded",
    "first_start",
    "decode_start",
    "first_token",
    "resumed_at",
    "last_step",
    "arrival",
    "prompt",
    "cached",
    "version",
    "stamp",
    "victim_mark",
    "gen",
)
_I4 = ("shard_idx",)
_I1 = ("state",)
_B = ("changed", "running", "alive", "in_run")


class SlotColumns:
    """Struct-of-arrays accumulators, one row per slot, grown by doubling.

    Callers must re-read attributes after ``alloc`` (growth replaces the arrays).
    Columns: created (allocation counter: creation order); engine/gpu/interf/caused/
    blame_dropped (float64 ns); prefilled/decoded/steps/excluded (int64 counts);
    first_start (ns of the first step's start, -1 none); decode_start (ns of the start of
    the first step that decoded for it and began after ``resumed_at``, -1 none);
    resumed_at (ns of its last resumption after a preemption, 0 none); first_token (ns of
    the end of the step before its first decoding step — the step that sampled its first
    token — 0 none);
    last_step (ns of the last step's end, 0 none); arrival (ns); prompt/cached (token counts
    from events, mirrored from the Request for the fan-out's encoder); version; stamp and
    victim_mark (scratch marks for set operations); gen (slot generation); shard_idx;
    state (RequestState); changed (since the last take_changed); running (admitted and
    stepped: an excluded-step victim candidate); alive; in_run (has a prefill run).
    """

    # The columns (set by name from _F8, _I8, _I4, _I1, _B in __init__ and _grow).
    engine: np.ndarray
    gpu: np.ndarray
    interf: np.ndarray
    caused: np.ndarray
    blame_dropped: np.ndarray
    created: np.ndarray
    prefilled: np.ndarray
    decoded: np.ndarray
    steps: np.ndarray
    excluded: np.ndarray
    first_start: np.ndarray
    decode_start: np.ndarray
    first_token: np.ndarray
    resumed_at: np.ndarray
    last_step: np.ndarray
    arrival: np.ndarray
    prompt: np.ndarray
    cached: np.ndarray
    version: np.ndarray
    stamp: np.ndarray
    victim_mark: np.ndarray
    gen: np.ndarray
    shard_idx: np.ndarray
    state: np.ndarray
    changed: np.ndarray
    running: np.ndarray
    alive: np.ndarray
    in_run: np.ndarray

    def __init__(self, capacity: int, blame_width: int) -> None:
        self.capacity = 0
        self.width = int(blame_width)
        self._free: list[int] = []
        self._used = 0  # high-water mark of slots ever handed out
        self._created = 0  # allocation counter (creation order of requests)
        self.engine = self.gpu = self.interf = self.caused = self.blame_dropped = np.zeros(0)
        for name in _F8:
            setattr(self, name, np.zeros(0))
        for name in _I8:
            setattr(self, name, np.zeros(0, dtype=np.int64))
        self.shard_idx = np.zeros(0, dtype=np.int32)
        self.state = np.zeros(0, dtype=np.int8)
        for name in _B:
            setattr(self, name, np.zeros(0, dtype=bool))
        self.blame_agg = np.zeros((0, self.width), dtype=np.int64)
        self.blame_ns = np.zeros((0, self.width))
        self._grow(max(16, int(capacity)))

    def _grow(self, new_cap: int) -> None:
        old = self.capacity

        def extend(arr: np.ndarray, fill: float | int | bool = 0) -> np.ndarray:
            shape = (new_cap,) + arr.shape[1:]
            out = np.full(shape, fill, dtype=arr.dtype)
            out[:old] = arr[:old]
            return out

        for name in _F8 + _I8 + _I4 + _I1 + _B:
            setattr(self, name, extend(getattr(self, name)))
        self.first_start[old:] = -1
        self.decode_start[old:] = -1
        self.blame_agg = extend(self.blame_agg, EMPTY)
        self.blame_ns = extend(self.blame_ns)
        self.capacity = new_cap

    def alloc(self) -> int:
        """A zeroed slot (generation bumped)."""
        if self._free:
            slot = self._free.pop()
        else:
            if self._used >= self.capacity:
                self._grow(self.capacity * 2)
            slot = self._used
            self._used += 1
        self.engine[slot] = self.gpu[slot] = self.interf[slot] = self.caused[slot] = 0.0
        self.blame_dropped[slot] = 0.0
        self.prefilled[slot] = self.decoded[slot] = self.steps[slot] = self.excluded[slot] = 0
        self.prompt[slot] = self.cached[slot] = 0
        self.first_start[slot] = -1
        self.decode_start[slot] = -1
        self.first_token[slot] = 0
        self.resumed_at[slot] = 0
        self.last_step[slot] = 0
        self.version[slot] = 0
        self._created += 1
        self.created[slot] = self._created
        self.stamp[slot] = self.victim_mark[slot] = 0
        self.gen[slot] += 1
        self.state[slot] = QUEUED
        self.changed[slot] = True
        self.running[slot] = False
        self.in_run[slot] = False
        self.alive[slot] = True
        self.blame_agg[slot] = EMPTY
        self.blame_ns[slot] = 0.0
        return slot

    def free(self, slot: int) -> None:
        self.alive[slot] = False
        self.running[slot] = False
        self.changed[slot] = False
        self.in_run[slot] = False
        self._free.append(slot)

    def rid(self, slot: int) -> int:
        return (int(self.gen[slot]) << SLOT_BITS) | slot

    @property
    def used(self) -> int:
        return self._used

    # ---- blame -------------------------------------------------------------------------
    def add_blame(self, victims: np.ndarray, agg: int, amounts: np.ndarray | float) -> None:
        """Add ``amounts`` (ns) of blame on aggressor ``agg`` to each victim slot.

        ``victims`` must be unique. A victim that already names ``agg`` adds to it; one
        with a free column takes it; a full row replaces its smallest entry when the
        new amount is larger (the displaced amount, or the new one if smaller, goes to
        ``blame_dropped`` so the loss is measurable).
        """
        if victims.size == 0:
            return
        if isinstance(amounts, np.ndarray):
            amt = amounts
        else:
            amt = np.full(victims.size, float(amounts))
        rows = self.blame_agg[victims]
        match = rows == agg
        col = match.argmax(axis=1)
        hit = match[np.arange(victims.size), col]
        if hit.all():
            self.blame_ns[victims, col] += amt
            return
        hv = victims[hit]
        self.blame_ns[hv, col[hit]] += amt[hit]
        miss = ~hit
        mv = victims[miss]
        mamt = amt[miss]
        mrows = rows[miss]
        empty = mrows == EMPTY
        ecol = empty.argmax(axis=1)
        has_empty = empty[np.arange(mv.size), ecol]
        if has_empty.any():
            ev = mv[has_empty]
            ec = ecol[has_empty]
            self.blame_agg[ev, ec] = agg
            self.blame_ns[ev, ec] = mamt[has_empty]
        full = ~has_empty
        if full.any():
            fv = mv[full]
            famt = mamt[full]
            ns = self.blame_ns[fv]
            mcol = ns.argmin(axis=1)
            mins = ns[np.arange(fv.size), mcol]
            take = famt > mins
            tv = fv[take]
            tc = mcol[take]
            self.blame_dropped[tv] += mins[take]
            self.blame_agg[tv, tc] = agg
            self.blame_ns[tv, tc] = famt[take]
            keep = ~take
            self.blame_dropped[fv[keep]] += famt[keep]

    def blame_row(self, slot: int, limit: int) -> list[tuple[int, float]]:
        """The ``limit`` largest (aggressor id, ns) pairs of one victim, largest first."""
        pairs = [
            (a, n)
            for a, n in zip(self.blame_agg[slot].tolist(), self.blame_ns[slot].tolist(), strict=True)
            if a != EMPTY
        ]
        pairs.sort(key=_by_ns, reverse=True)
        return pairs[:limit]


def _by_ns(pair: tuple[int, float]) -> float:
    return pair[1]
