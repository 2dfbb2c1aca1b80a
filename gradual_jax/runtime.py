"""The model-side functions the pipeline calls: probe engine, stage training, test accuracy,
stage snapshots. Kept apart from `pipeline.py` so the pipeline's control flow reads without JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from gradual_jax.config import RunConfig, TrainConfig
from gradual_jax.knowledge.data import QAExample
from gradual_jax.knowledge.match import answer_prefix_test, exact_match
from gradual_jax.knowledge.prompts import clean_answer, format_train_pair
from gradual_jax.sampling import Greedy, Sample, generate_batch, sampler_for
from gradual_jax.sampling.sampler import SharedShapes

STOP = ("\n",)
# Host or device bytes the probe's prefix store may take (per-layer keys and values in fp32),
# and the most prefixes it keeps (a probe has one per relation and prompt set).
PREFIX_STORE_BYTES = 768 * 2**20
PREFIX_STORE_MAX = 128
log = logging.getLogger("gradual_jax")


class JaxEngine:
    """The probe's `AnswerEngine` on our jitted sampler: exemplar blocks are declared prefixes,
    kept in the sampler's prefix store. ``process_local``: the mesh holds only this process's
    devices, so the probe may give this process questions of its own (`Probe.run(split=True)`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, mesh: Any = None,
                 process_local: bool = False, shapes: SharedShapes | None = None,
                 scan_layers: bool | None = None):
        """``shapes``: a run's shared sampler shapes, which `warm_up` starts from and grows.
        ``scan_layers``: the sampler's (None: the backend's default)."""
        self.sampler = sampler_for(model, tokenizer, mesh, scan_layers)
        self.batch_size = batch_size
        self.process_local = process_local
        self.shapes = shapes

    def warm_up(self, prompts: Sequence[tuple[str, str]], continuations: Sequence[str], *,
                max_new_tokens: int, n_samples: int, top_k: int) -> None:
        """Fix the sampler's shapes for these prompts, their answers and their gold
        continuations, and compile its programs ahead of time (logged)."""
        s = self.sampler
        if self.shapes is not None:
            self.shapes.apply(s)
        s.prepare_for([q for _, q in prompts], prefix=[p for p, _ in prompts], max_new_tokens=max_new_tokens,
                      continuations=continuations, batch_size=self.batch_size,
                      k_cap=top_k if n_samples else 0, stop=STOP)
        s.prepare(prefixes=probe_store_prefixes(s, len({p for p, _ in prompts})))
        if self.shapes is not None:
            self.shapes.record(s)
        made, seconds = s.warm_up()
        log.info("probe engine: %d programs compiled ahead of time in %.1f s (shapes %s)", made, seconds, s.shapes)

    def greedy(self, prompts: Sequence[tuple[str, str]], max_new_tokens: int) -> list[str]:
        gens = self.sampler.generate_batch([q for _, q in prompts], prefix=[p for p, _ in prompts],
                                           methods=Greedy(), max_new_tokens=max_new_tokens, stop=STOP,
                                           batch_size=self.batch_size)
        return [row[0].text for row in gens]

    def greedy_with_probability(self, prompts: Sequence[tuple[str, str]], max_new_tokens: int,
                                continuations: Sequence[Sequence[str]], *, temperature: float,
                                top_k: int) -> tuple[list[str], list[list[float]]]:
        """`greedy` and `answer_probability` of the same prompts in one pass: each prompt's
        continuations are scored against its tail while the greedy insert that prefilled it
        still holds its keys and values (`Sampler.generate_and_score`)."""
        gens, chances = self.sampler.generate_and_score([q for _, q in prompts], continuations,
                                                        prefix=[p for p, _ in prompts], methods=Greedy(),
                                                        max_new_tokens=max_new_tokens, stop=STOP,
                                                        temperature=temperature, top_k=top_k,
                                                        batch_size=self.batch_size)
        return [row[0].text for row in gens], chances

    def sample(self, prompts: Sequence[tuple[str, str]], n: int, seeds: Sequence[int], *,
               temperature: float, top_k: int, max_new_tokens: int,
               answers: Sequence[Sequence[str]] | None = None,
               first_answer_only: bool = False) -> list[list[str]]:
        alive = None if answers is None else [
            answer_prefix_test(a, first_only=first_answer_only) for a in answers]
        gens = self.sampler.generate_batch([q for _, q in prompts], prefix=[p for p, _ in prompts],
                                           methods=Sample(temperature, top_k), n=n,
                                           max_new_tokens=max_new_tokens, stop=STOP, seed=0,
                                           prompt_keys=list(seeds), batch_size=self.batch_size,
                                           alive=alive)
        return [[g.text for g in row] for row in gens]

    def answer_probability(self, prompts: Sequence[tuple[str, str]],
                           continuations: Sequence[Sequence[str]], *, temperature: float,
                           top_k: int, answered: bool = True) -> list[list[float]]:
        """`AnswerEngine.answer_probability`. `answered`: `greedy` just ran on these prompts, so
        the sampler's prefill tells which continuations no sample can start with and they are
        not scored; otherwise every continuation is scored (same chances, no prefill)."""
        questions, prefixes, conts, owner = [], [], [], []
        for r, ((prefix, suffix), cs) in enumerate(zip(prompts, continuations)):
            for c in cs:
                questions.append(suffix)
                prefixes.append(prefix)
                conts.append(c)
                owner.append(r)
        out: list[list[float]] = [[] for _ in prompts]
        if not questions:
            return out
        # right after `greedy` on the same prompts: the sampler skips continuations no sample
        # can start with. A sample is the answer when it ends there, at STOP or at an EOS.
        chances = self.sampler.sample_probability(questions, conts, prefix=prefixes, temperature=temperature,
                                                  top_k=top_k, batch_size=self.batch_size, stop=STOP,
                                                  skip_unreachable=answered)
        for r, p in zip(owner, chances):
            out[r].append(p)
        return out


