"""Test session setup: 8 fake CPU devices so sharding tests see a real mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# No package XLA flags here: with 8 devices `apply_xla_flags` adds none (gradual_jax.xla_flags).

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_EQ = Path("shared") / "data" / "entityquestions"
# The shared copy sits beside the checkout (../shared); a clone elsewhere finds the workplace's.
_CANDIDATES = [Path(__file__).resolve().parents[2] / _EQ, Path("/work") / _EQ]
SHARED_DATA = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


@pytest.fixture(scope="session")
def eq_dir() -> Path:
    """The shared EntityQuestions copy (gzipped JSONL per relation and split)."""
    path = Path(os.environ.get("GRADUAL_JAX_EQ_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"EntityQuestions copy not found at {path}")
    return path


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_world():
    """The smoke config's synthetic world (built once per machine, then read from the cache)."""
    from gradual_jax.config import load_config
    from gradual_jax.world import build_or_load_world, world_config_from_dict

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    return build_or_load_world(world_config_from_dict(cfg.world), progress=False)


@pytest.fixture(scope="session")
def smoke_model(smoke_world):
    """(model, tokenizer) of the smoke world, loaded once per session."""
    from gradual_jax.models import load_hf, load_tokenizer

    return load_hf(smoke_world.model_dir), load_tokenizer(smoke_world.model_dir)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, smoke_world):
    """The smoke config run once through `python -m gradual_jax.launch`: (its run directory,
    its wall seconds). Tests read it; those that change a run copy it first."""
    import time

    from gradual_jax.launch import main

    run_dir = tmp_path_factory.mktemp("runs")
    t0 = time.time()
    assert main([str(REPO / "configs" / "smoke.yaml"), f"run_dir={run_dir}"]) == 0
    return run_dir / "smoke", time.time() - t0

