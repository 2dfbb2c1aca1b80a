"""Device code: token choice, the decode carry and the six programs the sampler compiles.

Every program runs the model's own forward pass (`Transformer.__call__`); only masks,
positions and where keys and values go are built here.

- `prefill_program`: prefixes, `[prefill_rows, prefix_width]`, into rows of the prefix store.
- `first_program`: tails packed `[insert_rows, insert_width]` (one stored prefix per row)
  prefilled against their prefixes, the first token of every row (prompt x sample) that will
  continue them chosen; the tails' cache stays on the device, each tail's best next-token
  logits go to the host (`first_tokens`: what later scoring of the prompt may skip).
- `admit_program`: the rows the host admits (those that did not end at their first token and
  that the caller still wants) started in decode slots: each gets its tail's prefix and tail
  keys copied in, its settings and its first token. The host reads the first tokens between
  the two, so rows that end or are abandoned at once never cost a copy.
- `decode_program`: one token per slot per step until a step limit or until enough slots are
  done to be worth refilling (continuous batching). Every slot writes its new keys at one
  shared column of its generation region, used as a ring: a slot started k steps ago holds its
  k tokens in k distinct columns (attention ignores their order), and the write is a plain
  dynamic update (no scatter, so nothing moves between devices).
- `score_program`: teacher-forced log-probs of continuations packed `[score_rows, score_width]`
  against their stored prefixes, each prompt tail once with its continuations branching off it.
- `branch_program`: the same log-probs for continuations of the tails `first_program` has
  just prefilled, against its tails' cache: only the continuations' own tokens run.

All but `admit_program` take the model state first; the sampler binds the graph definition
(and its mesh constraint) and compiles them once for its `packing.Shapes`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.random import threefry2x32_p

from gradual_jax.models.transformer import KVCache, SharedPrefix, as_dtype, is_stacked, map_layers

# --------------------------------------------------------------------------------------------
# Choosing tokens


@dataclasses.dataclass(frozen=True)
class Policy:
    """Static sampling shape of the engine: `k_cap` (the largest top-k a row may use) and
    `top_p` 'off', 'topk' (every sampled row has top_k > 0, so the nucleus is found among the
    k_cap best) or 'full' (sort the vocabulary). Greedy and sampled rows share one policy."""

    k_cap: int = 64
    top_p: str = "off"


def truncate(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
             policy: Policy) -> jax.Array:
    """logits / T with tokens outside each row's top-k and top-p set to -inf (rows with
    top_k = 0 keep every token). Ordered as transformers: temperature, top-k, top-p."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    neg_inf = jnp.float32(-jnp.inf)
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
    """Per-row sampling settings (temperature 0 = greedy; top_k 0 = all tokens) and each row's
    random key (`jax.random.key_data`)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    key: jax.Array


def row_keys(seed: jax.Array, prompt_key: jax.Array, sample: jax.Array) -> jax.Array:
    """Key data of rows (prompt key p, sample j): fold_in(fold_in(key(seed), p), j)."""
    def one(s: jax.Array, p: jax.Array, j: jax.Array) -> jax.Array:
        return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), p), j))

    return jax.vmap(one)(seed, prompt_key, sample)


def gumbel_at(key: jax.Array, index: jax.Array) -> jax.Array:
    """The float32 noise `jax.random.gumbel(key, (V,))` holds at `index` (ints below 2**32),
    computed for those entries alone. JAX's threefry draws in counter mode
    (`jax_threefry_partitionable`): entry i's bits come from counter (0, i) alone, and the
    uniform and Gumbel transforms below are `jax.random`'s, op for op."""
    k1, k2 = jax.random.key_data(key)
    i = index.astype(jnp.uint32)
    b1, b2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(i), i)
    mantissa = jax.lax.shift_right_logical(b1 ^ b2, jnp.uint32(32 - 23)) | jnp.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    uniform = jax.lax.max(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


def same_noise_at_any_index(dtype: Any) -> bool:
    """Whether `gumbel_at` reproduces `jax.random.gumbel` for `dtype` under JAX's current
    settings: float32, threefry keys in counter mode, the default ("low") Gumbel precision."""
    return (jnp.dtype(dtype) == jnp.float32 and bool(jax.config.jax_threefry_partitionable)
            and not jax.config.jax_high_dynamic_range_gumbel
            and jax.config.jax_default_prng_impl == "threefry2x32")


def categorical_among_top(keys: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """`vmap(jax.random.categorical)(keys, x)` for rows of `x` `[R, V]` with at most `k` finite
    entries each, from their `k` largest only: the same Gumbel-max draw (ties to the lowest
    token, as argmax), without noise for the V - k tokens that cannot win."""
    values, index = jax.lax.top_k(x, k)
    score = values + jax.vmap(gumbel_at)(keys, index)
    top = jnp.max(score, axis=-1, keepdims=True)
    return jnp.min(jnp.where(score == top, index, x.shape[-1]), axis=-1).astype(jnp.int32)


def choose(logits: jax.Array, rows: Rows, step: jax.Array,
           policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next token per row (its `step`-th), its log-prob under the sampling distribution (0 for
    greedy rows) and under the model. Row key k draws step t with fold_in(k, t).

    When no row samples, the sampling machinery (top-k, a Gumbel draw and a log-softmax over the
    whole vocabulary per row: about 10x the cost of the greedy choice) is skipped at run time;
    the results are the same either way."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pick = lambda a, tok: jnp.take_along_axis(a, tok[:, None], axis=1)[:, 0]  # noqa: E731
    greedy = rows.temperature <= 0

    def sampled() -> tuple[jax.Array, jax.Array]:
        x = truncate(logits, rows.temperature, rows.top_k, rows.top_p, policy)
        keys = jax.random.wrap_key_data(rows.key)
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        # Every sampled row keeps at most k_cap tokens (top-k): draw among them only, with the
        # noise the full draw gives them (same tokens, a small fraction of the random bits).
        full = lambda: jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)  # noqa: E731
        if same_noise_at_any_index(x.dtype):
            few = jnp.all(greedy | (jnp.sum(x > -jnp.inf, axis=-1) <= policy.k_cap))
            drawn = jax.lax.cond(few, lambda: categorical_among_top(step_keys, x, policy.k_cap), full)
        else:
            drawn = full()
        token = jnp.where(greedy, best, drawn)
        return token, jnp.where(greedy, 0.0, pick(jax.nn.log_softmax(x, axis=-1), token))

    token, logp = jax.lax.cond(jnp.all(greedy), lambda: (best, jnp.zeros(best.shape, jnp.float32)), sampled)
    return token, logp, pick(raw, token)


# --------------------------------------------------------------------------------------------
# Carries


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixStore:
    """Keys and values of stored prefixes: per layer `[store_rows, prefix_width, K, H]`, and
    `mask[r, s]` true where row r's slot s holds a real token."""

    keys: list[jax.Array]
    values: list[jax.Array]
    mask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Decoding:
    """The decode slots. Every array has the slot first; slot s holds one (prompt, sample)
    row from its insert until the host collects it once `done`. A slot's cache holds its own
    tokens (prompt tail, then generation); its prompt's prefix stays in the prefix store, in
    row `prefix_rows[s]`, which the slot reads while it decodes."""

    cache: KVCache
    prefix_rows: jax.Array  # [B] the store row of each slot's prefix
    prefix_mask: jax.Array  # [B, P] that row's real slots
    rows: Rows
    token: jax.Array       # [B] last chosen token (fed next)
    done: jax.Array        # [B] stopped, or empty
    step: jax.Array        # [B] tokens chosen so far
    tokens: jax.Array      # [B, N] chosen tokens, -1 past the row's end
    logp: jax.Array        # [B, N]
    raw_logp: jax.Array    # [B, N]


def record(d: Decoding, token: jax.Array, logp: jax.Array, raw: jax.Array,
           stop_table: jax.Array, live: jax.Array) -> Decoding:
    """The carry after choosing `token` for the `live` slots: they record it at their own
    step, advance, and become done on a token of `stop_table` or at the last step."""
    n = d.tokens.shape[1]
    at = (jnp.arange(n)[None, :] == d.step[:, None]) & live[:, None]
    step = d.step + live.astype(jnp.int32)
    return dataclasses.replace(
        d, token=jnp.where(live, token, d.token),
        done=d.done | (live & (stop_table[token] | (step >= n))), step=step,
        tokens=jnp.where(at, token[:, None], d.tokens),
        logp=jnp.where(at, logp[:, None], d.logp),
        raw_logp=jnp.where(at, raw[:, None], d.raw_logp),
    )


# --------------------------------------------------------------------------------------------
# Shared pieces


def model_for(graphdef: Any, state: Any, kv: Any) -> Any:
    """The model of `state`, its layers stacked (`Transformer.stacked`: one scanned layer) when
    the sampler keeps its keys and values layer-stacked (`kv`), as each layer otherwise."""
    model = nnx.merge(graphdef, state)
    return model.stacked() if is_stacked(kv) else model


def _against_prefixes(model: Any, store: PrefixStore, prefix_rows: jax.Array, ids: jax.Array,
                      pos: jax.Array, seg: jax.Array,
                      branch: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Packed rows `ids` `[R, W]` (segments `seg`, 0: padding; `pos` from each segment's start)
    run after their stored prefixes `prefix_rows` `[R]`. Each token attends to its row's prefix
    and causally to its own segment (`branch`: to its segment's trunk and own branch, see
    `Transformer.__call__`). Returns hidden states `[R, W, D]` and the rows' caches
    `[R, P + W]` (prefix slots, then the packed tokens)."""
    r, w = ids.shape
    p = store.mask.shape[1]
    dtype = as_dtype(model.config.dtype)
    fresh = lambda a: jnp.concatenate(  # noqa: E731
        [a[prefix_rows].astype(dtype), jnp.zeros((r, w, *a.shape[2:]), dtype)], axis=1)
    prefix_mask = store.mask[prefix_rows]
    cache = KVCache(keys=map_layers(fresh, store.keys), values=map_layers(fresh, store.values),
                    mask=jnp.concatenate([prefix_mask, jnp.zeros((r, w), jnp.bool_)], axis=1),
                    end=jnp.asarray(p, jnp.int32))
    positions = prefix_mask.sum(-1).astype(jnp.int32)[:, None] + pos
    h, cache = model(ids, seg > 0, segment_ids=seg, positions=positions, branch_ids=branch, cache=cache,
                     return_hidden=True)
    return h, cache


# --------------------------------------------------------------------------------------------
# The programs (pure over the model state)

# Programs that update a carry donate it (argument 1): the buffers are reused in place.
DONATE_CARRY = (1,)
# admit_program takes no model state: the decode slots are its first argument.
ADMIT_DONATES = (0,)


def prefill_program(graphdef: Any, constrain: Callable[[Any], Any], state: Any, store: PrefixStore,
                    ids: jax.Array, length: jax.Array, dest: jax.Array) -> PrefixStore:
    """Prefixes `ids` `[R, P]` (`length` real tokens each) into store rows `dest` `[R]` (rows
    out of range are dropped: padding)."""
    model = model_for(graphdef, state, store.keys)
    r, p = ids.shape
    mask = jnp.arange(p)[None, :] < length[:, None]
    empty = KVCache.init(model.config, r, p, stacked=is_stacked(store.keys))
    _, cache = model(ids, mask, cache=empty, return_hidden=True)
    put = lambda buf, new: buf.at[dest].set(new.astype(buf.dtype), mode="drop")  # noqa: E731
    return constrain(PrefixStore(keys=map_layers(put, store.keys, cache.keys),
                                 values=map_layers(put, store.values, cache.values),
                                 mask=put(store.mask, mask)))


def first_program(graphdef: Any, constrain: Callable[[Any], Any], split: Callable[[Any], Any],
                  local: Callable[[Callable], Callable], state: Any, store: PrefixStore, pack: dict, draw: dict, *,
                  policy: Policy) -> tuple[KVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array,
                                           jax.Array]:
    """Prefill the packed tails `pack` (ids, pos, seg `[R, W]`, prefix `[R]`; per tail: row,
    col, length `[T]`) against their stored prefixes and choose the first token of each row
    `draw` asks for (source tail `[D]`; temperature, top_k, top_p; key seed, prompt key and
    sample). Returns the tails' cache `[R, P + W]` (kept on the device for `admit_program`),
    per row its first token, log-prob under its sampling distribution and under the model,
    and per tail its `k_cap` largest next-token logits, descending, with their tokens
    `[T, k_cap]` (what a later scoring of the same prompt may skip: `first_tokens`), and each
    tail's last final-normed hidden state `[T, D]` (what `branch_program` reads a continuation's
    first token from). The
    logits are computed once per tail, however many rows draw from it; the rows' choices are
    `split` over the replicas (each draws its share, `local`), the rest is `constrain`ed."""
    model = model_for(graphdef, state, store.keys)
    h, mini = _against_prefixes(model, store, pack["prefix"], pack["ids"], pack["pos"], pack["seg"])
    w = pack["ids"].shape[1]
    last = h[pack["row"], jnp.clip(pack["col"] + pack["length"] - 1, 0, w - 1)]  # [T, D_model]
    logits = model.hidden_to_logits(last[:, None])[:, 0]
    draw = split(draw)
    keys = row_keys(draw["seed"], draw["prompt_key"], draw["sample"])
    rows = Rows(draw["temperature"], draw["top_k"], draw["top_p"], keys)
    token, logp, raw = local(functools.partial(choose, policy=policy))(
        split(logits[draw["source"]]), rows, jnp.zeros(keys.shape[:1], jnp.int32))
    best, best_ids = local(lambda x: jax.lax.top_k(x, policy.k_cap))(split(logits))
    return constrain(mini), token, logp, raw, best, best_ids.astype(jnp.int32), constrain(last)


def admit_program(constrain: Callable[[Any], Any], d: Decoding, mini: KVCache, pack: dict,
                  place: dict, stop_table: jax.Array) -> Decoding:
    """Start slots `place` (slot `[A]`, out of range: none; source tail `[A]`; temperature,
    top_k, top_p; key seed, prompt key and sample; the first token chosen by `first_program`
    with its log-probs) on the tails of `mini`, the cache `first_program` returned for `pack`
    (the same packing): each slot gets its tail's keys, the store row of its prefix, its
    settings and its first token."""
    w = pack["ids"].shape[1]
    p = mini.mask.shape[1] - w
    src = place["source"]
    row, col, length = pack["row"][src], pack["col"][src], pack["length"][src]  # per slot
    j = jnp.arange(w)
    valid = j[None, :] < length[:, None]  # [A, W]
    r_idx = jnp.broadcast_to(row[:, None], valid.shape)
    c_idx = p + jnp.clip(col[:, None] + j[None, :], 0, w - 1)
    slot = place["slot"]

    def copy(buf: jax.Array, part: jax.Array) -> jax.Array:
        own = jnp.where(valid[..., None, None], part[r_idx, c_idx], 0).astype(buf.dtype)  # [A, W, K, H]
        return buf.at[slot, :w].set(own, mode="drop")

    put = lambda buf, new: buf.at[slot].set(new, mode="drop")  # noqa: E731
    new_mask = jnp.concatenate([valid, jnp.zeros((slot.shape[0], d.tokens.shape[1]), jnp.bool_)], axis=1)
    cache = KVCache(keys=map_layers(copy, d.cache.keys, mini.keys),
                    values=map_layers(copy, d.cache.values, mini.values),
                    mask=put(d.cache.mask, new_mask), end=d.cache.end)
    keys = row_keys(place["seed"], place["prompt_key"], place["sample"])
    rows = Rows(temperature=put(d.rows.temperature, place["temperature"]),
                top_k=put(d.rows.top_k, place["top_k"]), top_p=put(d.rows.top_p, place["top_p"]),
                key=put(d.rows.key, keys))
    n = d.tokens.shape[1]
    d = dataclasses.replace(
        d, cache=cache, rows=rows, prefix_rows=put(d.prefix_rows, pack["prefix"][row]),
        prefix_mask=put(d.prefix_mask, mini.mask[row, :p]), done=put(d.done, jnp.zeros(slot.shape, bool)),
        step=put(d.step, jnp.zeros_like(slot)),
        tokens=put(d.tokens, jnp.full((slot.shape[0], n), -1, jnp.int32)),
        logp=put(d.logp, jnp.zeros((slot.shape[0], n), jnp.float32)),
        raw_logp=put(d.raw_logp, jnp.zeros((slot.shape[0], n), jnp.float32)))
    # Scatter the first tokens into full-width rows, then record them for the started slots.
    started = jnp.zeros(d.done.shape, bool).at[slot].set(True, mode="drop")
    full = lambda v: jnp.zeros(d.done.shape, v.dtype).at[slot].set(v, mode="drop")  # noqa: E731
    return constrain(record(d, full(place["token"]), full(place["logp"]), full(place["raw"]),
                            stop_table, started))


def decode_program(graphdef: Any, constrain: Callable[[Any], Any], local: Callable[[Callable], Callable],
                   state: Any, d: Decoding, store: PrefixStore,
                   stop_table: jax.Array, limit: jax.Array, refill_at: jax.Array, *,
                   policy: Policy) -> tuple[Decoding, jax.Array]:
    """Decode steps until `limit` steps are taken, every slot is done, or at least `refill_at`
    slots are done (the host then refills them), each slot attending to its prefix in `store`
    and to its own cache. Returns the carry and the steps taken. Each replica chooses its own
    slots' tokens (`local`)."""
    model = model_for(graphdef, state, d.cache.keys)  # stacked (when it is) once, outside the loop
    choose_local = local(functools.partial(choose, policy=policy))

    n = d.tokens.shape[1]
    first = d.cache.size - n  # the generation region: a ring of n slots every row writes together

    def body(carry: tuple[jax.Array, Decoding]) -> tuple[jax.Array, Decoding]:
        i, d = carry
        live = ~d.done
        prefix = SharedPrefix(store.keys, store.values, d.prefix_rows, d.prefix_mask)
        logits, cache = model(d.token[:, None], live[:, None], cache=d.cache, prefix=prefix)
        cache = dataclasses.replace(cache, end=first + (cache.end - first) % n)
        token, logp, raw = choose_local(logits[:, 0], d.rows, d.step)
        return i + 1, record(dataclasses.replace(d, cache=cache), token, logp, raw, stop_table, live)

    def cond(carry: tuple[jax.Array, Decoding]) -> jax.Array:
        i, d = carry
        done = d.done.sum()
        return (i < limit) & (done < d.done.shape[0]) & (done < refill_at)

    taken, d = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), d))
    return constrain(d), taken


