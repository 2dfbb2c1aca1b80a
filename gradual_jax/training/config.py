"""Fine-tuning settings: ``TrainConfig`` with its ``LoRAConfig``, and the model runtime switches
a fine-tuning config sets."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from gradual_jax.configlib import ConfigError, require

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters; ``rank = 0`` means full fine-tuning."""

    rank: int = 0
    """Adapter rank; 0 = full fine-tuning."""
    alpha: float = 16.0
    """Scale: the update is ``x @ a @ b * alpha / rank``."""
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])
    """Projections that get an adapter: q k v o gate up down."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""

    def __post_init__(self) -> None:
        require(self.rank >= 0, "rank", f"must be >= 0 (0 = full fine-tuning), got {self.rank}")
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            valid = ", ".join(LORA_TARGETS)
            raise ConfigError(f"unknown target {bad[0]!r}; valid: {valid}", "targets")
        require(len(set(self.targets)) == len(self.targets), "targets", "contains duplicates")
        require(self.rank == 0 or bool(self.targets), "targets", "must not be empty when rank > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings of a stage (each stage may override them)."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    epochs: int = 10
    """Epochs over the stage's examples."""
    batch_size: int = 16
    """Global batch, in examples."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    dropout: float = 0.0
    """Dropout rate in the model while training."""
    remat: bool = False
    """Recompute each layer in the backward pass (less memory, same numbers)."""
    scan_layers: bool = False
    """Run the layers as one lax.scan over stacked weights (one layer's gathered weights live at a
    time under FSDP; with remat the way large models fit, see plan.py; same numbers)."""
    template: str = "gekhman"
    """Fine-tuning prompt format: gekhman, qa, or a template with {question}."""
    max_seq_len: int = 128
    """Longest tokenized training example."""
    selection: Literal["early_stop", "convergence"] = "early_stop"
    """Keep the best epoch by dev accuracy (early_stop) or the last one (convergence)."""
    eval_every_epochs: int = 1
    """Dev accuracy every N epochs."""
    dev_eval_size: int = 256
    """Dev questions in each evaluation."""
    packing: bool = False
    """Pack several examples into one row."""
    batch_shapes: Literal["fixed", "bucketed"] = "fixed"
    """fixed: every step of a run in one shape (batch_size x grad_accum rows, as long as the
    run's longest training example, rounded up to a power of two), so the step compiles once a
    run; bucketed: each batch cut to power-of-two rows and length of its own (less padding, one
    compile per shape met)."""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        positive = ("epochs", "batch_size", "grad_accum", "max_seq_len", "eval_every_epochs")
        for key in positive + ("dev_eval_size",):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.clip_norm >= 0, "clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(bool(self.template), "template", "must not be empty")


def model_runtime(train: TrainConfig) -> dict[str, Any]:
    """The ``ModelConfig`` runtime switches a fine-tuning config sets (``ModelConfig.replace``
    keywords): dropout, remat, scanned layers. None changes the parameters."""
    return {"dropout_rate": float(train.dropout), "remat": bool(train.remat),
            "scan_layers": bool(train.scan_layers)}