def probe_store_prefixes(sampler: Any, blocks: int | None = None) -> int:
    """Prefixes the probe keeps stored at once: its exemplar blocks (None: unknown), at most
    PREFIX_STORE_MAX and as many as PREFIX_STORE_BYTES holds at the sampler's prefix width."""
    cfg = sampler.config
    row = 2 * cfg.num_layers * sampler.shapes.prefix_width * cfg.num_kv_heads * cfg.head_dim * 4
    budget = max(1, min(PREFIX_STORE_MAX, PREFIX_STORE_BYTES // row))
    return budget if blocks is None else min(blocks, budget)


def process_mesh(mesh: Any) -> Any:
    """The part of inference mesh ``mesh`` on this process's devices, as a mesh of its own:
    the replicas (rows of the ``data`` axis) whose devices all belong to this process. None
    with one process, or when a replica spans processes (then every process probes every
    question together on ``mesh``)."""
    import numpy as np
    from jax.sharding import Mesh

    if mesh is None or jax.process_count() == 1:
        return None
    me = jax.process_index()
    devices = np.asarray(mesh.devices)
    data = list(mesh.axis_names).index("data")
    rows = np.moveaxis(devices, data, 0)
    owned = [np.vectorize(lambda d: d.process_index == me)(row) for row in rows]
    if any(o.any() and not o.all() for o in owned):
        return None
    keep = [i for i, o in enumerate(owned) if o.all()]
    if not keep:
        return None
    local = np.moveaxis(rows[keep], 0, data)
    return Mesh(local, mesh.axis_names, axis_types=mesh.axis_types)


def process_local_model(model: Any, mesh: Any, local_mesh: Any) -> Any:
    """``model`` with its weights laid out for inference on ``local_mesh`` (this process's
    replicas of the global inference ``mesh``): resharded on ``mesh`` by the inference rules (a
    collective: every process calls it), then each process's shards re-wrapped as arrays of its
    own mesh, without a copy. The model's floating-point weights keep their dtype."""
    from gradual_jax.sharding import INFERENCE_RULES, place, state_shardings

    graphdef, state = nnx.split(model)
    placed = place(state, state_shardings(state, mesh, INFERENCE_RULES))

    def localize(x: jax.Array) -> jax.Array:
        sharding = jax.sharding.NamedSharding(local_mesh, x.sharding.spec)
        want = sharding.addressable_devices_indices_map(x.shape)
        by_device = {s.device: s for s in x.addressable_shards}
        arrays = []
        for device, index in want.items():
            shard = by_device[device]
            if _bounds(shard.index, x.shape) != _bounds(index, x.shape):  # meshes not nested as assumed
                raise RuntimeError(f"{device} holds {shard.index} of the inference layout, "
                                   f"its process's mesh expects {index}")
            arrays.append(shard.data)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)

    return nnx.merge(graphdef, jax.tree.map(localize, placed))


def split_over_processes(evaluate: Callable[[Any, Sequence[Any]], float], mesh: Any,
                         local_mesh: Any) -> Callable[[Any, Sequence[Any]], float]:
    """The dev evaluation ``evaluate`` (accuracy of a model on examples, run on ``local_mesh``)
    with the examples split over processes: each scores its block on its own replicas and the
    right answers are summed, so the accuracy is the whole set's (a collective)."""
    from gradual_jax.distributed import gather_records, shard_for_process

    def split(model: Any, examples: Sequence[Any]) -> float:
        if not examples:
            return float("nan")
        mine = shard_for_process(list(examples))
        local = process_local_model(model, mesh, local_mesh)
        right = round(evaluate(local, mine) * len(mine)) if mine else 0
        return sum(gather_records([right])) / len(examples)

    return split


def _bounds(index: tuple, shape: tuple) -> tuple:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def answers_correct(model: Any, tokenizer: Any, examples: Sequence[QAExample], template: str, *,
                    max_new_tokens: int = 24, batch_size: int = 64, mesh: Any = None,
                    shapes: SharedShapes | None = None, scan_layers: bool | None = None) -> dict[str, bool]:
    """Greedy exact match of the model's answer in the fine-tuning format, per example id
    (generated on ``mesh``, the run's inference mesh, when given, in ``shapes``, a run's shared
    sampler shapes, when given)."""
    prompts = [format_train_pair(e.question, "", template)[0] for e in examples]
    gens = generate_batch(model, tokenizer, prompts, mesh=mesh, shapes=shapes, scan_layers=scan_layers,
                          max_new_tokens=max_new_tokens, stop=STOP, batch_size=batch_size)
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
    from gradual_jax.distributed import barrier, on_main
    from gradual_jax.models.peft import STAGE_ADAPTER_DIR, adapter_from_model, save_adapter
    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.training.data import BatchShape, run_batch_shape, tokenize_examples
    from gradual_jax.training.lora import apply_lora, merge_lora
    from gradual_jax.training.metrics import MetricsWriter
    from gradual_jax.training.trainer import Trainer, make_dev_eval

    tokenizer = res.tokenizer
    base_config = res.model.config
    train_mesh, probe_mesh = res.train_mesh, res.probe_mesh

    local_mesh = process_mesh(probe_mesh)
    # Each process probing its own questions on its own replicas takes its share of the slot
    # batch, so a replica's batch is the single-process run's.
    probe_batch = cfg.probe.batch_size if local_mesh is None else cfg.probe.batch_size // jax.process_count()

    # Every probe, dev evaluation and test accuracy of the run grows one set of sampler shapes
    # and starts from it, so the run's samplers (one per stage model) share one set of programs.
    shapes = SharedShapes()
    scan = cfg.probe.scan_layers  # how every sampler of the run runs the layers

    def engine_factory(model: Any) -> JaxEngine:
        if local_mesh is None:
            return JaxEngine(model, tokenizer, batch_size=probe_batch, mesh=probe_mesh, shapes=shapes,
                             scan_layers=scan)
        return JaxEngine(process_local_model(model, probe_mesh, local_mesh), tokenizer,
                         batch_size=probe_batch, mesh=local_mesh, process_local=True, shapes=shapes,
                         scan_layers=scan)

    @functools.lru_cache(maxsize=None)
    def batch_shape_for(template: str, max_seq_len: int, batch_rows: int, packing: bool) -> BatchShape:
        toks = tokenize_examples(res.splits["train"], tokenizer, template=template, max_seq_len=max_seq_len)
        return run_batch_shape(toks, batch_rows=batch_rows, max_seq_len=max_seq_len, packing=packing)

    def stage_batch_shape(train_cfg: TrainConfig) -> BatchShape:
        # Batches shaped by the whole training set, tokenized once for the stages' settings:
        # every stage steps in one compiled shape.
        return batch_shape_for(train_cfg.template, int(train_cfg.max_seq_len),
                               int(train_cfg.batch_size) * int(train_cfg.grad_accum), bool(train_cfg.packing))

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
        # Dev accuracy as test accuracy (`accuracy_fn`) is measured: the probe's answer length
        # and slot batch, in the run's shared shapes (no second set of programs).
        dev_eval = make_dev_eval(tokenizer, train_cfg.template, mesh=local_mesh or probe_mesh,
                                 max_new_tokens=cfg.probe.max_new_tokens, batch_size=probe_batch,
                                 shapes=shapes, scan_layers=scan)
        if local_mesh is not None:
            dev_eval = split_over_processes(dev_eval, probe_mesh, local_mesh)
        manager = CheckpointManager(ckpt_dir, max_to_keep=2, async_save=not threaded_seeds,
                                    save_interval_seconds=60 * cfg.checkpoint.minutes)
        prefix = ""
        if wandb_run is not None and run_root is not None:
            prefix = Path(metrics_dir).relative_to(run_root).as_posix() + "/"
        with MetricsWriter(metrics_dir, wandb_run=wandb_run, tag_prefix=prefix) as metrics:
            result = trainer.fit(examples, dev, train_cfg, eval_fn=dev_eval, checkpoint_manager=manager,
                                 metrics=metrics, batch_shape=stage_batch_shape(train_cfg))
        if train_cfg.lora.rank > 0:
            # The stage's adapter, against the model it started from, for gradual_jax.export.
            # Every process gathers it (adapters may be sharded over hosts); process 0 writes.
            adapter = adapter_from_model(work, base_model=res.model_id, dropout=train_cfg.lora.dropout)
            if jax.process_index() == 0:
                save_adapter(adapter, Path(metrics_dir) / STAGE_ADAPTER_DIR)
            merge_lora(work)
        curve = on_main(lambda: _curve(Path(metrics_dir)))  # process 0 wrote the metrics
        info = {"steps": result.steps, "best_epoch": result.best_epoch, "epochs": result.epochs,
                "dev_accuracy": [h.get("dev_accuracy") for h in result.history],
                "final_loss": result.final_loss, "train_seconds": result.seconds, "curve": curve,
                "train_state_bytes_per_device": result.state_bytes_per_device}
        return work, info

    def accuracy_fn(model: Any, examples: Sequence[QAExample], template: str) -> dict[str, bool]:
        if local_mesh is None:
            return answers_correct(model, tokenizer, examples, template, mesh=probe_mesh,
                                   max_new_tokens=cfg.probe.max_new_tokens, batch_size=probe_batch,
                                   shapes=shapes, scan_layers=scan)
        from gradual_jax.distributed import gather_records, shard_for_process

        local = process_local_model(model, probe_mesh, local_mesh)
        mine = answers_correct(local, tokenizer, shard_for_process(examples), template, mesh=local_mesh,
                               max_new_tokens=cfg.probe.max_new_tokens, batch_size=probe_batch, shapes=shapes,
                               scan_layers=scan)
        return dict(gather_records(list(mine.items())))

    def save_params(directory: Path, model: Any) -> None:
        # A snapshot cut short by a kill is never read, so it is replaced: process 0 removes
        # it before any process starts writing the new one.
        on_main(lambda: shutil.rmtree(directory) if directory.exists() else None)
        barrier("snapshot-cleared")
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
