"""``enginetime sidecar``: run the accounting sidecar beside an engine.

Registered into the ``enginetime`` command (enginetime/cli.py). The heavy
imports (grpc, numpy, the ledger) happen only when the command runs; at
registration we only check that the ``[sidecar]`` extra is installed, so
``enginetime --help`` stays fast and names a missing extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import math

from enginetime.engine_hooks.constants import DEFAULT_INGEST_ADDRESS, INGEST_ENV, parse_address
from enginetime.sidecar.config import LedgerConfig, SidecarConfig
from enginetime.sidecar.ingest.limits import IngestLimits

for _module in (
    "grpc",
    "numpy",
    "google.protobuf",
    "grpc_health",
    "grpc_reflection",
    "opentelemetry.sdk",
    "opentelemetry.exporter.otlp",
    "prometheus_client",
):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(
            f"enginetime sidecar needs {_module}: pip install 'enginetime[sidecar]'", name=_module
        )


def split_host_port(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ValueError with the accepted form otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(
            f"bad listen address {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:50151 or [::1]:0"
        )
    return host, int(port)


def parse_ingest_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``parse_address`` plus ``tcp:HOST:0`` (a free port, reported in the ready line)."""
    if address.startswith("tcp:") and address.endswith(":0"):
        family, target = parse_address(address[:-1] + "1")
        return family, (target[0], 0)
    return parse_address(address)


# -- argument types: each raises ArgumentTypeError with what was wrong and what is accepted ---


def _ingest(value: str) -> str:
    try:
        parse_ingest_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _listen(value: str) -> str:
    try:
        split_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _number(kind, *, minimum: float, inclusive: bool, what: str):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"{value!r} is not a finite number of seconds")
        if number < minimum or (number == minimum and not inclusive):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"{value!r} must be {bound}")
        return number

    return parse


_positive_int = _number(int, minimum=1, inclusive=True, what="a whole number")
_positive_seconds = _number(float, minimum=0.0, inclusive=False, what="a number of seconds")
_seconds = _number(float, minimum=0.0, inclusive=True, what="a number of seconds")
_frame_bytes = _number(int, minimum=1024, inclusive=True, what="a number of bytes")


_text_bytes = _number(int, minimum=64, inclusive=True, what="a number of bytes")


def _uid(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a numeric uid (see `id -u USER`)")
    return int(value)


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535; 0 picks a free port)")
    return int(value)


