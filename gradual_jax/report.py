"""From per-seed run results to ``report.json``, ``report.md`` and PNG plots.

The report only reads what it is given: it never selects models and never looks at anything
but the results (test figures are reported, not used to choose).

Input: a list of per-seed result dicts, as produced by the pipeline::

    {
     "seed": 0,
     "stage0": {"train": {example_id: category}, "test": {example_id: category}},
     "noise_control": {"train": {id: category}} | None,   # older runs also hold "test"
     "arms": {
       "<arm>": {                      # two_stage, one_stage, natural, highly_known, random_subset
         "stages": [                   # one per training stage of that arm, in order
           {"name": "stage1", "trained_ids": [ids trained in this stage],
            "selected_counts": {category: n},
            "train_after": {id: category}, "test_after": {id: category},  # re-probe after it
            "steps": int, "best_epoch": int, "dev_accuracy": [per-epoch floats],
            "curve": [{"step": int, "loss": float, "lr": float}, ...]}
         ],
         "test_correct": {test_id: bool}   # greedy exact match of the final model on test
       }
     },
     "wall_seconds": float
    }

``noise_control`` is the unchanged stage-0 model re-probed with another seed and other prompts;
its moves are measurement noise. Every re-probe must cover the same ids as stage 0.

Conventions used throughout:

- Every figure over seeds is ``{"mean", "low", "high", "values"}``: the mean and a 95% Student-t
  interval (unclipped, so counts may get a negative ``low``). With one seed the interval is
  ``[value, value]``: no spread is measured. Seeds lacking a figure (an arm, a stage, a category
  with no test examples, a zero one-stage baseline) are left out of that figure's ``values``.
- A "move" compares an example's category at the previous probe with the next one; "up" means
  a better-known category (lower ``CATEGORY_RANK``). Moves are counted over train examples.
- "Untrained" at stage i of an arm: not in ``trained_ids`` of any of that arm's stages 1..i.
- Stages are aligned across seeds by position; a stage some seeds lack (an arm that stopped
  early) is aggregated over the seeds that have it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradual_jax import io
from gradual_jax.knowledge.categories import CATEGORIES, CATEGORY_RANK

HK, MK, WK, UK = CATEGORIES
REFERENCE_ARM = "two_stage"
BASELINE_ARM = "one_stage"
MOVE_KEYS = ("up", "down", "net", "from_weak_or_unknown_up")
STAGE_KEYS = ("name", "trained_ids", "train_after", "test_after", "steps")

# 0.975 quantile of Student's t for df = 1..30 (two-sided 95%).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959964

_COLORS = {HK: "#2b8a3e", MK: "#74c476", WK: "#fdae6b", UK: "#d94801"}


# ----------------------------------------------------------------------------- statistics


def t_quantile_975(df: int) -> float:
    """Return the 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1).

    Exact to 4 decimals for df <= 30 (table); beyond, a Cornish-Fisher expansion around the
    normal quantile, within 1e-4 of the exact value.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Iterable[float]) -> dict:
    """Return ``{"mean", "low", "high", "values"}``: the mean and its 95% Student-t interval.

    ``low``/``high`` = mean -/+ t(0.975, n-1) * sd / sqrt(n) with the sample sd (ddof 1).
    One value gives ``[value, value]``; no values give ``None`` for mean, low and high.
    ``values`` echoes the input (ints stay ints).
    """
    vals = [v if isinstance(v, int) and not isinstance(v, bool) else float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "values": []}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "values": vals}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": vals}


def _excludes_zero(mi: Mapping) -> bool | None:
    """True iff the interval lies strictly on one side of 0; None with fewer than two seeds."""
    if len(mi["values"]) < 2:
        return None
    return mi["low"] > 0 or mi["high"] < 0


# ----------------------------------------------------------------------------- validation


def _fail(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what}")


def _check_probe(probe: Any, where: str, ids: set | None = None) -> None:
    if not isinstance(probe, Mapping):
        _fail(where, f"expected a dict of example id -> category, got {type(probe).__name__}")
    for key, cat in probe.items():
        if cat not in CATEGORY_RANK:
            _fail(f"{where}[{key!r}]", f"unknown category {cat!r}; expected one of {CATEGORIES}")
    if ids is not None and set(probe) != ids:
        missing, extra = sorted(ids - set(probe), key=str), sorted(set(probe) - ids, key=str)
        _fail(where, f"ids differ from stage 0 (missing {missing[:5]}, extra {extra[:5]})")


