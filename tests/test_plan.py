"""The fit planner and the paper configs: configs load, architectures resolve offline, the plan
compiles the run's own programs (Trainer.lower_step, Sampler.lower_*) on the run's meshes,
reports per-device memory that matches a hand count and a real run, and says fits / does not fit
by exit code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradual_jax import plan as P
from gradual_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _jax_started():
    """Start JAX's backend (conftest: 8 CPU devices) so plan_main never pins it to fewer."""
    import jax

    assert jax.device_count() >= 8


# ----------------------------------------------------------------------------- paper configs


def test_there_are_four_paper_configs():
    assert [p.name for p in PAPER] == ["llama3_8b_full.yaml", "llama3_8b_lora.yaml",
                                       "qwen2_7b_full.yaml", "qwen2_7b_lora.yaml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_and_resolves_offline(path):
    cfg = load_config(path)
    mc = P.resolve_model_config(cfg)  # built-in table: no download
    params = {"qwen2": 7.616e9, "llama": 8.030e9}[mc.model_type]
    assert mc.num_params() == pytest.approx(params, rel=1e-3)
    assert cfg.data.kind == "entityquestions" and cfg.data.gekhman
    assert cfg.train.batch_size == 128 and cfg.train.selection == "early_stop"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)  # fsdp=16 on v5e-16, 8 on H100x8
    assert cfg.train.batch_size % 16 == 0 and cfg.probe.batch_size % 16 == 0
    if "lora" in path.stem:
        assert cfg.train.lora.rank > 0 and cfg.train.lr == 1e-4
    else:
        assert cfg.train.lora.rank == 0 and cfg.train.lr == 1e-5


def test_known_architectures_are_the_hf_configs():
    from gradual_jax.models.hf import config_from_hf

    q = config_from_hf(P.known_architecture("hf:Qwen/Qwen2-7B"))
    assert (q.hidden_size, q.num_layers, q.num_heads, q.num_kv_heads, q.intermediate_size,
            q.vocab_size, q.rope_theta) == (3584, 28, 28, 4, 18944, 152064, 1e6)
    assert q.attention_bias and not q.tie_word_embeddings and q.head_dim == 128
    llama = config_from_hf(P.known_architecture("meta-llama/Meta-Llama-3-8B"))
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads,
            llama.intermediate_size, llama.vocab_size, llama.rope_theta) == (
        4096, 32, 32, 8, 14336, 128256, 5e5)
    assert not llama.attention_bias and not llama.tie_word_embeddings
    assert P.known_architecture("qwen/qwen2-7b") is not None  # case-insensitive
    assert P.known_architecture("Qwen/Qwen3-8B") is None


def test_model_source_resolution(tmp_path):
    cfg = load_config(PAPER[0], ["model.source=hf:Qwen/Qwen2-7B", "model.compute_dtype=float32",
                                 "train.remat=true"])
    mc = P.resolve_model_config(cfg)
    assert mc.model_type == "qwen2" and mc.dtype == "float32" and mc.remat
    with pytest.raises(ConfigError, match="model.source"):
        P.resolve_model_config(load_config(None, ["model.source=no/such/model/here"]))
    with pytest.raises(ConfigError, match="does not exist"):
        P.resolve_model_config(load_config(None, [f"model.source={tmp_path}/missing.gguf"]))


def test_target_memory():
    cfg = load_config(None)
    assert P.resolve_hbm(cfg, 80.0) == (80 * P.GIB, "80 GiB as given")
    assert P.resolve_hbm(cfg, target="h100")[0] == 80 * P.GIB
    size, how = P.resolve_hbm(cfg)
    assert size == 16 * P.GIB and "default" in how
    with pytest.raises(ConfigError, match="unknown target"):
        P.resolve_hbm(cfg, target="tpu-v9")
    with pytest.raises(ConfigError, match="must be > 0"):
        P.resolve_hbm(cfg, 0.0)
    assert P.default_devices(load_config(None, ["mesh.data=2", "mesh.fsdp=4"])) == 8
    assert P.default_devices(load_config(None)) == P.DEFAULT_DEVICES
    # A `plan:` config section (target, hbm_gib, devices), once config.py has one, is honoured.
    from types import SimpleNamespace

    planned = SimpleNamespace(mesh=cfg.mesh, plan=SimpleNamespace(target="h100", hbm_gib=None, devices=16))
    assert P.resolve_hbm(planned) == (80 * P.GIB, "target h100: 80 GiB")
    assert P.resolve_hbm(planned, 16.0)[0] == 16 * P.GIB  # the flag wins
    assert P.default_devices(planned) == 16


