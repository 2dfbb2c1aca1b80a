"""`gradual_jax.export` on real smoke runs: the exported HF directory computes our stage model's
logits in transformers, LoRA runs' PEFT adapters (per stage and combined) compute the merged
models in peft, a tiny shard limit writes shards transformers loads, and bad input is one line
with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gradual_jax.config import RunConfig, load_config
from gradual_jax.export import ExportConfig, export_after_run, export_run, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
ONE_SEED = ["seeds=[0]", "arms=[two_stage]"]
# Stage 2 on a random subset so that it trains (its moved-up rule often selects nothing here),
# with its own rank and alpha: the combined adapter must rescale.
LORA = ["train.lora.rank=4", "train.lora.targets=[q,v,o,down]",
        "stages.1.select={random: true, size: 8}", "stages.1.train.lora.rank=2",
        "stages.1.train.lora.alpha=8"]


def smoke_run(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from gradual_jax.launch import main as launch

    run_dir = tmp_path_factory.mktemp(name)
    assert launch([SMOKE, f"run_dir={run_dir}", *ONE_SEED, *overrides]) == 0
    return run_dir / "smoke"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, smoke_world) -> Path:
    return smoke_run(tmp_path_factory, "plain", [])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, smoke_world) -> Path:
    return smoke_run(tmp_path_factory, "lora", LORA)


# --------------------------------------------------------------------------------------------
# Logits, ours and transformers'


def token_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 12 tokens; row 1 left-padded by 3."""
    ids = np.random.default_rng(0).integers(3, vocab, size=(2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def stage_model(root: Path, stage: str, smoke_world):
    """Our model of the stage, restored from its Orbax params as the pipeline does."""
    from gradual_jax.checkpoint import restore_model_params
    from gradual_jax.models.hf import read_hf_config
    from gradual_jax.models.transformer import abstract_model

    config = read_hf_config(smoke_world.model_dir)
    return restore_model_params(root / "seed_0" / "two_stage" / stage / "params",
                                abstract_model(config))


def our_logits(model, ids, mask) -> np.ndarray:
    out = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.bool_))
    return np.asarray(out)[mask.astype(bool)]


def hf_load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, ids, mask) -> np.ndarray:
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()[mask.astype(bool)]


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(expected).max() > 1.0, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# Full fine-tuning


def test_exported_model_computes_our_logits(plain_run, smoke_world, tmp_path, capsys):
    assert main([str(plain_run), str(tmp_path / "out")]) == 0
    assert "exported:" in capsys.readouterr().out
    out = tmp_path / "out"
    record = json.loads((out / "export.json").read_text())
    stage = record["stage"]
    assert (record["seed"], record["arm"], record["lora"]) == (0, "two_stage", False)
    assert stage == record["stages"][-1] and (out / "EXPORT.md").is_file()
    assert record["weights"] == ["model.safetensors"]
    assert not any((out / d).exists() for d in ("adapter", "adapters", "base"))
    hf = hf_load(out)
    assert type(hf) is transformers.LlamaForCausalLM
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(
        smoke_world.model_dir).get_vocab()
    ours = stage_model(plain_run, stage, smoke_world)
    ids, mask = token_batch(ours.config.vocab_size)
    assert_same(hf_logits(hf, ids, mask), our_logits(ours, ids, mask))
    base = hf_load(smoke_world.model_dir)
    assert np.abs(hf_logits(base, ids, mask) - hf_logits(hf, ids, mask)).max() > 1e-3


