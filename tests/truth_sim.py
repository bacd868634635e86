"""Ground truth for attribution: a synthetic engine with a known step cost, replayed for real.

The engine (``TruthEngine``) runs requests through continuous batching on N shards,
LOCKSTEP (every shard's step ends with the slowest one) or INDEPENDENT, with a step
cost that is an exact function of the batch (the cost model's own feature shape, so
a converged model can be right) times optional per-shard, per-step noise and a
per-shard speed factor. Alongside the steps it computes, per request, what the
accounting should say:

* ``engine_ns``: the request's own shard's step without other requests' prefill and
  without any wait for a peer, at the shard's normal speed, summed over its steps
  (with the step's actual noise);
* ``interference_ns``: the rest of the time its steps took;
* ``queue_ns``, ``wall_ns`` from its arrival, first step and finish;
* per aggressor (a prefilling request), the Shapley blame it caused: same-shard
  prefill cost times the other entries of its step, plus its share of every lockstep
  wait. A shard ``j`` waiting from its own work ``o_j`` up to the group's ``D`` waits for
  every heavier shard; the Shapley value of the max splits each layer between
  consecutive levels equally among the shards at or above it; a shard's part goes to
  its prefill entries by their prefill cost (pure decode imbalance blames nobody).

``replay`` feeds the trace through real ``Recorder``s (``Recorder.record_step``) into a
running sidecar, each shard on its own connection, exactly as an engine would.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from helpers import wait_until

from enginetime.clients import AccountingClient
from enginetime.clients.types import InterferencePhase
from enginetime.engine_hooks.constants import StepKind
from enginetime.engine_hooks.recorder import Recorder

MS = 1_000_000


@dataclass(frozen=True)
class Beta:
    """Step cost (ns): b0 + b1·Σp + b2·Σp(c+p/2) + b3·n_decode + b4·Σ_decode c."""

    b0: float = 4.0 * MS
    b1: float = 15_000.0
    b2: float = 3.0
    b3: float = 60_000.0
    b4: float = 12.0

    def entry(self, p: int, q: int, c: int) -> tuple[float, float]:
        """(prefill cost, decode cost) of one entry."""
        if p > 0:
            return self.b1 * p + self.b2 * p * (c + p / 2), 0.0
        return 0.0, (self.b3 + self.b4 * c) * q


@dataclass
class SimRequest:
    rid: str
    shard: int
    arrive_step: int
    prompt: int
    output: int
    # progress
    prefilled: int = 0
    decoded: int = 0
    arrival_ns: int = 0
    first_ns: int = -1
    finish_ns: int = 0
    done: bool = False
    # truth
    engine_ns: float = 0.0
    interference_ns: float = 0.0
    caused_ns: float = 0.0  # Shapley blame this request's prefill caused (summed over victims)

    @property
    def wall_ns(self) -> int:
        return self.finish_ns - self.arrival_ns

    @property
    def queue_ns(self) -> int:
        return self.first_ns - self.arrival_ns

    @property
    def is_storm(self) -> bool:
        return self.caused_ns > 0.0


@dataclass
class Op:
    shard: int
    kind: str  # arrive | schedule | step | finish
    rid: str = ""
    time_ns: int = 0
    prompt: int = 0
    output: int = 0
    step: dict | None = None


def layered_wait_shares(levels: np.ndarray, top: float) -> np.ndarray:
    """share[j, k]: the part of shard j's wait (``levels[j]`` up to ``top``) caused by shard k.

    Shapley value of the max, written as plainly as possible (it is the reference): the
    layer between two consecutive distinct levels above ``levels[j]`` is caused by every
    shard at or above its upper edge, in equal parts.
    """
    m = levels.size
    lv = [min(float(x), top) for x in levels]
    share = np.zeros((m, m))
    for j in range(m):
        edges = sorted({x for x in lv if x > lv[j]} | ({top} if top > lv[j] else set()))
        low = lv[j]
        for high in edges:
            sharers = [k for k in range(m) if lv[k] >= high] or [k for k in range(m) if lv[k] == max(lv)]
            for k in sharers:
                share[j, k] += (high - low) / len(sharers)
            low = high
    return share


class TruthEngine:
    """A synthetic engine that records its own trace and the truth of every request."""

    def __init__(
        self,
        engine_id: str,
        shards: int,
        *,
        lockstep: bool = True,
        beta: Beta | None = None,
        chunk: int = 2048,
        noise: float = 0.0,
        speed: dict[int, float] | None = None,
        slow_from: int = 0,
        seed: int = 0,
        t0_ns: int | None = None,
    ) -> None:
        self.engine_id = engine_id
        self.m = shards
        self.lockstep = lockstep
        self.beta = beta or Beta()
        self.chunk = chunk
        self.noise = noise
        self.speed = speed or {}  # shard -> slowness factor (>1: slower), from step slow_from on
        self.slow_from = slow_from
        self.rng = np.random.default_rng(seed)
        self.t0 = time.time_ns() if t0_ns is None else t0_ns
        self.requests: dict[str, SimRequest] = {}
        self.ops: list[Op] = []
        self.device_ns = 0.0  # Σ device time over every recorded step
        self.imbalance_ns = 0.0  # Σ wait caused by shards with no prefill (decode imbalance)
        self.steps = 0

    def add(self, rid: str, shard: int, at_step: int, prompt: int, output: int) -> SimRequest:
        req = SimRequest(rid, shard, at_step, prompt, output)
        self.requests[rid] = req
        return req

    # ---- running -----------------------------------------------------------------------
    def run(self, max_steps: int = 100_000) -> None:
        pending = sorted(self.requests.values(), key=lambda r: r.arrive_step)
        clock = [self.t0] * self.m  # per shard (LOCKSTEP: all equal)
        running: list[list[SimRequest]] = [[] for _ in range(self.m)]
        g = 0
        pi = 0
        while g < max_steps:
            while pi < len(pending) and pending[pi].arrive_step <= g:
                req = pending[pi]
                pi += 1
                k = req.shard
                req.arrival_ns = clock[k] - MS // 2  # arrived while the previous step ran
                self.ops.append(Op(k, "arrive", req.rid, req.arrival_ns, req.prompt, req.output))
                self.ops.append(Op(k, "schedule", req.rid, clock[k]))
                running[k].append(req)
            if not any(running):
                if pi >= len(pending):
                    break
                g = pending[pi].arrive_step
                continue
            self._step(g, running, clock)
            g += 1

    def _step(self, g: int, running: list[list[SimRequest]], clock: list[int]) -> None:
        beta = self.beta
        m = self.m
        cols = []
        own = np.zeros(m)
        slow = np.ones(m)
        pf_costs: list[list[float]] = []
        for k in range(m):
            entries = []
            pfs = []
            for req in running[k]:
                if req.prefilled < req.prompt:
                    p = min(self.chunk, req.prompt - req.prefilled)
                    c = req.prefilled
                    q = 1 if req.prefilled + p >= req.prompt else 0
                else:
                    p, q, c = 0, 1, req.prompt + req.decoded
                pf, dc = beta.entry(p, q, c)
                entries.append((req, p, q, c))
                pfs.append(pf)
                own[k] += pf + dc
            if entries:
                slow[k] = self.speed.get(k, 1.0) if g >= self.slow_from else 1.0
                factor = slow[k]
                if self.noise:
                    factor *= 1.0 + self.rng.normal(0.0, self.noise)
                own[k] = (own[k] + beta.b0) * factor
                pfs = [x * factor for x in pfs]
            cols.append(entries)
            pf_costs.append(pfs)
        if self.lockstep:
            top = float(own.max())
            d = np.full(m, top)
            share = layered_wait_shares(own, top)
        else:
            d = own.copy()
            share = np.zeros((m, m))
        for k in range(m):
            entries = cols[k]
            if not entries and not self.lockstep:
                continue
            start = clock[k]
            end = start + round(d[k])
            self.device_ns += round(d[k])
            n = len(entries)
            pf_sum = sum(pf_costs[k])
            for i, (req, _p, _q, _c) in enumerate(entries):
                # Its own work at the shard's normal speed: a straggler's slowness is not the request's.
                eng = (own[k] - (pf_sum - pf_costs[k][i])) / slow[k]
                req.engine_ns += eng
                req.interference_ns += d[k] - eng
                if req.first_ns < 0:
                    req.first_ns = start
                if pf_costs[k][i] > 0.0 and n > 1:
                    req.caused_ns += pf_costs[k][i] * (n - 1)
            # Lockstep wait of this shard's entries, blamed on heavier shards.
            if self.lockstep:
                for kk in np.flatnonzero(share[k] > 0.0):
                    amount = float(share[k, kk])
                    psum = sum(pf_costs[kk])
                    if psum > 0.0:
                        for (agg, *_), pfa in zip(cols[kk], pf_costs[kk], strict=True):
                            if pfa > 0.0:
                                agg.caused_ns += amount * pfa / psum * n
                    else:
                        self.imbalance_ns += amount
            kind = (
                StepKind.IDLE
                if not entries
                else (StepKind.DECODE if all(p == 0 for _, p, _, _ in entries) else StepKind.MIXED)
            )
            self.ops.append(
                Op(
                    k,
                    "step",
                    time_ns=start,
                    step=dict(
                        start_ns=start,
                        end_ns=end,
                        device_ns=round(d[k]),
                        kind=kind,
                        rids=[e[0].rid for e in entries],
                        prefill_tokens=[e[1] for e in entries],
                        decode_tokens=[e[2] for e in entries],
                        context_tokens=[e[3] for e in entries],
                        global_step=g if self.lockstep else None,
                    ),
                )
            )
            clock[k] = end
            # Progress and finishes.
            still = []
            for req, p, q, _ in entries:
                req.prefilled += p
                req.decoded += q
                if req.decoded >= req.output and req.prefilled >= req.prompt:
                    req.done = True
                    req.finish_ns = end
                    self.ops.append(Op(k, "finish", req.rid, end, output=req.decoded))
                else:
                    still.append(req)
            running[k] = still
        self.steps += 1

    # ---- reading the truth -------------------------------------------------------------
    def storms(self, min_caused_ns: float = 0.0) -> dict[str, float]:
        return {r.rid: r.caused_ns for r in self.requests.values() if r.caused_ns > min_caused_ns}


# ---- replay into a sidecar ----------------------------------------------------------------
def replay(
    engines: list[TruthEngine],
    ingest: str,
    flush_every: int = 64,
    client: AccountingClient | None = None,
) -> dict[str, list[Recorder]]:
    """Send every engine's trace through real Recorders (one per shard); returns them open.

    Ops go out in time order across engines; every ``flush_every`` steps each
    recorder is flushed so no shard runs far ahead of its lockstep peers. With
    ``client``, no op goes out before the sidecar lists every shard as connected (a
    lockstep group that reached it before a peer's hello would be joined without it).
    """
    recs: dict[str, list[Recorder]] = {}
    handles: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for eng in engines:
        recs[eng.engine_id] = [
            Recorder(
                eng.engine_id,
                shard=k,
                num_shards=eng.m,
                coupling="lockstep" if eng.lockstep else "independent",
                address=ingest,
                engine_kind="truth-sim",
                timer="cpu",
            )
            for k in range(eng.m)
        ]
    for rs in recs.values():
        for r in rs:
            r.flush(10.0)
    if client is not None:
        for eng in engines:
            wait_until(
                lambda eng=eng: sum(s.connected for s in client.get_shards(eng.engine_id)) == eng.m,
                10.0,
                message=f"{eng.engine_id}: not every shard connected",
            )
    merged = sorted(
        ((op.time_ns, i, n, eng, op) for i, eng in enumerate(engines) for n, op in enumerate(eng.ops)),
        key=lambda t: (t[0], t[1], t[2]),
    )
    steps = 0
    for _, _, _, eng, op in merged:
        rec = recs[eng.engine_id][op.shard]
        hmap = handles[(eng.engine_id, op.shard)]
        if op.kind == "arrive":
            hmap[op.rid] = rec.request_arrived(op.rid, prompt_tokens=op.prompt, time_ns=op.time_ns)
        elif op.kind == "schedule":
            rec.request_scheduled(hmap[op.rid], time_ns=op.time_ns)
        elif op.kind == "finish":
            rec.request_finished(hmap.pop(op.rid), output_tokens=op.output, time_ns=op.time_ns)
        else:
            st = op.step
            assert st is not None
            rec.record_step(
                start_ns=st["start_ns"],
                end_ns=st["end_ns"],
                device_ns=st["device_ns"],
                kind=st["kind"],
                handles=[hmap[r] for r in st["rids"]],
                prefill_tokens=st["prefill_tokens"],
                decode_tokens=st["decode_tokens"],
                context_tokens=st["context_tokens"],
                global_step=st["global_step"],
            )
            steps += 1
            if steps % flush_every == 0:
                for rs in recs.values():
                    for r in rs:
                        r.flush(10.0)
    for rs in recs.values():
        for r in rs:
            r.flush(10.0)
    return recs


def close_all(recs: dict[str, list[Recorder]]) -> None:
    for rs in recs.values():
        for r in rs:
            r.close(5.0)


@dataclass
class Scenario:
    """A named set of engines plus what to check."""

    name: str
    engines: list[TruthEngine] = field(default_factory=list)


def replay_into_ledger(engines: list[TruthEngine], ledger: object) -> None:
    """The same trace straight into an in-process ``Ledger`` (benchmarks and debugging).

    Decoded records instead of sockets; the tests use ``replay`` and a real sidecar.
    """
    from enginetime.engine_hooks.constants import PROTOCOL_VERSION, Coupling, EventKind
    from enginetime.sidecar.ingest.records import Event, Hello, Step

    keys: dict[tuple[str, int], object] = {}
    for eng in engines:
        for k in range(eng.m):
            coupling = Coupling.LOCKSTEP if eng.lockstep else Coupling.INDEPENDENT
            keys[(eng.engine_id, k)] = ledger.connect(  # type: ignore[attr-defined]
                Hello(PROTOCOL_VERSION, eng.engine_id, k, eng.m, int(coupling), recorder_epoch=1)
            )
    handles: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    seqs: dict[tuple[str, int], int] = defaultdict(int)
    merged = sorted(
        ((op.time_ns, i, n, eng, op) for i, eng in enumerate(engines) for n, op in enumerate(eng.ops)),
        key=lambda t: (t[0], t[1], t[2]),
    )
    next_handle = [1]
    for _, _, _, eng, op in merged:
        key = (eng.engine_id, op.shard)
        hmap = handles[key]
        if op.kind == "arrive":
            hmap[op.rid] = next_handle[0]
            next_handle[0] += 1
            ev = Event(hmap[op.rid], int(EventKind.ARRIVED), op.time_ns, op.rid, prompt_tokens=op.prompt)
            ledger.on_event(keys[key], ev)  # type: ignore[attr-defined]
        elif op.kind == "schedule":
            ledger.on_event(keys[key], Event(hmap[op.rid], int(EventKind.SCHEDULED), op.time_ns))  # type: ignore[attr-defined]
        elif op.kind == "finish":
            ev = Event(hmap.pop(op.rid), int(EventKind.FINISHED), op.time_ns, output_tokens=op.output)
            ledger.on_event(keys[key], ev)  # type: ignore[attr-defined]
        else:
            st = op.step
            assert st is not None
            seq = seqs[key]
            seqs[key] = seq + 1
            u32 = np.uint32
            ledger.on_step(  # type: ignore[attr-defined]
                keys[key],
                Step(
                    seq,
                    st["start_ns"],
                    st["end_ns"],
                    st["device_ns"],
                    int(st["kind"]),
                    global_step=st["global_step"],
                    handles=np.array([hmap[r] for r in st["rids"]], dtype=u32),
                    prefill_tokens=np.array(st["prefill_tokens"], dtype=u32),
                    decode_tokens=np.array(st["decode_tokens"], dtype=u32),
                    context_tokens=np.array(st["context_tokens"], dtype=u32),
                ),
            )
    ledger.flush()  # type: ignore[attr-defined]


# ---- reading the sidecar back ---------------------------------------------------------------
class Storms:
    """Collects InterferenceEvents (the stream opened before any replay)."""

    def __init__(self, client: AccountingClient) -> None:
        self.ended: dict[tuple[str, str], int] = {}
        self.started: set[tuple[str, str]] = set()
        self._stream = client.stream_interference()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._stream:
                key = (ev.engine_id, ev.aggressor_request_id)
                if ev.phase == InterferencePhase.STARTED:
                    self.started.add(key)
                elif ev.phase == InterferencePhase.ENDED:
                    self.ended[key] = ev.victims.seconds_ns
        except Exception:
            pass

    def close(self) -> None:
        self._stream.close()


def run_replayed(
    ingest: str, client: AccountingClient, storms: Storms, *engines: TruthEngine, storm_min_ns: float = 0.6e9
) -> dict[str, dict]:
    """Run the engines, replay them into the sidecar at ``ingest`` and wait until every
    request is terminal and every storm above ``storm_min_ns`` of true blame has ENDED.

    Returns {engine id: {request id: RequestAccounting}}.
    """
    for eng in engines:
        eng.run()
    recs = replay(list(engines), ingest, client=client)
    try:
        out: dict[str, dict[str, object]] = {}
        for eng in engines:
            want = len(eng.requests)

            def settled(eng: TruthEngine = eng, want: int = want) -> dict | None:
                got = {r.request_id: r for r in client.iter_requests(engine_id=eng.engine_id)}
                if len(got) == want and all(r.state.terminal for r in got.values()):
                    return got
                return None

            out[eng.engine_id] = wait_until(settled, 30.0, message=f"{eng.engine_id} never settled")
        for eng in engines:
            expected = {(eng.engine_id, rid) for rid, ns in eng.storms().items() if ns >= storm_min_ns}
            wait_until(
                lambda expected=expected: expected <= storms.ended.keys(),
                15.0,
                message=lambda expected=expected: f"no ENDED for {expected - storms.ended.keys()}",
            )
        return out
    finally:
        close_all(recs)


def warm_engine(name: str, shards: int = 8, prefix: str = "", **kw) -> TruthEngine:
    """Decode requests on every shard with staggered arrivals (the model's warm-up)."""
    eng = TruthEngine(f"{name}-{uuid.uuid4().hex[:6]}", shards, **kw)
    for k in range(shards):
        for i in range(3 + k % 3):
            eng.add(
                f"{prefix}v{k}.{i}", k, at_step=3 * i + k, prompt=64 + 96 * ((i + k) % 5), output=160 + 7 * i
            )
    return eng


def rel(a: float, b: float) -> float:
    return (a - b) / b


def imbalance_engine() -> TruthEngine:
    """Shard 0 decodes 4k-token contexts, shards 1-3 short ones: shard 0 is slowest every
    step with decode alone. Twins (same prompt and output) on shards 0 and 1."""
    eng = TruthEngine(f"imbalance-{uuid.uuid4().hex[:6]}", 4)
    for k in range(4):
        for i in range(6):
            eng.add(f"v{k}.{i}", k, at_step=3 * i, prompt=4096 if k == 0 else 64 + 16 * i, output=160)
    for k in (0, 1):
        eng.add(f"twin{k}", k, at_step=40, prompt=128, output=60)
    return eng


def huge_decode_engine() -> TruthEngine:
    """A warm 8-shard engine; at step 60, forty short requests join shard 3 and decode."""
    eng = warm_engine("huge-decode")
    for i in range(40):
        eng.add(f"h{i}", 3, at_step=60 + i % 4, prompt=32, output=60)
    return eng


def straggler_engine(factor: float) -> TruthEngine:
    """A warm 8-shard engine whose shard 3 runs ``factor`` times slower from step 80 on
    (a throttled GPU); shard 3 keeps a long request, so it is slow to the end."""
    eng = warm_engine(f"straggler{factor}", speed={3: factor}, slow_from=80)
    eng.add("v3.long", 3, at_step=5, prompt=64, output=400)
    return eng