def _check_arm(arm: Any, where: str, train_ids: set, test_ids: set) -> None:
    if not isinstance(arm, Mapping) or "stages" not in arm or "test_correct" not in arm:
        _fail(where, "expected a dict with keys 'stages' and 'test_correct'")
    for j, stage in enumerate(arm["stages"]):
        at = f"{where}['stages'][{j}]"
        for key in STAGE_KEYS:
            if key not in stage:
                _fail(at, f"missing key {key!r}")
        _check_probe(stage["train_after"], f"{at}['train_after']", train_ids)
        _check_probe(stage["test_after"], f"{at}['test_after']", test_ids)
        unknown = set(stage["trained_ids"]) - train_ids
        if unknown:
            first = sorted(unknown, key=str)[:5]
            _fail(f"{at}['trained_ids']", f"ids not in stage-0 train: {first}")
    unknown = set(arm["test_correct"]) - test_ids
    if unknown:
        first = sorted(unknown, key=str)[:5]
        _fail(f"{where}['test_correct']", f"ids not in stage-0 test: {first}")


def validate_results(results: Sequence[Mapping]) -> None:
    """Raise ValueError with one line naming the offending key if ``results`` is malformed.

    Checks the structure documented in the module docstring: keys present, categories known,
    every re-probe covering exactly the stage-0 ids, trained and test-correct ids known.
    """
    if not isinstance(results, Sequence) or len(results) == 0:
        _fail("results", "expected a non-empty list of per-seed result dicts")
    for i, res in enumerate(results):
        where = f"results[{i}]"
        for key in ("seed", "stage0", "arms"):
            if key not in res:
                _fail(where, f"missing key {key!r}")
        for split in ("train", "test"):
            if split not in res["stage0"]:
                _fail(f"{where}['stage0']", f"missing key {split!r}")
            _check_probe(res["stage0"][split], f"{where}['stage0'][{split!r}]")
        train_ids, test_ids = set(res["stage0"]["train"]), set(res["stage0"]["test"])
        noise = res.get("noise_control")
        if noise is not None:
            _check_probe(noise.get("train"), f"{where}['noise_control']['train']", train_ids)
            if "test" in noise:  # written by runs before the test re-probe was dropped
                _check_probe(noise["test"], f"{where}['noise_control']['test']", test_ids)
        for name, arm in res["arms"].items():
            _check_arm(arm, f"{where}['arms'][{name!r}]", train_ids, test_ids)


# ----------------------------------------------------------------------------- per-seed figures


def category_counts(probe: Mapping[str, str]) -> dict[str, int]:
    """Return the number of examples per category, keyed by all four categories in order."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for cat in probe.values():
        counts[cat] += 1
    return counts


def count_moves(before: Mapping[str, str], after: Mapping[str, str], ids: Iterable[str]) -> dict:
    """Count moves of ``ids`` from probe ``before`` to probe ``after``.

    Returns ``up``, ``down``, ``net`` (= up - down) and ``from_weak_or_unknown_up`` (examples
    WeaklyKnown/Unknown before and MaybeKnown/HighlyKnown after).
    """
    up = down = weak_up = 0
    for i in ids:
        a, b = CATEGORY_RANK[before[i]], CATEGORY_RANK[after[i]]
        up += b < a
        down += b > a
        weak_up += a >= CATEGORY_RANK[WK] and b <= CATEGORY_RANK[MK]
    return {"up": up, "down": down, "net": up - down, "from_weak_or_unknown_up": weak_up}


def transition_matrix(before: Mapping[str, str], after: Mapping[str, str]) -> list[list[int]]:
    """Return the 4x4 count matrix over the ids of ``before``.

    Rows = category before, columns = category after, both in CATEGORIES order.
    """
    m = [[0] * len(CATEGORIES) for _ in CATEGORIES]
    for i, cat in before.items():
        m[CATEGORY_RANK[cat]][CATEGORY_RANK[after[i]]] += 1
    return m


def _accuracy(correct: Mapping[str, bool], ids: Iterable[str]) -> float | None:
    """Fraction of ``ids`` marked correct, or None when ``ids`` is empty."""
    ids = list(ids)
    return sum(bool(correct[i]) for i in ids) / len(ids) if ids else None


def _arm_probes(res: Mapping, arm: str) -> list[tuple[Mapping, Mapping]]:
    """(train, test) probes of one seed's arm: stage 0 first, then after each stage."""
    probes = [(res["stage0"]["train"], res["stage0"]["test"])]
    probes += [(s["train_after"], s["test_after"]) for s in res["arms"][arm]["stages"]]
    return probes


