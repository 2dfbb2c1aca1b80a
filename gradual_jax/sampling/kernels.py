"""Device code: the forward passes, token choice and the programs the sampler compiles.

The programs (`prefix_program`, `start_program`, `decode_program`, `gather_program`,
`score_program`) are pure over their arguments; the sampler binds the model's graph
definition (and its sharding constraint) and compiles them ahead of time per shape
(`compile_cache`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gradual_jax.models.transformer import KVCache, Transformer, apply_rope, as_dtype, rope_inv_freq

# --------------------------------------------------------------------------------------------
# Forward passes


def packed_forward(model: Transformer, prefix: KVCache | None, ids: jax.Array, pos: jax.Array,
                   seg: jax.Array) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Final-normed hidden states `[R, W, D]` of packed sequences, and per layer the keys and
    values `[R, P + W, K, H]` (the prefix's P slots first).

    Each token attends causally to its own sequence (same `seg`) and to the prefix's real slots.
    Uses the model's own blocks; only the mask and positions are built here.
    """
    cfg = model.config
    rows, width = ids.shape
    t = jnp.arange(width)
    real = seg[:, :, None] >= 0
    mask = (seg[:, :, None] == seg[:, None, :]) & (t[None, None, :] <= t[None, :, None]) & real
    shape = (rows, width, cfg.num_kv_heads, cfg.head_dim)
    dtype = as_dtype(cfg.dtype)
    p = 0
    if prefix is not None:
        p = prefix.mask.shape[1]
        mask = jnp.concatenate([jnp.broadcast_to(prefix.mask[:, None, :], (rows, width, p)) & real,
                                mask], axis=-1)

    def slots(layer: int, which: str) -> jax.Array:
        """The layer's prefix keys or values for every row, then room for the packed tokens."""
        fresh = jnp.zeros(shape, dtype)
        if prefix is None:
            return fresh
        cached = getattr(prefix, which)[layer]
        cached = jnp.broadcast_to(cached, (rows, *cached.shape[1:])).astype(dtype)
        return jnp.concatenate([cached, fresh], axis=1)

    x = model.embed[...][ids].astype(dtype)
    inv_freq = rope_inv_freq(cfg)
    end = jnp.asarray(p, jnp.int32)
    keys, values = [], []
    for i, layer in enumerate(model.layers):
        x, (k, v) = layer(x, pos, inv_freq, mask, (slots(i, "keys"), slots(i, "values"), end))
        keys.append(k)
        values.append(v)
    return model.final_norm(x), keys, values


def decode_attention(attn: Any, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                     kv_mask: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     end: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token per row attending to the cache, written as broadcast multiply-reduce.

    The model's general attention (an einsum batched over the cache's `[B, S, K, H]` layout)
    makes XLA:CPU transpose every layer's whole cache on every step; this form reads the cache
    in place and measured about twice as fast for a SmolLM2-sized decode step.
    """
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    zero = jnp.zeros((), jnp.int32)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (zero, end, zero, zero))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (zero, end, zero, zero))
    b, _, n, h = q.shape
    kv_heads = cache_k.shape[2]
    q = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)
    scores = jnp.sum(q * cache_k[:, :, :, None, :].astype(jnp.float32), axis=-1) / math.sqrt(h)
    scores = jnp.where(kv_mask[:, :, None, None], scores, jnp.finfo(jnp.float32).min)  # [B,S,K,G]
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * cache_v[:, :, :, None, :].astype(jnp.float32), axis=1)
    return attn.o(out.reshape(b, 1, n, h).astype(x.dtype)), cache_k, cache_v


def decode_step(model: Transformer, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits `[R, V]` for one new token per row, and the cache with it written at `end`.

    Same contract as `model(tokens[:, None], ones, cache=cache)`; tests check they agree.
    """
    cfg = model.config
    x = model.embed[...][tokens[:, None]].astype(as_dtype(cfg.dtype))
    positions = cache.lengths()[:, None]
    kv_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((tokens.shape[0], 1), jnp.bool_),
                                           (0, cache.end))
    inv_freq = rope_inv_freq(cfg)
    keys, values = [], []
    for i, layer in enumerate(model.layers):
        h, k, v = decode_attention(layer.attn, layer.attn_norm(x), positions, inv_freq, kv_mask,
                                   cache.keys[i], cache.values[i], cache.end)
        x = x + h
        x = x + layer.mlp(layer.mlp_norm(x))
        keys.append(k)
        values.append(v)
    logits = model.hidden_to_logits(model.final_norm(x))[:, 0]
    return logits, KVCache(keys=keys, values=values, mask=kv_mask, end=cache.end + 1)


