"""`python -m gradual_jax.probe`: a JSONL run on the smoke world, its resume, and bad input."""

from __future__ import annotations

import json

import pytest

from gradual_jax.probe import main

FAST = ["--n-prompts", "2", "--k-shot", "2", "--n-samples", "2", "--max-new-tokens", "6",
        "--limit-per-relation", "2", "--relations", "P19,P36"]


def _records(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "category" in r]


def test_cli_probes_a_jsonl_split_with_dev_exemplars_and_resumes(smoke_world, tmp_path, capsys):
    qa_dir = smoke_world.root / "qa"
    out, prompts = tmp_path / "probe.jsonl", tmp_path / "prompts.json"
    args = ["--model", str(smoke_world.model_dir), "--data", str(qa_dir / "train.jsonl"), "--split", "train",
            *FAST, "--prompts-out", str(prompts), "--out", str(out)]
    assert main(args) == 0
    records = _records(out)
    train = [json.loads(line) for line in (qa_dir / "train.jsonl").read_text().splitlines()]
    expected = sum(min(2, sum(e["relation"] == r for e in train)) for r in ("P19", "P36"))
    assert len(records) == expected and {r["relation"] for r in records} == {"P19", "P36"}
    assert all(len(r["greedy_answers"]) == 2 for r in records)
    # exemplars come from dev.jsonl beside the data file, never from the probed questions
    dev_questions = {json.loads(line)["question"] for line in (qa_dir / "dev.jsonl").read_text().splitlines()}
    exemplars = [e["question"] for sets in json.loads(prompts.read_text()).values() for s in sets for e in s]
    assert exemplars and set(exemplars) <= dev_questions
    before = out.read_text()
    capsys.readouterr()
    assert main(args) == 0  # resumed: everything done, nothing appended
    assert out.read_text() == before


@pytest.mark.parametrize("change, message", [
    ({"--model": "pkg:no_such_package_gj"}, "is not installed"),
    ({"--dev": "same"}, "--dev"),
])
def test_cli_bad_input_exits_2_with_one_line(smoke_world, tmp_path, capsys, change, message):
    data = smoke_world.root / "qa" / "train.jsonl"
    opts = {"--model": str(smoke_world.model_dir), "--data": str(data), "--split": "train",
            "--out": str(tmp_path / "o.jsonl")}
    opts.update({k: (str(data) if v == "same" else v) for k, v in change.items()})
    assert main([*sum(([k, v] for k, v in opts.items()), []), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_stats_json_counts_compiles_samples_and_memory(smoke_world, tmp_path):
    qa_dir = smoke_world.root / "qa"
    out, stats_path = tmp_path / "probe.jsonl", tmp_path / "stats.json"
    # other sample and token counts than the tests above: shapes this process has not compiled
    settings = [*FAST, "--n-samples", "3", "--max-new-tokens", "5"]
    assert main(["--model", str(smoke_world.model_dir), "--data", str(qa_dir / "train.jsonl"),
                 "--split", "train", *settings, "--out", str(out), "--stats-json", str(stats_path)]) == 0
    stats = json.loads(stats_path.read_text())
    records = _records(out)
    assert set(stats) == {"questions", "seconds", "compiles", "compile_seconds", "warmup_seconds",
                          "questions_per_s_after_warmup", "samples_drawn", "peak_host_bytes"}
    assert stats["questions"] == len(records) > 0
    assert stats["samples_drawn"] == sum(r["n_sampled"] for r in records)
    assert stats["compiles"] > 0 and 0 < stats["compile_seconds"] < stats["seconds"]
    # The warm-up traces, lowers and compiles the engine's programs this process has not
    # compiled yet: wall time, so it may exceed the backend compile seconds JAX reports, but it
    # is a part of the probe's time.
    assert 0 < stats["warmup_seconds"] < stats["seconds"]
    after = stats["seconds"] - stats["warmup_seconds"]
    # seconds are written to the millisecond: a fast probe's rate is known to about 1 ms / after
    assert stats["questions_per_s_after_warmup"] == pytest.approx(len(records) / after,
                                                                  rel=max(1e-3, 2e-3 / after))
    assert 100e6 < stats["peak_host_bytes"] < 100e9
