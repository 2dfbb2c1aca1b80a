"""Intervals against closed forms and hand-worked bootstrap distributions, and their coverage on
a grid of question counts, accuracies and seed effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from gradual_jax import stats as S

Z = S.Z975


def design(n_questions: int, n_seeds: int, **kw) -> S.Design:
    return S.Design.build([[f"q{i}" for i in range(n_questions)]] * n_seeds, **kw)


def test_wilson_at_zero_and_n_is_the_closed_form_and_scipys():
    for n in (1, 5, 7, 50, 200):
        assert S.wilson_interval(0, n) == (0.0, pytest.approx(Z * Z / (n + Z * Z)))
        assert S.wilson_interval(n, n) == (pytest.approx(n / (n + Z * Z)), 1.0)
        for k in (0, n // 2, n):
            ci = sps.binomtest(k, n).proportion_ci(method="wilson")
            assert S.wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    # 5 of 20 by hand: centre (0.25 + 0.096036) / 1.192073 = 0.290281, half-width 0.178421
    assert S.wilson_interval(5, 20) == (pytest.approx(0.111862, abs=1e-5), pytest.approx(0.468701, abs=1e-5))
    for bad in ((0, 0), (3, 2), (-1, 4)):
        with pytest.raises(ValueError):
            S.wilson_interval(*bad)


def test_mcnemar_exact_by_hand():
    assert S.mcnemar_exact(3, 0) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert S.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * P(Bin(10, 1/2) <= 1)
    assert S.mcnemar_exact(5, 5) == 1.0 and S.mcnemar_exact(0, 0) == 1.0


def test_one_right_question_of_four_is_the_binomial_of_its_draws():
    # Both seeds right on q0 only: each draw's accuracy is Bin(4, 1/4)/4. P(0) = 0.316 puts the
    # 2.5% point at 0; P(<= 2) = 0.949 and P(<= 3) = 0.996 put the 97.5% point at 3/4. The
    # Wilson floor for 1 of 4 (0.046-0.699) lies inside, so the interval is [0, 0.75].
    x = np.zeros((2, 4))
    x[:, 0] = 1
    fig = S.level(design(4, 2), x, np.ones_like(x))
    assert (fig["mean"], fig["low"], fig["high"], fig["n"]) == (0.25, 0.0, 0.75, 4)
    assert fig["per_seed"] == [0.25, 0.25] and fig["n_seeds"] == 2


def test_the_same_question_right_in_every_seed_is_not_certainty():
    # The SmolLM2 case: every seed got 1 of the same 7 questions. Draws give at most 3/7 at
    # 97.5%, so the Wilson upper bound for 1 of 7 (0.513) sets the top.
    x = np.zeros((3, 7))
    x[:, 0] = 1
    fig = S.level(design(7, 3), x, np.ones_like(x))
    assert fig["low"] == 0.0 and fig["high"] == pytest.approx(S.wilson_interval(1, 7)[1])
    none = S.level(design(7, 3), np.zeros((3, 7)), np.ones((3, 7)))
    assert (none["low"], none["high"]) == (0.0, pytest.approx(Z * Z / (7 + Z * Z)))


def test_the_seed_term_is_the_student_t_interval_when_seeds_alone_vary():
    # Every question of seed s scores c_s: resampling questions changes nothing, and the interval
    # is the classical t interval mean +- t(0.975, S-1) sd / sqrt(S) (up to Monte Carlo error).
    c = np.array([0.2, 0.35, 0.3, 0.5, 0.4])
    x = np.repeat(c[:, None], 30, axis=1)
    fig = S.level(design(30, 5, draws=20_000), x, np.ones_like(x))
    half = sps.t.ppf(0.975, 4) * c.std(ddof=1) / np.sqrt(5)
    assert fig["mean"] == pytest.approx(c.mean())
    assert fig["high"] - fig["mean"] == pytest.approx(half, rel=0.06)
    assert fig["mean"] - fig["low"] == pytest.approx(half, rel=0.06)


def test_questions_are_crossed_with_seeds():
    # Two seeds with the same outcome on every question resample the same questions: exactly the
    # interval of one seed. Seeds resampled independently would give a narrower one.
    rng = np.random.default_rng(0)
    x = (rng.random((1, 40)) < 0.4).astype(float)
    one = S.level(design(40, 1), x, np.ones_like(x))
    two = S.level(design(40, 2), np.repeat(x, 2, axis=0), np.ones((2, 40)))
    assert (two["low"], two["high"]) == (one["low"], one["high"])
    assert S.Design.build([["a", "b"], ["a", "b"]]).crossed
    nested = S.Design.build([["a", "b"], ["c", "d"]])
    assert not nested.crossed and nested.ids == ["a", "b", "c", "d"]
    # Each seed of a nested design draws from its own questions only.
    assert nested.weights[0][2:].sum() == 0 and nested.weights[1][:2].sum() == 0
    assert (nested.weights[0].sum(0) == 2).all()


def test_one_seed_is_the_question_bootstrap():
    x = np.zeros((1, 200))
    x[0, :100] = 1
    fig = S.level(design(200, 1), x, np.ones_like(x))
    low, high = S.wilson_interval(100, 200)  # ~ the normal interval at p = 1/2, n = 200
    assert fig["low"] == pytest.approx(low, abs=0.012) and fig["high"] == pytest.approx(high, abs=0.012)


def test_counts_and_differences_stay_in_their_range():
    rng = np.random.default_rng(1)
    x = (rng.random((3, 50)) < 0.03).astype(float)
    mask = np.ones_like(x)
    cnt = S.count(design(50, 3), x, mask)
    assert 0.0 <= cnt["low"] <= cnt["mean"] <= cnt["high"] <= 50
    assert cnt["per_seed"] == list(x.sum(1))
    everything = S.count(design(50, 3), np.ones_like(x), mask)
    assert everything["high"] == 50 and everything["low"] == pytest.approx(50 * 50 / (50 + Z * Z))
    diff = S.paired_difference(design(50, 3), np.ones_like(x), np.zeros_like(x), mask)
    assert diff["mean"] == 1.0 and diff["high"] == 1.0 and diff["low"] <= 1.0
    # No question differs in any seed: [-u, u], u the Wilson upper bound of 0 discordant of 50.
    same = S.paired_difference(design(50, 3), x, x, mask)
    u = Z * Z / (50 + Z * Z)
    assert (same["mean"], same["low"], same["high"]) == (0.0, pytest.approx(-u), pytest.approx(u))
    same_count = S.paired_difference(design(50, 3), x, x, mask, counts=True)
    assert same_count["high"] == pytest.approx(50 * u)


def test_paired_difference_is_per_seed_and_a_relative_change_is_clipped():
    xa = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], float)
    xb = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], float)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float)
    fig = S.paired_difference(design(4, 2), xa, xb, mask)
    assert fig["per_seed"] == [pytest.approx(1 / 3), 0.0] and fig["n"] == 4  # 3 and 4 questions
    rel = S.relative_change_pct(design(4, 2), xb, xa, np.ones_like(xa))
    assert rel["per_seed"] == [-50.0, 0.0] and rel["low"] >= -100.0


def test_figures_no_seed_can_compute_are_empty():
    fig = S.level(design(3, 2), np.ones((2, 3)), np.zeros((2, 3)))
    assert fig == {"mean": None, "low": None, "high": None, "n": 0, "n_seeds": 0, "per_seed": []}
    part = S.level(design(3, 2), np.ones((2, 3)), np.array([[1, 1, 0], [0, 0, 0]], float))
    assert part["n_seeds"] == 1 and part["per_seed"] == [1.0, None]
    assert S.range_figure([3, 1, 2]) == {"mean": 2.0, "low": 1.0, "high": 3.0, "n": 3, "n_seeds": 3,
                                         "per_seed": [3.0, 1.0, 2.0]}


def test_the_same_results_give_the_same_figures():
    x = (np.random.default_rng(2).random((3, 30)) < 0.5).astype(float)
    assert S.level(design(30, 3), x, np.ones_like(x)) == S.level(design(30, 3), x, np.ones_like(x))


# ----------------------------------------------------------------------------- coverage

QUESTIONS = (5, 20, 60, 200)
CENTRES = (-5.0, 0.0, 5.0)  # logit of the typical question: true accuracy ~0.02, 0.5, ~0.98
SPREAD = 1.5                # sd of the questions' logits
SEED_SD = 1.0               # sd of a seed's shift of every logit, "with a seed effect"


def _truth(centre: float, seed_sd: float) -> float:
    """Expected accuracy over questions and seeds, by quadrature over both normal effects."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    total = np.sqrt(SPREAD**2 + seed_sd**2)
    return float(weights @ expit(centre + total * nodes))


