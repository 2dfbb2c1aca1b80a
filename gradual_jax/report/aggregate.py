"""``build_report``: per-seed results to one JSON-serialisable report of figures with intervals.

Every figure is a ``gradual_jax.stats`` figure: ``{"mean", "low", "high", "n", "n_seeds",
"per_seed"}`` with a 95% crossed question x seed bootstrap interval inside the figure's range
(levels in [0, 1], counts in [0, n], differences in [-1, 1] or [-n, n]); n = questions per seed.
Steps and seconds, which estimate nothing, carry the range over seeds instead.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from gradual_jax import stats
from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.report import paired
from gradual_jax.report.data import (
    HK,
    MOVE_KEYS,
    Grid,
    arm_names,
    arm_probes,
    move_flags,
    n_stages,
    stage_name,
    test_probe_kind,
    transition_matrix,
    untrained_sets,
    validate_results,
)

REFERENCE_ARM = "two_stage"
BASELINE_ARM = "one_stage"
COUNTED_MOVES = ("up", "down", "from_weak_or_unknown_up")  # net = up - down, a paired difference


def machine_info() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``'s model name, else ``platform.processor()``), platform
    and core count of the machine this runs on: float results of the world model depend on it."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "platform": platform.platform(),
            "cores": os.cpu_count()}


# ----------------------------------------------------------------------------- figures


def final_hk(r: Mapping, arm: str) -> list[str]:
    """Train ids HighlyKnown after the arm's last stage (stage 0 if it has none)."""
    return [i for i, c in arm_probes(r, arm)[-1][0].items() if c == HK]


def move_arrays(grid: Grid, seeds: Sequence[int], before, after, ids) -> dict[str, Any]:
    """Per move key, the (seeds, questions) 0/1 array over train; ``before``/``after`` map a result
    to a probe, ``ids`` to the questions counted (the mask)."""
    def flag(key: str):
        return grid.array("train", seeds, lambda r: {i: move_flags(before(r)[i], after(r)[i])[key]
                                                     for i in ids(r)})

    flags = {k: flag(k) for k in COUNTED_MOVES}
    flags["mask"] = grid.array("train", seeds, ids)
    return flags


def move_figures(grid: Grid, seeds: Sequence[int], flags: Mapping) -> dict:
    d = grid.design("train", seeds)
    out = {k: stats.count(d, flags[k], flags["mask"]) for k in COUNTED_MOVES}
    out["net"] = stats.paired_difference(d, flags["up"], flags["down"], flags["mask"], counts=True)
    return {k: out[k] for k in MOVE_KEYS}


def _counts(grid: Grid, split: str, seeds: Sequence[int], probe) -> dict:
    d = grid.design(split, seeds)
    mask = grid.array(split, seeds, lambda r: list(probe(r)))
    return {c: stats.count(d, grid.array(split, seeds, lambda r, c=c: [i for i, v in probe(r).items()
                                                                      if v == c]), mask)
            for c in CATEGORIES}


def _stages_section(grid: Grid, arm: str | None) -> list[dict]:
    """Category counts at stage 0 and after each stage of ``arm``, over seeds."""
    results = grid.results
    every = list(range(len(results)))
    out = [{"name": "stage0", "n_seeds": len(results),
            **{f"{s}_counts": _counts(grid, s, every, lambda r, s=s: r["stage0"][s]) for s in ("train", "test")}}]
    if arm is None:
        return out
    for j in range(n_stages(results, arm)):
        seeds = grid.seeds_with(lambda r: arm in r["arms"] and len(r["arms"][arm]["stages"]) > j)
        entry = {"name": stage_name(results, arm, j), "n_seeds": len(seeds),
                 "test_probe": test_probe_kind(results, arm, j)}
        for k, split in enumerate(("train", "test")):
            entry[f"{split}_counts"] = _counts(grid, split, seeds, lambda r, k=k: arm_probes(r, arm)[j + 1][k])
        out.append(entry)
    return out


def accuracy(grid: Grid, seeds: Sequence[int], arm: str, category: str | None = None) -> dict:
    """Test accuracy of ``arm``'s final model (on stage-0 ``category`` only, when given)."""
    d = grid.design("test", seeds)
    right = grid.array("test", seeds, lambda r: {i: bool(v) for i, v in r["arms"][arm]["test_correct"].items()})
    mask = grid.array("test", seeds, lambda r: [i for i in r["arms"][arm]["test_correct"]
                                                if category is None or r["stage0"]["test"][i] == category])
    return stats.level(d, right, mask)


