"""Models: the NNX decoder and its checkpoint I/O (HF safetensors, GGUF)."""

from __future__ import annotations

import os
from typing import Any

from gradual_jax.models.errors import CheckpointError
from gradual_jax.models.gguf import gguf_config, load_gguf
from gradual_jax.models.hf import (
    config_from_hf, config_to_hf, load_hf, load_tokenizer, read_hf_config, resolve_checkpoint, save_hf)
from gradual_jax.models.source import packaged_gguf, resolve_model_source
from gradual_jax.models.transformer import KVCache, ModelConfig, Transformer, init_model


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The architecture of a `.gguf` file or an HF directory / Hub repo id, without its weights."""
    if os.fspath(path).endswith(".gguf"):
        return gguf_config(path)
    return read_hf_config(resolve_checkpoint(path))


def load_model(path: str | os.PathLike, **kwargs: Any) -> Transformer:
    """A model from a `.gguf` file (`load_gguf`) or an HF directory / Hub repo id (`load_hf`);
    keyword arguments (dtype, compute_dtype, mesh, rules) pass through."""
    if os.fspath(path).endswith(".gguf"):
        return load_gguf(path, **kwargs)
    return load_hf(path, **kwargs)


__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "Transformer", "config_from_hf", "config_to_hf",
    "gguf_config", "init_model", "load_gguf", "load_hf", "load_model", "load_tokenizer", "packaged_gguf",
    "read_model_config",
    "resolve_model_source", "save_hf",
]
