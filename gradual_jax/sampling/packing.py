"""Host-side shapes, packing and planning: pure Python and numpy, no jax.

- `plan` orders a call's tokenized prompts, groups those sharing a long token prefix and cuts
  the groups into batches (`Batch`: the shared prefix and each prompt's remaining tokens).
- `pack` lays a batch's token sequences, without padding between them, into rows of a
  power-of-two width (first-fit decreasing), with positions and segment ids for the mask.
- `next_pow2`, `bucket_rows`, `batch_rows` and `compact_target` round sizes to the few buckets
  the compiled programs are built for, so a dataset compiles a handful of times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MIN_BUCKET = 8
MIN_SHARED_PREFIX = 16
MIN_COMPACT_ROWS = 8  # below this a decode step costs about the same: not worth a compile


# --------------------------------------------------------------------------------------------
# Sizes


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


def bucket_rows(n: int, multiple: int = 1) -> int:
    """Rows padded to 1, 2, 4, then multiples of 4 (and to a multiple of `multiple`)."""
    rows = next_pow2(n) if n <= 4 else round_up(n, 4)
    return round_up(rows, multiple)


def batch_rows(count: int, per_batch: int, multiple: int = 1) -> int:
    """Prompts a batch of `count` is padded to: `per_batch` when full, else a power of two; a
    multiple of `multiple` (the data-parallel size)."""
    return round_up(min(next_pow2(count), max(count, per_batch)), multiple)


def compact_target(live: int, multiple: int = 1) -> int:
    """Rows a decode batch with `live` unfinished rows is compacted to: a power of two of at
    least MIN_COMPACT_ROWS, a multiple of `multiple` (the data-parallel size)."""
    return round_up(next_pow2(live, MIN_COMPACT_ROWS), multiple)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every row of `rows` (at least one) begins with."""
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


# --------------------------------------------------------------------------------------------
# Packing


@dataclasses.dataclass
class Pack:
    """Token sequences packed into `[rows, width]`: sequence b sits in row `row[b]` from column
    `col[b]`, `length[b]` tokens; `seg` names each slot's sequence (-1: padding)."""

    ids: np.ndarray
    pos: np.ndarray
    seg: np.ndarray
    row: np.ndarray
    col: np.ndarray
    length: np.ndarray

    @property
    def tokens(self) -> int:
        return self.ids.size


def first_fit(lengths: Sequence[int], width: int) -> tuple[list[int], list[int], int]:
    """Row and column of each length packed first-fit decreasing into rows of `width`."""
    row, col, free = [0] * len(lengths), [0] * len(lengths), []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((i for i, f in enumerate(free) if f >= lengths[b]), None)
        if r is None:
            r = len(free)
            free.append(width)
        row[b], col[b] = r, width - free[r]
        free[r] -= lengths[b]
    return row, col, len(free)


def pack(seqs: Sequence[Sequence[int]], *, offset: int, count: int, row_multiple: int) -> Pack:
    """Pack `seqs` (positions starting at `offset`) for `count` sequences (extra ones empty).

    The width is a power of two >= the longest sequence; doubling it is tried when that packs
    into fewer padded tokens.
    """
    lengths = [len(s) for s in seqs]
    base = next_pow2(max(lengths), MIN_BUCKET)
    plans = []
    for width in (base, 2 * base, 4 * base):
        row, col, used = first_fit(lengths, width)
        rows = bucket_rows(used, row_multiple)
        plans.append((rows * width, width, rows, row, col))
    _, width, rows, row, col = min(plans, key=lambda p: (p[0], p[1]))
    ids = np.zeros((rows, width), np.int32)
    pos = np.zeros((rows, width), np.int32)
    seg = np.full((rows, width), -1, np.int32)
    for b, s in enumerate(seqs):
        ids[row[b], col[b]:col[b] + len(s)] = s
        pos[row[b], col[b]:col[b] + len(s)] = offset + np.arange(len(s))
        seg[row[b], col[b]:col[b] + len(s)] = b
    pad = count - len(seqs)
    return Pack(ids, pos, seg, np.array(row + [0] * pad, np.int32),
                np.array(col + [0] * pad, np.int32), np.array(lengths + [0] * pad, np.int32))


# --------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass
class Batch:
    """Prompts decoded together: indices into the call's prompts, the shared token prefix and
    each prompt's remaining tokens."""

    items: list[int]
    prefix: tuple[int, ...]
    suffixes: list[list[int]]


def groups(prompt_ids: list[list[int]], share: bool | None) -> list[tuple[int, list[int]]]:
    """Prompts in token order, grouped as (shared prefix length, members).

    Consecutive prompts sharing at least MIN_SHARED_PREFIX tokens (any, with share=True) form a
    group with their common prefix (each member keeps a token of its own); prompts that share
    nothing long enough gather in prefix-less groups.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: prompt_ids[i])
    least = 1 if share else MIN_SHARED_PREFIX
    runs: list[tuple[int, list[int]]] = []
    for i in order:
        if runs and share is not False:
            n, members = runs[-1]
            first = prompt_ids[members[0]]
            shared = min(n, common_prefix([first, prompt_ids[i]]), len(prompt_ids[i]) - 1)
            if shared >= least:
                members.append(i)
                runs[-1] = (shared, members)
                continue
        runs.append((len(prompt_ids[i]) - 1, [i]))
    out: list[tuple[int, list[int]]] = []
    for n, members in runs:
        if len(members) == 1 or n < least:
            n = 0
        if out and n == 0 and out[-1][0] == 0:
            out[-1][1].extend(members)
        else:
            out.append((n, list(members)))
    return out


def plan(prompt_ids: list[list[int]], per_batch: int, share: bool | None) -> list[Batch]:
    """Batches of at most `per_batch` prompts of one group each, with the group's prefix."""
    batches = []
    for n, members in groups(prompt_ids, share):
        prefix = tuple(prompt_ids[members[0]][:n])
        for start in range(0, len(members), per_batch):
            items = members[start:start + per_batch]
            batches.append(Batch(items, prefix, [prompt_ids[i][n:] for i in items]))
    return batches
