"""Prometheus ``/metrics`` for the sidecar (``--metrics-port``).

Two kinds of figures:

* **Per finished request** — histograms (seconds) of engine_time, queue time,
  interference, gpu_time and wall, labelled by engine and shard, observed once
  per request from the finished-request feed (``sidecar.finished``), i.e. with
  the settled figures ``GetRequest`` returns.
* **Current state** — counters and gauges read at scrape time: storms, ingest
  drops (what the recorders reported dropping; connections rejected by reason),
  partial requests, spans built/exported/dropped, and per-shard decode/prefill
  tokens per second, busy ratio, active and queued requests. The ledger is
  single-threaded, so a scrape (on prometheus_client's HTTP thread) asks the
  event loop for a snapshot and waits for it (``snapshot_timeout_s``; the last
  snapshot is served if the loop does not answer in time). A scrape costs the
  loop one pass over the shards, nothing between scrapes. The snapshot holds
  copies of the counter dataclasses themselves (``LedgerCounters``,
  ``IngestCounters``, ``SpanCounters``), so a renamed counter fails the type
  check instead of exporting 0.

Names follow the Prometheus conventions: ``enginetime_`` prefix, base units in
the name (``_seconds``), ``_total`` for counters, ``_ratio`` for fractions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

from enginetime.sidecar.ingest.frames import REASONS as FRAME_REJECT_REASONS
from enginetime.sidecar.ingest.server import SERVER_REASONS, IngestCounters
from enginetime.sidecar.ledger.ledger import LedgerCounters
from enginetime.sidecar.ledger.trace import (
    R_STATE,
    R_VIEW,
    V_ENGINE,
    V_ENGINE_ID,
    V_GPU,
    V_INTERFERENCE,
    V_QUEUE,
    V_SHARD,
    V_WALL,
)
from enginetime.sidecar.ledger.views import RequestState, ShardView
from enginetime.sidecar.telemetry.tracing import DROP_REASONS, SpanCounters

log = logging.getLogger("enginetime.sidecar.telemetry.metrics")

#: Seconds buckets: a few ms of engine time up to the incident's 600 s proxy timeout and beyond.
SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)  # fmt: skip


_REJECT_REASONS = (*FRAME_REJECT_REASONS, *SERVER_REASONS)


class MetricsStartError(RuntimeError):
    """The metrics endpoint cannot be served; the message says what to change."""


@dataclass(frozen=True)
class StateSnapshot:
    """What a scrape reports, copied on the event loop (plain values: safe on any thread)."""

    ledger: LedgerCounters = field(default_factory=LedgerCounters)  # a copy
    ingest: IngestCounters = field(default_factory=IngestCounters)  # a copy (rejected: by reason)
    api_rejected: dict[str, int] = field(default_factory=dict)  # refused gRPC calls by reason
    api_streams: int = 0
    shards: tuple[ShardView, ...] = ()
    spans: SpanCounters | None = None  # a copy; None: span export is off
    spans_exported: int = 0  # spans the OTLP endpoint accepted
    finished_dropped: dict[str, int] = field(default_factory=dict)
    subscribers: int = 0
    streams_cut_off: int = 0  # streams ended because their client read nothing for --lag-limit


class _RequestHistograms:
    """The per-request histograms; ``observe`` runs on the event loop (feed consumer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("engine_id", "shard")

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=SECONDS_BUCKETS)

        self.engine_time = hist(
            "enginetime_request_engine_time_seconds",
            "Engine time of finished requests: their service time without other requests' prefill "
            "(what engine-time budgets measure).",
        )
        self.queue_time = hist(
            "enginetime_request_queue_time_seconds",
            "Queue time of finished requests: arrival at the engine to their first step.",
        )
        self.interference = hist(
            "enginetime_request_interference_seconds",
            "Interference of finished requests: time lost to other requests' work (same-shard prefill, "
            "waiting for a slower lockstep shard, steps that left them out).",
        )
        self.gpu_time = hist(
            "enginetime_request_gpu_time_seconds",
            "GPU time of finished requests: their share of device time (cost accounting).",
        )
        self.wall = hist(
            "enginetime_request_wall_seconds",
            "Wall time of finished requests: arrival to finish.",
        )
        self.finished = Counter(
            "enginetime_requests_finished",
            "Requests that reached a terminal state, by state (finished or aborted).",
            ("engine_id", "shard", "state"),
            registry=registry,
        )
        self._children: dict[tuple[str, int, int], tuple] = {}

    def forget_engine(self, engine_id: str) -> None:
        """Drop a forgotten engine's series (the ledger forgot it to admit a new engine id)."""
        for key in [key for key in self._children if key[0] == engine_id]:
            del self._children[key]
            lv = (key[0], str(key[1]))
            for metric in (self.engine_time, self.queue_time, self.interference, self.gpu_time, self.wall):
                with contextlib.suppress(KeyError):
                    metric.remove(*lv)
            with contextlib.suppress(KeyError):
                self.finished.remove(*lv, "aborted" if key[2] == int(RequestState.ABORTED) else "finished")

    def observe(self, records: list[tuple]) -> None:
        children = self._children
        aborted = int(RequestState.ABORTED)
        for record in records:
            v = record[R_VIEW]
            state = record[R_STATE]
            key = (v[V_ENGINE_ID], v[V_SHARD], state)
            hs = children.get(key)
            if hs is None:
                lv = (v[V_ENGINE_ID], str(v[V_SHARD]))
                hs = children[key] = (
                    self.engine_time.labels(*lv),
                    self.queue_time.labels(*lv),
                    self.interference.labels(*lv),
                    self.gpu_time.labels(*lv),
                    self.wall.labels(*lv),
                    self.finished.labels(*lv, "aborted" if state == aborted else "finished"),
                )
            hs[0].observe(v[V_ENGINE] / 1e9)
            hs[1].observe(v[V_QUEUE] / 1e9)
            hs[2].observe(v[V_INTERFERENCE] / 1e9)
            hs[3].observe(v[V_GPU] / 1e9)
            hs[4].observe(v[V_WALL] / 1e9)
            hs[5].inc()