def _untrained_sets(res: Mapping, arm: str) -> list[set]:
    """Per stage of one seed's arm: train ids not trained in that stage or any before it."""
    remaining, out = set(res["stage0"]["train"]), []
    for stage in res["arms"][arm]["stages"]:
        remaining -= set(stage["trained_ids"])
        out.append(set(remaining))
    return out


# ----------------------------------------------------------------------------- aggregation


def _arm_names(results: Sequence[Mapping]) -> list[str]:
    """All arms, in order of first appearance across seeds."""
    names: list[str] = []
    for res in results:
        names += [a for a in res["arms"] if a not in names]
    return names


def _with_arm(results: Sequence[Mapping], arm: str) -> list[Mapping]:
    return [r for r in results if arm in r["arms"]]


def _n_stages(results: Sequence[Mapping], arm: str) -> int:
    return max((len(r["arms"][arm]["stages"]) for r in _with_arm(results, arm)), default=0)


def _stage_name(results: Sequence[Mapping], arm: str, j: int) -> str:
    """Name of stage j (0-based over training stages) from the first seed that has it."""
    for r in _with_arm(results, arm):
        if len(r["arms"][arm]["stages"]) > j:
            return str(r["arms"][arm]["stages"][j]["name"])
    raise IndexError(j)


def _counts_mi(probes: Sequence[Mapping]) -> dict:
    """Per category, mean and interval of the counts over the given per-seed probes."""
    counts = [category_counts(p) for p in probes]
    return {c: mean_interval(k[c] for k in counts) for c in CATEGORIES}


def _reference_arm(results: Sequence[Mapping]) -> str | None:
    arms = _arm_names(results)
    return REFERENCE_ARM if REFERENCE_ARM in arms else (arms[0] if arms else None)


def _stages_section(results: Sequence[Mapping], arm: str | None) -> list[dict]:
    """Category counts at stage 0 and after each stage of ``arm``, over seeds."""
    out = [{"name": "stage0", "n_seeds": len(results),
            "train_counts": _counts_mi([r["stage0"]["train"] for r in results]),
            "test_counts": _counts_mi([r["stage0"]["test"] for r in results])}]
    if arm is None:
        return out
    for j in range(_n_stages(results, arm)):
        stages = [r["arms"][arm]["stages"][j] for r in _with_arm(results, arm)
                  if len(r["arms"][arm]["stages"]) > j]
        out.append({"name": _stage_name(results, arm, j), "n_seeds": len(stages),
                    "train_counts": _counts_mi([s["train_after"] for s in stages]),
                    "test_counts": _counts_mi([s["test_after"] for s in stages])})
    return out


def _final_train_hk(res: Mapping, arm: str) -> int:
    """Train examples HighlyKnown after the arm's last stage (stage 0 if it has none)."""
    return category_counts(_arm_probes(res, arm)[-1][0])[HK]


def _accuracy_by_category(runs: Sequence[Mapping], arm: str) -> dict:
    out = {}
    for cat in CATEGORIES:
        vals = []
        for r in runs:
            correct = r["arms"][arm]["test_correct"]
            ids = [i for i in correct if r["stage0"]["test"][i] == cat]
            acc = _accuracy(correct, ids)
            if acc is not None:
                vals.append(acc)
        out[cat] = mean_interval(vals)
    return out


def _arm_section(results: Sequence[Mapping], arm: str) -> dict:
    """Headline figures of one arm over the seeds that ran it."""
    runs = _with_arm(results, arm)
    by_cat = _accuracy_by_category(runs, arm)
    acc = [_accuracy(r["arms"][arm]["test_correct"], r["arms"][arm]["test_correct"]) for r in runs]
    return {
        "n_seeds": len(runs),
        "n_stages": _n_stages(results, arm),
        "test_accuracy": mean_interval(a for a in acc if a is not None),
        "test_accuracy_by_category": by_cat,
        "train_highly_known": mean_interval(_final_train_hk(r, arm) for r in runs),
        "retention": by_cat[HK],
        "steps": mean_interval(sum(int(s["steps"]) for s in r["arms"][arm]["stages"])
                               for r in runs),
    }


