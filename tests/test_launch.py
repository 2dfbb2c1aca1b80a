"""End to end: the smoke config through `python -m gradual_jax.launch`, its report, resume after
kill -9, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.launch import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from older_scoring import mark_as_gold_scoring_1  # noqa: E402
from report_equality import assert_same  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def _report_numbers(report: dict) -> dict:
    """Everything in the report but timing and paths."""
    drop = {"wall_seconds", "config", "invocation_seconds"}
    return {k: v for k, v in report.items() if k not in drop}


def test_smoke_report_has_every_field(smoke_run):
    root, seconds = smoke_run
    report = json.loads((root / "report.json").read_text())
    assert report["stages"][0]["train_counts"].keys() >= set(CATEGORIES)
    for stage in report["stages"]:
        assert set(stage["train_counts"]) >= set(CATEGORIES)
        assert set(stage["test_counts"]) >= set(CATEGORIES)
    for arm in ("two_stage", "one_stage", "natural", "highly_known", "random_subset"):
        fields = report["arms"][arm]
        for key in ("test_accuracy", "test_accuracy_by_category", "train_highly_known", "retention"):
            assert key in fields, (arm, key)
    for key in ("knowledge_gain_pct", "untrained_upgrades", "noise_control", "transitions", "wall_seconds"):
        assert key in report
    acc = report["arms"]["two_stage"]["test_accuracy"]
    assert set(acc) >= {"mean", "low", "high"}
    assert (root / "report.md").read_text().startswith("#")
    assert list(root.glob("*.png"))


def test_second_invocation_resumes_everything(smoke_run, capsys):
    root, first_seconds = smoke_run
    before = json.loads((root / "report.json").read_text())
    t0 = time.time()
    assert main([SMOKE, f"run_dir={root.parent}"]) == 0
    assert _report_numbers(json.loads((root / "report.json").read_text())) == _report_numbers(before)
    assert time.time() - t0 < first_seconds


def test_seeds_in_parallel_threads_give_the_sequential_report(smoke_run, tmp_path):
    root, _ = smoke_run
    assert main([SMOKE, f"run_dir={tmp_path}", "seed_workers=2"]) == 0
    parallel = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert _report_numbers(parallel) == _report_numbers(json.loads((root / "report.json").read_text()))
    for seed in (0, 1):  # every probe record too, not only the aggregates
        for probe in sorted((root / f"seed_{seed}").rglob("*.jsonl")):
            if probe.name == "metrics.jsonl":
                continue
            twin = tmp_path / "smoke" / probe.relative_to(root)
            assert twin.read_bytes() == probe.read_bytes(), probe.relative_to(root)


def test_run_dir_of_another_configuration_is_refused(smoke_run, capsys):
    root, _ = smoke_run
    before = (root / "report.json").read_bytes()
    assert main([SMOKE, f"run_dir={root.parent}", "train.lr=0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (root / "report.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["model.source=/nonexistent/model.gguf"], "does not exist"),
    (["model.source=pkg:no_such_package_gj"], "is not installed"),
    (["train.lrr=1"], "unknown key"),
    (["train.lr=abc"], "expected float"),
    (["stages.0.select.categories=[Famous]"], "Famous"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert main([SMOKE, f"run_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# A step checkpoint at every epoch end, so a kill mid-training resumes from one (the reference
# run kept the default time-based checkpoints: the cadence must not change a result).
EVERY_EPOCH = "checkpoint.minutes=0"


def _launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gradual_jax.launch", SMOKE, f"run_dir={run_dir}", EVERY_EPOCH],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            return
        if time.time() - t0 > timeout:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


KILL_POINTS = {
    "mid_probe": lambda root: (root / "seed_0" / "stage0" / "train.jsonl").exists(),
    "mid_training": lambda root: any((root / "seed_0" / "two_stage").glob("stage1/ckpt/steps/[0-9]*")),
    "after_stage": lambda root: (root / "seed_0" / "two_stage" / "stage1" / "stage.json").exists(),
    "second_seed": lambda root: (root / "seed_1").exists(),
}


@pytest.mark.parametrize("point", ["mid_training"])
def test_kill_and_resume_gives_the_same_report(smoke_run, tmp_path, point):
    _resume_after_kill(smoke_run, tmp_path, [point])


@pytest.mark.slow
def test_kill_at_every_point_and_resume(smoke_run, tmp_path):
    _resume_after_kill(smoke_run, tmp_path, list(KILL_POINTS))


def _resume_after_kill(smoke_run, tmp_path, points):
    root, _ = smoke_run
    reference = _report_numbers(json.loads((root / "report.json").read_text()))
    run_root = tmp_path / "smoke"
    for point in points:
        _kill_when(_launch(tmp_path), lambda: KILL_POINTS[point](run_root))
    assert main([SMOKE, f"run_dir={tmp_path}", EVERY_EPOCH]) == 0
    assert _report_numbers(json.loads((run_root / "report.json").read_text())) == reference


def test_a_run_of_an_older_gold_scoring_with_a_stale_stage_is_made_current(smoke_run, smoke_world, tmp_path):
    """Resuming a copy of the smoke run whose probes and summaries are marked as gold scoring 1,
    and whose seed-0 two-stage stage 1 says it trained on other examples: the probe files are
    updated in place, that stage and the stage after it train and probe again, and the report
    equals the run's (p_gold to float noise)."""
    root, _ = smoke_run
    run_root = tmp_path / "smoke"
    shutil.copytree(root, run_root)
    assert mark_as_gold_scoring_1(run_root, str(smoke_world.model_dir), SMOKE) > 0
    stage = run_root / "seed_0" / "two_stage" / "stage1" / "stage.json"
    info = json.loads(stage.read_text())
    trained = info["trained_ids"]
    stage.write_text(json.dumps({**info, "trained_ids": trained[:-1]}))
    later = run_root / "seed_0" / "two_stage" / "stage2" / "stage.json"
    later_mtime = later.stat().st_mtime_ns if later.exists() else None
    assert main([SMOKE, f"run_dir={tmp_path}"]) == 0
    assert json.loads(stage.read_text())["trained_ids"] == trained
    if later_mtime is not None:  # the stage after it started from a model trained again
        assert later.stat().st_mtime_ns != later_mtime
    before = json.loads((root / "report.json").read_text())
    assert_same(_report_numbers(json.loads((run_root / "report.json").read_text())), _report_numbers(before))
    for meta in (run_root / "seed_1").rglob("*.jsonl.meta.json"):
        twin = root / meta.relative_to(run_root)
        assert meta.read_text() == twin.read_text() or json.loads(meta.read_text()) == json.loads(twin.read_text())


