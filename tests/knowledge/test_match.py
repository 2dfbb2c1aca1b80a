"""SQuAD-style normalisation and exact match on hand-worked strings."""

import pytest

from gradual_jax.knowledge.match import exact_match, normalize_answer


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Beatles", "beatles"),
        ("  A   Tale of Two Cities! ", "tale of two cities"),
        ("an apple a day", "apple day"),
        ("U.S.A.", "usa"),
        ("Anne Theater", "anne theater"),  # articles only as whole words
        ("Rock-'n'-Roll", "rocknroll"),
        ("The-Who", "thewho"),  # punctuation goes first, so no article is left to remove
        ("São Paulo", "são paulo"),  # non-ASCII letters are kept
        ("THE\tEnd\n", "end"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_any_gold():
    assert exact_match("the united states", ["United States", "USA"])
    assert exact_match("USA", ["United States", "U.S.A."])
    assert exact_match("Paris", "paris.")
    assert not exact_match("Paris, France", ["Paris"])
    assert not exact_match("", ["Paris"])


def test_exact_match_first_only():
    assert exact_match("United States", ["United States", "U.S.A."], first_only=True)
    assert not exact_match("USA", ["United States", "U.S.A."], first_only=True)


def test_exact_match_needs_a_gold():
    with pytest.raises(ValueError):
        exact_match("Paris", [])
