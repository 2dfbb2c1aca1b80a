"""The layers as one scan (`Transformer.stacked`, `Sampler(scan_layers=True)`): the same numbers
as the unrolled layers in every forward pass the sampler runs, on one device and on a mesh, and
one layer's body in the compiled program whatever the depth."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gradual_jax.models.transformer import KVCache, LayerStack, SharedPrefix
from gradual_jax.sampling import Greedy, Sample, Sampler
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sampling import PREFIX, QUESTIONS, tiny_hf, to_ours, tok  # noqa: E402,F401  (tok: a fixture)

MIXED = [Greedy(), Sample(2.0, 20), Sample(2.0, 20)]


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return to_ours(tiny_hf("qwen2", len(tok), seed=3, embed_std=0.3))  # biases, untied head


def test_stacked_layers_compute_what_the_layers_compute(model):
    """Plain forward, prefill into a cache at per-row ends, a decode step reading a shared
    prefix and a two-token block: the stacked model (one scanned layer, layer-stacked cache and
    prefix) gives the unrolled model's logits and cache."""
    stacked = model.stacked()
    assert isinstance(stacked.layers, LayerStack) and len(stacked.layers) == model.config.num_layers
    assert isinstance(model.layers, nnx.List)  # stacking makes a copy, the model is unchanged
    ids = jnp.asarray([[5, 9, 7, 4], [3, 4, 0, 0]])
    mask = jnp.asarray([[True] * 4, [True, True, False, False]])

    @functools.partial(nnx.jit, static_argnums=1)
    def run(m, stack: bool):
        plain = m(ids, mask)
        cache = KVCache.init(m.config, 2, 16, stacked=stack)
        cache = KVCache(cache.keys, cache.values, cache.mask, jnp.asarray([0, 0]))
        _, cache = m(ids, mask, cache=cache)
        store = KVCache.init(m.config, 1, 8, stacked=stack)
        _, store = m(jnp.asarray([[21, 22, 23]]), jnp.ones((1, 3), bool), cache=store)
        prefix = SharedPrefix(store.keys, store.values, jnp.asarray([0, 0]),
                              jnp.broadcast_to(store.mask, (2, 8)))
        cache = KVCache(cache.keys, cache.values, cache.mask, jnp.asarray([4, 2]))
        one, cache = m(jnp.asarray([[11], [14]]), jnp.ones((2, 1), bool), cache=cache, prefix=prefix)
        two, cache = m(jnp.asarray([[12, 13], [15, 16]]), jnp.ones((2, 2), bool), cache=cache)
        return plain, one, two, cache

    want = run(model, False)
    got = run(stacked, True)
    for w, g in zip(want[:3], got[:3]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)
    for i in range(model.config.num_layers):
        np.testing.assert_allclose(np.asarray(got[3].keys[i]), np.asarray(want[3].keys[i]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(got[3].values[i]), np.asarray(want[3].values[i]), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got[3].mask), np.asarray(want[3].mask))


def test_a_cache_must_match_the_layers(model):
    with pytest.raises(ValueError, match="layer-stacked"):
        nnx.jit(lambda m: m(jnp.ones((1, 2), jnp.int32), cache=KVCache.init(m.config, 1, 4, stacked=True)))(model)
    with pytest.raises(ValueError, match="layer-stacked"):
        nnx.jit(lambda m: m(jnp.ones((1, 2), jnp.int32), cache=KVCache.init(m.config, 1, 4)))(model.stacked())


def _everything(sampler: Sampler) -> tuple:
    """Generations (greedy and sampled, shared prefix), scores and chances of one sampler."""
    gens = sampler.generate_batch(QUESTIONS, max_new_tokens=8, methods=MIXED, seed=1, prefix=PREFIX)
    conts = [" France", " London"] * 2
    scores = sampler.score(QUESTIONS, conts, prefix=[PREFIX] * 4, temperature=2.0, top_k=20)
    chances = sampler.sample_probability(QUESTIONS, conts, prefix=[PREFIX] * 4, temperature=2.0,
                                         top_k=20, stop=("\n",))
    return ([[g.token_ids for g in row] for row in gens],
            [[float(x) for x in g.logprobs] for row in gens for g in row],
            [np.asarray(s.logprobs) for s in scores], np.asarray(chances))


def _same(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in got[1]]),
                               np.concatenate([np.ravel(x) for x in want[1]]), atol=1e-4)
    for g, w in zip(got[2], want[2]):
        np.testing.assert_allclose(g, w, atol=1e-4)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-4, atol=1e-7)


def test_a_scanning_sampler_generates_and_scores_as_the_unrolled_one(model, tok):  # noqa: F811
    want = _everything(Sampler(model, tok, scan_layers=False))
    scanned = Sampler(model, tok, scan_layers=True)
    got = _everything(scanned)
    _same(got, want)
    assert scanned.stats.compiles == 5  # the same five programs, layer-stacked


def test_a_scanning_sampler_on_a_mesh_equals_one_device(model, tok):  # noqa: F811
    from gradual_jax.sharding import make_mesh

    assert jax.device_count() == 8
    mesh = make_mesh(data=4, tensor=2)
    want = _everything(Sampler(model, tok, scan_layers=False))
    _same(_everything(Sampler(model, tok, mesh=mesh, scan_layers=True)), want)


def test_the_scanned_program_holds_one_layer_whatever_the_depth(tok):  # noqa: F811
    """The decode program of a 2-layer and of a 6-layer model hold the same number of
    matmuls when scanned; unrolled, the deeper one holds more."""
    from gradual_jax.models.transformer import ModelConfig, abstract_model

    def dots(layers: int, scan: bool) -> int:
        config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=layers,
                             num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
        s = Sampler.abstract(abstract_model(config), scan_layers=scan)
        s.prepare(longest_prefix=24, longest_tail=12, new_tokens=8, longest_scored=16,
                  longest_continuation=4)
        return s.lower_programs()["decode"].as_text().count("dot_general")

    assert dots(2, True) == dots(6, True)
    assert dots(6, False) > dots(2, False) > 0
