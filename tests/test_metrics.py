"""Prometheus /metrics of a real sidecar process, parsed with prometheus_client's parser.

An INDEPENDENT two-shard engine speaks raw ingest frames: on shard 0 three
decoding requests are stalled by a long prompt prefilled in its own steps
(prefill-first: the decodes are left out of those steps), then two decodes and
the prompt finish while one keeps running; the shard's recorder reports
dropped records. Shard 1 has one request that never gets a step. Two more
connections break the wire contract. Every figure /metrics shows is then
compared with what the AccountingService reports for the same requests and
shards.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import IngestConnection, arrived, finished, heartbeat, hello, start_sidecar, step, wait_until
from otel_helpers import metrics_address, scrape

from enginetime.clients import AccountingClient, InterferencePhase, RequestNotFound, RequestState
from enginetime.sidecar.telemetry.metrics import SECONDS_BUCKETS

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

ENGINE = "metrics-engine"
MS = 1_000_000
HISTOGRAMS = {
    "enginetime_request_engine_time_seconds": "engine_time_ns",
    "enginetime_request_queue_time_seconds": "queue_time_ns",
    "enginetime_request_interference_seconds": "interference_ns",
    "enginetime_request_gpu_time_seconds": "gpu_time_ns",
    "enginetime_request_wall_seconds": "wall_ns",
}


def _drive(address: str) -> int:
    """Send the run; returns the end (ns) of the last step, d3's."""
    # The run (~220 ms of steps) ends just now: the shards' 2-second rate window still holds it.
    t = time.time_ns() - 250 * MS
    seq = iter(range(1000))
    with IngestConnection(address) as s0, IngestConnection(address) as s1:
        s1.send(hello(engine_id=ENGINE, shard=1, num_shards=2), arrived(1, "waiting", 100, time_ns=t))
        s0.send(hello(engine_id=ENGINE, shard=0, num_shards=2))
        s0.send(*(arrived(h, f"d{h}", 16, time_ns=t, session_id=f"s{h}") for h in (1, 2, 3)))
        s0.send(step(next(seq), [1, 2, 3], prefill=[16] * 3, start_time_ns=t + MS, device_time_ns=4 * MS))
        at = t + 5 * MS
        for _ in range(5):
            s0.send(step(next(seq), [1, 2, 3], start_time_ns=at, device_time_ns=5 * MS))
            at += 6 * MS
        s0.send(arrived(9, "storm", 4 * 512, time_ns=at))
        for c in range(4):  # prefill-first: the storm's chunks run alone
            s0.send(step(next(seq), [9], prefill=[512], context=[512 * c], start_time_ns=at,
                         device_time_ns=30 * MS))  # fmt: skip
            at += 31 * MS
        for _ in range(6):
            s0.send(step(next(seq), [1, 2, 3, 9], start_time_ns=at, device_time_ns=6 * MS))
            at += 7 * MS
        s0.send(finished(1, 6, time_ns=at), finished(2, 6, time_ns=at), finished(9, 6, time_ns=at))
        s0.send(heartbeat(dropped_frames=3, dropped_steps=2, dropped_events=1))
        last_end = at + 6 * MS
        s0.send(step(next(seq), [3], start_time_ns=at + MS, device_time_ns=5 * MS))
        # Two connections that break the contract: a step before any hello, a future protocol.
        with IngestConnection(address) as bad:
            bad.send(step(0, [1]))
            assert bad.closed_by_peer()
        with IngestConnection(address) as bad:
            bad.send(hello(engine_id="future", protocol_version=99))
            assert bad.closed_by_peer()
    return last_end


