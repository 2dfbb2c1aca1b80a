"""The fit planner and the paper configs: configs load, architectures resolve offline, the plan
reports per-device memory that matches a hand count and says fits / does not fit by exit code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradual_jax import plan as P
from gradual_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _jax_started():
    """Start JAX's backend (conftest: 8 CPU devices) so plan_main never pins it to fewer."""
    import jax

    assert jax.device_count() >= 8


# ----------------------------------------------------------------------------- paper configs


def test_there_are_four_paper_configs():
    assert [p.name for p in PAPER] == ["llama3_8b_full.yaml", "llama3_8b_lora.yaml",
                                       "qwen2_7b_full.yaml", "qwen2_7b_lora.yaml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_and_resolves_offline(path):
    cfg = load_config(path)
    mc = P.resolve_model_config(cfg)  # built-in table: no download
    params = {"qwen2": 7.616e9, "llama": 8.030e9}[mc.model_type]
    assert mc.num_params() == pytest.approx(params, rel=1e-3)
    assert cfg.data.kind == "entityquestions" and cfg.data.gekhman
    assert cfg.train.batch_size == 128 and cfg.train.selection == "early_stop"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)  # fsdp=16 on v5e-16, 8 on H100x8
    assert cfg.train.batch_size % 16 == 0 and cfg.probe.batch_size % 16 == 0
    if "lora" in path.stem:
        assert cfg.train.lora.rank > 0 and cfg.train.lr == 1e-4
    else:
        assert cfg.train.lora.rank == 0 and cfg.train.lr == 1e-5


def test_known_architectures_are_the_hf_configs():
    from gradual_jax.models.hf import config_from_hf

    q = config_from_hf(P.known_architecture("hf:Qwen/Qwen2-7B"))
    assert (q.hidden_size, q.num_layers, q.num_heads, q.num_kv_heads, q.intermediate_size,
            q.vocab_size, q.rope_theta) == (3584, 28, 28, 4, 18944, 152064, 1e6)
    assert q.attention_bias and not q.tie_word_embeddings and q.head_dim == 128
    llama = config_from_hf(P.known_architecture("meta-llama/Meta-Llama-3-8B"))
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads,
            llama.intermediate_size, llama.vocab_size, llama.rope_theta) == (
        4096, 32, 32, 8, 14336, 128256, 5e5)
    assert not llama.attention_bias and not llama.tie_word_embeddings
    assert P.known_architecture("qwen/qwen2-7b") is not None  # case-insensitive
    assert P.known_architecture("Qwen/Qwen3-8B") is None


def test_model_source_resolution(tmp_path):
    cfg = load_config(PAPER[0], ["model.source=hf:Qwen/Qwen2-7B", "model.compute_dtype=float32",
                                 "train.remat=true"])
    mc = P.resolve_model_config(cfg)
    assert mc.model_type == "qwen2" and mc.dtype == "float32" and mc.remat
    with pytest.raises(ConfigError, match="model.source"):
        P.resolve_model_config(load_config(None, ["model.source=no/such/model/here"]))
    with pytest.raises(ConfigError, match="does not exist"):
        P.resolve_model_config(load_config(None, [f"model.source={tmp_path}/missing.gguf"]))


def test_target_memory():
    cfg = load_config(None)
    assert P.resolve_hbm(cfg, 80.0) == (80 * P.GIB, "80 GiB as given")
    assert P.resolve_hbm(cfg, target="h100")[0] == 80 * P.GIB
    size, how = P.resolve_hbm(cfg)
    assert size == 16 * P.GIB and "default" in how
    with pytest.raises(ConfigError, match="unknown target"):
        P.resolve_hbm(cfg, target="tpu-v9")
    with pytest.raises(ConfigError, match="must be > 0"):
        P.resolve_hbm(cfg, 0.0)
    assert P.default_devices(load_config(None, ["mesh.data=2", "mesh.fsdp=4"])) == 8
    assert P.default_devices(load_config(None)) == P.DEFAULT_DEVICES
    # A `plan:` config section (target, hbm_gib, devices), once config.py has one, is honoured.
    from types import SimpleNamespace

    planned = SimpleNamespace(mesh=cfg.mesh, plan=SimpleNamespace(target="h100", hbm_gib=None, devices=16))
    assert P.resolve_hbm(planned) == (80 * P.GIB, "target h100: 80 GiB")
    assert P.resolve_hbm(planned, 16.0)[0] == 16 * P.GIB  # the flag wins
    assert P.default_devices(planned) == 16


