"""Intervals for the report and the probe tools: Wilson, a crossed question x seed bootstrap,
exact McNemar. Built on numpy and scipy; imports nothing of the package but ``errors``.

Every figure is a dict ``{"mean", "low", "high", "n", "n_seeds", "per_seed"}``: the estimate
(the mean over seeds of each seed's figure), a 95% interval that never leaves the figure's
feasible range (levels in [0, 1], counts in [0, n], differences of levels in [-1, 1]), ``n``
the number of questions it rests on in a seed (the mean over seeds, rounded: a stage-0 category
holds other questions in each seed), and the per-seed values. A figure no seed
can compute has ``None`` for mean, low and high.

How the interval is built (``Design`` and ``bootstrap_figure``)
----------------------------------------------------------------
Every seed probes the same questions, so questions are *crossed* with seeds: a question that is
hard in one seed is hard in the others. Each bootstrap draw therefore resamples the question set
once, with replacement, and applies the *same* resampled set to every seed; the statistic of the
draw is the mean over seeds of each seed's statistic on that set. This carries the variance of
questions (and of their interaction with seeds) and keeps every paired comparison paired: two arms,
or an arm and the noise control, are evaluated on the same draw.

The seed term is not a resampling of seeds. With three seeds, resampling seeds gives the variance
of their mean times (S-1)/S = 2/3 with normal tails, so an interval dominated by seed-to-seed
variation would cover about 75% of the time. Instead each draw adds ``t * sd / sqrt(S)``, with
``sd`` the spread of the per-seed statistics and ``t`` a Student-t draw with S-1 degrees of
freedom: exact when seeds dominate, as the classical t interval is. The per-seed spread also
holds part of the question-by-seed noise already carried by the question draws, so the sum is
conservative, never optimistic. The interval is the 2.5-97.5 percentile range of the draws.
Seeds whose question sets differ (no crossing) are resampled each within its own set.

Proportions of right/wrong outcomes get a floor: the interval is widened to hold the Wilson score
interval of the mean proportion on the mean number of questions per seed. Without a seed effect
the variance of a mean over Q questions is at most p(1-p)/Q whatever the questions' spread, so
Wilson on Q is a sound floor; it is what keeps "every seed got 1 of the same 7 questions" from
printing a zero-width interval. A paired difference of right/wrong outcomes that rests on fewer
than ``FEW_DISCORDANT`` questions (where a percentile bootstrap cannot be trusted) is widened to
hold Newcombe's hybrid score interval of the two discordant proportions (``newcombe_floor``):
with no discordant question, [-u, u] with u the Wilson upper bound of 0 out of n.
``tests/test_stats.py`` checks coverage on a grid of question counts, accuracies and seed effects.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as _sps

Z975 = float(_sps.norm.ppf(0.975))
DRAWS = 2000
RNG_SEED = 20241021  # fixed: the same results give the same report, bit for bit
FEW_DISCORDANT = 10  # paired differences resting on fewer distinct questions get the Newcombe floor

Figure = dict[str, Any]


def wilson_interval(k: float, n: float, z: float = Z975) -> tuple[float, float]:
    """95% (by default) Wilson score interval of the proportion k/n, inside [0, 1].

    Closed form: (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n); at k = 0 it is
    [0, z^2/(n+z^2)], at k = n [n/(n+z^2), 1]. ``k`` may be fractional (a mean over seeds).
    Raises ValueError unless n > 0 and 0 <= k <= n.
    """
    if not n > 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b pairs right only under A and c right only under B:
    the binomial test of b successes in b + c trials at 1/2 (1.0 when b + c = 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact needs b, c >= 0, got {b}, {c}")
    if b + c == 0:
        return 1.0
    return float(_sps.binomtest(int(b), int(b + c), 0.5).pvalue)


def excludes_zero(fig: Figure | None) -> bool | None:
    """True iff the figure's interval lies strictly on one side of 0; None without a value."""
    if fig is None or fig.get("mean") is None:
        return None
    return fig["low"] > 0 or fig["high"] < 0


def empty_figure(n: int = 0) -> Figure:
    return {"mean": None, "low": None, "high": None, "n": int(n), "n_seeds": 0, "per_seed": []}


def range_figure(values: Sequence[float]) -> Figure:
    """A per-seed quantity that estimates nothing (steps, seconds): the mean and the range of
    the seeds' values as low/high; ``n`` is the number of seeds."""
    vals = [float(v) for v in values]
    if not vals:
        return empty_figure()
    return {"mean": sum(vals) / len(vals), "low": min(vals), "high": max(vals), "n": len(vals),
            "n_seeds": len(vals), "per_seed": vals}


