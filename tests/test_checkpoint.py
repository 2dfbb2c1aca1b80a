"""Orbax checkpoint manager (keep-N, shardings, corrupt and half-written steps, foreign dirs) and model snapshots."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradual_jax.checkpoint import (
    CheckpointError, CheckpointManager, abstract_like, model_fingerprint, restore_model_params, save_model_params)
from gradual_jax.models.transformer import ModelConfig, Transformer, abstract_model
from gradual_jax.sharding import make_mesh

CONFIG = ModelConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@functools.cache
def _init(config):
    graphdef = nnx.split(abstract_model(config))[0]
    fn = jax.jit(lambda key: nnx.split(Transformer(config, rngs=nnx.Rngs(params=key)))[1],
                 compiler_options={"xla_backend_optimization_level": 0})
    return graphdef, fn


def _model(config=CONFIG, seed=0):
    graphdef, fn = _init(config)
    return nnx.merge(graphdef, fn(jax.random.key(seed)))


def _tree(mesh, value):
    sharding = NamedSharding(mesh, P("data", None))
    return {"w": jax.device_put(jnp.full((8, 4), value, jnp.float32), sharding),
            "n": {0: jnp.asarray(value, jnp.int32)}}


def test_save_restore_keep_n_and_shardings(tmp_path):
    mesh = make_mesh(4, 2, 1)
    with CheckpointManager(tmp_path, max_to_keep=2) as mngr:
        mngr.bind("abc", "test")
        for step in (1, 2, 3):
            mngr.save(step, _tree(mesh, step), {"epoch": step})
        mngr.wait()
        assert mngr.all_steps() == [2, 3]
        target = abstract_like(_tree(make_mesh(2, 4, 1), 0))  # restore into other shardings
        step, state, meta = mngr.restore_latest(target)
    assert step == 3 and meta == {"epoch": 3}
    assert state["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(state["w"], np.full((8, 4), 3.0))
    assert int(state["n"][0]) == 3


def test_should_save_by_epoch_by_steps_and_by_time(tmp_path, monkeypatch):
    """Epoch ends (interval 0), every k steps, or the first step end `save_interval_seconds`
    after the manager was made or last saved; a save restarts the clock."""
    from gradual_jax import checkpoint as ckpt

    now = [1000.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: now[0])
    with CheckpointManager(tmp_path / "a") as every_epoch:
        assert every_epoch.should_save(3, epoch_end=True) and not every_epoch.should_save(3)
    with CheckpointManager(tmp_path / "b", save_interval_steps=2) as by_steps:
        assert by_steps.should_save(4) and not by_steps.should_save(5)
        assert by_steps.should_save(5, epoch_end=True)
    with CheckpointManager(tmp_path / "c", save_interval_seconds=60, async_save=False) as by_time:
        by_time.bind("abc", "test")
        now[0] += 59
        assert not by_time.should_save(1) and not by_time.should_save(1, epoch_end=True)
        now[0] += 1
        assert by_time.should_save(2) and by_time.should_save(2, epoch_end=True)
        by_time.save(2, {"x": jnp.ones(3)}, {"epoch": 1})
        now[0] += 30
        assert not by_time.should_save(3, epoch_end=True)
        now[0] += 30
        assert by_time.should_save(4)


def test_step_starts_after_the_best_params_it_names_are_on_disk(tmp_path):
    """A run killed as soon as a step is complete must find the best-epoch params its meta names:
    when the step's directory appears, the (much larger) best save begun before it is final."""
    big = {"w": jnp.ones((16384, 2048), jnp.float32)}  # 128 MiB
    mngr = CheckpointManager(tmp_path)
    mngr.bind("abc", "test")
    mngr.save_best(1, big)
    mngr.save(1, {"x": jnp.ones(3)}, {"epoch": 1, "best_epoch": 1})
    while not (tmp_path / "steps" / "1").exists():
        time.sleep(0.001)
    best = sorted(p.name for p in (tmp_path / "best").iterdir())
    mngr.close()
    assert best == ["1"]


