"""XLA settings the package's entry points apply before JAX creates its backend.

XLA:CPU's default instruction scheduler ("concurrency optimized") starts every independent
operation as early as it can, so that the CPU runtime may run them side by side. In the
sampler's decode step that starts every layer's gather of the slots' stored prefixes at once:
for SmolLM2 at 64 slots, 60 copies of 4.7 MB live together (283 MB of temporaries a step, the
very copies that reading prefixes from the shared store is meant to avoid). The memory-minimizing
scheduler keeps one layer's at a time. Scheduling orders operations; it does not change them, so
results are the same bits (checked on the SmolLM2 probe's records).

The memory-minimizing scheduler is only chosen for a host with one CPU device. With several
(`--xla_force_host_platform_device_count`, `JAX_NUM_CPU_DEVICES`) the devices' collectives meet
in one process, and under that scheduler a sharded train step deadlocked: 7 of 8 devices waited
at an all-gather for the eighth until XLA aborted the process (the llama3_8b_full rehearsal on 8
fake devices, BUILD_NOTES session 21). Several processes of one device each (gloo) keep it.

XLA reads `XLA_FLAGS` once, when the backend starts: a flag set later has no effect in that
process.
"""

from __future__ import annotations

import os
import re

CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
PACKAGE_FLAGS = (f"{CPU_SCHEDULER}=false",)
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def cpu_device_count(environ: dict[str, str]) -> int:
    """How many CPU devices a backend started with `environ` will have (1 unless forced)."""
    counts = [int(n) for n in _DEVICE_COUNT.findall(environ.get("XLA_FLAGS", ""))]
    counts.append(int(environ.get("JAX_NUM_CPU_DEVICES") or 1))
    return max(counts)


def apply_xla_flags(environ: dict[str, str] | None = None) -> str:
    """Add the package's flags to `XLA_FLAGS` (of `environ`, default this process's), leaving
    any flag the user set alone and adding none where the host has several CPU devices (see the
    module docstring); returns the new value."""
    env = os.environ if environ is None else environ
    if cpu_device_count(env) > 1:
        return env.get("XLA_FLAGS", "")
    current = env.get("XLA_FLAGS", "").split()
    named = {f.split("=", 1)[0] for f in current}
    added = [f for f in PACKAGE_FLAGS if f.split("=", 1)[0] not in named]
    env["XLA_FLAGS"] = " ".join(current + added)
    return env["XLA_FLAGS"]
