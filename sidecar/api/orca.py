"""ORCA load reports: enginetime's load and per-request cost in the format gateways read.

ORCA (Open Request Cost Aggregation, the xDS ``OrcaLoadReport``) is what Envoy and gRPC's
weighted load balancers consume. Two ways out of the sidecar:

* **Out of band**: ``xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`` on the sidecar's
  gRPC port sends one report per ``report_interval`` (at least ``MIN_INTERVAL_S``; 1 s when
  the client leaves it unset), describing one engine: the one named by the
  ``enginetime-engine-id`` request metadata, else every engine the sidecar serves. An engine
  named but unknown is NOT_FOUND.
* **Per request**: ``AccountingService/GetRequestCost`` answers one request's report, its
  ``request_cost`` filled, for a proxy to attach to that request's response as the
  ``endpoint-load-metrics-bin`` trailer (the clients' ``orca_trailer``).

Which fields are filled and what each means: docs/ORCA.md (``load_report`` below is the rule).
The same API guard (token, stream limits) as the AccountingService applies: the interceptor
covers every method of the server.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from enginetime.orca import orca_load_report_pb2 as orca_pb
from enginetime.orca import orca_pb2, orca_pb2_grpc
from enginetime.sidecar.ingest.limits import MAX_TEXT_BYTES, clip_text, quote
from enginetime.sidecar.ledger.protocols import AccountingReader
from enginetime.sidecar.ledger.views import RequestView, ShardView

log = logging.getLogger("enginetime.sidecar.api.orca")

#: Metadata key naming the engine an out-of-band stream reports on.
ENGINE_METADATA = "enginetime-engine-id"
#: Shortest report interval served (a client asking for less gets this).
MIN_INTERVAL_S = 0.1
#: Interval when the client sends none (zero).
DEFAULT_INTERVAL_S = 1.0
#: The trailer a proxy attaches a per-request report as (binary, serialized OrcaLoadReport).
TRAILER = "endpoint-load-metrics-bin"

PREFIX = "enginetime."
BUSY = PREFIX + "busy_fraction"
STORM_STALL = PREFIX + "storm_stall_seconds"
STORM_ACTIVE = PREFIX + "storm_active"
PREDICTED_STALL = PREFIX + "predicted_stall_seconds"
QUEUE = PREFIX + "queue_seconds"
ACTIVE = PREFIX + "active_requests"
QUEUED = PREFIX + "queued_requests"
SHARDS = PREFIX + "connected_shards"
#: request_cost names (seconds), in GetRequestCost reports.
COSTS = ("engine_time", "gpu_time", "interference", "queue_time")


def load_report(shards: list[ShardView]) -> orca_pb.OrcaLoadReport:
    """An OrcaLoadReport of the connected shards in ``shards`` (one engine's, or several engines').

    application_utilization and utilization[busy_fraction]: the mean device-busy fraction of
    the connected shards over the rate window; utilization[enginetime.shard.<engine>/<n>]: each
    shard's. rps_fractional: requests that ended (finished or aborted) per second over the rate
    window; eps: those that ended aborted. Named metrics: storm_stall_seconds (victim time the
    storms running now caused so far, summed), storm_active (1 while one runs),
    predicted_stall_seconds (victim time the rest of the running prefills is predicted to cause
    on other lockstep shards), queue_seconds (the oldest first-step wait now), active/queued
    requests and connected shards (counts).
    """
    live = [s for s in shards if s.connected]
    busy = sum(s.busy_fraction for s in live) / len(live) if live else 0.0
    report = orca_pb.OrcaLoadReport(application_utilization=busy)
    report.utilization[BUSY] = min(1.0, max(0.0, busy))
    for s in live:
        report.utilization[f"{PREFIX}shard.{s.engine_id}/{s.shard}"] = min(1.0, max(0.0, s.busy_fraction))
    stall = sum(s.current_storm.stall_ns for s in live if s.current_storm is not None)
    named = report.named_metrics
    named[STORM_STALL] = stall / 1e9
    named[STORM_ACTIVE] = 1.0 if any(s.current_storm is not None for s in live) else 0.0
    named[PREDICTED_STALL] = sum(s.predicted_stall_ns for s in live) / 1e9
    named[QUEUE] = max((s.oldest_queued_ns for s in live), default=0) / 1e9
    named[ACTIVE] = float(sum(s.active_requests for s in live))
    named[QUEUED] = float(sum(s.queued_requests for s in live))
    named[SHARDS] = float(len(live))
    named[BUSY] = busy
    # gRPC's and Envoy's weighted round robin weigh an endpoint by rps / (utilization + eps / rps
    # x penalty) and ignore a report whose rps is 0: without these the report is not used.
    report.rps_fractional = sum(s.ended_per_second for s in live)
    report.eps = sum(s.aborted_per_second for s in live)
    return report


def request_cost_report(view: RequestView, shards: list[ShardView]) -> orca_pb.OrcaLoadReport:
    """``view``'s costs (request_cost, seconds) beside its engine's load (``load_report``)."""
    report = load_report(shards)
    cost = report.request_cost
    cost["engine_time"] = view.engine_time_ns / 1e9
    cost["gpu_time"] = view.gpu_time_ns / 1e9
    cost["interference"] = view.interference_ns / 1e9
    cost["queue_time"] = view.queue_time_ns / 1e9
    return report


def report_interval(request: orca_pb2.OrcaLoadReportRequest) -> float:
    """The client's interval in seconds, floored at MIN_INTERVAL_S (unset: DEFAULT_INTERVAL_S)."""
    d = request.report_interval
    asked = d.seconds + d.nanos / 1e9
    if asked <= 0:
        return DEFAULT_INTERVAL_S
    return max(MIN_INTERVAL_S, asked)