def _knowledge_gain(results: Sequence[Mapping]) -> dict | None:
    """Per seed 100*(two-one)/one of final train HighlyKnown; seeds with one == 0 are left out."""
    arms = _arm_names(results)
    if REFERENCE_ARM not in arms or BASELINE_ARM not in arms:
        return None
    vals = []
    for r in results:
        if REFERENCE_ARM in r["arms"] and BASELINE_ARM in r["arms"]:
            two, one = _final_train_hk(r, REFERENCE_ARM), _final_train_hk(r, BASELINE_ARM)
            if one > 0:
                vals.append(100.0 * (two - one) / one)
    return mean_interval(vals)


def _moves_mi(per_seed: Sequence[Mapping]) -> dict:
    return {k: mean_interval(m[k] for m in per_seed) for k in MOVE_KEYS}


def _untrained_upgrades(results: Sequence[Mapping], arm: str) -> list[dict]:
    """Per stage of ``arm``: moves of untrained train examples from the previous probe."""
    per_stage: list[list[dict]] = [[] for _ in range(_n_stages(results, arm))]
    for r in _with_arm(results, arm):
        probes, untrained = _arm_probes(r, arm), _untrained_sets(r, arm)
        for j, ids in enumerate(untrained):
            per_stage[j].append(count_moves(probes[j][0], probes[j + 1][0], ids))
    return [{"stage": _stage_name(results, arm, j), "n_seeds": len(ms), **_moves_mi(ms)}
            for j, ms in enumerate(per_stage)]


def _transitions(results: Sequence[Mapping], arm: str) -> list[dict]:
    """Per stage of ``arm``: train and test transition matrices, summed and mean over seeds."""
    out = []
    for j in range(_n_stages(results, arm)):
        runs = [r for r in _with_arm(results, arm) if len(r["arms"][arm]["stages"]) > j]
        entry: dict[str, Any] = {"stage": _stage_name(results, arm, j), "n_seeds": len(runs)}
        for split, k in (("train", 0), ("test", 1)):
            mats = [transition_matrix(_arm_probes(r, arm)[j][k], _arm_probes(r, arm)[j + 1][k])
                    for r in runs]
            total = [[sum(m[a][b] for m in mats) for b in range(4)] for a in range(4)]
            entry[split] = {"sum": total, "mean": [[v / len(runs) for v in row] for row in total]}
        out.append(entry)
    return out


def _noise_control(results: Sequence[Mapping], arm: str | None) -> dict | None:
    """Moves from stage 0 to the noise-control probe: all train, and ``arm``'s stage-1 untrained."""
    runs = [r for r in results if r.get("noise_control") is not None]
    if not runs:
        return None
    def moves(r: Mapping, ids: Iterable[str]) -> dict:
        return count_moves(r["stage0"]["train"], r["noise_control"]["train"], ids)

    all_train = [moves(r, r["stage0"]["train"]) for r in runs]
    sub = [moves(r, _untrained_sets(r, arm)[0]) for r in runs
           if arm is not None and arm in r["arms"] and r["arms"][arm]["stages"]]
    return {"n_seeds": len(runs), "all_train": _moves_mi(all_train),
            "untrained_stage1_arm": arm if sub else None,
            "untrained_stage1": _moves_mi(sub) if sub else None}


def _comparison(results: Sequence[Mapping], arm: str) -> dict | None:
    """Stage-1 moves of ``arm`` vs noise-control moves, both over its stage-1 untrained set."""
    arm_m, noise_m = [], []
    for r in results:
        if r.get("noise_control") is None or arm not in r["arms"] or not r["arms"][arm]["stages"]:
            continue
        ids, before = _untrained_sets(r, arm)[0], r["stage0"]["train"]
        arm_m.append(count_moves(before, r["arms"][arm]["stages"][0]["train_after"], ids))
        noise_m.append(count_moves(before, r["noise_control"]["train"], ids))
    if not arm_m:
        return None
    out: dict[str, Any] = {"stage": _stage_name(results, arm, 0), "n_seeds": len(arm_m)}
    for k in MOVE_KEYS:
        diff = mean_interval(a[k] - n[k] for a, n in zip(arm_m, noise_m))
        out[k] = {"arm": mean_interval(a[k] for a in arm_m),
                  "noise": mean_interval(n[k] for n in noise_m),
                  "difference": diff, "excludes_zero": _excludes_zero(diff)}
    return out


