"""Orbax checkpoints: resumable training runs and per-stage model snapshots.

A training run directory holds::

    run.json        model fingerprint: refuses a directory written for another model
    steps/<step>/   Orbax: {"state": params + optimizer state, "meta": JSON data-order state}
    best/<epoch>/   Orbax: the trainable params of the best epoch so far (early stopping)
    corrupt/        steps that failed to restore are moved here, never deleted or overwritten

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves only a temporary directory that is ignored. A step that exists but cannot be
read is moved to ``corrupt/`` with a warning and the next older step is restored instead.

``save_model_params`` / ``restore_model_params`` write and read one model's params (plus its
fingerprint) as a stand-alone snapshot, e.g. the model after each pipeline stage.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from gradual_jax import io
from gradual_jax.models.errors import CheckpointError as _ModelCheckpointError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MODEL_FILE = "model.json"
# Runtime switches that do not change the parameters a checkpoint holds.
_RUNTIME_FIELDS = frozenset({"dtype", "dropout_rate", "remat", "scan_layers"})


class CheckpointError(_ModelCheckpointError):
    """A checkpoint directory that cannot be used; the message names the directory and why.

    A subclass of the models' ``CheckpointError``, so the CLIs report it as bad input.
    """


# ----------------------------------------------------------------------------- fingerprints


# Orbax numbers its save operations per process and coordinates them through shared signal
# keys: two saves in flight from different threads (the pipeline's parallel seeds) time out
# waiting on each other's keys. Every Orbax call here holds this lock; threads that share the
# process also save synchronously (`async_save=False`), so no save outlives its call. For the
# same reason a manager's step and best-epoch saves never overlap: with
# several processes their finalize threads would enter the same barrier twice at once.
ORBAX_LOCK = threading.RLock()


def _orbax_serialized(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with ORBAX_LOCK:
            return fn(*args, **kwargs)

    return call


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _tree_signature(state: Any) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return [f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves]


def model_description(model: nnx.Module) -> str:
    """A short human-readable summary of the model's architecture."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    n_lora = sum(1 for _ in nnx.iter_graph(model) if type(_[1]).__name__ == "LoRA")
    text = (f"{cfg.model_type} vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
            f"layers={cfg.num_layers} heads={cfg.num_heads}/{cfg.num_kv_heads}")
    return text + (f" +{n_lora} LoRA adapters" if n_lora else "")


