"""Batched generation: packed prefill into a preallocated KV cache, `lax.while_loop` decode.

How a call runs (`Sampler.generate_batch`):
- Prompts are tokenized whole (the tokenizer's default special tokens, as `tokenizer(text)`),
  ordered by their token ids so that prompts sharing a few-shot prefix sit together, and cut
  into batches of at most `batch_size` decode rows (prompts x samples per prompt).
- Shared prefix: prompts that begin with the same tokens (at least `MIN_SHARED_PREFIX`, e.g.
  the few-shot exemplars of one prompt set) form a group whose common token prefix is
  prefilled once, for one row, and reused by every row of the group's batches; batches never
  mix groups. The prefix is found on the token ids of the whole prompts, never by tokenizing a prefix
  string on its own: a byte-level BPE tokenizes "...\\n\\n" alone as one "\\n\\n" token but
  "...\\n\\nQ:" as "\\n", "\\n", "Q", so a separately tokenized prefix would change the prompt.
  Sharing therefore gives exactly the tokens of the unshared path, whatever the tokenizer.
- Prefill: the prompts' remaining tokens are packed, without padding between them, into rows
  of a power-of-two width (first-fit decreasing); attention is masked to each prompt's own
  tokens and the prefix, and positions continue from the prefix. A 4-shot probe batch computes
  its ~10 question tokens per prompt instead of ~100 padded ones. Each prompt's keys and values
  are then gathered into its own row of a `prefix + bucket + max_new_tokens` slot cache (left
  aligned, unused slots masked: positions come from the mask, so gaps change nothing), and the
  rows are repeated once per sample (fan-out: `n` samples share one prefill).
- Decode: a jitted `lax.while_loop` feeds one token per row per step and stops when every row is
  done or a chunk of steps is over. A row is done when it samples EOS or a token whose text
  contains a stop string (a per-vocabulary table, so the check runs on device). Between chunks
  the host checks stop strings that span tokens and, when at most half the rows are live,
  compacts the batch to them, so finished rows stop costing decode steps.
- Host: token ids are cut after the stopping token; text is the generation as it reads after
  the prompt, cut before the first stop string.

Randomness: row (prompt key p, sample j) draws step t with
`fold_in(fold_in(fold_in(key(seed), p), j), t)`, so samples do not depend on batch size,
batch composition or order. Per-row temperature/top-k/top-p let one decode batch mix greedy
rows with sampled ones (the SliCK probe's 1 greedy + 16 samples per prompt).

Shapes are bucketed (packed rows, widths, cache sizes, batch rows) so a dataset compiles a
handful of times. Functions are compiled ahead of time (so compile time can be reported in
`Sampler.stats`) and cached by graph, mesh and shapes, shared by every `Sampler`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradual_jax.models.transformer import KVCache, Transformer, apply_rope, as_dtype, rope_inv_freq
from gradual_jax.sharding import INFERENCE_RULES, batch_sharding, data_parallel_size, state_shardings

MIN_BUCKET = 8
MIN_SHARED_PREFIX = 16
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK = 2
MIN_COMPACT_ROWS = 8  # below this a decode step costs about the same: not worth a compile


# --------------------------------------------------------------------------------------------
# Public records


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Draw from softmax(logits / temperature), kept to the `top_k` most likely tokens (0: all)
    and then to the smallest set with mass >= `top_p`. Temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check_sampling(self.temperature, self.top_k, self.top_p)


Method = Greedy | Sample


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion.

    `token_ids`: generated tokens up to and including the one that stopped the row (EOS or the
    token completing a stop string). `logprobs[i]`: log-probability of `token_ids[i]` under the
    distribution it was drawn from (0.0 for greedy); `raw_logprobs[i]`: under the raw model
    (softmax of the logits). `text`: the generation as it reads after the prompt, cut before the
    first stop string, without EOS. `finish_reason`: 'stop', 'eos' or 'length'.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    raw_logprobs: tuple[float, ...]
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of one continuation: per token, log-probability under the raw model
    and under softmax(logits / T) kept to the top-k tokens and renormalised (-inf outside)."""

    token_ids: tuple[int, ...]
    raw_logprobs: tuple[float, ...]
    logprobs: tuple[float, ...]


@dataclasses.dataclass
class SamplerStats:
    """Work done by a `Sampler` since creation (or `reset_stats`). Token counts include padding,
    so they measure what the hardware computed."""

    compiles: int = 0
    compile_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_row_steps: int = 0
    decode_steps: int = 0
    logit_rows: int = 0
    compactions: int = 0
    prefixes: int = 0


# --------------------------------------------------------------------------------------------
# Validation


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0 or int(top_k) != top_k:
        raise ValueError(f"top_k must be a non-negative integer (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _check_prompts(prompts: Any, what: str = "prompts") -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{what} is empty: nothing to generate")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"{what}[{bad}] is {type(prompts[bad]).__name__}, expected a string")
    return list(prompts)


