"""gradual_jax: SliCK knowledge probing and Gradual Learning fine-tuning in JAX/Flax NNX.

``run``, ``probe_model`` and ``load_model`` (see :mod:`gradual_jax.api`) are imported on first
use, so ``import gradual_jax`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "probe_model", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradual_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'gradual_jax' has no attribute {name!r}")