# ----------------------------------------------------------------------------- the planner


def _tiny_config(tmp_path: Path, overrides=(), layers: int = 2):
    """A local HF checkpoint directory (config.json only) and a run config pointing at it.

    Hidden 64 over fsdp=8: every parameter has an `embed` dim, so each device holds exactly
    1/8 of every parameter.
    """
    from gradual_jax.models.hf import config_to_hf
    from gradual_jax.models.transformer import ModelConfig

    mc = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=layers,
                     num_heads=4, num_kv_heads=2, eos_token_id=2)
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config_to_hf(mc)))
    return load_config(None, [f"model.source={tmp_path / 'ckpt'}", "mesh.data=1", "mesh.fsdp=-1",
                              "train.batch_size=16", "train.max_seq_len=32", "probe.batch_size=16",
                              "probe.max_new_tokens=4", "probe.k_shot=1", *overrides]), mc


@pytest.fixture
def memo_compiles(monkeypatch):
    """Compile each distinct configuration once per test (plan_main is called twice)."""
    cache: dict = {}
    compile_programs = P._compile_programs

    def cached(mc, cfg, meshes, train, sampler, shapes):
        key = (mc, json.dumps(P.to_dict(cfg), sort_keys=True),
               tuple(tuple(m.shape.items()) for m in meshes), train, sampler, shapes)
        if key not in cache:
            cache[key] = compile_programs(mc, cfg, meshes, train, sampler, shapes)
        return cache[key]

    monkeypatch.setattr(P, "_compile_programs", cached)


def _output(capsys) -> tuple[dict, str]:
    out = capsys.readouterr().out
    first, _, table = out.partition("\n")
    return json.loads(first), table


