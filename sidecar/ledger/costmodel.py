"""Online step-cost model: predicts how long a batch takes and what each entry adds.

The ledger needs a *counterfactual*: how long a step would have taken without some
of its entries (another request's prefill, a slower lockstep peer). Measurements only
give the whole step's duration, so a model of the step's cost as a function of its
batch splits it. The feature shape is the one LLM serving simulators (Vidur, BLIS)
use for a transformer forward pass::

    d ≈ β0 + β1·Σp + β2·Σ p·(c + p/2) + β3·n_decode + β4·Σ_decode c

with ``p`` an entry's prefill tokens, ``c`` its context (KV length before the step),
``n_decode`` the decoding entries (weighted by their decode tokens, 1 each outside
speculative decoding) and ``Σ_decode c`` their context. β0 is the fixed cost of a
forward (weights read once, kernel launches, collectives); β1 the per-token linear
layers; β2 the prefill attention over the chunk's own and cached keys; β3 a decode
token's linear work; β4 its attention over its KV cache.

Fitting is non-negative ridge least squares on a window of recent observations,
solved on the 5×5 normal equations with column scaling by a small Lawson–Hanson
active-set routine (no SciPy in the sidecar). Non-negativity matters: a fit that
makes prefill *cheaper* than nothing would turn blame upside down. Until the window
holds enough observations with enough spread (some prefill steps, some decode steps,
different sizes) the model falls back to a token-proportional rate (ns per token).

Where a model lives (deviation from DESIGN §6's "per shard"): an INDEPENDENT engine
has one model per shard — each shard is its own device group and its steps measure
only its own work. A LOCKSTEP engine has ONE model for the whole engine: its shards
are identical hardware running the same model, and a shard's step only measures its
own work when that shard was the heaviest (critical) one of its lockstep group — every
other shard's step is mostly waiting. Fitting per shard would leave a decode-only
shard with no clean observations at all (it is never critical during a storm) or,
worse, teach it that decode is slow. So the ledger fits the engine's model only on the
critical shard's step of each *complete* group, and uses it for every shard.
"""

from __future__ import annotations

import numpy as np

N_FEATURES = 5
#: Observations needed before the fitted model replaces the token-proportional rate.
MIN_OBSERVATIONS = 16
#: Observations before the reduced cold fit (fixed cost + per-token costs) replaces the rate.
COLD_MIN_OBSERVATIONS = 2
#: Of those, at least this many must contain prefill and this many decode.
MIN_OF_EACH_KIND = 2


