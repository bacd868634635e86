"""Typed clients for the enginetime sidecar: what a session server imports.

``AccountingClient`` (blocking) and ``AsyncAccountingClient`` (asyncio) have the
same methods; both return frozen dataclasses from ``types`` and raise the typed
errors from ``errors``. Needs grpcio and protobuf only (``pip install 'enginetime[client]'``).

    from enginetime.clients import AccountingClient

    with AccountingClient("127.0.0.1:50151") as client:
        acct = client.get_request("req-42")
        print(acct.engine_time, acct.interference, acct.top_blame[:1])

The engine-time guard (``Guard`` / ``AsyncGuard`` with an ``EngineBudget``) times
proxied requests out on their engine time instead of wall-clock time; see ``guard``.
"""

from ._convert import DEFAULT_TARGET
from .async_client import AsyncAccountingClient, AsyncStream
from .budget import BudgetReason, EngineBudget, EngineBudgetExceeded
from .errors import (
    AmbiguousRequest,
    DeadlineExceeded,
    EnginetimeError,
    InvalidArgument,
    RequestNotFound,
    SidecarUnavailable,
    StreamCutOff,
    map_rpc_error,
)
from .guard import AsyncGuard, AsyncWatch, Guard, Watch, sglang_abort
from .orca import OrcaLoadReport, orca_trailer
from .sync_client import AccountingClient, Stream
from .types import (
    Advice,
    Blame,
    Coupling,
    InterferenceEvent,
    InterferencePhase,
    InterferenceVictims,
    RequestAccounting,
    RequestFilter,
    RequestPage,
    RequestState,
    ShardAdvice,
    ShardStatus,
    Storm,
    TimerSource,
    TokenCounts,
    UpdateBatch,
)

__all__ = [
    "Advice",
    "OrcaLoadReport",
    "orca_trailer",
    "ShardAdvice",
    "DEFAULT_TARGET",
    "AccountingClient",
    "AsyncAccountingClient",
    "AsyncGuard",
    "AsyncStream",
    "AsyncWatch",
    "Blame",
    "BudgetReason",
    "CancellableTransport",
    "Coupling",
    "DeadlineExceeded",
    "EngineBudget",
    "EngineBudgetExceeded",
    "EnginetimeError",
    "Guard",
    "InterferenceEvent",
    "InterferencePhase",
    "InterferenceVictims",
    "InvalidArgument",
    "RequestAccounting",
    "RequestFilter",
    "AmbiguousRequest",
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
    "Watch",
    "map_rpc_error",
    "sglang_abort",
]


def __getattr__(name: str):
    # CancellableTransport needs httpx, which the [client] extra does not require: import on demand.
    if name == "CancellableTransport":
        from .http_cancel import CancellableTransport

        return CancellableTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
