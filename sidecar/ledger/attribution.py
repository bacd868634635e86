"""The arithmetic of attribution: one step or lockstep group in, per-entry figures out.

Pure numpy over a whole group at once (all shards' entries concatenated, ``seg``
saying which shard each entry belongs to), so an 8 × 256 lockstep group costs a few
dozen vectorised operations, not 2,048 Python iterations. The ledger (``ledger``)
gathers the batch, asks ``predict`` for the model's view of it, picks the critical
shard (``predict`` proposes one; a missing shard named by ``peer_tokens`` may
override it), then ``divide`` splits every shard's measured duration ``d`` into each
entry's engine time, interference and gpu share. See ``ledger``'s docstring for the
definitions; this module is their executable form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from enginetime.sidecar.ingest.records import Step
from enginetime.sidecar.ledger.costmodel import CostModel

#: Shards whose predicted duration is within this fraction of the critical one's count
#: as critical too (w = d): the model cannot tell such loads apart.
CRITICAL_BAND = 0.05


@dataclass(slots=True)
class Batch:
    """The entries of one step (m = 1) or lockstep group (m shards), concatenated."""

    slots: np.ndarray  # int64 request slot per entry
    p_raw: np.ndarray  # uint32 prefill tokens
    q_raw: np.ndarray  # uint32 decode tokens
    c_raw: np.ndarray  # uint32 context tokens
    seg: np.ndarray  # shard position (0..m-1) per entry
    counts: np.ndarray  # entries per shard position
    d: np.ndarray  # float64 measured duration per shard position
    starts: np.ndarray  # int64 step start per shard position
    ends: np.ndarray  # int64 step end per shard position
    offs: np.ndarray = None  # type: ignore[assignment]  # entry range of shard j: offs[j]:offs[j+1]

    def __post_init__(self) -> None:
        self.offs = np.zeros(self.counts.size + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offs[1:])

    @property
    def m(self) -> int:
        return self.counts.size


def step_scalars(steps: list[Step]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, start, end) arrays of a group's steps; negative device times count as 0."""
    m = len(steps)
    d = np.fromiter((max(int(st.device_time_ns), 0) for st in steps), dtype=np.float64, count=m)
    starts = np.fromiter((int(st.start_time_ns) for st in steps), dtype=np.int64, count=m)
    ends = np.fromiter((int(st.end_time_ns) for st in steps), dtype=np.int64, count=m)
    return d, starts, ends


@dataclass(slots=True)
class Prediction:
    """The cost model's view of a batch."""

    p: np.ndarray  # float64 prefill tokens
    q: np.ndarray  # float64 decode tokens
    c: np.ndarray  # float64 context tokens
    pf: np.ndarray  # predicted prefill cost per entry (0 for decode entries)
    unit: np.ndarray  # predicted marginal cost + even share of β0 per entry
    big_p: np.ndarray  # predicted duration per shard position (0 when empty)
    pf_sum: np.ndarray  # predicted prefill cost per shard position
    calibrated: bool  # costs are ns (else relative token weights)
    critical: int  # proposed critical shard position (-1: every step empty)


def predict(batch: Batch, model: CostModel) -> Prediction:
    p = batch.p_raw.astype(np.float64)
    q = batch.q_raw.astype(np.float64)
    c = batch.c_raw.astype(np.float64)
    seg, m = batch.seg, batch.m
    pf, dc, beta0 = model.entry_costs(p, q, c)
    e = pf + dc
    nonempty = batch.counts > 0
    n = np.maximum(batch.counts, 1).astype(np.float64)
    big_p = np.where(nonempty, np.bincount(seg, weights=e, minlength=m) + beta0, 0.0)
    pf_sum = np.bincount(seg, weights=pf, minlength=m)
    calibrated = model.calibrated
    critical = -1
    if nonempty.any():
        # Heaviest predicted step; by tokens while predictions are only relative weights.
        key = big_p if calibrated else np.bincount(seg, weights=p + q, minlength=m)
        critical = int(np.argmax(np.where(nonempty, key, -1.0)))
    return Prediction(p, q, c, pf, e + beta0 / n[seg], big_p, pf_sum, calibrated, critical)


#: A complete lockstep group whose predicted-critical shard ran only decode, yet measured more
#: than this times that shard's prediction (at the engine's pace) while another shard prefilled,
#: is read as an underpriced prefill (``reprice_prefill``), not as a slow engine.
UNDERPRICED = 2.0


