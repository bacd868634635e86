"""ORCA load reports, read by a real ORCA client over a real socket from a real sidecar process.

The client is a plain gRPC stub of ``xds.service.orca.v3.OpenRcaService`` generated from the
same published definitions (``enginetime.orca``): what Envoy or gRPC's weighted round robin
would open. The sidecar requires an API token, as ORCA must sit behind the same guard as the
AccountingService. The engine: 2 LOCKSTEP shards with three decoding requests each, fed as
real ingest frames with current timestamps (so the busy fraction is live), then a 30K-token
request is admitted on shard 0 (the storm warning) and prefilled.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from helpers import IngestConnection, arrived, event, finished, hello, start_sidecar, step, wait_until
from simulator import true_cost

from enginetime.clients import AccountingClient, InterferencePhase, OrcaLoadReport, orca_trailer
from enginetime.engine_hooks.constants import Coupling, EventKind
from enginetime.orca import orca_load_report_pb2, orca_pb2, orca_pb2_grpc

pytestmark = pytest.mark.e2e

ENGINE = "orca-eng"
TOKEN = "orca-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
BIG = 30_000
CHUNK = 4096


class Engine:
    """Two LOCKSTEP recorders' worth of frames, timed so the last step ends now."""

    def __init__(self, ingest: str) -> None:
        self.conns = [IngestConnection(ingest) for _ in range(2)]
        for k, c in enumerate(self.conns):
            c.send(hello(ENGINE, k, 2, coupling=int(Coupling.LOCKSTEP)))
        self.seq = [0, 0]
        self.gs = 0
        self.t = time.time_ns() - 3_000_000_000

    def group(self, batches: dict[int, list[tuple[int, int, int, int]]]) -> None:
        d = int(max(true_cost(b) for b in batches.values()))
        for k, c in enumerate(self.conns):
            b = batches.get(k, [])
            c.send(
                step(
                    self.seq[k],
                    [e[0] for e in b],
                    [e[1] for e in b],
                    [e[2] for e in b],
                    [e[3] for e in b],
                    device_time_ns=d,
                    start_time_ns=self.t,
                    global_step=self.gs,
                )
            )
            self.seq[k] += 1
        self.gs += 1
        self.t += d

    def close(self) -> None:
        for c in self.conns:
            c.close()


DECODERS = {k: [(10 + h, 0, 1, 500) for h in range(3)] for k in range(2)}


