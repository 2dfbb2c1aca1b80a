"""Probe prompt sets, prompt formats and answer clean-up."""

import json

import pytest

from gradual_jax.knowledge.data import DataError, QAExample
from gradual_jax.knowledge.prompts import (
    build_prompt_sets,
    clean_answer,
    format_probe_prompt,
    format_train_pair,
    load_prompt_sets,
    save_prompt_sets,
)


def _dev(relation, n, *, answers=("x", "y")):
    return [
        QAExample(
            f"{relation}.dev.{i}", relation, f"{relation} question {i}?",
            tuple(f"{a}{i}" for a in answers), "dev",
        )
        for i in range(n)
    ]


DEV = _dev("P1", 12) + _dev("P2", 6)


def test_prompt_sets_shape_and_content():
    sets = build_prompt_sets(DEV, ["P1", "P2"], n_prompts=10, k=4, seed=0)
    assert list(sets) == ["P1", "P2"]
    for relation, pool_size in (("P1", 12), ("P2", 6)):
        pool = {f"{relation} question {i}?": f"x{i}" for i in range(pool_size)}
        assert len(sets[relation]) == 10
        for exemplars in sets[relation]:
            questions = [ex["question"] for ex in exemplars]
            assert len(questions) == 4 and len(set(questions)) == 4  # no repeats within a set
            for ex in exemplars:
                assert set(ex) == {"question", "answer"}
                assert pool[ex["question"]] == ex["answer"]  # same relation, first answer
    # 10 sets of 4 from 12 questions: with a working sampler they cannot all be the same set
    assert len({tuple(ex["question"] for ex in s) for s in sets["P1"]}) > 1


def test_prompt_sets_are_seeded_and_per_relation():
    a = build_prompt_sets(DEV, ["P1", "P2"], seed=3)
    assert a == build_prompt_sets(DEV, ["P1", "P2"], seed=3)
    assert a["P1"] == build_prompt_sets(DEV, ["P1"], seed=3)["P1"]  # other relations do not shift P1
    assert a["P2"] == build_prompt_sets(DEV, ["P2", "P1"], seed=3)["P2"]
    assert a["P1"] != build_prompt_sets(DEV, ["P1"], seed=4)["P1"]


def test_prompt_sets_too_few_dev_examples_names_relation_and_counts():
    dev = _dev("P9", 3) + [QAExample("P9.dev.3", "P9", "P9 question 0?", ("dup",), "dev")]
    with pytest.raises(DataError, match=r"'P9' has 3 distinct dev examples, fewer than k=4"):
        build_prompt_sets(dev, ["P9"], k=4)
    with pytest.raises(DataError, match=r"'P404' has 0"):
        build_prompt_sets(DEV, ["P404"], k=4)


def test_save_load_round_trip(tmp_path):
    sets = build_prompt_sets(DEV, ["P1", "P2"], n_prompts=3, k=2)
    path = tmp_path / "sub" / "prompts.json"
    save_prompt_sets(path, sets)
    assert load_prompt_sets(path) == sets
    assert [p.name for p in path.parent.iterdir()] == ["prompts.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"prompts.json:1: malformed JSON"),
        ("[]", r"non-empty object"),
        ('{"P1": []}', r"\['P1'\] must be a non-empty list"),
        (
            '{"P1": [[{"question": "q?"}]]}',
            r"\['P1'\]\[0\]\[0\] must be an object with string 'question' and 'answer'",
        ),
        (
            '{"P1": [[{"question": "q?", "answer": "a"}], "oops"]}',
            r"\['P1'\]\[1\] must be a non-empty list",
        ),
    ],
)
def test_load_prompt_sets_rejects_bad_structure(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_prompt_sets(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_prompt_sets_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompt_sets(tmp_path / "nope.json")


def test_format_probe_prompt_exact():
    exemplars = [
        {"question": "Where was Ada born?", "answer": "London"},
        {"question": "Where was Kurt born?", "answer": "Brno"},
    ]
    assert format_probe_prompt(exemplars, "Where was Emmy born?") == (
        "Q: Where was Ada born?\nA: London\n\n"
        "Q: Where was Kurt born?\nA: Brno\n\n"
        "Q: Where was Emmy born?\nA:"
    )
    assert format_probe_prompt([], "Q1?") == "Q: Q1?\nA:"


def test_format_train_pair_presets():
    assert format_train_pair("Who owns X?", "Y Corp", "gekhman") == (
        "Answer the following question. Who owns X?\n",
        "Y Corp",
    )
    assert format_train_pair("Who owns X?", "Y Corp", "qa") == ("Q: Who owns X?\nA:", " Y Corp\n")


def test_format_train_pair_custom_templates():
    custom = "Question: {question}\nAnswer: {answer}"
    assert format_train_pair("q?", "a", custom) == ("Question: q?\nAnswer:", " a")
    assert format_train_pair("q?", "a", "<{question}>") == ("<q?>", "a")
    assert format_train_pair("q?", "a", "{question} -> {answer}.") == ("q? ->", " a.")
    for bad in ("no placeholder", "{answer} then {question}", "{question} {answer} {answer}"):
        with pytest.raises(ValueError):
            format_train_pair("q?", "a", bad)


def test_format_train_pair_presets_roundtrip_as_saved_json(tmp_path):
    # templates usually come from YAML/JSON config; the newline must survive as a real newline
    template = json.loads(json.dumps("Q: {question}\nA: {answer}\n"))
    assert format_train_pair("q?", "a", template) == format_train_pair("q?", "a", "qa")


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (" Paris\nQ: Where was", "Paris"),
        ("  Rome  ", "Rome"),
        ("\nParis", ""),
        ("", ""),
        ("New York City\n\n", "New York City"),
    ],
)
def test_clean_answer(completion, answer):
    assert clean_answer(completion) == answer
