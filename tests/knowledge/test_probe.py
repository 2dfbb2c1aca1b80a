"""The SliCK probe on a real (tiny, pretrained) model: mode equivalence, resume, parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradual_jax.knowledge.categories import CATEGORIES, UNKNOWN
from gradual_jax.knowledge.probe import (
    Probe,
    ProbeError,
    ProbeSettings,
    answer_variants,
    category_table,
    row_seed,
    split_prompt,
)
from gradual_jax.knowledge.prompts import build_prompt_sets
from gradual_jax.runtime import JaxEngine

SETTINGS = dict(n_prompts=4, n_samples=4, temperature=0.5, top_k=40, max_new_tokens=8, chunk_size=16)


@pytest.fixture(scope="module")
def setup(smoke_world, smoke_model):
    model, tokenizer = smoke_model
    train = list(smoke_world.examples["train"])
    relations = sorted({e.relation for e in train})
    # A few questions of every relation keep the module fast.
    per_rel: dict[str, list] = {}
    for e in train:
        per_rel.setdefault(e.relation, [])
        if len(per_rel[e.relation]) < 6:
            per_rel[e.relation].append(e)
    examples = [e for rel in relations for e in per_rel[rel]]
    prompts = build_prompt_sets(smoke_world.examples["dev"], relations, n_prompts=4, k=2, seed=0)
    engine = JaxEngine(model, tokenizer, batch_size=64)
    return engine, prompts, examples, tokenizer, model


def _probe(setup, **kw):
    engine, prompts, examples, *_ = setup
    return Probe(engine, prompts, ProbeSettings(**{**SETTINGS, **kw}), progress=False)


def test_lazy_and_exhaustive_agree(setup):
    examples = setup[2]
    exhaustive = _probe(setup, mode="exhaustive").run(examples)
    lazy = _probe(setup, mode="lazy").run(examples)
    assert [r["category"] for r in lazy] == [r["category"] for r in exhaustive]
    assert [r["greedy_answers"] for r in lazy] == [r["greedy_answers"] for r in exhaustive]
    full = SETTINGS["n_prompts"] * SETTINGS["n_samples"]
    assert all(r["n_sampled"] == full for r in exhaustive)
    assert sum(r["n_sampled"] for r in lazy) < sum(r["n_sampled"] for r in exhaustive)
    for r in exhaustive:
        assert r["p_sample"] == r["n_sample_correct"] / full
        assert r["p_greedy"] * SETTINGS["n_prompts"] == pytest.approx(round(r["p_greedy"] * SETTINGS["n_prompts"]))
    # The probe must see more than one category, or the comparison above proves little.
    assert len({r["category"] for r in exhaustive}) >= 2


def test_records_follow_the_slick_rules(setup):
    for r in _probe(setup, mode="exhaustive").run(setup[2]):
        n_greedy = round(r["p_greedy"] * SETTINGS["n_prompts"])
        if n_greedy == SETTINGS["n_prompts"]:
            assert r["category"] == "HighlyKnown"
        elif n_greedy > 0:
            assert r["category"] == "MaybeKnown"
        elif r["n_sample_correct"] > 0:
            assert r["category"] == "WeaklyKnown"
        else:
            assert r["category"] == UNKNOWN


def test_resume_skips_done_chunks_and_repairs_a_cut_line(setup, tmp_path):
    examples = setup[2]
    out = tmp_path / "probe.jsonl"
    first = _probe(setup, mode="lazy").run(examples, out)
    lines = out.read_text().splitlines(keepends=True)
    # Keep the first chunk and half a line of the next, as a kill mid-write would.
    out.write_text("".join(lines[:16]) + lines[16][: len(lines[16]) // 2])
    again = _probe(setup, mode="lazy").run(examples, out)
    assert again == first
    assert len(out.read_text().splitlines()) == len(examples)


def test_output_of_another_configuration_is_refused(setup, tmp_path):
    out = tmp_path / "probe.jsonl"
    _probe(setup, mode="lazy").run(setup[2][:4], out)
    before = out.read_bytes()
    with pytest.raises(ProbeError, match="different configuration"):
        _probe(setup, mode="lazy", seed=1).run(setup[2][:4], out)
    assert out.read_bytes() == before


def test_greedy_answers_match_a_plain_transformers_probe(setup, smoke_world):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from gradual_jax.knowledge.reference import TransformersEngine

    engine, prompts, examples, tokenizer, _ = setup
    hf = AutoModelForCausalLM.from_pretrained(smoke_world.model_dir, dtype=torch.float32)
    ref = Probe(TransformersEngine(hf, tokenizer), prompts,
                ProbeSettings(**{**SETTINGS, "n_samples": 0}), progress=False).run(examples[:12])
    ours = Probe(engine, prompts, ProbeSettings(**{**SETTINGS, "n_samples": 0}),
                 progress=False).run(examples[:12])
    assert [r["greedy_answers"] for r in ours] == [r["greedy_answers"] for r in ref]


def test_screened_categories_match_lazy_and_skip_sampling(setup):
    examples = setup[2]
    lazy = _probe(setup, mode="lazy").run(examples)
    screened = _probe(setup, mode="screened").run(examples)
    disagree = [(a["id"], a["category"], b["category"]) for a, b in zip(lazy, screened)
                if a["category"] != b["category"]]
    assert len(disagree) <= 1, disagree
    undecided = [r for r in screened if r["p_greedy"] == 0]
    assert all("q" in r and len(r["q"]) == SETTINGS["n_prompts"] for r in undecided)
    skipped = [r for r in undecided if r["sampling_skipped"]]
    assert all(r["category"] == UNKNOWN and r["n_sampled"] == 0 for r in skipped)
    for r in undecided:
        expected = SETTINGS["n_samples"] * sum(r["q"])
        assert r["expected_right_samples"] == pytest.approx(expected)
        none = math.prod((1 - q) ** SETTINGS["n_samples"] for q in r["q"])
        assert r["p_any_right"] == pytest.approx(1 - none, abs=1e-9)


def test_answer_probability_matches_sampled_frequency(setup):
    """q (teacher-forced chance that a sample under the top-k tempered distribution is exactly
    ` gold`, ended by the newline or by EOS) against the frequency of that exact answer over
    many samples, however each ended."""
    engine, prompts, examples, _, _ = setup
    n = 512
    best = None
    for ex in examples:
        prefix, suffix = split_prompt(prompts[ex.relation][0], ex.question)
        q = engine.answer_probability([(prefix, suffix)], [[f" {ex.answers[0]}"]], temperature=0.5, top_k=40)[0][0]
        if 0.05 < q < 0.95:
            best = (prefix, suffix, ex, q)
            break
    if best is None:
        pytest.skip("no question with a moderate answer probability in this world")
    prefix, suffix, ex, q = best
    samples = engine.sample([(prefix, suffix)], n, [row_seed(0, ex.id, 0)], temperature=0.5,
                            top_k=40, max_new_tokens=8)[0]
    hits = sum(s == f" {ex.answers[0]}" for s in samples)
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(hits / n - q) < 4 * sd + 1e-3, (hits / n, q)


def test_answer_probability_matches_a_plain_transformers_scorer(setup, smoke_world, tmp_path):
    """Our q against the transformers reference (every prompt of a few questions, each gold
    surface form) on the smoke model made to end its answers with EOS as often as it starts the
    newline (EOS's output row set to that of the newline's first token, as fine-tuning on
    answer+EOS would push it): both count either ending, so q is well above the newline-only
    chance the probe counted before."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from gradual_jax.knowledge.reference import TransformersEngine
    from gradual_jax.models import load_hf

    _, prompts, examples, tokenizer, _ = setup
    hf = AutoModelForCausalLM.from_pretrained(smoke_world.model_dir, dtype=torch.float32)
    answer = tokenizer.encode(" a", add_special_tokens=False)
    newline = tokenizer.encode(" a\n", add_special_tokens=False)[len(answer)]  # the newline's first token
    assert tokenizer.eos_token_id not in (None, newline)
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = head[newline]
    hf.save_pretrained(tmp_path)
    engine = JaxEngine(load_hf(tmp_path), tokenizer, batch_size=64)
    ref = TransformersEngine(hf, tokenizer)
    asked = [(split_prompt(prompts[ex.relation][i], ex.question), [f" {v}" for v in answer_variants(ex.answers[0])])
             for ex in examples[:6] for i in range(SETTINGS["n_prompts"])]
    kw = dict(temperature=0.5, top_k=40)
    ours = engine.answer_probability([p for p, _ in asked], [c for _, c in asked], **kw)
    theirs = ref.answer_probability([p for p, _ in asked], [c for _, c in asked], **kw)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-6)
    newline_only = engine.sampler.sample_probability(
        [q for (_, q), cs in asked for _ in cs], [c + "\n" for _, cs in asked for c in cs],
        prefix=[p for (p, _), cs in asked for _ in cs], **kw)
    with_eos = [x for row in ours for x in row]
    assert sum(newline_only) > 0.5 and sum(with_eos) > sum(newline_only) + 0.5
    assert all(a >= b - 1e-7 for a, b in zip(with_eos, newline_only))


