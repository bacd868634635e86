"""AccountingClient: the blocking client a (threaded) session server imports.

Thin on purpose: every call builds a request with ``_convert``, runs it with the
client's timeout and metadata, maps gRPC errors to ``enginetime.clients.errors``
and returns frozen dataclasses. Streams are iterators that cancel their RPC when
closed, so a proxy can stop following a request without leaking a call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import grpc

from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc

from . import _convert as cv
from .errors import EnginetimeError, map_rpc_error
from .types import (
    InterferenceEvent,
    RequestAccounting,
    RequestPage,
    RequestState,
    ShardStatus,
    UpdateBatch,
)

T = TypeVar("T")

States = Iterable[RequestState | str | int] | RequestState | str


class Stream(Generic[T]):
    """An iterator over a server stream of typed items.

    ``close()`` (or leaving a ``with`` block, or the client's ``close()``) cancels
    the RPC; iteration then ends quietly. Errors the server sends mid-stream are
    raised as typed ``EnginetimeError``\\ s from ``next()``.
    """

    def __init__(
        self,
        call: grpc.Call,
        convert: Callable[[object], T],
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


class AccountingClient:
    """Blocking client for a sidecar's AccountingService.

    ``AccountingClient("127.0.0.1:50151")`` opens its own insecure channel (the
    sidecar serves on loopback by default); pass ``credentials=`` for TLS or
    ``channel=`` to share one you manage (then ``close()`` leaves it open).
    ``timeout`` bounds every unary call; streams have no deadline unless given one.
    ``metadata`` (e.g. ``{"authorization": "Bearer ..."}``) goes with every call.
    """

    def __init__(
        self,
        target: str = cv.DEFAULT_TARGET,
        *,
        timeout: float | None = 5.0,
        channel: grpc.Channel | None = None,
        metadata: cv.Metadata = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either channel= or credentials=, not both: a given channel has its own")
        self.target = target
        self.timeout = cv.check_timeout(timeout)
        self._metadata = cv.normalize_metadata(metadata)
        self._owns_channel = channel is None
        if channel is None:
            options = list(cv.CHANNEL_OPTIONS)
            if credentials is not None:
                channel = grpc.secure_channel(target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self._channel = channel
        self._stub = pb_grpc.AccountingServiceStub(channel)
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._closed = False

    # --- unary calls ----------------------------------------------------------------

    def get_request(
        self, request_id: str, *, engine_id: str = "", timeout: float | None = None
    ) -> RequestAccounting:
        """One request's accounting; raises RequestNotFound when the sidecar does not know it.

        ``engine_id``: the engine holding it; without it, an id that several engines
        hold raises AmbiguousRequest.
        """
        req = cv.get_request_request(request_id, engine_id)
        resp = self._unary(self._stub.GetRequest, req, timeout, request_id=request_id)
        return cv.request_from_pb(resp.request)

    def list_requests(
        self,
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
        req = cv.list_requests_request(
            states=states,
            shard=shard,
            session_id=session_id,
            engine_id=engine_id,
            request_ids=request_ids,
            page_size=page_size,
            page_token=page_token,
        )
        return cv.page_from_pb(self._unary(self._stub.ListRequests, req, timeout))

    def iter_requests(
        self,
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
        token = ""
        while True:
            page = self.list_requests(
                states=states,
                shard=shard,
                session_id=session_id,
                engine_id=engine_id,
                request_ids=request_ids,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.requests
            token = page.next_page_token
            if not token:
                return

    def get_shards(self, engine_id: str = "", *, timeout: float | None = None) -> list[ShardStatus]:
        """Every shard the sidecar knows (of one engine when engine_id is given)."""
        resp = self._unary(self._stub.GetShards, pb.GetShardsRequest(engine_id=engine_id), timeout)
        return [cv.shard_from_pb(s) for s in resp.shards]

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
        call = self._open_stream(self._stub.WatchRequest, req, timeout)
        return self._track(
            Stream(
                call,
                lambda m: cv.request_from_pb(m.request),
                target=self.target,
                request_id=request_id,
                last=lambda r: r.state.terminal,
            )
        )

    def stream_updates(
        self,
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
        req = cv.stream_updates_request(
            states=states,
            shard=shard,
            session_id=session_id,
            engine_id=engine_id,
            request_ids=request_ids,
            interval=interval,
        )
        call = self._open_stream(self._stub.StreamUpdates, req, timeout)
        return self._track(Stream(call, cv.batch_from_pb, target=self.target))

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
        call = self._open_stream(self._stub.StreamInterference, req, timeout)
        return self._track(Stream(call, lambda m: cv.interference_from_pb(m.event), target=self.target))

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Cancel open streams and close the channel (unless it was passed in)."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            stream.close()
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> AccountingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AccountingClient({self.target!r}{', closed' if self._closed else ''})"

    # --- plumbing -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnginetimeError(f"this AccountingClient for {self.target} is closed; create a new one")

    def _unary(self, method, request, timeout: float | None, *, request_id: str | None = None):
        self._check_open()
        deadline = cv.check_timeout(timeout) if timeout is not None else self.timeout
        try:
            return method(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, target=self.target, request_id=request_id) from exc

    def _open_stream(self, method, request, timeout: float | None):
        self._check_open()
        return method(request, timeout=cv.check_timeout(timeout), metadata=self._metadata)

    def _track(self, stream: Stream[T]) -> Stream[T]:
        self._streams.add(stream)
        return stream
