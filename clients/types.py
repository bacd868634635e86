"""Typed records the clients return: plain frozen dataclasses, no protobuf in sight.

A session server should not have to know protobuf's Duration/Timestamp or the
``REQUEST_STATE_`` prefixes to ask "how much engine time has my request used?".
Every duration is given twice: as float seconds (what people compare against a
budget) and as the exact integer nanoseconds the sidecar computed (what a program
summing figures wants, since floats drift). Times are float epoch seconds plus
the same integer nanoseconds; a time that has not happened yet is ``None``.

The enums carry the proto numbers (a test checks them against the generated stubs).
``Coupling`` and ``TimerSource`` are the engine side's own (``engine_hooks.constants``,
stdlib only), re-exported here; ``RequestState`` and ``InterferencePhase`` exist only
in the accounting API. Nothing here imports ``enginetime.sidecar``, so the client
installs and imports with grpcio and protobuf alone.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from enginetime.engine_hooks.constants import Coupling, TimerSource


def _parse_enum(cls, value, what: str, prefix: str):
    """Accept a member, its number, or a name in any case, with or without the proto prefix."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        if name.startswith(prefix):
            name = name[len(prefix) :]
        try:
            return cls[name]
        except KeyError:
            choices = ", ".join(repr(m.name.lower()) for m in cls if m.value)
            raise ValueError(f"unknown {what} {value!r}: use one of {choices}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} number {value}") from None
    raise TypeError(f"{what} must be a {cls.__name__}, a name like 'running', or a number; got {value!r}")


class RequestState(enum.IntEnum):
    """Lifecycle of a request at the engine (numbers of enginetime.v1.RequestState)."""

    UNSPECIFIED = 0
    QUEUED = 1  # arrived, not yet in any step
    RUNNING = 2  # admitted: in steps
    PREEMPTED = 3
    FINISHED = 4
    ABORTED = 5

    @property
    def terminal(self) -> bool:
        """No further change will come: the request finished or was aborted."""
        return self in (RequestState.FINISHED, RequestState.ABORTED)

    @classmethod
    def parse(cls, value: RequestState | str | int) -> RequestState:
        """``RequestState.RUNNING``, ``"running"``, ``"REQUEST_STATE_RUNNING"`` or ``2``."""
        return _parse_enum(cls, value, "request state", "REQUEST_STATE_")


class InterferencePhase(enum.IntEnum):
    """Where a storm is in its life (numbers of enginetime.v1.InterferenceEvent.Phase)."""

    UNSPECIFIED = 0
    STARTED = 1
    ONGOING = 2
    ENDED = 3
    PREDICTED = 4  # a warning at admission: the figures are the cost model's prediction


#: Request states as the filters accept them: members, names or numbers, one or several.
States = Iterable[RequestState | str | int] | RequestState | str


def check_shard(shard: int) -> int:
    """A shard number as the API takes it (a non-negative int); ValueError otherwise."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return shard


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which requests ``list_requests``, ``iter_requests`` and ``stream_updates`` cover.

    Every field given must match; the defaults match any request. ``states`` takes
    members, names (``"running"``, ``"REQUEST_STATE_RUNNING"``) or numbers, one or
    several; ``shard=0`` is a filter, not "any shard"; ``request_ids`` takes one id
    or several. Checked when built (a bad value raises ValueError here, not at the
    call), and stored normalised: ``states`` as a tuple of ``RequestState``,
    ``request_ids`` as a tuple of str. The methods also take these five fields as
    keywords; a ``RequestFilter`` is for passing one filter around and reusing it.
    """

    states: States = ()
    shard: int | None = None
    session_id: str = ""
    engine_id: str = ""
    request_ids: Iterable[str] = ()

    def __post_init__(self) -> None:
        states = self.states
        if isinstance(states, str | RequestState):  # one state given bare
            states = (states,)
        object.__setattr__(self, "states", tuple(RequestState.parse(s) for s in states))
        ids = self.request_ids
        object.__setattr__(self, "request_ids", (ids,) if isinstance(ids, str) else tuple(ids))
        if self.shard is not None:
            check_shard(self.shard)


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt: int = 0
    #: Prefix-cache hits.
    cached: int = 0
    #: Tokens the engine prefilled for this request.
    prefilled: int = 0
    decoded: int = 0


@dataclass(frozen=True, slots=True)
class Blame:
    """Who cost a request time, and how much."""

    #: The aggressor request; "" when the cause is not one request (an idle peer
    #: shard, or a batch of many small entries).
    request_id: str
    engine_id: str
    shard: int
    seconds: float
    seconds_ns: int
    #: The aggressor ran on the victim's own shard.
    same_shard: bool
    #: The aggressor's arrival (None for a shard as cause): with engine_id and request_id
    #: it names one request even when an engine reuses the id.
    arrival_time: float | None = None
    arrival_time_ns: int | None = None

    @property
    def cross_shard(self) -> bool:
        return not self.same_shard