def _arm_section(grid: Grid, arm: str) -> dict:
    """Headline figures of one arm over the seeds that ran it."""
    seeds = grid.seeds_with(lambda r: arm in r["arms"])
    runs = [grid.results[k] for k in seeds]
    by_cat = {c: accuracy(grid, seeds, arm, c) for c in CATEGORIES}
    train = grid.design("train", seeds)
    return {
        "n_seeds": len(seeds),
        "n_stages": n_stages(grid.results, arm),
        "test_accuracy": accuracy(grid, seeds, arm),
        "test_accuracy_by_category": by_cat,
        "train_highly_known": stats.count(train, grid.array("train", seeds, lambda r: final_hk(r, arm)),
                                          grid.array("train", seeds, lambda r: list(r["stage0"]["train"]))),
        "retention": by_cat[HK],
        "steps": stats.range_figure(sum(int(s["steps"]) for s in r["arms"][arm]["stages"]) for r in runs),
    }


def _knowledge_gain(grid: Grid) -> dict | None:
    """Per seed 100*(two-one)/one of final train HighlyKnown (seeds with one == 0 left out)."""
    seeds = grid.seeds_with(lambda r: REFERENCE_ARM in r["arms"] and BASELINE_ARM in r["arms"])
    if not seeds:
        return None
    d = grid.design("train", seeds)
    two = grid.array("train", seeds, lambda r: final_hk(r, REFERENCE_ARM))
    one = grid.array("train", seeds, lambda r: final_hk(r, BASELINE_ARM))
    return stats.relative_change_pct(d, two, one, grid.array("train", seeds, lambda r: list(r["stage0"]["train"])))


def _untrained_upgrades(grid: Grid, arm: str) -> list[dict]:
    """Per stage of ``arm``: moves of untrained train examples from the previous probe."""
    out = []
    for j in range(n_stages(grid.results, arm)):
        seeds = grid.seeds_with(lambda r: arm in r["arms"] and len(r["arms"][arm]["stages"]) > j)
        flags = move_arrays(grid, seeds, lambda r: arm_probes(r, arm)[j][0],
                            lambda r: arm_probes(r, arm)[j + 1][0], lambda r: untrained_sets(r, arm)[j])
        out.append({"stage": stage_name(grid.results, arm, j), "n_seeds": len(seeds),
                    **move_figures(grid, seeds, flags)})
    return out


def _transitions(results: Sequence[Mapping], arm: str) -> list[dict]:
    """Per stage of ``arm``: train and test transition matrices, summed and mean over seeds."""
    out = []
    for j in range(n_stages(results, arm)):
        runs = [r for r in results if arm in r["arms"] and len(r["arms"][arm]["stages"]) > j]
        entry: dict[str, Any] = {"stage": stage_name(results, arm, j), "n_seeds": len(runs),
                                 "test_probe": test_probe_kind(results, arm, j)}
        for split, k in (("train", 0), ("test", 1)):
            mats = [transition_matrix(arm_probes(r, arm)[j][k], arm_probes(r, arm)[j + 1][k]) for r in runs]
            total = [[sum(m[a][b] for m in mats) for b in range(4)] for a in range(4)]
            entry[split] = {"sum": total, "mean": [[v / len(runs) for v in row] for row in total]}
        out.append(entry)
    return out


def _noise_control(grid: Grid, arm: str | None) -> dict | None:
    """Moves from stage 0 to the noise-control probe: all train, and ``arm``'s stage-1 untrained."""
    seeds = grid.seeds_with(lambda r: r.get("noise_control") is not None)
    if not seeds:
        return None
    before, noise = (lambda r: r["stage0"]["train"]), (lambda r: r["noise_control"]["train"])
    all_train = move_figures(grid, seeds, move_arrays(grid, seeds, before, noise,
                                                      lambda r: list(r["stage0"]["train"])))
    sub_seeds = [k for k in seeds if arm is not None and arm in grid.results[k]["arms"]
                 and grid.results[k]["arms"][arm]["stages"]]
    sub = None
    if sub_seeds:
        sub = move_figures(grid, sub_seeds, move_arrays(grid, sub_seeds, before, noise,
                                                        lambda r: untrained_sets(r, arm)[0]))
    return {"n_seeds": len(seeds), "all_train": all_train,
            "untrained_stage1_arm": arm if sub else None, "untrained_stage1": sub}


