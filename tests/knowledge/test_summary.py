"""Probe summaries against hand-counted records and the closed-form Wilson interval."""

import json
import math

import pytest

from gradual_jax.knowledge.summary import main, summarize


def rec(i: int, relation: str, category: str, p_greedy: float = 0.0, p_sample: float | None = None,
        p_gold: float | None = None) -> dict:
    return {"id": f"{relation}.{i}", "relation": relation, "category": category,
            "p_greedy": p_greedy, "p_sample": p_sample, "p_gold": p_gold}


def records() -> list[dict]:
    # P1: 4 questions (HK, MK, MK, UK); P2: 2 questions (UK, UK).
    return [rec(0, "P1", "HighlyKnown", 1.0), rec(1, "P1", "MaybeKnown", 0.5), rec(2, "P1", "MaybeKnown", 0.1),
            rec(3, "P1", "Unknown"), rec(0, "P2", "Unknown"), rec(1, "P2", "Unknown")]


def test_counts_shares_and_means_by_hand():
    s = summarize(records())
    p1, p2 = s["relations"]
    assert (p1["relation"], p1["n"]) == ("P1", 4)
    assert p1["counts"] == {"HighlyKnown": 1, "MaybeKnown": 2, "WeaklyKnown": 0, "Unknown": 1}
    assert p1["share"]["MaybeKnown"] == 0.5
    assert p1["p_greedy_mean"] == pytest.approx((1.0 + 0.5 + 0.1) / 4)
    assert p2["share"]["Unknown"] == 1.0
    assert s["all"]["n"] == 6
    assert s["all"]["share"]["Unknown"] == pytest.approx(3 / 6)
    # macro: the mean of the relations' shares, 1/4 and 1 for Unknown.
    assert s["macro"]["share"]["Unknown"] == pytest.approx((0.25 + 1.0) / 2)
    assert sum(s["macro"]["share"].values()) == pytest.approx(1.0)
    assert p1["p_sample_mean"] is None  # lazy records carry no P_sample


def test_wilson_interval_closed_form_at_zero_and_one():
    s = summarize(records())
    z2 = 1.959964 ** 2
    p2 = s["relations"][1]
    # k = 0 of n: [0, z^2 / (n + z^2)]; k = n: [n / (n + z^2), 1].
    low, high = p2["interval_95"]["HighlyKnown"]
    assert low == 0.0 and high == pytest.approx(z2 / (2 + z2))
    low, high = p2["interval_95"]["Unknown"]
    assert low == pytest.approx(2 / (2 + z2)) and high == 1.0


def test_p_sample_mean_only_when_every_record_has_one():
    rs = [rec(0, "P1", "WeaklyKnown", 0.0, 0.25), rec(1, "P1", "Unknown", 0.0, 0.0)]
    assert summarize(rs)["relations"][0]["p_sample_mean"] == pytest.approx(0.125)


def test_sort_by_known_share_and_numeric_relation_order():
    rs = [rec(0, "P17", "Unknown"), rec(0, "P131", "MaybeKnown"), rec(0, "P20", "Unknown")]
    assert [r["relation"] for r in summarize(rs)["relations"]] == ["P17", "P20", "P131"]
    assert [r["relation"] for r in summarize(rs, sort="known")["relations"]] == ["P131", "P17", "P20"]


def test_bad_records_are_errors():
    with pytest.raises(ValueError, match="no probe records"):
        summarize([])
    with pytest.raises(ValueError, match="no SliCK category"):
        summarize([{"id": "x", "relation": "P1", "category": "Known", "p_greedy": 0}])
    with pytest.raises(ValueError, match="sort"):
        summarize(records(), sort="size")


def test_cli_merges_files_by_id_and_writes_json(tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rs = records()
    first.write_text("".join(json.dumps(r) + "\n" for r in rs[:4]))
    # The second file repeats P1.3 (now MaybeKnown): the later record wins, 6 questions in all.
    second.write_text("".join(json.dumps(r) + "\n" for r in [rec(3, "P1", "MaybeKnown", 0.2), *rs[4:]]))
    out = tmp_path / "s.json"
    assert main([str(first), str(second), "--markdown", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| P1 | 4 | 25.0 (4.6-69.9) | 75.0 (30.1-95.4) | 0.0 (0.0-49.0) | 0.0 (0.0-49.0) |" in text
    assert "| **all** | **6** |" in text
    saved = json.loads(out.read_text())
    assert saved["all"]["counts"]["MaybeKnown"] == 3
    assert math.isclose(sum(saved["all"]["share"].values()), 1.0)


def test_cli_names_the_bad_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec(0, "P1", "Unknown")) + "\n{not json\n")
    assert main([str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_p_gold_mean_only_when_every_record_has_one(capsys):
    rs = [rec(0, "P1", "MaybeKnown", 0.5, p_gold=0.4), rec(1, "P1", "Unknown", 0.0, p_gold=0.0),
          rec(0, "P2", "Unknown", 0.0, p_gold=0.1), rec(1, "P2", "Unknown")]
    s = summarize(rs)
    p1, p2 = s["relations"]
    assert p1["p_gold_mean"] == pytest.approx(0.2) and p2["p_gold_mean"] is None
    assert s["all"]["p_gold_mean"] is None
    from gradual_jax.knowledge.summary import format_text

    lines = format_text(s).splitlines()
    assert lines[0].split()[-1] == "p_gold" and lines[1].split()[-1] == "0.200" and lines[2].split()[-1] == "n/a"
