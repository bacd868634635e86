"""The ledger as each of its consumers sees it: small typed seams.

``Ledger`` has four consumers, each using a few of its public methods:

- ingest (``sidecar/ingest/server.py``) feeds it decoded records: ``IngestSink``;
- the unary API (``sidecar/api/service.py``) reads views: ``AccountingReader``;
- the fan-out (``sidecar/api/fanout.py``) takes what changed, by slot, and has it
  encoded as wire bytes: ``ChangeFeed``;
- span export and /metrics (``sidecar/telemetry/finished.py``) take each finished
  request once: ``FinishedSource``.

``SidecarLedger`` is all of them plus what the sidecar's ticker drives (``tick``,
``flush``) and reports (``counters``). Declaring the seams keeps each consumer to what
it needs and lets a test stand in for the ledger with a small fake; the ledger's
private state (its columns, its request table) stays inside ``sidecar/ledger/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
    from enginetime.sidecar.ledger.advice import AdviceView
    from enginetime.sidecar.ledger.ledger import LedgerCounters, ShardKey
    from enginetime.sidecar.ledger.store import Request
    from enginetime.sidecar.ledger.views import InterferenceView, RequestQuery, RequestView, ShardView


class IngestSink(Protocol):
    """What ingest feeds: one connection's records, in the order they arrived."""

    def connect(self, hello: Hello) -> ShardKey:
        """A recorder said hello; the key names its shard in the calls that follow."""
        ...

    def disconnect(self, key: ShardKey) -> None: ...

    def on_step(self, key: ShardKey, step: Step, pause: Callable[[bool], bool] | None = None) -> None:
        """With ``pause``, the groups it completes may be left ``parked`` between phases."""
        ...

    @property
    def parked(self) -> bool:
        """Attribution that ``on_step``'s ``pause`` stopped waits for ``resume``."""
        ...

    def resume(self, pause: Callable[[bool], bool] | None = None) -> bool:
        """Go on with parked attribution; True when none is left."""
        ...

    def on_event(self, key: ShardKey, ev: Event) -> None: ...

    def on_heartbeat(self, key: ShardKey, beat: Beat) -> None: ...

    def live_requests(self, key: ShardKey) -> int: ...

    def census(self, engine_id: str = "", shard: int = -1) -> tuple[int, int, bool, bool]: ...

    def forget_idle_engine(self, keep: str = "") -> tuple[str, int] | None: ...


class AccountingReader(Protocol):
    """What the unary API reads: immutable views of requests and shards.

    A request is (engine_id, request_id): ``get`` without ``engine_id`` raises
    ``AmbiguousRequestError`` when several engines hold the id.
    """

    def get(self, request_id: str, engine_id: str = "") -> RequestView | None: ...

    def engines_holding(self, request_id: str) -> list[str]: ...

    def query(self, q: RequestQuery, limit: int | None = None, offset: int = 0) -> list[RequestView]: ...

    def count(self, q: RequestQuery) -> int: ...

    def shards(self, engine_id: str = "") -> list[ShardView]: ...

    def advise(self, engine_id: str, session_id: str, prompt_tokens: int) -> AdviceView:
        """Where a session's next turn should run; KeyError for an unknown engine."""
        ...

    def request_end(self, request_id: str, engine_id: str) -> tuple[int, bool] | None:
        """(its key, whether it ended) for a held request; None when not held. O(1)."""
        ...

    def add_terminal_listener(self, listener: Callable[[int], None]) -> None: ...


class ChangeFeed(Protocol):
    """What the fan-out reads: requests by slot, what changed since the last take, wire bytes.

    Slots are the ledger's row numbers (int64 arrays), valid until the next ledger
    callback; ``Request`` objects are passed back to ``encode`` as they came.
    """

    def take_changed_slots(self) -> np.ndarray: ...

    def mark_changed(self, slots: np.ndarray) -> None: ...

    def select(self, q: RequestQuery) -> np.ndarray: ...

    def slots_of(self, request_ids: list[str], engine_id: str = "") -> np.ndarray: ...

    def requests_at(self, slots: np.ndarray) -> list[Request]: ...

    def ids_of(self, slots: np.ndarray) -> list[str]: ...

    def states_of(self, slots: np.ndarray) -> list[int]: ...

    def encode(self, slots: np.ndarray, reqs: list[Request] | None = None) -> list[bytes]: ...

    def take_interference(self) -> list[InterferenceView]: ...

    def get(self, request_id: str, engine_id: str = "") -> RequestView | None: ...


class FinishedSource(Protocol):
    """What span export and metrics read: each request once it reached FINISHED or ABORTED."""

    def add_terminal_listener(self, listener: Callable[[int], None]) -> None: ...

    def finished_record(self, key: int) -> tuple | None: ...


class SidecarLedger(IngestSink, AccountingReader, ChangeFeed, FinishedSource, Protocol):
    """The whole ledger as ``sidecar/server.py`` wires it: every seam, the ticker's calls, the counters."""

    @property
    def counters(self) -> LedgerCounters: ...

    def tick(self, now_ns: int | None = None) -> None: ...

    def flush(self) -> None: ...

    def save_models(self) -> None:
        """Write the cost models to ``--model-state`` (at shutdown; the ticker writes them periodically)."""
        ...

    def add_forget_listener(self, listener: Callable[[str], None]) -> None: ...


__all__ = ["AccountingReader", "ChangeFeed", "FinishedSource", "IngestSink", "SidecarLedger"]
