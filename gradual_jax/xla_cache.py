"""Where the package keeps its caches (`$GRADUAL_JAX_CACHE`, default `~/.cache/gradual_jax`:
built worlds, tokenizers converted from GGUF files, XLA executables), and JAX's persistent
compilation cache, turned on the same way by every entry point (the launcher, the probe CLI,
the benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_base(environ: dict[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/gradual_jax`, else `~/.cache/gradual_jax`."""
    env = os.environ if environ is None else environ
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gradual_jax"


def local_cache(kind: str, environ: dict[str, str] | None = None) -> Path | None:
    """The local directory of cache `kind`: `$GRADUAL_JAX_CACHE/<kind>` (default
    `default_cache_base()/<kind>`); None when `GRADUAL_JAX_CACHE=off` or names a remote location."""
    env = os.environ if environ is None else environ
    root = env.get("GRADUAL_JAX_CACHE")
    if root == "off" or (root and "://" in root):
        return None
    return (Path(root).expanduser() if root else default_cache_base(env)) / kind


def cache_location(environ: dict[str, str] | None = None) -> str | None:
    """Where XLA executables are kept: `$GRADUAL_JAX_CACHE/xla` (default
    `~/.cache/gradual_jax/xla`); None when `GRADUAL_JAX_CACHE=off`. A location that is not a
    local path (`gs://bucket/dir`, any `scheme://`) is passed through as written."""
    env = os.environ if environ is None else environ
    root = env.get("GRADUAL_JAX_CACHE")
    if root and root != "off" and "://" in root:
        return root.rstrip("/") + "/xla"
    local = local_cache("xla", env)
    return None if local is None else str(local)


def enable_compilation_cache() -> str | None:
    """Keep XLA executables across runs (resumes and repeated runs compile nothing); returns
    the location (see `cache_location`), created when it is a local path."""
    import jax

    where = cache_location()
    if where is None:
        return None
    if "://" not in where:
        Path(where).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return where
