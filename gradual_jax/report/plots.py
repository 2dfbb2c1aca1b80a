"""PNG plots of a report, and ``write_report``: report.json, report.md and the plots.

Accuracy in %, n under each bar, error bars from the (already clipped) intervals, curves told
apart by colour, line style and marker, integer step ticks, dev accuracy beside the loss (log
axis), transition heatmaps coloured by row share with the counts written in the cells.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from gradual_jax import io
from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.report.markdown import PAIR_ROWS, shared_set, plot_names, render_markdown

_COLORS = {"HighlyKnown": "#2b8a3e", "MaybeKnown": "#74c476", "WeaklyKnown": "#fdae6b", "Unknown": "#d94801"}
_STYLES = [("#1f77b4", "-", "o"), ("#d62728", "--", "s"), ("#2ca02c", "-.", "^"), ("#9467bd", ":", "D"),
           ("#ff7f0e", "-", "v"), ("#8c564b", "--", "P"), ("#e377c2", "-.", "X"), ("#7f7f7f", ":", "*")]


def _figure(width: float, height: float):
    # Figure + Agg canvas without pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _err(fig: Mapping, scale: float = 1.0) -> tuple[float, float, float]:
    m = fig["mean"] * scale
    return m, max(0.0, m - fig["low"] * scale), max(0.0, fig["high"] * scale - m)


def _plot_comparisons(report: Mapping):
    comps = list(report["comparisons"].values())
    fig = _figure(8.0, 1.4 + 0.5 * 3 * max(1, len(comps)))
    panels = [("level", [r for r in PAIR_ROWS if r[2] == 100.0], "difference (percentage points)"),
              ("count", [r for r in PAIR_ROWS if r[2] == 1.0], "difference (train examples)")]
    for k, (_, rows, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        labels, y = [], 0
        for c in comps:
            for key, label, scale in rows:
                f = c[key]
                if f["mean"] is not None:
                    m, lo, hi = _err(f, scale)
                    color = "#d62728" if f["excludes_zero"] else "#555555"
                    ax.errorbar([m], [y], xerr=[[lo], [hi]], fmt="o", color=color, capsize=3)
                labels.append(f"{c['a']}-{c['b']}\n{label.split(' (')[0]} (n={f['n']})")
                y += 1
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=8)
    if not comps:
        fig.axes[0].text(0.5, 0.5, "no pair of arms", ha="center", transform=fig.axes[0].transAxes)
    fig.suptitle("Paired differences a - b, 95% interval (red: excludes 0)", fontsize=10)
    fig.tight_layout()
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
        n = stages[0][f"{split}_counts"][CATEGORIES[0]]["n"]
        ax.set_xticks(range(len(stages)), [s["name"] for s in stages], fontsize=8)
        greedy = split == "test" and any(s.get("test_probe") == "greedy" for s in stages)
        ax.set_title(f"{split} (mean over seeds, n={n})" + ("\nafter stage 0: greedy, WK counted as UK" if greedy else ""),
                     fontsize=9)
    fig.axes[0].set_ylabel("examples")
    fig.suptitle(f"SliCK categories per stage ({report['reference_arm']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    return fig


def _plot_accuracy(report: Mapping):
    arms = list(report["arms"])
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(arms))
    ns = {c: {report["arms"][a]["test_accuracy_by_category"][c]["n"] for a in arms} for c in CATEGORIES}
    for k, arm in enumerate(arms):
        by_cat = report["arms"][arm]["test_accuracy_by_category"]
        xs, hs, errs = [], [], [[], []]
        for x, c in enumerate(CATEGORIES):
            f = by_cat[c]
            if f["mean"] is None:
                continue
            m, lo, hi = _err(f, 100.0)
            xs.append(x + (k - (len(arms) - 1) / 2) * width)
            hs.append(m)
            errs[0].append(lo)
            errs[1].append(hi)
            if len(ns[c]) > 1:  # arms rest on other questions here: n under each bar
                ax.annotate(f"n={f['n']}", (xs[-1], 0), xytext=(0, -4), textcoords="offset points",
                            ha="center", va="top", fontsize=6, rotation=90)
        ax.bar(xs, hs, width=width, yerr=errs, capsize=2, color=_STYLES[k % len(_STYLES)][0], label=arm)
    # n is the questions per seed of the stage-0 category, the same for every arm as a rule.
    labels = [f"{c}\n(n={next(iter(ns[c]))})" if len(ns[c]) == 1 else f"{c}\n" for c in CATEGORIES]
    ax.set_xticks(range(4), labels, fontsize=8)
    ax.tick_params(axis="x", pad=18 if any(len(v) > 1 for v in ns.values()) else 4)
    ax.set_xlabel("stage-0 category of the test example (n = test questions per seed)", fontsize=8)
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("Test accuracy by stage-0 category (95% interval)", fontsize=10)
    fig.tight_layout()
    return fig


def _seed0(results: Sequence[Mapping]) -> Mapping:
    return next((r for r in results if r["seed"] == 0), results[0])


def _plot_curves(report: Mapping, results: Sequence[Mapping]):
    from matplotlib.ticker import MaxNLocator

    res = _seed0(results)
    shared = shared_set(report)
    fig = _figure(9.0, 3.6)
    loss_ax, dev_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    k = 0
    for arm in (a for a in report["arms"] if a in res["arms"]):
        data, offset = res["arms"][arm], 0.0
        for stage in data["stages"]:
            curve = stage.get("curve") or []
            key = f"{arm}/{stage['name']}"
            steps = [float(p["step"]) for p in curve]
            shift = offset if steps and steps[0] < offset else 0.0  # stages restarting at 0 follow on
            if steps:
                offset = steps[-1] + shift
            if key in shared or not (curve or stage.get("dev_accuracy")):
                continue
            color, line, marker = _STYLES[k % len(_STYLES)]
            # Earlier curves drawn wider with hollow markers, so one lying on another shows.
            style = dict(color=color, linestyle=line, marker=marker, markerfacecolor="none",
                         markersize=max(3.0, 7.0 - 1.0 * k), linewidth=max(1.0, 3.0 - 0.6 * k), label=key)
            k += 1
            if curve:
                loss_ax.plot([s + shift for s in steps], [max(p["loss"], 1e-8) for p in curve],
                             markevery=max(1, len(curve) // 8), **style)
            dev = stage.get("dev_accuracy") or []
            if dev:
                dev_ax.plot(range(1, len(dev) + 1), [100.0 * v for v in dev], **style)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (log)")
    dev_ax.set_xlabel("epoch")
    dev_ax.set_ylabel("dev accuracy (%)")
    for ax in (loss_ax, dev_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "nothing recorded", ha="center", transform=ax.transAxes)
    fig.suptitle(f"Training (seed {res['seed']})", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_transition(arm: str, entry: Mapping):
    fig = _figure(7.4, 3.4)
    short = ["HK", "MK", "WK", "UK"]
    for k, split in enumerate(("train", "test")):
        ax = fig.add_subplot(1, 2, k + 1)
        m = entry[split]["sum"]
        share = [[v / max(1, sum(row)) for v in row] for row in m]
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for a in range(4):
            for b in range(4):
                color = "white" if share[a][b] > 0.5 else "black"
                text = f"{m[a][b]}\n{100 * share[a][b]:.0f}%" if sum(m[a]) else "0"
                ax.text(b, a, text, ha="center", va="center", color=color, fontsize=7)
        ax.set_xticks(range(4), short)
        ax.set_yticks(range(4), [f"{s} ({sum(row)})" for s, row in zip(short, m)])
        ax.set_xlabel("to")
        ax.set_ylabel("from (row total)")
        greedy = split == "test" and entry.get("test_probe") == "greedy"
        ax.set_title(f"{split}: colour = share of the row" + (" (greedy: UK incl. WK)" if greedy else ""),
                     fontsize=9)
    fig.suptitle(f"{arm} / {entry['stage']} (counts summed over {entry['n_seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_files(report: Mapping) -> list[str]:
    """File names of the plots ``write_report`` writes for ``report``, in a fixed order."""
    return plot_names(report)


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
    shared = shared_set(report)
    figs = [_plot_comparisons(report), _plot_categories(report), _plot_accuracy(report),
            _plot_curves(report, results)]
    figs += [_plot_transition(arm, e) for arm, es in report["transitions"].items() for e in es
             if f"{arm}/{e['stage']}" not in shared]
    paths += [_save_fig(fig, out / name) for fig, name in zip(figs, plot_files(report))]
    return paths