class _Undercounting:
    """An engine whose gold scoring counts a thousandth of what ours does: an older scoring
    that missed some of the ways a sample matches (as gold scoring 1 missed the EOS ending)."""

    def __init__(self, inner):
        self.inner = inner

    def greedy(self, *args, **kw):
        return self.inner.greedy(*args, **kw)

    def sample(self, *args, **kw):
        return self.inner.sample(*args, **kw)

    def answer_probability(self, *args, **kw):
        return [[p * 1e-3 for p in row] for row in self.inner.answer_probability(*args, **kw)]


def test_records_of_an_older_gold_scoring_are_brought_up_to_date(setup, tmp_path):
    """A screened probe file written under gold scoring 1 is rewritten as a fresh probe would
    write it: q again, and the questions the new q no longer screens out sampled on their own
    stream; the file then carries the current fingerprint and reads as done."""
    engine, prompts, examples, *_ = setup
    settings = ProbeSettings(**{**SETTINGS, "mode": "screened"})
    out = tmp_path / "probe.jsonl"
    old = Probe(_Undercounting(engine), prompts, settings, progress=False)
    before = old.run(examples, out)
    meta = out.with_name(out.name + ".meta.json")
    meta.write_text(json.dumps({"fingerprint": old.fingerprint(scoring=1)}))
    assert old.fingerprint(scoring=1) != old.fingerprint()
    fresh = Probe(engine, prompts, settings, progress=False).run(examples)
    updated = Probe(engine, prompts, settings, progress=False).run(examples, out)
    floats = ("q", "p_gold", "expected_right_samples", "p_any_right")
    for a, b in zip(updated, fresh):
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        for k in floats:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-9)
    reopened = [json.loads(line) for line in out.read_text().splitlines()]
    assert reopened == updated
    assert json.loads(meta.read_text())["fingerprint"] == Probe(engine, prompts, settings).fingerprint()
    opened = [(a["id"], a["category"]) for a, b in zip(before, updated) if a["sampling_skipped"] and not b["sampling_skipped"]]
    assert opened  # the update sampled questions the old scoring screened out
    counting = _CountingEngine(engine)
    assert Probe(counting, prompts, settings, progress=False).run(examples, out) == updated
    assert counting.scored == 0