def build_report(results: list[dict], *, config: dict | None = None) -> dict:
    """Aggregate per-seed results (see module docstring) into a JSON-serialisable report.

    Keys: ``n_seeds``, ``seeds``, ``categories``, ``reference_arm``, ``stages``, ``arms``,
    ``knowledge_gain_pct``, ``untrained_upgrades``, ``noise_control``, ``comparisons``,
    ``transitions``, ``wall_seconds`` and ``config`` (echoed). Raises ValueError naming the
    offending key when ``results`` is malformed. Reads nothing but its arguments.
    """
    validate_results(results)
    arms = _arm_names(results)
    ref = _reference_arm(results)
    walls = [float(r["wall_seconds"]) for r in results if r.get("wall_seconds") is not None]
    return {
        "n_seeds": len(results),
        "seeds": [r["seed"] for r in results],
        "categories": list(CATEGORIES),
        "reference_arm": ref,
        "stages": _stages_section(results, ref),
        "arms": {a: _arm_section(results, a) for a in arms},
        "knowledge_gain_pct": _knowledge_gain(results),
        "untrained_upgrades": {a: _untrained_upgrades(results, a) for a in arms},
        "noise_control": _noise_control(results, ref),
        "comparisons": {a: _comparison(results, a) for a in arms},
        "transitions": {a: _transitions(results, a) for a in arms},
        "wall_seconds": {"total": sum(walls), "per_seed": mean_interval(walls)},
        "config": config,
    }


# ----------------------------------------------------------------------------- markdown


def fmt_mi(mi: Mapping | None, *, scale: float = 1.0, digits: int = 2) -> str:
    """Format a mean/interval dict as ``mean [low, high]``; ``n/a`` when there is no value.

    All three numbers get ``digits`` decimals, or none when all three are whole numbers.
    """
    if mi is None or mi.get("mean") is None:
        return "n/a"
    nums = [mi[k] * scale for k in ("mean", "low", "high")]
    d = 0 if all(abs(x - round(x)) < 1e-9 for x in nums) else digits
    m, lo, hi = (f"{x:.{d}f}" for x in nums)
    return f"{m} [{lo}, {hi}]"


def _pct(mi: Mapping | None) -> str:
    return fmt_mi(mi, scale=100.0, digits=1)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name))


def plot_files(report: Mapping) -> list[str]:
    """File names of the plots ``write_report`` writes for ``report``, in a fixed order."""
    names = ["categories.png", "accuracy_by_category.png", "training_curves.png"]
    for arm, stages in report["transitions"].items():
        names += [f"transitions_{_safe(arm)}_{_safe(s['stage'])}.png" for s in stages]
    return names


def _md_headline(report: Mapping) -> list[str]:
    lines = ["## Headline", ""]
    gain = report["knowledge_gain_pct"]
    if gain is None:
        gain_s = "n/a (needs both two_stage and one_stage)"
    else:
        gain_s = f"{fmt_mi(gain, digits=1)} %"
    lines += [f"Knowledge gain (train HighlyKnown after two_stage vs one_stage, "
              f"100*(two-one)/one per seed): **{gain_s}**", ""]
    rows = [(arm, a["n_seeds"], _pct(a["test_accuracy"]), _pct(a["retention"]),
             fmt_mi(a["train_highly_known"], digits=1), fmt_mi(a["steps"], digits=0))
            for arm, a in report["arms"].items()]
    lines += _table(["arm", "seeds", "test accuracy (%)", "retention (%)",
                     "train HighlyKnown (final)", "steps"], rows)
    return lines + ["", "Retention = test accuracy on examples HighlyKnown at stage 0.", ""]


def _md_stages(report: Mapping) -> list[str]:
    lines = [f"## Category counts per stage (arm: {report['reference_arm']})", ""]
    rows = []
    for st in report["stages"]:
        for split in ("train", "test"):
            counts = st[f"{split}_counts"]
            rows.append([st["name"], split] + [fmt_mi(counts[c], digits=1) for c in CATEGORIES])
    return lines + _table(["stage", "split", *CATEGORIES], rows) + [""]


