"""`python -m gradual_jax.launch [CONFIG] [key=value ...]`: run the Gradual Learning method.

CONFIG is a YAML file or the name of a config shipped with the package (default, smoke,
smollm2_entityquestions, paper/qwen2_7b_lora, ...); without one it runs the embedded default (the
synthetic world). The same command resumes a killed run. `--plan` compiles the configuration for
its mesh without weights and prints whether it fits (see `gradual_jax.plan`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradual_jax.configlib import ConfigError, to_dict
from gradual_jax.errors import USER_ERRORS
from gradual_jax.runlog import RUN_LOG, append_traceback, exit_process, open_run_log, stacks_on_signal
from gradual_jax.xla_flags import apply_xla_flags

__all__ = ["exit_process", "main", "run", "start"]

if TYPE_CHECKING:
    from gradual_jax.config import RunConfig

log = logging.getLogger("gradual_jax")

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def shipped_configs() -> Path:
    """The configs shipped with the package: `gradual_jax/configs` in an installed wheel, the
    repository's top-level `configs/` in a source checkout (or an editable install)."""
    spec = importlib.util.find_spec("gradual_jax.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(arg: str | None) -> Path:
    """The config file: the argument as a path, else a shipped config by name (`smoke`,
    `smoke.yaml`, `paper/qwen2_7b_lora`); None is the embedded default."""
    shipped = shipped_configs()
    if arg is None:
        return shipped / "default.yaml"
    path = Path(arg)
    if path.is_file():
        return path
    for candidate in (shipped / arg, shipped / f"{arg}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(str(p.relative_to(shipped).with_suffix("")) for p in shipped.rglob("*.yaml"))
    raise ConfigError(f"config file {arg} not found; shipped configs ({shipped}): {', '.join(names)}")


def shipped_name(path: Path) -> str | None:
    """The name of the shipped config at ``path`` (``smoke``, ``paper/qwen2_7b_lora``), None for
    a file of the user's."""
    shipped = shipped_configs().resolve()
    path = path.resolve()
    return str(path.relative_to(shipped).with_suffix("")) if path.is_relative_to(shipped) else None


def start(cfg: RunConfig, *, shipped_config: str | None = None, lock: Any = None) -> dict[str, Any]:
    """Take the run directory's lock (`gradual_jax.rundir`), join the processes' job when the
    config or the cluster says so, turn on the compile cache and :func:`run`: what
    ``python -m gradual_jax.launch`` and ``gradual_jax.run`` do.

    Process 0 takes the lock before anything slow (before joining the job when it knows its
    index then; the CLI even before importing JAX and passes it as ``lock``); every other
    process checks it before joining, so a second launch into a held directory refuses
    (RunDirBusy, exit 2) before it could reach the first one's coordinator. Once joined, every
    process checks that it sees the run directory process 0 writes. The lock is released when
    the run ends, however it ends.
    """
    import jax

    from gradual_jax import distributed
    from gradual_jax.rundir import RunLock

    root = Path(cfg.run_dir) / cfg.name
    if lock is None or lock.root != root:
        if lock is not None:
            lock.release()
        lock = RunLock(root, coordinator=distributed.coordinator_address(cfg.distributed))
    if distributed.pre_init_process_id(cfg.distributed) == 0:
        lock.acquire()
    else:
        lock.check()
    try:
        multi = distributed.maybe_initialize(cfg.distributed)
        if multi:
            distributed.on_main(lambda: lock.acquire())
        lock.confirm(jax.process_index(), jax.process_count())
        from gradual_jax.xla_cache import enable_compilation_cache

        enable_compilation_cache()
        return run(cfg, shipped_config=shipped_config)
    finally:
        lock.release()


def prepare_run_dir(cfg: RunConfig) -> Path:
    """`<run_dir>/<name>`, created with the config's hash; refuses a dir of another config.
    Process 0 checks and writes; every process gets its decision (a collective)."""
    from gradual_jax.distributed import on_main

    return Path(on_main(lambda: str(_prepare_run_dir(cfg))))


def _prepare_run_dir(cfg: RunConfig) -> Path:
    from gradual_jax import io
    from gradual_jax.config import config_hash
    from gradual_jax.pipeline import PipelineError, read_json, write_json

    root = Path(cfg.run_dir) / cfg.name
    digest = config_hash(cfg)
    marker = root / "run.json"
    if marker.exists():
        held = read_json(marker).get("config_hash")
        if held != digest:
            raise PipelineError(
                f"run directory {root} holds a run of a different configuration; "
                f"choose another name (e.g. name={cfg.name}-2) or delete it")
    else:
        root.mkdir(parents=True, exist_ok=True)
        import yaml

        io.write_text(root / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_json(marker, {"config_hash": digest, "created": time.time()})
    return root


def load_resources(cfg: RunConfig, *, shipped_config: str | None = None):
    """Base model, tokenizer and QA splits named by the config. ``shipped_config``: the name of
    the shipped config the run came from, for the hint when its relative ``data.path`` is missing."""
    from gradual_jax.models import CheckpointError, load_model, load_tokenizer, resolve_model_source
    from gradual_jax.pipeline import Resources

    try:
        source = resolve_model_source(cfg.model.source)
    except CheckpointError as err:
        raise ConfigError(f"model.source: {err}") from None
    if source != "world" and not Path(source).exists() and (
            source.endswith(".gguf") or source.startswith((".", "/", "~"))):
        raise ConfigError(f"model.source: {source} does not exist")
    if cfg.data.kind == "world" and source != "world":
        raise ConfigError("data.kind 'world' needs model.source 'world' (or set data.kind)")
    if source == "world":
        art = world_artifacts(cfg)
        source = str(art.model_dir)
        if cfg.data.kind == "world":
            splits = {s: list(art.examples[s]) for s in ("train", "dev", "test")}
        else:  # the world's model asked about another QA set
            splits = load_splits(cfg, shipped_config=shipped_config)
    else:
        splits = load_splits(cfg, shipped_config=shipped_config)
    train_mesh, probe_mesh = build_meshes(cfg, source)
    model = load_model(source, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype,
                       mesh=train_mesh)
    tokenizer = load_tokenizer(source)
    return Resources(model=model, tokenizer=tokenizer, splits=splits, model_id=str(source),
                     train_mesh=train_mesh, probe_mesh=probe_mesh)


def world_artifacts(cfg: RunConfig, *, progress: bool = True) -> Any:
    """The synthetic world ``cfg.world`` describes (its model and QA), built or read from the
    cache; ConfigError for bad world options."""
    from gradual_jax import distributed
    from gradual_jax.world import build_or_load_world, world_config_from_dict

    try:
        world_cfg = world_config_from_dict(cfg.world)
    except ValueError as err:
        raise ConfigError(f"world: {err}") from None
    # Process 0 builds (or reads) the world while the others wait, then they read it: one build
    # per job where the cache is shared. A process whose cache is not shared builds its own copy
    # from the same config and seeds.
    if distributed.is_main_process():
        art = build_or_load_world(world_cfg, progress=progress)
    distributed.barrier("world")
    if not distributed.is_main_process():
        art = build_or_load_world(world_cfg, progress=False)
    return art


def build_meshes(cfg: RunConfig, source: str) -> tuple[Any, Any]:
    """The run's training mesh (``mesh``) and the probe's inference mesh (``probe.mesh``), built
    once from the config and checked against the model's heads and every batch size before any
    weights are read (bad input: ConfigError naming the key)."""
    from gradual_jax.config import stage_train_config
    from gradual_jax.models import read_model_config
    from gradual_jax.sharding import run_meshes

    mc = read_model_config(source)
    batches = {"train.batch_size": cfg.train.batch_size}  # rows of each micro-batch, as the trainer checks
    for i, stage in enumerate(cfg.stages):
        if "batch_size" in stage.train:
            batches[f"stages.{i}.train.batch_size"] = stage_train_config(cfg, i).batch_size
    return run_meshes(cfg.mesh, cfg.probe.mesh, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                      train_batch_sizes=batches, probe_batch_size=cfg.probe.batch_size)


def _local_data_path(cfg: RunConfig, shipped_config: str | None) -> Path:
    root = Path(cfg.data.path)
    if root.exists():
        return root
    hint = ""
    if not root.is_absolute():
        hint = f" (relative to the working directory {Path.cwd()}"
        if shipped_config:
            hint += (f"; the shipped config {shipped_config} sets it relative to the repository's "
                     f"root: run from there or give data.path=/path/to/data")
        hint += ")"
    raise ConfigError(f"data.path: {root} does not exist{hint}")


def load_splits(cfg: RunConfig, *, shipped_config: str | None = None) -> dict[str, list]:
    """The train, dev and test QA examples named by ``cfg.data`` (any kind but world), after
    relation filters, the train/test overlap filter and per-relation limits."""
    from gradual_jax.knowledge import data as qa

    d = cfg.data
    if d.kind == "world":
        raise ConfigError("data.kind 'world' needs model.source 'world'")
    if not d.path:
        raise ConfigError(f"data.path: required for data.kind '{d.kind}'")
    if d.kind == "hf":
        from gradual_jax.knowledge.sources import load_hf_splits

        splits = load_hf_splits(d.path, name=d.name, splits=d.splits, columns=d.columns,
                                   relation=d.relation)
    elif d.kind == "tfds":
        from gradual_jax.knowledge.sources import load_tfds_splits

        splits = load_tfds_splits(d.path, data_dir=d.data_dir, splits=d.splits,
                                     columns=d.columns, relation=d.relation)
    elif d.kind == "entityquestions" and d.gekhman:
        # filter the whole splits first (overlap with test), then take the first N
        splits = qa.gekhman_setup(_local_data_path(cfg, shipped_config), overlap=d.overlap_mode)
    elif d.kind == "entityquestions":
        root = _local_data_path(cfg, shipped_config)
        rels = d.train_relations
        # dev holds the few-shot exemplars of every relation the probes ask about
        dev_rels = None if rels is None else list(dict.fromkeys([*rels, *(d.test_relations or [])]))
        splits = {
            "train": qa.load_entityquestions(root, "train", rels),
            "dev": qa.load_entityquestions(root, "dev", dev_rels),
            "test": qa.load_entityquestions(root, "test", d.test_relations or rels),
        }
    else:
        root = _local_data_path(cfg, shipped_config)
        splits = {s: qa.load_jsonl(root / f"{s}.jsonl", split=s) for s in ("train", "dev", "test")}
    for split, relations in (("train", d.train_relations), ("test", d.test_relations)):
        if relations:
            keep = set(relations)
            splits[split] = [e for e in splits[split] if e.relation in keep]
    # against the whole test set (before its limit): a smaller test set keeps the same train set
    if not (d.kind == "entityquestions" and d.gekhman):  # gekhman_setup has filtered already
        splits["train"] = qa.drop_overlapping(splits["train"], splits["test"], d.overlap_mode)
    splits["train"] = qa.first_per_relation(splits["train"], d.limit_per_relation)
    splits["dev"] = qa.first_per_relation(splits["dev"], d.dev_limit_per_relation)
    splits["test"] = qa.first_per_relation(splits["test"], d.test_limit_per_relation)
    return splits


def run(cfg: RunConfig, *, shipped_config: str | None = None) -> dict[str, Any]:
    """Run every seed of the configuration (resuming what is done), write the report and, with
    ``export.enabled``, export the chosen stage's model. Returns the report.

    Process 0 writes every file but the Orbax shards and logs to ``<run>/run.log``; an internal
    failure's traceback is appended there before it propagates."""
    t0 = time.time()
    root = prepare_run_dir(cfg)
    handler = open_run_log(root)
    try:
        return _run(cfg, root, t0, shipped_config=shipped_config)
    except Exception as err:
        if handler is not None and not isinstance(err, USER_ERRORS):
            append_traceback(root)
            err.run_log = root / RUN_LOG  # type: ignore[attr-defined]  # main() names it
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _run(cfg: RunConfig, root: Path, t0: float, *, shipped_config: str | None) -> dict[str, Any]:
    import jax

    from gradual_jax import distributed, report
    from gradual_jax.pipeline import SeedRun, write_json
    from gradual_jax.runtime import make_runtime
    from gradual_jax.sharding import one_program_at_a_time

    res = load_resources(cfg, shipped_config=shipped_config)
    workers = min(cfg.seed_workers, len(cfg.seeds))
    if workers > 1 and jax.process_count() > 1:
        # Every host must issue the same collectives in the same order: one seed at a time.
        log.warning("seed_workers=%d ignored: %d processes", workers, jax.process_count())
        workers = 1
    wandb_run = _open_wandb(cfg, root)
    runtime = make_runtime(cfg, res, threaded_seeds=workers > 1, run_root=root, wandb_run=wandb_run)

    def run_seed(seed: int) -> dict:
        log.info("seed %d", seed)
        return SeedRun(cfg, res, seed, root / f"seed_{seed}", **runtime).run()

    try:
        if workers == 1:
            results = [run_seed(seed) for seed in cfg.seeds]
        else:
            with one_program_at_a_time(), \
                    concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="seed") as pool:
                results = list(pool.map(run_seed, cfg.seeds))
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    rep = report.build_report(results, config=to_dict(cfg))
    rep["runtime"] = runtime_record(results, res)
    rep["invocation_seconds"] = time.time() - t0  # this command only; a resumed run is shorter
    if distributed.is_main_process():
        paths = report.write_report(rep, results, root)
        write_json(root / "done.json", {"finished": time.time()})
        print(f"report: {root / 'report.md'} ({len(paths)} files)")
    distributed.barrier("report")  # the export below reads what process 0 wrote
    if cfg.export.enabled:
        from gradual_jax.export import export_after_run

        out = export_after_run(cfg, root)
        if out is not None and distributed.is_main_process():
            print(f"export: {out}")
    return rep


def runtime_record(results: list[dict], res: Any) -> dict[str, Any]:
    """What the run ran on: both meshes' axis sizes, processes, devices, and per trained stage
    of each seed's ``results`` the params + optimizer state bytes on its fullest device (measured
    from the arrays' shards when the stage trained)."""
    import jax

    from gradual_jax.sharding import axis_sizes

    stages = [{"seed": result["seed"], "arm": arm, "stage": info["name"],
               "train_state_bytes_per_device": info["train_state_bytes_per_device"]}
              for result in results for arm, summary in sorted(result["arms"].items())
              for info in summary["stages"] if info.get("train_state_bytes_per_device")]
    return {"mesh": axis_sizes(res.train_mesh), "probe_mesh": axis_sizes(res.probe_mesh),
            "processes": jax.process_count(), "devices": jax.device_count(), "stages": stages}


def _open_wandb(cfg: RunConfig, root: Path) -> Any:
    from gradual_jax.training.metrics import open_wandb

    try:
        return open_wandb(cfg.logging, run_name=cfg.name, config=to_dict(cfg), directory=root)
    except ConfigError as err:
        raise err.under("logging") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    from gradual_jax.config import RunConfig, keys_help

    epilog = ("config keys (set in CONFIG or as key=value; lists index as stages.1.lr_scale=0.5):\n"
              + keys_help(RunConfig))
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.launch", description=__doc__,
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="CONFIG (a YAML file or a shipped config's name; optional, first) "
                                                "then key=value overrides")
    parser.add_argument("--plan", action="store_true", help="compile for the mesh and report memory; no training")
    parser.add_argument("--devices", type=int, default=None, help="simulated device count for --plan")
    parser.add_argument("--hbm-gib", type=float, default=None, help="target device memory for --plan")
    parser.add_argument("--target", default=None, help="target accelerator for --plan (tpu-v5e, h100, ...)")
    parser.add_argument("--plan-layers", type=int, default=None,
                        help="--plan: compile L and 2L layers and extrapolate (faster for big models)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: progress logs; -vv: also which questions each process probes")
    ns = parser.parse_args(argv)
    ns.config = None
    if ns.args and "=" not in ns.args[0]:
        ns.config = ns.args.pop(0)
    ns.overrides = ns.args
    return ns


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when the run ends, 2 for bad input (one line on stderr), 1 for an internal
    failure (one line on stderr; the traceback in the run's log on process 0, on stderr on
    the others)."""
    argv = sys.argv[1:] if argv is None else argv
    apply_xla_flags()
    try:
        early = early_lock(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _main(argv, early)
    finally:
        if early is not None:
            early.release()


def _main(argv: list[str], early: Any) -> int:
    ns = parse_args(argv)
    stacks_on_signal()
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if ns.verbose > 1:
        log.setLevel(logging.DEBUG)
    cfg = None
    try:
        from gradual_jax.config import load_config

        path = resolve_config_path(ns.config)
        cfg = load_config(path, ns.overrides)
        if ns.plan:
            from gradual_jax.plan import plan_main

            return plan_main(cfg, devices=ns.devices, hbm_gib=ns.hbm_gib, target=ns.target,
                             layers=ns.plan_layers)
        start(cfg, shipped_config=shipped_name(path), lock=early)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - an internal failure: exit 1, traceback kept
        import jax

        where = ""
        if getattr(err, "run_log", None) is not None:
            where = f" (traceback in {err.run_log})"
        else:
            import traceback

            traceback.print_exc()
        print(f"error: internal failure in process {jax.process_index()}: "
              f"{type(err).__name__}: {err}{where}", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def early_lock(argv: Sequence[str]) -> Any:
    """The run directory's lock, dealt with before anything slow (JAX is not imported yet) for
    the directory the command names (`rundir.lock_named_by`): taken when this is process 0
    (returned, for :func:`start`), checked otherwise (None). RunDirBusy when another live
    launch holds it. ``--plan``/``--help`` and commands naming no directory that way are left
    to :func:`start`."""
    from gradual_jax.rundir import lock_named_by

    if any(a in ("-h", "--help", "--plan") for a in argv):
        return None
    args = [a for a in argv if not a.startswith("-")]
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        path = resolve_config_path(config)
    except ConfigError:
        return None  # load_config reports it
    found = lock_named_by(path, args)
    if found is None:
        return None
    lock, process_id = found
    if process_id == 0:
        lock.acquire()
        return lock
    lock.check()
    return None


if __name__ == "__main__":
    exit_process(main())
