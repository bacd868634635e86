"""Attribution against ground truth: a synthetic engine replayed into a real sidecar.

``truth_sim.TruthEngine`` knows every request's true interference-free time and the
exact Shapley split of every lockstep wait; its trace goes through real Recorders
(``record_step``) over real sockets into one sidecar process for the whole module.
Each scenario uses its own engine id, so each starts with a cold cost model.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from enginetime.clients import AccountingClient
from enginetime.clients.types import InterferencePhase
from helpers import start_sidecar, wait_until
from truth_sim import TruthEngine, close_all, replay

pytestmark = pytest.mark.timeout(120)


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


def _run(sidecar, *engines: TruthEngine) -> dict[str, dict[str, object]]:
    """Replay, wait until every request is settled; returns {engine: {rid: RequestAccounting}}."""
    sc, client, storms = sidecar
    for eng in engines:
        eng.run()
    recs = replay(list(engines), sc.ingest)
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
            expected = {(eng.engine_id, rid) for rid, ns in eng.storms().items() if ns >= 0.6e9}
            wait_until(lambda expected=expected: expected <= storms.ended.keys(), 15.0,
                       message=lambda expected=expected: f"no ENDED for {expected - storms.ended.keys()}")
        return out
    finally:
        close_all(recs)


def warm_engine(name: str, shards: int = 8, **kw) -> TruthEngine:
    """Decode requests on every shard with staggered arrivals (the model's warm-up)."""
    eng = TruthEngine(f"{name}-{uuid.uuid4().hex[:6]}", shards, **kw)
    for k in range(shards):
        for i in range(3 + k % 3):
            eng.add(f"v{k}.{i}", k, at_step=3 * i + k, prompt=64 + 96 * ((i + k) % 5), output=160 + 7 * i)
    return eng


def rel(a: float, b: float) -> float:
    return (a - b) / b


def check_victims(eng: TruthEngine, got: dict, tol: float) -> list[str]:
    errs = []
    for rid, req in eng.requests.items():
        r = got[rid]
        assert r.wall_ns == r.queue_time_ns + r.engine_time_ns + r.interference_ns + r.other_ns
        if rid.startswith("v"):
            e = rel(r.engine_time_ns, req.engine_ns)
            if abs(e) > tol:
                errs.append(f"{rid}: engine_time {r.engine_time_ns / 1e6:.1f} ms vs truth "
                            f"{req.engine_ns / 1e6:.1f} ms ({e:+.1%})")
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
    print("\n".join(errs))
    assert not errs, "\n".join(errs)
