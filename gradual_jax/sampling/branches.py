"""Host-side planning of continuations scored against an insert's tails (`branch_program`).

An insert prefills its tails packed into rows (`pack_rows`) and keeps their keys and values on
the device for the rest of the call. A continuation scored after one of those tails needs only
its own tokens run: the continuations of all the insert's tails are fed end to end in one row,
each token attending to its tail's prefix and tail and causally to its own continuation.
Token 0 of a continuation is predicted by the tail's last hidden state, token j by fed token
j - 1, so a continuation of L tokens feeds L - 1.

Pure numpy, no jax: what fits is decided here, so the program's shapes never change and what
does not fit is left for the plain scoring path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A continuation to score: `key` names it in the results, `tail` is the index of its tail
    in the insert's packing, `tokens` the continuation, `alt` (position j, token t) or None: a
    token also wanted in place of token j (a sequence's EOS where the text goes on with a
    stop string)."""

    key: Hashable
    tail: int
    tokens: tuple[int, ...]
    alt: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class BranchPlan:
    """`branch_program`'s arguments for one insert: the fed tokens end to end, `ids`, their
    positions after their tail's end `pos`, the tail each follows `tail` (-1: padding) and each
    continuation's own id `branch`, all `[width]`; per scored token `[reads]`, the hidden-state
    row it is read from `read` (the insert's tails' last states, then the fed tokens), the token
    `cont` and the alternative `alt` (-1: none). `spans`: (wanted, first read, length) of every
    planned continuation; `left`: the wanted continuations that did not fit, in order."""

    ids: np.ndarray
    pos: np.ndarray
    tail: np.ndarray
    branch: np.ndarray
    read: np.ndarray
    cont: np.ndarray
    alt: np.ndarray
    spans: list[tuple[Wanted, int, int]]
    left: list[Wanted]


def plan_branches(wanted: Sequence[Wanted], *, tail_length: Sequence[int], tails: int, width: int,
                  reads: int) -> BranchPlan:
    """Place `wanted` in order: each continuation's fed tokens go next in the row of `width`
    and its tokens take `reads` slots; one that does not fit (the row full, the reads spent) is
    left out, and later ones may still fit. `tail_length[t]`: tail t's tokens; `tails`: the
    insert's tail count (the first `tails` hidden-state rows)."""
    ids = np.zeros(width, np.int32)
    pos = np.zeros(width, np.int32)
    tail = np.full(width, -1, np.int32)
    branch = np.zeros(width, np.int32)
    read = np.zeros(reads, np.int32)
    cont = np.zeros(reads, np.int32)
    alt = np.full(reads, -1, np.int32)
    spans: list[tuple[Wanted, int, int]] = []
    left: list[Wanted] = []
    k = c = 0
    for w in wanted:
        n = len(w.tokens)
        fed = n - 1
        if n == 0 or k + n > reads or c + fed > width:
            left.append(w)
            continue
        ids[c:c + fed] = w.tokens[:-1]
        pos[c:c + fed] = int(tail_length[w.tail]) + np.arange(fed)
        tail[c:c + fed] = w.tail
        branch[c:c + fed] = len(spans) + 1
        read[k] = w.tail
        read[k + 1:k + n] = tails + c + np.arange(fed)
        cont[k:k + n] = w.tokens
        if w.alt is not None:
            alt[k + w.alt[0]] = w.alt[1]
        spans.append((w, k, n))
        c += fed
        k += n
    return BranchPlan(ids, pos, tail, branch, read, cont, alt, spans, left)


@dataclasses.dataclass
class BranchScores:
    """Where one call's continuations scored against its inserts' tails go, and how they are
    scored: at `temperature` and `top_k`; a continuation whose first token the insert's own
    logits exclude (`first_tokens.excluded`, by more than `margin`) is not run.
    `scores[key]`: (raw log-probs, sampled log-probs, the alternative's sampled log-prob or
    None), or None where skipped (chance 0); `left`: what did not fit any branch call."""

    temperature: float
    top_k: int
    margin: float
    scores: dict = dataclasses.field(default_factory=dict)
    left: list[Wanted] = dataclasses.field(default_factory=list)
    skipped: int = 0
