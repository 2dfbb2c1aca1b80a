"""Report: hand-worked counts, moves, transitions, gain, accuracy, paired differences, McNemar,
the continuous measure, intervals in range, files."""

import copy
import json
import re

import pytest

from gradual_jax import report as R
from gradual_jax.stats import Z975, wilson_interval
from gradual_jax.knowledge.categories import CATEGORIES

HK, MK, WK, UK = CATEGORIES
TRAIN = tuple("abcdef")
TEST = ("t1", "t2", "t3", "t4")


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


def per_seed(fig):
    return fig["per_seed"]


def figures(node, path=""):
    """Every figure object in a report, with its path."""
    if isinstance(node, dict):
        if {"mean", "low", "high", "n"} <= set(node):
            yield path, node
        for k, v in node.items():
            yield from figures(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from figures(v, f"{path}[{i}]")


def test_stage_counts(rep):
    assert [s["name"] for s in rep["stages"]] == ["stage0", "stage1", "stage2"]
    s0, s1, s2 = rep["stages"]
    assert per_seed(s0["train_counts"][HK]) == [1, 1]
    assert per_seed(s0["train_counts"][MK]) == [2, 3] and s0["train_counts"][MK]["mean"] == 2.5
    assert per_seed(s0["train_counts"][UK]) == [2, 1]
    assert per_seed(s0["test_counts"][WK]) == [0, 1]
    assert [per_seed(s1["train_counts"][c]) for c in CATEGORIES] == [[3, 4], [1, 2], [0, 0], [2, 0]]
    assert per_seed(s2["train_counts"][HK]) == [3, 6]
    assert per_seed(s2["test_counts"][HK]) == [3, 2]
    assert s0["train_counts"][HK]["n"] == 6 and s0["test_counts"][HK]["n"] == 4


def test_arm_headlines(rep):
    two, one = rep["arms"]["two_stage"], rep["arms"]["one_stage"]
    assert per_seed(two["test_accuracy"]) == [0.75, 0.5] and two["test_accuracy"]["mean"] == 0.625
    # one_stage: t1 right, and only t1, in both seeds: each draw is Bin(4, 1/4)/4, whose
    # 2.5-97.5% points are 0 and 3/4 (P(<=2) = 0.949); Wilson for 1 of 4 lies inside.
    acc = one["test_accuracy"]
    assert (acc["mean"], acc["low"], acc["high"], acc["n"]) == (0.25, 0.0, 0.75, 4)
    assert per_seed(two["train_highly_known"]) == [3, 6]
    assert per_seed(one["train_highly_known"]) == [2, 3]
    assert two["steps"] == {"mean": 14.0, "low": 14.0, "high": 14.0, "n": 2, "n_seeds": 2,
                            "per_seed": [14.0, 14.0]}
    by_two, by_one = two["test_accuracy_by_category"], one["test_accuracy_by_category"]
    assert per_seed(by_two[HK]) == [1.0, 1.0]
    assert per_seed(by_two[MK]) == [1.0, 1.0]
    assert per_seed(by_two[WK]) == [None, 0.0]  # only seed 1 has a WeaklyKnown test example
    assert by_two[WK]["n_seeds"] == 1
    # no WeaklyKnown test question right in the one seed that has one: Wilson for 0 of 1
    assert (by_two[WK]["low"], by_two[WK]["high"]) == (0.0, pytest.approx(Z975**2 / (1 + Z975**2)))
    assert by_two[WK]["high"] == pytest.approx(wilson_interval(0, 1)[1])
    assert per_seed(by_one[HK]) == [0.5, 1.0]
    assert one["retention"] == by_one[HK]


def test_knowledge_gain(rep):
    gain = rep["knowledge_gain_pct"]
    assert per_seed(gain) == [50.0, 100.0] and gain["mean"] == 75.0 and gain["low"] >= -100.0
    assert R.build_report([{**SEED0, "arms": {"two_stage": SEED0["arms"]["two_stage"]}}])[
        "knowledge_gain_pct"] is None


def moves(entry):
    """Per-seed values as (up, down, net, from_weak_or_unknown_up)."""
    return tuple(per_seed(entry[k]) for k in R.MOVE_KEYS)


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


def test_vs_noise(rep):
    comp = rep["vs_noise"]["two_stage"]
    assert per_seed(comp["up"]["difference"]) == [-1, 2]
    assert comp["up"]["excludes_zero"] is False
    assert per_seed(comp["net"]["difference"]) == [-1, 3]
    assert per_seed(rep["vs_noise"]["one_stage"]["up"]["difference"]) == [-1, 0]
    # Two identical seeds: no seed spread, and one more move than noise on 4 questions is not
    # enough to exclude 0 (a draw without question f or d has no difference).
    twin = R.build_report([SEED0, {**SEED0, "seed": 5}])["vs_noise"]["two_stage"]
    assert per_seed(twin["up"]["difference"]) == [-1, -1] and twin["up"]["excludes_zero"] is False


def test_paired_comparisons_by_hand(rep):
    assert list(rep["comparisons"]) == ["two_stage_vs_one_stage"]
    c = rep["comparisons"]["two_stage_vs_one_stage"]
    # test accuracy: seed 0 0.75 - 0.25, seed 1 0.5 - 0.25
    assert per_seed(c["test_accuracy"]) == [0.5, 0.25] and c["test_accuracy"]["n"] == 4
    # retention (stage-0 HighlyKnown test: t1 t2 in seed 0, t1 in seed 1): 1 - 0.5, 1 - 1
    assert per_seed(c["retention"]) == [0.5, 0.0]
    assert per_seed(c["train_highly_known"]) == [1, 3]
    # Neither arm trained e, f (seed 0) and e (seed 1). Seed 0: two e UK->MK (weak up), one
    # f UK->WK (up, not weak up). Seed 1: two e WK->HK (weak up), one e WK->UK (down).
    assert per_seed(c["untrained_upgrades"]) == [1, 1]
    assert per_seed(c["untrained_up"]) == [0, 1]
    assert per_seed(c["untrained_net"]) == [0, 2]
    # McNemar: right only under two_stage t2, t3 (seed 0) and t2 (seed 1); never only one_stage.
    mc = c["mcnemar_test_accuracy"]
    assert mc["pooled"] == {"only_a": 3, "only_b": 0, "p_value": pytest.approx(0.25)}
    assert [(s["only_a"], s["only_b"], s["p_value"]) for s in mc["per_seed"]] == [(2, 0, 0.5), (1, 0, 1.0)]
    for key in ("test_accuracy", "retention"):
        assert -1.0 <= c[key]["low"] <= c[key]["mean"] <= c[key]["high"] <= 1.0


def test_every_interval_lies_in_its_range(rep):
    found = list(figures(rep))
    assert len(found) > 80
    for path, f in found:
        assert isinstance(f["n"], int) and f["n"] >= 0, path
        if f["mean"] is None:
            continue
        assert f["low"] <= f["mean"] <= f["high"], path
    for arm in rep["arms"].values():
        for f in [arm["test_accuracy"], *arm["test_accuracy_by_category"].values()]:
            assert f["mean"] is None or 0.0 <= f["low"] <= f["high"] <= 1.0
    for st in rep["stages"]:
        for split in ("train", "test"):
            for f in st[f"{split}_counts"].values():
                assert 0.0 <= f["low"] and f["high"] <= f["n"]
    for stages in rep["untrained_upgrades"].values():
        for s in stages:
            for k in ("up", "down", "from_weak_or_unknown_up"):
                assert s[k]["low"] >= 0.0
            assert -s["net"]["n"] <= s["net"]["low"] and s["net"]["high"] <= s["net"]["n"]


def test_transitions(rep):
    t1 = rep["transitions"]["two_stage"][0]
    assert t1["stage"] == "stage1"
    assert t1["train"]["sum"] == [[2, 0, 0, 0], [4, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 2]]
    assert t1["train"]["mean"][1] == [2.0, 0.5, 0.0, 0.0]
    # test, seed 0: t1 HK->HK, t2 HK->MK, t3 MK->MK, t4 UK->UK
    #       seed 1: t1 HK->HK, t2 MK->HK, t3 WK->WK, t4 UK->UK
    assert t1["test"]["sum"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]]
    assert len(rep["transitions"]["one_stage"]) == 1


