"""Waiting, bounded, until the ledger has seen a request end: Advise's ``after_request_id``.

A session server asks ``Advise`` for its next turn right after the previous turn's
response; the engine's hooks ship that turn's last records asynchronously, a few
milliseconds later, and a unary call is served before ingest work already queued. Asked
without waiting, the sidecar could advise as if the previous turn had never run (and
send the session away from the shard that holds its prefix). With ``after_request_id``
the call first waits for that request's end, as the ledger records it:

* a request the ledger holds: a future for its key, resolved by the ledger's terminal
  listener (O(1) per request end: one dict lookup when nobody waits);
* a request not seen yet (its arrival is still in a socket buffer): looked up again
  every ``PUBLISH_PERIOD_S`` (25 ms, the fan-out's period) until it appears.

The wait is bounded by the caller's ``max_wait`` (capped at ``MAX_WAIT_S``) and by
``max_waiters`` calls at once (``wait_ended`` answers False without waiting beyond that);
while a call waits it does not count as in flight (``auth.waiting_for_ingest``), since
ingest holds its work back for calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib

from enginetime.sidecar.api.auth import waiting_for_ingest
from enginetime.sidecar.api.fanout import PUBLISH_PERIOD_S
from enginetime.sidecar.ledger.protocols import AccountingReader

#: max_wait when the caller leaves it unset.
DEFAULT_WAIT_S = 0.25
#: The longest a call may wait for a request's end, whatever it asks.
MAX_WAIT_S = 2.0
#: Calls waiting at once; one more is answered at once, without waiting.
MAX_WAITERS = 1024


class EndWaits:
    """Futures for request ends, keyed by the ledger's request key."""

    def __init__(self, ledger: AccountingReader, max_waiters: int = MAX_WAITERS) -> None:
        self.ledger = ledger
        self.max_waiters = max_waiters
        self._by_key: dict[int, list[asyncio.Future[None]]] = {}
        self.waiting = 0
        ledger.add_terminal_listener(self._on_terminal)

    def _on_terminal(self, key: int) -> None:
        futures = self._by_key.pop(key, None)
        if futures:
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    async def wait_ended(self, request_id: str, engine_id: str, timeout_s: float) -> bool:
        """True once ``engine_id``'s ``request_id`` has ended in the ledger (at once when it
        had); False when ``timeout_s`` ran out first or ``max_waiters`` calls already wait."""
        found = self.ledger.request_end(request_id, engine_id)
        if found is not None and found[1]:
            return True
        if timeout_s <= 0 or self.waiting >= self.max_waiters:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.waiting += 1
        try:
            with waiting_for_ingest():
                while True:
                    left = deadline - loop.time()
                    if left <= 0:
                        return False
                    if found is None:
                        # Not arrived yet: look again after the next publish.
                        await asyncio.sleep(min(left, PUBLISH_PERIOD_S))
                    else:
                        await self._until_end(found[0], left)
                    found = self.ledger.request_end(request_id, engine_id)
                    if found is not None and found[1]:
                        return True
        finally:
            self.waiting -= 1

    async def _until_end(self, key: int, timeout_s: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._by_key.setdefault(key, [])
        waiters.append(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await fut
        finally:
            left = self._by_key.get(key)
            if left is not None:
                with contextlib.suppress(ValueError):
                    left.remove(fut)
                if not left:
                    del self._by_key[key]
