"""Closed-book QA examples: EntityQuestions loaders, generic sources and Gekhman's setup.

Every loader returns ``QAExample`` records in source order. An example's id is
``"{relation}.{split}.{index}"`` where ``index`` is the record's position in its source (a file
or a dataset), so ids stay the same whatever is filtered out later. Bad input raises
``DataError`` with one line naming the file (and line or record) or key at fault.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradual_jax.errors import UserError
from gradual_jax.knowledge.match import normalize_answer

log = logging.getLogger(__name__)


class DataError(UserError):
    """Bad QA input; the message is one line naming the file, record or key and what was expected."""


@dataclass(frozen=True)
class QAExample:
    """One closed-book question with its accepted answers (at least one)."""

    id: str
    relation: str
    question: str
    answers: tuple[str, ...]
    split: str
    subject: str | None = None


SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Gekhman et al. 2024: 12 in-distribution relations for fine-tuning, 7 held-out test relations.
TRAIN_RELATIONS: tuple[str, ...] = (
    "P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69", "P740", "P800",
)
TEST_RELATIONS: tuple[str, ...] = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")

# The release's relation_query_templates.json, built in so the official zip (which lacks it)
# still yields subjects. A templates file beside the data overrides these entries.
RELATION_TEMPLATES: dict[str, str] = {
    "P17": "Which country is [X] located in?",
    "P19": "Where was [X] born?",
    "P20": "Where did [X] die?",
    "P26": "Who is [X] married to?",
    "P30": "Which continent is [X] located?",
    "P36": "What is the capital of [X]?",
    "P40": "Who is [X]'s child?",
    "P50": "Who is the author of [X]?",
    "P69": "Where was [X] educated?",
    "P106": "What kind of work does [X] do?",
    "P112": "Who founded [X]?",
    "P127": "Who owns [X]?",
    "P131": "Where is [X] located?",
    "P136": "What type of music does [X] play?",
    "P159": "Where is the headquarter of [X]?",
    "P170": "Who was [X] created by?",
    "P175": "Who performed [X]?",
    "P176": "Which company is [X] produced by?",
    "P264": "What music label is [X] represented by?",
    "P276": "Where is [X] located?",
    "P407": "Which language was [X] written in?",
    "P413": "What position does [X] play?",
    "P495": "Which country was [X] created in?",
    "P740": "Where was [X] founded?",
    "P800": "What is [X] famous for?",
    "P19_similar": "What is the birthplace of [X]?",
    "P159_similar": "Where is [X] headquartered?",
    "P170_similar": "Who is the creator of [X]?",
}
TEMPLATES_FILE = "relation_query_templates.json"

# Official release (linked from the princeton-nlp/EntityQuestions README), then the GitHub
# archive of the commit the shared copy was taken from (its dataset/ holds the same JSON files).
EQ_URLS: tuple[str, ...] = (
    "https://nlp.cs.princeton.edu/projects/entity-questions/dataset.zip",
    "https://github.com/princeton-nlp/EntityQuestions/archive/"
    "096c261f327431b30af7ff718670f4bd13214908.zip",
)

_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")
_KNOWN_SPLITS = frozenset({"train", "dev", "validation", "test"})
DEFAULT_RELATION = "all"
DEFAULT_SPLIT = "all"


def extract_subject(question: str, template: str) -> str | None:
    """The text standing for ``[X]`` in ``template`` within ``question``, or None if it does not fit."""
    if template.count("[X]") != 1:
        return None
    prefix, suffix = template.split("[X]")
    if len(question) <= len(prefix) + len(suffix):
        return None
    if not (question.startswith(prefix) and question.endswith(suffix)):
        return None
    return question[len(prefix) : len(question) - len(suffix)]


# ----------------------------------------------------------------------------- record parsing


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def _plain(value: Any) -> Any:
    """Decode bytes and numpy values (as TFDS data sources return them) into str/list/dict."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _answers(value: Any, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, Mapping) and "text" in value:  # SQuAD-style {"text": [...], ...}
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        got = type(value).__name__
        raise DataError(f"{where}: '{key}' must be a string or a list of strings, got {got}")
    if not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: '{key}' must hold only strings")
    answers = tuple(a for a in value if a.strip())
    if not answers:
        raise DataError(f"{where}: example has no answers ('{key}' is empty)")
    return answers


