"""A sidecar killed and restarted while a recorder is sending (the core issue's fault list).

Real parts: a real ``enginetime sidecar`` process, SIGKILLed mid-stream and started
again on the same ingest socket; a real Recorder (its shipper thread and socket) in
this process, stepping with real CPU work the whole time. What a user needs: the
engine never notices, the recorder reconnects and reports what it dropped, and the
accounting of a request that lived through the gap says it is incomplete.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import short_socket_dir, start_sidecar, wait_until

from enginetime.clients import AccountingClient, RequestAccounting, RequestNotFound, RequestState
from enginetime.engine_hooks import Recorder, StepKind

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)


def _work() -> None:
    sum(i * i for i in range(20_000))  # a little real CPU per step


def _get(c: AccountingClient, rid: str) -> RequestAccounting | None:
    """None while the sidecar has not read the request's frames yet (flush only says written)."""
    try:
        return c.get_request(rid)
    except RequestNotFound:
        return None


def test_sidecar_killed_and_restarted_while_a_recorder_sends(tmp_path: Path) -> None:
    ingest = f"unix:{short_socket_dir()}/ingest.sock"
    first = start_sidecar(tmp_path, ingest=ingest)
    # A small ring so that the outage overflows it: drops must be counted and reported.
    rec = Recorder(
        "restart",
        shard=0,
        num_shards=1,
        address=ingest,
        engine_kind="test",
        timer="cpu",
        buffer_size=16,
        heartbeat_interval_s=0.1,
    )
    h_old = rec.request_arrived("lived-through", prompt_tokens=32)
    h_done = rec.request_arrived("before-gap", prompt_tokens=8)

    def step(handles: list[int], ctx: int) -> None:
        tok = rec.step_begin()
        _work()
        rec.step_end(
            tok,
            kind=StepKind.DECODE,
            handles=handles,
            prefill_tokens=[0] * len(handles),
            decode_tokens=[1] * len(handles),
            context_tokens=[ctx] * len(handles),
        )

    step([h_old, h_done], 40)
    rec.request_finished(h_done, reason="length", output_tokens=1)
    for i in range(5):
        step([h_old], 41 + i)
    assert rec.flush(10)
    with AccountingClient(first.grpc_target) as c:
        wait_until(lambda: (a := _get(c, "before-gap")) and a.state == RequestState.FINISHED)
        assert not wait_until(lambda: _get(c, "lived-through")).partial

    first.kill()  # SIGKILL: no goodbye, the socket file stays behind
    started = time.monotonic()
    for i in range(200):  # the engine keeps stepping through the outage; nothing raises or blocks
        step([h_old], 46 + i)
    assert time.monotonic() - started < 30
    assert rec.stats().dropped_steps > 0, "a 16-item ring must overflow during the outage"

    second = start_sidecar(tmp_path, ingest=ingest)
    try:
        for i in range(5):
            step([h_old], 246 + i)
        rec.request_finished(h_old, reason="length", output_tokens=211)
        assert rec.flush(10)
        stats = rec.stats()
        assert stats.connected and stats.reconnects >= 1
        with AccountingClient(second.grpc_target) as c:
            acct = wait_until(
                lambda: (a := _get(c, "lived-through")) and a.terminal and a,
                message=lambda: f"{_get(c, 'lived-through')} {rec.stats()}",
            )
            # Re-announced by the recorder on reconnect, so the new sidecar knows its name,
            # and marked partial: this sidecar missed its earlier records.
            assert acct.partial and acct.state == RequestState.FINISHED
            assert acct.steps >= 5
            terms = acct.queue_time_ns + acct.engine_time_ns + acct.interference_ns + acct.other_ns
            assert acct.wall_ns == terms
            shard = wait_until(
                lambda: next((s for s in c.get_shards("restart") if s.dropped_frames > 0), None)
            )
            assert shard.dropped_frames >= stats.dropped_steps > 0
            # A request that ended before the outage is not invented by the new sidecar.
            assert "before-gap" not in {r.request_id for r in c.iter_requests(engine_id="restart")}
    finally:
        rec.close()
        second.close()
        first.close()
