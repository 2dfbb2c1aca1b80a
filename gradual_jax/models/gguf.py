"""Llama-architecture GGUF files (llama.cpp's format) -> `Transformer`.

Each tensor is dequantized on the host with the `gguf` package's reference code, one at a time,
renamed to its transformers name and handed to the same assembly as safetensors checkpoints. On a
mesh it takes the same sharded path: each device's slice is cut from the dequantized host tensor
(`hf.place_sharded`). Quantized blocks cannot be sliced in general (a block spans a run of a row
and carries its own scales), so each tensor is dequantized whole, but only one at a time.

llama.cpp's converter reorders the rows of q and k inside every head so that its interleaved
RoPE (pairs `(2i, 2i+1)`) equals HF's rotate-half RoPE (pairs `(i, i + H/2)`): each head's rows
`[first half; second half]` become `[r0, r_{H/2}, r1, r_{H/2+1}, ...]`. Loading undoes that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradual_jax.models.errors import CheckpointError
from gradual_jax.models.hf import assemble
from gradual_jax.models.transformer import ModelConfig, Transformer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ROPE_FREQS = "rope_freqs.weight"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_MISSING = object()


def open_gguf(file: str | os.PathLike) -> Any:
    """The header of `file` (`gguf_header.GGUFHeader`: metadata, tensor table, data
    memory-mapped); `CheckpointError` when the file is missing or its header cannot be parsed
    (corrupt, truncated, or naming an unknown tensor type)."""
    from gradual_jax.models.gguf_header import GGUFHeader

    path = Path(file).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = GGUFHeader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, struct/IndexError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable GGUF header ({reason})") from None
    reader.source = str(path)  # for error messages
    return reader


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{reader.source}: missing GGUF key {key!r}")
        return default
    return field.contents()


def hf_name(gguf_name: str) -> str | None:
    """The transformers name of a llama.cpp tensor name, or None for a name we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        part = _BLOCK_NAMES[m.group(2)]
        suffix = m.group(3)
        return f"model.layers.{m.group(1)}.{part}.{suffix}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a q or k weight (or bias) `(n_head*H, ...)`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int,
                         original: int, source: str) -> dict[str, Any]:
    """The Llama-3 `rope_scaling` that llama.cpp baked into `rope_freqs.weight` (per-frequency
    divisors). llama.cpp keeps only the divisors, so this recovers the parameters under Llama
    3.x's own low/high frequency factors (1, 4) and checks they reproduce every divisor."""
    from gradual_jax.models.transformer import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": float(np.max(factors)), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    probe = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                        num_heads=1, head_dim=head_dim, rope_theta=theta)
    base = np.asarray(rope_inv_freq(probe))
    scaled = np.asarray(rope_inv_freq(probe.replace(rope_scaling=scaling)))
    if factors.shape != base.shape or not np.allclose(base / scaled, factors, rtol=1e-4):
        raise CheckpointError(f"{source}: {ROPE_FREQS} does not match Llama-3 rope scaling "
                              f"(factor {scaling['factor']}, original context {original}); "
                              f"other per-frequency RoPE factors are not supported")
    return scaling


def _config(reader: Any, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"{source}: {arch}.rope.dimension_count {rope_dims} differs from "
                              f"head_dim {head_dim}; partial RoPE is not supported")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    tensors = {t.name: t for t in reader.tensors}
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    scaling: dict[str, Any] | None = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif kind != "none":
        raise CheckpointError(f"{source}: {arch}.rope.scaling.type {kind!r} is not supported; "
                              f"supported: none, linear, llama3 ({ROPE_FREQS})")
    if ROPE_FREQS in tensors:
        if scaling is not None:
            raise CheckpointError(f"{source}: both {ROPE_FREQS} and rope scaling {kind!r}")
        original = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
        factors = np.asarray(_dequantize(tensors[ROPE_FREQS], source), np.float32).reshape(-1)
        scaling = _llama3_rope_scaling(factors, theta, head_dim, original, source)
    vocab = _field(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(tensors["token_embd.weight"].shape[1])
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        model_type="llama",
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def gguf_config(file: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` described by a Llama-architecture GGUF file's metadata."""
    return _config(open_gguf(file), os.fspath(file))


def _check_type(tensor: Any, source: str) -> None:
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_QUANT_TYPES:
        raise CheckpointError(f"{source}: tensor {tensor.name} has quantization type {kind}; "
                              f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}")


def _dequantize(tensor: Any, source: str) -> np.ndarray:
    """The tensor as a float array in numpy (row-major) order, i.e. GGUF's dims reversed."""
    from gguf.quants import dequantize

    _check_type(tensor, source)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _tensors(reader: Any, config: ModelConfig, source: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """`(hf_name, array, gguf_name)` per tensor, dequantized and un-permuted one at a time."""
    for tensor in reader.tensors:  # fail on an unknown type before dequantizing anything
        _check_type(tensor, source)
    heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{source}: unexpected tensor {tensor.name} in a llama GGUF")
        w = _dequantize(tensor, source)
        for part, n in heads.items():
            # A wrong row count is left for the shape check, which names the tensor.
            if f".{part}." in name and w.shape[0] == n * config.head_dim:
                w = unpermute_rows(w, n)
        yield name, w, tensor.name


def load_gguf(file: str | os.PathLike, *, dtype: str = "float32", compute_dtype: str | None = None,
              mesh: Any = None, rules: Any = None) -> Transformer:
    """The `Transformer` of a Llama-architecture GGUF file, dequantized to `dtype`.

    Supports the tensor types in `SUPPORTED_QUANT_TYPES`; tensors are dequantized one at a time
    and placed like `load_hf` does: with a `mesh`, straight into each parameter's sharding by its
    logical axes through `rules`, each device's slice cut from the dequantized tensor. Bad input
    raises `CheckpointError`.
    """
    source = os.fspath(file)
    reader = open_gguf(file)
    config = _config(reader, source).replace(param_dtype=dtype, dtype=compute_dtype or dtype)
    return assemble(config, _tensors(reader, config, source), source=source, mesh=mesh, rules=rules)


__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_QUANT_TYPES", "gguf_config", "hf_name",
           "load_gguf", "open_gguf", "unpermute_rows"]
