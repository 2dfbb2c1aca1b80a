"""MetricsWriter: events read back by TensorBoard's own reader, JSONL, process 0 only, W&B offline."""

from __future__ import annotations

import json
import sys

import jax
import pytest

from gradual_jax.configlib import ConfigError
from gradual_jax.training import metrics as M


def tb_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every event file in ``logdir``, read by tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_writer_round_trip(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 2.0, "lr": 0.1})
        w.write(2, {"loss": 1.5, "note": "text only in jsonl", "bad": float("nan")})
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["loss"] == 2.0 and lines[0]["lr"] == 0.1
    assert lines[1]["note"] == "text only in jsonl" and lines[1]["bad"] is None
    assert isinstance(lines[0]["time"], float)
    scalars = tb_scalars(tmp_path)
    assert set(scalars) == {"loss", "lr", "bad"}  # "note" is not a number: JSONL only
    assert scalars["loss"] == [(1, 2.0), (2, 1.5)]
    assert scalars["lr"] == [(1, pytest.approx(0.1))]
    assert [s for s, _ in scalars["bad"]] == [2]


def test_second_writer_in_a_directory_keeps_the_first_ones_events(tmp_path):
    """A resumed stage opens a new writer in the same directory, usually within the same second."""
    with M.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 3.0})
    with M.MetricsWriter(tmp_path) as w:
        w.write(2, {"loss": 2.0})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert tb_scalars(tmp_path)["loss"] == [(1, 3.0), (2, 2.0)]
    assert [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_writer_on_another_process_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    logdir = tmp_path / "stage1"
    with M.MetricsWriter(logdir, wandb_run=object()) as w:  # the run is never touched
        w.write(1, {"loss": 2.0, "note": "x"})
        w.flush()
    assert not logdir.exists()
    cfg = M.LoggingConfig(wandb=True, wandb_mode="offline")
    assert M.open_wandb(cfg, run_name="r", config={}, directory=tmp_path / "w") is None
    assert list(tmp_path.iterdir()) == []


def test_open_wandb_off_opens_nothing(tmp_path):
    for cfg in (M.LoggingConfig(), M.LoggingConfig(wandb=True, wandb_mode="disabled")):
        assert M.open_wandb(cfg, run_name="r", config={}, directory=tmp_path) is None


def test_open_wandb_without_wandb_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'gradual_jax\[wandb\]'") as info:
        M.open_wandb(M.LoggingConfig(wandb=True), run_name="r", config={}, directory=tmp_path)
    assert "\n" not in str(info.value)


def test_wandb_offline_run_receives_every_stage(tmp_path, monkeypatch):
    """W&B's backend holds each stage's last values (its summary) and its offline log holds
    their keys. (wandb-core writes no wandb-summary.json offline and has no public history
    reader.)"""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # nothing under ~
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = M.LoggingConfig(wandb=True, wandb_mode="offline", wandb_project="test")
    run = M.open_wandb(cfg, run_name="launch", config={"seeds": 1}, directory=tmp_path / "out")
    assert run is not None and run.name == "launch" and run.config["seeds"] == 1
    try:
        with M.MetricsWriter(tmp_path / "s1", wandb_run=run, tag_prefix="seed_0/two_stage/stage1/") as w:
            for step in (1, 2, 3):
                w.write(step, {"loss": 4.0 - step, "note": "jsonl only"})
        # Stage 2's steps start again at 1: its rows must not be dropped as going backwards.
        with M.MetricsWriter(tmp_path / "s2", wandb_run=run, tag_prefix="seed_0/two_stage/stage2/") as w:
            for step in (1, 2):
                w.write(step, {"loss": 0.5 / step})
        summary = dict(run.summary)
    finally:
        run.finish()
        wandb.teardown()  # waits for wandb-core, which writes the offline log after `finish`
    assert summary["seed_0/two_stage/stage1/loss"] == 1.0
    assert summary["seed_0/two_stage/stage1/step"] == 3
    assert summary["seed_0/two_stage/stage2/loss"] == 0.25
    assert summary["seed_0/two_stage/stage2/step"] == 2
    assert not any("note" in k for k in summary)
    (log,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"seed_0/two_stage/stage2/loss" in log.read_bytes()
    assert tb_scalars(tmp_path / "s2") == {"loss": [(1, 0.5), (2, 0.25)]}  # TensorBoard tags unprefixed
