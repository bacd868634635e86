"""AccountingService (enginetime.v1) on grpc.aio: every RPC of accounting.proto.

Unary calls read the ledger directly (it lives in the same event loop, so a
call sees a consistent snapshot). Streams are subscribers of the fan-out
(sidecar.fanout): they wait for changes, respect their interval, and write
with a lag limit; a stream whose client stopped reading is cut off with
RESOURCE_EXHAUSTED instead of holding memory or slowing anything else.

Behaviour worth knowing as a client:
- StreamUpdates sends a first batch at once: the current state of every
  matching request that is still live (for an explicit ``request_ids`` filter:
  of each of those ids the sidecar knows, in any state). It may be empty; it
  tells the client the subscription is in place. Later batches carry the
  latest accounting of each matching request that changed since the previous
  batch. Batches are split into responses of at most ``fanout.MAX_RESPONSE_BYTES``.
- ListRequests pages by offset into the newest-first list; the page token is
  opaque, bound to the filter, and INVALID_ARGUMENT when it does not fit.
- StreamInterference(shard=N) passes storms whose aggressor ran on shard N or
  whose victims include shard N.
- Advise with ``after_request_id`` first waits, bounded by ``max_wait``, until the
  ledger has recorded that request's end (``endwaits``); the advice says whether it had.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
import zlib
from typing import NoReturn

import grpc

from enginetime.sidecar.api import convert, orca
from enginetime.sidecar.api.endwaits import DEFAULT_WAIT_S, MAX_WAIT_S, EndWaits
from enginetime.sidecar.api.fanout import FanOut, InterferenceFilter, RequestSubscriber
from enginetime.sidecar.config import LedgerConfig
from enginetime.sidecar.ingest.limits import MAX_TEXT_BYTES, clip_text, quote
from enginetime.sidecar.ledger.advice import AdviceView
from enginetime.sidecar.ledger.protocols import AccountingReader
from enginetime.sidecar.ledger.views import AmbiguousRequestError, RequestQuery, RequestState, RequestView
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc

log = logging.getLogger("enginetime.sidecar.api.service")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_INTERVAL_S = 0.1
#: Shortest interval a stream may ask for (the fan-out publishes every 25 ms anyway).
MIN_INTERVAL_S = 0.01
#: How often an idle WatchRequest checks that its request is still in the store.
_EVICTION_CHECK_S = 2.0

_LIVE = frozenset({RequestState.QUEUED, RequestState.RUNNING, RequestState.PREEMPTED})
_ALL_STATES = frozenset(s for s in RequestState if s is not RequestState.UNSPECIFIED)


class _Abort(Exception):
    """Raised inside a handler to end the RPC with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, which ends the RPC by raising; typed so the checker knows it does not return."""
    await context.abort(code, details)
    raise AssertionError("context.abort returned")


def _now_ts():
    return convert.timestamp(time.time_ns())


class AccountingService(pb_grpc.AccountingServiceServicer):
    """Serves the ledger over gRPC; see the module doc for stream semantics."""

    def __init__(
        self,
        ledger: AccountingReader,
        fanout: FanOut,
        config: LedgerConfig | None = None,
        *,
        max_text_bytes: int = MAX_TEXT_BYTES,
    ) -> None:
        self.ledger = ledger
        self.fanout = fanout
        #: The ledger's bounds: what NOT_FOUND explains, and the storm threshold streams filter by.
        self.config = config = config or LedgerConfig()
        self.storm_threshold_ns = int(config.storm_threshold_s * 1e9)
        #: Ids longer than this were stored clipped (ingest's --max-text-bytes); look them up alike.
        self.max_text_bytes = max_text_bytes
        #: Advise's after_request_id: waits for a request's end, bounded (endwaits).
        self.end_waits = EndWaits(ledger)

    # -- unary ------------------------------------------------------------------------------

    async def _find(self, request_id: str, engine_id: str, context) -> RequestView:
        """The request a unary lookup names, or the call aborted with what to do instead."""
        rid = clip_text(request_id, self.max_text_bytes)  # the rule ingest stored it by
        if not rid:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id is empty: pass the id the engine knows the request by "
                "(SGLang rid, vLLM request_id)",
            )
        try:
            view = self.ledger.get(rid, engine_id)
        except AmbiguousRequestError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if view is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(rid, engine_id))
        return view

    async def GetRequest(self, request: pb.GetRequestRequest, context) -> pb.GetRequestResponse:
        view = await self._find(request.request_id, request.engine_id, context)
        return pb.GetRequestResponse(request=convert.request_to_proto(view))

    async def GetRequestCost(self, request: pb.GetRequestCostRequest, context) -> pb.GetRequestCostResponse:
        """GetRequest's lookup, answered as an ORCA report (``sidecar.api.orca``)."""
        view = await self._find(request.request_id, request.engine_id, context)
        return pb.GetRequestCostResponse(
            report=orca.request_cost_report(view, self.ledger.shards(view.engine_id))
        )

    async def ListRequests(self, request: pb.ListRequestsRequest, context) -> pb.ListRequestsResponse:
        try:
            query = convert.query_from_proto(request.filter, self.max_text_bytes)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        fingerprint = zlib.crc32(request.filter.SerializeToString(deterministic=True))
        try:
            offset = _decode_page_token(request.page_token, fingerprint)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            views = self.ledger.query(query, limit=page_size, offset=offset)
            total = self.ledger.count(query)
        except AmbiguousRequestError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        end = offset + len(views)
        resp = pb.ListRequestsResponse(total_size=total)
        resp.requests.extend(convert.request_to_proto(v) for v in views)
        if views and end < total:
            resp.next_page_token = _encode_page_token(end, fingerprint)
        return resp

    async def GetShards(self, request: pb.GetShardsRequest, context) -> pb.GetShardsResponse:
        resp = pb.GetShardsResponse()
        resp.shards.extend(convert.shard_to_proto(v) for v in self.ledger.shards(request.engine_id))
        return resp

    async def Advise(self, request: pb.AdviseRequest, context) -> pb.AdviseResponse:
        engine_id = clip_text(request.engine_id, self.max_text_bytes)
        if not engine_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "engine_id is empty: name the engine the turn is for (the engine id its hooks report; "
                "GetShards lists them)",
            )
        if request.prompt_tokens <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "prompt_tokens is 0: pass the turn's whole prompt length in tokens (history included)",
            )
        session_id = clip_text(request.session_id, self.max_text_bytes)
        after = clip_text(request.after_request_id, self.max_text_bytes)
        seen = False
        if after:
            wait_s = min(await self._seconds(context, request, "max_wait", DEFAULT_WAIT_S), MAX_WAIT_S)
            ended = self.ledger.request_end(after, engine_id)
            if ended is None or not ended[1]:
                # About to wait: an engine it could never advise on fails now, not after max_wait.
                await self._advice(engine_id, session_id, request.prompt_tokens, context)
            seen = await self.end_waits.wait_ended(after, engine_id, wait_s)
        view = await self._advice(engine_id, session_id, request.prompt_tokens, context)
        msg = convert.advice_to_proto(view)
        if after:
            msg.after_request_seen = seen
            if not seen:
                msg.reason += (
                    f" (request {quote(after)} had not ended here when this advice was made: it may "
                    "not know that turn yet; the engine's hooks may lag, or the id is not this engine's)"
                )
        return pb.AdviseResponse(advice=msg)

    async def _advice(self, engine_id: str, session_id: str, prompt_tokens: int, context) -> AdviceView:
        """``Ledger.advise``, or the call aborted with what to do instead."""
        try:
            return self.ledger.advise(engine_id, session_id, prompt_tokens)
        except KeyError:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"engine {quote(engine_id)} is not known to this sidecar: no recorder with that engine id "
                "has connected; check the id (GetShards lists the engines) and the engine's "
                "ENGINETIME_INGEST",
            )
        except ValueError as exc:
            await _abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"{exc}; wait for its recorders to reconnect"
            )

    # -- streams ----------------------------------------------------------------------------

    async def WatchRequest(self, request: pb.WatchRequestRequest, context) -> None:
        rid = clip_text(request.request_id, self.max_text_bytes)  # the rule ingest stored it by
        if not rid:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty: name the request to watch"
            )
        interval = await self._interval(context, request, "min_interval")
        try:
            view = self.ledger.get(rid, request.engine_id)
        except AmbiguousRequestError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if view is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(rid, request.engine_id))
        # The watch follows this engine's request, even if another engine later takes the id.
        engine_id = view.engine_id
        sub = self.fanout.subscribe_requests(RequestQuery(request_ids=frozenset((rid,)), engine_id=engine_id))
        lag = self.fanout.limits.lag_limit(interval)
        try:
            await self._write(context, pb.WatchRequestResponse(request=convert.request_to_proto(view)), lag)
            if view.state.terminal:
                return
            sent_version = view.version
            last_send = time.monotonic()
            while True:
                await sub.wait(_EVICTION_CHECK_S)
                if sub.closed is not None and not sub.pending:
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, sub.closed)
                if not sub.pending:
                    if self.ledger.get(rid, engine_id) is None:
                        raise _Abort(grpc.StatusCode.NOT_FOUND, self._evicted(rid))
                    continue
                await _sleep_until(last_send + interval, sub)
                sub.drain()
                current = self.fanout.current([rid], engine_id)
                if not current:
                    raise _Abort(grpc.StatusCode.NOT_FOUND, self._evicted(rid))
                view, message = current[0]
                if view.version == sent_version and not view.state.terminal:
                    continue
                await self._write(context, pb.WatchRequestResponse(request=message), lag)
                sent_version = view.version
                last_send = time.monotonic()
                if view.state.terminal:
                    return
        except _Abort as stop:
            await context.abort(stop.code, stop.details)
        except asyncio.CancelledError:
            if not self.fanout.closing:
                raise
            # The server stopped after its grace period with this stream's write still blocked (a
            # client that stopped reading): the end of the RPC, not an error worth a traceback.
            log.info("grpc: a stream to %s was still blocked at shutdown; closed", _peer(context))
        finally:
            self.fanout.unsubscribe(sub)

    async def StreamUpdates(self, request: pb.StreamUpdatesRequest, context) -> None:
        try:
            query = convert.query_from_proto(request.filter, self.max_text_bytes)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        interval = await self._interval(context, request, "interval")
        if query.request_ids and not query.engine_id:
            for rid in sorted(query.request_ids):
                engines = self.ledger.engines_holding(rid)
                if len(engines) > 1:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION, str(AmbiguousRequestError(rid, engines))
                    )
        sub = self.fanout.subscribe_requests(query)
        lag = self.fanout.limits.lag_limit(interval)
        try:
            last_send = time.monotonic()
            await self._send(context, sub, await self._initial(query) or [b""], lag)
            while True:
                await sub.wait(None)
                if sub.overflow:
                    raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._overflowed(sub))
                if sub._has_work() and sub.closed is None:
                    await _sleep_until(last_send + interval, sub)
                if sub._has_work():
                    bodies = self.fanout.take(sub)
                    if bodies:
                        # The interval runs from when a batch is taken, not from when its writes
                        # finished: a slow write must not stretch the cadence (and the lag).
                        last_send = time.monotonic()
                        await self._send(context, sub, bodies, lag)
                sub.due_at = last_send + interval
                if sub.overflow:
                    raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._overflowed(sub))
                if sub.closed is not None and not sub._has_work():
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, sub.closed)
        except _Abort as stop:
            await context.abort(stop.code, stop.details)
        except asyncio.CancelledError:
            if not self.fanout.closing:
                raise
            # The server stopped after its grace period with this stream's write still blocked (a
            # client that stopped reading): the end of the RPC, not an error worth a traceback.
            log.info("grpc: a stream to %s was still blocked at shutdown; closed", _peer(context))
        finally:
            self.fanout.unsubscribe(sub)

    async def StreamInterference(self, request: pb.StreamInterferenceRequest, context) -> None:
        if request.HasField("min_stall"):
            min_stall_ns = convert.duration_ns(request.min_stall)
            if min_stall_ns < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_stall must not be negative")
        else:
            min_stall_ns = self.storm_threshold_ns
        flt = InterferenceFilter(
            engine_id=request.engine_id,
            shard=request.shard if request.HasField("shard") else None,
            min_stall_ns=min_stall_ns,
        )
        sub = self.fanout.subscribe_interference(flt)
        lag = self.fanout.limits.lag_limit(DEFAULT_INTERVAL_S)
        try:
            while True:
                await sub.wait(None)
                for event in sub.drain():
                    await self._write(context, pb.StreamInterferenceResponse(event=event), lag)
                if sub.overflow:
                    raise _Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {sub.max_pending} interference events piled up unsent for this stream "
                        "(the client reads too slowly); reconnect and read continuously, or raise the "
                        "sidecar's --subscriber-queue",
                    )
                if sub.closed is not None and not sub.queue:
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, sub.closed)
        except _Abort as stop:
            await context.abort(stop.code, stop.details)
        except asyncio.CancelledError:
            if not self.fanout.closing:
                raise
            # The server stopped after its grace period with this stream's write still blocked (a
            # client that stopped reading): the end of the RPC, not an error worth a traceback.
            log.info("grpc: a stream to %s was still blocked at shutdown; closed", _peer(context))
        finally:
            self.fanout.unsubscribe(sub)

    # -- helpers ----------------------------------------------------------------------------

    async def _initial(self, query: RequestQuery) -> list[bytes]:
        """The first StreamUpdates batch: matching live requests (or the named ids, any state)."""
        if not query.request_ids:
            states = (query.states or _ALL_STATES) & _LIVE
            if not states:
                return []
            query = dataclasses.replace(query, states=frozenset(states))
        return await self.fanout.initial(query)

    async def _send(self, context, sub: RequestSubscriber, bodies: list[bytes], lag: float) -> None:
        """One StreamUpdatesResponse per body (joined RequestAccounting frames) plus its own fields."""
        tail = pb.StreamUpdatesResponse(time=_now_ts(), coalesced=sub.coalesced).SerializeToString()
        sub.writing = True
        try:
            for body in bodies:
                await self._write(context, body + tail, lag)
        finally:
            sub.writing = False

    async def _write(self, context, message, lag: float) -> None:
        """Write one response; a write still blocked after ``lag`` seconds cuts the stream off."""
        try:
            await asyncio.wait_for(context.write(message), lag)
        except TimeoutError:
            self.fanout.cut_off += 1
            log.warning(
                "grpc: cut off a stream to %s: its client read nothing for %.1f s", _peer(context), lag
            )
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this stream fell behind: the client did not read its updates for {lag:.1f} s, so the "
                "sidecar cut it off rather than buffer without bound. Read the stream continuously (keep "
                "slow work out of the read loop), use a longer interval or a narrower filter, then "
                "reconnect; the sidecar's --lag-limit sets this limit",
            ) from None

    async def _interval(self, context, request, field: str) -> float:
        return max(await self._seconds(context, request, field, DEFAULT_INTERVAL_S), MIN_INTERVAL_S)

    async def _seconds(self, context, request, field: str, default: float) -> float:
        """A Duration field in seconds: ``default`` when unset or zero; INVALID_ARGUMENT when negative."""
        if not request.HasField(field):
            return default
        ns = convert.duration_ns(getattr(request, field))
        if ns < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must not be negative")
        return ns / 1e9 if ns else default

    def _not_found(self, rid: str, engine_id: str = "") -> str:
        if engine_id:
            others = [e for e in self.ledger.engines_holding(rid) if e != engine_id]
            if others:
                return (
                    f"engine {engine_id!r} holds no request {rid!r} (engines holding that id: "
                    f"{', '.join(repr(e) for e in others)}); check the engine_id"
                )
        return (
            f"request {quote(rid)} is not known to this sidecar: no engine reporting here has announced "
            f"it, or it ended more than {self.config.retention_s:g} s ago (--retention), or the store "
            f"evicted it (--max-requests {self.config.max_requests}). Check the id (SGLang may prefix rids "
            "with a worker index) and that the engine's ENGINETIME_INGEST points at this sidecar"
        )

    def _evicted(self, rid: str) -> str:
        return (
            f"request {quote(rid)} was evicted from this sidecar's store before it ended (more than "
            f"--max-requests {self.config.max_requests} requests held); raise --max-requests"
        )

    def _overflowed(self, sub: RequestSubscriber) -> str:
        if sub.ids is None:
            return (
                f"this stream fell more than {self.fanout.limits.max_log_entries} request changes behind "
                "the sidecar (its client reads too slowly, or its interval is too long for this many "
                "changing requests); reconnect and read continuously, use a shorter interval, follow "
                "named request_ids, or raise the sidecar's --subscriber-queue (it keeps 20x that many)"
            )
        return (
            f"more than {sub.max_pending} changed requests piled up unsent for this stream (the client reads "
            "too slowly for this filter); reconnect and read continuously, narrow the filter, or raise the "
            "sidecar's --subscriber-queue"
        )


