"""The report's input: validation, per-seed counts and moves, and per-question arrays.

A "move" compares an example's category at one probe with another; "up" means a better-known
category (lower ``CATEGORY_RANK``). "Untrained" at stage i of an arm: not in ``trained_ids`` of
any of that arm's stages 1..i. Stages are aligned across seeds by position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradual_jax.knowledge.categories import CATEGORIES, CATEGORY_RANK
from gradual_jax.stats import Design

HK, MK, WK, UK = CATEGORIES
MOVE_KEYS = ("up", "down", "net", "from_weak_or_unknown_up")
STAGE_KEYS = ("name", "trained_ids", "train_after", "test_after", "steps")
SPLITS = ("train", "test")


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


def _check_p_gold(values: Any, where: str, ids: set) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping) or set(values) != ids:
        _fail(where, "expected a dict of the stage-0 ids -> gold-answer probability, or null")
    for key, v in values.items():
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            _fail(f"{where}[{key!r}]", f"expected a probability in [0, 1], got {v!r}")


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
        _check_p_gold(stage.get("train_p_gold"), f"{at}['train_p_gold']", train_ids)
        _check_p_gold(stage.get("test_p_gold"), f"{at}['test_p_gold']", test_ids)
        unknown = set(stage["trained_ids"]) - train_ids
        if unknown:
            _fail(f"{at}['trained_ids']", f"ids not in stage-0 train: {sorted(unknown, key=str)[:5]}")
    unknown = set(arm["test_correct"]) - test_ids
    if unknown:
        _fail(f"{where}['test_correct']", f"ids not in stage-0 test: {sorted(unknown, key=str)[:5]}")


def validate_results(results: Sequence[Mapping]) -> None:
    """Raise ValueError with one line naming the offending key if ``results`` is malformed.

    Checks the structure documented in ``gradual_jax.report``: keys present, categories known,
    every re-probe covering exactly the stage-0 ids, gold-answer probabilities in [0, 1],
    trained and test-correct ids known.
    """
    if not isinstance(results, Sequence) or len(results) == 0:
        _fail("results", "expected a non-empty list of per-seed result dicts")
    for i, res in enumerate(results):
        where = f"results[{i}]"
        for key in ("seed", "stage0", "arms"):
            if key not in res:
                _fail(where, f"missing key {key!r}")
        for split in SPLITS:
            if split not in res["stage0"]:
                _fail(f"{where}['stage0']", f"missing key {split!r}")
            _check_probe(res["stage0"][split], f"{where}['stage0'][{split!r}]")
        train_ids, test_ids = set(res["stage0"]["train"]), set(res["stage0"]["test"])
        for split, ids in (("train", train_ids), ("test", test_ids)):
            _check_p_gold((res.get("stage0_p_gold") or {}).get(split),
                          f"{where}['stage0_p_gold'][{split!r}]", ids)
        noise = res.get("noise_control")
        if noise is not None:
            _check_probe(noise.get("train"), f"{where}['noise_control']['train']", train_ids)
            _check_p_gold(noise.get("train_p_gold"), f"{where}['noise_control']['train_p_gold']",
                          train_ids)
            if "test" in noise:  # written by runs before the test re-probe was dropped
                _check_probe(noise["test"], f"{where}['noise_control']['test']", test_ids)
        for name, arm in res["arms"].items():
            _check_arm(arm, f"{where}['arms'][{name!r}]", train_ids, test_ids)


# ----------------------------------------------------------------------------- per seed


def category_counts(probe: Mapping[str, str]) -> dict[str, int]:
    """Return the number of examples per category, keyed by all four categories in order."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for cat in probe.values():
        counts[cat] += 1
    return counts


def move_flags(before: str, after: str) -> dict[str, int]:
    """One example's move as 0/1 flags ``up``, ``down``, ``from_weak_or_unknown_up`` and ``net``
    (= up - down): WeaklyKnown/Unknown before and MaybeKnown/HighlyKnown after is a weak-up."""
    a, b = CATEGORY_RANK[before], CATEGORY_RANK[after]
    up, down = int(b < a), int(b > a)
    weak = int(a >= CATEGORY_RANK[WK] and b <= CATEGORY_RANK[MK])
    return {"up": up, "down": down, "net": up - down, "from_weak_or_unknown_up": weak}


def count_moves(before: Mapping[str, str], after: Mapping[str, str], ids: Iterable[str]) -> dict:
    """Count moves of ``ids`` from probe ``before`` to probe ``after``: ``up``, ``down``,
    ``net`` (= up - down) and ``from_weak_or_unknown_up``."""
    out = dict.fromkeys(MOVE_KEYS, 0)
    for i in ids:
        for k, v in move_flags(before[i], after[i]).items():
            out[k] += v
    return out