# Seed 0 with a random subset arm trained on a and e (untrained by both stage-1 sets: d, f).
#   MaybeKnown stage 1: d WK->MK (weak up), f UK->UK            -> weak-up 1, up 1, net 1
#   random subset:      d WK->WK, f UK->WK (up)                 -> weak-up 0, up 1, net 1
#   noise control:      d WK->MK (weak up), f UK->WK (up)       -> weak-up 1, up 2, net 2
SEED0_RANDOM = copy.deepcopy(SEED0)
SEED0_RANDOM["arms"]["random_subset"] = {
    "stages": [stage("stage1", "ae", [HK, MK, MK, WK, MK, WK], [HK, HK, MK, UK])],
    "test_correct": correct(False, True, False, False)}


def test_stage1_against_its_controls_by_hand():
    rep = R.build_report([SEED0_RANDOM])
    ctl = rep["stage1_controls"]
    assert ctl["maybe_known_arm"] == "two_stage"
    rows = {row: {k: per_seed(f[k]) for k in ("from_weak_or_unknown_up", "up", "net")}
            for row, f in ctl["rows"].items()}
    assert rows == {"maybe_known": {"from_weak_or_unknown_up": [1], "up": [1], "net": [1]},
                    "random_subset": {"from_weak_or_unknown_up": [0], "up": [1], "net": [1]},
                    "noise": {"from_weak_or_unknown_up": [1], "up": [2], "net": [2]}}
    diffs = {k: {m: per_seed(v[m])[0] for m in v} for k, v in ctl["differences"].items()}
    assert diffs["maybe_known_vs_noise"] == {"from_weak_or_unknown_up": 0, "up": -1, "net": -1}
    assert diffs["random_subset_vs_noise"] == {"from_weak_or_unknown_up": -1, "up": -1, "net": -1}
    assert diffs["maybe_known_vs_random_subset"] == {"from_weak_or_unknown_up": 1, "up": 0, "net": 0}
    assert ctl["rows"]["noise"]["up"]["n"] == 2
    assert set(rep["comparisons"]) == {"two_stage_vs_one_stage", "two_stage_vs_random_subset",
                                       "one_stage_vs_random_subset"}
    c = rep["comparisons"]["two_stage_vs_random_subset"]
    assert per_seed(c["test_accuracy"]) == [0.5]  # 0.75 - 0.25
    assert c["mcnemar_test_accuracy"]["pooled"]["only_a"] == 2  # t1, t3
    assert "## Stage 1 against its controls" in R.render_markdown(rep)


