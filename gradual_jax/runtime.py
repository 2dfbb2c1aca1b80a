"""The model-side functions the pipeline calls: probe engine, stage training, test accuracy,
stage snapshots. Kept apart from `pipeline.py` so the pipeline's control flow reads without JAX.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from gradual_jax.config import RunConfig, TrainConfig
from gradual_jax.knowledge.data import QAExample
from gradual_jax.knowledge.match import exact_match
from gradual_jax.knowledge.prompts import clean_answer, format_train_pair
from gradual_jax.sampling import Greedy, Sample, sampler_for

STOP = ("\n",)


class JaxEngine:
    """The probe's `AnswerEngine` on our jitted sampler (shared prefixes prefilled once)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, mesh: Any = None):
        self.sampler = sampler_for(model, tokenizer, mesh)
        self.batch_size = batch_size

    def greedy(self, prefix: str, suffixes: Sequence[str], max_new_tokens: int) -> list[str]:
        gens = self.sampler.generate_batch(list(suffixes), prefix=prefix, methods=Greedy(),
                                           max_new_tokens=max_new_tokens, stop=STOP,
                                           batch_size=self.batch_size)
        return [row[0].text for row in gens]

    def sample(self, prefix: str, suffixes: Sequence[str], n: int, seeds: Sequence[int], *,
               temperature: float, top_k: int, max_new_tokens: int) -> list[list[str]]:
        gens = self.sampler.generate_batch(list(suffixes), prefix=prefix,
                                           methods=Sample(temperature, top_k), n=n,
                                           max_new_tokens=max_new_tokens, stop=STOP, seed=0,
                                           prompt_keys=list(seeds),
                                           batch_size=max(self.batch_size, n))
        return [[g.text for g in row] for row in gens]

    def answer_probability(self, prefix: str, suffixes: Sequence[str],
                           continuations: Sequence[Sequence[str]], *, temperature: float,
                           top_k: int) -> list[list[float]]:
        prompts, conts, owner = [], [], []
        for r, (suffix, cs) in enumerate(zip(suffixes, continuations)):
            for c in cs:
                prompts.append(prefix + suffix)
                conts.append(c)
                owner.append(r)
        scores = self.sampler.score(prompts, conts, temperature=temperature, top_k=top_k,
                                    batch_size=self.batch_size)
        out: list[list[float]] = [[] for _ in suffixes]
        for r, s in zip(owner, scores):
            out[r].append(math.exp(sum(s.logprobs)) if s.logprobs else 0.0)
        return out


def answers_correct(model: Any, tokenizer: Any, examples: Sequence[QAExample], template: str, *,
                    max_new_tokens: int = 24, batch_size: int = 64, mesh: Any = None) -> dict[str, bool]:
    """Greedy exact match of the model's answer in the fine-tuning format, per example id
    (generated on ``mesh``, the run's inference mesh, when given)."""
    prompts = [format_train_pair(e.question, "", template)[0] for e in examples]
    gens = sampler_for(model, tokenizer, mesh).generate_batch(prompts, max_new_tokens=max_new_tokens,
                                                              stop=STOP, batch_size=batch_size)
    return {e.id: bool(exact_match(clean_answer(g[0].text), list(e.answers)))
            for e, g in zip(examples, gens)}


def _epochs_for_budget(cfg: TrainConfig, n_examples: int, max_steps: int) -> int:
    """Epochs whose steps come closest to `max_steps` (the one-stage arm's equal budget)."""
    per_epoch = max(1, math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum)))
    return max(1, round(max_steps / per_epoch))