def transition_matrix(before: Mapping[str, str], after: Mapping[str, str]) -> list[list[int]]:
    """Return the 4x4 count matrix over the ids of ``before``.

    Rows = category before, columns = category after, both in CATEGORIES order.
    """
    m = [[0] * len(CATEGORIES) for _ in CATEGORIES]
    for i, cat in before.items():
        m[CATEGORY_RANK[cat]][CATEGORY_RANK[after[i]]] += 1
    return m


def arm_probes(res: Mapping, arm: str) -> list[tuple[Mapping, Mapping]]:
    """(train, test) probes of one seed's arm: stage 0 first, then after each stage."""
    probes = [(res["stage0"]["train"], res["stage0"]["test"])]
    probes += [(s["train_after"], s["test_after"]) for s in res["arms"][arm]["stages"]]
    return probes


def p_gold_probes(res: Mapping, arm: str, split: str) -> list[Mapping | None]:
    """Gold-answer probabilities of one seed's arm on ``split``: stage 0, then after each stage
    (None where the run did not record them)."""
    out = [(res.get("stage0_p_gold") or {}).get(split)]
    return out + [s.get(f"{split}_p_gold") for s in res["arms"][arm]["stages"]]


def untrained_sets(res: Mapping, arm: str) -> list[set]:
    """Per stage of one seed's arm: train ids not trained in that stage or any before it."""
    remaining, out = set(res["stage0"]["train"]), []
    for stage in res["arms"][arm]["stages"]:
        remaining -= set(stage["trained_ids"])
        out.append(set(remaining))
    return out


def test_probe_kind(results: Sequence[Mapping], arm: str, j: int) -> str:
    """How stage ``j`` of ``arm`` re-probed test: ``greedy`` when any seed's re-probe took the
    greedy answers only (``probe.test_after_training``: WeaklyKnown counted as Unknown), else
    ``full``."""
    kinds = {r["arms"][arm]["stages"][j].get("test_probe", "full") for r in results
             if arm in r["arms"] and len(r["arms"][arm]["stages"]) > j}
    return "greedy" if "greedy" in kinds else "full"


def trained_ever(res: Mapping, arm: str) -> set:
    return set().union(*(set(s["trained_ids"]) for s in res["arms"][arm]["stages"]))


ARM_ORDER = ("two_stage", "one_stage", "natural", "highly_known", "random_subset")


def arm_names(results: Sequence[Mapping]) -> list[str]:
    """All arms of any seed in a fixed order (ARM_ORDER, then others by name), whatever the order
    of the results' dicts: a resumed run reads them back sorted."""
    names = {a for res in results for a in res["arms"]}
    known = [a for a in ARM_ORDER if a in names]
    return known + sorted(names - set(known))


def n_stages(results: Sequence[Mapping], arm: str) -> int:
    return max((len(r["arms"][arm]["stages"]) for r in results if arm in r["arms"]), default=0)


def stage_name(results: Sequence[Mapping], arm: str, j: int) -> str:
    """Name of stage j (0-based over training stages) from the first seed that has it."""
    for r in results:
        if arm in r["arms"] and len(r["arms"][arm]["stages"]) > j:
            return str(r["arms"][arm]["stages"][j]["name"])
    raise IndexError(j)


# ----------------------------------------------------------------------------- arrays


class Grid:
    """Per-question arrays over the seeds of a run, one universe of ids per split, with the
    bootstrap draws (``gradual_jax.stats.Design``) every figure of that split shares."""

    def __init__(self, results: Sequence[Mapping], *, draws: int, seed: int):
        self.results = list(results)
        self.designs = {split: Design.build([list(r["stage0"][split]) for r in self.results],
                                            draws=draws, seed=seed) for split in SPLITS}
        self.index = {split: d.index() for split, d in self.designs.items()}

    def seeds_with(self, pred: Callable[[Mapping], bool]) -> list[int]:
        """Positions of the seeds whose result satisfies ``pred``."""
        return [k for k, r in enumerate(self.results) if pred(r)]

    def design(self, split: str, seeds: Sequence[int]) -> Design:
        d = self.designs[split]
        return Design(d.ids, d.present[list(seeds)], [d.weights[k] for k in seeds], d.crossed,
                      d.draws, d.seed)

    def array(self, split: str, seeds: Sequence[int],
              values: Callable[[Mapping], Mapping[str, float] | Iterable[str]]) -> np.ndarray:
        """(seeds, questions) array: ``values(result)`` gives id -> value, or ids (value 1);
        every other question is 0."""
        index = self.index[split]
        out = np.zeros((len(seeds), len(index)))
        for row, k in enumerate(seeds):
            vals = values(self.results[k])
            items = vals.items() if isinstance(vals, Mapping) else ((i, 1.0) for i in vals)
            for i, v in items:
                out[row, index[i]] = float(v)
        return out
