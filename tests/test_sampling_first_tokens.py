"""The host-side rule that lets scoring skip a continuation no sample can start with."""

from __future__ import annotations

import numpy as np
import pytest

from gradual_jax.sampling.first_tokens import FirstTokens, excluded, exclusion_margin

# a prompt's four best logits, descending, and their tokens
BEST = np.array([5.0, 4.0, 3.0, 2.0], np.float32)
IDS = np.array([7, 3, 9, 1], np.int32)


@pytest.mark.parametrize("token, top_k, out", [
    (7, 2, False), (3, 2, False),  # inside the top 2
    (9, 2, True), (1, 2, True),    # ranks 3 and 4: 1 or 2 below the cut
    (42, 2, True),                 # beyond the kept four: at most 2.0, under the cut 4.0
    (42, 4, False),                # the cut is the last kept logit: 42 may tie it
    (9, 5, False),                 # top-k larger than what was kept: unknown
    (9, 0, False),                 # top-k 0 keeps every token
])
def test_excluded_outside_the_top_k(token, top_k, out):
    assert excluded(BEST, IDS, token, temperature=0.5, top_k=top_k, margin=0.01) is out


def test_excluded_within_the_margin_is_kept():
    best = np.array([5.0, 4.0, 3.995, 2.0], np.float32)
    assert not excluded(best, IDS, 9, temperature=1.0, top_k=2, margin=0.01)  # 0.005 short
    assert excluded(best, IDS, 9, temperature=1.0, top_k=2, margin=0.001)


def test_greedy_excludes_all_but_the_argmax():
    assert not excluded(BEST, IDS, 7, temperature=0.0, top_k=0, margin=0.01)
    assert excluded(BEST, IDS, 3, temperature=0.0, top_k=0, margin=0.01)
    near = np.array([5.0, 4.999, 3.0, 2.0], np.float32)
    assert not excluded(near, IDS, 3, temperature=0.0, top_k=0, margin=0.01)


def test_margins_by_precision():
    assert exclusion_margin(np.dtype(np.float32)) == 0.01
    assert exclusion_margin(np.dtype(np.float16)) == pytest.approx(0.125)
    import ml_dtypes

    assert exclusion_margin(np.dtype(ml_dtypes.bfloat16)) == 1.0


def test_least_recently_seen_prompts_are_dropped():
    kept = FirstTokens(capacity=2)
    a, b, c = ((1,), (2,)), ((1,), (3,)), ((4,), (5,))
    kept.add(a, BEST, IDS)
    kept.add(b, BEST, IDS)
    kept.add(a, BEST + 1, IDS)  # seen again: now the most recent
    kept.add(c, BEST, IDS)
    assert kept.get(b) is None and len(kept) == 2
    np.testing.assert_array_equal(kept.get(a)[0], BEST + 1)
    kept.clear()
    assert kept.get(a) is None and len(kept) == 0