def method_of(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Method:
    """The sampling method for these settings: `Greedy()` when temperature is 0."""
    _check_sampling(temperature, top_k, top_p)
    return Greedy() if temperature == 0 else Sample(temperature, top_k, top_p)


# --------------------------------------------------------------------------------------------
# Host-side shapes


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_rows(n: int, multiple: int = 1) -> int:
    """Rows padded to 1, 2, 4, then multiples of 4 (and to a multiple of `multiple`)."""
    rows = next_pow2(n) if n <= 4 else _round_up(n, 4)
    return _round_up(rows, multiple)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


@dataclasses.dataclass
class _Pack:
    """Token sequences packed into `[rows, width]`: sequence b sits in row `row[b]` from column
    `col[b]`, `length[b]` tokens; `seg` names each slot's sequence (-1: padding)."""

    ids: np.ndarray
    pos: np.ndarray
    seg: np.ndarray
    row: np.ndarray
    col: np.ndarray
    length: np.ndarray

    @property
    def tokens(self) -> int:
        return self.ids.size


def _first_fit(lengths: Sequence[int], width: int) -> tuple[list[int], list[int], int]:
    """Row and column of each length packed first-fit decreasing into rows of `width`."""
    row, col, free = [0] * len(lengths), [0] * len(lengths), []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((i for i, f in enumerate(free) if f >= lengths[b]), None)
        if r is None:
            r = len(free)
            free.append(width)
        row[b], col[b] = r, width - free[r]
        free[r] -= lengths[b]
    return row, col, len(free)


def _pack(seqs: Sequence[Sequence[int]], *, offset: int, count: int, row_multiple: int) -> _Pack:
    """Pack `seqs` (positions starting at `offset`) for `count` sequences (extra ones empty).

    The width is a power of two >= the longest sequence; doubling it is tried when that packs
    into fewer padded tokens.
    """
    lengths = [len(s) for s in seqs]
    base = next_pow2(max(lengths), MIN_BUCKET)
    plans = []
    for width in (base, 2 * base, 4 * base):
        row, col, used = _first_fit(lengths, width)
        rows = _bucket_rows(used, row_multiple)
        plans.append((rows * width, width, rows, row, col))
    _, width, rows, row, col = min(plans, key=lambda p: (p[0], p[1]))
    ids = np.zeros((rows, width), np.int32)
    pos = np.zeros((rows, width), np.int32)
    seg = np.full((rows, width), -1, np.int32)
    for b, s in enumerate(seqs):
        ids[row[b], col[b]:col[b] + len(s)] = s
        pos[row[b], col[b]:col[b] + len(s)] = offset + np.arange(len(s))
        seg[row[b], col[b]:col[b] + len(s)] = b
    pad = count - len(seqs)
    return _Pack(ids, pos, seg, np.array(row + [0] * pad, np.int32),
                 np.array(col + [0] * pad, np.int32), np.array(lengths + [0] * pad, np.int32))


@dataclasses.dataclass
class _Batch:
    """Prompts decoded together: indices into the call's prompts, the shared token prefix and
    each prompt's remaining tokens."""

    items: list[int]
    prefix: tuple[int, ...]
    suffixes: list[list[int]]


def _groups(prompt_ids: list[list[int]], share: bool | None) -> list[tuple[int, list[int]]]:
    """Prompts in token order, grouped as (shared prefix length, members).

    Consecutive prompts sharing at least MIN_SHARED_PREFIX tokens (any, with share=True) form a
    group with their common prefix (each member keeps a token of its own); prompts that share
    nothing long enough gather in prefix-less groups.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: prompt_ids[i])
    least = 1 if share else MIN_SHARED_PREFIX
    runs: list[tuple[int, list[int]]] = []
    for i in order:
        if runs and share is not False:
            n, members = runs[-1]
            first = prompt_ids[members[0]]
            shared = min(n, _common_prefix([first, prompt_ids[i]]), len(prompt_ids[i]) - 1)
            if shared >= least:
                members.append(i)
                runs[-1] = (shared, members)
                continue
        runs.append((len(prompt_ids[i]) - 1, [i]))
    groups: list[tuple[int, list[int]]] = []
    for n, members in runs:
        if len(members) == 1 or n < least:
            n = 0
        if groups and n == 0 and groups[-1][0] == 0:
            groups[-1][1].extend(members)
        else:
            groups.append((n, list(members)))
    return groups


def _plan(prompt_ids: list[list[int]], per_batch: int, share: bool | None) -> list[_Batch]:
    """Batches of at most `per_batch` prompts of one group each, with the group's prefix."""
    batches = []
    for n, members in _groups(prompt_ids, share):
        prefix = tuple(prompt_ids[members[0]][:n])
        for start in range(0, len(members), per_batch):
            items = members[start:start + per_batch]
            batches.append(_Batch(items, prefix, [prompt_ids[i][n:] for i in items]))
    return batches


# --------------------------------------------------------------------------------------------
# Device code: forward passes


def _packed_forward(model: Transformer, prefix: KVCache | None, ids: jax.Array, pos: jax.Array,
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


def _decode_attention(attn: Any, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
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


def _decode_step(model: Transformer, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
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
        h, k, v = _decode_attention(layer.attn, layer.attn_norm(x), positions, inv_freq, kv_mask,
                                    cache.keys[i], cache.values[i], cache.end)
        x = x + h
        x = x + layer.mlp(layer.mlp_norm(x))
        keys.append(k)
        values.append(v)
    logits = model.hidden_to_logits(model.final_norm(x))[:, 0]
    return logits, KVCache(keys=keys, values=values, mask=kv_mask, end=cache.end + 1)


def _unpack_cache(prefix: KVCache | None, keys: list[jax.Array], values: list[jax.Array],
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
# Device code: choosing tokens


@dataclasses.dataclass(frozen=True)
class _Policy:
    """Static sampling shape of a batch: `sampled` (any row samples), `k_cap` (largest top_k of
    a sampled row, 0: none uses top-k), `top_p` 'off', 'topk' (every sampled row has top_k > 0,
    so the nucleus is found among the k_cap best) or 'full' (sort the vocabulary)."""

    sampled: bool = False
    k_cap: int = 0
    top_p: str = "off"


def _truncate(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              policy: _Policy) -> jax.Array:
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
class _Rows:
    """Per-row sampling settings (temperature 0 = greedy; top_k 0 = all tokens)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def _choose(logits: jax.Array, rows: _Rows, keys: jax.Array, step: jax.Array,
            policy: _Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next token per row, its log-prob under the sampling distribution and under the model."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pick = lambda a, tok: jnp.take_along_axis(a, tok[:, None], axis=1)[:, 0]  # noqa: E731
    if not policy.sampled:
        return best, jnp.zeros(best.shape, jnp.float32), pick(raw, best)
    x = _truncate(logits, rows.temperature, rows.top_k, rows.top_p, policy)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    drawn = jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)
    greedy = rows.temperature <= 0
    token = jnp.where(greedy, best, drawn)
    logp = jnp.where(greedy, 0.0, pick(jax.nn.log_softmax(x, axis=-1), token))
    return token, logp, pick(raw, token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Decoding:
    """The decode loop's carry. Every array but `cache.end` and `step` has rows first."""

    cache: KVCache
    rows: _Rows
    keys: jax.Array        # [R] typed PRNG keys, one per (prompt, sample)
    token: jax.Array       # [R] last chosen token (fed next)
    done: jax.Array        # [R] row has stopped (or is padding)
    step: jax.Array        # () tokens chosen so far
    tokens: jax.Array      # [R, N] chosen tokens, -1 once the row has stopped
    logp: jax.Array        # [R, N]
    raw_logp: jax.Array    # [R, N]


def _record(d: _Decoding, token: jax.Array, logp: jax.Array, raw: jax.Array,
            stop_table: jax.Array) -> _Decoding:
    live = ~d.done
    col = lambda buf, v: jax.lax.dynamic_update_slice(buf, v[:, None], (0, d.step))  # noqa: E731
    return dataclasses.replace(
        d, token=token, done=d.done | stop_table[token], step=d.step + 1,
        tokens=col(d.tokens, jnp.where(live, token, -1)),
        logp=col(d.logp, jnp.where(live, logp, 0.0)),
        raw_logp=col(d.raw_logp, jnp.where(live, raw, 0.0)),
    )


# --------------------------------------------------------------------------------------------
# The sampler

# (name, graphdef, mesh, statics, argument shapes) -> compiled executable. The functions are
# pure over their arguments, so samplers of one architecture share them (a fresh sampler after
# fine-tuning compiles nothing).
_COMPILED: dict[Any, Any] = {}
# Graph definitions and state layouts interned to small ints: hashing a 30-layer GraphDef or the
# state's treedef on every call cost a third of a SmolLM2 probe's host time.
_INTERNED: dict[Any, int] = {}
# Samplers run from several threads at once (the pipeline's parallel seeds): interning must hand
# out each number once, and an executable being compiled is waited for, not compiled twice.
_INTERN_LOCK = threading.Lock()
_COMPILE_LOCKS: dict[Any, threading.Lock] = {}
_COMPILE_LOCKS_GUARD = threading.Lock()


def _intern(value: Any) -> int:
    found = _INTERNED.get(value)
    if found is not None:
        return found
    with _INTERN_LOCK:
        return _INTERNED.setdefault(value, len(_INTERNED))


def _compile_lock(key: Any) -> threading.Lock:
    with _COMPILE_LOCKS_GUARD:
        return _COMPILE_LOCKS.setdefault(key, threading.Lock())


def _spec(x: Any) -> tuple:
    return (x.shape, str(x.dtype), getattr(x, "sharding", None))


# The decode program donates its carry (argument 1): the cache is updated in place.
_DECODE_DONATE = (1,)


@dataclasses.dataclass
class _StartCall:
    """One batch's start program call: arguments, statics, which decode rows are padding, and
    the packed prefill tokens."""

    args: tuple
    static: dict
    padding: np.ndarray
    tokens: int


def _abstract(tree: Any) -> Any:
    """Arrays (and compiled programs' output infos) as plain ShapeDtypeStructs with their
    shardings: what lowering needs of an argument."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _over_leaves(fn: Callable, treedef: Any) -> Callable:
    """`fn(state, ...)` as a function of the state's flat leaves."""
    def call(leaves: list, *more: Any, **kw: Any) -> Any:
        return fn(jax.tree.unflatten(treedef, leaves), *more, **kw)

    return call


class Sampler:
    """Generation and scoring for one model and tokenizer, with compiled functions cached by
    shape. Call `refresh(model)` after the model's weights change."""

    def __init__(self, model: Transformer, tokenizer: Any, *, mesh: Any = None,
                 chunk: int = DEFAULT_CHUNK, eos_ids: Sequence[int] | None = None,
                 compact: bool = True):
        """`chunk`: decode steps between host checks (stop strings across tokens, compaction).
        `eos_ids`: tokens that end a generation (default: the config's and tokenizer's EOS).
        `compact`: drop finished rows from the decode batch (off only to measure its effect)."""
        self.graphdef, state = nnx.split(model)
        self._graph_id = _intern(self.graphdef)
        self.config = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chunk = chunk
        self.compact = compact
        self.set_state(self._place(state))
        self.stats = SamplerStats()
        self._vocab_text: list[str] | None = None
        self._stop_tables: dict[tuple[str, ...], np.ndarray] = {}
        self._eos = self._eos_ids() if eos_ids is None else tuple(int(i) for i in eos_ids)

    # ---- setup

    def refresh(self, model: Transformer, state: Any = None) -> None:
        """Use `model`'s current weights (same architecture) from now on; `state`: its
        `nnx.state`, when the caller has it already."""
        self.set_state(self._place(nnx.state(model) if state is None else state))

    def fits(self, state: Any) -> bool:
        """Whether a model's `nnx.state` has the variables this sampler was built for (adding or
        merging LoRA adapters in place changes them, and then a new sampler is needed)."""
        return jax.tree.structure(state) == self._state_treedef

    def set_state(self, state: Any) -> None:
        """Use this NNX state (already placed where the sampler runs) as the weights."""
        # Compiled functions take the state as its flat leaves: flattening NNX Variables on
        # every call was a tenth of the probe's host time.
        self.state = state
        self._state_leaves, self._state_treedef = jax.tree.flatten(state)
        self._state_key = _intern((self._state_treedef, tuple(_spec(x) for x in self._state_leaves)))

    def reset_stats(self) -> None:
        self.stats = SamplerStats()

    def _place(self, state: Any) -> Any:
        """With a mesh, the weights as inference holds them (see `_inference_layout`)."""
        if self.mesh is None:
            return state
        dtypes, shardings = self._inference_layout(state)
        cast = jax.tree.map(lambda x, d: x if x.dtype == d else x.astype(d), state, dtypes)
        return jax.device_put(cast, shardings)

    def _inference_layout(self, state: Any) -> tuple[Any, Any]:
        """The dtype and sharding of every leaf of `state` as inference holds it on the mesh:
        sharded by the inference rules (tensor parallel inside a replica, replicated over the
        data axes, nothing along embed, so a decode step moves activations, never weights),
        floating point in the compute dtype."""
        compute = as_dtype(self.config.dtype)
        dtypes = jax.tree.map(
            lambda x: compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, state)
        return dtypes, state_shardings(state, self.mesh, INFERENCE_RULES)

    def _replicated(self) -> Any:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _rows_sharding(self, ndim: int) -> Any:
        """Rows (dim 0) over the mesh's data axes, other dims replicated."""
        return batch_sharding(self.mesh, ndim) if ndim else self._replicated()

    def _dp(self) -> int:
        if self.mesh is None:
            return 1
        return data_parallel_size(self.mesh)

    def _put(self, x: Any) -> jax.Array:
        """Host rows to the device, split over the mesh's data axes when there is one."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self._rows_sharding(np.ndim(x)))

    def _put_replicated(self, x: Any) -> jax.Array:
        return jnp.asarray(x) if self.mesh is None else jax.device_put(x, self._replicated())

    def _constrain(self, tree: Any) -> Any:
        """Rows of every array split over the mesh's data axes (no-op without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, self._rows_sharding(x.ndim)), tree)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        return tuple(sorted(i for i in ids if 0 <= i < self.config.vocab_size))

    # ---- tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of a whole prompt, with the tokenizer's default special tokens."""
        return list(self.tokenizer(text)["input_ids"])

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stop_table(self, stop: Sequence[str]) -> np.ndarray:
        """`[V]` bool: EOS and every token whose text contains one of `stop`."""
        key = tuple(stop)
        if key not in self._stop_tables:
            table = np.zeros(self.config.vocab_size, bool)
            table[list(self._eos)] = True
            if stop:
                if self._vocab_text is None:
                    n = min(len(self.tokenizer), self.config.vocab_size)
                    self._vocab_text = self.tokenizer.batch_decode([[i] for i in range(n)])
                for i, text in enumerate(self._vocab_text):
                    if any(s in text for s in stop):
                        table[i] = True
            self._stop_tables[key] = table
        return self._stop_tables[key]

    # ---- lowering: the programs generate_batch compiles, on abstract inputs

    @classmethod
    def abstract(cls, model: Transformer, tokenizer: Any = None, *, mesh: Any = None,
                 **kwargs: Any) -> "Sampler":
        """A sampler of an abstract model (`nnx.eval_shape`: no weights) on `mesh`. Its state is
        ShapeDtypeStructs with the dtypes and shardings the sampler's placement gives real
        weights (by the inference rules, floating point in the compute dtype), so it lowers its
        programs (`lower_prefix`, `lower_prefill`, `lower_decode`) and cannot run them."""
        sampler = cls(model, tokenizer, **kwargs)  # no mesh yet: nothing to place
        sampler.mesh = mesh
        state = nnx.state(model)
        if mesh is not None:
            # `_place` itself cannot run on ShapeDtypeStructs: the same layout, as structs.
            dtypes, shardings = sampler._inference_layout(state)
            state = jax.tree.map(lambda x, d, sh: jax.ShapeDtypeStruct(x.shape, d, sharding=sh),
                                 state, dtypes, shardings)
        sampler.set_state(state)
        return sampler

    def lower_prefix(self, prefix_tokens: int) -> jax.stages.Lowered:
        """The program that prefills a shared prompt prefix of `prefix_tokens` tokens (one
        packed row, computed once for every batch of its group), as `generate_batch` compiles
        it. Its outputs are the prefix cache the sampler keeps while the group decodes."""
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {prefix_tokens}")
        _, args = self._prefix_args([0] * int(prefix_tokens))
        return self._lower(self._prefix_fn, (self.state, *_abstract(args[1:])), {})

    def lower_prefill(self, batch_size: int, *, prompt_tokens: int, max_new_tokens: int,
                      methods: Method | Sequence[Method] = Greedy(), n: int = 1,
                      prefix: jax.stages.Compiled | None = None) -> jax.stages.Lowered:
        """The start program (prefill, per-row cache, first token) of a full batch of
        `generate_batch(prompts, batch_size=batch_size, methods=methods, n=n,
        max_new_tokens=max_new_tokens)` whose prompt tails have `prompt_tokens` tokens each, as
        `generate_batch` compiles it. `prefix`: the compiled `lower_prefix` program whose
        outputs are the batch's shared prefix cache (None: no shared prefix).

        Its outputs are the decode carry (`lower_decode`), whose `cache` is a `KVCache` of one
        row per slot (prompts x samples, the slot batch) by the cache length (prefix slots +
        the tails' bucket + `max_new_tokens`). Raises ValueError for non-positive sizes.
        """
        if min(batch_size, prompt_tokens, max_new_tokens) < 1:
            raise ValueError(f"batch_size, prompt_tokens and max_new_tokens must be >= 1, got "
                             f"{batch_size}, {prompt_tokens}, {max_new_tokens}")
        fan = self._fanout(methods, n)
        per_batch = max(1, batch_size // len(fan))
        batch = _Batch(list(range(per_batch)), (), [[0] * int(prompt_tokens)] * per_batch)
        cache = None if prefix is None else _abstract(prefix.out_info)
        table = self._put_replicated(self.stop_table(()))
        start = self._start_args(batch, None, batch.items, fan, int(max_new_tokens), table, 0, per_batch)
        args = (self.state, cache, *_abstract(start.args[2:]))
        return self._lower(self._start_fn, args, start.static)

    def lower_decode(self, prefill: jax.stages.Compiled, *,
                     methods: Method | Sequence[Method] = Greedy(), n: int = 1) -> jax.stages.Lowered:
        """The decode program (a `lax.while_loop` of up to `chunk` steps) that continues the
        outputs of `prefill`, as `generate_batch` compiles it: the carry with `prefill`'s output
        shardings, donated. `prefill` is the compiled `lower_prefill` program (the first decode
        chunk) or a compiled `lower_decode` program (later chunks: when a decode's outputs are
        laid out unlike its inputs, the sampler compiles this second executable too), with the
        same `methods` and `n`."""
        fan = self._fanout(methods, n)
        carry = _abstract(prefill.out_info)
        _, policy = self._rows(fan, max(1, carry.done.shape[0] // len(fan)))
        table = self._put_replicated(self.stop_table(()))
        args = self._decode_args(carry, table, self.chunk)
        return self._lower(self._decode_fn, (self.state, carry, *_abstract(args[2:])), dict(policy=policy),
                           _DECODE_DONATE)

    # ---- compilation

    def _compile(self, name: str, fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> Any:
        """`fn` compiled ahead of time for these argument shapes, as a callable of `args`; the
        compile time goes to `stats`. Executables are shared by every sampler of the same graph
        and mesh. When `args[0]` is the sampler's state, the executable takes its flat leaves."""
        with_state = bool(args) and args[0] is self.state
        rest = args[1:] if with_state else args
        key = (name, self._graph_id, self.mesh, tuple(sorted(static.items())),
               self._state_key if with_state else None, jax.tree.structure(rest),
               tuple(_spec(x) for x in jax.tree.leaves(rest)))
        compiled = _COMPILED.get(key)
        if compiled is None:
            with _compile_lock(key):
                compiled = _COMPILED.get(key)
                if compiled is None:
                    t0 = time.perf_counter()
                    compiled = self._lower(fn, args, static, donate).compile()
                    self.stats.compile_seconds += time.perf_counter() - t0
                    self.stats.compiles += 1
                    _COMPILED[key] = compiled
        if with_state:
            leaves = self._state_leaves
            return lambda *a: compiled(leaves, *a[1:])
        return compiled

    def _lower(self, fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> jax.stages.Lowered:
        """`fn` lowered for `args` as `_compile` compiles it: when `args[0]` is the sampler's
        state, as a function of its flat leaves."""
        if bool(args) and args[0] is self.state:
            fn, args = _over_leaves(fn, self._state_treedef), (self._state_leaves, *args[1:])
        return jax.jit(fn, static_argnames=tuple(static), donate_argnums=donate).lower(*args, **static)

    # ---- device functions (pure over the model state)

    def _prefix_fn(self, state: Any, ids: jax.Array, pos: jax.Array, seg: jax.Array) -> KVCache:
        """The cache of one packed row: the shared prefix, reused by every row of a batch."""
        model = nnx.merge(self.graphdef, state)
        _, keys, values = _packed_forward(model, None, ids, pos, seg)
        return KVCache(keys=keys, values=values, mask=seg >= 0,
                       end=jnp.asarray(ids.shape[1], jnp.int32))

    def _start_fn(self, state: Any, prefix: KVCache | None, pack: dict, rows: _Rows,
                  keys: jax.Array, padding: jax.Array, stop_table: jax.Array, *, span: int,
                  fanout: int, new_tokens: int, policy: _Policy) -> _Decoding:
        """Prefill the packed prompts, give each its cache row `fanout` times, choose every
        row's first token."""
        model = nnx.merge(self.graphdef, state)
        h, k, v = _packed_forward(model, prefix, pack["ids"], pack["pos"], pack["seg"])
        row, col, length = pack["row"], pack["col"], pack["length"]
        cache = _unpack_cache(prefix, k, v, row, col, length, span, new_tokens)
        last = h[row, jnp.clip(col + length - 1, 0, h.shape[1] - 1)]
        logits = model.hidden_to_logits(last[:, None])[:, 0]
        if fanout > 1:
            rep = lambda a: jnp.repeat(a, fanout, axis=0)  # noqa: E731
            cache = KVCache([rep(a) for a in cache.keys], [rep(a) for a in cache.values],
                            rep(cache.mask), cache.end)
            logits = rep(logits)
        r = logits.shape[0]
        d = _Decoding(
            cache=self._constrain(cache), rows=rows, keys=keys,
            token=jnp.zeros((r,), jnp.int32), done=padding, step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((r, new_tokens), -1, jnp.int32),
            logp=jnp.zeros((r, new_tokens), jnp.float32),
            raw_logp=jnp.zeros((r, new_tokens), jnp.float32),
        )
        token, logp, raw = _choose(logits, rows, keys, d.step, policy)
        return _record(d, token, logp, raw, stop_table)

    def _decode_fn(self, state: Any, d: _Decoding, stop_table: jax.Array, limit: jax.Array, *,
                   policy: _Policy) -> _Decoding:
        """Decode steps until every row is done or `step` reaches `limit`."""
        model = nnx.merge(self.graphdef, state)

        def body(d: _Decoding) -> _Decoding:
            logits, cache = _decode_step(model, d.token, d.cache)
            token, logp, raw = _choose(logits, d.rows, d.keys, d.step, policy)
            return _record(dataclasses.replace(d, cache=cache), token, logp, raw, stop_table)

        return jax.lax.while_loop(lambda d: (d.step < limit) & ~jnp.all(d.done), body, d)

    @staticmethod
    def _gather_fn(d: _Decoding, index: jax.Array, valid: jax.Array) -> _Decoding:
        """Rows `index` of the carry; rows where `valid` is false become done padding."""
        d = jax.tree.map(lambda a: a if a.ndim == 0 else a[index], d)
        return dataclasses.replace(d, done=d.done | ~valid)

    def _score_fn(self, state: Any, prefix: KVCache | None, pack: dict, prompt_len: jax.Array,
                  cont: jax.Array, *, temperature: float, top_k: int) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced log-probs `[B, C]` of `cont` (packed after each prompt): raw, and
        under softmax(logits / T) kept to the top-k."""
        model = nnx.merge(self.graphdef, state)
        h, _, _ = _packed_forward(model, prefix, pack["ids"], pack["pos"], pack["seg"])
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
        x = _truncate(logits.reshape(b * n, v), full(temperature, jnp.float32),
                      full(top_k, jnp.int32), full(1.0, jnp.float32), _Policy(True, top_k, "off"))
        return raw, pick(jax.nn.log_softmax(x, axis=-1).reshape(b, n, v))

    # ---- host orchestration: shared pieces

    def _validate_lengths(self, prompt_ids: list[list[int]], extra: Sequence[int]) -> None:
        limit = self.config.max_position_embeddings
        for i, (ids, more) in enumerate(zip(prompt_ids, extra)):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization: nothing to continue")
            if len(ids) + more > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with {more} more it exceeds the model's "
                    f"context of {limit} tokens (max_position_embeddings)")

    def _prefix_cache(self, prefix: tuple[int, ...], memo: dict) -> KVCache | None:
        """The prefix's cache, computed once while consecutive batches share it."""
        if not prefix:
            return None
        if prefix not in memo:
            pack, args = self._prefix_args(prefix)
            memo.clear()
            memo[prefix] = self._compile("prefix", self._prefix_fn, args, {})(*args)
            self.stats.prefill_tokens += pack.tokens
            self.stats.prefixes += 1
        return memo[prefix]

    def _prefix_args(self, prefix: Sequence[int]) -> tuple[_Pack, tuple]:
        """The prefix program's arguments: the prefix packed into one replicated row."""
        pack = _pack([list(prefix)], offset=0, count=1, row_multiple=1)
        return pack, (self.state, *(self._put_replicated(a) for a in (pack.ids, pack.pos, pack.seg)))

    def _pack_args(self, seqs: list[list[int]], offset: int, count: int) -> tuple[_Pack, dict]:
        pack = _pack(seqs, offset=offset, count=count, row_multiple=self._dp())
        arrays = {"ids": pack.ids, "pos": pack.pos, "seg": pack.seg, "row": pack.row,
                  "col": pack.col, "length": pack.length}
        return pack, {k: self._put(v) for k, v in arrays.items()}

    # ---- generation

    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int,
                       methods: Method | Sequence[Method] = Greedy(), n: int = 1,
                       stop: Sequence[str] = (), seed: int = 0,
                       batch_size: int = DEFAULT_BATCH_SIZE, prefix: str = "",
                       share_prefix: bool | None = None,
                       prompt_keys: Sequence[int] | None = None) -> list[list[Generation]]:
        """For each prompt, one `Generation` per sample, in order.

        `methods`: one method used for `n` samples, or a list of methods, one sample each (e.g.
        `[Greedy()] + [Sample(0.5, 40)] * 16`). `prefix` is prepended to every prompt (the
        few-shot part common to all; see the module docstring for how sharing tokenizes).
        `share_prefix`: None shares a common token prefix of >= MIN_SHARED_PREFIX tokens, True
        any, False none. `prompt_keys`: integers seeding each prompt's samples (default: its
        index), so a subset of prompts can be re-run on the same random stream.
        `batch_size`: most rows (prompts x samples) decoded together. Bad arguments raise
        ValueError before anything is compiled.
        """
        prompts = _check_prompts(prompts)
        fan = self._fanout(methods, n)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt_keys is not None and len(prompt_keys) != len(prompts):
            raise ValueError(f"prompt_keys has {len(prompt_keys)} entries for {len(prompts)} prompts")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        prompt_ids = [self.encode(prefix + p) for p in prompts]
        self._validate_lengths(prompt_ids, [max_new_tokens] * len(prompts))
        keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
        table = self._put_replicated(self.stop_table(stop))
        out: list[list[Generation]] = [[] for _ in prompts]
        memo: dict = {}
        per_batch = max(1, batch_size // len(fan))
        for batch in _plan(prompt_ids, per_batch, share_prefix):
            gens = self._run_batch(batch, prompt_ids, keys, fan, max_new_tokens, stop, table, seed,
                                   memo, per_batch)
            for i, g in zip(batch.items, gens):
                out[i] = g
        return out

    @staticmethod
    def _fanout(methods: Method | Sequence[Method], n: int) -> list[Method]:
        if isinstance(methods, (Greedy, Sample)):
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            return [methods] * n
        fan = list(methods)
        if not fan or not all(isinstance(m, (Greedy, Sample)) for m in fan):
            raise ValueError("methods must be a Greedy/Sample or a non-empty list of them")
        if n != 1:
            raise ValueError("give either one method and n, or a list of methods (n = 1)")
        return fan

    def _rows(self, fan: list[Method], prompts: int) -> tuple[_Rows, _Policy]:
        """Per-row settings for `prompts` x `fan` rows, and the batch's static policy."""
        settings = [m if isinstance(m, Sample) else Sample(0.0) for m in fan]
        sampled = [s for s in settings if s.temperature > 0]
        k_cap = max((s.top_k for s in sampled), default=0)
        if not sampled or all(s.top_p >= 1 for s in sampled):
            top_p = "off"
        elif all(s.top_k > 0 for s in sampled):
            top_p = "topk"
        else:
            top_p = "full"
        tile = lambda v, dt: self._put(np.tile(np.asarray(v, dt), prompts))  # noqa: E731
        rows = _Rows(temperature=tile([s.temperature for s in settings], np.float32),
                     # greedy rows: a top-1 distribution, so their sampling log-prob is 0
                     top_k=tile([s.top_k if s.temperature > 0 else 1 for s in settings], np.int32),
                     top_p=tile([s.top_p for s in settings], np.float32))
        return rows, _Policy(bool(sampled), k_cap, top_p)

    def _row_keys(self, seed: int, prompt_keys: list[int], fan: int) -> jax.Array:
        base = jax.random.key(seed)
        p = jnp.repeat(jnp.asarray(prompt_keys, jnp.uint32), fan)
        j = jnp.tile(jnp.arange(fan, dtype=jnp.uint32), len(prompt_keys))
        per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, p)
        keys = jax.vmap(jax.random.fold_in)(per_prompt, j)
        return keys if self.mesh is None else jax.device_put(keys, self._rows_sharding(1))

    def _batch_rows(self, count: int, per_batch: int) -> int:
        """Prompts a batch is padded to: `per_batch` when full, else a power of two; a
        multiple of the data-parallel size."""
        return _round_up(min(next_pow2(count), max(count, per_batch)), self._dp())

    def _run_batch(self, batch: _Batch, prompt_ids: list[list[int]], prompt_keys: list[int],
                   fan: list[Method], new_tokens: int, stop: tuple[str, ...], table: jax.Array,
                   seed: int, memo: dict, per_batch: int) -> list[list[Generation]]:
        m = len(fan)
        prefix = self._prefix_cache(batch.prefix, memo)
        start = self._start_args(batch, prefix, prompt_keys, fan, new_tokens, table, seed, per_batch)
        d = self._compile("start", self._start_fn, start.args, start.static)(*start.args)
        self.stats.prefill_tokens += start.tokens
        self.stats.logit_rows += len(start.padding) // m
        results = self._decode_loop(d, np.where(start.padding, -1, np.arange(len(start.padding))),
                                    new_tokens, stop, table, start.static["policy"])
        out = []
        for p, item in enumerate(batch.items):
            prompt = prompt_ids[item]
            head = self._decode(prompt)
            out.append([self._finish(head, prompt, *results[p * m + j], stop) for j in range(m)])
        return out

    def _start_args(self, batch: _Batch, prefix: KVCache | None, prompt_keys: list[int],
                    fan: list[Method], new_tokens: int, table: jax.Array, seed: int,
                    per_batch: int) -> "_StartCall":
        """The start program's arguments and statics for one batch (padded to `_batch_rows`
        prompts, each repeated once per method)."""
        count, m = len(batch.items), len(fan)
        b = self._batch_rows(count, per_batch)
        packed, pack = self._pack_args(batch.suffixes, len(batch.prefix), b)
        rows, policy = self._rows(fan, b)
        keys = [prompt_keys[i] for i in batch.items] + [0] * (b - count)
        padding = np.repeat(np.arange(b) >= count, m)
        args = (self.state, prefix, pack, rows, self._row_keys(seed, keys, m), self._put(padding), table)
        span = next_pow2(max(len(s) for s in batch.suffixes), MIN_BUCKET)
        static = dict(span=span, fanout=m, new_tokens=new_tokens, policy=policy)
        return _StartCall(args, static, padding, packed.tokens)

    def _decode_args(self, d: _Decoding, table: jax.Array, limit: int) -> tuple:
        """The decode program's arguments: run until step `limit` (or every row is done)."""
        return (self.state, d, table, self._put_replicated(np.int32(limit)))

    def _decode_loop(self, d: _Decoding, row_ids: np.ndarray, new_tokens: int,
                     stop: tuple[str, ...], table: jax.Array,
                     policy: _Policy) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Run decode chunks to the end; (tokens, logp, raw_logp) per original row."""
        results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        spanning = any(len(s.encode()) > 1 for s in stop)
        while True:
            step = int(d.step)
            done = np.asarray(d.done)
            if spanning:
                d, done = self._check_spanning_stops(d, done, stop)
            if done.all() or step >= new_tokens:
                self._collect(d, row_ids, results, np.ones_like(done))
                return results
            live = np.flatnonzero(~done)
            target = _round_up(next_pow2(len(live), MIN_COMPACT_ROWS), self._dp())
            if self.compact and target <= len(done) // 2:
                d, row_ids = self._compact(d, row_ids, live, target, results, done)
            args = self._decode_args(d, table, min(step + self.chunk, new_tokens))
            d = self._compile("decode", self._decode_fn, args, dict(policy=policy), donate=_DECODE_DONATE)(*args)
            taken = int(d.step) - step
            self.stats.decode_steps += taken
            self.stats.decode_row_steps += taken * len(row_ids)
            self.stats.logit_rows += taken * len(row_ids)

    def _compact(self, d: _Decoding, row_ids: np.ndarray, live: np.ndarray, target: int,
                 results: dict, done: np.ndarray) -> tuple[_Decoding, np.ndarray]:
        """Keep only the live rows (padded to `target` with copies marked done)."""
        self._collect(d, row_ids, results, done)
        index = np.concatenate([live, np.full(target - len(live), live[0])]).astype(np.int32)
        valid = np.arange(target) < len(live)
        args = (d, self._put(index), self._put(valid))
        d = self._compile("gather", self._gather_fn, args, {})(*args)
        self.stats.compactions += 1
        return d, np.where(valid, row_ids[index], -1)

    @staticmethod
    def _collect(d: _Decoding, row_ids: np.ndarray, results: dict, which: np.ndarray) -> None:
        tokens, logp, raw = (np.asarray(a) for a in (d.tokens, d.logp, d.raw_logp))
        for r in np.flatnonzero(which):
            if row_ids[r] >= 0 and row_ids[r] not in results:
                results[int(row_ids[r])] = (tokens[r], logp[r], raw[r])

    def _check_spanning_stops(self, d: _Decoding, done: np.ndarray,
                              stop: tuple[str, ...]) -> tuple[_Decoding, np.ndarray]:
        """Mark rows whose text contains a stop string made of several tokens."""
        tokens = np.asarray(d.tokens)
        hit = np.array([not done[r] and any(s in self._decode(tokens[r][tokens[r] >= 0]) for s in stop)
                        for r in range(len(done))])
        if hit.any():
            done = done | hit
            d = dataclasses.replace(d, done=self._put(done))
        return d, done

    def _finish(self, head: str, prompt: list[int], tokens: np.ndarray, logp: np.ndarray,
                raw: np.ndarray, stop: tuple[str, ...]) -> Generation:
        """Cut a row's record after its stopping token and its text before the stop string
        (`head`: the prompt's decoded text)."""
        ids = [int(t) for t in tokens if t >= 0]
        reason, end = "length", len(ids)
        eos = next((i for i, t in enumerate(ids) if t in self._eos), None)
        if eos is not None:
            reason, end = "eos", eos + 1
        text = self._text(head, prompt, ids[:eos] if eos is not None else ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            reason, text = "stop", text[:cut]
            end = next(i for i in range(1, end + 1)
                       if any(s in self._text(head, prompt, ids[:i]) for s in stop))
        return Generation(text=text, token_ids=tuple(ids[:end]),
                          logprobs=tuple(float(x) for x in logp[:end]),
                          raw_logprobs=tuple(float(x) for x in raw[:end]), finish_reason=reason)

    def _text(self, head: str, prompt: list[int], ids: list[int]) -> str:
        """Text of `ids` as it reads after the prompt (SentencePiece keeps the leading space)."""
        full = self._decode(prompt + ids)
        return full[len(head):] if full.startswith(head) else self._decode(ids)

    # ---- scoring

    def score(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]], *,
              temperature: float = 1.0, top_k: int = 0,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[TokenScores]:
        """Teacher-forced log-probs of each continuation after its prompt (see `TokenScores`).

        A string continuation is tokenized on its own without special tokens (as the sampler
        appends generated tokens to a prompt); pass `Generation.token_ids` to score exactly
        what was generated. Temperature 0 scores 0 for the argmax token and -inf elsewhere.
        """
        prompts = _check_prompts(prompts)
        if isinstance(continuations, str) or len(continuations) != len(prompts):
            raise ValueError(f"need one continuation per prompt ({len(prompts)})")
        _check_sampling(temperature, top_k, 1.0)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompt_ids = [self.encode(p) for p in prompts]
        conts = [self._encode_plain(c) if isinstance(c, str) else [int(t) for t in c]
                 for c in continuations]
        self._validate_lengths(prompt_ids, [len(c) for c in conts])
        out: list[TokenScores] = [TokenScores((), (), ())] * len(prompts)
        memo: dict = {}
        for batch in _plan(prompt_ids, batch_size, None):
            scored = self._score_batch(batch, conts, temperature, top_k, memo, batch_size)
            for i, s in zip(batch.items, scored):
                out[i] = s
        return out

    def _score_batch(self, batch: _Batch, conts: list[list[int]], temperature: float, top_k: int,
                     memo: dict, batch_size: int) -> list[TokenScores]:
        count = len(batch.items)
        b = self._batch_rows(count, batch_size)
        prefix = self._prefix_cache(batch.prefix, memo)
        rows = [conts[i] for i in batch.items]
        seqs = [s + c for s, c in zip(batch.suffixes, rows)]
        packed, pack = self._pack_args(seqs, len(batch.prefix), b)
        self.stats.prefill_tokens += packed.tokens
        width = next_pow2(max(1, max(len(c) for c in rows)), MIN_BUCKET)
        cont = np.zeros((b, width), np.int32)
        for i, c in enumerate(rows):
            cont[i, :len(c)] = c
        prompt_len = np.array([len(s) for s in batch.suffixes] + [1] * (b - count), np.int32)
        args = (self.state, prefix, pack, self._put(prompt_len), self._put(cont))
        static = dict(temperature=float(temperature), top_k=int(top_k))
        raw, lp = self._compile("score", self._score_fn, args, static)(*args)
        self.stats.logit_rows += b * width
        raw, lp = np.asarray(raw), np.asarray(lp)
        return [TokenScores(tuple(c), tuple(float(x) for x in raw[i, :len(c)]),
                            tuple(float(x) for x in lp[i, :len(c)])) for i, c in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# Functional entry points


_SAMPLERS: "weakref.WeakKeyDictionary[Transformer, Sampler]" = weakref.WeakKeyDictionary()
_SAMPLERS_LOCK = threading.Lock()


def sampler_for(model: Transformer | Sampler, tokenizer: Any, mesh: Any = None) -> Sampler:
    """The cached `Sampler` of `model`, refreshed to its current weights (a new one when the
    tokenizer, the mesh or the model's variables differ); a `Sampler` passes through."""
    if isinstance(model, Sampler):
        return model
    with _SAMPLERS_LOCK:
        s = _SAMPLERS.get(model)
        state = nnx.state(model) if s is not None else None
        if s is None or s.tokenizer is not tokenizer or s.mesh is not mesh or not s.fits(state):
            s = Sampler(model, tokenizer, mesh=mesh)
            _SAMPLERS[model] = s
        else:
            s.refresh(model, state)
    return s


def generate_batch(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str], *,
                   mesh: Any = None, **kwargs: Any) -> list[list[Generation]]:
    """`Sampler.generate_batch` on the model's cached sampler."""
    return sampler_for(model, tokenizer, mesh).generate_batch(prompts, **kwargs)


def generate(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             n: int = 1, stop: Sequence[str] = (), seed: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, mesh: Any = None) -> list[list[str]]:
    """For each prompt, `n` completions: the text after the prompt, cut before the first stop
    string (EOS ends a completion too). Temperature 0 is greedy. Bad arguments raise ValueError
    before anything is compiled."""
    method = method_of(temperature, top_k, top_p)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gens = generate_batch(model, tokenizer, prompts, mesh=mesh, max_new_tokens=max_new_tokens,
                          methods=method, n=n, stop=stop, seed=seed, batch_size=batch_size)
    return [[g.text for g in row] for row in gens]


def score_continuations(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str],
                        continuations: Sequence[str | Sequence[int]], *, temperature: float = 1.0,
                        top_k: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                        mesh: Any = None) -> list[TokenScores]:
    """Per-token log-probs of each continuation after its prompt, raw and under
    softmax(logits / T) kept to the top-k (see `Sampler.score`)."""
    return sampler_for(model, tokenizer, mesh).score(prompts, continuations, temperature=temperature,
                                                     top_k=top_k, batch_size=batch_size)


__all__ = ["Generation", "Greedy", "Method", "Sample", "Sampler", "SamplerStats", "TokenScores",
           "generate", "generate_batch", "method_of", "next_pow2", "sampler_for",
           "score_continuations"]