def test_tiny_shard_limit_writes_shards_transformers_loads(plain_run, smoke_world, tmp_path):
    out = export_run(plain_run, tmp_path / "out", stage="stage1", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    from safetensors.numpy import load_file

    tensors = {k: v for name in shards for k, v in load_file(out / name).items()}
    assert tensors.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    ours = stage_model(plain_run, "stage1", smoke_world)
    ids, mask = token_batch(ours.config.vocab_size)
    assert_same(hf_logits(hf_load(out), ids, mask), our_logits(ours, ids, mask))


def test_export_after_run(plain_run):
    cfg = load_config(plain_run / "config.yaml")
    if not hasattr(RunConfig(), "export"):
        pytest.skip("RunConfig has no export section yet")
    assert export_after_run(cfg, plain_run) is None  # export.enabled is off by default
    on = load_config(plain_run / "config.yaml", ["export.enabled=true", "export.stage=stage1"])
    out = export_after_run(on, plain_run)
    assert out == plain_run / "export" / "seed_0" / "two_stage" / "stage1"
    written = (out / "export.json").stat().st_mtime_ns
    assert export_after_run(on, plain_run) == out  # already exported: kept as it is
    assert (out / "export.json").stat().st_mtime_ns == written
    assert json.loads((out / "export.json").read_text())["stage"] == "stage1"


# --------------------------------------------------------------------------------------------
# LoRA


def test_lora_adapters_compute_the_merged_models(lora_run, smoke_world, tmp_path):
    peft = pytest.importorskip("peft")
    out2 = export_run(lora_run, tmp_path / "stage2")
    out1 = export_run(lora_run, tmp_path / "stage1", stage="stage1")
    record = json.loads((out2 / "export.json").read_text())
    assert record["stage"] == "stage2" and record["stages"] == ["stage1", "stage2"]
    assert record["adapter"]["rank"] == 6 and record["base"]["dir"] == "base"
    assert record["adapters"]["stage2"]["applies_to"] == "stage1"
    adapter_cfg = json.loads((out2 / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((out2 / "base").resolve())
    assert adapter_cfg["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]

    ours = stage_model(lora_run, "stage2", smoke_world)
    ids, mask = token_batch(ours.config.vocab_size)
    merged2, merged1 = hf_logits(hf_load(out2), ids, mask), hf_logits(hf_load(out1), ids, mask)
    assert_same(merged2, our_logits(ours, ids, mask))
    plain = hf_logits(hf_load(out2 / "base"), ids, mask)
    assert_same(plain, hf_logits(hf_load(smoke_world.model_dir), ids, mask))
    for a, b in ((plain, merged1), (merged1, merged2)):
        assert np.abs(a - b).max() > 1e-3, "each stage must change the model"

    def onto(base_dir: Path, adapter_dir: Path) -> np.ndarray:
        model = peft.PeftModel.from_pretrained(hf_load(base_dir), adapter_dir).eval()
        return hf_logits(model, ids, mask)

    assert_same(onto(out2 / "base", out2 / "adapter"), merged2)
    assert_same(onto(out2 / "base", out2 / "adapters" / "stage1"), merged1)
    assert_same(onto(out1, out2 / "adapters" / "stage2"), merged2)
    assert_same(onto(out1 / "base", out1 / "adapter"), merged1)


# --------------------------------------------------------------------------------------------
# Bad input


def fake_run(tmp_path: Path, plain_run: Path, arm_json: dict | None) -> Path:
    """A run directory with plain_run's config and only stage1 of two_stage trained."""
    root = tmp_path / "run"
    stage1 = root / "seed_0" / "two_stage" / "stage1"
    (stage1 / "params").mkdir(parents=True)
    shutil.copy(plain_run / "config.yaml", root / "config.yaml")
    (stage1 / "stage.json").write_text("{}")
    (stage1 / "params" / "model.json").write_text("{}")
    if arm_json is not None:
        (root / "seed_0" / "two_stage" / "arm.json").write_text(json.dumps(arm_json))
    return root


@pytest.mark.parametrize("args, message", [
    (["--seed", "7"], r"seed 7: not a seed of the run in .* \(seeds: 0\)"),
    (["--arm", "one_stage"], r"arm 'one_stage': not an arm of the run .* \(arms: two_stage\)"),
    (["--stage", "stage9"], r"stage 'stage9': arm two_stage has stages stage1, stage2"),
    (["--max-shard-size", "big"], r"max_shard_size: size 'big'"),
])
def test_bad_selection_is_one_line_and_exit_2(plain_run, tmp_path, capsys, args, message):
    import re

    assert main([str(plain_run), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arm_json, message", [
    ({"stages": [{"name": "stage1"}, {"name": "stage2", "skipped": True}]},
     "stage stage2 of arm two_stage (seed 0) was skipped: nothing was selected"),
    (None, "stage stage2 of arm two_stage (seed 0) has not been trained yet"),
])
def test_skipped_or_untrained_stage(plain_run, tmp_path, capsys, arm_json, message):
    root = fake_run(tmp_path, plain_run, arm_json)
    assert main([str(root), str(tmp_path / "out"), "--stage", "stage2"]) == 2
    assert message in capsys.readouterr().err


def test_missing_run_dir_and_foreign_out_dir(plain_run, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    assert main([str(plain_run), str(busy)]) == 2
    assert "holds files that are not an export" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("size", ["5GB", "500MB", "20kb", "1.5GiB", "64", "0MB", "5 parsecs",
                                  "GB", "1e3MB", ""])
def test_export_config_accepts_what_save_hf_parses(size):
    from gradual_jax.configlib import ConfigError
    from gradual_jax.configlib import parse_size

    try:
        parse_size(size)
        ok = True
    except ValueError:
        ok = False
    if ok:
        assert ExportConfig(max_shard_size=size).max_shard_size == size
    else:
        with pytest.raises(ConfigError, match="max_shard_size"):
            ExportConfig(max_shard_size=size)
