"""Configuration of the synthetic knowledge world: entities, corpus, tokenizer, model, pretraining.

Defaults follow the feasibility prototype in DESIGN.md ("Synthetic world"), retuned for JAX on two
CPU cores (about 14.6k training tokens/s, half the prototype's PyTorch rate): 500 people with four
relations each (the corpus is about 350k tokens, seen ~8 times in 1,400 steps of 16x128 tokens,
about 3.3 minutes), 10% of subjects never mentioned, the rest 1-20 times (log-uniform),
conflicting values for 60% of subjects, flat attribute priors, QA-format text for every
relation, and a train split stratified by what the pretrained model knows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Bump when generation, corpus rendering, tokenizer or pretraining change in a way that makes an
# old cached world differ from what this code would build from the same config.
WORLD_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a synthetic world and its pretrained model.

    Two equal configs build identical worlds, corpora and QA splits; the model is the same up to
    floating-point nondeterminism of XLA on the host.
    """

    seed: int = 0
    # Entities.
    n_people: int = 500
    n_countries: int = 20
    n_cities: int = 100
    n_companies: int = 50
    n_works: int = 100
    citizenship_follows_birthplace: float = 0.9
    # Mentions: a mentioned fact is stated floor(exp(U(log min, log(max + 1)))) times.
    min_mentions: int = 1
    max_mentions: int = 20
    never_mentioned_fraction: float = 0.1
    # Conflicts: for this share of subjects, each fact stated at least twice gets one wrong value,
    # used in a share U(conflict_rate_min, conflict_rate_max) of its mentions.
    conflict_subject_fraction: float = 0.6
    conflict_rate_min: float = 0.25
    conflict_rate_max: float = 0.5
    # QA-format text: share of corpus documents that are `Q: ..\nA: ..\n\n` blocks (each block
    # is longer than a statement document: 0.25 of documents is about half of the tokens),
    # pairs per block, and the share of train facts whose QA pairs may appear there (dev and
    # background facts always may; test facts never do).
    qa_text_fraction: float = 0.25
    qa_pairs_per_doc: int = 5
    qa_train_coverage: float = 0.1
    # QA splits per relation: at most qa_split_fraction of a relation's non-dev subjects become
    # test examples or train candidates (clipped to the counts below); the rest are background
    # facts. After pretraining, n_train_per_relation candidates are kept as the train split,
    # stratified by a screening of what the model knows (stratify_train) or at random.
    qa_split_fraction: float = 0.5
    train_candidate_factor: float = 5.0
    stratify_train: bool = True
    n_train_per_relation: int = 40
    n_dev_per_relation: int = 16
    n_test_per_relation: int = 20
    # Tokenizer: an upper bound; the world's lexicon must fit.
    vocab_size: int = 4096
    # Model.
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 384
    # Pretraining.
    pretrain_steps: int = 1400
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        _check_positive(self, ("n_people", "n_countries", "n_cities", "n_companies", "n_works",
                               "min_mentions", "max_mentions", "qa_pairs_per_doc", "vocab_size",
                               "d_model", "n_layers", "n_heads", "d_mlp", "pretrain_steps",
                               "batch_size", "seq_len", "n_dev_per_relation"))
        _check_fraction(self, ("citizenship_follows_birthplace", "never_mentioned_fraction",
                               "conflict_subject_fraction", "conflict_rate_min",
                               "conflict_rate_max", "qa_train_coverage", "qa_split_fraction"))
        if self.train_candidate_factor < 1:
            raise ValueError("WorldConfig.train_candidate_factor must be at least 1")
        if not 0 <= self.qa_text_fraction < 1:
            raise ValueError(f"WorldConfig.qa_text_fraction must be in [0, 1), got {self.qa_text_fraction}")
        if self.min_mentions > self.max_mentions:
            raise ValueError("WorldConfig.min_mentions must not exceed max_mentions")
        if self.conflict_rate_min > self.conflict_rate_max:
            raise ValueError("WorldConfig.conflict_rate_min must not exceed conflict_rate_max")
        if self.n_people % 2:
            raise ValueError(f"WorldConfig.n_people must be even (couples), got {self.n_people}")
        if self.n_cities < self.n_countries:
            raise ValueError("WorldConfig.n_cities must be at least n_countries (each country has a capital)")
        if self.d_model % self.n_heads:
            raise ValueError(f"WorldConfig.d_model {self.d_model} is not a multiple of n_heads")
        if self.n_dev_per_relation < 5:
            raise ValueError("WorldConfig.n_dev_per_relation must be at least 5 (4-shot exemplars + variety)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the config and the world format version: the cache key."""
        blob = json.dumps({"version": WORLD_FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_positive(cfg: WorldConfig, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"WorldConfig.{name} must be positive, got {getattr(cfg, name)}")


def _check_fraction(cfg: WorldConfig, names: tuple[str, ...]) -> None:
    for name in names:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(cfg, name)}")


def world_config_from_dict(d: Mapping[str, Any] | None) -> WorldConfig:
    """A WorldConfig from a mapping of field overrides; unknown keys raise one clear ValueError."""
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(WorldConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown world config key(s) {', '.join(unknown)}; "
                         f"expected some of: {', '.join(sorted(fields))}")
    values = {}
    for name, value in d.items():
        default = getattr(WorldConfig, name)
        values[name] = _coerce(name, value, type(default))
    return WorldConfig(**values)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"world config key {name}: expected true/false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"world config key {name}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"world config key {name}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if not isinstance(value, (int, float)):
            raise ValueError(f"world config key {name}: expected a number, got {value!r}")
        return float(value)
    return value
