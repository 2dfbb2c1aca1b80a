"""Test helpers that write QA sets to disk as Hugging Face data files or prepared TFDS datasets,
so loaders can be tested offline. Reusable by any test (``sys.path`` needs ``tests/knowledge``).

Records are plain dicts: str, int, float, bool, lists of those, nested dicts, lists of dicts.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HF_FORMATS = ("parquet", "jsonl", "csv")


@contextmanager
def hf_offline() -> Iterator[None]:
    """Keep ``datasets`` and ``huggingface_hub`` off the network inside the block, whether or not
    they were imported before (both read the HF_*_OFFLINE variables at import)."""
    import datasets
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in saved_env})
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_hf_dataset(
    directory: str | Path, splits: Mapping[str, Sequence[Mapping[str, Any]]], fmt: str = "parquet"
) -> Path:
    """Write each split's records to ``directory/data/{split}-00000-of-00001.{fmt}``, the Hub's
    layout, under which ``datasets.load_dataset(directory)`` keeps every split name as given
    (a bare ``dev.jsonl`` would load as ``validation``). ``fmt`` is parquet, jsonl or csv; csv
    takes flat records only. Returns ``directory``."""
    if fmt not in HF_FORMATS:
        raise ValueError(f"fmt must be one of {HF_FORMATS}, got {fmt!r}")
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        path = directory / "data" / f"{split}-00000-of-00001.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([dict(r) for r in records]), path)
        elif fmt == "jsonl":
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            _write_csv(path, records)
    return directory


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    for r in records:
        nested = [k for k, v in r.items() if isinstance(v, (list, tuple, dict))]
        if nested:
            raise ValueError(f"csv takes flat records only; {nested} hold lists or dicts")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


# ----------------------------------------------------------------------------- TFDS


def _feature(values: list[Any]) -> Any:
    """The TFDS feature that holds every value in ``values`` (one column across all records)."""
    import numpy as np
    import tensorflow_datasets as tfds

    present = [v for v in values if v is not None]
    if len(present) < len(values):
        raise ValueError("TFDS features cannot hold None")
    if all(isinstance(v, dict) for v in present) and present:
        keys = list(dict.fromkeys(k for v in present for k in v))
        return tfds.features.FeaturesDict({k: _feature([v.get(k) for v in present]) for k in keys})
    if all(isinstance(v, (list, tuple)) for v in present) and present:
        items = [x for v in present for x in v]
        return tfds.features.Sequence(_feature(items) if items else tfds.features.Text())
    if all(isinstance(v, bool) for v in present):
        return tfds.features.Scalar(dtype=np.bool_)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return tfds.features.Scalar(dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return tfds.features.Scalar(dtype=np.float64)
    if all(isinstance(v, str) for v in present):
        return tfds.features.Text()
    types = sorted({type(v).__name__ for v in present})
    raise ValueError(f"no TFDS feature for values of types {types}")


def write_tfds_dataset(
    data_dir: str | Path,
    name: str,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    version: str = "1.0.0",
) -> Path:
    """Prepare ``name`` (version ``version``) under ``data_dir`` as an array_record TFDS dataset,
    without TensorFlow; ``tfds.data_source(name, split=..., data_dir=data_dir)`` then reads each
    split's records back in the given order (strings as bytes). Features are inferred from the
    records (str -> Text, int -> int64, float -> float64, list -> Sequence, dict -> FeaturesDict);
    every record of a split should have the same keys. Returns ``data_dir/name/version``."""
    import tensorflow_datasets as tfds

    records = [r for rows in splits.values() for r in rows]
    keys = list(dict.fromkeys(k for r in records for k in r))
    features = tfds.features.FeaturesDict({k: _feature([r.get(k) for r in records]) for k in keys})

    class _Local(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # code_path would look for the builder's source file with importlib_resources, which
        # tfds 4.9.10 needs but does not declare on Python >= 3.9 (tensorflow/datasets#11212).
        code_path = None

        def _info(self) -> Any:
            # DatasetInfo directly: dataset_info_from_configs reads metadata files beside the code.
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {split: self._generate_examples(rows) for split, rows in splits.items()}

        def _generate_examples(self, rows: Sequence[Mapping[str, Any]]) -> Iterator[tuple[int, Any]]:
            yield from enumerate(rows)

    _Local.name = name
    builder = _Local(data_dir=str(data_dir), file_format="array_record")
    with tempfile.TemporaryDirectory() as downloads:  # keeps data_dir free of an empty downloads/
        builder.download_and_prepare(download_dir=downloads)
    return Path(builder.data_dir)
