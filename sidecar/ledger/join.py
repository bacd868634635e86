"""Lockstep join: groups a LOCKSTEP engine's shard steps by ``global_step``.

Shards ship their steps independently (one connection each), so the steps of one
lockstep iteration reach the sidecar at different moments. A group is released for
attribution, oldest first, when every *expected* shard (connected and not lagging)
has either delivered its step for that ``global_step`` or already delivered a later
one (steps of one shard arrive in order, so it skipped this one — a dropped frame).
A group whose stragglers do not come within ``wait_ns`` is released with what arrived;
the shards it still lacked become *lagging* and are not waited for again until they
deliver a step that is still joinable, so a dead or wedged shard costs its peers one
bounded wait, not one per step. A step for a group already released is *late*: the
ledger attributes it on its own.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING

from enginetime.sidecar.ingest.records import Step

if TYPE_CHECKING:  # shards.py imports this module
    from enginetime.sidecar.ledger.shards import ShardState


class Group:
    __slots__ = ("gs", "parts", "created_ns")

    def __init__(self, gs: int, created_ns: int) -> None:
        self.gs = gs
        self.parts: dict[int, tuple[ShardState, Step]] = {}  # shard number -> (ShardState, Step)
        self.created_ns = created_ns


class LockstepJoin:
    """Pending groups of one engine. Returns groups in ``global_step`` order."""

    def __init__(self, wait_ns: int, expected: Callable[[], set[int]]) -> None:
        self.wait_ns = int(wait_ns)
        self._expected = expected  # shard numbers worth waiting for (connected)
        self.pending: dict[int, Group] = {}
        self._heap: list[int] = []
        self.last_gs: dict[int, int] = {}
        self.lagging: set[int] = set()
        self.released_upto = -1
        self.timeouts = 0

    def add(self, shard: ShardState, step: Step, now_ns: int) -> tuple[list[tuple[Group, bool]], bool]:
        """Add a step; returns (groups now ready, in order, with a timed-out flag; late?).

        ``late`` means the step cannot join (its group was released, or its shard
        already gave a step for that global_step): attribute it alone.
        """
        gs = int(step.global_step)  # type: ignore[arg-type]
        no = shard.shard
        prev = self.last_gs.get(no, -1)
        if gs > prev:
            self.last_gs[no] = gs
        if gs <= self.released_upto:
            return self.release_ready(), True
        group = self.pending.get(gs)
        if group is None:
            group = Group(gs, now_ns)
            self.pending[gs] = group
            heapq.heappush(self._heap, gs)
        elif no in group.parts:
            return self.release_ready(), True
        group.parts[no] = (shard, step)
        self.lagging.discard(no)
        return self.release_ready(), False

    def expire(self, now_ns: int) -> list[tuple[Group, bool]]:
        """Release groups whose wait ran out (and everything ready behind them)."""
        out: list[tuple[Group, bool]] = []
        while self._heap:
            gs = self._heap[0]
            group = self.pending[gs]
            if self._ready(group):
                out.append((self._pop(), False))
                continue
            if now_ns - group.created_ns < self.wait_ns:
                break
            missing = self._expected() - self.lagging - group.parts.keys()
            self.lagging |= missing
            self.timeouts += 1
            out.append((self._pop(), True))
        return out

    def flush(self) -> list[tuple[Group, bool]]:
        out = []
        while self._heap:
            out.append((self._pop(), False))
        return out

    def reset(self) -> None:
        """The engine restarted: its global_step numbering starts over (flush first)."""
        self.pending.clear()
        self._heap.clear()
        self.last_gs.clear()
        self.lagging.clear()
        self.released_upto = -1

    def release_ready(self) -> list[tuple[Group, bool]]:
        """Release the oldest groups while they are ready (e.g. after a shard disconnected)."""
        out: list[tuple[Group, bool]] = []
        while self._heap and self._ready(self.pending[self._heap[0]]):
            out.append((self._pop(), False))
        return out

    def _ready(self, group: Group) -> bool:
        parts = group.parts
        gs = group.gs
        last = self.last_gs
        for no in self._expected():
            if no in parts or no in self.lagging:
                continue
            if last.get(no, -1) <= gs:
                return False
        return True

    def _pop(self) -> Group:
        gs = heapq.heappop(self._heap)
        group = self.pending.pop(gs)
        if gs > self.released_upto:
            self.released_upto = gs
        return group