def _example(
    rec: Any,
    where: str,
    *,
    index: int,
    relation: str,
    split: str,
    templates: Mapping[str, str],
    question_key: str = "question",
    answers_key: str = "answers",
    relation_key: str | None = None,
    id_key: str | None = None,
) -> QAExample:
    if not isinstance(rec, Mapping):
        raise DataError(
            f"{where}: expected an object with '{question_key}' and '{answers_key}', "
            f"got {type(rec).__name__}"
        )
    question = rec.get(question_key)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: '{question_key}' must be a non-empty string")
    if answers_key in rec:
        answers = _answers(rec[answers_key], where, answers_key)
    elif answers_key == "answers" and "answer" in rec:
        answers = _answers(rec["answer"], where, "answer")
    else:
        raise DataError(f"{where}: example has no answers (no '{answers_key}' key)")
    if relation_key is not None and rec.get(relation_key) is not None:
        relation = rec[relation_key]
        if not isinstance(relation, str) or not relation:
            raise DataError(f"{where}: '{relation_key}' must be a non-empty string")
    ex_id = f"{relation}.{split}.{index}"
    if id_key is not None and rec.get(id_key) is not None:
        ex_id = str(rec[id_key])
    template = templates.get(relation)
    subject = extract_subject(question, template) if template else None
    return QAExample(ex_id, relation, question, answers, split, subject)


def _read_records(path: Path) -> Iterator[tuple[int, Any, str]]:
    """Yield (index, record, where) from a JSON array or a (gzipped) JSONL file."""
    if path.name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON array of {{question, answers}} records, "
                f"got {type(data).__name__}"
            )
        for i, rec in enumerate(data):
            yield i, rec, f"{path}: record {i}"
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    index = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                yield index, rec, f"{path}:{lineno}"
                index += 1
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit_per_relation must be None or a non-negative int, got {limit!r}")


def _unique_ids(examples: list[QAExample], source: str) -> list[QAExample]:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{source}: duplicate example id {ex.id!r}")
        seen.add(ex.id)
    return examples


# ----------------------------------------------------------------------------- EntityQuestions


def _split_dirs(root: Path, split: str) -> list[Path]:
    return [root / split, root / "dataset" / split]


def _relation_file(root: Path, split: str, relation: str) -> Path | None:
    for directory in _split_dirs(root, split):
        for suffix in _SUFFIXES:
            path = directory / f"{relation}.{split}{suffix}"
            if path.is_file():
                return path
    return None


def _discover_relations(root: Path, split: str) -> list[str]:
    pattern = re.compile(rf"^(P\d+)\.{re.escape(split)}\.(?:jsonl\.gz|jsonl|json)$")
    found: set[str] = set()
    for directory in _split_dirs(root, split):
        if directory.is_dir():
            found.update(m.group(1) for p in directory.iterdir() if (m := pattern.match(p.name)))
    return sorted(found, key=lambda r: int(r[1:]))


def load_templates(root: str | Path | None = None) -> dict[str, str]:
    """Relation -> question template (``[X]`` marks the subject).

    The built-in table, overridden by ``relation_query_templates.json`` in ``root`` or its parent
    when one is there.
    """
    templates = dict(RELATION_TEMPLATES)
    if root is None:
        return templates
    root = Path(root)
    for path in (root / TEMPLATES_FILE, root.parent / TEMPLATES_FILE):
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: cannot read templates ({_one_line(e)})") from None
            if not isinstance(found, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and "[X]" in v for k, v in found.items()
            ):
                raise DataError(
                    f"{path}: expected an object mapping relation ids to templates containing [X]"
                )
            templates.update(found)
            break
    return templates


def _expected_layout(root: Path, split: str, relation: str = "P<id>") -> str:
    return (
        f"expected {root / split / f'{relation}.{split}.jsonl.gz'} (gzipped JSONL copy) or "
        f"{root / 'dataset' / split / f'{relation}.{split}.json'} (official release)"
    )


