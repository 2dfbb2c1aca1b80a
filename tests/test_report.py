"""Report: hand-worked counts, moves, transitions, gain, accuracy, intervals, files."""

import copy
import json
import math

import pytest

from gradual_jax import report as R
from gradual_jax.knowledge.categories import CATEGORIES

HK, MK, WK, UK = CATEGORIES
TRAIN = tuple("abcdef")
TEST = ("t1", "t2", "t3", "t4")
T1 = 12.7062  # t(0.975, df=1)


def probe(ids, cats):
    return dict(zip(ids, cats))


def stage(name, trained, train_after, test_after, steps=10):
    curve = [{"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3} for s in range(0, steps, 2)]
    return {"name": name, "trained_ids": list(trained), "selected_counts": {MK: len(trained)},
            "train_after": probe(TRAIN, train_after), "test_after": probe(TEST, test_after),
            "steps": steps, "best_epoch": 1, "dev_accuracy": [0.1, 0.2], "curve": curve}


def correct(*flags):
    return dict(zip(TEST, flags))


# Seed 0. Moves worked by hand (untrained ids only):
#   two_stage stage1 (untrained a d e f): d WK->MK up (weak up)           -> up 1 down 0 weak-up 1
#   two_stage stage2 (untrained e f):     e UK->MK up (weak up)           -> up 1 down 0 weak-up 1
#   one_stage stage1 (untrained a d e f): d WK->UK down, f UK->WK up      -> up 1 down 1 weak-up 0
#   noise, all train: c MK->HK, d WK->MK (weak up), f UK->WK              -> up 3 down 0 weak-up 1
#   noise, two_stage stage-1 untrained (a d e f): d, f up                 -> up 2 down 0 weak-up 1
#   final train HK: two_stage a b d = 3, one_stage a b = 2 -> gain 100*(3-2)/2 = 50
SEED0 = {
    "seed": 0,
    "stage0": {"train": probe(TRAIN, [HK, MK, MK, WK, UK, UK]),
               "test": probe(TEST, [HK, HK, MK, UK])},
    "noise_control": {"train": probe(TRAIN, [HK, MK, HK, MK, UK, WK]),
                      "test": probe(TEST, [HK, HK, MK, UK])},
    "arms": {
        "two_stage": {
            "stages": [stage("stage1", "bc", [HK, HK, HK, MK, UK, UK], [HK, MK, MK, UK]),
                       stage("stage2", "da", [HK, HK, MK, HK, MK, UK], [HK, HK, HK, UK], steps=4)],
            "test_correct": correct(True, True, True, False)},
        "one_stage": {
            "stages": [stage("stage1", "bc", [HK, HK, MK, UK, UK, WK], [HK, MK, WK, UK])],
            "test_correct": correct(True, False, False, False)},
    },
    "wall_seconds": 10.0,
}

# Seed 1:
#   two_stage stage1 (untrained a d e): d UK->MK, e WK->HK                -> up 2 down 0 weak-up 2
#   two_stage stage2 (untrained e):     e HK->HK                          -> all 0
#   one_stage stage1 (untrained a d e): e WK->UK down                     -> up 0 down 1 weak-up 0
#   noise, all train and two_stage stage-1 untrained: a HK->MK            -> up 0 down 1 weak-up 0
#   final train HK: two_stage 6, one_stage a b f = 3 -> gain 100*(6-3)/3 = 100
SEED1 = {
    "seed": 1,
    "stage0": {"train": probe(TRAIN, [HK, MK, MK, UK, WK, MK]),
               "test": probe(TEST, [HK, MK, WK, UK])},
    "noise_control": {"train": probe(TRAIN, [MK, MK, MK, UK, WK, MK]),
                      "test": probe(TEST, [HK, MK, WK, UK])},
    "arms": {
        "two_stage": {
            "stages": [stage("stage1", "bcf", [HK, HK, HK, MK, HK, MK], [HK, HK, WK, UK]),
                       stage("stage2", "da", [HK] * 6, [HK, HK, MK, UK], steps=4)],
            "test_correct": correct(True, True, False, False)},
        "one_stage": {
            "stages": [stage("stage1", "bcf", [HK, HK, MK, UK, UK, HK], [HK, MK, WK, UK])],
            "test_correct": correct(True, False, False, False)},
    },
    "wall_seconds": 14.0,
}


@pytest.fixture(scope="module")
def rep():
    return R.build_report([SEED0, SEED1], config={"name": "test"})


def mi_close(mi, mean, half=0.0):
    assert mi["mean"] == pytest.approx(mean)
    assert mi["low"] == pytest.approx(mean - half)
    assert mi["high"] == pytest.approx(mean + half)


def test_mean_interval_t_hand_value():
    mi = R.mean_interval([1, 2, 3])
    assert mi["mean"] == 2.0 and mi["values"] == [1, 2, 3]
    assert mi["low"] == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-3)
    assert mi["high"] == pytest.approx(2 + 4.303 / math.sqrt(3), abs=1e-3)
    assert R.mean_interval([5]) == {"mean": 5.0, "low": 5.0, "high": 5.0, "values": [5]}
    assert R.mean_interval([])["mean"] is None


def test_t_quantile_matches_scipy_beyond_table():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 10, 30, 31, 40, 100, 1000):
        assert R.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_stage_counts(rep):
    assert [s["name"] for s in rep["stages"]] == ["stage0", "stage1", "stage2"]
    s0, s1, s2 = rep["stages"]
    assert s0["train_counts"][HK]["values"] == [1, 1]
    assert s0["train_counts"][MK]["values"] == [2, 3]
    assert s0["train_counts"][UK]["values"] == [2, 1]
    mi_close(s0["train_counts"][MK], 2.5, T1 * 0.5)  # sd 0.7071, /sqrt(2) = 0.5
    assert s0["test_counts"][WK]["values"] == [0, 1]
    assert [s1["train_counts"][c]["values"] for c in CATEGORIES] == [[3, 4], [1, 2], [0, 0], [2, 0]]
    assert s2["train_counts"][HK]["values"] == [3, 6]
    assert s2["test_counts"][HK]["values"] == [3, 2]


