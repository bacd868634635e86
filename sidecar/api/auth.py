"""Who may call the AccountingService, and how many streams each caller may hold.

One grpc.aio server interceptor does both:

- **Bearer token** (``--api-token-file``): every call except the health service must
  carry ``authorization: Bearer <token>`` metadata, compared in constant time; others
  end with UNAUTHENTICATED. Health stays open because probes cannot send a token.
- **Stream limits** (``--max-streams``, ``--max-streams-per-peer``): concurrent
  server streams in total and per peer host; one more ends at once with
  RESOURCE_EXHAUSTED, so a misbehaving client cannot hold every stream slot.

It also counts the unary calls being served (``unary_in_flight``): ingest holds its next
slice of ledger work while one is, so a call that started runs to its reply without
waiting for ledger work at each of its awaits (``IngestServer._pump``). A call that waits
*for* ingest (Advise's ``after_request_id``) steps out of that count while it waits
(``waiting_for_ingest``): counted, it would hold back the very work it waits for.

TLS and mTLS are the server's credentials (``server_credentials``), not an interceptor.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from enginetime.sidecar.ingest.limits import RateLimitedLog

log = logging.getLogger("enginetime.sidecar.api.auth")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED = "unauthenticated"
TOO_MANY_STREAMS = "too_many_streams"
BAD_REQUEST = "bad_request"
#: A unary call still counted in flight after this long lost its done callback (it should
#: not happen): it stops holding ingest back and is counted in ``ApiGuardCounters.stale_calls``.
STALE_CALL_S = 1.0


#: The unary call the current task serves: (its guard, its in-flight token); set by ApiGuard.
_SERVING: ContextVar[tuple[ApiGuard, int] | None] = ContextVar("enginetime_unary_call", default=None)


@contextlib.contextmanager
def waiting_for_ingest() -> Iterator[None]:
    """Within the block, the unary call this task serves does not count as in flight.

    Ingest holds its ledger work back while a unary call is in flight; a call that awaits
    something ingest must do first (a request's end) would otherwise wait for itself until
    its in-flight entry expired (``STALE_CALL_S``). It counts again from the block's normal
    end; an RPC cancelled in the block (its deadline passed) is not counted again.
    """
    serving = _SERVING.get()
    if serving is None:  # not under an ApiGuard (a test calling the servicer directly)
        yield
        return
    guard, token = serving
    counted = guard._unary.pop(token, None) is not None
    yield
    if counted:
        guard._unary[token] = time.perf_counter()


@dataclass(frozen=True, slots=True)
class _BadBody:
    """What a request body that does not parse deserializes to (refused as INVALID_ARGUMENT)."""

    size: int
    error: str


class CredentialsError(RuntimeError):
    """A token, certificate or key file cannot be used; the message names it and the fix."""


def read_secret_file(path: str, flag: str) -> str:
    """The stripped text of a token file; refuses empty files and files others can read."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{flag} {path}: cannot read it: {exc}") from exc
    if not text:
        raise CredentialsError(f"{flag} {path} is empty; write a long random secret into it")
    if mode & 0o007:
        log.warning("%s %s is readable by others (mode %04o); chmod 600 it", flag, path, mode & 0o777)
    return text


