"""Pre-encoded ingest frames of a synthetic engine, shared by the sidecar benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from enginetime.engine_hooks import wire
from enginetime.engine_hooks.constants import EventKind, TimerSource


def hello_and_arrivals(
    *,
    engine_id: str,
    shard: int,
    num_shards: int,
    coupling: int,
    handles: range,
    time_ns: int,
    request_id: Callable[[int], str],
    session_id: Callable[[int], str] | None = None,
    token: str = "",
    **event_fields,
) -> bytes:
    """What a shard sends first: its hello, then ARRIVED for each handle.

    ``request_id(handle)`` and ``session_id(handle)`` name each request; ``event_fields``
    (prompt_tokens, ...) are the same for all. ``token`` goes in the hello (TCP ingest).
    """
    parts = [
        wire.frame_hello(
            engine_id=engine_id,
            shard=shard,
            num_shards=num_shards,
            coupling=coupling,
            engine_kind="bench",
            timer_source=int(TimerSource.MONOTONIC),
            device_name="cpu",
            recorder_epoch=1,
            wall_time_ns=time_ns,
            token=token,
        )
    ]
    parts += [
        wire.frame_event(
            handle=h,
            kind=int(EventKind.ARRIVED),
            time_ns=time_ns,
            request_id=request_id(h),
            session_id=session_id(h) if session_id is not None else "",
            **event_fields,
        )
        for h in handles
    ]
    return b"".join(parts)