def test_shared_models_are_shown_once():
    shared = copy.deepcopy(SEED0)
    shared["arms"]["one_stage"]["stages"] = copy.deepcopy(SEED0["arms"]["two_stage"]["stages"][:1])
    rep = R.build_report([shared])
    assert rep["shared_models"] == [{"first": "two_stage/stage1", "same": "one_stage/stage1",
                                     "seeds": [0], "all_seeds": True}]
    md = R.render_markdown(rep)
    assert md.count("one_stage/stage1 is the same model as two_stage/stage1") == 1
    moves_table = md.split("## Untrained train examples that moved")[1].split("###")[0]
    assert "| one_stage | stage1 |" not in moves_table and "| two_stage | stage1 |" in moves_table
    assert "transitions_one_stage_stage1.png" not in R.plot_files(rep)
    assert R.build_report([SEED0])["shared_models"] == []


def with_p_gold(res, shift):
    """Gold probabilities: 0.1 * rank at stage 0 and in the noise control, plus ``shift`` after
    every stage."""
    out = copy.deepcopy(res)
    p0 = {split: {i: 0.1 * k for k, i in enumerate(sorted(res["stage0"][split]))} for split in ("train", "test")}
    out["stage0_p_gold"] = p0
    out["noise_control"]["train_p_gold"] = dict(p0["train"])
    for arm in out["arms"].values():
        for j, st in enumerate(arm["stages"], 1):
            for split in ("train", "test"):
                st[f"{split}_p_gold"] = {i: v + shift * j for i, v in p0[split].items()}
    return out


