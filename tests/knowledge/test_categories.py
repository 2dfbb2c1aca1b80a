"""SliCK categories from probe counts: hand-worked cases and the P_greedy/P_sample definitions."""

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradual_jax.knowledge.categories import (
    CATEGORIES,
    CATEGORY_RANK,
    HIGHLY_KNOWN,
    MAYBE_KNOWN,
    UNKNOWN,
    WEAKLY_KNOWN,
    categorize,
    moved_up,
)


def test_constants_are_the_four_slick_names_best_first():
    assert CATEGORIES == ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
    assert CATEGORY_RANK == {"HighlyKnown": 0, "MaybeKnown": 1, "WeaklyKnown": 2, "Unknown": 3}


@pytest.mark.parametrize(
    ("greedy", "prompts", "samples", "expected"),
    [
        (10, 10, 0, HIGHLY_KNOWN),  # every greedy answer right; samples irrelevant
        (10, 10, 160, HIGHLY_KNOWN),
        (1, 1, 0, HIGHLY_KNOWN),
        (9, 10, 0, MAYBE_KNOWN),  # one prompt misses
        (1, 10, 0, MAYBE_KNOWN),
        (1, 10, 37, MAYBE_KNOWN),
        (0, 10, 1, WEAKLY_KNOWN),  # one right sample out of 160 is enough
        (0, 10, 160, WEAKLY_KNOWN),
        (0, 10, 0, UNKNOWN),
        (0, 1, 0, UNKNOWN),
    ],
)
def test_categorize_hand_worked(greedy, prompts, samples, expected):
    assert categorize(greedy, prompts, samples) == expected


@pytest.mark.parametrize(
    ("greedy", "prompts", "samples"), [(0, 0, 0), (11, 10, 0), (-1, 10, 0), (0, 10, -1)]
)
def test_categorize_rejects_impossible_counts(greedy, prompts, samples):
    with pytest.raises(ValueError):
        categorize(greedy, prompts, samples)


@given(
    st.integers(1, 20).flatmap(
        lambda n: st.tuples(st.integers(0, n), st.just(n), st.integers(0, 16 * n))
    )
)
def test_categorize_matches_probability_definition(counts):
    greedy, prompts, samples = counts
    p_greedy = Fraction(greedy, prompts)
    p_sample = Fraction(samples, prompts * 16)
    if p_greedy == 1:
        expected = HIGHLY_KNOWN
    elif p_greedy > 0:
        expected = MAYBE_KNOWN
    elif p_sample > 0:
        expected = WEAKLY_KNOWN
    else:
        expected = UNKNOWN
    assert categorize(greedy, prompts, samples) == expected


@pytest.mark.parametrize(
    ("a", "b", "up"),
    [
        (UNKNOWN, WEAKLY_KNOWN, True),
        (UNKNOWN, HIGHLY_KNOWN, True),
        (MAYBE_KNOWN, HIGHLY_KNOWN, True),
        (MAYBE_KNOWN, MAYBE_KNOWN, False),
        (WEAKLY_KNOWN, UNKNOWN, False),
        (HIGHLY_KNOWN, MAYBE_KNOWN, False),
    ],
)
def test_moved_up(a, b, up):
    assert moved_up(a, b) is up


def test_moved_up_rejects_unknown_name():
    with pytest.raises(KeyError, match="Known-ish"):
        moved_up("Known-ish", UNKNOWN)
