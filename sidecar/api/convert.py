"""Ledger views -> enginetime.v1 accounting messages (and filters back).

The ledger works in integer nanoseconds; the API carries each figure twice:
as a ``google.protobuf.Duration``/``Timestamp`` for humans and tools, and as the
``*_ns`` integer for programs that want exact sums. Times that are 0 in a view
mean "not yet" and are left unset on the wire, so ``HasField`` tells the truth.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from enginetime.sidecar.ingest.limits import MAX_TEXT_BYTES, clip_text
from enginetime.sidecar.ledger.advice import AdviceView
from enginetime.sidecar.ledger.views import (
    InterferenceView,
    RequestQuery,
    RequestState,
    RequestView,
    ShardView,
    StormView,
)
from enginetime.v1 import accounting_pb2 as pb

NS_PER_S = 1_000_000_000

_STATE_NUMBERS = frozenset(int(s) for s in RequestState if s is not RequestState.UNSPECIFIED)


def duration(ns: int) -> Duration:
    """A Duration of ``ns`` nanoseconds (seconds and nanos carry the same sign)."""
    if ns >= 0:
        return Duration(seconds=ns // NS_PER_S, nanos=ns % NS_PER_S)
    neg = -ns
    return Duration(seconds=-(neg // NS_PER_S), nanos=-(neg % NS_PER_S))


def timestamp(ns: int) -> Timestamp:
    """A Timestamp of ``ns`` nanoseconds since the Unix epoch."""
    return Timestamp(seconds=ns // NS_PER_S, nanos=ns % NS_PER_S)


def duration_ns(d: Duration) -> int:
    return d.seconds * NS_PER_S + d.nanos


def request_to_proto(v: RequestView) -> pb.RequestAccounting:
    """One request's accounting as the API sends it."""
    msg = pb.RequestAccounting(
        request_id=v.request_id,
        session_id=v.session_id,
        engine_id=v.engine_id,
        shard=v.shard,
        state=int(v.state),  # type: ignore[arg-type]  # the .pyi wants the enum class; its numbers work
        arrival_time=timestamp(v.arrival_time_ns),
        queue_time=duration(v.queue_time_ns),
        engine_time=duration(v.engine_time_ns),
        gpu_time=duration(v.gpu_time_ns),
        interference=duration(v.interference_ns),
        wall=duration(v.wall_ns),
        other=duration(v.other_ns),
        tokens=pb.TokenCounts(
            prompt=v.prompt_tokens,
            cached=v.cached_tokens,
            prefilled=v.prefilled_tokens,
            decoded=v.decoded_tokens,
        ),
        steps=v.steps,
        excluded_steps=v.excluded_steps,
        preemptions=v.preemptions,
        partial=v.partial,
        migrated=v.migrated,
        finish_reason=v.finish_reason,
        traceparent=v.traceparent,
        queue_time_ns=v.queue_time_ns,
        engine_time_ns=v.engine_time_ns,
        other_ns=v.other_ns,
        gpu_time_ns=v.gpu_time_ns,
        interference_ns=v.interference_ns,
        wall_ns=v.wall_ns,
    )
    if v.top_blame:
        msg.top_blame.extend(
            pb.Blame(
                request_id=b.request_id,
                engine_id=b.engine_id,
                shard=b.shard,
                duration=duration(b.seconds_ns),
                same_shard=b.same_shard,
                arrival_time=timestamp(b.arrival_ns) if b.arrival_ns >= 0 else None,
            )
            for b in v.top_blame
        )
    if v.last_step_time_ns:
        msg.last_step_time.CopyFrom(timestamp(v.last_step_time_ns))
    if v.finish_time_ns:
        msg.finish_time.CopyFrom(timestamp(v.finish_time_ns))
    if v.routed_shard is not None:
        msg.routed_shard = v.routed_shard
    return msg


def storm_to_proto(s: StormView) -> pb.Storm:
    return pb.Storm(
        request_id=s.request_id,
        shard=s.shard,
        prefill_tokens=s.prefill_tokens,
        prompt_tokens=s.prompt_tokens,
        chunks=s.chunks,
        start_time=timestamp(s.start_time_ns),
        stall=duration(s.stall_ns),
    )