class _StateCollector(Collector):
    """Counters and gauges from a fresh StateSnapshot at each scrape."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.fresh_snapshot()
        led, ing = snap.ledger, snap.ingest

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter(
            "enginetime_storms",
            "Prefill storms started (a request's prefill run whose "
            "stall on others crossed --storm-threshold).",
            led.storms,
        )
        yield counter(
            "enginetime_storms_predicted",
            "Storm warnings at admission (PREDICTED): a request admitted on a lockstep engine whose "
            "predicted prefill would stall the other shards' running requests past --storm-threshold.",
            led.storms_predicted,
        )
        yield counter(
            "enginetime_engines_forgotten",
            "Engines with no shard connected forgotten, with the requests they still held, to admit a "
            "new engine id at --max-engines / --max-shards.",
            led.engines_forgotten,
        )
        yield counter(
            "enginetime_forgotten_requests",
            "Requests dropped with a forgotten engine (finished ones still within --retention included).",
            led.forgotten_requests,
        )
        yield counter(
            "enginetime_partial_requests",
            "Requests marked partial: the sidecar missed records "
            "for them (drops, sequence gaps, lost events).",
            led.partial_requests,
        )
        yield counter(
            "enginetime_ingest_reported_drops",
            "Records (steps, events) the engines' recorders "
            "reported dropping (buffer full while the sidecar was unreachable or slow).",
            led.reported_drops,
        )
        rejected = CounterMetricFamily(
            "enginetime_ingest_rejected_connections",
            "Ingest connections closed for breaking the wire contract, by reason (the sidecar log names "
            "the engine and the frame).",
            labels=("reason",),
        )
        # Every known reason from the start (0 until it happens), as Prometheus advises.
        for reason, n in sorted((dict.fromkeys(_REJECT_REASONS, 0) | ing.rejected).items()):
            rejected.add_metric((reason,), n)
        yield rejected
        api = CounterMetricFamily(
            "enginetime_api_rejected_calls",
            "gRPC calls refused before reaching the service, by reason (unauthenticated: no or wrong "
            "API token; too_many_streams: --max-streams or --max-streams-per-peer).",
            labels=("reason",),
        )
        for reason, n in sorted(snap.api_rejected.items()):
            api.add_metric((reason,), n)
        yield api
        yield GaugeMetricFamily(
            "enginetime_api_streams", "Server streams open now (all peers).", value=snap.api_streams
        )
        yield counter(
            "enginetime_ingest_clipped_fields",
            "Ingest id/text fields longer than --max-text-bytes, kept as a prefix plus a hash.",
            ing.clipped_fields,
        )
        yield GaugeMetricFamily(
            "enginetime_ingest_buffered_bytes",
            "Bytes of half-received ingest frames, all connections (--max-ingest-buffer).",
            value=ing.buffered_bytes,
        )
        yield counter(
            "enginetime_ingest_busy_seconds",
            "Seconds the sidecar's loop spent decoding ingest and attributing steps.",
            ing.busy_s,
        )
        yield counter(
            "enginetime_ingest_slices",
            "Stretches of ingest work on the loop (at most --ingest-slice each; gRPC calls are served "
            "between them).",
            ing.slices,
        )
        yield counter(
            "enginetime_ingest_deferred",
            "Times a ready stretch of ingest work waited for a unary gRPC call being served.",
            ing.deferred,
        )
        yield counter(
            "enginetime_ingest_cut_short",
            "Stretches of ingest work that ended early because a gRPC call (or other loop work) was waiting.",
            ing.cut_short,
        )
        yield counter("enginetime_ingest_frames", "Ingest frames accepted.", ing.frames)
        yield counter("enginetime_ingest_bytes", "Ingest bytes received.", ing.bytes)
        yield counter("enginetime_ingest_connections", "Ingest connections accepted.", ing.connections)
        yield GaugeMetricFamily(
            "enginetime_ingest_active_connections",
            "Engine shards connected now.",
            value=ing.active_connections,
        )
        yield counter("enginetime_steps", "Step records attributed.", led.steps)
        yield counter("enginetime_step_entries", "Request entries in attributed steps.", led.entries)
        yield counter(
            "enginetime_lockstep_timeouts",
            "LOCKSTEP groups attributed without every shard after --lockstep-wait.",
            led.lockstep_timeouts,
        )
        yield counter(
            "enginetime_sequence_gaps",
            "Gaps in a shard's step sequence (steps lost).",
            led.seq_gaps,
        )
        evicted = CounterMetricFamily(
            "enginetime_requests_evicted",
            "Requests dropped from the store to stay under --max-requests (active ones lose their "
            "accounting before they end: raise --max-requests).",
            labels=("state",),
        )
        evicted.add_metric(("active",), led.evicted_active)
        evicted.add_metric(("finished",), led.evicted_finished)
        yield evicted
        yield GaugeMetricFamily(
            "enginetime_stream_subscribers", "gRPC streams following the ledger.", value=snap.subscribers
        )
        yield counter(
            "enginetime_streams_cut_off",
            "gRPC streams ended with RESOURCE_EXHAUSTED because their client read nothing for --lag-limit.",
            snap.streams_cut_off,
        )
        yield from self._span_metrics(snap)
        yield from self._shard_metrics(snap.shards)

    @staticmethod
    def _span_metrics(snap: StateSnapshot) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "enginetime_spans_enabled", "1 when span export is on.", value=0 if snap.spans is None else 1
        )
        sp = snap.spans or SpanCounters()
        yield CounterMetricFamily(
            "enginetime_spans_created", "Spans built and queued for export.", value=sp.created
        )
        yield CounterMetricFamily(
            "enginetime_spans_exported", "Spans the OTLP endpoint accepted.", value=snap.spans_exported
        )
        dropped = CounterMetricFamily(
            "enginetime_spans_dropped",
            "Spans not exported, by reason: backlog (requests finished faster than spans were built), "
            "queue_full (the exporter fell behind), export_failed (the endpoint was down or refused), "
            "shutdown (unsent when the sidecar stopped).",
            labels=("reason",),
        )
        for reason, n in sorted((dict.fromkeys(DROP_REASONS, 0) | sp.dropped).items()):
            dropped.add_metric((reason,), n)
        yield dropped
        yield CounterMetricFamily(
            "enginetime_spans_unsampled_requests",
            "Finished requests whose spans the sampler left out.",
            value=sp.unsampled,
        )
        yield CounterMetricFamily(
            "enginetime_span_links",
            "Span links from victims to the requests blamed for their interference.",
            value=sp.links,
        )
        lost = CounterMetricFamily(
            "enginetime_finished_requests_unobserved",
            "Finished requests neither observed in the histograms nor traced: overflow (backlog full) "
            "or evicted (dropped from the store before their figures settled).",
            labels=("reason",),
        )
        for reason, n in sorted(({"overflow": 0, "evicted": 0} | snap.finished_dropped).items()):
            lost.add_metric((reason,), n)
        yield lost

    @staticmethod
    def _shard_metrics(shards: tuple[ShardView, ...]) -> Iterable[Metric]:
        labels = ("engine_id", "shard")
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "decode": GaugeMetricFamily("enginetime_shard_decode_tokens_per_second",
                                        "Decode tokens per second over the last 2 s.", labels=labels),
            "prefill": GaugeMetricFamily("enginetime_shard_prefill_tokens_per_second",
                                         "Prefill tokens per second over the last 2 s.", labels=labels),
            "busy": GaugeMetricFamily("enginetime_shard_busy_ratio",
                                      "Fraction of the last 2 s the shard spent in steps.", labels=labels),
            "active": GaugeMetricFamily("enginetime_shard_active_requests", "Requests running now.",
                                        labels=labels),
            "queued": GaugeMetricFamily("enginetime_shard_queued_requests",
                                        "Requests waiting (queued or preempted) now.", labels=labels),
            "connected": GaugeMetricFamily("enginetime_shard_connected",
                                           "1 while the shard's recorder is connected.", labels=labels),
            "storm": GaugeMetricFamily("enginetime_shard_storm_active",
                                       "1 while a prefill storm runs on the shard.", labels=labels),
            "stall": GaugeMetricFamily("enginetime_shard_storm_stall_seconds",
                                       "Stall the shard's current storm has caused so far, summed over its "
                                       "victims (0: none).",
                                       labels=labels),
            "predicted": GaugeMetricFamily(
                "enginetime_shard_predicted_stall_seconds",
                "Stall the rest of the prefills running on the shard is predicted to cause on the other "
                "lockstep shards' running requests, summed over them (cost model; 0: none).", labels=labels),
            "queue_age": GaugeMetricFamily(
                "enginetime_shard_oldest_queued_seconds",
                "How long the oldest request waiting for its first step has waited (0: none waits).",
                labels=labels),
            "steps": CounterMetricFamily("enginetime_shard_steps", "Steps attributed for the shard.",
                                         labels=labels),
            "unattributed": CounterMetricFamily(
                "enginetime_shard_unattributed_seconds",
                "Device time of the shard no request could be charged with.", labels=labels),
            "imbalance": CounterMetricFamily(
                "enginetime_shard_imbalance_seconds",
                "Lockstep wait of the shard charged to no request: waiting for a peer that ran only "
                "decode (decode imbalance), tied-shard jitter and engine slowdown.", labels=labels),
            "slowdown": GaugeMetricFamily(
                "enginetime_shard_slowdown_ratio",
                "The engine's steps against its calibrated cost model (1: normal).", labels=labels),
        }  # fmt: skip
        for s in shards:
            lv = (s.engine_id, str(s.shard))
            fams["decode"].add_metric(lv, s.decode_tokens_per_second)
            fams["prefill"].add_metric(lv, s.prefill_tokens_per_second)
            fams["busy"].add_metric(lv, s.busy_fraction)
            fams["active"].add_metric(lv, s.active_requests)
            fams["queued"].add_metric(lv, s.queued_requests)
            fams["connected"].add_metric(lv, 1 if s.connected else 0)
            fams["storm"].add_metric(lv, 1 if s.current_storm is not None else 0)
            fams["stall"].add_metric(lv, s.current_storm.stall_ns / 1e9 if s.current_storm else 0.0)
            fams["predicted"].add_metric(lv, s.predicted_stall_ns / 1e9)
            fams["queue_age"].add_metric(lv, s.oldest_queued_ns / 1e9)
            fams["steps"].add_metric(lv, s.steps)
            fams["unattributed"].add_metric(lv, s.unattributed_ns / 1e9)
            fams["imbalance"].add_metric(lv, s.imbalance_ns / 1e9)
            fams["slowdown"].add_metric(lv, s.slowdown)
        yield from fams.values()


class SidecarMetrics:
    """The registry, the request histograms and the /metrics HTTP server.

    ``snapshot`` builds a StateSnapshot and must run on the event loop; the
    collector gets there through ``loop.call_soon_threadsafe``.
    """

    def __init__(self, snapshot: Callable[[], StateSnapshot], *, snapshot_timeout_s: float = 2.0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = _RequestHistograms(self.registry)
        self._snapshot = snapshot
        self._timeout = snapshot_timeout_s
        self._last = StateSnapshot()
        self._last_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""
        self.registry.register(_StateCollector(self))

    def observe_finished(self, records: list[tuple]) -> None:
        """FinishedFeed consumer (event loop): ``Ledger.finished_record`` tuples."""
        self.requests.observe(records)

    def forget_engine(self, engine_id: str) -> None:
        """Ledger forget listener (event loop): the engine's per-shard series go with it."""
        self.requests.forget_engine(engine_id)

    def fresh_snapshot(self) -> StateSnapshot:
        """A snapshot taken on the event loop now; the last one if the loop does not answer in time."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            fut: concurrent.futures.Future[StateSnapshot] = concurrent.futures.Future()

            def take() -> None:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(self._snapshot())
                    except BaseException as exc:
                        fut.set_exception(exc)

            try:
                loop.call_soon_threadsafe(take)
                snap = fut.result(self._timeout)
            except (RuntimeError, concurrent.futures.TimeoutError):
                fut.cancel()
            except Exception:
                log.exception("metrics snapshot failed")
            else:
                with self._last_lock:
                    self._last = snap
                return snap
        with self._last_lock:
            return self._last

    def take_snapshot_now(self) -> None:
        """Refresh the fallback snapshot (on the loop; e.g. right before shutdown)."""
        snap = self._snapshot()
        with self._last_lock:
            self._last = snap

    def start(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> str:
        """Serve /metrics on ``host:port`` (0: a free port); returns ``HOST:PORT`` as bound."""
        self._loop = loop
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsStartError(
                f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                "--metrics-port (0 picks a free one) or --metrics-host"
            ) from exc
        bound = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{bound}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._loop = None


__all__ = ["SECONDS_BUCKETS", "MetricsStartError", "SidecarMetrics", "StateSnapshot"]
