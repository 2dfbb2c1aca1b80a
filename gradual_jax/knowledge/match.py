"""SQuAD-style answer normalisation and exact match."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalise an answer as the SQuAD v1.1 evaluation script does.

    Lowercase, delete ASCII punctuation, delete the words "a", "an" and "the", and collapse runs
    of whitespace to single spaces with none at either end. Punctuation is deleted before
    articles, so "The-Who" becomes "thewho" (no article left) while "the who" becomes "who".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: str | Sequence[str], *, first_only: bool = False) -> bool:
    """True iff the normalised prediction equals a normalised gold answer.

    ``golds`` is one answer or a sequence of accepted answers; with ``first_only`` only the
    first answer counts. Raises ValueError when no gold answer is given.
    """
    if isinstance(golds, str):
        golds = (golds,)
    if len(golds) == 0:
        raise ValueError("exact_match needs at least one gold answer")
    if first_only:
        golds = golds[:1]
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(gold) for gold in golds)
