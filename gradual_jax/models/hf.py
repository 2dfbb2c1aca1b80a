"""Hugging Face checkpoints in and out: `config.json` + safetensors <-> `Transformer`.

Loading builds the model abstractly and fills one parameter at a time. Without a mesh each tensor
is read from its safetensors file, transposed and cast on the host, then put on the device, so a
checkpoint never needs two full host copies. With a mesh each parameter is built straight into its
sharding: every device's slice is read from the file region it covers, cast and laid out on its
own, so a process reads only the slices its devices hold and never a whole sharded tensor.
Saving streams the parameters back one tensor at a time, into `model.safetensors` or, above
`max_shard_size`, into shards with a `model.safetensors.index.json`, named and split as
transformers' `save_pretrained` does.

HF tensors are `(out, in)`; ours are `(in..., out...)` per head: q `(D, N, H)`, k/v `(D, K, H)`,
o `(N, H, D)`, gate/up `(D, F)`, down `(F, D)`, lm_head `(D, V)`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gradual_jax import io
from gradual_jax.configlib import parse_size
from gradual_jax.models.errors import CheckpointError
from gradual_jax.models.transformer import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    Transformer,
    abstract_model,
    as_dtype,
)
from gradual_jax.sharding import (
    ReplicatedAxis,
    param_partition_spec,
    replicated_axes,
    replication_warning,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# What `snapshot_download` fetches for a repo id: config, weights and tokenizer, nothing else.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
]
# model_type -> transformers class written into `architectures`. SmolLM and SmolLM2 checkpoints
# are Llama checkpoints; only SmolLM3 has a model_type of its own.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "smollm": "LlamaForCausalLM", "smollm2": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
_HF_MODEL_TYPE = {"smollm": "llama", "smollm2": "llama"}
_TIED_BY_DEFAULT = {"smollm3"}  # transformers' own default for tie_word_embeddings
_ROPE_TYPES = ("default", "linear", "llama3")
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_from_hf(d: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either transformers 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling` pair."""
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    kind = scaling.get("rope_type", "default")
    if kind not in _ROPE_TYPES:
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported; supported: "
                              f"{', '.join(_ROPE_TYPES)}")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor "
                              f"{scaling['partial_rotary_factor']} is not supported; expected 1.0")
    scaling.pop("partial_rotary_factor", None)
    return theta, (None if kind == "default" else scaling)


def config_from_hf(d: Mapping[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """The `ModelConfig` of an HF `config.json` dict (llama, mistral, qwen2, qwen3, smollm3).

    Raises `CheckpointError` naming `source` and the key for an unsupported model_type, a missing
    required key, or a feature this decoder does not implement (other activations, MLP biases,
    NoPE layers, sliding-window attention in Qwen, unsupported RoPE types).
    """
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if d.get(key) is None:
            raise CheckpointError(f"{source}: missing required key {key!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; expected 'silu'")
    if d.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported; expected false")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    if model_type == "mistral" and d.get("sliding_window") is not None:
        warnings.warn(f"{source}: sliding_window={d['sliding_window']} is ignored; attention is "
                      f"full, which differs from Mistral only beyond that many tokens", stacklevel=2)
    if model_type == "smollm3":
        interval = int(d.get("no_rope_layer_interval", 4))  # transformers' rule when unlisted
        no_rope = d.get("no_rope_layers") or [int((i + 1) % interval != 0)
                                              for i in range(int(d["num_hidden_layers"]))]
        if not all(no_rope):
            raise CheckpointError(f"{source}: no_rope_layers {no_rope} asks for layers without "
                                  f"RoPE (NoPE), which this decoder does not implement")
    theta, scaling = _rope_from_hf(d, source)
    attention_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    if model_type == "mistral" and attention_bias:
        raise CheckpointError(f"{source}: attention_bias is not a Mistral option")
    head_dim = d.get("head_dim")
    return ModelConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]),
        num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
        head_dim=int(head_dim) if head_dim else None,
        model_type=model_type,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
        attention_bias=attention_bias,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict from which transformers builds the same architecture.

    Raises `CheckpointError` when the model_type cannot express the config (q/k norms outside
    Qwen3, Qwen3 without them, q/k/v biases on Mistral).
    """
    mt = config.model_type
    if config.qk_norm != (mt == "qwen3"):
        raise CheckpointError(f"model_type {mt!r} cannot express qk_norm={config.qk_norm} in "
                              f"transformers; only qwen3 has q/k norms (and always has them)")
    if config.attention_bias and mt == "mistral":
        raise CheckpointError("model_type 'mistral' cannot express attention_bias=True; use qwen2")
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    rope = {"rope_theta": float(config.rope_theta), "rope_type": kind, **scaling}
    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[mt]],
        "model_type": _HF_MODEL_TYPE.get(mt, mt),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": float(config.rope_theta),  # for transformers 4, harmless in 5
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
        else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
    }
    if mt in ("llama", "smollm", "smollm2", "qwen3", "smollm3"):
        d["attention_bias"] = config.attention_bias
    if mt in ("llama", "smollm", "smollm2", "smollm3"):
        d["mlp_bias"] = False
    if mt == "mistral":
        d["sliding_window"] = None
    if mt in ("qwen2", "qwen3", "smollm3"):
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    if mt == "smollm3":
        d.update(no_rope_layers=[1] * config.num_layers, no_rope_layer_interval=config.num_layers + 1)
    return d


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of `directory/config.json`; `CheckpointError` if missing or unreadable."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an HF checkpoint directory needs a config.json")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(d, source=str(path))


# --------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and the parameter it fills.

    `transposed`: HF stores it `(out, in)` while ours is `(in..., out...)`; otherwise the two
    differ only by a reshape (biases `(N*H,)` <-> `(N, H)`).
    """

    name: str
    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transposed: bool = False

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transposed else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.transposed:
            return x.reshape(self.hf_shape[1], self.hf_shape[0]).T
        return x.reshape(self.hf_shape)


