"""The run configuration: every component's config composed into ``RunConfig``, read from YAML
plus dotted ``key=value`` overrides (machinery in :mod:`gradual_jax.configlib`).

    cfg = load_config("configs/smoke.yaml", ["train.lr=1e-4", "seeds=[0,1,2]", "train.lora.rank=8"])

Each component declares its settings beside its code: the model source (``models/source.py``),
the QA set and the probe (``knowledge/config.py``), fine-tuning (``training/config.py``), the mesh
(``sharding.py``), processes (``distributed.py``), logging (``training/metrics.py``) and
export (``export.py``). This module adds what only the experiment has: stages, arms, seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gradual_jax import curriculum
from gradual_jax.configlib import (
    ConfigError,
    apply_overrides,
    deep_merge,
    from_dict,
    keys_help,
    load_dataclass,
    require,
    to_dict,
)
from gradual_jax.configlib import config_hash as _config_hash
from gradual_jax.distributed import DistributedConfig
from gradual_jax.export import ExportConfig
from gradual_jax.knowledge.config import DataConfig, ProbeSettings
from gradual_jax.models.source import SourceConfig
from gradual_jax.training.config import LoRAConfig, TrainConfig, model_runtime
from gradual_jax.training.metrics import LoggingConfig
from gradual_jax.sharding import MeshConfig

__all__ = [
    "ARMS", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "ExportConfig",
    "LoRAConfig", "LoggingConfig", "MeshConfig", "ProbeSettings", "RunConfig", "SourceConfig", "StageConfig",
    "TrainConfig", "apply_overrides", "config_hash", "from_dict", "keys_help", "load_config",
    "model_runtime", "stage_train_config", "to_dict",
]

ARMS = ("two_stage", "one_stage", "natural", "highly_known", "random_subset")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: ``select`` is a :class:`curriculum.StageSpec` as a dict, ``train``
    overrides :class:`TrainConfig` fields for this stage, and ``lr_scale`` multiplies the
    stage's learning rate (see :func:`stage_train_config`)."""

    name: str
    """The stage's name (its directory under each arm)."""
    select: dict[str, Any]
    """Which train examples the stage trains on (a curriculum.StageSpec as a mapping)."""
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    """TrainConfig fields this stage overrides."""
    lr_scale: float = 1.0
    """Multiplies the stage's learning rate."""

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        try:
            curriculum.StageSpec.from_dict(self.select)
        except ValueError as err:
            raise ConfigError(str(err), "select") from None
        from_dict(TrainConfig, self.train, "train")  # keys and types only; values merge later
        require(self.lr_scale > 0, "lr_scale", f"must be > 0, got {self.lr_scale}")

    def spec(self) -> curriculum.StageSpec:
        """The stage's selection rule."""
        return curriculum.StageSpec.from_dict(self.select)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When training writes resumable step checkpoints (a run's ``checkpoint`` section)."""

    minutes: float = 10.0
    """A step checkpoint (params, optimizer state, data position) is written at the first step
    end at least this many minutes after the stage started or its last one; 0: at every epoch
    end instead. A killed run resumes from the newest one (each stage's final params are
    saved when it ends, whatever this says)."""

    def __post_init__(self) -> None:
        require(self.minutes >= 0, "minutes", f"must be >= 0, got {self.minutes}")


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(name="stage1", select={"categories": ["MaybeKnown"]}),
        StageConfig(
            name="stage2",
            select={
                "moved_up_from": ["WeaklyKnown", "Unknown"],
                "into": ["MaybeKnown", "HighlyKnown"],
                "untrained": True,
                "replay": "HighlyKnown",
                "replay_ratio": 0.2,
            },
            train={"weight_decay": 0.01},
            lr_scale=0.5,
        ),
    ]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; each field's docstring is its ``--help`` line."""

    name: str = "default"
    """The run's name: its directory under ``run_dir``."""
    run_dir: str = "runs"
    """Where run directories live."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds: each runs every arm from the same stage-0 model."""
    model: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    probe: ProbeSettings = dataclasses.field(default_factory=ProbeSettings)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    arms: list[str] = dataclasses.field(default_factory=lambda: ["two_stage", "one_stage"])
    """Arms to compare: two_stage, one_stage, natural, highly_known, random_subset."""
    noise_control: bool = True
    """Re-probe the unchanged model with another seed and prompts (measurement noise)."""
    stages: list[StageConfig] = dataclasses.field(default_factory=_default_stages)
    """The staged method (two_stage arm): stage1 on MaybeKnown, stage2 on what moved up plus a
    HighlyKnown replay (see StageConfig; index them as stages.1.lr_scale=...)."""
    max_extra_stages: int = 0
    """Extra stages repeating the last stage's rule while enough untrained examples move up."""
    min_moved_up: int = 10
    """Untrained examples that must move up for an extra stage to run."""
    seed_workers: int = 1
    """Seeds run at once, each in its own thread (same results; more memory; single-process
    runs only). On a small model 2 runs a 2-core laptop's seeds about 1.5x faster."""
    world: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Synthetic-world options (model.source world; checked by gradual_jax.world)."""

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        require(len(self.seeds) > 0, "seeds", "must not be empty")
        unique_seeds = len(set(self.seeds)) == len(self.seeds)
        require(unique_seeds, "seeds", f"contains duplicates: {self.seeds}")
        require(len(self.arms) > 0, "arms", "must not be empty")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ConfigError(f"unknown arm {bad[0]!r}; valid: {', '.join(ARMS)}", "arms")
        require(len(set(self.arms)) == len(self.arms), "arms", f"contains duplicates: {self.arms}")
        require(len(self.stages) > 0, "stages", "must not be empty")
        names = [s.name for s in self.stages]
        require(len(set(names)) == len(names), "stages", f"stage names must be unique: {names}")
        extra = self.max_extra_stages
        require(extra >= 0, "max_extra_stages", f"must be >= 0, got {extra}")
        require(self.min_moved_up >= 0, "min_moved_up", f"must be >= 0, got {self.min_moved_up}")
        require(self.seed_workers >= 1, "seed_workers", f"must be >= 1, got {self.seed_workers}")
        self._check_export()

    def _check_export(self) -> None:
        """An export that could only fail once the run is over fails now instead."""
        if not self.export.enabled:
            return
        from gradual_jax.export import arm_stages

        e = self.export
        require(e.arm in self.arms, "export.arm", f"{e.arm!r} is not one of arms {self.arms}")
        require(e.seed is None or e.seed in self.seeds, "export.seed",
                f"{e.seed} is not one of seeds {self.seeds}")
        names = [name for name, _ in arm_stages(self, e.arm)]
        require(e.stage is None or e.stage in names, "export.stage",
                f"arm {e.arm} has stages {', '.join(names)}, not {e.stage!r}")


def stage_train_config(cfg: RunConfig, stage: int | str | StageConfig) -> TrainConfig:
    """The TrainConfig a stage trains with: ``cfg.train`` updated by the stage's ``train`` dict
    (nested ``lora`` merged key by key), then ``lr`` multiplied by ``lr_scale``.

    ``stage`` is an index into ``cfg.stages``, a stage name or a StageConfig. Extra stages
    beyond ``cfg.stages`` reuse the last stage (pass its index or the StageConfig).
    """
    if isinstance(stage, StageConfig):
        st = stage
    elif isinstance(stage, str):
        found = [s for s in cfg.stages if s.name == stage]
        if not found:
            names = ", ".join(s.name for s in cfg.stages)
            raise ConfigError(f"unknown stage {stage!r}; stages: {names}")
        st = found[0]
    else:
        st = cfg.stages[stage]
    merged = deep_merge(to_dict(cfg.train), st.train)
    train = from_dict(TrainConfig, merged, "train")
    return dataclasses.replace(train, lr=train.lr * st.lr_scale) if st.lr_scale != 1.0 else train


HASH_EXCLUDE = ("run_dir", "distributed", "seed_workers", "logging", "export", "checkpoint")


def config_hash(cfg: Any, exclude: Iterable[str] = HASH_EXCLUDE) -> str:
    """Hex sha256 of the config's canonical JSON without the dotted ``exclude`` keys. By default
    where the run is stored, how processes connect, how many seeds run at once, where scalars
    are logged, what is exported and how often training checkpoints do not count: none
    changes a result."""
    return _config_hash(cfg, exclude)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (None: defaults), then ``overrides`` applied in order.

    Errors in the file are prefixed with its path; all are :class:`ConfigError`.
    """
    return load_dataclass(RunConfig, path, overrides)
