"""The Gradual Learning pipeline: probe, select, train, re-probe, advance, for every arm and seed.

This is the only module that joins the curriculum (which knows categories, not models) and the
trainer (which knows models, not categories). Every step writes its output under the run
directory and is skipped when that output exists, so a killed run restarts with the same command
and ends with the same numbers:

    <run>/config.yaml, run.json            the configuration and its hash
    <run>/seed_<s>/prompts.json            few-shot prompt sets (and noise_prompts.json)
    <run>/seed_<s>/stage0/{train,test}.jsonl   SliCK records of the base model (chunk-resumable)
    <run>/seed_<s>/noise/train.jsonl       noise control: same model, other seed and prompts
    <run>/seed_<s>/probe_index.json        weights digest -> records already probed with them
    <run>/seed_<s>/<arm>/<stage>/ckpt/     Orbax checkpoints within the stage (epoch-resumable)
    <run>/seed_<s>/<arm>/<stage>/params/   the stage's selected model
    <run>/seed_<s>/<arm>/<stage>/{train,test}.jsonl, stage.json, state.json
    <run>/seed_<s>/<arm>/test_correct.json
    <run>/seed_<s>/result.json             everything gradual_jax.report needs for this seed
    <run>/report.json, report.md, *.png

With several processes, process 0 writes every one of these but the Orbax shards in ckpt/ and
params/ (which every process writes), and makes every skip-or-redo decision for all of them
(`done_json`, `cached_json`); each process probes its share of the questions (`Probe.run`).

What a resume keeps is checked, not assumed: result.json and arm.json are summaries of the
probes and count only under the probe's current gold scoring (`GOLD_SCORING`: older probe files
are updated by `Probe.run` and the summaries made again); a stage's trained model counts only
if it trained on what the curriculum selects now, else it and everything after it in its arm
are trained and probed again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradual_jax import curriculum, io
from gradual_jax.distributed import is_main_process, on_main
from gradual_jax.config import RunConfig, StageConfig, TrainConfig, stage_train_config
from gradual_jax.errors import UserError
from gradual_jax.knowledge.categories import HIGHLY_KNOWN, MAYBE_KNOWN
from gradual_jax.knowledge.data import QAExample
from gradual_jax.knowledge.probe import GOLD_SCORING, Probe, ProbeSettings, category_counts

log = logging.getLogger("gradual_jax")

NOISE_SEED_OFFSET = 10_000
PROBE_INDEX = "probe_index.json"


class PipelineError(UserError):
    """A configuration that cannot run (nothing selected, a run dir of another config, ...)."""


@dataclasses.dataclass
class Resources:
    """What every arm and seed shares: the base model (on ``train_mesh``), its tokenizer, the
    QA splits, and the meshes training and probing run on (None: the devices' defaults)."""

    model: Any
    tokenizer: Any
    splits: dict[str, list[QAExample]]
    model_id: str
    train_mesh: Any = None
    probe_mesh: Any = None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a kill leaves the old file or the new one, never half of one.
    Only process 0 writes (the run's one writer); on the others this does nothing."""
    if is_main_process():
        io.write_json(path, data, indent=1, sort_keys=True)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def done_json(path: Path, *also: Path) -> Any | None:
    """The JSON at `path` when it and every path in `also` exist, else None: a resume decision,
    made on process 0 and handed to every process (a collective)."""
    return on_main(lambda: read_json(path) if path.exists() and all(p.exists() for p in also) else None)


def summary_json(path: Path) -> Any | None:
    """`done_json` of a summary of probes (result.json, arm.json): None as well when it was made
    from probes under an older gold scoring."""
    done = done_json(path)
    if done is not None and done.get("gold_scoring") != GOLD_SCORING:
        log.info("%s summarises probes of an older gold scoring: made again", path)
        return None
    return done


def discard(path: Path) -> None:
    """Remove a stale output file on process 0; a collective, so every process goes on only
    after it is gone."""
    on_main(lambda: path.unlink(missing_ok=True))


def _fingerprint_of(records: Path) -> str | None:
    """The configuration fingerprint in a probe records file's sidecar (None: none readable)."""
    try:
        return json.loads(records.with_name(records.name + ".meta.json").read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at `path`, computing and writing it first when absent (every process computes,
    so `compute` may be a collective; process 0 writes)."""
    found = on_main(lambda: {"value": read_json(path)} if path.exists() else None)
    if found is not None:
        return found["value"]
    value = compute()
    write_json(path, value)
    return value


def probe_settings(cfg: RunConfig, seed: int, *, greedy: bool = False) -> ProbeSettings:
    """The run's probe settings for one probe seed (the config's ``probe.seed`` is an offset);
    with `greedy`, greedy answers only (no samples, no gold-answer probability; see
    ``ProbeSettings.test_after_training``)."""
    settings = dataclasses.replace(cfg.probe, seed=cfg.probe.seed + seed)
    return dataclasses.replace(settings, n_samples=0, gold_probability=False) if greedy else settings


def stage_seed(seed: int, k: int) -> int:
    """The seed of stage ``k`` (0-based) of run seed ``seed``: its selection and its training."""
    return seed * 1_000 + k


def by_category(records: Sequence[dict]) -> dict[str, str]:
    return {r["id"]: r["category"] for r in records}


def by_p_gold(records: Sequence[dict]) -> dict[str, float] | None:
    """Each record's gold-answer probability (the report's continuous measure); None when a
    record lacks it (written before the probe recorded it)."""
    if any(r.get("p_gold") is None for r in records):
        return None
    return {r["id"]: float(r["p_gold"]) for r in records}


class SeedRun:
    """All arms of one seed, resumable step by step."""

    def __init__(self, cfg: RunConfig, res: Resources, seed: int, root: Path,
                 engine_factory: Callable[[Any], Any], trainer_fn: Callable[..., tuple[Any, dict]],
                 accuracy_fn: Callable[[Any, Sequence[QAExample], str], dict[str, bool]],
                 params_io: tuple[Callable[[Path, Any], None], Callable[[Path], Any]],
                 model_digest: Callable[[Any], str] | None = None):
        self.cfg, self.res, self.seed, self.root = cfg, res, seed, root
        self.model_digest = model_digest
        # Models are not changed once probed (training works on a copy): a stage's model is
        # probed on train and test, the base model three times, and each is hashed once.
        self._digests: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.engine_factory = engine_factory
        self.trainer_fn = trainer_fn
        self.accuracy_fn = accuracy_fn
        self.save_params, self.load_params = params_io
        self.train_ids = [e.id for e in res.splits["train"]]
        self.by_id = {e.id: e for e in res.splits["train"]}
        # dev also holds exemplars for test-only relations; model selection stays in distribution
        train_relations = {e.relation for e in res.splits["train"]}
        self.selection_dev = [e for e in res.splits["dev"] if e.relation in train_relations]

    # ---------------------------------------------------------------- probes

    def prompt_sets(self, noise: bool = False) -> dict:
        from gradual_jax.knowledge.prompts import build_prompt_sets

        name = "noise_prompts.json" if noise else "prompts.json"
        relations = sorted({e.relation for split in ("train", "test") for e in self.res.splits[split]})
        settings = probe_settings(self.cfg, self.seed + (NOISE_SEED_OFFSET if noise else 0))
        return cached_json(self.root / name, lambda: build_prompt_sets(
            self.res.splits["dev"], relations, n_prompts=settings.n_prompts,
            k=settings.k_shot, seed=settings.seed))

    def probe(self, model: Any, split: str, out: Path, *, noise: bool = False,
              greedy: bool = False) -> list[dict]:
        """SliCK records of `model` on `split`, written to `out` (resumable); with `greedy`, of
        the greedy answers only (WeaklyKnown counted as Unknown).

        A model with the same weights as one probed before in this seed (one-stage fine-tuning
        and two-stage's stage 1 select the same epoch from the same data order, for example)
        gets a copy of those records instead of a second probe: the probe is deterministic in
        weights, prompts and seed, so the copy is what probing would write.
        """
        seed = self.seed + (NOISE_SEED_OFFSET if noise else 0)
        key = None
        if self.model_digest is not None:
            if model not in self._digests:
                self._digests[model] = self.model_digest(model)
            kind = "noise" if noise else "greedy" if greedy else "probe"
            key = f"{self._digests[model]}/{split}/{kind}"
        engine = self.engine_factory(model)
        probe = Probe(engine, self.prompt_sets(noise), probe_settings(self.cfg, seed, greedy=greedy),
                      model_id=self.res.model_id)
        if key is not None and is_main_process():  # the records file is process 0's; Probe.run tells the others
            self._reuse_records(key, out, probe.fingerprint())
        log.info("probe %s -> %s", split, out)
        records = probe.run(self.res.splits[split], out, split=getattr(engine, "process_local", False))
        if key is not None and is_main_process():
            index = self._probe_index()
            index.setdefault(key, str(out.relative_to(self.root)))
            write_json(self.root / PROBE_INDEX, index)
        return records

    def warm_up_probes(self) -> None:
        """Fix the engine's shapes once for the train and test probes of this seed (the
        questions of both on the run's prompt sets). Engines of a run share their shapes
        (`runtime.make_runtime`), so later probes, dev evaluations and test accuracy start from
        them; without this the stage-0 test probe grew the train probe's set and compiled a
        second one."""
        engine = self.engine_factory(self.res.model)
        probe = Probe(engine, self.prompt_sets(), probe_settings(self.cfg, self.seed), model_id=self.res.model_id)
        probe.warm_up([e for split in ("train", "test") for e in self.res.splits[split]])

    def _probe_index(self) -> dict[str, str]:
        path = self.root / PROBE_INDEX
        return read_json(path) if path.exists() else {}

    def _reuse_records(self, key: str, out: Path, fingerprint: str) -> None:
        """Copy the finished records indexed under `key` to `out` (and its fingerprint sidecar),
        unless `out` already has records of fingerprint `fingerprint` or the indexed ones are
        not of it (an older gold scoring's, which `Probe.run` would update). The records file
        appears whole or not at all."""
        done = self._probe_index().get(key)
        if done is None or (out.exists() and _fingerprint_of(out) == fingerprint):
            return
        src = self.root / done
        meta = src.with_name(src.name + ".meta.json")
        if src == out or not src.exists() or _fingerprint_of(src) != fingerprint:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        sidecar = out.with_name(out.name + ".meta.json")
        # Over an older scoring's records, the records land first (as `RecordFile.replace`): a
        # kill between leaves them marked stale, and updating current records changes nothing.
        if not out.exists():
            shutil.copyfile(meta, sidecar)
        io.atomic_write(out, lambda tmp: shutil.copyfile(src, tmp))
        io.atomic_write(sidecar, lambda tmp: shutil.copyfile(meta, tmp))
        log.info("probe %s: same weights as %s, records reused", out, src)

    def _discard_stage(self, stage_dir: Path) -> None:
        """Remove a stale stage's outputs, and the probe index's entries that point into them
        (another model's records will take their paths)."""
        def remove() -> None:
            shutil.rmtree(stage_dir, ignore_errors=True)
            index = self._probe_index()
            kept = {k: v for k, v in index.items() if not (self.root / v).is_relative_to(stage_dir)}
            if kept != index:
                write_json(self.root / PROBE_INDEX, kept)
        on_main(remove)

    # ---------------------------------------------------------------- arms

    def run(self) -> dict:
        result_path = self.root / "result.json"
        done = summary_json(result_path)
        if done is not None:
            return done
        t0 = time.time()
        self.warm_up_probes()
        records0 = {s: self.probe(self.res.model, s, self.root / "stage0" / f"{s}.jsonl")
                    for s in ("train", "test")}
        stage0 = {s: by_category(r) for s, r in records0.items()}
        self.stage0_test = stage0["test"]
        noise = None
        if self.cfg.noise_control:
            # Train only: the report reads noise off train moves; a test re-probe would go unread.
            noise_records = self.probe(self.res.model, "train", self.root / "noise" / "train.jsonl", noise=True)
            noise = {"train": by_category(noise_records), "train_p_gold": by_p_gold(noise_records)}
        state0 = curriculum.initial_state([{"id": i, "category": stage0["train"][i]} for i in self.train_ids])
        arms: dict[str, dict] = {}
        for arm in self._arm_order():
            arms[arm] = self.run_arm(arm, state0, arms)
        result = {"seed": self.seed, "stage0": stage0, "noise_control": noise, "arms": arms,
                  "stage0_p_gold": {s: by_p_gold(r) for s, r in records0.items()},
                  "wall_seconds": time.time() - t0, "gold_scoring": GOLD_SCORING}
        write_json(result_path, result)
        return result

    def _arm_order(self) -> list[str]:
        # one_stage's budget and random_subset's size are read off two_stage: run it first.
        arms = list(self.cfg.arms)
        return sorted(arms, key=lambda a: a != "two_stage")

    def _arm_stages(self, arm: str, arms_done: dict[str, dict],
                    state0: curriculum.CurriculumState) -> list[tuple[StageConfig, dict]]:
        """(stage config, extra training limits) for each fixed stage of a non-staged arm."""
        base = self.cfg.stages[0]
        two = arms_done.get("two_stage")
        if arm == "one_stage":
            limit = {"max_steps": sum(s["steps"] for s in two["stages"])} if two else {}
            return [(dataclasses.replace(base, name="stage1", select={"categories": [MAYBE_KNOWN]}), limit)]
        if arm == "natural":
            return [(dataclasses.replace(base, name="stage1", select={}), {})]
        if arm == "highly_known":
            return [(dataclasses.replace(base, name="stage1", select={"categories": [HIGHLY_KNOWN]}), {})]
        if arm == "random_subset":
            size = (len(two["stages"][0]["trained_ids"]) if two
                    else curriculum.category_counts(state0)[MAYBE_KNOWN])
            select = {"random": True, "size": max(size, 1)}
            return [(dataclasses.replace(base, name="stage1", select=select), {})]
        raise PipelineError(f"unknown arm {arm!r}")

    def run_arm(self, arm: str, state0: curriculum.CurriculumState, arms_done: dict[str, dict]) -> dict:
        arm_dir = self.root / arm
        summary_path = arm_dir / "arm.json"
        done = summary_json(summary_path)
        if done is not None:
            return done
        state = state0
        model = self.res.model
        stages: list[dict] = []
        if arm == "two_stage":
            plan = [(st, {}) for st in self.cfg.stages]
            extra = self.cfg.max_extra_stages
        else:
            plan = self._arm_stages(arm, arms_done, state0)
            extra = 0
        k = 0
        retrained = False  # a stage trained again: what followed it in this arm is stale
        while k < len(plan) or extra > 0:
            if k >= len(plan):
                if not curriculum.should_continue(state, self.cfg.min_moved_up):
                    break
                last = self.cfg.stages[-1]
                plan.append((dataclasses.replace(last, name=f"stage{k + 1}"), {}))
                extra -= 1
            stage_cfg, limits = plan[k]
            test_before = stages[-1]["test_after"] if stages else self.stage0_test
            model, state, info, trained = self.run_stage(arm, k, stage_cfg, limits, model, state,
                                                         test_before, stale=retrained)
            retrained = retrained or trained
            stages.append(info)
            k += 1
        if retrained:
            discard(arm_dir / "test_correct.json")
        test_correct = cached_json(arm_dir / "test_correct.json", lambda: self.accuracy_fn(
            model, self.res.splits["test"], stage_train_config(self.cfg, plan[-1][0]).template))
        summary = {"stages": stages, "test_correct": test_correct, "gold_scoring": GOLD_SCORING}
        write_json(summary_path, summary)
        return summary

    @staticmethod
    def _skipped_stage(stage_cfg: StageConfig, state: curriculum.CurriculumState,
                       test_before: dict[str, str], test_probe: str) -> tuple[curriculum.CurriculumState, dict]:
        """A stage that trained nothing: the model and both probes stay as they were."""
        latest = dict(state.latest)
        state = curriculum.advance(state, [{"id": i, "category": c} for i, c in latest.items()])
        return state, {"name": stage_cfg.name, "trained_ids": [], "selected_counts": {},
                       "steps": 0, "best_epoch": 0, "dev_accuracy": [], "curve": [],
                       "skipped": True, "train_after": latest, "test_after": dict(test_before),
                       "test_probe": test_probe}

    def run_stage(self, arm: str, k: int, stage_cfg: StageConfig, limits: dict, model: Any,
                  state: curriculum.CurriculumState, test_before: dict[str, str], *, stale: bool = False):
        """(model, state, stage summary, whether it trained now). `stale`: an earlier stage of
        the arm trained again, so what this stage's directory holds started from another model
        and is trained and probed again."""
        stage_dir = self.root / arm / stage_cfg.name
        train_cfg: TrainConfig = stage_train_config(self.cfg, stage_cfg)
        spec = stage_cfg.spec()
        try:
            ids = curriculum.select(state, spec, rng=stage_seed(self.seed, k))
        except curriculum.EmptySelection as err:
            if k == 0:
                raise PipelineError(f"arm {arm}, stage {stage_cfg.name}: {err}") from None
            # Nothing moved up after the previous stage: the method has nothing to add.
            log.warning("arm %s, stage %s: nothing selected, stage skipped (%s)", arm, stage_cfg.name, err)
            state, info = self._skipped_stage(stage_cfg, state, test_before, self.cfg.probe.test_after_training)
            if stale:
                self._discard_stage(stage_dir)
            return model, state, info, False
        params_dir = stage_dir / "params"
        info_path = stage_dir / "stage.json"
        info = done_json(info_path, params_dir)
        if info is not None and (stale or info.get("trained_ids") != list(ids)):
            log.warning("arm %s, stage %s: %s; trained and probed again", arm, stage_cfg.name,
                        "an earlier stage trained again" if stale else
                        "the saved model trained on other examples than the curriculum selects now")
            self._discard_stage(stage_dir)
            info = None
        elif info is None and stale:
            self._discard_stage(stage_dir)
        trained = info is None
        if info is not None:
            model = self.load_params(params_dir)
        else:
            examples = [self.by_id[i] for i in ids]
            model, info = self.trainer_fn(model, examples, self.selection_dev, train_cfg,
                                          ckpt_dir=stage_dir / "ckpt", seed=stage_seed(self.seed, k),
                                          metrics_dir=stage_dir, **limits)
            self.save_params(params_dir, model)
            info = {**info, "name": stage_cfg.name, "trained_ids": list(ids),
                    "selected_counts": category_counts({"category": state.latest[i]} for i in ids)}
            write_json(info_path, info)
        state = curriculum.mark_trained(state, ids, k + 1)
        train_records = self.probe(model, "train", stage_dir / "train.jsonl")
        test_probe = self.cfg.probe.test_after_training
        test_records = self.probe(model, "test", stage_dir / "test.jsonl", greedy=test_probe == "greedy")
        train_after, test_after = by_category(train_records), by_category(test_records)
        state = curriculum.advance(state, [{"id": i, "category": train_after[i]} for i in self.train_ids])
        write_json(stage_dir / "state.json", curriculum.to_json(state))
        return model, state, {**info, "train_after": train_after, "test_after": test_after,
                              "test_probe": test_probe, "train_p_gold": by_p_gold(train_records),
                              "test_p_gold": by_p_gold(test_records)}, trained