@dataclasses.dataclass
class Design:
    """The question universe of a set of seeds and the bootstrap draws over it.

    ``ids`` is the sorted union of question ids; ``present[s, q]`` says seed s holds question q.
    ``weights[s]`` (questions x draws) are the multinomial counts of each draw: one matrix shared
    by every seed when all seeds hold the same ids (crossed), else one per seed. Build it with
    ``Design.build``; every figure over the same ids uses the same draws.
    """

    ids: list[str]
    present: np.ndarray
    weights: list[np.ndarray]
    crossed: bool
    draws: int
    seed: int

    @classmethod
    def build(cls, seed_ids: Sequence[Sequence[str]], *, draws: int = DRAWS,
              seed: int = RNG_SEED) -> Design:
        """Draws for seeds holding the given question ids (one list per seed)."""
        sets = [set(map(str, ids)) for ids in seed_ids]
        ids = sorted(set().union(*sets)) if sets else []
        index = {q: i for i, q in enumerate(ids)}
        present = np.zeros((len(sets), len(ids)), dtype=bool)
        for s, ids_s in enumerate(sets):
            present[s, [index[q] for q in ids_s]] = True
        crossed = all(x == sets[0] for x in sets)
        rng = np.random.default_rng(seed)
        if crossed:
            w = _multinomial(rng, draws, np.flatnonzero(present[0]) if sets else [], len(ids))
            weights = [w] * len(sets)
        else:
            weights = [_multinomial(rng, draws, np.flatnonzero(present[s]), len(ids))
                       for s in range(len(sets))]
        return cls(ids, present, weights, crossed, draws, seed)

    def index(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.ids)}

    def t_draws(self, n_seeds: int) -> np.ndarray:
        """Student-t draws (df = n_seeds - 1) for the seed term; zeros with one seed."""
        if n_seeds < 2:
            return np.zeros(self.draws)
        rng = np.random.default_rng([self.seed, n_seeds])
        return rng.standard_t(n_seeds - 1, size=self.draws)

    def weighted_sums(self, arrays: np.ndarray) -> np.ndarray:
        """Per-draw sums over questions: ``arrays`` (..., S, Q) -> (..., S, draws)."""
        if self.crossed:  # one matrix product for every seed
            return np.ascontiguousarray(arrays) @ self.weights[0]
        out = np.empty(arrays.shape[:-1] + (self.draws,))
        for s, w in enumerate(self.weights):
            out[..., s, :] = np.ascontiguousarray(arrays[..., s, :]) @ w
        return out


def _multinomial(rng: np.random.Generator, draws: int, members: Sequence[int], size: int) -> np.ndarray:
    """(size, draws) counts: each draw resamples ``members`` with replacement, others get 0."""
    w = np.zeros((draws, size))
    if len(members):
        w[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=draws)
    return np.ascontiguousarray(w.T)


def bootstrap_figure(design: Design, arrays: np.ndarray,
                     stat: Callable[[np.ndarray], np.ndarray], *, bounds: tuple[float, float],
                     n: int | np.ndarray, floor: np.ndarray | None = None) -> Figure | list:
    """The figure of a per-seed statistic of question sums, with its crossed-bootstrap interval.

    ``arrays`` (..., J, S, Q): J per-question arrays per seed (zeros where a question does not
    count). ``stat`` maps their question sums (..., J, S[, draws]) to the per-seed statistic
    (..., S[, draws]), NaN where it is undefined (an empty subset). ``floor`` (..., 2) widens the
    interval to hold it; ``bounds`` clips it. Leading batch dimensions (used by the coverage
    test) give a nested list of figures; without them, one figure.
    """
    arrays = np.asarray(arrays, dtype=float)
    per_seed = stat(arrays.sum(-1))                     # (..., S)
    boot = stat(design.weighted_sums(arrays))            # (..., S, draws)
    defined = ~np.isnan(per_seed)
    n_def = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: no seed has the figure
        mean = np.nanmean(np.where(defined, per_seed, np.nan), axis=-1) if per_seed.size else per_seed
        # A seed undefined on the full data stays out of every draw.
        draws = np.where(defined[..., None], boot, np.nan)
        question_part = np.nanmean(draws, axis=-2)          # (..., draws)
        sd = np.nanstd(np.where(defined, per_seed, np.nan), axis=-1, ddof=1)
    sd = np.where(n_def >= 2, np.nan_to_num(sd), 0.0)
    low = np.full(mean.shape, np.nan)
    high = np.full(mean.shape, np.nan)
    for k in np.unique(n_def):
        if k == 0:
            continue
        sel = n_def == k
        total = question_part[sel] + design.t_draws(int(k)) * (sd[sel] / math.sqrt(k))[..., None]
        # A resample can leave a seed's subset empty: that draw has no value for it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanquantile(total, [0.025, 0.975], axis=-1)
        low[sel], high[sel] = lo, hi
    if floor is not None:
        floor = np.asarray(floor, dtype=float)
        low = np.fmin(low, floor[..., 0])
        high = np.fmax(high, floor[..., 1])
    low = np.clip(np.fmin(low, mean), *bounds)
    high = np.clip(np.fmax(high, mean), *bounds)
    n = np.broadcast_to(np.asarray(n), mean.shape)
    return _figures(mean, low, high, n, n_def, per_seed)


