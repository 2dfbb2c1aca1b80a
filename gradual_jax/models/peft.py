"""LoRA adapters in PEFT's directory layout: out of a model carrying our `LoRA` modules, back in
from disk, and several stages' adapters combined into one onto the original base.

A PEFT LoRA directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules
...) and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.lora_A.weight` `(r, in_features)` and `...lora_B.weight`
`(out_features, r)`; the module's weight update is `B @ A * lora_alpha / r` in HF's `(out, in)`
layout. Ours is `a` `(*in_shape, r)`, `b` `(r, *out_shape)`, `delta = tensordot(a, b) * alpha / r`
in `(in..., out...)`, so `A = a.reshape(in, r).T` and `B = b.reshape(r, out).T`.

Stage k of a staged run trains its adapter on the merged model of stage k-1, so the deltas add:
stacking the stages' adapters along the rank gives one adapter of rank `r1 + r2 + ...` onto the
original base (`combine_adapters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradual_jax import io
from gradual_jax.models.errors import CheckpointError
from gradual_jax.models.hf import _write_safetensors, write_json_atomic

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Where a LoRA stage keeps its adapter in its stage directory (runtime writes, export reads).
STAGE_ADAPTER_DIR = "adapter"
# Our projection kinds -> the module names transformers' Llama-family decoders give them.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in PEFT's layout.

    `modules` maps an HF module name (`model.layers.3.self_attn.q_proj`) to `(A, B)`, `A`
    `(rank, in_features)` and `B` `(out_features, rank)`; the module's update is
    `B @ A * alpha / rank`. `base_model` is what it applies to (`base_model_name_or_path`).
    """

    rank: int
    alpha: float
    modules: dict[str, tuple[np.ndarray, np.ndarray]]
    base_model: str | None = None
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        """The module names PEFT matches (`q_proj`, ...), in our projection order."""
        present = {name.rsplit(".", 1)[-1] for name in self.modules}
        return [m.split(".")[-1] for m in HF_MODULES.values() if m.split(".")[-1] in present]

    def replace(self, **changes: Any) -> Adapter:
        return dataclasses.replace(self, **changes)


def _host(x: Any) -> np.ndarray:
    """A device array as one numpy array. An array spread over other hosts' devices is
    all-gathered, which every process must then call in the same order."""
    import jax

    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def adapter_from_model(model: Any, *, base_model: str | None = None,
                       dropout: float = 0.0) -> Adapter:
    """The PEFT form of every LoRA module `model` carries (see `training.lora.apply_lora`).

    Raises ValueError when the model has no adapter or its adapters differ in rank or alpha
    (one `apply_lora` call gives them all the same). In a multi-process run every process must
    call it (adapters sharded over hosts are gathered); any of them may then save the result.
    """
    from gradual_jax.models.transformer import projections

    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    settings: set[tuple[int, float]] = set()
    for kind, projs in projections(model).items():
        for layer, proj in enumerate(projs):
            lora = proj.lora
            if lora is None:
                continue
            a, b = _host(lora.a[...]), _host(lora.b[...])
            rank = a.shape[-1]
            settings.add((rank, round(float(lora.scale) * rank, 9)))
            modules[f"model.layers.{layer}.{HF_MODULES[kind]}"] = (a.reshape(-1, rank).T,
                                                                  b.reshape(rank, -1).T)
    if not modules:
        raise ValueError("the model carries no LoRA adapter")
    if len(settings) > 1:
        raise ValueError(f"the model's adapters differ in (rank, alpha): {sorted(settings)}")
    rank, alpha = settings.pop()
    return Adapter(rank=rank, alpha=alpha, modules=modules, base_model=base_model, dropout=dropout)


