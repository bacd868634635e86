"""AccountingService of a real sidecar process, through the generated stub.

Each test streams its own engine's records (its own engine id) into one shared
sidecar and checks what a session server would see over gRPC. The slow-reader
test runs its own sidecar: it measures ingest throughput with and without a
StreamUpdates subscriber that never reads, then sees that subscriber cut off.
"""

from __future__ import annotations

import gc
import threading
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import IngestConnection, arrived, event, finished, hello, start_sidecar, step, wait_until
from otel_helpers import metrics_address, scrape

from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc
from enginetime.v1 import ingest_pb2

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

MS = 1_000_000
STORM_THRESHOLD_S = 0.5


# For conftest's module_sidecar; the metrics port lets a test see when its streams are subscribed.
SIDECAR_ARGS = ("--storm-threshold", str(STORM_THRESHOLD_S), "--metrics-port", "0")


def stream_subscribers(sidecar) -> int:
    return int(scrape(sidecar.metrics).get(("enginetime_stream_subscribers", ()), 0))


@pytest.fixture(scope="module")
def sidecar(module_sidecar):
    return module_sidecar


@pytest.fixture(scope="module")
def channel(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.AccountingServiceStub(channel)


def ns(d: Duration) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def get(stub, request_id: str) -> pb.RequestAccounting:
    return stub.GetRequest(pb.GetRequestRequest(request_id=request_id), timeout=5).request


def wait_for(stub, request_id: str, predicate, what: str) -> pb.RequestAccounting:
    def check():
        try:
            acc = get(stub, request_id)
        except grpc.RpcError:
            return None
        return acc if predicate(acc) else None

    return wait_until(check, timeout=10, message=f"{request_id}: never {what}")


class Engine:
    """A scripted recorder: one ingest connection, explicit clocks (steps 10 ms apart)."""

    def __init__(self, sidecar, engine_id: str, shard: int = 0, num_shards: int = 1, coupling: int = 1):
        self.conn = IngestConnection(sidecar.ingest)
        self.conn.send(hello(engine_id, shard=shard, num_shards=num_shards, coupling=coupling))
        self.t = time.time_ns() - 60_000_000_000  # a minute ago, so every figure is in the past
        self.seq = 0

    def arrive(self, handle: int, request_id: str, prompt_tokens: int = 32, **kw) -> None:
        self.conn.send(arrived(handle, request_id, prompt_tokens, time_ns=self.t, **kw))

    def step(self, handles, prefill=None, decode=None, context=None, device_ms: float = 5, **kw) -> None:
        self.seq += 1
        dev = int(device_ms * MS)
        self.conn.send(
            step(self.seq, handles, prefill, decode, context, device_time_ns=dev, start_time_ns=self.t, **kw)
        )
        self.t += max(dev, 10 * MS)

    def finish(self, handle: int, output_tokens: int = 0) -> None:
        self.conn.send(finished(handle, output_tokens, time_ns=self.t))

    def close(self) -> None:
        self.conn.close()


# ----------------------------------------------------------------------------- unary


def test_health_is_serving_and_reflection_lists_the_service(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    named = health_pb2.HealthCheckRequest(service="enginetime.v1.AccountingService")
    assert health.Check(named, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"enginetime.v1.AccountingService", "grpc.health.v1.Health"} <= names


def test_unknown_request_is_not_found_with_its_id(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRequest(pb.GetRequestRequest(request_id="no-such-request-42"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("request 'no-such-request-42' is not known to this sidecar: ")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRequest(pb.GetRequestRequest(request_id=""), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_request_reports_the_accounting(sidecar, stub) -> None:
    eng = Engine(sidecar, "svc-get")
    eng.arrive(
        1,
        "get-1",
        prompt_tokens=40,
        session_id="sess-9",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    )
    eng.t += 20 * MS  # 20 ms in the queue
    eng.step([1], prefill=[40], decode=[0], context=[0], device_ms=8)
    for i in range(3):
        eng.step([1], decode=[1], context=[40 + i], device_ms=4)
    eng.finish(1, output_tokens=3)
    acc = wait_for(stub, "get-1", lambda a: a.state == pb.REQUEST_STATE_FINISHED, "finished")
    eng.close()

    assert (acc.engine_id, acc.shard, acc.session_id, acc.steps) == ("svc-get", 0, "sess-9", 4)
    assert acc.traceparent.startswith("00-aaaa")
    assert (acc.tokens.prompt, acc.tokens.prefilled, acc.tokens.decoded) == (40, 40, 3)
    assert acc.finish_reason == "stop" and acc.HasField("finish_time") and acc.HasField("last_step_time")
    # Alone on its shard: every step is its own work, 8 + 3 x 4 ms.
    assert acc.engine_time_ns == 20 * MS
    assert acc.queue_time_ns == 20 * MS
    assert acc.interference_ns == 0
    # The Duration and the integer twin agree, and the identity of DESIGN §2 holds exactly.
    for field in ("queue_time", "engine_time", "gpu_time", "interference", "wall"):
        assert ns(getattr(acc, field)) == getattr(acc, f"{field}_ns"), field
    assert acc.wall_ns == acc.queue_time_ns + acc.engine_time_ns + acc.interference_ns + ns(acc.other)
    assert ns(acc.finish_time) - ns(acc.arrival_time) == acc.wall_ns
    assert not acc.HasField("routed_shard")


def test_cached_tokens_reported_at_scheduled_count(sidecar, stub) -> None:
    """Engines (the testbed, vLLM) learn prefix-cache hits on admission: prompt = cached + prefilled."""
    eng = Engine(sidecar, "svc-cached")
    eng.arrive(1, "cached-1", prompt_tokens=40)
    eng.conn.send(event(1, ingest_pb2.REQUEST_EVENT_KIND_SCHEDULED, time_ns=eng.t, cached_tokens=24))
    eng.step([1], prefill=[16], decode=[0], context=[24])
    eng.step([1], decode=[1], context=[40])
    eng.finish(1, output_tokens=1)
    acc = wait_for(stub, "cached-1", lambda a: a.state == pb.REQUEST_STATE_FINISHED, "finished")
    eng.close()
    assert (acc.tokens.prompt, acc.tokens.cached, acc.tokens.prefilled) == (40, 24, 16)
    assert acc.tokens.prompt == acc.tokens.cached + acc.tokens.prefilled


def test_list_requests_filters_and_pages(sidecar, stub) -> None:
    eng = Engine(sidecar, "svc-list")
    ids = [f"list-{i}" for i in range(7)]
    for handle, rid in enumerate(ids, start=1):
        eng.arrive(handle, rid)
        eng.t += MS
    eng.step([1, 2], decode=[1, 1])
    eng.finish(1)
    eng.finish(2)
    wait_for(stub, "list-1", lambda a: a.state == pb.REQUEST_STATE_FINISHED, "finished")

    flt = pb.RequestFilter(engine_id="svc-list")
    pages, token = [], ""
    while True:
        resp = stub.ListRequests(pb.ListRequestsRequest(filter=flt, page_size=3, page_token=token), timeout=5)
        assert resp.total_size == 7
        pages.append([r.request_id for r in resp.requests])
        token = resp.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == ids[::-1]  # newest arrival first, each exactly once

    done = stub.ListRequests(
        pb.ListRequestsRequest(
            filter=pb.RequestFilter(engine_id="svc-list", states=[pb.REQUEST_STATE_FINISHED])
        ),
        timeout=5,
    )
    assert sorted(r.request_id for r in done.requests) == ["list-0", "list-1"] and done.total_size == 2
    assert done.next_page_token == ""

    for bad in ("not-a-token", token_for_other_filter(stub)):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListRequests(pb.ListRequestsRequest(filter=flt, page_token=bad), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ListRequests(pb.ListRequestsRequest(filter=pb.RequestFilter(states=[99])), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "99" in info.value.details()
    eng.close()


def token_for_other_filter(stub) -> str:
    resp = stub.ListRequests(
        pb.ListRequestsRequest(filter=pb.RequestFilter(engine_id="svc-list", session_id=""), page_size=1),
        timeout=5,
    )
    other = stub.ListRequests(
        pb.ListRequestsRequest(filter=pb.RequestFilter(), page_size=1), timeout=5
    ).next_page_token
    assert resp.next_page_token and other and other != resp.next_page_token
    return other


def test_get_shards(sidecar, stub) -> None:
    engines = [Engine(sidecar, "svc-shards", shard=s, num_shards=2, coupling=2) for s in range(2)]
    for s, eng in enumerate(engines):
        eng.arrive(1, f"shards-{s}")
    for g in range(3):
        for eng in engines:
            eng.step([1], decode=[1], global_step=g)
    wait_until(
        lambda: (
            [s.steps for s in stub.GetShards(pb.GetShardsRequest(engine_id="svc-shards"), timeout=5).shards]
            == [3, 3]
        ),
        timeout=10,
    )
    shards = stub.GetShards(pb.GetShardsRequest(engine_id="svc-shards"), timeout=5).shards
    assert [s.shard for s in shards] == [0, 1]
    for s in shards:
        assert s.engine_id == "svc-shards" and s.coupling == ingest_pb2.COUPLING_LOCKSTEP
        assert s.connected and s.engine_kind == "test" and s.device_name == "cpu"
        assert s.timer_source == ingest_pb2.TIMER_SOURCE_MONOTONIC and s.HasField("last_step_time")
    everyone = stub.GetShards(pb.GetShardsRequest(), timeout=5).shards
    assert sum(s.engine_id == "svc-shards" for s in everyone) == 2
    for eng in engines:
        eng.close()


def test_busy_fraction_counts_only_steps_with_the_shards_own_work(sidecar, stub) -> None:
    """A lockstep shard with nothing to run steps IDLE (it waits for its peers): it is not busy."""
    engines = [Engine(sidecar, "svc-busy", shard=s, num_shards=2, coupling=2) for s in range(2)]
    start = time.time_ns() - 700_000_000  # inside the 2 s rate window
    for eng in engines:
        eng.t = start
    engines[0].arrive(1, "busy-1")
    for g in range(60):
        engines[0].step([1], decode=[1], global_step=g, device_ms=10)
        engines[1].step([], kind=ingest_pb2.STEP_KIND_IDLE, global_step=g, device_ms=10)

    def shards():
        got = stub.GetShards(pb.GetShardsRequest(engine_id="svc-busy"), timeout=5).shards
        return got if [s.steps for s in got] == [60, 60] else None

    working, idle = wait_until(shards, timeout=10)
    for eng in engines:
        eng.close()
    # Steps back to back for 0.6 s of the last ~0.7 s (more if this machine is slow to ask) on the
    # working shard; the idle shard's steps took as long but held none of its own work.
    assert 0.2 < working.busy_fraction <= 1.0, working.busy_fraction
    assert idle.busy_fraction == 0.0, idle.busy_fraction


# ----------------------------------------------------------------------------- streams


def test_watch_request_follows_until_finished(sidecar, stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.WatchRequest(pb.WatchRequestRequest(request_id="never-heard-of"), timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'never-heard-of'" in info.value.details()

    eng = Engine(sidecar, "svc-watch")
    eng.arrive(1, "watch-1")
    wait_for(stub, "watch-1", lambda a: True, "announced")
    interval = 0.2
    stream = stub.WatchRequest(
        pb.WatchRequestRequest(request_id="watch-1", min_interval=Duration(nanos=int(interval * 1e9))),
        timeout=30,
    )
    first = next(stream)
    assert first.request.request_id == "watch-1" and first.request.state == pb.REQUEST_STATE_QUEUED

    received: list[tuple[float, pb.RequestAccounting]] = []
    reader = threading.Thread(target=lambda: received.extend((time.monotonic(), m.request) for m in stream))
    reader.start()
    began = time.monotonic()
    for _ in range(40):  # 1 s of steps, much faster than the watcher's interval
        eng.step([1], decode=[1])
        time.sleep(0.025)
    eng.finish(1)
    reader.join(timeout=15)
    assert not reader.is_alive(), "WatchRequest did not end after the request finished"
    elapsed = time.monotonic() - began
    eng.close()

    states = [r.state for _, r in received]
    assert states[-1] == pb.REQUEST_STATE_FINISHED and received[-1][1].steps == 40
    assert pb.REQUEST_STATE_FINISHED not in states[:-1]
    steps = [r.steps for _, r in received]
    assert steps == sorted(steps)
    # At most one update per min_interval (a little slack for timer jitter).
    assert len(received) <= elapsed / interval + 2, (len(received), elapsed)
    gaps = [b[0] - a[0] for a, b in zip(received, received[1:], strict=False)]
    assert all(g >= interval * 0.7 for g in gaps), gaps


def test_stream_updates_coalesces_per_request(sidecar, stub) -> None:
    eng = Engine(sidecar, "svc-stream")
    eng.arrive(1, "su-a")
    eng.arrive(2, "su-b")
    eng.arrive(3, "su-other")  # changes as often, but outside the filter
    wait_for(stub, "su-other", lambda a: True, "announced")

    flt = pb.RequestFilter(request_ids=["su-a", "su-b"])
    stream = stub.StreamUpdates(
        pb.StreamUpdatesRequest(filter=flt, interval=Duration(nanos=300 * MS)), timeout=30
    )
    first = next(stream)  # sent at once: the current state of the named requests
    assert sorted(u.request_id for u in first.updates) == ["su-a", "su-b"]

    batches: list[pb.StreamUpdatesResponse] = []
    done = threading.Event()

    def read() -> None:
        for batch in stream:
            batches.append(batch)
            latest = {u.request_id: u.state for b in batches for u in b.updates}
            if latest.get("su-a") == latest.get("su-b") == pb.REQUEST_STATE_FINISHED:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    for _ in range(30):
        eng.step([1, 2, 3], decode=[1, 1, 1])
        time.sleep(0.02)
    eng.finish(1)
    eng.finish(2)
    assert done.wait(15), f"never saw both finish: {batches}"
    stream.cancel()
    eng.close()

    seen = [u.request_id for b in batches for u in b.updates]
    assert set(seen) == {"su-a", "su-b"}  # never an id outside the filter
    for b in batches:  # within one batch each request appears once (coalesced)
        ids = [u.request_id for u in b.updates]
        assert len(ids) == len(set(ids))
    # 30 changes each arrived in ~0.6 s but were sent in a few 300 ms batches.
    assert len(batches) <= 6, len(batches)
    coalesced = [b.coalesced for b in batches]
    assert coalesced == sorted(coalesced) and coalesced[-1] > 0  # the stream says how much it merged
    last = {u.request_id: u for b in batches for u in b.updates}
    assert last["su-a"].steps == 30 and last["su-b"].steps == 30


def test_stream_updates_state_filter(sidecar, stub) -> None:
    eng = Engine(sidecar, "svc-filter")
    eng.arrive(1, "sf-1")
    wait_for(stub, "sf-1", lambda a: True, "announced")
    flt = pb.RequestFilter(engine_id="svc-filter", states=[pb.REQUEST_STATE_FINISHED])
    stream = stub.StreamUpdates(
        pb.StreamUpdatesRequest(filter=flt, interval=Duration(nanos=50 * MS)), timeout=30
    )
    assert list(next(stream).updates) == []  # nothing finished yet, but the subscription is live
    eng.step([1], decode=[1])
    eng.finish(1)
    update = next(u for b in stream for u in b.updates)
    assert update.request_id == "sf-1" and update.state == pb.REQUEST_STATE_FINISHED
    stream.cancel()
    eng.close()


def test_stream_interference_reports_a_storm(sidecar, stub) -> None:
    """One long prompt prefilled in chunks beside four decoding requests on its shard."""
    gc.collect()  # a stream object an earlier test dropped is cancelled now, not at some later GC
    before = stream_subscribers(sidecar)
    stream = stub.StreamInterference(pb.StreamInterferenceRequest(engine_id="svc-storm"), timeout=30)
    elsewhere = stub.StreamInterference(pb.StreamInterferenceRequest(engine_id="someone-else"), timeout=30)
    events: list[pb.InterferenceEvent] = []
    strays: list[pb.InterferenceEvent] = []
    ended = threading.Event()

    def read() -> None:
        for resp in stream:
            events.append(resp.event)
            if resp.event.phase == pb.InterferenceEvent.PHASE_ENDED:
                break
        ended.set()

    def read_elsewhere() -> None:
        try:
            strays.extend(resp.event for resp in elsewhere)
        except grpc.RpcError:
            pass  # cancelled below

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=read_elsewhere, daemon=True).start()
    # Both subscriptions are in place before the storm (no guessed sleep: the sidecar says so).
    wait_until(lambda: stream_subscribers(sidecar) >= before + 2, 10, message="the streams never subscribed")

    eng = Engine(sidecar, "svc-storm")
    victims = [1, 2, 3, 4]
    for h in victims:
        eng.arrive(h, f"victim-{h}", session_id=f"s{h}")
    eng.arrive(9, "storm-9", prompt_tokens=4096, session_id="big")
    for _ in range(3):  # decode alone: cheap steps
        eng.step(victims, decode=[1] * 4, device_ms=5)
    for chunk in range(8):  # 512-token chunks with the decodes: expensive mixed steps
        eng.step(
            victims + [9],
            prefill=[0] * 4 + [512],
            decode=[1] * 4 + [0],
            context=[100] * 4 + [512 * chunk],
            device_ms=300,
        )
    eng.step(victims + [9], decode=[1] * 5, device_ms=5)  # the long request decodes: its prefill ended
    eng.step(victims + [9], decode=[1] * 5, device_ms=5)
    assert ended.wait(15), f"no ENDED event; got {events}"
    stream.cancel()

    phases = [e.phase for e in events]
    assert phases[0] == pb.InterferenceEvent.PHASE_STARTED and phases[-1] == pb.InterferenceEvent.PHASE_ENDED
    last = events[-1]
    assert (last.engine_id, last.aggressor_request_id, last.aggressor_shard) == ("svc-storm", "storm-9", 0)
    assert last.aggressor_session_id == "big" and last.chunks == 8 and last.prefill_tokens == 8 * 512
    assert last.victims.request_count == 4 and list(last.victims.shards) == [0] and not last.cross_shard
    assert ns(last.victims.duration) >= STORM_THRESHOLD_S * 1e9
    assert last.HasField("start_time") and last.HasField("end_time")
    # The victims' accounting blames the storm's request.
    acc = get(stub, "victim-1")
    assert acc.top_blame and acc.top_blame[0].request_id == "storm-9" and acc.top_blame[0].same_shard

    # A subscriber filtering on another engine got none of it (it was offered in the same publish cycles).
    time.sleep(0.2)
    elsewhere.cancel()
    assert strays == []
    eng.close()


# ----------------------------------------------------------------------------- slow readers, shutdown

SHARDS, BATCH = 8, 256


class Firehose:
    """A fast LOCKSTEP engine: SHARDS connections, BATCH decoding requests each, pre-encoded steps."""

    def __init__(self, sidecar, engine_id: str) -> None:
        self.engine_id = engine_id
        self.t0 = time.time_ns() - 3_600_000_000_000
        self.conns = [IngestConnection(sidecar.ingest) for _ in range(SHARDS)]
        self.handles = list(range(1, BATCH + 1))
        for s, conn in enumerate(self.conns):
            conn.send(
                hello(engine_id, shard=s, num_shards=SHARDS, coupling=2),
                b"".join(
                    arrived(h, f"{engine_id}-{s}-{h}", time_ns=self.t0, session_id=f"{s}")
                    for h in self.handles
                ),
            )
        self.g = 0

    def encode(self, steps: int) -> list[list[bytes]]:
        per_shard = []
        for _s in range(SHARDS):
            per_shard.append(
                [
                    step(
                        g + 1,
                        self.handles,
                        [0] * BATCH,
                        [1] * BATCH,
                        [500] * BATCH,
                        device_time_ns=9 * MS,
                        start_time_ns=self.t0 + g * 10 * MS,
                        global_step=g,
                    )
                    for g in range(self.g, self.g + steps)
                ]
            )
        self.g += steps
        return per_shard

    def push(self, per_shard: list[list[bytes]], chunk: int = 8) -> None:
        """Round-robin over the shards, a few steps at a time, as lockstep shards would send."""
        for i in range(0, len(per_shard[0]), chunk):
            for conn, frames in zip(self.conns, per_shard, strict=True):
                conn.send(b"".join(frames[i : i + chunk]))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def processed_steps(stub, engine_id: str) -> int:
    return sum(s.steps for s in stub.GetShards(pb.GetShardsRequest(engine_id=engine_id), timeout=5).shards)


def timed_round(stub, hose: Firehose, steps: int) -> float:
    """Seconds from the first byte sent until the ledger attributed every step of the round."""
    frames = hose.encode(steps)
    want = processed_steps(stub, hose.engine_id) + steps * SHARDS
    began = time.perf_counter()
    hose.push(frames)
    wait_until(lambda: processed_steps(stub, hose.engine_id) >= want, timeout=30, interval=0.005)
    return time.perf_counter() - began


def test_a_subscriber_that_never_reads_costs_ingest_nothing_and_is_cut_off(tmp_path) -> None:
    # Three rounds must run while the stuck stream is still there: 4 s was too short for them on two
    # busy cores (seen in random-order runs), so the cut-off comes later and the rounds have room.
    lag_limit = 8.0
    with (
        start_sidecar(tmp_path, "--lag-limit", str(lag_limit), "--metrics-port", "0") as sp,
        grpc.insecure_channel(sp.grpc_target) as ch,
    ):
        stub = pb_grpc.AccountingServiceStub(ch)
        hose = Firehose(sp, "firehose")
        steps = 300  # x 8 shards x 256 entries = 614k entries a round
        timed_round(stub, hose, steps)  # warm-up: cost models fit, buffers grow
        alone = min(timed_round(stub, hose, steps) for _ in range(3))

        # A client that subscribes to everything every 10 ms and never reads. Its flow-control window
        # stays at the initial 64 KiB (no BDP probing), so grpc's writes back up at once; a probing
        # client first absorbs a few MiB, which only delays the same outcome.
        with grpc.insecure_channel(sp.grpc_target, options=[("grpc.http2.bdp_probe", 0)]) as stuck_ch:
            stuck = pb_grpc.AccountingServiceStub(stuck_ch).StreamUpdates(
                pb.StreamUpdatesRequest(interval=Duration(nanos=10 * MS))
            )
            # Every step of three more rounds is attributed while the stuck stream is still there:
            # ingest never waits for a subscriber (a blocked ingest would never finish a round).
            with_stuck = min(timed_round(stub, hose, steps) for _ in range(3))
            assert "cut off a stream" not in sp.stderr_text(), "cut off before the rounds ended"
            assert processed_steps(stub, hose.engine_id) >= 7 * steps * SHARDS
            # The speed figures are printed, not asserted: two busy cores make a rate ratio flaky
            # (seen at 2x in random-order runs beside other work).
            entries = steps * SHARDS * BATCH
            print(
                f"ingest alone {entries / alone:,.0f} entries/s, with a stuck subscriber "
                f"{entries / with_stuck:,.0f} entries/s"
            )

            # The stuck stream is cut off once its write has been blocked for the lag limit ...
            log = sp.wait_for_log("cut off a stream", timeout=lag_limit + 10)
            assert f"read nothing for {lag_limit:.1f} s" in log
            # ... and the client, when it finally reads, gets what was buffered, then the reason.
            received = 0
            with pytest.raises(grpc.RpcError) as info:
                for _ in stuck:
                    received += 1
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"did not read its updates for {lag_limit:.1f} s" in info.value.details()
            assert "--lag-limit" in info.value.details()
            assert received >= 1
            assert scrape(metrics_address(sp.stdout_lines))[("enginetime_streams_cut_off_total", ())] == 1

        # The sidecar is fine: ingest and unary calls go on.
        assert timed_round(stub, hose, 50) < 10
        hose.close()


def test_sigterm_ends_streams_with_unavailable_and_exits_cleanly(tmp_path) -> None:
    sp = start_sidecar(tmp_path)
    try:
        with grpc.insecure_channel(sp.grpc_target) as ch:
            stub = pb_grpc.AccountingServiceStub(ch)
            eng = Engine(sp, "svc-shutdown")
            eng.arrive(1, "sd-1")
            wait_for(stub, "sd-1", lambda a: True, "announced")
            watch = stub.WatchRequest(pb.WatchRequestRequest(request_id="sd-1"), timeout=30)
            updates = stub.StreamUpdates(pb.StreamUpdatesRequest(), timeout=30)
            assert next(watch).request.request_id == "sd-1"
            next(updates)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1

            began = time.monotonic()
            sp.proc.terminate()
            for stream in (watch, updates):
                with pytest.raises(grpc.RpcError) as info:
                    for _ in stream:
                        pass
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in info.value.details() or "Socket closed" in info.value.details()
            assert sp.proc.wait(20) == 0
            assert time.monotonic() - began < 10  # streams did not hold shutdown for the grace period
            eng.close()
        assert not __import__("os").path.exists(sp.socket_path)
        log = sp.stderr_text()
        assert "SIGTERM received" in log and "stopped" in log
    finally:
        sp.close()


def test_a_stream_following_everything_that_falls_behind_the_log_is_cut_off(tmp_path) -> None:
    """--subscriber-queue 10: streams following every request share a log of 200 changes."""
    with (
        start_sidecar(tmp_path, "--subscriber-queue", "10") as sp,
        grpc.insecure_channel(sp.grpc_target) as ch,
    ):
        stub = pb_grpc.AccountingServiceStub(ch)
        prompt = pb_grpc.AccountingServiceStub(ch).StreamUpdates(
            pb.StreamUpdatesRequest(interval=Duration(nanos=20 * MS))
        )
        lazy = stub.StreamUpdates(pb.StreamUpdatesRequest(interval=Duration(seconds=30)))
        assert len(next(prompt).updates) == 0 and len(next(lazy).updates) == 0  # both subscribed
        eng = Engine(sp, "behind")
        handles = list(range(1, 41))
        for h in handles:
            eng.arrive(h, f"behind-{h}")
        seen: set[str] = set()
        for _ in range(30):  # 40 requests changing in each of 30 steps: far more than 200 changes
            eng.step(handles, decode=[1] * len(handles))
            time.sleep(0.03)
        with pytest.raises(grpc.RpcError) as info:
            for _ in lazy:  # its next batch is 30 s away: the cut-off comes first
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell more than 200 request changes behind" in info.value.details()
        assert "--subscriber-queue" in info.value.details()
        # The stream that keeps up is not affected and saw every request.
        for batch in prompt:
            seen |= {u.request_id for u in batch.updates}
            if len(seen) == len(handles):
                break
        prompt.cancel()
        eng.close()
