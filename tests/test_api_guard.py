"""The API guard's count of unary calls in flight, through a real grpc.aio server.

Ingest holds its next slice of ledger work while the count is above zero, so the count
must rise for every unary call the server runs and fall back to zero however the call
ends (reply, abort, deadline, undecodable body); a count that never fell would slow
ingest for good, so one whose end is never reported expires.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from helpers import poll_async

from enginetime.sidecar.api import auth
from enginetime.sidecar.api.auth import ApiGuard
from enginetime.v1 import accounting_pb2 as pb

SERVICE = "probe.Probe"


async def _serve(guard: ApiGuard, release: asyncio.Event) -> tuple[grpc.aio.Server, int]:
    async def peek(request: bytes, context) -> bytes:
        await release.wait()
        return str(guard.unary_in_flight()).encode()

    async def fail(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(2.0)
        return b""

    async def wait(request: bytes, context) -> bytes:
        """The count before, while and after waiting for ingest (``request``: seconds to wait)."""
        seen = [guard.unary_in_flight()]
        with auth.waiting_for_ingest():
            seen.append(guard.unary_in_flight())
            await asyncio.sleep(float(request or b"0"))
        seen.append(guard.unary_in_flight())
        return ",".join(map(str, seen)).encode()

    async def parse(request: pb.AdviseRequest, context) -> pb.AdviseResponse:
        return pb.AdviseResponse()

    def raw(fn):
        return grpc.unary_unary_rpc_method_handler(fn)

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Peek": raw(peek),
            "Fail": raw(fail),
            "Slow": raw(slow),
            "Wait": raw(wait),
            "Parse": grpc.unary_unary_rpc_method_handler(
                parse,
                request_deserializer=pb.AdviseRequest.FromString,
                response_serializer=pb.AdviseResponse.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server(interceptors=[guard])
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_calls_are_counted_while_served_and_not_after() -> None:
    async def scenario() -> tuple[list[int], bool, list[bytes]]:
        guard = ApiGuard()
        release = asyncio.Event()
        server, port = await _serve(guard, release)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                peek = channel.unary_unary(f"/{SERVICE}/Peek")
                calls = [asyncio.ensure_future(peek(b"", timeout=10)) for _ in range(3)]
                seen = [guard.unary_in_flight()]
                await poll_async(lambda: guard.unary_in_flight() == 3, 5.0, 0.002)
                seen.append(guard.unary_in_flight())
                release.set()
                replies = await asyncio.gather(*calls)
                # Well before STALE_CALL_S: the done callbacks ended them, not the expiry.
                drained = await poll_async(lambda: guard.unary_in_flight() == 0, 0.5, 0.002)
                return seen, drained and guard.counters.stale_calls == 0, replies
        finally:
            await server.stop(0)

    seen, drained, replies = asyncio.run(scenario())
    assert seen == [0, 3]
    assert all(int(r) >= 1 for r in replies)  # each handler counted itself
    assert drained, "the count did not fall back to 0 as soon as every call was answered"


@pytest.mark.parametrize(
    ("method", "body", "timeout", "code"),
    [
        ("Fail", b"", 10, grpc.StatusCode.NOT_FOUND),
        ("Slow", b"", 0.1, grpc.StatusCode.DEADLINE_EXCEEDED),
        ("Parse", b"\xff\xff\xff", 10, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_a_call_that_ends_badly_leaves_the_count(method: str, body: bytes, timeout: float, code) -> None:
    async def scenario() -> tuple[grpc.StatusCode, int, bool]:
        guard = ApiGuard()
        server, port = await _serve(guard, asyncio.Event())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(f"/{SERVICE}/{method}")
                try:
                    await call(body, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    got = exc.code()
                else:
                    got = grpc.StatusCode.OK
                peak = guard.unary_in_flight()
                drained = await poll_async(lambda: guard.unary_in_flight() == 0, 0.5, 0.002)
                return got, peak, drained and guard.counters.stale_calls == 0
        finally:
            await server.stop(0)

    got, peak, drained = asyncio.run(scenario())
    assert got == code
    assert drained, f"{method}: the count stayed at {peak} after the call ended with {got.name}"


def test_a_call_whose_end_is_never_reported_expires(monkeypatch) -> None:
    """If gRPC never ran a call's done callback, the call stops counting after STALE_CALL_S."""

    class Context:  # a real context always reports the end; this one keeps the callback
        def add_done_callback(self, callback) -> None:
            self.callback = callback

    monkeypatch.setattr(auth, "STALE_CALL_S", 0.05)
    guard = ApiGuard()
    ctx = Context()
    guard._unary_started(guard._unary_arrived(), ctx)
    assert guard.unary_in_flight() == 1
    time.sleep(0.06)
    assert guard.unary_in_flight() == 0
    assert guard.counters.stale_calls == 1
    ctx.callback(ctx)  # a late report changes nothing
    assert guard.unary_in_flight() == 0


def test_a_call_counts_from_its_start_not_from_its_handler() -> None:
    """Between the interceptor (the RPC starts) and the handler, gRPC reads the request on its
    own threads and the loop may have nothing ready: ingest must already see the call then,
    or it starts a slice the call waits for. Health checks and refused calls never count."""

    class Context:
        def add_done_callback(self, callback) -> None:
            self.callback = callback

    class Details:
        def __init__(self, method: str, metadata=()) -> None:
            self.method = method
            self.invocation_metadata = metadata

    async def behavior(request: bytes, context) -> bytes:
        return b"ok"

    plain = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details):
        return plain

    async def scenario() -> list[int]:
        guard = ApiGuard(token="s3cret")
        seen = []
        await guard.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))
        await guard.intercept_service(continuation, Details(f"/{SERVICE}/Peek"))  # no token: refused
        seen.append(guard.unary_in_flight())
        handler = await guard.intercept_service(
            continuation, Details(f"/{SERVICE}/Peek", (("authorization", "Bearer s3cret"),))
        )
        seen.append(guard.unary_in_flight())  # started: counted before any handler runs
        ctx = Context()
        assert await handler.unary_unary(b"", ctx) == b"ok"
        seen.append(guard.unary_in_flight())  # served, the RPC not ended yet
        ctx.callback(ctx)  # gRPC reports the end
        seen.append(guard.unary_in_flight())
        return seen

    assert asyncio.run(scenario()) == [0, 1, 1, 0]


def test_a_call_waiting_for_ingest_does_not_count_while_it_waits() -> None:
    """Advise's ``after_request_id`` waits for ingest to record a request's end; counted in
    flight meanwhile, it would hold back the ingest it waits for. It counts again once the
    wait is over, and a call cancelled during the wait (its deadline) does not come back."""

    async def scenario() -> tuple[bytes, grpc.StatusCode | None, bool]:
        guard = ApiGuard()
        server, port = await _serve(guard, asyncio.Event())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(f"/{SERVICE}/Wait")
                seen = await call(b"0.01", timeout=5)
                code = None
                try:
                    await call(b"2", timeout=0.2)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                drained = await poll_async(lambda: guard.unary_in_flight() == 0, 0.5, 0.002)
                await asyncio.sleep(0.05)  # nothing puts the cancelled call back
                return (
                    seen,
                    code,
                    drained and guard.unary_in_flight() == 0 and guard.counters.stale_calls == 0,
                )
        finally:
            await server.stop(0)

    seen, code, drained = asyncio.run(scenario())
    assert seen == b"1,0,1"
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert drained
