"""What the ledger remembers about a request's *phases*, for span export.

Spans (``sidecar.tracing``) show a request as a few phases — queue, prefill,
decode, preempted — and its storms and first token as events. The ledger never
keeps a per-step history, so it remembers only the boundaries, each in O(1):

* columns updated by steps (``SlotColumns``): ``first_start`` (queue ends),
  ``decode_start`` (the first step that decoded for it since it was last
  admitted: prefill ends) and ``first_token`` (the end of the step before its
  first decoding step, which sampled the first token);
* a short list of *marks* on the ``Request`` appended by events: preemption,
  resumption (with the ``decode_start`` of the run the preemption ended), and the storms
  its prefill caused (the ``InterferenceView`` of their start and end). At most
  ``MAX_MARKS`` are kept; later ones are counted in ``RequestView.preemptions``
  only — a request preempted a hundred times still yields a bounded trace.

``Ledger.finished_record`` packs them with the final figures into a *record* —
nested plain tuples, cheap to build and to pickle (the finished feed sends one
per finished request to the span export process) — and ``record_to_trace``
turns a record into a ``RequestTrace`` of dataclasses: immutable snapshots
that another thread or process may read while the ledger moves on.

Record layout: ``(view, state, blame, first_step_ns, decode_start_ns,
first_token_ns, marks, aggressors)`` where ``view`` holds RequestView's fields
in ``VIEW_FIELDS`` order, ``blame`` BlameView field tuples, ``marks``
``mark_tuple``s and ``aggressors`` AggressorRef field tuples.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

from enginetime.sidecar.ledger.store import Request
from enginetime.sidecar.ledger.views import (
    BlameView,
    InterferencePhase,
    InterferenceView,
    RequestState,
    RequestView,
)

MARK_PREEMPTED = 1
MARK_RESUMED = 2
MARK_STORM_STARTED = 3
MARK_STORM_ENDED = 4
#: Marks kept per request (a preemption and its resumption are two).
MAX_MARKS = 16


@dataclass(frozen=True, slots=True)
class Mark:
    kind: int  # MARK_*
    time_ns: int
    #: MARK_RESUMED: start of the first decoding step of the run the preemption ended (-1: none).
    decode_start_ns: int = -1
    #: MARK_STORM_*: the interference event the storm emitted.
    storm: InterferenceView | None = None


def add_mark(req: Request, mark: Mark) -> None:
    """Remember ``mark`` on ``req`` unless it already holds ``MAX_MARKS``."""
    marks = req.marks
    if marks is None:
        req.marks = [mark]
    elif len(marks) < MAX_MARKS:
        marks.append(mark)


@dataclass(frozen=True, slots=True)
class AggressorRef:
    """A request named in a victim's blame, with what identifies its span.

    ``arrival_time_ns`` and ``traceparent`` are the aggressor's own, so the
    victim's span can link to the aggressor's span (sidecar.tracing derives span
    ids from them) even after the aggressor's accounting was evicted.
    """

    request_id: str
    engine_id: str
    shard: int
    arrival_time_ns: int
    traceparent: str
    seconds_ns: int
    same_shard: bool


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """A terminal request's final accounting plus its phase boundaries."""

    view: RequestView
    first_step_ns: int  # -1: never in a step
    decode_start_ns: int  # the last run's first decoding step start, -1: none
    first_token_ns: int  # 0: never decoded
    marks: tuple[Mark, ...]
    #: Top blame entries whose cause is one request (pseudo-aggressors are left out), largest first.
    aggressors: tuple[AggressorRef, ...]


def _names(cls, *skip: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


#: RequestView's fields as a record's ``view`` tuple holds them (state and top_blame travel apart).
VIEW_FIELDS = _names(RequestView, "state", "top_blame")
R_VIEW, R_STATE, R_BLAME, R_FIRST_STEP, R_DECODE_START, R_FIRST_TOKEN, R_MARKS, R_AGGRESSORS = range(8)
V_REQUEST_ID = VIEW_FIELDS.index("request_id")
V_ENGINE_ID = VIEW_FIELDS.index("engine_id")
V_SHARD = VIEW_FIELDS.index("shard")
V_QUEUE = VIEW_FIELDS.index("queue_time_ns")
V_ENGINE = VIEW_FIELDS.index("engine_time_ns")
V_GPU = VIEW_FIELDS.index("gpu_time_ns")
V_INTERFERENCE = VIEW_FIELDS.index("interference_ns")
V_WALL = VIEW_FIELDS.index("wall_ns")

_STORM_FIELDS = _names(InterferenceView, "phase")
_STORM_GET = operator.attrgetter(*_STORM_FIELDS)
_VIEW_GET = operator.attrgetter(*VIEW_FIELDS)
_BLAME_GET = operator.attrgetter(*_names(BlameView))
_AGG_GET = operator.attrgetter(*_names(AggressorRef))


def mark_tuple(mark: Mark) -> tuple:
    storm = mark.storm
    packed = (int(storm.phase), _STORM_GET(storm)) if storm is not None else None
    return mark.kind, mark.time_ns, mark.decode_start_ns, packed


def _mark(kind: int, time_ns: int, decode_start_ns: int, storm: tuple | None) -> Mark:
    if storm is None:
        return Mark(kind, time_ns, decode_start_ns)
    fields = dict(zip(_STORM_FIELDS, storm[1], strict=True))
    view = InterferenceView(phase=InterferencePhase(storm[0]), **fields)
    return Mark(kind, time_ns, decode_start_ns, view)


def record_to_trace(record: tuple) -> RequestTrace:
    view, state, blame, first, decode, token, marks, aggressors = record
    return RequestTrace(
        view=RequestView(
            **dict(zip(VIEW_FIELDS, view, strict=True)),
            state=RequestState(state),
            top_blame=tuple(BlameView(*b) for b in blame),
        ),
        first_step_ns=first,
        decode_start_ns=decode,
        first_token_ns=token,
        marks=tuple(_mark(*m) for m in marks),
        aggressors=tuple(AggressorRef(*a) for a in aggressors),
    )


def trace_to_record(trace: RequestTrace) -> tuple:
    v = trace.view
    return (
        _VIEW_GET(v),
        int(v.state),
        tuple(map(_BLAME_GET, v.top_blame)),
        trace.first_step_ns,
        trace.decode_start_ns,
        trace.first_token_ns,
        tuple(map(mark_tuple, trace.marks)),
        tuple(map(_AGG_GET, trace.aggressors)),
    )


__all__ = [
    "MARK_PREEMPTED",
    "MARK_RESUMED",
    "MARK_STORM_ENDED",
    "MARK_STORM_STARTED",
    "MAX_MARKS",
    "VIEW_FIELDS",
    "AggressorRef",
    "Mark",
    "RequestTrace",
    "add_mark",
    "mark_tuple",
    "record_to_trace",
    "trace_to_record",
]
