"""Attribution against ground truth: the scenario table (truth, reported, error).

Every scenario is a synthetic engine with a known step cost (``tests/truth_sim.py``)
that computes each request's true interference-free time and the exact Shapley split
of every lockstep wait, replayed through real Recorders into one real sidecar
process. Per scenario it prints the victims' engine_time error (worst and mean over
requests), each storm's blame against its Shapley truth, the aggregate engine_time
bias, conservation (Σ gpu_time + unattributed + imbalance against Σ device time) and
whether ``wall = queue + engine_time + interference + other`` holds for every request.

    .venv/bin/python bench/bench_truth.py            # every scenario
    .venv/bin/python bench/bench_truth.py storm jitter   # scenarios whose name contains a word
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import start_sidecar  # noqa: E402
from truth_sim import (  # noqa: E402
    Storms,
    TruthEngine,
    huge_decode_engine,
    imbalance_engine,
    rel,
    run_replayed,
    straggler_engine,
    warm_engine,
)

from enginetime.clients import AccountingClient  # noqa: E402

STORM_MIN_NS = 0.6e9  # storms checked: true blame above this (the sidecar's threshold is 0.3 s)


def storms(n: int) -> Callable[[], list[TruthEngine]]:
    def build() -> list[TruthEngine]:
        eng = warm_engine(f"storms{n}")
        for s, prompt in enumerate([16384, 12288, 8192, 6144][:n]):
            eng.add(f"storm{s}", 2 * s, at_step=60, prompt=prompt, output=4)
        return [eng]

    return build


def cold_storm() -> list[TruthEngine]:
    eng = warm_engine("cold")
    eng.add("storm0", 0, at_step=8, prompt=16384, output=4)
    return [eng]


def jitter() -> list[TruthEngine]:
    eng = TruthEngine(f"jitter-{uuid.uuid4().hex[:6]}", 8, noise=0.03, seed=3)
    for k in range(8):
        for i in range(4):
            eng.add(f"v{k}.{i}", k, at_step=2 * i, prompt=64 + 32 * i, output=300)
    return [eng]


def jitter_storm() -> list[TruthEngine]:
    eng = warm_engine("jitter-storm", noise=0.03, seed=5)
    eng.add("storm0", 0, at_step=60, prompt=16384, output=4)
    eng.add("storm1", 4, at_step=60, prompt=8192, output=4)
    return [eng]


def huge_decode() -> list[TruthEngine]:
    return [huge_decode_engine()]


def imbalance() -> list[TruthEngine]:
    return [imbalance_engine()]


def independent() -> list[TruthEngine]:
    eng = warm_engine("indep", shards=2, lockstep=False)
    eng.add("storm0", 0, at_step=60, prompt=16384, output=4)
    return [eng]


def straggler(factor: float) -> Callable[[], list[TruthEngine]]:
    def build() -> list[TruthEngine]:
        return [straggler_engine(factor)]

    return build


def shared_ids() -> list[TruthEngine]:
    prefix = f"shared-{uuid.uuid4().hex[:6]}-"
    a = warm_engine("eng-a", shards=2, prefix=prefix)
    b = warm_engine("eng-b", shards=2, prefix=prefix)
    for req in b.requests.values():
        req.output *= 3
    b.add(f"{prefix}storm0", 0, at_step=60, prompt=8192, output=4)
    a.add(f"{prefix}storm0", 1, at_step=30, prompt=1024, output=4)
    return [a, b]


SCENARIOS: list[tuple[str, Callable[[], list[TruthEngine]], str]] = [
    ("one storm", storms(1), "±5 % / ±25 %"),
    ("two storms", storms(2), "±5 % / ±25 %"),
    ("four storms", storms(4), "±5 % / ±25 %"),
    ("storm in the first steps (cold)", cold_storm, "±8 % / ±25 %"),
    ("3 % step jitter", jitter, "bias ≤ 1 %"),
    ("3 % jitter + two storms", jitter_storm, "±5 % / ±25 %"),
    ("huge decode batch on one shard", huge_decode, "±5 %"),
    ("decode imbalance, twins", imbalance, "±5 %, gpu ±10 %"),
    ("INDEPENDENT, one storm", independent, "±5 % / ±25 %"),
    ("two engines, same ids", shared_ids, "±5 %"),
    ("1.3x straggler shard", straggler(1.3), "±5 %"),
    ("2x straggler shard", straggler(2.0), "±15 %"),
]


@dataclass
class Row:
    name: str
    target: str
    worst: float
    mean: float
    bias: float
    storms: list[tuple[str, float, float]]
    conservation: float
    identity: bool
    extra: str = ""


def measure(name: str, target: str, engines: list[TruthEngine], got: dict, client: AccountingClient,
            storms_seen: Storms) -> Row:  # fmt: skip
    errs: list[float] = []
    rep_sum = truth_sum = 0.0
    identity = True
    storm_rows: list[tuple[str, float, float]] = []
    conservation = 0.0
    for eng in engines:
        mine = got[eng.engine_id]
        for rid, req in eng.requests.items():
            r = mine[rid]
            identity &= r.wall_ns == r.queue_time_ns + r.engine_time_ns + r.interference_ns + r.other_ns
            if "storm" in rid:
                continue
            errs.append(rel(r.engine_time_ns, req.engine_ns))
            rep_sum += r.engine_time_ns
            truth_sum += req.engine_ns
        for rid, truth in eng.storms(STORM_MIN_NS).items():
            seen = storms_seen.ended.get((eng.engine_id, rid))
            storm_rows.append((rid, truth, float("nan") if seen is None else float(seen)))
        shards = client.get_shards(eng.engine_id)
        total = sum(r.gpu_time_ns for r in mine.values()) + sum(
            s.unattributed_ns + s.imbalance_ns for s in shards
        )
        conservation = max(conservation, abs(rel(total, eng.device_ns)))
    extra = ""
    if name.startswith("decode imbalance"):
        mine = got[engines[0].engine_id]
        a, b = mine["twin0"].gpu_time_ns, mine["twin1"].gpu_time_ns
        extra = f"twin gpu_time ratio {a / b:.3f}"
    worst = max(errs, key=abs) if errs else 0.0
    mean = sum(abs(e) for e in errs) / len(errs) if errs else 0.0
    return Row(name, target, worst, mean, rel(rep_sum, truth_sum), storm_rows, conservation, identity, extra)


def main(argv: list[str]) -> int:
    words = [w.lower() for w in argv]
    chosen = [s for s in SCENARIOS if not words or any(w in s[0].lower() for w in words)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-truth-"))
    sc = start_sidecar(tmp, "--lockstep-wait", "30", "--storm-threshold", "0.3")
    client = AccountingClient(sc.grpc_target, timeout=10.0)
    seen = Storms(client)
    rows: list[Row] = []
    try:
        for name, build, target in chosen:
            engines = build()
            got = run_replayed(sc.ingest, client, seen, *engines, storm_min_ns=STORM_MIN_NS)
            rows.append(measure(name, target, engines, got, client, seen))
    finally:
        seen.close()
        client.close()
        sc.close()
    print("victims' engine_time against truth; storms' blame against their Shapley value")
    print(
        f"{'scenario':34} {'target':14} {'worst':>8} {'mean|e|':>8} {'bias':>8} {'conserv.':>9} "
        f"{'wall id.':>8}"
    )
    for r in rows:
        print(
            f"{r.name:34} {r.target:14} {r.worst:+8.2%} {r.mean:8.2%} {r.bias:+8.2%} {r.conservation:9.4%} "
            f"{'ok' if r.identity else 'BROKEN':>8}" + (f"  {r.extra}" if r.extra else "")
        )
    print()
    print(f"{'scenario':34} {'storm':10} {'Shapley truth':>14} {'reported':>10} {'error':>8}")
    for r in rows:
        for rid, truth, seen_ns in r.storms:
            err = "no event" if seen_ns != seen_ns else f"{rel(seen_ns, truth):+8.1%}"
            shown = "-" if seen_ns != seen_ns else f"{seen_ns / 1e9:9.3f}s"
            print(f"{r.name:34} {rid.rsplit('-', 1)[-1]:10} {truth / 1e9:13.3f}s {shown:>10} {err:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
