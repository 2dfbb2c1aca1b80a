"""The programs the sampler compiles, lowered on abstract inputs: what the planner
(`gradual_jax.plan`) compiles to prove a configuration fits before running it.

`Lowering` is a mixin of `Sampler`; it builds the same arguments the sampler's own calls build
(`_program_args`, of the shapes set by `prepare`) and lowers them as `_compile` would.
"""

from __future__ import annotations

from typing import Any, Self

import jax
from flax import nnx

from gradual_jax.models.transformer import Transformer


class Lowering:
    """`Sampler.abstract` and `lower_programs`."""

    @classmethod
    def abstract(cls, model: Transformer, tokenizer: Any = None, *, mesh: Any = None,
                 **kwargs: Any) -> Self:
        """A sampler of an abstract model (`nnx.eval_shape`: no weights) on `mesh`. Its state is
        ShapeDtypeStructs with the dtypes and shardings the sampler's placement gives real
        weights (by the inference rules, floating point in the compute dtype), so it lowers its
        programs (`prepare`, then `lower_programs`) and cannot run them."""
        sampler = cls(model, tokenizer, **kwargs)  # no mesh yet: nothing to place
        sampler.mesh = mesh
        sampler._abstract = True
        state = sampler._folded(nnx.state(model))
        if mesh is not None:
            # `_place` itself cannot run on ShapeDtypeStructs: the same layout, as structs.
            dtypes, shardings = sampler._inference_layout(state)
            state = jax.tree.map(lambda x, d, sh: jax.ShapeDtypeStruct(x.shape, d, sharding=sh),
                                 state, dtypes, shardings)
        sampler.set_state(state)
        return sampler

    def lower_programs(self) -> dict[str, jax.stages.Lowered]:
        """The six programs of the current shapes (`prepare`) lowered as the sampler compiles
        them: 'prefill' (prefixes into the store), 'first' (tails prefilled, first tokens drawn),
        'admit' (rows into decode slots, the slots donated), 'decode' (the decode loop, its
        carry donated), 'score' and 'branch' (scoring against an insert's tails). Their compiled outputs describe the
        prefix store ('prefill') and the decode slots ('decode')."""
        if self.shapes is None:
            raise ValueError("lower_programs needs shapes: call prepare first")
        table = self._zeros((self.config.vocab_size,), bool, rows=False) if self._abstract else \
            self._put_replicated(self.stop_table(()))
        return {name: self._lower(fn, args, static, donate)
                for name, (fn, args, static, donate) in self._program_args(table).items()}