def test_continuous_knowledge_measure_by_hand():
    rep = R.build_report([with_p_gold(SEED0, 0.05), with_p_gold(SEED1, 0.05)])
    km = rep["knowledge_measure"]
    first = km["levels"][0]
    assert (first["arm"], first["stage"], first["split"]) == (None, "stage0", "train")
    # Seed 0 train p: a .0 b .1 c .2 d .3 e .4 f .5; MaybeKnown at stage 0: b c (seed 0), b c f (seed 1)
    assert per_seed(first["by_category"][MK]) == [pytest.approx(0.15), pytest.approx(0.8 / 3)]
    after = next(lv for lv in km["levels"] if lv["arm"] == "two_stage" and lv["stage"] == "stage2"
                 and lv["split"] == "train")
    assert per_seed(after["by_category"][HK]) == [pytest.approx(0.1), pytest.approx(0.1)]  # a: 0 + 2*.05
    ch = km["untrained_change"]["two_stage"]["all"]
    assert per_seed(ch["change"]) == [pytest.approx(0.05)] * 2
    assert per_seed(ch["noise_change"]) == [0.0, 0.0]
    assert ch["vs_noise"]["mean"] == pytest.approx(0.05) and ch["vs_noise"]["excludes_zero"] is True
    assert "vs_random_subset" not in ch
    assert R.build_report([SEED0])["knowledge_measure"] is None


def test_markdown_leads_with_paired_differences(rep):
    md = R.render_markdown(rep)
    head = md.split("## Headline")[1].split("\n## ")[0]
    assert "| two_stage - one_stage | test accuracy (pts) | 37.5 [" in head
    assert "3 vs 0 right only under a / b" in head and "p = 0.25" in head
    assert head.index("test accuracy (pts)") < head.index("Knowledge gain")
    assert "**75.0 [" in head
    assert "| one_stage | 2 | 25.0 [0.0, 75.0] (n=4) |" in head
    assert "noise control" in md and "excl. 0" in md
    assert re.search(r"(?<![A-Za-z])-0(\.0+)?(?=[,\] ])", md) is None  # no "-0" or "-0.0"
    assert "Machine: " in md and "one pretrained world" in md
    assert "(categories.png)" in md and "(transitions_two_stage_stage2.png)" in md
    assert "One seed" not in md
    # seed times 10 and 14 s: their sum is not the wall time when seeds ran at once
    assert "Seed time: 24.0 s summed over seeds" in md and "This command" not in md
    assert "This command: 20.5 s wall" in R.render_markdown({**rep, "invocation_seconds": 20.5})


def test_figures_print_without_minus_zero():
    fig = {"mean": -0.01, "low": -0.04, "high": 2.0, "n": 5}
    assert R.fmt_fig(fig, n=True) == "0.0 [0.0, 2.0] (n=5)"
    assert R.fmt_fig({"mean": 0.5, "low": 0.25, "high": 1.0, "n": 4}, scale=100) == "50.0 [25.0, 100.0]"
    assert R.fmt_fig({"mean": None, "low": None, "high": None, "n": 0}) == "n/a"


def test_machine_is_recorded(rep):
    assert isinstance(rep["machine"]["cpu"], str) and rep["machine"]["cpu"]
    assert R.build_report([SEED0], machine={"cpu": "X"})["machine"] == {"cpu": "X"}


