"""The programs `Sampler.generate_batch` compiles, lowered on abstract inputs: what the planner
(`gradual_jax.plan`) compiles to prove a configuration fits before running it.

`Lowering` is a mixin of `Sampler`; it builds the same arguments the sampler's own calls build
(`_prefix_args`, `_start_args`, `_decode_args`) and lowers them as `_compile` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import jax
from flax import nnx

from gradual_jax.models.transformer import Transformer
from gradual_jax.sampling.compile_cache import abstract
from gradual_jax.sampling.kernels import DECODE_DONATE
from gradual_jax.sampling.methods import Greedy, Method, fanout
from gradual_jax.sampling.packing import Batch


class Lowering:
    """`Sampler.abstract` and the `lower_*` methods."""

    @classmethod
    def abstract(cls, model: Transformer, tokenizer: Any = None, *, mesh: Any = None,
                 **kwargs: Any) -> Self:
        """A sampler of an abstract model (`nnx.eval_shape`: no weights) on `mesh`. Its state is
        ShapeDtypeStructs with the dtypes and shardings the sampler's placement gives real
        weights (by the inference rules, floating point in the compute dtype), so it lowers its
        programs (`lower_prefix`, `lower_prefill`, `lower_decode`) and cannot run them."""
        sampler = cls(model, tokenizer, **kwargs)  # no mesh yet: nothing to place
        sampler.mesh = mesh
        state = nnx.state(model)
        if mesh is not None:
            # `_place` itself cannot run on ShapeDtypeStructs: the same layout, as structs.
            dtypes, shardings = sampler._inference_layout(state)
            state = jax.tree.map(lambda x, d, sh: jax.ShapeDtypeStruct(x.shape, d, sharding=sh),
                                 state, dtypes, shardings)
        sampler.set_state(state)
        return sampler

    def lower_prefix(self, prefix_tokens: int) -> jax.stages.Lowered:
        """The program that prefills a shared prompt prefix of `prefix_tokens` tokens (one
        packed row, computed once for every batch of its group), as `generate_batch` compiles
        it. Its outputs are the prefix cache the sampler keeps while the group decodes."""
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {prefix_tokens}")
        _, args = self._prefix_args([0] * int(prefix_tokens))
        return self._lower(self._prefix_fn, (self.state, *abstract(args[1:])), {})

    def lower_prefill(self, batch_size: int, *, prompt_tokens: int, max_new_tokens: int,
                      methods: Method | Sequence[Method] = Greedy(), n: int = 1,
                      prefix: jax.stages.Compiled | None = None) -> jax.stages.Lowered:
        """The start program (prefill, per-row cache, first token) of a full batch of
        `generate_batch(prompts, batch_size=batch_size, methods=methods, n=n,
        max_new_tokens=max_new_tokens)` whose prompt tails have `prompt_tokens` tokens each, as
        `generate_batch` compiles it. `prefix`: the compiled `lower_prefix` program whose
        outputs are the batch's shared prefix cache (None: no shared prefix).

        Its outputs are the decode carry (`lower_decode`), whose `cache` is a `KVCache` of one
        row per slot (prompts x samples, the slot batch) by the cache length (prefix slots +
        the tails' bucket + `max_new_tokens`). Raises ValueError for non-positive sizes.
        """
        if min(batch_size, prompt_tokens, max_new_tokens) < 1:
            raise ValueError(f"batch_size, prompt_tokens and max_new_tokens must be >= 1, got "
                             f"{batch_size}, {prompt_tokens}, {max_new_tokens}")
        fan = fanout(methods, n)
        per_batch = max(1, batch_size // len(fan))
        batch = Batch(list(range(per_batch)), (), [[0] * int(prompt_tokens)] * per_batch)
        cache = None if prefix is None else abstract(prefix.out_info)
        table = self._put_replicated(self.stop_table(()))
        start = self._start_args(batch, None, batch.items, fan, int(max_new_tokens), table, 0, per_batch)
        args = (self.state, cache, *abstract(start.args[2:]))
        return self._lower(self._start_fn, args, start.static)

    def lower_decode(self, prefill: jax.stages.Compiled, *,
                     methods: Method | Sequence[Method] = Greedy(), n: int = 1) -> jax.stages.Lowered:
        """The decode program (a `lax.while_loop` of up to `chunk` steps) that continues the
        outputs of `prefill`, as `generate_batch` compiles it: the carry with `prefill`'s output
        shardings, donated. `prefill` is the compiled `lower_prefill` program (the first decode
        chunk) or a compiled `lower_decode` program (later chunks: when a decode's outputs are
        laid out unlike its inputs, the sampler compiles this second executable too), with the
        same `methods` and `n`."""
        fan = fanout(methods, n)
        carry = abstract(prefill.out_info)
        _, policy = self._rows(fan, max(1, carry.done.shape[0] // len(fan)))
        table = self._put_replicated(self.stop_table(()))
        args = self._decode_args(carry, table, self.chunk)
        return self._lower(self._decode_fn, (self.state, carry, *abstract(args[2:])), dict(policy=policy),
                           DECODE_DONATE)
