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

``request_trace`` assembles them with the final view into a ``RequestTrace``:
an immutable snapshot that a thread may read while the ledger moves on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ledger_store import Request
from .views import InterferenceView, RequestView

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


__all__ = [
    "MARK_PREEMPTED",
    "MARK_RESUMED",
    "MARK_STORM_ENDED",
    "MARK_STORM_STARTED",
    "MAX_MARKS",
    "AggressorRef",
    "Mark",
    "RequestTrace",
    "add_mark",
]