def warm(eng: Engine) -> None:
    """Fit the cost model on varied batches, then leave three decoders running on each shard."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(eng.conns):
        c.send(*(arrived(1000 + h, f"w{k}-{h}", 100, time_ns=eng.t) for h in range(24)))
    for _ in range(120):
        batches = {}
        for k in range(2):
            n = int(rng.integers(2, 24))
            b = [(1000 + h, 0, 1, int(rng.integers(100, 8000))) for h in range(n)]
            if rng.random() < 0.3:
                b[0] = (1000 + n, int(rng.integers(16, 1024)), 0, int(rng.integers(0, 30000)))
            batches[k] = b
        eng.group(batches)
    for k, c in enumerate(eng.conns):
        c.send(*(finished(1000 + h, 1, time_ns=eng.t) for h in range(24)))
        c.send(*(arrived(10 + h, f"d{k}-{h}", 100, time_ns=eng.t, cached_tokens=100) for h in range(3)))
    eng.t = max(eng.t, time.time_ns() - 1_000_000_000)
    for _ in range(5):
        eng.group(DECODERS)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orca")
    token = tmp / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with start_sidecar(tmp, "--api-token-file", str(token), "--metrics-port", "0") as sp:
        yield sp


def reports(channel: grpc.Channel, n: int, interval_s: float, engine: str = ENGINE) -> list[tuple]:
    """``n`` reports of one StreamCoreMetrics call and when each arrived (monotonic seconds)."""
    stub = orca_pb2_grpc.OpenRcaServiceStub(channel)
    req = orca_pb2.OrcaLoadReportRequest()
    req.report_interval.FromNanoseconds(int(interval_s * 1e9))
    md = (*AUTH, ("enginetime-engine-id", engine)) if engine else AUTH
    call = stub.StreamCoreMetrics(req, metadata=md, timeout=30)
    out = []
    try:
        for report in call:
            out.append((time.monotonic(), report))
            if len(out) == n:
                break
    finally:
        call.cancel()
    return out


def test_orca_stream_cost_report_and_storm_warning(sidecar) -> None:
    eng = Engine(sidecar.ingest)
    channel = grpc.insecure_channel(sidecar.grpc_target)
    try:
        stub = orca_pb2_grpc.OpenRcaServiceStub(channel)
        # The same guard as the AccountingService: no token, no load reports.
        with pytest.raises(grpc.RpcError) as err:
            next(stub.StreamCoreMetrics(orca_pb2.OrcaLoadReportRequest(), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        warm(eng)
        with AccountingClient(sidecar.grpc_target, token=TOKEN, timeout=10) as client:
            wait_until(
                lambda: sum(s.active_requests for s in client.get_shards(ENGINE)) == 6,
                message="the decoders never showed as running",
            )
            storms = client.stream_interference(engine_id=ENGINE, min_stall=0.0, timeout=30)
            eng.conns[0].send(arrived(50, "orca-big", BIG, time_ns=eng.t, session_id="orca-s"))
            eng.conns[0].send(event(50, int(EventKind.SCHEDULED), time_ns=eng.t, cached_tokens=0))
            # The warning comes at admission, before a single chunk of it has run. (The warm-up's
            # own small storms may still report their end on this stream: only orca-big counts.)
            big = (e for e in storms if e.aggressor_request_id == "orca-big")
            warn = next(big)
            assert warn.phase == InterferencePhase.PREDICTED, warn
            assert warn.aggressor_request_id == "orca-big" and warn.victims.request_count == 3
            assert warn.victims.shards == (1,)
            assert warn.victims.seconds >= 1.0  # the storm threshold

            # Out of band: every 0.2 s, this engine's load.
            got = reports(channel, 3, 0.2)
            gaps = [b[0] - a[0] for a, b in zip(got, got[1:], strict=False)]
            assert all(0.15 <= g <= 1.0 for g in gaps), gaps
            last = got[-1][1]
            named = dict(last.named_metrics)
            assert named["enginetime.connected_shards"] == 2
            assert named["enginetime.active_requests"] == 7  # 6 decoders + the admitted request
            # The warning's figure, still ahead: nothing of the prefill has run yet.
            assert named["enginetime.predicted_stall_seconds"] == pytest.approx(
                warn.victims.seconds, rel=0.01
            )
            assert named["enginetime.storm_stall_seconds"] == 0 and named["enginetime.storm_active"] == 0
            assert 0 < last.application_utilization <= 1
            assert last.utilization["enginetime.busy_fraction"] == pytest.approx(last.application_utilization)
            assert {f"enginetime.shard.{ENGINE}/{k}" for k in (0, 1)} <= set(last.utilization)
            assert not last.request_cost  # out of band: no request

            # The storm runs: while it does, the stream reports its stall.
            for start in range(0, BIG, CHUNK):
                eng.group({**DECODERS, 0: [*DECODERS[0], (50, min(CHUNK, BIG - start), 0, start)]})
            started = next(big)
            assert started.phase == InterferencePhase.STARTED

            # A report is served before ingest the sidecar has queued (calls never wait for it), so
            # the last chunks may not be attributed yet: wait for the report that has seen them all.
            def settled() -> orca_load_report_pb2.OrcaLoadReport | None:
                report = reports(channel, 1, 0.2)[0][1]
                return report if report.named_metrics["enginetime.predicted_stall_seconds"] == 0 else None

            during = wait_until(
                settled, message="the predicted stall never fell to 0 once every chunk of the prefill had run"
            )
            assert during.named_metrics["enginetime.storm_active"] == 1
            assert during.named_metrics["enginetime.storm_stall_seconds"] >= 1.0
            assert during.named_metrics["enginetime.predicted_stall_seconds"] == 0
            storms.close()

            for _ in range(3):
                eng.group({**DECODERS, 0: [*DECODERS[0], (50, 0, 1, BIG)]})
            eng.conns[0].send(finished(50, 3, time_ns=eng.t))
            eng.group(DECODERS)
            acct = wait_until(
                lambda: (a := client.get_request("orca-big", engine_id=ENGINE)).state.terminal and a,
                message="orca-big never finished",
            )
            # Per request: its costs, as a proxy attaches them to the response.
            report = client.request_cost("orca-big", engine_id=ENGINE)
            assert isinstance(report, OrcaLoadReport)
            cost = dict(report.request_cost)
            assert set(cost) == {"engine_time", "gpu_time", "interference", "queue_time"}
            assert cost["engine_time"] == pytest.approx(acct.engine_time, abs=1e-9)
            assert cost["gpu_time"] == pytest.approx(acct.gpu_time, abs=1e-9)
            assert cost["interference"] == pytest.approx(acct.interference, abs=1e-9)
            assert cost["engine_time"] > 0.5 * true_cost([(50, BIG, 0, 0)]) / 1e9
            assert report.named_metrics["enginetime.connected_shards"] == 2
            key, value = orca_trailer(report)
            assert key == "endpoint-load-metrics-bin"
            assert orca_load_report_pb2.OrcaLoadReport.FromString(value) == report

        # A named engine the sidecar does not know is an error, not a stream of zeros.
        with pytest.raises(grpc.RpcError) as err:
            reports(channel, 1, 1.0, engine="no-such-engine")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert ENGINE in (err.value.details() or "")

        # The interval has a floor: asking for 1 ms gets a report every 0.1 s.
        fast = reports(channel, 4, 0.001, engine="")
        gaps = [b[0] - a[0] for a, b in zip(fast, fast[1:], strict=False)]
        assert min(gaps) >= 0.08, gaps

        body = (
            urllib.request.urlopen(f"http://{sidecar.fields['metrics']}/metrics", timeout=10).read().decode()
        )
        assert "enginetime_storms_predicted_total 1.0" in body
    finally:
        channel.close()
        eng.close()


def test_streams_end_when_the_sidecar_stops(tmp_path) -> None:
    with start_sidecar(tmp_path) as sp:
        channel = grpc.insecure_channel(sp.grpc_target)
        stub = orca_pb2_grpc.OpenRcaServiceStub(channel)
        req = orca_pb2.OrcaLoadReportRequest()
        req.report_interval.FromSeconds(30)
        call = stub.StreamCoreMetrics(req, timeout=60)
        first = next(call)
        assert first.named_metrics["enginetime.connected_shards"] == 0  # no engine yet: an idle report
        t0 = time.monotonic()
        sp.stop()
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 10
        channel.close()