# ----------------------------------------------------------------------------- the planner


def _tiny_config(tmp_path: Path, overrides=(), layers: int = 2):
    """A local HF checkpoint directory (config.json only) and a run config pointing at it.

    Hidden 64 over fsdp=8: every parameter has an `embed` dim, so each device holds exactly
    1/8 of every parameter.
    """
    from gradual_jax.models.hf import config_to_hf
    from gradual_jax.models.transformer import ModelConfig

    mc = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=layers,
                     num_heads=4, num_kv_heads=2, eos_token_id=2)
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config_to_hf(mc)))
    return load_config(None, [f"model.source={tmp_path / 'ckpt'}", "mesh.data=1", "mesh.fsdp=-1",
                              "train.batch_size=16", "train.max_seq_len=32", "probe.batch_size=16",
                              "probe.max_new_tokens=4", "probe.k_shot=1", *overrides]), mc


@pytest.fixture
def memo_compiles(monkeypatch):
    """Compile each distinct configuration once per test (plan_main is called twice)."""
    cache: dict = {}
    compile_programs = P._compile_programs

    def cached(mc, cfg, mesh, sampler, tokens):
        key = (mc, json.dumps(P.to_dict(cfg), sort_keys=True), tuple(mesh.shape.items()), sampler, tokens)
        if key not in cache:
            cache[key] = compile_programs(mc, cfg, mesh, sampler, tokens)
        return cache[key]

    monkeypatch.setattr(P, "_compile_programs", cached)


def _output(capsys) -> tuple[dict, str]:
    out = capsys.readouterr().out
    first, _, table = out.partition("\n")
    return json.loads(first), table


def test_tiny_plan_fits_large_hbm_and_not_tiny_hbm(tmp_path, capsys, memo_compiles):
    cfg, mc = _tiny_config(tmp_path)
    assert P.plan_main(cfg, devices=8, hbm_gib=1000) == P.EXIT_FITS
    result, table = _output(capsys)
    assert result["fits"] is True and result["devices"] == 8
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["hbm_bytes"] == 1000 * P.GIB
    assert set(result["programs"]) == {"train", "prefill", "decode"}
    n = mc.num_params()
    assert result["params"] == result["trainable_params"] == n
    pd = result["per_device_bytes"]
    # Hand count: fp32 params split 8 ways; AdamW keeps two moments per param (+ step counters).
    assert pd["params"] == 4 * n // 8
    assert 2 * pd["params"] <= pd["optimizer"] <= 2 * pd["params"] + 64
    assert pd["total"] == pd["params"] + pd["optimizer"] + pd["activations"]
    assert pd["total"] == result["programs"]["train"]["total"] <= result["peak_bytes"]
    assert result["model_flops_per_step"] == 6 * n * 16 * 32
    assert result["flops_per_step"] > 0
    assert "FITS" in table and "params" in table

    assert P.plan_main(cfg, devices=8, hbm_gib=0.001) == P.EXIT_DOES_NOT_FIT
    small, table = _output(capsys)
    assert small["fits"] is False and small["peak_bytes"] == result["peak_bytes"]
    over = small["peak_bytes"] - small["hbm_bytes"]
    (line,) = [ln for ln in table.splitlines() if ln.startswith("DOES NOT FIT")]
    assert f"by {over / (1 << 20):.1f} MiB" in line


def test_lora_plan_trains_only_the_adapters(tmp_path):
    cfg, mc = _tiny_config(tmp_path, ["train.lora.rank=4", "train.lora.targets=[q,v]"])
    result = P.plan(cfg, 8, P.GIB, sampler=False)
    d, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    adapters = mc.num_layers * (4 * (d + mc.num_heads * mc.head_dim) + 4 * (d + kv))
    assert result["trainable_params"] == adapters
    assert result["params"] == mc.num_params() + adapters
    # Moments exist only for the adapters.
    assert result["per_device_bytes"]["optimizer"] <= 2 * 4 * adapters
    assert result["mode"] == "lora r=4" and set(result["programs"]) == {"train"}


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_layer_extrapolation_matches_a_full_compile(tmp_path, scan):
    overrides = ["model.compute_dtype=bfloat16"]
    # A scan of one layer compiles to no loop at all: extrapolate a scan from 2 and 4 layers.
    depth, low = (8, 2) if scan else (4, 1)
    if scan:
        overrides += ["train.scan_layers=true", "train.remat=true"]
    cfg, _ = _tiny_config(tmp_path, overrides, layers=depth)
    full = P.plan(cfg, 2, P.GIB, sampler=False)
    ext = P.plan(cfg, 2, P.GIB, sampler=False, layers=low)
    assert full["compiled_layers"] == [depth] and ext["compiled_layers"] == [low, 2 * low]
    assert ext["per_device_bytes"]["params"] == full["per_device_bytes"]["params"]
    f, e = full["programs"]["train"], ext["programs"]["train"]
    for key in ("argument", "output", "total"):
        assert e[key] == pytest.approx(f[key], rel=0.02), key
    if scan:  # a scanned body is costed once: the planner reports 6 * params * tokens
        assert full["flops_per_step"] == full["model_flops_per_step"]
    else:
        assert e["flops"] == pytest.approx(f["flops"], rel=0.02)


