"""Host-side shapes, prefix splitting and packing: pure Python and numpy, no jax.

The engine runs a fixed set of shapes (`Shapes`): a prefix store of `store_rows` prefixes of
`prefix_width` tokens, tails packed into `insert_rows x insert_width` per insert, `slots` decode
rows of `cache_len` slots, scoring packed into `score_rows x score_width`. `shapes_for` picks
them from a call's prompts on fixed ladders, so two calls whose prompts fit the same rungs
compile nothing new, whatever their number.

- `split_prompts` cuts each tokenized prompt into a prefix (kept in the store, shared by every
  prompt that begins with it) and a tail (prefilled per prompt).
- `pack_rows` lays sequences of one prefix each end to end into rows of a fixed width
  (first fit, rows never mixing prefixes), with positions and segment ids for the mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_BATCH_SIZE = 64    # decode slots unless a caller says otherwise
MIN_SHARED_PREFIX = 16
PREFIX_STEP = 32           # prefix widths: multiples of 32
INSERT_WIDTH_MIN = 32      # tail widths: powers of two from 32
INSERT_ROWS = 4            # packed rows per insert, each of its own stored prefix
SCORE_WIDTH = 64           # scored sequences (tail + continuations) per packed row
SCORE_ROWS = 8             # packed rows per scoring call, each of its own stored prefix
SCORE_TOKENS = 256         # continuation tokens scored per call (more for a longer continuation)
# Logits one scoring call holds (tokens x vocabulary; SmolLM2: 256 x 49,152): a smaller
# vocabulary scores more tokens a call, in proportionally more rows, up to SCORE_SCALE_MAX times.
SCORE_LOGITS = 1 << 24
SCORE_SCALE_MAX = 16
INSERT_TAILS = 8           # tails prefilled per insert
# Continuations scored against an insert's tails (`branches`): tokens fed and tokens read a
# call (SmolLM2's probe of 24 questions: its gold answers feed 24 and read 33 an insert on
# average, at most 41 and 51).
BRANCH_WIDTH = 32
BRANCH_READS = 48
ADMIT_ROWS = 8             # rows one admit call starts in slots (more: several calls)
# A program call costs its dispatch whatever its size. Where INSERT_ROWS rows of tails are
# little work (a model of a few layers of width 64), an insert takes proportionally more rows
# and tails, and an admit or a prefix prefill more rows, up to INSERT_SCALE_MAX times, so that
# an insert's tails are about INSERT_WORK FLOPs: a greedy probe's one-row tails then need a few
# large inserts instead of many small ones. Models from SmolLM2-135M up keep the base sizes.
INSERT_WORK = 1 << 30
INSERT_SCALE_MAX = 4
STORE_ROWS_MIN = 8


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def score_scale(vocab: int) -> int:
    """How many times SCORE_TOKENS (and the SCORE_ROWS rows holding them) one scoring call takes for a
    vocabulary of `vocab` tokens (0: unknown): the largest power of two keeping the call's logits
    within SCORE_LOGITS, at least 1 and at most SCORE_SCALE_MAX."""
    return _pow2_fit(SCORE_LOGITS, vocab * SCORE_TOKENS, SCORE_SCALE_MAX)


def insert_scale(flops_per_token: int) -> int:
    """How many times INSERT_ROWS, INSERT_TAILS, ADMIT_ROWS and the prefill's rows a call takes
    for a model whose layers cost `flops_per_token` (0: unknown): the largest power of two
    keeping the tails of the narrowest insert within INSERT_WORK FLOPs, at least 1, at most
    INSERT_SCALE_MAX."""
    return _pow2_fit(INSERT_WORK, flops_per_token * INSERT_ROWS * INSERT_WIDTH_MIN, INSERT_SCALE_MAX)


def _pow2_fit(budget: int, cost: int, cap: int) -> int:
    """The largest power of two n with n * cost <= budget, at least 1 and at most `cap` (1
    when the cost is unknown, <= 0)."""
    if cost <= 0:
        return 1
    fit = max(budget // cost, 1)
    return min(1 << (fit.bit_length() - 1), cap)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


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
# Shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every shape the engine's programs take. `slots` decode rows, each `cache_len` =
    `insert_width + new_tokens` cache slots of its own (tail, generation) after its prefix's
    `prefix_width` slots in one of the store's `store_rows` rows;
    `insert_dests`: most rows one insert draws a first token for; `admit_rows`: most rows one
    admit call starts (an admit's work is proportional to it, not to the slots);
    `branch_width` / `branch_reads`: continuation tokens fed / read per call when scoring
    against an insert's tails (`branches`)."""

    slots: int
    prefix_width: int
    store_rows: int
    prefill_rows: int
    insert_rows: int
    insert_width: int
    insert_dests: int
    insert_tails: int
    admit_rows: int
    new_tokens: int
    score_rows: int
    score_width: int
    score_tokens: int
    branch_width: int
    branch_reads: int
    k_cap: int

    @property
    def cache_len(self) -> int:
        return self.insert_width + self.new_tokens

    def same_rows(self, other: "Shapes") -> bool:
        """Whether both have the same row counts (slots and rows a call), so one can grow to
        cover the other."""
        same = ("slots", "prefill_rows", "insert_rows", "insert_dests", "insert_tails", "admit_rows",
                "score_rows", "branch_width", "branch_reads")
        return all(getattr(self, f) == getattr(other, f) for f in same)

    def covers(self, other: "Shapes") -> bool:
        """Whether work planned for `other` runs in these shapes (every size at least as big,
        the row counts equal)."""
        bigger = ("prefix_width", "store_rows", "insert_width", "new_tokens", "score_width",
                  "score_tokens", "k_cap")
        return self.same_rows(other) and all(getattr(self, f) >= getattr(other, f) for f in bigger)

    def union(self, other: "Shapes") -> "Shapes":
        """The smallest shapes covering both (row counts must agree)."""
        fields = ("prefix_width", "store_rows", "insert_width", "new_tokens", "score_width",
                  "score_tokens", "k_cap")
        return dataclasses.replace(self, **{f: max(getattr(self, f), getattr(other, f)) for f in fields})


