"""The sidecar process: ingest + ledger + gRPC in one asyncio loop.

Everything runs on one event loop, so the ledger needs no locks: ingest feeds
it synchronously as frames arrive, a ticker calls ``ledger.tick()`` and then
the fan-out's ``publish()`` every 25 ms, and gRPC handlers read it between
those callbacks. The loop is the sidecar's single core of work; anything that
could wait (a client not reading) waits in its own handler coroutine.

Observability (optional): when span export or /metrics is on, a
``FinishedFeed`` takes every request that reached FINISHED/ABORTED from the
ledger and, once its figures settled, hands it to the ``RequestTracer``
(spans over OTLP, built and exported in a process of its own) and to ``SidecarMetrics``
(histograms); the ticker pumps it beside the ledger tick.

Lifecycle: ``start()`` binds ingest and gRPC (failing with a clear
:class:`SidecarStartError` when an address is unusable) and marks health
SERVING; ``run()`` prints the ready line, serves until SIGTERM/SIGINT, then
shuts down in order: health NOT_SERVING, stop accepting engines, final tick +
flush of the ledger and a last publish, end every stream with UNAVAILABLE, give
unary calls ``shutdown_grace_s`` to finish, remove the ingest socket, then
export the last spans (``span_flush_s`` at most) and stop /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from enginetime.engine_hooks.constants import MAX_FRAME_BYTES, ingest_address
from enginetime.sidecar.api.fanout import PUBLISH_PERIOD_S, FanOut, FanOutLimits
from enginetime.sidecar.api.service import AccountingService, add_to_server
from enginetime.sidecar.cli import DEFAULT_LISTEN, split_host_port
from enginetime.sidecar.ingest.server import IngestAddressError, IngestServer
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.telemetry.finished import FinishedFeed
from enginetime.sidecar.telemetry.metrics import MetricsStartError, SidecarMetrics, StateSnapshot
from enginetime.sidecar.telemetry.span_process import SpanExportProcess
from enginetime.sidecar.telemetry.tracing import (
    DEFAULT_LINK_THRESHOLD_S,
    TracingConfig,
    TracingConfigError,
    resolve_export,
)
from enginetime.v1 import accounting_pb2

log = logging.getLogger("enginetime.sidecar")

SERVICE_NAME = accounting_pb2.DESCRIPTOR.services_by_name["AccountingService"].full_name
READY_PREFIX = "enginetime sidecar ready"


class SidecarStartError(RuntimeError):
    """The sidecar cannot start (an address is unusable); the message says what to change."""


@dataclass
class SidecarConfig:
    """Everything ``enginetime sidecar`` can be told (see ``enginetime sidecar --help``)."""

    ingest: str = field(default_factory=ingest_address)
    listen: str = DEFAULT_LISTEN
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    max_frame_bytes: int = MAX_FRAME_BYTES
    #: Request ids (or interference events) one stream may have unsent before it is cut off.
    subscriber_queue: int = 100_000
    #: Seconds a stream's write may stay blocked before it is cut off; None: max(10 intervals, 5 s).
    lag_limit_s: float | None = None
    #: Seconds in-flight unary RPCs get to finish on shutdown.
    shutdown_grace_s: float = 5.0
    #: OTLP endpoint for span export; "" = OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else no spans.
    otlp_endpoint: str = ""
    #: grpc | http/protobuf; "" = OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else by the endpoint's port.
    otlp_protocol: str = ""
    #: Blame on one aggressor (seconds) that earns a victim's span a link to the aggressor's span.
    trace_link_threshold_s: float = DEFAULT_LINK_THRESHOLD_S
    #: Seconds shutdown waits for the last spans to be exported.
    span_flush_s: float = 5.0
    #: Serve Prometheus /metrics on metrics_host:metrics_port (0: a free port); None: off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"


class Sidecar:
    """One sidecar: owns the ledger, the ingest server, the gRPC server and the ticker."""

    def __init__(self, config: SidecarConfig, ledger=None) -> None:
        self.config = config
        self.ledger = ledger if ledger is not None else Ledger(config.ledger)
        self.fanout = FanOut(
            self.ledger, FanOutLimits(max_pending=config.subscriber_queue, lag_limit_s=config.lag_limit_s)
        )
        self.ingest = IngestServer(self.ledger, config.ingest, max_frame_bytes=config.max_frame_bytes)
        counters = self.ingest.counters
        self.fanout.ingest_busy_s = lambda: counters.busy_s
        self.service = AccountingService(
            self.ledger,
            self.fanout,
            retention_s=config.ledger.retention_s,
            max_requests=config.ledger.max_requests,
            storm_threshold_s=config.ledger.storm_threshold_s,
        )
        self.health = HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_address = ""
        self.ingest_address = ""
        self.metrics_address = ""
        self.tracer: SpanExportProcess | None = None
        self.metrics: SidecarMetrics | None = None
        self.finished: FinishedFeed | None = None
        self._export_target = None
        self._tracing_off_reason = ""
        try:
            self._tracing = TracingConfig(
                endpoint=config.otlp_endpoint,
                protocol=config.otlp_protocol,
                link_threshold_s=config.trace_link_threshold_s,
            )
            self._export_target, self._tracing_off_reason = resolve_export(self._tracing)
        except TracingConfigError as exc:
            self._tracing_error = str(exc)
        else:
            self._tracing_error = ""
        self._ticker: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._tick_errors = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ingest and gRPC (and /metrics, span export), start the ticker, mark health SERVING."""
        if self._tracing_error:
            raise SidecarStartError(self._tracing_error)
        host, port = split_host_port(self.config.listen)
        try:
            self.ingest_address = await self.ingest.start()
        except IngestAddressError as exc:
            raise SidecarStartError(str(exc)) from exc
        # so_reuseport off: a second sidecar on the same port must fail, not share it silently.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            bound = 0
            detail = str(exc)
        else:
            detail = ""
        if not bound:
            await self.ingest.close()
            raise SidecarStartError(
                f"cannot listen for gRPC on {host}:{port}"
                + (f" ({detail})" if detail else "")
                + ": is another sidecar or program using that port? choose another with --listen HOST:PORT "
                "(port 0 picks a free one)"
            )
        await server.start()
        self.grpc_server = server
        self.grpc_address = f"{host}:{bound}"
        try:
            self._start_observability()
        except SidecarStartError:
            await server.stop(0)
            await self.ingest.close()
            raise
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._ticker = asyncio.create_task(self._tick_loop(), name="enginetime-ledger-ticker")

    def _start_observability(self) -> None:
        """Span export and /metrics, each when configured, fed by one FinishedFeed."""
        cfg = self.config
        target = self._export_target
        if target is None and cfg.metrics_port is None:
            log.debug("span export off (%s); /metrics off", self._tracing_off_reason)
            return
        # Settled: a LOCKSTEP group holding a request's last step is attributed within
        # lockstep_wait_s, and the ticker runs every PUBLISH_PERIOD_S.
        feed = FinishedFeed(self.ledger, cfg.ledger.lockstep_wait_s + 2 * PUBLISH_PERIOD_S)
        if target is not None:
            try:
                self.tracer = SpanExportProcess(
                    self._tracing, target, log_level=cfg.log_level, flush_s=cfg.span_flush_s
                )
            except (TracingConfigError, ValueError, OSError, RuntimeError) as exc:
                raise SidecarStartError(f"cannot export spans to {target.shown}: {exc}") from exc
            feed.consumers.append(self.tracer.submit)
            log.info(
                "exporting a span per finished request to %s (links for blame >= %gs)",
                target.shown,
                self._tracing.link_threshold_s,
            )
        else:
            log.info("span export off (%s)", self._tracing_off_reason)
        if cfg.metrics_port is not None:
            metrics = SidecarMetrics(self.metrics_snapshot)
            try:
                self.metrics_address = metrics.start(
                    asyncio.get_running_loop(), cfg.metrics_host, cfg.metrics_port
                )
            except MetricsStartError as exc:
                if self.tracer is not None:
                    self.tracer.shutdown(0.5)
                    self.tracer = None
                raise SidecarStartError(str(exc)) from exc
            self.metrics = metrics
            feed.consumers.append(metrics.observe_finished)
            log.info("serving Prometheus metrics on http://%s/metrics", self.metrics_address)
        self.finished = feed

    def metrics_snapshot(self) -> StateSnapshot:
        """What /metrics reports now (runs on the event loop)."""
        ing = self.ingest.counters
        tracer = self.tracer
        spans: dict[str, int] = {}
        dropped: dict[str, int] = {}
        if tracer is not None:
            c = tracer.counters
            spans = {
                "created": c.created,
                "exported": tracer.exported,
                "unsampled": c.unsampled,
                "links": c.links,
            }
            dropped = dict(c.dropped)
        return StateSnapshot(
            ledger={k: v for k, v in dataclasses.asdict(self.ledger.counters).items() if isinstance(v, int)},
            ingest={
                f.name: getattr(ing, f.name)
                for f in dataclasses.fields(ing)
                if isinstance(getattr(ing, f.name), int)
            },
            rejected=dict(ing.rejected),
            shards=tuple(self.ledger.shards()),
            spans=spans,
            spans_dropped=dropped,
            spans_enabled=tracer is not None,
            finished_dropped=dict(self.finished.dropped) if self.finished is not None else {},
            subscribers=self.fanout.subscribers,
        )

    def ready_line(self) -> str:
        line = f"{READY_PREFIX} grpc={self.grpc_address} ingest={self.ingest_address}"
        if self.metrics_address:
            line += f" metrics={self.metrics_address}"
        return line

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def shutdown(self) -> None:
        """Stop in order; safe to call once after start()."""
        await self.health.enter_graceful_shutdown()
        self.ingest.stop_accepting()
        await self.ingest.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        try:
            self.ledger.tick()
            self.ledger.flush()
            self.ledger.save_models()
            self.fanout.publish()
        except Exception:
            log.exception("final ledger flush failed")
        if self.finished is not None:
            try:
                self.finished.pump(flush=True)  # every finished request: its figures are final now
            except Exception:
                log.exception("final span/metrics hand-over failed")
        self.fanout.close(
            "the sidecar is shutting down; reconnect when it is back (the guard falls back meanwhile)"
        )
        if self.grpc_server is not None:
            # Streams see the close above, send what they hold and end; unary calls get the grace period.
            await self.grpc_server.stop(self.config.shutdown_grace_s)
        self.ingest.remove_socket()
        log.info("ingest totals: %s", self.ingest.counters.summary())
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown, self.config.span_flush_s)
            c = self.tracer.counters
            log.info(
                "span totals: created=%d exported=%d dropped=%s",
                c.created,
                self.tracer.exported,
                ",".join(f"{k}={v}" for k, v in c.dropped.items() if v) or "none",
            )
        if self.metrics is not None:
            self.metrics.take_snapshot_now()
            self.metrics.stop()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; print the ready line once bound. Returns the exit code."""
        try:
            await self.start()
        except SidecarStartError as exc:
            log.error("%s", exc)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info(
            "serving AccountingService on %s, ingest on %s (max_requests=%d retention=%gs lockstep_wait=%gs)",
            self.grpc_address,
            self.ingest_address,
            self.config.ledger.max_requests,
            self.config.ledger.retention_s,
            self.config.ledger.lockstep_wait_s,
        )
        sys.stdout.write(self.ready_line() + "\n")
        sys.stdout.flush()
        await self._stopping.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            # A second signal during shutdown ends the process at once.
            signal.signal(sig, signal.SIG_DFL)
        await self.shutdown()
        log.info("stopped")
        return 0

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: shutting down", signal.Signals(sig).name)
        self._stopping.set()

    async def _tick_loop(self) -> None:
        """ledger.tick() then fanout.publish(), every PUBLISH_PERIOD_S, whatever they cost."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += PUBLISH_PERIOD_S
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a long burst of ingest): do not try to catch up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
            try:
                self.ledger.tick()
                if self.finished is not None:
                    self.finished.pump()
                self.fanout.publish()
            except Exception:
                self._tick_errors += 1
                if self._tick_errors <= 3 or self._tick_errors % 1000 == 0:
                    log.exception("ledger tick / publish failed (%d so far)", self._tick_errors)


def configure_logging(level: str) -> None:
    """One line per record on stderr (stdout carries only the ready line)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


#: Container allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD = (20_000, 20, 20)


def tune_gc() -> None:
    """Make the collector's pauses rare and short in the sidecar process (its own process only).

    The loop allocates ~100,000 short-lived tuples a second when streams are busy, so with
    CPython's defaults a full collection ran about once a second and stopped the loop for
    15-50 ms (measured on 2 cores), traversing the ledger's requests and every module's
    functions each time: that pause is stream lag and ingest delay. The modules, loaded by
    now, are moved out of the collector's sight (``gc.freeze``), and the young generation
    is collected every 20,000 net container allocations instead of 700: with
    ``bench/bench_fanout.py --mode partitioned`` full collections went from ~1/s to none in
    10 s, and the worst subscriber lag from 2.0-3.2 to 1.7 intervals. The ledger holds no
    reference cycles that it relies on the collector to free.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main(config: SidecarConfig) -> int:
    configure_logging(config.log_level)
    tune_gc()
    return asyncio.run(Sidecar(config).run())
