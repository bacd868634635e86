"""OpenTelemetry spans for finished requests, exported over OTLP.

Each request that reaches FINISHED or ABORTED becomes one small trace fragment,
built *after the fact* from the ledger's final figures (``ledger_trace``):

* one SERVER span ``engine request`` from arrival to finish, carrying the
  accounting as attributes (GenAI names for token counts, ``enginetime.*`` for
  the rest, seconds as doubles) and events for the first token, preemptions and
  the storms its prefill caused;
* one INTERNAL child span per phase — ``queue``, ``prefill``, ``decode``,
  ``preempted`` (a preemption splits prefill/decode) — at most
  ``MAX_SPANS_PER_REQUEST`` spans in all however long the request ran (extra
  phases are merged into a last ``running`` span), never a span per step;
* a span **link** for each request blamed for at least ``link_threshold_s`` of
  its interference, to that aggressor's request span — so in Jaeger or Tempo a
  victim's trace points at the prefill that stalled it, with
  ``enginetime.blame.seconds`` and ``enginetime.blame.shard`` on the link.

Span ids are derived from what the engine reported at arrival
(``request_span_ids``: a hash of engine id, request id and arrival time), so a
victim that finishes before its aggressor can link to the aggressor's span
before that span exists. When the engine received a W3C ``traceparent`` for the
request, the request span is its child: the engine's work joins the proxy's trace.

Where it runs: in the sidecar, ``RequestTracer`` lives in a process of its own
(``sidecar.span_process``), fed finished requests over a pipe, so the SDK's
Python never competes with ingest for the GIL. Inside, ``submit`` is a deque
append bounded by ``TracingConfig.backlog``; one builder thread turns requests
into spans with the SDK tracer, and the SDK's BatchSpanProcessor thread encodes
and exports them. When the exporter falls behind (endpoint down or slow) spans
are dropped and counted by reason in ``SpanCounters`` (shown in /metrics as
``enginetime_spans_dropped_total``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AnyValue

from enginetime import __version__
from enginetime.sidecar.config import DEFAULT_LINK_THRESHOLD_S
from enginetime.sidecar.ledger.trace import (
    MARK_PREEMPTED,
    MARK_RESUMED,
    MARK_STORM_ENDED,
    MARK_STORM_STARTED,
    MAX_MARKS,
    RequestTrace,
)
from enginetime.sidecar.ledger.views import RequestState

log = logging.getLogger("enginetime.sidecar.telemetry.tracing")

PROTOCOLS = ("grpc", "http/protobuf")
MAX_SPANS_PER_REQUEST = 8
REQUEST_SPAN_NAME = "engine request"
SCOPE_NAME = "enginetime.sidecar"
#: The BatchSpanProcessor's queue when OTEL_BSP_MAX_QUEUE_SIZE is not set (the SDK's own default).
DEFAULT_EXPORT_QUEUE = 2048

# Drop reasons (label values of enginetime_spans_dropped_total).
DROP_BACKLOG = "backlog"  # finished requests arrived faster than spans could be built
DROP_QUEUE_FULL = "queue_full"  # the export queue was full (exporter slow or endpoint down)
DROP_EXPORT_FAILED = "export_failed"  # the exporter gave up on a batch (endpoint down, rejected)
DROP_SHUTDOWN = "shutdown"  # still unexported when the sidecar stopped
DROP_EXPORTER_DOWN = "exporter_down"  # the span export process was gone (sidecar.span_process)
DROP_REASONS = (DROP_BACKLOG, DROP_QUEUE_FULL, DROP_EXPORT_FAILED, DROP_SHUTDOWN, DROP_EXPORTER_DOWN)


class TracingConfigError(ValueError):
    """The span export settings cannot work; the message says which setting and what is accepted."""


@dataclass
class TracingConfig:
    """What ``enginetime sidecar`` is told about spans (flags; OTEL_* variables fill the gaps)."""

    #: ``--otlp-endpoint``; "" = OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else off.
    endpoint: str = ""
    #: ``--otlp-protocol`` (grpc | http/protobuf); "" = OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else by port.
    protocol: str = ""
    #: Blame (seconds) on one aggressor that earns the victim's span a link to the aggressor's span.
    link_threshold_s: float = DEFAULT_LINK_THRESHOLD_S
    #: service.name unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES set one.
    service_name: str = "enginetime-sidecar"
    #: Finished requests waiting for their spans to be built; beyond it they are dropped and counted.
    backlog: int = 10_000
    #: Seconds the builder waits for room in a full export queue before dropping a request's spans
    #: (the builder runs in the export process: waiting there holds up nothing but span export).
    export_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if self.link_threshold_s < 0:
            raise TracingConfigError(f"link threshold must be >= 0 seconds, got {self.link_threshold_s}")
        if self.backlog < 1:
            raise TracingConfigError(f"tracing backlog must be >= 1, got {self.backlog}")


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """Where spans go: ``endpoint`` None means the exporter reads OTEL_EXPORTER_OTLP_* itself."""

    protocol: str
    endpoint: str | None
    shown: str  # for the log line


def _env(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return ""


def resolve_export(
    config: TracingConfig, environ: Mapping[str, str] | None = None
) -> tuple[ExportTarget | None, str]:
    """(target, "") when spans are to be exported, else (None, why not).

    The flag wins over the environment; without the flag the standard
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    turn export on, ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``
    keep it off. The protocol is the flag, else ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
    / ``OTEL_EXPORTER_OTLP_PROTOCOL``, else http/protobuf for port 4318 or a
    ``/v1/traces`` path and grpc otherwise (the collector's conventional ports).
    Raises TracingConfigError for a protocol or endpoint that cannot work.
    """
    env = os.environ if environ is None else environ
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return None, "OTEL_SDK_DISABLED=true"
    flag = config.endpoint.strip()
    env_endpoint = _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not flag:
        if not env_endpoint:
            return None, "no --otlp-endpoint and no OTEL_EXPORTER_OTLP_ENDPOINT"
        if _env(env, "OTEL_TRACES_EXPORTER").lower() == "none":
            return None, "OTEL_TRACES_EXPORTER=none"
    protocol = config.protocol or _env(
        env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    url = flag or env_endpoint
    if "://" not in url:
        url = "http://" + url  # host:port: plain text, as a local collector serves it
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TracingConfigError(
            f"OTLP endpoint {flag or env_endpoint!r} is not a URL such as http://collector:4317 (gRPC) or "
            "http://collector:4318 (HTTP); use https:// for TLS"
        )
    if not protocol:
        http_like = parsed.port == 4318 or parsed.path.rstrip("/").endswith("/v1/traces")
        protocol = "http/protobuf" if http_like else "grpc"
    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise TracingConfigError(
            f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf "
            "(--otlp-protocol or OTEL_EXPORTER_OTLP_PROTOCOL)"
        )
    if not flag:
        return ExportTarget(protocol, None, f"{env_endpoint} ({protocol}, from the environment)"), ""
    if protocol == "http/protobuf" and parsed.path in ("", "/"):
        url = url.rstrip("/") + "/v1/traces"  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT would be
    return ExportTarget(protocol, url, f"{url} ({protocol})"), ""


def make_exporter(target: ExportTarget) -> SpanExporter:
    """The SDK's OTLP exporter for ``target`` (headers, TLS, timeout from OTEL_EXPORTER_OTLP_*)."""
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=target.endpoint)


