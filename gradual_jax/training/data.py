"""QA pairs -> token batches: tokenize, length-bucket or pack, loss on answer tokens only.

One example becomes ``prompt tokens + target tokens + EOS`` (prompt and target from
``format_train_pair``; the first answer is the target). Inputs are the sequence without its last
token, labels the sequence shifted by one, and the loss mask is 1 exactly where the label is a
target token or the EOS.

Order is a pure function of ``(seed, epoch)``: a resumed run sees the same batches. Without
packing, examples of similar length are batched together within windows of a shuffled order.
With packing, examples are laid end to end in rows of ``max_seq_len`` tokens; ``segment_ids`` and
``positions`` keep them apart (the trainer masks attention across segments). A last, short batch
is filled with empty rows (loss mask 0), so no example is dropped.

Batch shapes: given a ``BatchShape`` (``run_batch_shape``: one for a whole run's examples) every
batch has it, so the train step compiles once; without one, each batch is cut to power-of-two
rows and lengths of its own (``bucket_rows``, ``bucket_length``): less padding, one compile per
shape met.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from gradual_jax.errors import UserError
from gradual_jax.knowledge.prompts import format_train_pair

BATCH_KEYS: tuple[str, ...] = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")
MIN_BUCKET = 8
SORT_WINDOW_BATCHES = 8


class TrainingError(UserError):
    """Bad training input (empty set, non-dividing batch, ...); the message says what and why."""


class Tokenizer(Protocol):
    """What the trainer needs of a tokenizer (a Hugging Face tokenizer qualifies)."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """``tokens`` = prompt + target + EOS; the first ``prompt_len`` tokens are prompt."""

    id: str
    tokens: np.ndarray
    prompt_len: int

    @property
    def length(self) -> int:
        """Training positions this example takes (tokens minus one: inputs are shifted)."""
        return len(self.tokens) - 1


@dataclasses.dataclass(frozen=True)
class Batch:
    """Arrays ``[rows, T]``: int32 ``input_ids``, ``labels``, ``segment_ids`` (0 = padding),
    ``positions``; float32 ``loss_mask`` (1 on answer tokens and EOS). ``loss_tokens``: the
    positions a row the loss is read at (``loss_positions``' K; None: a bucket of this batch's
    own)."""

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_tokens: int | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in BATCH_KEYS}

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) positions in the batch."""
        return int((self.segment_ids > 0).sum())


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """One shape for every batch: ``rows`` rows of ``length`` positions, the loss read at
    ``loss_tokens`` positions a row (``length``: at every position)."""

    rows: int
    length: int
    loss_tokens: int


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise TrainingError("tokenizer has no eos_token_id; training appends EOS to every target")
    return int(eos)


def tokenize_examples(examples: Iterable[Any], tokenizer: Tokenizer, *, template: str,
                      max_seq_len: int) -> list[TokenizedExample]:
    """Tokenize QA examples (objects with ``id``, ``question``, ``answers``) for training.

    The prompt is encoded with the tokenizer's special tokens (e.g. BOS), the target without,
    then EOS. A sequence longer than ``max_seq_len + 1`` loses prompt tokens from the left;
    raises TrainingError naming the example when even the target and EOS do not fit, and when
    ``examples`` is empty.
    """
    eos = _eos_id(tokenizer)
    out = []
    for ex in examples:
        prompt, target = format_train_pair(ex.question, ex.answers[0], template)
        p = list(tokenizer.encode(prompt, add_special_tokens=True))
        t = list(tokenizer.encode(target, add_special_tokens=False)) + [eos]
        if len(t) > max_seq_len:
            raise TrainingError(
                f"example {ex.id!r}: answer plus EOS is {len(t)} tokens, more than max_seq_len={max_seq_len}"
            )
        keep = max_seq_len + 1 - len(t)
        if len(p) > keep:
            p = p[len(p) - keep:]
        if not p:
            raise TrainingError(f"example {ex.id!r}: prompt is empty after tokenization")
        out.append(TokenizedExample(ex.id, np.asarray(p + t, np.int32), len(p)))
    if not out:
        raise TrainingError("training set is empty: nothing to fine-tune on")
    return out


def bucket_length(n: int, max_seq_len: int) -> int:
    """The padded length for a batch whose longest row has ``n`` positions."""
    return min(max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1))))), max_seq_len)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The random stream that orders epoch ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng([seed, epoch])


