"""Spawning the workers of a test's multi-process JAX job on 127.0.0.1 (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for the job's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(local_devices: int) -> dict[str, str]:
    """This environment for a worker with `local_devices` CPU devices and gloo collectives,
    without the test session's fake-device flag or any cluster variables JAX would detect."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
               JAX_NUM_CPU_DEVICES=str(local_devices), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        env.pop(var, None)
    return env


def wait_all(procs: Sequence[subprocess.Popen], logs: Sequence[IO], timeout: float) -> list[int | str]:
    """Each worker's exit code ("timeout" where the shared deadline passed: then every worker is
    killed), its log file closed."""
    deadline = time.monotonic() + timeout
    codes: list[int | str] = []
    for p, log in zip(procs, logs):
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append("timeout")
        log.close()
    return codes