def reprice_prefill(batch: Batch, pred: Prediction, pace: float) -> Prediction:
    """The prediction with the group's prefill repriced to what the group measured, when needed.

    The model prices a prefill chunk by extrapolation from the prefills it has seen: after
    a few short prompts at empty context (and noisy timing) it can price a 512-token chunk
    at 12k context below a shard's four decode entries. The decode shard is then picked as
    critical, so (a) the victims' whole wait for the prefill is billed as their own work or,
    once the engine looks slowed, as slowdown blamed on their own shard, and (b) the model
    is fed the decode shard's step, never the prefill's, so it never learns the chunk's
    price and the mistake holds for the whole storm. Decode costs are what the model sees
    most; a prefill far outside what it has seen is the likelier error. So when the
    critical shard ran only decode and the group measured more than ``UNDERPRICED`` times
    its prediction (``pace``: the engine's slowdown factor), every prefill entry of the
    group is scaled by the least factor that makes the heaviest prefilling shard's
    prediction reach the measured step; that shard becomes critical and the model is fed
    its step. Returns ``pred`` itself when nothing changes.
    """
    k = pred.critical
    if not pred.calibrated or k < 0 or batch.m < 2:
        return pred
    top = float(batch.d.max()) / max(pace, 1.0)
    if not top > UNDERPRICED * float(pred.big_p[k]):
        return pred  # the common case: two scalar operations per group
    is_pf = pred.p > 0.0
    tokens = np.bincount(batch.seg, weights=pred.p, minlength=batch.m)
    if tokens[k] > 0.0 or not is_pf.any():
        return pred
    # Each prefill entry's weight: its predicted cost, or its tokens where the model prices
    # the shard's prefill at nothing at all (β1 = β2 = 0 after cheap-looking short prompts).
    priced = pred.pf_sum[batch.seg] > 0.0
    u = np.where(is_pf, np.where(priced, pred.pf, pred.p), 0.0)
    u_sum = np.bincount(batch.seg, weights=u, minlength=batch.m)
    base = pred.big_p - pred.pf_sum
    need = np.divide(top - base, u_sum, out=np.full(batch.m, np.inf), where=u_sum > 0.0)
    scale = float(need.min())
    if not np.isfinite(scale) or scale <= 0.0:
        return pred
    pf = np.where(is_pf, np.maximum(pred.pf, u * scale), pred.pf)
    pf_sum = np.bincount(batch.seg, weights=pf, minlength=batch.m)
    big_p = base + pf_sum
    nonempty = batch.counts > 0
    critical = int(np.argmax(np.where(nonempty, big_p, -1.0)))
    return Prediction(
        pred.p,
        pred.q,
        pred.c,
        pf,
        pred.unit + (pf - pred.pf),
        big_p,
        pf_sum,
        pred.calibrated,
        critical,
    )


@dataclass(slots=True)
class Division:
    """How each shard's ``d`` divides (per shard position) and what each entry gets."""

    w: np.ndarray  # own work per shard position
    wait: np.ndarray  # d − w: waiting for heavier shards (and noise of tied ones)
    scale: np.ndarray  # w / P per shard position (measured over predicted)
    share: np.ndarray  # own-work gpu share per entry (Σ over a shard = w)
    engine: np.ndarray  # engine time per entry
    interference: np.ndarray  # d − engine per entry
    gpu: np.ndarray  # share + charged wait per entry
    by: np.ndarray | None  # by[j, k]: part of shard j's wait caused by shard k (layered); None: uncharged
    pf_weight: np.ndarray  # an entry's fraction of its shard's predicted prefill (0 without prefill)
    noise: np.ndarray  # per shard position: wait no heavier shard explains (tied shards' jitter)
    imbalance: np.ndarray  # per shard position: wait charged to no request (decode imbalance + noise)
    top_set: np.ndarray  # shard positions tied at the top (the critical one and its near-ties)
    wait_total: float
    uncharged: bool  # the wait had nobody to be charged to (critical shard missing/empty)


