"""`python -m gradual_jax.bench device` on this CPU: the smoke world's model for the probe part, the
tiny Qwen2-family architecture for the decode and train parts."""

from __future__ import annotations

import json
import math

import pytest

from gradual_jax import bench
from gradual_jax.bench_device import device_spec


def test_device_specs_pick_the_longest_matching_kind():
    assert device_spec("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert device_spec("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert device_spec("TPU v5 lite") == (197.0, 819.0)
    assert device_spec("cpu") == (None, None)


def test_bench_device_runs_every_part(smoke_world, tmp_path, capsys):
    out = tmp_path / "device.json"
    qa = smoke_world.root / "qa" / "train.jsonl"
    argv = ["device", "--model", str(smoke_world.model_dir), "--data", str(qa), "--relations", "P19,P27",
            "--per-relation", "2", "--arch", "tiny", "--slots", "8", "--prompt-tokens", "32",
            "--new-tokens", "32", "--train-layers", "1", "--train-batch", "2", "--train-seq", "32",
            "--train-steps", "2", "--hbm-gbps", "50", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "device" and set(record["part_seconds"]) == {"probe", "decode", "train"}

    probe = record["probe"]
    assert probe["warm_categories_equal_cold"]
    for run in (probe["cold"], probe["warm"]):
        assert run["questions"] == 4 and run["compiles"] > 0 and run["wall_seconds"] >= run["seconds"]

    decode = record["decode"]
    assert decode["compiles"] == 6 and decode["compiles_after_warmup"] == 0
    assert decode["new_tokens"] == [8, 32] and decode["layers"] == 2
    assert math.isfinite(decode["tokens_per_s"]) and decode["hbm_gbps"] == 50
    # bytes per step: bf16 weights plus each row's KV cache (2 layers, k and v, 2 kv heads x 16)
    weights = decode["params"] * 2
    kv = 8 * (decode["prompt_tokens"] + 20) * 2 * 2 * 2 * 16 * 2
    assert decode["bytes_per_step"] == pytest.approx(weights + kv, rel=1e-4)  # prompt_tokens is rounded
    # the same figures with the sampler's layers scanned
    scan = decode["scan"]
    assert not decode["scan_layers"] and scan["scan_layers"]
    assert scan["compiles"] == 6 and scan["compiles_after_warmup"] == 0 and scan["bytes_per_step"] == decode["bytes_per_step"]
    assert decode["scan_over_unrolled_tokens_per_s"] == pytest.approx(scan["tokens_per_s"] / decode["tokens_per_s"])

    train = record["train"]
    assert train["layers"] == 1 and train["step_seconds"] > 0 and len(train["step_seconds_all"]) == 2
    assert 0 < train["mfu_of_measured_matmul"] and "mfu" not in train  # no spec peak for a CPU


def test_bench_device_refuses_bad_parts_and_architectures():
    from gradual_jax.bench_device import arch_config

    with pytest.raises(SystemExit, match="unknown parts"):
        bench.main(["device", "--model", "m.gguf", "--skip", "probe,warp"])
    with pytest.raises(SystemExit, match="unknown"):
        arch_config("gpt-9", None, dtype="bfloat16", param_dtype="bfloat16")
    qwen = arch_config("qwen2-7b", 2, dtype="bfloat16", param_dtype="float32")
    assert (qwen.num_layers, qwen.hidden_size, qwen.num_kv_heads, qwen.dtype) == (2, 3584, 4, "bfloat16")