def test_tiny_plan_fits_large_hbm_and_not_tiny_hbm(tmp_path, capsys, memo_compiles):
    cfg, mc = _tiny_config(tmp_path)
    assert P.plan_main(cfg, devices=8, hbm_gib=1000) == P.EXIT_FITS
    result, table = _output(capsys)
    assert result["fits"] is True and result["devices"] == 8
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # The probe's default mesh: the largest tensor degree dividing 8 devices, 4 and 2 heads.
    assert result["probe_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    assert result["hbm_bytes"] == 1000 * P.GIB
    assert set(result["programs"]) == {"train", "prefill", "first", "admit", "decode", "score", "branch"}
    assert result["fits_train"] is result["fits_probe"] is True
    n = mc.num_params()
    assert result["params"] == result["trainable_params"] == n
    pd = result["per_device_bytes"]
    # Hand count: fp32 params split 8 ways; AdamW keeps two moments per param (+ step counters).
    assert pd["params"] == 4 * n // 8
    assert 2 * pd["params"] <= pd["optimizer"] <= 2 * pd["params"] + 64
    assert pd["total"] == pd["params"] + pd["optimizer"] + pd["activations"]
    assert pd["total"] == result["programs"]["train"]["total"] <= result["peak_bytes"]
    # Probing: the fp32 training shards stay resident; the inference copy is float32 here
    # (compute dtype) with the vocab, heads and MLP split 2 ways, the rest replicated.
    probe = result["probe_per_device_bytes"]
    assert probe["train_params"] == pd["params"]
    assert 4 * n // 2 <= probe["inference_weights"] <= 4 * n
    assert probe["kv_cache"] > 0 and probe["prefix_store"] > 0
    assert probe["total"] == sum(v for k, v in probe.items() if k != "total") <= result["peak_bytes"]
    shapes = result["probe_shapes"]
    # The tiny byte-level prompts' shared prefix fits one 32-token step; probe.batch_size slots.
    assert shapes["prefix_width"] == 32 and shapes["slots"] == 16
    assert shapes["cache_len"] == 32 + 4  # tail width + new tokens (the prefix stays in the store)
    assert result["decode_collective_bytes"] > 0
    assert result["model_flops_per_step"] == 6 * n * 16 * 32
    assert result["flops_per_step"] > 0
    assert "FITS" in table and "params" in table

    assert P.plan_main(cfg, devices=8, hbm_gib=0.001) == P.EXIT_DOES_NOT_FIT
    small, table = _output(capsys)
    assert small["fits"] is False and small["peak_bytes"] == result["peak_bytes"]
    over = small["peak_bytes"] - small["hbm_bytes"]
    (line,) = [ln for ln in table.splitlines() if ln.startswith("DOES NOT FIT")]
    assert f"by {over / (1 << 20):.1f} MiB" in line


def test_lora_plan_trains_only_the_adapters(tmp_path):
    cfg, mc = _tiny_config(tmp_path, ["train.lora.rank=4", "train.lora.targets=[q,v]"])
    result = P.plan(cfg, 8, P.GIB, sampler=False)
    d, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    adapters = mc.num_layers * (4 * (d + mc.num_heads * mc.head_dim) + 4 * (d + kv))
    assert result["trainable_params"] == adapters
    assert result["params"] == mc.num_params() + adapters
    # Moments exist only for the adapters.
    assert result["per_device_bytes"]["optimizer"] <= 2 * 4 * adapters
    assert result["mode"] == "lora r=4" and set(result["programs"]) == {"train"}


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_layer_extrapolation_matches_a_full_compile(tmp_path, scan):
    overrides = ["model.compute_dtype=bfloat16"]
    # A scan of one layer compiles to no loop at all: extrapolate a scan from 2 and 4 layers.
    depth, low = (8, 2) if scan else (4, 1)
    if scan:
        overrides += ["train.scan_layers=true", "train.remat=true"]
    cfg, _ = _tiny_config(tmp_path, overrides, layers=depth)
    full = P.plan(cfg, 2, P.GIB)
    ext = P.plan(cfg, 2, P.GIB, layers=low)
    assert full["compiled_layers"] == [depth] and ext["compiled_layers"] == [low, 2 * low]
    assert ext["per_device_bytes"]["params"] == full["per_device_bytes"]["params"]
    assert ext["probe_per_device_bytes"]["inference_weights"] == full["probe_per_device_bytes"]["inference_weights"]
    for name in ("train", "prefill", "decode"):
        f, e = full["programs"][name], ext["programs"][name]
        for key in ("argument", "output"):
            assert e[key] == pytest.approx(f[key], rel=0.02), (name, key)
        # Temporaries of a model this small follow XLA:CPU's buffer choices more than its depth.
        assert e["total"] == pytest.approx(f["total"], rel=0.02 if name == "train" else 0.15), name
    assert ext["decode_collective_bytes"] == pytest.approx(full["decode_collective_bytes"], rel=0.02)
    f, e = full["programs"]["train"], ext["programs"]["train"]
    if scan:  # a scanned body is costed once: the planner reports 6 * params * tokens
        assert full["flops_per_step"] == full["model_flops_per_step"]
    else:
        assert e["flops"] == pytest.approx(f["flops"], rel=0.02)


def test_bad_mesh_is_a_config_error(tmp_path):
    cfg, _ = _tiny_config(tmp_path, ["mesh.fsdp=3"])
    with pytest.raises(ConfigError, match="mesh"):
        P.plan(cfg, 8, P.GIB)
    cfg, _ = _tiny_config(tmp_path, ["train.batch_size=12"])
    with pytest.raises(ConfigError, match=r"train\.batch_size.*12 does not divide"):
        P.plan(cfg, 8, P.GIB)
    cfg, _ = _tiny_config(tmp_path, ["probe.batch_size=6"])
    with pytest.raises(ConfigError, match=r"probe\.batch_size.*6 does not divide"):
        P.plan(cfg, 8, P.GIB)


def test_subprocess_env_pins_the_device_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
    env = P._subprocess_env(16)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=16"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_NUM_CPU_DEVICES"] == "16"


