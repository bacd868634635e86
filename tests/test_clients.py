"""The typed clients: protobuf conversion, error mapping, streams, sync/async parity.

The clients talk to a real grpc.aio server in a background thread whose servicer
(``ScriptedAccounting``) answers from a table of fully populated messages and
records what it received, so every test goes over a real socket and checks what
crossed the wire. The cross-process test against the real sidecar is
tests/test_e2e_core.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from helpers import free_port

from enginetime.clients import (
    AccountingClient,
    AsyncAccountingClient,
    Blame,
    Coupling,
    DeadlineExceeded,
    EnginetimeError,
    InterferencePhase,
    InvalidArgument,
    RequestFilter,
    RequestNotFound,
    RequestState,
    SidecarUnavailable,
    StreamCutOff,
    TimerSource,
    TokenCounts,
    map_rpc_error,
)
from enginetime.clients import _convert as cv
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc
from enginetime.v1 import ingest_pb2

S = 1_000_000_000


def _dur(ns: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ns // S, nanos=ns % S)


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // S, nanos=ns % S)


T0 = 1_760_000_000 * S + 123_456_789  # an epoch time with sub-second nanos


def full_request(rid: str, *, state: int = pb.REQUEST_STATE_RUNNING, shard: int = 1) -> pb.RequestAccounting:
    """Every field set, each to a value no other field has, so a swapped mapping shows."""
    m = pb.RequestAccounting(
        request_id=rid,
        session_id="sess-" + rid,
        engine_id="eng-a",
        shard=shard,
        state=state,
        arrival_time=_ts(T0),
        queue_time=_dur(1_000_000_001),
        engine_time=_dur(2_000_000_003),
        gpu_time=_dur(1_500_000_007),
        interference=_dur(3_000_000_011),
        wall=_dur(7_000_000_029),
        tokens=pb.TokenCounts(prompt=1001, cached=203, prefilled=798, decoded=57),
        steps=61,
        preemptions=2,
        top_blame=[
            pb.Blame(
                request_id="storm-1",
                shard=0,
                duration=_dur(2_500_000_000),
                same_shard=False,
                engine_id="eng-a",
            ),
            pb.Blame(request_id="", shard=1, duration=_dur(500_000_011), same_shard=True, engine_id="eng-a"),
        ],
        partial=True,
        last_step_time=_ts(T0 + 6_900_000_000),
        migrated=True,
        other=_dur(1_000_000_014),
        finish_time=_ts(T0 + 7_000_000_029),
        finish_reason="length",
        routed_shard=0,
        excluded_steps=13,
        queue_time_ns=1_000_000_001,
        engine_time_ns=2_000_000_003,
        gpu_time_ns=1_500_000_007,
        interference_ns=3_000_000_011,
        wall_ns=7_000_000_029,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    return m


def full_shard(shard: int, *, storm: bool) -> pb.ShardStatus:
    m = pb.ShardStatus(
        engine_id="eng-a",
        shard=shard,
        coupling=ingest_pb2.COUPLING_LOCKSTEP,
        decode_tokens_per_second=68.5,
        prefill_tokens_per_second=4096.25,
        busy_fraction=0.875,
        active_requests=4,
        queued_requests=3,
        last_step_time=_ts(T0 + 5 * S),
        steps=12345,
        connected=True,
        dropped_frames=7,
        engine_kind="sglang",
        device_name="NVIDIA H100",
        timer_source=ingest_pb2.TIMER_SOURCE_CUDA_EVENT,
    )
    if storm:
        m.current_storm.CopyFrom(
            pb.Storm(
                request_id="storm-1",
                shard=shard,
                prefill_tokens=40960,
                chunks=80,
                start_time=_ts(T0 + S),
                stall=_dur(12_250_000_000),
                prompt_tokens=100_000,
            )
        )
    return m


def full_event(phase: int, *, ended: bool) -> pb.InterferenceEvent:
    m = pb.InterferenceEvent(
        phase=phase,
        engine_id="eng-a",
        aggressor_request_id="storm-1",
        aggressor_shard=0,
        prefill_tokens=40960,
        chunks=80,
        victims=pb.InterferenceVictims(shards=[1, 2, 3], request_count=4, duration=_dur(31_000_000_500)),
        start_time=_ts(T0 + S),
        cross_shard=True,
        aggressor_session_id="sess-storm",
    )
    if ended:
        m.end_time.CopyFrom(_ts(T0 + 36 * S))
    return m


# --- conversion -------------------------------------------------------------------


def test_request_conversion_maps_every_field() -> None:
    r = cv.request_from_pb(full_request("r1", state=pb.REQUEST_STATE_FINISHED))
    assert (r.request_id, r.session_id, r.engine_id, r.shard) == ("r1", "sess-r1", "eng-a", 1)
    assert r.state is RequestState.FINISHED and r.terminal
    assert r.arrival_ns == T0 and r.arrival == pytest.approx(T0 / S, abs=1e-6)
    for name, ns in [
        ("queue_time", 1_000_000_001),
        ("engine_time", 2_000_000_003),
        ("gpu_time", 1_500_000_007),
        ("interference", 3_000_000_011),
        ("wall", 7_000_000_029),
        ("other", 1_000_000_014),
    ]:
        assert getattr(r, name + "_ns") == ns, name
        assert getattr(r, name) == pytest.approx(ns / S, rel=1e-12), name
    # The exact integers keep the identity the sidecar guarantees.
    assert r.wall_ns == r.queue_time_ns + r.engine_time_ns + r.interference_ns + r.other_ns
    assert r.tokens == TokenCounts(prompt=1001, cached=203, prefilled=798, decoded=57)
    assert (r.steps, r.excluded_steps, r.preemptions) == (61, 13, 2)
    assert r.top_blame == (
        Blame("storm-1", "eng-a", 0, 2.5, 2_500_000_000, False),
        Blame("", "eng-a", 1, 0.500000011, 500_000_011, True),
    )
    assert r.top_blame[0].cross_shard and not r.top_blame[1].cross_shard
    assert r.partial and r.migrated
    assert r.last_step_time_ns == T0 + 6_900_000_000
    assert r.finish_time_ns == T0 + 7_000_000_029
    assert r.finish_time == pytest.approx((T0 + 7_000_000_029) / S, abs=1e-6)
    assert r.finish_reason == "length"
    assert r.routed_shard == 0  # set to shard 0: not the same as "did not ask"
    assert r.traceparent.startswith("00-0af7")


def test_every_proto_field_has_a_home_in_the_dataclass() -> None:
    """A field added to the .proto that the client silently drops fails here."""
    fields = {f.name for f in dataclasses.fields(cv.request_from_pb(full_request("x")))}
    renamed = {"arrival_time": "arrival", "tokens": "tokens"}
    for f in pb.RequestAccounting.DESCRIPTOR.fields:
        assert renamed.get(f.name, f.name) in fields, f"RequestAccounting.{f.name} is not converted"
    for message, record in [
        (pb.ShardStatus, cv.shard_from_pb(full_shard(0, storm=True))),
        (pb.Storm, cv.storm_from_pb(full_shard(0, storm=True).current_storm)),
        (pb.InterferenceEvent, cv.interference_from_pb(full_event(3, ended=True))),
    ]:
        names = {f.name for f in dataclasses.fields(record)}
        for f in message.DESCRIPTOR.fields:
            assert f.name in names, f"{message.DESCRIPTOR.name}.{f.name} is not converted"


def test_unset_times_and_optionals_are_none() -> None:
    m = pb.RequestAccounting(request_id="q", state=pb.REQUEST_STATE_QUEUED, arrival_time=_ts(T0))
    r = cv.request_from_pb(m)
    assert r.last_step_time is None and r.last_step_time_ns is None
    assert r.finish_time is None and r.finish_time_ns is None
    assert r.routed_shard is None
    assert not r.terminal and r.top_blame == ()


def test_integer_twins_are_used_when_durations_are_absent() -> None:
    """A sidecar may send only the *_ns integers."""
    m = pb.RequestAccounting(
        request_id="n",
        queue_time_ns=5,
        engine_time_ns=70,
        gpu_time_ns=60,
        interference_ns=20,
        wall_ns=100,
        other_ns=5,
    )
    r = cv.request_from_pb(m)
    assert (r.queue_time_ns, r.engine_time_ns, r.gpu_time_ns, r.interference_ns, r.wall_ns) == (
        5,
        70,
        60,
        20,
        100,
    )
    assert r.other_ns == 5


def test_shard_storm_and_event_conversion() -> None:
    s = cv.shard_from_pb(full_shard(2, storm=True))
    assert s.coupling is Coupling.LOCKSTEP and s.timer_source is TimerSource.CUDA_EVENT
    assert (s.engine_id, s.shard, s.active_requests, s.queued_requests) == ("eng-a", 2, 4, 3)
    assert (s.decode_tokens_per_second, s.prefill_tokens_per_second, s.busy_fraction) == (
        68.5,
        4096.25,
        0.875,
    )
    assert (s.steps, s.connected, s.dropped_frames) == (12345, True, 7)
    assert (s.engine_kind, s.device_name, s.last_step_time_ns) == ("sglang", "NVIDIA H100", T0 + 5 * S)
    st = s.current_storm
    assert st is not None
    assert (st.request_id, st.shard, st.prefill_tokens, st.prompt_tokens, st.chunks) == (
        "storm-1",
        2,
        40960,
        100_000,
        80,
    )
    assert st.stall_ns == 12_250_000_000 and st.stall == 12.25 and st.start_time_ns == T0 + S
    assert cv.shard_from_pb(full_shard(0, storm=False)).current_storm is None
    assert cv.shard_from_pb(pb.ShardStatus()).last_step_time is None

    e = cv.interference_from_pb(full_event(pb.InterferenceEvent.PHASE_ENDED, ended=True))
    assert e.phase is InterferencePhase.ENDED and e.cross_shard
    assert (e.aggressor_request_id, e.aggressor_shard, e.aggressor_session_id) == ("storm-1", 0, "sess-storm")
    assert (e.prefill_tokens, e.chunks, e.engine_id) == (40960, 80, "eng-a")
    assert e.victims.shards == (1, 2, 3) and e.victims.request_count == 4
    assert e.victims.seconds_ns == 31_000_000_500 and e.victims.seconds == pytest.approx(31.0000005)
    assert e.end_time_ns == T0 + 36 * S
    started = cv.interference_from_pb(full_event(pb.InterferenceEvent.PHASE_STARTED, ended=False))
    assert started.end_time is None and started.phase is InterferencePhase.STARTED


def test_unknown_enum_numbers_from_a_newer_sidecar_do_not_crash() -> None:
    r = cv.request_from_pb(pb.RequestAccounting(request_id="z", state=99))
    assert r.state is RequestState.UNSPECIFIED


@pytest.mark.parametrize(
    ("mirror", "proto_enum", "prefix"),
    [
        (RequestState, pb.RequestState, "REQUEST_STATE_"),
        (Coupling, ingest_pb2.Coupling, "COUPLING_"),
        (TimerSource, ingest_pb2.TimerSource, "TIMER_SOURCE_"),
        (InterferencePhase, pb.InterferenceEvent.Phase, "PHASE_"),
    ],
)
def test_client_enums_mirror_the_proto(mirror, proto_enum, prefix: str) -> None:
    assert {m.name: m.value for m in mirror} == {n.removeprefix(prefix): v for n, v in proto_enum.items()}


def test_states_accept_enum_name_and_number() -> None:
    f = cv.request_filter(states=["running", RequestState.QUEUED, "REQUEST_STATE_FINISHED", 5], shard=0)
    assert list(f.states) == [2, 1, 4, 5]
    assert f.HasField("shard") and f.shard == 0  # shard 0 is a filter, not "any"
    assert list(cv.request_filter(states="preempted").states) == [3]
    assert not cv.request_filter().HasField("shard")
    with pytest.raises(ValueError, match="unknown request state 'runing'.*'running'"):
        cv.request_filter(states=["runing"])
    with pytest.raises(ValueError, match="shard"):
        cv.request_filter(shard=-1)


def test_argument_checks_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="min_interval must be >= 0"):
        cv.watch_request_request("r", -1)
    with pytest.raises(ValueError, match="request_id must be a non-empty string"):
        cv.get_request_request("")
    with pytest.raises(ValueError, match="page_size must be an int from 1 to 1000"):
        cv.list_requests_request(page_size=0, page_token="")
    d = cv.duration_from_seconds(1.25, "x")
    assert (d.seconds, d.nanos) == (1, 250_000_000)
    r = cv.stream_interference_request(engine_id="", shard=None, min_stall=None)
    assert not r.HasField("min_stall") and not r.HasField("shard")


# --- a real grpc server in the test process -----------------------------------------


class ScriptedAccounting(pb_grpc.AccountingServiceServicer):
    """Answers from a table of requests and records what the clients sent.

    Special request ids script failures: "bad" -> INVALID_ARGUMENT, "slow" ->
    answers after 5 s (for deadlines). A WatchRequest stream sends the request's
    states in turn and then stays open, so a client that does not stop at the
    terminal state hangs; StreamUpdates for session "cutoff" is ended with
    RESOURCE_EXHAUSTED after two batches.
    """

    def __init__(self) -> None:
        self.requests = {
            rid: full_request(rid, shard=i % 2) for i, rid in enumerate(f"r{i}" for i in range(7))
        }
        self.watch_script = [pb.REQUEST_STATE_QUEUED, pb.REQUEST_STATE_RUNNING, pb.REQUEST_STATE_FINISHED]
        self.received: list[tuple[str, object, dict[str, str]]] = []
        self.cancelled: dict[str, threading.Event] = {
            n: threading.Event() for n in ("WatchRequest", "StreamUpdates", "StreamInterference")
        }

    def _record(self, name: str, request, context) -> None:
        self.received.append((name, request, dict(context.invocation_metadata())))

    async def GetRequest(self, request, context):
        self._record("GetRequest", request, context)
        if request.request_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id 'bad' is not allowed here")
        if request.request_id == "slow":
            await asyncio.sleep(5)
        if request.request_id not in self.requests:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}")
        return pb.GetRequestResponse(request=self.requests[request.request_id])

    async def ListRequests(self, request, context):
        self._record("ListRequests", request, context)
        f = request.filter
        rows = [
            r
            for r in self.requests.values()
            if (not f.states or r.state in f.states)
            and (not f.HasField("shard") or r.shard == f.shard)
            and (not f.request_ids or r.request_id in f.request_ids)
        ]
        start = int(request.page_token or 0)
        end = start + request.page_size
        return pb.ListRequestsResponse(
            requests=rows[start:end],
            next_page_token=str(end) if end < len(rows) else "",
            total_size=len(rows),
        )

    async def WatchRequest(self, request, context):
        self._record("WatchRequest", request, context)
        if request.request_id not in self.requests:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown")
        try:
            for state in self.watch_script:
                m = pb.RequestAccounting()
                m.CopyFrom(self.requests[request.request_id])
                m.state = state
                yield pb.WatchRequestResponse(request=m)
            await asyncio.sleep(30)  # deliberately never ends the stream itself
        except asyncio.CancelledError:
            self.cancelled["WatchRequest"].set()
            raise

    async def StreamUpdates(self, request, context):
        self._record("StreamUpdates", request, context)
        interval = request.interval.ToNanoseconds() / S
        try:
            for n in range(1_000_000):
                if request.filter.session_id == "cutoff" and n == 2:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "subscriber 3 batches behind")
                yield pb.StreamUpdatesResponse(
                    updates=[self.requests["r0"], self.requests["r1"]], time=_ts(T0 + n * S), coalesced=n
                )
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            self.cancelled["StreamUpdates"].set()
            raise

    async def GetShards(self, request, context):
        self._record("GetShards", request, context)
        return pb.GetShardsResponse(shards=[full_shard(0, storm=True), full_shard(1, storm=False)])

    async def StreamInterference(self, request, context):
        self._record("StreamInterference", request, context)
        try:
            yield pb.StreamInterferenceResponse(
                event=full_event(pb.InterferenceEvent.PHASE_STARTED, ended=False)
            )
            yield pb.StreamInterferenceResponse(
                event=full_event(pb.InterferenceEvent.PHASE_ENDED, ended=True)
            )
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled["StreamInterference"].set()
            raise


class ServerThread:
    """A grpc.aio server on its own event loop thread, so sync clients can call it too."""

    def __init__(self, servicer: ScriptedAccounting) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="scripted-grpc", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_AccountingServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server():
    with ServerThread(ScriptedAccounting()) as s:
        yield s


def _wait(event: threading.Event, what: str, timeout: float = 5.0) -> None:
    assert event.wait(timeout), f"timed out after {timeout}s waiting for: {what}"


# --- sync client --------------------------------------------------------------------


def test_sync_get_list_and_shards(server: ServerThread) -> None:
    with AccountingClient(server.target, metadata={"Authorization": "Bearer t0k"}) as client:
        r = client.get_request("r3")
        assert r == cv.request_from_pb(server.servicer.requests["r3"])
        name, _, md = server.servicer.received[-1]
        assert name == "GetRequest" and md.get("authorization") == "Bearer t0k"

        page = client.list_requests(states=["running"], shard=0, page_size=2)
        _, sent, _ = server.servicer.received[-1]
        assert list(sent.filter.states) == [pb.REQUEST_STATE_RUNNING] and sent.filter.shard == 0
        assert page.total_size == 4 and len(page.requests) == 2 and page.next_page_token
        assert all(p.shard == 0 for p in page.requests)

        every = list(client.iter_requests(shard=0, page_size=3))
        assert [p.request_id for p in every] == ["r0", "r2", "r4", "r6"]

        shards = client.get_shards("eng-a")
        assert [s.shard for s in shards] == [0, 1]
        assert shards[0].current_storm is not None and shards[1].current_storm is None


def test_a_request_filter_sends_what_the_five_keywords_send(server: ServerThread) -> None:
    flt = RequestFilter(states="running", shard=0, request_ids="r2")
    assert flt.states == (RequestState.RUNNING,) and flt.request_ids == ("r2",)  # normalised when built
    with AccountingClient(server.target) as client:
        by_keywords = client.list_requests(states="running", shard=0, request_ids="r2")
        _, keywords_sent, _ = server.servicer.received[-1]
        assert client.list_requests(flt) == by_keywords
        _, filter_sent, _ = server.servicer.received[-1]
        assert filter_sent == keywords_sent
        with pytest.raises(ValueError, match="either filter= or the filter keywords"):
            client.list_requests(flt, shard=1)
    with pytest.raises(ValueError, match="shard must be a non-negative int"):
        RequestFilter(shard=-1)


def test_sync_watch_ends_at_terminal_and_cancels_the_rpc(server: ServerThread) -> None:
    server.servicer.cancelled["WatchRequest"].clear()
    with AccountingClient(server.target) as client:
        start = time.monotonic()
        states = [r.state for r in client.watch_request("r2", min_interval=0.05)]
        assert states == [RequestState.QUEUED, RequestState.RUNNING, RequestState.FINISHED]
        assert time.monotonic() - start < 5, (
            "the iterator waited for the server instead of stopping at FINISHED"
        )
        _, sent, _ = [x for x in server.servicer.received if x[0] == "WatchRequest"][-1]
        assert sent.min_interval.ToNanoseconds() == 50_000_000
    _wait(server.servicer.cancelled["WatchRequest"], "server sees the watch cancelled")


def test_sync_stream_close_cancels_even_from_another_thread(server: ServerThread) -> None:
    server.servicer.cancelled["StreamUpdates"].clear()
    with AccountingClient(server.target) as client:
        stream = client.stream_updates(states="running", request_ids=["r0"], interval=10.0)
        first = next(stream)
        assert [u.request_id for u in first.updates] == ["r0", "r1"] and first.coalesced == 0
        # The next batch is 10 s away: next() blocks until another thread closes the stream.
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.extend(stream))
        reader.start()
        time.sleep(0.1)
        stream.close()
        reader.join(5)
        assert not reader.is_alive() and got == []
    _wait(server.servicer.cancelled["StreamUpdates"], "server sees the stream cancelled")


def test_sync_client_close_ends_open_streams(server: ServerThread) -> None:
    client = AccountingClient(server.target)
    stream = client.stream_interference(engine_id="eng-a", shard=0, min_stall=0.5)
    events = [next(stream), next(stream)]
    assert [e.phase for e in events] == [InterferencePhase.STARTED, InterferencePhase.ENDED]
    _, sent, _ = [x for x in server.servicer.received if x[0] == "StreamInterference"][-1]
    assert sent.shard == 0 and sent.min_stall.ToNanoseconds() == 500_000_000
    client.close()
    assert list(stream) == []
    with pytest.raises(EnginetimeError, match="closed"):
        client.get_request("r0")


def test_sync_errors_are_typed(server: ServerThread) -> None:
    with AccountingClient(server.target) as client:
        with pytest.raises(RequestNotFound) as nf:
            client.get_request("nope-42")
        assert nf.value.request_id == "nope-42" and "nope-42" in str(nf.value)
        assert isinstance(nf.value, LookupError)
        with pytest.raises(RequestNotFound):
            next(iter(client.watch_request("nope-43")))
        with pytest.raises(InvalidArgument, match="not allowed"):
            client.get_request("bad")
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded) as de:
            client.get_request("slow", timeout=0.2)
        assert time.monotonic() - start < 3 and isinstance(de.value, TimeoutError)
        stream = client.stream_updates(session_id="cutoff", interval=0.01)
        with pytest.raises(StreamCutOff, match="fell behind"):
            for _ in stream:
                pass


def test_unavailable_fails_fast_and_names_the_target() -> None:
    target = f"127.0.0.1:{free_port()}"
    with AccountingClient(target, timeout=10) as client:
        start = time.monotonic()
        with pytest.raises(SidecarUnavailable) as exc:
            client.get_request("r1")
        assert time.monotonic() - start < 3, "should fail fast, not wait for the 10 s deadline"
        assert exc.value.target == target and target in str(exc.value)
        assert f"enginetime sidecar --listen {target}" in str(exc.value)
        assert isinstance(exc.value, ConnectionError)
        with pytest.raises(SidecarUnavailable):
            next(client.stream_updates())

    async def main() -> None:
        async with AsyncAccountingClient(target, timeout=10) as client:
            start = time.monotonic()
            with pytest.raises(SidecarUnavailable, match=target):
                await client.get_shards()
            assert time.monotonic() - start < 3
            with pytest.raises(SidecarUnavailable):
                async for _ in client.watch_request("r1"):
                    pass

    asyncio.run(main())


def test_map_rpc_error_without_a_request_id_keeps_the_code() -> None:
    class Err(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "boom"

    e = map_rpc_error(Err(grpc.StatusCode.NOT_FOUND), target="t:1")
    assert type(e) is EnginetimeError and e.code == grpc.StatusCode.NOT_FOUND and "NOT_FOUND" in str(e)
    e = map_rpc_error(Err(grpc.StatusCode.INTERNAL), target="t:1")
    assert e.code == grpc.StatusCode.INTERNAL and "t:1" in str(e) and "boom" in str(e)


# --- async client and parity ----------------------------------------------------------


def test_sync_and_async_clients_have_the_same_methods() -> None:
    def public(cls):
        return {
            n: inspect.signature(f) for n, f in vars(cls).items() if not n.startswith("_") and callable(f)
        }

    sync_api, async_api = public(AccountingClient), public(AsyncAccountingClient)
    assert set(sync_api) <= set(async_api)
    for name, sig in sync_api.items():
        a = async_api[name]
        assert list(sig.parameters) == list(a.parameters), name
        assert [p.default for p in sig.parameters.values()] == [p.default for p in a.parameters.values()], (
            name
        )


def test_async_results_equal_sync_results(server: ServerThread) -> None:
    def sync_side():
        with AccountingClient(server.target) as c:
            return (
                c.get_request("r5"),
                c.list_requests(states=[RequestState.RUNNING], page_size=3),
                list(c.iter_requests(request_ids=["r1", "r4"], page_size=1)),
                c.get_shards(),
                list(c.watch_request("r1")),
                [next(s) for s in [c.stream_updates(interval=0.01)] for _ in range(2)],
                [next(s) for s in [c.stream_interference()] for _ in range(2)],
            )

    async def async_side():
        async with AsyncAccountingClient(server.target) as c:
            updates, events = [], []
            async with c.stream_updates(interval=0.01) as s:
                async for b in s:
                    updates.append(b)
                    if len(updates) == 2:
                        break
            async with c.stream_interference() as s:
                async for e in s:
                    events.append(e)
                    if len(events) == 2:
                        break
            return (
                await c.get_request("r5"),
                await c.list_requests(states=["running"], page_size=3),
                [r async for r in c.iter_requests(request_ids=["r1", "r4"], page_size=1)],
                await c.get_shards(),
                [r async for r in c.watch_request("r1")],
                updates,
                events,
            )

    expected = sync_side()
    assert len(expected[2]) == 2 and len(expected[4]) == 3
    assert asyncio.run(async_side()) == expected


def test_async_errors_cancel_and_close(server: ServerThread) -> None:
    servicer = server.servicer
    servicer.cancelled["StreamUpdates"].clear()
    servicer.cancelled["WatchRequest"].clear()

    async def main() -> None:
        client = AsyncAccountingClient(server.target)  # no loop needed to build it
        with pytest.raises(RequestNotFound, match="nope-7"):
            await client.get_request("nope-7")
        with pytest.raises(DeadlineExceeded):
            await client.get_request("slow", timeout=0.2)
        with pytest.raises(StreamCutOff):
            async for _ in client.stream_updates(session_id="cutoff", interval=0.01):
                pass

        # A watch ends at FINISHED although the server keeps the stream open.
        states = [r.state async for r in client.watch_request("r0", min_interval=0.01)]
        assert states[-1] is RequestState.FINISHED and len(states) == 3

        # cancel() from another task ends a blocked reader quietly.
        stream = client.stream_updates(interval=10.0)
        first = await stream.__anext__()
        assert first.updates
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)
        stream.cancel()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(reader, 5)

        # close() ends streams that are still open.
        open_stream = client.stream_interference()
        assert (await open_stream.__anext__()).phase is InterferencePhase.STARTED
        await client.close()
        assert [e async for e in open_stream] == []
        with pytest.raises(EnginetimeError, match="closed"):
            await client.get_shards()

    asyncio.run(main())
    _wait(servicer.cancelled["StreamUpdates"], "server sees the async stream cancelled")
    _wait(servicer.cancelled["WatchRequest"], "server sees the async watch cancelled")


def test_given_channel_is_left_open(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.target)
    try:
        with AccountingClient(channel=channel) as client:
            assert client.get_request("r1").request_id == "r1"
        again = pb_grpc.AccountingServiceStub(channel).GetRequest(
            pb.GetRequestRequest(request_id="r1"), timeout=5
        )
        assert again.request.request_id == "r1"
    finally:
        channel.close()
    with pytest.raises(ValueError, match="either channel= or credentials="):
        AccountingClient(channel=channel, credentials=grpc.ssl_channel_credentials())