def test_a_best_epoch_replaced_since_is_missing_quietly(tmp_path):
    """Two bests are kept: the epoch an older step checkpoint names may be gone (its resumed run
    replays the better epochs); restoring it returns None without a warning."""
    import warnings

    mngr = CheckpointManager(tmp_path, async_save=False)
    mngr.bind("abc", "test")
    for epoch in (2, 5, 7):
        mngr.save_best(epoch, {"w": jnp.full(3, float(epoch))})
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mngr.restore_best(2, abstract) is None
        assert float(mngr.restore_best(7, abstract)["w"][0]) == 7.0
    mngr.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax, after the aborted read
def test_corrupt_latest_falls_back_and_is_kept(tmp_path):
    mesh = make_mesh(8, 1, 1)
    with CheckpointManager(tmp_path, max_to_keep=3, async_save=False) as mngr:
        mngr.bind("abc")
        for step in (1, 2):
            mngr.save(step, _tree(mesh, step), {"epoch": step})
    (tmp_path / "steps" / "3.orbax-checkpoint-tmp-99").mkdir()  # a save cut short by a kill
    for f in (tmp_path / "steps" / "2").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"not a checkpoint")
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [1, 2]
        with pytest.warns(UserWarning, match=r"step 2 is unreadable .*moved it to .*corrupt/2.*previous complete"):
            step, state, _ = mngr.restore_latest(abstract_like(_tree(mesh, 0)))
        assert step == 1 and float(state["w"][0, 0]) == 1.0
        assert mngr.all_steps() == [1]
    assert (tmp_path / "corrupt" / "2").is_dir()  # quarantined, not deleted
    # Nothing readable at all: None, never an exception.
    empty = tmp_path / "empty"
    with CheckpointManager(empty) as mngr:
        assert mngr.restore_latest(abstract_like(_tree(mesh, 0))) is None


def test_foreign_directory_is_refused(tmp_path):
    with CheckpointManager(tmp_path / "run") as mngr:
        mngr.bind(model_fingerprint(_model()), "model A")
        mngr.bind(model_fingerprint(_model(seed=5)), "same model, other weights")  # fine
        other = _model(CONFIG.replace(intermediate_size=64))
        with pytest.raises(CheckpointError, match=r"holds checkpoints of a different model \(model A"):
            mngr.bind(model_fingerprint(other), "model B")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a training checkpoint directory"):
        CheckpointManager(tmp_path / "stuff")


def test_fingerprint_ignores_runtime_switches_not_structure():
    base = model_fingerprint(abstract_model(CONFIG))
    assert model_fingerprint(abstract_model(CONFIG.replace(remat=True, dropout_rate=0.1, dtype="bfloat16"))) == base
    assert model_fingerprint(abstract_model(CONFIG.replace(num_layers=2))) != base
    assert model_fingerprint(abstract_model(CONFIG.replace(rope_theta=5e5))) != base


def test_model_snapshot_round_trip(tmp_path):
    model = _model(seed=3)
    save_model_params(tmp_path / "stage1", model)
    mesh = make_mesh(2, 2, 2)
    restored = restore_model_params(tmp_path / "stage1", abstract_model(CONFIG), mesh=mesh)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(a, b)
    assert restored.embed[...].sharding.spec == P("tensor", "fsdp")
    plain = restore_model_params(tmp_path / "stage1", abstract_model(CONFIG))
    assert len(plain.embed[...].sharding.device_set) == 1
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_model_params(tmp_path / "stage1", model)
    with pytest.raises(CheckpointError, match="different model"):
        restore_model_params(tmp_path / "stage1", abstract_model(CONFIG.replace(hidden_size=32)))
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete model snapshot"):
        restore_model_params(tmp_path / "half", abstract_model(CONFIG))
