"""Device mesh, the one logical-axis rules table, and placement of params, optimizer state and batches.

Physical mesh axes are ``data``, ``fsdp`` and ``tensor``. Every parameter carries
``logical_axes`` metadata (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``);
``LOGICAL_AXIS_RULES`` maps each name to mesh axes. Batches are split over ``data`` and ``fsdp``
together (FSDP is data parallelism whose params are also sharded), params over ``fsdp`` along
``embed`` and over ``tensor`` along heads, MLP and vocab dims.

Meshes use ``AxisType.Auto`` on every axis: the model's einsums carry no output-sharding
annotations, so with ``Explicit`` axes (jax >= 0.10's default) contractions over a sharded dim
would need per-op sharding rules. With ``Auto``, jit's input/output shardings pin params,
optimizer state and batches and XLA's propagation lays out everything in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gradual_jax.configlib import require

# ---------------------------------------------------------------------------------------------
# Threads sharing devices

_PROGRAMS_LOCK = threading.RLock()
_one_at_a_time = 0


@contextlib.contextmanager
def one_program_at_a_time() -> Iterator[None]:
    """While active (in any thread), `run_program` runs programs one at a time in this
    process, each to completion. Threads that share devices need it (parallel seeds): two
    multi-device programs with collectives, started from two threads, can be queued in
    different orders on different devices and then wait on each other forever (XLA:CPU
    aborts after 40 s; a GPU hangs). Host work between programs still overlaps."""
    global _one_at_a_time
    with _PROGRAMS_LOCK:
        _one_at_a_time += 1
    try:
        yield
    finally:
        with _PROGRAMS_LOCK:
            _one_at_a_time -= 1


def run_program(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`: a compiled program's call, exclusive and waited for while
    `one_program_at_a_time` is active, plain (asynchronous) otherwise."""
    if not _one_at_a_time:
        return fn(*args)
    with _PROGRAMS_LOCK:
        return jax.block_until_ready(fn(*args))


MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
# Mesh axes that split the batch (FSDP is data parallelism whose weights are also sharded); the
# model pins its activations to them (`models.transformer`).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Physical mesh axis sizes; -1 fills the remaining devices (at most one axis)."""

    data: int = -1
    """Data-parallel axis: replicas, each with its own rows of the batch."""
    fsdp: int = 1
    """Fully sharded data-parallel axis: rows of the batch, and weights sharded along embed."""
    tensor: int = 1
    """Tensor-parallel axis: heads, MLP and vocab dims split."""

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, v in sizes.items():
            require(v == -1 or v >= 1, key, f"must be -1 (fill) or >= 1, got {v}")
        fills = [k for k, v in sizes.items() if v == -1]
        require(len(fills) <= 1, fills[-1] if fills else "data", "only one mesh axis may be -1")


Rules = Mapping[str, "tuple[str, ...] | None"]

# logical axis name -> mesh axes (None = replicated), one table per use.
# Training: FSDP shards weights along embed (gathered per layer), tensor parallel splits heads,
# MLP and vocab.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "length": None,
}
TRAINING_RULES = LOGICAL_AXIS_RULES
# Inference (the probe): tensor parallel inside a replica, replicas over the data axes, nothing
# along embed, so a decode step moves activations (all-reduces over tensor), never weights.
INFERENCE_RULES: dict[str, tuple[str, ...] | None] = {**LOGICAL_AXIS_RULES, "embed": None}


