"""The smoke pipeline on QA sets from `datasets` and TFDS: the synthetic world's own questions
written out locally (TriviaQA-shaped for `datasets`, flat for TFDS) give the same report as the
world's built-in split, through `gradual_jax.run` and through the launcher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "knowledge"))

from local_datasets import hf_offline, write_hf_dataset, write_tfds_dataset  # noqa: E402

import gradual_jax  # noqa: E402
from gradual_jax.knowledge.sources import examples_to_records  # noqa: E402
from gradual_jax.launch import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
SMALL = {"seeds": [0], "arms": ["two_stage"], "noise_control": False}
SPLITS = ("train", "dev", "test")


def _numbers(root: Path) -> dict:
    report = json.loads((root / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in {"wall_seconds", "config", "invocation_seconds"}}


def _trivia_shaped(records: list[dict]) -> list[dict]:
    """TriviaQA rc.nocontext's shape: nested answer aliases, a question_id column."""
    return [{"question_id": r["id"], "question": r["question"], "relation": r["relation"],
             "answer": {"value": r["answers"][0], "aliases": r["answers"]}} for r in records]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory, smoke_world) -> Path:
    run_dir = tmp_path_factory.mktemp("world_kind")
    gradual_jax.run(SMOKE, run_dir=str(run_dir), **SMALL)
    return run_dir / "smoke"


def test_hf_dataset_run_equals_the_world_split_run(tmp_path, smoke_world, world_run):
    records = {s: _trivia_shaped(examples_to_records(smoke_world.examples[s])) for s in SPLITS}
    # no test split in the source: carve dev and test out of its validation split
    n_dev = len(records["dev"])
    data = write_hf_dataset(tmp_path / "qa", {"train": records["train"],
                                              "validation": records["dev"] + records["test"]})
    with hf_offline():
        report = gradual_jax.run(
            SMOKE, run_dir=str(tmp_path / "runs"), **SMALL, data__kind="hf", data__path=str(data),
            data__splits={"train": "train", "dev": f"validation[:{n_dev}]",
                          "test": f"validation[{n_dev}:]"},
            data__columns={"answers": "answer.aliases", "id": "question_id"})
    root = tmp_path / "runs" / "smoke"
    assert report["config"]["data"]["kind"] == "hf"
    stage1 = json.loads((root / "seed_0" / "two_stage" / "stage1" / "stage.json").read_text())
    assert stage1["steps"] > 0
    assert (root / "seed_0" / "prompts.json").read_text() == \
        (world_run / "seed_0" / "prompts.json").read_text()
    for split in ("train", "test"):
        ours = (root / "seed_0" / "stage0" / f"{split}.jsonl").read_text().splitlines()
        ref = (world_run / "seed_0" / "stage0" / f"{split}.jsonl").read_text().splitlines()
        assert sorted(ours) == sorted(ref) and len(ours) == len(smoke_world.examples[split])
    assert _numbers(root) == _numbers(world_run)


def test_tfds_dataset_run_equals_the_world_split_run(tmp_path, smoke_world, world_run):
    pytest.importorskip("tensorflow_datasets")
    records = {s: examples_to_records(smoke_world.examples[s]) for s in SPLITS}
    data_dir = tmp_path / "tfds"
    write_tfds_dataset(data_dir, "world_qa", {"train": records["train"], "dev": records["dev"],
                                              "test": records["test"]})
    assert main([SMOKE, f"run_dir={tmp_path / 'runs'}", "seeds=[0]", "arms=[two_stage]",
                 "noise_control=false", "data.kind=tfds", "data.path=world_qa",
                 f"data.data_dir={data_dir}", "data.splits={train: train, dev: dev, test: test}"]) == 0
    assert _numbers(tmp_path / "runs" / "smoke") == _numbers(world_run)