def test_arm_headlines(rep):
    two, one = rep["arms"]["two_stage"], rep["arms"]["one_stage"]
    mi_close(two["test_accuracy"], 0.625, T1 * 0.125)  # [0.75, 0.5]
    mi_close(one["test_accuracy"], 0.25)
    assert two["train_highly_known"]["values"] == [3, 6]
    assert one["train_highly_known"]["values"] == [2, 3]
    assert two["steps"]["values"] == [14, 14]
    by_two, by_one = two["test_accuracy_by_category"], one["test_accuracy_by_category"]
    assert by_two[HK]["values"] == [1.0, 1.0]
    assert by_two[MK]["values"] == [1.0, 1.0]
    assert by_two[WK]["values"] == [0.0]  # only seed 1 has a WeaklyKnown test example
    assert by_two[UK]["values"] == [0.0, 0.0]
    assert by_one[HK]["values"] == [0.5, 1.0]
    assert one["retention"] == by_one[HK]
    mi_close(one["retention"], 0.75, T1 * 0.25)


def test_knowledge_gain(rep):
    gain = rep["knowledge_gain_pct"]
    assert gain["values"] == [50.0, 100.0]
    mi_close(gain, 75.0, T1 * 25.0)
    assert R.build_report([{**SEED0, "arms": {"two_stage": SEED0["arms"]["two_stage"]}}])[
        "knowledge_gain_pct"] is None


def moves(entry):
    """Per-seed values as (up, down, net, from_weak_or_unknown_up)."""
    return tuple(entry[k]["values"] for k in R.MOVE_KEYS)


def test_untrained_upgrades(rep):
    s1, s2 = rep["untrained_upgrades"]["two_stage"]
    assert moves(s1) == ([1, 2], [0, 0], [1, 2], [1, 2])
    assert moves(s2) == ([1, 0], [0, 0], [1, 0], [1, 0])
    (o1,) = rep["untrained_upgrades"]["one_stage"]
    assert moves(o1) == ([1, 0], [1, 1], [0, -1], [0, 0])


def test_noise_control(rep):
    nc = rep["noise_control"]
    assert nc["untrained_stage1_arm"] == "two_stage"
    assert moves(nc["all_train"]) == ([3, 0], [0, 1], [3, -1], [1, 0])
    assert moves(nc["untrained_stage1"]) == ([2, 0], [0, 1], [2, -1], [1, 0])


def test_comparisons(rep):
    comp = rep["comparisons"]["two_stage"]
    assert comp["up"]["difference"]["values"] == [-1, 2]
    mi_close(comp["up"]["difference"], 0.5, T1 * 1.5)
    assert comp["up"]["excludes_zero"] is False
    assert comp["net"]["difference"]["values"] == [-1, 3]
    assert rep["comparisons"]["one_stage"]["up"]["difference"]["values"] == [-1, 0]
    # Two identical seeds: zero spread, so a non-zero difference excludes 0.
    twin = R.build_report([SEED0, {**SEED0, "seed": 5}])["comparisons"]["two_stage"]
    assert twin["up"]["difference"]["values"] == [-1, -1] and twin["up"]["excludes_zero"] is True
    assert twin["from_weak_or_unknown_up"]["excludes_zero"] is False