def nnls_normal(a: np.ndarray, b: np.ndarray, tol: float = 1e-12, max_iter: int | None = None) -> np.ndarray:
    """Minimise ½·xᵀAx − bᵀx subject to x ≥ 0 (A symmetric positive definite).

    This is least squares ||Mx − y||² in normal-equation form (A = MᵀM, b = Mᵀy),
    solved with the Lawson–Hanson active-set method: grow the set of free
    (positive) variables one at a time by the most violated KKT condition, solve the
    unconstrained problem on that set, and step back to the feasible boundary when a
    free variable would go negative. For 5 variables this converges in a handful of
    5×5 solves.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = b.shape[0]
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    limit = max_iter if max_iter is not None else 6 * n + 10
    iters = 0
    grad = b - a @ x
    while iters < limit:
        candidates = ~free & (grad > tol)
        if not candidates.any():
            break
        j = int(np.argmax(np.where(candidates, grad, -np.inf)))
        free[j] = True
        while iters < limit:
            iters += 1
            idx = np.flatnonzero(free)
            s = np.zeros(n)
            s[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            if (s[idx] > 0.0).all():
                x = s
                break
            # Step from x towards s until the first free variable reaches zero.
            blocking = idx[s[idx] <= 0.0]
            denom = x[blocking] - s[blocking]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(denom > 0.0, x[blocking] / denom, 0.0)
            alpha = float(np.min(ratios)) if ratios.size else 0.0
            x = x + alpha * (s - x)
            free &= x > tol
            x[~free] = 0.0
        grad = b - a @ x
    return x


def _nnls_ridge_weighted(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, ridge: float
) -> np.ndarray:
    n, k = x.shape
    if weights is not None:
        x = x * weights[:, None]
        y = y * weights
    scale = np.sqrt(np.mean(x * x, axis=0))
    live = scale > 0.0
    scale = np.where(live, scale, 1.0)
    y_scale = float(np.sqrt(np.mean(y * y))) or 1.0
    z = x / scale
    a = (z.T @ z) / n
    b = (z.T @ (y / y_scale)) / n
    a += ridge * np.eye(k)
    # Dead columns: pin to zero (identity row, zero target).
    a[~live, :] = 0.0
    a[:, ~live] = 0.0
    a[~live, ~live] = 1.0
    b[~live] = 0.0
    gamma = nnls_normal(a, b)
    return gamma / scale * y_scale


def fit_nnls_ridge(x: np.ndarray, y: np.ndarray, ridge: float = 1e-6, relative: bool = True) -> np.ndarray:
    """Non-negative ridge regression of y on the columns of x, returning β ≥ 0.

    ``relative`` (default) minimises *relative* errors Σ((xβ − y)/ŷ)²: step timing
    noise grows with the step (a 2 % jitter on a 150 ms prefill chunk is larger than
    a whole 3 ms decode step), and plain least squares would let the big steps
    dictate β and predict small decode steps badly — yet a lockstep victim's
    engine_time *is* its decode step's prediction. The weights are 1/ŷ² with ŷ the
    prediction of a first pass weighted by 1/y² (iteratively reweighted): weighting by
    the *observed* y alone biases the fit low under noise (it favours the fast
    outliers), which would make every non-critical shard's predicted own work smaller
    than the critical shard's measured one. Columns are scaled to unit RMS before
    forming the normal equations so that the ridge term (``ridge`` relative to a unit
    diagonal) weighs every coefficient the same and the 5×5 system is well
    conditioned even though the raw features span ten orders of magnitude (1 vs
    Σ p·c). All-zero columns get β = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, k = x.shape
    if n == 0:
        return np.zeros(k)
    if not relative:
        return _nnls_ridge_weighted(x, y, None, ridge)
    floor = max(float(np.median(np.abs(y))) * 1e-3, 1e-12)
    beta = _nnls_ridge_weighted(x, y, 1.0 / np.maximum(np.abs(y), floor), ridge)
    for _ in range(2):
        pred = x @ beta
        # An observation far above its prediction (a mis-picked critical shard) must not get
        # the huge weight of its small prediction: its weight is capped at 2/y.
        beta = _nnls_ridge_weighted(x, y, 1.0 / np.maximum(np.maximum(pred, 0.5 * np.abs(y)), floor), ridge)
    return beta


#: A step shows decode costs when its prefill tokens are at most this many per decode entry.
DECODE_VISIBLE_RATIO = 64.0


def _decode_visible(x: np.ndarray) -> np.ndarray:
    """Observations (rows of features) in which decode is a visible part of the step.

    In a step with one decode entry beside a 9,000-token prefill the decode is a sliver
    of the duration, and a fit that leans on such steps can price a decode entry 100x
    too high (then a decode-only shard looks heavier than a prefilling one). Decode
    coefficients are trusted only with steps where it is not a sliver.
    """
    return (x[:, 3] > 0) & (x[:, 1] <= DECODE_VISIBLE_RATIO * x[:, 3])


#: A window observation this far off the fit (relative) is an outlier: refit without it.
OUTLIER = 0.5
#: ... as long as outliers are at most this fraction of the window (else the model moved).
MAX_OUTLIERS = 0.1


