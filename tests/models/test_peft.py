"""PEFT adapter layout against peft itself, without the pipeline: a tiny random HF model, our LoRA
modules on its loaded copy with non-zero `b`, saved as a PEFT directory, loaded by
`peft.PeftModel.from_pretrained` onto the HF model: same logits. Two stages' adapters combined
into one onto the base give the twice-merged model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gradual_jax.models import CheckpointError, load_hf, save_hf
from gradual_jax.models.peft import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_from_model,
    combine_adapters,
    read_adapter,
    save_adapter,
)
from gradual_jax.training.lora import apply_lora, merge_lora

peft = pytest.importorskip("peft")

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, attn_implementation="eager")
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that an adapter changes the logits clearly
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    hf.save_pretrained(path)
    return path


def ids() -> np.ndarray:
    return np.random.default_rng(1).integers(1, VOCAB, size=(2, 10))


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def ours(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids(), jnp.int32)))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids())).logits.float().numpy()


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def adapted(base_dir, rank: int, alpha: float, targets, seed: int):
    """Our model of `base_dir` with fresh adapters whose `b` is random (a trained adapter)."""
    model = load_hf(base_dir)
    return train_adapters(model, rank, alpha, targets, seed)


def train_adapters(model, rank, alpha, targets, seed):
    apply_lora(model, rank, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for proj in (layer.attn.q, layer.attn.k, layer.attn.v, layer.attn.o,
                     layer.mlp.gate, layer.mlp.up, layer.mlp.down):
            if proj.lora is not None:
                b = proj.lora.b
                b[...] = jnp.asarray(0.3 * rng.standard_normal(b[...].shape), b[...].dtype)
    return model


def test_adapter_layout_matches_peft(base_dir, tmp_path):
    model = adapted(base_dir, 4, 8.0, ALL, seed=3)
    expected = ours(model)
    adapter = adapter_from_model(model, base_model=str(base_dir))
    save_adapter(adapter, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"]
    assert cfg["base_model_name_or_path"] == str(base_dir)
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE))
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 48)
    assert len(tensors) == 2 * 7 * 2

    plain = torch_logits(hf_model(base_dir))
    assert np.abs(plain - expected).max() > 0.1, "the adapter must change the logits"
    peft_model = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4, rtol=0)
    # Read back, it is the same adapter.
    back = read_adapter(tmp_path / "adapter")
    assert (back.rank, back.alpha, back.base_model) == (4, 8.0, str(base_dir))
    for name, (a, b) in adapter.modules.items():
        np.testing.assert_array_equal(back.modules[name][0], a)
        np.testing.assert_array_equal(back.modules[name][1], b)


def test_combined_adapter_equals_the_merged_stages(base_dir, tmp_path):
    """Stage 2 trains on stage 1's merged model with another rank, alpha and targets: the
    combined adapter (rank 3 + 2) onto the base computes the twice-merged model, and each
    stage's own adapter onto its start model computes that stage's model."""
    model = adapted(base_dir, 3, 6.0, ["q", "v", "down"], seed=1)
    first = adapter_from_model(model)
    merge_lora(model)
    save_hf(model, tmp_path / "stage1")
    model = train_adapters(model, 2, 16.0, ["q", "o"], seed=2)
    second = adapter_from_model(model)
    merge_lora(model)
    expected = ours(model)
    combined = combine_adapters([first, second], base_model=str(base_dir))
    assert (combined.rank, combined.alpha) == (5, 22.0)
    assert combined.target_modules == ["q_proj", "v_proj", "o_proj", "down_proj"]
    save_adapter(combined, tmp_path / "adapter")
    save_adapter(second, tmp_path / "stage2")
    peft_model = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4, rtol=0)
    onto_stage1 = peft.PeftModel.from_pretrained(hf_model(tmp_path / "stage1"), tmp_path / "stage2")
    np.testing.assert_allclose(torch_logits(onto_stage1.eval()), expected, atol=1e-4, rtol=0)


def test_adapter_errors(base_dir, tmp_path):
    with pytest.raises(ValueError, match="carries no LoRA adapter"):
        adapter_from_model(load_hf(base_dir))
    with pytest.raises(CheckpointError, match=f"{ADAPTER_CONFIG_FILE}: missing"):
        read_adapter(tmp_path)
    adapter = adapter_from_model(adapted(base_dir, 2, 4.0, ["q"], seed=0))
    save_adapter(adapter, tmp_path / "a")
    cfg_path = tmp_path / "a" / ADAPTER_CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 3}))
    needs = r"module model\.layers\.0\.self_attn\.q_proj needs lora_A \(r=3"
    with pytest.raises(CheckpointError, match=needs):
        read_adapter(tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="expected a plain LoRA adapter"):
        read_adapter(tmp_path / "a")