def test_write_report_files(rep, tmp_path):
    paths = R.write_report(rep, [SEED0, SEED1], tmp_path / "out")
    names = [p.name for p in paths]
    assert names[:2] == ["report.json", "report.md"]
    assert set(names[2:]) == {
        "comparisons.png", "categories.png", "accuracy_by_category.png", "training_curves.png",
        "transitions_two_stage_stage1.png", "transitions_two_stage_stage2.png",
        "transitions_one_stage_stage1.png"}
    for p in paths:
        assert p.stat().st_size > 0
    for p in paths[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000
    assert json.loads(paths[0].read_text())["knowledge_gain_pct"]["per_seed"] == [50.0, 100.0]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(names)  # no tmp left


def test_one_seed(tmp_path):
    rep = R.build_report([SEED1])
    assert rep["n_seeds"] == 1
    assert rep["knowledge_gain_pct"]["mean"] == 100.0
    md = R.render_markdown(rep)
    assert "One seed" in md
    paths = R.write_report(rep, [SEED1], tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_no_noise_control_and_uneven_stages():
    short = copy.deepcopy(SEED1)
    short["noise_control"] = None
    short["arms"]["two_stage"]["stages"].pop()
    rep = R.build_report([SEED0, short])
    assert rep["stages"][2]["n_seeds"] == 1
    assert per_seed(rep["stages"][2]["train_counts"][HK]) == [3]
    assert rep["noise_control"]["n_seeds"] == 1
    assert rep["vs_noise"]["two_stage"]["n_seeds"] == 1
    assert "n/a" not in R.render_markdown(rep).split("## Headline")[1].split("\n## ")[0]


def test_the_same_results_give_the_same_report(rep):
    assert R.build_report([SEED0, SEED1], config={"name": "test"}) == rep


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r["arms"]["two_stage"]["stages"][0]["train_after"].pop("a"), "['train_after']"),
    (lambda r: r["stage0"]["train"].__setitem__("a", "Known"), "unknown category 'Known'"),
    (lambda r: r["arms"]["one_stage"]["stages"][0].pop("steps"), "missing key 'steps'"),
    (lambda r: r["arms"]["one_stage"]["test_correct"].__setitem__("zz", True), "['test_correct']"),
    (lambda r: r.__setitem__("stage0_p_gold", {"train": {"a": 2.0}}), "['stage0_p_gold']['train']"),
])
def test_bad_input_names_the_key(mutate, fragment):
    bad = copy.deepcopy(SEED0)
    mutate(bad)
    with pytest.raises(ValueError) as info:
        R.build_report([SEED1, bad])
    msg = str(info.value)
    assert fragment in msg and msg.startswith("results[1]") and "\n" not in msg


def renamed(res, suffix):
    """The same seed on other question ids (as if it had its own world)."""
    text = json.dumps(res)
    for i in (*TRAIN, *TEST):
        text = text.replace(f'"{i}"', f'"{i}{suffix}"')
    return json.loads(text)


def test_seeds_on_other_questions_are_resampled_each_within_its_own():
    rep = R.build_report([SEED0, renamed(SEED1, "_w1")])
    assert rep["intervals"]["crossed"] is False and R.build_report([SEED0, SEED1])["intervals"]["crossed"]
    assert per_seed(rep["arms"]["two_stage"]["test_accuracy"]) == [0.75, 0.5]
    assert rep["arms"]["two_stage"]["test_accuracy"]["n"] == 4  # per seed, not the 8 of the union
    assert per_seed(rep["comparisons"]["two_stage_vs_one_stage"]["train_highly_known"]) == [1, 3]


def test_a_shared_model_is_told_by_its_probabilities_not_its_steps():
    a, b = with_p_gold(SEED0, 0.05), with_p_gold(SEED0, 0.05)
    one = copy.deepcopy(a["arms"]["two_stage"]["stages"][0])
    one["steps"] = 99  # another budget, early stopping picked the same epoch
    a["arms"]["one_stage"]["stages"] = [one]
    assert R.build_report([a])["shared_models"][0]["same"] == "one_stage/stage1"
    other = copy.deepcopy(one)
    other["train_p_gold"]["a"] += 0.01  # same categories, other weights
    b["arms"]["one_stage"]["stages"] = [other]
    assert R.build_report([b])["shared_models"] == []


def test_greedy_test_reprobes_are_labelled(tmp_path):
    """Stages whose test re-probe took greedy answers only say so in report.json, the markdown
    and the plots' titles; the counts are those of the records as given."""
    results = copy.deepcopy([SEED0])
    for arm in results[0]["arms"].values():
        for st in arm["stages"]:
            st["test_probe"] = "greedy"
    rep = R.build_report(results)
    assert [s.get("test_probe") for s in rep["stages"]] == [None, "greedy", "greedy"]
    assert all(t["test_probe"] == "greedy" for arm in rep["transitions"].values() for t in arm)
    assert rep["stages"][1]["test_counts"][UK]["mean"] == 1.0
    md = R.render_markdown(rep)
    assert "stage1 | test (greedy) |" in md and "counted as Unknown" in md
    full = R.render_markdown(R.build_report(copy.deepcopy([SEED0])))
    assert "(greedy)" not in full
