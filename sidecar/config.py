"""The sidecar's configuration: each default is written here, once.

``sidecar/cli.py`` builds ``enginetime sidecar``'s flags and their help text from
these dataclasses' defaults, and the parts of the sidecar receive the dataclasses
themselves (``Ledger`` and ``AccountingService`` a ``LedgerConfig``, ``FanOut`` a
``FanOutLimits``), so a default changed here changes everywhere it shows. Stdlib
only: ``enginetime --help`` reads it without importing grpc or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from enginetime.engine_hooks.constants import DEFAULT_GRPC_ADDRESS, MAX_FRAME_BYTES, ingest_address
from enginetime.sidecar.ingest.limits import DISPATCH_SLICE_S, IngestLimits

#: Where gRPC is served unless told otherwise (loopback only).
DEFAULT_LISTEN = DEFAULT_GRPC_ADDRESS
#: Blame on one aggressor (seconds) that earns a victim's span a link to the aggressor's span.
DEFAULT_LINK_THRESHOLD_S = 0.5


@dataclass
class LedgerConfig:
    """The ledger's bounds and tuning (``enginetime sidecar``'s "accounting store" flags)."""

    lockstep_wait_s: float = 0.2  # bounded wait for a LOCKSTEP group's stragglers
    retention_s: float = 600.0  # finished requests kept this long
    max_requests: int = 100_000  # active + finished; evict oldest finished first, then oldest active
    storm_threshold_s: float = 1.0  # summed blame that makes an aggressor's prefill a storm
    top_blame: int = 5  # blame entries kept in views (full map kept internally, bounded)
    model_window: int = 2048  # cost-model observations kept per model
    refit_every: int = 32  # refit after this many new observations
    rate_window_s: float = 2.0  # window for shard tok/s and busy fraction
    model_state_path: str = ""  # --model-state: cost models saved here and loaded at hello (modelstate)
    model_state_interval_s: float = 30.0  # how often the model state is written (and at shutdown)

    def __post_init__(self) -> None:
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be ≥ 1, got {self.max_requests}")
        if self.top_blame < 1:
            raise ValueError(f"top_blame must be ≥ 1, got {self.top_blame}")
        for name in ("lockstep_wait_s", "retention_s", "storm_threshold_s", "rate_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")


@dataclass
class FanOutLimits:
    """Per-subscriber bounds of the fan-out (``sidecar/api/fanout.py``).

    max_pending: request ids (or interference events) a subscriber may have
    waiting before it is cut off. lag_limit_s: how long one write may stay
    blocked before the subscriber is cut off; None = max(10 intervals, 5 s).
    max_log_entries: changed ids kept for subscribers that follow every request
    (8 bytes each; None = 20 x max_pending): one that falls further behind is cut
    off. min_share: see below.
    """

    max_pending: int = 100_000
    lag_limit_s: float | None = None
    max_log_entries: int | None = None
    #: Least share of the event loop that encoding for subscribers may use when ingest is
    #: saturated; otherwise it gets what ingest leaves idle.
    min_share: float = 0.25

    def __post_init__(self) -> None:
        if self.max_log_entries is None:
            self.max_log_entries = 20 * self.max_pending

    def lag_limit(self, interval_s: float) -> float:
        if self.lag_limit_s is not None:
            return self.lag_limit_s
        return max(10.0 * interval_s, 5.0)


@dataclass
class SidecarConfig:
    """Everything ``enginetime sidecar`` can be told (see ``enginetime sidecar --help``)."""

    ingest: str = field(default_factory=ingest_address)
    listen: str = DEFAULT_LISTEN
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    max_frame_bytes: int = MAX_FRAME_BYTES
    #: Request ids (or interference events) one stream may have unsent before it is cut off.
    subscriber_queue: int = FanOutLimits.max_pending
    #: Seconds a stream's write may stay blocked before it is cut off; None: max(10 intervals, 5 s).
    lag_limit_s: float | None = FanOutLimits.lag_limit_s
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
    #: Per-peer ingest limits (connections, hello timeout, buffers, ids, live requests, engines).
    ingest_limits: IngestLimits = field(default_factory=IngestLimits)
    #: TCP ingest: a file holding the shared token the hooks send in their hello.
    ingest_token_file: str = ""
    #: TCP ingest over TLS (PEM files).
    ingest_tls_cert: str = ""
    ingest_tls_key: str = ""
    #: Serve TCP ingest without token or TLS (a warning is logged).
    allow_insecure_ingest: bool = False
    #: Unix ingest: uids besides the sidecar's own that may connect.
    ingest_allow_uids: tuple[int, ...] = ()
    #: gRPC API over TLS (PEM files); with tls_client_ca every client needs a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    #: A file holding the bearer token every API call but health must carry.
    api_token_file: str = ""
    #: Serve the API on a non-loopback address without TLS or token.
    allow_insecure_listen: bool = False
    #: Concurrent server streams in total and per peer host (RESOURCE_EXHAUSTED beyond).
    max_streams: int = 1024
    max_streams_per_peer: int = 64
    #: Longest stretch of ingest work (feeding frames to the ledger) per event-loop callback,
    #: so gRPC calls are served between stretches; 0: feed each read whole as it arrives.
    ingest_slice_s: float = DISPATCH_SLICE_S

    def fanout_limits(self) -> FanOutLimits:
        """The fan-out's bounds these settings ask for."""
        return FanOutLimits(max_pending=self.subscriber_queue, lag_limit_s=self.lag_limit_s)


__all__ = ["DEFAULT_LINK_THRESHOLD_S", "DEFAULT_LISTEN", "FanOutLimits", "LedgerConfig", "SidecarConfig"]
