"""Typed errors for the clients, mapped from gRPC status codes.

A session server should catch ``RequestNotFound`` or ``SidecarUnavailable``, not
inspect ``grpc.StatusCode``. Each class also derives from the closest builtin
(LookupError, ConnectionError, ValueError, TimeoutError) so generic handlers work,
and keeps the gRPC code and details for logs.
"""

from __future__ import annotations

import re

import grpc


class EnginetimeError(Exception):
    """Base of every error the clients raise."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class RequestNotFound(EnginetimeError, LookupError):
    """The sidecar does not know this request id (never seen, or past its retention window)."""

    def __init__(self, request_id: str, details: str = "") -> None:
        msg = (
            f"the sidecar has no request {request_id!r}: it never arrived at this engine, "
            "or it finished longer ago than the sidecar's retention window"
        )
        super().__init__(msg, code=grpc.StatusCode.NOT_FOUND, details=details)
        self.request_id = request_id


class SidecarUnavailable(EnginetimeError, ConnectionError):
    """No sidecar answered at the target address."""

    def __init__(self, target: str, detail: str = "") -> None:
        msg = (
            f"enginetime sidecar at {target} is unavailable"
            + (f" ({detail})" if detail else "")
            + f": is `enginetime sidecar --listen {target}` running, and is the address right?"
        )
        super().__init__(msg, code=grpc.StatusCode.UNAVAILABLE, details=detail)
        self.target = target


class InvalidArgument(EnginetimeError, ValueError):
    """The sidecar rejected the call's arguments (bad filter, page token, interval...)."""


class StreamCutOff(EnginetimeError):
    """The sidecar ended a stream because this subscriber fell behind (RESOURCE_EXHAUSTED).

    Read faster (do less work per batch) or reconnect and resynchronise with
    ``list_requests``.
    """


_AMBIGUOUS = re.compile(r"request id '([^']*)' is held by \d+ engines \(([^)]*)\)")


class AmbiguousRequest(EnginetimeError, LookupError):
    """A bare request id that several engines behind this sidecar hold (FAILED_PRECONDITION).

    A request is (engine_id, request_id): pass ``engine_id=`` to say which one.
    ``engines`` lists the engines the sidecar named (empty if it named none).
    """

    def __init__(self, request_id: str, details: str = "") -> None:
        found = _AMBIGUOUS.search(details)
        self.request_id = request_id or (found.group(1) if found else "")
        self.engines: tuple[str, ...] = tuple(re.findall(r"'([^']*)'", found.group(2))) if found else ()
        request_id = self.request_id
        super().__init__(
            f"request {request_id!r} is ambiguous: {details or 'several engines hold it'}",
            code=grpc.StatusCode.FAILED_PRECONDITION,
            details=details,
        )


class DeadlineExceeded(EnginetimeError, TimeoutError):
    """The call did not complete within its timeout."""


def map_rpc_error(error: grpc.RpcError, *, target: str, request_id: str | None = None) -> EnginetimeError:
    """Turn a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` into a typed error.

    ``target`` and ``request_id`` are what the caller asked for, so the message can
    name them even when the server's details do not.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    if code == grpc.StatusCode.NOT_FOUND and request_id is not None:
        return RequestNotFound(request_id, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "pass engine_id" in details:
        return AmbiguousRequest(request_id or "", details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return SidecarUnavailable(target, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        msg = f"the sidecar at {target} rejected the call: {details}"
        return InvalidArgument(msg, code=code, details=details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return StreamCutOff(
            f"the sidecar at {target} cut this stream off: the subscriber fell behind ({details}); "
            "process batches faster or reconnect",
            code=code,
            details=details,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            f"call to the sidecar at {target} timed out ({details}); raise timeout= if the sidecar is busy",
            code=code,
            details=details,
        )
    name = code.name if code is not None else "UNKNOWN"
    msg = f"call to the sidecar at {target} failed: {name}: {details}"
    return EnginetimeError(msg, code=code, details=details)
