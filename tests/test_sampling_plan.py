"""The sampler's host-side shapes, prefix splitting and packing on their own (no model), against
examples worked out by hand."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gradual_jax.sampling import packing
from gradual_jax.sampling.packing import (
    MIN_SHARED_PREFIX,
    Split,
    common_prefix,
    next_pow2,
    pack_rows,
    round_up,
    shapes_for,
    split_prompts,
)


def test_packing_imports_no_jax():
    """Planning is pure Python and numpy: it can run (and be tested) without a device."""
    tree = ast.parse(Path(packing.__file__).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "dataclasses", "collections", "typing", "numpy"}, modules


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("n, minimum, want", [(0, 1, 1), (1, 1, 1), (2, 1, 2), (5, 1, 8), (8, 1, 8),
                                              (3, 8, 8), (9, 8, 16), (100, 8, 128)])
def test_next_pow2(n, minimum, want):
    assert next_pow2(n, minimum) == want


def test_round_up():
    assert [round_up(n, 4) for n in (0, 1, 4, 5, 12)] == [0, 4, 4, 8, 12]


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 3


def test_shapes_round_up_fixed_ladders():
    sh = shapes_for(slots=60, longest_prefix=97, longest_tail=14, new_tokens=16, longest_scored=30,
                    longest_continuation=5, prefixes=30, k_cap=40, multiple=8)
    assert (sh.slots, sh.prefix_width, sh.store_rows) == (64, 128, 32)
    assert (sh.insert_rows, sh.insert_width, sh.insert_dests) == (4, 32, 128)
    assert (sh.score_width, sh.score_tokens, sh.k_cap, sh.admit_rows) == (64, 256, 64, 8)
    assert sh.prefill_rows == 8 and sh.score_rows == 8  # rows the data axes split: multiples of 8
    assert shapes_for(slots=8, longest_continuation=300, multiple=3).score_tokens == 513
    assert shapes_for(slots=4).admit_rows == 4  # never more than the slots
    assert sh.cache_len == 32 + 16  # a slot's own tail and generation; its prefix stays in the store
    # sizes anywhere on the same rungs give the same shapes: no new compile
    same = shapes_for(slots=60, longest_prefix=120, longest_tail=30, new_tokens=16, longest_scored=64,
                      longest_continuation=8, prefixes=17, k_cap=64, multiple=8)
    assert same == sh


def test_small_vocabularies_score_more_tokens_a_call():
    """A scoring call holds at most SCORE_LOGITS logits: SmolLM2 (49,152) and larger keep 256
    tokens in 8 rows, Llama-2's 32,000 takes twice that, a toy vocabulary the capped 16x."""
    from gradual_jax.sampling.packing import score_scale

    assert [score_scale(v) for v in (0, 151_936, 128_256, 49_152, 32_000, 640)] == [1, 1, 1, 1, 2, 16]
    toy = shapes_for(slots=64, longest_continuation=5, vocab=640, multiple=8)
    assert (toy.score_rows, toy.score_tokens) == (128, 4096)
    assert toy.store_rows == 128  # room for every scored row's own prefix
    smol = shapes_for(slots=64, longest_continuation=5, vocab=49_152, multiple=8)
    assert (smol.score_rows, smol.score_tokens) == (8, 256)


