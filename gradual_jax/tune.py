"""Choose a run's learning rate on dev: train the run's first stage of one seed at several rates
and compare their dev accuracy epoch by epoch. Test examples are never probed nor scored.

    python -m gradual_jax.tune CONFIG [key=value ...] --lrs 3e-5,1e-4,3e-4 [--seed 0] [--stage0 PATH]

The stage trains exactly as the run's two-stage arm trains its first stage (the same examples,
picked by the same rule and seed from the seed's stage-0 train categories, the same trainer,
batch shapes, data order and early stopping on the run's dev questions), so the rate with the
best dev accuracy at its selected epoch is the one the run's own early stopping would keep best.
The stage-0 records come from ``--stage0`` (any run's ``seed_<s>/stage0/train.jsonl`` of the
same model, data and probe settings) or are probed here. Everything goes to
``<run_dir>/<name>-lr/`` (resumable: a finished rate is not trained again):

    <run_dir>/<name>-lr/seed_<s>/stage0/train.jsonl    the probe, when --stage0 is not given
    <run_dir>/<name>-lr/lr_<rate>/                     the rate's metrics and checkpoints
    <run_dir>/<name>-lr/lr_<rate>.json                 its dev accuracy per epoch, steps, seconds
    <run_dir>/<name>-lr/lr.json                        every rate and the one chosen
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradual_jax.config import RunConfig, stage_train_config
from gradual_jax.errors import UserError

log = logging.getLogger("gradual_jax")


class TuneError(UserError):
    """Bad input to the tuner: its rates or its stage-0 records."""


def best_rate(results: dict[str, dict]) -> str:
    """The rate (a key of ``results``) whose selected epoch scored the best dev accuracy; among
    equals the smallest rate (the gentler change to the model)."""
    def score(item: tuple[str, dict]) -> tuple[float, float]:
        accuracy = item[1]["best_dev_accuracy"]
        return (-1.0 if accuracy is None else accuracy, -float(item[0]))

    return max(results.items(), key=score)[0]


def _rate_key(lr: float) -> str:
    return f"{lr:g}"


def tune_lr(cfg: RunConfig, lrs: Sequence[float], *, seed: int = 0, stage0: Path | None = None,
            shipped_config: str | None = None) -> dict[str, Any]:
    """Train the run's first stage of ``seed`` at each rate of ``lrs`` (``cfg.stages[0]``'s
    ``lr_scale`` still applies) and return ``{"rates": {rate: result}, "chosen": rate, ...}``,
    also written to ``<run_dir>/<name>-lr/lr.json``."""
    from gradual_jax import curriculum
    from gradual_jax.knowledge.compare import read_records
    from gradual_jax.launch import load_resources, prepare_run_dir
    from gradual_jax.pipeline import SeedRun, by_category, done_json, stage_seed, write_json
    from gradual_jax.runtime import make_runtime

    tune_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-lr")
    root = prepare_run_dir(tune_cfg)
    res = load_resources(cfg, shipped_config=shipped_config)
    runtime = make_runtime(cfg, res, run_root=root)
    seed_run = SeedRun(cfg, res, seed, root / f"seed_{seed}", **runtime)
    if stage0 is None:
        seed_run.warm_up_probes()
        records = seed_run.probe(res.model, "train", root / f"seed_{seed}" / "stage0" / "train.jsonl")
    else:
        records = list(read_records(stage0).values())
    category = by_category(records)
    missing = [i for i in seed_run.train_ids if i not in category]
    if missing:
        raise TuneError(f"{stage0}: no stage-0 record for {len(missing)} of the run's "
                         f"{len(seed_run.train_ids)} train examples (first: {missing[0]})")
    state0 = curriculum.initial_state([{"id": i, "category": category[i]} for i in seed_run.train_ids])
    stage_cfg = cfg.stages[0]
    ids = curriculum.select(state0, stage_cfg.spec(), rng=stage_seed(seed, 0))
    examples = [seed_run.by_id[i] for i in ids]
    base = stage_train_config(cfg, stage_cfg)
    results: dict[str, dict] = {}
    for lr in lrs:
        key = _rate_key(lr)
        path = root / f"lr_{key}.json"
        done = done_json(path)
        if done is None:
            train_cfg = dataclasses.replace(base, lr=lr * stage_cfg.lr_scale)
            t0 = time.time()
            _, info = runtime["trainer_fn"](res.model, examples, seed_run.selection_dev, train_cfg,
                                            ckpt_dir=root / f"lr_{key}" / "ckpt", seed=stage_seed(seed, 0),
                                            metrics_dir=root / f"lr_{key}")
            accuracy = info["dev_accuracy"]
            best = accuracy[info["best_epoch"] - 1] if info["best_epoch"] and accuracy else None
            done = {"lr": lr, "stage_lr": train_cfg.lr, "dev_accuracy": accuracy,
                    "best_epoch": info["best_epoch"], "best_dev_accuracy": best, "epochs": info["epochs"],
                    "steps": info["steps"], "final_loss": info["final_loss"],
                    "train_seconds": info["train_seconds"], "wall_seconds": time.time() - t0}
            write_json(path, done)
        results[key] = done
    summary = {"seed": seed, "stage": stage_cfg.name, "examples": len(examples),
               "stage0_counts": curriculum.category_counts(state0),
               "dev_questions": len(seed_run.selection_dev), "dev_eval_size": base.dev_eval_size,
               "rates": results, "chosen": best_rate(results),
               "stage0": str(stage0) if stage0 is not None else "probed here"}
    write_json(root / "lr.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The rates' dev accuracy per epoch, one line each, the chosen one marked."""
    lines = [f"stage {summary['stage']} of seed {summary['seed']}: {summary['examples']} examples, "
             f"dev accuracy per epoch (selected epoch in brackets)"]
    for key, r in summary["rates"].items():
        accs = " ".join(f"[{a:.3f}]" if i + 1 == r["best_epoch"] else f"{a:.3f}"
                        for i, a in enumerate(x if x is not None else float("nan") for x in r["dev_accuracy"]))
        mark = "  <- chosen" if key == summary["chosen"] else ""
        lines.append(f"  lr {key:>8}: {accs}  ({r['steps']} steps, {r['wall_seconds']:.0f} s){mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for bad input (one line on stderr); anything else is an internal
    failure and raises."""
    from gradual_jax.config import load_config
    from gradual_jax.errors import USER_ERRORS
    from gradual_jax.launch import resolve_config_path, shipped_name
    from gradual_jax.xla_cache import enable_compilation_cache
    from gradual_jax.xla_flags import apply_xla_flags

    apply_xla_flags()
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="CONFIG (first, optional) then key=value overrides")
    parser.add_argument("--lrs", required=True, help="comma-separated learning rates, e.g. 3e-5,1e-4,3e-4")
    parser.add_argument("--seed", type=int, default=0, help="the run seed whose first stage is trained")
    parser.add_argument("--stage0", type=Path, default=None,
                        help="stage-0 train records to select from (default: probe them here)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress logs")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    config = ns.args.pop(0) if ns.args and "=" not in ns.args[0] else None
    try:
        try:
            lrs = [float(x) for x in ns.lrs.split(",") if x.strip()]
        except ValueError:
            lrs = []
        if not lrs or any(lr <= 0 for lr in lrs):
            raise TuneError(f"--lrs: positive learning rates wanted, got {ns.lrs!r}")
        path = resolve_config_path(config)
        cfg = load_config(path, ns.args)
        enable_compilation_cache()
        summary = tune_lr(cfg, lrs, seed=ns.seed, stage0=ns.stage0, shipped_config=shipped_name(path))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    from gradual_jax.runlog import exit_process

    exit_process(main())
