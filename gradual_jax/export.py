"""`python -m gradual_jax.export RUN_DIR --seed S --arm A --stage K OUT_DIR`: a run's model out.

OUT_DIR becomes a Hugging Face directory of the stage's model (adapters merged) that
`AutoModelForCausalLM.from_pretrained` loads as the same architecture: `config.json`, the
tokenizer's files, `model.safetensors` or shards with an index above `--max-shard-size`. For a
LoRA run it also holds the adapters in PEFT's layout:

    OUT_DIR/adapters/<stage>/   each stage's own adapter, onto the model that stage started from
    OUT_DIR/adapter/            the stages up to K in one adapter (ranks summed) onto the base
    OUT_DIR/base/               the base model, when the run's source is not an HF directory
                                or Hub repo (the synthetic world, a GGUF file) so peft can load it
    OUT_DIR/EXPORT.md, export.json   which is which, and which base each adapter applies to

Defaults: the run's first seed, the two_stage arm, the arm's last stage that trained. A run's
`export` section (`ExportConfig`) exports one stage when the run ends (`export_after_run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradual_jax import io
from gradual_jax.configlib import ConfigError, parse_size, require

log = logging.getLogger("gradual_jax")
RECORD_FILE = "export.json"
README_FILE = "EXPORT.md"
DEFAULT_ARM = "two_stage"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export a stage's model as a Hugging Face directory when the run ends (see
    ``python -m gradual_jax.export`` to export any stage of a finished run)."""

    enabled: bool = False
    """Export when the run ends."""
    seed: int | None = None
    """Seed whose model is exported (default: the first of ``seeds``)."""
    arm: str = "two_stage"
    """Arm whose model is exported."""
    stage: str | None = None
    """Stage whose model is exported (default: the arm's last stage)."""
    dir: str | None = None
    """Output directory (default: ``<run>/export/seed_<s>/<arm>/<stage>``)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard, e.g. 5GB or 500MB; bigger checkpoints are split with an index."""

    def __post_init__(self) -> None:
        require(bool(self.arm), "arm", "must not be empty")
        require(self.stage is None or bool(self.stage), "stage", "must not be empty (omit it for "
                "the arm's last stage)")
        try:
            parse_size(self.max_shard_size)
        except ValueError as err:
            raise ConfigError(str(err), "max_shard_size") from None


def _error(message: str) -> Exception:
    from gradual_jax.pipeline import PipelineError

    return PipelineError(message)


# --------------------------------------------------------------------------------------------
# Which stage of which run


@dataclasses.dataclass(frozen=True)
class StageRef:
    """A trained stage of a run: `chain` lists the arm's trained stages up to and including it,
    in order (each started from the previous one's model, the first from the base model)."""

    root: Path
    cfg: Any
    seed: int
    arm: str
    stage: str
    chain: tuple[str, ...]

    def stage_dir(self, name: str) -> Path:
        return self.root / f"seed_{self.seed}" / self.arm / name


def arm_stages(cfg: Any, arm: str) -> list[tuple[str, Any]]:
    """(name, StageConfig) of every stage `arm` can run, in order (as `pipeline.SeedRun.run_arm`
    names them): two_stage runs ``cfg.stages`` then up to ``max_extra_stages`` more repeating the
    last one; every other arm one ``stage1`` built on the first stage's training settings."""
    if arm != DEFAULT_ARM:
        return [("stage1", cfg.stages[0])]
    stages = [(s.name, s) for s in cfg.stages]
    n = len(stages)
    return stages + [(f"stage{k + 1}", cfg.stages[-1]) for k in range(n, n + cfg.max_extra_stages)]


def _trained(stage_dir: Path) -> bool:
    return (stage_dir / "stage.json").is_file() and (stage_dir / "params" / "model.json").is_file()


def _arm_summary(arm_dir: Path) -> dict[str, dict]:
    """Stage name -> its entry in the finished arm's `arm.json` (empty while the arm runs)."""
    path = arm_dir / "arm.json"
    try:
        return {s["name"]: s for s in json.loads(path.read_text())["stages"]} if path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _not_trained(cfg: Any, seed: int, arm: str, stage: str, arm_dir: Path) -> Exception:
    where = f"stage {stage} of arm {arm} (seed {seed})"
    done = _arm_summary(arm_dir)
    if done.get(stage, {}).get("skipped"):
        return _error(f"{where} was skipped: nothing was selected for it, so it has no model of "
                      f"its own (its model is the previous stage's)")
    if (arm_dir / "arm.json").is_file():
        return _error(f"{where} did not run: the curriculum stopped before it")
    return _error(f"{where} has not been trained yet (no {arm_dir / stage / 'params'})")


