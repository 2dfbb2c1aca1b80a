"""LoRA adapters folded into their kernels: in place (a stage's final model, before it is
probed or saved) or as a compiled view of the weights (the sampler's copy of a model still
training, so dev evaluation runs the base model's programs without the adapters' matmuls)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gradual_jax.models.transformer import Transformer, projections


def has_adapters(model: Transformer) -> bool:
    """Whether any projection of ``model`` carries a LoRA adapter."""
    return any(p.lora is not None for ps in projections(model).values() for p in ps)


def fold_adapters(model: Transformer) -> int:
    """Fold every adapter's ``delta()`` into its kernel (summed in float32, stored in the
    kernel's dtype) and remove the adapter, in place. The model computes the same function (up
    to rounding). Returns the number of adapters folded."""
    folded = 0
    for ps in projections(model).values():
        for proj in ps:
            if proj.lora is None:
                continue
            kernel = proj.kernel[...]
            proj.kernel[...] = (kernel.astype(jnp.float32) + proj.lora.delta().astype(jnp.float32)).astype(kernel.dtype)
            # removed, then None as a plain attribute: the graph is the base model's again
            del proj.lora
            proj.lora = None
            folded += 1
    return folded


class FoldedWeights:
    """The weights of a model with adapters as the same model without them holds them.

    ``graphdef``: the model's graph without adapters (equal to the base model's graph, so
    programs compiled for the base model serve it). Calling it on an ``nnx.state`` of the
    adapted model (the ``graphdef``/``state`` it was built from, or later weights of the same
    structure) returns the folded state, computed in one compiled program; on a state of
    ShapeDtypeStructs, the abstract folded state."""

    def __init__(self, graphdef: Any, state: Any):
        def folded(st: Any) -> Transformer:
            model = nnx.merge(graphdef, st)
            fold_adapters(model)
            return model

        self.graphdef = nnx.split(nnx.eval_shape(folded, state))[0]
        self._fold = jax.jit(lambda st: nnx.split(folded(st))[1])

    def __call__(self, state: Any) -> Any:
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
            return jax.eval_shape(self._fold, state)
        return self._fold(state)