def model_fingerprint(model: nnx.Module) -> str:
    """A hash of the architecture config and of every variable's path, shape and dtype.

    Equal for two models whose checkpoints are interchangeable; works on abstract models.
    """
    cfg = getattr(model, "config", None)
    arch = {}
    if dataclasses.is_dataclass(cfg):
        arch = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    text = json.dumps({"config": arch, "tree": _tree_signature(nnx.state(model))}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_digest(model: nnx.Module) -> str:
    """A hash of every array in ``model``'s state: path, dtype, shape and bytes.

    Unlike ``model_fingerprint`` (structure only), equal digests mean the same weights, so
    anything computed from one model (a probe's records) holds for the other. In a
    multi-process run (arrays no process holds whole) each process hashes the shards it holds
    (one copy of each, with its index) and the digest hashes every process's hash: equal on
    every process, and equal for two models of the same weights laid out alike (a collective).
    """
    h = hashlib.blake2b(digest_size=16)
    local = jax.process_count() > 1
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        if local and isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            h.update(f"{jax.tree_util.keystr(path)}|{np.dtype(leaf.dtype)}|{leaf.shape}".encode())
            for shard in sorted((s for s in leaf.addressable_shards if s.replica_id == 0),
                                key=lambda s: str(s.index)):
                h.update(str(shard.index).encode())
                h.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
            continue
        value = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    if not local:
        return h.hexdigest()
    from gradual_jax.distributed import gather_records

    every = gather_records([h.hexdigest()])
    return hashlib.blake2b("|".join(every).encode(), digest_size=16).hexdigest()


def multihost_sync(name: str) -> None:
    """Barrier across processes (a no-op with one process)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _write_json_atomic(path: Path, data: Any) -> None:
    io.write_json(path, data, indent=1, default=str)


# ----------------------------------------------------------------------------- training runs


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct`` leaves with the arrays' current shardings: an Orbax restore target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class CheckpointManager:
    """Saves and restores a training run (see the module docstring for the layout).

    The trainer asks ``should_save`` after every step: ``save_interval_steps`` > 0 saves every
    that many steps; ``save_interval_seconds`` > 0 saves at the first step end that many
    seconds after the manager was made or last saved, and 0 at every epoch end.
    ``max_to_keep`` step checkpoints are kept; saves are asynchronous unless
    ``async_save=False``.
    """

    @_orbax_serialized
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, save_interval_steps: int = 0,
                 save_interval_seconds: float = 0.0, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if save_interval_seconds < 0:
            raise ValueError(f"save_interval_seconds must be >= 0, got {save_interval_seconds}")
        self.directory = Path(directory).absolute()
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = float(save_interval_seconds)
        self._last_save = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_layout()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._steps = ocp.CheckpointManager(self.directory / "steps", options=options)
        self._best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=async_save, create=True),
        )

    def _check_layout(self) -> None:
        known = {RUN_FILE, "steps", "best", "corrupt"}
        stray = [p.name for p in self.directory.iterdir() if p.name not in known and not p.name.startswith(".")]
        if stray and not (self.directory / RUN_FILE).exists():
            raise CheckpointError(
                f"{self.directory}: not a training checkpoint directory (holds {', '.join(sorted(stray)[:3])} "
                f"and no {RUN_FILE}); use an empty or new directory"
            )

    # -- identity

    def bind(self, fingerprint: str, description: str = "") -> None:
        """Record the model fingerprint, or refuse a directory written for a different model."""
        path = self.directory / RUN_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable run file ({e}); not resuming from {self.directory}") from None
            if stored.get("fingerprint") != fingerprint:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of a different model "
                    f"({stored.get('description') or 'unknown'}, fingerprint {stored.get('fingerprint')}); "
                    f"this model is {description or 'different'} (fingerprint {fingerprint}). "
                    "Use another checkpoint directory."
                )
            return
        if self.all_steps():
            raise CheckpointError(f"{self.directory}: has step checkpoints but no {RUN_FILE}; refusing to resume from it")
        if jax.process_index() == 0:
            _write_json_atomic(path, {"fingerprint": fingerprint, "description": description, "created": time.time()})

    # -- steps

    def all_steps(self) -> list[int]:
        """Complete step checkpoints on disk, oldest first."""
        self._steps.reload()
        return sorted(self._steps.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int, *, epoch_end: bool = False) -> bool:
        """Whether to write a step checkpoint after ``step`` (``epoch_end``: the epoch's last).

        Every process of a run must ask at the same steps: the clock's answer is process 0's,
        sent to the others, so all save together or none does."""
        if self.save_interval_steps > 0 and step % self.save_interval_steps == 0:
            return True
        if self.save_interval_seconds <= 0:
            return epoch_end
        due = time.monotonic() - self._last_save >= self.save_interval_seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    @_orbax_serialized
    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``.

        A step already on disk is left untouched (with a warning), never overwritten.
        """
        if step in self._steps.all_steps():
            warnings.warn(f"{self.directory}: step {step} already saved; keeping the existing checkpoint")
            return
        # The best-epoch params this step's meta names reach disk before the step starts: a
        # run killed once the step is complete must find them on resume.
        self._best.wait_until_finished()
        self._steps.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(dict(meta))), force=True)
        self._last_save = time.monotonic()

    @_orbax_serialized
    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """``(step, state, meta)`` from the newest readable step, or None when there is none.

        ``abstract_state``: ``ShapeDtypeStruct`` leaves with shardings (see ``abstract_like``);
        arrays come back with those shardings. An unreadable step is moved to ``corrupt/``
        with a warning and the next older one is tried.
        """
        self.wait()
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                out = self._steps.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any failure to read means "not usable"
                moved = self._quarantine(self.directory / "steps" / str(step))
                if jax.process_count() > 1:
                    multihost_sync(f"quarantine_{step}")
                self._steps.reload()
                warnings.warn(
                    f"{self.directory}: checkpoint step {step} is unreadable "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); moved it to {moved} "
                    "and falling back to the previous complete checkpoint"
                )
                skipped.append(step)
                continue
            return step, out["state"], dict(out["meta"])
        if skipped:
            warnings.warn(f"{self.directory}: no readable checkpoint left; training starts from the beginning")
        return None

    def _quarantine(self, path: Path) -> Path:
        """Move an unreadable step out of Orbax's sight (process 0 moves; the others wait)."""
        dest_dir = self.directory / "corrupt"
        dest = dest_dir / path.name
        n = 1
        while dest.exists():
            dest = dest_dir / f"{path.name}.{n}"
            n += 1
        if jax.process_index() == 0:
            dest_dir.mkdir(exist_ok=True)
            shutil.move(str(path), dest)
        return dest

    # -- best epoch

    @_orbax_serialized
    def save_best(self, epoch: int, params: Any) -> None:
        """Save the trainable params of epoch ``epoch`` as the best so far (kept if already saved)."""
        self._best.reload()
        if epoch in self._best.all_steps():
            return
        self._steps.wait_until_finished()  # never two saves in flight (see ORBAX_LOCK)
        self._best.save(epoch, args=ocp.args.StandardSave(params), force=True)

    @_orbax_serialized
    def restore_best(self, epoch: int, abstract_params: Any) -> Any | None:
        """The best params saved for ``epoch``, or None if they are missing (quietly) or
        unreadable (with a warning).

        Missing is expected: a step checkpoint names the best epoch as it was when written, and
        with step checkpoints written by time, two better epochs may have been saved since (the
        two kept). A resumed run replays those epochs and finds them again; the trainer warns if
        the best epoch's params are still missing at the end."""
        self._best.wait_until_finished()
        self._best.reload()
        if epoch not in self._best.all_steps():
            return None
        try:
            return self._best.restore(epoch, args=ocp.args.StandardRestore(abstract_params))
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"{self.directory}: best params of epoch {epoch} unreadable ({type(err).__name__})")
            return None

    @_orbax_serialized
    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._steps.wait_until_finished()
        self._best.wait_until_finished()

    @_orbax_serialized
    def close(self) -> None:
        self.wait()
        self._steps.close()
        self._best.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- model snapshots


