"""Finished requests, each handed once to span export and metrics, with settled figures.

The ledger calls ``FinishedFeed._on_terminal`` when a request reaches FINISHED
or ABORTED (``Ledger.add_terminal_listener``): an O(1) append of its key and
the time. Its figures can still move for a short while — in a LOCKSTEP engine
its last step may wait up to ``lockstep_wait_s`` for the other shards before it
is attributed — so ``pump()`` (run by the sidecar's ticker on the event loop)
reads a request only once it has been terminal for ``settle_s``, and then gives
the same immutable record (``Ledger.finished_record``: plain tuples, layout in
``ledger_trace``) to every consumer. What /metrics observes and what a span
carries are therefore the figures ``GetRequest`` returns.

``pump`` works within a time budget per call (``budget_s``) so a burst of
thousands of finishing requests is spread over several ticks instead of
holding the loop; the backlog is bounded (``max_pending``, by default as many as
the ledger's default store holds) and whatever cannot be kept is counted in ``dropped``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from enginetime.sidecar.config import LedgerConfig
from enginetime.sidecar.ledger.protocols import FinishedSource

log = logging.getLogger("enginetime.sidecar.telemetry.finished")

#: Requests read per budget check.
_CHUNK = 32

#: Called with a batch of finished records (``Ledger.finished_record`` tuples).
Consumer = Callable[[list[tuple]], None]


class FinishedFeed:
    """The terminal-request feed; see the module doc."""

    def __init__(
        self,
        ledger: FinishedSource,
        settle_s: float,
        *,
        max_pending: int = LedgerConfig.max_requests,
        budget_s: float = 0.005,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.ledger = ledger
        self.settle_ns = max(0, round(settle_s * 1e9))
        self.max_pending = max_pending
        self.budget_s = budget_s
        self._clock = clock
        self._pending: deque[tuple[int, int]] = deque()
        self.consumers: list[Consumer] = []
        self.delivered = 0
        #: overflow: the backlog was full; evicted: the ledger dropped the request before it settled.
        self.dropped = {"overflow": 0, "evicted": 0}
        self._consumer_errors = 0
        ledger.add_terminal_listener(self._on_terminal)

    def _on_terminal(self, key: int) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped["overflow"] += 1
            return
        self._pending.append((self._clock(), key))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pump(self, *, flush: bool = False) -> int:
        """Hand settled requests to the consumers; ``flush``: every pending one, now, without budget."""
        pending = self._pending
        if not pending:
            return 0
        horizon = self._clock() - self.settle_ns
        started = time.perf_counter()
        ledger = self.ledger
        batch: list[tuple] = []
        while pending and (flush or pending[0][0] <= horizon):
            key = pending.popleft()[1]
            record = ledger.finished_record(key)
            if record is None:
                self.dropped["evicted"] += 1
            else:
                batch.append(record)
            if not flush and len(batch) % _CHUNK == 0 and time.perf_counter() - started > self.budget_s:
                break
        if batch:
            self.delivered += len(batch)
            for consumer in self.consumers:
                try:
                    consumer(batch)
                except Exception:
                    self._consumer_errors += 1
                    if self._consumer_errors <= 3 or self._consumer_errors % 1000 == 0:
                        log.exception("finished-request consumer %r failed", consumer)
        return len(batch)


__all__ = ["Consumer", "FinishedFeed"]
