import datetime

from enginetime.v1 import ingest_pb2 as _ingest_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from enginetime.orca import orca_load_report_pb2 as _orca_load_report_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_QUEUED: _ClassVar[RequestState]
    REQUEST_STATE_RUNNING: _ClassVar[RequestState]
    REQUEST_STATE_PREEMPTED: _ClassVar[RequestState]
    REQUEST_STATE_FINISHED: _ClassVar[RequestState]
    REQUEST_STATE_ABORTED: _ClassVar[RequestState]
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_QUEUED: RequestState
REQUEST_STATE_RUNNING: RequestState
REQUEST_STATE_PREEMPTED: RequestState
REQUEST_STATE_FINISHED: RequestState
REQUEST_STATE_ABORTED: RequestState

class Blame(_message.Message):
    __slots__ = ("request_id", "shard", "duration", "same_shard", "engine_id", "arrival_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    SAME_SHARD_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    shard: int
    duration: _duration_pb2.Duration
    same_shard: bool
    engine_id: str
    arrival_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., shard: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., same_shard: bool = ..., engine_id: _Optional[str] = ..., arrival_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TokenCounts(_message.Message):
    __slots__ = ("prompt", "cached", "prefilled", "decoded")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    prompt: int
    cached: int
    prefilled: int
    decoded: int
    def __init__(self, prompt: _Optional[int] = ..., cached: _Optional[int] = ..., prefilled: _Optional[int] = ..., decoded: _Optional[int] = ...) -> None: ...

class RequestAccounting(_message.Message):
    __slots__ = ("request_id", "session_id", "engine_id", "shard", "state", "arrival_time", "queue_time", "engine_time", "gpu_time", "interference", "wall", "tokens", "steps", "preemptions", "top_blame", "partial", "last_step_time", "migrated", "other", "finish_time", "finish_reason", "routed_shard", "excluded_steps", "queue_time_ns", "engine_time_ns", "gpu_time_ns", "interference_ns", "wall_ns", "traceparent", "other_ns")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TIME_FIELD_NUMBER: _ClassVar[int]
    GPU_TIME_FIELD_NUMBER: _ClassVar[int]
    INTERFERENCE_FIELD_NUMBER: _ClassVar[int]
    WALL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_BLAME_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTED_SHARD_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_STEPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    GPU_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    INTERFERENCE_NS_FIELD_NUMBER: _ClassVar[int]
    WALL_NS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    OTHER_NS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    engine_id: str
    shard: int
    state: RequestState
    arrival_time: _timestamp_pb2.Timestamp
    queue_time: _duration_pb2.Duration
    engine_time: _duration_pb2.Duration
    gpu_time: _duration_pb2.Duration
    interference: _duration_pb2.Duration
    wall: _duration_pb2.Duration
    tokens: TokenCounts
    steps: int
    preemptions: int
    top_blame: _containers.RepeatedCompositeFieldContainer[Blame]
    partial: bool
    last_step_time: _timestamp_pb2.Timestamp
    migrated: bool
    other: _duration_pb2.Duration
    finish_time: _timestamp_pb2.Timestamp
    finish_reason: str
    routed_shard: int
    excluded_steps: int
    queue_time_ns: int
    engine_time_ns: int
    gpu_time_ns: int
    interference_ns: int
    wall_ns: int
    traceparent: str
    other_ns: int
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., shard: _Optional[int] = ..., state: _Optional[_Union[RequestState, str]] = ..., arrival_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., engine_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., gpu_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., interference: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., wall: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tokens: _Optional[_Union[TokenCounts, _Mapping]] = ..., steps: _Optional[int] = ..., preemptions: _Optional[int] = ..., top_blame: _Optional[_Iterable[_Union[Blame, _Mapping]]] = ..., partial: bool = ..., last_step_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., migrated: bool = ..., other: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_reason: _Optional[str] = ..., routed_shard: _Optional[int] = ..., excluded_steps: _Optional[int] = ..., queue_time_ns: _Optional[int] = ..., engine_time_ns: _Optional[int] = ..., gpu_time_ns: _Optional[int] = ..., interference_ns: _Optional[int] = ..., wall_ns: _Optional[int] = ..., traceparent: _Optional[str] = ..., other_ns: _Optional[int] = ...) -> None: ...

