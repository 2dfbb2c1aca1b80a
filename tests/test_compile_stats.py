"""CompileCounter: one count per XLA backend compilation, none for an executable JAX reuses."""

import jax
import jax.numpy as jnp
import numpy as np

from gradual_jax.compile_stats import CompileCounter


def test_counts_one_compile_per_new_shape_and_none_for_a_reused_executable():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    seven, nine, eleven = np.ones(7, np.float32), np.ones(9, np.float32), np.ones(11, np.float32)
    with CompileCounter() as compiles:
        f(seven).block_until_ready()
        f(nine).block_until_ready()
        f(seven).block_until_ready()  # the first executable again
    assert compiles.count == 2 and compiles.seconds > 0
    f(eleven).block_until_ready()  # after exit: not counted
    assert compiles.count == 2
