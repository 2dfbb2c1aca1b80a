"""Arms compared on the same questions and seeds: paired differences, exact McNemar, stage 1
against its controls, models two arms share, and the continuous knowledge measure.

Every difference is computed question by question inside each seed and resampled with the same
question draws for both sides (``gradual_jax.stats``), so what the arms share cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradual_jax import stats
from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.report.data import (
    HK,
    UK,
    WK,
    Grid,
    arm_names,
    arm_probes,
    move_flags,
    n_stages,
    p_gold_probes,
    stage_name,
    trained_ever,
    untrained_sets,
)

PAIRS = (("two_stage", "one_stage"), ("two_stage", "random_subset"), ("one_stage", "random_subset"))
CONTROL_KEYS = ("from_weak_or_unknown_up", "up", "net")


def _with(fig: dict) -> dict:
    return {**fig, "excludes_zero": stats.excludes_zero(fig)}


def _final_probe(r: Mapping, arm: str) -> Mapping:
    return arm_probes(r, arm)[-1][0]


def _mcnemar(grid: Grid, seeds: Sequence[int], a: str, b: str) -> dict:
    """Exact McNemar on test accuracy: per seed, and pooled over seeds (which treats the seeds'
    repeats of the same questions as independent pairs)."""
    per_seed = []
    for k in seeds:
        r = grid.results[k]
        ca, cb = r["arms"][a]["test_correct"], r["arms"][b]["test_correct"]
        ids = set(ca) & set(cb)
        only_a = sum(bool(ca[i]) and not cb[i] for i in ids)
        only_b = sum(bool(cb[i]) and not ca[i] for i in ids)
        per_seed.append({"seed": r["seed"], "only_a": only_a, "only_b": only_b, "n": len(ids),
                         "p_value": stats.mcnemar_exact(only_a, only_b)})
    oa, ob = sum(s["only_a"] for s in per_seed), sum(s["only_b"] for s in per_seed)
    return {"pooled": {"only_a": oa, "only_b": ob, "p_value": stats.mcnemar_exact(oa, ob)},
            "per_seed": per_seed}


def _pair(grid: Grid, a: str, b: str) -> dict | None:
    seeds = grid.seeds_with(lambda r: a in r["arms"] and b in r["arms"])
    if not seeds:
        return None
    test, train = grid.design("test", seeds), grid.design("train", seeds)

    def right(arm):
        return grid.array("test", seeds, lambda r: {i: bool(v) for i, v in r["arms"][arm]["test_correct"].items()})

    both = grid.array("test", seeds, lambda r: set(r["arms"][a]["test_correct"]) & set(r["arms"][b]["test_correct"]))
    hk0 = grid.array("test", seeds, lambda r: [i for i, c in r["stage0"]["test"].items() if c == HK])
    everyone = grid.array("train", seeds, lambda r: list(r["stage0"]["train"]))

    def hk_final(arm):
        return grid.array("train", seeds, lambda r: [i for i, c in _final_probe(r, arm).items() if c == HK])

    def neither(r):  # untrained upgrades: stage 0 -> final probe, on questions neither arm trained
        return set(r["stage0"]["train"]) - trained_ever(r, a) - trained_ever(r, b)

    def flag(arm, key):
        return grid.array("train", seeds, lambda r: {
            i: move_flags(r["stage0"]["train"][i], _final_probe(r, arm)[i])[key] for i in neither(r)})

    mask = grid.array("train", seeds, neither)
    diff = stats.paired_difference
    return {
        "a": a, "b": b, "n_seeds": len(seeds),
        "test_accuracy": _with(diff(test, right(a), right(b), both)),
        "retention": _with(diff(test, right(a), right(b), both * hk0)),
        "train_highly_known": _with(diff(train, hk_final(a), hk_final(b), everyone, counts=True)),
        "untrained_upgrades": _with(diff(train, flag(a, "from_weak_or_unknown_up"),
                                         flag(b, "from_weak_or_unknown_up"), mask, counts=True)),
        "untrained_up": _with(diff(train, flag(a, "up"), flag(b, "up"), mask, counts=True)),
        "untrained_net": _with(diff(train, flag(a, "net"), flag(b, "net"), mask, counts=True)),
        "mcnemar_test_accuracy": _mcnemar(grid, seeds, a, b),
    }


def comparisons(grid: Grid, arms: Sequence[str]) -> dict[str, dict]:
    """Per pair of arms present (``a_vs_b``): a - b in test accuracy, retention, train
    HighlyKnown after training, and untrained upgrades (WeaklyKnown/Unknown -> MaybeKnown/
    HighlyKnown from stage 0 to the final probe, on the train questions neither arm trained on;
    also any move up and the net), each with its paired interval; exact McNemar on test accuracy."""
    out = {}
    for a, b in PAIRS:
        if a in arms and b in arms:
            entry = _pair(grid, a, b)
            if entry is not None:
                out[f"{a}_vs_{b}"] = entry
    return out


def _mk_arm(grid: Grid) -> str | None:
    for arm in ("two_stage", "one_stage"):
        if any(arm in r["arms"] and r["arms"][arm]["stages"] for r in grid.results):
            return arm
    return None


def stage1_controls(grid: Grid) -> dict | None:
    """MaybeKnown stage 1 against the random subset and the noise control, on the train questions
    neither stage-1 set trained on: per row the stage-0 -> stage-1 moves (weak-up, up, net), and
    the paired differences MaybeKnown - noise, random - noise, MaybeKnown - random."""
    mk = _mk_arm(grid)
    rows = {"maybe_known": mk, "random_subset": "random_subset", "noise": None}
    have_random = any("random_subset" in r["arms"] and r["arms"]["random_subset"]["stages"] for r in grid.results)
    if mk is None:
        return None

    def ok(r):
        return (r["arms"].get(mk, {}).get("stages") and r.get("noise_control") is not None
                and (not have_random or r["arms"].get("random_subset", {}).get("stages")))

    seeds = grid.seeds_with(ok)
    if not seeds:
        return None
    d = grid.design("train", seeds)

    def untrained(r):
        ids = untrained_sets(r, mk)[0]
        return ids & untrained_sets(r, "random_subset")[0] if have_random else ids

    def after(r, row):
        if row == "noise":
            return r["noise_control"]["train"]
        return r["arms"][rows[row]]["stages"][0]["train_after"]

    mask = grid.array("train", seeds, untrained)
    present = [k for k in rows if k != "random_subset" or have_random]
    flags = {row: {key: grid.array("train", seeds, lambda r, row=row, key=key: {
        i: move_flags(r["stage0"]["train"][i], after(r, row)[i])[key] for i in untrained(r)})
        for key in ("up", "down", "from_weak_or_unknown_up")} for row in present}
    for f in flags.values():
        f["net"] = f["up"] - f["down"]
    out: dict[str, Any] = {"maybe_known_arm": mk, "n_seeds": len(seeds), "rows": {}, "differences": {}}
    for row in present:
        out["rows"][row] = {k: (stats.paired_difference(d, flags[row]["up"], flags[row]["down"], mask, counts=True)
                                if k == "net" else stats.count(d, flags[row][k], mask)) for k in CONTROL_KEYS}
    for a, b in (("maybe_known", "noise"), ("random_subset", "noise"), ("maybe_known", "random_subset")):
        if a in flags and b in flags:
            out["differences"][f"{a}_vs_{b}"] = {
                k: _with(stats.paired_difference(d, flags[a][k], flags[b][k], mask, counts=True))
                for k in CONTROL_KEYS}
    return out


def _same_stage(r: Mapping, a: str, ja: int, b: str, jb: int) -> bool:
    sa, sb = r["arms"][a]["stages"][ja], r["arms"][b]["stages"][jb]
    if set(sa["trained_ids"]) != set(sb["trained_ids"]) or sa["train_after"] != sb["train_after"] \
            or sa["test_after"] != sb["test_after"]:
        return False
    gold = [s.get(f"{split}_p_gold") for s in (sa, sb) for split in ("train", "test")]
    if all(g is not None for g in gold):  # equal float probabilities: the same weights
        return gold[0] == gold[2] and gold[1] == gold[3]
    return sa["steps"] == sb["steps"]


def shared_models(results: Sequence[Mapping]) -> list[dict]:
    """Stages of two arms that are the same model in some seeds: same training set and the same
    probe records, gold-answer probabilities included (the pipeline reuses the records of weights
    it has probed: early stopping can pick the same epoch under another step budget); without
    probabilities, also the same steps. The report shows such rows once."""
    keys = [(a, j) for a in arm_names(results) for j in range(n_stages(results, a))]
    out = []
    for n, (a, ja) in enumerate(keys):
        for b, jb in keys[n + 1:]:
            if a == b:
                continue
            both = [r for r in results if a in r["arms"] and b in r["arms"]
                    and len(r["arms"][a]["stages"]) > ja and len(r["arms"][b]["stages"]) > jb]
            same = [r["seed"] for r in both if _same_stage(r, a, ja, b, jb)]
            if same:
                out.append({"first": f"{a}/{stage_name(results, a, ja)}",
                            "same": f"{b}/{stage_name(results, b, jb)}",
                            "seeds": same, "all_seeds": len(same) == len(both)})
    return out


# ----------------------------------------------------------------------------- continuous measure


def _p_gold_seeds(grid: Grid, arm: str, split: str, j: int) -> list[int]:
    return grid.seeds_with(lambda r: arm in r["arms"] and len(r["arms"][arm]["stages"]) >= j
                           and all(p is not None for p in p_gold_probes(r, arm, split)[: j + 1]))


def _by_category(grid: Grid, seeds: Sequence[int], split: str, probs) -> dict:
    d = grid.design(split, seeds)
    x = grid.array(split, seeds, probs)
    return {c: stats.level(d, x, grid.array(split, seeds, lambda r, c=c: [
        i for i, v in r["stage0"][split].items() if v == c])) for c in CATEGORIES}


def knowledge_measure(grid: Grid, arms: Sequence[str]) -> dict | None:
    """Mean gold-answer probability (p_gold) per stage-0 category, at stage 0 and after each
    stage of each arm, train and test; and on the train questions an arm's stage 1 did not train,
    the change from stage 0 against the noise control (same questions) and against the random
    subset (questions neither trained). None when the run recorded no p_gold."""
    if not any((r.get("stage0_p_gold") or {}).get("train") for r in grid.results):
        return None
    levels: list[dict] = []
    for split in ("train", "test"):
        seeds = grid.seeds_with(lambda r: (r.get("stage0_p_gold") or {}).get(split) is not None)
        if not seeds:
            continue
        levels.append({"arm": None, "stage": "stage0", "split": split, "n_seeds": len(seeds),
                       "by_category": _by_category(grid, seeds, split, lambda r: r["stage0_p_gold"][split])})
        for arm in arms:
            for j in range(1, n_stages(grid.results, arm) + 1):
                seeds = _p_gold_seeds(grid, arm, split, j)
                if seeds:
                    levels.append({"arm": arm, "stage": stage_name(grid.results, arm, j - 1), "split": split,
                                   "n_seeds": len(seeds), "by_category": _by_category(
                                       grid, seeds, split, lambda r, arm=arm, j=j: p_gold_probes(r, arm, split)[j])})
    return {"levels": levels, "untrained_change": {a: _change(grid, a) for a in arms}}


def _change(grid: Grid, arm: str) -> dict | None:
    """Stage-1 change in p_gold on ``arm``'s untrained train questions (all, and stage-0
    WeaklyKnown/Unknown), against the noise control and the random subset."""
    def p(r, which):
        if which == "stage0":
            return r["stage0_p_gold"]["train"]
        if which == "noise":
            return (r.get("noise_control") or {}).get("train_p_gold")
        return r["arms"][which]["stages"][0].get("train_p_gold") if r["arms"].get(which, {}).get("stages") else None

    seeds = grid.seeds_with(lambda r: (r.get("stage0_p_gold") or {}).get("train") is not None
                            and p(r, arm) is not None)
    if not seeds:
        return None
    d = grid.design("train", seeds)
    out: dict[str, Any] = {"stage": stage_name(grid.results, arm, 0), "n_seeds": len(seeds)}
    for subset, cats in (("all", CATEGORIES), ("weak_or_unknown", (WK, UK))):
        def ids(r, others=()):
            keep = untrained_sets(r, arm)[0]
            for o in others:
                keep = keep & untrained_sets(r, o)[0]
            return [i for i in keep if r["stage0"]["train"][i] in cats]

        def x(which, s=seeds):
            return grid.array("train", s, lambda r: p(r, which))

        mask = grid.array("train", seeds, ids)
        entry = {"change": stats.paired_difference(d, x(arm), x("stage0"), mask)}
        noise_seeds = [k for k in seeds if p(grid.results[k], "noise") is not None]
        if noise_seeds:
            dn, xn = grid.design("train", noise_seeds), (lambda w: x(w, noise_seeds))
            mn = grid.array("train", noise_seeds, ids)
            entry["noise_change"] = stats.paired_difference(dn, xn("noise"), xn("stage0"), mn)
            entry["vs_noise"] = _with(stats.paired_difference(dn, xn(arm), xn("noise"), mn))
        rand_seeds = [k for k in seeds if arm != "random_subset" and p(grid.results[k], "random_subset") is not None]
        if rand_seeds:
            dr, xr = grid.design("train", rand_seeds), (lambda w: x(w, rand_seeds))
            mr = grid.array("train", rand_seeds, lambda r: ids(r, ("random_subset",)))
            entry["vs_random_subset"] = _with(stats.paired_difference(dr, xr(arm), xr("random_subset"), mr))
        out[subset] = entry
    return out
