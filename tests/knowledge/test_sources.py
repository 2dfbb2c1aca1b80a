"""QA sets from Hugging Face datasets and TFDS: column mappings, carved splits, ids, error lines.

Every dataset here is written locally (local_datasets.py) and read with the Hub offline.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # local_datasets sits beside this file

from local_datasets import hf_offline, write_hf_dataset, write_tfds_dataset  # noqa: E402

from gradual_jax.knowledge.data import DataError, QAExample  # noqa: E402
from gradual_jax.knowledge.sources import (  # noqa: E402
    examples_to_records,
    load_hf_splits,
    load_tfds_splits,
    resolve_columns,
    split_names,
)

pytest.importorskip("datasets")
pytest.importorskip("tensorflow_datasets")

# ----------------------------------------------------------------------------- source-shaped records

# PopQA (akariasai/PopQA): one "test" split, answers as a JSON string, relation in "prop".
POPQA = [
    {"id": 4222362, "subj": "George Rankin", "prop": "occupation", "obj": "politician",
     "question": "What is George Rankin's occupation?",
     "possible_answers": '["politician", "political leader"]', "s_pop": 142},
    {"id": 453, "subj": "Toby Alexander", "prop": "genre", "obj": "jazz",
     "question": "What genre is Toby Alexander?", "possible_answers": '["jazz"]', "s_pop": 31},
    {"id": 1180, "subj": "Abia State", "prop": "capital", "obj": "Umuahia",
     "question": "What is the capital of Abia State?", "possible_answers": '["Umuahia"]', "s_pop": 2000},
    {"id": 77, "subj": "Kyoto", "prop": "country", "obj": "Japan",
     "question": "In what country is Kyoto?", "possible_answers": '["Japan", "JP"]', "s_pop": 90000},
]
POPQA_SPLITS = {"train": "test[:50%]", "dev": "test[50%:75%]", "test": "test[75%:]"}
POPQA_COLUMNS = {"answers": "possible_answers", "relation": "prop"}
POPQA_EXPECTED = {
    "train": [
        QAExample("4222362", "occupation", "What is George Rankin's occupation?",
                  ("politician", "political leader"), "train"),
        QAExample("453", "genre", "What genre is Toby Alexander?", ("jazz",), "train"),
    ],
    "dev": [QAExample("1180", "capital", "What is the capital of Abia State?", ("Umuahia",), "dev")],
    "test": [QAExample("77", "country", "In what country is Kyoto?", ("Japan", "JP"), "test")],
}


def _trivia(qid: str, question: str, aliases: list[str]) -> dict:
    return {
        "question": question, "question_id": qid, "question_source": "http://www.quizballs.com/",
        "entity_pages": {"title": [], "wiki_context": []},
        "answer": {"aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
                   "value": aliases[0] if aliases else "", "type": "WikipediaEntity"},
    }


# TriviaQA rc.nocontext (mandarjoshi/trivia_qa): nested answer.aliases, ids in question_id; its
# own test split has no answers, so test is carved from validation.
TRIVIA = {
    "train": [
        _trivia("tc_1", "Which film starred Gloria Swanson as Norma Desmond?",
                ["Sunset Boulevard", "Sunset Blvd"]),
        _trivia("tc_2", "Which element has the symbol Fe?", ["Iron"]),
        _trivia("tc_3", "Who wrote Middlemarch?", ["George Eliot", "Mary Ann Evans"]),
    ],
    "validation": [
        _trivia("qb_8", "What is the capital of Peru?", ["Lima"]),
        _trivia("qb_9", "How many sides has a heptagon?", ["Seven", "7"]),
    ],
    "test": [_trivia("qz_1", "Which planet is the Red Planet?", [])],
}
TRIVIA_SPLITS = {"train": "train", "dev": "validation[:50%]", "test": "validation[50%:]"}
TRIVIA_COLUMNS = {"answers": "answer.aliases", "id": "question_id"}
TRIVIA_EXPECTED = {
    "train": [
        QAExample("tc_1", "all", "Which film starred Gloria Swanson as Norma Desmond?",
                  ("Sunset Boulevard", "Sunset Blvd"), "train"),
        QAExample("tc_2", "all", "Which element has the symbol Fe?", ("Iron",), "train"),
        QAExample("tc_3", "all", "Who wrote Middlemarch?", ("George Eliot", "Mary Ann Evans"), "train"),
    ],
    "dev": [QAExample("qb_8", "all", "What is the capital of Peru?", ("Lima",), "dev")],
    "test": [QAExample("qb_9", "all", "How many sides has a heptagon?", ("Seven", "7"), "test")],
}

# nq_open (google-research-datasets/nq_open): "question" and an "answer" list, no ids.
NQ = {
    "train": [
        {"question": "where is the eiffel tower", "answer": ["Paris"]},
        {"question": "who sang hey jude", "answer": ["The Beatles", "Beatles"]},
    ],
    "validation": [
        {"question": "when did the titanic sink", "answer": ["1912", "April 15, 1912"]},
        {"question": "largest ocean on earth", "answer": ["Pacific Ocean"]},
    ],
}
NQ_SPLITS = {"train": "train", "dev": "validation[:1]", "test": "validation[1:]"}
NQ_EXPECTED = {
    "train": [
        QAExample("nq.train.0", "nq", "where is the eiffel tower", ("Paris",), "train"),
        QAExample("nq.train.1", "nq", "who sang hey jude", ("The Beatles", "Beatles"), "train"),
    ],
    "dev": [QAExample("nq.dev.0", "nq", "when did the titanic sink", ("1912", "April 15, 1912"), "dev")],
    "test": [QAExample("nq.test.0", "nq", "largest ocean on earth", ("Pacific Ocean",), "test")],
}

WORLD = [
    QAExample("P17.train.0", "P17", "Which country is Painblanc located in?", ("France",), "train",
              "Painblanc"),
    QAExample("born_in.train.1", "born_in", "Where was Ada Lark born?", ("Paris", "Lyon"), "train"),
]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with hf_offline():
        yield


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The three source-shaped sets as local parquet datasets, and a datasets cache."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "popqa": write_hf_dataset(root / "popqa", {"test": POPQA}),
        "trivia": write_hf_dataset(root / "trivia", TRIVIA),
        "nq": write_hf_dataset(root / "nq", NQ),
        "cache": root / "cache",
    }


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """The three source-shaped sets as prepared array_record TFDS datasets in one data_dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    write_tfds_dataset(data_dir, "popqa_local", {"test": POPQA})
    write_tfds_dataset(data_dir, "trivia_qa_local", TRIVIA)
    write_tfds_dataset(data_dir, "nq_open_local", NQ)
    return data_dir


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- pure parts