def _otlp(value: str) -> str:
    if "://" not in value and ":" not in value:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an OTLP endpoint: use a URL such as http://localhost:4317 (gRPC) "
            "or http://localhost:4318 (HTTP)"
        )
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sidecar",
        help="run the accounting sidecar (ingest from engine hooks, serve gRPC)",
        description=(
            "Run the enginetime sidecar beside one engine (or one node of it). Engine hooks\n"
            "stream their step records to the ingest address; the sidecar attributes engine\n"
            "time, GPU time and interference to every request and serves them over gRPC\n"
            "(enginetime.v1.AccountingService, plus grpc.health.v1 and reflection).\n\n"
            "Once both addresses are bound it prints one line to stdout:\n\n"
            "  enginetime sidecar ready grpc=HOST:PORT ingest=ADDRESS [metrics=HOST:PORT]\n\n"
            "Logs go to stderr. SIGTERM or Ctrl-C shuts down cleanly (exit code 0)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = parser.add_argument_group("addresses")
    net.add_argument(
        "--ingest",
        metavar="unix:PATH|tcp:HOST:PORT",
        type=_ingest,
        default=None,
        help=(
            "where engine hooks connect. Default: $"
            + INGEST_ENV
            + " if set, else "
            + DEFAULT_INGEST_ADDRESS
            + " (uid: this user's). A Unix socket is created 0600 (parent directory 0700 if missing; an "
            "existing one must be this user's and not writable by others); a stale socket from a dead "
            "sidecar is replaced, a live one is never taken over. Change it to run several sidecars on one "
            "host, or use tcp: (with --ingest-token-file and/or TLS) when the engine runs in another "
            "network namespace."
        ),
    )
    net.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen,
        default=SidecarConfig.listen,
        help=(
            f"where gRPC is served. Default: {SidecarConfig.listen} (loopback only). Port 0 picks a free "
            "port (read it from the ready line). Use 0.0.0.0:PORT only behind a network policy: the API "
            "has no authentication yet."
        ),
    )
    sec = parser.add_argument_group("security (see docs/SECURITY.md)")
    sec.add_argument(
        "--ingest-allow-uid",
        metavar="UID",
        type=_uid,
        action="append",
        default=[],
        help=(
            "Unix ingest: also accept engines running as this uid (repeatable). Default: only the "
            "sidecar's own uid; other peers are closed (counted as peer_uid)."
        ),
    )
    sec.add_argument(
        "--ingest-token-file",
        metavar="PATH",
        default="",
        help=(
            "TCP ingest: a file holding a shared secret every engine must send in its hello (the hooks "
            "read ENGINETIME_TOKEN_FILE or ENGINETIME_TOKEN); compared in constant time."
        ),
    )
    sec.add_argument(
        "--ingest-tls-cert", metavar="PEM", default="", help="TCP ingest over TLS: certificate chain."
    )
    sec.add_argument(
        "--ingest-tls-key",
        metavar="PEM",
        default="",
        help="TCP ingest over TLS: private key (the hooks verify with ENGINETIME_TLS_CA).",
    )
    sec.add_argument(
        "--allow-insecure-ingest",
        action="store_true",
        help="serve tcp: ingest with neither token nor TLS (a warning is logged). Only on a private network.",
    )
    sec.add_argument("--tls-cert", metavar="PEM", default="", help="gRPC API over TLS: certificate chain.")
    sec.add_argument("--tls-key", metavar="PEM", default="", help="gRPC API over TLS: private key.")
    sec.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        default="",
        help="mTLS: accept only API clients presenting a certificate signed by this CA (needs --tls-cert).",
    )
    sec.add_argument(
        "--api-token-file",
        metavar="PATH",
        default="",
        help=(
            "a file holding a bearer token every API call must carry (clients: token= or "
            "ENGINETIME_API_TOKEN). Health checks need none."
        ),
    )
    sec.add_argument(
        "--allow-insecure-listen",
        action="store_true",
        help="serve the API on a non-loopback --listen without TLS or token (a warning is logged).",
    )
    led = parser.add_argument_group("accounting store")
    led.add_argument(
        "--max-requests",
        metavar="N",
        type=_positive_int,
        default=LedgerConfig.max_requests,
        help=(
            "most requests kept (live + finished); the oldest finished ones are evicted first. Default: "
            f"{LedgerConfig.max_requests}. Raise it when clients get NOT_FOUND for requests that "
            "finished recently under heavy load."
        ),
    )
    led.add_argument(
        "--retention",
        metavar="SECONDS",
        type=_positive_seconds,
        default=LedgerConfig.retention_s,
        help=(
            "how long a finished request's accounting stays queryable. "
            f"Default: {LedgerConfig.retention_s:g}. Raise it when session servers look requests up long "
            "after they end."
        ),
    )
    led.add_argument(
        "--lockstep-wait",
        metavar="SECONDS",
        type=_seconds,
        default=None,
        help=(
            "for LOCKSTEP engines: how long to wait for the other shards' records of a step before "
            "attributing it without them. "
            f"Default: {LedgerConfig.lockstep_wait_s:g}. Raise it when shards report through a slow or "
            "bursty path (many steps attributed as partial); lower it for fresher figures."
        ),
    )
    led.add_argument(
        "--storm-threshold",
        metavar="SECONDS",
        type=_positive_seconds,
        default=None,
        help=(
            "summed stall a request's prefill must cause on others to be reported as a storm "
            "(StreamInterference, GetShards). "
            f"Default: {LedgerConfig.storm_threshold_s}. Lower it to see smaller interference events."
        ),
    )
    led.add_argument(
        "--model-state",
        metavar="PATH",
        default="",
        help=(
            f"keep the step-cost models here: written every {LedgerConfig.model_state_interval_s:g} s and at "
            "shutdown, loaded when an "
            "engine with the same id, kind, device and layout says hello. A restarted sidecar then "
            "attributes its first storm with a calibrated model instead of a per-token guess"
        ),
    )
    lim = parser.add_argument_group("limits")
    lim.add_argument(
        "--max-frame-bytes",
        metavar="N",
        type=_frame_bytes,
        default=SidecarConfig.max_frame_bytes,
        help=(
            f"largest ingest frame accepted; a connection declaring a bigger one is closed as corrupt. "
            f"Default: {SidecarConfig.max_frame_bytes} (a 4096-entry step is ~64 KiB). Raise it only for "
            "batches of hundreds of thousands of entries."
        ),
    )
    lim.add_argument(
        "--subscriber-queue",
        metavar="N",
        type=_positive_int,
        default=SidecarConfig.subscriber_queue,
        help=(
            "most changed requests (or interference events) one gRPC stream may have waiting to be sent; "
            "a stream that exceeds it is cut off with RESOURCE_EXHAUSTED. Streams following every request "
            "share a log of 20x N changes; one that falls further behind is cut off the same way. "
            f"Default: {SidecarConfig.subscriber_queue}. Raise it for one proxy following more requests "
            "than that."
        ),
    )
    lim.add_argument(
        "--lag-limit",
        metavar="SECONDS",
        type=_positive_seconds,
        default=None,
        help=(
            "how long a gRPC stream's write may stay blocked (its client is not reading) before the stream "
            "is cut off with RESOURCE_EXHAUSTED. Default: max(10 x the stream's interval, 5). Raise it for "
            "clients that pause reading for long; slow clients never slow ingest either way."
        ),
    )
    lim.add_argument(
        "--max-ingest-connections",
        metavar="N",
        type=_positive_int,
        default=IngestLimits.max_connections,
        help=(
            "open ingest connections; more are closed at once (too_many_connections). "
            f"Default: {IngestLimits.max_connections}."
        ),
    )
    lim.add_argument(
        "--ingest-hello-timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=IngestLimits.hello_timeout_s,
        help=(
            "an ingest connection without a valid hello by then is closed (hello_timeout). "
            f"Default: {IngestLimits.hello_timeout_s:g}."
        ),
    )
    lim.add_argument(
        "--max-ingest-buffer",
        metavar="BYTES",
        type=_frame_bytes,
        default=IngestLimits.max_buffered_bytes,
        help=(
            "bytes of half-received frames over all ingest connections; the connection that crosses it is "
            "closed (buffer_limit). One connection holds at most one frame (--max-frame-bytes). "
            f"Default: {IngestLimits.max_buffered_bytes}."
        ),
    )
    lim.add_argument(
        "--max-text-bytes",
        metavar="BYTES",
        type=_text_bytes,
        default=IngestLimits.max_text_bytes,
        help=(
            "longest request/session/engine id or other text field kept as sent; a longer one is kept as "
            "its first bytes plus '…#' and 16 hex digits of its sha256 (the API applies the same rule to "
            f"the ids it is asked for). Default: {IngestLimits.max_text_bytes}."
        ),
    )
    lim.add_argument(
        "--max-live-per-shard",
        metavar="N",
        type=_positive_int,
        default=IngestLimits.max_live_per_shard,
        help="live requests one shard may have; beyond it the connection is closed (too_many_live). "
        f"Default: {IngestLimits.max_live_per_shard}.",
    )
    lim.add_argument(
        "--max-engines",
        metavar="N",
        type=_positive_int,
        default=IngestLimits.max_engines,
        help=(
            "distinct engine ids the sidecar keeps state for. When a new id would pass it, the engine "
            "with no shard connected that left longest ago is forgotten with the requests it still "
            "holds; only when every engine has a shard connected is the new one refused "
            f"(too_many_engines). Default: {IngestLimits.max_engines}."
        ),
    )
    lim.add_argument(
        "--max-shards",
        metavar="N",
        type=_positive_int,
        default=IngestLimits.max_shards,
        help=(
            "shards over all engines, and the largest num_shards a hello may claim. "
            f"Default: {IngestLimits.max_shards}."
        ),
    )
    lim.add_argument(
        "--max-streams",
        metavar="N",
        type=_positive_int,
        default=SidecarConfig.max_streams,
        help=(
            "concurrent gRPC server streams; one more ends with RESOURCE_EXHAUSTED. "
            f"Default: {SidecarConfig.max_streams}."
        ),
    )
    lim.add_argument(
        "--max-streams-per-peer",
        metavar="N",
        type=_positive_int,
        default=SidecarConfig.max_streams_per_peer,
        help=(
            "concurrent gRPC server streams from one client host (RESOURCE_EXHAUSTED beyond). "
            f"Default: {SidecarConfig.max_streams_per_peer}."
        ),
    )
    lim.add_argument(
        "--ingest-slice",
        metavar="SECONDS",
        type=_seconds,
        default=SidecarConfig.ingest_slice_s,
        help=(
            "longest stretch of ingest work (attributing received frames) before the sidecar serves "
            "waiting gRPC calls; frames are fed in stretches of this length, in arrival order. 0 feeds "
            "each read whole as it arrives (a little more ingest throughput, unary-call tails of several "
            f"ms under heavy ingest). Default: {SidecarConfig.ingest_slice_s:g}."
        ),
    )
    lim.add_argument(
        "--shutdown-grace",
        metavar="SECONDS",
        type=_seconds,
        default=SidecarConfig.shutdown_grace_s,
        help=(
            "on SIGTERM, how long in-flight unary RPCs may take to finish. "
            f"Default: {SidecarConfig.shutdown_grace_s:g}."
        ),
    )
    obs = parser.add_argument_group("observability")
    obs.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        type=_otlp,
        default=None,
        help=(
            "export one span per finished request (phases as child spans, links to the requests that "
            "stalled it) to this OTLP endpoint, e.g. http://localhost:4317 (gRPC) or "
            "http://localhost:4318 (HTTP; /v1/traces is added). Default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
            "or $OTEL_EXPORTER_OTLP_ENDPOINT if set, else no spans. Headers, TLS certificates, timeout, "
            "service name and sampler follow the standard OTEL_* variables; https:// means TLS."
        ),
    )
    obs.add_argument(
        "--otlp-protocol",
        choices=("grpc", "http/protobuf"),
        default="",
        help=(
            "OTLP transport. Default: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or $OTEL_EXPORTER_OTLP_PROTOCOL, "
            "else http/protobuf when the endpoint's port is 4318 or its path ends in /v1/traces, else grpc."
        ),
    )
    obs.add_argument(
        "--trace-link-threshold",
        metavar="SECONDS",
        type=_seconds,
        default=SidecarConfig.trace_link_threshold_s,
        help=(
            "blame on one request that earns a victim's span a link to that request's span. "
            f"Default: {SidecarConfig.trace_link_threshold_s:g}. "
            "Lower it to link smaller interference; 0 links every named aggressor."
        ),
    )
    obs.add_argument(
        "--metrics-port",
        metavar="PORT",
        type=_port,
        default=None,
        help=(
            "serve Prometheus metrics on http://HOST:PORT/metrics (0 picks a free port, reported in the "
            "ready line as metrics=HOST:PORT). Default: off."
        ),
    )
    obs.add_argument(
        "--metrics-host",
        metavar="HOST",
        default=SidecarConfig.metrics_host,
        help=(
            f"address /metrics listens on. Default: {SidecarConfig.metrics_host} (loopback); use 0.0.0.0 so "
            "Prometheus can scrape it from another host or pod."
        ),
    )
    obs.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        type=str.lower,
        help="stderr log level. Default: info (one line per engine connect/disconnect and per rejected "
        "connection). debug adds every ingest connection.",
    )
    parser.set_defaults(func=run)
    return parser