def _move_cells(m: Mapping) -> list[str]:
    return [fmt_mi(m[k], digits=1) for k in MOVE_KEYS]


def _md_moves(report: Mapping) -> list[str]:
    lines = ["## Untrained train examples that moved", "",
             "Moves from the previous probe, counting only train examples not trained in any "
             "stage so far. Weak/Unknown up = WeaklyKnown/Unknown -> MaybeKnown/HighlyKnown.", ""]
    header = ["arm", "stage", "up", "down", "net", "Weak/Unknown up"]
    rows = [[arm, s["stage"], *_move_cells(s)]
            for arm, stages in report["untrained_upgrades"].items() for s in stages]
    noise = report["noise_control"]
    if noise is not None:
        rows.append(["noise control", "all train", *_move_cells(noise["all_train"])])
        if noise["untrained_stage1"] is not None:
            label = f"{noise['untrained_stage1_arm']} stage-1 untrained"
            rows.append(["noise control", label, *_move_cells(noise["untrained_stage1"])])
    lines += _table(header, rows) + [""]
    if noise is None:
        lines += ["No noise control was run.", ""]
    return lines + _md_comparisons(report)


def _md_comparisons(report: Mapping) -> list[str]:
    lines = ["### Stage 1 vs noise control", "",
             "Both counted over each arm's stage-1 untrained set; difference = arm - noise per "
             "seed. 'excludes 0' needs at least two seeds.", ""]
    rows = []
    for arm, comp in report["comparisons"].items():
        if comp is None:
            continue
        for k in MOVE_KEYS:
            c = comp[k]
            ex = {True: "yes", False: "no", None: "n/a"}[c["excludes_zero"]]
            rows.append([arm, k, fmt_mi(c["arm"], digits=1), fmt_mi(c["noise"], digits=1),
                         fmt_mi(c["difference"], digits=1), ex])
    if not rows:
        return lines + ["No comparison: no noise control.", ""]
    return lines + _table(["arm", "moves", "arm", "noise", "difference", "excludes 0"], rows) + [""]


def _md_accuracy(report: Mapping) -> list[str]:
    lines = ["## Test accuracy by stage-0 category (%)", ""]
    rows = [[arm] + [_pct(a["test_accuracy_by_category"][c]) for c in CATEGORIES]
            for arm, a in report["arms"].items()]
    return lines + _table(["arm", *CATEGORIES], rows) + [""]


def _md_transitions(report: Mapping) -> list[str]:
    lines = ["## Transitions (train, summed over seeds; rows = from, columns = to)", ""]
    for arm, stages in report["transitions"].items():
        for s in stages:
            lines += [f"**{arm} / {s['stage']}** ({s['n_seeds']} seeds)", ""]
            rows = [[c, *map(str, row)] for c, row in zip(CATEGORIES, s["train"]["sum"])]
            lines += _table(["from \\ to", *CATEGORIES], rows) + [""]
    return lines


