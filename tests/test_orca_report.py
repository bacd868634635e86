"""ORCA load reports' request and error rates, from a simulated engine on a fake clock.

gRPC's and Envoy's weighted round robin weigh an endpoint by ``rps_fractional`` and ``eps``
beside its utilization and ignore a report whose rps is 0, so these two decide whether a
gateway uses enginetime's reports at all. No sockets here: the ledger's shard views and
the report built from them (the stream's and GetRequestCost's report is the same function).
"""

from __future__ import annotations

import pytest
from simulator import Sim

from enginetime.engine_hooks.constants import EventKind
from enginetime.sidecar.api.orca import load_report
from enginetime.sidecar.ledger.shards import RATE_RECORDS_KEPT

S = 1_000_000_000


def test_rps_and_eps_count_the_requests_that_ended_within_the_rate_window() -> None:
    sim = Sim(shards=2)  # INDEPENDENT; the rate window is 2 s
    # Shard 0: ten requests, one step each long ago; shard 1: two requests that ended 3 s ago.
    for h in range(10):
        sim.arrive(0, h + 1, f"a{h}")
    sim.step(0, [(h + 1, 16, 0, 0) for h in range(10)])
    for h in range(2):
        sim.arrive(1, h + 1, f"b{h}")
    sim.step(1, [(1, 16, 0, 0), (2, 16, 0, 0)])
    sim.now += 10 * S
    for h in range(2):
        sim.event(1, h + 1, EventKind.FINISHED, t=sim.now - 3 * S)
    # Within the window: six finish and two are aborted on shard 0; two still run.
    for h in range(6):
        sim.event(0, h + 1, EventKind.FINISHED, t=sim.now - S // 2)
    for h in (6, 7):
        sim.event(0, h + 1, EventKind.ABORTED, t=sim.now - S // 4)

    views = {v.shard: v for v in sim.ledger.shards("eng")}
    assert views[0].ended_per_second == pytest.approx(8 / 2)
    assert views[0].aborted_per_second == pytest.approx(2 / 2)
    assert views[1].ended_per_second == 0 and views[1].aborted_per_second == 0  # outside the window
    report = load_report(list(views.values()))
    assert report.rps_fractional == pytest.approx(4.0)
    assert report.eps == pytest.approx(1.0)

    # Two seconds on, nothing ended within the window: the rates fall to zero.
    sim.now += 2 * S
    report = load_report(sim.ledger.shards("eng"))
    assert report.rps_fractional == 0 and report.eps == 0


def test_a_shard_keeps_a_bounded_number_of_ended_requests_for_its_rates() -> None:
    """A peer whose clock stands still (every event at the same time) cannot grow the record."""
    sim = Sim(shards=1)
    shard = next(iter(sim.ledger._engines["eng"].shards.values()))
    for h in range(RATE_RECORDS_KEPT + 100):
        sim.arrive(0, h + 1, f"r{h}")
        sim.event(0, h + 1, EventKind.FINISHED)
    assert len(shard.ends) == RATE_RECORDS_KEPT
