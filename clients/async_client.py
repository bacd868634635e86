"""AsyncAccountingClient: the asyncio twin of AccountingClient (same method names).

For asyncio session servers (FastAPI, aiohttp, an httpx.AsyncClient proxy). The
channel is created on first use, inside the running event loop, so the client
can be built at import or configuration time like an ``httpx.AsyncClient``
(``AccountingClient`` opens its channel lazily too; see ``_base``). Streams start
their RPC on first iteration and cancel it when closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from enginetime.orca.orca_load_report_pb2 import OrcaLoadReport
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc

from . import _convert as cv
from ._base import BaseClient
from .errors import map_rpc_error
from .types import (
    Advice,
    InterferenceEvent,
    RequestAccounting,
    RequestFilter,
    RequestPage,
    ShardStatus,
    States,
    UpdateBatch,
)

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """An async iterator over a server stream of typed items.

    ``await aclose()`` (or ``cancel()``, leaving ``async with``, or the client's
    ``close()``) cancels the RPC; iteration then ends quietly. Errors the server
    sends mid-stream are raised as typed ``EnginetimeError``\\ s.
    """

    def __init__(
        self,
        start: Callable[[], grpc.aio.UnaryStreamCall],
        convert: Callable[[Any], T],
        *,
        target: str,
        request_id: str | None = None,
        last: Callable[[T], bool] | None = None,
    ) -> None:
        self._start = start
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._convert = convert
        self._target = target
        self._request_id = request_id
        self._last = last
        self._closed = False

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._start()
        try:
            message = await self._call.read()
        except asyncio.CancelledError:
            if self._closed:  # our own cancel() while we were waiting: a normal end
                raise StopAsyncIteration from None
            raise  # the task reading us was cancelled: let it unwind
        except grpc.RpcError as exc:
            was_closed, self._closed = self._closed, True
            if was_closed and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise map_rpc_error(exc, target=self._target, request_id=self._request_id) from exc
        if message is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        item = self._convert(message)
        if self._last is not None and self._last(item):
            self.cancel()  # the item is delivered; nothing can follow it
        return item

    def cancel(self) -> None:
        """Cancel the RPC now (idempotent; callable from sync code in the loop's thread)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    close = aclose

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncAccountingClient(BaseClient):
    """Asyncio client for a sidecar's AccountingService; see AccountingClient for the arguments.

    The twin of ``AccountingClient``: the same methods with the same arguments.
    Unary methods are coroutines; stream methods return an ``AsyncStream`` at once
    (``async for u in client.watch_request(rid): ...``). The channel is opened
    lazily, on the first call, inside the running event loop.
    """

    def __init__(
        self,
        target: str = cv.DEFAULT_TARGET,
        *,
        timeout: float | None = 5.0,
        channel: grpc.aio.Channel | None = None,
        metadata: cv.Metadata = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            channel=channel,
            metadata=metadata,
            credentials=credentials,
            token=token,
        )

    # --- unary calls ----------------------------------------------------------------

    async def get_request(
        self, request_id: str, *, engine_id: str = "", timeout: float | None = None
    ) -> RequestAccounting:
        """One request's accounting; raises RequestNotFound when the sidecar does not know it.

        ``engine_id``: the engine holding it; without it, an id that several engines
        hold raises AmbiguousRequest.
        """
        req = cv.get_request_request(request_id, engine_id)
        resp = await self._unary("GetRequest", req, timeout, request_id=request_id)
        return cv.request_from_pb(resp.request)

    async def list_requests(
        self,
        filter: RequestFilter | None = None,
        *,
        states: States = (),
        shard: int | None = None,
        session_id: str = "",
        engine_id: str = "",
        request_ids: Iterable[str] = (),
        page_size: int = 100,
        page_token: str = "",
        timeout: float | None = None,
    ) -> RequestPage:
        """One page of requests matching every given filter, newest arrival first."""
        flt = self._filter(filter, states, shard, session_id, engine_id, request_ids)
        req = cv.list_requests_request(flt, page_size=page_size, page_token=page_token)
        return cv.page_from_pb(await self._unary("ListRequests", req, timeout))

    async def iter_requests(
        self,
        filter: RequestFilter | None = None,
        *,
        states: States = (),
        shard: int | None = None,
        session_id: str = "",
        engine_id: str = "",
        request_ids: Iterable[str] = (),
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[RequestAccounting]:
        """Every matching request, fetching pages as it goes."""
        flt = self._filter(filter, states, shard, session_id, engine_id, request_ids)
        token = ""
        while True:
            page = await self.list_requests(flt, page_size=page_size, page_token=token, timeout=timeout)
            for request in page.requests:
                yield request
            token = page.next_page_token
            if not token:
                return

    async def get_shards(self, engine_id: str = "", *, timeout: float | None = None) -> list[ShardStatus]:
        """Every shard the sidecar knows (of one engine when engine_id is given)."""
        resp = await self._unary("GetShards", pb.GetShardsRequest(engine_id=engine_id), timeout)
        return [cv.shard_from_pb(s) for s in resp.shards]

    async def request_cost(
        self, request_id: str, *, engine_id: str = "", timeout: float | None = None
    ) -> OrcaLoadReport:
        """The request's cost and its engine's load as an ORCA ``OrcaLoadReport`` (docs/ORCA.md).

        ``request_cost`` holds engine_time, gpu_time, interference and queue_time in seconds.
        A proxy attaches it to the request's response with ``orca_trailer(report)``.
        Raises RequestNotFound / AmbiguousRequest like ``get_request``.
        """
        req = cv.get_request_cost_request(request_id, engine_id)
        resp = await self._unary("GetRequestCost", req, timeout, request_id=request_id)
        return resp.report

    async def advise(
        self,
        *,
        engine_id: str,
        session_id: str = "",
        prompt_tokens: int,
        after_request_id: str = "",
        max_wait: float | None = None,
        timeout: float | None = None,
    ) -> Advice:
        """Where to send ``session_id``'s next turn of ``prompt_tokens`` on ``engine_id``, and why.

        Send the turn to ``advice.recommended_shard`` (SGLang: ``routed_dp_rank``).
        ``after_request_id``: the session's previous turn; the sidecar answers once it has
        seen that request end (the engine's hooks report a few ms behind the engine), or
        after ``max_wait`` seconds (default 0.25, at most 2) with ``after_request_seen`` False.
        """
        req = cv.advise_request(engine_id, session_id, prompt_tokens, after_request_id, max_wait)
        resp = await self._unary("Advise", req, timeout)
        return cv.advice_from_pb(resp.advice)

    # --- streams --------------------------------------------------------------------

    def watch_request(
        self,
        request_id: str,
        *,
        engine_id: str = "",
        min_interval: float = 0.1,
        timeout: float | None = None,
    ) -> AsyncStream[RequestAccounting]:
        """The request's accounting as it changes; the iterator ends after the terminal update."""
        req = cv.watch_request_request(request_id, min_interval, engine_id)
        return self._stream(
            "WatchRequest",
            req,
            timeout,
            lambda m: cv.request_from_pb(m.request),
            request_id=request_id,
            last=lambda r: r.state.terminal,
        )

    def stream_updates(
        self,
        filter: RequestFilter | None = None,
        *,
        states: States = (),
        shard: int | None = None,
        session_id: str = "",
        engine_id: str = "",
        request_ids: Iterable[str] = (),
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> AsyncStream[UpdateBatch]:
        """Coalesced batches of changed requests matching the filter, every ``interval`` seconds."""
        flt = self._filter(filter, states, shard, session_id, engine_id, request_ids)
        req = cv.stream_updates_request(flt, interval=interval)
        return self._stream("StreamUpdates", req, timeout, cv.batch_from_pb)

    def stream_interference(
        self,
        *,
        engine_id: str = "",
        shard: int | None = None,
        min_stall: float | None = None,
        timeout: float | None = None,
    ) -> AsyncStream[InterferenceEvent]:
        """Storms as they start, grow and end (only those whose victims lost >= min_stall seconds)."""
        req = cv.stream_interference_request(engine_id=engine_id, shard=shard, min_stall=min_stall)
        return self._stream("StreamInterference", req, timeout, lambda m: cv.interference_from_pb(m.event))

    # --- lifecycle ------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel open streams and close the channel (unless it was passed in)."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            stream.cancel()
        if self._owns_channel and self._channel is not None:
            await self._channel.close()

    aclose = close

    async def __aenter__(self) -> AsyncAccountingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- plumbing -------------------------------------------------------------------

    def _get_stub(self) -> pb_grpc.AccountingServiceStub:
        """The stub, opening the channel on first use (in the running loop); EnginetimeError once closed."""
        self._check_open()
        if self._stub is None:
            options = self._channel_options()
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            self._stub = pb_grpc.AccountingServiceStub(self._channel)
        return self._stub

    async def _unary(
        self, method: str, request: Any, timeout: float | None, *, request_id: str | None = None
    ) -> Any:
        rpc = getattr(self._get_stub(), method)
        deadline = self._unary_deadline(timeout)
        try:
            return await rpc(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, target=self.target, request_id=request_id) from exc

    def _stream(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        convert: Callable[[Any], T],
        *,
        request_id: str | None = None,
        last: Callable[[T], bool] | None = None,
    ) -> AsyncStream[T]:
        """Follow the server stream ``method``, started on first iteration (``cancel()`` ends it)."""
        deadline = self._stream_deadline(timeout)
        self._check_open()  # the "closed" error now, not on first iteration

        def start() -> grpc.aio.UnaryStreamCall:
            return getattr(self._get_stub(), method)(request, timeout=deadline, metadata=self._metadata)

        stream = AsyncStream(start, convert, target=self.target, request_id=request_id, last=last)
        self._streams.add(stream)
        return stream
