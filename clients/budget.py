"""EngineBudget and EngineBudgetExceeded: what a session server allows a request, and the error it gets.

A wall-clock read timeout measures everything that happened to a request — its own
work, the engine's queue, and every other request's prefill that stalled it. In a
data-parallel engine the last one dominates exactly for the longest trajectories
(DESIGN.md §1), so a wall-clock timeout kills the wrong requests. An ``EngineBudget``
limits what the request itself costs instead:

* ``engine_time`` — the request's interference-free service time (the sidecar's
  ``engine_time``): what it would have taken had no other request's prefill run in
  its steps. The budget that replaces the proxy's read timeout.
* ``liveness`` — a hung engine never spends engine time, so an engine-time budget
  alone would wait forever. Liveness fires when the request is admitted (running or
  preempted) and *its engine shard* has completed no step at all for this long. A
  request that a prefill storm keeps out of its shard's steps is not hung — its shard
  is stepping, just for someone else — so a long storm never trips liveness; it shows
  up as interference, and the wall backstop bounds it.
* ``queue`` — optional: how long the request may wait in the engine's queue before
  its first step (an overloaded engine; off by default, since queueing is usually the
  router's business).
* ``wall`` — the backstop: wall-clock time since the guard started watching. It is the
  only limit enforced while the sidecar is unreachable (fail-open: a telemetry outage
  never kills a request on its own), and it bounds the pathological cases no engine
  figure explains.

``None`` switches a limit off. Every limit is in seconds.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .errors import EnginetimeError
from .types import Blame, RequestAccounting


class BudgetReason(enum.StrEnum):
    """Which limit of an EngineBudget a request crossed."""

    ENGINE_TIME = "engine_time"
    LIVENESS = "liveness"
    QUEUE = "queue"
    WALL = "wall"


def _check_limit(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"EngineBudget.{name} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"EngineBudget.{name} must be a positive, finite number of seconds (None switches it off), "
            f"got {value!r}"
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class EngineBudget:
    """Limits on one request, in seconds; ``None`` switches a limit off.

    ``EngineBudget()`` is the incident's fix: 600 s of engine time instead of a
    600 s read timeout, a 60 s liveness check for a hung engine, and a one-hour
    wall-clock backstop.
    """

    engine_time: float | None = 600.0
    queue: float | None = None
    liveness: float | None = 60.0
    wall: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("engine_time", "queue", "liveness", "wall"):
            object.__setattr__(self, name, _check_limit(name, getattr(self, name)))
        if self.engine_time is None and self.queue is None and self.liveness is None and self.wall is None:
            raise ValueError(
                "an EngineBudget with every limit off guards nothing: set engine_time= (and a wall= backstop)"
            )

    def limit(self, reason: BudgetReason | str) -> float | None:
        """The limit in seconds for one reason (None when it is off)."""
        return getattr(self, BudgetReason(reason).value)


def _blame_text(b: Blame) -> str:
    who = b.request_id or f"(shard {b.shard}'s batch)"
    where = "same shard" if b.same_shard else "cross-shard"
    return f"{who} on shard {b.shard}: {b.seconds:.2f} s ({where})"


class EngineBudgetExceeded(EnginetimeError, TimeoutError):
    """A guarded request crossed a limit of its EngineBudget; the guard cancelled it.

    Carries what a session server needs to log the kill or decide on a retry:
    ``reason`` (which limit), ``limit`` and ``observed`` (seconds), ``accounting``
    (the sidecar's last figures for the request: engine_time, queue_time,
    interference, top_blame...; ``None`` when the sidecar never reported it),
    ``elapsed`` (wall seconds since the guard started watching), ``telemetry``
    (False when the sidecar was unreachable, so only the wall backstop could fire)
    and ``aborted`` (an abort was sent to the engine). A subclass of TimeoutError,
    so existing ``except TimeoutError`` handlers catch it.
    """

    def __init__(
        self,
        request_id: str,
        reason: BudgetReason | str,
        *,
        limit: float,
        observed: float,
        budget: EngineBudget,
        accounting: RequestAccounting | None,
        elapsed: float,
        telemetry: bool = True,
        aborted: bool = False,
    ) -> None:
        self.request_id = request_id
        self.reason = BudgetReason(reason)
        self.limit = limit
        self.observed = observed
        self.budget = budget
        self.accounting = accounting
        self.elapsed = elapsed
        self.telemetry = telemetry
        self.aborted = aborted
        super().__init__(self._message())

    # -- shortcuts to the accounting ------------------------------------------------------------

    @property
    def engine_time(self) -> float | None:
        return None if self.accounting is None else self.accounting.engine_time

    @property
    def queue_time(self) -> float | None:
        return None if self.accounting is None else self.accounting.queue_time

    @property
    def interference(self) -> float | None:
        return None if self.accounting is None else self.accounting.interference

    @property
    def top_blame(self) -> tuple[Blame, ...]:
        return () if self.accounting is None else self.accounting.top_blame

    def _message(self) -> str:
        rid, r = self.request_id, self.reason
        if r is BudgetReason.ENGINE_TIME:
            head = (
                f"request {rid!r} used {self.observed:.2f} s of engine time, over its engine-time budget of "
                f"{self.limit:g} s"
            )
        elif r is BudgetReason.LIVENESS:
            where = ""
            if self.accounting is not None:
                where = f" (engine {self.accounting.engine_id!r}, shard {self.accounting.shard})"
            head = (
                f"request {rid!r} is admitted but its engine shard{where} has completed no step for "
                f"{self.observed:.1f} s (liveness limit {self.limit:g} s): the engine looks hung"
            )
        elif r is BudgetReason.QUEUE:
            head = (
                f"request {rid!r} waited {self.observed:.2f} s in the engine's queue, over its queue budget "
                f"of {self.limit:g} s"
            )
        else:
            head = (
                f"request {rid!r} was in flight for {self.observed:.1f} s, past the wall-clock backstop of "
                f"{self.limit:g} s"
            )
            if not self.telemetry:
                head += " (the sidecar was unreachable, so engine time could not be checked)"
        a = self.accounting
        if a is None:
            tail = "; the sidecar had no accounting for it"
        else:
            tail = (
                f"; engine_time {a.engine_time:.2f} s, queue {a.queue_time:.2f} s, interference "
                f"{a.interference:.2f} s, wall {a.wall:.2f} s, {a.tokens.decoded} tokens decoded"
            )
            if a.top_blame:
                tail += "; top blame: " + _blame_text(a.top_blame[0])
        return head + tail


__all__ = ["BudgetReason", "EngineBudget", "EngineBudgetExceeded"]
