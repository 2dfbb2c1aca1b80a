"""Ahead-of-time fit planner: does a configuration fit its target's device memory?

`python -m gradual_jax.launch CONFIG --plan --devices N [--hbm-gib G]` builds the model and the
optimizer abstractly (`nnx.eval_shape`: no weights are read or allocated), then lowers and
compiles, for the configured mesh over N devices,

- the trainer's jitted step (full fine-tuning or LoRA as configured, AdamW, one optimizer step of
  `grad_accum` micro-batches of `batch_size` rows of `max_seq_len` tokens), and
- the sampler's prefill (a probe batch of `probe.batch_size` prompts) and one decode chunk,

and reads per-device memory from XLA's `memory_analysis()` of each compiled program. It prints
one JSON line (devices, mesh, per_device_bytes, flops_per_step, hbm_bytes, fits, ...) and then a
readable table. Exit status: 0 when every program fits, 3 when one does not.

Devices are simulated: N host CPU devices (`jax_num_cpu_devices`, the config form of
`XLA_FLAGS=--xla_force_host_platform_device_count=N`). Both are read only when JAX creates its
backends, so `plan_main` sets them itself when no JAX computation has run yet in this process,
and otherwise re-runs itself in a fresh subprocess (`python -m gradual_jax.plan`) with them in
the environment.

What the numbers are: XLA:CPU's buffer assignment for the SPMD-partitioned per-device program,
so the same partitioning decisions (which tensors are sharded, gathered or replicated) as a TPU
or GPU compile, but another backend's fusion and scheduling. Params and optimizer bytes are exact
(from the sharded shapes). Activations lean high, in two known ways: XLA:CPU computes bfloat16
matmuls in float32 (their temporaries are twice the size), and it has no rematerialization
under memory pressure, which TPU and GPU compilers can fall back on. A "does not fit" by a wide
margin is real; one within ~25% is worth checking on the hardware.

Deep models compile slowly on CPU (a 7B train step: 1-3.5 minutes on 8-16 simulated devices on
two shared cores).
`plan(..., layers=L)` (`--layers L` for `python -m gradual_jax.plan`) compiles L and 2L layers
and extends every byte count linearly to the full depth. Against full compiles of all four paper
configs on 16 devices (`--layers 2`): train step and decode equal to the byte, prefill within
0.1% (over); on a small 8-layer model, prefill within 2% (over).

The model's architecture comes from `model.source`: a local HF directory's `config.json`, a GGUF
file's metadata, the synthetic world's config, or a built-in table of the paper models
(`KNOWN_ARCHITECTURES`, their exact HF `config.json` values) so no download is needed; a leading
`hf:` is accepted (`hf:Qwen/Qwen2-7B`). Other Hub ids fetch only `config.json`.

Target memory: `hbm_gib` (the `--hbm-gib` flag), else a `target` name looked up in `TARGETS_GIB`
(from the argument or a `plan.target` config field when the config has one), else
`DEFAULT_TARGET` (the smallest listed device, so an unstated target errs toward "does not fit").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradual_jax.config import ConfigError, RunConfig, load_config, model_runtime, to_dict

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 3
GIB = 1 << 30

# Device memory per chip/GPU as sold (GiB). What a program may use is somewhat less: runtimes
# reserve a little, and JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise (the SLURM script sets it).
TARGETS_GIB: dict[str, float] = {
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32,
    "a100-40g": 40, "a100-80g": 80, "h100": 80, "h200": 141, "b200": 180,
}
DEFAULT_TARGET = "tpu-v5e"
DEFAULT_DEVICES = 8
# Estimated tokens of one few-shot probe prompt per exemplar (EntityQuestions `Q: ...\nA: ...`
# pairs are 15-25 tokens with Llama-3's and Qwen2's tokenizers); prompts are bucketed to powers of
# two, so the estimate only has to land in the right bucket.
PROBE_TOKENS_PER_PAIR = 24
# The programs are compiled, never run: LLVM's optimisation passes change neither the buffer
# assignment nor the cost analysis (checked on a small model), and skipping them halves compile
# time on CPU.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

# Exact `config.json` values of the paper models (only the keys config_from_hf reads matter).
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2-7B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 131072, "max_window_layers": 28,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
    "meta-llama/Meta-Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_act": "silu", "max_position_embeddings": 8192, "attention_bias": False,
        "mlp_bias": False, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
}
_ALIASES = {"meta-llama/Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
            "qwen2-7b": "Qwen/Qwen2-7B", "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
            "llama3-8b": "meta-llama/Meta-Llama-3-8B"}


# ----------------------------------------------------------------------------- architecture


def known_architecture(name: str) -> dict[str, Any] | None:
    """The built-in `config.json` dict for `name` (case-insensitive, `hf:` prefix allowed)."""
    name = name.removeprefix("hf:")
    lowered = {k.lower(): k for k in KNOWN_ARCHITECTURES}
    lowered.update({k.lower(): v for k, v in _ALIASES.items()})
    key = lowered.get(name.lower())
    return None if key is None else dict(KNOWN_ARCHITECTURES[key])


def resolve_model_config(cfg: RunConfig) -> Any:
    """The `ModelConfig` named by `cfg.model.source`, with the config's dtypes, dropout and remat.

    Order: "world"; a local HF directory; a `.gguf` file; `KNOWN_ARCHITECTURES`; the Hub's
    `config.json`. Raises ConfigError naming `model.source` when none applies.
    """
    from gradual_jax.models.hf import config_from_hf, read_hf_config

    source = cfg.model.source
    name = source.removeprefix("hf:")
    path = Path(name).expanduser()
    if source == "world":
        mc = _world_model_config(cfg.world)
    elif path.is_dir():
        mc = read_hf_config(path)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist", "model.source")
        from gradual_jax.models.gguf import gguf_config

        mc = gguf_config(path)
    elif (known := known_architecture(name)) is not None:
        mc = config_from_hf(known, source=f"built-in {name}")
    else:
        mc = config_from_hf(_hub_config(name), source=f"{name}/config.json")
    return mc.replace(param_dtype=cfg.model.dtype, dtype=cfg.model.compute_dtype,
                      **model_runtime(cfg.train))


def _hub_config(repo_id: str) -> dict[str, Any]:
    try:
        import huggingface_hub

        return json.loads(Path(huggingface_hub.hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as err:  # offline, unknown repo: both mean "cannot plan this source"
        known = ", ".join(KNOWN_ARCHITECTURES)
        raise ConfigError(
            f"{repo_id!r} is not a local checkpoint, not a built-in architecture ({known}) and "
            f"its config.json could not be fetched ({type(err).__name__})", "model.source") from None


def _world_model_config(world: Mapping[str, Any]) -> Any:
    from gradual_jax.models.transformer import ModelConfig
    from gradual_jax.world.config import world_config_from_dict

    w = world_config_from_dict(world)
    # The world's tokenizer has at most vocab_size tokens, padded to a multiple of 64.
    return ModelConfig(vocab_size=-(-w.vocab_size // 64) * 64, hidden_size=w.d_model,
                       intermediate_size=w.d_mlp, num_layers=w.n_layers, num_heads=w.n_heads,
                       tie_word_embeddings=True, max_position_embeddings=max(512, w.seq_len))


# ----------------------------------------------------------------------------- target memory


def resolve_hbm(cfg: RunConfig, hbm_gib: float | None = None,
                target: str | None = None) -> tuple[int, str]:
    """(device memory in bytes, where that figure came from).

    `hbm_gib` wins, then `target` (argument, else a `plan.target` / `plan.hbm_gib` config field
    when the config has a `plan` section), then `DEFAULT_TARGET`.
    """
    section = getattr(cfg, "plan", None)
    if hbm_gib is None and target is None and section is not None:
        hbm_gib = getattr(section, "hbm_gib", None)
        target = getattr(section, "target", None)
    if hbm_gib is not None:
        if not hbm_gib > 0:
            raise ConfigError(f"--hbm-gib must be > 0, got {hbm_gib}")
        return int(hbm_gib * GIB), f"{hbm_gib:g} GiB as given"
    name = (target or DEFAULT_TARGET).lower()
    if name not in TARGETS_GIB:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(TARGETS_GIB)}", "plan.target")
    how = "target" if target else "default target (pass --hbm-gib to change)"
    return int(TARGETS_GIB[name] * GIB), f"{how} {name}: {TARGETS_GIB[name]:g} GiB"


def default_devices(cfg: RunConfig) -> int:
    """A `plan.devices` config field when the config has one, else the mesh's device count when
    no axis is -1 (fill), else DEFAULT_DEVICES."""
    devices = getattr(getattr(cfg, "plan", None), "devices", None)
    if devices:
        return int(devices)
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return DEFAULT_DEVICES if -1 in sizes else math.prod(sizes)


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """One compiled program's per-device memory (bytes) and cost."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    flops: float | None
    compile_seconds: float

    @property
    def total(self) -> int:
        """Peak live bytes: inputs + outputs not aliased to (donated) inputs + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    def as_dict(self) -> dict[str, Any]:
        return {"argument": self.argument, "output": self.output, "alias": self.alias,
                "temp": self.temp, "total": self.total, "flops": self.flops,
                "compile_seconds": round(self.compile_seconds, 2)}


def _compile(name: str, lowered_fn: Any) -> tuple[Program, Any]:
    t0 = time.perf_counter()
    compiled = lowered_fn().compile(COMPILER_OPTIONS)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None
    prog = Program(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                   int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), flops, seconds)
    return prog, compiled


def _sharded(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s carrying shardings (its shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _abstract_training(mc: Any, train: Any, mesh: Any, seed: int = 0) -> dict[str, Any]:
    """The trainer's jitted step function and its abstract, sharded arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from gradual_jax.models.transformer import Transformer
    from gradual_jax.training.lora import apply_lora, trainable_filter
    from gradual_jax.sharding import BATCH_AXES, state_shardings
    from gradual_jax.training.trainer import Trainer, make_optimizer, make_schedule

    rank = int(train.lora.rank)

    def build() -> Transformer:
        model = Transformer(mc, rngs=nnx.Rngs(seed))
        if rank > 0:
            apply_lora(model, rank, float(train.lora.alpha), list(train.lora.targets), seed=seed)
        return model

    model = nnx.eval_shape(build)
    wrt = trainable_filter(model)
    gd_model, trainable, frozen = nnx.split(model, wrt, ...)
    total_steps = 1000  # only shapes the schedule, which holds no arrays
    tx = make_optimizer(train, total_steps)
    opt = nnx.eval_shape(lambda t, f: nnx.Optimizer(nnx.merge(gd_model, t, f), tx, wrt=wrt),
                         trainable, frozen)
    gd_opt, opt_state = nnx.split(opt)

    # The trainer's own step function, so the plan compiles exactly what training runs. Its
    # setup() places concrete arrays, so the pieces the step closes over are set here instead.
    trainer = Trainer(model, None, mesh=mesh, seed=seed, progress=False)
    trainer.cfg, trainer.wrt = train, wrt
    trainer.schedule = make_schedule(train, total_steps)
    trainer._gd_model, trainer._gd_opt = gd_model, gd_opt
    step_fn = trainer._make_step_fn()

    trainable_sh = state_shardings(trainable, mesh)
    frozen_sh = state_shardings(frozen, mesh)
    opt_sh = state_shardings(opt_state, mesh)
    rows, micro, t = int(train.batch_size), int(train.grad_accum), int(train.max_seq_len)
    batch_sh = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
    dtypes = {"input_ids": jnp.int32, "labels": jnp.int32, "loss_mask": jnp.float32,
              "segment_ids": jnp.int32, "positions": jnp.int32}
    batch = {k: jax.ShapeDtypeStruct((micro, rows, t), d, sharding=batch_sh) for k, d in dtypes.items()}
    args = (_sharded(trainable, trainable_sh), _sharded(opt_state, opt_sh),
            _sharded(frozen, frozen_sh), batch)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(trainable_sh, opt_sh, replicated))
    n_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
    n_params = n_trainable + sum(math.prod(x.shape) for x in jax.tree.leaves(frozen))
    def lower() -> Any:
        with jax.set_mesh(mesh):  # as Trainer.step runs it: activations pinned to the batch axes
            return jitted.lower(*args)

    return {"lower": lower, "params": (args[0], args[2]), "optimizer": args[1],
            "n_params": n_params, "n_trainable": n_trainable, "tokens": rows * micro * t}


