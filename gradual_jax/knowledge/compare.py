"""Compare two probes of the same questions: category agreement, with every disagreement listed.

Used to validate a cheaper probe mode against a reference one (screened against lazy, issue 10):

    python -m gradual_jax.knowledge.compare lazy.jsonl screened.jsonl [--json OUT]

Prints the disagreement rate with a 95% Wilson score interval, the 4x4 category table (rows:
the first file), the share of questions whose sampling the second file skipped, and each
disagreement with its question, gold answers, greedy answers and screening figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.stats import wilson_interval

__all__ = ["compare_records", "format_comparison", "main", "read_records", "wilson_interval"]


def read_records(path: str | Path) -> dict[str, dict]:
    """Probe records of a JSONL file by example id (the header line, if any, skipped)."""
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
            if "id" in rec and "category" in rec:
                out[rec["id"]] = rec
    return out


def compare_records(reference: Mapping[str, dict], other: Mapping[str, dict]) -> dict[str, Any]:
    """Agreement of `other`'s categories with `reference`'s over the ids both hold.

    The disagreement interval is `gradual_jax.stats.wilson_interval`. `p_gold_mean_abs_difference`
    is the mean |p_gold(reference) - p_gold(other)| over the ids where both records carry p_gold
    (None where none do). `skipped` counts questions whose sampling `other` skipped (screened
    mode); `sampled_*` count samples drawn by each. Raises ValueError when they share no id.
    """
    ids = sorted(set(reference) & set(other))
    if not ids:
        raise ValueError("the two probes share no question id")
    table = {a: {b: 0 for b in CATEGORIES} for a in CATEGORIES}
    disagreements = []
    for i in ids:
        a, b = reference[i]["category"], other[i]["category"]
        table[a][b] += 1
        if a != b:
            r, o = reference[i], other[i]
            disagreements.append({
                "id": i, "question": r.get("question"), "answers": r.get("answers"),
                "reference": a, "other": b,
                "greedy_answers": r.get("greedy_answers"),
                "reference_sample_correct": r.get("n_sample_correct"),
                "other_sample_correct": o.get("n_sample_correct"),
                "p_any_right": o.get("p_any_right", r.get("p_any_right")),
                "reference_p_gold": r.get("p_gold"), "other_p_gold": o.get("p_gold"),
                "sampling_skipped": o.get("sampling_skipped"),
            })
    n, k = len(ids), len(disagreements)
    low, high = wilson_interval(k, n)
    both_p = [abs(float(reference[i]["p_gold"]) - float(other[i]["p_gold"])) for i in ids
              if reference[i].get("p_gold") is not None and other[i].get("p_gold") is not None]
    undecided = [i for i in ids if reference[i]["category"] in ("WeaklyKnown", "Unknown")]
    return {
        "questions": n,
        "relations": sorted({reference[i].get("relation") for i in ids} - {None}),
        "disagreements": k,
        "disagreement_rate": k / n,
        "disagreement_interval_95": [low, high],
        "table": table,
        "p_gold_mean_abs_difference": sum(both_p) / len(both_p) if both_p else None,
        "needed_sampling": len(undecided),
        "skipped": sum(bool(other[i].get("sampling_skipped")) for i in ids),
        "sampled_reference": sum(int(reference[i].get("n_sampled", 0)) for i in ids),
        "sampled_other": sum(int(other[i].get("n_sampled", 0)) for i in ids),
        "disagreement_list": disagreements,
    }


def format_comparison(result: Mapping[str, Any]) -> str:
    """A readable summary of `compare_records`'s result."""
    low, high = result["disagreement_interval_95"]
    lines = [f"{result['questions']} questions, {len(result['relations'])} relations: "
             f"{result['disagreements']} disagree ({100 * result['disagreement_rate']:.2f}%, "
             f"95% interval {100 * low:.2f}-{100 * high:.2f}%)",
             f"sampling skipped for {result['skipped']} of {result['needed_sampling']} questions "
             f"without a right greedy answer; samples drawn {result['sampled_other']} vs "
             f"{result['sampled_reference']}",
             "", "rows: reference, columns: other",
             "".ljust(12) + "".join(c[:11].rjust(12) for c in CATEGORIES)]
    for a in CATEGORIES:
        lines.append(a[:11].ljust(12) + "".join(str(result["table"][a][b]).rjust(12) for b in CATEGORIES))
    for d in result["disagreement_list"]:
        lines.append(f"- {d['id']}: {d['reference']} -> {d['other']}; {d['question']!r} gold {d['answers']}; "
                     f"right samples {d['reference_sample_correct']} vs {d['other_sample_correct']}; "
                     f"P(any right) {d['p_any_right']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.knowledge.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("other")
    parser.add_argument("--json", default=None, help="also write the full comparison here")
    ns = parser.parse_args(argv)
    try:
        result = compare_records(read_records(ns.reference), read_records(ns.other))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
