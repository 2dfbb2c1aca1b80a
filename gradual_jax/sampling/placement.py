"""Where the sampler's arrays live: weights by the inference rules, rows over the data axes.

`MeshPlacement` is a mixin of `Sampler`: it reads the sampler's `mesh` (None: one device, every
method a no-op or a plain `jax.device_put`) and `config`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradual_jax.models.transformer import as_dtype, layer_buffers
from gradual_jax.sampling import compile_cache
from gradual_jax.sharding import BATCH_AXES, INFERENCE_RULES, batch_sharding, data_parallel_size, place, state_shardings


# (source graph, mesh, source layout) -> the jitted fold, cast and reshard of a model's state,
# shared by the samplers of one architecture (a LoRA stage's dev evaluations make a new sampler
# a stage).
_LAYOUT_PROGRAMS: dict[Any, Callable[[Any], Any]] = {}


class MeshPlacement:
    """Placement of weights and host rows on the sampler's mesh."""

    mesh: Any
    config: Any
    _source_graph: int  # the interned graph of the model the sampler was built from
    _fold: Callable[[Any], Any] | None  # folds a state's LoRA adapters in (None: it has none)
    _folded: Callable[[Any], Any]  # `_fold` applied when there is one
    scan_layers: bool  # keys and values layer-stacked, the layers run as one scan

    def _inference_weights(self, state: Any) -> Any:
        """`state` (a model's `nnx.state`) as the sampler runs it: `_folded` (LoRA adapters folded
        into the kernels) and, on a mesh, cast and laid out as `_place` does. A state already on
        the mesh's devices takes one compiled program (cast before the move: no folded float32
        copy, half the bytes moved); one elsewhere (a process-local sampler of a model on the
        whole run's mesh) is folded where it lives, then placed."""
        if self.mesh is None:
            return self._folded(state)
        leaves = jax.tree.leaves(state)
        devices = set(self.mesh.devices.flat)
        if not all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in leaves):
            return self._place(self._folded(state))
        key = (self._source_graph, self.mesh, jax.tree.structure(state),
               tuple(compile_cache.spec(x) for x in leaves))
        program = _LAYOUT_PROGRAMS.get(key)
        if program is None:
            dtypes, shardings = self._inference_layout(self._folded(compile_cache.abstract(state)))
            fold = self._fold  # not the bound `_folded`: the shared cache must not keep this sampler

            def run(st: Any) -> Any:
                return jax.tree.map(lambda x, d: x.astype(d), st if fold is None else fold(st), dtypes)

            program = _LAYOUT_PROGRAMS.setdefault(key, jax.jit(run, out_shardings=shardings))
        return program(state)

    def _place(self, state: Any) -> Any:
        """With a mesh, the weights as inference holds them (see `_inference_layout`)."""
        if self.mesh is None:
            return state
        dtypes, shardings = self._inference_layout(state)
        cast = jax.tree.map(lambda x, d: x if x.dtype == d else x.astype(d), state, dtypes)
        return place(cast, shardings)

    def _inference_layout(self, state: Any) -> tuple[Any, Any]:
        """The dtype and sharding of every leaf of `state` as inference holds it on the mesh:
        sharded by the inference rules (tensor parallel inside a replica, replicated over the
        data axes, nothing along embed, so a decode step moves activations, never weights),
        floating point in the compute dtype."""
        compute = as_dtype(self.config.dtype)
        dtypes = jax.tree.map(
            lambda x: compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, state)
        return dtypes, state_shardings(state, self.mesh, INFERENCE_RULES)

    def _replicated(self) -> Any:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _rows_sharding(self, ndim: int) -> Any:
        """Rows (dim 0) over the mesh's data axes, other dims replicated."""
        return batch_sharding(self.mesh, ndim) if ndim else self._replicated()

    def _dp(self) -> int:
        if self.mesh is None:
            return 1
        return data_parallel_size(self.mesh)

    def _put(self, x: Any) -> jax.Array:
        """Host rows to the device, split over the mesh's data axes when there is one."""
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, self._rows_sharding(np.ndim(x)))

    def _put_replicated(self, x: Any) -> jax.Array:
        return jax.device_put(x) if self.mesh is None else jax.device_put(x, self._replicated())

    def _kv_sharding(self, rows: bool, stacked: bool = False) -> Any:
        """Keys or values `[rows, slots, kv_heads, head_dim]` (`stacked`: with a leading layer
        axis, kept whole): heads over the tensor axis (as the projections that make them), rows
        over the data axes (`rows`) or replicated."""
        spec = (BATCH_AXES if rows else None, None, "tensor", None)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*((None,) * stacked + spec)))

    def _constrain(self, tree: Any) -> Any:
        """Rows of every array split over the mesh's data axes, keys and values (4-d, 5-d when
        layer-stacked) also over heads (no-op without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, self._kv_sharding(True, x.ndim == 5) if x.ndim >= 4 else self._rows_sharding(x.ndim)), tree)

    def _rows_local(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, a function of arrays whose leading axis is rows (and of nothing else), run by
        each device on its own rows, every other axis whole (the identity without a mesh): a
        `jax.shard_map` splits the rows over the replicas (the data axes), and inside one the
        tensor-parallel devices split their replica's rows again where they divide, gathering
        the results. For top-k and the draws around it, which XLA's SPMD partitioner otherwise
        runs on every row on every device (its operand gathered).

        The rows are split over the tensor axis inside the map, not by its specs: specs that
        split rows over the tensor axis propagate back into the forward pass, which then
        gathers the weights. Logits (`[rows, vocab]` arguments) are pinned where the LM head
        computes them, the vocabulary over the tensor axis, for the same reason."""
        if self.mesh is None:
            return fn
        mesh, vocab = self.mesh, self.config.vocab_size
        tensor = mesh.shape["tensor"]
        spec = jax.sharding.PartitionSpec(BATCH_AXES)
        as_computed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES, "tensor"))

        def pin(x: Any) -> Any:
            if x.ndim == 2 and x.shape[1] == vocab and vocab % tensor == 0:
                return jax.lax.with_sharding_constraint(x, as_computed)
            return x

        def replica(*args: Any) -> Any:
            rows = jax.tree.leaves(args)[0].shape[0]
            if tensor == 1 or rows % tensor:
                return fn(*args)
            share = rows // tensor
            start = jax.lax.axis_index("tensor") * share
            mine = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, share), args)
            return jax.tree.map(lambda y: jax.lax.all_gather(y, "tensor", tiled=True), fn(*mine))

        mapped = jax.shard_map(replica, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        return lambda *args: mapped(*jax.tree.map(pin, args))

    def _constrain_replicated(self, tree: Any) -> Any:
        """Every array replicated over the data axes, keys and values (4-d) split over heads
        (no-op without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, self._kv_sharding(False, x.ndim == 5) if x.ndim >= 4 else self._replicated()), tree)

    def _zeros(self, shape: tuple[int, ...], dtype: Any, *, rows: bool = True) -> Any:
        """A zero array laid out as `_put` (`rows`) or `_put_replicated` would lay it out (keys
        and values, 4-d or layer-stacked 5-d, also split over heads); for an abstract sampler (`Sampler.abstract`)
        the ShapeDtypeStruct of one."""
        sharding = None
        if self.mesh is not None:
            if len(shape) >= 4:
                sharding = self._kv_sharding(rows, len(shape) == 5)
            else:
                sharding = self._rows_sharding(len(shape)) if rows else self._replicated()
        if getattr(self, "_abstract", False):
            return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
        value = np.zeros(shape, dtype)
        return jax.device_put(value, sharding)

    def _kv_buffers(self, shape: tuple[int, ...], zeros: Callable[[tuple[int, ...], Any], Any]) -> Any:
        """Zero keys or values `shape` for every layer, each made by `zeros(shape, dtype)`: a
        list, or one layer-stacked array when the sampler scans its layers."""
        dtype = np.dtype(as_dtype(self.config.dtype))
        return layer_buffers(self.config.num_layers, shape, lambda sh: zeros(sh, dtype),
                             stacked=self.scan_layers)

    def _argument(self, value: int) -> Any:
        """An int32 scalar argument of a program call, replicated; kept per value, so repeated
        calls (decode limits, refill points) transfer nothing. Never part of a donated carry."""
        cache = self.__dict__.setdefault("_arguments", {})
        if value not in cache:
            cache[value] = self._put_replicated(np.int32(value))
        return cache[value]

    def _scalar(self, value: int) -> Any:
        """An int32 scalar, replicated (its ShapeDtypeStruct for an abstract sampler)."""
        if getattr(self, "_abstract", False):
            return self._zeros((), np.int32, rows=False)
        return self._put_replicated(np.int32(value))