def _row_arrays(examples: Sequence[TokenizedExample], length: int) -> tuple[np.ndarray, ...]:
    """One row holding ``examples`` end to end (segments 1, 2, ...), right-padded to ``length``."""
    ids = np.zeros(length, np.int32)
    labels = np.zeros(length, np.int32)
    mask = np.zeros(length, np.float32)
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    at = 0
    for s, ex in enumerate(examples, 1):
        n = ex.length
        ids[at:at + n] = ex.tokens[:-1]
        labels[at:at + n] = ex.tokens[1:]
        mask[at + ex.prompt_len - 1:at + n] = 1.0  # labels at index >= prompt_len-1 are target tokens
        seg[at:at + n] = s
        pos[at:at + n] = np.arange(n)
        at += n
    return ids, labels, mask, seg, pos


def _make_batch(rows: Sequence[Sequence[TokenizedExample]], n_rows: int, length: int,
                loss_tokens: int | None = None) -> Batch:
    arrays = [np.zeros((n_rows, length), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS]
    for r, row in enumerate(rows):
        for arr, values in zip(arrays, _row_arrays(row, length)):
            arr[r] = values
    return Batch(*arrays, loss_tokens=loss_tokens)


def _loss_count(ex: TokenizedExample) -> int:
    """Positions of ``ex`` that carry loss (its target tokens and EOS)."""
    return len(ex.tokens) - ex.prompt_len


def run_batch_shape(examples: Sequence[TokenizedExample], *, batch_rows: int, max_seq_len: int,
                    packing: bool = False) -> BatchShape:
    """The one shape that holds every batch ``epoch_batches`` makes of ``examples`` or of any
    subset of them, in any epoch: ``batch_rows`` rows; as long as the longest example's bucket
    (packing: ``max_seq_len``, a packed row's capacity); the loss read at a bucket of the most
    loss positions a row can hold (packed rows: their capacity times the highest ratio of loss
    positions to positions of any example), or at every position when that bucket is the length.

    A run gives its whole training set, so every stage's steps share one compiled program."""
    if not examples:
        raise TrainingError("training set is empty: nothing to fine-tune on")
    if packing:
        length = max_seq_len
        need = math.ceil(length * max(_loss_count(e) / e.length for e in examples))
    else:
        length = bucket_length(max(e.length for e in examples), max_seq_len)
        need = max(_loss_count(e) for e in examples)
    return BatchShape(batch_rows, length, min(bucket_length(need, length), length))


def _pack_rows(order: Sequence[TokenizedExample], max_seq_len: int) -> list[list[TokenizedExample]]:
    rows: list[list[TokenizedExample]] = []
    fill = max_seq_len + 1  # forces a new row first
    for ex in order:
        if fill + ex.length > max_seq_len:
            rows.append([])
            fill = 0
        rows[-1].append(ex)
        fill += ex.length
    return rows


def bucket_rows(n: int, batch_rows: int, multiple: int | None) -> int:
    """The rows of a batch holding ``n`` rows of work: ``batch_rows`` halved while the half
    still holds ``n`` and stays a multiple of ``multiple`` (None: always ``batch_rows``).

    A batch short of ``batch_rows`` (an epoch's last, or a stage of a few examples) then
    computes a few padding rows, not a whole batch of them, in one of a handful of shapes."""
    rows = batch_rows
    if multiple is None:
        return rows
    while rows % 2 == 0 and rows // 2 >= n and (rows // 2) % multiple == 0:
        rows //= 2
    return rows


def epoch_batches(examples: Sequence[TokenizedExample], *, batch_rows: int, seed: int, epoch: int,
                  max_seq_len: int, packing: bool = False, row_multiple: int | None = None,
                  shape: BatchShape | None = None) -> list[Batch]:
    """Every batch of epoch ``epoch``, in training order; a pure function of its arguments.

    ``batch_rows`` rows per batch (one optimizer step's worth, all micro-batches together).
    With ``shape`` every batch has that shape (ValueError if one does not fit it); otherwise,
    with ``row_multiple``, a batch of fewer rows of examples is cut to ``bucket_rows`` rows (the
    trainer passes micro-batches x data-parallel ways, so every cut still splits evenly) and
    each batch is as long as its longest row's bucket. Padding carries no loss, so the shape
    changes no step's result beyond float rounding.
    """
    if not examples:
        raise TrainingError("training set is empty: nothing to fine-tune on")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if shape is not None and shape.rows != batch_rows:
        raise ValueError(f"shape has {shape.rows} rows, batches {batch_rows}")
    rng = epoch_rng(seed, epoch)
    order = [examples[i] for i in rng.permutation(len(examples))]
    if packing:
        groups = _pack_rows(order, max_seq_len)
        groups = [groups[i:i + batch_rows] for i in range(0, len(groups), batch_rows)]
    else:
        window = batch_rows * SORT_WINDOW_BATCHES
        singles = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda e: e.length)  # stable: ties keep shuffled order
            singles.extend(chunk[i:i + batch_rows] for i in range(0, len(chunk), batch_rows))
        groups = [[[e] for e in singles[i]] for i in rng.permutation(len(singles))]
    return [_shaped_batch(g, batch_rows, max_seq_len, row_multiple, shape) for g in groups]