def shard_to_proto(v: ShardView) -> pb.ShardStatus:
    msg = pb.ShardStatus(
        engine_id=v.engine_id,
        shard=v.shard,
        coupling=int(v.coupling),  # type: ignore[arg-type]  # (as state above)
        decode_tokens_per_second=float(v.decode_tokens_per_second),
        prefill_tokens_per_second=float(v.prefill_tokens_per_second),
        busy_fraction=float(v.busy_fraction),
        active_requests=v.active_requests,
        queued_requests=v.queued_requests,
        steps=v.steps,
        connected=v.connected,
        dropped_frames=v.dropped_frames,
        engine_kind=v.engine_kind,
        device_name=v.device_name,
        timer_source=int(v.timer_source),  # type: ignore[arg-type]  # (as state above)
        unattributed=duration(v.unattributed_ns),
        imbalance=duration(v.imbalance_ns),
        slowdown=float(v.slowdown),
        num_shards=v.num_shards,
        shards_seen=v.shards_seen,
        partial_view=v.partial_view,
    )
    if v.current_storm is not None:
        msg.current_storm.CopyFrom(storm_to_proto(v.current_storm))
    if v.last_step_time_ns:
        msg.last_step_time.CopyFrom(timestamp(v.last_step_time_ns))
    return msg


def interference_to_proto(v: InterferenceView) -> pb.InterferenceEvent:
    msg = pb.InterferenceEvent(
        phase=int(v.phase),  # type: ignore[arg-type]  # (as state above)
        engine_id=v.engine_id,
        aggressor_request_id=v.aggressor_request_id,
        aggressor_shard=v.aggressor_shard,
        aggressor_session_id=v.aggressor_session_id,
        prefill_tokens=v.prefill_tokens,
        chunks=v.chunks,
        victims=pb.InterferenceVictims(
            shards=list(v.victim_shards),
            request_count=v.victim_requests,
            duration=duration(v.victim_ns),
        ),
        cross_shard=v.cross_shard,
    )
    if v.start_time_ns:
        msg.start_time.CopyFrom(timestamp(v.start_time_ns))
    if v.end_time_ns:
        msg.end_time.CopyFrom(timestamp(v.end_time_ns))
    return msg


def advice_to_proto(v: AdviceView) -> pb.Advice:
    msg = pb.Advice(
        recommended_shard=v.recommended_shard,
        reason=v.reason,
        storm_active=v.storm_active,
        calibrated=v.calibrated,
    )
    msg.shards.extend(
        pb.ShardAdvice(
            shard=a.shard,
            cached_tokens=a.cached_tokens,
            predicted_prefill=duration(a.predicted_prefill_ns),
            predicted_stall=duration(a.predicted_stall_ns),
            active_requests=a.active_requests,
        )
        for a in v.shards
    )
    return msg


def query_from_proto(f: pb.RequestFilter, max_text_bytes: int = MAX_TEXT_BYTES) -> RequestQuery:
    """A RequestFilter as a ledger query; ValueError (with the fix) on values no request can have.

    Ids, session and engine ids go through the clip rule ingest stored them by, so a filter
    that names a giant id finds the request, and a subscription holds at most
    ``max_text_bytes`` per id however long the ids a peer sends.
    """
    bad = [s for s in f.states if s not in _STATE_NUMBERS]
    if bad:
        raise ValueError(
            f"filter.states contains {bad}, which is not a request state; use "
            + ", ".join(f"{pb.RequestState.Name(n)}={n}" for n in sorted(_STATE_NUMBERS))
            + " or leave states empty for any state"
        )
    return RequestQuery(
        states=frozenset(RequestState(s) for s in f.states),
        shard=f.shard if f.HasField("shard") else None,
        session_id=clip_text(f.session_id, max_text_bytes),
        engine_id=clip_text(f.engine_id, max_text_bytes),
        request_ids=frozenset(clip_text(rid, max_text_bytes) for rid in f.request_ids),
    )
