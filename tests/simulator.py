"""The synthetic engine the in-process tests feed a real Ledger with, and the one way to build a ledger.

``Sim`` drives a ``Ledger`` through its ingest entry points (``connect``, ``on_event``,
``on_step``) exactly as the ingest server does, on a fake clock, with step durations
from a known cost function (``true_cost``), so every expected figure is computed
independently of the ledger's code. ``new_ledger``/``connect`` are for tests that feed
records by hand. Used by test_attribution, test_fanout, test_accounting_wire,
test_ledger_store and test_tracing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from enginetime.engine_hooks.constants import PROTOCOL_VERSION, Coupling, EventKind, StepKind
from enginetime.sidecar.ingest.records import Event, Hello, Step
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.ledger.views import RequestView

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
S = 1_000_000_000

# Known cost of a batch (ns): β0 + β1Σp + β2Σp(c+p/2) + β3·n_decode + β4Σ_decode c.
BETA = (3.0 * MS, 10_000.0, 2.0, 50_000.0, 1.0)

Entry = tuple[int, int, int, int]  # handle, prefill tokens, decode tokens, context tokens


class Clock:
    """The ledger's clock (ns), moved by the test: ``clock.now += ...``."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def new_ledger(
    config: LedgerConfig | None = None, *, clock: Callable[[], int] | None = None, **cfg
) -> Ledger:
    """A Ledger with ``config`` (or ``LedgerConfig(**cfg)``); ``clock`` None is the real clock."""
    if config is not None and cfg:
        raise TypeError("pass a LedgerConfig or its fields, not both")
    config = config or LedgerConfig(**cfg)
    return Ledger(config) if clock is None else Ledger(config, clock=clock)


def connect(
    ledger: Ledger,
    engine: str = "eng",
    shards: int = 1,
    coupling: Coupling = Coupling.INDEPENDENT,
    *,
    num_shards: int | None = None,
    recorder_epoch: int = 1,
) -> list:
    """Connect ``shards`` recorders of one engine (declaring ``num_shards``); returns their keys."""
    return [
        ledger.connect(
            Hello(
                PROTOCOL_VERSION,
                engine,
                k,
                num_shards or shards,
                int(coupling),
                recorder_epoch=recorder_epoch,
            )
        )
        for k in range(shards)
    ]


def true_cost(entries: list[Entry]) -> float:
    b0, b1, b2, b3, b4 = BETA
    cost = b0
    for _, p, q, c in entries:
        if p > 0:
            cost += b1 * p + b2 * p * (c + p / 2)
        else:
            cost += (b3 + b4 * c) * q
    return cost


