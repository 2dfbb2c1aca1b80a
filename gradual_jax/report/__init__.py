"""From per-seed run results to ``report.json``, ``report.md`` and PNG plots.

The report only reads what it is given: it never selects models and never looks at anything
but the results (test figures are reported, not used to choose). Modules: ``data`` (validation,
per-seed moves, per-question arrays), ``aggregate`` (``build_report``), ``paired`` (arms compared
on the same questions, the continuous measure), ``markdown`` and ``plots`` (``write_report``).
Intervals come from ``gradual_jax.stats``.

Input: a list of per-seed result dicts, as produced by the pipeline::

    {
     "seed": 0,
     "stage0": {"train": {example_id: category}, "test": {example_id: category}},
     "stage0_p_gold": {"train": {id: p}, "test": {id: p}},   # optional: gold-answer probability
     "noise_control": {"train": {id: category}, "train_p_gold": {id: p}} | None,
     "arms": {
       "<arm>": {                      # two_stage, one_stage, natural, highly_known, random_subset
         "stages": [                   # one per training stage of that arm, in order
           {"name": "stage1", "trained_ids": [ids trained in this stage],
            "selected_counts": {category: n},
            "train_after": {id: category}, "test_after": {id: category},  # re-probe after it
            "train_p_gold": {id: p}, "test_p_gold": {id: p},              # optional
            "steps": int, "best_epoch": int, "dev_accuracy": [per-epoch floats],
            "curve": [{"step": int, "loss": float, "lr": float}, ...]}
         ],
         "test_correct": {test_id: bool}   # greedy exact match of the final model on test
       }
     },
     "wall_seconds": float
    }

``noise_control`` is the unchanged stage-0 model re-probed with another seed and other prompts;
its moves are measurement noise. Every re-probe must cover the same ids as stage 0. A ``*_p_gold``
map may be ``None`` (records written before the probe recorded p_gold): the continuous measure
then leaves that seed out.
"""

from gradual_jax.report.aggregate import BASELINE_ARM, REFERENCE_ARM, build_report, machine_info
from gradual_jax.report.data import (
    MOVE_KEYS,
    category_counts,
    count_moves,
    transition_matrix,
    validate_results,
)
from gradual_jax.report.markdown import fmt_fig, render_markdown
from gradual_jax.report.plots import plot_files, write_report

__all__ = ["BASELINE_ARM", "MOVE_KEYS", "REFERENCE_ARM", "build_report", "category_counts",
           "count_moves", "fmt_fig", "machine_info", "plot_files", "render_markdown",
           "transition_matrix", "validate_results", "write_report"]
