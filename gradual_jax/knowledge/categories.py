"""SliCK knowledge categories (Gekhman et al. 2024) from probe counts.

An example is probed with ``n_prompts`` few-shot prompts; each prompt yields one greedy answer
and some sampled answers. Only the counts of correct answers matter here:

- HighlyKnown: every greedy answer is correct (P_greedy = 1).
- MaybeKnown: some but not all greedy answers are correct (0 < P_greedy < 1).
- WeaklyKnown: no greedy answer is correct, at least one sample is (P_greedy = 0, P_sample > 0).
- Unknown: nothing is correct (P_greedy = 0, P_sample = 0).
"""

from __future__ import annotations

HIGHLY_KNOWN = "HighlyKnown"
MAYBE_KNOWN = "MaybeKnown"
WEAKLY_KNOWN = "WeaklyKnown"
UNKNOWN = "Unknown"

CATEGORIES: tuple[str, ...] = (HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN)
"""All categories, best (most known) first."""

CATEGORY_RANK: dict[str, int] = {name: rank for rank, name in enumerate(CATEGORIES)}
"""Category -> rank; 0 is HighlyKnown, 3 is Unknown (lower is better known)."""


def categorize(n_greedy_correct: int, n_prompts: int, n_sample_correct: int) -> str:
    """Return the SliCK category for one example's probe counts.

    ``n_sample_correct`` is only consulted when no greedy answer is correct, so a probe that
    skipped sampling for such examples may pass any non-negative count there.
    Raises ValueError for counts that cannot come from a probe (negative, no prompts, or more
    correct greedy answers than prompts).
    """
    if n_prompts <= 0:
        raise ValueError(f"n_prompts must be positive, got {n_prompts}")
    if not 0 <= n_greedy_correct <= n_prompts:
        raise ValueError(
            f"n_greedy_correct must be in [0, n_prompts={n_prompts}], got {n_greedy_correct}"
        )
    if n_sample_correct < 0:
        raise ValueError(f"n_sample_correct must be non-negative, got {n_sample_correct}")
    if n_greedy_correct == n_prompts:
        return HIGHLY_KNOWN
    if n_greedy_correct > 0:
        return MAYBE_KNOWN
    return WEAKLY_KNOWN if n_sample_correct > 0 else UNKNOWN


def moved_up(a: str, b: str) -> bool:
    """True iff moving from category ``a`` to category ``b`` is a move to a better-known one.

    Equal categories and moves down give False. Raises KeyError naming an unknown category.
    """
    for name in (a, b):
        if name not in CATEGORY_RANK:
            raise KeyError(f"unknown SliCK category {name!r}; expected one of {CATEGORIES}")
    return CATEGORY_RANK[b] < CATEGORY_RANK[a]
