"""The Python API: `import gradual_jax` stays light, `probe_model` writes what the probe CLI
writes, `load_model` resolves every source kind, and bad settings fail as in a config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import gradual_jax
from gradual_jax.configlib import ConfigError
from gradual_jax.probe import main as probe_main

SETTINGS = {"n_prompts": 2, "k_shot": 2, "n_samples": 2, "max_new_tokens": 6}


def test_import_is_light_and_exports_the_api():
    code = "import sys, gradual_jax; print('jax' in sys.modules, sorted(gradual_jax.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['load_model', 'probe_model', 'run']"
    with pytest.raises(AttributeError):
        gradual_jax.no_such_thing  # noqa: B018


def test_probe_model_equals_the_probe_cli(smoke_world, tmp_path):
    qa = smoke_world.root / "qa"
    train = [json.loads(line) for line in (qa / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (qa / "dev.jsonl").read_text().splitlines()]
    by_relation: dict[str, list] = {}
    for r in train:
        by_relation.setdefault(r["relation"], []).append(r)
    questions = [r for rs in by_relation.values() for r in rs[:2]]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in questions))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    out = tmp_path / "cli.jsonl"
    flags = sum((["--" + k.replace("_", "-"), str(v)] for k, v in SETTINGS.items()), [])
    assert probe_main(["--model", str(smoke_world.model_dir), "--data", str(path), "--split", "train",
                       *flags, "--out", str(out)]) == 0
    cli = [r for r in map(json.loads, out.read_text().splitlines()) if "category" in r]

    model, tokenizer = gradual_jax.load_model(smoke_world.model_dir)
    records = gradual_jax.probe_model(model, tokenizer, questions, dev=dev, **SETTINGS)
    assert [r["id"] for r in records] == [q["id"] for q in questions]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "time")}  # noqa: E731
    assert [strip(r) for r in records] == [strip(r) for r in cli]
    for r in records:  # the SliCK rule, by hand
        expected = ("HighlyKnown" if r["p_greedy"] == 1 else "MaybeKnown" if r["p_greedy"] > 0
                    else "WeaklyKnown" if r["n_sample_correct"] > 0 else "Unknown")
        assert r["category"] == expected
    assert len({r["category"] for r in records}) >= 2, "a probe that finds one category tests little"


def test_probe_model_bad_settings_and_missing_exemplars(smoke_model):
    model, tokenizer = smoke_model
    question = [{"question": "Where was X born?", "answers": ["Y"], "relation": "P19"}]
    with pytest.raises(ConfigError, match="config key 'n_samples': must be >= 0"):
        gradual_jax.probe_model(model, tokenizer, question, dev=question, n_samples=-1)
    with pytest.raises(ValueError, match="needs dev= exemplars"):
        gradual_jax.probe_model(model, tokenizer, question)


def test_run_rejects_an_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        gradual_jax.run("smoke", run_dir=str(tmp_path), train__lrr=1.0)