def load_entityquestions(
    root: str | Path,
    split: str,
    relations: Sequence[str] | None = None,
    *,
    limit_per_relation: int | None = None,
) -> list[QAExample]:
    """Load one split of EntityQuestions from ``root``, relation by relation, in file order.

    ``root`` holds either the gzipped JSONL copy (``{split}/P17.{split}.jsonl.gz``) or the
    official release (``dataset/{split}/P17.{split}.json`` or ``{split}/P17.{split}.json``).
    ``relations=None`` loads every relation present for the split (ordered by number).
    ``limit_per_relation`` keeps the first N records of each relation file. Subjects are
    extracted with the relation's template when there is one.
    """
    _check_limit(limit_per_relation)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: EntityQuestions directory not found "
            "(fetch the release with download_entityquestions)"
        )
    if relations is None:
        relations = _discover_relations(root, split)
        if not relations:
            raise DataError(
                f"{root}: no EntityQuestions files for split {split!r}; {_expected_layout(root, split)}"
            )
    templates = load_templates(root)
    examples: list[QAExample] = []
    for relation in dict.fromkeys(relations):
        path = _relation_file(root, split, relation)
        if path is None:
            raise DataError(
                f"{root}: no file for relation {relation!r}, split {split!r}; "
                f"{_expected_layout(root, split, relation)}"
            )
        for index, rec, where in _read_records(path):
            if limit_per_relation is not None and index >= limit_per_relation:
                break
            examples.append(
                _example(rec, where, index=index, relation=relation, split=split, templates=templates)
            )
    return examples


def _find_release_root(base: Path) -> Path | None:
    """The directory at or below ``base`` (3 levels at most) whose ``train/`` holds relation files."""
    level = [base]
    for _ in range(4):
        for directory in level:
            if _discover_relations(directory, "train") and (directory / "train").is_dir():
                return directory
        level = sorted(p for d in level if d.is_dir() for p in d.iterdir() if p.is_dir())
    return None


def _fetch(url: str, dest: Path) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        size = int(total) if total else None
        with tqdm(total=size, unit="B", unit_scale=True, desc="EntityQuestions") as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def download_entityquestions(cache_dir: str | Path) -> Path:
    """Make sure the official EntityQuestions release is under ``cache_dir``; return its root.

    If ``cache_dir`` already holds a release (or the gzipped copy) nothing is downloaded.
    Otherwise the zip is fetched (official URL first, then the GitHub archive), extracted to a
    temporary folder and moved into ``cache_dir/release`` only when complete, so an interrupted
    download leaves nothing half-written. The returned path can be passed to
    ``load_entityquestions``. Raises DataError (one line, naming the URLs) when offline.
    """
    cache_dir = Path(cache_dir)
    if cache_dir.is_dir() and (found := _find_release_root(cache_dir)) is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        zip_path = Path(tmp) / "dataset.zip"
        for url in EQ_URLS:
            try:
                _fetch(url, zip_path)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                failures.append(f"{url} ({_one_line(getattr(e, 'reason', e))})")
                continue
            if zipfile.is_zipfile(zip_path):
                break
            failures.append(f"{url} (not a zip file)")
        else:
            raise DataError(
                f"could not download EntityQuestions into {cache_dir}: {'; '.join(failures)}; "
                "copy the dataset there by hand"
            )
        extracted = Path(tmp) / "release"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(extracted)  # extractall drops absolute paths and '..' components
        if _find_release_root(extracted) is None:
            raise DataError(f"{url}: the downloaded zip holds no train/P*.train.json files")
        target = cache_dir / "release"
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    found = _find_release_root(target)
    assert found is not None
    return found


# ----------------------------------------------------------------------------- generic sources


def _split_and_relation_from_name(path: Path) -> tuple[str | None, str | None]:
    name = path.name
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in _KNOWN_SPLITS:
        return parts[-1], ".".join(parts[:-1])
    return None, None