# ----------------------------------------------------------------------------- the run's programs


def test_plan_calls_no_private_attribute():
    """The planner reaches the run's programs only through public methods (Trainer.lower_step,
    Sampler.abstract / lower_*): no `obj._name` access, no private name imported from the
    package, so it cannot build programs of its own from the trainer's or sampler's insides."""
    import ast

    tree = ast.parse(Path(P.__file__).read_text())
    private = [f"line {n.lineno}: .{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")]
    imported = [f"line {n.lineno}: {a.name} from {n.module}" for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("gradual_jax")
                for a in n.names if a.name.startswith("_")]
    assert not private and not imported, private + imported


_HLO = """HloModule m, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%inner (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %v = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%v), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ar)
}

%step (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%q), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %g = f32[4,8]{1,0} get-tuple-element(%w), index=1
  %h = bf16[2,8]{1,0} convert(%g)
  %ag = bf16[4,8]{1,0} all-gather(%h), channel_id=2, dimensions={0}
  %st = (bf16[2,8]{1,0}, bf16[2,8]{1,0}) collective-permute-start(%h), channel_id=3
  %dn = bf16[2,8]{1,0} collective-permute-done(%st)
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %g)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[4,8]{1,0} copy(%a)
  %two = (f32[4,8]{1,0}, f32[4,8]{1,0}) all-reduce(%a, /*index=1*/%b), channel_id=4, to_apply=%add
  %loop = (s32[], f32[4,8]{1,0}) while(%t0), condition=%c, body=%step
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_count_loop_bodies_per_iteration():
    """A loop of unknown trip count (the decode loop) counts once, a loop inside it by its known
    trip count; operands' bytes come from their definitions; `-done` halves are not counted."""
    found = {(c.op, c.operands): (c.bytes, c.count) for c in P.collectives(_HLO)}
    assert found == {
        ("all-reduce", ("f32[4,8]",)): (128, 3),                    # inner loop, 3 trips
        ("all-gather", ("bf16[2,8]",)): (32, 1),                    # the step's own
        ("collective-permute", ("bf16[2,8]",)): (32, 1),            # -start, once
        ("all-reduce", ("f32[4,8]", "f32[4,8]")): (256, 1),         # outside the loop, once
    }
    assert P.collective_bytes(P.collectives(_HLO)) == 128 * 3 + 32 + 32 + 256


def _tiny_model_config():
    from gradual_jax.models.transformer import ModelConfig

    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, eos_token_id=2, dtype="bfloat16")


def test_abstract_sampler_lowers_what_a_sampler_of_real_weights_does():
    """`Sampler.abstract` holds the layout the sampler gives real weights (inference rules,
    compute dtype), so its lowered prefill, first, admit, decode and score programs are the real
    sampler's."""
    import jax
    from flax import nnx

    from gradual_jax.models.transformer import Transformer, abstract_model
    from gradual_jax.sampling import Sampler
    from gradual_jax.sharding import make_mesh

    mc, mesh = _tiny_model_config(), make_mesh(4, 1, 2)
    real = Sampler(Transformer(mc, rngs=nnx.Rngs(0)), None, mesh=mesh)
    abstract = Sampler.abstract(abstract_model(mc), mesh=mesh)
    for x, y in zip(jax.tree.leaves(real.state), jax.tree.leaves(abstract.state), strict=True):
        assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding)
    texts = []
    for s in (real, abstract):
        s.prepare(batch_size=16, longest_prefix=40, longest_tail=10, new_tokens=4, longest_scored=14,
                  longest_continuation=4, k_cap=5)
        lowered = s.lower_programs()
        texts.append([lowered[name].as_text() for name in ("prefill", "first", "admit", "decode", "score", "branch")])
        carry = lowered["decode"].compile().out_info[0]
        assert carry.cache.mask.shape == (16, 32 + 4)  # 16 slots: tail + new tokens
        assert carry.prefix_mask.shape == (16, 64)  # each slot's prefix, read from the store
    assert texts[0] == texts[1]