class OrcaService(orca_pb2_grpc.OpenRcaServiceServicer):
    """``OpenRcaService``: a report per interval until the client leaves or the sidecar stops."""

    def __init__(self, ledger: AccountingReader, *, max_text_bytes: int = MAX_TEXT_BYTES) -> None:
        self.ledger = ledger
        self.max_text_bytes = max_text_bytes
        self._closed = asyncio.Event()

    def close(self) -> None:
        """End every stream (the sidecar is stopping): each ends with UNAVAILABLE after its last report."""
        self._closed.set()

    async def StreamCoreMetrics(self, request: orca_pb2.OrcaLoadReportRequest, context) -> None:
        interval = report_interval(request)
        engine_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == ENGINE_METADATA:
                text = value if isinstance(value, str) else value.decode("utf-8", "replace")
                engine_id = clip_text(text, self.max_text_bytes)
        if engine_id and not self.ledger.shards(engine_id):
            known = sorted({s.engine_id for s in self.ledger.shards()})
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"engine {quote(engine_id)} is not known to this sidecar ({ENGINE_METADATA} metadata); "
                f"known engines: {', '.join(map(quote, known)) or 'none yet'}",
            )
        while True:
            await context.write(load_report(self.ledger.shards(engine_id)))
            try:
                await asyncio.wait_for(self._closed.wait(), interval)
            except TimeoutError:
                continue
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down; reopen the stream when it is back"
            )


def add_to_server(service: OrcaService, server: grpc.aio.Server) -> None:
    orca_pb2_grpc.add_OpenRcaServiceServicer_to_server(service, server)


SERVICE_NAME = orca_pb2.DESCRIPTOR.services_by_name["OpenRcaService"].full_name

__all__ = [
    "ENGINE_METADATA",
    "MIN_INTERVAL_S",
    "SERVICE_NAME",
    "TRAILER",
    "OrcaService",
    "add_to_server",
    "load_report",
    "report_interval",
    "request_cost_report",
]
