"""Storm warning at admission: a PREDICTED interference event before the storm's first chunk runs.

The scenario: a 4-shard LOCKSTEP engine whose cost model has been fitted on varied batches
(tests/simulator.py's synthetic engine with known true costs ``BETA``), three decoding
requests running on every shard. A request with a long uncached prompt is admitted
(SCHEDULED) on shard 2: the other shards' nine running requests will each wait for its
prefill. Expected figures come from the synthetic engine's cost function, not the ledger's.
"""

from __future__ import annotations

import pytest
from simulator import BETA, S, Sim, true_cost, warm_model

from enginetime.engine_hooks.constants import Coupling, EventKind
from enginetime.sidecar.api.fanout import InterferenceFilter, InterferenceSubscriber
from enginetime.sidecar.ledger.views import InterferencePhase

SHARDS = 4
BIG = 16384
CHUNK = 2048
DECODERS = {k: [(10 + h, 0, 1, 500) for h in range(3)] for k in range(SHARDS)}


def cold_prefill_ns(tokens: int) -> float:
    return BETA[1] * tokens + BETA[2] * tokens * tokens / 2


def running_engine(coupling: Coupling = Coupling.LOCKSTEP) -> Sim:
    sim = Sim(SHARDS, coupling)
    warm_model(sim)
    for k in range(SHARDS):
        for h in range(3):
            sim.arrive(k, 10 + h, f"dec{k}-{h}", prompt_tokens=100, cached_tokens=100)  # no prefill left
    if coupling == Coupling.LOCKSTEP:
        sim.group(DECODERS)
    else:
        for k, b in DECODERS.items():
            sim.step(k, b)
    sim.ledger.take_interference()
    return sim


def admit(sim: Sim, rid: str, prompt: int, cached: int = 0) -> None:
    sim.arrive(2, 50, rid, prompt_tokens=prompt, session_id="s-big")
    sim.event(2, 50, EventKind.SCHEDULED, cached_tokens=cached)


def prefill_all(sim: Sim, prompt: int, cached: int = 0) -> None:
    for start in range(cached, prompt, CHUNK):
        n = min(CHUNK, prompt - start)
        sim.group({**DECODERS, 2: [*DECODERS[2], (50, n, 0, start)]})
    for _ in range(3):
        sim.group({**DECODERS, 2: [*DECODERS[2], (50, 0, 1, prompt)]})


def test_admission_of_a_long_cold_prefill_is_predicted_before_it_runs() -> None:
    sim = running_engine()
    steps_before = sim.ledger.counters.steps
    admit(sim, "big", BIG)
    events = sim.ledger.take_interference()
    assert sim.ledger.counters.steps == steps_before  # nothing of it has run yet
    assert [e.phase for e in events] == [InterferencePhase.PREDICTED]
    warn = events[0]
    assert warn.aggressor_request_id == "big" and warn.aggressor_shard == 2
    assert warn.aggressor_session_id == "s-big"
    assert warn.prefill_tokens == BIG and warn.chunks == 0
    assert warn.victim_shards == (0, 1, 3) and warn.victim_requests == 9 and warn.cross_shard
    # Nine victims each wait for the whole prefill: the engine's true cost, within the model's error.
    assert warn.victim_ns == pytest.approx(9 * cold_prefill_ns(BIG), rel=0.25)
    assert sim.ledger.counters.storms_predicted == 1
    shard2 = next(s for s in sim.ledger.shards("eng") if s.shard == 2)
    assert shard2.predicted_stall_ns == pytest.approx(warn.victim_ns, rel=1e-6)

    # The storm happens: STARTED/ENDED follow, and the measured stall is what was predicted.
    prefill_all(sim, BIG)
    sim.event(2, 50, EventKind.FINISHED, output_tokens=3)
    sim.group(DECODERS)
    sim.ledger.flush()
    after = sim.ledger.take_interference()
    phases = [e.phase for e in after]
    assert phases[0] == InterferencePhase.STARTED and phases[-1] == InterferencePhase.ENDED, phases
    assert InterferencePhase.PREDICTED not in phases
    measured = after[-1].victim_ns
    assert 0.6 * warn.victim_ns <= measured <= 1.5 * warn.victim_ns, (measured, warn.victim_ns)
    # Nothing left to predict once the prefill ran.
    assert all(s.predicted_stall_ns == 0 for s in sim.ledger.shards("eng"))


@pytest.mark.parametrize(
    ("prompt", "cached"),
    [(64, 0), (BIG, BIG - 64)],
    ids=["short-prompt", "prefix-cached"],
)
def test_no_warning_when_the_prefill_is_cheap(prompt: int, cached: int) -> None:
    sim = running_engine()
    admit(sim, "small", prompt, cached)
    # What it would cost the others, by the true cost: far under the 1 s storm threshold.
    assert 9 * true_cost([(50, prompt - cached, 0, cached)]) < 0.5 * S
    assert sim.ledger.take_interference() == []
    assert sim.ledger.counters.storms_predicted == 0


def test_no_warning_on_an_independent_engine() -> None:
    """Shards that do not step together do not wait for each other's prefill."""
    sim = running_engine(Coupling.INDEPENDENT)
    admit(sim, "big", BIG)
    assert sim.ledger.take_interference() == []


def test_no_warning_when_no_other_shard_runs_anything() -> None:
    sim = running_engine()
    for k in range(SHARDS):
        for h in range(3):
            sim.event(k, 10 + h, EventKind.FINISHED, output_tokens=1)
    sim.group({}, d=3_000_000)
    sim.ledger.take_interference()
    admit(sim, "big", BIG)
    assert sim.ledger.take_interference() == []


def test_stream_interference_passes_the_warning_and_then_the_storm_on_its_own_figures() -> None:
    """A StreamInterference subscriber with a stall floor gets the PREDICTED event; the STARTED that
    follows is judged on its own measured stall, not let through because the warning passed."""
    from enginetime.sidecar.api.convert import interference_to_proto

    sim = running_engine()
    admit(sim, "big", BIG)
    (warn,) = sim.ledger.take_interference()
    above = InterferenceSubscriber(InterferenceFilter(min_stall_ns=warn.victim_ns // 2), 100)
    assert above.matches(warn)
    assert interference_to_proto(warn).phase == 4  # PHASE_PREDICTED on the wire
    prefill_all(sim, BIG)
    sim.ledger.flush()
    started = next(e for e in sim.ledger.take_interference() if e.phase == InterferencePhase.STARTED)
    high = InterferenceSubscriber(InterferenceFilter(min_stall_ns=started.victim_ns + 1), 100)
    assert high.matches(warn) is (warn.victim_ns > started.victim_ns)
    assert not high.matches(started)
