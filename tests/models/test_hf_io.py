"""HF checkpoint I/O beyond parity: configs, sharded files, meshes, tokenizers, the Hub path and
every kind of bad input (each one clear `CheckpointError`)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gradual_jax.models import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    load_hf,
    load_model,
    load_tokenizer,
    save_hf,
)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def save_tiny(path: Path, cls=transformers.LlamaConfig, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**TINY, **overrides}))
    model.save_pretrained(path)
    return model


def params(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, k)): np.asarray(v[...])
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --------------------------------------------------------------------------------------------
# Configs


def test_config_from_hf_reads_both_rope_forms():
    base = {"model_type": "llama", **TINY}
    new = config_from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    old = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    assert new == old and new.rope_theta == 5e5 and new.rope_scaling["rope_type"] == "llama3"
    plain = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None
    written = config_to_hf(new)
    assert written["rope_parameters"]["rope_type"] == "llama3"
    assert written["rope_parameters"]["rope_theta"] == 5e5
    assert config_from_hf(written) == new


def test_config_from_hf_families():
    qwen2 = config_from_hf({"model_type": "qwen2", **TINY})
    assert qwen2.attention_bias and not qwen2.qk_norm
    qwen3 = config_from_hf({"model_type": "qwen3", **TINY, "head_dim": 24})
    assert qwen3.qk_norm and qwen3.head_dim == 24 and not qwen3.attention_bias
    assert config_from_hf({"model_type": "smollm3", **TINY, "no_rope_layers": [1, 1]}).tie_word_embeddings


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gpt2"}, r"unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"),
    ({"num_hidden_layers": None}, r"missing required key 'num_hidden_layers'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"mlp_bias": True}, r"mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn'"),
    ({"model_type": "smollm3"}, r"NoPE"),  # transformers' default puts NoPE on every 4th layer
])
def test_config_from_hf_rejects(bad, match):
    d = {"model_type": "llama", **TINY, "num_hidden_layers": 4, **bad}
    with pytest.raises(CheckpointError, match=match):
        config_from_hf(d)


# --------------------------------------------------------------------------------------------
# Loading variants


def test_sharded_checkpoint_equals_single_file(tmp_path):
    hf = save_tiny(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = params(load_hf(tmp_path / "single")), params(load_hf(tmp_path / "sharded"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_dtypes(tmp_path):
    save_tiny(tmp_path)
    model = load_hf(tmp_path, dtype="bfloat16", compute_dtype="float32")
    assert model.layers[0].attn.q.kernel[...].dtype == jax.numpy.bfloat16
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"


def test_mesh_places_each_param_by_its_logical_axes(tmp_path):
    sharding = pytest.importorskip("gradual_jax.sharding")
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    save_tiny(tmp_path)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = load_hf(tmp_path, mesh=mesh)
    plain = load_hf(tmp_path)
    q = model.layers[0].attn.q.kernel
    expected = sharding.param_partition_spec(q.get_metadata()["logical_axes"], mesh,
                                             shape=q[...].shape)
    assert q[...].sharding == jax.sharding.NamedSharding(mesh, expected)
    assert not q[...].sharding.is_fully_replicated
    a, b = params(model), params(plain)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_model_dispatches_on_suffix(tmp_path):
    save_tiny(tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt").config.num_layers == 2
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_hf(tmp_path / "empty")
    save_tiny(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_hf(tmp_path / "noweights")


def test_unsupported_model_type_names_the_file(tmp_path):
    save_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'gpt_neox'; supported: llama"):
        load_hf(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    save_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path)
    # safetensors lists tensors by name, so down_proj is the first mismatch met.
    assert str(info.value).endswith(": tensor model.layers.0.mlp.down_proj.weight has shape "
                                    "(32, 48), the config expects (32, 40)")


def test_corrupt_header(tmp_path):
    save_tiny(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf(tmp_path)


def test_missing_and_unrepresentable_tensors(tmp_path):
    save_tiny(tmp_path, attention_bias=True)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.bias"][:] = 0.5
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.bias is nonzero"):
        load_hf(tmp_path)
    weights["model.layers.1.self_attn.o_proj.bias"][:] = 0.0
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path)


def test_repo_id_offline_is_one_clear_error(monkeypatch):
    # The real snapshot_download, made offline with an empty cache: nothing touches the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-hf-cache")
    with pytest.raises(CheckpointError) as info:
        load_hf("some-org/some-model")
    assert str(info.value).startswith("some-org/some-model: not a local directory")
    assert "\n" not in str(info.value)


def test_repo_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    save_tiny(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_hf("org/tiny").config.hidden_size == 32
    repo_id, kwargs = calls[0]
    assert repo_id == "org/tiny"
    assert {"config.json", "*.safetensors", "tokenizer.json"} <= set(kwargs["allow_patterns"])


# --------------------------------------------------------------------------------------------
# Saving and tokenizers


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="<eos>")


def loaded_as(tmp_path: Path, model_type: str, cls=transformers.LlamaConfig, **overrides):
    """A tiny loaded model relabelled as `model_type` (init_model compiles every random op,
    which is slow on CPU; loading a torch-initialised checkpoint is not)."""
    save_tiny(tmp_path / "src", cls, **overrides)
    model = load_hf(tmp_path / "src")
    model.config = model.config.replace(model_type=model_type)
    return model


def test_save_hf_with_tokenizer_and_load_tokenizer(tmp_path):
    model = loaded_as(tmp_path, "smollm2", tie_word_embeddings=True)
    save_hf(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.tie_word_embeddings
    tokenizer = load_tokenizer(tmp_path / "out")
    assert tokenizer.is_fast and tokenizer("the cat sat").input_ids == [2, 3, 4]
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_save_hf_writes_zero_tensors_the_architecture_requires(tmp_path):
    """A bias-free model saved as Qwen2 (which always has q/k/v biases) gets zero biases."""
    hf = save_tiny(tmp_path / "llama")
    model = load_hf(tmp_path / "llama")
    model.config = model.config.replace(model_type="qwen2")
    save_hf(model, tmp_path / "qwen2")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2")
    assert type(back) is transformers.Qwen2ForCausalLM
    assert not back.model.layers[0].self_attn.q_proj.bias.any()
    ids = torch.tensor([[1, 5, 9, 2, 33]])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5)


def test_save_hf_refuses_unrepresentable_config_without_damage(tmp_path):
    save_tiny(tmp_path / "good")
    out = save_hf(load_hf(tmp_path / "good"), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # q/k norms exist only in Qwen3: a "llama" with them cannot be written.
    bad = loaded_as(tmp_path, "llama", transformers.Qwen3Config)
    with pytest.raises(CheckpointError, match="qk_norm"):
        save_hf(bad, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_tokenizer(tmp_path / "x.gguf")
    save_tiny(tmp_path / "notok")
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "notok")


# --------------------------------------------------------------------------------------------
# Sharded saving


@pytest.mark.parametrize("size, expected", [
    (1234, 1234), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("20kb", 20_000),
    ("1.5GiB", int(1.5 * 2**30)), ("64", 64), (" 2 MiB ", 2 * 2**20),
])
def test_parse_size(size, expected):
    from gradual_jax.configlib import parse_size

    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", ["5 parsecs", "GB", "", "0MB", 0, -3, "1e3MB"])
def test_parse_size_rejects(bad):
    from gradual_jax.configlib import parse_size

    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("overrides, limit", [({}, "20KB"), ({}, "7KB"),
                                              ({"tie_word_embeddings": True}, "13KB")])
def test_sharded_save_is_what_save_pretrained_writes(tmp_path, overrides, limit):
    """Same shard files, same tensor -> file map, same index metadata as transformers for the
    same weights and limit (7KB puts the embedding, bigger than the limit, in a shard of its
    own); transformers loads the shards with the original's logits."""
    hf = save_tiny(tmp_path / "src", **overrides)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size=limit)
    save_hf(load_hf(tmp_path / "src"), tmp_path / "ours", max_shard_size=limit)
    theirs = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert ours == theirs
    assert len(set(ours["weight_map"].values())) > 2
    names = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "theirs").glob("*.safetensors"))
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    for name in names:
        mine, ref = load_file(tmp_path / "ours" / name), load_file(tmp_path / "theirs" / name)
        assert mine.keys() == ref.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], ref[key])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    ids = torch.tensor([[1, 5, 9, 2, 33, 60]])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5)
    a, b = params(load_hf(tmp_path / "src")), params(load_hf(tmp_path / "ours"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_resaving_replaces_stale_weight_files(tmp_path):
    """A sharded save over a single-file one (and back) leaves only the new set of files."""
    save_tiny(tmp_path / "src")
    model = load_hf(tmp_path / "src")
    out = save_hf(model, tmp_path / "out")
    (out / "notes.txt").write_text("kept")
    save_hf(model, out, max_shard_size="9KB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    n = len([f for f in files if f.startswith("model-")])
    assert n > 2 and f"model-{n:05d}-of-{n:05d}.safetensors" in files
    save_hf(model, out, max_shard_size=10**9)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert not list(out.glob(".*tmp*"))


def test_bad_shard_size_writes_nothing(tmp_path):
    save_tiny(tmp_path / "src")
    with pytest.raises(ValueError, match="size '5 parsecs'"):
        save_hf(load_hf(tmp_path / "src"), tmp_path / "out", max_shard_size="5 parsecs")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Loading straight into a sharding: each device's slice read from its region of the file


MESHES = [(1, 8, 1), (2, 2, 2), (1, 2, 4)]  # (data, fsdp, tensor)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint (q/k/v biases) with every weight random, biases included."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2Config(**TINY, tie_word_embeddings=False))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape))
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_plain(qwen2_dir) -> dict[str, np.ndarray]:
    return params(load_hf(qwen2_dir))


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int]]:
    """`(tensor name, bytes)` of every region read from a safetensors file while it is alive."""
    from gradual_jax.models.hf import SafetensorsTensor

    log: list[tuple[str, int]] = []
    read = SafetensorsTensor.__getitem__

    def counted(self, index):
        out = read(self, index)
        log.append((self.name, out.nbytes))
        return out

    monkeypatch.setattr(SafetensorsTensor, "__getitem__", counted)
    return log


def _tensor_bytes(directory: Path) -> dict[str, int]:
    return {k: v.nbytes for k, v in load_file(directory / "model.safetensors").items()}


def _assert_sharded_as_logical_axes(model, mesh, rules=None) -> None:
    from flax import nnx

    from gradual_jax.sharding import param_partition_spec

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        expected = param_partition_spec(var.get_metadata()["logical_axes"], mesh, rules,
                                        shape=value.shape)
        assert value.sharding.mesh == mesh and value.sharding.spec == expected, path


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_load_reads_only_device_slices(qwen2_dir, qwen2_plain, reads, shape):
    """Equal to the unsharded load, every parameter sharded as its logical axes say, and each
    distinct slice read once: the regions read add up to exactly the checkpoint's bytes (devices
    holding the same slice share one read). On fsdp=8 every sharded tensor is read as 8 reads of
    exactly 1/8 each, one per device."""
    from gradual_jax.sharding import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh(*shape)
    model = load_hf(qwen2_dir, mesh=mesh)
    got = params(model)
    assert got.keys() == qwen2_plain.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], qwen2_plain[k], err_msg=k)
    _assert_sharded_as_logical_axes(model, mesh)
    sizes = _tensor_bytes(qwen2_dir)
    per_tensor: dict[str, list[int]] = {}
    for name, n in reads:
        per_tensor.setdefault(name, []).append(n)
    assert per_tensor.keys() == sizes.keys()
    assert sum(n for _, n in reads) == sum(sizes.values())
    if shape == (1, 8, 1):
        sharded = [k for k, v in per_tensor.items() if len(v) > 1]
        # Everything with an embed dim (all but the q/k/v biases) splits 8 ways over fsdp.
        assert len(sharded) == len(sizes) - 3 * TINY["num_hidden_layers"]
        for name in sharded:
            assert per_tensor[name] == [sizes[name] // 8] * 8, name
        # One device's callbacks: 1/8 of each sharded tensor, plus the replicated biases whole.
        one_device = sum(v[0] for v in per_tensor.values())
        assert one_device == (sum(sizes[k] // 8 for k in sharded)
                              + sum(sizes[k] for k in sizes if k not in sharded))


def test_sharded_load_with_head_dim_split_and_bfloat16(qwen2_dir, reads):
    """Rules that cut head_dim (a later dim of q's `(N*H, D)` rows) and a cast on the way."""
    from gradual_jax.sharding import LOGICAL_AXIS_RULES, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    rules = {**LOGICAL_AXIS_RULES, "heads": None, "kv_heads": None, "head_dim": ("tensor",)}
    mesh = make_mesh(1, 2, 4)
    model = load_hf(qwen2_dir, dtype="bfloat16", mesh=mesh, rules=rules)
    assert model.layers[0].attn.q.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", None, "tensor")
    _assert_sharded_as_logical_axes(model, mesh, rules)
    plain = params(load_hf(qwen2_dir, dtype="bfloat16"))
    for k, v in params(model).items():
        assert v.dtype == plain[k].dtype
        np.testing.assert_array_equal(v, plain[k], err_msg=k)


def test_read_region_is_our_layout_cut_for_every_spec():
    from gradual_jax.models.hf import hf_tensor_specs, read_region

    config = config_from_hf({"model_type": "qwen3", **TINY, "head_dim": 8})
    rng = np.random.default_rng(0)
    for spec in hf_tensor_specs(config):
        hf = rng.standard_normal(spec.hf_shape).astype(np.float32)
        ours = spec.to_ours(hf)
        for _ in range(4):
            bounds = tuple(tuple(sorted(rng.choice(n + 1, 2, replace=False))) for n in spec.shape)
            want = ours[tuple(slice(a, b) for a, b in bounds)]
            np.testing.assert_array_equal(read_region(hf, spec, bounds), want, err_msg=spec.name)


def test_axis_that_does_not_divide_is_replicated_and_logged(qwen2_dir, caplog):
    """tensor=4 does not divide the 2 KV heads: k and v stay whole over tensor (still split over
    fsdp), and one warning line names each such tensor, its shape and both axes."""
    from flax import nnx

    from gradual_jax.sharding import (
        ReplicatedAxis, make_mesh, param_partition_spec, replicated_axes, replicated_params,
    )

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh(1, 2, 4)
    axes, shape = ("embed", "kv_heads", "head_dim"), (32, 2, 8)
    assert param_partition_spec(axes, mesh, shape=shape) == jax.sharding.PartitionSpec("fsdp")
    assert replicated_axes(axes, shape, mesh) == [ReplicatedAxis(1, 2, "kv_heads", "tensor", 4)]
    assert replicated_axes(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == []
    with caplog.at_level("WARNING", logger="gradual_jax.models.hf"):
        model = load_hf(qwen2_dir, mesh=mesh)
    assert model.layers[0].attn.k.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    records = [r for r in caplog.records if r.name == "gradual_jax.models.hf"]
    assert len(records) == 1 and records[0].levelname == "WARNING"
    line = records[0].getMessage()
    assert "\n" not in line and "8 tensor(s) replicated" in line  # k, v kernels and biases
    for i in range(TINY["num_hidden_layers"]):
        for kv in "kv":
            proj = f"model.layers.{i}.self_attn.{kv}_proj"
            assert f"{proj}.weight (32, 2, 8): kv_heads=2 over tensor (4 ways)" in line
            assert f"{proj}.bias (2, 8): kv_heads=2 over tensor (4 ways)" in line
    found = replicated_params(nnx.state(model), mesh)
    assert sorted(found) == [f"layers/{i}/attn/{kv}/{p}" for i in range(2) for kv in "kv"
                             for p in ("bias", "kernel")]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradual_jax.models.hf"):
        load_hf(qwen2_dir, mesh=make_mesh(1, 8, 1))
    assert not [r for r in caplog.records if r.name == "gradual_jax.models.hf"]
