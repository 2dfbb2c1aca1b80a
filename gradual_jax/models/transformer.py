"""One Flax NNX decoder for the Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM.

Weights keep Hugging Face's rotate-half RoPE layout, so checkpoints import without permutation.
Projection kernels are stored per head: q `(D, N, H)`, k/v `(D, K, H)`, o `(N, H, D)`. Every
parameter carries `logical_axes` metadata that `gradual_jax.sharding` maps to the mesh.

`Transformer.__call__` is the one forward pass: training (plain or packed rows), the sampler's
prefix and tail prefill, decoding and scoring all run through it. A call is
`model(input_ids, attention_mask)`; positions come from the mask, so a left-padded row gives the
same logits as the unpadded row. `segment_ids` packs several sequences into a row. With `cache=`
the call also writes keys and values into a preallocated `KVCache` at each row's own `end` and
returns `(logits, cache)`; one new token per row attends through the multiply-reduce decode
kernel (`Attention.decode`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradual_jax.sharding import constrain_batch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2", "smollm3")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | Any) -> Any:
    """The jnp dtype named `name` ('float32', 'bfloat16', 'float16'); dtypes pass through."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


class FrozenDict(dict):
    """A read-only dict that hashes, so a ModelConfig holding `rope_scaling` can be a static
    argument of `jax.jit` (a graphdef hashes its module's config)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("FrozenDict is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder, in Hugging Face's vocabulary (`num_layers` = layers)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    dropout_rate: float = 0.0
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        as_dtype(self.param_dtype)
        as_dtype(self.dtype)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS token ids as a tuple (empty when the config names none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count implied by the config (embeddings counted once when tied)."""
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = d * n * h * 2 + d * k * h * 2
        if self.attention_bias:
            attn += n * h + 2 * k * h
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    def layer_flops_per_token(self) -> int:
        """Matmul FLOPs of one token's pass through the layers: 2 per weight, embeddings and
        LM head left out (and attention's scores, which grow with the context)."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return 2 * (self.num_params() - emb)


# --------------------------------------------------------------------------------------------
# KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys and values for every layer, with per-row slot bookkeeping.

    `keys[i]`, `values[i]`: `[B, S, K, H]` for layer i, either a list of one array a layer or one
    layer-stacked array `[L, B, S, K, H]` (what a model with stacked layers reads: see
    `Transformer.stacked`). `mask[b, s]` is true where slot s of row b
    holds a real token. `end` is the next slot to write: one for every row (a scalar) or each
    row's own (`[B]`). Positions of new tokens continue from each row's count of real tokens,
    so masked gaps, and the order slots were written in, change nothing.
    """

    keys: list[jax.Array] | jax.Array
    values: list[jax.Array] | jax.Array
    mask: jax.Array
    end: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, size: int, dtype: Any = None, *,
             stacked: bool = False) -> "KVCache":
        """An empty cache; `stacked`: one layer-stacked array for keys and one for values."""
        dtype = as_dtype(dtype or config.dtype)
        shape = (batch, size, config.num_kv_heads, config.head_dim)
        zeros = lambda: layer_buffers(config.num_layers, shape, lambda sh: jnp.zeros(sh, dtype),  # noqa: E731
                                      stacked=stacked)
        return cls(keys=zeros(), values=zeros(), mask=jnp.zeros((batch, size), jnp.bool_),
                   end=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.mask.shape[1]

    def lengths(self) -> jax.Array:
        """Real tokens held per row, `[B]` int32."""
        return self.mask.sum(-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefix:
    """Keys and values that many rows read and none writes: stored prompt prefixes, each
    computed once, that a cache's rows attend to before their own slots (decoding only).

    `keys[i]`, `values[i]`: `[R, P, K, H]` for layer i (a list, or layer-stacked as the cache
    that reads them), one stored prefix a row. Cache row b
    reads stored row `rows[b]`, at the slots where `mask[b]` (`[B, P]`) is true; its own
    tokens' positions continue after them.
    """

    keys: list[jax.Array] | jax.Array
    values: list[jax.Array] | jax.Array
    rows: jax.Array
    mask: jax.Array

    def lengths(self) -> jax.Array:
        """Real prefix tokens per cache row, `[B]` int32."""
        return self.mask.sum(-1).astype(jnp.int32)


def write_at(buffer: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
    """`buffer` `[B, S, ...]` with `new` `[B, T, ...]` written from slot `end`: one slot for
    every row (a scalar: a plain dynamic update, which partitions without communication) or
    each row's own (`[B]`)."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(end) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, end) + (0,) * (buffer.ndim - 2))

    def one(buf: jax.Array, x: jax.Array, at: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(buf, x, (at,) + (0,) * (buf.ndim - 1))

    return jax.vmap(one)(buffer, new, end)


def is_stacked(buffers: list[jax.Array] | jax.Array) -> bool:
    """Whether per-layer `buffers` are one layer-stacked array rather than a list."""
    return not isinstance(buffers, (list, tuple))


def layer_buffers(num_layers: int, shape: tuple[int, ...], make: Any, *, stacked: bool) -> Any:
    """Per-layer buffers of `shape`: `make(shape)` once a layer (a list) or, `stacked`, one
    `make((num_layers, *shape))`."""
    return make((num_layers, *shape)) if stacked else [make(shape) for _ in range(num_layers)]


def map_layers(fn: Any, *buffers: Any) -> Any:
    """`fn` applied to each layer's buffers: element by element for per-layer lists, through
    `jax.vmap` over the layer axis for layer-stacked arrays. The result has the same layout."""
    if not is_stacked(buffers[0]):
        return [fn(*xs) for xs in zip(*buffers)]
    return jax.vmap(fn)(*buffers)


# --------------------------------------------------------------------------------------------
# Layers


def _param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype: Any,
           fan_in: int, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (_normal(rngs.params(), shape) / math.sqrt(fan_in)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Standard normal values from `key`. Concrete keys draw on the host with numpy: eager
    `jax.random.normal` compiles once per shape, which made a tiny model's init take seconds."""
    if isinstance(key, jax.core.Tracer):  # under nnx.eval_shape / jit: stay abstract
        return jax.random.normal(key, shape, jnp.float32)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


class LoRA(nnx.Module):
    """Low-rank adapter `x @ a @ b * alpha / rank` beside a frozen projection.

    `a`: input dims -> rank (random), `b`: rank -> output dims (zeros), so a fresh adapter leaves
    the model unchanged. Parameters are `nnx.LoRAParam`, which the trainer optimizes alone.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int,
                 alpha: float, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        fan_in = math.prod(in_shape)
        a = _normal(rngs.params(), (*in_shape, rank)) / math.sqrt(fan_in)
        self.a = nnx.LoRAParam(a.astype(dtype))
        self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), dtype))
        self.scale = alpha / rank

    def delta(self) -> jax.Array:
        """The dense weight update `a @ b * scale`, shaped like the base kernel."""
        a, b = self.a[...], self.b[...]
        return jnp.tensordot(a, b, axes=1) * self.scale


class Projection(nnx.Module):
    """A linear map written as an einsum over named axes, with optional bias and LoRA."""

    def __init__(self, equation: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 axes: tuple[str | None, ...], *, use_bias: bool = False,
                 bias_axes: tuple[str | None, ...] = (), rngs: nnx.Rngs, param_dtype: Any,
                 dtype: Any):
        self.equation = equation
        self.in_shape, self.out_shape = in_shape, out_shape
        self.kernel = _param(rngs, (*in_shape, *out_shape), axes, param_dtype, math.prod(in_shape))
        self.bias = _param(rngs, out_shape, bias_axes, param_dtype, 1, "zeros") if use_bias else None
        self.lora: LoRA | None = None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.equation, x, self.kernel[...].astype(self.dtype))
        if self.lora is not None:
            n_in = len(self.in_shape)
            a = self.lora.a[...].astype(self.dtype)
            b = self.lora.b[...].astype(self.dtype)
            h = jnp.tensordot(x, a, axes=n_in)
            y = y + jnp.tensordot(h, b, axes=1) * self.lora.scale
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, as transformers does, then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float, axis: str, *, rngs: nnx.Rngs, param_dtype: Any):
        self.weight = _param(rngs, (dim,), (axis,), param_dtype, 1, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies `[H/2]`, with Llama-3 or linear scaling when the config asks for it."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `x` `[B, T, N, H]` at integer `positions` `[B, T]`."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pd, cd = as_dtype(config.param_dtype), as_dtype(config.dtype)
        common = dict(rngs=rngs, param_dtype=pd, dtype=cd, use_bias=config.attention_bias)
        self.q = Projection("BTD,DNH->BTNH", (d,), (n, h), ("embed", "heads", "head_dim"),
                            bias_axes=("heads", "head_dim"), **common)
        self.k = Projection("BTD,DKH->BTKH", (d,), (k, h), ("embed", "kv_heads", "head_dim"),
                            bias_axes=("kv_heads", "head_dim"), **common)
        self.v = Projection("BTD,DKH->BTKH", (d,), (k, h), ("embed", "kv_heads", "head_dim"),
                            bias_axes=("kv_heads", "head_dim"), **common)
        self.o = Projection("BTNH,NHD->BTD", (n, h), (d,), ("heads", "head_dim", "embed"),
                            rngs=rngs, param_dtype=pd, dtype=cd)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, "head_dim", rngs=rngs, param_dtype=pd)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, "head_dim", rngs=rngs, param_dtype=pd)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 mask: jax.Array, kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 prefix: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None):
        """`mask` `[B, T, S]`: may query t attend key s. `kv`: (cache_k, cache_v, end) or None;
        with a cache the new keys and values are written from slot `end` first (see `write_at`).
        `prefix` (one token a row, with a cache): this layer's shared prefix keys and values
        `[R, P, K, H]`, each row's stored row `[B]` and mask `[B, P]`, attended before the cache."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_kv = None
        if kv is not None:
            cache_k, cache_v, end = kv
            cache_k, cache_v = write_at(cache_k, k, end), write_at(cache_v, v, end)
            new_kv = (cache_k, cache_v)
            if q.shape[1] == 1:
                return self.o(self.decode(q, cache_k, cache_v, mask[:, 0], prefix).astype(x.dtype)), new_kv
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        b, t, n, h = q.shape
        groups = n // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, h)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(h)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        return self.o(out), new_kv

    def decode(self, q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, kv_mask: jax.Array,
               prefix: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
        """Attention of one query token per row `[B, 1, N, H]` over the cache (after each row's
        shared `prefix`, when given), as a broadcast multiply-reduce. The einsum form makes
        XLA:CPU transpose every layer's whole cache on every step; this one reads the cache in
        place and measured about twice as fast for a SmolLM2-sized decode step."""
        b, _, n, h = q.shape
        kv_heads = cache_k.shape[2]
        q = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)

        def scores_over(keys: jax.Array, mask: jax.Array) -> jax.Array:  # [B, S, K, G]
            s = jnp.sum(q * keys[:, :, :, None, :].astype(jnp.float32), axis=-1) / math.sqrt(h)
            return jnp.where(mask[:, :, None, None], s, jnp.finfo(jnp.float32).min)

        def weighted(probs: jax.Array, values: jax.Array) -> jax.Array:  # [B, K, G, H]
            return jnp.sum(probs[..., None] * values[:, :, :, None, :].astype(jnp.float32), axis=1)

        scores = scores_over(cache_k, kv_mask)
        if prefix is None:
            out = weighted(jax.nn.softmax(scores, axis=1), cache_v)
        else:
            keys, values, rows, mask = prefix
            # The gathered rows are a copy (XLA:CPU does not fuse a gather into the reduction).
            # Tied to this layer's query, one layer's copy is live at a time under the
            # memory-minimizing scheduler (gradual_jax.xla_flags); untied, a decode loop hoists
            # every layer's copy out of the loop: the memory a shared prefix saves.
            rows, q = jax.lax.optimization_barrier((rows, q))
            p = mask.shape[1]
            probs = jax.nn.softmax(jnp.concatenate([scores_over(keys[rows], mask), scores], axis=1), axis=1)
            out = weighted(probs[:, :p], values[rows]) + weighted(probs[:, p:], cache_v)
        return out.reshape(b, 1, n, h)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(rngs=rngs, param_dtype=as_dtype(config.param_dtype), dtype=as_dtype(config.dtype))
        self.gate = Projection("BTD,DF->BTF", (d,), (f,), ("embed", "mlp"), **common)
        self.up = Projection("BTD,DF->BTF", (d,), (f,), ("embed", "mlp"), **common)
        self.down = Projection("BTF,FD->BTD", (f,), (d,), ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pd = as_dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs=rngs, param_dtype=pd)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs=rngs, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate

    def _dropout(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is None or self.dropout_rate == 0.0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)

    def __call__(self, x, positions, inv_freq, mask, kv=None, dropout_key=None, prefix=None):
        k1 = k2 = None
        if dropout_key is not None:
            k1, k2 = jax.random.split(dropout_key)
        h, new_kv = self.attn(self.attn_norm(x), positions, inv_freq, mask, kv, prefix)
        x = x + self._dropout(h, k1)
        x = x + self._dropout(self.mlp(self.mlp_norm(x)), k2)
        return x, new_kv


class LayerStack(nnx.Module):
    """A model's blocks as one: `block` is a `Block` whose every variable has a leading layer
    axis. The forward pass runs it as one `lax.scan`, so a program traces and compiles one
    layer's body whatever the depth. Made by `Transformer.stacked`; read-only (not trained)."""

    def __init__(self, block: Block, num_layers: int):
        self.block = block
        self.num_layers = num_layers

    @classmethod
    def of(cls, layers: Sequence[Block]) -> "LayerStack":
        """`layers` stacked (their weights copied into one buffer each); they must share one
        structure (true of every supported architecture, LoRA on all layers included)."""
        split = [nnx.split(layer) for layer in layers]
        graphdef = split[0][0]
        if any(g != graphdef for g, _ in split[1:]):
            raise ValueError("scan_layers needs every layer to have the same structure "
                             "(e.g. LoRA on all layers or none)")
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in split])
        return cls(nnx.merge(graphdef, stacked), len(split))

    def __len__(self) -> int:
        return self.num_layers

    def scan(self, x: jax.Array, body: Any, xs: Any = None, *, remat: bool = False) -> tuple[jax.Array, Any]:
        """`lax.scan` over the layers: `body(layer, x, xs_i) -> (x, ys_i)` with layer i's
        `Block` and its slice of `xs` (leading axis: the layers); returns x and the stacked
        `ys`. With `remat`, each step is recomputed in the backward pass."""
        graphdef, state = nnx.split(self.block)

        def step(x: jax.Array, inputs: tuple[Any, Any]) -> tuple[jax.Array, Any]:
            layer_state, x_i = inputs
            return body(nnx.merge(graphdef, layer_state), x, x_i)

        return jax.lax.scan(jax.checkpoint(step) if remat else step, x, (state, xs))


def apply_block(layer: Block, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, mask: jax.Array,
                kv: tuple[jax.Array, jax.Array, jax.Array] | None = None, dropout_key: jax.Array | None = None,
                *, remat: bool = False, prefix: tuple | None = None) -> tuple[jax.Array, Any]:
    """`layer(x, ...)`, with the output pinned to the batch sharding.

    With `remat` (and no cache), the layer runs as a pure function of its state under
    `jax.checkpoint`: the backward pass recomputes its activations (and, under FSDP, may re-gather
    its weights; XLA:CPU still keeps the gathered copies, see BUILD_NOTES "Scale-out planner").
    Splitting the state out first keeps frozen params (LoRA) out of NNX's write-back, which broke
    `nnx.remat` inside `value_and_grad`.
    """
    if not remat or kv is not None:
        y, new_kv = layer(x, positions, inv_freq, mask, kv, dropout_key, prefix)
        return constrain_batch(y), new_kv
    graphdef, state = nnx.split(layer)

    def run(state, x, positions, inv_freq, mask, dropout_key):
        return nnx.merge(graphdef, state)(x, positions, inv_freq, mask, None, dropout_key)[0]

    return constrain_batch(jax.checkpoint(run)(state, x, positions, inv_freq, mask, dropout_key)), None


def apply_blocks(layers: Sequence[Block], x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 mask: jax.Array, dropout_key: jax.Array | None = None, *, remat: bool = False,
                 scan: bool = False) -> jax.Array:
    """Every layer in turn over `x` (no cache), each output pinned to the batch sharding.

    Layer i gets `jax.random.split(dropout_key, len(layers))[i]`. With `scan`, the layers' states
    are stacked along a new leading axis and run by one `lax.scan` over a single traced layer: the
    program holds one layer's body, so under FSDP one layer's gathered weights are live at a time
    (with `remat` the backward pass recomputes each layer from its input; without it the scan keeps
    every layer's residuals, gathered weights included). Same numbers as the loop; the stacked
    copy of the weights costs one parameter-sized buffer per device. Layers must share one
    structure (true of every supported architecture, LoRA on all layers included).
    """
    n = len(layers)
    keys = jax.random.split(dropout_key, n) if dropout_key is not None else None
    if not scan and not isinstance(layers, LayerStack):
        for i, layer in enumerate(layers):
            x, _ = apply_block(layer, x, positions, inv_freq, mask, None,
                               None if keys is None else keys[i], remat=remat)
        return x
    stack = layers if isinstance(layers, LayerStack) else LayerStack.of(layers)

    def body(layer: Block, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, None]:
        y, _ = layer(x, positions, inv_freq, mask, None, key)
        return constrain_batch(y), None

    return stack.scan(x, body, keys, remat=remat)[0]


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | None = None) -> jax.Array:
    """Position of each token: count of real tokens before it (plus `offset` per row)."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.maximum(pos, 0)


class Transformer(nnx.Module):
    """Decoder-only transformer; see the module docstring for the call contract."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = as_dtype(config.param_dtype)
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd, 1)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs=rngs, param_dtype=pd)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"),
                                  pd, config.hidden_size)

    def stacked(self) -> "Transformer":
        """This model with its layers as one `LayerStack`: the same numbers, computed by a
        `lax.scan` over one traced layer (far fewer operations to trace and compile for a deep
        model). Its caches must be layer-stacked (`KVCache.init(..., stacked=True)`). Stacking
        copies the layers' weights (one parameter-sized buffer): do it once, outside loops."""
        if isinstance(self.layers, LayerStack):
            return self
        out = nnx.merge(*nnx.split(self))
        out.layers = LayerStack.of(self.layers)
        return out

    def hidden_to_logits(self, h: jax.Array) -> jax.Array:
        """Final projection to float32 logits `[..., V]` from final-normed hidden states."""
        dtype = as_dtype(self.config.dtype)
        if self.lm_head is None:
            w = self.embed[...].astype(dtype)
            return constrain_batch(jnp.einsum("BTD,VD->BTV", h, w, preferred_element_type=jnp.float32))
        w = self.lm_head[...].astype(dtype)
        return constrain_batch(jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.float32))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 branch_ids: jax.Array | None = None, cache: KVCache | None = None,
                 cached_visible: jax.Array | None = None,
                 prefix: SharedPrefix | None = None, dropout_key: jax.Array | None = None,
                 return_hidden: bool = False):
        """Logits `[B, T, V]` float32 (final-normed hidden states `[B, T, D]` with
        `return_hidden`); with `cache`, `(logits or hidden, updated_cache)`.

        Without a cache, attention is causal within the row and masked by `attention_mask`.
        `segment_ids` `[B, T]` (0: padding) packs several sequences into a row: a token attends
        only to earlier tokens of its own segment, and each segment's logits equal the model's
        for that sequence alone (pass `positions` restarting at 0 per segment).
        With a cache, the T new tokens are written at slots `[end, end + T)` (`end` a scalar, or
        one per row) and attend to every real cached slot, wherever it sits (so a cache may be
        written as a ring), and causally among themselves (with `segment_ids`: within their own
        segment only); `end` advances by T. The block must fit: `end + T <= size`.
        `branch_ids` (with a cache and `segment_ids`) lets a segment branch: a token of branch
        j > 0 sees its segment's branch-0 tokens (the trunk, e.g. a prompt tail) and its own
        branch only (e.g. one of several continuations scored after one tail).
        `cached_visible` `[B, T, S]` (with a cache): which cached slots outside the new block
        each new token may read, on top of the cache's mask (e.g. continuations scored against
        one of several prompt tails packed into a cache).
        """
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = segment_ids > 0 if segment_ids is not None else jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        x = constrain_batch(self.embed[...][input_ids].astype(as_dtype(cfg.dtype)))
        inv_freq = rope_inv_freq(cfg)
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask)
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
            mask = causal[None] & attention_mask[:, None, :]
            if segment_ids is not None:
                mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
            x = apply_blocks(self.layers, x, positions, inv_freq, mask, dropout_key,
                             remat=cfg.remat, scan=cfg.scan_layers)
            h = self.final_norm(x)
            return h if return_hidden else self.hidden_to_logits(h)
        end = cache.end.astype(jnp.int32)
        ends = jnp.broadcast_to(end, (b,))
        if prefix is not None and t != 1:
            raise ValueError(f"a shared prefix is read by one-token (decode) calls only, got {t} tokens")
        if positions is None:
            before = cache.lengths() if prefix is None else cache.lengths() + prefix.lengths()
            positions = positions_from_mask(attention_mask, before)
        kv_mask = write_at(cache.mask, attention_mask, end)
        # Slot s relative to row b's new block: inside it, causal (and within the segment);
        # outside it, every real cached slot, wherever it sits.
        rel = jnp.arange(cache.size)[None, None, :] - ends[:, None, None]  # [B, 1, S]
        in_block = (rel >= 0) & (rel < t)
        block = (rel <= jnp.arange(t)[None, :, None]) & kv_mask[:, None, :]
        if segment_ids is not None:
            seg_slots = write_at(jnp.zeros(cache.mask.shape, jnp.int32), segment_ids, end)
            block = block & (seg_slots[:, None, :] == segment_ids[:, :, None])
            if branch_ids is not None:
                branch_slots = write_at(jnp.zeros(cache.mask.shape, jnp.int32), branch_ids, end)
                block = block & ((branch_slots[:, None, :] == 0)
                                 | (branch_slots[:, None, :] == branch_ids[:, :, None]))
        outside = cache.mask[:, None, :]
        if cached_visible is not None:
            outside = outside & cached_visible
        mask = jnp.where(in_block, block, outside)
        if isinstance(self.layers, LayerStack):
            if not is_stacked(cache.keys) or (prefix is not None and not is_stacked(prefix.keys)):
                raise ValueError("a model with stacked layers reads layer-stacked caches and prefixes")

            # Each layer's cache slice is read from the incoming stack and written, updated, to
            # the outgoing one (scan's xs and ys). Carrying the stack instead, each layer
            # updating it in place, made XLA:CPU copy the whole stack twice a layer.
            def body(layer: Block, x: jax.Array, xs: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                k, v, stored = xs
                shared = None if stored is None else (*stored, prefix.rows, prefix.mask)
                return apply_block(layer, x, positions, inv_freq, mask, (k, v, end), prefix=shared)

            stored = None if prefix is None else (prefix.keys, prefix.values)
            x, (new_k, new_v) = self.layers.scan(x, body, (cache.keys, cache.values, stored))
        else:
            if is_stacked(cache.keys):
                raise ValueError("a layer-stacked cache is read by a model with stacked layers "
                                 "(Transformer.stacked)")
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                shared = None if prefix is None else (prefix.keys[i], prefix.values[i], prefix.rows, prefix.mask)
                x, (k, v) = apply_block(layer, x, positions, inv_freq, mask,
                                        (cache.keys[i], cache.values[i], end), prefix=shared)
                new_k.append(k)
                new_v.append(v)
        h = self.final_norm(x)
        new_cache = KVCache(keys=new_k, values=new_v, mask=kv_mask, end=end + t)
        return (h if return_hidden else self.hidden_to_logits(h)), new_cache


def projections(model: Transformer) -> dict[str, list[Projection]]:
    """Every projection of the model grouped by kind ('q', 'k', ... 'down')."""
    out: dict[str, list[Projection]] = {p: [] for p in PROJECTIONS}
    for layer in model.layers:
        for name in ("q", "k", "v", "o"):
            out[name].append(getattr(layer.attn, name))
        for name in ("gate", "up", "down"):
            out[name].append(getattr(layer.mlp, name))
    return out


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model."""
    return Transformer(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Transformer:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
