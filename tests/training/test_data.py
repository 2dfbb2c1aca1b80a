"""Tokenization, loss masks, deterministic epoch order, bucketing and packing."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import capital_examples

from gradual_jax.knowledge.data import QAExample
from gradual_jax.training import data as D
from gradual_jax.training.data import TrainingError


def test_tokenize_masks_answer_and_eos_only(tokenizer):
    ex = capital_examples(1)[0]
    (tok,) = D.tokenize_examples([ex], tokenizer, template="gekhman", max_seq_len=64)
    prompt = tokenizer.encode("Answer the following question. What is the capital of France?\n")
    target = tokenizer.encode("Paris", add_special_tokens=False)
    assert list(tok.tokens) == prompt + target + [tokenizer.eos_token_id]
    assert tok.prompt_len == len(prompt)
    batch = D.epoch_batches([tok], batch_rows=1, seed=0, epoch=0, max_seq_len=64)[0]
    n = tok.length
    np.testing.assert_array_equal(batch.input_ids[0, :n], tok.tokens[:-1])
    np.testing.assert_array_equal(batch.labels[0, :n], tok.tokens[1:])
    # Loss exactly on the labels that are answer tokens or EOS.
    masked_labels = batch.labels[0][batch.loss_mask[0] > 0]
    assert list(masked_labels) == target + [tokenizer.eos_token_id]
    assert batch.loss_mask[0, n:].sum() == 0 and (batch.segment_ids[0, n:] == 0).all()


def test_qa_template_target_keeps_leading_space(tokenizer):
    ex = capital_examples(1)[0]
    (tok,) = D.tokenize_examples([ex], tokenizer, template="qa", max_seq_len=64)
    target = tokenizer.encode(" Paris\n", add_special_tokens=False) + [2]
    assert list(tok.tokens[tok.prompt_len:]) == target


def test_long_prompt_truncated_from_left_answer_kept(tokenizer):
    ex = capital_examples(1)[0]
    (full,) = D.tokenize_examples([ex], tokenizer, template="qa", max_seq_len=64)
    (cut,) = D.tokenize_examples([ex], tokenizer, template="qa", max_seq_len=8)
    assert len(cut.tokens) == 9
    np.testing.assert_array_equal(cut.tokens, full.tokens[-9:])
    with pytest.raises(TrainingError, match="P36.train.0.*max_seq_len=2"):
        D.tokenize_examples([ex], tokenizer, template="qa", max_seq_len=2)


def test_empty_training_set_is_an_error(tokenizer):
    with pytest.raises(TrainingError, match="training set is empty"):
        D.tokenize_examples([], tokenizer, template="qa", max_seq_len=32)
    with pytest.raises(TrainingError, match="training set is empty"):
        D.epoch_batches([], batch_rows=4, seed=0, epoch=0, max_seq_len=32)


def _varied(n: int) -> list[QAExample]:
    words = ["alpha", "beta gamma", "delta epsilon zeta", "eta"]
    return [QAExample(f"r.train.{i}", "r", f"What is {' '.join([words[i % 4]] * (1 + i % 5))}?",
                      (words[(i + 1) % 4],), "train") for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_epoch_order_is_a_function_of_seed_and_epoch(tokenizer, packing):
    toks = D.tokenize_examples(_varied(37), tokenizer, template="qa", max_seq_len=48)
    args = dict(batch_rows=4, max_seq_len=48, packing=packing)
    a = D.epoch_batches(toks, seed=3, epoch=1, **args)
    b = D.epoch_batches(toks, seed=3, epoch=1, **args)
    c = D.epoch_batches(toks, seed=3, epoch=2, **args)
    assert len(a) == D.steps_per_epoch(toks, seed=3, epoch=1, **args)
    for x, y in zip(a, b):
        for k in D.BATCH_KEYS:
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    first = lambda bs: [tuple(r[r != 0][:12]) for x in bs for r in x.input_ids]  # noqa: E731
    assert first(a) != first(c)
    # Every example trained exactly once per epoch: answer-token totals match.
    assert sum(x.loss_mask.sum() for x in a) == sum(len(t.tokens) - t.prompt_len for t in toks)
    for x in a:
        assert x.rows == 4
        T = x.input_ids.shape[1]
        assert T <= 48 and (T == 48 or T & (T - 1) == 0)


def test_bucketing_groups_similar_lengths(tokenizer):
    toks = D.tokenize_examples(_varied(64), tokenizer, template="qa", max_seq_len=64)
    batches = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=64)
    padded = sum(x.input_ids.size for x in batches)
    unsorted = 8 * sum(D.bucket_length(max(t.length for t in toks[i:i + 8]), 64) for i in range(0, 64, 8))
    assert padded <= unsorted
    assert sum(x.num_tokens for x in batches) == sum(t.length for t in toks)


def test_packing_segments_and_positions(tokenizer):
    toks = D.tokenize_examples(capital_examples(6), tokenizer, template="qa", max_seq_len=64)
    (batch,) = D.epoch_batches(toks, batch_rows=4, seed=0, epoch=0, max_seq_len=64, packing=True)
    assert batch.num_tokens == sum(t.length for t in toks)
    row = 0
    segs = batch.segment_ids[row]
    assert segs.max() >= 2  # several examples share a row
    for s in range(1, segs.max() + 1):
        idx = np.flatnonzero(segs == s)
        np.testing.assert_array_equal(batch.positions[row, idx], np.arange(len(idx)))
        # Within a segment the labels are the inputs shifted by one.
        np.testing.assert_array_equal(batch.labels[row, idx[:-1]], batch.input_ids[row, idx[1:]])
        assert batch.labels[row, idx[-1]] == tokenizer.eos_token_id
    # Empty filler rows carry no loss.
    for r in range(batch.rows):
        if (batch.segment_ids[r] == 0).all():
            assert batch.loss_mask[r].sum() == 0


def test_split_micro_batches_keeps_row_order(tokenizer):
    toks = D.tokenize_examples(capital_examples(8), tokenizer, template="qa", max_seq_len=32)
    (batch,) = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=32)
    micro = D.split_micro_batches(batch, 4)
    assert micro["input_ids"].shape == (4, 2, batch.input_ids.shape[1])
    np.testing.assert_array_equal(micro["input_ids"].reshape(8, -1), batch.input_ids)
    with pytest.raises(ValueError, match="3 micro-batches"):
        D.split_micro_batches(batch, 3)


def test_loss_positions_gather_the_masked_tokens(tokenizer):
    toks = D.tokenize_examples(capital_examples(8), tokenizer, template="qa", max_seq_len=32)
    (batch,) = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=32)
    where = D.loss_positions(batch.loss_mask)
    pos, w = where["loss_positions"], where["loss_weights"]
    assert pos.shape == (8, 8)  # answers + EOS are at most 8 tokens: bucket 8 of 32 positions
    for r in range(8):
        n = int(batch.loss_mask[r].sum())
        np.testing.assert_array_equal(pos[r, :n], np.flatnonzero(batch.loss_mask[r]))
        assert w[r, :n].sum() == n and w[r, n:].sum() == 0
    assert D.loss_positions(np.ones((2, 16), np.float32)) is None  # every position: no gathering


def test_bucket_rows_halves_the_batch_while_it_holds_the_rows_and_divides():
    assert D.bucket_rows(25, 128, 8) == 32
    assert D.bucket_rows(3, 128, 8) == 8
    assert D.bucket_rows(64, 128, 8) == 64 and D.bucket_rows(65, 128, 8) == 128
    assert D.bucket_rows(5, 96, 8) == 24      # 12 would not split over 8 ways
    assert D.bucket_rows(1, 6, 1) == 3        # 3 is odd: no further halving
    assert D.bucket_rows(3, 128, None) == 128


def test_epoch_batches_cut_short_batches_to_bucket_rows(tokenizer):
    toks = D.tokenize_examples(capital_examples(10), tokenizer, template="qa", max_seq_len=64)
    for packing in (False, True):
        batches = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=64, packing=packing,
                                  row_multiple=2)
        full = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=64, packing=packing)
        assert len(batches) == len(full)
        for cut, whole in zip(batches, full):
            real = int((whole.segment_ids.max(axis=1) > 0).sum())
            assert cut.rows == D.bucket_rows(real, 8, 2) and whole.rows == 8
            for name, a in cut.as_dict().items():  # the same rows, less trailing padding
                b = whole.as_dict()[name]
                np.testing.assert_array_equal(a, b[:cut.rows])
                assert not b[cut.rows:].any()


def _example(i: int, question: str, answer: str) -> QAExample:
    return QAExample(f"q{i}", "P0", question, (answer,), "train")


def test_run_batch_shape_holds_the_longest_example_and_its_loss_positions(tokenizer):
    examples = [_example(0, "Where is Paris?", "France"),
                _example(1, "Which country has the city that is called Ulaanbaatar, the capital?",
                         "Mongolia, a country in East Asia between Russia and China")]
    toks = D.tokenize_examples(examples, tokenizer, template="qa", max_seq_len=128)
    longest = max(t.length for t in toks)
    most_loss = max(len(t.tokens) - t.prompt_len for t in toks)
    shape = D.run_batch_shape(toks, batch_rows=8, max_seq_len=128)
    assert shape == D.BatchShape(8, D.bucket_length(longest, 128), D.bucket_length(most_loss, 128))
    # Packed rows: the row's capacity, the loss bound by the highest loss share of an example.
    packed = D.run_batch_shape(toks, batch_rows=4, max_seq_len=128, packing=True)
    share = max((len(t.tokens) - t.prompt_len) / t.length for t in toks)
    assert packed == D.BatchShape(4, 128, D.bucket_length(int(np.ceil(128 * share)), 128))
    with pytest.raises(TrainingError):
        D.run_batch_shape([], batch_rows=8, max_seq_len=128)


def test_batches_in_a_run_shape_hold_the_bucketed_batches_and_padding_only(tokenizer):
    toks = D.tokenize_examples(capital_examples(12), tokenizer, template="qa", max_seq_len=64)
    for packing in (False, True):
        shape = D.run_batch_shape(toks, batch_rows=8, max_seq_len=64, packing=packing)
        for subset in (toks, toks[:3], toks[5:]):  # a stage trains on part of the run's set
            for epoch in (0, 1):
                args = dict(batch_rows=8, seed=1, epoch=epoch, max_seq_len=64, packing=packing)
                fixed = D.epoch_batches(subset, shape=shape, **args)
                free = D.epoch_batches(subset, row_multiple=1, **args)
                assert len(fixed) == len(free)
                for a, b in zip(fixed, free):
                    assert a.input_ids.shape == (shape.rows, shape.length) and a.loss_tokens == shape.loss_tokens
                    for name, x in a.as_dict().items():
                        y = b.as_dict()[name]
                        np.testing.assert_array_equal(x[:b.rows, :y.shape[1]], y)
                        assert not x[b.rows:].any() and not x[:, y.shape[1]:].any()
                    where = D.loss_positions(a.loss_mask, a.loss_tokens)
                    if shape.loss_tokens < shape.length:
                        assert where["loss_positions"].shape == (shape.rows, shape.loss_tokens)
                        assert where["loss_weights"].sum() == a.loss_mask.sum()
                    else:
                        assert where is None


def test_a_batch_outside_its_shape_is_refused(tokenizer):
    toks = D.tokenize_examples(capital_examples(6), tokenizer, template="qa", max_seq_len=64)
    small = D.BatchShape(4, 4, 2)
    with pytest.raises(ValueError, match="shape holds"):
        D.epoch_batches(toks, batch_rows=4, seed=0, epoch=0, max_seq_len=64, shape=small)
    with pytest.raises(ValueError, match="rows"):
        D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=64, shape=small)
    mask = np.zeros((2, 16), np.float32)
    mask[0, 3:9] = 1
    with pytest.raises(ValueError, match="more than k=4"):
        D.loss_positions(mask, 4)
    assert D.loss_positions(mask, 8)["loss_positions"].shape == (2, 8)