# ------------------------------------------------------------------------------------------- ids

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` header; None when absent or malformed."""
    m = _TRACEPARENT.match(value.strip().lower()) if value else None
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(flags_hex, 16) & 0x01))


@dataclass(frozen=True, slots=True)
class RequestSpanIds:
    """The ids of a request's span; ``parent`` is the engine's traceparent, if it had a valid one."""

    trace_id: int
    span_id: int
    parent: SpanContext | None
    sampled: bool

    def context(self) -> SpanContext:
        """The span context a link to this request's span carries."""
        flags = TraceFlags(TraceFlags.SAMPLED if self.sampled else TraceFlags.DEFAULT)
        return SpanContext(self.trace_id, self.span_id, is_remote=True, trace_flags=flags)


def request_span_ids(
    engine_id: str, request_id: str, arrival_ns: int, traceparent: str = ""
) -> RequestSpanIds:
    """Deterministic ids for a request's span: the same wherever and whenever they are computed.

    A hash of (engine id, request id, arrival time) — what the engine said when
    the request arrived — so links can name the span before it exists, and a
    request id reused later (a retry) gets another span. The trace id is the
    traceparent's when there is one (the span joins the caller's trace).
    """
    digest = hashlib.blake2b(
        f"{engine_id}\x00{request_id}\x00{arrival_ns}".encode(), digest_size=24, person=b"enginetime.span"
    ).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:], "big") or 1
    parent = parse_traceparent(traceparent)
    if parent is not None:
        return RequestSpanIds(parent.trace_id, span_id, parent, parent.trace_flags.sampled)
    return RequestSpanIds(trace_id, span_id, None, True)


class _PresetIds(IdGenerator):
    """Ids for the SDK tracer: the next request span takes the ids it was given, others random.

    Used by the builder thread only: it sets ``trace_id``/``span_id`` right before
    starting a request span, and the tracer consumes them for that span.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        value, self.trace_id = self.trace_id, 0
        return value or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        value, self.span_id = self.span_id, 0
        return value or self._random.generate_span_id()


# ------------------------------------------------------------------------------------ phases


@dataclass(frozen=True, slots=True)
class Phase:
    name: str  # queue | prefill | decode | preempted | running (merged tail)
    start_ns: int
    end_ns: int
    merged: int = 0  # phases folded into this one (the MAX_SPANS_PER_REQUEST cap, or lost marks)


def request_end_ns(trace: RequestTrace) -> int:
    v = trace.view
    return v.finish_time_ns or v.arrival_time_ns + v.wall_ns


def phases(trace: RequestTrace) -> list[Phase]:
    """The request's phases in time order, at most ``MAX_SPANS_PER_REQUEST - 1``.

    queue: arrival -> first step. Then runs separated by preemptions; a run is
    prefill until its first decoding step, decode after it (a run that never
    decoded is all prefill). A preemption's gap is ``preempted`` (after a
    resumption, prefill is timed from the resumption: engines recompute the
    evicted KV cache first). Empty phases are left out.
    """
    v = trace.view
    arrival = v.arrival_time_ns
    end = max(request_end_ns(trace), arrival)
    out: list[Phase] = []

    def add(name: str, start: int, stop: int, merged: int = 0) -> None:
        start, stop = max(start, arrival), min(stop, end)
        if stop > start:
            out.append(Phase(name, start, stop, merged))

    first = trace.first_step_ns
    if first < 0:
        add("queue", arrival, end)
        return out
    add("queue", arrival, first)

    def run(begin: int, decode_start: int, stop: int) -> None:
        if decode_start < 0 or decode_start >= stop:
            add("prefill", begin, stop)
        else:
            add("prefill", begin, decode_start)
            add("decode", max(begin, decode_start), stop)

    begin, gap_start, preempted = first, 0, False
    seen_preemptions = 0
    for mark in trace.marks:
        if mark.kind == MARK_PREEMPTED and not preempted:
            seen_preemptions += 1
            gap_start, preempted = mark.time_ns, True
        elif mark.kind == MARK_RESUMED and preempted:
            run(begin, mark.decode_start_ns, gap_start)
            add("preempted", gap_start, mark.time_ns)
            begin, preempted = mark.time_ns, False
    lost = v.preemptions - seen_preemptions
    if lost > 0 and len(trace.marks) >= MAX_MARKS:
        # Marks ran out: what happened after the last one is not known in detail.
        if preempted:
            run(begin, trace.decode_start_ns, gap_start)
            begin = gap_start
        add("running", begin, end, merged=lost)
    elif preempted:
        run(begin, trace.decode_start_ns, gap_start)
        add("preempted", gap_start, end)  # it ended (aborted) while preempted
    else:
        run(begin, trace.decode_start_ns, end)
    cap = MAX_SPANS_PER_REQUEST - 1
    if len(out) > cap:
        tail = out[cap - 1 :]
        merged = sum(p.merged for p in tail) + len(tail)
        out[cap - 1 :] = [Phase("running", tail[0].start_ns, tail[-1].end_ns, merged)]
    return out


# --------------------------------------------------------------------------------- attributes


def _s(ns: int) -> float:
    return ns / 1e9


def request_attributes(trace: RequestTrace) -> dict[str, AnyValue]:
    """The request span's attributes: the accounting GetRequest returns, seconds as doubles."""
    v = trace.view
    attrs: dict[str, AnyValue] = {
        "enginetime.request.id": v.request_id,
        "enginetime.engine.id": v.engine_id,
        "enginetime.shard": v.shard,
        "enginetime.state": v.state.name.lower(),
        "gen_ai.usage.input_tokens": v.prompt_tokens,
        "gen_ai.usage.output_tokens": v.decoded_tokens,
        "gen_ai.usage.cache_read.input_tokens": v.cached_tokens,
        "enginetime.engine_time": _s(v.engine_time_ns),
        "enginetime.gpu_time": _s(v.gpu_time_ns),
        "enginetime.queue_time": _s(v.queue_time_ns),
        "enginetime.interference": _s(v.interference_ns),
        "enginetime.other": _s(v.other_ns),
        "enginetime.wall": _s(v.wall_ns),
        "enginetime.tokens.prompt": v.prompt_tokens,
        "enginetime.tokens.cached": v.cached_tokens,
        "enginetime.tokens.prefilled": v.prefilled_tokens,
        "enginetime.tokens.decoded": v.decoded_tokens,
        "enginetime.steps": v.steps,
        "enginetime.excluded_steps": v.excluded_steps,
        "enginetime.preemptions": v.preemptions,
        "enginetime.migrated": v.migrated,
        "enginetime.partial": v.partial,
    }
    if v.session_id:
        attrs["session.id"] = v.session_id
    if v.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = (v.finish_reason,)
    if v.routed_shard is not None:
        attrs["enginetime.routed_shard"] = v.routed_shard
    if v.top_blame:
        # Searchable in Jaeger/Tempo (links are not): "every victim of request X".
        top = v.top_blame[0]
        attrs["enginetime.blame.top.request_id"] = top.request_id
        attrs["enginetime.blame.top.shard"] = top.shard
        attrs["enginetime.blame.top.seconds"] = _s(top.seconds_ns)
        attrs["enginetime.blame.top.same_shard"] = top.same_shard
    return attrs


def request_links(trace: RequestTrace, threshold_ns: int) -> list[Link]:
    """A link to each aggressor request blamed for at least ``threshold_ns``."""
    links = []
    for agg in trace.aggressors:
        if agg.seconds_ns < threshold_ns or not agg.request_id:
            continue
        ids = request_span_ids(agg.engine_id, agg.request_id, agg.arrival_time_ns, agg.traceparent)
        links.append(
            Link(
                ids.context(),
                {
                    "enginetime.blame.seconds": _s(agg.seconds_ns),
                    "enginetime.blame.shard": agg.shard,
                    "enginetime.blame.request_id": agg.request_id,
                    "enginetime.blame.same_shard": agg.same_shard,
                },
            )
        )
    return links


def request_events(trace: RequestTrace) -> list[tuple[str, dict[str, AnyValue], int]]:
    """(name, attributes, time ns) of the request span's events, in time order."""
    v = trace.view
    events: list[tuple[str, dict[str, AnyValue], int]] = []
    if trace.first_token_ns > 0:
        events.append(
            (
                "enginetime.first_token",
                {"enginetime.time_to_first_token": _s(max(0, trace.first_token_ns - v.arrival_time_ns))},
                trace.first_token_ns,
            )
        )
    for mark in trace.marks:
        if mark.kind == MARK_PREEMPTED:
            events.append(("enginetime.preempted", {}, mark.time_ns))
        elif mark.kind == MARK_RESUMED:
            events.append(("enginetime.resumed", {}, mark.time_ns))
        elif mark.storm is not None and mark.kind in (MARK_STORM_STARTED, MARK_STORM_ENDED):
            st = mark.storm
            name = "enginetime.storm.start" if mark.kind == MARK_STORM_STARTED else "enginetime.storm.end"
            events.append(
                (
                    name,
                    {
                        "enginetime.storm.stall": _s(st.victim_ns),
                        "enginetime.storm.victim_requests": st.victim_requests,
                        "enginetime.storm.victim_shards": st.victim_shards,
                        "enginetime.storm.prefill_tokens": st.prefill_tokens,
                        "enginetime.storm.chunks": st.chunks,
                        "enginetime.storm.cross_shard": st.cross_shard,
                    },
                    mark.time_ns,
                )
            )
    events.sort(key=lambda e: e[2])
    return events


def span_count(trace: RequestTrace) -> int:
    return 1 + len(phases(trace))


# ----------------------------------------------------------------------------------- export


@dataclass
class SpanCounters:
    """Cumulative span figures (read by /metrics from another thread: plain ints)."""

    requests: int = 0  # requests whose spans were built
    created: int = 0  # spans built and handed to the export queue
    unsampled: int = 0  # requests the sampler left out (OTEL_TRACES_SAMPLER / the traceparent's flag)
    links: int = 0  # span links to aggressors
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class _CountingExporter(SpanExporter):
    """Wraps the OTLP exporter to count what it delivered and what it gave up on."""

    def __init__(self, inner: SpanExporter, on_failure) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0
        #: Notified after every export: the builder waits on it for room in the queue.
        self.room = threading.Condition()
        #: Set when shutdown stopped waiting: later results are already counted as DROP_SHUTDOWN.
        self.abandoned = False
        self._on_failure = on_failure

    @property
    def done(self) -> int:
        return self.exported + self.failed

    def export(self, spans: Sequence) -> SpanExportResult:
        if self.abandoned:
            return SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # the exporter should not raise; count it as a failure all the same
            log.debug("span exporter raised: %r", exc)
            result = SpanExportResult.FAILURE
        if self.abandoned:
            return result
        if result == SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            self._on_failure(len(spans))
        with self.room:
            self.room.notify_all()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _positive_env(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        size = int(raw)
    except ValueError:
        raise TracingConfigError(f"{name}={raw!r} is not a whole number") from None
    if size < 1:
        raise TracingConfigError(f"{name}={raw!r} must be >= 1")
    return size


def _resource(service_name: str) -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; otherwise service.name = ``service_name``."""
    base = Resource.create({})
    extra: dict[str, str] = {}
    if str(base.attributes.get("service.name", "")).startswith("unknown_service"):
        extra["service.name"] = service_name
    if "service.version" not in base.attributes:
        extra["service.version"] = __version__
    return base.merge(Resource(extra)) if extra else base


class RequestTracer:
    """Turns finished requests (``RequestTrace``) into spans and exports them; see the module doc.

    ``submit`` never waits (the span export process calls it from its pipe reader);
    spans are built on the builder thread and exported on the SDK's export thread.
    ``exporter`` replaces the OTLP exporter (tests); ``target`` is only used to build
    the default one.
    """

    def __init__(
        self,
        config: TracingConfig,
        target: ExportTarget | None = None,
        exporter: SpanExporter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if exporter is None and target is None:
            raise ValueError("RequestTracer needs an export target or an exporter")
        env = os.environ if environ is None else environ
        self.config = config
        self.target = target
        self.counters = SpanCounters()
        self._threshold_ns = round(config.link_threshold_s * 1e9)
        self._max_queue = _positive_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_EXPORT_QUEUE)
        # The SDK refuses a batch larger than the queue: a small queue gets small batches.
        batch = min(_positive_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max_queue)
        self._warned_at = 0.0
        inner = exporter if exporter is not None else make_exporter(target)  # type: ignore[arg-type]
        self._exporter = _CountingExporter(inner, self._export_failed)
        self._ids = _PresetIds()
        self._provider = TracerProvider(
            resource=_resource(config.service_name), id_generator=self._ids, shutdown_on_exit=False
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(self._exporter, max_queue_size=self._max_queue, max_export_batch_size=batch)
        )
        self._tracer = self._provider.get_tracer(SCOPE_NAME, __version__)
        self._pending: deque[RequestTrace] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="enginetime-spans", daemon=True)
        self._thread.start()

    # -- figures ------------------------------------------------------------------------------

    @property
    def exported(self) -> int:
        return self._exporter.exported

    @property
    def export_queue_size(self) -> int:
        return self._max_queue

    def _export_failed(self, n: int) -> None:
        self.counters.dropped[DROP_EXPORT_FAILED] += n
        now = time.monotonic()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            log.warning(
                "could not export %d spans to %s; they are dropped and counted "
                '(enginetime_spans_dropped_total{reason="export_failed"}). Is the collector up?',
                n,
                self.target.shown if self.target else "the exporter",
            )

    def _drop(self, reason: str, n: int) -> None:
        self.counters.dropped[reason] += n

    # -- feeding ------------------------------------------------------------------------------

    def submit(self, traces: list[RequestTrace]) -> None:
        """Queue finished requests for span building; O(len(traces)), never blocks for long."""
        with self._wake:
            room = self.config.backlog - len(self._pending)
            if room < len(traces):
                for t in traces[max(room, 0) :]:
                    self._drop(DROP_BACKLOG, span_count(t))
                traces = traces[: max(room, 0)]
            self._pending.extend(traces)
            self._wake.notify()

    # -- builder thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
            for t in batch:
                try:
                    self._emit(t)
                except Exception:
                    log.exception("building spans for request %r failed", t.view.request_id)

    def _emit(self, trace: RequestTrace) -> None:
        parts = phases(trace)
        n = 1 + len(parts)
        exporter = self._exporter
        if self.counters.created - exporter.done + n > self._max_queue:
            with exporter.room:
                room = exporter.room.wait_for(
                    lambda: self.counters.created - exporter.done + n <= self._max_queue,
                    self.config.export_wait_s,
                )
            if not room or self.counters.created - exporter.done + n > self._max_queue:
                # The SDK would drop them silently; drop them here, counted.
                self._drop(DROP_QUEUE_FULL, n)
                return
        v = trace.view
        ids = request_span_ids(v.engine_id, v.request_id, v.arrival_time_ns, v.traceparent)
        parent = (
            trace_api.set_span_in_context(NonRecordingSpan(ids.parent), Context())
            if ids.parent is not None
            else Context()
        )
        links = request_links(trace, self._threshold_ns)
        tracer = self._tracer
        self._ids.trace_id, self._ids.span_id = ids.trace_id, ids.span_id
        try:
            root = tracer.start_span(
                REQUEST_SPAN_NAME,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=request_attributes(trace),
                links=links,
                start_time=v.arrival_time_ns,
            )
        finally:
            self._ids.trace_id = self._ids.span_id = 0
        if not root.is_recording():
            self.counters.unsampled += 1
            return
        for name, attrs, at in request_events(trace):
            root.add_event(name, attrs, timestamp=at)
        ctx = trace_api.set_span_in_context(root, Context())
        for p in parts:
            attrs = {"enginetime.phase": p.name}
            if p.merged:
                attrs["enginetime.phase.merged"] = p.merged
            child = tracer.start_span(
                p.name, context=ctx, kind=SpanKind.INTERNAL, attributes=attrs, start_time=p.start_ns
            )
            child.end(end_time=p.end_ns)
        if v.state == RequestState.ABORTED:
            root.set_status(Status(StatusCode.ERROR, v.finish_reason or "aborted"))
        root.end(end_time=max(request_end_ns(trace), v.arrival_time_ns))
        self.counters.created += n
        self.counters.requests += 1
        self.counters.links += len(links)

    # -- lifecycle ------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Build what is queued, export what the collector takes within ``timeout_s``, count the rest."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        closer = threading.Thread(target=self._provider.shutdown, name="enginetime-spans-flush", daemon=True)
        closer.start()
        closer.join(max(0.1, deadline - time.monotonic()))
        if closer.is_alive():
            # Still retrying an unreachable endpoint: stop waiting for it.
            self._exporter.abandoned = True
            self._exporter.inner.shutdown()
            closer.join(1.0)
        self._exporter.abandoned = True
        unsent = self.counters.created - self._exporter.done
        if unsent > 0:
            self._drop(DROP_SHUTDOWN, unsent)
        with self._wake:
            left = list(self._pending)
            self._pending.clear()
        for t in left:
            self._drop(DROP_SHUTDOWN, span_count(t))


__all__ = [
    "DEFAULT_LINK_THRESHOLD_S",
    "DROP_BACKLOG",
    "DROP_EXPORTER_DOWN",
    "DROP_EXPORT_FAILED",
    "DROP_QUEUE_FULL",
    "DROP_REASONS",
    "DROP_SHUTDOWN",
    "MAX_SPANS_PER_REQUEST",
    "PROTOCOLS",
    "REQUEST_SPAN_NAME",
    "ExportTarget",
    "Phase",
    "RequestSpanIds",
    "RequestTracer",
    "SpanCounters",
    "TracingConfig",
    "TracingConfigError",
    "make_exporter",
    "parse_traceparent",
    "phases",
    "request_attributes",
    "request_events",
    "request_links",
    "request_span_ids",
    "resolve_export",
    "span_count",
]
