"""QA loaders: the shared EntityQuestions copy, the official layout, generic sources, Gekhman's setup."""

import gzip
import io
import json
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gradual_jax.knowledge import data as data_mod
from gradual_jax.knowledge.data import (
    RELATION_TEMPLATES,
    SPLITS,
    TEST_RELATIONS,
    TRAIN_RELATIONS,
    DataError,
    QAExample,
    download_entityquestions,
    drop_overlapping,
    entity_keys,
    extract_subject,
    from_hf_dataset,
    from_tfds_source,
    gekhman_setup,
    load_entityquestions,
    load_jsonl,
    overlaps,
)
from gradual_jax.knowledge.match import normalize_answer

# ----------------------------------------------------------------------------- helpers


def _gz_line_counts(eq_dir: Path, split: str) -> dict[str, int]:
    """Lines per relation file, counted without the loader (what `zcat | wc -l` gives)."""
    counts = {}
    for path in sorted((eq_dir / split).glob(f"P*.{split}.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            counts[path.name.split(".")[0]] = sum(1 for _ in f)
    return counts


def _raw_records(eq_dir: Path, split: str, relation: str) -> list[dict]:
    with gzip.open(eq_dir / split / f"{relation}.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def eq_all(eq_dir):
    return {split: load_entityquestions(eq_dir, split) for split in SPLITS}


@pytest.fixture(scope="module")
def gekhman(eq_dir):
    return gekhman_setup(eq_dir)


# ----------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("question", "template", "subject"),
    [
        ("Which country is Painblanc located in?", "Which country is [X] located in?", "Painblanc"),
        ("Who is Carl Sagan's child?", "Who is [X]'s child?", "Carl Sagan"),
        ("Who founded [X]?", "Who founded [X]?", "[X]"),
        ("Where was Ada born?", "Who founded [X]?", None),
        ("Who founded ?", "Who founded [X]?", None),  # nothing where [X] stands
    ],
)
def test_extract_subject(question, template, subject):
    assert extract_subject(question, template) == subject


def test_builtin_templates_match_the_shared_file(eq_dir):
    assert RELATION_TEMPLATES == json.loads((eq_dir / "relation_query_templates.json").read_text())


# ----------------------------------------------------------------------------- shared copy


def test_copy_counts_per_split_and_relation(eq_dir, eq_all):
    for split in SPLITS:
        expected = _gz_line_counts(eq_dir, split)
        assert len(expected) == 24
        assert Counter(ex.relation for ex in eq_all[split]) == expected
    # spot values from `zcat | wc -l`: the copy is not a uniform 8000/1000/1000
    assert _gz_line_counts(eq_dir, "train")["P800"] == 1763
    assert _gz_line_counts(eq_dir, "dev")["P112"] == 509
    assert _gz_line_counts(eq_dir, "test")["P36"] == 886
    assert [len(eq_all[s]) for s in SPLITS] == [176560, 22068, 22075]
    assert sum(len(v) for v in eq_all.values()) == 220703  # the README's total


def test_copy_examples_keep_file_order_ids_and_subjects(eq_dir, eq_all):
    by_id = {ex.id: ex for split in SPLITS for ex in eq_all[split]}
    assert len(by_id) == 220703  # ids unique across splits
    assert by_id["P17.train.0"] == QAExample(
        "P17.train.0", "P17", "Which country is Painblanc located in?", ("France",), "train", "Painblanc"
    )
    raw = _raw_records(eq_dir, "test", "P40")
    for i in (0, 500, len(raw) - 1):
        ex = by_id[f"P40.test.{i}"]
        assert (ex.question, list(ex.answers)) == (raw[i]["question"], raw[i]["answers"])
        assert ex.question == f"Who is {ex.subject}'s child?"
    assert all(ex.subject for split in SPLITS for ex in eq_all[split])


def test_relations_and_limit(eq_dir):
    got = load_entityquestions(eq_dir, "dev", ["P800", "P17"], limit_per_relation=3)
    assert [ex.id for ex in got] == [f"{r}.dev.{i}" for r in ("P800", "P17") for i in range(3)]
    with pytest.raises(ValueError):
        load_entityquestions(eq_dir, "dev", ["P17"], limit_per_relation=-1)


# ----------------------------------------------------------------------------- official layout

RECORDS = {
    "P17": [
        {"question": "Which country is Painblanc located in?", "answers": ["France"]},
        {"question": "Which country is Lodz located in?", "answers": ["Poland", "Polska"]},
    ],
    "P50": [{"question": "Who is the author of Dune?", "answers": ["Frank Herbert"]}],
}


def _write_official(base: Path, records=RECORDS, splits=SPLITS) -> None:
    for split in splits:
        (base / split).mkdir(parents=True)
        for relation, recs in records.items():
            (base / split / f"{relation}.{split}.json").write_text(json.dumps(recs, indent=4))


def _write_copy(base: Path, records=RECORDS, splits=SPLITS) -> None:
    for split in splits:
        (base / split).mkdir(parents=True)
        for relation, recs in records.items():
            with gzip.open(base / split / f"{relation}.{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)


def test_official_layout_loads_like_the_copy(tmp_path):
    _write_official(tmp_path / "release" / "dataset")
    _write_copy(tmp_path / "copy")
    for split in SPLITS:
        copy = load_entityquestions(tmp_path / "copy", split)
        assert load_entityquestions(tmp_path / "release", split) == copy  # dataset/{split}/...
        assert load_entityquestions(tmp_path / "release" / "dataset", split) == copy  # {split}/...
    test = load_entityquestions(tmp_path / "release", "test")
    assert [ex.id for ex in test] == ["P17.test.0", "P17.test.1", "P50.test.0"]
    assert test[1].answers == ("Poland", "Polska") and test[1].subject == "Lodz"
    assert test[2].subject == "Dune"  # built-in templates: the zip has no templates file


# ----------------------------------------------------------------------------- bad input


def test_missing_root_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        load_entityquestions(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in _one_line_error(err)
    with pytest.raises(DataError, match="no EntityQuestions files for split 'train'") as err:
        load_entityquestions(tmp_path, "train")
    assert "P<id>.train.jsonl.gz" in _one_line_error(err)


def test_missing_relation_names_it(tmp_path):
    _write_copy(tmp_path)
    with pytest.raises(DataError, match=r"no file for relation 'P999', split 'dev'") as err:
        load_entityquestions(tmp_path, "dev", ["P17", "P999"])
    assert "P999.dev.jsonl.gz" in _one_line_error(err)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "P17.train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"question": "Which country is A located in?", "answers": ["B"]}\n')
        f.write('\n{"question": oops}\n')
    with pytest.raises(DataError, match="malformed JSON line") as err:
        load_entityquestions(tmp_path, "train")
    assert f"{path}:3:" in _one_line_error(err)


def test_malformed_json_array_and_no_answers(tmp_path):
    _write_official(tmp_path, splits=("dev",))
    path = tmp_path / "dev" / "P50.dev.json"
    path.write_text('[{"question": "Who is the author of Dune?", "answers": []}]')
    with pytest.raises(DataError, match="no answers") as err:
        load_entityquestions(tmp_path, "dev")
    assert f"{path}: record 0" in _one_line_error(err)
    path.write_text('{"question": "Who is the author of Dune?", "answers": ["Frank Herbert"]}')
    with pytest.raises(DataError, match="expected a JSON array"):
        load_entityquestions(tmp_path, "dev")
    path.write_text('[{"question": "Who')
    with pytest.raises(DataError, match=f"{path}:1: malformed JSON"):
        load_entityquestions(tmp_path, "dev")


# ----------------------------------------------------------------------------- generic sources


def test_load_jsonl_string_or_list_answers(tmp_path):
    path = tmp_path / "P19.test.jsonl"
    path.write_text(
        '{"question": "Where was Ada born?", "answers": "London"}\n'
        "\n"
        '{"question": "Where was Kurt born?", "answers": ["Brno", "Brünn"]}\n'
        '{"question": "Who owns X?", "answer": "Y", "relation": "P127", "id": "custom-7"}\n'
    )
    got = load_jsonl(path)
    assert got == [
        QAExample("P19.test.0", "P19", "Where was Ada born?", ("London",), "test", "Ada"),
        QAExample("P19.test.1", "P19", "Where was Kurt born?", ("Brno", "Brünn"), "test", "Kurt"),
        QAExample("custom-7", "P127", "Who owns X?", ("Y",), "test", "X"),
    ]
    other = load_jsonl(path, split="dev", relation="rel", id_key=None, relation_key="none")
    assert [ex.id for ex in other] == ["rel.dev.0", "rel.dev.1", "rel.dev.2"]


def test_load_jsonl_plain_name_gz_and_errors(tmp_path):
    path = tmp_path / "qa.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"question": "q?", "answers": ["a"]}\n')
    assert load_jsonl(path) == [QAExample("all.all.0", "all", "q?", ("a",), "all", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answers": ["a"]}\n{"question": "r?", "answers": [""]}\n')
    with pytest.raises(DataError, match="no answers") as err:
        load_jsonl(bad)
    assert f"{bad}:2:" in _one_line_error(err)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        '{"id": 1, "question": "q?", "answers": "a"}\n{"id": 1, "question": "r?", "answers": "b"}\n'
    )
    with pytest.raises(DataError, match="duplicate example id '1'"):
        load_jsonl(dup)
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_from_hf_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [
            {
                "question": "Which country is Painblanc located in?",
                "answers": ["France"],
                "relation": "P17",
            },
            {"question": "Who founded Acme?", "answers": ["Wile E.", "Road Runner"], "relation": "P112"},
        ]
    )
    assert from_hf_dataset(ds, split="validation") == [
        QAExample(
            "P17.validation.0", "P17", "Which country is Painblanc located in?", ("France",),
            "validation", "Painblanc",
        ),
        QAExample(
            "P112.validation.1", "P112", "Who founded Acme?", ("Wile E.", "Road Runner"),
            "validation", "Acme",
        ),
    ]
    squad = datasets.Dataset.from_list(
        [{"id": "s1", "question": "q?", "answers": {"text": ["a", "b"], "answer_start": [0, 3]}}]
    )
    assert from_hf_dataset(squad) == [QAExample("s1", "all", "q?", ("a", "b"), "train", None)]
    empty = datasets.Dataset.from_list([{"question": "q?", "answers": []}])
    with pytest.raises(DataError, match=r"row 0: example has no answers"):
        from_hf_dataset(empty)


def test_from_tfds_source_decodes_bytes():
    source = [
        {
            "question": b"Who is the author of Dune?",
            "answers": np.array([b"Frank Herbert"], dtype=object),
            "relation": b"P50",
        },
        {"question": b"Caf\xc3\xa9 owner?", "answers": b"Zo\xc3\xab"},
    ]
    assert from_tfds_source(source, relation="misc", split="test") == [
        QAExample("P50.test.0", "P50", "Who is the author of Dune?", ("Frank Herbert",), "test", "Dune"),
        QAExample("misc.test.1", "misc", "Café owner?", ("Zoë",), "test", None),
    ]
    assert len(from_tfds_source(source, limit=1)) == 1
    with pytest.raises(DataError, match=r"record 0: 'question' must be a non-empty string"):
        from_tfds_source([{"answers": [b"a"]}])
    with pytest.raises(DataError, match=r"record 0: bytes are not UTF-8"):
        from_tfds_source([{"question": b"\xff?", "answers": [b"a"]}])


# ----------------------------------------------------------------------------- download


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def test_download_offline_error_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = tmp_path / "eq"
    with pytest.raises(DataError, match="could not download EntityQuestions") as err:
        download_entityquestions(cache)
    message = _one_line_error(err)
    assert all(url in message for url in data_mod.EQ_URLS) and "name resolution" in message
    assert list(cache.iterdir()) == []


def test_download_extracts_release_and_reuses_it(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in SPLITS:
            for relation, recs in RECORDS.items():
                zf.writestr(f"dataset/{split}/{relation}.{split}.json", json.dumps(recs))
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(buf.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = download_entityquestions(tmp_path / "eq")
    assert calls == [data_mod.EQ_URLS[0]]
    assert root == tmp_path / "eq" / "release" / "dataset"
    assert [ex.id for ex in load_entityquestions(root, "dev")] == ["P17.dev.0", "P17.dev.1", "P50.dev.0"]
    assert sorted(p.name for p in (tmp_path / "eq").iterdir()) == ["release"]  # zip and temp gone
    assert download_entityquestions(tmp_path / "eq") == root and len(calls) == 1


def test_download_returns_existing_copy_without_network(eq_dir, monkeypatch):
    def no_network(url, timeout=None):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert download_entityquestions(eq_dir) == eq_dir


# ----------------------------------------------------------------------------- Gekhman's setup


def test_gekhman_relations_and_single_answers(gekhman):
    assert set(gekhman) == {"train", "dev", "test"}
    assert {ex.relation for ex in gekhman["train"]} == set(TRAIN_RELATIONS)
    assert {ex.relation for ex in gekhman["dev"]} == set(TRAIN_RELATIONS) | set(TEST_RELATIONS)
    assert {ex.relation for ex in gekhman["test"]} == set(TEST_RELATIONS)
    assert {ex.split for ex in gekhman["train"]} == {"train"}
    assert {ex.split for ex in gekhman["dev"]} == {"dev"}
    assert {ex.split for ex in gekhman["test"]} == {"test"}
    assert all(len(ex.answers) == 1 for v in gekhman.values() for ex in v)


def test_gekhman_no_train_test_entity_overlap(eq_dir, gekhman):
    # test entities rebuilt from the raw files, without the loader
    entities = set()
    for relations in (TEST_RELATIONS, TRAIN_RELATIONS):
        for relation in relations:
            prefix, suffix = RELATION_TEMPLATES[relation].split("[X]")
            for rec in _raw_records(eq_dir, "test", relation):
                if len(rec["answers"]) == 1:
                    q = rec["question"]
                    subject = q[len(prefix) : len(q) - len(suffix)]
                    entities |= {normalize_answer(subject), normalize_answer(rec["answers"][0])}
    entities.discard("")
    for ex in gekhman["train"]:
        assert normalize_answer(ex.subject) not in entities
        assert normalize_answer(ex.answers[0]) not in entities
    ids = {ex.id for ex in gekhman["train"]}
    assert "P17.train.0" not in ids  # Painblanc -> France; France is a P17 test answer
    assert "P131.train.2" in ids  # Bad Aibling Station -> Bad Aibling survives


def test_gekhman_counts(gekhman):
    # measured on the shared copy; the answer filter leaves few P17 / P495 train examples
    # dev: 10,461 single-answer dev questions of the train relations + 5,847 of the test relations
    assert {k: len(v) for k, v in gekhman.items()} == {"train": 32521, "dev": 10461 + 5847, "test": 5848}
    train = Counter(ex.relation for ex in gekhman["train"])
    assert (train["P17"], train["P495"], train["P26"]) == (201, 47, 6521)


def test_gekhman_limit_is_a_prefix_subset(eq_dir, gekhman):
    small = gekhman_setup(eq_dir, limit_per_relation=5)
    for split, full in gekhman.items():
        per_relation: dict[str, list] = {}
        for ex in full:
            per_relation.setdefault(ex.relation, []).append(ex)
        expected = [ex for exs in per_relation.values() for ex in exs[:5]]
        assert small[split] == expected
    with pytest.raises(ValueError, match="overlap"):
        gekhman_setup(eq_dir, overlap="answer")


def test_overlap_modes_hand_worked():
    q = "Which country is The Louvre located in?"
    test = [QAExample("t.0", "P17", q, ("France",), "test", "The Louvre")]
    entities = entity_keys(test)
    assert entities == {"louvre", "france"}
    q = "Which country is Lyon located in?"
    same_answer = QAExample("a.0", "P17", q, ("france.",), "train", "Lyon")
    same_subject = QAExample("a.1", "P19", "Where was louvre born?", ("Paris",), "train", "louvre")
    unrelated = QAExample("a.2", "P19", "Where was Ada born?", ("London",), "train", "Ada")
    examples = (same_answer, same_subject, unrelated)
    assert [overlaps(ex, entities) for ex in examples] == [True, True, False]
    assert [overlaps(ex, entities, "subject") for ex in (same_answer, same_subject)] == [False, True]
    assert not overlaps(same_subject, entities, "none")


def test_drop_overlapping_hand_worked(caplog):
    def ex(ex_id, relation, answer, subject):
        return QAExample(ex_id, relation, f"q {ex_id}", (answer,), ex_id.split(".")[1], subject)

    test = [
        ex("P36.test.0", "P36", "Paris", "France"),  # entities: paris, france
        ex("P17.test.0", "P17", "Germany", "Lake Constance"),  # germany, lake constance
    ]
    train = [
        ex("P17.train.0", "P17", "France", "Lyon"),  # answer France: a test subject
        ex("P36.train.0", "P36", "Berlin", "Germany"),  # subject Germany: a test answer
        ex("P20.train.0", "P20", "London", "The Lake Constance"),  # subject, after normalising
        ex("P36.train.1", "P36", "Rome", "Italy"),  # nothing in common
        ex("P20.train.1", "P20", "Paris", None),  # no subject; answer Paris: a test answer
    ]
    ids = lambda examples: [e.id for e in examples]  # noqa: E731
    assert ids(drop_overlapping(train, test, "none")) == ids(train)
    with caplog.at_level("INFO", logger="gradual_jax.knowledge.data"):
        kept = drop_overlapping(train, test, "subject")
    assert ids(kept) == ["P17.train.0", "P36.train.1", "P20.train.1"]
    assert "overlap filter (subject): dropped 2 of 5 train examples (P36 1, P20 1)" in caplog.text
    assert ids(drop_overlapping(train, test, "subject_or_answer")) == ["P36.train.1"]
    assert ids(drop_overlapping(train, test)) == ["P36.train.1"]  # Gekhman's default
    caplog.clear()
    with caplog.at_level("INFO", logger="gradual_jax.knowledge.data"):
        assert ids(drop_overlapping(train[-1:], test, "subject")) == ["P20.train.1"]
    assert "no train example has a known subject" in caplog.text
    with pytest.raises(ValueError, match="overlap"):
        drop_overlapping(train, test, "answer")
