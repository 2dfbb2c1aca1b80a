"""Category distribution of a finished (or partial) probe, without loading a model.

    python -m gradual_jax.knowledge.summary FILE.jsonl [MORE.jsonl ...] [--markdown] \\
        [--sort relation|known] [--json OUT]

For each relation and for all questions together: the count and share of each SliCK category with
its 95% Wilson score interval (gradual_jax.stats), the mean P_greedy, the mean P_sample where the
probe drew every sample (exhaustive mode) and the mean gold-answer probability p_gold where every
record has one. Several files are merged by question id (a later file's record wins), so
the pieces of a probe written on two machines summarise as one. "macro" weighs every relation
equally, where "all" weighs every question equally.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gradual_jax.knowledge.categories import CATEGORIES
from gradual_jax.knowledge.compare import read_records
from gradual_jax.knowledge.probe import category_counts
from gradual_jax.stats import wilson_interval

ALL = "all"
MACRO = "macro"
SHORT = {"HighlyKnown": "HK", "MaybeKnown": "MK", "WeaklyKnown": "WK", "Unknown": "UK"}


def _group(records: Sequence[dict], relation: str) -> dict[str, Any]:
    n = len(records)
    counts = category_counts(records)
    sampled = [float(r["p_sample"]) for r in records if r.get("p_sample") is not None]
    gold = [float(r["p_gold"]) for r in records if r.get("p_gold") is not None]
    return {
        "relation": relation,
        "n": n,
        "counts": counts,
        "share": {c: counts[c] / n for c in CATEGORIES},
        "interval_95": {c: list(wilson_interval(counts[c], n)) for c in CATEGORIES},
        "p_greedy_mean": sum(float(r["p_greedy"]) for r in records) / n,
        "p_sample_mean": sum(sampled) / len(sampled) if len(sampled) == n else None,
        "p_gold_mean": sum(gold) / n if len(gold) == n else None,
    }


def summarize(records: Iterable[dict], sort: str = "relation") -> dict[str, Any]:
    """Per-relation and overall category distribution of probe records.

    Returns ``{"relations": [row, ...], "all": row, "macro": {...}}``. Each row has ``n``,
    ``counts``, ``share`` (fractions summing to 1), ``interval_95`` (Wilson, per category),
    ``p_greedy_mean``, ``p_sample_mean`` (None unless every record has a P_sample) and
    ``p_gold_mean``, the mean gold-answer probability (None unless every record has one). ``macro`` is
    the unweighted mean of the relations' shares. ``sort="known"`` orders relations by their
    HighlyKnown + MaybeKnown share, largest first; ``"relation"`` by relation id.
    Raises ValueError on no records or a record without a category.
    """
    records = list(records)
    if not records:
        raise ValueError("no probe records to summarise")
    by_relation: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("category") not in CATEGORIES:
            raise ValueError(f"record {r.get('id')!r} has no SliCK category: {r.get('category')!r}")
        by_relation[str(r.get("relation", ALL))].append(r)
    rows = [_group(recs, rel) for rel, recs in by_relation.items()]
    if sort == "known":
        rows.sort(key=lambda row: (-(row["share"]["HighlyKnown"] + row["share"]["MaybeKnown"]), row["relation"]))
    elif sort == "relation":
        rows.sort(key=lambda row: (len(row["relation"]), row["relation"]))
    else:
        raise ValueError(f"sort must be 'relation' or 'known', got {sort!r}")
    macro = {"relation": MACRO, "n": len(rows),
             "share": {c: sum(row["share"][c] for row in rows) / len(rows) for c in CATEGORIES}}
    return {"relations": rows, ALL: _group(records, ALL), MACRO: macro}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(row: dict[str, Any], category: str) -> tuple[str, str]:
    low, high = row["interval_95"][category]
    return _pct(low), _pct(high)


def format_text(summary: dict[str, Any]) -> str:
    """Fixed-width table: share (and 95% interval) of each category per relation."""
    head = (f"{'relation':<9}{'n':>6}" + "".join(f"{SHORT[c] + ' % [95%]':>21}" for c in CATEGORIES)
            + f"{'P_greedy':>10}{'p_gold':>8}")
    lines = [head]
    for row in [*summary["relations"], summary[ALL]]:
        cells = "".join(f"{_pct(row['share'][c]):>8} [{low:>4}-{high:>5}]"
                        for c in CATEGORIES for low, high in [_interval(row, c)])
        gold = "n/a" if row["p_gold_mean"] is None else f"{row['p_gold_mean']:.3f}"
        lines.append(f"{row['relation']:<9}{row['n']:>6}{cells}{row['p_greedy_mean']:>10.3f}{gold:>8}")
    macro = summary[MACRO]
    lines.append(f"{'macro':<9}{macro['n']:>6}" + "".join(f"{_pct(macro['share'][c]):>8}{'':>13}" for c in CATEGORIES)
                 + "  (relations weighted equally)")
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """Markdown table: per relation n and each category's share in % with its 95% interval."""
    def cell(row: dict[str, Any], c: str, bold: bool = False) -> str:
        share = f"**{_pct(row['share'][c])}**" if bold else _pct(row["share"][c])
        return f"{share} ({'-'.join(_interval(row, c))})"

    lines = ["| relation | n | " + " | ".join(SHORT[c] + " %" for c in CATEGORIES) + " |",
             "|---|---|" + "---|" * len(CATEGORIES)]
    for row in summary["relations"]:
        lines.append(f"| {row['relation']} | {row['n']} | " + " | ".join(cell(row, c) for c in CATEGORIES) + " |")
    row = summary[ALL]
    lines.append(f"| **all** | **{row['n']}** | " + " | ".join(cell(row, c, bold=True) for c in CATEGORIES) + " |")
    macro = summary[MACRO]
    lines.append(f"| macro ({macro['n']} relations) | | " + " | ".join(_pct(macro["share"][c]) for c in CATEGORIES)
                 + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.knowledge.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="probe JSONL files (merged by question id)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--sort", choices=("relation", "known"), default="relation")
    parser.add_argument("--json", default=None, help="also write the summary here")
    ns = parser.parse_args(argv)
    try:
        records: dict[str, dict] = {}
        for path in ns.files:
            records.update(read_records(path))
        summary = summarize(records.values(), sort=ns.sort)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_markdown(summary) if ns.markdown else format_text(summary))
    if ns.json:
        Path(ns.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