def _vs_noise(grid: Grid, arm: str) -> dict | None:
    """Stage-1 moves of ``arm`` vs noise-control moves, both over its stage-1 untrained set,
    paired question by question."""
    seeds = grid.seeds_with(lambda r: r.get("noise_control") is not None and arm in r["arms"]
                            and r["arms"][arm]["stages"])
    if not seeds:
        return None
    before, ids = (lambda r: r["stage0"]["train"]), (lambda r: untrained_sets(r, arm)[0])
    arm_f = move_arrays(grid, seeds, before, lambda r: r["arms"][arm]["stages"][0]["train_after"], ids)
    noise_f = move_arrays(grid, seeds, before, lambda r: r["noise_control"]["train"], ids)
    arm_m, noise_m = move_figures(grid, seeds, arm_f), move_figures(grid, seeds, noise_f)
    d = grid.design("train", seeds)
    out: dict[str, Any] = {"stage": stage_name(grid.results, arm, 0), "n_seeds": len(seeds)}
    for k in MOVE_KEYS:
        if k == "net":
            a, b = arm_f["up"] - arm_f["down"], noise_f["up"] - noise_f["down"]
        else:
            a, b = arm_f[k], noise_f[k]
        diff = stats.paired_difference(d, a, b, arm_f["mask"], counts=True)
        out[k] = {"arm": arm_m[k], "noise": noise_m[k], "difference": diff,
                  "excludes_zero": stats.excludes_zero(diff)}
    return out


def build_report(results: list[dict], *, config: dict | None = None, draws: int = stats.DRAWS,
                 machine: dict | None = None) -> dict:
    """Aggregate per-seed results (see ``gradual_jax.report``) into a JSON-serialisable report.

    Keys: ``n_seeds``, ``seeds``, ``categories``, ``reference_arm``, ``machine`` (``machine``, by
    default ``machine_info()`` of this machine), ``intervals`` (how they are built), ``stages``,
    ``arms``, ``comparisons`` (paired differences per pair of arms, McNemar on test accuracy),
    ``stage1_controls``, ``shared_models``, ``knowledge_measure``, ``knowledge_gain_pct``,
    ``untrained_upgrades``, ``noise_control``, ``vs_noise``, ``transitions``, ``wall_seconds``
    and ``config`` (echoed). Deterministic: the same results give the same report. Raises
    ValueError naming the offending key when ``results`` is malformed.
    """
    validate_results(results)
    grid = Grid(results, draws=draws, seed=stats.RNG_SEED)
    arms = arm_names(results)
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else (arms[0] if arms else None)
    walls = [float(r["wall_seconds"]) for r in results if r.get("wall_seconds") is not None]
    return {
        "n_seeds": len(results),
        "seeds": [r["seed"] for r in results],
        "categories": list(CATEGORIES),
        "reference_arm": ref,
        "machine": machine if machine is not None else machine_info(),
        "intervals": {"level": 0.95, "method": "crossed question x seed bootstrap with a Student-t "
                      "seed term (gradual_jax.stats)", "draws": draws,
                      "crossed": grid.designs["train"].crossed and grid.designs["test"].crossed},
        "stages": _stages_section(grid, ref),
        "arms": {a: _arm_section(grid, a) for a in arms},
        "comparisons": paired.comparisons(grid, arms),
        "stage1_controls": paired.stage1_controls(grid),
        "shared_models": paired.shared_models(results),
        "knowledge_measure": paired.knowledge_measure(grid, arms),
        "knowledge_gain_pct": _knowledge_gain(grid),
        "untrained_upgrades": {a: _untrained_upgrades(grid, a) for a in arms},
        "noise_control": _noise_control(grid, ref),
        "vs_noise": {a: _vs_noise(grid, a) for a in arms},
        "transitions": {a: _transitions(results, a) for a in arms},
        "wall_seconds": {"total": sum(walls), "per_seed": stats.range_figure(walls)},
        "config": config,
    }
