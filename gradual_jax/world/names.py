"""Invented names: words built from syllables, so no name carries meaning from real text."""

from __future__ import annotations

import numpy as np

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "tr", "th", "sh", "ch", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "th")

COMPANY_SUFFIXES = ("Industries", "Systems", "Labs", "Group", "Works", "Holdings", "Motors",
                    "Foods", "Media", "Logistics")
WORK_NOUNS = ("Harbor", "River", "Garden", "Tower", "Mirror", "Winter", "Road", "Kingdom",
              "Orchard", "Lantern", "Voyage", "Empire", "Valley", "Shore", "Forest", "Crown",
              "Bridge", "Archive", "Island", "Storm")


def make_word(rng: np.random.Generator, n_syllables: int, suffix: str = "") -> str:
    """One capitalised word of `n_syllables` random syllables followed by `suffix`."""
    parts = []
    for i in range(n_syllables):
        coda = _CODAS[rng.integers(len(_CODAS))] if i == n_syllables - 1 else ""
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + coda)
    return ("".join(parts) + suffix).capitalize()


def unique_words(rng: np.random.Generator, n: int, taken: set[str], syllables: tuple[int, ...] = (2, 3),
                 suffix: str = "") -> list[str]:
    """`n` distinct words not in `taken` (case-insensitive); adds them to `taken`."""
    out: list[str] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise RuntimeError(f"could not invent {n} distinct names")
        word = make_word(rng, int(rng.choice(syllables)), suffix)
        if word.lower() in taken:
            continue
        taken.add(word.lower())
        out.append(word)
    return out


def person_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """`n` two-word person names: a first name from a shared pool and a surname of their own.

    The unique surname lets a two-layer model key a person's facts on one token; shared first
    names keep the first token of a person-valued answer from giving the person away.
    """
    firsts = unique_words(rng, max(10, n // 25), taken)
    lasts = unique_words(rng, n, taken)
    return [f"{firsts[rng.integers(len(firsts))]} {last}" for last in lasts]


def company_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """`n` distinct company names: an invented word and a common suffix ('Dravik Labs')."""
    stems = unique_words(rng, n, taken, syllables=(2,))
    return [f"{stem} {COMPANY_SUFFIXES[rng.integers(len(COMPANY_SUFFIXES))]}" for stem in stems]


def work_titles(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """`n` distinct titles 'The <Invented> <Noun>' ('The Velmor Harbor'); the invented word alone
    identifies the work, so a title is not a conjunction of shared words."""
    stems = unique_words(rng, n, taken, syllables=(2,))
    return [f"The {stem} {WORK_NOUNS[rng.integers(len(WORK_NOUNS))]}" for stem in stems]