def _abstract_sampler(mc: Any, probe: Any, mesh: Any, prompt_tokens: int) -> dict[str, Any]:
    """The sampler's prefill ("start") and decode functions with abstract, sharded arguments.

    Prefill: `probe.batch_size` greedy prompts of `prompt_tokens` (bucketed) without a shared
    prefix, each in its own packed row (the most prefill work one probe batch does). Decode: the
    same rows sampled with the probe's top-k. Params are sharded by their logical axes, as the
    trainer leaves them.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from gradual_jax import sampling as S
    from gradual_jax.models.transformer import Transformer
    from gradual_jax.sharding import batch_sharding, data_parallel_size, state_shardings

    model = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))
    sampler = S.Sampler(model, None)
    sampler.mesh = mesh
    state = nnx.state(model)
    sampler.set_state(_sharded(state, state_shardings(state, mesh)))
    dp = data_parallel_size(mesh)
    b = S._round_up(S.next_pow2(int(probe.batch_size)), dp)
    width = S.next_pow2(prompt_tokens, S.MIN_BUCKET)
    replicated = NamedSharding(mesh, PartitionSpec())

    def rows_of(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))

    pack = {k: rows_of((b, width), jnp.int32) for k in ("ids", "pos", "seg")}
    pack.update({k: rows_of((b,), jnp.int32) for k in ("row", "col", "length")})
    rows = S._Rows(temperature=rows_of((b,), jnp.float32), top_k=rows_of((b,), jnp.int32),
                   top_p=rows_of((b,), jnp.float32))
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    keys = rows_of((b,), key_dtype)
    padding = rows_of((b,), jnp.bool_)
    table = jax.ShapeDtypeStruct((mc.vocab_size,), np.bool_, sharding=replicated)
    new_tokens = int(probe.max_new_tokens)
    static = dict(span=width, fanout=1, new_tokens=new_tokens, policy=S._Policy())
    start_args = (sampler.state, None, pack, rows, keys, padding, table)
    start = jax.jit(sampler._start_fn, static_argnames=tuple(static))
    decode = jax.jit(sampler._decode_fn, static_argnames=("policy",), donate_argnums=(1,))
    sampled = S._Policy(sampled=True, k_cap=int(probe.top_k), top_p="off")
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    def lower_decode(start_compiled: Any) -> Any:
        carry = jax.eval_shape(lambda *a: sampler._start_fn(*a, **static), *start_args)
        carry = _sharded(carry, start_compiled.output_shardings)
        return decode.lower(sampler.state, carry, table, limit, policy=sampled)

    return {"lower_start": lambda: start.lower(*start_args, **static), "lower_decode": lower_decode,
            "rows": b, "prompt_tokens": width, "cache_slots": width + new_tokens}


# ----------------------------------------------------------------------------- the plan


def _compile_programs(mc: Any, cfg: RunConfig, mesh: Any, sampler: bool,
                      prompt_tokens: int) -> tuple[dict[str, Program], dict[str, Any], dict[str, Any]]:
    """Compile the train step (and the sampler's prefill and decode) for architecture `mc`."""
    train = _abstract_training(mc, cfg.train, mesh)
    programs = {"train": _compile("train", train["lower"])[0]}
    probe_info: dict[str, Any] = {}
    if sampler:
        samp = _abstract_sampler(mc, cfg.probe, mesh, prompt_tokens)
        programs["prefill"], start = _compile("prefill", samp["lower_start"])
        programs["decode"], _ = _compile("decode", lambda: samp["lower_decode"](start))
        probe_info = {k: samp[k] for k in ("rows", "prompt_tokens", "cache_slots")}
    return programs, train, probe_info


def _extrapolate(a: Program, b: Program, la: int, lb: int, layers: int) -> Program:
    """`a` (compiled with `la` layers) and `b` (`lb` layers) extended linearly to `layers`."""
    def line(x: float | None, y: float | None) -> Any:
        if x is None or y is None:
            return None
        return x + (y - x) * (layers - la) / (lb - la)

    return Program(a.name, *(int(round(line(getattr(a, f), getattr(b, f))))
                             for f in ("argument", "output", "alias", "temp")),
                   line(a.flops, b.flops), a.compile_seconds + b.compile_seconds)


def plan(cfg: RunConfig, devices: int, hbm_bytes: int, *, sampler: bool = True,
         prompt_tokens: int | None = None, layers: int | None = None) -> dict[str, Any]:
    """Compile the configuration's programs for its mesh on `devices` devices; the fit report.

    Uses the first `devices` of `jax.devices()` (the caller provides enough; see `plan_main`).
    `fits` is true when every program's per-device total is at most `hbm_bytes`.
    `per_device_bytes` is the train step's; `programs` holds every program's argument, output,
    alias, temp and total bytes. `prompt_tokens` overrides the probe prompt length estimate.

    `layers`: compile models of `layers` and `2 * layers` layers instead of the full depth and
    extend every byte count and the flops linearly to the full depth (decoder layers are
    identical, so memory is affine in depth; `tests/test_plan.py` checks the extrapolation
    against a full compile). Params and optimizer bytes always come from the full-depth shapes.
    Raises ConfigError for a mesh or batch the devices cannot hold.
    """
    import jax

    from gradual_jax.sharding import check_batch_divisible, make_mesh

    available = jax.devices()
    if len(available) < devices:
        raise ConfigError(f"plan needs {devices} devices, this process has {len(available)}")
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=available[:devices])
        check_batch_divisible(cfg.train.batch_size, mesh, "train.batch_size")
    except ValueError as err:
        raise ConfigError(str(err), "mesh") from None
    mc = resolve_model_config(cfg)
    tokens = prompt_tokens or (cfg.probe.k_shot + 1) * PROBE_TOKENS_PER_PAIR
    depth = mc.num_layers
    if layers is not None and layers < 1:
        raise ConfigError(f"layers must be >= 1, got {layers}")
    if layers is None or 2 * layers >= depth:
        programs, train, probe_info = _compile_programs(mc, cfg, mesh, sampler, tokens)
        compiled_layers: list[int] = [depth]
    else:
        low, _, probe_info = _compile_programs(mc.replace(num_layers=layers), cfg, mesh, sampler, tokens)
        high, _, _ = _compile_programs(mc.replace(num_layers=2 * layers), cfg, mesh, sampler, tokens)
        programs = {k: _extrapolate(low[k], high[k], layers, 2 * layers, depth) for k in low}
        train = _abstract_training(mc, cfg.train, mesh)  # full-depth shapes, nothing compiled
        compiled_layers = [layers, 2 * layers]
    step = programs["train"]
    params = shard_bytes(train["params"])
    optimizer = shard_bytes(train["optimizer"])
    per_device = {"params": params, "optimizer": optimizer,
                  "activations": max(step.total - params - optimizer, 0), "total": step.total}
    model_flops = 6.0 * train["n_params"] * train["tokens"]
    if mc.scan_layers:
        # XLA's cost analysis counts a while loop's body once, whatever its trip count.
        flops, flops_source = model_flops, "6 * params * tokens (scanned layers)"
    elif step.flops is not None:
        flops, flops_source = step.flops * devices, "cost_analysis (per device x devices)"
    else:
        flops, flops_source = model_flops, "6 * params * tokens"
    peak = max(p.total for p in programs.values())
    return {
        "devices": devices,
        "mesh": dict(mesh.shape),
        "model": cfg.model.source,
        "params": train["n_params"],
        "trainable_params": train["n_trainable"],
        "mode": f"lora r={cfg.train.lora.rank}" if cfg.train.lora.rank else "full",
        "batch": {"rows": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                  "seq_len": cfg.train.max_seq_len, "remat": cfg.train.remat,
                  "scan_layers": cfg.train.scan_layers},
        "dtypes": {"params": cfg.model.dtype, "compute": cfg.model.compute_dtype},
        "per_device_bytes": per_device,
        "programs": {name: p.as_dict() for name, p in programs.items()},
        "compiled_layers": compiled_layers,
        "probe_shapes": probe_info,
        "flops_per_step": flops,
        "flops_source": flops_source,
        "model_flops_per_step": model_flops,
        "hbm_bytes": int(hbm_bytes),
        "peak_bytes": peak,
        "fits": peak <= hbm_bytes,
        "backend": f"{available[0].platform} (simulated devices)",
    }


