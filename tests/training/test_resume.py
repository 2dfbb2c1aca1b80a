"""Kill a run mid-epoch, resume it from its checkpoint directory, end with the uninterrupted run's params."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import FAST_COMPILE, capital_examples, tiny_model, train_config

from gradual_jax.checkpoint import CheckpointManager
from gradual_jax.sharding import make_mesh
from gradual_jax.training.trainer import Trainer

# Same step config and mesh as test_trainer's sharded-step test: one shared compile.
CFG = dict(batch_size=4, weight_decay=0.1, clip_norm=0.5, epochs=2)
EXAMPLES = capital_examples(12)  # 3 steps per epoch


class Killed(Exception):
    pass


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _fit(tokenizer, config, *, ckpt_dir=None, kill_at=None, scores=None, selection="convergence"):
    model = tiny_model(config, seed=7)
    trainer = Trainer(model, tokenizer, mesh=make_mesh(2, 2, 2), seed=11, progress=False,
                      compiler_options=FAST_COMPILE)
    manager = CheckpointManager(ckpt_dir, save_interval_steps=2, max_to_keep=2) if ckpt_dir else None
    score_iter = iter(scores or [])

    def on_step(step, _):
        if step == kill_at:
            raise Killed(step)

    dev, kwargs = [], {}
    if selection == "early_stop":
        dev, kwargs = capital_examples(4, "dev"), dict(eval_fn=lambda m, dev: next(score_iter))
    try:
        result = trainer.fit(EXAMPLES, dev, train_config(**CFG, selection=selection),
                             checkpoint_manager=manager, on_step=on_step, **kwargs)
    finally:
        if manager is not None:
            manager.close()
    return result, _params(model)


def _assert_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tiny_config):
    return _fit(tokenizer, tiny_config)


# Orbax leaves a callback on a closed event loop after the aborted read of the corrupt step.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["none", "corrupt_latest"])
def test_killed_run_resumes_to_same_params(tokenizer, tiny_config, tmp_path, damage, uninterrupted):
    full, expected = uninterrupted
    assert full.steps == 6
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _fit(tokenizer, tiny_config, ckpt_dir=ckpt, kill_at=5)
    # Saved: step 2 (mid-epoch), 3 (epoch end), 4 (mid-epoch); keep-2 leaves 3 and 4.
    assert sorted(int(p.name) for p in (ckpt / "steps").iterdir() if p.name.isdigit()) == [3, 4]
    (ckpt / "steps" / "5.orbax-checkpoint-tmp-1").mkdir()  # a save the kill cut short
    expect_from = 4
    if damage == "corrupt_latest":
        for f in (ckpt / "steps" / "4" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\0garbage")
        expect_from = 3
    if damage == "none":
        resumed, params = _fit(tokenizer, tiny_config, ckpt_dir=ckpt)
    else:
        with pytest.warns(UserWarning, match=r"checkpoint step 4 is unreadable .* moved it to .*corrupt"):
            resumed, params = _fit(tokenizer, tiny_config, ckpt_dir=ckpt)
        assert (ckpt / "corrupt" / "4").is_dir()
    assert resumed.resumed_from_step == expect_from and resumed.steps == 6
    assert [h["train_loss"] for h in resumed.history][0] == pytest.approx(full.history[0]["train_loss"])
    _assert_equal(params, expected)


def test_resume_restores_best_epoch(tokenizer, tiny_config, tmp_path):
    full, expected = _fit(tokenizer, tiny_config, scores=[0.9, 0.5], selection="early_stop")
    assert full.best_epoch == 1
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _fit(tokenizer, tiny_config, ckpt_dir=ckpt, kill_at=5, scores=[0.9], selection="early_stop")
    resumed, params = _fit(tokenizer, tiny_config, ckpt_dir=ckpt, scores=[0.5], selection="early_stop")
    assert resumed.best_epoch == 1 and resumed.best_score == 0.9
    assert [h["dev_accuracy"] for h in resumed.history] == [0.9, 0.5]
    _assert_equal(params, expected)
