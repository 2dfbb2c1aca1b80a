"""Multi-host start-up: `jax.distributed.initialize` from the config or the cluster's environment."""

from __future__ import annotations

import logging
import os

import jax

from gradual_jax.config import DistributedConfig

log = logging.getLogger("gradual_jax")

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
