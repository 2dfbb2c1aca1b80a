"""Comparing two probes: agreement table, disagreements, Wilson interval (hand-worked)."""

from __future__ import annotations

import json

import pytest

from gradual_jax.knowledge.compare import compare_records, main, read_records, wilson_interval


def test_wilson_interval_hand_worked():
    # k = 0: upper = (z^2/n) / (1 + z^2/n) = 0.076829 / 1.076829 at n = 50
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0713476, abs=1e-6)
    # 5 of 20: centre (0.25 + 0.096036) / 1.192073 = 0.290281, half-width 0.178421
    low, high = wilson_interval(5, 20)
    assert (low, high) == (pytest.approx(0.111862, abs=1e-5), pytest.approx(0.468701, abs=1e-5))
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


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
