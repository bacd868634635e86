"""Closing a guard right after it fired still lets the abort reach the engine.

A session server that shuts down (or leaves an ``async with`` block) just after a kill
must not leave the request running on the engine: ``close()``/``aclose()`` give aborts
already sent their own timeout to finish. No sidecar is needed: the wall backstop fires
while the guard cannot reach its (absent) sidecar.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import free_port

from enginetime.clients import AsyncGuard, BudgetReason, EngineBudget, EngineBudgetExceeded, Guard

BUDGET = EngineBudget(engine_time=60, liveness=60, wall=0.2)


def test_close_waits_for_an_abort_in_flight() -> None:
    started, finished = threading.Event(), []

    def abort(request_id: str) -> None:
        started.set()
        time.sleep(0.5)  # a slow engine answering /abort_request
        finished.append(request_id)

    guard = Guard(f"127.0.0.1:{free_port()}", BUDGET, abort=abort, interval=0.05, abort_timeout=5)
    with pytest.raises(EngineBudgetExceeded) as info:
        with guard.watch("r-close"):
            assert started.wait(10), "the wall backstop never fired"
    assert info.value.reason is BudgetReason.WALL and info.value.aborted
    guard.close()
    assert finished == ["r-close"], "close() returned before the abort reached the engine"


def test_close_gives_up_on_an_abort_after_its_timeout() -> None:
    started = threading.Event()
    release = threading.Event()

    def abort(request_id: str) -> None:
        started.set()
        release.wait(30)

    guard = Guard(f"127.0.0.1:{free_port()}", BUDGET, abort=abort, interval=0.05, abort_timeout=0.3)
    with pytest.raises(EngineBudgetExceeded):
        with guard.watch("r-hung"):
            assert started.wait(10)
    t0 = time.monotonic()
    guard.close()
    release.set()
    assert time.monotonic() - t0 < 3, "close() waited on a hung abort past its timeout"


def test_aclose_waits_for_an_abort_in_flight() -> None:
    finished: list[str] = []

    async def main() -> None:
        started = asyncio.Event()

        async def abort(request_id: str) -> None:
            started.set()
            await asyncio.sleep(0.5)
            finished.append(request_id)

        guard = AsyncGuard(f"127.0.0.1:{free_port()}", BUDGET, abort=abort, interval=0.05, abort_timeout=5)
        with pytest.raises(EngineBudgetExceeded) as info:
            async with guard.watch("r-aclose"):
                await asyncio.wait_for(started.wait(), 10)
        assert info.value.reason is BudgetReason.WALL
        await guard.aclose()

    asyncio.run(main())
    assert finished == ["r-aclose"], "aclose() cancelled the abort before it reached the engine"
