"""Multi-host runs: `jax.distributed.initialize` from the config or the cluster's environment,
splitting host-side work (the probe's examples) over processes and gathering its records, and
the few host-side agreements a run needs: barriers, and decisions made on process 0 and handed
to every process (`on_main`), both through the coordination service's key-value store.

Training needs nothing more: every process builds the same model (same checkpoint, same seed),
feeds its own rows of each global batch (`sharding.process_rows` / `global_batch`) and
writes its own shards of each Orbax checkpoint (`tests/test_multihost.py` checks all three).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from gradual_jax.configlib import require
from gradual_jax.errors import UserError
from gradual_jax.rundir import cluster_detected

log = logging.getLogger("gradual_jax")
T = TypeVar("T")



@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup for ``jax.distributed.initialize``; unset fields are auto-detected."""

    enabled: bool = False
    """Join a multi-process job (also on when a cluster environment is detected)."""
    coordinator_address: str | None = None
    """host:port of process 0 (default: from the cluster's environment)."""
    num_processes: int | None = None
    """Processes in the job (default: from the cluster's environment)."""
    process_id: int | None = None
    """This process's index (default: from the cluster's environment)."""
    heartbeat_timeout_s: int = 20
    """A process silent this long is declared dead and every other process of the job ends
    (instead of waiting forever at a collective)."""
    shutdown_timeout_s: int = 60
    """How long a finished process waits at exit for the others to finish too."""

    def __post_init__(self) -> None:
        n, p = self.num_processes, self.process_id
        require(n is None or n >= 1, "num_processes", f"must be >= 1, got {n}")
        require(p is None or p >= 0, "process_id", f"must be >= 0, got {p}")
        ok = n is None or p is None or p < n
        require(ok, "process_id", f"must be < num_processes ({n}), got {p}")
        for key in ("heartbeat_timeout_s", "shutdown_timeout_s"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 s, got {getattr(self, key)}")


def maybe_initialize(cfg: DistributedConfig) -> bool:
    """Call `jax.distributed.initialize` when configured or on a detected cluster.

    Explicit config fields win; unset ones are left for JAX's cluster auto-detection (SLURM,
    TPU VM metadata). Returns True when this is a multi-process run. Must run before any other
    JAX call touches the devices.
    """
    if not (cfg.enabled or cluster_detected()):
        return False
    kwargs = {}
    if coordinator_address(cfg):
        kwargs["coordinator_address"] = coordinator_address(cfg)
    if cfg.num_processes is not None:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id is not None:
        kwargs["process_id"] = cfg.process_id
    # A dead peer is noticed by the coordination service after the heartbeat timeout, which
    # then ends every other process: no process waits forever at a collective.
    jax.distributed.initialize(heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                               shutdown_timeout_seconds=cfg.shutdown_timeout_s, **kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 writes logs, reports and JSON records; every process writes checkpoints."""
    return jax.process_index() == 0


def coordinator_address(cfg: DistributedConfig) -> str | None:
    """The coordinator address this process will connect to, as far as known before joining
    (the config's, else ``JAX_COORDINATOR_ADDRESS``; None when the cluster will tell)."""
    return cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None


def pre_init_process_id(cfg: DistributedConfig) -> int | None:
    """This process's index as known before `jax.distributed.initialize` (see
    `rundir.pre_init_process_id`)."""
    from gradual_jax.rundir import pre_init_process_id as known

    return known(cfg.enabled, cfg.process_id)


# --------------------------------------------------------------------------------------------
# Agreements between processes (no-ops with one process). Keys are numbered in call order, so
# every process must make the same calls in the same order, as with any collective.

_SERIAL = itertools.count()
_WAIT_MS = 6 * 3600 * 1000  # a peer that died ends the job through the heartbeat, not this


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def barrier(name: str) -> None:
    """Return once every process has reached the barrier ``name`` (a host-side barrier of the
    coordination service: no device work, so it may wait as long as a peer's world build)."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"gradual_jax/{next(_SERIAL)}/{name}", _WAIT_MS)


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable ``value`` on every process (others pass anything).
    Comes back as JSON decodes it (tuples become lists, dict keys strings)."""
    if jax.process_count() == 1:
        return value
    key = f"gradual_jax/bcast/{next(_SERIAL)}"
    client = _client()
    if is_main_process():
        client.key_value_set(key, json.dumps(value, separators=(",", ":")))
        return json.loads(json.dumps(value))
    return json.loads(client.blocking_key_value_get(key, _WAIT_MS))


class PeerError(RuntimeError):
    """Process 0 failed in a step it runs for every process (the message names the failure)."""


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on process 0 only, its JSON-serialisable result handed to every process:
    for decisions (resume or not, what is done) that every process must make alike.

    An exception on process 0 is raised there and on every other process: a UserError as a
    UserError with its message (so every process exits 2), anything else as PeerError.
    """
    if jax.process_count() == 1:
        return fn()
    failure: BaseException | None = None
    message: dict[str, Any] = {}
    if is_main_process():
        try:
            message = {"ok": fn()}
        except UserError as err:
            failure, message = err, {"user_error": str(err)}
        except Exception as err:  # noqa: BLE001 - handed on, then raised here too
            failure, message = err, {"error": f"{type(err).__name__}: {err}"}
    got = broadcast_json(message)
    if failure is not None:
        raise failure
    if "user_error" in got:
        raise UserError(got["user_error"])
    if "error" in got:
        raise PeerError(f"process 0 failed: {got['error']}")
    return got["ok"]


def all_ok(ok: bool, detail: str = "") -> list[dict[str, Any]]:
    """Every process's ``(ok, detail)`` as ``[{"process", "ok", "detail"}]`` in process order,
    on every process (a collective)."""
    return gather_records([{"process": jax.process_index(), "ok": bool(ok), "detail": detail}])


# --------------------------------------------------------------------------------------------
# Splitting host-side work (the probe) over processes


def shard_for_process(items: Sequence[T], process_index: int | None = None,
                      process_count: int | None = None) -> list[T]:
    """This process's contiguous block of `items` (default: `jax.process_index()` of
    `jax.process_count()`).

    Blocks differ in size by at most one, earlier processes taking the extra items, and cover
    `items` exactly once in order, so concatenating every process's block in process order (what
    `gather_records` returns) restores `items`. Raises ValueError for an index outside
    `[0, process_count)`.
    """
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, {count}), got {index}")
    per, extra = divmod(len(items), count)
    start = index * per + min(index, extra)
    return list(items[start:start + per + (1 if index < extra else 0)])


def gather_records(records: Sequence[Any]) -> list[Any]:
    """Every process's JSON-serialisable `records`, concatenated in process order, on every
    process (a collective: all processes must call it, in the same order).

    Uses `jax.experimental.multihost_utils.process_allgather` on the records encoded as UTF-8
    JSON bytes: first each process's byte count, then the bytes padded to the longest. It needs
    no shared filesystem (TPU VM workers have none by default) and runs over JAX's own
    transport (on CPU, the gloo collectives). One process: returns `list(records)` without
    encoding. Records come back as JSON decodes them (tuples become lists).
    """
    if jax.process_count() == 1:
        return list(records)
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(list(records), separators=(",", ":")).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()) or 1, np.uint8)
    padded[:blob.size] = blob
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    out: list[Any] = []
    for row, size in zip(gathered, sizes):
        out.extend(json.loads(bytes(row[:int(size)]).decode()))
    return out


# --------------------------------------------------------------------------------------------
# Host copies of arrays that span processes


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """This process's shards of an array that spans processes, copied to the host (no
    process can hold such an array whole)."""

    shape: tuple[int, ...]
    sharding: Any
    shards: tuple[tuple[Any, np.ndarray], ...]  # (device, data), one per local device

    def to_device(self) -> jax.Array:
        arrays = [jax.device_put(data, device) for device, data in self.shards]
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def host_copy(tree: Any) -> Any:
    """``jax.device_get(tree)`` that also works in a multi-process run: a leaf spanning
    processes becomes the `LocalShards` this process holds (restore with `device_copy`)."""
    def copy(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return LocalShards(tuple(leaf.shape), leaf.sharding,
                               tuple((s.device, np.asarray(s.data)) for s in leaf.addressable_shards))
        return jax.device_get(leaf)

    return jax.tree.map(copy, tree)


def device_copy(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` for a `host_copy`: `LocalShards` leaves are put
    back as they were laid out (their sharding must be the one asked for)."""
    def put(leaf: Any, sharding: Any) -> Any:
        if isinstance(leaf, LocalShards):
            if leaf.sharding != sharding:
                raise ValueError(f"host copy laid out as {leaf.sharding}, asked for {sharding}")
            return leaf.to_device()
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, tree, shardings, is_leaf=lambda x: isinstance(x, LocalShards))

