"""Test session setup: 8 fake CPU devices so sharding tests see a real mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "entityquestions"


@pytest.fixture(scope="session")
def eq_dir() -> Path:
    """The shared EntityQuestions copy (gzipped JSONL per relation and split)."""
    path = Path(os.environ.get("GRADUAL_JAX_EQ_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"EntityQuestions copy not found at {path}")
    return path