class Sim:
    """A synthetic engine feeding a Ledger with a controllable clock."""

    def __init__(
        self,
        shards: int = 1,
        coupling: Coupling = Coupling.INDEPENDENT,
        config: LedgerConfig | None = None,
        engine: str = "eng",
        num_shards: int | None = None,
    ) -> None:
        self.clock = Clock()
        self.ledger = new_ledger(config, clock=self.clock)
        self.engine = engine
        self.shards = shards  # shards that connect (the engine may declare more: num_shards)
        self.keys = connect(self.ledger, engine, shards, coupling, num_shards=num_shards)
        self.seq = [0] * shards
        self.gs = 0
        self.fed_ns = 0  # Σ device time of every step fed

    @property
    def now(self) -> int:
        return self.clock.now

    @now.setter
    def now(self, value: int) -> None:
        self.clock.now = value

    def arrive(self, shard: int, handle: int, rid: str, t: int | None = None, **kw) -> None:
        self.ledger.on_event(
            self.keys[shard],
            Event(
                handle=handle,
                kind=EventKind.ARRIVED,
                time_ns=self.now if t is None else t,
                request_id=rid,
                **kw,
            ),
        )

    def event(self, shard: int, handle: int, kind: EventKind, t: int | None = None, **kw) -> None:
        self.ledger.on_event(
            self.keys[shard], Event(handle=handle, kind=kind, time_ns=self.now if t is None else t, **kw)
        )

    def make_step(
        self,
        shard: int,
        entries: list[Entry],
        d: int,
        start: int,
        gs: int | None,
        peer_tokens: list[int] | None = None,
    ) -> Step:
        arr = np.array(entries, dtype=np.uint32).reshape(-1, 4)
        if not entries:
            kind = StepKind.IDLE
        elif (arr[:, 1] > 0).all():
            kind = StepKind.PREFILL
        elif (arr[:, 1] > 0).any():
            kind = StepKind.MIXED
        else:
            kind = StepKind.DECODE
        st = Step(
            seq=self.seq[shard],
            start_time_ns=start,
            end_time_ns=start + d,
            device_time_ns=d,
            kind=int(kind),
            global_step=gs,
            handles=arr[:, 0].copy(),
            prefill_tokens=arr[:, 1].copy(),
            decode_tokens=arr[:, 2].copy(),
            context_tokens=arr[:, 3].copy(),
            peer_tokens=np.array(peer_tokens or [], dtype=np.uint32),
        )
        self.seq[shard] += 1
        return st

    def feed(self, shard: int, st: Step) -> None:
        self.fed_ns += st.device_time_ns
        self.ledger.on_step(self.keys[shard], st)

    def step(self, shard: int, entries: list[Entry], d: int | None = None, gap: int = 0) -> Step:
        """One INDEPENDENT step starting now; the clock moves to its end (+ gap)."""
        d = int(true_cost(entries)) if d is None else d
        st = self.make_step(shard, entries, d, self.now, None)
        self.now += d
        self.feed(shard, st)
        self.now += gap
        return st

    def group(
        self,
        batches: dict[int, list[Entry]],
        d: int | None = None,
        gap: int = 0,
        skip: tuple[int, ...] = (),
        peer_tokens: list[int] | None = None,
    ) -> int:
        """One LOCKSTEP group: every shard's step lasts as long as the slowest one's."""
        if d is None:
            d = int(max(true_cost(e) for e in batches.values()))
        start = self.now
        self.now += d
        for k in range(self.shards):
            if k in skip:
                continue
            self.feed(k, self.make_step(k, batches.get(k, []), d, start, self.gs, peer_tokens))
        self.gs += 1
        self.now += gap
        return d

    def view(self, rid: str) -> RequestView:
        v = self.ledger.get(rid)
        assert v is not None, rid
        return v


def charged_ns(ledger: Ledger) -> float:
    """Σ gpu_time over every request slot + unattributed + imbalance device time (white-box, exact floats)."""
    return float(ledger._cols.gpu.sum()) + sum(
        sh.unattributed_ns + sh.imbalance_ns for sh in ledger._shard_table
    )


def assert_identity(v: RequestView) -> None:
    assert v.wall_ns == v.queue_time_ns + v.engine_time_ns + v.interference_ns + v.other_ns, v
    for term in (v.queue_time_ns, v.engine_time_ns, v.interference_ns, v.other_ns, v.gpu_time_ns):
        assert term >= 0, v


def warm_model(sim: Sim, groups: int = 160, seed: int = 0) -> None:
    """Feed varied batches (decode sizes, contexts, prefill chunks) so the engine's model fits.

    Handles 1000+ on every shard; those requests finish at the end.
    """
    rng = np.random.default_rng(seed)
    for k in range(sim.shards):
        for h in range(24):
            sim.arrive(k, 1000 + h, f"warm{k}-{h}")
    for _ in range(groups):
        batches = {}
        for k in range(sim.shards):
            n = int(rng.integers(2, 24))
            entries = [(1000 + h, 0, 1, int(rng.integers(100, 8000))) for h in range(n)]
            if rng.random() < 0.3:
                entries[0] = (1000 + n, int(rng.integers(16, 1024)), 0, int(rng.integers(0, 30000)))
            batches[k] = entries
        if sim.shards == 1 and not isinstance(sim, Sim):  # pragma: no cover - type guard
            raise AssertionError
        d = int(max(true_cost(e) for e in batches.values()) * (1 + 0.01 * abs(rng.standard_normal())))
        if sim.ledger._engines[sim.engine].lockstep:
            sim.group(batches, d)
        else:
            for k, entries in batches.items():
                sim.step(k, entries, int(true_cost(entries) * (1 + 0.01 * abs(rng.standard_normal()))))
    for k in range(sim.shards):
        for h in range(24):
            sim.event(k, 1000 + h, EventKind.FINISHED)
    sim.ledger.take_interference()