def test_small_models_insert_more_rows_a_call():
    """An insert's tails are about INSERT_WORK FLOPs when the model is small: SmolLM2-135M's
    layers (~2.1e8 FLOPs a token) keep the base sizes, a 2-layer width-64 world model takes
    the capped 4x rows, tails, draws, admits and prefixes a call."""
    from gradual_jax.sampling.packing import INSERT_SCALE_MAX, insert_scale

    assert insert_scale(0) == 1 and insert_scale(212_000_000) == 1
    assert insert_scale(2**30 // (4 * 32)) == 1 and insert_scale(2**30 // (4 * 32) // 2) == 2
    assert insert_scale(164_480) == INSERT_SCALE_MAX == 4
    toy = shapes_for(slots=64, flops_per_token=164_480)
    assert (toy.insert_rows, toy.insert_tails, toy.insert_dests, toy.admit_rows) == (16, 32, 512, 32)
    assert toy.prefill_rows == 8
    assert shapes_for(slots=16, flops_per_token=164_480).admit_rows == 16  # never more than the slots


def test_shapes_cover_and_union():
    a = shapes_for(slots=8, longest_prefix=40, longest_tail=10, new_tokens=4)
    b = shapes_for(slots=8, longest_prefix=200, longest_tail=10, new_tokens=8, longest_continuation=20)
    assert not a.covers(b) and b.covers(a)  # b is a with wider prefixes, more tokens
    c = shapes_for(slots=8, longest_prefix=40, longest_tail=100, new_tokens=4)
    assert not b.covers(c) and not c.covers(b)
    u = b.union(c)
    assert (u.insert_width, u.prefix_width) == (128, 224)
    assert u.covers(a) and u.covers(b) and u.covers(c)
    assert (u.prefix_width, u.new_tokens, u.score_tokens) == (224, 8, 256)
    assert not dataclasses.replace(u, slots=16).covers(a)  # slot counts must agree


# ----------------------------------------------------------------------------- prefixes and tails

FEW_SHOT = list(range(100, 100 + MIN_SHARED_PREFIX + 4))  # 20 tokens shared by three prompts
PROMPTS = [
    FEW_SHOT + [1, 2],  # 0
    [5, 6, 7],          # 1
    FEW_SHOT + [3],     # 2
    FEW_SHOT + [1, 9],  # 3
    [5, 6, 8],          # 4
]


def test_split_by_hand():
    # 0, 2 and 3 share FEW_SHOT (0 and 3 share one more token, but 2 does not); 1 and 4 share
    # 2 tokens (< MIN_SHARED_PREFIX): each keeps all but its last token as its own prefix.
    got = split_prompts(PROMPTS)
    assert got == [Split(tuple(FEW_SHOT), (1, 2)), Split((5, 6), (7,)), Split(tuple(FEW_SHOT), (3,)),
                   Split(tuple(FEW_SHOT), (1, 9)), Split((5, 6), (8,))]
    assert split_prompts(PROMPTS, share=True)[1] == Split((5, 6), (7,))


def test_split_keeps_every_prompt_a_tail_token():
    assert split_prompts([FEW_SHOT, FEW_SHOT + [1]]) == [Split(tuple(FEW_SHOT[:-1]), (FEW_SHOT[-1],)),
                                                          Split(tuple(FEW_SHOT[:-1]), (FEW_SHOT[-1], 1))]


def test_declared_prefix_drops_its_last_token_and_ignores_the_other_prompts():
    # The declared text tokenizes on its own as FEW_SHOT + [99] (a merge the prompts do not
    # have): the stored prefix is what agrees, less the declared last token.
    declared = FEW_SHOT + [99]
    alone = split_prompts([FEW_SHOT + [1, 2]], [declared])
    together = split_prompts([FEW_SHOT + [1, 2], FEW_SHOT + [1, 9]], [declared, declared])
    assert alone[0] == together[0] == Split(tuple(FEW_SHOT), (1, 2))


def test_split_covers_every_prompt():
    for share in (None, True, False):
        for s, p in zip(split_prompts(PROMPTS, share=share), PROMPTS):
            assert s.tail and list(s.prefix + s.tail) == p


# ----------------------------------------------------------------------------- packing


def test_pack_rows_by_hand():
    # Rows of 8 never mix prefixes: a (3) and c (2) share row 0; b (5) has prefix 'y' and opens
    # row 1; d (4) has prefix 'x' but does not fit row 0's 3 free slots: the packing stops.
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    p, count = pack_rows(seqs, ["x", "y", "x", "x"], rows=2, width=8, limit=6)
    assert count == 3
    np.testing.assert_array_equal(p.ids, [[1, 2, 3, 9, 10, 0, 0, 0], [4, 5, 6, 7, 8, 0, 0, 0]])
    np.testing.assert_array_equal(p.seg, [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(p.pos[0], [0, 1, 2, 0, 1, 0, 0, 0])
    assert p.prefix == ["x", "y"]
    assert p.row.tolist() == [0, 1, 0, 0, 0, 0] and p.col.tolist() == [0, 0, 3, 0, 0, 0]
    assert p.length.tolist() == [3, 5, 2, 0, 0, 0]  # padded to `limit`
    assert all(a.dtype == np.int32 for a in (p.ids, p.pos, p.seg, p.row, p.col, p.length, p.branch))


def test_pack_rows_takes_positions_and_branches():
    p, count = pack_rows([[1, 2, 3, 4]], ["x"], rows=1, width=6, limit=1,
                         positions=[[0, 1, 2, 2]], branches=[[0, 0, 1, 2]])
    assert count == 1
    assert p.pos[0].tolist() == [0, 1, 2, 2, 0, 0] and p.branch[0].tolist() == [0, 0, 1, 2, 0, 0]


def test_pack_rows_refuses_a_sequence_wider_than_a_row():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([[1] * 9], ["x"], rows=2, width=8, limit=1)


def test_score_plan_by_hand():
    """Trunks take their continuations in order while they fit the row width and the call's
    continuation budget; positions restart after the tail for every continuation."""
    from gradual_jax.sampling.scoring import plan_score_batch, remaining

    a, b = ((1,), (5, 6)), ((2,), (7,))
    conts = [[10, 11], [12], [13, 14, 15], [16]]
    pending = [(a, [0, 1, 2]), (b, [3])]
    take, tokens, positions, branches = plan_score_batch(pending, conts, width=6, budget=8)
    # a: tail (2) + [10, 11] + [12] = 5 tokens; [13, 14, 15] would make 8 > 6 and waits
    assert take == [(a, [0, 1]), (b, [3])]
    assert tokens == [[5, 6, 10, 11, 12], [7, 16]]
    assert positions == [[0, 1, 2, 3, 2], [0, 1]]
    assert branches == [[0, 0, 1, 1, 2], [0, 1]]
    assert remaining(pending, take) == [(a, [2])]
    # the token budget stops a trunk part way, and the call there
    take, *_ = plan_score_batch(pending, conts, width=64, budget=5)
    assert take == [(a, [0, 1])]  # [13, 14, 15] would make 6 > 5 tokens
    assert remaining(pending, take) == [(a, [2]), (b, [3])]
    take, *_ = plan_score_batch(pending, conts, width=64, budget=7)
    assert take == [(a, [0, 1, 2]), (b, [3])]


def test_row_packer_places_first_fit_one_prefix_a_row():
    """By hand: rows of 8, two rows; a row takes sequences of one prefix only."""
    from gradual_jax.sampling.packing import RowPacker

    p = RowPacker(2, 8)
    assert p.add(5, "a") and p.add(3, "a")  # row 0 full
    assert p.add(4, "b")                    # row 1, prefix b
    assert not p.add(2, "a")                # no row of prefix a (or empty) has room
    assert p.add(4, "b")
    assert (p.row, p.col, p.owner) == ([0, 0, 1, 1], [0, 5, 0, 4], ["a", "b"])
    with pytest.raises(ValueError, match="does not fit"):
        p.add(9, "c")
