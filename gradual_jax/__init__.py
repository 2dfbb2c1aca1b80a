"""gradual_jax: SliCK knowledge probing and Gradual Learning fine-tuning in JAX/Flax NNX."""

__version__ = "0.1.0"
