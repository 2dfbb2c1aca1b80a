"""The forward pass with a cache whose rows hold several sequences side by side: new tokens that
may read only one of them (`cached_visible`) get the logits of that sequence continued alone,
computed without a cache (the causal path)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gradual_jax.models.transformer import KVCache, ModelConfig, init_model

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)


def test_new_tokens_read_only_the_cached_slots_they_may_see():
    model = init_model(CONFIG, seed=3)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 64, 7), rng.integers(0, 64, 5)  # two prompts, cached side by side
    new_a, new_b = rng.integers(0, 64, 3), rng.integers(0, 64, 2)  # a continuation of each
    # each prompt's keys and values, computed alone, written into one cache row: a, then b
    size = len(a) + len(b) + len(new_a) + len(new_b)
    cache = KVCache.init(CONFIG, 1, size)
    _, cache = model(jnp.asarray(a)[None], cache=cache)
    alone_b = KVCache.init(CONFIG, 1, len(b))
    _, alone_b = model(jnp.asarray(b)[None], cache=alone_b)
    put = lambda buf, part: buf.at[:, len(a):len(a) + len(b)].set(part)  # noqa: E731
    cache = KVCache(keys=[put(k, kb) for k, kb in zip(cache.keys, alone_b.keys)],
                    values=[put(v, vb) for v, vb in zip(cache.values, alone_b.values)],
                    mask=cache.mask.at[:, len(a):len(a) + len(b)].set(True),
                    end=jnp.asarray(len(a) + len(b), jnp.int32))
    # both continuations in one block, each its own segment, each reading its own prompt only
    ids = np.concatenate([new_a, new_b])[None]
    seg = np.array([1] * len(new_a) + [2] * len(new_b))[None]
    pos = np.concatenate([len(a) + np.arange(len(new_a)), len(b) + np.arange(len(new_b))])[None]
    col = np.arange(size)
    visible = np.stack([(col < len(a))] * len(new_a) + [(col >= len(a)) & (col < len(a) + len(b))] * len(new_b))
    logits, _ = model(jnp.asarray(ids), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), cache=cache,
                      cached_visible=jnp.asarray(visible)[None])
    want_a = model(jnp.asarray(np.concatenate([a, new_a]))[None])[0, len(a):]
    want_b = model(jnp.asarray(np.concatenate([b, new_b]))[None])[0, len(b):]
    np.testing.assert_allclose(logits[0, :len(new_a)], want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, len(new_a):], want_b, rtol=1e-5, atol=1e-5)
    # without the restriction the continuations read the other prompt too: other logits
    mixed, _ = model(jnp.asarray(ids), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), cache=cache)
    assert not np.allclose(mixed[0, :len(new_a)], want_a, atol=1e-3)