def read_file_bytes(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{flag} {path}: cannot read it: {exc}") from exc


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca`` every client must present a certificate it signed."""
    chain = read_file_bytes(cert, "--tls-cert")
    private = read_file_bytes(key, "--tls-key")
    roots = read_file_bytes(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4`` (streams are limited per host, not per port)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


@dataclass
class ApiGuardCounters:
    """Calls the interceptor refused, by reason (served in /metrics)."""

    rejected: dict[str, int] = field(
        default_factory=lambda: {UNAUTHENTICATED: 0, TOO_MANY_STREAMS: 0, BAD_REQUEST: 0}
    )
    streams: int = 0  # open server streams now
    stale_calls: int = 0  # unary calls whose end was never reported (see STALE_CALL_S)


class ApiGuard(grpc.aio.ServerInterceptor):
    """Token check and stream limits for every AccountingService call (see module doc)."""

    def __init__(self, token: str = "", max_streams: int = 1024, max_streams_per_peer: int = 64) -> None:
        self._token = token.encode("utf-8")
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.counters = ApiGuardCounters()
        self._per_peer: dict[str, int] = {}
        self._ratelog = RateLimitedLog(log)
        #: Unary calls being served: token -> start (perf_counter), oldest first.
        self._unary: dict[int, float] = {}
        self._tokens = itertools.count()

    def unary_in_flight(self) -> int:
        """Unary calls between their start (this interceptor, before their request message is
        read) and the end of the RPC (reply sent)."""
        calls = self._unary
        if calls:
            oldest = next(iter(calls))
            if time.perf_counter() - calls[oldest] > STALE_CALL_S:
                del calls[oldest]
                self.counters.stale_calls += 1
        return len(calls)

    def _unary_arrived(self) -> int:
        """Count a unary call from its start. Between this and its handler, gRPC reads the
        request message on its own threads: a slice of ingest started in that gap (the loop
        has nothing else ready) was one the call then waited for (0.2-0.4 ms, measured)."""
        token = next(self._tokens)
        self._unary[token] = time.perf_counter()
        return token

    def _unary_started(self, token: int, context) -> None:
        """The handler runs: the count ends with the RPC (a call whose message never came
        expires after ``STALE_CALL_S``)."""
        try:
            context.add_done_callback(lambda _ctx: self._unary.pop(token, None))
        except Exception:  # a context without done callbacks: do not count it
            self._unary.pop(token, None)

    def _authorized(self, metadata) -> bool:
        if not self._token:
            return True
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                scheme, _, given = text.partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
                    return True
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        if not self._authorized(details.invocation_metadata):
            self.counters.rejected[UNAUTHENTICATED] += 1
            self._ratelog.log(logging.WARNING, UNAUTHENTICATED, "refused %s: no valid API token", method)
            return _denied(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "this sidecar requires an API token: pass token= to the client or guard, or set "
                "ENGINETIME_API_TOKEN (the sidecar's --api-token-file)",
            )
        if handler.unary_stream is not None:
            return self._limited(handler, method)
        if handler.unary_unary is not None:
            return self._checked(handler, method)
        return handler

    def _safe_deserializer(self, handler: grpc.RpcMethodHandler):
        """The handler's deserializer, returning a _BadBody instead of raising (no traceback per call)."""
        deserialize = handler.request_deserializer
        if deserialize is None:
            return None

        def safe(data: bytes):
            try:
                return deserialize(data)
            except Exception as exc:
                return _BadBody(len(data), f"{type(exc).__name__}: {exc}")

        return safe

    async def _refuse_bad_body(self, request: _BadBody, method: str, context) -> None:
        self.counters.rejected[BAD_REQUEST] = self.counters.rejected.get(BAD_REQUEST, 0) + 1
        self._ratelog.log(
            logging.WARNING, BAD_REQUEST, "refused %s: undecodable request body (%s)", method, request.error
        )
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body ({request.size} bytes) is not a valid message for {method[:200]}: is the "
            "client built from enginetime's accounting.proto?",
        )

    def _checked(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        assert behavior is not None  # _checked wraps unary-unary handlers only
        guard = self
        token = self._unary_arrived()  # called per RPC, as it starts

        async def unary(request, context):
            guard._unary_started(token, context)
            _SERVING.set((guard, token))
            if type(request) is _BadBody:
                await guard._refuse_bad_body(request, method, context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=self._safe_deserializer(handler),
            response_serializer=handler.response_serializer,
        )

    def _limited(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_stream
        assert behavior is not None  # _limited wraps unary-stream handlers only
        guard = self

        async def stream(request, context):
            if type(request) is _BadBody:
                await guard._refuse_bad_body(request, method, context)
            host = _peer_host(context.peer())
            per_peer = guard._per_peer.get(host, 0)
            if guard.counters.streams >= guard.max_streams or per_peer >= guard.max_streams_per_peer:
                guard.counters.rejected[TOO_MANY_STREAMS] += 1
                which = (
                    f"{guard.max_streams} streams are open (--max-streams)"
                    if guard.counters.streams >= guard.max_streams
                    else f"this peer has {per_peer} streams open (--max-streams-per-peer)"
                )
                guard._ratelog.log(
                    logging.WARNING, TOO_MANY_STREAMS, "refused a stream from %s: %s", host, which
                )
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{which}; share one stream per process (the guard does) or raise the limit",
                )
            guard.counters.streams += 1
            guard._per_peer[host] = per_peer + 1
            try:
                # The service's stream handlers are coroutines that write with context.write().
                return await behavior(request, context)  # type: ignore[misc]
            finally:
                guard.counters.streams -= 1
                left = guard._per_peer.get(host, 1) - 1
                if left > 0:
                    guard._per_peer[host] = left
                else:
                    guard._per_peer.pop(host, None)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=self._safe_deserializer(handler),
            response_serializer=handler.response_serializer,
        )


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