def _gib(n: float) -> str:
    if abs(n) < GIB:
        return f"{n / (1 << 20):8.1f} MiB"
    return f"{n / GIB:8.2f} GiB"


def format_table(result: Mapping[str, Any]) -> str:
    """The plan as a few aligned lines for people."""
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    pd = result["per_device_bytes"]
    lines = [
        f"model {result['model']}: {result['params'] / 1e9:.3f}B params, "
        f"{result['trainable_params'] / 1e9:.4f}B trainable ({result['mode']})",
        f"devices {result['devices']}  mesh {mesh}  batch {result['batch']['rows']}x"
        f"{result['batch']['grad_accum']} of {result['batch']['seq_len']} tokens",
        "per device (train step):",
        f"  params      {_gib(pd['params'])}",
        f"  optimizer   {_gib(pd['optimizer'])}",
        f"  activations {_gib(pd['activations'])}   (grads, activations, batch, temporaries)",
        f"  total       {_gib(pd['total'])}",
        "programs:     argument     output       temp        total",
    ]
    for name, p in result["programs"].items():
        lines.append(f"  {name:8s}{_gib(p['argument'])}{_gib(p['output'] - p['alias'])}"
                     f"{_gib(p['temp'])}{_gib(p['total'])}   ({p['compile_seconds']:.0f} s compile)")
    if len(result.get("compiled_layers", [])) == 2:
        a, b = result["compiled_layers"]
        lines.append(f"  (compiled with {a} and {b} layers, extended linearly to the full depth)")
    lines.append(f"flops per step {result['flops_per_step']:.3e} ({result['flops_source']}); "
                 f"6 * params * tokens = {result['model_flops_per_step']:.3e}")
    lines.append(f"target {_gib(result['hbm_bytes']).strip()} per device ({result.get('hbm_source', '')})")
    peak, hbm = result["peak_bytes"], result["hbm_bytes"]
    if result["fits"]:
        lines.append(f"FITS: peak {_gib(peak).strip()}, {_gib(hbm - peak).strip()} to spare "
                     f"({100 * peak / hbm:.0f}% of the target)")
    else:
        lines.append(f"DOES NOT FIT: peak {_gib(peak).strip()} per device exceeds the target's "
                     f"{_gib(hbm).strip()} by {_gib(peak - hbm).strip()} ({100 * peak / hbm:.0f}%)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points


def _can_simulate_here(devices: int) -> bool:
    """Make this process hold `devices` CPU devices if JAX has not started; whether it does."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", devices)
        return True
    return jax.devices()[0].platform == "cpu" and jax.device_count() >= devices


def _subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def plan_main(cfg: RunConfig, devices: int | None = None, hbm_gib: float | None = None, *,
              target: str | None = None, layers: int | None = None) -> int:
    """Print the plan (one JSON line, then a table); EXIT_FITS or EXIT_DOES_NOT_FIT.

    `devices` defaults to the mesh's size when it has no -1 axis, else DEFAULT_DEVICES; see
    `resolve_hbm` for the target memory and `plan` for `layers`. Runs in this process when JAX
    has no backend yet (it is then pinned to `devices` CPU devices) or already has enough CPU
    devices; otherwise in a subprocess.
    """
    devices = devices or default_devices(cfg)
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    hbm_bytes, hbm_source = resolve_hbm(cfg, hbm_gib, target)
    if not _can_simulate_here(devices):
        return _plan_in_subprocess(cfg, devices, hbm_bytes, hbm_source, layers)
    return _report(cfg, devices, hbm_bytes, hbm_source, layers)


def _report(cfg: RunConfig, devices: int, hbm_bytes: int, hbm_source: str,
            layers: int | None = None) -> int:
    result = plan(cfg, devices, hbm_bytes, layers=layers)
    result["hbm_source"] = hbm_source
    print(json.dumps(result, sort_keys=True), flush=True)
    print(format_table(result), flush=True)
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT


def _plan_in_subprocess(cfg: RunConfig, devices: int, hbm_bytes: int, hbm_source: str,
                        layers: int | None) -> int:
    import yaml

    with tempfile.TemporaryDirectory(prefix="gradual_jax_plan_") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        cmd = [sys.executable, "-m", "gradual_jax.plan", str(path), "--devices", str(devices),
               "--hbm-bytes", str(hbm_bytes), "--hbm-source", hbm_source]
        if layers is not None:
            cmd += ["--layers", str(layers)]
        return subprocess.run(cmd, env=_subprocess_env(devices), check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gradual_jax.plan CONFIG [key=value ...] [--devices N] [--hbm-gib G]`."""
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--hbm-gib", type=float, default=None)
    parser.add_argument("--target", default=None, help=f"one of {', '.join(TARGETS_GIB)}")
    parser.add_argument("--layers", type=int, default=None,
                        help="compile L and 2L layers and extend linearly (faster for deep models)")
    parser.add_argument("--hbm-bytes", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hbm-source", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    from gradual_jax.errors import USER_ERRORS

    try:
        cfg = load_config(ns.config, ns.overrides)
        if ns.hbm_bytes is None:
            return plan_main(cfg, ns.devices, ns.hbm_gib, target=ns.target, layers=ns.layers)
        devices = ns.devices or default_devices(cfg)
        if not _can_simulate_here(devices):
            raise ConfigError(f"cannot simulate {devices} devices in this process")
        source = ns.hbm_source or f"{ns.hbm_bytes / GIB:g} GiB"
        return _report(cfg, devices, ns.hbm_bytes, source, ns.layers)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