class RequestFilter(_message.Message):
    __slots__ = ("states", "shard", "session_id", "engine_id", "request_ids")
    STATES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[RequestState]
    shard: int
    session_id: str
    engine_id: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, states: _Optional[_Iterable[_Union[RequestState, str]]] = ..., shard: _Optional[int] = ..., session_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequestRequest(_message.Message):
    __slots__ = ("request_id", "engine_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_id: str
    def __init__(self, request_id: _Optional[str] = ..., engine_id: _Optional[str] = ...) -> None: ...

class GetRequestCostRequest(_message.Message):
    __slots__ = ("request_id", "engine_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_id: str
    def __init__(self, request_id: _Optional[str] = ..., engine_id: _Optional[str] = ...) -> None: ...

class GetRequestCostResponse(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: _orca_load_report_pb2.OrcaLoadReport
    def __init__(self, report: _Optional[_Union[_orca_load_report_pb2.OrcaLoadReport, _Mapping]] = ...) -> None: ...

class GetRequestResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: RequestAccounting
    def __init__(self, request: _Optional[_Union[RequestAccounting, _Mapping]] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: RequestFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[RequestFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests", "next_page_token", "total_size")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestAccounting]
    next_page_token: str
    total_size: int
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestAccounting, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class WatchRequestRequest(_message.Message):
    __slots__ = ("request_id", "min_interval", "engine_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    min_interval: _duration_pb2.Duration
    engine_id: str
    def __init__(self, request_id: _Optional[str] = ..., min_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., engine_id: _Optional[str] = ...) -> None: ...

class WatchRequestResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: RequestAccounting
    def __init__(self, request: _Optional[_Union[RequestAccounting, _Mapping]] = ...) -> None: ...

class StreamUpdatesRequest(_message.Message):
    __slots__ = ("filter", "interval")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    filter: RequestFilter
    interval: _duration_pb2.Duration
    def __init__(self, filter: _Optional[_Union[RequestFilter, _Mapping]] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StreamUpdatesResponse(_message.Message):
    __slots__ = ("updates", "time", "coalesced")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    COALESCED_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[RequestAccounting]
    time: _timestamp_pb2.Timestamp
    coalesced: int
    def __init__(self, updates: _Optional[_Iterable[_Union[RequestAccounting, _Mapping]]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., coalesced: _Optional[int] = ...) -> None: ...

class GetShardsRequest(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class Storm(_message.Message):
    __slots__ = ("request_id", "shard", "prefill_tokens", "chunks", "start_time", "stall", "prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STALL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    shard: int
    prefill_tokens: int
    chunks: int
    start_time: _timestamp_pb2.Timestamp
    stall: _duration_pb2.Duration
    prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., shard: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stall: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("engine_id", "shard", "coupling", "decode_tokens_per_second", "prefill_tokens_per_second", "busy_fraction", "active_requests", "queued_requests", "current_storm", "last_step_time", "steps", "connected", "dropped_frames", "engine_kind", "device_name", "timer_source", "unattributed", "imbalance", "slowdown", "num_shards", "shards_seen", "partial_view")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COUPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STORM_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    TIMER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_SEEN_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_VIEW_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    shard: int
    coupling: _ingest_pb2.Coupling
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    busy_fraction: float
    active_requests: int
    queued_requests: int
    current_storm: Storm
    last_step_time: _timestamp_pb2.Timestamp
    steps: int
    connected: bool
    dropped_frames: int
    engine_kind: str
    device_name: str
    timer_source: _ingest_pb2.TimerSource
    unattributed: _duration_pb2.Duration
    imbalance: _duration_pb2.Duration
    slowdown: float
    num_shards: int
    shards_seen: int
    partial_view: bool
    def __init__(self, engine_id: _Optional[str] = ..., shard: _Optional[int] = ..., coupling: _Optional[_Union[_ingest_pb2.Coupling, str]] = ..., decode_tokens_per_second: _Optional[float] = ..., prefill_tokens_per_second: _Optional[float] = ..., busy_fraction: _Optional[float] = ..., active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., current_storm: _Optional[_Union[Storm, _Mapping]] = ..., last_step_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., steps: _Optional[int] = ..., connected: bool = ..., dropped_frames: _Optional[int] = ..., engine_kind: _Optional[str] = ..., device_name: _Optional[str] = ..., timer_source: _Optional[_Union[_ingest_pb2.TimerSource, str]] = ..., unattributed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., imbalance: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., slowdown: _Optional[float] = ..., num_shards: _Optional[int] = ..., shards_seen: _Optional[int] = ..., partial_view: bool = ...) -> None: ...

class GetShardsResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ...) -> None: ...

class InterferenceVictims(_message.Message):
    __slots__ = ("shards", "request_count", "duration")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedScalarFieldContainer[int]
    request_count: int
    duration: _duration_pb2.Duration
    def __init__(self, shards: _Optional[_Iterable[int]] = ..., request_count: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class InterferenceEvent(_message.Message):
    __slots__ = ("phase", "engine_id", "aggressor_request_id", "aggressor_shard", "prefill_tokens", "chunks", "victims", "start_time", "end_time", "cross_shard", "aggressor_session_id")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[InterferenceEvent.Phase]
        PHASE_STARTED: _ClassVar[InterferenceEvent.Phase]
        PHASE_ONGOING: _ClassVar[InterferenceEvent.Phase]
        PHASE_ENDED: _ClassVar[InterferenceEvent.Phase]
        PHASE_PREDICTED: _ClassVar[InterferenceEvent.Phase]
    PHASE_UNSPECIFIED: InterferenceEvent.Phase
    PHASE_STARTED: InterferenceEvent.Phase
    PHASE_ONGOING: InterferenceEvent.Phase
    PHASE_ENDED: InterferenceEvent.Phase
    PHASE_PREDICTED: InterferenceEvent.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    AGGRESSOR_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGGRESSOR_SHARD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    VICTIMS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    CROSS_SHARD_FIELD_NUMBER: _ClassVar[int]
    AGGRESSOR_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    phase: InterferenceEvent.Phase
    engine_id: str
    aggressor_request_id: str
    aggressor_shard: int
    prefill_tokens: int
    chunks: int
    victims: InterferenceVictims
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    cross_shard: bool
    aggressor_session_id: str
    def __init__(self, phase: _Optional[_Union[InterferenceEvent.Phase, str]] = ..., engine_id: _Optional[str] = ..., aggressor_request_id: _Optional[str] = ..., aggressor_shard: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., victims: _Optional[_Union[InterferenceVictims, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cross_shard: bool = ..., aggressor_session_id: _Optional[str] = ...) -> None: ...

class StreamInterferenceRequest(_message.Message):
    __slots__ = ("engine_id", "shard", "min_stall")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MIN_STALL_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    shard: int
    min_stall: _duration_pb2.Duration
    def __init__(self, engine_id: _Optional[str] = ..., shard: _Optional[int] = ..., min_stall: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StreamInterferenceResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: InterferenceEvent
    def __init__(self, event: _Optional[_Union[InterferenceEvent, _Mapping]] = ...) -> None: ...

class AdviseRequest(_message.Message):
    __slots__ = ("engine_id", "session_id", "prompt_tokens", "after_request_id", "max_wait")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AFTER_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    session_id: str
    prompt_tokens: int
    after_request_id: str
    max_wait: _duration_pb2.Duration
    def __init__(self, engine_id: _Optional[str] = ..., session_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., after_request_id: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ShardAdvice(_message.Message):
    __slots__ = ("shard", "cached_tokens", "predicted_prefill", "predicted_stall", "active_requests")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PREFILL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STALL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    cached_tokens: int
    predicted_prefill: _duration_pb2.Duration
    predicted_stall: _duration_pb2.Duration
    active_requests: int
    def __init__(self, shard: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., predicted_prefill: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., predicted_stall: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., active_requests: _Optional[int] = ...) -> None: ...

class Advice(_message.Message):
    __slots__ = ("recommended_shard", "reason", "shards", "storm_active", "calibrated", "after_request_seen")
    RECOMMENDED_SHARD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    STORM_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    AFTER_REQUEST_SEEN_FIELD_NUMBER: _ClassVar[int]
    recommended_shard: int
    reason: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardAdvice]
    storm_active: bool
    calibrated: bool
    after_request_seen: bool
    def __init__(self, recommended_shard: _Optional[int] = ..., reason: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardAdvice, _Mapping]]] = ..., storm_active: bool = ..., calibrated: bool = ..., after_request_seen: bool = ...) -> None: ...

class AdviseResponse(_message.Message):
    __slots__ = ("advice",)
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    advice: Advice
    def __init__(self, advice: _Optional[_Union[Advice, _Mapping]] = ...) -> None: ...