def test_answer_variants_normalise_to_the_gold():
    assert answer_variants("paris") == ["paris", "Paris", "the paris", "The paris"]
    assert answer_variants("The Hague") == ["The Hague", "the Hague"]


def test_category_table_counts_every_relation():
    recs = [{"relation": "P1", "category": c} for c in CATEGORIES] + [{"relation": "P2", "category": UNKNOWN}]
    table = category_table(recs)
    assert "P1" in table and "P2" in table and table.splitlines()[-1].split()[-1] == "5"


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "P1.train.3", 2) == row_seed(0, "P1.train.3", 2)
    seeds = {row_seed(s, f"id{i}", j) for s in range(2) for i in range(20) for j in range(10)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**31 for s in seeds)
    assert np.unique(list(seeds)).size == 400


class _CountingEngine:
    """Counts the teacher-forced scoring calls reaching the model."""

    def __init__(self, inner):
        self.inner, self.scored = inner, 0

    def greedy(self, *args, **kw):
        return self.inner.greedy(*args, **kw)

    def sample(self, *args, **kw):
        return self.inner.sample(*args, **kw)

    def answer_probability(self, prompts, continuations, **kw):
        self.scored += len(prompts)
        return self.inner.answer_probability(prompts, continuations, **kw)


def test_every_mode_records_the_gold_probability_once(setup):
    engine, prompts, examples, *_ = setup
    runs, scored = {}, {}
    for mode in ("exhaustive", "lazy", "screened"):
        counting = _CountingEngine(engine)
        runs[mode] = Probe(counting, prompts, ProbeSettings(**{**SETTINGS, "mode": mode}),
                           progress=False).run(examples)
        scored[mode] = counting.scored
    # every question once per prompt, in every mode: screening reuses the measure
    assert set(scored.values()) == {len(examples) * SETTINGS["n_prompts"]}
    for recs in runs.values():
        for r in recs:
            assert len(r["q"]) == SETTINGS["n_prompts"] and all(0.0 <= q <= 1.0 for q in r["q"])
            assert r["p_gold"] == pytest.approx(sum(r["q"]) / SETTINGS["n_prompts"])
            assert r["expected_right_samples"] == pytest.approx(SETTINGS["n_samples"] * sum(r["q"]))
    # Teacher forcing draws no random numbers: the same q, and the same categories, in every mode.
    assert [r["q"] for r in runs["lazy"]] == [r["q"] for r in runs["exhaustive"]]
    assert [r["q"] for r in runs["screened"]] == [r["q"] for r in runs["exhaustive"]]
    assert [r["category"] for r in runs["lazy"]] == [r["category"] for r in runs["exhaustive"]]
    # Exhaustive sampling counts right samples; q predicts their number (sampled against
    # teacher-forced, two independent routes). Right samples in other surface forms than the
    # scored variants can only add to the count, so the bound below is one-sided.
    ex = runs["exhaustive"]
    observed = sum(r["n_sample_correct"] for r in ex)
    expected = sum(r["expected_right_samples"] for r in ex)
    var = sum(SETTINGS["n_samples"] * q * (1 - q) for r in ex for q in r["q"])
    assert observed >= expected - 4 * var**0.5 - 1, (observed, expected)
    assert observed <= 1.25 * expected + 4 * var**0.5 + 1, (observed, expected)
    by_cat = {c: [r["p_gold"] for r in ex if r["category"] == c] for c in ("HighlyKnown", UNKNOWN)}
    if all(by_cat.values()):
        assert np.mean(by_cat["HighlyKnown"]) > np.mean(by_cat[UNKNOWN])


def test_without_the_gold_probability_only_screening_scores(setup):
    """`gold_probability: false`: lazy scores nothing and records no `q`; screened scores only
    the questions no greedy answer got right; the categories are those of the full probe."""
    engine, prompts, examples, *_ = setup
    full = {r["id"]: r for r in _probe(setup, mode="screened").run(examples)}
    for mode in ("lazy", "screened"):
        counting = _CountingEngine(engine)
        recs = Probe(counting, prompts, ProbeSettings(**{**SETTINGS, "mode": mode, "gold_probability": False}),
                     progress=False).run(examples)
        undecided = [r for r in recs if r["p_greedy"] == 0]
        assert counting.scored == (len(undecided) * SETTINGS["n_prompts"] if mode == "screened" else 0)
        for r in recs:
            assert ("q" in r) == (mode == "screened" and r["p_greedy"] == 0)
            if mode == "screened":
                assert r["category"] == full[r["id"]]["category"]
                # other packings, other float rounding
                assert r.get("q", full[r["id"]]["q"]) == pytest.approx(full[r["id"]]["q"], rel=1e-5, abs=1e-9)