def locate(root: str | Path, cfg: Any, *, seed: int | None = None, arm: str = DEFAULT_ARM,
           stage: str | None = None) -> StageRef:
    """The trained stage `stage` (default: the last that trained) of `arm` and `seed` (default:
    the first of the run's seeds) in run directory `root` with config `cfg`. Raises
    `PipelineError` in one line for a seed, arm or stage the run does not have, a stage that was
    skipped or has not trained yet."""
    root = Path(root).absolute()  # adapters and the record name paths under it
    seed = cfg.seeds[0] if seed is None else seed
    if seed not in cfg.seeds:
        raise _error(f"seed {seed}: not a seed of the run in {root} (seeds: "
                     f"{', '.join(map(str, cfg.seeds))})")
    if arm not in cfg.arms:
        raise _error(f"arm {arm!r}: not an arm of the run in {root} (arms: {', '.join(cfg.arms)})")
    arm_dir = root / f"seed_{seed}" / arm
    names = [name for name, _ in arm_stages(cfg, arm)]
    trained = [name for name in names if _trained(arm_dir / name)]
    if stage is None:
        if not trained:
            raise _error(f"arm {arm} of seed {seed} in {root} has no trained stage yet")
        stage = trained[-1]
    elif stage not in names:
        raise _error(f"stage {stage!r}: arm {arm} has stages {', '.join(names)}")
    elif stage not in trained:
        raise _not_trained(cfg, seed, arm, stage, arm_dir)
    chain = tuple(trained[: trained.index(stage) + 1])
    return StageRef(root=root, cfg=cfg, seed=seed, arm=arm, stage=stage, chain=chain)


def load_run_config(run_dir: str | Path) -> Any:
    """The RunConfig saved in `run_dir/config.yaml`; PipelineError when it is not a run dir."""
    from gradual_jax.config import load_config

    root = Path(run_dir)
    if not root.is_dir():
        raise _error(f"{root}: no such run directory")
    if not (root / "config.yaml").is_file():
        raise _error(f"{root}: not a run directory (no config.yaml)")
    return load_config(root / "config.yaml")


# --------------------------------------------------------------------------------------------
# The base model


@dataclasses.dataclass(frozen=True)
class BaseSource:
    """The run's base model: `path` is what `load_model` and `load_tokenizer` take; `ref` names it
    in an adapter's `base_model_name_or_path` (None: peft cannot load it, so export it)."""

    kind: str  # "world", "gguf", "hf" (a local directory) or "hub" (a repo id)
    path: str
    ref: str | None


def base_source(cfg: Any) -> BaseSource:
    """Where the run's base model comes from (`model.source`, `pkg:` and the world resolved)."""
    from gradual_jax.models import resolve_model_source

    source = resolve_model_source(cfg.model.source)
    if source == "world":
        from gradual_jax.launch import world_artifacts

        return BaseSource("world", str(world_artifacts(cfg, progress=False).model_dir), None)
    if source.endswith(".gguf"):
        return BaseSource("gguf", source, None)
    local = Path(source).expanduser()
    if local.is_dir():
        return BaseSource("hf", str(local.resolve()), str(local.resolve()))
    return BaseSource("hub", source, source)


def base_config(cfg: Any, base: BaseSource) -> Any:
    """The `ModelConfig` the run's models were built with (as `launch.load_resources` loads)."""
    from gradual_jax.models import read_model_config

    return read_model_config(base.path).replace(param_dtype=cfg.model.dtype,
                                                dtype=cfg.model.compute_dtype)


# --------------------------------------------------------------------------------------------
# Writing