def test_lower_step_is_the_step_setup_builds():
    """`Trainer.lower_step` on an abstract model lowers the step a real trainer runs: the same
    program as on real weights, before and after `setup` placed them on the mesh."""
    import jax
    from flax import nnx

    from gradual_jax.models.transformer import Transformer, abstract_model
    from gradual_jax.sharding import make_mesh
    from gradual_jax.training.trainer import Trainer

    mc, mesh = _tiny_model_config(), make_mesh(1, 8, 1)
    train = load_config(None, ["train.batch_size=8", "train.max_seq_len=16"]).train
    abstract = Trainer(abstract_model(mc), mesh=mesh, progress=False).lower_step(train)
    real_trainer = Trainer(Transformer(mc, rngs=nnx.Rngs(0)), mesh=mesh, progress=False)
    real = real_trainer.lower_step(train)
    assert abstract.as_text() == real.as_text()
    assert [a.shape for a in jax.tree.leaves(abstract.args_info[0][3])] == [(1, 8, 16)] * 5
    real_trainer.setup(train, total_steps=1)  # the lowering left the model as it was
    assert real_trainer.lower_step(train).as_text() == real.as_text()


def test_qwen2_7b_decode_moves_activations_not_weights():
    """Qwen2-7B on 8 devices, 64 decode slots (the paper config's sampled probe batch): one
    decode step's collectives move under 1% of the bf16 weights, and none has an operand shaped
    like a parameter (global or per-device shard), i.e. no weight is gathered."""
    import jax

    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.sampling import Sampler
    from gradual_jax.sharding import run_meshes

    cfg = load_config(ROOT / "configs" / "paper" / "qwen2_7b_full.yaml")
    result = P.plan(cfg, 8, 80 * P.GIB, train=False, layers=2)
    assert result["compiled_layers"] == [2, 4] and result["probe_shapes"]["slots"] == 64
    mc = P.resolve_model_config(cfg)
    weights = 2 * mc.num_params()
    assert 0 < result["decode_collective_bytes"] < 0.01 * weights, result["decode_collectives"]
    _, mesh = run_meshes(cfg.mesh, cfg.probe.mesh, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                         train_batch_sizes={}, probe_batch_size=cfg.probe.batch_size, devices=jax.devices()[:8])
    assert dict(mesh.shape) == result["probe_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    state = Sampler.abstract(abstract_model(mc.replace(num_layers=2)), mesh=mesh).state
    params = {tuple(x.shape) for x in jax.tree.leaves(state)}
    params |= {tuple(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state)}
    moved = {tuple(int(d) for d in s.split("[")[1].rstrip("]").split(",") if d)
             for s in result["decode_collective_shapes"]}
    assert not moved & params, sorted(moved & params)


def test_planned_train_state_matches_a_smoke_run(smoke_world, smoke_model):
    """Params + optimizer state on the fullest device: the planner's count for the smoke config
    on fsdp=8 against what one real training step on that mesh measures (TrainResult)."""
    import dataclasses

    import jax
    from flax import nnx

    from gradual_jax.sharding import run_meshes
    from gradual_jax.training.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["mesh.fsdp=8", "mesh.data=1"])
    planned = P.plan(cfg, 8, P.GIB, sampler=False)["per_device_bytes"]
    model, tokenizer = smoke_model
    work = nnx.clone(model)  # training donates buffers: the session's model keeps its own
    nnx.update(work, jax.tree.map(lambda x: x.copy(), nnx.state(work)))
    train_mesh, _ = run_meshes(cfg.mesh, cfg.probe.mesh, num_heads=work.config.num_heads,
                               num_kv_heads=work.config.num_kv_heads,
                               train_batch_sizes={"train.batch_size": cfg.train.batch_size},
                               probe_batch_size=cfg.probe.batch_size)
    train = dataclasses.replace(cfg.train, epochs=1, selection="convergence")
    examples = list(smoke_world.examples["train"])[:train.batch_size]
    result = Trainer(work, tokenizer, mesh=train_mesh, progress=False).fit(examples, [], train)
    assert result.steps == 1
    assert result.state_bytes_per_device == pytest.approx(planned["params"] + planned["optimizer"], rel=0.10)


