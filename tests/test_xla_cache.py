"""Where the persistent compilation cache goes, for every entry point."""

from __future__ import annotations

from pathlib import Path

from gradual_jax.xla_cache import cache_location


def test_cache_location_local_remote_and_off():
    assert cache_location({"GRADUAL_JAX_CACHE": "/tmp/gj"}) == str(Path("/tmp/gj") / "xla")
    assert cache_location({"XDG_CACHE_HOME": "/c"}) == str(Path("/c/gradual_jax/xla"))
    # a bucket is passed through as written, not mangled into a local path
    assert cache_location({"GRADUAL_JAX_CACHE": "gs://bucket/runs/"}) == "gs://bucket/runs/xla"
    assert cache_location({"GRADUAL_JAX_CACHE": "off"}) is None
