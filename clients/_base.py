"""What the blocking and the asyncio client share: arguments, metadata, deadlines, closed state, repr.

As in httpx (``BaseClient`` under ``Client`` and ``AsyncClient``), everything that
does no I/O is written once here; ``AccountingClient`` and ``AsyncAccountingClient``
add the calls as explicit twins (same names, same arguments, one blocking, one
``async``), so each reads top to bottom without indirection.

Both open their channel lazily, on the first call: an asyncio channel belongs to
the event loop that is running when it is created, so the asyncio client cannot
open one at construction time (it may be built at import or configuration time),
and the blocking client does the same so the two behave alike. A channel passed in
with ``channel=`` is used as given and left open by ``close()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import grpc

from enginetime.v1 import accounting_pb2_grpc as pb_grpc

from . import _convert as cv
from .errors import EnginetimeError
from .types import RequestFilter, States


class BaseClient:
    """Settings and state common to both clients; see ``AccountingClient`` for the arguments."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        channel: Any,
        metadata: cv.Metadata,
        credentials: grpc.ChannelCredentials | None,
        token: str | None = None,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either channel= or credentials=, not both: a given channel has its own")
        self.target = target
        self.timeout = cv.check_timeout(timeout)
        self._metadata = cv.with_token(cv.normalize_metadata(metadata), token)
        self._credentials = credentials
        self._owns_channel = channel is None
        self._channel = channel
        self._stub: pb_grpc.AccountingServiceStub | None = (
            pb_grpc.AccountingServiceStub(channel) if channel is not None else None
        )
        #: Open streams, cancelled by close().
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (a closed client refuses further calls)."""
        return self._closed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}{', closed' if self._closed else ''})"

    # --- plumbing shared by the twins ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnginetimeError(f"this {type(self).__name__} for {self.target} is closed; create a new one")

    def _unary_deadline(self, timeout: float | None) -> float | None:
        """A unary call's deadline: the call's ``timeout=``, else the client's."""
        return cv.check_timeout(timeout) if timeout is not None else self.timeout

    @staticmethod
    def _stream_deadline(timeout: float | None) -> float | None:
        """A stream's deadline: only the call's ``timeout=`` (streams are long-lived by default)."""
        return cv.check_timeout(timeout)

    @staticmethod
    def _channel_options() -> list[tuple[str, int]]:
        return list(cv.CHANNEL_OPTIONS)

    @staticmethod
    def _filter(
        flt: RequestFilter | None,
        states: States,
        shard: int | None,
        session_id: str,
        engine_id: str,
        request_ids: Iterable[str],
    ) -> RequestFilter:
        """The filter a call asked for, as ``filter=`` or as the five keywords (not both)."""
        return cv.merge_filter(flt, states, shard, session_id, engine_id, request_ids)


__all__ = ["BaseClient"]