@pytest.mark.timeout(60)
def test_metrics_match_the_accounting(tmp_path: Path) -> None:
    with (
        start_sidecar(tmp_path, "--metrics-port", "0", "--storm-threshold", "0.01") as sidecar,
        AccountingClient(sidecar.grpc_target) as client,
    ):
        address = metrics_address(sidecar.stdout_lines)
        storms: list = []
        stream = client.stream_interference(engine_id=ENGINE)
        reader = threading.Thread(target=lambda: storms.extend(_until_ended(stream)), daemon=True)
        reader.start()
        # The stream is subscribed once the sidecar counts it (so it sees the storm start).
        wait_until(lambda: scrape(address)[("enginetime_stream_subscribers", ())] == 1)
        last_end = _drive(sidecar.ingest)
        reader.join(20)
        stream.close()
        # Everything sent was ingested: d3's last step is in its accounting.
        wait_until(lambda: client.get_request("d3").last_step_time_ns == last_end)

        # --- per shard (first, while the run is in the rate window): exact counts; rates only
        # fall while no step arrives, so the scraped ones lie between GetShards before and after
        before = {s.shard: s for s in client.get_shards(ENGINE)}
        m = scrape(address)
        after = {s.shard: s for s in client.get_shards(ENGINE)}
        for no in (0, 1):
            lv = (("engine_id", ENGINE), ("shard", str(no)))
            b, a = before[no], after[no]
            assert m[("enginetime_shard_active_requests", lv)] == a.active_requests == b.active_requests
            assert m[("enginetime_shard_queued_requests", lv)] == a.queued_requests == b.queued_requests
            assert m[("enginetime_shard_steps_total", lv)] == a.steps
            for gauge, attr in (
                ("enginetime_shard_decode_tokens_per_second", "decode_tokens_per_second"),
                ("enginetime_shard_prefill_tokens_per_second", "prefill_tokens_per_second"),
                ("enginetime_shard_busy_ratio", "busy_fraction"),
            ):
                assert getattr(a, attr) <= m[(gauge, lv)] <= getattr(b, attr), (gauge, no)
        assert (before[0].active_requests, before[0].queued_requests) == (1, 0)  # d3 decodes on
        assert (before[1].active_requests, before[1].queued_requests) == (0, 1)  # "waiting"
        assert before[0].decode_tokens_per_second > 0 and before[0].prefill_tokens_per_second > 0
        assert client.get_request("waiting").state is RequestState.QUEUED

        done = {"d1", "d2", "storm"}
        wait_until(lambda: {r.request_id for r in client.list_requests(engine_id=ENGINE, states=["finished"])
                            .requests} == done)  # fmt: skip
        final = {rid: client.get_request(rid) for rid in done}
        labels = (("engine_id", ENGINE), ("shard", "0"))
        # Histograms are observed once a finished request's figures settled (a few ticks later).
        m = wait_until(
            lambda: (
                (got := scrape(address))
                and got.get(("enginetime_request_wall_seconds_count", labels)) == 3
                and got
            ),
            message="the finished requests never showed up in the histograms",
        )

        # --- per finished request: count, sum and every bucket equal the accounting
        for name, field in HISTOGRAMS.items():
            values = [getattr(a, field) / 1e9 for a in final.values()]
            assert m[(f"{name}_count", labels)] == len(values)
            assert m[(f"{name}_sum", labels)] == pytest.approx(sum(values), rel=1e-12, abs=1e-12)
            for le in SECONDS_BUCKETS:
                key = (f"{name}_bucket", tuple(sorted((*labels, ("le", repr(float(le)))))))
                if key not in m:
                    key = (f"{name}_bucket", tuple(sorted((*labels, ("le", str(le))))))
                assert m[key] == sum(v <= le for v in values), (name, le)
        assert m[("enginetime_requests_finished_total", (*labels, ("state", "finished")))] == 3
        # The storm stalled the decodes: interference is what GetRequest says, and large.
        assert final["d1"].interference_ns > 4 * 25 * MS
        assert final["d1"].top_blame[0].request_id == "storm"

        # --- counters: storms, drops reported by the recorder, partial requests, rejections
        started = [e for e in storms if e.phase is InterferencePhase.STARTED]
        assert [e.aggressor_request_id for e in started] == ["storm"]
        assert m[("enginetime_storms_total", ())] == len(started)
        assert m[("enginetime_ingest_reported_drops_total", ())] == 3  # max(frames, steps + events)
        every = client.list_requests(engine_id=ENGINE).requests
        partial = [r.request_id for r in every if r.partial]
        assert partial == ["d3"]  # the only live request on shard 0 when the drops were reported
        assert m[("enginetime_partial_requests_total", ())] == len(partial)
        family = "enginetime_ingest_rejected_connections_total"
        rejected = {k[1][0][1]: v for k, v in m.items() if k[0] == family}
        assert set(rejected) >= {"malformed", "truncated", "no_hello", "bad_version", "ledger_error"}
        rejected = {reason: n for reason, n in rejected.items() if n}
        assert rejected == {"no_hello": 1, "bad_version": 1}  # every other reason is exposed as 0
        assert m[("enginetime_ingest_connections_total", ())] == 4
        assert m[("enginetime_spans_enabled", ())] == 0


def _until_ended(stream) -> list:
    out = []
    for e in stream:
        out.append(e)
        if e.phase is InterferencePhase.ENDED:
            break
    return out


def test_busy_metrics_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(AssertionError) as failure:
            start_sidecar(tmp_path, "--metrics-port", str(port), timeout=20)
    finally:
        taken.close()
    text = str(failure.value)
    assert "exit code 1" in text
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in text and "--metrics-port" in text


@pytest.mark.timeout(60)
def test_a_forgotten_engine_takes_its_series_and_its_requests_with_it(tmp_path: Path) -> None:
    """--max-engines 1: an engine that finished a request and left is forgotten when another
    engine id connects; /metrics stops showing its per-shard series and counts the forgetting,
    and the API no longer knows its request, while the newcomer's are served."""
    with (
        start_sidecar(tmp_path, "--metrics-port", "0", "--max-engines", "1") as sidecar,
        AccountingClient(sidecar.grpc_target) as client,
    ):
        address = metrics_address(sidecar.stdout_lines)
        t = time.time_ns() - 100 * MS
        with IngestConnection(sidecar.ingest) as first:
            first.send(hello(engine_id="first"), arrived(1, "first-1", 16, time_ns=t))
            first.send(step(0, [1], prefill=[16], start_time_ns=t + MS, device_time_ns=2 * MS))
            first.send(finished(1, 1, time_ns=t + 4 * MS))

            def first_is_counted() -> bool:
                labels = (("engine_id", "first"), ("shard", "0"), ("state", "finished"))
                return scrape(address).get(("enginetime_requests_finished_total", labels)) == 1

            wait_until(first_is_counted)
        wait_until(lambda: not any(s.connected for s in client.get_shards("first")))
        with IngestConnection(sidecar.ingest) as second:
            second.send(hello(engine_id="second"), arrived(1, "second-1", 16, time_ns=t))
            wait_until(lambda: client.get_request("second-1").request_id == "second-1")
            m = scrape(address)
            assert m[("enginetime_engines_forgotten_total", ())] == 1
            assert m[("enginetime_forgotten_requests_total", ())] == 1
            assert not [k for k in m if ("engine_id", "first") in k[1]], (
                "the forgotten engine's series remain"
            )
            assert [s.engine_id for s in client.get_shards()] == ["second"]
            assert client.list_requests(engine_id="first").total_size == 0
            with pytest.raises(RequestNotFound):
                client.get_request("first-1")
        assert "forgot engine 'first'" in sidecar.stderr_text()
