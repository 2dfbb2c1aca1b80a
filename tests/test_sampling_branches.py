"""Continuations scored against an insert's tails (`Sampler.generate_and_score`): the same
generations and chances as generating and then scoring (`sample_probability`), the tails run
once, on one device and on a mesh; and the host-side plan (`branches.plan_branches`) by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gradual_jax.sampling import Sampler, packing
from gradual_jax.sampling.branches import Wanted, plan_branches

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling import PREFIX, QUESTIONS, tiny_hf, to_ours, tok  # noqa: E402,F401  (tok: a fixture)

STOP = ("\n",)
# the last is longer than a branch row: it goes to the plain scoring path
TEXTS = [" France", " the cat", " Japan", " the cat sat on the mat. the dog ate the bone. the cat sat on the mat."]


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return to_ours(tiny_hf("llama", len(tok), seed=1, embed_std=0.3))


def _reference(model, tok, conts, **kw):  # noqa: F811
    """Generate, then score every continuation as `sample_probability` does."""
    s = Sampler(model, tok)
    gens = s.generate_batch(QUESTIONS, max_new_tokens=4, stop=STOP, prefix=PREFIX)
    flat = [(i, c) for i, cs in enumerate(conts) for c in cs]
    chances = s.sample_probability([QUESTIONS[i] for i, _ in flat], [c for _, c in flat], prefix=PREFIX,
                                   stop=STOP, **kw)
    out = [[] for _ in conts]
    for (i, _), p in zip(flat, chances):
        out[i].append(p)
    return gens, out, s.stats.scores_skipped


def _conts(model, tok):  # noqa: F811
    # each prompt's own greedy answer (its first token the argmax: never skipped) and the texts
    answers = Sampler(model, tok).generate_batch(QUESTIONS, max_new_tokens=4, stop=STOP, prefix=PREFIX)
    return [[row[0].text] + TEXTS for row in answers]


@pytest.mark.parametrize("kw", [dict(temperature=0.5, top_k=8), dict(temperature=0.7, top_k=0),
                                dict(temperature=0.0)])
def test_generate_and_score_equals_generating_then_scoring(model, tok, kw, monkeypatch):  # noqa: F811
    conts = _conts(model, tok)
    want_gens, want, skipped = _reference(model, tok, conts, **kw)
    # narrow branch calls (8 tokens fed a call for this tiny model): an insert's continuations
    # take several, and the long text goes to the plain scoring path
    monkeypatch.setattr(packing, "BRANCH_WIDTH", 2)
    s = Sampler(model, tok)
    plain_calls = []
    original = s._score_packed
    s._score_packed = lambda packed, take, *a: (plain_calls.append([len(m) for _, m in take]),
                                                original(packed, take, *a))[1]
    gens, chances = s.generate_and_score(QUESTIONS, conts, max_new_tokens=4, stop=STOP, prefix=PREFIX, **kw)
    assert [[g.token_ids for g in row] for row in gens] == [[g.token_ids for g in row] for row in want_gens]
    assert [[g.text for g in row] for row in gens] == [[g.text for g in row] for row in want_gens]
    for got_row, want_row in zip(chances, want):
        assert got_row == pytest.approx(want_row, rel=2e-5, abs=1e-30)
    assert s.stats.scores_skipped == skipped
    if kw["temperature"] > 0:
        assert any(p > 0 for row in chances for p in row[:4])
    # only the long text (one per prompt, where not skipped) went through the plain scoring
    assert sum(sum(c) for c in plain_calls) <= len(QUESTIONS) * 2  # its endings: stop, EOS
    long_ids = s._encode_plain(TEXTS[-1])
    assert len(long_ids) > s.shapes.branch_width + 1
    if kw.get("top_k") == 0 and kw["temperature"] > 0:  # nothing skipped: each long text scored plainly
        assert sum(sum(c) for c in plain_calls) >= len(QUESTIONS)


@pytest.mark.parametrize("layout", ["mesh", "scan"])
def test_generate_and_score_on_a_mesh_or_scanned_equals_one_device(model, tok, layout):  # noqa: F811
    """On a data 4 x tensor 2 mesh of 8 devices, or with the layers scanned over layer-stacked
    keys and values: the generations and chances of one device, unrolled."""
    from gradual_jax.sharding import make_mesh

    conts = _conts(model, tok)
    kw = dict(max_new_tokens=4, stop=STOP, prefix=PREFIX, temperature=0.5, top_k=8)
    gens, chances = Sampler(model, tok).generate_and_score(QUESTIONS, conts, **kw)
    other = (Sampler(model, tok, mesh=make_mesh(data=4, tensor=2)) if layout == "mesh"
             else Sampler(model, tok, scan_layers=True))
    mesh_gens, mesh_chances = other.generate_and_score(QUESTIONS, conts, **kw)
    assert any(p > 0 for row in chances for p in row)
    assert [[g.token_ids for g in row] for row in mesh_gens] == [[g.token_ids for g in row] for row in gens]
    for got_row, want_row in zip(mesh_chances, chances):
        assert got_row == pytest.approx(want_row, rel=2e-5, abs=1e-30)


def test_warm_up_compiles_the_branch_program_and_nothing_compiles_after(model, tok):  # noqa: F811
    from gradual_jax.sampling import compile_cache

    conts = _conts(model, tok)
    compile_cache.COMPILED.clear()
    s = Sampler(model, tok)
    s.prepare_for(QUESTIONS, prefix=PREFIX, max_new_tokens=4, continuations=[c for cs in conts for c in cs],
                  k_cap=8, stop=STOP)
    made, _ = s.warm_up()
    assert made == 6
    s.generate_and_score(QUESTIONS, conts, max_new_tokens=4, stop=STOP, prefix=PREFIX, temperature=0.5, top_k=8)
    assert s.stats.compiles == 6


def test_plan_feeds_continuations_end_to_end_by_hand():
    # an insert of three tails (5, 3 and 4 tokens) in a packing of 4
    wanted = [Wanted("a", 0, (10, 11, 12)), Wanted("b", 1, (20,)), Wanted("c", 2, (30, 31), alt=(1, 99)),
              Wanted("d", 1, (40, 41, 42, 43)), Wanted("e", 2, (50, 51, 52))]
    plan = plan_branches(wanted, tail_length=[5, 3, 4], tails=4, width=5, reads=12)
    # a feeds 10 11, b nothing (one token: read off its tail), c 30; d's three do not fit the
    # two columns left, e's two do
    assert plan.ids.tolist() == [10, 11, 30, 50, 51]
    assert plan.pos.tolist() == [5, 6, 4, 4, 5]
    assert plan.tail.tolist() == [0, 0, 2, 2, 2]
    assert plan.branch.tolist() == [1, 1, 3, 4, 4]
    # reads: a: tail 0's state, then fed tokens 0, 1 (after the 4 tails' states); b: tail 1's;
    # c: tail 2's, then fed token 2; e: tail 2's, then fed tokens 3, 4
    assert plan.read.tolist() == [0, 4, 5, 1, 2, 6, 2, 7, 8, 0, 0, 0]
    assert plan.cont.tolist() == [10, 11, 12, 20, 30, 31, 50, 51, 52, 0, 0, 0]
    assert plan.alt.tolist() == [-1, -1, -1, -1, -1, 99, -1, -1, -1, -1, -1, -1]
    assert [(w.key, k, n) for w, k, n in plan.spans] == [("a", 0, 3), ("b", 3, 1), ("c", 4, 2), ("e", 6, 3)]
    assert [w.key for w in plan.left] == ["d"]
    # the reads run out: what does not fit waits for the next call
    short = plan_branches(wanted, tail_length=[5, 3, 4], tails=4, width=5, reads=4)
    assert [w.key for w, _, _ in short.spans] == ["a", "b"] and [w.key for w in short.left] == ["c", "d", "e"]
    assert short.tail.tolist() == [0, 0, -1, -1, -1]