def unpack_cache(prefix: KVCache | None, keys: list[jax.Array], values: list[jax.Array],
                 row: jax.Array, col: jax.Array, length: jax.Array, span: int,
                 new_tokens: int) -> KVCache:
    """Per-sequence cache `[B, P + span + new_tokens]`: prefix slots, the sequence's own packed
    slots left aligned in the next `span`, then room for generation. `end` = P + span."""
    p = 0 if prefix is None else prefix.mask.shape[1]
    b = row.shape[0]
    j = jnp.arange(span)
    valid = j[None, :] < length[:, None]  # [B, span]
    r = jnp.broadcast_to(row[:, None], (b, span))
    c = p + jnp.clip(col[:, None] + j[None, :], 0, keys[0].shape[1] - p - 1)

    def rows(packed: jax.Array, cached: jax.Array | None) -> jax.Array:
        own = jnp.where(valid[..., None, None], packed[r, c], 0)
        parts = [own, jnp.zeros((b, new_tokens, *packed.shape[2:]), packed.dtype)]
        if cached is not None:
            parts.insert(0, jnp.broadcast_to(cached, (b, *cached.shape[1:])).astype(packed.dtype))
        return jnp.concatenate(parts, axis=1)

    none = [None] * len(keys)
    mask = [valid, jnp.zeros((b, new_tokens), jnp.bool_)]
    if prefix is not None:
        mask.insert(0, jnp.broadcast_to(prefix.mask, (b, p)))
    return KVCache(keys=[rows(k, pre) for k, pre in zip(keys, none if prefix is None else prefix.keys)],
                   values=[rows(v, pre) for v, pre in zip(values, none if prefix is None else prefix.values)],
                   mask=jnp.concatenate(mask, axis=1), end=jnp.asarray(p + span, jnp.int32))


# --------------------------------------------------------------------------------------------
# Choosing tokens


@dataclasses.dataclass(frozen=True)
class Policy:
    """Static sampling shape of a batch: `sampled` (any row samples), `k_cap` (largest top_k of
    a sampled row, 0: none uses top-k), `top_p` 'off', 'topk' (every sampled row has top_k > 0,
    so the nucleus is found among the k_cap best) or 'full' (sort the vocabulary)."""

    sampled: bool = False
    k_cap: int = 0
    top_p: str = "off"


def truncate(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
             policy: Policy) -> jax.Array:
    """logits / T with tokens outside each row's top-k and top-p set to -inf (rows with
    top_k = 0 keep every token). Ordered as transformers: temperature, top-k, top-p."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    neg_inf = jnp.float32(-jnp.inf)
    best = None
    if policy.k_cap:
        best = jax.lax.top_k(x, policy.k_cap)[0]  # [R, k_cap], descending
        kth = jnp.take_along_axis(best, jnp.clip(top_k - 1, 0, policy.k_cap - 1)[:, None], axis=1)
        x = jnp.where((top_k[:, None] > 0) & (x < kth), neg_inf, x)
    if policy.top_p == "off":
        return x
    if policy.top_p == "topk":
        ordered = jnp.where(jnp.arange(policy.k_cap)[None, :] < top_k[:, None], best, neg_inf)
    else:
        ordered = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1)
    return jnp.where(x < threshold[:, None], neg_inf, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Per-row sampling settings (temperature 0 = greedy; top_k 0 = all tokens)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def choose(logits: jax.Array, rows: Rows, keys: jax.Array, step: jax.Array,
           policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next token per row, its log-prob under the sampling distribution and under the model."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pick = lambda a, tok: jnp.take_along_axis(a, tok[:, None], axis=1)[:, 0]  # noqa: E731
    if not policy.sampled:
        return best, jnp.zeros(best.shape, jnp.float32), pick(raw, best)
    x = truncate(logits, rows.temperature, rows.top_k, rows.top_p, policy)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    drawn = jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)
    greedy = rows.temperature <= 0
    token = jnp.where(greedy, best, drawn)
    logp = jnp.where(greedy, 0.0, pick(jax.nn.log_softmax(x, axis=-1), token))
    return token, logp, pick(raw, token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Decoding:
    """The decode loop's carry. Every array but `cache.end` and `step` has rows first."""

    cache: KVCache
    rows: Rows
    keys: jax.Array        # [R] typed PRNG keys, one per (prompt, sample)
    token: jax.Array       # [R] last chosen token (fed next)
    done: jax.Array        # [R] row has stopped (or is padding)
    step: jax.Array        # () tokens chosen so far
    tokens: jax.Array      # [R, N] chosen tokens, -1 once the row has stopped
    logp: jax.Array        # [R, N]
    raw_logp: jax.Array    # [R, N]


def record(d: Decoding, token: jax.Array, logp: jax.Array, raw: jax.Array,
           stop_table: jax.Array) -> Decoding:
    """The carry after choosing `token` for every row: live rows record it (stopped rows -1 and
    0.0), rows whose token is in `stop_table` become done, `step` advances."""
    live = ~d.done
    col = lambda buf, v: jax.lax.dynamic_update_slice(buf, v[:, None], (0, d.step))  # noqa: E731
    return dataclasses.replace(
        d, token=token, done=d.done | stop_table[token], step=d.step + 1,
        tokens=col(d.tokens, jnp.where(live, token, -1)),
        logp=col(d.logp, jnp.where(live, logp, 0.0)),
        raw_logp=col(d.raw_logp, jnp.where(live, raw, 0.0)),
    )