@_orbax_serialized
def save_model_params(directory: str | Path, model: nnx.Module) -> Path:
    """Write every variable of ``model`` to ``directory`` (which must not exist yet).

    The params go in first and ``model.json`` (fingerprint, config) last, so a snapshot without
    ``model.json`` is incomplete. Raises FileExistsError rather than overwrite.
    """
    from gradual_jax.distributed import barrier, on_main

    directory = Path(directory).absolute()
    # Decided on process 0 (a peer's save may already have created the directory here).
    if on_main(lambda: directory.exists() and any(directory.iterdir())):
        raise FileExistsError(f"{directory}: already exists; model snapshots are never overwritten")
    barrier("snapshot-checked")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nnx.to_pure_dict(nnx.state(model)))
        ckptr.wait_until_finished()
    cfg = getattr(model, "config", None)
    if jax.process_index() != 0:
        return directory
    _write_json_atomic(directory / MODEL_FILE, {
        "fingerprint": model_fingerprint(model),
        "description": model_description(model),
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
    })
    return directory


@_orbax_serialized
def restore_model_params(directory: str | Path, abstract_model: nnx.Module, *,
                         mesh: Mesh | None = None) -> nnx.Module:
    """A concrete model shaped like ``abstract_model`` with the params saved in ``directory``.

    Arrays are placed by logical axes on ``mesh`` when given, else with the abstract leaves'
    shardings when they carry one, else on the first device. Raises CheckpointError when the
    snapshot is incomplete or was saved from a different model.
    """
    from gradual_jax.sharding import state_shardings

    directory = Path(directory).absolute()
    meta_path = directory / MODEL_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{directory}: no {MODEL_FILE}; not a complete model snapshot")
    stored = json.loads(meta_path.read_text(encoding="utf-8"))
    fingerprint = model_fingerprint(abstract_model)
    if stored.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{directory} holds params of a different model ({stored.get('description')}, fingerprint "
            f"{stored.get('fingerprint')}); expected {model_description(abstract_model)} (fingerprint {fingerprint})"
        )
    graphdef, state = nnx.split(abstract_model)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    else:
        default = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, nnx.to_pure_dict(state))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), shardings)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