def test_split_names():
    assert split_names("validation[:50%]") == ["validation"]
    assert split_names("train[:10%] + validation") == ["train", "validation"]
    assert split_names("test") == ["test"]


def test_resolve_columns_defaults_and_errors():
    assert resolve_columns(None, ["question", "answer"], "src") == {
        "question": "question", "answers": "answer", "relation": None, "id": None}
    available = ["question", "answer", "id", "relation"]
    assert resolve_columns({"answers": "answer.aliases"}, available, "src") == {
        "question": "question", "answers": "answer.aliases", "relation": "relation", "id": "id"}
    with pytest.raises(DataError) as e:
        resolve_columns({"question": "query"}, ["q", "a"], "src")
    assert _one_line_error(e) == "src: no column 'query' (columns.question); available columns: q, a"
    with pytest.raises(DataError) as e:
        resolve_columns(None, ["q", "answers"], "src")
    assert _one_line_error(e) == "src: no 'question' column; map columns.question to one of: q, answers"
    with pytest.raises(DataError, match=r"unknown column field\(s\) \['subject'\]"):
        resolve_columns({"subject": "subj"}, ["subj"], "src")


def test_examples_to_records():
    assert examples_to_records(WORLD) == [
        {"id": "P17.train.0", "question": "Which country is Painblanc located in?",
         "answers": ["France"], "relation": "P17"},
        {"id": "born_in.train.1", "question": "Where was Ada Lark born?", "answers": ["Paris", "Lyon"],
         "relation": "born_in"},
    ]


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_hf_popqa_json_answers_relation_column_carved_splits(tmp_path, fmt):
    path = write_hf_dataset(tmp_path / "popqa", {"test": POPQA}, fmt=fmt)
    got = load_hf_splits(str(path), splits=POPQA_SPLITS, columns=POPQA_COLUMNS,
                         cache_dir=tmp_path / "cache")
    assert got == POPQA_EXPECTED


