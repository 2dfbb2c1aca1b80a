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


# ---- can_still_match: no completion of a rejected text may match

from hypothesis import given, settings, strategies as st  # noqa: E402

from gradual_jax.knowledge.match import can_still_match  # noqa: E402
from gradual_jax.knowledge.prompts import clean_answer  # noqa: E402


@pytest.mark.parametrize("partial, golds, expected", [
    (" Paris", ["Paris"], True),
    (" Par", ["Paris"], True),
    (" Lon", ["Paris"], False),            # the first word can no longer be "paris"
    (" The", ["Paris"], True),             # "the" may be an article, dropped
    (" Th", ["Paris"], True),
    (" An", ["Paris"], True),
    (" Ant", ["Paris"], False),
    ("  \"", ["Paris"], True),             # punctuation and spaces only: anything may follow
    (" New Y", ["New York City"], True),
    (" New J", ["New York City"], False),
    (" York", ["New York City"], False),   # a word the gold does not start with
    (" New York City ", ["New York City"], True),   # the answer may end here
    (" New York City t", ["New York City"], True),  # "t" may become "the": dropped
    (" New York City x", ["New York City"], False),
    (" Paris\nBerlin", ["Paris"], True),   # the answer is cut at the newline: it matches
    (" Pari\n", ["Paris"], False),
    (" Lon", ["Paris", "London"], True),   # any gold answer counts
    (" Lon", ["Paris", "London"], True),
    (" Zürich", ["Basel"], True),          # non-ASCII: not decided, kept
    (" O'Hare", ["Midway"], True),         # apostrophe: not decided, kept
    (" U.S", ["United States"], False),
    (" U.S", ["US"], True),
])
def test_can_still_match_hand_worked(partial, golds, expected):
    assert can_still_match(partial, golds) is expected


def test_can_still_match_first_only():
    assert can_still_match(" Lon", ["Paris", "London"], first_only=True) is False


_pieces = st.sampled_from(["the", "The", " ", "  ", "a", "an", "A", "new", "New", "york", "York",
                           "Paris", "par", "is", ".", ",", "-", "\"", "\n", "x", "city", "City",
                           "t", "th", "e", "n", "'", "é", "1"])
_text = st.lists(_pieces, max_size=6).map("".join)


@settings(max_examples=3000, deadline=None)
@given(partial=_text, rest=_text, gold=st.sampled_from(
    ["Paris", "New York City", "the City", "A1", "York", "new-york", "e", "Thé"]))
def test_a_rejected_text_has_no_matching_completion(partial, rest, gold):
    """Soundness: whenever the test says no, no completion (here: random continuations built
    from the pieces answers are made of) is an exact match."""
    if not can_still_match(partial, [gold]):
        assert not exact_match(clean_answer(partial + rest), [gold])
        assert not exact_match(clean_answer(partial), [gold])


@settings(max_examples=1000, deadline=None)
@given(gold=st.sampled_from(["Paris", "New York City", "the City", "A1", "U.S.", "Thé"]),
       cut=st.integers(0, 40), lead=st.sampled_from(["", " ", " the ", " The "]))
def test_every_prefix_of_a_right_answer_can_still_match(gold, cut, lead):
    """Completeness where it matters: the text of a right answer is never rejected on the way."""
    answer = lead + gold + "\n"
    assert can_still_match(answer[:cut], [gold])