def hf_tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every parameter of a model with this config, under its transformers name."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), (v, d), (v, d))]
    for i in range(config.num_layers):
        p, a, m = f"model.layers.{i}.", ("layers", i, "attn"), ("layers", i, "mlp")
        specs += [
            TensorSpec(p + "input_layernorm.weight", ("layers", i, "attn_norm", "weight"), (d,), (d,)),
            TensorSpec(p + "self_attn.q_proj.weight", (*a, "q", "kernel"), (n * h, d), (d, n, h), True),
            TensorSpec(p + "self_attn.k_proj.weight", (*a, "k", "kernel"), (k * h, d), (d, k, h), True),
            TensorSpec(p + "self_attn.v_proj.weight", (*a, "v", "kernel"), (k * h, d), (d, k, h), True),
            TensorSpec(p + "self_attn.o_proj.weight", (*a, "o", "kernel"), (d, n * h), (n, h, d), True),
            TensorSpec(p + "post_attention_layernorm.weight", ("layers", i, "mlp_norm", "weight"), (d,), (d,)),
            TensorSpec(p + "mlp.gate_proj.weight", (*m, "gate", "kernel"), (f, d), (d, f), True),
            TensorSpec(p + "mlp.up_proj.weight", (*m, "up", "kernel"), (f, d), (d, f), True),
            TensorSpec(p + "mlp.down_proj.weight", (*m, "down", "kernel"), (d, f), (f, d), True),
        ]
        if config.attention_bias:
            specs += [
                TensorSpec(p + "self_attn.q_proj.bias", (*a, "q", "bias"), (n * h,), (n, h)),
                TensorSpec(p + "self_attn.k_proj.bias", (*a, "k", "bias"), (k * h,), (k, h)),
                TensorSpec(p + "self_attn.v_proj.bias", (*a, "v", "bias"), (k * h,), (k, h)),
            ]
        if config.qk_norm:
            specs += [
                TensorSpec(p + "self_attn.q_norm.weight", (*a, "q_norm", "weight"), (h,), (h,)),
                TensorSpec(p + "self_attn.k_norm.weight", (*a, "k_norm", "weight"), (h,), (h,)),
            ]
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "weight"), (d,), (d,)))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (v, d), (d, v), True))
    return specs


def _zero_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensors our decoder has no parameter for, which must therefore be zero: outside Qwen2,
    transformers' `attention_bias` also puts a bias on o_proj; Qwen2 always has q/k/v biases."""
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    zeros: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_layers):
        p = f"model.layers.{i}.self_attn."
        if config.attention_bias and config.model_type != "qwen2":
            zeros[p + "o_proj.bias"] = (d,)
        if config.model_type == "qwen2" and not config.attention_bias:
            zeros.update({p + "q_proj.bias": (n * h,), p + "k_proj.bias": (k * h,),
                          p + "v_proj.bias": (k * h,)})
    return zeros


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints carry RoPE buffers; tied checkpoints sometimes carry a copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_word_embeddings)