def test_hf_trivia_nested_aliases_and_question_ids(hf_dirs):
    got = load_hf_splits(str(hf_dirs["trivia"]), splits=TRIVIA_SPLITS, columns=TRIVIA_COLUMNS,
                         cache_dir=hf_dirs["cache"])
    assert got == TRIVIA_EXPECTED


def test_hf_nq_open_answer_list_shared_relation(hf_dirs):
    def load():
        return load_hf_splits(str(hf_dirs["nq"]), splits=NQ_SPLITS, relation="nq",
                              cache_dir=hf_dirs["cache"])

    assert load() == NQ_EXPECTED
    assert load() == NQ_EXPECTED  # stable ids, also when read back from the cache


def test_hf_answer_shapes(tmp_path):
    squad = {"train": [
        {"id": "s1", "question": "Where?",
         "answers": {"text": ["here", "there"], "answer_start": [0, 5]}},
    ]}
    listed = {"train": [{"id": "l1", "question": "Who?", "answers": [{"text": "Ann"}, {"text": "Bo"}]}]}
    strings = {"train": [{"id": 7, "question": "What?", "answers": "Umuahia"},
                         {"id": 8, "question": "Which?", "answers": "[citation needed]"}]}
    cache = tmp_path / "cache"

    def load(name, records, columns=None, fmt="parquet"):
        path = write_hf_dataset(tmp_path / name, records, fmt=fmt)
        return load_hf_splits(str(path), splits={"train": "train"}, columns=columns, cache_dir=cache)

    assert load("squad", squad, {"answers": "answers.text"}) == {
        "train": [QAExample("s1", "all", "Where?", ("here", "there"), "train")]}
    assert load("listed", listed, {"answers": "answers.text"}, fmt="jsonl") == {
        "train": [QAExample("l1", "all", "Who?", ("Ann", "Bo"), "train")]}
    assert load("strings", strings) == {"train": [  # a bracketed non-JSON string is one answer
        QAExample("7", "all", "What?", ("Umuahia",), "train"),
        QAExample("8", "all", "Which?", ("[citation needed]",), "train"),
    ]}


def test_hf_round_trip_of_examples_to_records(tmp_path):
    path = write_hf_dataset(tmp_path / "world", {"train": examples_to_records(WORLD)})
    got = load_hf_splits(str(path), splits={"train": "train"}, cache_dir=tmp_path / "cache")
    assert got == {"train": WORLD}  # P17's subject comes back from its template


def test_hf_error_lines(hf_dirs, tmp_path):
    def load(path, **kw):
        kw.setdefault("splits", TRIVIA_SPLITS)
        return load_hf_splits(str(path), cache_dir=hf_dirs["cache"], **kw)

    with pytest.raises(DataError) as e:
        load(hf_dirs["nq"], splits={"train": "train", "dev": "validation", "test": "test[:50%]"})
    assert _one_line_error(e) == (
        f"{hf_dirs['nq']}: unknown split 'test' (splits.test = 'test[:50%]'); "
        "available splits: train, validation")
    with pytest.raises(DataError) as e:
        load(hf_dirs["popqa"], splits=POPQA_SPLITS, columns={"answers": "possible_answer"})
    assert _one_line_error(e) == (
        f"{hf_dirs['popqa']} split 'test[:50%]': no column 'possible_answer' (columns.answers); "
        "available columns: id, subj, prop, obj, question, possible_answers, s_pop")
    with pytest.raises(DataError) as e:
        load(hf_dirs["trivia"], columns={"answers": "answer.alias", "id": "question_id"})
    assert _one_line_error(e) == (
        f"{hf_dirs['trivia']} split 'train' row 0: no field 'alias' in answer "
        "(has: aliases, normalized_aliases, value, type)")
    with pytest.raises(DataError) as e:  # TriviaQA's own test split holds no answers
        load(hf_dirs["trivia"], splits={"test": "test"}, columns=TRIVIA_COLUMNS)
    assert _one_line_error(e).endswith(
        "split 'test' row 0: example has no answers ('answer.aliases' is empty)")
    with pytest.raises(DataError) as e:  # datasets refuses empty slices itself
        load(hf_dirs["nq"], splits={"train": "train[:0]"})
    assert _one_line_error(e).startswith(
        f"{hf_dirs['nq']}: cannot load splits {{'train': 'train[:0]'}} (")
    with pytest.raises(DataError, match=r"'train': duplicate example id 'http://www.quizballs.com/'$"):
        load(hf_dirs["trivia"], splits={"train": "train"}, columns={"answers": "answer.aliases",
                                                                      "id": "question_source"})
    with pytest.raises(DataError, match=r"splits must map train, dev, test"):
        load(hf_dirs["nq"], splits={"validation": "validation"})


