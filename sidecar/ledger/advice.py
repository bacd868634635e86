"""Advice: where a session's next turn should run, from what the ledger has seen.

A router picks a data-parallel shard without knowing which one holds the session's
prefix; a turn sent elsewhere prefills its whole history again while every lockstep
peer waits. The ledger knows the session's past turns, the engine's cost model and
what runs on each shard now, so it can price each choice. This module does the
arithmetic on plain inputs the ledger gathers (``Ledger.advise``); it holds no state.

Per shard ``k``:

* **cached_tokens**: the prefix the session's newest turn on ``k`` left in the KV
  cache there: its cached + prefilled prompt tokens plus the tokens it decoded
  (a multi-turn prompt repeats the previous turn's prompt and answer). Decay rule:
  the estimate halves every ``half_life_s`` seconds since that turn last ran (its
  finish, or now while it runs), because the ledger cannot see the engine's radix
  cache and older entries are the ones an LRU evicts first; it is zero when the shard
  restarted since (its cache is gone: the turn was ended by the restart), when the
  shard is disconnected, and it never exceeds the new prompt. Turns the sidecar no
  longer holds (past ``--retention``) count as no history.
* **predicted_prefill**: the cost model's prefill cost of the uncached rest
  ``p = prompt − cached`` with context ``c = cached``: ``p·(β1 + β2·(c + p/2))`` (the
  same marginal cost attribution charges a prefill entry), at the model's normal speed.
  Not scaled by the engine's measured slowdown: that factor tracks the pace of recent
  (mostly decode) steps, and on the testbed it made the figure 1.2–2.4× the measured
  prefill where the model alone was 0.82–0.86× of it (the rest is the per-chunk fixed
  cost and the decode entries riding along). It is engine-wide, so the ranking is the same.
* **predicted_stall**: on a LOCKSTEP engine every other shard's step waits for the
  prefill, so each request running on another shard loses about that much:
  ``predicted_prefill × (running requests on the other shards)``, summed over victims
  like a storm's stall. Zero on an INDEPENDENT engine.

The recommendation is the shard with the least ``predicted_prefill`` (ties: fewer
running requests, then the lower shard number). Not ``prefill + stall``: on a LOCKSTEP
engine the requests running on the chosen shard lose the prefill time too (same-shard
interference instead of lockstep wait), so every running request waits for it wherever
it lands, and the total loss is ``predicted_prefill × (running + 1)`` on every shard;
only the prefill differs. ``predicted_stall`` says how much of that the other shards pay.
"""

from __future__ import annotations

from dataclasses import dataclass

from enginetime.sidecar.ledger.costmodel import CostModel

#: Default half-life of a cached-prefix estimate (seconds).
DEFAULT_HALF_LIFE_S = 600.0


@dataclass(frozen=True, slots=True)
class Turn:
    """One past turn of the session on one shard, as the ledger saw it."""

    shard: int
    prefix_tokens: int  # cached + prefilled prompt tokens + decoded tokens
    last_ns: int  # finish time, or now while live
    alive_cache: bool  # the shard's cache can still hold it (no restart, connected)


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """A connected shard of the engine now."""

    shard: int
    running: int
    model: CostModel  # the model pricing its steps (the engine's one when LOCKSTEP)


@dataclass(frozen=True, slots=True)
class ShardAdviceView:
    shard: int
    cached_tokens: int
    predicted_prefill_ns: int
    predicted_stall_ns: int
    active_requests: int


@dataclass(frozen=True, slots=True)
class AdviceView:
    recommended_shard: int
    reason: str
    shards: tuple[ShardAdviceView, ...]
    storm_active: bool
    calibrated: bool


def cached_estimate(turns: list[Turn], shard: int, now_ns: int, half_life_s: float) -> float:
    """The session's estimated cached prefix on ``shard`` (tokens, before capping at the prompt)."""
    newest: Turn | None = None
    for t in turns:
        if t.shard == shard and (newest is None or t.last_ns >= newest.last_ns):
            newest = t
    if newest is None or not newest.alive_cache:
        return 0.0
    age_s = max(0, now_ns - newest.last_ns) / 1e9
    return newest.prefix_tokens * 0.5 ** (age_s / half_life_s) if half_life_s > 0 else 0.0


def prefill_ns(model: CostModel, tokens: int, context: int) -> float:
    """Predicted prefill time (ns) of ``tokens`` new tokens after ``context`` cached ones."""
    return model.prefill_cost(float(tokens), float(context))


def advise(
    *,
    prompt_tokens: int,
    turns: list[Turn],
    loads: list[ShardLoad],
    lockstep: bool,
    storm_active: bool,
    now_ns: int,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
) -> AdviceView:
    """Price each connected shard for a turn of ``prompt_tokens`` and pick the cheapest."""
    if not loads:
        raise ValueError("the engine has no connected shard to advise on")
    total_running = sum(s.running for s in loads)
    out = []
    for load in sorted(loads, key=lambda s: s.shard):
        cached = min(prompt_tokens, int(cached_estimate(turns, load.shard, now_ns, half_life_s)))
        pf = prefill_ns(load.model, prompt_tokens - cached, cached)
        stall = pf * (total_running - load.running) if lockstep else 0.0
        out.append(ShardAdviceView(load.shard, cached, round(pf), round(stall), load.running))
    best = min(out, key=lambda a: (a.predicted_prefill_ns, a.active_requests, a.shard))
    return AdviceView(
        recommended_shard=best.shard,
        reason=_reason(best, out, prompt_tokens),
        shards=tuple(out),
        storm_active=storm_active,
        calibrated=all(s.model.calibrated for s in loads),
    )


def _reason(best: ShardAdviceView, shards: list[ShardAdviceView], prompt_tokens: int) -> str:
    worst = max(shards, key=lambda a: (a.predicted_prefill_ns, a.predicted_stall_ns))
    head = (
        f"shard {best.shard} holds ~{best.cached_tokens} of the {prompt_tokens} prompt tokens"
        if best.cached_tokens
        else f"no shard holds this session's prefix; shard {best.shard} is the least loaded"
    )
    cost = (
        f"predicted prefill {best.predicted_prefill_ns / 1e6:.1f} ms, stalling others "
        f"{best.predicted_stall_ns / 1e6:.1f} ms"
    )
    if worst.shard != best.shard:
        cost += (
            f" (shard {worst.shard}: {worst.predicted_prefill_ns / 1e6:.1f} ms prefill, "
            f"{worst.predicted_stall_ns / 1e6:.1f} ms stall)"
        )
    return f"{head}: {cost}"


__all__ = ["AdviceView", "ShardAdviceView", "ShardLoad", "Turn", "advise", "cached_estimate", "prefill_ns"]