def _coverage(n_questions: int, centre: float, seed_sd: float, experiments: int = 1000) -> float:
    """Share of simulated 3-seed experiments whose interval for the accuracy holds the truth.
    The experiments share one set of bootstrap draws (a Design), each with its own outcomes."""
    rng = np.random.default_rng([n_questions, int(centre) + 10, int(10 * seed_sd)])
    q = rng.normal(centre, SPREAD, (experiments, 1, n_questions))
    s = rng.normal(0.0, seed_sd, (experiments, 3, 1))
    x = (rng.random((experiments, 3, n_questions)) < expit(q + s)).astype(float)
    figs = S.level(design(n_questions, 3, draws=1000), x, np.ones_like(x))
    truth = _truth(centre, seed_sd)
    return float(np.mean([f["low"] <= truth <= f["high"] for f in figs]))


@pytest.mark.parametrize("seed_sd", [0.0, SEED_SD], ids=["no-seed-effect", "seed-effect"])
@pytest.mark.parametrize("centre", CENTRES, ids=["near-0", "half", "near-1"])
@pytest.mark.parametrize("n_questions", QUESTIONS)
def test_coverage_at_least_93_percent_in_every_cell(n_questions, centre, seed_sd):
    assert _coverage(n_questions, centre, seed_sd) >= 0.93