def _figures(mean, low, high, n, n_def, per_seed):
    if mean.ndim:
        return [_figures(*(x[i] for x in (mean, low, high, n, n_def, per_seed)))
                for i in range(mean.shape[0])]
    if n_def == 0:
        return empty_figure(int(n))
    return {"mean": float(mean), "low": float(low), "high": float(high), "n": int(n),
            "n_seeds": int(n_def), "per_seed": [None if np.isnan(v) else float(v) for v in per_seed]}


# ----------------------------------------------------------------------------- figure kinds


def _mask_stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n: questions per seed rounded, and unrounded), the mean over seeds that have any."""
    per_seed = (mask > 0).sum(-1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n_bar = np.nanmean(np.where(per_seed > 0, per_seed, np.nan), axis=-1)
    n_bar = np.nan_to_num(n_bar)
    return np.rint(n_bar).astype(int), n_bar


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.isin(x, (0.0, 1.0)).all())


def _wilson_floor(p: np.ndarray, n_bar: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    out = np.full(np.shape(p) + (2,), np.nan)
    for idx in np.ndindex(np.shape(p)):
        if n_bar[idx] > 0 and not np.isnan(p[idx]):
            k = min(max(float(p[idx]), 0.0), 1.0) * n_bar[idx]
            out[idx] = np.asarray(wilson_interval(k, float(n_bar[idx]))) * np.broadcast_to(scale, np.shape(p))[idx]
    return out


def level(design: Design, x: np.ndarray, mask: np.ndarray) -> Figure | list:
    """Mean of ``x`` over the questions in ``mask`` (both (..., S, Q)), per seed, then over
    seeds; interval in [0, 1], with the Wilson floor when ``x`` is right/wrong."""
    x, mask = np.asarray(x, float), np.asarray(mask, float)
    arrays = np.stack([x * mask, mask], axis=-3)
    n, n_bar = _mask_stats(mask)

    stat = _ratio_stat(arrays.ndim)
    floor = None
    if _is_binary(x[mask > 0]):
        mean = _plain_mean(x, mask)
        floor = _wilson_floor(mean, n_bar)
    return bootstrap_figure(design, arrays, stat, bounds=(0.0, 1.0), n=n, floor=floor)


def count(design: Design, x: np.ndarray, mask: np.ndarray) -> Figure | list:
    """Number of questions in ``mask`` with ``x`` = 1 (both (..., S, Q)), per seed, then the
    mean over seeds; interval in [0, questions per seed], Wilson floor scaled to the count."""
    x, mask = np.asarray(x, float), np.asarray(mask, float)
    arrays = (x * mask)[..., None, :, :]
    n, n_bar = _mask_stats(mask)
    upper = float(np.max(mask.sum(-1), initial=0.0))

    p = _plain_mean(x, mask)
    floor = _wilson_floor(p, n_bar, n_bar) if _is_binary(x[mask > 0]) else None
    return bootstrap_figure(design, arrays, _select_stat(arrays.ndim, 0), bounds=(0.0, upper),
                            n=n, floor=floor)


def paired_difference(design: Design, xa: np.ndarray, xb: np.ndarray, mask: np.ndarray, *,
                      counts: bool = False) -> Figure | list:
    """Per seed, mean (or with ``counts`` the sum) of ``xa - xb`` over the questions in ``mask``,
    then over seeds: both sides on the same resampled questions. Interval in [-1, 1] (counts:
    [-n, n] with n questions per seed). Right/wrong outcomes differing on few questions get the
    Newcombe floor (``newcombe_floor``): a difference resting on one question never reads as certain.
    """
    xa, xb, mask = (np.asarray(a, float) for a in (xa, xb, mask))
    d = (xa - xb) * mask
    n, n_bar = _mask_stats(mask)
    if counts:
        arrays = d[..., None, :, :]
        stat = _select_stat(arrays.ndim, 0)
        upper = float(np.max(mask.sum(-1), initial=0.0))
    else:
        arrays = np.stack([d, mask], axis=-3)
        stat = _ratio_stat(arrays.ndim)
        upper = 1.0
    floor = None
    if _is_binary(xa[mask > 0]) and _is_binary(xb[mask > 0]):
        floor = _discordant_floor(d, mask, n_bar) * (n_bar[..., None] if counts else 1.0)
    return bootstrap_figure(design, arrays, stat, bounds=(-upper, upper), n=n, floor=floor)


def newcombe_floor(b: float, c: float, n: float) -> tuple[float, float]:
    """Interval for the paired difference b - c of two discordant proportions out of n (b: right
    only under A, c: only under B), from their Wilson intervals combined as in Newcombe's hybrid
    score method (1998, method 10) without the correlation term:
    [d - sqrt((b-l_b)^2 + (u_c-c)^2), d + sqrt((u_b-b)^2 + (c-l_c)^2)], d = b - c. With no
    discordant question it is [-u, u], u = z^2/(n+z^2)."""
    lb, ub = wilson_interval(b * n, n)
    lc, uc = wilson_interval(c * n, n)
    d = b - c
    return d - math.hypot(b - lb, uc - c), d + math.hypot(ub - b, c - lc)


def _discordant_floor(d: np.ndarray, mask: np.ndarray, n_bar: np.ndarray) -> np.ndarray:
    """Newcombe floor (..., 2) from the mean over seeds of each seed's discordant proportions,
    where fewer than ``FEW_DISCORDANT`` distinct questions differ (NaN, no floor, elsewhere).

    The floor counts the seeds as one (n questions, not n x seeds): sound when the same questions
    differ in every seed, wider than needed when each seed's differences fall on other questions.
    With many discordant questions the bootstrap is reliable and the floor would only cost power.
    """
    few = (np.abs(d) > 0).any(-2).sum(-1) < FEW_DISCORDANT
    per = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        b = np.nanmean(np.where(per > 0, (d > 0).sum(-1) / per, np.nan), axis=-1)
        c = np.nanmean(np.where(per > 0, (d < 0).sum(-1) / per, np.nan), axis=-1)
    out = np.full(np.shape(b) + (2,), np.nan)
    for idx in np.ndindex(np.shape(b)):
        if few[idx] and n_bar[idx] > 0 and not np.isnan(b[idx]):
            out[idx] = newcombe_floor(float(b[idx]), float(c[idx]), float(n_bar[idx]))
    return out


def relative_change_pct(design: Design, xa: np.ndarray, xb: np.ndarray,
                        mask: np.ndarray) -> Figure | list:
    """Per seed 100 * (sum xa - sum xb) / sum xb over ``mask`` (undefined where sum xb = 0),
    then the mean over seeds; interval clipped to [-100, inf). Right/wrong outcomes get the
    Newcombe floor of the count difference, over the mean of sum xb."""
    xa, xb, mask = (np.asarray(a, float) for a in (xa, xb, mask))
    arrays = np.stack([xa * mask, xb * mask], axis=-3)
    n, n_bar = _mask_stats(mask)

    def stat(sums):
        a, b = _take(sums, arrays.ndim, 0), _take(sums, arrays.ndim, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, 100.0 * (a - b) / b, np.nan)

    floor = None
    if _is_binary(xa[mask > 0]) and _is_binary(xb[mask > 0]):
        base = (xb * mask).sum(-1).mean(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(base > 0, 100.0 * n_bar / base, np.nan)
        floor = _discordant_floor((xa - xb) * mask, mask, n_bar) * scale[..., None]
    return bootstrap_figure(design, arrays, stat, bounds=(-100.0, np.inf), n=n, floor=floor)


def _take(sums: np.ndarray, ndim: int, j: int) -> np.ndarray:
    """Array j of question sums: sums are (..., J, S) on the full data, (..., J, S, draws) per draw."""
    axis = -2 if sums.ndim == ndim - 1 else -3
    return np.take(sums, j, axis=axis)


def _select_stat(ndim: int, j: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda sums: _take(sums, ndim, j)


def _ratio_stat(ndim: int) -> Callable[[np.ndarray], np.ndarray]:
    def stat(sums):
        num, den = _take(sums, ndim, 0), _take(sums, ndim, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)
    return stat


def _plain_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over seeds of each seed's mean of x over mask (NaN where no seed has questions)."""
    per = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ps = np.where(per > 0, (x * mask).sum(-1) / per, np.nan)
        return np.nanmean(ps, axis=-1) if ps.size else ps
