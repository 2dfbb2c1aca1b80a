"""Fixtures for training tests: a word-level tokenizer, a tiny model, a shared compilation cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import train_helpers

from train_helpers import CAPITALS, WordTokenizer  # noqa: E402

from gradual_jax.models.transformer import ModelConfig  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    texts = [f"Answer the following question. What is the capital of {c}?\n{a}" for c, a in CAPITALS]
    texts += [f"Q: What is the capital of {c}?\nA: {a}\n" for c, a in CAPITALS]
    return WordTokenizer(texts)


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, eos_token_id=2, bos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Share compiled train steps between tests (same HLO -> cache hit); restored afterwards."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
