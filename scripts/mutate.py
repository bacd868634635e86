"""Mutation testing (cosmic-ray) over the modules that decide what users see.

Each module is mutated one small change at a time (a ``>=`` made ``>``, a ``+`` made ``-``,
a number off by one, a condition negated, ...) and its fast, relevant tests are run against
each mutant: a mutant the tests do not notice ("survived") is a change in behaviour nobody
would catch. Prints, per module, the mutants run, killed and survived, the score, and each
survivor as a diff.

The working tree is never touched: the tracked and untracked-but-not-ignored files are
copied to a temporary directory and the copy is mutated; ``enginetime`` is imported from
the copy through a shim package of symlinks on PYTHONPATH (ahead of the editable install).

Equivalent mutants (a change that cannot alter behaviour) are marked in the source with
``# pragma: no mutate`` and a reason; cosmic-ray's pragma filter skips them.

Run: ``make mutate`` or ``.venv/bin/python scripts/mutate.py [--module guard_core ...] [--keep DIR]``.
It is CPU-heavy (each mutant is a pytest run: about one to two seconds on a free core, up to
fifteen for attribution's tests on busy cores) and is not part of ``make test``.
``--sample N [--seed S]`` runs a uniform random sample of N mutants per module (the same mutants
for the same seed and an unchanged module) and prints the score with its 95 % binomial (Wilson)
interval; without it every mutant runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    path: str
    tests: tuple[str, ...]


#: The modules that decide what a user sees, each with the tests that pin it (no processes:
#: the fast lane's tests, so a mutant costs a pytest start and a fraction of a second).
TARGETS: dict[str, Target] = {
    "guard_core": Target("clients/_guard_core.py", ("tests/test_guard_core.py",)),
    "frames": Target("sidecar/ingest/frames.py", ("tests/test_sidecar_frames.py",)),
    "attribution": Target("sidecar/ledger/attribution.py", ("tests/test_attribution.py",)),
    # The cost model's own tests, then what users read from it: attribution against truth_sim's
    # known costs (storms, step jitter, a straggler), in-process.
    "costmodel": Target(
        "sidecar/ledger/costmodel.py",
        (
            "tests/test_costmodel.py",
            "tests/test_attribution.py::test_lockstep_storms_engine_time_and_blame_match_the_truth",
            "tests/test_attribution.py::test_independent_storm_engine_time_and_blame_match_the_truth",
            "tests/test_attribution.py::test_step_jitter_on_tied_lockstep_shards_is_billed_to_nobody",
            "tests/test_attribution.py::test_a_straggler_shard_is_slowdown_not_the_victims_engine_time",
        ),
    ),
    "fanout": Target("sidecar/api/fanout.py", ("tests/test_fanout.py",)),
}
DEFAULT = ("guard_core", "frames", "attribution", "costmodel", "fanout")

#: Binary-operator swaps kept (the rest — to ``**``, ``%``, ``^``, ... — are killed by any test
#: that runs the line and only multiply the run time).
_BINARY_KEPT = {
    ("Add", "Sub"),
    ("Sub", "Add"),
    ("Mul", "Div"),
    ("Div", "Mul"),
    ("FloorDiv", "Div"),
    ("Mod", "FloorDiv"),
    ("LShift", "RShift"),
    ("RShift", "LShift"),
    ("BitAnd", "BitOr"),
    ("BitOr", "BitAnd"),
    ("BitXor", "BitOr"),
}
_COMPARISONS = {"Eq", "NotEq", "Lt", "LtE", "Gt", "GtE"}


#: Surviving mutants that cannot change behaviour, as (module, original line fragment, mutated line
#: fragment, why). A survivor matching one is reported as equivalent and left out of the score.
EQUIVALENT: list[tuple[str, str, str, str]] = [
    # clients/_guard_core.py
    (
        "clients/_guard_core.py",
        "_WALL, _LIVENESS, _QUEUE, _UNKNOWN = 0, 1, 2, 3",
        "",
        "heap item kinds are labels compared only with each other; any four distinct values do",
    ),
    ("clients/_guard_core.py", "elif kind == _LIVENESS:", "", "the elif chain already took _WALL (0)"),
    ("clients/_guard_core.py", "elif kind == _QUEUE:", "", "the elif chain already took _WALL and _LIVENESS"),
    (
        "clients/_guard_core.py",
        "elif kind == _UNKNOWN:",
        "",
        "the elif chain already took every smaller kind",
    ),
    ("clients/_guard_core.py", "if kind == _WALL:", "<=", "kinds are >= 0: <= _WALL is == _WALL"),
    (
        "clients/_guard_core.py",
        "if state == _QUEUED:",
        "<=",
        "state 0 was skipped above: <= QUEUED is == QUEUED",
    ),
    (
        "clients/_guard_core.py",
        "if state >= _FINISHED or state == 0:",
        "<= 0",
        "states are protobuf enum numbers >= 0: <= 0 is == 0",
    ),
    (
        "clients/_guard_core.py",
        "progress: int = -1",
        "- 2",
        "progress is a count >= 0: -2 is as unseen as -1",
    ),
    ("clients/_guard_core.py", "progress: int = -1", "~1", "~1 == -2: as unseen as -1"),
    (
        "clients/_guard_core.py",
        "state: int = 0",
        "",
        "read only with e.msg set (a message sets it) or as 'not admitted', true of 0, 1 and -1 alike",
    ),
    (
        "clients/_guard_core.py",
        "received: float = 0.0",
        "",
        "read only with e.msg set, and every message sets it",
    ),
    (
        "clients/_guard_core.py",
        "progress_at: float = 0.0",
        "",
        "every deadline takes max(progress_at, up_since) or sets progress_at first; 0 vs +-1 s "
        "before any update is below any monotonic clock the guard runs on",
    ),
    (
        "clients/_guard_core.py",
        "for e in self.entries.values():",
        "for e in []",
        "redundant: every liveness deadline is max(progress_at, up_since) + limit",
    ),
    (
        "clients/_guard_core.py",
        "max(0.0, b.queue - queued)",
        "",
        "a negative remainder is already overdue: it fires on the next due() either way",
    ),
    (
        "clients/_guard_core.py",
        "deadline = e.received + max(0.0, b.queue - reported)",
        "",
        "a deadline in the past fires now either way",
    ),
    (
        "clients/_guard_core.py",
        "or e.state != _QUEUED or e.msg is None:",
        "e.state > _QUEUED",
        "state 0 never reaches a queue item (it is skipped before arming)",
    ),
    (
        "clients/_guard_core.py",
        "@dataclass(eq=False, slots=True)",
        "eq=True",
        "entries are never compared or hashed: request ids are unique per tracker",
    ),
    ("clients/_guard_core.py", "@dataclass(", "slots=", "slots change memory layout, not behaviour"),
    (
        "clients/_guard_core.py",
        "self.up_since = 0.0",
        "",
        "read only once the stream is up, and on_up() sets it first",
    ),
    (
        "clients/_guard_core.py",
        "self._push(max(e.progress_at, self.up_since) + b.liveness, _LIVENESS, e)",
        "- b.liveness",
        "an early liveness item costs one pop: due() recomputes the deadline from progress and re-arms",
    ),
    (
        "clients/_guard_core.py",
        "self._push(max(e.progress_at + limit, now + min(limit, 1.0)), _LIVENESS, e)",
        "e.progress_at - limit",
        "an early re-check costs one pop: due() recomputes the deadline from progress_at and re-arms",
    ),
    (
        "clients/_guard_core.py",
        "def error(self, now: float, *, aborted: bool)",
        "/",
        "callers pass aborted= by keyword, which both signatures accept",
    ),
    (
        "clients/_guard_core.py",
        "def __init__(self, budget: EngineBudget, *, unknown_after",
        "/",
        "callers pass unknown_after= by keyword, which both signatures accept",
    ),
    # sidecar/ingest/frames.py
    (
        "sidecar/ingest/frames.py",
        "b = buf[pos] if pos < end else 0x80",
        "pos != end",
        "pos never passes end here: != is <",
    ),
    (
        "sidecar/ingest/frames.py",
        "if b < 0x80 and pos < end:",
        "b < 0x80 and",
        "a fast-path guard: when it is off, the general varint path reads the same value",
    ),
    (
        "sidecar/ingest/frames.py",
        "if n < 0x80 and pos < end:",
        "n < 0x80 and",
        "a fast-path guard: when it is off, the general varint path reads the same length",
    ),
    (
        "sidecar/ingest/frames.py",
        "if n < 0x80:",
        "n < 127",
        "0x7f then takes the general prefix path, which reads the same length",
    ),
    ("sidecar/ingest/frames.py", "while pos < size:", "pos != size", "pos never passes size: != is <"),
    (
        "sidecar/ingest/frames.py",
        "self._need = 0",
        "",
        "set before it is read: finish() reads it only with bytes buffered, which feed() set it for",
    ),
    ("sidecar/ingest/frames.py", "self._prefix = 0", "", "set together with _need before it is read"),
    (
        "sidecar/ingest/frames.py",
        "return _PARSERS[variant](buf, spans[0][0], spans[0][1])",
        "-1",
        "there is one span here: [-1] is [0]",
    ),
    ("sidecar/ingest/frames.py", "if len(spans) == 1:", "<= 1", "a known variant has at least one span"),
    (
        "sidecar/ingest/frames.py",
        "if len(parts) == 1 and type(parts[0]) is tuple:",
        "<= 1",
        "a column has at least one part",
    ),
    ("sidecar/ingest/frames.py", "wt == 0", "wt <= 0", "a wire type is tag & 7, never negative"),
    (
        "sidecar/ingest/frames.py",
        "elif number == 2:",
        "number <= 2",
        "the chain took number 1 just before, and a field number is never 0 (rejected)",
    ),
    ("sidecar/ingest/frames.py", "if number == 1:", "number <= 1", "a field number is never 0 (rejected)"),
    (
        "sidecar/ingest/frames.py",
        "if pos < end else 0x80",
        "else 127",
        "at pos == end the fast path's own pos < end guard fails too: the general path reads (and "
        "rejects) the missing byte either way",
    ),
    (
        "sidecar/ingest/frames.py",
        "if pos < end else 0x80",
        "else 129",
        "at pos == end the fast path's own pos < end guard fails too",
    ),
    (
        "sidecar/ingest/frames.py",
        "> quarter",
        "!= quarter",
        "a pre-check before clip_text, which leaves a value within the limit as it is: checking more "
        "values changes nothing",
    ),
    (
        "sidecar/ingest/frames.py",
        "        elif wt == 1:\n            pos += 8\n        elif wt == 2:",
        "wt <= 2",
        "in _skip_group: wire types 0 and 1 were taken just before",
    ),
    (
        "sidecar/ingest/frames.py",
        "if len(parts) == 1 and type(parts[0]) is tuple:",
        "len(parts) == 0",
        "a fast path: with it off, the general loop assembles the one packed span into the same array",
    ),
    # sidecar/ledger/attribution.py
    (
        "sidecar/ledger/attribution.py",
        "return np.where(rank[None, :] < rank[:, None], raw, 0.0)",
        "<=",
        "ranks are a permutation: <= adds only the diagonal, where raw is pr[j] - pr[j] = 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "m <= 1",
        "a step or group has at least one shard",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if wait_total > 0.0:",
        "wait_total >= 0.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if wait_total > 0.0:",
        "wait_total != 0.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if wait_total > 0.0:",
        "wait_total > -1.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "critical < 0 and wait_total > 0.0,",
        "wait_total >= 0.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "critical < 0 and wait_total > 0.0,",
        "wait_total != 0.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "critical < 0 and wait_total > 0.0,",
        "wait_total > -1.0",
        "wait = d - w with w <= d: never negative; at 0 every term the branch adds is 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "n = np.maximum(batch.counts, 1).astype(np.float64)",
        "np.maximum(batch.counts, 0)",
        "n is read only at seg (an entry's shard), never at an empty shard: 0 there only makes numpy "
        "warn about the unused w / n of empty shards",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "critical == 0",
        "with one shard the critical position is 0 or -1",
    ),
    (
        "sidecar/ledger/attribution.py",
        "where=pred.pf_sum[seg] > 0.0)",
        "!= 0.0",
        "predicted costs are never negative (the fit is non-negative, token counts too)",
    ),
    (
        "sidecar/ledger/attribution.py",
        "nonempty = batch.counts > 0",
        "!= 0",
        "entry counts are never negative",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "m < 1",
        "for one step with a critical shard the layered branch computes the same (no peer: by = 0, "
        "noise = imbalance = wait); with none, neither branch runs either way",
    ),
    (
        "sidecar/ledger/attribution.py",
        "by = np.zeros((1, 1))",
        "",
        "a lone step with a critical shard is its own top (w = d): it waits for nobody, and a wait of "
        "0 leaves by unread",
    ),
    (
        "sidecar/ledger/attribution.py",
        "explained = np.where(top_set, 0.0,",
        "np.where(top_set, 1.0,",
        "shards in the top set have gap 0, where the divide's where= drops their explained wait",
    ),
    (
        "sidecar/ledger/attribution.py",
        "explained = np.where(top_set, 0.0,",
        "np.where(top_set, -1.0,",
        "shards in the top set have gap 0, where the divide's where= drops their explained wait",
    ),
    (
        "sidecar/ledger/attribution.py",
        "explained = np.where(top_set, 0.0,",
        "np.where(top_set, - 1.0,",
        "shards in the top set have gap 0, where the divide's where= drops their explained wait",
    ),
    (
        "sidecar/ledger/attribution.py",
        "explained = np.where(top_set, 0.0,",
        "np.where(top_set, +1.0,",
        "shards in the top set have gap 0, where the divide's where= drops their explained wait",
    ),
    (
        "sidecar/ledger/attribution.py",
        "explained = np.where(top_set, 0.0,",
        "np.where(top_set,  1.0,",
        "shards in the top set have gap 0, where the divide's where= drops their explained wait",
    ),
    (
        "sidecar/ledger/attribution.py",
        "where=big_p > 0.0)",
        "!= 0.0",
        "predicted durations are never negative",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "critical >= 1",
        "with one shard the critical position is 0 or -1; 0 then takes the layered branch, which "
        "computes the same for a lone step",
    ),
    (
        "sidecar/ledger/attribution.py",
        "    critical = -1",
        "critical = - 2",
        "'no critical shard' is read only as critical < 0: any negative value does",
    ),
    ("sidecar/ledger/attribution.py", "@dataclass(slots=True)", "slots=False", "memory layout only"),
    # sidecar/ledger/costmodel.py
    (
        "sidecar/ledger/costmodel.py",
        "if len(r) >= SLOWDOWN_WINDOW // 2:",
        "SLOWDOWN_WINDOW / 2",
        "16 // 2 == 16 / 2",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "alpha = float(np.min(ratios)) if ratios.size else 0.0",
        "if ratios.size else 1.0",
        "ratios is never empty here: this branch runs only when some free s is <= 0 (blocking)",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "alpha = float(np.min(ratios)) if ratios.size else 0.0",
        "if ratios.size else -1.0",
        "ratios is never empty here: this branch runs only when some free s is <= 0 (blocking)",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "alpha = float(np.min(ratios)) if ratios.size else 0.0",
        "if ratios.size else - 1.0",
        "ratios is never empty here: this branch runs only when some free s is <= 0 (blocking)",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "cdf = np.cumsum(phi) * dx",
        "/ dx",
        "a constant factor on the cdf only scales the pdf, which is normalised on the next lines",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "dec = np.where(p > 0.0, 0.0, q)",
        "p != 0.0",
        "token counts are never negative",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "while iters < limit:",
        "iters != limit",
        "iters grows by one and only while below limit: it never passes it",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "if beta[1] <= 0.0:",
        "beta[1] == 0.0",
        "the fit is non-negative: <= 0 is == 0",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "if beta[3] <= 0.0:",
        "beta[3] == 0.0",
        "the fit is non-negative: <= 0 is == 0",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "limit = max_iter if max_iter is not None else 6 * n + 10",
        "6 * n + 11",
        "a safety cap: Lawson-Hanson on 5 variables converges in a handful of iterations, far below 40",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "limit = max_iter if max_iter is not None else 6 * n + 10",
        "6 * n + 9",
        "a safety cap: Lawson-Hanson on 5 variables converges in a handful of iterations, far below 40",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "while iters < limit:",
        "iters <= limit",
        "a safety cap: Lawson-Hanson on 5 variables converges in a handful of iterations, far below 40",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "a[~live, ~live] = 1.0",
        "",
        "a dead column's row is pinned with b = 0: any positive diagonal gives x = 0",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "self.refit_every = max(1, int(refit_every))",
        "max( 0,",
        "since_fit and since_cold are incremented before they are compared: >= 0 and >= 1 agree",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "COLD_MIN_OBSERVATIONS = 2",
        "= 1",
        "one observation has no spread: _cold_fit returns before fitting",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "phi = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)",
        "* np.sqrt",
        "a constant factor on phi scales the pdf, which is normalised right after",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "y_scale = float(np.sqrt(np.mean(y * y))) or 1.0",
        "or 0.0",
        "only when y is all zero: y / 0 is NaN, NaN > tol is False, so the solver leaves beta = 0 as "
        "with a scale of 1 (test_all_zero_durations_fit_zero_costs)",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "if k < 2:",
        "k < 1",
        "the largest of one standard normal has mean 0: the factor for k = 1 is 1 either way",
    ),
    (
        "sidecar/ledger/costmodel.py",
        "if not tokens.max() > tokens.min():",
        "!=",
        "max >= min: > and != agree",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "m == 0",
        "a step or group has at least one shard: the layered branch then computes the same for a lone step",
    ),
    (
        "sidecar/ledger/attribution.py",
        "share = np.where(big_p[seg] > 0.0,",
        "big_p[seg] != 0.0",
        "predicted durations are never negative",
    ),
    (
        "sidecar/ledger/attribution.py",
        "np.clip(np.minimum(wait, gap), 0.0, None)",
        "np.clip(np.minimum(wait, gap), -1.0, None)",
        "wait >= 0, so min(wait, gap) < 0 only where gap < 0, and the divide's where= drops those",
    ),
    (
        "sidecar/ledger/attribution.py",
        "where=gap > 0.0)[:, None]",
        "gap != 0.0",
        "where gap < 0 the explained wait is clipped to 0, and 0 / gap is the default 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "    critical = -1",
        "critical = ~1",
        "'no critical shard' is read only as critical < 0: any negative value does",
    ),
    (
        "sidecar/ledger/attribution.py",
        "np.where(nonempty, key, -1.0)",
        "key, - 2.0",
        "predicted durations and token counts are >= 0: any negative key keeps empty shards last",
    ),
    (
        "sidecar/ledger/attribution.py",
        "has_pf = pred.pf_sum > 0.0",
        "!= 0.0",
        "predicted costs are never negative",
    ),
    (
        "sidecar/ledger/attribution.py",
        "max(int(st.device_time_ns), 0)",
        "max(int(st.device_time_ns), -1)",
        "the ingest decoder rejects a negative device time (bad_value) before any step reaches here",
    ),
    (
        "sidecar/ledger/attribution.py",
        "big_p = np.where(nonempty, np.bincount(seg, weights=e, minlength=m) + beta0, 0.0)",
        "beta0, 1.0)",
        "an empty shard's big_p is never read: w, the top set and every entry-level figure mask it out",
    ),
    (
        "sidecar/ledger/attribution.py",
        "engine = np.maximum(w[seg] - scale_e * (pred.pf_sum[seg] - pred.pf), 0.0)",
        "-1.0)",
        "a clamp against rounding only: the other entries' prefill on a shard is at most its predicted "
        "duration, so w - scale * (pf_sum - pf) >= 0",
    ),
    (
        "sidecar/ledger/attribution.py",
        "big_p = np.where(nonempty, np.bincount(seg, weights=e, minlength=m) + beta0, 0.0)",
        "beta0, -1.0)",
        "an empty shard's big_p is never read: w, the top set and every entry-level figure mask it out",
    ),
    (
        "sidecar/ledger/attribution.py",
        "if critical >= 0 and m == 1:",
        "critical > 0",
        "with one shard the critical position is 0 or -1; 0 then takes the layered branch, which "
        "computes the same for a lone step",
    ),
    # sidecar/api/fanout.py
    (
        "sidecar/api/fanout.py",
        "self.due_at = 0.0",
        "self.due_at = ",
        "a time on the monotonic clock, which is far past 1 s on any running host: due now either way",
    ),
    ("sidecar/api/fanout.py", "min_stall_ns: int = 0", "= -1", "a storm's victim time is never negative"),
    (
        "sidecar/api/fanout.py",
        "/ elapsed if elapsed > 0 else",
        "elapsed != 0",
        "perf_counter never goes back: elapsed is never negative",
    ),
    (
        "sidecar/api/fanout.py",
        "if events and self.interference_subscribers:",
        "events or",
        "with no events or no subscribers the loops below do nothing: only the check is saved",
    ),
    (
        "sidecar/api/fanout.py",
        "if v.phase == InterferencePhase.ENDED:",
        ">=",
        "ENDED is the highest phase",
    ),
    (
        "sidecar/api/fanout.py",
        "if v.phase == InterferencePhase.ENDED:",
        "<=",
        "a storm's victim time only grows: once an event passed min_stall_ns every later one of the "
        "storm passes by its own figure, and the key is gone after the storm either way",
    ),
    (
        "sidecar/api/fanout.py",
        "MAX_RESPONSE_BYTES = 32 * 1024",
        "= 33 * 1024",
        "a tuning constant: any size well below HTTP/2's 64 KiB initial window does; the tests check "
        "each body stays below the constant and is filled before splitting",
    ),
    ("sidecar/api/fanout.py", "strict=True", "strict=False", "the zipped sequences have equal lengths"),
    (
        "sidecar/api/fanout.py",
        "break",
        "continue",
        "the log is in cycle order: every older cycle is also <= since and is skipped anyway",
    ),
    (
        "sidecar/api/fanout.py",
        "if entry is not None and entry[0] == cycle:",
        "entry[0] <= cycle",
        "an id's latest entry is never older than a log cycle that holds the id",
    ),
    (
        "sidecar/api/fanout.py",
        "limit = self.limits.max_log_entries or 0",
        "or -1",
        "every logged cycle holds at least one id: > 0 and > -1 agree on a non-empty log",
    ),
    (
        "sidecar/api/fanout.py",
        "^            sub.end(overflow=True)",
        "overflow=False",
        "in take(): _trim() already cut off (overflow=True) every subscriber behind the log; "
        "end() never clears the flag",
    ),
    (
        "sidecar/api/fanout.py",
        "if seconds <= 0 or self.closed",
        "seconds <= -1",
        "asyncio.timeout() of a non-positive delay expires at once: the same immediate return",
    ),
    (
        "sidecar/api/fanout.py",
        "def end(self, *, overflow",
        "/",
        "callers pass overflow= and closed= by keyword, which both signatures accept",
    ),
    (
        "sidecar/api/fanout.py",
        "self.cycles = 0",
        "self.cycles = 1",
        "cycle numbers are only compared with each other and with _trimmed, which starts at 0",
    ),
    (
        "sidecar/api/fanout.py",
        "self.share = 1.0",
        "",
        "read by nobody before the first publish sets it (kept for tests and inspection)",
    ),
]


def _changed_lines(diff: str) -> tuple[str, str]:
    minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return (minus[0] if minus else ""), (plus[0] if plus else "")


def equivalent_reason(module: str, diff: str) -> str | None:
    """Why a surviving mutant cannot change behaviour, or None when it is a real gap in the tests."""
    old, new = _changed_lines(diff)
    # Every module here starts with `from __future__ import annotations`: annotations are strings.
    annotation = (
        "def " in old
        or "->" in old
        or re.match(r"\s*[\w.]+: [^=]*\|", old)  # an annotated name
        or re.match(r"\s*(self, )?\w+: [\w.\[\]]+, \w+: [\w.\[\]]+ \| None, ", old)  # a wrapped signature
    )
    only_bars = len(old) == len(new) and all(
        a == b or (a, b) == ("|", "&") for a, b in zip(old, new, strict=True)
    )
    if annotation and only_bars:
        return "annotations are never evaluated (from __future__ import annotations)"
    for path, fragment, mutated, why in EQUIVALENT:
        # A fragment starting with "^" is the whole original line, indentation included (for a line
        # that occurs more than once with different meanings).
        # With a newline, the fragment is the original lines up to and including the changed one (for
        # a line whose meaning depends on the lines before it).
        if "\n" in fragment:
            lines = diff.splitlines()
            orig = "\n".join(ln[1:] for ln in lines if ln[:1] in (" ", "-") and not ln.startswith("---"))
            hit = fragment in orig and fragment.splitlines()[-1].strip() == old.strip()
        else:
            hit = old == fragment[1:] if fragment.startswith("^") else fragment in old
        if path == module and hit and mutated in new:
            return why
    return None


def excluded_operators(python: str) -> list[str]:
    names = subprocess.run(
        [python, "-m", "cosmic_ray.cli", "operators"], capture_output=True, text=True, check=True
    ).stdout.split()
    out = []
    for name in names:
        op = name.removeprefix("core/")
        if op.startswith("ReplaceBinaryOperator_"):
            _, a, b = op.split("_")
            if (a, b) not in _BINARY_KEPT:
                out.append(f"^{name}$")
        elif op.startswith("ReplaceComparisonOperator_"):
            _, a, b = op.split("_")
            if a not in _COMPARISONS or b not in _COMPARISONS:
                out.append(f"^{name}$")
        elif op in ("VariableInserter", "VariableReplacer", "RemoveDecorator"):
            out.append(f"^{name}$")
    return out


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def make_shim(tree: Path, shim: Path) -> None:
    """``shim/enginetime``: the root package's files plus links to the copy's subpackages."""
    pkg = shim / "enginetime"
    pkg.mkdir(parents=True)
    for f in (tree / "enginetime").iterdir():
        os.symlink(f, pkg / f.name)
    for name, rel in {
        "clients": "clients",
        "sidecar": "sidecar",
        "engine_hooks": "engine_hooks",
        "testbed": "testbed",
        "v1": "proto/enginetime/v1",
    }.items():
        os.symlink(tree / rel, pkg / name)


#: The ``output`` of a mutant left out of a ``--sample`` run (stored as a SKIPPED result).
_OUT_OF_SAMPLE = "outside the sample"


def sample_mutants(session: Path, size: int, seed: int) -> tuple[int, int]:
    """Keep a uniform random sample of ``size`` of the mutants still to run; park the rest.

    The others are stored as SKIPPED (``_OUT_OF_SAMPLE``), so ``exec`` runs only the sample and
    ``--recheck`` keeps it. The draw depends only on ``seed`` and the mutant list (job ids sorted by
    position), so the same seed on an unchanged module draws the same mutants. Returns (sampled, of).
    """
    db = sqlite3.connect(session)
    rows = db.execute(
        "SELECT w.job_id FROM work_items w JOIN mutation_specs m ON m.job_id = w.job_id "
        "WHERE w.job_id NOT IN (SELECT job_id FROM work_results) "
        "ORDER BY m.start_pos_row, m.start_pos_col, m.operator_name, m.occurrence"
    ).fetchall()
    ids = [r[0] for r in rows]
    keep = set(random.Random(seed).sample(ids, min(size, len(ids))))
    db.executemany(
        "INSERT INTO work_results (job_id, worker_outcome, output) VALUES (?, 'SKIPPED', ?)",
        [(i, _OUT_OF_SAMPLE) for i in ids if i not in keep],
    )
    db.commit()
    db.close()
    return len(keep), len(ids)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a binomial proportion k / n (a sample's score as a range)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_target(
    name: str,
    target: Target,
    tree: Path,
    env: dict[str, str],
    python: str,
    sample: int | None = None,
    seed: int = 17,
) -> dict:
    work = tree / ".mutate"
    work.mkdir(exist_ok=True)
    config, session = work / f"{name}.toml", work / f"{name}.sqlite"
    tests = " ".join(target.tests)
    excluded = excluded_operators(python)
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target.path}"\n'
        "timeout = 60.0\n"
        "excluded-modules = []\n"
        f'test-command = "{python} -m pytest -x -q -p no:randomly -p no:cacheprovider {tests}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {json.dumps(excluded)}\n"
    )
    # The unmutated copy must pass, or every mutant would count as killed.
    base = subprocess.run(
        [python, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *target.tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if base.returncode != 0:
        raise SystemExit(f"{' '.join(target.tests)} fail without any mutation:\n{base.stdout[-3000:]}")
    cr = [python, "-m", "cosmic_ray.cli"]
    subprocess.run([*cr, "init", str(config), str(session)], cwd=tree, env=env, check=True)
    for tool in ("cosmic_ray.tools.filters.operators_filter", "cosmic_ray.tools.filters.pragma_no_mutate"):
        extra = [str(config)] if tool.endswith("operators_filter") else []
        subprocess.run([python, "-m", tool, str(session), *extra], cwd=tree, env=env, check=True)
    if sample is not None:
        took, of = sample_mutants(session, sample, seed)
        print(f"{name}: running a random sample of {took} of its {of} mutants (seed {seed})", flush=True)
    t0 = time.monotonic()
    subprocess.run([*cr, "exec", str(config), str(session)], cwd=tree, env=env, check=True)
    elapsed = time.monotonic() - t0
    return summarize(name, target, tree, session, elapsed)


def recheck_target(name: str, target: Target, tree: Path, env: dict[str, str], python: str) -> dict:
    """Forget the results of the survivors not explained as equivalent and run them (only them) again."""
    work = tree / ".mutate"
    config, session = work / f"{name}.toml", work / f"{name}.sqlite"
    db = sqlite3.connect(session)
    # Mutants an interrupted run never reached stay pending for a later full run: parked as
    # skipped (marked) while the survivors run again, then released.
    parked = "not run yet (parked during --recheck)"
    db.execute(
        "INSERT INTO work_results (job_id, worker_outcome, output) SELECT job_id, 'SKIPPED', ? "
        "FROM work_items WHERE job_id NOT IN (SELECT job_id FROM work_results)",
        (parked,),
    )
    # Survivors explained as equivalent stay as they are: only the others can have been killed since.
    real = [
        (job,)
        for job, diff in db.execute("SELECT job_id, diff FROM work_results WHERE test_outcome = 'SURVIVED'")
        if not equivalent_reason(target.path, diff or "")
    ]
    db.executemany("DELETE FROM work_results WHERE job_id = ?", real)
    db.commit()
    t0 = time.monotonic()
    cmd = [python, "-m", "cosmic_ray.cli", "exec", str(config), str(session)]
    try:
        subprocess.run(cmd, cwd=tree, env=env, check=True)
    finally:
        db.execute("DELETE FROM work_results WHERE output = ?", (parked,))
        db.commit()
        db.close()
    return summarize(name, target, tree, session, time.monotonic() - t0)


def summarize(name: str, target: Target, tree: Path, session: Path, elapsed: float) -> dict:
    db = sqlite3.connect(session)
    rows = [
        (str(w).lower(), str(t).lower(), d)
        for w, t, d in db.execute("SELECT worker_outcome, test_outcome, diff FROM work_results")
    ]
    db.close()
    ran = [r for r in rows if r[0] == "normal"]
    killed = [r for r in ran if r[1] == "killed"]
    survived = [r for r in ran if r[1] == "survived"]
    timeouts = [r for r in rows if r[0] == "timeout"]  # an infinite loop: the tests noticed
    skipped = [r for r in rows if r[0] == "skipped"]
    db = sqlite3.connect(session)
    out_of_sample = db.execute(
        "SELECT COUNT(*) FROM work_results WHERE output = ?", (_OUT_OF_SAMPLE,)
    ).fetchone()[0]
    pending = db.execute(
        "SELECT COUNT(*) FROM work_items WHERE job_id NOT IN (SELECT job_id FROM work_results)"
    ).fetchone()[0]
    db.close()
    errors = [r for r in rows if r[0] not in ("normal", "timeout", "skipped")]
    equivalent = [(r[2], why) for r in survived if (why := equivalent_reason(target.path, r[2] or ""))]
    real = [r for r in survived if not equivalent_reason(target.path, r[2] or "")]
    total = len(ran) + len(timeouts) - len(equivalent)
    score = (len(killed) + len(timeouts)) / total if total else 0.0
    low, high = wilson(len(killed) + len(timeouts), total)
    return {
        "module": target.path,
        "tests": list(target.tests),
        "mutants": total,
        "killed": len(killed) + len(timeouts),
        "survived": len(real),
        "equivalent": len(equivalent),
        "skipped": len(skipped) - out_of_sample,
        "out_of_sample": out_of_sample,
        "score_95": [low, high],
        "not_run": pending,
        "errors": len(errors),
        "score": score,
        "seconds": round(elapsed),
        "survivors": [r[2] for r in real],
        "equivalents": equivalent,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--module", action="append", choices=sorted(TARGETS), help=f"default: {', '.join(DEFAULT)}"
    )
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (sessions, configs)")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--show-equivalent", action="store_true", help="also list the equivalent mutants")
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="with --keep DIR of an earlier run: refresh the tests in the copy and re-run only its "
        "survivors not explained as equivalent (the mutated modules must be unchanged since)",
    )
    ap.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="run a uniform random sample of N mutants per module (default: all of them); the score "
        "is then printed with its 95 %% binomial interval",
    )
    ap.add_argument("--seed", type=int, default=17, help="the sample's seed (default 17)")
    args = ap.parse_args()
    python = sys.executable
    names = args.module or list(DEFAULT)
    base = args.keep or Path(tempfile.mkdtemp(prefix="et-mutate-"))
    tree, shim = base / "tree", base / "shim"
    if args.recheck:
        if args.keep is None or not (tree / ".mutate").is_dir():
            raise SystemExit("--recheck needs --keep DIR of an earlier run")
        for name in names:
            path = TARGETS[name].path
            if (ROOT / path).read_bytes() != (tree / path).read_bytes():
                raise SystemExit(f"{path} changed since that run: mutant positions moved; run afresh")
        copy_tree(tree)  # new tests; the modules are byte-identical
        if not shim.is_dir():
            make_shim(tree, shim)
    else:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(shim, ignore_errors=True)
        tree.mkdir(parents=True)
        copy_tree(tree)
        make_shim(tree, shim)
    # PYTHONSAFEPATH: the copy's own enginetime/ (the root package alone) must not shadow the shim
    # from the working directory, or the subpackages would resolve to the editable install.
    env = {**os.environ, "PYTHONPATH": str(shim), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1"}
    results = []
    try:
        for name in names:
            if args.recheck:
                r = recheck_target(name, TARGETS[name], tree, env, python)
            else:
                r = run_target(name, TARGETS[name], tree, env, python, args.sample, args.seed)
            results.append(r)
            print(f"\n== {name}: {r['module']} against {' '.join(r['tests'])}", flush=True)
            print(
                f"   {r['mutants']} mutants, {r['killed']} killed, {r['survived']} survived, "
                f"{r['equivalent']} equivalent (listed with --show-equivalent), "
                f"{r['skipped']} skipped (operator filter), {r['errors']} errors, "
                f"{r['not_run']} not run (an interrupted run); "
                f"score {100 * r['score']:.1f} % in {r['seconds']} s"
            )
            if r["out_of_sample"]:
                low, high = r["score_95"]
                print(
                    f"   a random sample: {r['out_of_sample']} mutants left out; "
                    f"95 % interval of the module's score {100 * low:.1f}–{100 * high:.1f} %"
                )
            for diff in r["survivors"]:
                print("   -- survivor:\n" + "\n".join("      " + ln for ln in diff.splitlines()))
            if args.show_equivalent:
                for diff, why in r["equivalents"]:
                    old, new = _changed_lines(diff)
                    print(f"   -- equivalent ({why}):\n      - {old.strip()}\n      + {new.strip()}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\nmodule                          mutants  killed  survived  score")
    for r in results:
        score = f"{100 * r['score']:5.1f} %"
        print(f"{r['module']:<32}{r['mutants']:>7}{r['killed']:>8}{r['survived']:>10}  {score}")
    total = sum(r["mutants"] for r in results)
    killed = sum(r["killed"] for r in results)
    if total:
        print(f"{'all':<32}{total:>7}{killed:>8}{total - killed:>10}  {100 * killed / total:5.1f} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