def test_split_limits_apply_per_split_after_the_gekhman_filters(eq_dir):
    from collections import Counter

    from gradual_jax.config import load_config
    from gradual_jax.knowledge import data as qa
    from gradual_jax.launch import load_splits

    cfg = load_config(REPO / "configs" / "paper" / "qwen2_7b_lora.yaml",
                      [f"data.path={eq_dir}", "data.limit_per_relation=6", "data.dev_limit_per_relation=40",
                       "data.test_limit_per_relation=4"])
    splits = load_splits(cfg)
    full = qa.gekhman_setup(eq_dir)
    for split, n in (("train", 6), ("dev", 40), ("test", 4)):
        counts = Counter(e.relation for e in splits[split])
        assert set(counts.values()) == {n}, (split, counts)
        assert counts.keys() == {e.relation for e in full[split]}
        assert splits[split] == qa.first_per_relation(full[split], n)


def test_gekhman_probes_get_exemplars_for_test_relations_and_select_on_train_relations(eq_dir, tmp_path):
    """The OOD test relations are probed few-shot, so dev must hold their exemplars; early
    stopping must still see only the train relations' dev questions."""
    from gradual_jax.config import load_config
    from gradual_jax.knowledge import data as qa
    from gradual_jax.knowledge.prompts import build_prompt_sets
    from gradual_jax.launch import load_splits
    from gradual_jax.pipeline import Resources, SeedRun

    cfg = load_config(REPO / "configs" / "smollm2_entityquestions.yaml", [f"data.path={eq_dir}"])
    splits = load_splits(cfg)
    probed = sorted({e.relation for s in ("train", "test") for e in splits[s]})
    assert set(probed) == set(qa.TRAIN_RELATIONS) | set(qa.TEST_RELATIONS)
    sets = build_prompt_sets(splits["dev"], probed, n_prompts=cfg.probe.n_prompts, k=cfg.probe.k_shot)
    assert set(sets) == set(probed)
    run = SeedRun(cfg, Resources(None, None, splits, "m"), 0, tmp_path, None, None, None, (None, None))
    assert {e.relation for e in run.selection_dev} == set(qa.TRAIN_RELATIONS)
    assert len(run.selection_dev) == 40 * len(qa.TRAIN_RELATIONS)