def _peer(context) -> str:
    return context.peer() if hasattr(context, "peer") else "?"


async def _sleep_until(deadline: float, sub) -> None:
    """Wait until ``deadline`` (monotonic) unless the subscriber must end sooner."""
    await sub.pause(deadline - time.monotonic())


def _bytes_or_message(response) -> bytes:
    """StreamUpdates' serializer: the fan-out hands over responses already encoded."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(service: AccountingService, server) -> None:
    """Register ``service`` (what the generated add_AccountingServiceServicer_to_server does).

    The one difference: StreamUpdates responses may be bytes, encoded once by the
    fan-out and shared by every subscriber, so its serializer passes bytes through.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["AccountingService"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        if method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        serialize = _bytes_or_message if method.name == "StreamUpdates" else response_cls.SerializeToString
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=request_cls.FromString,
            response_serializer=serialize,
        )
    name = pb.DESCRIPTOR.services_by_name["AccountingService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _encode_page_token(offset: int, fingerprint: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{offset}:{fingerprint:08x}".encode()).decode().rstrip("=")


def _decode_page_token(token: str, fingerprint: int) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        version, offset_s, fp_s = raw.split(":")
        offset = int(offset_s)
        fp = int(fp_s, 16)
        if version != "v1" or offset < 0:
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(
            f"page_token {token!r} is not a token this sidecar issued; pass next_page_token from the "
            "previous ListRequestsResponse unchanged, or an empty token for the first page"
        ) from None
    if fp != fingerprint:
        raise ValueError(
            "page_token belongs to a ListRequests call with a different filter; keep the filter the same "
            "while paging, or start again with an empty token"
        )
    return offset
