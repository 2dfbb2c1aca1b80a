"""SeedRun's probe step: records of a model whose weights were probed before are copied, not
probed again, and the copy is what a fresh probe writes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gradual_jax.config import load_config
from gradual_jax.knowledge.categories import HIGHLY_KNOWN, MAYBE_KNOWN, UNKNOWN
from gradual_jax.checkpoint import model_digest
from gradual_jax.pipeline import PROBE_INDEX, Resources, SeedRun
from gradual_jax.runtime import JaxEngine

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


class CountingEngine:
    """A JaxEngine that counts the calls reaching the model."""

    calls = 0
    samples = 0

    def __init__(self, model, tokenizer):
        self.inner = JaxEngine(model, tokenizer, batch_size=64)

    def greedy(self, *args, **kw):
        CountingEngine.calls += 1
        return self.inner.greedy(*args, **kw)

    def sample(self, *args, **kw):
        CountingEngine.calls += 1
        CountingEngine.samples += 1
        return self.inner.sample(*args, **kw)

    def answer_probability(self, *args, **kw):
        CountingEngine.calls += 1
        return self.inner.answer_probability(*args, **kw)


@pytest.fixture(scope="module")
def resources(smoke_world, smoke_model):
    model, tokenizer = smoke_model
    train, seen = [], {}
    for e in smoke_world.examples["train"]:  # two questions a relation keep the module fast
        if seen.setdefault(e.relation, 0) < 2:
            seen[e.relation] += 1
            train.append(e)
    splits = {"train": train, "dev": list(smoke_world.examples["dev"]),
              "test": list(smoke_world.examples["test"])[:4]}
    return Resources(model=model, tokenizer=tokenizer, splits=splits, model_id="smoke")


def seed_run(resources, root, digest=model_digest) -> SeedRun:
    def unused(*_args, **_kw):
        raise AssertionError("the probe step must not train, evaluate or load")

    return SeedRun(load_config(SMOKE), resources, 0, root,
                   engine_factory=lambda m: CountingEngine(m, resources.tokenizer),
                   trainer_fn=unused, accuracy_fn=unused, params_io=(unused, unused),
                   model_digest=digest)


def copy_of(model):
    twin = nnx.clone(model)
    nnx.update(twin, jax.tree.map(lambda x: x.copy(), nnx.state(twin)))
    return twin


def test_model_digest_tells_weights_apart(smoke_model):
    model, _ = smoke_model
    twin = copy_of(model)
    assert model_digest(twin) == model_digest(model)
    twin.embed[...] = twin.embed[...].at[0, 0].add(jnp.float32(1e-6))
    assert model_digest(twin) != model_digest(model)
    half = copy_of(model)
    nnx.update(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(half)))
    assert model_digest(half) != model_digest(model)


def test_same_weights_get_the_records_without_a_probe(resources, tmp_path):
    run = seed_run(resources, tmp_path)
    CountingEngine.calls = 0
    first = run.probe(resources.model, "train", tmp_path / "two_stage" / "stage1" / "train.jsonl")
    assert CountingEngine.calls > 0

    CountingEngine.calls = 0
    twin = copy_of(resources.model)
    reused = run.probe(twin, "train", tmp_path / "one_stage" / "stage1" / "train.jsonl")
    assert CountingEngine.calls == 0
    assert reused == first

    # The independent reference: a run that never reuses, probing the same weights afresh.
    fresh = seed_run(resources, tmp_path / "fresh", digest=None).probe(
        twin, "train", tmp_path / "fresh" / "train.jsonl")
    assert fresh == reused
    assert ((tmp_path / "one_stage" / "stage1" / "train.jsonl").read_bytes()
            == (tmp_path / "fresh" / "train.jsonl").read_bytes())

    index = json.loads((tmp_path / PROBE_INDEX).read_text())
    assert sorted(index.values()) == ["two_stage/stage1/train.jsonl"]


def test_other_weights_other_split_or_noise_are_probed(resources, tmp_path):
    run = seed_run(resources, tmp_path)
    run.probe(resources.model, "train", tmp_path / "a" / "train.jsonl")
    changed = copy_of(resources.model)
    changed.embed[...] = changed.embed[...] * 1.01
    for model, split, noise, out in [(changed, "train", False, "b/train.jsonl"),
                                     (resources.model, "test", False, "a/test.jsonl"),
                                     (resources.model, "train", True, "noise/train.jsonl")]:
        CountingEngine.calls = 0
        run.probe(model, split, tmp_path / out, noise=noise)
        assert CountingEngine.calls > 0, out
    assert len(json.loads((tmp_path / PROBE_INDEX).read_text())) == 4


def test_greedy_retest_draws_no_sample_and_keeps_the_greedy_categories(resources, tmp_path):
    """`probe.test_after_training: greedy`: the same greedy answers as the full probe, no sampling
    and no scoring, WeaklyKnown counted as Unknown; and a full probe's records of the same
    weights are not taken for it."""
    run = seed_run(resources, tmp_path)
    full = run.probe(resources.model, "test", tmp_path / "a" / "test.jsonl")
    CountingEngine.calls = CountingEngine.samples = 0
    twin = copy_of(resources.model)
    greedy = run.probe(twin, "test", tmp_path / "b" / "test.jsonl", greedy=True)
    assert CountingEngine.calls == 1 and CountingEngine.samples == 0  # one greedy call
    assert [g["id"] for g in greedy] == [f["id"] for f in full]
    for f, g in zip(full, greedy):
        assert g["greedy_answers"] == f["greedy_answers"]
        assert g["n_sampled"] == 0 and "p_gold" not in g
        assert g["category"] == (f["category"] if f["category"] in (HIGHLY_KNOWN, MAYBE_KNOWN) else UNKNOWN)
    CountingEngine.calls = 0
    again = run.probe(copy_of(resources.model), "test", tmp_path / "c" / "test.jsonl", greedy=True)
    assert CountingEngine.calls == 0 and again == greedy  # greedy records reused for greedy only


def test_a_seeds_probe_shapes_are_fixed_before_stage_0(resources, tmp_path):
    """`warm_up_probes` sizes the run's shared sampler shapes for the train and test probes at
    once: neither stage-0 probe grows them (a test question longer than any train question
    would have grown them, and compiled a second set of programs, when the test probe came)."""
    import dataclasses

    from gradual_jax.pipeline import Resources
    from gradual_jax.sampling.sampler import SharedShapes

    test = list(resources.splits["test"])
    tail = " Answer with the name as it is written in the records of the world, in full, please?"
    long = dataclasses.replace(test[0], id=test[0].id + ".long", question=test[0].question + 2 * tail)
    splits = {**resources.splits, "test": test + [long]}

    def unused(*_args, **_kw):
        raise AssertionError("the probe step must not train, evaluate or load")

    def stage0(root, warm: bool):
        # A model of its own: a model's sampler keeps the shapes it grew to.
        res = Resources(model=copy_of(resources.model), tokenizer=resources.tokenizer, model_id="smoke",
                        splits=splits)
        shared = SharedShapes()
        run = SeedRun(load_config(SMOKE), res, 0, root,
                      engine_factory=lambda m: JaxEngine(m, res.tokenizer, batch_size=64, shapes=shared),
                      trainer_fn=unused, accuracy_fn=unused, params_io=(unused, unused))
        if warm:
            run.warm_up_probes()
        seen = [shared.shapes]
        for split in ("train", "test"):
            run.probe(res.model, split, root / f"{split}.jsonl")
            seen.append(shared.shapes)
        return seen

    _, alone_train, alone_test = stage0(tmp_path / "cold", warm=False)
    assert alone_train != alone_test  # the test probe grew the train probe's shapes
    before, after_train, after_test = stage0(tmp_path / "warm", warm=True)
    assert before == after_train == after_test == alone_test
