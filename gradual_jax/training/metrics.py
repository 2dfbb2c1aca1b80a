"""Scalar metrics to ``metrics.jsonl``, TensorBoard event files and optionally Weights & Biases.

Only process 0 writes: on every other process a `MetricsWriter` creates no directory and no
file, and `open_wandb` opens no run. TensorBoard events go through tensorboardX's
``SummaryWriter``; any TensorBoard (or ``tensorboard``'s ``EventAccumulator``) reads them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gradual_jax.configlib import ConfigError

if TYPE_CHECKING:
    from wandb import Run


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where a run's scalars go besides ``metrics.jsonl``: TensorBoard event files (always) and
    optionally Weights & Biases (``pip install 'gradual_jax[wandb]'``)."""

    wandb: bool = False
    """Also log every stage's scalars to one Weights & Biases run per launch (process 0 only)."""
    wandb_project: str = "gradual_jax"
    """W&B project."""
    wandb_run_name: str | None = None
    """W&B run name (default: the run's ``name``)."""
    wandb_entity: str | None = None
    """W&B entity (team or user; default: your W&B default)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """W&B mode: online, offline (files only, sync later with ``wandb sync``) or disabled (no
    run, as if ``wandb`` were false)."""


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def open_wandb(cfg: LoggingConfig, *, run_name: str, config: Mapping[str, Any],
               directory: Path) -> Run | None:
    """The launch's W&B run, or None when W&B is off (``wandb`` false or mode ``disabled``) or
    this is not process 0. ``run_name`` is used unless ``cfg.wandb_run_name`` is set; ``config``
    becomes the run's config; W&B's files go under ``directory/wandb/``. The caller finishes
    the run (``run.finish()``).

    Raises ConfigError (key ``wandb``) when W&B is requested but not installed.
    """
    if not cfg.wandb or cfg.wandb_mode == "disabled" or not _is_process_zero():
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("W&B logging is on but wandb is not installed: "
                          "pip install 'gradual_jax[wandb]'", "wandb") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                      name=cfg.wandb_run_name or run_name, mode=cfg.wandb_mode,
                      config=dict(config), dir=str(directory))


def _jsonable(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


def _numeric(scalars: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in scalars.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


# tensorboardX names event files by the second and host only and opens them with "wb": a suffix
# unique in the process keeps a second writer in the same directory (a resumed stage) from
# truncating the first one's file.
_EVENT_FILE_SERIAL = itertools.count()
# Seeds train in threads and share the launch's one W&B run.
_WANDB_LOCK = threading.Lock()


class MetricsWriter:
    """Appends scalars to ``<logdir>/metrics.jsonl``, TensorBoard event files in ``logdir`` and
    an optional W&B run; on any process but 0 it writes nothing and creates nothing.

    Each ``write`` call is one JSON line ``{"step", "time", **scalars}`` (non-finite numbers as
    null), and its numeric values are TensorBoard scalars tagged by their keys at ``step``.
    With ``wandb_run`` they are also logged there as ``tag_prefix + key``, plotted against
    their own ``tag_prefix + "step"``, so stages whose steps restart at 1 share one run.
    JSONL is flushed every ``flush_every`` writes and on ``flush``/``close``; tensorboardX
    writes events from a thread, within ``flush_secs`` of each write and at ``close``.
    ``close`` leaves the W&B run open: it belongs to the caller.
    """

    def __init__(self, logdir: str | Path, *, jsonl: bool = True, tensorboard: bool = True,
                 wandb_run: Run | None = None, tag_prefix: str = "", flush_every: int = 20,
                 flush_secs: float = 10.0):
        self.logdir = Path(logdir)
        self._jsonl = self._tb = self._wandb = None
        if not _is_process_zero():
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.logdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            suffix = f".{os.getpid()}.{next(_EVENT_FILE_SERIAL)}"
            self._tb = SummaryWriter(str(self.logdir), flush_secs=flush_secs, filename_suffix=suffix)
        self._wandb, self._prefix, self._wandb_keys = wandb_run, tag_prefix, set()
        self._flush_every, self._pending = flush_every, 0

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` at ``step``; non-numeric values go to JSONL only."""
        if self._jsonl is None and self._tb is None and self._wandb is None:
            return
        now = time.time()
        if self._jsonl is not None:
            record = {"step": int(step), "time": round(now, 3), **{k: _jsonable(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        numeric = _numeric(scalars)
        if self._tb is not None:
            for tag, value in numeric.items():
                self._tb.add_scalar(tag, value, global_step=int(step), walltime=now)
        if self._wandb is not None and numeric:
            self._log_wandb(int(step), numeric)
        self._pending += 1
        if self._pending >= self._flush_every:
            self.flush()

    def _log_wandb(self, step: int, numeric: dict[str, float]) -> None:
        step_key = self._prefix + "step"
        row = {self._prefix + k: v for k, v in numeric.items()}
        with _WANDB_LOCK:
            for key in row.keys() - self._wandb_keys:
                self._wandb.define_metric(key, step_metric=step_key)
            self._wandb_keys.update(row)
            # No `step=`: W&B drops rows whose step goes backwards, as each stage's does.
            self._wandb.log({step_key: step, **row})

    def flush(self) -> None:
        """Put JSONL lines on disk and flush the event file (events still queued for
        tensorboardX's thread follow within ``flush_secs``)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        self._pending = 0

    def close(self) -> None:
        """Flush and close the files (idempotent); the W&B run stays open."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl = self._tb = self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