def adapter_config(adapter: Adapter) -> dict[str, Any]:
    """The `adapter_config.json` dict `peft.PeftModel.from_pretrained` reads for `adapter`."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model, "revision": None,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "target_modules": adapter.target_modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def _layer_order(name: str) -> tuple[int, int]:
    m = _MODULE.fullmatch(name)
    kinds = [v.split(".")[-1] for v in HF_MODULES.values()]
    return (int(m.group(1)), kinds.index(m.group(3))) if m else (1 << 30, 0)


def save_adapter(adapter: Adapter, out_dir: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT LoRA directory: `adapter_model.safetensors` first, then
    `adapter_config.json` (so a directory with a config is complete), each file atomically.
    Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in sorted(adapter.modules, key=_layer_order):
        for part, array in zip("AB", adapter.modules[name]):
            entries.append((f"{_PREFIX}{name}.lora_{part}.weight", tuple(array.shape), array.dtype,
                            lambda array=array: array))
    io.atomic_write(out / ADAPTER_WEIGHTS_FILE,
                  lambda p: _write_safetensors(p, entries, desc="writing adapter"))
    write_json_atomic(out / ADAPTER_CONFIG_FILE, adapter_config(adapter))
    return out


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """The LoRA adapter of a PEFT directory (ours, or any PEFT LoRA of a Llama-family model
    without rank or alpha patterns). Raises CheckpointError naming the file for a missing or
    unreadable file, another PEFT type, or tensors that do not pair up."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg_path, weights = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    for path in (cfg_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a PEFT adapter directory needs it")
    try:
        cfg = json.loads(cfg_path.read_text())
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid adapter config ({e!r})") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("rank_pattern") or cfg.get("alpha_pattern") \
            or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: expected a plain LoRA adapter (peft_type LORA, no rank "
                              f"or alpha patterns, no rsLoRA or DoRA)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read ({e})") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"{weights}: unexpected tensor {key}")
        parts.setdefault(m.group(1), {})[m.group(2)] = array
    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"{weights}: module {name} needs lora_A (r={rank}, in) and "
                                  f"lora_B (out, r={rank}); found "
                                  f"{ {k: tuple(v.shape) for k, v in ab.items()} }")
        modules[name] = (a, b)
    return Adapter(rank=rank, alpha=alpha, modules=modules,
                   base_model=cfg.get("base_model_name_or_path"),
                   dropout=float(cfg.get("lora_dropout") or 0.0))


def combine_adapters(adapters: Sequence[Adapter], *, base_model: str | None = None) -> Adapter:
    """One adapter equal to applying `adapters` one after the other, each on the model the
    previous ones merged into: their updates add, so A's stack along the rank
    (`A = [A1; A2; ...]`) and B's follow with each stage's scaling moved into them
    (`B = [B1 * s1/s, B2 * s2/s, ...]`, `s` the combined scaling). The rank is the sum of the
    ranks, alpha the sum of the alphas (so B's are unchanged when every stage has the same
    alpha / r). A module one adapter lacks gets zeros there. Shapes of one module must agree.
    """
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter")
    rank = sum(a.rank for a in adapters)
    alpha = sum(a.alpha for a in adapters)
    scaling = alpha / rank
    names = sorted({n for a in adapters for n in a.modules}, key=_layer_order)
    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        present = [a.modules[name] for a in adapters if name in a.modules]
        in_f, out_f = present[0][0].shape[1], present[0][1].shape[0]
        dtype = present[0][0].dtype
        a_parts, b_parts = [], []
        for adapter in adapters:
            if name in adapter.modules:
                a, b = adapter.modules[name]
                if a.shape[1] != in_f or b.shape[0] != out_f:
                    raise ValueError(f"module {name}: adapters of shapes {a.shape}/{b.shape} and "
                                     f"(r, {in_f})/({out_f}, r) cannot be combined")
                a_parts.append(a.astype(np.float32))
                b_parts.append(b.astype(np.float32) * np.float32(adapter.scaling / scaling))
            else:
                a_parts.append(np.zeros((adapter.rank, in_f), np.float32))
                b_parts.append(np.zeros((out_f, adapter.rank), np.float32))
        modules[name] = (np.concatenate(a_parts, 0).astype(dtype),
                         np.concatenate(b_parts, 1).astype(dtype))
    return Adapter(rank=rank, alpha=alpha, modules=modules, base_model=base_model,
                   dropout=adapters[0].dropout)


__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "HF_MODULES", "STAGE_ADAPTER_DIR", "Adapter",
           "adapter_config", "adapter_from_model", "combine_adapters", "read_adapter",
           "save_adapter"]