def test_transitions(rep):
    t1 = rep["transitions"]["two_stage"][0]
    assert t1["stage"] == "stage1"
    assert t1["train"]["sum"] == [[2, 0, 0, 0], [4, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 2]]
    assert t1["train"]["mean"][1] == [2.0, 0.5, 0.0, 0.0]
    # test, seed 0: t1 HK->HK, t2 HK->MK, t3 MK->MK, t4 UK->UK
    #       seed 1: t1 HK->HK, t2 MK->HK, t3 WK->WK, t4 UK->UK
    assert t1["test"]["sum"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]]
    assert len(rep["transitions"]["one_stage"]) == 1


def test_markdown_shows_figures(rep):
    md = R.render_markdown(rep)
    assert "75.0 [-242.7, 392.7] %" in md  # knowledge gain: 75 +- 12.7062*25
    assert "62.5 [-96.3, 221.3]" in md  # two_stage test accuracy (%)
    assert "| one_stage | 2 | 25 [25, 25] | 75.0 [-242.7, 392.7] |" in md
    assert "2.5 [-3.9, 8.9]" in md  # stage-0 MaybeKnown train count
    assert "noise control" in md and "excludes 0" in md
    assert "(categories.png)" in md and "(transitions_two_stage_stage2.png)" in md
    assert "One seed" not in md
    # seed times 10 and 14 s: their sum is not the wall time when seeds ran at once
    assert "Seed time: 24.0 s summed over seeds" in md and "This command" not in md
    assert "This command: 20.5 s wall" in R.render_markdown({**rep, "invocation_seconds": 20.5})


def test_write_report_files(rep, tmp_path):
    paths = R.write_report(rep, [SEED0, SEED1], tmp_path / "out")
    names = [p.name for p in paths]
    assert names[:2] == ["report.json", "report.md"]
    assert set(names[2:]) == {
        "categories.png", "accuracy_by_category.png", "training_curves.png",
        "transitions_two_stage_stage1.png", "transitions_two_stage_stage2.png",
        "transitions_one_stage_stage1.png"}
    for p in paths:
        assert p.stat().st_size > 0
    for p in paths[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000
    assert json.loads(paths[0].read_text())["knowledge_gain_pct"]["values"] == [50.0, 100.0]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(names)  # no tmp left


def test_one_seed(tmp_path):
    rep = R.build_report([SEED1])
    assert rep["n_seeds"] == 1
    mi_close(rep["knowledge_gain_pct"], 100.0)
    assert rep["comparisons"]["two_stage"]["up"]["excludes_zero"] is None
    md = R.render_markdown(rep)
    assert "One seed" in md and "100 [100, 100] %" in md
    paths = R.write_report(rep, [SEED1], tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_no_noise_control_and_uneven_stages():
    short = copy.deepcopy(SEED1)
    short["noise_control"] = None
    short["arms"]["two_stage"]["stages"].pop()
    rep = R.build_report([SEED0, short])
    assert rep["stages"][2]["n_seeds"] == 1
    assert rep["stages"][2]["train_counts"][HK]["values"] == [3]
    assert rep["noise_control"]["n_seeds"] == 1
    assert rep["comparisons"]["two_stage"]["n_seeds"] == 1
    assert "n/a" not in R.render_markdown(rep).split("## Headline")[1].split("##")[0]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r["arms"]["two_stage"]["stages"][0]["train_after"].pop("a"), "['train_after']"),
    (lambda r: r["stage0"]["train"].__setitem__("a", "Known"), "unknown category 'Known'"),
    (lambda r: r["arms"]["one_stage"]["stages"][0].pop("steps"), "missing key 'steps'"),
    (lambda r: r["arms"]["one_stage"]["test_correct"].__setitem__("zz", True), "['test_correct']"),
])
def test_bad_input_names_the_key(mutate, fragment):
    bad = copy.deepcopy(SEED0)
    mutate(bad)
    with pytest.raises(ValueError) as info:
        R.build_report([SEED1, bad])
    msg = str(info.value)
    assert fragment in msg and msg.startswith("results[1]") and "\n" not in msg
