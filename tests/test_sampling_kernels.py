"""`kernels.choose` against numpy: greedy rows take the argmax with sampling log-prob 0 whether
or not other rows sample (the all-greedy call skips the sampling path at run time), sampled
rows draw `categorical(fold_in(key, step), top-k-truncated logits / T)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradual_jax.sampling.kernels import Policy, Rows, choose, row_keys

V = 50
POLICY = Policy(k_cap=8, top_p="off")  # the largest top-k a row uses, at most V


def _rows(temperature, top_k):
    n = len(temperature)
    keys = row_keys(jnp.full(n, 7, jnp.uint32), jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.uint32))
    return Rows(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.ones(n, jnp.float32), keys)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_choose_greedy_and_sampled_rows_against_numpy():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (6, V)), np.float32) * 3
    step = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)
    fn = jax.jit(lambda lg, r, s: choose(lg, r, s, POLICY))

    all_greedy = fn(jnp.asarray(logits), _rows([0.0] * 6, [1] * 6), step)
    token, logp, raw = map(np.asarray, all_greedy)
    np.testing.assert_array_equal(token, logits.argmax(-1))
    np.testing.assert_array_equal(logp, 0.0)
    np.testing.assert_allclose(raw, _log_softmax(logits)[np.arange(6), token], atol=1e-5)

    temperature, top_k = [0.0, 0.5, 0.0, 1.0, 0.7, 0.0], [1, 5, 1, 0, 3, 1]
    rows = _rows(temperature, top_k)
    token_m, logp_m, raw_m = map(np.asarray, fn(jnp.asarray(logits), rows, step))
    greedy = np.array(temperature) == 0
    # greedy rows: the same as in the all-greedy call
    np.testing.assert_array_equal(token_m[greedy], token[greedy])
    np.testing.assert_array_equal(logp_m[greedy], 0.0)
    np.testing.assert_allclose(raw_m, _log_softmax(logits)[np.arange(6), token_m], atol=1e-5)
    # sampled rows: the categorical draw of each row's truncated distribution, built here
    for i in np.flatnonzero(~greedy):
        x = logits[i] / temperature[i]
        if top_k[i] > 0:
            x = np.where(x < np.sort(x)[::-1][top_k[i] - 1], -np.inf, x)
        key = jax.random.fold_in(jax.random.wrap_key_data(rows.key[i]), int(step[i]))
        expected = int(jax.random.categorical(key, jnp.asarray(x, jnp.float32)))
        assert token_m[i] == expected, i
        assert np.isfinite(x[token_m[i]])  # inside the row's top-k
        np.testing.assert_allclose(logp_m[i], _log_softmax(x[None])[0, token_m[i]], atol=1e-5)


def test_top_k_rows_draw_among_their_candidates_exactly_as_the_full_draw():
    """When every sampled row keeps at most k_cap tokens, `choose` draws among them with the
    noise `jax.random.categorical` gives them over the whole vocabulary: the same token, ties
    included. Greedy rows with no top-k (empty decode slots) do not force the full draw."""
    from gradual_jax.sampling.kernels import categorical_among_top, gumbel_at, same_noise_at_any_index

    assert same_noise_at_any_index(jnp.float32)  # the fast path is the one under test
    assert not same_noise_at_any_index(jnp.bfloat16)

    vocab = 5000
    logits = np.asarray(jax.random.normal(jax.random.key(1), (8, vocab)), np.float32) * 4
    step = jnp.arange(8, dtype=jnp.int32) * 3
    temperature = [0.5, 1.0, 0.0, 0.7, 0.3, 0.0, 1.5, 0.9]
    top_k = [8, 1, 0, 8, 3, 0, 5, 8]  # rows 2 and 5: greedy, all tokens (as an empty slot)
    rows = _rows(temperature, top_k)
    token, _, _ = map(np.asarray, jax.jit(lambda lg, r, s: choose(lg, r, s, POLICY))(jnp.asarray(logits), rows, step))
    for i in range(8):
        if temperature[i] == 0:
            assert token[i] == logits[i].argmax()
            continue
        x = logits[i] / temperature[i]
        x = np.where(x < np.sort(x)[::-1][top_k[i] - 1], -np.inf, x)
        key = jax.random.fold_in(jax.random.wrap_key_data(rows.key[i]), int(step[i]))
        assert token[i] == int(jax.random.categorical(key, jnp.asarray(x, jnp.float32))), i

    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(11), j))(jnp.arange(64))
    x = jnp.where(jax.random.uniform(jax.random.key(2), (64, vocab)) < 0.002,
                  jax.random.normal(jax.random.key(3), (64, vocab)), -jnp.inf)
    x = x.at[:, 0].set(0.0).at[:8, 1].set(0.0)  # every row has a finite entry; some tie
    x = jnp.where(jnp.sum(jnp.isfinite(x), -1, keepdims=True) <= 32, x, x.at[:, 33:].set(-jnp.inf))
    np.testing.assert_array_equal(categorical_among_top(keys, x, 32),
                                  jax.vmap(jax.random.categorical)(keys, x))
    noise = jax.random.gumbel(jax.random.key(5), (vocab,))
    np.testing.assert_array_equal(gumbel_at(jax.random.key(5), jnp.arange(vocab)), noise)


def test_each_replica_runs_the_top_k_of_its_own_rows():
    """On a mesh of 4 replicas x 2 tensor-parallel devices, the top-k of every program (first
    tokens, decode steps, scoring) sees an eighth of the rows: left to itself, XLA's SPMD
    partitioner gathered every row onto every device for it (8 devices each sorting all 4096
    scored tokens of a world model's probe)."""
    import re

    from flax import nnx

    from gradual_jax.models.transformer import ModelConfig, Transformer
    from gradual_jax.sampling import Sampler
    from gradual_jax.sharding import make_mesh

    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, eos_token_id=2, dtype="bfloat16")
    sampler = Sampler(Transformer(config, rngs=nnx.Rngs(0)), None, mesh=make_mesh(4, 1, 2))
    sh = sampler.prepare(batch_size=16, longest_prefix=40, longest_tail=10, new_tokens=4,
                         longest_scored=14, longest_continuation=4, k_cap=5)
    lowered = sampler.lower_programs()
    # first: its rows' draws and its tails' best logits (kept for scoring)
    rows = {"first": {sh.insert_dests, sh.insert_tails}, "decode": {sh.slots}, "score": {sh.score_tokens}}
    for name, totals in rows.items():
        text = lowered[name].compile().as_text()
        top_k = re.findall(r"= \((?:f32|bf16)\[(\d+),\d+\][^)]*\) custom-call\([^)]*\), custom_call_target=\"TopK\"", text)
        assert top_k and {int(r) for r in top_k} == {t // 8 for t in totals}, (name, top_k)