def default_probe_mesh(n_devices: int, num_heads: int, num_kv_heads: int) -> "MeshConfig":
    """The probe's default mesh: the largest tensor-parallel degree that divides the device
    count and both the query and the KV head counts, replicas (``data``) over the rest."""
    tensor = max(t for t in range(1, n_devices + 1)
                 if n_devices % t == 0 and num_heads % t == 0 and num_kv_heads % t == 0)
    return MeshConfig(data=n_devices // tensor, fsdp=1, tensor=tensor)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all), every axis ``Auto``.

    One size may be -1: it takes the devices the others leave. Raises ValueError when the sizes
    do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fills = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v != -1 and v < 1]
    if bad or len(fills) > 1:
        raise ValueError(f"mesh sizes must be >= 1 with at most one -1 (fill), got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fills:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices do not divide by the fixed axes' product {fixed}")
        sizes[fills[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """``make_mesh`` from any object with ``data``, ``fsdp`` and ``tensor`` attributes."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices=devices)


def _resolved_sizes(mesh_config: MeshConfig, n_devices: int, key: str) -> dict[str, int]:
    sizes = {"data": mesh_config.data, "fsdp": mesh_config.fsdp, "tensor": mesh_config.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    shown = " x ".join(f"{k}={'-1' if v == -1 else v}" for k, v in sizes.items())
    fills = [k for k, v in sizes.items() if v == -1]
    if fills:
        require(n_devices % fixed == 0, key,
                f"{shown}: the fixed axes' product {fixed} does not divide the {n_devices} devices")
        sizes[fills[0]] = n_devices // fixed
    require(math.prod(sizes.values()) == n_devices, key,
            f"{shown} = {math.prod(sizes.values())} devices, but {n_devices} are present")
    return sizes


def run_meshes(train: MeshConfig, probe: MeshConfig | None, *, num_heads: int, num_kv_heads: int,
               train_batch_sizes: Mapping[str, int], probe_batch_size: int,
               devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """The training mesh and the probe's inference mesh of a run, over ``devices`` (default:
    all), checked before any weights are read: axes whose product is not the device count, a
    tensor axis that does not divide the query or KV heads, a batch size (per config key in
    ``train_batch_sizes``) or the probe's slot batch that does not divide the data axes raise
    ConfigError naming the key. ``probe`` None is :func:`default_probe_mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if probe is None:
        probe = default_probe_mesh(n, num_heads, num_kv_heads)
    meshes = []
    for key, mc in (("mesh", train), ("probe.mesh", probe)):
        sizes = _resolved_sizes(mc, n, key)
        t = sizes["tensor"]
        require(num_heads % t == 0 and num_kv_heads % t == 0, f"{key}.tensor",
                f"{t} does not divide the model's {num_heads} query heads and {num_kv_heads} KV heads")
        meshes.append(make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices))
    train_mesh, probe_mesh = meshes
    ways = data_parallel_size(train_mesh)
    for key, rows in train_batch_sizes.items():
        require(rows % ways == 0, key, f"{rows} does not divide over the training mesh's data axes "
                f"(data x fsdp = {ways}): use a multiple of {ways}")
    ways = data_parallel_size(probe_mesh)
    require(probe_batch_size % ways == 0, "probe.batch_size",
            f"{probe_batch_size} does not divide over the probe mesh's {ways} replicas: "
            f"use a multiple of {ways}")
    return train_mesh, probe_mesh


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    """``{"data": .., "fsdp": .., "tensor": ..}`` of a mesh."""
    return {a: int(mesh.shape[a]) for a in MESH_AXES}


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree``'s arrays on its fullest device, counted from their addressable shards
    (what a device holds, not the global size)."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


@dataclasses.dataclass(frozen=True)
class ReplicatedAxis:
    """A mesh axis that a dim's rule names but that does not divide the dim (together with the
    axes already chosen for it): ``param_partition_spec`` drops it, so the tensor is replicated
    over ``mesh_axis`` instead of split."""

    dim: int
    size: int
    logical: str
    mesh_axis: str
    ways: int
    """How many pieces the dim would have been split into with ``mesh_axis``."""

    def __str__(self) -> str:
        return f"{self.logical}={self.size} over {self.mesh_axis} ({self.ways} ways)"


def _assign_mesh_axes(logical_axes: Sequence[str | None], mesh: Mesh,
                      rules: Mapping[str, tuple[str, ...] | None] | None,
                      shape: Sequence[int] | None) -> tuple[list[Any], list[ReplicatedAxis]]:
    """(PartitionSpec entries, axes dropped because they do not divide) of ``param_partition_spec``."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    dropped: list[ReplicatedAxis] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {', '.join(sorted(rules))}")
        chosen: list[str] = []
        size = 1
        for axis in rules[name] or ():
            n = mesh.shape[axis]
            if n == 1 or axis in used:
                continue
            if shape is not None and shape[dim] % (size * n):
                dropped.append(ReplicatedAxis(dim, int(shape[dim]), name, axis, size * n))
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return spec, dropped


def param_partition_spec(logical_axes: Sequence[str | None], mesh: Mesh,
                         rules: Mapping[str, tuple[str, ...] | None] | None = None,
                         *, shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec for a tensor whose dims are named ``logical_axes``.

    Mesh axes of size 1, axes already used by an earlier dim and (when ``shape`` is given) axes
    that would not divide the dim evenly are dropped, so the spec is always valid for the tensor;
    ``replicated_axes`` names the ones dropped for not dividing.
    Raises KeyError for a logical name the rules do not know.
    """
    return PartitionSpec(*_assign_mesh_axes(logical_axes, mesh, rules, shape)[0])


def replicated_axes(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] | None = None) -> list[ReplicatedAxis]:
    """The mesh axes ``param_partition_spec(logical_axes, mesh, rules, shape=shape)`` drops
    because they do not divide a dim, in dim order; empty when the rules apply in full."""
    return _assign_mesh_axes(logical_axes, mesh, rules, shape)[1]


Replicated = Mapping[str, "tuple[tuple[int, ...], Sequence[ReplicatedAxis]]"]


def replicated_params(state: Any, mesh: Mesh,
                      rules: Mapping[str, tuple[str, ...] | None] | None = None
                      ) -> dict[str, tuple[tuple[int, ...], list[ReplicatedAxis]]]:
    """``{"a/b/c": (shape, dropped axes)}`` for each variable of ``state`` (an ``nnx.State``)
    that ``state_shardings`` replicates over some axis its rules name, because the axis does not
    divide the dim; what :func:`replication_warning` reports."""
    found = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes") if _is_variable(var) else None
        shape = tuple(getattr(var.get_value() if _is_variable(var) else var, "shape", ()))
        if axes is None or len(axes) != len(shape):
            continue
        dropped = replicated_axes(axes, shape, mesh, rules)
        if dropped:
            found["/".join(map(str, path))] = (shape, dropped)
    return found


def replication_warning(found: Replicated) -> str | None:
    """One line naming every tensor of ``found`` (name -> (shape, dropped axes)), its shape and
    each logical axis and mesh axis that did not divide; None when ``found`` is empty."""
    if not found:
        return None
    items = "; ".join(f"{name} {tuple(shape)}: {', '.join(map(str, axes))}"
                      for name, (shape, axes) in found.items())
    return (f"{len(found)} tensor(s) replicated where a mesh axis does not divide their dim "
            f"(uses more memory per device): {items}")


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh,
                      rules: Mapping[str, tuple[str, ...] | None] | None = None) -> NamedSharding:
    """Sharding for one variable: from its ``logical_axes`` metadata, else replicated."""
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes")
    shape = getattr(value, "shape", ())
    if axes is None or len(axes) != len(shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, param_partition_spec(axes, mesh, rules, shape=shape))


def state_shardings(state: Any, mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] | None = None) -> Any:
    """A tree shaped like ``state`` (an ``nnx.State`` of a model or optimizer) holding NamedShardings.

    Works for optimizer state too: ``nnx.Optimizer`` copies each param's metadata, including
    ``logical_axes``, onto its moment variables, so Adam moments shard like their params.
    """
    def one(x: Any) -> Any:
        if _is_variable(x):
            return x.replace(variable_sharding(x, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, state, is_leaf=_is_variable)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``, one leaf at a time across processes.

    With several processes a reshard is a cross-process program; XLA:CPU runs programs
    dispatched back to back on threads of their own, so two processes can enter the gloo
    collectives of different leaves in different orders and wait on each other for ever (seen:
    both processes idle inside ``device_put`` of a model's state). Finishing each leaf before
    the next keeps one such program in flight. One process: a plain batched ``device_put``."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.block_until_ready(jax.device_put(x, s)), tree, shardings)


def shard_state(state: Any, mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None] | None = None) -> Any:
    """``state`` with every array placed on ``mesh`` by its logical axes."""
    return place(state, state_shardings(state, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh,
                rules: Mapping[str, tuple[str, ...] | None] | None = None) -> nnx.Module:
    """Place every variable of ``model`` on ``mesh`` in place; returns the model."""
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


# --------------------------------------------------------------------------------------------
# Batches


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the ``data`` and ``fsdp`` axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divisible(rows: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raise ValueError unless ``rows`` splits evenly over the mesh's data axes."""
    n = data_parallel_size(mesh)
    if rows % n:
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise ValueError(
            f"{what} {rows} does not divide over the data axes ({sizes}; {n} ways): "
            f"use a multiple of {n} or change the mesh"
        )


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) dim pinned to the mesh's batch axes.

    Only under a mesh context (`jax.set_mesh`, as the trainer traces its step) and when the
    batch divides over those axes; otherwise `x` unchanged. Without the pin, XLA's propagation
    may all-gather the batch and build full-batch activations and logits on every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Sharding for a batch array: ``batch_dim`` over ``(data, fsdp)``, other dims replicated."""
    spec: list[Any] = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def process_rows(global_rows: int) -> slice:
    """The rows of a ``global_rows`` batch dim this process feeds (by ``jax.process_index()``)."""
    count, index = jax.process_count(), jax.process_index()
    if global_rows % count:
        raise ValueError(f"batch dim {global_rows} does not divide over {count} processes")
    per = global_rows // count
    return slice(index * per, (index + 1) * per)


def global_batch(local_arrays: Mapping[str, np.ndarray], mesh: Mesh, *, batch_dim: int = 0) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows (``process_rows``) of each array.

    Each local array holds ``1 / process_count`` of the global batch dim; the global arrays are
    sharded over ``(data, fsdp)`` along ``batch_dim``. Raises ValueError when the global batch
    dim does not divide over the data axes.
    """
    out = {}
    for name, local in local_arrays.items():
        local = np.asarray(local)
        global_shape = list(local.shape)
        global_shape[batch_dim] *= jax.process_count()
        check_batch_divisible(global_shape[batch_dim], mesh, f"batch dim of {name!r}")
        sharding = batch_sharding(mesh, local.ndim, batch_dim)
        out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
    return out
