"""QA sets from Hugging Face ``datasets`` and from TFDS, with a column mapping.

``load_hf_splits`` and ``load_tfds_splits`` take one call's worth of config (``data.kind: hf |
tfds``) and return ``{"train": [...], "dev": [...], "test": [...]}`` of ``QAExample``:

- ``splits`` maps our split names to the source's split expressions, slices and ``+`` included
  (``"validation[:50%]"``, ``"train[:1000]"``, ``"train+validation"``), as the library parses them.
- ``columns`` maps our fields (question, answers, relation, id) to source columns. A dotted path
  reads nested fields (``answer.aliases``; through a list of records it reads each one's field);
  an answers value that is a JSON-encoded list of strings (PopQA's ``possible_answers``) is
  decoded. Unmapped fields read the same-named column when there is one (answers: ``answers``,
  else ``answer``); relation and id are optional.
- Examples keep source order. A row without a relation takes ``relation`` (default ``"all"``);
  a row without an id is ``"{relation}.{split}.{row}"``, ``row`` its position in the split
  expression's rows, so the same config always gives the same ids. Ids are unique per split.
- Bad input raises ``DataError`` with one line: an unknown split (listing the source's splits),
  a missing column (listing the available ones), a dataset that cannot be found, an empty split.

``datasets`` and ``tensorflow_datasets`` are imported inside the functions only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradual_jax.knowledge.data import (
    DEFAULT_RELATION,
    SPLITS,
    DataError,
    QAExample,
    _example,
    _one_line,
    _plain,
    _unique_ids,
    load_templates,
)

FIELDS: tuple[str, ...] = ("question", "answers", "relation", "id")


def examples_to_records(examples: Iterable[QAExample]) -> list[dict[str, Any]]:
    """``{"id", "question", "answers", "relation"}`` per example, in order; the default columns of
    ``load_hf_splits``/``load_tfds_splits``, so writing these out and loading them back gives the
    same examples (subjects are re-derived from the relation's template, if any)."""
    return [
        {"id": ex.id, "question": ex.question, "answers": list(ex.answers), "relation": ex.relation}
        for ex in examples
    ]


# ----------------------------------------------------------------------------- splits and columns


def split_names(expression: str) -> list[str]:
    """The source splits an expression reads: ``"train[:10%]+validation"`` -> train, validation."""
    return [re.sub(r"\[.*\]$", "", part.strip()).strip() for part in expression.split("+")]


def _check_splits(splits: Mapping[str, str], source: str) -> None:
    bad = sorted(set(splits) - set(SPLITS))
    if not splits or bad:
        raise DataError(
            f"{source}: splits must map {', '.join(SPLITS)} to source splits, got {sorted(splits)}"
        )
    for ours, expr in splits.items():
        if not isinstance(expr, str) or not expr.strip():
            raise DataError(
                f"{source}: splits.{ours} must be a non-empty split expression, got {expr!r}"
            )


def _unknown_split(source: str, splits: Mapping[str, str], available: Iterable[str]) -> DataError:
    available = list(available)
    for ours, expr in splits.items():
        missing = [n for n in split_names(expr) if n not in available]
        if missing:
            return DataError(
                f"{source}: unknown split {missing[0]!r} (splits.{ours} = {expr!r}); "
                f"available splits: {', '.join(available) or 'none'}"
            )
    return DataError(
        f"{source}: unknown split in {dict(splits)}; available splits: {', '.join(available)}"
    )


def resolve_columns(
    columns: Mapping[str, str] | None, available: Sequence[str], source: str
) -> dict[str, str | None]:
    """Our field -> source column path (None: the field is not read).

    Mapped columns must exist (their first path part, checked against ``available``); question
    and answers must resolve; relation and id fall back to same-named columns when present.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(
            f"{source}: unknown column field(s) {unknown}; expected {', '.join(FIELDS)}"
        )
    have = ", ".join(available)
    for field, column in columns.items():
        if not isinstance(column, str) or column.split(".")[0] not in available:
            raise DataError(
                f"{source}: no column {column!r} (columns.{field}); available columns: {have}"
            )
    answers = "answer" if "answer" in available and "answers" not in available else "answers"
    defaults = {"question": "question", "answers": answers, "relation": "relation", "id": "id"}
    resolved: dict[str, str | None] = {}
    for field in FIELDS:
        column = columns.get(field, defaults[field])
        if field not in columns and column not in available:
            if field in ("question", "answers"):
                raise DataError(
                    f"{source}: no {column!r} column; map columns.{field} to one of: {have}"
                )
            column = None
        resolved[field] = column
    return resolved


def _lookup(row: Mapping[str, Any], path: str, where: str) -> Any:
    """The value at dotted ``path``; through a list, each element's field."""
    value: Any = row
    done: list[str] = []
    for part in path.split("."):
        if isinstance(value, list):
            value = [_lookup(v, part, where) for v in value]
        elif isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            keys = ", ".join(value) if isinstance(value, Mapping) else type(value).__name__
            inside = ".".join(done) or "the row"
            raise DataError(f"{where}: no field {part!r} in {inside} (has: {keys})")
        done.append(part)
    return value


def _decode_answers(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and all(isinstance(a, str) for a in decoded):
            return decoded
    return value


def _project(row: Mapping[str, Any], cols: Mapping[str, str | None], where: str) -> dict[str, Any]:
    """The row's mapped fields, keyed by their source column paths (so errors name them)."""
    rec: dict[str, Any] = {}
    for field, column in cols.items():
        if column is None:
            continue
        value = _lookup(row, column, where)
        if field == "answers":
            value = _decode_answers(value)
        elif field in ("relation", "id") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # PopQA's ids and prop_ids are ints
        rec[column] = value
    return rec


def _examples(
    rows: Iterable[tuple[int, Mapping[str, Any], str]],
    cols: Mapping[str, str | None],
    *,
    split: str,
    relation: str | None,
    source: str,
) -> list[QAExample]:
    templates = load_templates()
    examples = []
    for index, row, where in rows:
        rec = _project(row, cols, where)
        examples.append(
            _example(
                rec, where, index=index, relation=relation or DEFAULT_RELATION, split=split,
                templates=templates, question_key=cols["question"], answers_key=cols["answers"],
                relation_key=cols["relation"], id_key=cols["id"],
            )
        )
    if not examples:
        raise DataError(f"{source}: no examples (for our {split!r} split)")
    return _unique_ids(examples, source)


# ----------------------------------------------------------------------------- Hugging Face


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def load_hf_splits(
    path: str,
    *,
    name: str | None = None,
    splits: Mapping[str, str],
    columns: Mapping[str, str] | None = None,
    relation: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, list[QAExample]]:
    """Our splits of ``datasets.load_dataset(path, name, split=...)``.

    ``path`` is a Hub id (``akariasai/PopQA``; fetched when online, else read from the cache) or
    a local directory of parquet/jsonl/csv files, whose splits come from the file names as
    ``datasets`` reads them (``data/{split}-00000-of-00001.parquet`` keeps any split name;
    ``dev.jsonl`` becomes ``validation``). ``name`` is the configuration (``rc.nocontext``),
    ``revision`` a Hub branch, tag or commit, ``cache_dir`` where ``datasets`` caches (its
    default when None). Returns ``{our split: examples}`` for the keys of ``splits``; see the
    module docstring for columns, ids and errors.
    """
    import datasets

    source = path if name is None else f"{path} ({name})"
    _check_splits(splits, source)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise DataError(f"{path}: dataset directory not found")
    if _looks_local(path):
        path = str(Path(path).expanduser())
    ours = list(splits)
    kwargs = dict(revision=revision, cache_dir=None if cache_dir is None else str(cache_dir))
    try:
        loaded = datasets.load_dataset(path, name, split=[splits[s] for s in ours], **kwargs)
    except FileNotFoundError as e:
        raise DataError(f"{source}: dataset not found ({_one_line(e)})") from None
    except ConnectionError as e:
        raise DataError(
            f"{source}: dataset not found locally and the Hub is unreachable ({_one_line(e)})"
        ) from None
    except ValueError as e:
        if str(e).startswith("Unknown split"):
            builder = datasets.load_dataset_builder(path, name, **kwargs)
            raise _unknown_split(source, splits, builder.info.splits or {}) from None
        raise DataError(f"{source}: cannot load splits {dict(splits)} ({_one_line(e)})") from None
    out = {}
    for split, ds in zip(ours, loaded):
        where = f"{source} split {splits[split]!r}"
        cols = resolve_columns(columns, ds.column_names, where)
        ds = ds.select_columns(sorted({c.split(".")[0] for c in cols.values() if c}))
        rows = ((i, row, f"{where} row {i}") for i, row in enumerate(ds))
        out[split] = _examples(rows, cols, split=split, relation=relation, source=where)
    return out


# ----------------------------------------------------------------------------- TFDS


def _tfds_rows(
    src: Any, where: str, chunk: int = 1024
) -> Iterator[tuple[int, Mapping[str, Any], str]]:
    for start in range(0, len(src), chunk):
        # Batched reads: about a third faster than one record at a time.
        batch = src.__getitems__(list(range(start, min(start + chunk, len(src)))))
        for i, record in enumerate(batch, start):
            try:
                yield i, _plain(record), f"{where} record {i}"
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where} record {i}: bytes are not UTF-8 ({_one_line(e)})"
                ) from None