def test_bad_mesh_is_a_config_error(tmp_path):
    cfg, _ = _tiny_config(tmp_path, ["mesh.fsdp=3"])
    with pytest.raises(ConfigError, match="mesh"):
        P.plan(cfg, 8, P.GIB)
    cfg, _ = _tiny_config(tmp_path, ["train.batch_size=12"])
    with pytest.raises(ConfigError, match="batch_size 12"):
        P.plan(cfg, 8, P.GIB)


def test_subprocess_env_pins_the_device_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
    env = P._subprocess_env(16)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=16"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_NUM_CPU_DEVICES"] == "16"


# ----------------------------------------------------------------------------- slow: real sizes


def _run(args: list[str], devices: int) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=P._subprocess_env(devices),
                          capture_output=True, text=True, timeout=1800)
    first = proc.stdout.partition("\n")[0]
    assert first.startswith("{"), proc.stdout + proc.stderr[-3000:]
    return proc.returncode, json.loads(first), proc.stdout


@pytest.mark.slow
def test_launch_plan_flag_on_the_tiny_config(tmp_path):
    """`python -m gradual_jax.launch CONFIG --plan --devices N` end to end, in a fresh process."""
    cfg, _ = _tiny_config(tmp_path)
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(P.to_dict(cfg)))
    rc, result, out = _run(["-m", "gradual_jax.launch", str(path), "--plan", "--devices", "4",
                            "--hbm-gib", "0.0001"], devices=4)
    assert rc == P.EXIT_DOES_NOT_FIT and result["devices"] == 4 and "DOES NOT FIT" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_plan_on_16_devices(path):
    """The paper configs fit a TPU v5e-16 slice (16 GiB a chip; layers extrapolated from 2 and 4).

    Params per device must equal the hand count: fp32 params / 16 (every matrix has an embed or
    vocab dim that 16 divides; only q/k/v biases stay replicated, < 0.1%).
    """
    rc, result, _ = _run(["-m", "gradual_jax.plan", str(path), "--devices", "16", "--hbm-gib", "16",
                          "--layers", "2"], devices=16)
    assert rc == P.EXIT_FITS and result["fits"], result["per_device_bytes"]
    assert result["batch"]["scan_layers"] and result["batch"]["remat"]
    assert result["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert result["compiled_layers"] == [2, 4]
    base = P.resolve_model_config(load_config(path)).num_params()
    pd = result["per_device_bytes"]
    if result["trainable_params"] == result["params"]:  # full fine-tuning
        assert result["params"] == base
        assert pd["params"] == pytest.approx(4 * base / 16, rel=1e-3)
        assert pd["optimizer"] == pytest.approx(2 * pd["params"], rel=1e-3)
    else:  # LoRA: the base split 16 ways; adapters' rank dim is never sharded, some replicate
        adapters = result["params"] - base
        assert adapters == result["trainable_params"] > 0
        assert 4 * base / 16 <= pd["params"] <= 4 * base / 16 * 1.001 + 4 * adapters
        assert pd["optimizer"] <= 2 * 4 * adapters + 64
    assert result["model_flops_per_step"] == pytest.approx(6 * result["params"] * 128 * 128)
    assert math.isfinite(result["flops_per_step"])
    if os.environ.get("GRADUAL_JAX_PLAN_LOG"):
        with open(os.environ["GRADUAL_JAX_PLAN_LOG"], "a") as f:
            f.write(json.dumps(result) + "\n")