def make_runtime(cfg: RunConfig, res: Any, *, threaded_seeds: bool = False, run_root: Path | None = None,
                 wandb_run: Any = None) -> dict[str, Any]:
    """The callables `pipeline.SeedRun` takes, bound to this run's tokenizer, settings and meshes:
    stages train on ``res.train_mesh`` and their models stay there; probes, dev evaluation and
    test accuracy run on ``res.probe_mesh`` (weights resharded for inference).

    ``wandb_run``: a W&B run every stage's scalars also go to, tagged by the stage directory's
    path below ``run_root`` (``seed_0/two_stage/stage1/loss``).
    ``threaded_seeds``: seeds will call these from several threads at once, so checkpoints are
    saved synchronously (see `checkpoint.ORBAX_LOCK`).
    """
    from gradual_jax.checkpoint import CheckpointManager, model_digest, restore_model_params, save_model_params
    from gradual_jax.models.peft import STAGE_ADAPTER_DIR, adapter_from_model, save_adapter
    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.training.lora import apply_lora, merge_lora
    from gradual_jax.training.metrics import MetricsWriter
    from gradual_jax.training.trainer import Trainer, make_dev_eval

    tokenizer = res.tokenizer
    base_config = res.model.config
    train_mesh, probe_mesh = res.train_mesh, res.probe_mesh

    def engine_factory(model: Any) -> JaxEngine:
        return JaxEngine(model, tokenizer, batch_size=cfg.probe.batch_size, mesh=probe_mesh)

    def trainer_fn(model: Any, examples: Sequence[QAExample], dev: Sequence[QAExample],
                   train_cfg: TrainConfig, *, ckpt_dir: Path, seed: int, metrics_dir: Path,
                   max_steps: int | None = None) -> tuple[Any, dict]:
        if max_steps is not None:
            train_cfg = dataclasses.replace(
                train_cfg, epochs=_epochs_for_budget(train_cfg, len(examples), max_steps))
        # The train step donates its buffers: train a copy whose arrays are its own, so the
        # model of the previous stage (or the base model other arms start from) survives.
        work = nnx.clone(model)
        nnx.update(work, jax.tree.map(lambda x: x.copy(), nnx.state(work)))
        if train_cfg.lora.rank > 0:
            apply_lora(work, train_cfg.lora.rank, train_cfg.lora.alpha, train_cfg.lora.targets, seed=seed)
        trainer = Trainer(work, tokenizer, mesh=train_mesh, seed=seed, progress=True)
        dev_eval = make_dev_eval(tokenizer, train_cfg.template, mesh=probe_mesh)
        manager = CheckpointManager(ckpt_dir, max_to_keep=2, async_save=not threaded_seeds)
        prefix = ""
        if wandb_run is not None and run_root is not None:
            prefix = Path(metrics_dir).relative_to(run_root).as_posix() + "/"
        with MetricsWriter(metrics_dir, wandb_run=wandb_run, tag_prefix=prefix) as metrics:
            result = trainer.fit(examples, dev, train_cfg, eval_fn=dev_eval, checkpoint_manager=manager,
                                 metrics=metrics)
        if train_cfg.lora.rank > 0:
            # The stage's adapter, against the model it started from, for gradual_jax.export.
            # Every process gathers it (adapters may be sharded over hosts); process 0 writes.
            adapter = adapter_from_model(work, base_model=res.model_id, dropout=train_cfg.lora.dropout)
            if jax.process_index() == 0:
                save_adapter(adapter, Path(metrics_dir) / STAGE_ADAPTER_DIR)
            merge_lora(work)
        curve = _curve(Path(metrics_dir))
        info = {"steps": result.steps, "best_epoch": result.best_epoch, "epochs": result.epochs,
                "dev_accuracy": [h.get("dev_accuracy") for h in result.history],
                "final_loss": result.final_loss, "train_seconds": result.seconds, "curve": curve,
                "train_state_bytes_per_device": result.state_bytes_per_device}
        return work, info

    def accuracy_fn(model: Any, examples: Sequence[QAExample], template: str) -> dict[str, bool]:
        return answers_correct(model, tokenizer, examples, template, mesh=probe_mesh,
                               max_new_tokens=cfg.probe.max_new_tokens, batch_size=cfg.probe.batch_size)

    def save_params(directory: Path, model: Any) -> None:
        if directory.exists():  # a snapshot cut short by a kill: never read, so replace it
            shutil.rmtree(directory)
        save_model_params(directory, model)

    def load_params(directory: Path) -> Any:
        return restore_model_params(directory, abstract_model(base_config), mesh=train_mesh)

    return {"engine_factory": engine_factory, "trainer_fn": trainer_fn,
            "accuracy_fn": accuracy_fn, "params_io": (save_params, load_params),
            "model_digest": model_digest}


def _curve(metrics_dir: Path) -> list[dict]:
    """Loss and learning rate per step from the trainer's metrics JSONL (every step kept)."""
    import json

    by_step: dict[int, dict] = {}  # a resumed run rewrites the steps after its checkpoint
    path = metrics_dir / "metrics.jsonl"
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "step" in rec:
            by_step[rec["step"]] = {"step": rec["step"], "loss": rec["loss"], "lr": rec.get("lr")}
    return [by_step[s] for s in sorted(by_step)]