def load_tfds_splits(
    name: str,
    *,
    data_dir: str | Path | None = None,
    splits: Mapping[str, str],
    columns: Mapping[str, str] | None = None,
    relation: str | None = None,
    download: bool = True,
) -> dict[str, list[QAExample]]:
    """Our splits of ``tfds.data_source(name, split=..., data_dir=...)`` (array_record; no
    TensorFlow needed to read).

    ``name`` is ``dataset[/config][:version]``; ``data_dir`` the directory of prepared datasets
    (TFDS's default when None). ``download`` lets TFDS prepare a registered dataset that is not
    in ``data_dir`` yet (most builders need TensorFlow for that); a prepared one is only read.
    Split expressions as TFDS parses them (``validation[:50%]``; a slice past the split's end is
    an error there). Returns ``{our split: examples}``; bytes are decoded as UTF-8; see the
    module docstring for columns, ids and errors.
    """
    import tensorflow_datasets as tfds

    where_dir = str(data_dir) if data_dir is not None else "TFDS's default data_dir"
    source = f"TFDS {name}"
    _check_splits(splits, source)
    ours = list(splits)
    data_dir = None if data_dir is None else str(data_dir)
    try:
        sources = tfds.data_source(
            name, split=[splits[s] for s in ours], data_dir=data_dir, download=download
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"{source}: dataset not found (not registered, nor prepared in {where_dir})"
        ) from None
    except ModuleNotFoundError as e:  # preparing a registered dataset (download=True)
        raise DataError(
            f"{source}: preparing it needs the {e.name} module, not installed here; prepare it "
            f"with file_format='array_record' where it is, then copy it into {where_dir}"
        ) from None
    except NotImplementedError as e:  # prepared as TFRecord, or not prepared and download=False
        raise DataError(
            f"{source}: no array_record copy in {where_dir}; prepare it with "
            f"file_format='array_record' ({_one_line(e)})"
        ) from None
    except ValueError as e:
        if str(e).startswith("Unknown split"):
            available = tfds.builder(name, data_dir=data_dir).info.splits
            raise _unknown_split(source, splits, available) from None
        raise DataError(f"{source}: cannot load splits {dict(splits)} ({_one_line(e)})") from None
    out = {}
    for split, src in zip(ours, sources):
        where = f"{source} split {splits[split]!r}"
        # TFDS keeps no column order to speak of; sorted names make the error line stable.
        cols = resolve_columns(columns, sorted(src.dataset_info.features.keys()), where)
        rows = _tfds_rows(src, where)
        out[split] = _examples(rows, cols, split=split, relation=relation, source=where)
    return out
