"""Where the persistent compilation cache goes, for every entry point."""

from __future__ import annotations

from pathlib import Path

from gradual_jax.xla_cache import cache_location, local_cache


def test_cache_location_local_remote_and_off():
    assert cache_location({"GRADUAL_JAX_CACHE": "/tmp/gj"}) == str(Path("/tmp/gj") / "xla")
    assert cache_location({"XDG_CACHE_HOME": "/c"}) == str(Path("/c/gradual_jax/xla"))
    # a bucket is passed through as written, not mangled into a local path
    assert cache_location({"GRADUAL_JAX_CACHE": "gs://bucket/runs/"}) == "gs://bucket/runs/xla"
    assert cache_location({"GRADUAL_JAX_CACHE": "off"}) is None


def test_local_cache_is_none_when_off_or_remote():
    assert local_cache("tokenizers", {"GRADUAL_JAX_CACHE": "/tmp/gj"}) == Path("/tmp/gj/tokenizers")
    assert local_cache("tokenizers", {"XDG_CACHE_HOME": "/c"}) == Path("/c/gradual_jax/tokenizers")
    assert local_cache("tokenizers", {"GRADUAL_JAX_CACHE": "off"}) is None
    assert local_cache("tokenizers", {"GRADUAL_JAX_CACHE": "gs://bucket/runs"}) is None
