"""The package's XLA flags: added once, the user's own setting kept, and in effect in this
process (conftest applies them as every entry point does) where they matter: a decode loop
reading a shared prefix holds one layer's gathered prefix rows at a time."""

import jax
import jax.numpy as jnp
from flax import nnx

from gradual_jax.models.transformer import KVCache, ModelConfig, SharedPrefix, Transformer
from gradual_jax.xla_flags import CPU_SCHEDULER, PACKAGE_FLAGS, apply_xla_flags


def test_flags_are_added_once_and_the_users_setting_wins():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    once = apply_xla_flags(env)
    assert once == "--xla_force_host_platform_device_count=8 " + " ".join(PACKAGE_FLAGS)
    assert apply_xla_flags(env) == once
    mine = {"XLA_FLAGS": f"{CPU_SCHEDULER}=true"}
    assert apply_xla_flags(mine) == f"{CPU_SCHEDULER}=true"
    assert apply_xla_flags({}) == " ".join(PACKAGE_FLAGS)


def test_a_decode_loop_holds_one_layers_gathered_prefix_at_a_time():
    """16 decode rows over 8 layers, each reading a 64-token stored prefix: every layer's
    gathered keys and values together are 8 x 2 x 16 x 64 x 2 x 32 x 4 bytes = 4.2 MB. The
    compiled loop's temporaries stay under a third of that (the default XLA:CPU scheduler
    holds them all: 5.3 MB of temporaries)."""
    layers, rows, width, slots, own = 8, 4, 64, 16, 8
    config = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=layers,
                         num_heads=4, num_kv_heads=2, head_dim=32)
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    kv = (rows, width, config.num_kv_heads, config.head_dim)
    store = ([jnp.ones(kv)] * layers, [jnp.ones(kv)] * layers)
    cache = KVCache.init(config, slots, own)

    def loop(state, store, cache, token):
        model = nnx.merge(graphdef, state)
        prefix = SharedPrefix(store[0], store[1], jnp.arange(slots) % rows, jnp.ones((slots, width), bool))

        def body(carry):
            i, token, cache = carry
            logits, cache = model(token[:, None], cache=cache, prefix=prefix)
            cache = KVCache(cache.keys, cache.values, cache.mask, jnp.zeros((), jnp.int32))
            return i + 1, jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

        return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, token, cache))[1]

    compiled = jax.jit(loop).lower(state, store, cache, jnp.zeros(slots, jnp.int32)).compile()
    gathered = layers * 2 * slots * width * config.num_kv_heads * config.head_dim * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < gathered / 3, temp
