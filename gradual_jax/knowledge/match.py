"""SQuAD-style answer normalisation and exact match."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

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


_ARTICLE_WORDS = frozenset({"a", "an", "the"})
_ARTICLE_PREFIXES = frozenset({"a", "an", "t", "th", "the"})


def can_still_match(partial: str, golds: str | Sequence[str], *, first_only: bool = False) -> bool:
    """False only if no completion of `partial` can be an exact match: for every string s,
    `exact_match(clean_answer(partial + s), golds)` is False (`clean_answer`: the text up to its
    first newline). A sampler may then stop generating it: its answer is wrong whatever comes.

    Sound, not complete: where the normalisation is not a function of the text read so far
    (non-ASCII characters, whose case mapping and word boundaries depend on context, or an
    apostrophe, next to which a tokenizer's decode may delete spaces), it answers True.
    """
    return answer_prefix_test(golds, first_only=first_only)(partial)


def answer_prefix_test(golds: str | Sequence[str], *,
                       first_only: bool = False) -> Callable[[str], bool]:
    """`can_still_match` against these gold answers, normalised once (a sampler applies it to
    every row after every token)."""
    if isinstance(golds, str):
        golds = (golds,)
    if first_only:
        golds = golds[:1]
    whole = {normalize_answer(g) for g in golds}
    targets = [w.split() for w in whole]

    def test(partial: str) -> bool:
        if "\n" in partial:
            return normalize_answer(partial.split("\n", 1)[0]) in whole
        if not partial.isascii() or "'" in partial:
            return True
        kept = "".join(ch for ch in partial.lower() if ch not in _PUNCTUATION)
        if not all(ch.isalnum() or ch.isspace() for ch in kept):
            return True
        words = kept.split()
        partial_word = words.pop() if kept and not kept[-1].isspace() else ""
        done = [w for w in words if w not in _ARTICLE_WORDS]
        for target in targets:
            if target[:len(done)] != done:
                continue
            rest = target[len(done):]
            # the word being read may become an article (dropped) or the next gold word
            if (not partial_word or partial_word in _ARTICLE_PREFIXES
                    or (rest and rest[0].startswith(partial_word))):
                return True
        return False

    return test
