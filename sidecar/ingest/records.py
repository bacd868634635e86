"""Decoded ingest frames: what sidecar.frames produces and the ledger consumes.

Plain slotted dataclasses (one per IngestFrame variant) so the hot path never
touches protobuf objects. Step columns are numpy uint32 arrays read straight
from the packed fixed32 fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Hello:
    protocol_version: int
    engine_id: str
    shard: int
    num_shards: int
    coupling: int  # engine_hooks.constants.Coupling
    engine_kind: str = ""
    engine_version: str = ""
    hooks_version: str = ""
    wall_time_ns: int = 0
    monotonic_ns: int = 0
    timer_source: int = 0  # TimerSource
    device_name: str = ""
    recorder_epoch: int = 0
    #: TCP ingest's shared secret; never shown in reprs or logs.
    token: str = field(default="", repr=False)


@dataclass(slots=True)
class Event:
    handle: int
    kind: int  # EventKind
    time_ns: int
    request_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    session_id: str = ""
    traceparent: str = ""
    routed_shard: int | None = None
    finish_reason: str = ""
    output_tokens: int = 0
    replayed: bool = False


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.uint32)


@dataclass(slots=True)
class Step:
    seq: int
    start_time_ns: int
    end_time_ns: int
    device_time_ns: int
    kind: int  # StepKind
    timer_source: int = 0
    global_step: int | None = None
    handles: np.ndarray = field(default_factory=_empty)
    prefill_tokens: np.ndarray = field(default_factory=_empty)
    decode_tokens: np.ndarray = field(default_factory=_empty)
    context_tokens: np.ndarray = field(default_factory=_empty)
    peer_tokens: np.ndarray = field(default_factory=_empty)


@dataclass(slots=True)
class Beat:
    time_ns: int
    dropped_frames: int = 0
    dropped_steps: int = 0
    dropped_events: int = 0
    sent_frames: int = 0
    reconnects: int = 0


Frame = Hello | Event | Step | Beat
