from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Coupling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COUPLING_UNSPECIFIED: _ClassVar[Coupling]
    COUPLING_INDEPENDENT: _ClassVar[Coupling]
    COUPLING_LOCKSTEP: _ClassVar[Coupling]

class TimerSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIMER_SOURCE_UNSPECIFIED: _ClassVar[TimerSource]
    TIMER_SOURCE_MONOTONIC: _ClassVar[TimerSource]
    TIMER_SOURCE_CUDA_EVENT: _ClassVar[TimerSource]

class StepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_KIND_UNSPECIFIED: _ClassVar[StepKind]
    STEP_KIND_PREFILL: _ClassVar[StepKind]
    STEP_KIND_DECODE: _ClassVar[StepKind]
    STEP_KIND_MIXED: _ClassVar[StepKind]
    STEP_KIND_IDLE: _ClassVar[StepKind]

class RequestEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_EVENT_KIND_UNSPECIFIED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_ARRIVED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_SCHEDULED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_PREEMPTED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_RESUMED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_FINISHED: _ClassVar[RequestEventKind]
    REQUEST_EVENT_KIND_ABORTED: _ClassVar[RequestEventKind]
COUPLING_UNSPECIFIED: Coupling
COUPLING_INDEPENDENT: Coupling
COUPLING_LOCKSTEP: Coupling
TIMER_SOURCE_UNSPECIFIED: TimerSource
TIMER_SOURCE_MONOTONIC: TimerSource
TIMER_SOURCE_CUDA_EVENT: TimerSource
STEP_KIND_UNSPECIFIED: StepKind
STEP_KIND_PREFILL: StepKind
STEP_KIND_DECODE: StepKind
STEP_KIND_MIXED: StepKind
STEP_KIND_IDLE: StepKind
REQUEST_EVENT_KIND_UNSPECIFIED: RequestEventKind
REQUEST_EVENT_KIND_ARRIVED: RequestEventKind
REQUEST_EVENT_KIND_SCHEDULED: RequestEventKind
REQUEST_EVENT_KIND_PREEMPTED: RequestEventKind
REQUEST_EVENT_KIND_RESUMED: RequestEventKind
REQUEST_EVENT_KIND_FINISHED: RequestEventKind
REQUEST_EVENT_KIND_ABORTED: RequestEventKind

class ClockInfo(_message.Message):
    __slots__ = ("wall_time_ns", "monotonic_ns", "timer_source", "device_name")
    WALL_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    MONOTONIC_NS_FIELD_NUMBER: _ClassVar[int]
    TIMER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    wall_time_ns: int
    monotonic_ns: int
    timer_source: TimerSource
    device_name: str
    def __init__(self, wall_time_ns: _Optional[int] = ..., monotonic_ns: _Optional[int] = ..., timer_source: _Optional[_Union[TimerSource, str]] = ..., device_name: _Optional[str] = ...) -> None: ...

class EngineHello(_message.Message):
    __slots__ = ("protocol_version", "engine_id", "shard", "num_shards", "coupling", "engine_kind", "engine_version", "hooks_version", "clock", "recorder_epoch", "token")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    COUPLING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOOKS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    RECORDER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    engine_id: str
    shard: int
    num_shards: int
    coupling: Coupling
    engine_kind: str
    engine_version: str
    hooks_version: str
    clock: ClockInfo
    recorder_epoch: int
    token: str
    def __init__(self, protocol_version: _Optional[int] = ..., engine_id: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., coupling: _Optional[_Union[Coupling, str]] = ..., engine_kind: _Optional[str] = ..., engine_version: _Optional[str] = ..., hooks_version: _Optional[str] = ..., clock: _Optional[_Union[ClockInfo, _Mapping]] = ..., recorder_epoch: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class RequestEvent(_message.Message):
    __slots__ = ("handle", "request_id", "kind", "time_ns", "prompt_tokens", "cached_tokens", "session_id", "traceparent", "routed_shard", "finish_reason", "output_tokens", "replayed")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    ROUTED_SHARD_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    handle: int
    request_id: str
    kind: RequestEventKind
    time_ns: int
    prompt_tokens: int
    cached_tokens: int
    session_id: str
    traceparent: str
    routed_shard: int
    finish_reason: str
    output_tokens: int
    replayed: bool
    def __init__(self, handle: _Optional[int] = ..., request_id: _Optional[str] = ..., kind: _Optional[_Union[RequestEventKind, str]] = ..., time_ns: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., session_id: _Optional[str] = ..., traceparent: _Optional[str] = ..., routed_shard: _Optional[int] = ..., finish_reason: _Optional[str] = ..., output_tokens: _Optional[int] = ..., replayed: bool = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("seq", "global_step", "start_time_ns", "end_time_ns", "device_time_ns", "timer_source", "kind", "handles", "prefill_tokens", "decode_tokens", "context_tokens", "peer_tokens")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    END_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    TIMER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    global_step: int
    start_time_ns: int
    end_time_ns: int
    device_time_ns: int
    timer_source: TimerSource
    kind: StepKind
    handles: _containers.RepeatedScalarFieldContainer[int]
    prefill_tokens: _containers.RepeatedScalarFieldContainer[int]
    decode_tokens: _containers.RepeatedScalarFieldContainer[int]
    context_tokens: _containers.RepeatedScalarFieldContainer[int]
    peer_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., global_step: _Optional[int] = ..., start_time_ns: _Optional[int] = ..., end_time_ns: _Optional[int] = ..., device_time_ns: _Optional[int] = ..., timer_source: _Optional[_Union[TimerSource, str]] = ..., kind: _Optional[_Union[StepKind, str]] = ..., handles: _Optional[_Iterable[int]] = ..., prefill_tokens: _Optional[_Iterable[int]] = ..., decode_tokens: _Optional[_Iterable[int]] = ..., context_tokens: _Optional[_Iterable[int]] = ..., peer_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("time_ns", "dropped_frames", "dropped_steps", "dropped_events", "sent_frames", "reconnects")
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    time_ns: int
    dropped_frames: int
    dropped_steps: int
    dropped_events: int
    sent_frames: int
    reconnects: int
    def __init__(self, time_ns: _Optional[int] = ..., dropped_frames: _Optional[int] = ..., dropped_steps: _Optional[int] = ..., dropped_events: _Optional[int] = ..., sent_frames: _Optional[int] = ..., reconnects: _Optional[int] = ...) -> None: ...

class IngestFrame(_message.Message):
    __slots__ = ("hello", "request_event", "step", "heartbeat", "packed_step")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_EVENT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PACKED_STEP_FIELD_NUMBER: _ClassVar[int]
    hello: EngineHello
    request_event: RequestEvent
    step: StepRecord
    heartbeat: Heartbeat
    packed_step: bytes
    def __init__(self, hello: _Optional[_Union[EngineHello, _Mapping]] = ..., request_event: _Optional[_Union[RequestEvent, _Mapping]] = ..., step: _Optional[_Union[StepRecord, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., packed_step: _Optional[bytes] = ...) -> None: ...
