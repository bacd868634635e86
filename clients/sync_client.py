"""AccountingClient: the blocking client a (threaded) session server imports.

Thin on purpose: every call builds a request with ``_convert``, runs it with the
client's timeout and metadata (``_base.BaseClient``, shared with the asyncio twin),
maps gRPC errors to ``enginetime.clients.errors`` and returns frozen dataclasses.
The channel is opened lazily, on the first call. Streams are iterators that cancel their RPC when
closed, so a proxy can stop following a request without leaking a call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc

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


class Stream(Generic[T]):
    """An iterator over a server stream of typed items.

    ``close()`` (or leaving a ``with`` block, or the client's ``close()``) cancels
    the RPC; iteration then ends quietly. Errors the server sends mid-stream are
    raised as typed ``EnginetimeError``\\ s from ``next()``.
    """

    def __init__(
        self,
        call: Any,  # the RPC: a grpc.Call that iterates its messages
        convert: Callable[[Any], T],
        *,
        target: str,
        request_id: str | None = None,
        last: Callable[[T], bool] | None = None,
    ) -> None:
        self._call = call
        self._convert = convert
        self._target = target
        self._request_id = request_id
        self._last = last
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as exc:
            was_closed, self._closed = self._closed, True
            if was_closed and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None  # we cancelled it: a normal end
            raise map_rpc_error(exc, target=self._target, request_id=self._request_id) from exc
        item = self._convert(message)
        if self._last is not None and self._last(item):
            self.close()  # the item is delivered; nothing can follow it
        return item

    def close(self) -> None:
        """Cancel the RPC (idempotent, safe from another thread)."""
        with self._lock:
            self._closed = True
            self._call.cancel()

    cancel = close

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AccountingClient(BaseClient):
    """Blocking client for a sidecar's AccountingService.

    ``AccountingClient("127.0.0.1:50151")`` uses its own insecure channel (the
    sidecar serves on loopback by default), opened lazily on the first call; pass
    ``credentials=`` for TLS or ``channel=`` to share one you manage (then
    ``close()`` leaves it open). ``timeout`` bounds every unary call; streams have
    no deadline unless given one. ``metadata`` goes with every call. ``token``
    (default $ENGINETIME_API_TOKEN) is the sidecar's API token (its
    --api-token-file), sent as ``authorization: Bearer``. Safe to share between threads.

    The filtering methods take a ``RequestFilter`` as ``filter`` or its five fields
    as keywords (``states=``, ``shard=``, ``session_id=``, ``engine_id=``,
    ``request_ids=``).
    """

    def __init__(
        self,
        target: str = cv.DEFAULT_TARGET,
        *,
        timeout: float | None = 5.0,
        channel: grpc.Channel | None = None,
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
        self._lock = threading.Lock()  # opening the channel, closing

    # --- unary calls ----------------------------------------------------------------

    def get_request(
        self, request_id: str, *, engine_id: str = "", timeout: float | None = None
    ) -> RequestAccounting:
        """One request's accounting; raises RequestNotFound when the sidecar does not know it.

        ``engine_id``: the engine holding it; without it, an id that several engines
        hold raises AmbiguousRequest.
        """
        req = cv.get_request_request(request_id, engine_id)
        resp = self._unary("GetRequest", req, timeout, request_id=request_id)
        return cv.request_from_pb(resp.request)

    def list_requests(
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
        return cv.page_from_pb(self._unary("ListRequests", req, timeout))

    def iter_requests(
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
    ) -> Iterator[RequestAccounting]:
        """Every matching request, fetching pages as it goes."""
        flt = self._filter(filter, states, shard, session_id, engine_id, request_ids)
        token = ""
        while True:
            page = self.list_requests(flt, page_size=page_size, page_token=token, timeout=timeout)
            yield from page.requests
            token = page.next_page_token
            if not token:
                return

    def get_shards(self, engine_id: str = "", *, timeout: float | None = None) -> list[ShardStatus]:
        """Every shard the sidecar knows (of one engine when engine_id is given)."""
        resp = self._unary("GetShards", pb.GetShardsRequest(engine_id=engine_id), timeout)
        return [cv.shard_from_pb(s) for s in resp.shards]

    def request_cost(
        self, request_id: str, *, engine_id: str = "", timeout: float | None = None
    ) -> OrcaLoadReport:
        """The request's cost and its engine's load as an ORCA ``OrcaLoadReport`` (docs/ORCA.md).

        ``request_cost`` holds engine_time, gpu_time, interference and queue_time in seconds.
        A proxy attaches it to the request's response with ``orca_trailer(report)``.
        Raises RequestNotFound / AmbiguousRequest like ``get_request``.
        """
        req = cv.get_request_cost_request(request_id, engine_id)
        resp = self._unary("GetRequestCost", req, timeout, request_id=request_id)
        return resp.report

    def advise(
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
        resp = self._unary("Advise", req, timeout)
        return cv.advice_from_pb(resp.advice)

    # --- streams --------------------------------------------------------------------

    def watch_request(
        self,
        request_id: str,
        *,
        engine_id: str = "",
        min_interval: float = 0.1,
        timeout: float | None = None,
    ) -> Stream[RequestAccounting]:
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
    ) -> Stream[UpdateBatch]:
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
    ) -> Stream[InterferenceEvent]:
        """Storms as they start, grow and end (only those whose victims lost >= min_stall seconds)."""
        req = cv.stream_interference_request(engine_id=engine_id, shard=shard, min_stall=min_stall)
        return self._stream("StreamInterference", req, timeout, lambda m: cv.interference_from_pb(m.event))

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Cancel open streams and close the channel (unless it was passed in)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for stream in list(self._streams):
            stream.close()
        if self._owns_channel and self._channel is not None:
            self._channel.close()

    def __enter__(self) -> AccountingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------

    def _get_stub(self) -> pb_grpc.AccountingServiceStub:
        """The stub, opening the channel on first use; EnginetimeError once closed."""
        self._check_open()
        stub = self._stub
        if stub is None:
            with self._lock:
                self._check_open()
                if self._stub is None:
                    options = self._channel_options()
                    if self._credentials is not None:
                        self._channel = grpc.secure_channel(self.target, self._credentials, options=options)
                    else:
                        self._channel = grpc.insecure_channel(self.target, options=options)
                    self._stub = pb_grpc.AccountingServiceStub(self._channel)
                stub = self._stub
        return stub

    def _unary(
        self, method: str, request: Any, timeout: float | None, *, request_id: str | None = None
    ) -> Any:
        rpc = getattr(self._get_stub(), method)
        deadline = self._unary_deadline(timeout)
        try:
            return rpc(request, timeout=deadline, metadata=self._metadata)
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
    ) -> Stream[T]:
        """Start the server stream ``method`` now and follow it (``close()`` cancels it)."""
        deadline = self._stream_deadline(timeout)
        call = getattr(self._get_stub(), method)(request, timeout=deadline, metadata=self._metadata)
        stream = Stream(call, convert, target=self.target, request_id=request_id, last=last)
        self._streams.add(stream)
        return stream
