"""Our decoder against transformers in PyTorch, family by family, through real checkpoints:
tiny random HF model -> save_pretrained (safetensors) -> load_hf -> logits; and back out through
save_hf -> AutoModelForCausalLM.from_pretrained."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gradual_jax.models import load_hf, save_hf

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, rope_theta=1e6)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
    "qwen3_bias": (transformers.Qwen3Config, dict(head_dim=8, attention_bias=True)),
    "smollm": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_attention_heads=8,
                                              num_key_value_heads=4, head_dim=8)),
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layers=[1, 1], pad_token_id=0)),
    "gqa1": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight, norm and bias a non-trivial value so all of them are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("o_proj.bias"):
                p.zero_()  # transformers adds it with attention_bias; our decoder has none
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**COMMON, **extra}))
    return randomise(model, seed)


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Row 0 unpadded (length 12); row 1 left-padded with 4 pad slots; row 2 holds row 1's 8 real
    tokens unpadded at the start (what follows them cannot change their causal logits)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0
    ids[1, :4] = 0
    ids[2, :8] = ids[1, 4:]
    return ids, mask


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def our_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.bool_)))


def real(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask.astype(bool)]


# qwen3_bias differs from qwen2's bias handling only in the zero o_proj bias: the round trip
# covers it, and one compilation fewer keeps the suite fast.
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen3_bias"}))
def test_logits_match_transformers(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_hf(tmp_path)
    ids, mask = batch()
    expected = hf_logits(hf, ids, mask)
    got = our_logits(ours, ids, mask)
    assert np.abs(expected).max() > 1.0, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4, rtol=0)  # unpadded row
    np.testing.assert_allclose(real(got, mask), real(expected, mask), atol=1e-4, rtol=0)
    # Left padding changes nothing for the real tokens: row 1 equals its unpadded self.
    np.testing.assert_allclose(got[1, 4:], got[2, :8], atol=1e-5, rtol=0)


def test_family_features_are_loaded(tmp_path):
    """The tiny configs really exercise what they claim to (biases, norms, head_dim, tying)."""
    for family, check in {
        "qwen2": lambda m: m.layers[0].attn.q.bias is not None,
        "qwen3": lambda m: m.config.head_dim == 24 and m.layers[0].attn.q_norm is not None,
        "smollm": lambda m: m.lm_head is None,
        "gqa1": lambda m: m.layers[0].attn.k.kernel.shape == (64, 1, 16),
        "llama3": lambda m: m.config.rope_scaling["rope_type"] == "llama3",
    }.items():
        tiny_hf_model(family).save_pretrained(tmp_path / family)
        assert check(load_hf(tmp_path / family)), family


def test_llama3_rope_scaling_matters(tmp_path):
    """Guard against a vacuous llama3 case: without its scaling the logits differ clearly."""
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    scaled = load_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = load_hf(tmp_path)
    ids, mask = batch()
    assert np.abs(our_logits(scaled, ids, mask) - our_logits(plain, ids, mask)).max() > 1e-2


# gqa1 and llama2 write the same config.json fields as llama3.
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gqa1", "llama2"}))
def test_round_trip_through_save_hf(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path / "src")
    save_hf(load_hf(tmp_path / "src"), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             attn_implementation="eager")
    assert type(back) is type(hf)
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert head_dim(back.config) == head_dim(hf.config)
    assert back.config.rope_parameters == hf.config.rope_parameters
    ids, mask = batch()
    np.testing.assert_allclose(real(hf_logits(back, ids, mask), mask),
                               real(hf_logits(hf, ids, mask), mask), atol=1e-5, rtol=0)


def test_round_trip_bfloat16(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src", dtype="bfloat16")
    assert ours.embed[...].dtype == jnp.bfloat16
    save_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().float().numpy(),
                                  hf.model.embed_tokens.weight.detach().bfloat16().float().numpy())
    # A bfloat16 checkpoint loads into float32 parameters exactly.
    widened = load_hf(tmp_path / "out", dtype="float32")
    np.testing.assert_array_equal(np.asarray(widened.embed[...]),
                                  np.asarray(ours.embed[...], np.float32))
