"""Attribution against ground truth: a synthetic engine replayed into a real sidecar.

``truth_sim.TruthEngine`` knows every request's true interference-free time and the
exact Shapley split of every lockstep wait; its trace goes through real Recorders
(``record_step``) over real sockets into one sidecar process for the whole module.
Each scenario uses its own engine id, so each starts with a cold cost model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import start_sidecar, wait_until
from truth_sim import (
    Storms,
    TruthEngine,
    huge_decode_engine,
    imbalance_engine,
    rel,
    run_replayed,
    straggler_engine,
    warm_engine,
)

from enginetime.clients import AccountingClient, AmbiguousRequest, AsyncAccountingClient

pytestmark = [pytest.mark.timeout(120), pytest.mark.e2e]  # every test replays into a real sidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, AccountingClient, Storms]]:
    tmp: Path = tmp_path_factory.mktemp("truth")
    sc = start_sidecar(tmp, "--lockstep-wait", "30", "--storm-threshold", "0.3")
    client = AccountingClient(sc.grpc_target, timeout=10.0)
    storms = Storms(client)
    try:
        yield sc, client, storms
    finally:
        storms.close()
        client.close()
        sc.close()


def _run(sidecar, *engines: TruthEngine) -> dict[str, dict]:
    sc, client, storms = sidecar
    return run_replayed(sc.ingest, client, storms, *engines)


def check_victims(eng: TruthEngine, got: dict, tol: float) -> list[str]:
    errs = []
    for rid, req in eng.requests.items():
        r = got[rid]
        assert r.wall_ns == r.queue_time_ns + r.engine_time_ns + r.interference_ns + r.other_ns
        if "storm" not in rid:
            e = rel(r.engine_time_ns, req.engine_ns)
            if abs(e) > tol:
                errs.append(
                    f"{rid}: engine_time {r.engine_time_ns / 1e6:.1f} ms vs truth "
                    f"{req.engine_ns / 1e6:.1f} ms ({e:+.1%})"
                )
    return errs


def check_storms(eng: TruthEngine, storms: Storms, tol: float) -> list[str]:
    errs = []
    for rid, truth in eng.storms(0.6e9).items():
        got = storms.ended.get((eng.engine_id, rid))
        if got is None:
            errs.append(f"{rid}: no InterferenceEvent (truth {truth / 1e9:.2f} s of blame)")
            continue
        e = rel(got, truth)
        if abs(e) > tol:
            errs.append(f"{rid}: blame {got / 1e9:.3f} s vs Shapley {truth / 1e9:.3f} s ({e:+.1%})")
    return errs


@pytest.mark.parametrize("n_storms", [1, 2, 4])
def test_simultaneous_storms_each_get_their_shapley_blame(sidecar, n_storms: int) -> None:
    eng = warm_engine(f"storms{n_storms}")
    prompts = [16384, 12288, 8192, 6144]
    for s in range(n_storms):
        eng.add(f"storm{s}", 2 * s, at_step=60, prompt=prompts[s], output=4)
    got = _run(sidecar, eng)[eng.engine_id]
    errs = check_victims(eng, got, 0.05) + check_storms(eng, sidecar[2], 0.25)
    assert not errs, "\n".join(errs)
    # Every storm is named in its victims' blame, with its engine.
    for s in range(n_storms):
        named = [b for r in got.values() for b in r.top_blame if b.request_id == f"storm{s}"]
        assert named and all(b.engine_id == eng.engine_id for b in named)
    check_conservation(sidecar[1], eng, got)


def check_conservation(client: AccountingClient, eng: TruthEngine, got: dict) -> None:
    """Σ gpu_time + unattributed + imbalance = Σ device time the engine reported (≤ 0.1 %)."""
    shards = client.get_shards(eng.engine_id)
    total = sum(r.gpu_time_ns for r in got.values()) + sum(s.unattributed_ns + s.imbalance_ns for s in shards)
    assert abs(total - eng.device_ns) <= 1e-3 * eng.device_ns, (total, eng.device_ns)


def test_step_jitter_does_not_bias_engine_time(sidecar) -> None:
    """3 % per-shard, per-step noise on 8 equally loaded lockstep shards: the step is the
    slowest of 8 noisy ones, yet nobody is billed for the noise (bias ≤ 1 %)."""
    eng = TruthEngine(f"jitter-{uuid.uuid4().hex[:6]}", 8, noise=0.03, seed=3)
    for k in range(8):
        for i in range(4):
            eng.add(f"v{k}.{i}", k, at_step=2 * i, prompt=64 + 32 * i, output=300)
    got = _run(sidecar, eng)[eng.engine_id]
    reported = sum(got[r].engine_time_ns for r in eng.requests)
    truth = sum(r.engine_ns for r in eng.requests.values())
    assert abs(rel(reported, truth)) <= 0.01, f"jitter bias {rel(reported, truth):+.2%}"
    errs = check_victims(eng, got, 0.05)
    assert not errs, "\n".join(errs)
    check_conservation(sidecar[1], eng, got)


def test_independent_engine_storm(sidecar) -> None:
    eng = warm_engine("indep", shards=2, lockstep=False)
    eng.add("storm0", 0, at_step=60, prompt=16384, output=4)
    got = _run(sidecar, eng)[eng.engine_id]
    errs = check_victims(eng, got, 0.05) + check_storms(eng, sidecar[2], 0.25)
    assert not errs, "\n".join(errs)
    check_conservation(sidecar[1], eng, got)


def test_identical_requests_get_comparable_gpu_time_across_shards(sidecar) -> None:
    """Shard 0 decodes long contexts and is the slowest every step; a twin on it must not be
    charged its peers' wait (decode imbalance goes to the waiting shards' bucket)."""
    eng = imbalance_engine()
    got = _run(sidecar, eng)[eng.engine_id]
    a, b = got["twin0"].gpu_time_ns, got["twin1"].gpu_time_ns
    assert abs(a - b) <= 0.1 * min(a, b), (a, b)
    shards = {s.shard: s for s in sidecar[1].get_shards(eng.engine_id)}
    assert shards[1].imbalance_ns > 0 and shards[0].imbalance_ns < shards[1].imbalance_ns
    errs = check_victims(eng, got, 0.05)
    assert not errs, "\n".join(errs)
    check_conservation(sidecar[1], eng, got)


def test_huge_decode_batch_on_one_shard(sidecar) -> None:
    """Forty more decodes join one shard of eight: everyone else waits for a batch, not a
    request; victims keep their own engine_time and nobody is named for the wait."""
    eng = huge_decode_engine()
    got = _run(sidecar, eng)[eng.engine_id]
    errs = check_victims(eng, got, 0.05)
    assert not errs, "\n".join(errs)
    check_conservation(sidecar[1], eng, got)


def test_two_engines_with_the_same_ids(sidecar) -> None:
    """Two engines behind one sidecar reuse the same request ids: a bare id is an error naming
    both engines, never a silent pick; with engine_id each answers its own request."""
    _, client, _ = sidecar
    prefix = f"shared-{uuid.uuid4().hex[:6]}-"
    small = warm_engine("eng-a", shards=2, prefix=prefix)
    big = warm_engine("eng-b", shards=2, prefix=prefix)
    for req in big.requests.values():
        req.output *= 3  # same ids, three times the work
    big.add(f"{prefix}storm0", 0, at_step=60, prompt=8192, output=4)
    small.add(f"{prefix}storm0", 1, at_step=30, prompt=1024, output=4)
    got = _run(sidecar, small, big)
    for eng in (small, big):
        errs = check_victims(eng, got[eng.engine_id], 0.05)
        assert not errs, "\n".join(errs)
    rid = f"{prefix}v0.0"
    with pytest.raises(AmbiguousRequest) as err:
        client.get_request(rid)
    assert set(err.value.engines) == {small.engine_id, big.engine_id}
    assert small.engine_id in str(err.value) and big.engine_id in str(err.value)
    with pytest.raises(AmbiguousRequest):
        client.list_requests(request_ids=[rid])
    with pytest.raises(AmbiguousRequest):
        next(iter(client.stream_updates(request_ids=[rid], timeout=5.0)))
    with pytest.raises(AmbiguousRequest):
        next(iter(client.watch_request(rid, timeout=5.0)))

    async def with_async_client() -> tuple[str, str]:
        async with AsyncAccountingClient(sidecar[0].grpc_target) as ac:
            with pytest.raises(AmbiguousRequest):
                await ac.get_request(rid)
            a = await ac.get_request(rid, engine_id=small.engine_id)
            async for w in ac.watch_request(rid, engine_id=big.engine_id, timeout=5.0):
                b = w
            return a.engine_id, b.engine_id

    assert asyncio.run(with_async_client()) == (small.engine_id, big.engine_id)
    for eng in (small, big):
        r = client.get_request(rid, engine_id=eng.engine_id)
        assert r.engine_id == eng.engine_id
        assert abs(rel(r.engine_time_ns, eng.requests[rid].engine_ns)) <= 0.05
        (listed,) = client.list_requests(request_ids=[rid], engine_id=eng.engine_id).requests
        assert listed.engine_id == eng.engine_id and listed.engine_time_ns == r.engine_time_ns
        watched = list(client.watch_request(rid, engine_id=eng.engine_id, timeout=5.0))
        assert watched[-1].engine_id == eng.engine_id and watched[-1].engine_time_ns == r.engine_time_ns
        # Blame names the aggressor with its engine and arrival: this engine's storm, not the other's.
        blamed = {
            (b.engine_id, b.request_id, b.arrival_time_ns)
            for x in got[eng.engine_id].values()
            for b in x.top_blame
        }
        storm = got[eng.engine_id][f"{prefix}storm0"]
        assert (eng.engine_id, storm.request_id, storm.arrival_ns) in blamed
        assert all(e == eng.engine_id for e, _, _ in blamed)


def test_guard_follows_the_named_engine_and_never_kills_on_a_shared_id(sidecar) -> None:
    """Engine A's request is cheap, engine B's request with the same id is over budget.
    A watch naming B fires; one naming A does not; one naming neither pins the first engine
    that reports the id and, once the other reports it too, never fires on figures."""
    from enginetime.clients import EngineBudget, EngineBudgetExceeded, Guard
    from enginetime.engine_hooks.constants import StepKind
    from enginetime.engine_hooks.recorder import Recorder

    sc, client, _ = sidecar
    rid = f"shared-{uuid.uuid4().hex[:6]}"
    names = {k: f"guard-{k}-{uuid.uuid4().hex[:6]}" for k in "ab"}
    recs = {k: Recorder(names[k], address=sc.ingest, engine_kind="truth-sim", timer="cpu") for k in "ab"}

    def feed(k: str, device_ns: int) -> None:
        rec = recs[k]
        now = time.time_ns()
        h = rec.request_arrived(rid, prompt_tokens=16, time_ns=now - device_ns - 1_000_000)
        rec.record_step(
            start_ns=now - device_ns,
            end_ns=now,
            kind=StepKind.DECODE,
            handles=[h],
            prefill_tokens=[0],
            decode_tokens=[1],
            context_tokens=[16],
        )
        rec.flush(5.0)

    g_a = Guard(client, EngineBudget(engine_time=0.2), interval=0.05)
    g_b = Guard(client, EngineBudget(engine_time=0.2), interval=0.05)
    g_any = Guard(client, EngineBudget(engine_time=0.2), interval=0.05)
    try:
        w_a = g_a.watch(rid, engine_id=names["a"])
        w_b = g_b.watch(rid, engine_id=names["b"])
        w_any = g_any.watch(rid)
        for w in (w_a, w_b, w_any):
            w.__enter__()
        feed("a", 5_000_000)  # 5 ms of engine time
        wait_until(lambda: w_any.accounting is not None and w_a.accounting is not None, 10.0)
        assert w_any.accounting.engine_id == names["a"]
        feed("b", 600_000_000)  # 600 ms: over the 0.2 s budget
        wait_until(
            lambda: w_b.fired,
            10.0,
            message=lambda: (
                f"B never fired: {w_b.accounting} {g_b.stats} {client.get_request(rid, engine_id=names['b'])}"
            ),
        )
        wait_until(lambda: g_any.stats.ambiguous == 1, 10.0, message="the bare watch never saw engine B")
        time.sleep(0.3)  # a few more stream intervals: nothing else may fire
        assert not w_a.fired and not w_any.fired
        assert w_a.accounting.engine_id == names["a"] and w_a.accounting.engine_time_ns < 0.1e9
        with pytest.raises(EngineBudgetExceeded):
            w_b.__exit__(None, None, None)
        w_a.__exit__(None, None, None)
        w_any.__exit__(None, None, None)
    finally:
        for g in (g_a, g_b, g_any):
            g.close()
        for r in recs.values():
            r.close(2.0)


def test_an_id_reused_within_one_engine_answers_with_the_newest(sidecar) -> None:
    from enginetime.engine_hooks.constants import StepKind
    from enginetime.engine_hooks.recorder import Recorder

    sc, client, _ = sidecar
    engine = f"reuse-{uuid.uuid4().hex[:6]}"
    rid = f"again-{uuid.uuid4().hex[:6]}"
    rec = Recorder(engine, address=sc.ingest, engine_kind="truth-sim", timer="cpu")
    t = time.time_ns() - 5_000_000_000
    try:
        for device_ns in (30_000_000, 70_000_000):
            h = rec.request_arrived(rid, prompt_tokens=8, time_ns=t)
            rec.record_step(
                start_ns=t + 1_000_000,
                end_ns=t + 1_000_000 + device_ns,
                kind=StepKind.DECODE,
                handles=[h],
                prefill_tokens=[0],
                decode_tokens=[1],
                context_tokens=[8],
            )
            t += 1_000_000 + device_ns
            rec.request_finished(h, output_tokens=1, time_ns=t)
            t += 1_000_000
        rec.flush(5.0)
        both = wait_until(
            lambda: (lambda rs: rs if len(rs) == 2 and all(r.state.terminal for r in rs) else None)(
                [r for r in client.iter_requests(engine_id=engine) if r.request_id == rid]
            ),
            10.0,
        )
        assert sorted(r.engine_time_ns for r in both) == [30_000_000, 70_000_000]  # both listable
        assert client.get_request(rid).engine_time_ns == 70_000_000  # the newest answers
        assert client.get_request(rid, engine_id=engine).engine_time_ns == 70_000_000
    finally:
        rec.close(2.0)


@pytest.mark.parametrize(("factor", "tol"), [(1.3, 0.05), (2.0, 0.15)])
def test_a_straggler_shard_is_slowdown_not_engine_time(sidecar, factor: float, tol: float) -> None:
    """After a healthy warm-up one shard of eight runs 1.3x / 2x slower (throttled, a bad link).
    Every shard's step ends with it; requests are billed their own work at normal speed and
    GetShards says the engine is slower than its reference (not which shard: unknowable)."""
    eng = straggler_engine(factor)
    got = _run(sidecar, eng)[eng.engine_id]
    errs = check_victims(eng, got, tol)
    assert not errs, "\n".join(errs)
    shards = sidecar[1].get_shards(eng.engine_id)
    assert all(s.slowdown > 1.1 for s in shards), [s.slowdown for s in shards]
    check_conservation(sidecar[1], eng, got)


def _storm_at_start(engine_id: str) -> TruthEngine:
    eng = TruthEngine(engine_id, 8)
    for k in range(8):
        for i in range(3):
            eng.add(f"c{k}.{i}", k, at_step=i, prompt=64 + 96 * ((i + k) % 5), output=120 + 7 * i)
    eng.add("storm0", 0, at_step=2, prompt=16384, output=4)
    return eng


def test_storm_right_after_start_with_and_without_saved_model_state(tmp_path: Path) -> None:
    """A sidecar that ran the engine before saved its cost model (--model-state, written at
    shutdown); a new sidecar loads it at the engine's hello and attributes a storm in the
    engine's first steps like a warm one (±5 %). Without the state: ±8 %."""
    state = tmp_path / "models.json"
    engine_id = f"warmstart-{uuid.uuid4().hex[:6]}"
    args = ("--lockstep-wait", "30", "--storm-threshold", "0.3", "--model-state", str(state))

    def run_in_new_sidecar(eng: TruthEngine, *extra: str) -> dict:
        sc = start_sidecar(tmp_path, "--lockstep-wait", "30", "--storm-threshold", "0.3", *extra)
        client = AccountingClient(sc.grpc_target, timeout=10.0)
        storms = Storms(client)
        try:
            return run_replayed(sc.ingest, client, storms, eng)[eng.engine_id]
        finally:
            storms.close()
            client.close()
            assert sc.stop() == 0
            sc.close()

    first = warm_engine("unused")
    first.engine_id = engine_id
    run_in_new_sidecar(first, *args[4:])
    assert state.exists() and engine_id in state.read_text()
    warm = _storm_at_start(engine_id)
    got = run_in_new_sidecar(warm, *args[4:])
    errs = check_victims(warm, got, 0.05)
    assert not errs, "with saved state:\n" + "\n".join(errs)
    cold = _storm_at_start(f"cold-{engine_id}")
    got = run_in_new_sidecar(cold)
    errs = check_victims(cold, got, 0.08)
    assert not errs, "without saved state:\n" + "\n".join(errs)