def shapes_for(*, slots: int, longest_prefix: int = 1, longest_tail: int = 1, new_tokens: int = 1,
               longest_scored: int = 0, longest_continuation: int = 0, prefixes: int = 1,
               k_cap: int = 64, vocab: int = 0, flops_per_token: int = 0,
               multiple: int = 1) -> Shapes:
    """The engine's shapes for work of these sizes, each rounded up a fixed ladder: `slots` to
    a multiple of `multiple` (the data-parallel size), the prefix width to a multiple of
    PREFIX_STEP, tails to a power of two from INSERT_WIDTH_MIN, scored sequences to a power
    of two from SCORE_WIDTH, the continuation tokens one scoring call reads to a power of two
    from SCORE_TOKENS (covering the longest continuation), the store to a power of two of
    `prefixes` (at least STORE_ROWS_MIN and a scoring call's rows) and `k_cap` (largest top-k
    sampled) to a power of two from 64. A `vocab` under SCORE_LOGITS / SCORE_TOKENS scores proportionally more tokens in
    more rows a call (`score_scale`); a model whose layers cost under INSERT_WORK /
    (INSERT_ROWS * INSERT_WIDTH_MIN) FLOPs a token inserts, admits and prefills more rows a call
    (`insert_scale`). Rows that hold work the devices split (prefills, scoring rows and tokens,
    slots, an insert's tails) are multiples of `multiple`."""
    slots = round_up(max(slots, 1), multiple)
    scale = score_scale(vocab)
    inserts = insert_scale(flops_per_token)
    score_rows = round_up(SCORE_ROWS * scale, multiple)
    return Shapes(
        slots=slots,
        prefix_width=round_up(max(longest_prefix, 1), PREFIX_STEP),
        # a scoring call's rows may each need their own stored prefix
        store_rows=next_pow2(max(prefixes, score_rows), STORE_ROWS_MIN),
        prefill_rows=round_up(2 * inserts, multiple),
        insert_rows=INSERT_ROWS * inserts,
        insert_width=next_pow2(longest_tail, INSERT_WIDTH_MIN),
        insert_dests=2 * slots * inserts,
        insert_tails=round_up(INSERT_TAILS * inserts, multiple),
        admit_rows=min(slots, ADMIT_ROWS * inserts),
        new_tokens=max(1, new_tokens),
        score_rows=score_rows,
        score_width=next_pow2(longest_scored, SCORE_WIDTH),
        score_tokens=round_up(next_pow2(longest_continuation, SCORE_TOKENS * scale), multiple),
        branch_width=BRANCH_WIDTH * inserts,
        branch_reads=round_up(BRANCH_READS * inserts, multiple),
        k_cap=next_pow2(k_cap, 64),
    )


# --------------------------------------------------------------------------------------------
# Prefixes and tails


@dataclasses.dataclass(frozen=True)
class Split:
    """A prompt cut in two: `prefix` (token ids kept in the store) and `tail` (>= 1 token)."""

    prefix: tuple[int, ...]
    tail: tuple[int, ...]


def split_prompts(prompt_ids: Sequence[Sequence[int]],
                  prefix_ids: Sequence[Sequence[int] | None] | None = None,
                  share: bool | None = None) -> list[Split]:
    """Each prompt cut into a stored prefix and a tail of at least one token.

    `prefix_ids[i]`: the tokens of the text the caller declared prompt i's shared prefix (its
    tokenization on its own); the stored prefix is the part of prompt i's own tokens that agrees
    with it, less its last token (a BPE tokenizer may merge the last prefix token with the
    tail's first), so every prompt declaring one text gets the same prefix whatever the other
    prompts of the call. Without a declared prefix, prompts sharing at least MIN_SHARED_PREFIX
    leading tokens (any, with share=True) share their common prefix; others (and all, with
    share=False) keep all but their last token as a prefix of their own.
    """
    n = len(prompt_ids)
    declared = list(prefix_ids) if prefix_ids is not None else [None] * n
    cut: list[int | None] = [None] * n
    for i, (ids, pre) in enumerate(zip(prompt_ids, declared)):
        if pre and share is not False:
            shared = common_prefix([list(ids), list(pre)[:-1]])
            if shared >= 1:
                cut[i] = min(shared, len(ids) - 1)
    rest = [i for i in range(n) if cut[i] is None]
    if share is not False:
        for length, members in _groups([prompt_ids[i] for i in rest], share):
            for m in members:
                cut[rest[m]] = length
    out = []
    for i, ids in enumerate(prompt_ids):
        c = cut[i] if cut[i] else len(ids) - 1
        out.append(Split(tuple(ids[:c]), tuple(ids[c:])))
    return out


