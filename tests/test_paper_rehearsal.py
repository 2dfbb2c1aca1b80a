"""Rehearsals of the paper configs on this CPU: each `configs/paper/*.yaml` with only the model (a
tiny model of the same family, `rehearsal_models.py`) and the data (the rehearsal world's QA)
replaced, run through the whole pipeline on 8 fake devices (fsdp=8 from the file's `fsdp: -1`),
bf16 compute, scan_layers, remat and LoRA as the file sets them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rehearsal_models import rehearsal_model, rehearsal_world  # noqa: E402

from gradual_jax.config import load_config  # noqa: E402
from gradual_jax.launch import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
FAMILY = {"llama3": "llama", "qwen2": "qwen2"}


def _data(world) -> list[str]:
    # Every train question (see REHEARSAL_WORLD); 5 dev questions a relation, the fewest that
    # leaves 4 distinct exemplars for every prompt; 2 test questions a relation.
    return ["data.kind=jsonl", f"data.path={world.root / 'qa'}", "data.gekhman=false",
            "data.dev_limit_per_relation=5", "data.test_limit_per_relation=2"]


@pytest.fixture(scope="module")
def world():
    return rehearsal_world()


@pytest.fixture(scope="module")
def family_models(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rehearsal_models")
    return {fam: rehearsal_model(world.model_dir, root / fam, fam) for fam in set(FAMILY.values())}


def _without_model_and_data(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["model"].pop("source")
    for key in ("data", "run_dir"):
        d.pop(key)
    return d


def _rehearse(name: str, family_models, world, tmp_path) -> None:
    path = PAPER / f"{name}.yaml"
    model = family_models[FAMILY[name.split("_")[0]]]
    overrides = [f"model.source={model}", *_data(world), f"run_dir={tmp_path}"]
    cfg = load_config(path, overrides)
    assert _without_model_and_data(cfg) == _without_model_and_data(load_config(path))
    assert cfg.model.compute_dtype == "bfloat16" and cfg.train.scan_layers and cfg.train.remat

    assert main([str(path), *overrides]) == 0
    root = tmp_path / cfg.name
    report = json.loads((root / "report.json").read_text())
    assert report["runtime"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["seeds"] == cfg.seeds
    stages = sorted(root.glob("seed_*/*/stage*/stage.json"))
    ran = {(p.parts[-4], p.parts[-3], p.parts[-2]): json.loads(p.read_text()) for p in stages}
    for seed in cfg.seeds:
        for arm in cfg.arms:
            first = ran[f"seed_{seed}", arm, "stage1"]
            assert first["steps"] > 0 and len(first["trained_ids"]) > 0, (seed, arm)
        # Stage 2 found examples that moved up after stage 1, in every seed, and trained on them.
        second = ran[f"seed_{seed}", "two_stage", "stage2"]
        assert second["steps"] > 0 and len(second["trained_ids"]) > 0, seed
    if cfg.train.lora.rank > 0:  # a LoRA run keeps each stage's adapter for export
        assert any((root / f"seed_{s}" / "two_stage" / "stage1" / "adapter").is_dir() for s in cfg.seeds)


# One rehearsal runs in the default suite (the quickest: full fine-tuning, about 2.5 minutes
# here), the others with -m slow.
IN_DEFAULT_SUITE = "llama3_8b_full"


@pytest.mark.parametrize("name", [
    pytest.param(p.stem, marks=() if p.stem == IN_DEFAULT_SUITE else pytest.mark.slow)
    for p in sorted(PAPER.glob("*.yaml"))])
def test_paper_rehearsal(name, family_models, world, tmp_path):
    _rehearse(name, family_models, world, tmp_path)


def test_rehearsal_models_keep_the_world_models_function(smoke_world, tmp_path):
    """The rescaling and the added zero biases leave the logits and the tokenizer as they were
    (checked on the smoke world's model, which every machine running the suite has built)."""
    import numpy as np

    from gradual_jax.models import load_hf, load_tokenizer

    reference, tokenizer = load_hf(smoke_world.model_dir), load_tokenizer(smoke_world.model_dir)
    text = "Q: " + smoke_world.train[0].question + "\nA: " + smoke_world.train[0].answers[0]
    ids = tokenizer(text)["input_ids"]
    want = np.asarray(reference(np.asarray([ids])))
    family_models = {fam: rehearsal_model(smoke_world.model_dir, tmp_path / fam, fam) for fam in set(FAMILY.values())}
    for family, directory in family_models.items():
        model = load_hf(directory)
        assert model.config.model_type == family and model.config.attention_bias == (family == "qwen2")
        assert load_tokenizer(directory)(text)["input_ids"] == ids
        np.testing.assert_allclose(np.asarray(model(np.asarray([ids]))), want, atol=1e-4)