def _shaped_batch(rows: Sequence[Sequence[TokenizedExample]], batch_rows: int, max_seq_len: int,
                  row_multiple: int | None, shape: BatchShape | None) -> Batch:
    longest = max(sum(e.length for e in r) for r in rows)
    if shape is None:
        return _make_batch(rows, bucket_rows(len(rows), batch_rows, row_multiple),
                           bucket_length(longest, max_seq_len))
    loss = max(sum(_loss_count(e) for e in r) for r in rows)
    if longest > shape.length or loss > shape.loss_tokens:
        raise ValueError(f"a batch needs {longest} positions and {loss} loss positions a row; "
                         f"the shape holds {shape.length} and {shape.loss_tokens}")
    return _make_batch(rows, shape.rows, shape.length, shape.loss_tokens)


def steps_per_epoch(examples: Sequence[TokenizedExample], *, batch_rows: int, seed: int, epoch: int,
                    max_seq_len: int, packing: bool = False) -> int:
    """Number of batches ``epoch_batches`` gives for these arguments (without building them)."""
    if not packing:
        return sum(math.ceil(min(batch_rows * SORT_WINDOW_BATCHES, len(examples) - w) / batch_rows)
                   for w in range(0, len(examples), batch_rows * SORT_WINDOW_BATCHES))
    order = [examples[i] for i in epoch_rng(seed, epoch).permutation(len(examples))]
    return math.ceil(len(_pack_rows(order, max_seq_len)) / batch_rows)


def loss_positions(loss_mask: np.ndarray, k: int | None = None) -> dict[str, np.ndarray] | None:
    """Where the loss is, per row: ``loss_positions`` ``[rows, K]`` int32 and their weights
    ``loss_weights`` ``[rows, K]`` (0 on padding), K = ``k`` (a `BatchShape`'s; ValueError if a
    row has more) or else a power-of-two bucket of the most loss tokens in a row. None when K is
    not smaller than the row length (then the loss is computed at every position anyway).

    QA answers are a few tokens of each row, so projecting only these hidden states to the
    vocabulary saves most of the LM head's work.
    """
    rows, length = loss_mask.shape
    counts = (loss_mask > 0).sum(axis=1)
    most = int(counts.max()) if rows else 0
    if k is None:
        k = bucket_length(most, length)
    elif most > k:
        raise ValueError(f"a row has {most} loss positions, more than k={k}")
    if k >= length:
        return None
    positions = np.zeros((rows, k), np.int32)
    weights = np.zeros((rows, k), np.float32)
    for r in range(rows):
        idx = np.flatnonzero(loss_mask[r] > 0)
        positions[r, :len(idx)] = idx
        weights[r, :len(idx)] = loss_mask[r, idx]
    return {"loss_positions": positions, "loss_weights": weights}


def split_micro_batches(batch: Batch | dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """Arrays ``[grad_accum, rows / grad_accum, ...]``: micro-batch i is rows ``i*m:(i+1)*m``."""
    arrays = batch.as_dict() if isinstance(batch, Batch) else dict(batch)
    rows = arrays["input_ids"].shape[0]
    if rows % grad_accum:
        raise ValueError(f"batch of {rows} rows does not split into {grad_accum} micro-batches")
    m = rows // grad_accum
    return {k: v.reshape(grad_accum, m, *v.shape[1:]) for k, v in arrays.items()}