def test_hf_not_found_lines(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_hf_splits(str(missing), splits={"train": "train"}, cache_dir=tmp_path)
    assert _one_line_error(e) == f"{missing}: dataset directory not found"
    with pytest.raises(DataError) as e:  # offline and not cached: nothing reaches the network
        load_hf_splits("nobody-xyz/none-such", name="rc", splits={"train": "train"}, cache_dir=tmp_path)
    assert _one_line_error(e).startswith(
        "nobody-xyz/none-such (rc): dataset not found locally and the Hub is unreachable (")


# ----------------------------------------------------------------------------- TFDS


def test_tfds_written_without_tensorflow(tfds_dir):
    import tensorflow_datasets as tfds

    assert "tensorflow" not in sys.modules
    src = tfds.data_source("trivia_qa_local", split="validation", data_dir=str(tfds_dir))
    assert len(src) == 2 and src[1]["question_id"] == b"qb_9"
    assert list(src[1]["answer"]["aliases"]) == [b"Seven", b"7"]


def test_tfds_popqa(tfds_dir):
    got = load_tfds_splits("popqa_local", data_dir=tfds_dir, splits=POPQA_SPLITS, columns=POPQA_COLUMNS)
    assert got == POPQA_EXPECTED


def test_tfds_trivia_and_nq(tfds_dir):
    assert load_tfds_splits("trivia_qa_local", data_dir=tfds_dir, splits=TRIVIA_SPLITS,
                            columns=TRIVIA_COLUMNS) == TRIVIA_EXPECTED
    assert load_tfds_splits("nq_open_local:1.0.0", data_dir=tfds_dir, splits=NQ_SPLITS,
                            relation="nq") == NQ_EXPECTED


def test_tfds_round_trip_of_examples_to_records(tmp_path):
    write_tfds_dataset(tmp_path, "world_qa", {"train": examples_to_records(WORLD)})
    assert load_tfds_splits("world_qa", data_dir=tmp_path, splits={"train": "train"}) == {"train": WORLD}


def test_tfds_error_lines(tfds_dir):
    with pytest.raises(DataError) as e:
        load_tfds_splits("nq_open_local", data_dir=tfds_dir, splits={"train": "train", "test": "test"})
    assert _one_line_error(e) == (
        "TFDS nq_open_local: unknown split 'test' (splits.test = 'test'); "
        "available splits: train, validation")
    with pytest.raises(DataError) as e:
        load_tfds_splits("popqa_local", data_dir=tfds_dir, splits=POPQA_SPLITS,
                         columns={"answers": "answers"})
    assert _one_line_error(e) == (
        "TFDS popqa_local split 'test[:50%]': no column 'answers' (columns.answers); "
        "available columns: id, obj, possible_answers, prop, question, s_pop, subj")
    with pytest.raises(DataError) as e:
        load_tfds_splits("no_such_qa", data_dir=tfds_dir, splits={"train": "train"})
    assert _one_line_error(e) == (
        f"TFDS no_such_qa: dataset not found (not registered, nor prepared in {tfds_dir})")
    with pytest.raises(DataError) as e:  # TFDS, unlike datasets, refuses a slice past the end
        load_tfds_splits("nq_open_local", data_dir=tfds_dir, splits={"train": "train[:1000]"})
    assert _one_line_error(e) == (
        "TFDS nq_open_local: cannot load splits {'train': 'train[:1000]'} "
        "(Requested slice [:1000] incompatible with 2 examples.)")
