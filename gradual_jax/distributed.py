"""Multi-host runs: `jax.distributed.initialize` from the config or the cluster's environment,
and splitting host-side work (the probe's examples) over processes and gathering its records.

Training needs nothing more: every process builds the same model (same checkpoint, same seed),
feeds its own rows of each global batch (`sharding.process_rows` / `global_batch`) and
writes its own shards of each Orbax checkpoint (`tests/test_multihost.py` checks all three).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from gradual_jax.configlib import require

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

    def __post_init__(self) -> None:
        n, p = self.num_processes, self.process_id
        require(n is None or n >= 1, "num_processes", f"must be >= 1, got {n}")
        require(p is None or p >= 0, "process_id", f"must be >= 0, got {p}")
        ok = n is None or p is None or p < n
        require(ok, "process_id", f"must be < num_processes ({n}), got {p}")


# Variables that mean "this process is one of several" on the clusters we launch on.
_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def cluster_detected() -> bool:
    """True when the environment names a multi-process job (SLURM with >1 task, a TPU pod)."""
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def maybe_initialize(cfg: DistributedConfig) -> bool:
    """Call `jax.distributed.initialize` when configured or on a detected cluster.

    Explicit config fields win; unset ones are left for JAX's cluster auto-detection (SLURM,
    TPU VM metadata). Returns True when this is a multi-process run. Must run before any other
    JAX call touches the devices.
    """
    if not (cfg.enabled or cluster_detected()):
        return False
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    if cfg.num_processes is not None:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id is not None:
        kwargs["process_id"] = cfg.process_id
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 writes logs, reports and JSON records; every process writes checkpoints."""
    return jax.process_index() == 0


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
