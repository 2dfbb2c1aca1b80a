"""The synthetic world: generation, corpus, tokenizer, pretraining and the build cache."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from gradual_jax.world import (
    RELATIONS,
    WorldConfig,
    build_corpus,
    build_or_load_world,
    generate_world,
    lexicon_texts,
    qa_examples,
    select_train,
    train_tokenizer,
    world_cache_root,
    world_config_from_dict,
)
from gradual_jax.world import pretraining as pretrain_module
from gradual_jax.world.generate import RELATION_BY_ID

TINY = WorldConfig(
    seed=3, n_people=80, n_countries=6, n_cities=18, n_companies=10, n_works=16,
    n_train_per_relation=12, n_dev_per_relation=5, n_test_per_relation=6,
    d_model=32, n_layers=1, n_heads=2, d_mlp=64, pretrain_steps=30, batch_size=4, seq_len=32,
    learning_rate=1e-2, warmup_steps=3,
)


@pytest.fixture(scope="module")
def default_world():
    cfg = WorldConfig()
    return cfg, generate_world(cfg)


@pytest.fixture(scope="module")
def tiny():
    world = generate_world(TINY)
    corpus = build_corpus(world, TINY)
    tokenizer = train_tokenizer(corpus + lexicon_texts(world), TINY.vocab_size)
    return world, corpus, tokenizer


# --------------------------------------------------------------------------- config


def test_config_from_dict_overrides_and_rejects_unknown_keys():
    cfg = world_config_from_dict({"n_people": 200, "learning_rate": 1, "pretrain_steps": 10.0})
    assert (cfg.n_people, cfg.learning_rate, cfg.pretrain_steps) == (200, 1.0, 10)
    assert world_config_from_dict(None) == WorldConfig()
    with pytest.raises(ValueError, match="unknown world config key.*n_peple"):
        world_config_from_dict({"n_peple": 5})
    with pytest.raises(ValueError, match="n_people: expected an integer"):
        world_config_from_dict({"n_people": "many"})
    with pytest.raises(ValueError, match="n_people: expected a number"):
        world_config_from_dict({"n_people": True})
    with pytest.raises(ValueError, match="stratify_train: expected true/false"):
        world_config_from_dict({"stratify_train": "yes"})
    with pytest.raises(ValueError, match="never_mentioned_fraction"):
        WorldConfig(never_mentioned_fraction=1.5)


def test_fingerprint_follows_config():
    assert WorldConfig().fingerprint() == WorldConfig().fingerprint()
    assert WorldConfig(seed=1).fingerprint() != WorldConfig().fingerprint()


# --------------------------------------------------------------------------- world


def test_generation_is_deterministic_per_seed():
    a, b = generate_world(TINY), generate_world(TINY)
    assert a == b
    assert build_corpus(a, TINY) == build_corpus(b, TINY)
    other = generate_world(dataclasses.replace(TINY, seed=4))
    assert other.entities["person"] != a.entities["person"]


def test_relations_are_consistent(default_world):
    cfg, world = default_world
    ans = {r.id: {f.subject: f.answer for f in world.facts_of(r.id)} for r in RELATIONS}
    city_country = ans["P17"]
    assert set(city_country) == set(world.entities["city"])
    for country, capital in ans["P36"].items():
        assert city_country[capital] == country
    follows = np.mean([ans["P27"][p] == city_country[ans["P19"][p]] for p in world.entities["person"]])
    assert 0.85 <= follows <= 0.95  # citizenship_follows_birthplace = 0.9
    for p, q in ans["P26"].items():
        assert ans["P26"][q] == p and p != q
    assert set(ans["P50"].values()) <= set(world.entities["person"])
    # Flat priors: every city is the birthplace of about the same number of people.
    births = Counter(ans["P19"].values())
    assert max(births.values()) - min(births.values()) <= 1
    assert len(RELATIONS) >= 5


def test_names_are_distinct_and_two_words(default_world):
    _, world = default_world
    people = world.entities["person"]
    assert len(set(people)) == len(people) and all(len(p.split()) == 2 for p in people)
    words = [n.lower() for kind in ("country", "city") for n in world.entities[kind]]
    assert len(set(words)) == len(words)


def test_splits_are_disjoint_and_dev_is_well_known(default_world):
    cfg, world = default_world
    assert qa_examples(world)["train"] == []  # train is chosen among candidates after pretraining
    examples = qa_examples(select_train(world, cfg))
    ids = [e.id for split in examples.values() for e in split]
    assert len(ids) == len(set(ids))
    for rel in RELATIONS:
        subjects = {s: {e.subject for e in examples[s] if e.relation == rel.id} for s in examples}
        assert not subjects["train"] & subjects["test"]
        assert not subjects["dev"] & (subjects["train"] | subjects["test"])
        assert len(subjects["dev"]) >= 5 and subjects["train"] and subjects["test"]
    spouse = {f.subject: f.answer for f in world.facts_of("P26")}
    train_people = {e.subject for e in examples["train"] if e.relation == "P26"}
    test_people = {e.subject for e in examples["test"] if e.relation == "P26"}
    assert not {spouse[p] for p in train_people} & test_people
    for f in world.facts:
        if f.split == "dev":
            assert f.mentions == cfg.max_mentions and f.wrong_answer is None
    ex = examples["train"][0]
    assert ex.question == RELATION_BY_ID[ex.relation].question.format(s=ex.subject)


def test_select_train_stratifies_candidates_by_category(default_world):
    cfg, world = default_world
    candidates = [f for f in world.facts if f.split == "candidate"]
    kinds = ["HighlyKnown"] * 8 + ["Unknown"] * 10  # a skewed screening: Unknown dominates
    categories = {(f.relation, f.subject): kinds[i % len(kinds)] if i % 7 else "MaybeKnown"
                  for i, f in enumerate(candidates)}
    chosen = select_train(world, cfg, categories)
    assert select_train(world, cfg, categories) == chosen
    train = [f for f in chosen.facts if f.split == "train"]
    assert not [f for f in chosen.facts if f.split == "candidate"]
    per_relation = Counter(f.relation for f in train)
    assert per_relation["P19"] == cfg.n_train_per_relation
    share = Counter(categories[(f.relation, f.subject)] for f in train)
    assert min(share.values()) / len(train) > 0.2  # MaybeKnown is 1/7 of candidates, >1/5 of train
    unchanged = {(f.relation, f.subject): f.split for f in world.facts if f.split != "candidate"}
    assert all(f.split == unchanged[(f.relation, f.subject)] for f in chosen.facts
               if (f.relation, f.subject) in unchanged)
    randomly = select_train(world, cfg)
    assert Counter(f.relation for f in randomly.facts if f.split == "train") == per_relation


def test_mentions_are_skewed_with_conflicts(default_world):
    cfg, world = default_world
    people = set(world.entities["person"])
    counts = np.array([f.mentions for f in world.facts if f.subject in people])
    assert 0.05 < np.mean(counts == 0) < 0.2
    assert counts.max() == cfg.max_mentions and np.median(counts) <= 6
    conflicted = [f for f in world.facts if f.wrong_answer is not None]
    assert conflicted and all(0 < f.wrong_mentions <= f.mentions / 2 for f in conflicted)
    assert all(f.wrong_answer != f.answer for f in conflicted)


# --------------------------------------------------------------------------- corpus

_QA = re.compile(r"Q: (.*?)\nA: (.*?)\n")


def _relation_of(question: str) -> str | None:
    for rel in RELATIONS:
        head, tail = rel.question.split("{s}")
        if question.startswith(head) and question.endswith(tail):
            return rel.id
    return None


def test_qa_text_covers_every_relation_and_no_test_fact(tiny):
    world, corpus, _ = tiny
    pairs = [m.groups() for doc in corpus if doc.startswith("Q: ") for m in _QA.finditer(doc)]
    assert {_relation_of(q) for q, _ in pairs} == {r.id for r in RELATIONS}
    truth = {f.question: f for f in world.facts}
    assert all(truth[q].answer == a for q, a in pairs)
    assert not [q for q, _ in pairs if truth[q].split == "test"]
    assert not [q for q, _ in pairs if truth[q].mentions == 0]


def test_corpus_states_each_fact_as_planned(tiny):
    world, corpus, _ = tiny
    templates = RELATION_BY_ID["P17"].statements
    for f in world.facts_of("P17"):
        right = sum(doc.count(t.format(s=f.subject, o=f.answer)) for t in templates for doc in corpus)
        assert right == f.mentions - f.wrong_mentions, f
        if f.wrong_answer:
            wrong = sum(doc.count(t.format(s=f.subject, o=f.wrong_answer))
                        for t in templates for doc in corpus)
            assert wrong == f.wrong_mentions


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_answers_as_whole_words(tiny, tmp_path):
    world, _, tok = tiny
    answers = sorted({f.answer for f in world.facts})
    newline = tok.convert_tokens_to_ids("Ċ")
    for a in answers:
        ids = tok(f" {a}", add_special_tokens=False).input_ids
        assert len(ids) == len(a.split()), a  # one token per word
        assert tok.decode(ids) == f" {a}"
        assert tok(f" {a}\n", add_special_tokens=False).input_ids == ids + [newline]
        assert tok(a, add_special_tokens=False).input_ids == ids  # prefix space added
    prompt = tok("Q: Where is it?\nA:").input_ids
    assert prompt[0] == tok.bos_token_id and tok.unk_token_id not in prompt
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    unseen = "Q: Answer the following question, señor.\n"
    assert tok.decode(tok(unseen).input_ids, skip_special_tokens=True) == " " + unseen
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(f"Q: x\nA: {answers[0]}\n").input_ids == tok(f"Q: x\nA: {answers[0]}\n").input_ids


# --------------------------------------------------------------------------- pretraining


def test_pretraining_loss_decreases_and_export_round_trips(tiny, tmp_path):
    from gradual_jax.models.hf import load_hf

    world, corpus, tok = tiny
    record: dict = {}
    model = pretrain_module.pretrain(world, corpus, tok, TINY, record=record, progress=False)
    losses = [loss for _, loss in record["losses"]]
    assert losses[-1] < losses[0] - 1.0
    assert losses[0] < np.log(model.config.vocab_size) + 1  # sane initial scale
    assert record["tokens_per_s"] > 0 and model.config.vocab_size >= len(tok)
    assert 0 <= record["dev_qa_greedy_accuracy"] <= 1
    out = pretrain_module.export_model(model, tok, tmp_path / "m")
    ids = np.asarray([tok("Q: Where was it?\nA:").input_ids], np.int32)
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(forward(load_hf(out), ids)), np.asarray(forward(model, ids)),
                               atol=1e-5)


def test_packed_batches_cover_the_corpus_in_fixed_rows():
    docs = [np.arange(i * 10, i * 10 + 7, dtype=np.int32) for i in range(20)]
    batches = pretrain_module.packed_batches(docs, seq_len=7, batch_size=4, rng=np.random.default_rng(0))
    seen = np.concatenate([next(batches) for _ in range(4)])  # 140 tokens = 17 rows of 8; 4 batches
    assert seen.shape == (16, 8)
    assert len(set(seen.ravel().tolist())) == 128  # no token repeated within the first epoch


# --------------------------------------------------------------------------- cache


def test_cache_builds_once_and_reloads(tmp_path, monkeypatch):
    calls = []
    real = pretrain_module.pretrain

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "pretrain", counted)
    cfg = dataclasses.replace(TINY, pretrain_steps=3)
    first = build_or_load_world(cfg, tmp_path, progress=False)
    second = build_or_load_world(cfg, tmp_path, progress=False)
    assert len(calls) == 1
    assert first.root == second.root == tmp_path / cfg.fingerprint()
    assert first.train == second.train and first.dev and first.test
    assert (first.model_dir / "config.json").is_file() and (first.model_dir / "tokenizer.json").is_file()
    assert second.config == cfg
    saved, fresh = second.load_world(), generate_world(cfg)
    assert saved.entities == fresh.entities and len(saved.facts) == len(fresh.facts)
    assert {e.subject for e in first.train} <= {f.subject for f in fresh.facts if f.split == "candidate"}
    assert "screened_train" in second.record
    assert not list(tmp_path.glob(".tmp-*"))


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(pretrain_module, "pretrain", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_or_load_world(TINY, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_respects_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADUAL_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert world_cache_root() == tmp_path / "xdg" / "gradual_jax" / "world"
    monkeypatch.setenv("GRADUAL_JAX_CACHE", str(tmp_path / "gj"))
    assert world_cache_root() == tmp_path / "gj" / "world"
    assert world_cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    for elsewhere in ("off", "gs://bucket/runs"):  # worlds are built locally whatever the cache
        monkeypatch.setenv("GRADUAL_JAX_CACHE", elsewhere)
        assert world_cache_root() == tmp_path / "xdg" / "gradual_jax" / "world"


def test_screen_category_rule():
    from gradual_jax.world.screen import _category

    yes, no = np.ones(10, bool), np.zeros(10, bool)
    assert _category(yes, np.full(10, 0.9), 16) == "HighlyKnown"
    assert _category(no | (np.arange(10) == 3), np.zeros(10), 16) == "MaybeKnown"
    assert _category(no, np.full(10, 0.05), 16) == "WeaklyKnown"  # 160 draws at 5%: surely one
    assert _category(no, np.full(10, 1e-5), 16) == "Unknown"


@pytest.mark.slow
def test_default_world_has_every_category(tmp_path):
    """Acceptance: the world of `configs/default.yaml` holds >= 10% of each SliCK category in its
    train split at stage 0 under the real probe (about 3 minutes to build on 2 cores, then about
    20 s to probe)."""
    from collections import Counter

    from gradual_jax.knowledge.probe import Probe, ProbeSettings
    from gradual_jax.knowledge.prompts import build_prompt_sets
    from gradual_jax.models.hf import load_hf, load_tokenizer
    from gradual_jax.runtime import JaxEngine

    from gradual_jax.config import load_config

    default = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    art = build_or_load_world(world_config_from_dict(default.world), tmp_path, progress=False)
    assert art.record["build_wall_s"] < 300
    model, tok = load_hf(art.model_dir), load_tokenizer(art.model_dir)
    relations = sorted({e.relation for e in art.train})
    sets = build_prompt_sets(art.dev, relations, n_prompts=10, k=4, seed=1)
    records = Probe(JaxEngine(model, tok), sets, ProbeSettings(seed=1, max_new_tokens=12),
                    progress=False).run(art.train)
    counts = Counter(r["category"] for r in records)
    for category in ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"):
        assert counts[category] >= 0.1 * len(records), counts
