"""Typed clients for the enginetime sidecar: what a session server imports.

``AccountingClient`` (blocking) and ``AsyncAccountingClient`` (asyncio) have the
same methods; both return frozen dataclasses from ``types`` and raise the typed
errors from ``errors``. Needs grpcio and protobuf only (``pip install 'enginetime[client]'``).

    from enginetime.clients import AccountingClient

    with AccountingClient("127.0.0.1:50151") as client:
        acct = client.get_request("req-42")
        print(acct.engine_time, acct.interference, acct.top_blame[:1])
"""

from ._convert import DEFAULT_TARGET
from .async_client import AsyncAccountingClient, AsyncStream
from .errors import (
    DeadlineExceeded,
    EnginetimeError,
    InvalidArgument,
    RequestNotFound,
    SidecarUnavailable,
    StreamCutOff,
    map_rpc_error,
)
from .sync_client import AccountingClient, Stream
from .types import (
    Blame,
    Coupling,
    InterferenceEvent,
    InterferencePhase,
    InterferenceVictims,
    RequestAccounting,
    RequestPage,
    RequestState,
    ShardStatus,
    Storm,
    TimerSource,
    TokenCounts,
    UpdateBatch,
)

__all__ = [
    "DEFAULT_TARGET",
    "AccountingClient",
    "AsyncAccountingClient",
    "AsyncStream",
    "Blame",
    "Coupling",
    "DeadlineExceeded",
    "EnginetimeError",
    "InterferenceEvent",
    "InterferencePhase",
    "InterferenceVictims",
    "InvalidArgument",
    "RequestAccounting",
    "RequestNotFound",
    "RequestPage",
    "RequestState",
    "ShardStatus",
    "SidecarUnavailable",
    "Storm",
    "Stream",
    "StreamCutOff",
    "TimerSource",
    "TokenCounts",
    "UpdateBatch",
    "map_rpc_error",
]