def load_jsonl(
    path: str | Path,
    *,
    relation_key: str = "relation",
    split: str | None = None,
    relation: str | None = None,
    question_key: str = "question",
    answers_key: str = "answers",
    id_key: str | None = "id",
) -> list[QAExample]:
    """Load any (optionally gzipped) JSONL file of ``{question, answers}`` records.

    ``answers`` may be a string or a list of strings (an ``answer`` key is accepted when there
    is no ``answers``). A record's relation is its ``relation_key`` value, else ``relation``,
    else the ``P17`` of a ``P17.train.jsonl`` name, else ``"all"``. ``split=None`` takes the
    split from such a name, else ``"all"``. A record's ``id_key`` value, when present, is its id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: QA file not found")
    name_split, name_relation = _split_and_relation_from_name(path)
    split = split or name_split or DEFAULT_SPLIT
    relation = relation or name_relation or DEFAULT_RELATION
    templates = load_templates(path.parent)
    examples = [
        _example(
            rec, where, index=index, relation=relation, split=split, templates=templates,
            question_key=question_key, answers_key=answers_key, relation_key=relation_key, id_key=id_key,
        )
        for index, rec, where in _read_records(path)
    ]
    return _unique_ids(examples, str(path))


def _from_records(
    records: Iterable[tuple[int, Any, str]],
    source: str,
    *,
    split: str,
    relation: str | None,
    relation_key: str | None,
    question_key: str,
    answers_key: str,
    id_key: str | None,
    limit: int | None,
) -> list[QAExample]:
    _check_limit(limit)
    templates = load_templates()
    examples = []
    for index, rec, where in records:
        if limit is not None and index >= limit:
            break
        examples.append(
            _example(
                rec, where, index=index, relation=relation or DEFAULT_RELATION, split=split,
                templates=templates, question_key=question_key, answers_key=answers_key,
                relation_key=relation_key, id_key=id_key,
            )
        )
    return _unique_ids(examples, source)


def from_dicts(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str = "example",
    split: str = DEFAULT_SPLIT,
) -> list[QAExample]:
    """QA examples from ``{"question", "answers", "relation", "id"}`` rows in order (columns as
    in ``load_jsonl``; ``relation`` and ``id`` optional); bad rows raise DataError naming
    ``source`` and the row."""
    records = ((i, row, f"{source} {i}") for i, row in enumerate(rows))
    return _from_records(records, source, split=split, relation=None, relation_key="relation",
                         question_key="question", answers_key="answers", id_key="id", limit=None)


def from_hf_dataset(
    ds: Any,
    *,
    split: str = "train",
    relation: str | None = None,
    relation_key: str | None = "relation",
    question_key: str = "question",
    answers_key: str = "answers",
    id_key: str | None = "id",
    limit: int | None = None,
) -> list[QAExample]:
    """QA examples from a ``datasets.Dataset`` (any iterable of row dicts), in row order.

    Columns as in ``load_jsonl``; ``answers`` may also be SQuAD-style ``{"text": [...]}``.
    Ids are the ``id_key`` column when present, else ``"{relation}.{split}.{row}"``.
    """
    source = f"Hugging Face dataset (split {split})"
    records = ((i, row, f"{source} row {i}") for i, row in enumerate(ds))
    return _from_records(
        records, source, split=split, relation=relation, relation_key=relation_key,
        question_key=question_key, answers_key=answers_key, id_key=id_key, limit=limit,
    )


def from_tfds_source(
    source: Sequence[Mapping[str, Any]],
    *,
    split: str = "train",
    relation: str | None = None,
    relation_key: str | None = "relation",
    question_key: str = "question",
    answers_key: str = "answers",
    id_key: str | None = "id",
    limit: int | None = None,
) -> list[QAExample]:
    """QA examples from a random-access sequence of records, as ``tfds.data_source`` returns.

    Bytes values (and numpy arrays of bytes) are decoded as UTF-8; otherwise as ``from_hf_dataset``.
    """
    name = f"TFDS source (split {split})"

    def records() -> Iterator[tuple[int, Any, str]]:
        for i in range(len(source)):
            try:
                yield i, _plain(source[i]), f"{name} record {i}"
            except UnicodeDecodeError as e:
                raise DataError(f"{name} record {i}: bytes are not UTF-8 ({_one_line(e)})") from None

    return _from_records(
        records(), name, split=split, relation=relation, relation_key=relation_key,
        question_key=question_key, answers_key=answers_key, id_key=id_key, limit=limit,
    )


# ----------------------------------------------------------------------------- Gekhman's setup

OVERLAP_MODES: tuple[str, ...] = ("subject_or_answer", "subject", "none")


def _single_answer(examples: Iterable[QAExample]) -> list[QAExample]:
    return [ex for ex in examples if len(ex.answers) == 1]


def first_per_relation(examples: list[QAExample], n: int | None) -> list[QAExample]:
    """The first `n` examples of each relation, in order (all when `n` is None)."""
    if n is None:
        return examples
    counts: dict[str, int] = {}
    kept = []
    for ex in examples:
        if counts.get(ex.relation, 0) < n:
            counts[ex.relation] = counts.get(ex.relation, 0) + 1
            kept.append(ex)
    return kept


def entity_keys(examples: Iterable[QAExample]) -> set[str]:
    """Normalised subjects and answers of ``examples`` (empty strings left out)."""
    keys = set()
    for ex in examples:
        for text in (ex.subject, *ex.answers):
            if text and (key := normalize_answer(text)):
                keys.add(key)
    return keys


def overlaps(ex: QAExample, entities: set[str], mode: str = "subject_or_answer") -> bool:
    """True iff ``ex``'s subject (and, in ``subject_or_answer`` mode, an answer) is in ``entities``."""
    if mode == "none":
        return False
    texts = [ex.subject] if mode == "subject" else [ex.subject, *ex.answers]
    return any(text and normalize_answer(text) in entities for text in texts)