def score_program(graphdef: Any, constrain: Callable[[Any], Any], local: Callable[[Callable], Callable],
                  state: Any, store: PrefixStore,
                  pack: dict, cont: jax.Array, alt: jax.Array, temperature: jax.Array, top_k: jax.Array, *,
                  policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Teacher-forced log-probs `[N]` of continuation tokens `cont` `[N]`. `pack` holds packed
    rows (ids, pos, seg, branch `[R, W]`, prefix `[R]`) where each prompt tail is a segment's
    trunk and each of its continuations a branch after it; token n is predicted by the hidden
    state at row `row[n]`, column `at[n]` (padding reads anything: the host drops it). Returns
    raw log-probs and those under softmax(logits / temperature) kept to the top-k (temperature
    0: 0 for the argmax, -inf elsewhere), and the latter for token `alt[n]` at the same place,
    where `alt[n] >= 0` (an other token that could come there: a sequence's EOS where its
    continuation goes on with a stop string; -inf where `alt[n] < 0`)."""
    model = model_for(graphdef, state, store.keys)
    h, _ = _against_prefixes(model, store, pack["prefix"], pack["ids"], pack["pos"], pack["seg"],
                             pack["branch"])
    # The read positions split over the replicas: each computes the logits (and their top-k)
    # of its share of the tokens only.
    return _scores_at(model, local, constrain(h[pack["row"], pack["at"]]), cont, alt, temperature, top_k, policy)


def _scores_at(model: Any, local: Callable[[Callable], Callable], hidden: jax.Array, cont: jax.Array,
               alt: jax.Array, temperature: jax.Array, top_k: jax.Array,
               policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_token_scores` of tokens `cont` `[N]` predicted by final-normed hidden states `hidden`
    `[N, D]` (split over the replicas: each computes the logits of its share, `local`)."""
    logits = model.hidden_to_logits(hidden[:, None])[:, 0]  # [N, V]
    full = lambda value, dt: jnp.full(cont.shape, value, dt)  # noqa: E731
    scores = functools.partial(_token_scores, policy=Policy(policy.k_cap, "off"))
    return local(scores)(logits, cont, alt, full(temperature, jnp.float32), full(top_k, jnp.int32))


def branch_program(graphdef: Any, constrain: Callable[[Any], Any], local: Callable[[Callable], Callable],
                   state: Any, mini: KVCache, last: jax.Array, pack: dict, branches: dict, cont: jax.Array,
                   alt: jax.Array, temperature: jax.Array, top_k: jax.Array, *,
                   policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`score_program`'s log-probs for continuations of the tails `first_program` has just
    prefilled, read against its tails' cache `mini` (`[R, P + W]`, for packing `pack`) instead
    of prefilling the tails again. `branches` feeds each continuation but its last token, end
    to end in one row: ids, pos (from its tail's end), tail (the tail index each token follows,
    -1: padding) and branch (each continuation's own id) `[Wb]`. A token attends to its tail's
    prefix and tail in `mini` and causally to its own continuation. Token n of `cont` `[N]` is
    predicted by row `read[n]` of the tails' last hidden states `last` `[T, D]` followed by the
    fed tokens' `[Wb, D]` (token 0 of a continuation by its tail's, token j by its fed token
    j - 1). Returns raw log-probs, sampled log-probs and the sampled log-probs of `alt`, as
    `score_program`."""
    model = model_for(graphdef, state, mini.keys)
    r, s = mini.mask.shape
    w = pack["ids"].shape[1]
    p = s - w
    wb = branches["ids"].shape[0]
    # every row of the tails' cache side by side: one cache row that all fed tokens read
    flat = lambda a: jnp.concatenate([a.reshape(1, r * s, *a.shape[2:]),  # noqa: E731
                                      jnp.zeros((1, wb, *a.shape[2:]), a.dtype)], axis=1)
    cache = KVCache(keys=map_layers(flat, mini.keys), values=map_layers(flat, mini.values),
                    mask=flat(mini.mask), end=jnp.asarray(r * s, jnp.int32))
    tail = jnp.maximum(branches["tail"], 0)
    row, col = pack["row"][tail], pack["col"][tail]  # [Wb]
    segment = pack["seg"][row, col]
    slot_row = jnp.repeat(jnp.arange(r), s)  # [R * S]
    slot_col = jnp.tile(jnp.arange(s), r)
    slot_seg = jnp.concatenate([jnp.zeros((r, p), jnp.int32), pack["seg"]], axis=1).reshape(r * s)
    visible = (slot_row[None, :] == row[:, None]) & ((slot_col[None, :] < p) | (slot_seg[None, :] == segment[:, None]))
    visible = jnp.concatenate([visible, jnp.zeros((wb, wb), jnp.bool_)], axis=1)[None]  # [1, Wb, R * S + Wb]
    live = branches["tail"] >= 0
    positions = mini.mask[:, :p].sum(-1).astype(jnp.int32)[row] + branches["pos"]
    h, _ = model(branches["ids"][None], live[None], segment_ids=jnp.where(live, branches["branch"], 0)[None],
                 positions=positions[None], cache=cache, cached_visible=visible, return_hidden=True)
    hidden = jnp.concatenate([last.astype(h.dtype), h[0]], axis=0)
    return _scores_at(model, local, constrain(hidden[branches["read"]]), cont, alt, temperature, top_k, policy)


def _token_scores(logits: jax.Array, cont: jax.Array, alt: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, *, policy: Policy) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of `logits` `[N, V]`: token `cont`'s raw log-prob and its log-prob under the
    row's sampling distribution (temperature 0: 0 for the argmax, -inf elsewhere), and the
    latter for token `alt` (-inf where `alt < 0`)."""
    pick = lambda a, t: jnp.take_along_axis(a, t[:, None], axis=-1)[:, 0]  # noqa: E731
    raw = pick(jax.nn.log_softmax(logits, axis=-1), cont)
    x = jax.nn.log_softmax(truncate(logits, temperature, top_k, jnp.ones(cont.shape, jnp.float32), policy), axis=-1)
    best = jnp.argmax(logits, axis=-1)
    greedy = lambda t: jnp.where(t == best, 0.0, -jnp.inf)  # noqa: E731
    sampled = jnp.where(temperature > 0, pick(x, cont), greedy(cont))
    other = jnp.where(temperature > 0, pick(x, jnp.maximum(alt, 0)), greedy(alt))
    return raw, sampled, jnp.where(alt >= 0, other, -jnp.inf)