@dataclass(frozen=True, slots=True)
class RequestAccounting:
    """Everything the sidecar knows about one request.

    ``wall = queue_time + engine_time + interference + other``; ``engine_time`` is
    the interference-free service time that timeouts should measure.
    """

    request_id: str
    session_id: str
    engine_id: str
    shard: int
    state: RequestState
    arrival: float
    arrival_ns: int
    queue_time: float
    queue_time_ns: int
    engine_time: float
    engine_time_ns: int
    gpu_time: float
    gpu_time_ns: int
    interference: float
    interference_ns: int
    wall: float
    wall_ns: int
    other: float
    other_ns: int
    tokens: TokenCounts
    steps: int
    excluded_steps: int
    preemptions: int
    #: Largest first.
    top_blame: tuple[Blame, ...]
    #: The sidecar missed records for this request: the figures are lower bounds.
    partial: bool
    #: None while the request has not been in any step.
    last_step_time: float | None
    last_step_time_ns: int | None
    #: A new turn of a session landed on a shard without its prefix, or the
    #: request ran elsewhere than the shard it was pinned to.
    migrated: bool
    #: None until the request is terminal.
    finish_time: float | None
    finish_time_ns: int | None
    finish_reason: str
    #: The shard the request asked for, None when it did not ask.
    routed_shard: int | None
    traceparent: str

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True, slots=True)
class Storm:
    """One request's prefill that is costing other requests time."""

    request_id: str
    shard: int
    prefill_tokens: int
    #: Prefill progress is prefill_tokens out of prompt_tokens.
    prompt_tokens: int
    chunks: int
    start_time: float
    start_time_ns: int
    #: Summed seconds of stall it has caused so far.
    stall: float
    stall_ns: int


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard's throughput and state."""

    engine_id: str
    shard: int
    coupling: Coupling
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    #: Fraction of recent wall time covered by steps with work of the shard's own.
    busy_fraction: float
    active_requests: int
    queued_requests: int
    #: None when no storm is running on this shard.
    current_storm: Storm | None
    #: None when the shard has not stepped yet.
    last_step_time: float | None
    last_step_time_ns: int | None
    steps: int
    #: The shard's recorder is connected to the sidecar now.
    connected: bool
    dropped_frames: int
    engine_kind: str
    device_name: str
    timer_source: TimerSource
    #: Device time no request could be charged with (a missing lockstep peer).
    unattributed: float = 0.0
    unattributed_ns: int = 0
    #: Lockstep wait charged to no request: decode imbalance and tied-shard jitter.
    #: Σ gpu_time + unattributed + imbalance = Σ device time.
    imbalance: float = 0.0
    imbalance_ns: int = 0
    #: The engine's steps against its calibrated model (1.0: normal; 1.3: 30 % slower).
    #: LOCKSTEP: the same for every shard (timing tells the group is slow, not which shard).
    slowdown: float = 1.0
    #: The shards the engine announced (its DP size), and how many of them this sidecar
    #: has seen. ``partial_view``: it sees only some — the rest report to another sidecar
    #: (one sidecar per node) or never joined. Its figures for the shards it sees are
    #: right (a missing lockstep peer is accounted by the peer_tokens the seen shards
    #: report); requests on the unseen shards are on the other sidecar.
    num_shards: int = 1
    shards_seen: int = 1
    partial_view: bool = False


@dataclass(frozen=True, slots=True)
class ShardAdvice:
    """One shard as a place for a session's next turn (``Advice.shards``)."""

    shard: int
    #: The session's estimated cached prefix there (tokens; decays with age).
    cached_tokens: int
    #: Predicted prefill seconds of the uncached rest of the prompt.
    predicted_prefill: float
    predicted_prefill_ns: int
    #: Seconds the other lockstep shards' running requests would lose, summed over them.
    predicted_stall: float
    predicted_stall_ns: int
    active_requests: int


@dataclass(frozen=True, slots=True)
class Advice:
    """Where to send a session's next turn, and why (``advise``)."""

    recommended_shard: int
    reason: str
    shards: tuple[ShardAdvice, ...]
    #: A storm runs on some shard of the engine now.
    storm_active: bool
    #: The sidecar's cost model is calibrated (predictions are real time, not token guesses).
    calibrated: bool
    #: ``after_request_id`` was given and the sidecar had seen that request end before it
    #: advised; False when it had not within ``max_wait`` (the advice may not know that turn).
    after_request_seen: bool = False

    def shard(self, number: int) -> ShardAdvice:
        """The entry of shard ``number`` (KeyError when that shard is not connected)."""
        for a in self.shards:
            if a.shard == number:
                return a
        raise KeyError(number)


@dataclass(frozen=True, slots=True)
class InterferenceVictims:
    shards: tuple[int, ...]
    request_count: int
    #: Summed stall over all victims.
    seconds: float
    seconds_ns: int


@dataclass(frozen=True, slots=True)
class InterferenceEvent:
    """A storm as it starts, grows and ends."""

    phase: InterferencePhase
    engine_id: str
    aggressor_request_id: str
    aggressor_shard: int
    aggressor_session_id: str
    prefill_tokens: int
    chunks: int
    victims: InterferenceVictims
    start_time: float
    start_time_ns: int
    #: None until the phase is ENDED.
    end_time: float | None
    end_time_ns: int | None
    #: Some victims ran on other shards than the aggressor.
    cross_shard: bool


@dataclass(frozen=True, slots=True)
class RequestPage:
    """One page of ListRequests; ``next_page_token`` is "" on the last page."""

    requests: tuple[RequestAccounting, ...]
    next_page_token: str
    total_size: int


@dataclass(frozen=True, slots=True)
class UpdateBatch:
    """Latest accounting of each request that changed since the previous batch."""

    updates: tuple[RequestAccounting, ...]
    time: float
    time_ns: int
    #: Running total for the stream: updates replaced by a newer one of the same request
    #: before delivery, since the stream began. Never decreases; this batch's count is the
    #: difference from the previous batch's (a fast-growing total says the reader is slow).
    coalesced: int