def _prepare_out(out: Path) -> None:
    """`out` empty, new, or a previous export (whose parts are replaced); else PipelineError."""
    if out.exists() and not out.is_dir():
        raise _error(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise _error(f"{out}: exists and holds files that are not an export; choose a new or "
                     f"empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD_FILE).unlink(missing_ok=True)  # an interrupted re-export is not complete
    for part in ("adapter", "adapters", "base"):
        if (out / part).is_dir():
            shutil.rmtree(out / part)


def _stage_lora(ref: StageRef, name: str) -> Any:
    """The stage's LoRA settings (rank 0: full fine-tuning)."""
    from gradual_jax.config import stage_train_config

    return stage_train_config(ref.cfg, dict(arm_stages(ref.cfg, ref.arm))[name]).lora


def _export_command(ref: StageRef, stage: str) -> str:
    return (f"python -m gradual_jax.export {ref.root} --seed {ref.seed} --arm {ref.arm} "
            f"--stage {stage} DIR")


def default_export_dir(root: str | Path, seed: int, arm: str, stage: str) -> Path:
    """Where a run's export of one stage goes unless told otherwise."""
    return Path(root) / "export" / f"seed_{seed}" / arm / stage


def _write_adapters(ref: StageRef, out: Path, base_ref: str, notes: list[str]) -> dict[str, Any]:
    """`adapters/<stage>/` per LoRA stage of the chain and, when every stage of it is LoRA,
    `adapter/` combining them onto the base. Returns the record's adapter entries."""
    from gradual_jax.models.peft import STAGE_ADAPTER_DIR, combine_adapters, read_adapter, save_adapter

    record: dict[str, Any] = {"adapters": {}, "adapter": None}
    adapters = []
    for i, name in enumerate(ref.chain):
        lora = _stage_lora(ref, name)
        src = ref.stage_dir(name) / STAGE_ADAPTER_DIR
        if lora.rank == 0:
            notes.append(f"{name} fine-tuned every weight (no LoRA): it has no adapter")
            continue
        if not src.is_dir():
            notes.append(f"{name}: no adapter saved in {src} (the run predates adapter saving)")
            continue
        prev = ref.chain[i - 1] if i else None
        onto = base_ref if prev is None else str(default_export_dir(ref.root, ref.seed, ref.arm, prev))
        adapter = read_adapter(src).replace(base_model=onto)
        save_adapter(adapter, out / "adapters" / name)
        adapters.append(adapter)
        record["adapters"][name] = {
            "dir": f"adapters/{name}", "rank": adapter.rank, "alpha": adapter.alpha,
            "applies_to": "base" if prev is None else prev, "base_model_name_or_path": onto}
    if adapters and len(adapters) == len(ref.chain):
        combined = combine_adapters(adapters, base_model=base_ref)
        save_adapter(combined, out / "adapter")
        record["adapter"] = {"dir": "adapter", "rank": combined.rank, "alpha": combined.alpha,
                             "stages": list(ref.chain), "applies_to": "base",
                             "base_model_name_or_path": base_ref}
    elif adapters:
        notes.append("no combined adapter/: not every stage up to this one has an adapter")
    return record


def _write_lora(ref: StageRef, out: Path, base: BaseSource, tokenizer: Any,
                max_shard_size: int | str, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapters and, when some apply to a base peft cannot load by name (the world's
    model, a GGUF file), the base model as `base/`. Returns the record's adapter entries and
    its base entry."""
    from gradual_jax.models import load_model, save_hf

    exported = base.ref is None
    adapters = _write_adapters(ref, out, str((out / "base").resolve()) if exported else base.ref,
                               notes)
    onto_base = adapters["adapter"] or any(a["applies_to"] == "base"
                                           for a in adapters["adapters"].values())
    if not (exported and onto_base):
        return adapters, {"dir": None, "path": base.ref, "kind": base.kind}
    cfg = ref.cfg
    model = load_model(base.path, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype)
    save_hf(model, out / "base", tokenizer=tokenizer, max_shard_size=max_shard_size)
    return adapters, {"dir": "base", "path": str((out / "base").resolve()), "kind": base.kind}


def _readme(ref: StageRef, record: dict[str, Any]) -> str:
    """EXPORT.md: what each part of the export is and what each adapter applies to."""
    lines = [f"# Export: {ref.root.name}, seed {ref.seed}, arm {ref.arm}, stage {ref.stage}", "",
             f"Run directory: `{ref.root}`; model source `{record['source']}` "
             f"({record['dtype']}); stages trained up to here: {', '.join(ref.chain)}.", "",
             f"- `./` ({', '.join(record['weights'])}, config.json, tokenizer files): the model "
             f"after {ref.stage}" + (", adapters merged" if record["lora"] else "")
             + "; `AutoModelForCausalLM.from_pretrained(dir)`."]
    base = record["base"]
    if base["dir"]:
        lines.append(f"- `{base['dir']}/`: the base model the run started from (model.source "
                     f"`{record['source']}`), as a Hugging Face directory for peft to load.")
    combined = record["adapter"]
    if combined:
        lines.append(f"- `adapter/`: one LoRA adapter (rank {combined['rank']}, the stages' ranks "
                     f"summed) onto the base `{base['path']}`; "
                     f"`PeftModel.from_pretrained(base_model, 'adapter')` computes `./`.")
    for name, entry in record["adapters"].items():
        start = entry["applies_to"]
        onto = (f"the base `{base['path']}`" if start == "base" else
                f"the merged model of {start} (`{_export_command(ref, start)}` writes it; its "
                f"default place is `{entry['base_model_name_or_path']}`)")
        lines.append(f"- `adapters/{name}/`: {name}'s own adapter (rank {entry['rank']}) onto {onto}.")
    lines += [f"- Note: {n}." for n in record["notes"]]
    lines += ["", f"`{RECORD_FILE}` holds the same, machine-readable.", ""]
    return "\n".join(lines)


def export_stage(ref: StageRef, out_dir: str | Path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write the stage `ref` names into `out_dir` (see the module docstring for the layout):
    the merged model as an HF directory, and for LoRA stages the per-stage and combined PEFT
    adapters plus, when the source is not an HF directory or repo, the base model. `export.json`
    is written last, so a directory with one is a complete export. Returns the directory.

    Raises, before anything is written, PipelineError for a bad `max_shard_size` or an
    `out_dir` holding other files and CheckpointError when the stage's params cannot be read.
    """
    from gradual_jax.checkpoint import restore_model_params
    from gradual_jax.models import load_tokenizer, save_hf
    from gradual_jax.models.hf import write_json_atomic
    from gradual_jax.models.transformer import abstract_model

    try:
        parse_size(max_shard_size)
    except ValueError as err:
        raise _error(f"max_shard_size: {err}") from None
    out = Path(out_dir)
    cfg = ref.cfg
    base = base_source(cfg)
    config = base_config(cfg, base)
    tokenizer = load_tokenizer(base.path)
    model = restore_model_params(ref.stage_dir(ref.stage) / "params", abstract_model(config))
    _prepare_out(out)
    save_hf(model, out, tokenizer=tokenizer, max_shard_size=max_shard_size)
    del model
    lora = any(_stage_lora(ref, name).rank > 0 for name in ref.chain)
    notes: list[str] = []
    adapters: dict[str, Any] = {"adapters": {}, "adapter": None}
    base_record = {"dir": None, "path": base.ref, "kind": base.kind}
    if lora:
        adapters, base_record = _write_lora(ref, out, base, tokenizer, max_shard_size, notes)
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    record = {"run_dir": str(ref.root), "seed": ref.seed, "arm": ref.arm, "stage": ref.stage,
              "stages": list(ref.chain), "source": cfg.model.source, "dtype": cfg.model.dtype,
              "max_shard_size": max_shard_size, "weights": weights, "lora": lora,
              "base": base_record, **adapters, "notes": notes}
    io.write_text(out / README_FILE, _readme(ref, record))
    write_json_atomic(out / RECORD_FILE, record)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, *, seed: int | None = None,
               arm: str = DEFAULT_ARM, stage: str | None = None,
               max_shard_size: int | str = "5GB") -> Path:
    """Export one stage of the finished (or running) run in `run_dir` into `out_dir`: the CLI.
    Bad input raises one-line PipelineError (or ConfigError for an unreadable config)."""
    root = Path(run_dir)
    ref = locate(root, load_run_config(root), seed=seed, arm=arm, stage=stage)
    return export_stage(ref, out_dir, max_shard_size=max_shard_size)


def export_after_run(cfg: Any, root: Path) -> Path | None:
    """Export the stage `cfg.export` names from the run in `root` when ``cfg.export.enabled``
    (the launcher calls this when the run ends); into ``cfg.export.dir`` or
    `<root>/export/seed_<s>/<arm>/<stage>`. A complete export of the same stage already there is
    kept (a resumed run exports nothing twice). Returns the directory, or None when nothing was
    exported: export is off, or the run has several processes (restoring the params there is a
    collective of all of them; the CLI exports such a run afterwards, from one process)."""
    import jax

    ex = getattr(cfg, "export", None)
    if ex is None or not ex.enabled:
        return None
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            log.warning("export skipped in a %d-process run; run python -m gradual_jax.export %s "
                        "OUT_DIR afterwards", jax.process_count(), root)
        return None
    ref = locate(root, cfg, seed=ex.seed, arm=ex.arm, stage=ex.stage)
    out = Path(ex.dir) if ex.dir else default_export_dir(root, ref.seed, ref.arm, ref.stage)
    if _same_export(out, ref, ex.max_shard_size):
        return out
    return export_stage(ref, out, max_shard_size=ex.max_shard_size)


def _same_export(out: Path, ref: StageRef, max_shard_size: str) -> bool:
    try:
        done = json.loads((out / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    want = {"run_dir": str(ref.root), "seed": ref.seed, "arm": ref.arm, "stage": ref.stage,
            "max_shard_size": max_shard_size}
    return all(done.get(k) == v for k, v in want.items())


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (<run_dir>/<name>)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the HF directory is written")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the run's first)")
    parser.add_argument("--arm", default=DEFAULT_ARM, help=f"arm (default: {DEFAULT_ARM})")
    parser.add_argument("--stage", default=None,
                        help="stage (default: the arm's last stage that trained)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file, e.g. 5GB or 500MB (default: 5GB)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    from gradual_jax.errors import USER_ERRORS

    try:
        out = export_run(ns.run_dir, ns.out_dir, seed=ns.seed, arm=ns.arm, stage=ns.stage,
                         max_shard_size=ns.max_shard_size)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {out} (see {out / README_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
