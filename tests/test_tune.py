"""`python -m gradual_jax.tune`: the run's first stage trained at several rates, chosen on dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradual_jax.config import load_config
from gradual_jax.tune import best_rate, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_best_rate_takes_the_best_selected_epoch_and_the_smaller_rate_among_equals():
    results = {"0.001": {"best_dev_accuracy": 0.5}, "0.0001": {"best_dev_accuracy": 0.5},
               "0.01": {"best_dev_accuracy": 0.25}, "0.1": {"best_dev_accuracy": None}}
    assert best_rate(results) == "0.0001"
    results["0.01"]["best_dev_accuracy"] = 0.75
    assert best_rate(results) == "0.01"


def test_the_config_rate_trains_what_the_run_trained(smoke_run, tmp_path, capsys):
    """At the config's own rate the tool's stage is the run's two-stage stage 1: the same
    examples, steps, selected epoch and dev accuracy (the same code path, deterministic)."""
    root, _ = smoke_run
    lr = load_config(SMOKE).train.lr
    other = lr / 10
    argv = [SMOKE, f"run_dir={tmp_path}", "--lrs", f"{lr},{other}", "--seed", "0",
            "--stage0", str(root / "seed_0" / "stage0" / "train.jsonl")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "smoke-lr" / "lr.json").read_text())
    run_stage = json.loads((root / "seed_0" / "two_stage" / "stage1" / "stage.json").read_text())
    mine = summary["rates"][f"{lr:g}"]
    assert summary["examples"] == len(run_stage["trained_ids"])
    assert mine["steps"] == run_stage["steps"]
    assert mine["best_epoch"] == run_stage["best_epoch"]
    assert mine["dev_accuracy"] == run_stage["dev_accuracy"]
    assert set(summary["rates"]) == {f"{lr:g}", f"{other:g}"}
    accuracies = {k: r["best_dev_accuracy"] for k, r in summary["rates"].items()}
    top = max(accuracies.values())
    assert summary["chosen"] == min((k for k, a in accuracies.items() if a == top), key=float)
    out = capsys.readouterr().out
    assert "<- chosen" in out and f"lr {summary['chosen']:>8}" in out

    # a second invocation trains nothing again
    before = (tmp_path / "smoke-lr" / f"lr_{lr:g}.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "smoke-lr" / f"lr_{lr:g}.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("lrs", ["0", "x", ","])
def test_bad_rates_exit_2(tmp_path, capsys, lrs):
    assert main([SMOKE, f"run_dir={tmp_path}", "--lrs", lrs]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_stage0_records_missing_examples_exit_2(smoke_run, tmp_path, capsys):
    root, _ = smoke_run
    lines = (root / "seed_0" / "stage0" / "train.jsonl").read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text(lines[0] + "\n")
    assert main([SMOKE, f"run_dir={tmp_path}", "--lrs", "1e-3", "--stage0", str(partial)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("error: ") and "no stage-0 record for" in last