def drop_overlapping(
    train: Sequence[QAExample],
    test: Iterable[QAExample],
    overlap: str = "subject_or_answer",
) -> list[QAExample]:
    """``train`` without the examples that overlap ``test``, in order.

    ``"subject"`` drops a train example whose normalised subject equals the normalised subject
    or answer of any test example; ``"subject_or_answer"`` also one whose answer does; ``"none"``
    keeps every example. Examples without a known subject (no template for their relation) are
    compared by their answers only. Logs how many were dropped, per relation.
    """
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}")
    if overlap == "none":
        return list(train)
    entities = entity_keys(test)
    kept: list[QAExample] = []
    dropped: Counter[str] = Counter()
    for ex in train:
        if overlaps(ex, entities, overlap):
            dropped[ex.relation] += 1
        else:
            kept.append(ex)
    per_relation = ", ".join(f"{rel} {n}" for rel, n in dropped.items())
    log.info("overlap filter (%s): dropped %d of %d train examples%s", overlap, sum(dropped.values()),
             len(train), f" ({per_relation})" if per_relation else "")
    if train and not any(ex.subject for ex in train):
        log.warning("overlap filter (%s): no train example has a known subject (no question "
                    "template for its relation); subjects were not compared", overlap)
    return kept


def gekhman_setup(
    root: str | Path,
    *,
    limit_per_relation: int | None = None,
    overlap: str = "subject_or_answer",
) -> dict[str, list[QAExample]]:
    """Gekhman et al.'s EntityQuestions setup: ``{"train", "dev", "test"}`` example lists.

    - train: the train split of ``TRAIN_RELATIONS``; test: the test split of the
      out-of-distribution ``TEST_RELATIONS``; dev: the dev split of both, since probing the test
      set needs few-shot exemplars of its own relations (model selection uses the train
      relations' part only, see ``pipeline.SeedRun``).
    - Examples with more than one answer are dropped from every split.
    - Train examples are dropped when their normalised subject or answer equals a normalised
      subject or answer of any test example, where "test" is the union of the train relations'
      own test split and the OOD test set (both single-answer): fine-tuning must not teach a
      fact about an entity either test set asks about. ``overlap="subject"`` checks only the
      train subject and ``"none"`` turns the filter off (the answer check removes most of P17
      and P495, whose answers are a few dozen countries).
    - ``limit_per_relation`` keeps the first N surviving examples per relation in each split,
      applied after filtering against the full test sets, so a limited train set is a subset
      of the full one.
    """
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}")
    _check_limit(limit_per_relation)
    test = _single_answer(load_entityquestions(root, "test", TEST_RELATIONS))
    in_dist_test = _single_answer(load_entityquestions(root, "test", TRAIN_RELATIONS))
    train = drop_overlapping(
        _single_answer(load_entityquestions(root, "train", TRAIN_RELATIONS)), test + in_dist_test, overlap
    )
    dev = _single_answer(load_entityquestions(root, "dev", TRAIN_RELATIONS + TEST_RELATIONS))
    return {
        "train": first_per_relation(train, limit_per_relation),
        "dev": first_per_relation(dev, limit_per_relation),
        "test": first_per_relation(test, limit_per_relation),
    }
