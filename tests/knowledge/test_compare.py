"""Comparing two probes: agreement table, disagreements, Wilson interval, p_gold (hand-worked)."""

from __future__ import annotations

import json

import pytest

from gradual_jax.knowledge.compare import compare_records, main, read_records, wilson_interval


def test_the_interval_is_the_stats_modules_wilson():
    from gradual_jax import stats

    assert wilson_interval is stats.wilson_interval
    # 1 of 4 disagree: the Wilson interval's closed form (p + z^2/2n -+ z sqrt(...)) / (1 + z^2/n)
    z = stats.Z975
    centre = (0.25 + z * z / 8) / (1 + z * z / 4)
    half = z * (0.25 * 0.75 / 4 + z * z / 64) ** 0.5 / (1 + z * z / 4)
    ref = {str(i): _rec(str(i), "Unknown") for i in range(4)}
    other = {**ref, "0": _rec("0", "WeaklyKnown")}
    assert compare_records(ref, other)["disagreement_interval_95"] == [pytest.approx(centre - half),
                                                                       pytest.approx(centre + half)]


def _rec(i, category, **extra):
    return {"id": i, "relation": "P1", "question": f"q{i}", "answers": ["a"], "category": category,
            "n_sampled": extra.pop("n_sampled", 0), **extra}


def test_compare_counts_table_and_lists_each_disagreement(tmp_path):
    ref = {r["id"]: r for r in [_rec("1", "HighlyKnown"), _rec("2", "WeaklyKnown", n_sampled=20),
                                _rec("3", "Unknown", n_sampled=160), _rec("4", "Unknown", n_sampled=160)]}
    other = {r["id"]: r for r in [_rec("1", "HighlyKnown"), _rec("2", "Unknown", sampling_skipped=True),
                                  _rec("3", "Unknown", sampling_skipped=True),
                                  _rec("4", "Unknown", n_sampled=160), _rec("5", "Unknown")]}
    result = compare_records(ref, other)
    assert result["questions"] == 4  # id 5 is only in one file
    assert result["disagreements"] == 1 and result["disagreement_rate"] == 0.25
    assert result["table"]["WeaklyKnown"]["Unknown"] == 1 and result["table"]["Unknown"]["Unknown"] == 2
    assert result["needed_sampling"] == 3 and result["skipped"] == 2
    assert (result["sampled_reference"], result["sampled_other"]) == (340, 160)
    [d] = result["disagreement_list"]
    assert (d["id"], d["reference"], d["other"], d["sampling_skipped"]) == ("2", "WeaklyKnown", "Unknown", True)

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"fingerprint": "x"}\n' + "".join(json.dumps(r) + "\n" for r in ref.values()))
    b.write_text("".join(json.dumps(r) + "\n" for r in other.values()))
    assert set(read_records(a)) == {"1", "2", "3", "4"}
    assert main([str(a), str(b), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["disagreements"] == 1


def test_compare_refuses_disjoint_or_broken_files(tmp_path):
    with pytest.raises(ValueError, match="share no question"):
        compare_records({"1": _rec("1", "Unknown")}, {"2": _rec("2", "Unknown")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "category": "Unknown"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(bad)
    assert main([str(bad), str(bad)]) == 2


def test_gold_probabilities_are_compared_where_both_have_them():
    ref = {"1": _rec("1", "Unknown", p_gold=0.10), "2": _rec("2", "WeaklyKnown", p_gold=0.30),
           "3": _rec("3", "Unknown")}
    other = {"1": _rec("1", "Unknown", p_gold=0.20), "2": _rec("2", "Unknown", p_gold=0.05),
             "3": _rec("3", "Unknown", p_gold=0.5)}
    result = compare_records(ref, other)
    assert result["p_gold_mean_abs_difference"] == pytest.approx((0.10 + 0.25) / 2)  # id 3: one side only
    [d] = result["disagreement_list"]
    assert (d["reference_p_gold"], d["other_p_gold"]) == (0.30, 0.05)
    assert compare_records({"1": _rec("1", "Unknown")}, {"1": _rec("1", "Unknown")})["p_gold_mean_abs_difference"] is None
