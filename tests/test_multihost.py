"""Two JAX processes on CPU train like one: same params, one Orbax checkpoint written by both.

The tests spawn this file twice as a worker (`python tests/test_multihost.py MODE PID PORT OUT`):
each worker joins a 2-process job through `gradual_jax.distributed.maybe_initialize` (gloo CPU
collectives, 2 local CPU devices each, so the mesh spans 4 devices on 2 processes) and trains a
tiny model on an fsdp=4 mesh, so every parameter is split across both processes, feeding only
its own rows of each global batch. Mode "step": one `Trainer.step`, then one Orbax checkpoint
that both processes write. Mode "fit" (slow): `Trainer.fit` for two one-step epochs with its
own checkpointing. The test process restores the workers' last checkpoint and compares it with
the same training done in one process on one device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "training"))  # train_helpers
sys.path.insert(0, str(HERE))
from process_group import free_port, wait_all, worker_env  # noqa: E402

LOCAL_DEVICES = 2
NUM_PROCESSES = 2
EPOCHS = 2  # "fit" mode: one step per epoch (8 examples, batch 8)
ITEMS = list(range(11))  # probe work split over processes, gathered back


def _model_config():
    from gradual_jax.models.transformer import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def _tokenizer():
    from train_helpers import CAPITALS, WordTokenizer

    return WordTokenizer([f"Q: What is the capital of {c}?\nA: {a}\n" for c, a in CAPITALS])


def _trainer(mesh):
    from train_helpers import FAST_COMPILE, tiny_model

    from gradual_jax.training.trainer import Trainer

    return Trainer(tiny_model(_model_config(), seed=0), _tokenizer(), mesh=mesh, seed=0,
                   progress=False, compiler_options=FAST_COMPILE)


def _config():
    from train_helpers import train_config

    return train_config(batch_size=8, epochs=EPOCHS, weight_decay=0.1)


def _one_step(mesh, ckpt_dir: Path | None):
    """Setup and one optimizer step on the 8-example batch; saved as step 1 when `ckpt_dir`."""
    from train_helpers import capital_examples

    from gradual_jax.checkpoint import CheckpointManager
    from gradual_jax.training import data as D

    trainer = _trainer(mesh)
    cfg = _config()
    trainer.setup(cfg, total_steps=EPOCHS)
    toks = D.tokenize_examples(capital_examples(8), trainer.tokenizer, template=cfg.template,
                               max_seq_len=cfg.max_seq_len)
    (batch,) = D.epoch_batches(toks, batch_rows=8, seed=0, epoch=0, max_seq_len=cfg.max_seq_len)
    trainer.step(batch)  # each process feeds its rows (process_rows) of the global batch
    if ckpt_dir is not None:
        with CheckpointManager(ckpt_dir) as manager:
            manager.save(1, trainer._checkpoint_tree(), {"epoch": 0})
    return trainer


def _fit(mesh, ckpt_dir: Path | None):
    """`Trainer.fit` for `EPOCHS` one-step epochs, checkpointing every epoch when `ckpt_dir`."""
    from train_helpers import capital_examples

    from gradual_jax.checkpoint import CheckpointManager

    trainer = _trainer(mesh)
    manager = None if ckpt_dir is None else CheckpointManager(ckpt_dir, max_to_keep=EPOCHS)
    result = trainer.fit(capital_examples(8), [], _config(), checkpoint_manager=manager)
    if manager is not None:
        manager.close()
    assert result.steps == EPOCHS
    return trainer


MODES = {"step": _one_step, "fit": _fit}


def _worker(mode: str, process_id: int, port: int, out: Path) -> None:
    import jax

    from gradual_jax.distributed import DistributedConfig
    from gradual_jax.distributed import gather_records, maybe_initialize, shard_for_process

    multi = maybe_initialize(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                                               num_processes=NUM_PROCESSES, process_id=process_id))
    assert multi and jax.process_count() == NUM_PROCESSES
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == 4
    from gradual_jax.sharding import make_mesh

    MODES[mode](make_mesh(data=1, fsdp=4), out / "ckpt")
    mine = shard_for_process(ITEMS)
    gathered = gather_records([{"item": i, "by": jax.process_index()} for i in mine])
    (out / f"worker{process_id}.json").write_text(json.dumps({"mine": mine, "gathered": gathered}))


# ----------------------------------------------------------------------------- the test


def _run_workers_and_compare(mode: str, tmp_path: Path, steps: list[int]) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from gradual_jax.checkpoint import CheckpointManager, abstract_like
    from gradual_jax.sharding import make_mesh

    port = free_port()
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(i), str(port), str(tmp_path)],
                              env=worker_env(LOCAL_DEVICES), stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(NUM_PROCESSES)]
    # The single-process run trains meanwhile, on one device.
    reference = MODES[mode](make_mesh(devices=jax.devices()[:1]), None)
    for i, rc in enumerate(wait_all(procs, logs, 240)):
        log = (tmp_path / f"worker{i}.log").read_text()
        assert rc == 0, f"worker {i} exited {rc}:\n{log[-4000:]}"

    # Both processes wrote the checkpoint; read it back here and compare with the reference.
    with CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.all_steps() == steps
        step, tree, _ = manager.restore_latest(abstract_like(reference._checkpoint_tree()))
    assert step == steps[-1]
    want = jax.tree_util.tree_flatten_with_path(jax.device_get(reference._checkpoint_tree()))[0]
    got = jax.tree.leaves(jax.device_get(tree))
    assert len(want) == len(got)
    for (path, w), g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
    # Training moved the params: the comparison is not between two untouched inits.
    init = nnx.to_pure_dict(nnx.state(_reference_init()))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(tree["params"]), jax.device_get(init))
    assert max(jax.tree.leaves(moved)) > 1e-3

    # Probe work: each process took its own block, and both gathered everything in order.
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    assert results[0]["mine"] + results[1]["mine"] == ITEMS
    for r in results:
        assert [rec["item"] for rec in r["gathered"]] == ITEMS
        assert [rec["by"] for rec in r["gathered"]] == [0] * 6 + [1] * 5


def test_multihost_train_step_and_checkpoint(tmp_path):
    _run_workers_and_compare("step", tmp_path, steps=[1])


@pytest.mark.slow
def test_multihost_fit_two_epochs(tmp_path):
    _run_workers_and_compare("fit", tmp_path, steps=[1, 2])


def _reference_init():
    from train_helpers import tiny_model

    return tiny_model(_model_config(), seed=0)


def test_shard_for_process_covers_items_in_order():
    from gradual_jax.distributed import gather_records, shard_for_process

    for n in (0, 1, 5, 16, 17):
        items = list(range(n))
        blocks = [shard_for_process(items, i, 4) for i in range(4)]
        assert sum(blocks, []) == items
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert gather_records([{"a": 1}]) == [{"a": 1}]  # one process: returned as given
    with pytest.raises(ValueError, match="process_index"):
        shard_for_process(items, 4, 4)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
