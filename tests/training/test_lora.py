"""LoRA adapters: placement, a fresh adapter is a no-op, merging keeps the function, bad targets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train_helpers import FAST_COMPILE, tiny_model

from gradual_jax.models.transformer import projections
from gradual_jax.training.lora import apply_lora, has_lora, merge_lora, trainable_filter


def _ids():
    return jax.random.randint(jax.random.key(1), (2, 12), 4, 60)


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def test_apply_lora_adds_adapters_to_targets_only(tiny_config):
    model = tiny_model(tiny_config)
    before = _logits(model, _ids())
    n = apply_lora(model, 4, 8.0, ["q", "v", "down"], seed=3)
    assert n == 3 * tiny_config.num_layers
    for kind, ps in projections(model).items():
        assert all((p.lora is not None) == (kind in ("q", "v", "down")) for p in ps)
    assert has_lora(model) and trainable_filter(model) is nnx.LoRAParam
    q = model.layers[0].attn.q.lora
    assert q.a[...].shape == (32, 4) and q.b[...].shape == (4, 4, 8)
    assert q.a.get_metadata()["logical_axes"] == ("embed", None)
    assert q.b.get_metadata()["logical_axes"] == (None, "heads", "head_dim")
    np.testing.assert_array_equal(_logits(model, _ids()), before)  # b = 0: unchanged function
    # Init depends on (seed, kind, layer) only, not on which other targets are asked for.
    other = tiny_model(tiny_config)
    apply_lora(other, 4, 8.0, ["q"], seed=3)
    np.testing.assert_array_equal(other.layers[1].attn.q.lora.a[...], model.layers[1].attn.q.lora.a[...])


def test_bad_targets_list_valid_names(tiny_config):
    model = tiny_model(tiny_config)
    with pytest.raises(ValueError, match=r"match no projection \('query' unknown\); valid names: q, k, v, o, gate, up, down"):
        apply_lora(model, 4, 8.0, ["query"])
    with pytest.raises(ValueError, match="valid names"):
        apply_lora(model, 4, 8.0, [])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(model, 0, 8.0, ["q"])
    apply_lora(model, 2, 4.0, ["q"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, 2, 4.0, ["q"])


def test_merged_lora_gives_adapter_logits(tiny_config):
    model = tiny_model(tiny_config)
    apply_lora(model, 4, 16.0, ["q", "k", "v", "o", "gate", "up", "down"], seed=0)
    rng = np.random.default_rng(5)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and np.all(np.asarray(var[...]) == 0):
            var[...] = jnp.asarray(0.1 * rng.standard_normal(var[...].shape), jnp.float32)
    with_adapters = _logits(model, _ids())
    base = _logits(tiny_model(tiny_config), _ids())
    assert float(jnp.max(jnp.abs(with_adapters - base))) > 1e-2  # the adapters matter
    assert merge_lora(model) == 7 * tiny_config.num_layers
    assert not has_lora(model) and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(_logits(model, _ids()), with_adapters, atol=2e-5, rtol=1e-5)
