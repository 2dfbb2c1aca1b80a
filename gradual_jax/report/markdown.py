"""``render_markdown``: the report as Markdown, paired differences first.

Every figure is printed ``mean [low, high]`` with its 95% interval; tables give n (questions)
beside each figure or in a column. Levels are in %, differences of levels in percentage points.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.report.data import MOVE_KEYS

MOVE_LABELS = {"up": "up", "down": "down", "net": "net", "from_weak_or_unknown_up": "Weak/Unknown up"}
PAIR_ROWS = (("test_accuracy", "test accuracy (pts)", 100.0), ("retention", "retention (pts)", 100.0),
             ("train_highly_known", "train HighlyKnown (count)", 1.0),
             ("untrained_upgrades", "untrained Weak/Unknown up (count)", 1.0),
             ("untrained_net", "untrained net moves (count)", 1.0))


def _num(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    return s[1:] if re.fullmatch(r"-0(\.0*)?", s) else s  # no "-0"


def fmt_fig(fig: Mapping | None, *, scale: float = 1.0, digits: int = 1, n: bool = False) -> str:
    """``mean [low, high]`` (scaled), with `` (n=N)`` when ``n``; ``n/a`` without a value."""
    if fig is None or fig.get("mean") is None:
        return "n/a"
    m, lo, hi = (_num(fig[k] * scale, digits) for k in ("mean", "low", "high"))
    return f"{m} [{lo}, {hi}]" + (f" (n={fig['n']})" if n else "")


def _pct(fig: Mapping | None, n: bool = True) -> str:
    return fmt_fig(fig, scale=100.0, n=n)


def _yes(flag: bool | None) -> str:
    return {True: "**yes**", False: "no", None: "n/a"}[flag]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def shared_set(report: Mapping) -> dict[str, str]:
    """``arm/stage`` -> the arm/stage it is the same model as in every seed (rows shown once)."""
    return {s["same"]: s["first"] for s in report.get("shared_models") or [] if s["all_seeds"]}


def _md_headline(report: Mapping) -> list[str]:
    lines = ["## Headline: arms compared on the same questions and seeds", ""]
    comps = report["comparisons"]
    if not comps:
        lines += ["No pair of two_stage, one_stage and random_subset ran: nothing to compare.", ""]
    else:
        lines += ["Each difference is a - b, computed question by question in each seed and "
                  "resampled with the same questions for both arms. 'excl. 0' = the 95% interval "
                  "excludes zero. McNemar: exact, on test accuracy, pooled over seeds.", ""]
        rows = []
        for c in comps.values():
            for key, label, scale in PAIR_ROWS:
                fig = c[key]
                rows.append([f"{c['a']} - {c['b']}", label, fmt_fig(fig, scale=scale), fig["n"],
                             _yes(fig["excludes_zero"])])
            mc = c["mcnemar_test_accuracy"]["pooled"]
            rows.append([f"{c['a']} - {c['b']}", "McNemar test accuracy",
                         f"{mc['only_a']} vs {mc['only_b']} right only under a / b", "",
                         f"p = {mc['p_value']:.3g}"])
        lines += _table(["a - b", "figure", "difference [95%]", "n", "excl. 0"], rows) + [""]
    gain = report["knowledge_gain_pct"]
    gain_s = "n/a (needs both two_stage and one_stage)" if gain is None else f"{fmt_fig(gain)} %"
    lines += [f"Knowledge gain (train HighlyKnown after two_stage vs one_stage, 100*(two-one)/one "
              f"per seed): **{gain_s}**", ""]
    rows = [(arm, a["n_seeds"], _pct(a["test_accuracy"]), _pct(a["retention"]),
             fmt_fig(a["train_highly_known"], n=True), fmt_fig(a["steps"], digits=0))
            for arm, a in report["arms"].items()]
    lines += _table(["arm", "seeds", "test accuracy (%)", "retention (%)",
                     "train HighlyKnown (final)", "steps [range]"], rows)
    return lines + ["", "Retention = test accuracy on examples HighlyKnown at stage 0.", ""]


def _md_shared(report: Mapping) -> list[str]:
    shared = report.get("shared_models") or []
    if not shared:
        return []
    lines = ["## Models two arms share", ""]
    for s in shared:
        seeds = s["seeds"]
        where = ("every seed" if s["all_seeds"]
                 else f"seed{'s' if len(seeds) > 1 else ''} " + ", ".join(map(str, seeds)))
        tail = (f"its rows are shown once, under {s['first']}." if s["all_seeds"]
                else "its rows stay, as the other seeds differ.")
        lines.append(f"- {s['same']} is the same model as {s['first']} in {where} (same training set, "
                     f"same probe records: the pipeline found identical weights and reused them): {tail}")
    return lines + [""]


def _md_controls(report: Mapping) -> list[str]:
    ctl = report.get("stage1_controls")
    lines = ["## Stage 1 against its controls", ""]
    if ctl is None:
        return lines + ["Needs a stage-1 MaybeKnown arm and a noise control.", ""]
    lines += [f"MaybeKnown stage 1 ({ctl['maybe_known_arm']}), the random subset of the same size, "
              "and the noise control (the unchanged model re-probed): moves from stage 0 on the "
              "train questions neither stage-1 set trained on.", ""]
    names = {"maybe_known": "MaybeKnown stage 1", "random_subset": "random subset", "noise": "noise control"}
    rows = [[names[row], f["up"]["n"]] + [fmt_fig(f[k]) for k in ("from_weak_or_unknown_up", "up", "net")]
            for row, f in ctl["rows"].items()]
    lines += _table(["", "n", "Weak/Unknown up", "up", "net"], rows) + [""]
    rows = [[" - ".join(names[k] for k in key.split("_vs_"))]
            + [f"{fmt_fig(d[k])} {'(excl. 0)' if d[k]['excludes_zero'] else ''}".strip()
               for k in ("from_weak_or_unknown_up", "up", "net")]
            for key, d in ctl["differences"].items()]
    return lines + _table(["difference", "Weak/Unknown up", "up", "net"], rows) + [""]


def _md_knowledge(report: Mapping) -> list[str]:
    km = report.get("knowledge_measure")
    lines = ["## Continuous knowledge measure: the gold answer's probability", ""]
    if km is None:
        return lines + ["Not recorded by this run's probes.", ""]
    lines += ["p_gold = teacher-forced probability that one sample (at the probe's temperature and "
              "top-k) is a gold answer, mean over prompts. Mean p_gold (%) by stage-0 category:", ""]
    shared = shared_set(report)
    rows = [[lv["arm"] or "-", lv["stage"], lv["split"]] + [_pct(lv["by_category"][c]) for c in CATEGORIES]
            for lv in km["levels"] if f"{lv['arm']}/{lv['stage']}" not in shared]
    lines += _table(["arm", "stage", "split", *CATEGORIES], rows) + [""]
    lines += ["Stage-1 change in mean p_gold (percentage points) on the train questions the arm did not "
              "train, against the noise control (same questions) and the random subset (questions "
              "neither trained):", ""]
    rows = []
    for arm, ch in km["untrained_change"].items():
        if ch is None or f"{arm}/{ch['stage']}" in shared or ch["all"]["change"]["mean"] is None:
            continue  # shared, or no untrained question (natural trains on all)
        for subset in ("all", "weak_or_unknown"):
            e = ch[subset]
            rows.append([arm, "all untrained" if subset == "all" else "untrained Weak/Unknown",
                         fmt_fig(e["change"], scale=100, digits=2, n=True),
                         fmt_fig(e.get("noise_change"), scale=100, digits=2),
                         _vs(e.get("vs_noise")), _vs(e.get("vs_random_subset"))])
    return lines + _table(["arm", "questions", "change", "noise change", "arm - noise",
                           "arm - random subset"], rows) + [""]


def _vs(fig: Mapping | None) -> str:
    if fig is None:
        return "n/a"
    return fmt_fig(fig, scale=100, digits=2) + (" (excl. 0)" if fig["excludes_zero"] else "")


def _md_stages(report: Mapping) -> list[str]:
    lines = [f"## Category counts per stage (arm: {report['reference_arm']})", ""]
    rows = []
    for st in report["stages"]:
        for split in ("train", "test"):
            counts = st[f"{split}_counts"]
            n = counts[CATEGORIES[0]]["n"]
            label = f"{split} (greedy)" if split == "test" and st.get("test_probe") == "greedy" else split
            rows.append([st["name"], label, n] + [fmt_fig(counts[c]) for c in CATEGORIES])
    lines += _table(["stage", "split", "n", *CATEGORIES], rows) + [""]
    if any(st.get("test_probe") == "greedy" for st in report["stages"]):
        lines += ["test (greedy): re-probed after training with the greedy answers only "
                  "(`probe.test_after_training: greedy`), so WeaklyKnown test questions are "
                  "counted as Unknown there; stage 0 is a full probe.", ""]
    return lines


def _move_cells(m: Mapping) -> list[str]:
    return [fmt_fig(m[k]) for k in MOVE_KEYS]


def _md_moves(report: Mapping) -> list[str]:
    lines = ["## Untrained train examples that moved", "",
             "Counts of moves from the previous probe, only train examples not trained in any stage "
             "so far. Weak/Unknown up = WeaklyKnown/Unknown -> MaybeKnown/HighlyKnown.", ""]
    shared = shared_set(report)
    header = ["arm", "stage", "n", *(MOVE_LABELS[k] for k in MOVE_KEYS)]
    rows = [[arm, s["stage"], s["up"]["n"], *_move_cells(s)]
            for arm, stages in report["untrained_upgrades"].items() for s in stages
            if f"{arm}/{s['stage']}" not in shared]
    noise = report["noise_control"]
    if noise is not None:
        rows.append(["noise control", "all train", noise["all_train"]["up"]["n"], *_move_cells(noise["all_train"])])
        if noise["untrained_stage1"] is not None:
            label = f"{noise['untrained_stage1_arm']} stage-1 untrained"
            sub = noise["untrained_stage1"]
            rows.append(["noise control", label, sub["up"]["n"], *_move_cells(sub)])
    lines += _table(header, rows) + [""]
    if noise is None:
        return lines + ["No noise control was run.", ""]
    lines += ["### Stage 1 vs noise control", "",
              "Both over each arm's stage-1 untrained set; difference = arm - noise, paired by question.", ""]
    rows = []
    for arm, comp in report["vs_noise"].items():
        if comp is None or f"{arm}/{comp['stage']}" in shared:
            continue
        for k in MOVE_KEYS:
            c = comp[k]
            rows.append([arm, MOVE_LABELS[k], c["difference"]["n"], fmt_fig(c["arm"]), fmt_fig(c["noise"]),
                         fmt_fig(c["difference"]), _yes(c["excludes_zero"])])
    return lines + _table(["arm", "moves", "n", "arm", "noise", "difference", "excl. 0"], rows) + [""]


def _md_accuracy(report: Mapping) -> list[str]:
    lines = ["## Test accuracy by stage-0 category (%)", ""]
    rows = [[arm] + [_pct(a["test_accuracy_by_category"][c]) for c in CATEGORIES]
            for arm, a in report["arms"].items()]
    return lines + _table(["arm", *CATEGORIES], rows) + [""]


def _md_transitions(report: Mapping) -> list[str]:
    lines = ["## Transitions (train, summed over seeds; rows = from, columns = to)", ""]
    shared = shared_set(report)
    for arm, stages in report["transitions"].items():
        for s in stages:
            if f"{arm}/{s['stage']}" in shared:
                continue
            lines += [f"**{arm} / {s['stage']}** ({s['n_seeds']} seeds)", ""]
            rows = [[c, *map(str, row)] for c, row in zip(CATEGORIES, s["train"]["sum"])]
            lines += _table(["from \\ to", *CATEGORIES], rows) + [""]
    return lines


def _md_intro(report: Mapping) -> list[str]:
    n = report["n_seeds"]
    machine = report.get("machine") or {}
    world = ((report.get("config") or {}).get("world") or {}).get("seed")
    lines = ["# Gradual learning report", "",
             f"Seeds: {n} ({', '.join(map(str, report['seeds']))}). Machine: {machine.get('cpu', 'unknown')} "
             f"({machine.get('cores', '?')} cores, {machine.get('platform', '?')}).", "",
             "Every figure is `mean [low, high]`: a 95% interval from a bootstrap that resamples the "
             "questions (the same resampled set for every seed) and adds a Student-t seed term, "
             "clipped to the figure's range; n = questions per seed. The intervals hold for one pretrained "
             "world" + (f" (world seed {world})" if world is not None else "") + " and this CPU model: "
             "another world, or the same run on another CPU model, can move figures by more than "
             "they show.", ""]
    if n == 1:
        lines += ["**One seed: the intervals cover the sampling of questions only; seed-to-seed "
                  "spread is not measured.**", ""]
    return lines


def plot_names(report: Mapping) -> list[str]:
    """File names of the plots, in a fixed order (see ``gradual_jax.report.plots``)."""
    names = ["comparisons.png", "categories.png", "accuracy_by_category.png", "training_curves.png"]
    shared = shared_set(report)
    for arm, stages in report["transitions"].items():
        names += [f"transitions_{_safe(arm)}_{_safe(s['stage'])}.png" for s in stages
                  if f"{arm}/{s['stage']}" not in shared]
    return names


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name))


def render_markdown(report: Mapping) -> str:
    """Render ``report`` (from ``build_report``) as Markdown: paired differences and McNemar first,
    then shared models, stage 1 against its controls, the continuous measure, counts per stage,
    moves vs noise control, accuracy by category, transitions and links to the plots."""
    lines = _md_intro(report) + _md_headline(report) + _md_shared(report) + _md_controls(report)
    lines += _md_knowledge(report) + _md_stages(report) + _md_moves(report)
    lines += _md_accuracy(report) + _md_transitions(report)
    lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plot_names(report)] + [""]
    wall = report["wall_seconds"]
    lines += [f"Seed time: {wall['total']:.1f} s summed over seeds (seeds run at once overlap in "
              f"wall time); per seed {fmt_fig(wall['per_seed'])} s (range)."]
    if report.get("invocation_seconds") is not None:
        lines += [f"This command: {report['invocation_seconds']:.1f} s wall, loading included "
                  "(less when it resumed a run)."]
    return "\n".join(lines + [""])