def layered_shares(levels: np.ndarray) -> np.ndarray:
    """raw[j, k]: the part of the gap from ``levels[j]`` up to the top level caused by shard k.

    The Shapley value of the max: the layer between two consecutive levels is caused
    by every shard at or above it, in equal parts. With levels sorted descending
    s_0 ≥ s_1 ≥ …, layer i (between s_{i+1} and s_i) has i + 1 sharers, so shard k of
    rank t takes Σ_{i=t}^{r-1} (s_i − s_{i+1}) / (i + 1) of a shard of rank r's gap: a
    difference of one prefix sum. Row j sums to ``max(levels) − levels[j]``.
    """
    m = levels.size
    order = np.argsort(-levels, kind="stable")
    s = levels[order]
    unit = (s[:-1] - s[1:]) / np.arange(1, m, dtype=np.float64)
    prefix = np.zeros(m)
    np.cumsum(unit, out=prefix[1:])
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)
    pr = prefix[rank]
    raw = pr[:, None] - pr[None, :]
    return np.where(rank[None, :] < rank[:, None], raw, 0.0)


def divide(
    batch: Batch, pred: Prediction, critical: int, tie_factor: Callable[[int], float] | None = None
) -> Division:
    """Split each shard's measured ``d`` (``critical`` = -1: no critical shard present).

    ``tie_factor(k)``: the expected own work over the measured step of k shards tied
    at the top of a lockstep group (< 1 under step jitter: the step is the slowest
    of k noisy shards); None or 1.0 charges tied shards the whole step.
    """
    seg, m, d = batch.seg, batch.m, batch.d
    nonempty = batch.counts > 0
    n = np.maximum(batch.counts, 1).astype(np.float64)
    big_p = pred.big_p
    top_set = np.zeros(m, dtype=bool)
    if pred.calibrated:
        w = np.where(nonempty, np.minimum(d, big_p), 0.0)
    else:
        w = np.where(nonempty, d, 0.0)
    if critical >= 0:
        # Shards as heavy as the critical one (within the model's resolution) did not wait
        # for it: they are tied at the top. Otherwise equal loads would be split arbitrarily
        # into one that measured d and others that got their prediction and "waited" the rest.
        if pred.calibrated:
            top_set = nonempty & (big_p >= (1.0 - CRITICAL_BAND) * big_p[critical])
        else:
            top_set = nonempty.copy()
        top_set[critical] = True
        w = np.where(top_set, d, w)
        k_top = int(np.count_nonzero(top_set))
        if tie_factor is not None:
            # The step of k tied shards is the slowest of k noisy ones: each one's own work is
            # expected below it. Billing them the whole step would bill victims for jitter.
            w = np.where(top_set, d * tie_factor(k_top), w)
    wait = d - w
    scale = np.divide(w, big_p, out=np.zeros(m), where=big_p > 0.0)
    scale_e = scale[seg]
    share = np.where(big_p[seg] > 0.0, pred.unit * scale_e, (w / n)[seg])
    engine = np.maximum(w[seg] - scale_e * (pred.pf_sum[seg] - pred.pf), 0.0)
    interference = d[seg] - engine
    gpu = share.copy()
    wait_total = float(wait.sum())
    pf_weight = np.divide(pred.pf, pred.pf_sum[seg], out=np.zeros(seg.size), where=pred.pf_sum[seg] > 0.0)
    noise = np.zeros(m)
    imbalance = np.zeros(m)
    by = None
    if critical >= 0 and m == 1:
        by = np.zeros((1, 1))  # one step alone: no peer to wait for
        noise = imbalance = wait.copy()
    elif critical >= 0:
        top = float(d[top_set].max())
        levels = np.where(top_set, top, w)
        gap = top - levels
        raw = layered_shares(levels)
        explained = np.where(top_set, 0.0, np.clip(np.minimum(wait, gap), 0.0, None))
        by = raw * np.divide(explained, gap, out=np.zeros(m), where=gap > 0.0)[:, None]
        noise = wait - by.sum(axis=1)
        has_pf = pred.pf_sum > 0.0
        charged = by.sum(axis=0)
        if wait_total > 0.0:
            gpu += (charged * has_pf)[seg] * pf_weight
            # Waits for shards that ran no prefill (decode imbalance) and jitter: nobody's work.
            imbalance = by @ (~has_pf).astype(np.float64) + noise
    return Division(
        w,
        wait,
        scale,
        share,
        engine,
        interference,
        gpu,
        by,
        pf_weight,
        noise,
        imbalance,
        top_set,
        wait_total,
        critical < 0 and wait_total > 0.0,
    )