def render_markdown(report: Mapping) -> str:
    """Render ``report`` (from ``build_report``) as Markdown: headline, counts per stage, moves
    vs noise control, accuracy by category, transitions and links to the plots. Every figure
    over seeds is shown as ``mean [low, high]`` (95% Student-t interval).
    """
    n = report["n_seeds"]
    lines = ["# Gradual learning report", "",
             f"Seeds: {n} ({', '.join(map(str, report['seeds']))}). Every figure is "
             "`mean [low, high]`, a 95% Student-t interval over seeds.", ""]
    if n == 1:
        lines += ["**One seed: every interval is [value, value]; no spread is measured.**", ""]
    lines += _md_headline(report) + _md_stages(report) + _md_moves(report)
    lines += _md_accuracy(report) + _md_transitions(report)
    lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plot_files(report)] + [""]
    wall = report["wall_seconds"]
    per_seed = fmt_mi(wall["per_seed"], digits=1)
    lines += [f"Seed time: {wall['total']:.1f} s summed over seeds (seeds run at once overlap in "
              f"wall time); per seed {per_seed} s."]
    if report.get("invocation_seconds") is not None:
        lines += [f"This command: {report['invocation_seconds']:.1f} s wall, loading included "
                  "(less when it resumed a run)."]
    lines += [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # Figure + Agg canvas without pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _plot_categories(report: Mapping):
    stages = report["stages"]
    fig = _figure(max(5.0, 1.2 * len(stages) + 2), 3.4)
    for k, split in enumerate(("train", "test")):
        ax = fig.add_subplot(1, 2, k + 1)
        bottom = [0.0] * len(stages)
        for c in CATEGORIES:
            h = [s[f"{split}_counts"][c]["mean"] or 0.0 for s in stages]
            ax.bar(range(len(stages)), h, bottom=bottom, color=_COLORS[c], label=c)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set_xticks(range(len(stages)), [s["name"] for s in stages], fontsize=8)
        ax.set_title(f"{split} (mean over seeds)", fontsize=9)
    fig.axes[0].set_ylabel("examples")
    fig.suptitle(f"SliCK categories per stage ({report['reference_arm']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    return fig


def _plot_transition(arm: str, entry: Mapping):
    fig = _figure(7.0, 3.2)
    short = ["HK", "MK", "WK", "UK"]
    for k, split in enumerate(("train", "test")):
        ax = fig.add_subplot(1, 2, k + 1)
        m = entry[split]["sum"]
        ax.imshow(m, cmap="Blues")
        peak = max(max(row) for row in m) or 1
        for a in range(4):
            for b in range(4):
                color = "white" if m[a][b] > peak / 2 else "black"
                ax.text(b, a, str(m[a][b]), ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(4), short)
        ax.set_yticks(range(4), short)
        ax.set_xlabel("to")
        ax.set_ylabel("from")
        ax.set_title(split, fontsize=9)
    fig.suptitle(f"{arm} / {entry['stage']} (summed over {entry['n_seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_accuracy(report: Mapping):
    arms = list(report["arms"])
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        by_cat = report["arms"][arm]["test_accuracy_by_category"]
        xs, hs, errs = [], [], [[], []]
        for x, c in enumerate(CATEGORIES):
            mi = by_cat[c]
            if mi["mean"] is None:
                continue
            xs.append(x + (k - (len(arms) - 1) / 2) * width)
            hs.append(mi["mean"])
            errs[0].append(mi["mean"] - mi["low"])
            errs[1].append(mi["high"] - mi["mean"])
        ax.bar(xs, hs, width=width, yerr=errs, capsize=2, label=arm)
    ax.set_xticks(range(4), CATEGORIES, fontsize=8)
    ax.set_xlabel("stage-0 category of the test example")
    ax.set_ylabel("test exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Test accuracy by stage-0 category (95% t interval)", fontsize=10)
    fig.tight_layout()
    return fig


def _seed0(results: Sequence[Mapping]) -> Mapping:
    return next((r for r in results if r["seed"] == 0), results[0])


def _plot_curves(results: Sequence[Mapping]):
    res = _seed0(results)
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for arm, data in res["arms"].items():
        offset = 0.0
        for stage in data["stages"]:
            curve = stage.get("curve") or []
            if not curve:
                continue
            steps = [float(p["step"]) for p in curve]
            # Stages whose steps restart from zero are drawn after the previous stage's end.
            shift = offset if steps[0] < offset else 0.0
            ax.plot([s + shift for s in steps], [p["loss"] for p in curve],
                    label=f"{arm}/{stage['name']}", linewidth=1)
            offset = steps[-1] + shift
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training curves (seed {res['seed']})", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no curves recorded", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- writing


def _save_fig(fig, path: Path) -> Path:
    return io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_report(report: dict, results: list[dict], out_dir) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir`` (created if needed).

    Each file is written to a temporary name and renamed into place. ``results`` supplies the
    training curves (seed 0, else the first seed). Returns the written paths: json, md, then
    the plots in ``plot_files(report)`` order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, allow_nan=False, default=str)
    paths = [io.atomic_write(out / "report.json", lambda p: p.write_text(text + "\n")),
             io.atomic_write(out / "report.md", lambda p: p.write_text(render_markdown(report)))]
    names = plot_files(report)
    figs = [_plot_categories(report), _plot_accuracy(report), _plot_curves(results)]
    figs += [_plot_transition(arm, e) for arm, es in report["transitions"].items() for e in es]
    paths += [_save_fig(fig, out / name) for fig, name in zip(figs, names)]
    return paths
