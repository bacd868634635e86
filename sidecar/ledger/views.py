"""What the ledger answers with: snapshots the gRPC layer turns into protobuf.

Integer nanoseconds throughout (the API layer converts to Duration/Timestamp).
Snapshots are immutable copies: safe to hand to another task or thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class RequestState(IntEnum):
    """Same numbers as enginetime.v1.RequestState."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED = 4
    ABORTED = 5

    @property
    def terminal(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED)


@dataclass(frozen=True, slots=True)
class BlameView:
    request_id: str  # "" when the cause is not a single request
    engine_id: str
    shard: int
    seconds_ns: int
    same_shard: bool
    arrival_ns: int = -1  # the aggressor's arrival (-1: a shard as cause): names it when ids are reused


@dataclass(frozen=True, slots=True)
class RequestView:
    request_id: str
    engine_id: str
    shard: int
    state: RequestState
    arrival_time_ns: int
    queue_time_ns: int
    engine_time_ns: int
    gpu_time_ns: int
    interference_ns: int
    wall_ns: int
    other_ns: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    decoded_tokens: int = 0
    steps: int = 0
    excluded_steps: int = 0
    preemptions: int = 0
    top_blame: tuple[BlameView, ...] = ()
    partial: bool = False
    migrated: bool = False
    session_id: str = ""
    traceparent: str = ""
    last_step_time_ns: int = 0  # 0: never in a step
    finish_time_ns: int = 0  # 0: not finished
    finish_reason: str = ""
    routed_shard: int | None = None
    #: Monotonic change counter: increases whenever any figure changes.
    version: int = 0


@dataclass(frozen=True, slots=True)
class StormView:
    request_id: str
    shard: int
    prefill_tokens: int
    prompt_tokens: int
    chunks: int
    start_time_ns: int
    stall_ns: int


@dataclass(frozen=True, slots=True)
class ShardView:
    engine_id: str
    shard: int
    coupling: int
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    busy_fraction: float
    active_requests: int
    queued_requests: int
    current_storm: StormView | None
    last_step_time_ns: int
    steps: int
    connected: bool
    dropped_frames: int
    engine_kind: str = ""
    device_name: str = ""
    timer_source: int = 0
    #: Device time of this shard no request could be charged with (idle waits with no
    #: critical shard to blame, or a critical shard that never reported).
    unattributed_ns: int = 0
    imbalance_ns: int = 0  # lockstep wait charged to no request (decode imbalance, tied-shard jitter)
    slowdown: float = 1.0  # the engine's pace against its calibrated model (costmodel.Slowdown)
    #: Victim time the rest of the prefills of requests running here is predicted to cause on
    #: the other lockstep shards (cost model: what PREDICTED events warn of, less what ran).
    predicted_stall_ns: int = 0
    #: How long the oldest request still queued for its first step has waited (0: none).
    oldest_queued_ns: int = 0
    num_shards: int = 1  # the shards the engine announced in its hello
    shards_seen: int = 1  # shards of the engine that ever connected to this sidecar
    #: shards_seen < num_shards: the rest report elsewhere (one sidecar per node) or never joined.
    partial_view: bool = False
    #: Requests that ended (finished or aborted) / ended aborted per second over the rate window.
    ended_per_second: float = 0.0
    aborted_per_second: float = 0.0


class InterferencePhase(IntEnum):
    UNSPECIFIED = 0
    STARTED = 1
    ONGOING = 2
    ENDED = 3
    PREDICTED = 4  # admitted; its predicted prefill will stall others past the threshold


@dataclass(frozen=True, slots=True)
class InterferenceView:
    phase: InterferencePhase
    engine_id: str
    aggressor_request_id: str
    aggressor_shard: int
    aggressor_session_id: str
    prefill_tokens: int
    chunks: int
    victim_shards: tuple[int, ...]
    victim_requests: int
    victim_ns: int
    start_time_ns: int
    end_time_ns: int  # 0 until ENDED
    cross_shard: bool


class AmbiguousRequestError(LookupError):
    """A bare request id that more than one engine holds: the caller must name the engine.

    A request is (engine_id, request_id); answering with whichever engine's request
    came last would give a guard another request's figures.
    """

    def __init__(self, request_id: str, engines: list[str]) -> None:
        self.request_id = request_id
        self.engines = sorted(engines)
        super().__init__(
            f"request id {request_id!r} is held by {len(self.engines)} engines "
            f"({', '.join(repr(e) for e in self.engines)}): pass engine_id to say which one"
        )


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """Filter for list/stream calls (mirrors enginetime.v1.RequestFilter)."""

    states: frozenset[RequestState] = frozenset()
    shard: int | None = None
    session_id: str = ""
    engine_id: str = ""
    request_ids: frozenset[str] = field(default_factory=frozenset)

    def matches(self, v: RequestView) -> bool:
        return self.accepts(v.request_id, v.state, v.engine_id, v.shard, v.session_id)

    def accepts(self, request_id: str, state: int, engine_id: str, shard: int, session_id: str) -> bool:
        """``matches`` on the figures themselves (the fan-out filters encoded requests with it)."""
        return (
            (not self.states or state in self.states)
            and (self.shard is None or shard == self.shard)
            and (not self.session_id or session_id == self.session_id)
            and (not self.engine_id or engine_id == self.engine_id)
            and (not self.request_ids or request_id in self.request_ids)
        )