def test_truth_of_the_grid():
    assert _truth(-5.0, 0.0) < 0.03 and _truth(5.0, 0.0) > 0.97 and _truth(0.0, SEED_SD) == pytest.approx(0.5)


def test_newcombe_floor_by_hand():
    # No discordant question: [-u, u], u = z^2 / (n + z^2).
    u = Z * Z / (20 + Z * Z)
    assert S.newcombe_floor(0.0, 0.0, 20) == (pytest.approx(-u), pytest.approx(u))
    # b = 1 of 1, c = 0: Wilson 1 of 1 is [1/(1+z^2), 1], 0 of 1 is [0, z^2/(1+z^2)].
    lo, hi = S.newcombe_floor(1.0, 0.0, 1)
    w = Z * Z / (1 + Z * Z)
    assert lo == pytest.approx(1 - np.hypot(1 - 1 / (1 + Z * Z), w)) and hi == pytest.approx(1.0)
    # 10 of 55 right only under A, none only under B: the floor still excludes 0.
    lo, hi = S.newcombe_floor(10 / 55, 0.0, 55)
    lb = S.wilson_interval(10, 55)[0]
    assert lo == pytest.approx(10 / 55 - np.hypot(10 / 55 - lb, Z * Z / (55 + Z * Z))) and lo > 0


def test_a_difference_on_one_question_is_not_certain():
    # One question, A wrong and B right in both seeds: every draw gives -1, the floor does not.
    fig = S.paired_difference(design(1, 2), np.zeros((2, 1)), np.ones((2, 1)), np.ones((2, 1)))
    assert fig["mean"] == -1.0 and fig["low"] == -1.0 and fig["high"] > 0.0


def _paired_coverage(n_questions: int, centre: float, effect: float, seed_sd: float,
                     experiments: int = 1000) -> float:
    """As `_coverage`, for the difference of two arms on the same questions: arm B shifts every
    logit by ``effect``; each arm has its own seed shifts."""
    rng = np.random.default_rng([n_questions, int(centre) + 10, int(10 * effect), int(10 * seed_sd), 1])
    q = rng.normal(centre, SPREAD, (experiments, 1, n_questions))
    sa, sb = (rng.normal(0.0, seed_sd, (experiments, 3, 1)) for _ in range(2))
    xa = (rng.random((experiments, 3, n_questions)) < expit(q + sa)).astype(float)
    xb = (rng.random((experiments, 3, n_questions)) < expit(q + effect + sb)).astype(float)
    figs = S.paired_difference(design(n_questions, 3, draws=1000), xa, xb, np.ones_like(xa))
    truth = _truth(centre, seed_sd) - _truth(centre + effect, seed_sd)
    return float(np.mean([f["low"] <= truth <= f["high"] for f in figs]))


@pytest.mark.parametrize("seed_sd", [0.0, 0.5], ids=["no-seed-effect", "seed-effect"])
@pytest.mark.parametrize("effect", [0.0, 1.0], ids=["no-difference", "difference"])
@pytest.mark.parametrize("centre", [-4.0, 0.0], ids=["near-0", "half"])
@pytest.mark.parametrize("n_questions", [5, 60])
def test_paired_difference_coverage(n_questions, centre, effect, seed_sd):
    assert _paired_coverage(n_questions, centre, effect, seed_sd) >= 0.93