# ----------------------------------------------------------------------------- slow: real sizes


def _run(args: list[str], devices: int) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=P._subprocess_env(devices),
                          capture_output=True, text=True, timeout=1800)
    first = proc.stdout.partition("\n")[0]
    assert first.startswith("{"), proc.stdout + proc.stderr[-3000:]
    return proc.returncode, json.loads(first), proc.stdout


@pytest.mark.slow
def test_launch_plan_flag_on_the_tiny_config(tmp_path):
    """`python -m gradual_jax.launch CONFIG --plan --devices N` end to end, in a fresh process."""
    cfg, _ = _tiny_config(tmp_path)
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(P.to_dict(cfg)))
    rc, result, out = _run(["-m", "gradual_jax.launch", str(path), "--plan", "--devices", "4",
                            "--hbm-gib", "0.0001"], devices=4)
    assert rc == P.EXIT_DOES_NOT_FIT and result["devices"] == 4 and "DOES NOT FIT" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_plan_on_16_devices(path):
    """The paper configs fit a TPU v5e-16 slice (16 GiB a chip; layers extrapolated from 2 and 4).

    Params per device must equal the hand count: fp32 params / 16 (every matrix has an embed or
    vocab dim that 16 divides; only q/k/v biases stay replicated, < 0.1%).
    """
    rc, result, _ = _run(["-m", "gradual_jax.plan", str(path), "--devices", "16", "--hbm-gib", "16",
                          "--layers", "2"], devices=16)
    assert rc == P.EXIT_FITS and result["fits"], result["per_device_bytes"]
    assert result["batch"]["scan_layers"] and result["batch"]["remat"]
    assert result["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert result["compiled_layers"] == [2, 4]
    mc = P.resolve_model_config(load_config(path))
    tensor = {"qwen2": 4, "llama": 8}[mc.model_type]  # the largest dividing 16 and the KV heads
    assert result["probe_mesh"] == {"data": 16 // tensor, "fsdp": 1, "tensor": tensor}
    assert result["fits_train"] and result["fits_probe"]
    assert result["decode_collective_bytes"] < 0.01 * 2 * mc.num_params()
    base = mc.num_params()
    pd = result["per_device_bytes"]
    if result["trainable_params"] == result["params"]:  # full fine-tuning
        assert result["params"] == base
        assert pd["params"] == pytest.approx(4 * base / 16, rel=1e-3)
        assert pd["optimizer"] == pytest.approx(2 * pd["params"], rel=1e-3)
    else:  # LoRA: the base split 16 ways; adapters' rank dim is never sharded, some replicate
        adapters = result["params"] - base
        assert adapters == result["trainable_params"] > 0
        assert 4 * base / 16 <= pd["params"] <= 4 * base / 16 * 1.001 + 4 * adapters
        assert pd["optimizer"] <= 2 * 4 * adapters + 64
    assert result["model_flops_per_step"] == pytest.approx(6 * result["params"] * 128 * 128)
    assert math.isfinite(result["flops_per_step"])
    if os.environ.get("GRADUAL_JAX_PLAN_LOG"):
        with open(os.environ["GRADUAL_JAX_PLAN_LOG"], "a") as f:
            f.write(json.dumps(result) + "\n")
