"""The sampler's host-side planning and packing on their own (no model): bucket sizes, first-fit
packing, prefix groups and batches, against examples worked out by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from gradual_jax.sampling import packing
from gradual_jax.sampling.packing import (
    MIN_SHARED_PREFIX,
    batch_rows,
    bucket_rows,
    common_prefix,
    compact_target,
    first_fit,
    groups,
    next_pow2,
    pack,
    plan,
    round_up,
)


def test_packing_imports_no_jax():
    """Planning is pure Python and numpy: it can run (and be tested) without a device."""
    tree = ast.parse(Path(packing.__file__).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "dataclasses", "collections", "numpy"}, modules


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("n, minimum, want", [(0, 1, 1), (1, 1, 1), (2, 1, 2), (5, 1, 8), (8, 1, 8),
                                              (3, 8, 8), (9, 8, 16), (100, 8, 128)])
def test_next_pow2(n, minimum, want):
    assert next_pow2(n, minimum) == want


def test_round_up():
    assert [round_up(n, 4) for n in (0, 1, 4, 5, 12)] == [0, 4, 4, 8, 12]


def test_bucket_rows_are_1_2_4_then_multiples_of_4():
    assert [bucket_rows(n) for n in range(1, 11)] == [1, 2, 4, 4, 8, 8, 8, 8, 12, 12]
    # and a multiple of the data-parallel size: 3 -> 4 -> 8; 5 -> 8 -> 9
    assert bucket_rows(3, 8) == 8 and bucket_rows(5, 3) == 9


def test_batch_rows_full_batches_keep_their_size_partial_ones_round_to_a_power_of_two():
    assert batch_rows(8, 8) == 8
    assert batch_rows(3, 8) == 4       # partial: next power of two
    assert batch_rows(5, 6) == 6       # but never past a full batch
    assert batch_rows(1, 64) == 1
    assert batch_rows(1, 8, 2) == 2    # a multiple of the data-parallel size
    assert batch_rows(5, 6, 4) == 8


def test_compact_target_is_a_power_of_two_of_at_least_min_compact_rows():
    assert packing.MIN_COMPACT_ROWS == 8
    assert [compact_target(n) for n in (1, 3, 8, 9, 17)] == [8, 8, 8, 16, 32]
    assert compact_target(3, 3) == 9


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1, 2, 3]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 3


# ----------------------------------------------------------------------------- packing


def test_first_fit_decreasing_by_hand():
    # Longest first: 5 opens row 0 (3 left); 4 does not fit there, opens row 1 (4 left);
    # 3 fills row 0 from column 5; 2 goes to row 1 at column 4.
    row, col, used = first_fit([3, 5, 2, 4], width=8)
    assert (row, col, used) == ([0, 0, 1, 1], [5, 0, 4, 0], 2)


def test_first_fit_one_sequence_per_row_when_none_fit_together():
    assert first_fit([6, 6, 6], width=8) == ([0, 1, 2], [0, 0, 0], 3)


def test_pack_by_hand():
    # Widths tried: 8 (2 rows, 16 slots), 16 (1 row, 16 slots), 32 (32 slots): the tie in
    # slots goes to the narrower width.
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    p = pack(seqs, offset=10, count=6, row_multiple=1)
    np.testing.assert_array_equal(p.ids, [[4, 5, 6, 7, 8, 1, 2, 3],
                                          [11, 12, 13, 14, 9, 10, 0, 0]])
    np.testing.assert_array_equal(p.pos, [[10, 11, 12, 13, 14, 10, 11, 12],
                                          [10, 11, 12, 13, 10, 11, 0, 0]])
    np.testing.assert_array_equal(p.seg, [[1, 1, 1, 1, 1, 0, 0, 0],
                                          [3, 3, 3, 3, 2, 2, -1, -1]])
    # two extra (empty) sequences pad the per-sequence arrays to `count`
    assert p.row.tolist() == [0, 0, 1, 1, 0, 0]
    assert p.col.tolist() == [5, 0, 4, 0, 0, 0]
    assert p.length.tolist() == [3, 5, 2, 4, 0, 0]
    assert p.tokens == 16
    assert all(a.dtype == np.int32 for a in (p.ids, p.pos, p.seg, p.row, p.col, p.length))


def test_pack_rows_are_a_multiple_of_the_data_parallel_size():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    p = pack(seqs, offset=0, count=4, row_multiple=4)
    assert p.ids.shape == (4, 8)
    assert (p.seg[2:] == -1).all() and (p.ids[2:] == 0).all()


def test_pack_doubles_the_width_when_that_pads_less():
    # Three 9-token sequences: width 16 holds one per row (3 rows -> 4, 64 slots); width 32
    # holds all three in one row (32 slots); width 64 would be 64 slots.
    p = pack([[7] * 9] * 3, offset=0, count=3, row_multiple=1)
    assert p.ids.shape == (1, 32)
    assert p.col.tolist() == [0, 9, 18] and p.row.tolist() == [0, 0, 0]
    assert p.seg[0].tolist() == [0] * 9 + [1] * 9 + [2] * 9 + [-1] * 5
    assert p.pos[0, :27].tolist() == list(range(9)) * 3


def test_pack_width_is_at_least_min_bucket():
    p = pack([[1]], offset=3, count=1, row_multiple=1)
    assert p.ids.shape == (1, packing.MIN_BUCKET)
    assert p.pos[0, 0] == 3 and p.seg[0].tolist() == [0] + [-1] * (packing.MIN_BUCKET - 1)


# ----------------------------------------------------------------------------- planning

FEW_SHOT = list(range(100, 100 + MIN_SHARED_PREFIX + 4))  # 20 tokens shared by three prompts
PROMPTS = [
    FEW_SHOT + [1, 2],  # 0
    [5, 6, 7],          # 1
    FEW_SHOT + [3],     # 2
    FEW_SHOT + [1, 9],  # 3
    [5, 6, 8],          # 4
]


def test_groups_by_hand():
    # Token order: 1, 4, 0, 3, 2. Prompts 1 and 4 share 2 tokens (< MIN_SHARED_PREFIX): a
    # prefix-less group. 0 and 3 share FEW_SHOT + [1]; with 2 the group's prefix is FEW_SHOT.
    assert groups(PROMPTS, share=None) == [(0, [1, 4]), (len(FEW_SHOT), [0, 3, 2])]


def test_groups_share_true_shares_any_common_prefix_and_false_none():
    assert groups(PROMPTS, share=True) == [(2, [1, 4]), (len(FEW_SHOT), [0, 3, 2])]
    assert groups(PROMPTS, share=False) == [(0, [1, 4, 0, 3, 2])]


def test_groups_leave_every_member_a_token_of_its_own():
    # A prompt that is exactly the shared part still keeps its last token.
    assert groups([FEW_SHOT, FEW_SHOT + [1]], share=None) == [(len(FEW_SHOT) - 1, [0, 1])]


def test_plan_by_hand():
    batches = plan(PROMPTS, per_batch=2, share=None)
    assert [(b.items, b.prefix, b.suffixes) for b in batches] == [
        ([1, 4], (), [[5, 6, 7], [5, 6, 8]]),
        ([0, 3], tuple(FEW_SHOT), [[1, 2], [1, 9]]),
        ([2], tuple(FEW_SHOT), [[3]]),
    ]


def test_plan_covers_every_prompt_once_and_prefix_plus_suffix_is_the_prompt():
    for share in (None, True, False):
        for per_batch in (1, 2, 3, 8):
            batches = plan(PROMPTS, per_batch=per_batch, share=share)
            assert sorted(i for b in batches for i in b.items) == list(range(len(PROMPTS)))
            for b in batches:
                assert len(b.items) <= per_batch
                for i, suffix in zip(b.items, b.suffixes):
                    assert suffix and list(b.prefix) + suffix == PROMPTS[i]