def build_config(args: argparse.Namespace) -> SidecarConfig:
    """The SidecarConfig for parsed arguments (imports the sidecar proper)."""
    from enginetime.engine_hooks.constants import ingest_address

    overrides = {"max_requests": args.max_requests, "retention_s": args.retention}
    if args.lockstep_wait is not None:
        overrides["lockstep_wait_s"] = args.lockstep_wait
    if args.storm_threshold is not None:
        overrides["storm_threshold_s"] = args.storm_threshold
    if args.model_state:
        overrides["model_state_path"] = args.model_state
    return SidecarConfig(
        ingest=ingest_address(args.ingest),
        listen=args.listen,
        ledger=LedgerConfig(**overrides),
        max_frame_bytes=args.max_frame_bytes,
        subscriber_queue=args.subscriber_queue,
        lag_limit_s=args.lag_limit,
        shutdown_grace_s=args.shutdown_grace,
        ingest_slice_s=args.ingest_slice,
        otlp_endpoint=args.otlp_endpoint or "",
        otlp_protocol=args.otlp_protocol,
        trace_link_threshold_s=args.trace_link_threshold,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_level=args.log_level,
        ingest_limits=IngestLimits(
            max_connections=args.max_ingest_connections,
            hello_timeout_s=args.ingest_hello_timeout,
            max_buffered_bytes=args.max_ingest_buffer,
            max_text_bytes=args.max_text_bytes,
            max_live_per_shard=args.max_live_per_shard,
            max_engines=args.max_engines,
            max_shards=args.max_shards,
        ),
        ingest_token_file=args.ingest_token_file,
        ingest_tls_cert=args.ingest_tls_cert,
        ingest_tls_key=args.ingest_tls_key,
        allow_insecure_ingest=args.allow_insecure_ingest,
        ingest_allow_uids=tuple(args.ingest_allow_uid),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        api_token_file=args.api_token_file,
        allow_insecure_listen=args.allow_insecure_listen,
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from enginetime.sidecar.server import main

    config = build_config(args)
    try:
        parse_ingest_address(config.ingest)
    except ValueError as exc:  # from $ENGINETIME_INGEST: argparse never saw it
        print(f"enginetime sidecar: ${INGEST_ENV}: {exc}", file=sys.stderr)
        return 2
    return main(config)