# --------------------------------------------------------------------------------------------
# The programs (pure over the model state)

# The decode program donates its carry (argument 1): the cache is updated in place.
DECODE_DONATE = (1,)


def prefix_program(graphdef: Any, state: Any, ids: jax.Array, pos: jax.Array,
                   seg: jax.Array) -> KVCache:
    """The cache of one packed row: the shared prefix, reused by every row of a batch."""
    model = nnx.merge(graphdef, state)
    _, keys, values = packed_forward(model, None, ids, pos, seg)
    return KVCache(keys=keys, values=values, mask=seg >= 0,
                   end=jnp.asarray(ids.shape[1], jnp.int32))


def start_program(graphdef: Any, constrain: Callable[[Any], Any], state: Any,
                  prefix: KVCache | None, pack: dict, rows: Rows, keys: jax.Array,
                  padding: jax.Array, stop_table: jax.Array, *, span: int, fanout: int,
                  new_tokens: int, policy: Policy) -> Decoding:
    """Prefill the packed prompts, give each its cache row `fanout` times, choose every
    row's first token. `constrain` lays out the cache's rows (the sampler's mesh)."""
    model = nnx.merge(graphdef, state)
    h, k, v = packed_forward(model, prefix, pack["ids"], pack["pos"], pack["seg"])
    row, col, length = pack["row"], pack["col"], pack["length"]
    cache = unpack_cache(prefix, k, v, row, col, length, span, new_tokens)
    last = h[row, jnp.clip(col + length - 1, 0, h.shape[1] - 1)]
    logits = model.hidden_to_logits(last[:, None])[:, 0]
    if fanout > 1:
        rep = lambda a: jnp.repeat(a, fanout, axis=0)  # noqa: E731
        cache = KVCache([rep(a) for a in cache.keys], [rep(a) for a in cache.values],
                        rep(cache.mask), cache.end)
        logits = rep(logits)
    r = logits.shape[0]
    d = Decoding(
        cache=constrain(cache), rows=rows, keys=keys,
        token=jnp.zeros((r,), jnp.int32), done=padding, step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((r, new_tokens), -1, jnp.int32),
        logp=jnp.zeros((r, new_tokens), jnp.float32),
        raw_logp=jnp.zeros((r, new_tokens), jnp.float32),
    )
    token, logp, raw = choose(logits, rows, keys, d.step, policy)
    return record(d, token, logp, raw, stop_table)


def decode_program(graphdef: Any, state: Any, d: Decoding, stop_table: jax.Array,
                   limit: jax.Array, *, policy: Policy) -> Decoding:
    """Decode steps until every row is done or `step` reaches `limit`."""
    model = nnx.merge(graphdef, state)

    def body(d: Decoding) -> Decoding:
        logits, cache = decode_step(model, d.token, d.cache)
        token, logp, raw = choose(logits, d.rows, d.keys, d.step, policy)
        return record(dataclasses.replace(d, cache=cache), token, logp, raw, stop_table)

    return jax.lax.while_loop(lambda d: (d.step < limit) & ~jnp.all(d.done), body, d)


def gather_program(d: Decoding, index: jax.Array, valid: jax.Array) -> Decoding:
    """Rows `index` of the carry; rows where `valid` is false become done padding."""
    d = jax.tree.map(lambda a: a if a.ndim == 0 else a[index], d)
    return dataclasses.replace(d, done=d.done | ~valid)


def score_program(graphdef: Any, state: Any, prefix: KVCache | None, pack: dict,
                  prompt_len: jax.Array, cont: jax.Array, *, temperature: float,
                  top_k: int) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log-probs `[B, C]` of `cont` (packed after each prompt): raw, and
    under softmax(logits / T) kept to the top-k."""
    model = nnx.merge(graphdef, state)
    h, _, _ = packed_forward(model, prefix, pack["ids"], pack["pos"], pack["seg"])
    c = jnp.arange(cont.shape[1])
    at = pack["col"][:, None] + prompt_len[:, None] - 1 + c[None, :]
    hidden = h[pack["row"][:, None], jnp.clip(at, 0, h.shape[1] - 1)]  # [B, C, D]
    logits = model.hidden_to_logits(hidden)
    pick = lambda a: jnp.take_along_axis(a, cont[..., None], axis=-1)[..., 0]  # noqa: E731
    raw = pick(jax.nn.log_softmax(logits, axis=-1))
    if temperature == 0:
        return raw, jnp.where(cont == jnp.argmax(logits, axis=-1), 0.0, -jnp.inf)
    b, n, v = logits.shape
    full = lambda value, dt: jnp.full((b * n,), value, dt)  # noqa: E731
    x = truncate(logits.reshape(b * n, v), full(temperature, jnp.float32),
                 full(top_k, jnp.int32), full(1.0, jnp.float32), Policy(True, top_k, "off"))
    return raw, pick(jax.nn.log_softmax(x, axis=-1).reshape(b, n, v))
