"""Add LoRA adapters to a model's projections, fold them back into the kernels (`merge_lora`,
which is `models.adapters.fold_adapters`), pick trainables.

Adapters are the model's own ``LoRA`` modules (``nnx.LoRAParam`` params, ``b`` zero so a fresh
adapter leaves logits unchanged). They get ``logical_axes`` metadata derived from their base
kernel (``a``: input axes + rank, ``b``: rank + output axes) so they shard like the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from gradual_jax.models.adapters import fold_adapters as merge_lora
from gradual_jax.models.adapters import has_adapters as has_lora
from gradual_jax.models.transformer import PROJECTIONS, LoRA, Transformer, projections

__all__ = ["apply_lora", "has_lora", "merge_lora", "trainable_filter"]


def apply_lora(model: Transformer, rank: int, alpha: float, targets: Sequence[str], *,
               seed: int = 0) -> int:
    """Add a rank-``rank`` adapter to every projection of each kind in ``targets``, in place.

    Each adapter's init depends only on ``(seed, kind, layer)``. Returns the number of adapters
    added. Raises ValueError for rank < 1, a target name that matches no projection (listing the
    valid names) or a projection that already has an adapter.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(targets)
    by_kind = projections(model)
    unknown = [t for t in targets if t not in by_kind]
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets {targets} match no projection"
            + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
            + f"; valid names: {', '.join(PROJECTIONS)}"
        )
    base = jax.random.key(seed)
    added = 0
    for kind in targets:
        for layer, proj in enumerate(by_kind[kind]):
            if proj.lora is not None:
                raise ValueError(f"projection {kind!r} of layer {layer} already has a LoRA adapter")
            key = jax.random.fold_in(jax.random.fold_in(base, PROJECTIONS.index(kind)), layer)
            lora = LoRA(proj.in_shape, proj.out_shape, rank, alpha, rngs=nnx.Rngs(params=key),
                        dtype=proj.kernel.get_value().dtype)
            axes = proj.kernel.get_metadata().get("logical_axes")
            if axes is not None:
                n_in = len(proj.in_shape)
                lora.a.set_metadata(logical_axes=(*axes[:n_in], None))
                lora.b.set_metadata(logical_axes=(None, *axes[n_in:]))
            proj.lora = nnx.data(lora)
            added += 1
    return added


def trainable_filter(model: Transformer) -> Any:
    """The nnx filter of the variables to optimize: LoRA params if the model has adapters, else all params."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param