def _fit_trimmed(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """``fit_nnls_ridge``, refitted once without the few observations it cannot explain.

    A lockstep observation whose critical shard was picked wrongly (a cold model, a
    missing peer) pairs one shard's batch with another's much longer step. Under the
    relative error weighting one such point (a small batch, a huge duration) can
    outweigh hundreds of good ones and wreck β.
    """
    beta = fit_nnls_ridge(x, y, ridge)
    if not np.all(np.isfinite(beta)) or y.size < 8:
        return beta
    err = np.abs(x @ beta - y) / np.maximum(np.abs(y), 1e-12)
    bad = err > OUTLIER
    n_bad = int(np.count_nonzero(bad))
    if 0 < n_bad <= MAX_OUTLIERS * y.size:
        return fit_nnls_ridge(x[~bad], y[~bad], ridge)
    return beta


_warm = False


def warm_up() -> None:
    """Run one tiny fit, once per process: numpy's first linear solve costs ~15 ms (loading
    and initialising LAPACK), which would otherwise land on the first refit, under load."""
    global _warm
    if _warm:
        return
    _warm = True
    x = np.array([[1.0, 1.0, 0.0, 2.0, 1.0], [1.0, 2.0, 1.0, 1.0, 3.0], [1.0, 3.0, 2.0, 4.0, 2.0]] * 3)
    fit_nnls_ridge(x, x @ np.array([1.0, 2.0, 3.0, 4.0, 5.0]))


def step_features(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Feature vector [1, Σp, Σp(c+p/2), n_decode, Σ_decode c] of one batch (float64).

    An entry with prefill tokens is a prefill entry (a decode token it samples rides
    on the same forward); an entry without is a decode entry weighted by its decode
    tokens (1 outside speculative decoding).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    dec = np.where(p > 0.0, 0.0, q)
    return np.array([1.0, p.sum(), (p * (c + 0.5 * p)).sum(), dec.sum(), (dec * c).sum()])


class CostModel:
    """A windowed, periodically refitted step-cost model (one per INDEPENDENT shard or LOCKSTEP engine).

    States, in order: *uncalibrated* (no observation: costs are relative token
    weights, the caller must not compare them with nanoseconds), *token rate*
    (ns per token from the window's Σd / Σtokens), *fitted* (β from NNLS). Once
    fitted, a window that loses its spread (say an hour of pure decode) keeps the
    last good β instead of falling back: old prefill knowledge beats none.
    """

    __slots__ = (
        "window",
        "refit_every",
        "ridge",
        "_x",
        "_y",
        "_n",
        "_pos",
        "_since_fit",
        "_sum_d",
        "_sum_tok",
        "beta",
        "cold_beta",
        "_since_cold",
        "fits",
    )

    def __init__(self, window: int = 2048, refit_every: int = 32, ridge: float = 1e-6) -> None:
        if window < MIN_OBSERVATIONS:
            raise ValueError(
                f"cost-model window {window} is below the {MIN_OBSERVATIONS} observations a fit needs"
            )
        self.window = int(window)
        self.refit_every = max(1, int(refit_every))
        self.ridge = float(ridge)
        self._x = np.zeros((self.window, N_FEATURES))
        self._y = np.zeros(self.window)
        self._n = 0  # observations held (≤ window)
        self._pos = 0  # next ring position
        self._since_fit = 0
        self._sum_d = 0.0  # Σ duration over the window (token-rate fallback)
        self._sum_tok = 0.0  # Σ tokens over the window
        self.beta: np.ndarray | None = None
        self.cold_beta: np.ndarray | None = None  # reduced fit used before β is trusted
        self._since_cold = 0
        self.fits = 0

    # ---- state -------------------------------------------------------------------------
    @property
    def observations(self) -> int:
        return self._n

    @property
    def fitted(self) -> bool:
        return self.beta is not None

    @property
    def rate(self) -> float | None:
        """Token-proportional fallback: ns per token over the window (None before any data)."""
        if self._sum_tok <= 0.0:
            return None
        return self._sum_d / self._sum_tok

    @property
    def calibrated(self) -> bool:
        """True when predictions are in nanoseconds (fitted or token rate known)."""
        return self.beta is not None or self._sum_tok > 0.0

    # ---- learning ----------------------------------------------------------------------
    def observe(self, x: np.ndarray, d_ns: float) -> bool:
        """Add one step (features x, measured duration d_ns); refit when due. Returns True on refit."""
        self.record(x, d_ns)
        return self.fit_if_due()

    def record(self, x: np.ndarray, d_ns: float) -> None:
        """``observe``'s first half: add the step to the window (the ledger runs the second,
        ``fit_if_due``, as a part of its own: a refit is ~1 ms, too long in one go)."""
        i = self._pos
        if self._n == self.window:
            old = self._x[i]
            self._sum_d -= self._y[i]
            self._sum_tok -= old[1] + old[3]
        else:
            self._n += 1
        self._x[i] = x
        self._y[i] = d_ns
        self._sum_d += d_ns
        self._sum_tok += x[1] + x[3]
        self._pos = (i + 1) % self.window
        self._since_fit += 1

    def fit_if_due(self) -> bool:
        """``observe``'s second half: refit when due (True when it did), else the cold fit."""
        due = self._since_fit >= self.refit_every or (self.beta is None and self._n >= MIN_OBSERVATIONS)
        if due and self.refit():
            return True
        if self.beta is None and self._n >= COLD_MIN_OBSERVATIONS:
            # After every observation while the window is small (each fit is cheap then), every
            # refit period after that: a pure-decode engine may never get the full fit.
            self._since_cold += 1
            if self._since_cold >= (1 if self._n < 32 else self.refit_every):
                self._since_cold = 0
                self._cold_fit()
        return False

    def _cold_fit(self) -> None:
        """Fixed per-step cost and per-token costs from whatever the window holds.

        Before the full model has the spread it needs, a token-proportional rate has no
        fixed per-step cost: a victim's small decode step would be predicted far too
        cheap (and the wait above it too large). A reduced fit on [1, Σp, n_decode]
        learns β0 from decode-only steps of different sizes. A prefill never seen is
        priced like a decode token, never free.
        """
        n = self._n
        x = self._x[:n]
        tokens = x[:, 1] + x[:, 3]
        if not tokens.max() > tokens.min():
            return
        cols = [0, 1, 3] if np.count_nonzero(_decode_visible(x)) >= MIN_OF_EACH_KIND else [0, 1]
        b = _fit_trimmed(x[:, cols], self._y[:n], self.ridge)
        if not np.all(np.isfinite(b)):
            return
        beta = np.zeros(N_FEATURES)
        beta[cols] = b
        rate = self.rate or 0.0
        if beta[1] <= 0.0:
            beta[1] = beta[3] if beta[3] > 0.0 else rate
        if beta[3] <= 0.0:
            beta[3] = beta[1] if beta[1] > 0.0 else rate  # no decode-only step yet: a prefill token's cost
        self.cold_beta = beta

    def has_spread(self) -> bool:
        """Enough observations of both kinds, of different sizes, to identify β."""
        n = self._n
        if n < MIN_OBSERVATIONS:
            return False
        x = self._x[:n]
        if (
            np.count_nonzero(x[:, 1] > 0) < MIN_OF_EACH_KIND
            or np.count_nonzero(_decode_visible(x)) < MIN_OF_EACH_KIND
        ):
            return False
        tokens = x[:, 1] + x[:, 3]
        return bool(tokens.max() > tokens.min())

    def refit(self) -> bool:
        """Refit β on the window if it has spread; returns whether β was (re)set."""
        self._since_fit = 0
        if not self.has_spread():
            return False
        n = self._n
        beta = _fit_trimmed(self._x[:n], self._y[:n], self.ridge)
        if not np.all(np.isfinite(beta)):
            return False
        self.beta = beta
        self.fits += 1
        return True

    # ---- prediction --------------------------------------------------------------------
    def entry_costs(
        self, p: np.ndarray, q: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Marginal cost of each entry, split into (prefill part, decode part), and β0.

        Prefill entry: β1·p + β2·p(c+p/2); decode entry: (β3 + β4·c)·q. With the token
        rate: rate·p or rate·q and β0 = 0. Uncalibrated: p or q as relative weights.
        Inputs are float64 arrays of equal length.
        """
        is_pf = p > 0.0
        beta = self.beta if self.beta is not None else self.cold_beta
        if beta is not None:
            pf = np.where(is_pf, p * (beta[1] + beta[2] * (c + 0.5 * p)), 0.0)
            dc = np.where(is_pf, 0.0, q * (beta[3] + beta[4] * c))
            return pf, dc, float(beta[0])
        rate = self.rate
        r = 1.0 if rate is None else rate
        pf = p * r
        dc = np.where(is_pf, 0.0, q * r)
        return pf, dc, 0.0

    def prefill_cost(self, p: float, c: float) -> float:
        """``entry_costs``' prefill part for one entry of ``p`` new tokens after ``c`` cached ones, as a
        float: the same rule without building arrays (Advise prices every shard on each call)."""
        if p <= 0.0:
            return 0.0
        beta = self.beta if self.beta is not None else self.cold_beta
        if beta is not None:
            return p * (float(beta[1]) + float(beta[2]) * (c + 0.5 * p))
        rate = self.rate
        return p * (1.0 if rate is None else rate)

    def predict(self, x: np.ndarray) -> float:
        """Predicted duration (ns) of a batch with features x; NaN while uncalibrated."""
        beta = self.beta if self.beta is not None else self.cold_beta
        if beta is not None:
            return float(beta @ x)
        rate = self.rate
        if rate is None:
            return float("nan")
        return rate * float(x[1] + x[3])


def _max_of_normals(k: int) -> tuple[float, float]:
    """(mean, variance) of the largest of k independent standard normals (numerically)."""
    x = np.linspace(-9.0, 9.0, 6001)
    dx = x[1] - x[0]
    phi = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    cdf = np.cumsum(phi) * dx
    pdf = k * phi * cdf ** (k - 1)
    pdf /= pdf.sum() * dx
    mean = float((x * pdf).sum() * dx)
    return mean, float(((x - mean) ** 2 * pdf).sum() * dx)


#: Residuals beyond this are contention or a model still learning, not jitter: not counted.
MAX_JITTER = 0.2
#: Largest tie size tracked separately (bigger ties share the last bucket).
MAX_TIE = 32
_MAX_MOMENTS = [(0.0, 1.0)] + [_max_of_normals(k) for k in range(1, MAX_TIE + 1)]


class TieNoise:
    """Relative step jitter σ of a lockstep engine, and the bias it gives tied groups.

    When k shards are tied at the top of a lockstep group the step ends with the
    slowest of them, so the measured step exceeds each one's own work by about
    σ·E[max of k standard normals] on average (~1.4σ for 8 shards). Billing the tied
    shards' requests the whole step, or fitting the model on it, would bill them for
    noise. σ is learnt from how the measured step scatters around the prediction: for
    groups with k tied shards the relative residual has variance σ²·Var[max of k], so
    ``var / Var[max of k]`` estimates σ² whatever bias the model has. Exponentially
    forgotten (about the last 200 groups of each tie size).
    """

    __slots__ = ("decay", "_w", "_m1", "_m2", "_sigma", "_fresh")

    MIN_WEIGHT = 16.0

    def __init__(self, decay: float = 0.995) -> None:
        self.decay = decay
        self._w = np.zeros(MAX_TIE + 1)
        self._m1 = np.zeros(MAX_TIE + 1)
        self._m2 = np.zeros(MAX_TIE + 1)
        self._sigma: float | None = None
        self._fresh = True  # _sigma is up to date

    def observe(self, k: int, residual: float) -> None:
        """A group with ``k`` shards tied at the top measured ``residual`` = d / P − 1."""
        if k < 1 or not np.isfinite(residual) or abs(residual) > MAX_JITTER:
            return
        k = min(k, MAX_TIE)
        a = self.decay
        self._w[k] = a * self._w[k] + 1.0
        self._m1[k] = a * self._m1[k] + residual
        self._m2[k] = a * self._m2[k] + residual * residual
        self._fresh = False

    def sigma(self) -> float | None:
        """σ (relative), or None before enough groups were seen."""
        if not self._fresh:
            self._sigma = self._compute_sigma()
            self._fresh = True
        return self._sigma

    def _compute_sigma(self) -> float | None:
        ok = self._w >= self.MIN_WEIGHT
        if not ok.any():
            return None
        w = self._w[ok]
        mean = self._m1[ok] / w
        var = np.maximum(self._m2[ok] / w - mean * mean, 0.0)
        v = np.array([_MAX_MOMENTS[k][1] for k in np.flatnonzero(ok)])
        return float(np.sqrt(np.sum(w * var / v) / w.sum()))

    def factor(self, k: int) -> float:
        """Expected own work of k tied shards over the measured step (1.0 while σ is unknown)."""
        if k < 2:
            return 1.0
        sigma = self.sigma()
        if sigma is None:
            return 1.0
        return 1.0 / (1.0 + sigma * _MAX_MOMENTS[min(k, MAX_TIE)][0])


#: A lockstep engine whose decode steps run this much slower than its model says is slowed.
SLOWDOWN_MIN = 0.08
#: Decode-only groups the slowdown is judged on (their median ratio).
SLOWDOWN_WINDOW = 16


class Slowdown:
    """How much slower a lockstep engine runs than its calibrated model (1.0: normal).

    Step timing cannot say which shard of a lockstep group is slow (every shard's step
    ends with the slowest), but it can say that the group is slower than its reference:
    the median, over the last ``SLOWDOWN_WINDOW`` complete groups whose critical work was
    decode only, of measured step × tie factor over the predicted top. Below
    ``1 + SLOWDOWN_MIN`` it is jitter or model error and reads 1.0. While an engine is
    slowed, the model keeps learning the normal pace (its observations are divided by
    the factor), so the factor stays measurable and the requests are billed their own
    work at normal speed; the rest is interference.
    """

    __slots__ = ("_ratios", "factor")

    def __init__(self) -> None:
        self._ratios: list[float] = []
        self.factor = 1.0

    def observe(self, ratio: float) -> None:
        """One decode-only group: measured (tie-corrected) over predicted, both at normal speed."""
        if not np.isfinite(ratio) or ratio <= 0.0:
            return
        r = self._ratios
        r.append(ratio)
        if len(r) > SLOWDOWN_WINDOW:
            del r[0]
        if len(r) >= SLOWDOWN_WINDOW // 2:
            med = float(np.median(r))
            self.factor = med if med >= 1.0 + SLOWDOWN_MIN else 1.0