def _groups(prompt_ids: Sequence[Sequence[int]], share: bool | None) -> list[tuple[int, list[int]]]:
    """Prompts sharing a long common prefix: (prefix length, members) in token order; members
    of a one-prompt group or with a prefix below the minimum get length 0."""
    order = sorted(range(len(prompt_ids)), key=lambda i: list(prompt_ids[i]))
    least = 1 if share else MIN_SHARED_PREFIX
    runs: list[tuple[int, list[int]]] = []
    for i in order:
        if runs:
            n, members = runs[-1]
            first = prompt_ids[members[0]]
            shared = min(n, common_prefix([first, prompt_ids[i]]), len(prompt_ids[i]) - 1)
            if shared >= least:
                runs[-1] = (shared, members + [i])
                continue
        runs.append((len(prompt_ids[i]) - 1, [i]))
    return [(n if len(m) > 1 and n >= least else 0, m) for n, m in runs]


# --------------------------------------------------------------------------------------------
# Packing


@dataclasses.dataclass
class Packed:
    """Sequences packed into `[rows, width]`, one prefix per row: sequence b sits in row
    `row[b]` from column `col[b]`, `length[b]` tokens; `seg` numbers each row's sequences from 1
    (0: padding); `pos` counts from the start of each sequence; `prefix[r]` is row r's prefix
    key (None: an empty row); `branch` each token's branch id (0: a sequence's trunk)."""

    ids: np.ndarray
    pos: np.ndarray
    seg: np.ndarray
    row: np.ndarray
    col: np.ndarray
    length: np.ndarray
    prefix: list
    branch: np.ndarray


class RowPacker:
    """First-fit placement of sequences, one at a time, into `rows x width`, a row holding
    sequences of one prefix only: sequence b goes to row `row[b]` from column `col[b]`."""

    def __init__(self, rows: int, width: int):
        self.width = width
        self.free = [width] * rows
        self.owner: list = [None] * rows
        self.row: list[int] = []
        self.col: list[int] = []

    def add(self, length: int, prefix: Any) -> bool:
        """Place a sequence of `length` tokens continuing `prefix`; False (and nothing placed)
        when no row has room for it."""
        if length > self.width:
            raise ValueError(f"a sequence of {length} tokens does not fit rows of {self.width}")
        r = next((i for i, (o, f) in enumerate(zip(self.owner, self.free))
                  if o in (None, prefix) and f >= length), None)
        if r is None:
            return False
        self.owner[r] = prefix
        self.row.append(r)
        self.col.append(self.width - self.free[r])
        self.free[r] -= length
        return True


def pack_rows(seqs: Sequence[Sequence[int]], prefixes: Sequence, rows: int, width: int,
              limit: int, positions: Sequence[Sequence[int]] | None = None,
              branches: Sequence[Sequence[int]] | None = None) -> tuple[Packed, int]:
    """Pack the leading sequences of `seqs` (in order; `prefixes[b]`: sequence b's prefix key)
    into `rows x width`, first fit, a row holding sequences of one prefix only, at most `limit`
    of them. Stops at the first sequence that does not fit; returns the packing (`row`, `col`,
    `length` padded to `limit` with empty sequences) and how many sequences it holds.
    `positions[b]` / `branches[b]`: per-token positions (default 0, 1, ...) and branch ids
    (default 0) of sequence b."""
    packer = RowPacker(rows, width)
    for s, p in zip(seqs[:limit], prefixes[:limit]):
        if not packer.add(len(s), p):
            break
    row, col, owner = packer.row, packer.col, packer.owner
    count = len(row)
    ids = np.zeros((rows, width), np.int32)
    pos = np.zeros((rows, width), np.int32)
    seg = np.zeros((rows, width), np.int32)
    branch = np.zeros((rows, width), np.int32)
    in_row = [0] * rows
    for b in range(count):
        s, r, c = seqs[b], row[b], col[b]
        in_row[r] += 1
        ids[r, c:c + len(s)] = s
        pos[r, c:c + len(s)] = np.arange(len(s)) if positions is None else positions[b]
        seg[r, c:c + len(s)] = in_row[r]
        if branches is not None:
            branch[r, c:c + len(s)] = branches[b]
    pad = limit - count
    lengths = [len(seqs[b]) for b in range(count)]
    return Packed(ids, pos, seg, np.array(row + [0] * pad, np.int32), np.array(col + [0] * pad, np.int32),
                  np.array(lengths + [0] * pad, np.int32), owner, branch), count
