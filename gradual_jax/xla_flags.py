"""XLA settings the package's entry points apply before JAX creates its backend.

XLA:CPU's default instruction scheduler ("concurrency optimized") starts every independent
operation as early as it can, so that the CPU runtime may run them side by side. In the
sampler's decode step that starts every layer's gather of the slots' stored prefixes at once:
for SmolLM2 at 64 slots, 60 copies of 4.7 MB live together (283 MB of temporaries a step, the
very copies that reading prefixes from the shared store is meant to avoid). The memory-minimizing
scheduler keeps one layer's at a time. Scheduling orders operations; it does not change them, so
results are the same bits (checked on the SmolLM2 probe's records). XLA reads `XLA_FLAGS` once,
when the backend starts: a flag set later has no effect in that process.
"""

from __future__ import annotations

import os

CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
PACKAGE_FLAGS = (f"{CPU_SCHEDULER}=false",)


def apply_xla_flags(environ: dict[str, str] | None = None) -> str:
    """Add the package's flags to `XLA_FLAGS` (of `environ`, default this process's), leaving
    any flag the user set alone; returns the new value."""
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "").split()
    named = {f.split("=", 1)[0] for f in current}
    added = [f for f in PACKAGE_FLAGS if f.split("=", 1)[0] not in named]
    env["XLA_FLAGS"] = " ".join(current + added)
    return env["XLA_FLAGS"]
