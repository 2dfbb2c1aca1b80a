"""Tiny models of the paper configs' families, built from a synthetic world's pretrained model,
for rehearsing a paper config end to end on this CPU.

The rehearsal world's model (`rehearsal_world`) is a Llama (tied embeddings, 2 layers, d=64)
that knows some of its world. Two changes make it a rehearsal model of a family:
- the family: Qwen2 gets q/k/v biases (zeros, so the function is unchanged) and
  `model_type: qwen2`; Llama 3 stays a Llama;
- the learning rate: the paper's rates (1e-5 full, 1e-4 LoRA) are set for 7-8B models and do not
  move a 0.1M-parameter one in ten steps, so no example would move up for stage 2 to train on.
  A function-preserving rescaling fixes that without touching the config: the residual stream is
  divided by `gain` (embeddings, o and down projections / gain; RMSNorm does not see the scale)
  and every norm's gain times `gain`, the matrices it feeds divided by `gain`. The logits are
  unchanged (up to float rounding), but Adam's step, about lr per weight whatever the gradient's
  scale, is now `gain` times larger relative to each scaled weight, and a LoRA update acts on
  inputs `gain` times larger: an effective learning rate `gain` times the configured one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from gradual_jax.models.hf import config_to_hf, read_hf_config

# Consumers of each norm's output, divided by the gain the norm's weight is multiplied by.
_AFTER_INPUT_NORM = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_AFTER_POST_NORM = ("mlp.gate_proj", "mlp.up_proj")
_INTO_RESIDUAL = ("self_attn.o_proj", "mlp.down_proj")


def rescaled(tensors: dict[str, np.ndarray], num_layers: int, gain: float) -> dict[str, np.ndarray]:
    """The same function with residual stream / gain and norm gains x gain (tied embeddings)."""
    out = dict(tensors)
    out["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] / gain
    out["model.norm.weight"] = tensors["model.norm.weight"] * gain  # the tied lm_head is / gain too
    for i in range(num_layers):
        p = f"model.layers.{i}."
        for norm, consumers in (("input_layernorm", _AFTER_INPUT_NORM),
                                ("post_attention_layernorm", _AFTER_POST_NORM)):
            out[p + norm + ".weight"] = tensors[p + norm + ".weight"] * gain
            for c in consumers:
                out[p + c + ".weight"] = tensors[p + c + ".weight"] / gain
        for c in _INTO_RESIDUAL:
            out[p + c + ".weight"] = tensors[p + c + ".weight"] / gain
    return out


def rehearsal_model(world_model: Path, out: Path, family: str, *, gain: float = 100.0) -> Path:
    """Write the rehearsal model of `family` ('llama' or 'qwen2') to `out` (an HF directory)."""
    config = read_hf_config(world_model)
    if not config.tie_word_embeddings:
        raise ValueError("the rescaling assumes tied embeddings (the world model's)")
    tensors = rescaled(load_file(str(world_model / "model.safetensors")), config.num_layers, gain)
    # RMSNorm's eps sits beside the mean square of a residual stream now gain times smaller.
    config = config.replace(rms_norm_eps=config.rms_norm_eps / gain**2)
    if family == "qwen2":
        config = config.replace(model_type="qwen2", attention_bias=True)
        for i in range(config.num_layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                w = tensors[f"model.layers.{i}.self_attn.{name}.weight"]
                tensors[f"model.layers.{i}.self_attn.{name}.bias"] = np.zeros(w.shape[0], w.dtype)
    elif family != "llama":
        raise ValueError(f"unknown family {family!r}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(world_model / name, out / name)
    return out


# The smoke world pretrained longer, with half of the train candidates also seen as QA text and
# 20 train questions a relation (101 in all): a model that knows a sixth of its train questions
# and half-knows many more, so that stage 1 moves some untrained questions up for stage 2 in
# every seed. With the smoke world's model (which knows too little) stage 2 had nothing to
# train on in 2 of 3 seeds; with 12 questions a relation, in 1 of 3 seeds of the full
# fine-tuning configs. About 35 s to build, once a machine.
REHEARSAL_WORLD = {"pretrain_steps": 1000, "qa_train_coverage": 0.5, "n_train_per_relation": 20}


def rehearsal_world():
    """The rehearsal world (built once per machine, then read from the world cache)."""
    from gradual_jax.config import load_config
    from gradual_jax.world import build_or_load_world, world_config_from_dict

    smoke = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    return build_or_load_world(world_config_from_dict({**smoke.world, **REHEARSAL_WORLD}), progress=False)
