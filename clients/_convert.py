"""Protobuf <-> client types, argument checks and channel settings.

Shared by the sync and async clients so the two cannot drift.

Durations and times are converted through integer nanoseconds: a protobuf
Duration/Timestamp is exact (seconds + nanos), and so is the ``*_ns`` integer
the sidecar also sends; floats are derived from the integer last.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from google.protobuf import duration_pb2, timestamp_pb2

from enginetime.engine_hooks.constants import DEFAULT_GRPC_ADDRESS
from enginetime.v1 import accounting_pb2 as pb

from .types import (
    Advice,
    Blame,
    Coupling,
    InterferenceEvent,
    InterferencePhase,
    InterferenceVictims,
    RequestAccounting,
    RequestFilter,
    RequestPage,
    RequestState,
    ShardAdvice,
    ShardStatus,
    States,
    Storm,
    TimerSource,
    TokenCounts,
    UpdateBatch,
    check_shard,
)

NS_PER_S = 1_000_000_000

#: Where ``enginetime sidecar`` serves gRPC when not told otherwise.
DEFAULT_TARGET = DEFAULT_GRPC_ADDRESS

#: A StreamUpdates batch for a big proxy can hold thousands of requests; grpc's
#: 4 MiB default receive limit would cut such a stream off with a confusing error.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)

Metadata = Mapping[str, str] | Iterable[tuple[str, str]] | None


def _dur_ns(d: duration_pb2.Duration) -> int:
    return d.seconds * NS_PER_S + d.nanos


def _ts_ns(t: timestamp_pb2.Timestamp) -> int:
    return t.seconds * NS_PER_S + t.nanos


def _opt_ts_ns(msg, field: str) -> int | None:
    return _ts_ns(getattr(msg, field)) if msg.HasField(field) else None


def _s(ns: int | None) -> float | None:
    return None if ns is None else ns / NS_PER_S


def _pick_ns(msg, duration_field: str, ns_field: str) -> int:
    """The exact ns figure: the Duration when sent, else the integer twin."""
    if msg.HasField(duration_field):
        return _dur_ns(getattr(msg, duration_field))
    return int(getattr(msg, ns_field))


def duration_from_seconds(seconds: float, what: str) -> duration_pb2.Duration:
    """A non-negative float of seconds as a Duration; raises ValueError naming the argument."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {seconds!r}")
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"{what} must be >= 0 seconds, got {seconds!r}")
    ns = round(seconds * NS_PER_S)
    return duration_pb2.Duration(seconds=ns // NS_PER_S, nanos=ns % NS_PER_S)


def blame_from_pb(m: pb.Blame) -> Blame:
    ns = _dur_ns(m.duration)
    return Blame(
        request_id=m.request_id,
        engine_id=m.engine_id,
        shard=m.shard,
        seconds=ns / NS_PER_S,
        seconds_ns=ns,
        same_shard=m.same_shard,
        arrival_time=_s(_opt_ts_ns(m, "arrival_time")),
        arrival_time_ns=_opt_ts_ns(m, "arrival_time"),
    )


def request_from_pb(m: pb.RequestAccounting) -> RequestAccounting:
    queue = _pick_ns(m, "queue_time", "queue_time_ns")
    engine = _pick_ns(m, "engine_time", "engine_time_ns")
    gpu = _pick_ns(m, "gpu_time", "gpu_time_ns")
    interference = _pick_ns(m, "interference", "interference_ns")
    wall = _pick_ns(m, "wall", "wall_ns")
    other = _pick_ns(m, "other", "other_ns")
    arrival = _ts_ns(m.arrival_time)
    last_step = _opt_ts_ns(m, "last_step_time")
    finish = _opt_ts_ns(m, "finish_time")
    return RequestAccounting(
        request_id=m.request_id,
        session_id=m.session_id,
        engine_id=m.engine_id,
        shard=m.shard,
        state=_enum(RequestState, m.state),
        arrival=arrival / NS_PER_S,
        arrival_ns=arrival,
        queue_time=queue / NS_PER_S,
        queue_time_ns=queue,
        engine_time=engine / NS_PER_S,
        engine_time_ns=engine,
        gpu_time=gpu / NS_PER_S,
        gpu_time_ns=gpu,
        interference=interference / NS_PER_S,
        interference_ns=interference,
        wall=wall / NS_PER_S,
        wall_ns=wall,
        other=other / NS_PER_S,
        other_ns=other,
        tokens=TokenCounts(
            prompt=m.tokens.prompt,
            cached=m.tokens.cached,
            prefilled=m.tokens.prefilled,
            decoded=m.tokens.decoded,
        ),
        steps=m.steps,
        excluded_steps=m.excluded_steps,
        preemptions=m.preemptions,
        top_blame=tuple(blame_from_pb(b) for b in m.top_blame),
        partial=m.partial,
        last_step_time=_s(last_step),
        last_step_time_ns=last_step,
        migrated=m.migrated,
        finish_time=_s(finish),
        finish_time_ns=finish,
        finish_reason=m.finish_reason,
        routed_shard=m.routed_shard if m.HasField("routed_shard") else None,
        traceparent=m.traceparent,
    )


def page_from_pb(m: pb.ListRequestsResponse) -> RequestPage:
    return RequestPage(
        requests=tuple(request_from_pb(r) for r in m.requests),
        next_page_token=m.next_page_token,
        total_size=m.total_size,
    )


def batch_from_pb(m: pb.StreamUpdatesResponse) -> UpdateBatch:
    t = _ts_ns(m.time)
    return UpdateBatch(
        updates=tuple(request_from_pb(r) for r in m.updates),
        time=t / NS_PER_S,
        time_ns=t,
        coalesced=m.coalesced,
    )


def storm_from_pb(m: pb.Storm) -> Storm:
    start = _ts_ns(m.start_time)
    stall = _dur_ns(m.stall)
    return Storm(
        request_id=m.request_id,
        shard=m.shard,
        prefill_tokens=m.prefill_tokens,
        prompt_tokens=m.prompt_tokens,
        chunks=m.chunks,
        start_time=start / NS_PER_S,
        start_time_ns=start,
        stall=stall / NS_PER_S,
        stall_ns=stall,
    )


def shard_from_pb(m: pb.ShardStatus) -> ShardStatus:
    last = _opt_ts_ns(m, "last_step_time")
    return ShardStatus(
        engine_id=m.engine_id,
        shard=m.shard,
        coupling=_enum(Coupling, m.coupling),
        decode_tokens_per_second=m.decode_tokens_per_second,
        prefill_tokens_per_second=m.prefill_tokens_per_second,
        busy_fraction=m.busy_fraction,
        active_requests=m.active_requests,
        queued_requests=m.queued_requests,
        current_storm=storm_from_pb(m.current_storm) if m.HasField("current_storm") else None,
        last_step_time=_s(last),
        last_step_time_ns=last,
        steps=m.steps,
        connected=m.connected,
        dropped_frames=m.dropped_frames,
        engine_kind=m.engine_kind,
        device_name=m.device_name,
        timer_source=_enum(TimerSource, m.timer_source),
        unattributed=_dur_ns(m.unattributed) / 1e9,
        unattributed_ns=_dur_ns(m.unattributed),
        imbalance=_dur_ns(m.imbalance) / 1e9,
        imbalance_ns=_dur_ns(m.imbalance),
        slowdown=m.slowdown or 1.0,
        num_shards=m.num_shards or 1,
        shards_seen=m.shards_seen or 1,
        partial_view=m.partial_view,
    )


def advice_from_pb(m: pb.Advice) -> Advice:
    shards = []
    for a in m.shards:
        pf, st = _dur_ns(a.predicted_prefill), _dur_ns(a.predicted_stall)
        shards.append(ShardAdvice(a.shard, a.cached_tokens, pf / 1e9, pf, st / 1e9, st, a.active_requests))
    return Advice(
        m.recommended_shard, m.reason, tuple(shards), m.storm_active, m.calibrated, m.after_request_seen
    )


def advise_request(
    engine_id: str,
    session_id: str,
    prompt_tokens: int,
    after_request_id: str = "",
    max_wait: float | None = None,
) -> pb.AdviseRequest:
    if not engine_id:
        raise ValueError("engine_id is empty: name the engine the turn is for (get_shards() lists them)")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
        raise ValueError(
            f"prompt_tokens must be a positive int (the turn's whole prompt), got {prompt_tokens!r}"
        )
    req = pb.AdviseRequest(
        engine_id=engine_id,
        session_id=session_id,
        prompt_tokens=prompt_tokens,
        after_request_id=after_request_id,
    )
    if max_wait is not None:
        if not after_request_id:
            raise ValueError("max_wait needs after_request_id: it bounds the wait for that request's end")
        req.max_wait.CopyFrom(duration_from_seconds(max_wait, "max_wait"))
    return req


def interference_from_pb(m: pb.InterferenceEvent) -> InterferenceEvent:
    start = _ts_ns(m.start_time)
    end = _opt_ts_ns(m, "end_time")
    victim_ns = _dur_ns(m.victims.duration)
    return InterferenceEvent(
        phase=_enum(InterferencePhase, m.phase),
        engine_id=m.engine_id,
        aggressor_request_id=m.aggressor_request_id,
        aggressor_shard=m.aggressor_shard,
        aggressor_session_id=m.aggressor_session_id,
        prefill_tokens=m.prefill_tokens,
        chunks=m.chunks,
        victims=InterferenceVictims(
            shards=tuple(m.victims.shards),
            request_count=m.victims.request_count,
            seconds=victim_ns / NS_PER_S,
            seconds_ns=victim_ns,
        ),
        start_time=start / NS_PER_S,
        start_time_ns=start,
        end_time=_s(end),
        end_time_ns=end,
        cross_shard=m.cross_shard,
    )


def _enum(cls, number: int):
    """A newer sidecar may send an enum value this client does not know: keep UNSPECIFIED."""
    try:
        return cls(number)
    except ValueError:
        return cls(0)


# --- arguments -> protobuf ------------------------------------------------------------


def filter_to_pb(flt: RequestFilter) -> pb.RequestFilter:
    f = pb.RequestFilter(
        states=[int(s) for s in flt.states],  # type: ignore[misc,union-attr]  # a tuple; the .pyi wants enums
        session_id=flt.session_id,
        engine_id=flt.engine_id,
        request_ids=list(flt.request_ids),
    )
    if flt.shard is not None:
        f.shard = flt.shard
    return f


def request_filter(
    *,
    states: States = (),
    shard: int | None = None,
    session_id: str = "",
    engine_id: str = "",
    request_ids: Iterable[str] = (),
) -> pb.RequestFilter:
    """The protobuf filter for the five filter keywords (see ``RequestFilter``)."""
    return filter_to_pb(RequestFilter(states, shard, session_id, engine_id, request_ids))


def merge_filter(
    flt: RequestFilter | None,
    states: States,
    shard: int | None,
    session_id: str,
    engine_id: str,
    request_ids: Iterable[str],
) -> RequestFilter:
    """The filter a call asked for: ``filter=`` or the keywords, not both."""
    if flt is None:
        return RequestFilter(states, shard, session_id, engine_id, request_ids)
    if not isinstance(flt, RequestFilter):
        raise TypeError(f"filter must be a RequestFilter, got {flt!r}")
    if states or shard is not None or session_id or engine_id or request_ids:
        raise ValueError(
            "pass either filter= or the filter keywords (states=, shard=, session_id=, engine_id=, "
            "request_ids=), not both"
        )
    return flt


def list_requests_request(
    flt: RequestFilter | None = None, *, page_size: int, page_token: str
) -> pb.ListRequestsRequest:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be an int from 1 to 1000, got {page_size!r}")
    return pb.ListRequestsRequest(
        filter=filter_to_pb(flt or RequestFilter()), page_size=page_size, page_token=page_token
    )


def watch_request_request(
    request_id: str, min_interval: float, engine_id: str = ""
) -> pb.WatchRequestRequest:
    return pb.WatchRequestRequest(
        request_id=_request_id(request_id),
        min_interval=duration_from_seconds(min_interval, "min_interval"),
        engine_id=engine_id,
    )


def stream_updates_request(flt: RequestFilter | None = None, *, interval: float) -> pb.StreamUpdatesRequest:
    return pb.StreamUpdatesRequest(
        filter=filter_to_pb(flt or RequestFilter()), interval=duration_from_seconds(interval, "interval")
    )


def stream_interference_request(
    *, engine_id: str, shard: int | None, min_stall: float | None
) -> pb.StreamInterferenceRequest:
    r = pb.StreamInterferenceRequest(engine_id=engine_id)
    if shard is not None:
        r.shard = check_shard(shard)
    if min_stall is not None:
        r.min_stall.CopyFrom(duration_from_seconds(min_stall, "min_stall"))
    return r


def get_request_request(request_id: str, engine_id: str = "") -> pb.GetRequestRequest:
    return pb.GetRequestRequest(request_id=_request_id(request_id), engine_id=engine_id)


def get_request_cost_request(request_id: str, engine_id: str = "") -> pb.GetRequestCostRequest:
    return pb.GetRequestCostRequest(request_id=_request_id(request_id), engine_id=engine_id)


def _request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    return request_id


# --- client settings ------------------------------------------------------------------


def normalize_metadata(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    """gRPC wants a sequence of lowercase (key, value) pairs; accept a dict as well."""
    if metadata is None:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    out = []
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
        out.append((key.lower(), value))
    return tuple(out)


#: The sidecar's API token (its --api-token-file) when ``token=`` is not given.
API_TOKEN_ENV = "ENGINETIME_API_TOKEN"


def with_token(metadata: tuple[tuple[str, str], ...], token: str | None) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus ``authorization: Bearer <token>`` (token= else $ENGINETIME_API_TOKEN)."""
    if token is None:
        token = os.environ.get(API_TOKEN_ENV, "")
    token = token.strip()
    if not token or any(key == "authorization" for key, _ in metadata):
        return metadata
    return (*metadata, ("authorization", f"Bearer {token}"))


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """None (no deadline) or a positive number of seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)
