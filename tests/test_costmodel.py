"""The step-cost model: NNLS solver, online fit, fallbacks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from enginetime.sidecar.ledger.costmodel import (
    MIN_OBSERVATIONS,
    CostModel,
    fit_nnls_ridge,
    nnls_normal,
    step_features,
)

TRUE_BETA = np.array([3e6, 1e4, 2.0, 5e4, 1.0])  # ns, ns/token, ns/(token·ctx), ns/decode, ns/ctx


def brute_force_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact minimiser of ½xᵀAx − bᵀx over x ≥ 0 by trying every support set."""
    n = b.size
    best, best_val = np.zeros(n), 0.0
    for r in range(1, n + 1):
        for support in itertools.combinations(range(n), r):
            idx = list(support)
            x = np.zeros(n)
            x[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            if (x < 0).any():
                continue
            val = 0.5 * x @ a @ x - b @ x
            if val < best_val:
                best, best_val = x, val
    return best


def random_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(rng.integers(1, 64))
    is_pf = rng.random(n) < 0.2
    p = np.where(is_pf, rng.integers(1, 1024, n), 0).astype(np.float64)
    q = np.where(is_pf, 0, 1).astype(np.float64)
    c = rng.integers(0, 20000, n).astype(np.float64)
    return p, q, c


def test_nnls_matches_brute_force_on_random_problems():
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = rng.standard_normal((30, 5))
        y = rng.standard_normal(30) * 3
        a = m.T @ m + 1e-6 * np.eye(5)
        b = m.T @ y
        got = nnls_normal(a, b)
        want = brute_force_nnls(a, b)
        assert (got >= 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_nnls_ridge_recovers_known_costs_across_scales():
    # Features span ten orders of magnitude (1 vs Σ p·c): column scaling must cope.
    rng = np.random.default_rng(1)
    xs = np.array([step_features(*random_batch(rng)) for _ in range(600)])
    beta = fit_nnls_ridge(xs, xs @ TRUE_BETA)
    np.testing.assert_allclose(beta, TRUE_BETA, rtol=0.01)


def test_nnls_ridge_predicts_well_under_noise():
    rng = np.random.default_rng(11)
    xs = np.array([step_features(*random_batch(rng)) for _ in range(600)])
    ys = (xs @ TRUE_BETA) * (1 + 0.02 * rng.standard_normal(len(xs)))
    beta = fit_nnls_ridge(xs, ys)
    held_out = np.array([step_features(*random_batch(rng)) for _ in range(200)])
    np.testing.assert_allclose(held_out @ beta, held_out @ TRUE_BETA, rtol=0.03)


def test_fit_is_not_biased_low_by_timing_noise():
    """Heavy one-sided jitter (CPU contention): predictions must track the mean step time.

    Weighting residuals by the observed duration alone would favour the fast outliers
    and predict every step too short.
    """
    rng = np.random.default_rng(12)
    xs = np.array([step_features(*random_batch(rng)) for _ in range(1500)])
    noise = 1.0 + 0.6 * np.abs(rng.standard_normal(len(xs)))
    beta = fit_nnls_ridge(xs, (xs @ TRUE_BETA) * noise)
    held_out = np.array([step_features(*random_batch(rng)) for _ in range(300)])
    ratio = (held_out @ beta) / (held_out @ TRUE_BETA)
    assert np.mean(ratio) == pytest.approx(float(np.mean(noise)), rel=0.05)


def test_nnls_ridge_never_returns_negative_costs():
    # Decode looks "free" in this data: the unconstrained fit makes it negative.
    rng = np.random.default_rng(2)
    x = np.column_stack(
        [np.ones(100), rng.integers(0, 512, 100), np.zeros(100), rng.integers(0, 64, 100), np.zeros(100)]
    ).astype(np.float64)
    y = 1e6 + 1e4 * x[:, 1] - 3e4 * x[:, 3]
    unconstrained = np.linalg.lstsq(x[:, [0, 1, 3]], y, rcond=None)[0]
    assert unconstrained[2] < 0
    beta = fit_nnls_ridge(x, y)
    assert (beta >= 0).all()
    assert beta[2] == 0.0 and beta[4] == 0.0  # all-zero columns stay zero


def test_step_features_shape():
    p = np.array([512.0, 0.0, 0.0])
    q = np.array([0.0, 1.0, 1.0])
    c = np.array([1000.0, 300.0, 700.0])
    x = step_features(p, q, c)
    np.testing.assert_allclose(x, [1.0, 512.0, 512.0 * (1000.0 + 256.0), 2.0, 1000.0])


def test_model_token_fallback_until_enough_spread_then_fit():
    rng = np.random.default_rng(3)
    model = CostModel(window=256, refit_every=8)
    assert not model.calibrated
    pf, dc, b0 = model.entry_costs(np.array([10.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 5.0]))
    np.testing.assert_allclose(pf + dc, [10.0, 1.0])  # relative token weights while uncalibrated
    assert b0 == 0.0
    # Identical decode-only steps: a rate, but no fit (no spread, no prefill).
    x = step_features(np.zeros(8), np.ones(8), np.full(8, 100.0))
    d = float(TRUE_BETA @ x)
    for _ in range(MIN_OBSERVATIONS + 4):
        model.observe(x, d)
    assert model.calibrated and not model.fitted
    assert model.rate == pytest.approx(d / 8)
    assert model.predict(x) == pytest.approx(d)
    # Varied batches with prefill: the model fits and predicts the true cost.
    for _ in range(200):
        p, q, c = random_batch(rng)
        xx = step_features(p, q, c)
        model.observe(xx, float(TRUE_BETA @ xx))
    assert model.fitted and model.fits >= 1
    for _ in range(20):
        p, q, c = random_batch(rng)
        xx = step_features(p, q, c)
        assert model.predict(xx) == pytest.approx(float(TRUE_BETA @ xx), rel=0.05)
        pf, dc, b0 = model.entry_costs(p, q, c)
        assert (pf >= 0).all() and (dc >= 0).all()
        assert b0 + pf.sum() + dc.sum() == pytest.approx(model.predict(xx), rel=1e-9)


def test_model_keeps_last_fit_when_window_loses_spread():
    rng = np.random.default_rng(4)
    model = CostModel(window=64, refit_every=8)
    for _ in range(64):
        p, q, c = random_batch(rng)
        xx = step_features(p, q, c)
        model.observe(xx, float(TRUE_BETA @ xx))
    # A long decode-only stretch fills the window: prefill coefficients must survive.
    x = step_features(np.zeros(16), np.ones(16), np.full(16, 500.0))
    for _ in range(64):
        model.observe(x, float(TRUE_BETA @ x))
    assert not model.has_spread()
    beta = model.beta.copy()
    np.testing.assert_allclose(beta[1:3], TRUE_BETA[1:3], rtol=0.05)
    for _ in range(100):
        model.observe(x, float(TRUE_BETA @ x))
    np.testing.assert_array_equal(model.beta, beta)
    pf, _, _ = model.entry_costs(np.array([512.0]), np.array([0.0]), np.array([1000.0]))
    assert pf[0] == pytest.approx(512 * TRUE_BETA[1] + 512 * 1256 * TRUE_BETA[2], rel=0.05)


def test_model_window_is_a_ring_and_tracks_a_drift():
    rng = np.random.default_rng(5)
    model = CostModel(window=128, refit_every=16)
    for scale in (1.0, 2.0):
        for _ in range(400):
            p, q, c = random_batch(rng)
            xx = step_features(p, q, c)
            model.observe(xx, scale * float(TRUE_BETA @ xx))
    assert model.observations == 128
    p, q, c = random_batch(rng)
    xx = step_features(p, q, c)
    assert model.predict(xx) == pytest.approx(2.0 * float(TRUE_BETA @ xx), rel=0.05)


def test_model_rejects_tiny_window():
    with pytest.raises(ValueError, match="window"):
        CostModel(window=4)


def test_nnls_matches_brute_force_when_features_are_correlated():
    """Correlated features (as Σp and Σp·c are) make a newly freed variable push another below zero:
    the solver must step back to the boundary and still find the exact constrained minimum."""
    rng = np.random.default_rng(8)
    stepped_back = 0
    for _ in range(200):
        base = rng.standard_normal((30, 2))
        m = base @ rng.standard_normal((2, 5)) + 0.3 * rng.standard_normal((30, 5))
        y = rng.standard_normal(30) * 3
        a = m.T @ m + 1e-6 * np.eye(5)
        b = m.T @ y
        got = nnls_normal(a, b)
        np.testing.assert_allclose(got, brute_force_nnls(a, b), rtol=1e-6, atol=1e-9)
        free = np.flatnonzero(got > 0)
        unconstrained = np.linalg.solve(a, b)
        stepped_back += bool((unconstrained < 0).any() and free.size > 1)
    assert stepped_back > 20  # the problems do exercise the constrained path


def _decode_steps(model: CostModel, sizes: list[int], ctx: float = 100.0) -> None:
    for n in sizes:
        x = step_features(np.zeros(n), np.ones(n), np.full(n, ctx))
        model.observe(x, float(TRUE_BETA @ x))


def test_a_cold_model_learns_the_fixed_cost_from_decode_steps_and_prices_unseen_prefill_like_decode():
    """Before the full fit, decode-only steps of different sizes teach the fixed per-step cost
    (victims' small steps are not predicted too cheap), and a prefill never seen costs what a
    decode token costs, never nothing and not the blended rate."""
    model = CostModel(window=256, refit_every=32)
    _decode_steps(model, [8, 8, 8])  # one size only: nothing to learn a fixed cost from yet
    assert model.cold_beta is None
    _decode_steps(model, [16, 4, 12])
    assert not model.fitted and model.cold_beta is not None
    per_decode = TRUE_BETA[3] + TRUE_BETA[4] * 100.0
    assert model.cold_beta[0] == pytest.approx(TRUE_BETA[0], rel=1e-3)
    assert model.cold_beta[3] == pytest.approx(per_decode, rel=1e-3)
    assert model.prefill_cost(512.0, 0.0) == pytest.approx(512 * per_decode, rel=1e-3)
    # However many decode-only steps of whatever sizes: no full fit without prefill to price.
    _decode_steps(model, [(i % 9) + 1 for i in range(40)])
    assert not model.fitted and model.cold_beta is not None
    # A prefill step seen: its per-token cost is learnt, not borrowed from decode.
    for n, p in ((4, 256), (8, 512), (2, 128)):
        x = step_features(np.r_[np.zeros(n), [p]], np.r_[np.ones(n), [0]], np.r_[np.full(n, 100.0), [0]])
        model.observe(x, float(TRUE_BETA[[0, 1, 3, 4]] @ x[[0, 1, 3, 4]]))
    assert model.prefill_cost(512.0, 0.0) == pytest.approx(512 * TRUE_BETA[1], rel=0.02)


def test_a_cold_model_prices_decode_from_steps_where_decode_is_visible_beside_prefill():
    """Three steps, two of them mixed (a prefill beside enough decodes for them to show): the
    reduced fit already tells a decode entry's cost from a prefill token's."""
    model = CostModel(window=256, refit_every=32)
    truth = TRUE_BETA[[0, 1, 3, 4]]
    for n, p in ((4, 0.0), (4, 100.0), (8, 200.0)):
        x = step_features(np.r_[np.zeros(n), [p]], np.r_[np.ones(n), [0.0]], np.r_[np.full(n, 100.0), [0.0]])
        model.observe(x, float(truth @ x[[0, 1, 3, 4]]))
    assert not model.fitted and model.cold_beta is not None
    pf, dc, b0 = model.entry_costs(np.array([0.0, 64.0]), np.array([1.0, 0.0]), np.array([100.0, 0.0]))
    assert dc[0] == pytest.approx(TRUE_BETA[3] + 100 * TRUE_BETA[4], rel=1e-3)
    assert pf[1] == pytest.approx(64 * TRUE_BETA[1], rel=1e-3)
    assert b0 == pytest.approx(TRUE_BETA[0], rel=1e-3)


def test_the_model_refits_once_per_refit_period():
    """Fitting costs CPU on the ledger's path: once per ``refit_every`` observations, not more."""
    rng = np.random.default_rng(6)
    model = CostModel(window=512, refit_every=32)
    refits = 0
    for _ in range(640):
        xx = step_features(*random_batch(rng))
        refits += model.observe(xx, float(TRUE_BETA @ xx))  # True: this observation refitted
    # The first fit as soon as 16 observations allow one, then every 32.
    assert model.fitted and model.fits == refits == 1 + (640 - 16) // 32


def test_a_few_wild_observations_do_not_move_the_fit():
    """A handful of mis-attributed steps (a small batch paired with another shard's long step)
    are left out of the fit instead of dragging it: predictions stay within 2 %."""
    rng = np.random.default_rng(9)
    xs = np.array([step_features(*random_batch(rng)) for _ in range(400)])
    ys = xs @ TRUE_BETA
    wild = rng.choice(400, 12, replace=False)
    ys[wild] *= 8.0
    model = CostModel(window=512, refit_every=400)
    for x, y in zip(xs, ys, strict=True):
        model.observe(x, float(y))
    assert model.refit()  # on the whole window
    held_out = np.array([step_features(*random_batch(rng)) for _ in range(100)])
    np.testing.assert_allclose([model.predict(x) for x in held_out], held_out @ TRUE_BETA, rtol=0.02)


def test_scalar_prefill_cost_is_the_entry_costs_prefill_part():
    """Advise prices a prefill with ``prefill_cost``: the same figure the ledger's entry costs give."""
    rng = np.random.default_rng(10)
    model = CostModel(window=256, refit_every=16)
    for _ in range(64):
        xx = step_features(*random_batch(rng))
        model.observe(xx, float(TRUE_BETA @ xx))
    assert model.fitted
    for p, c in ((512.0, 0.0), (100.0, 3000.0), (2048.0, 10000.0)):
        pf, _, _ = model.entry_costs(np.array([p]), np.array([0.0]), np.array([c]))
        assert model.prefill_cost(p, c) == pytest.approx(float(pf[0]), rel=1e-12)
        assert model.prefill_cost(p, c) == pytest.approx(
            p * TRUE_BETA[1] + p * (c + p / 2) * TRUE_BETA[2], rel=0.02
        )
    assert model.prefill_cost(0.0, 500.0) == 0.0  # nothing to prefill costs nothing
    # A one-token prefill (a chunk's remainder) is a prefill entry: no decode part.
    pf, dc, _ = model.entry_costs(np.array([1.0]), np.array([1.0]), np.array([4000.0]))
    assert dc[0] == 0.0 and pf[0] == pytest.approx(model.prefill_cost(1.0, 4000.0), rel=1e-12)


def test_the_token_rate_is_over_the_window_once_it_wraps():
    """The fallback rate is Σ duration / Σ tokens of the observations the window holds."""
    model = CostModel(window=16, refit_every=1000)
    sizes = [(n % 7) + 1 for n in range(40)]
    ds = []
    for i, n in enumerate(sizes):
        x = step_features(np.r_[np.zeros(n), [8.0 * (i % 3)]], np.r_[np.ones(n), [0.0]], np.zeros(n + 1))
        d = 1e6 + 5e4 * n + 7e3 * x[1]
        ds.append((d, x[1] + x[3]))
        model.observe(x, d)
        assert model.observations == min(i + 1, 16)
    held = ds[-16:]
    assert model.rate == pytest.approx(sum(d for d, _ in held) / sum(t for _, t in held), rel=1e-12)
    # Before any fit, entries cost the rate per token, prefill or decode.
    first = CostModel(window=16)
    first.observe(step_features(np.array([0.0, 30.0]), np.array([1.0, 0.0]), np.zeros(2)), 3.1e6)
    pf, dc, b0 = first.entry_costs(np.array([40.0, 0.0]), np.array([0.0, 2.0]), np.zeros(2))
    np.testing.assert_allclose(pf + dc, [40 * 1e5, 2 * 1e5])
    assert b0 == 0.0


def test_the_model_fits_once_batch_sizes_differ_in_prefill_alone():
    """Every step decodes eight requests; only the prefill beside them varies: that is spread
    enough to fit (the per-token costs differ by step)."""
    model = CostModel(window=256, refit_every=8)
    for i in range(40):
        p = 64.0 * (i % 5)
        x = step_features(
            np.r_[np.zeros(8), [p]], np.r_[np.ones(8), [0.0]], np.r_[np.full(8, 200.0 + i), [0.0]]
        )
        model.observe(x, float(TRUE_BETA @ x))
        if i == 2:
            assert model.cold_beta is not None  # the reduced fit, from the third step on
    assert model.fitted


def test_all_zero_durations_fit_zero_costs():
    xs = np.array([step_features(*random_batch(np.random.default_rng(i))) for i in range(40)])
    beta = fit_nnls_ridge(xs, np.zeros(40))
    assert np.isfinite(beta).all() and (beta == 0.0).all()