def _write_jsonl(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.write_text("".join(json.dumps({"relation": r, "question": q, "answers": [a]}) + "\n"
                            for r, q, a in rows))


def test_overlap_filter_on_any_relation_set(tmp_path, caplog):
    """data.overlap drops train examples by their subjects (and answers) in the whole test set,
    before the test limit; the default for a non-Gekhman source keeps every example."""
    from gradual_jax.config import load_config
    from gradual_jax.launch import load_splits

    _write_jsonl(tmp_path / "train.jsonl", [
        ("P36", "What is the capital of France?", "Paris"),  # 0: subject France, a test answer
        ("P36", "What is the capital of Italy?", "Rome"),  # 1: nothing shared
        ("P17", "Which country is Lyon located in?", "France"),  # 2: answer France only
        ("P17", "Which country is Ulm located in?", "Germany"),  # 3: Ulm, a test subject past the limit
        ("P36", "What is the capital of Peru?", "Lima"),  # 4: nothing shared
    ])
    _write_jsonl(tmp_path / "dev.jsonl", [("P36", "What is the capital of Spain?", "Madrid"),
                                          ("P17", "Which country is Porto located in?", "Portugal")])
    _write_jsonl(tmp_path / "test.jsonl", [
        ("P17", "Which country is Nice located in?", "France"),
        ("P17", "Which country is Ulm located in?", "Germany"),  # past test_limit_per_relation=1
        ("P36", "What is the capital of Chile?", "Santiago"),
    ])
    base = ["data.kind=jsonl", f"data.path={tmp_path}", "data.test_limit_per_relation=1"]

    def train_ids(*overrides):
        return [e.id for e in load_splits(load_config(None, [*base, *overrides]))["train"]]

    every = [f"{r}.train.{i}" for i, r in enumerate(["P36", "P36", "P17", "P17", "P36"])]
    assert train_ids() == every  # default: no filter, as before
    assert train_ids("data.overlap=none") == every
    with caplog.at_level("INFO", logger="gradual_jax"):
        assert train_ids("data.overlap=subject") == ["P36.train.1", "P17.train.2", "P36.train.4"]
    assert "overlap filter (subject): dropped 2 of 5 train examples (P36 1, P17 1)" in caplog.text
    assert train_ids("data.overlap=subject_or_answer") == ["P36.train.1", "P36.train.4"]
    # test relations narrow the test set compared against: P36's test mentions none of them
    assert train_ids("data.overlap=subject", "data.test_relations=[P36]") == every
    # the filter comes before the train limit
    assert train_ids("data.overlap=subject", "data.limit_per_relation=1") == ["P36.train.1", "P17.train.2"]


def test_entityquestions_without_gekhman_is_unfiltered_by_default(eq_dir):
    from gradual_jax.config import load_config
    from gradual_jax.knowledge import data as qa
    from gradual_jax.launch import load_splits

    base = ["data.kind=entityquestions", f"data.path={eq_dir}", "data.gekhman=false",
            "data.train_relations=[P36, P17]"]
    splits = load_splits(load_config(None, base))
    assert splits["train"] == qa.load_entityquestions(eq_dir, "train", ["P36", "P17"])
    assert splits["test"] == qa.load_entityquestions(eq_dir, "test", ["P36", "P17"])
    subject = load_splits(load_config(None, [*base, "data.overlap=subject"]))
    assert subject["train"] == qa.drop_overlapping(splits["train"], splits["test"], "subject")
    assert 0 < len(splits["train"]) - len(subject["train"]) < len(splits["train"]) // 10
    assert subject["test"] == splits["test"] and subject["dev"] == splits["dev"]