# --------------------------------------------------------------------------------------------
# Placing tensors


class TensorSource(Protocol):
    """An HF-layout tensor read by region: an `np.ndarray` (GGUF's dequantized tensors, torch
    weights) or a `SafetensorsTensor`, which reads only the region asked for from its file."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray: ...


def _whole(source: TensorSource) -> np.ndarray:
    return np.asarray(source[tuple(slice(None) for _ in source.shape)])


Bounds = tuple[tuple[int, int], ...]  # (start, stop) per dim of our layout


def _dim_groups(spec: TensorSpec) -> list[tuple[int, ...]] | None:
    """Our dims grouped by the HF dim each group is the row-major flattening of, in HF's dim
    order with the transpose undone (HF's dims reversed for a transposed tensor): q's `(D, N, H)`
    from `(N*H, D)` is `[(0,), (1, 2)]`. None when the shapes do not factor that way."""
    hf = spec.hf_shape[::-1] if spec.transposed else spec.hf_shape
    groups: list[tuple[int, ...]] = []
    dim = 0
    for size in hf:
        start, prod = dim, 1
        while dim < len(spec.shape) and (dim == start or prod < size):
            prod *= spec.shape[dim]
            dim += 1
        if prod != size:
            return None
        groups.append(tuple(range(start, dim)))
    rest = tuple(range(dim, len(spec.shape)))
    if rest and (not groups or any(spec.shape[d] != 1 for d in rest)):
        return None
    if rest:
        groups[-1] += rest
    return groups


def read_region(source: TensorSource, spec: TensorSpec, bounds: Bounds) -> np.ndarray:
    """Our layout's region `bounds` of the HF tensor `source`, reading from `source` only the
    HF rows and columns it covers.

    A slice of our dims maps to one contiguous range of the HF dim they flatten into (heads
    `n0:n1` of q's `(D, N, H)` are rows `n0*H:n1*H` of HF's `(N*H, D)`, a `D` range is a column
    range) as long as only the first dim of each group is cut; the group's later dims are read
    whole and cut on the host, so a split head_dim (which no rules table of ours asks for) reads
    whole heads. Exact, with no over-read, for every sharding the project's rules produce.
    """
    groups = _dim_groups(spec)
    if groups is None:
        # No TensorSpec of ours gets here (each HF dim flattens consecutive dims of ours); a
        # layout that is not such a flattening has no region mapping, so read it whole.
        return spec.to_ours(_whole(source))[tuple(slice(a, b) for a, b in bounds)]
    hf_index: list[slice] = []
    block_shape: list[int] = []
    cut: list[slice] = []
    for group in groups:
        if not group:  # an HF dim of size 1 with no dim of ours
            hf_index.append(slice(None))
            continue
        first, *later = group
        inner = math.prod(spec.shape[d] for d in later)
        a, b = bounds[first]
        hf_index.append(slice(a * inner, b * inner))
        block_shape += [b - a, *(spec.shape[d] for d in later)]
        cut += [slice(None), *(slice(*bounds[d]) for d in later)]
    if spec.transposed:
        hf_index.reverse()
    block = np.asarray(source[tuple(hf_index)])
    block = block.T if spec.transposed else block
    return block.reshape(block_shape)[tuple(cut)]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _sharding(param: nnx.Variable, shape: tuple[int, ...], mesh: Any, rules: Any
              ) -> tuple[jax.sharding.NamedSharding, list[ReplicatedAxis]]:
    """The parameter's NamedSharding from its `logical_axes`, and the axes its rules name that
    were dropped because they do not divide a dim (the tensor is replicated over those)."""
    axes = tuple(param.get_metadata().get("logical_axes") or (None,) * len(shape))
    spec = param_partition_spec(axes, mesh, rules, shape=shape)
    return jax.sharding.NamedSharding(mesh, spec), replicated_axes(axes, shape, mesh, rules)


def place_sharded(source: TensorSource, spec: TensorSpec, sharding: jax.sharding.Sharding,
                  dtype: np.dtype) -> jax.Array:
    """The parameter `spec` fills, as a `dtype` array laid out by `sharding`, built from the
    regions of `source` that this process's devices hold: device by device, each distinct
    region is read, cast and laid out once (devices holding the same region share it), copied
    to its device and dropped, so besides the device buffers host memory holds one slice at a
    time, the whole tensor only where it is replicated. Nothing else is read.

    Only this process's devices are visited (`addressable_devices_indices_map`), so in a
    multi-process run each process reads its own devices' slices, and nothing is compared
    across processes.
    """
    placements = sharding.addressable_devices_indices_map(spec.shape)
    bounds = {device: _bounds(index, spec.shape) for device, index in placements.items()}
    left = collections.Counter(bounds.values())
    shared: dict[Bounds, np.ndarray] = {}
    arrays = []
    for device, region in bounds.items():
        host = shared.pop(region, None)
        if host is None:
            host = np.ascontiguousarray(read_region(source, spec, region), dtype=dtype)
        arrays.append(jax.device_put(host, device).block_until_ready())
        left[region] -= 1
        if left[region]:
            shared[region] = host
        del host
    return jax.make_array_from_single_device_arrays(spec.shape, sharding, arrays)


def _get(module: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def assemble(config: ModelConfig, tensors: Iterable[tuple[str, TensorSource, str]], *,
             source: str, mesh: Any = None, rules: Any = None) -> Transformer:
    """A `Transformer` filled from `(hf_name, tensor, display_name)` triples, one at a time.

    `tensor` is an array or a lazy `SafetensorsTensor` in HF's layout. Without a `mesh` each is
    read whole, laid out and cast on the host, then put on the default device. With one, each
    parameter is built straight into its sharding by `place_sharded`, reading only the regions
    this process's devices hold; tensors replicated over a mesh axis their rules name (because it
    does not divide the dim) are logged in one warning. `display_name` is what error messages call
    the tensor (its name in the file). Every parameter must be filled exactly once; a tensor of
    the wrong shape, a tensor the config has no place for, or a missing one raises
    `CheckpointError` naming `source` and the tensor.
    """
    specs = {s.name: s for s in hf_tensor_specs(config)}
    zeros = _zero_tensors(config)
    model = abstract_model(config)
    dtype = np.dtype(as_dtype(config.param_dtype))
    filled: set[str] = set()
    replicated: dict[str, tuple[tuple[int, ...], list[ReplicatedAxis]]] = {}
    progress = tqdm(tensors, total=len(specs), desc=f"loading {Path(source).name}", unit="tensor",
                    leave=False)
    for name, tensor, shown in progress:
        spec = specs.get(name)
        expected = spec.hf_shape if spec else zeros.get(name)
        if expected is None:
            if _ignored(name, config):
                continue
            raise CheckpointError(f"{source}: unexpected tensor {shown} for this "
                                  f"{config.model_type} config")
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{source}: tensor {shown} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {expected}")
        if spec is None:
            if np.any(_whole(tensor)):
                raise CheckpointError(f"{source}: tensor {shown} is nonzero, which this decoder "
                                      f"cannot represent")
            continue
        if name in filled:
            raise CheckpointError(f"{source}: tensor {shown} appears twice")
        param = _get(model, spec.path)
        if mesh is None:
            # One host copy per tensor: transpose and cast together.
            value = np.ascontiguousarray(spec.to_ours(_whole(tensor)), dtype=dtype)
            param.set_value(jax.device_put(value))
            del value
        else:
            sharding, dropped = _sharding(param, spec.shape, mesh, rules)
            param.set_value(place_sharded(tensor, spec, sharding, dtype))
            if dropped:
                replicated[shown] = (spec.shape, dropped)
        filled.add(name)
        del tensor
    missing = [name for name in specs if name not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]}{more}")
    warning = replication_warning(replicated)
    if warning:
        log.warning("%s: %s", source, warning)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def _looks_like_path(s: str) -> bool:
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1
            or s.endswith((".json", ".safetensors", ".gguf")))


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint: the path itself, or a Hub snapshot of a repo id
    (config, safetensors and tokenizer files only). `CheckpointError` for a missing local path or
    a repo that cannot be fetched (offline, unknown, no network)."""
    s = os.fspath(path_or_repo_id)
    path = Path(s).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    if _looks_like_path(s):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, network: all mean "cannot get it"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{s}: not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {reason})") from None


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of an HF checkpoint: `model.safetensors`, or the shards its index names."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing; {index.name} names it")
        return files
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} "
                          f"(only safetensors checkpoints are supported)")


_SAFETENSORS_NUMPY = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}


def _numpy_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_SAFETENSORS_NUMPY[code])


class SafetensorsTensor:
    """One tensor of an open safetensors file, read lazily: `t[index]` (a tuple of unit-step
    slices in the file's layout) reads only that region's bytes, with positioned reads
    (``os.preadv``) straight into the result: one read per contiguous run, no memory map, so
    a process's reads and resident memory are the regions it asked for. Valid while its file
    is open. A read that fails raises `CheckpointError` naming the file and tensor."""

    def __init__(self, file: Path, name: str, fd: int, dtype: np.dtype, shape: tuple[int, ...],
                 offset: int) -> None:
        self.file, self.name, self._fd = file, name, fd
        self.dtype, self.shape, self._offset = dtype, tuple(shape), offset

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        bounds = []
        for s, n in zip(index, self.shape):
            start, stop, step = s.indices(n)
            if step != 1:
                raise CheckpointError(f"{self.file}: tensor {self.name}: only unit-step regions are read")
            bounds.append((start, max(start, stop)))
        extent = [b - a for a, b in bounds]
        out = _host_buffer(extent, self.dtype)
        if out.size == 0:
            return out
        # Dims after `k` are read whole, so each run is `extent[k]` rows of them in a row.
        k = len(self.shape) - 1
        while k > 0 and extent[k] == self.shape[k]:
            k -= 1
        item = self.dtype.itemsize
        strides = [math.prod(self.shape[d + 1:]) * item for d in range(len(self.shape))]
        run = extent[k] * strides[k] if self.shape else item
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        for outer in np.ndindex(*extent[:k]):
            start = self._offset + bounds[k][0] * strides[k] if self.shape else self._offset
            start += sum((bounds[d][0] + i) * strides[d] for d, i in enumerate(outer))
            self._read_into(buffer[pos:pos + run], start)
            pos += run
        return out

    def _read_into(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                got = os.preadv(self._fd, [view], offset)
            except OSError as e:
                raise CheckpointError(f"{self.file}: cannot read tensor {self.name} ({e})") from None
            if got == 0:
                raise CheckpointError(f"{self.file}: cannot read tensor {self.name} (file truncated)")
            view, offset = view[got:], offset + got


def _host_buffer(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array; a large one in its own anonymous memory map, which goes back to
    the OS the moment the array is freed (malloc may keep a freed block of a size it has seen
    before, so slice after slice of one tensor would leave several slices resident)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 1 << 20:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)


def _safetensors_header(file: Path, size: int, f: Any) -> tuple[dict[str, Any], int]:
    """(tensor entries by name, offset of the data) of an open safetensors file."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data = 8 + n
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _numpy_dtype(entry["dtype"])
        if end - begin != math.prod(entry["shape"]) * dtype.itemsize or data + end > size:
            raise ValueError(f"tensor {name}: data_offsets {entry['data_offsets']} do not fit "
                             f"its shape and dtype in the file")
    return header, data


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, SafetensorsTensor, str]]:
    """`(name, tensor, name)` for every tensor of `files`, file by file and by name, each a
    lazy `SafetensorsTensor` valid until the next file is opened; nothing but the headers is
    read until a tensor is indexed."""
    for file in files:
        try:
            f = open(file, "rb")
        except OSError as e:
            raise CheckpointError(f"{file}: cannot open ({e})") from None
        with f:
            try:
                header, data = _safetensors_header(file, os.fstat(f.fileno()).st_size, f)
            except (ValueError, KeyError, TypeError, struct.error) as e:
                raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
            for name in sorted(header):  # by name, as safetensors lists them
                entry = header[name]
                yield name, SafetensorsTensor(file, name, f.fileno(), _numpy_dtype(entry["dtype"]),
                                              tuple(entry["shape"]), data + entry["data_offsets"][0]), name


def load_hf(path_or_repo_id: str | os.PathLike, *, dtype: str = "float32",
            compute_dtype: str | None = None, mesh: Any = None, rules: Any = None) -> Transformer:
    """The `Transformer` of an HF safetensors checkpoint (local directory or Hub repo id).

    Parameters are stored in `dtype` and computed in `compute_dtype` (default: `dtype`). With a
    `mesh`, each parameter is sharded by its logical axes through `rules`, and this process reads
    from the files only the slices its devices hold (see `assemble`); otherwise it lives on the
    default device. Tensors are read one at a time. Bad input raises `CheckpointError`.
    """
    directory = resolve_checkpoint(path_or_repo_id)
    config = read_hf_config(directory).replace(param_dtype=dtype, dtype=compute_dtype or dtype)
    files = safetensors_files(directory)
    return assemble(config, iter_safetensors(files), source=str(directory), mesh=mesh, rules=rules)


# --------------------------------------------------------------------------------------------
# Saving


# One tensor to write: (name, shape, dtype, a function producing the array when its turn comes).
Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
def _entry_bytes(entry: Entry) -> int:
    return math.prod(entry[1]) * entry[2].itemsize


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """The entries split into shards as `huggingface_hub.split_torch_state_dict_into_shards`
    splits a state dict (what `save_pretrained` uses): in order, a new shard starts when the next
    tensor would take the current one over the limit, and a tensor bigger than the limit gets a
    shard of its own (placed when it is met, before the shard being filled)."""
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    current_size = 0
    for entry in entries:
        size = _entry_bytes(entry)
        if size > max_shard_size:
            shards.append([entry])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(entry)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _write_safetensors(path: Path, entries: Sequence[Entry], *, desc: str = "writing weights") -> None:
    """Write a safetensors file, producing and writing one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header of name -> dtype, shape
    and byte offsets, then the raw tensors back to back.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        name, shape, dtype, _ = entry
        size = _entry_bytes(entry)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tqdm(entries, desc=desc, unit="tensor", leave=False):
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != shape:
                raise AssertionError(f"{name}: produced {array.shape}, declared {shape}")
            array.tofile(f)


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON with sorted keys (transformers' layout), written atomically."""
    io.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# The order of a layer's tensors in transformers' state dicts (module definition order), which
# decides how `save_pretrained` shards them.
_LAYER_ORDER = [f"self_attn.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
                for p in ("weight", "bias")] + [
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight"]
_TOP_ORDER = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}


def _state_dict_order(name: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        return 1, int(m.group(1)), _LAYER_ORDER.index(m.group(2))
    return _TOP_ORDER[name], 0, 0


def _model_entries(model: Transformer) -> list[Entry]:
    """Every tensor `save_pretrained` would write for `model`, in its state-dict order."""
    config = model.config
    dtype = np.dtype(as_dtype(config.param_dtype))
    entries: list[Entry] = []
    for spec in hf_tensor_specs(config):
        param = _get(model, spec.path)

        def produce(spec: TensorSpec = spec, param: Any = param) -> np.ndarray:
            return spec.to_hf(np.asarray(jax.device_get(param[...])))

        entries.append((spec.name, spec.hf_shape, dtype, produce))
    for name, shape in _zero_tensors(config).items():
        entries.append((name, shape, dtype, lambda shape=shape: np.zeros(shape, dtype)))
    return sorted(entries, key=lambda e: _state_dict_order(e[0]))


def write_weights(out: Path, entries: Sequence[Entry], max_shard_size: int | str) -> list[str]:
    """Write `entries` into `out` as transformers does: one `model.safetensors` when they fit in
    `max_shard_size`, else `model-0000i-of-0000N.safetensors` shards and
    `model.safetensors.index.json`. Each file is written atomically; weight files of an earlier
    save that the new set does not replace are removed afterwards. Returns the file names."""
    shards = plan_shards(entries, parse_size(max_shard_size))
    if len(shards) <= 1:
        names = [WEIGHTS_FILE]
        io.atomic_write(out / WEIGHTS_FILE, lambda p: _write_safetensors(p, list(entries)))
    else:
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for name, shard in zip(names, shards):
            io.atomic_write(out / name, lambda p, shard=shard, name=name: _write_safetensors(
                p, shard, desc=f"writing {name}"))
        index = {"metadata": {"total_parameters": sum(math.prod(e[1]) for e in entries),
                              "total_size": sum(map(_entry_bytes, entries))},
                 "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
        write_json_atomic(out / WEIGHTS_INDEX_FILE, index)
    keep = set(names) | ({WEIGHTS_INDEX_FILE} if len(names) > 1 else set())
    for old in out.iterdir():
        stale = old.name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE) or _SHARD_NAME.fullmatch(old.name)
        if stale and old.name not in keep and old.is_file():
            old.unlink()
    return names


def save_hf(model: Transformer, out_dir: str | os.PathLike, *, tokenizer: Any = None,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` as an HF checkpoint that `AutoModelForCausalLM.from_pretrained` loads as the
    same architecture: `config.json`, the weights in the model's parameter dtype and, when given,
    the tokenizer's files. Weights up to `max_shard_size` (bytes, or a string like "5GB" or
    "500MB") go into one `model.safetensors`, bigger ones into shards with an index, exactly as
    `save_pretrained` names them; tensors are produced one at a time. Each file is written whole
    or not at all. Returns the dir. Raises ValueError for a bad `max_shard_size` and
    `CheckpointError` for a config transformers cannot express, both before writing anything.
    """
    parse_size(max_shard_size)
    hf_config = config_to_hf(model.config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, _model_entries(model), max_shard_size)
    write_json_atomic(out / CONFIG_FILE, hf_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------
# Tokenizers


def _generic_tokenizer_class(directory: Path) -> Any:
    """The generic fast-tokenizer class a checkpoint's tokenizer_config names, else None.

    transformers 5's AutoTokenizer picks the tokenizer class from config.json's model_type
    (Qwen2Tokenizer for qwen2) even when tokenizer_config.json names the generic class, and that
    class rebuilds the pre-tokenizer its own way: a checkpoint with its own tokenizer.json would
    then tokenize differently from how it was trained."""
    import transformers

    try:
        named = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if named in ("TokenizersBackend", "PreTrainedTokenizerFast") and (directory / "tokenizer.json").is_file():
        return getattr(transformers, named, None)
    return None


def _convert_gguf_tokenizer(path: Path) -> Any:
    """The fast tokenizer of a GGUF file's vocabulary: built from our header reader where
    `gguf_tokenizer.build_gguf_tokenizer` can (no PyTorch, about 0.5 s for SmolLM2's), else by
    transformers' `AutoTokenizer` (which needs PyTorch; 5-10 s here)."""
    from gradual_jax.models.gguf_tokenizer import build_gguf_tokenizer

    tokenizer = build_gguf_tokenizer(path)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _gguf_tokenizer(path: Path) -> Any:
    """A GGUF file's tokenizer (`_convert_gguf_tokenizer`), kept converted in the cache
    (`xla_cache.local_cache('tokenizers')`) under the file's resolved path, size and mtime, so
    later loads read it back in a fraction of a second. The saved copy appears whole or not at
    all (`io.atomic_write_dir`; a concurrent writer's copy is as good)."""
    import hashlib

    from transformers import AutoTokenizer

    from gradual_jax.xla_cache import local_cache

    root = local_cache("tokenizers")
    if root is None:
        return _convert_gguf_tokenizer(path)
    real = path.resolve()
    st = real.stat()
    key = hashlib.sha256(f"{real}\x00{st.st_size}\x00{st.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = root / f"{path.stem}-{key}"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = _convert_gguf_tokenizer(path)
    try:
        io.atomic_write_dir(saved, lambda tmp: tokenizer.save_pretrained(str(tmp)))
    except OSError:  # an unwritable cache: the tokenizer is still good
        pass
    return tokenizer


def _needs_torch(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is PyTorch missing."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and (seen.name == "torch" or "'torch'" in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_tokenizer(path_or_gguf: str | os.PathLike) -> Any:
    """A transformers fast tokenizer from an HF directory, a Hub repo id, or a `.gguf` file."""
    from transformers import AutoTokenizer

    s = os.fspath(path_or_gguf)
    try:
        if s.endswith(".gguf"):
            path = Path(s).expanduser()
            if not path.is_file():
                raise CheckpointError(f"{path}: no such GGUF file")
            tokenizer = _gguf_tokenizer(path)
        else:
            directory = resolve_checkpoint(s)
            generic = _generic_tokenizer_class(directory)
            tokenizer = (generic or AutoTokenizer).from_pretrained(str(directory))
    except CheckpointError:
        raise
    except ModuleNotFoundError as e:
        if not _needs_torch(e):
            raise
        raise CheckpointError(
            f"{s}: reading this GGUF file's tokenizer needs PyTorch (its model type has a "
            "tokenizer class of its own, built by transformers' GGUF reader, which imports it; "
            "the weights load without it): pip install 'gradual_jax[gguf]', a CPU build of "
            "torch is enough. Converted once, the tokenizer is kept in the cache and read back "
            "without PyTorch.") from None
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{s}: cannot load a tokenizer ({reason})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{s}: only a slow tokenizer is available; a fast one is required")
    return tokenizer
