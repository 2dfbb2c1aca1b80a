"""Ahead-of-time fit planner: does a configuration fit its target's device memory?

`python -m gradual_jax.launch CONFIG --plan --devices N [--hbm-gib G]` builds the model
abstractly (`nnx.eval_shape`: no weights are read or allocated) and, on the training and probe
meshes the launcher builds over N devices (`sharding.run_meshes`), lowers and compiles the very
programs the run executes, through their public lowering methods:

- the train step `Trainer.fit` runs (`Trainer.lower_step`: full fine-tuning or LoRA as
  configured, AdamW, one optimizer step of `grad_accum` micro-batches of `batch_size` rows of
  `max_seq_len` tokens, the loss on every position), and
- the probe's sampler programs on the probe mesh (`Sampler.abstract`, `Sampler.prepare`,
  `Sampler.lower_programs`: weights sharded by the inference rules in the compute dtype), in the
  shapes the probe engine fixes: prefixes into the prefix store, question tails into
  `probe.batch_size` decode slots, the decode loop, and scoring,

and reads per-device memory from XLA's `memory_analysis()` of each compiled program. Training
fits when the train step does; probing fits when every probe program does beside what stays
resident meanwhile (the model's training shards; during decode, the prefix store). It prints one
JSON line (devices, mesh, probe_mesh, per_device_bytes, probe_per_device_bytes,
decode_collective_bytes, fits_train, fits_probe, fits, ...) and then a readable table. Exit
status: 0 when both fit, 3 when one does not.

`decode_collective_bytes` is what one decode step moves per device: the operand bytes of
every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute (and their
`-start` forms; `-done` halves not again) in the compiled per-device HLO, each counted once
per iteration of the decode loop (loops inside it by their known trip counts), plus the few ops
outside the loop once (they run once per chunk, so the figure errs high). See `collectives`.

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
under memory pressure, which TPU and GPU compilers can fall back on. In the probe's programs the
float32 copies are of the bf16 weights themselves and live together (in decode, hoisted out of
the loop): their temporaries hold about twice the inference weights, which TPUs and GPUs do not
make. A "does not fit" by a wide margin is real; one within ~25% is worth checking on the
hardware.

Deep models compile slowly on CPU (a 7B train step: 1-3.5 minutes on 8-16 simulated devices on
two shared cores).
`plan(..., layers=L)` (`--layers L` for `python -m gradual_jax.plan`) compiles L and 2L layers
and extends every count (collective bytes too) linearly to the full depth. Against full
compiles (`--layers 2`): the train step of all four paper configs on 16 devices equal to the
byte; Qwen2-7B's probe programs on 8 devices: decode, KV cache and collective bytes equal to
the byte, prefill within 0.7% (over). On tiny models temporaries stray further (tests allow 15%).

The model's architecture comes from `model.source`: a local HF directory's `config.json`, a GGUF
file's metadata, the synthetic world's (its built `config.json` when cached), or a built-in table of the paper models
(`KNOWN_ARCHITECTURES`, their exact HF `config.json` values) so no download is needed; a leading
`hf:` is accepted (`hf:Qwen/Qwen2-7B`). Other Hub ids fetch only `config.json`.

Target memory: `hbm_gib` (the `--hbm-gib` flag), else a `target` name looked up in `TARGETS_GIB`
(from the argument or a `plan.target` config field when the config has one), else
`DEFAULT_TARGET` (the smallest listed device, so an unstated target errs toward "does not fit").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
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
    """The synthetic world's model: the built world's own `config.json` when it is in the cache,
    else the largest it can be (its tokenizer has at most `vocab_size` tokens, padded to a
    multiple of 64; the built one usually has far fewer)."""
    from gradual_jax.models.hf import read_hf_config
    from gradual_jax.models.transformer import ModelConfig
    from gradual_jax.world import world_cache_root
    from gradual_jax.world.config import world_config_from_dict

    w = world_config_from_dict(world)
    built = world_cache_root() / w.fingerprint() / "model"
    if (built / "config.json").is_file():
        return read_hf_config(built)
    return ModelConfig(vocab_size=-(-w.vocab_size // 64) * 64, hidden_size=w.d_model,
                       intermediate_size=w.d_mlp, num_layers=w.n_layers, num_heads=w.n_heads,
                       head_dim=w.d_model // w.n_heads, tie_word_embeddings=True,
                       max_position_embeddings=max(512, w.seq_len), rms_norm_eps=1e-6)


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


def _compile(name: str, lower: Callable[[], Any]) -> tuple[Program, Any]:
    """Lower (`lower()`) and compile one program; its Program record and the executable."""
    t0 = time.perf_counter()
    compiled = lower().compile(COMPILER_OPTIONS)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None
    prog = Program(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                   int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), flops, seconds)
    return prog, compiled


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s carrying shardings (its shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def argument_bytes(compiled: Any, *positions: int) -> int:
    """Per-device bytes of a compiled program's positional arguments at `positions`."""
    import jax

    shapes, shardings = compiled.args_info[0], compiled.input_shardings[0]
    return sum(shard_bytes(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        shapes[i], shardings[i])) for i in positions)


def _elements(tree: Any) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- collectives

COLLECTIVES: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALL = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_LIST = re.compile(r"\b(?:called_computations|branch_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its op (a `-start` form is named by its
    collective), operand shapes, operand bytes per device for one execution, and executions
    per iteration of the program's outermost loop."""

    op: str
    operands: tuple[str, ...]
    bytes: int
    count: int


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 1)
               for dtype, dims in _SHAPE.findall(shape) if dtype != "token")


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text) - 1


def _parse_instruction(line: str) -> tuple[str, str, str, list[str], str] | None:
    """(name, result shape, op, operand tokens, attributes) of one HLO instruction line."""
    m = _INSTRUCTION.match(line)
    if m is None:
        return None
    name, rest = m.groups()
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op_match = re.match(r"([\w\-]+)\(", rest)
    if op_match is None:
        return None
    end = _closing(rest, op_match.end() - 1)
    inside, attributes = re.sub(r"/\*.*?\*/", "", rest[op_match.end():end]), rest[end + 1:]
    depth, token, operands = 0, "", []
    for ch in inside:  # split on top-level commas (tuple shapes hold commas too)
        depth += {"(": 1, ")": -1, "[": 1, "]": -1, "{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            operands.append(token.strip())
            token = ""
        else:
            token += ch
    if token.strip():
        operands.append(token.strip())
    return name, shape, op_match.group(1), operands, attributes


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled (SPMD-partitioned, per-device) HLO module's text, with
    their executions per run of the entry computation when every while loop without a known
    trip count runs once: a loop's body (and condition) counts its `known_trip_count` times
    per enclosing iteration, an unknown count (the decode loop's, set by `limit`) once, so a
    decode chunk's program reads as one decode step (plus what runs outside the loop, once).
    Operand shapes come from the instruction that defines each operand; `-done` halves of
    async pairs are not counted again."""
    computations: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            if head and head[0] != "HloModule":
                current = head[-1].lstrip("%")
                computations[current] = []
                if head[0] == "ENTRY":
                    entry = current
            continue
        if current is not None and (parsed := _parse_instruction(line)) is not None:
            computations[current].append(parsed)
    counts: dict[str, int] = collections.Counter()

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for _, _, op, _, attributes in computations.get(name, ()):
            trip = _TRIP_COUNT.search(attributes)
            callees = [(kind, callee) for kind, callee in _CALL.findall(attributes)]
            for group in _CALL_LIST.findall(attributes):
                callees += [("calls", c.strip().lstrip("%")) for c in group.split(",") if c.strip()]
            for kind, callee in callees:
                looped = op == "while" and kind in ("body", "condition") and trip is not None
                visit(callee, times * (int(trip.group(1)) if looped else 1))

    if entry is not None:
        visit(entry, 1)
    found = []
    for name, instructions in computations.items():
        if not counts.get(name):
            continue
        shapes = {n: s for n, s, _, _, _ in instructions}
        for _, shape, op, operands, _ in instructions:
            base = op.removesuffix("-start")
            if base not in COLLECTIVES:
                continue
            operand_shapes = tuple(_operand_shape(token, shapes) for token in operands)
            found.append(Collective(base, operand_shapes, sum(map(_shape_bytes, operand_shapes)),
                                    counts[name]))
    return found


def _operand_shape(token: str, shapes: Mapping[str, str]) -> str:
    """An operand's shape: printed with it (`f32[8]{0} %x`), else its defining instruction's."""
    if _SHAPE.search(token.split("%")[0]):
        shape = token.rsplit(" ", 1)[0]
    else:
        shape = shapes.get(token.split()[-1].lstrip("%"), "")
    return re.sub(r"\{[^{}]*\}", "", shape).strip()  # layouts off: "bf16[32,1,3584]"


def collective_bytes(found: Sequence[Collective]) -> int:
    """Operand bytes moved per device: each collective's bytes times its executions."""
    return sum(c.bytes * c.count for c in found)


# ----------------------------------------------------------------------------- the run's programs


def _abstract_model(mc: Any, train: Any = None, seed: int = 0) -> Any:
    """The model with no weights (`nnx.eval_shape`), with the LoRA adapters `train` asks for."""
    from flax import nnx

    from gradual_jax.models.transformer import Transformer
    from gradual_jax.training.lora import apply_lora

    rank = 0 if train is None else int(train.lora.rank)

    def build() -> Transformer:
        model = Transformer(mc, rngs=nnx.Rngs(seed))
        if rank > 0:
            apply_lora(model, rank, float(train.lora.alpha), list(train.lora.targets), seed=seed)
        return model

    return nnx.eval_shape(build)


def _train_measures(mc: Any, train: Any, mesh: Any) -> dict[str, Any]:
    """Compile the train step `Trainer.fit` runs (`Trainer.lower_step`) for architecture `mc`."""
    from gradual_jax.training.trainer import Trainer

    trainer = Trainer(_abstract_model(mc, train), mesh=mesh, progress=False)
    program, compiled = _compile("train", lambda: trainer.lower_step(train))
    args = compiled.args_info[0]  # (trainable, optimizer state, frozen, batch)
    return {"programs": {"train": program}, "params": argument_bytes(compiled, 0, 2),
            "optimizer": argument_bytes(compiled, 1),
            "n_params": _elements((args[0], args[2])), "n_trainable": _elements(args[0])}


@dataclasses.dataclass(frozen=True)
class ProbeShapes:
    """The probe batches the plan compiles: a shared exemplar prefix of `prefix_tokens` (0:
    none), question tails of `prompt_tokens`, `max_new_tokens` generated."""

    prefix_tokens: int
    prompt_tokens: int
    max_new_tokens: int


def probe_shapes(probe: Any, prompt_tokens: int | None = None) -> ProbeShapes:
    """The probe's estimated prompt shapes: `k_shot` exemplar pairs shared as a prefix (when
    long enough for the sampler to share), one pair's worth of tokens per question tail
    (`prompt_tokens` overrides the tail)."""
    from gradual_jax.sampling import MIN_SHARED_PREFIX

    prefix = int(probe.k_shot) * PROBE_TOKENS_PER_PAIR
    return ProbeShapes(prefix if prefix >= MIN_SHARED_PREFIX else 0,
                       int(prompt_tokens or PROBE_TOKENS_PER_PAIR), int(probe.max_new_tokens))


def _probe_measures(mc: Any, probe: Any, mesh: Any, shapes: ProbeShapes) -> dict[str, Any]:
    """Compile the six programs the probe runs on its mesh (`Sampler.lower_programs`), in the
    shapes its engine fixes for these prompt sizes (`Sampler.prepare`, as `JaxEngine.warm_up`
    calls it, with as many stored prefixes as the engine's store budget allows): prefill
    (prefixes into the store), first (tails prefilled, first tokens drawn), admit (rows into the
    decode slots), decode, score and branch (gold answers scored against an insert's tails)."""
    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.runtime import probe_store_prefixes
    from gradual_jax.sampling import Sampler

    # the run's way of running the layers (`probe.sampler_layers`; auto: the default, unrolled on
    # every backend today, see `sampling.SCAN_LAYERS_BY_BACKEND`)
    sampler = Sampler.abstract(abstract_model(mc), mesh=mesh, scan_layers=probe.scan_layers)
    answer = PROBE_TOKENS_PER_PAIR // 4
    sampler.prepare(batch_size=int(probe.batch_size), longest_prefix=max(1, shapes.prefix_tokens),
                    longest_tail=shapes.prompt_tokens, new_tokens=shapes.max_new_tokens,
                    longest_scored=shapes.prompt_tokens + answer, longest_continuation=answer,
                    k_cap=int(probe.top_k) if probe.n_samples else 0)
    sampler.prepare(prefixes=probe_store_prefixes(sampler))
    programs: dict[str, Program] = {}
    compiled: dict[str, Any] = {}
    for name, lowered in sampler.lower_programs().items():
        programs[name], compiled[name] = _compile(name, lambda lowered=lowered: lowered)
    decode = compiled["decode"]
    found = collectives(decode.as_text())
    by_op = {op: {"count": sum(c.count for c in found if c.op == op),
                  "bytes": collective_bytes([c for c in found if c.op == op])}
             for op in sorted({c.op for c in found})}
    carry, store = decode.out_info[0], compiled["prefill"].out_info
    return {
        "programs": programs,
        "inference_weights": shard_bytes(sampler.state),
        "kv_cache": shard_bytes(carry.cache),
        "prefix_store": shard_bytes(store),
        "decode_collective_bytes": collective_bytes(found),
        "decode_collectives": by_op,
        "decode_collective_shapes": sorted({s for c in found for s in c.operands}),
        "probe_shapes": {**dataclasses.asdict(sampler.shapes), "cache_len": sampler.shapes.cache_len,
                         **dataclasses.asdict(shapes)},
    }


# ----------------------------------------------------------------------------- the plan


def _compile_programs(mc: Any, cfg: RunConfig, meshes: tuple[Any, Any], train: bool, sampler: bool,
                      shapes: ProbeShapes) -> dict[str, Any]:
    """Compile the run's programs for architecture `mc`: the train step on the training mesh,
    the probe's on the probe mesh. Byte counts and the programs, by name."""
    measures: dict[str, Any] = {"programs": {}}
    for wanted, measure in ((train, lambda: _train_measures(mc, cfg.train, meshes[0])),
                            (sampler, lambda: _probe_measures(mc, cfg.probe, meshes[1], shapes))):
        if wanted:
            found = measure()
            measures["programs"].update(found.pop("programs"))
            measures.update(found)
    return measures


def _line(x: float | None, y: float | None, la: int, lb: int, layers: int) -> Any:
    if x is None or y is None:
        return None
    return x + (y - x) * (layers - la) / (lb - la)


def _extrapolate(a: Program, b: Program, la: int, lb: int, layers: int) -> Program:
    """`a` (compiled with `la` layers) and `b` (`lb` layers) extended linearly to `layers`."""
    return Program(a.name, *(int(round(_line(getattr(a, f), getattr(b, f), la, lb, layers)))
                             for f in ("argument", "output", "alias", "temp")),
                   _line(a.flops, b.flops, la, lb, layers), a.compile_seconds + b.compile_seconds)


def _extrapolate_measures(a: dict[str, Any], b: dict[str, Any], la: int, lb: int,
                          layers: int) -> dict[str, Any]:
    """Every count of `a` and `b` (nested dicts of ints, Programs) extended linearly; other
    values (shapes, lists) from `a`, lists merged."""
    def one(x: Any, y: Any) -> Any:
        if isinstance(x, Program):
            return _extrapolate(x, y, la, lb, layers)
        if isinstance(x, dict):
            return {k: one(v, y.get(k, v)) for k, v in x.items()}
        if isinstance(x, int) and not isinstance(x, bool):
            return int(round(_line(x, y, la, lb, layers)))
        if isinstance(x, list):
            return sorted(set(x) | set(y))
        return x

    measures = one(a, b)
    measures["probe_shapes"] = a.get("probe_shapes")
    return measures


def _meshes(cfg: RunConfig, mc: Any, devices: Sequence[Any]) -> tuple[Any, Any]:
    """The training and probe meshes exactly as the launcher builds them (`run_meshes`)."""
    from gradual_jax.sharding import run_meshes

    return run_meshes(cfg.mesh, cfg.probe.mesh, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                      train_batch_sizes={"train.batch_size": int(cfg.train.batch_size)},
                      probe_batch_size=int(cfg.probe.batch_size), devices=devices)


def _resident_params(mc: Any, mesh: Any) -> int:
    """Per-device bytes of the model's weights as training leaves them on its mesh (what stays
    resident while the probe runs)."""
    import jax
    from flax import nnx

    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.sharding import state_shardings

    state = nnx.state(abstract_model(mc))
    return shard_bytes(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    state, state_shardings(state, mesh)))


def _probe_fit(measures: Mapping[str, Any], resident: int) -> dict[str, int]:
    """Per-device bytes while probing: the model's training shards stay resident beside each
    probe program; the prefix store outlives the prefill into every decode chunk."""
    programs, store = measures["programs"], measures["prefix_store"]
    # The store is an argument of prefill, first and score (counted in their totals); admit,
    # decode and branch (the decode slots, the tails' cache) run beside it.
    peak = max(programs[name].total + (store if name in ("admit", "decode", "branch") else 0)
               for name in ("prefill", "first", "admit", "decode", "score", "branch") if name in programs)
    parts = {"train_params": resident, "inference_weights": measures["inference_weights"],
             "kv_cache": measures["kv_cache"], "prefix_store": store}
    total = resident + peak
    return {**parts, "activations": max(total - sum(parts.values()), 0), "total": total}


def plan(cfg: RunConfig, devices: int, hbm_bytes: int, *, train: bool = True, sampler: bool = True,
         prompt_tokens: int | None = None, layers: int | None = None) -> dict[str, Any]:
    """Compile the run's programs for its meshes on `devices` devices; the fit report.

    Uses the first `devices` of `jax.devices()` (the caller provides enough; see `plan_main`)
    and the training and probe meshes the launcher builds there (`sharding.run_meshes`). The
    programs are the run's own: the train step from `Trainer.lower_step`, the probe's prefix,
    prefill and decode from `Sampler.lower_*` (`train` / `sampler` False leave either out).

    `fits_train`: the train step's per-device total is at most `hbm_bytes`. `fits_probe`: so is
    every probe program's beside the resident training shards of the weights (and, during
    decode, the prefix store). `fits`: both. `per_device_bytes` is the train step's,
    `probe_per_device_bytes` the probe's; `programs` holds every program's argument, output,
    alias, temp and total bytes. `decode_collective_bytes`: bytes per device that collectives
    move in one steady decode step (`collectives`). `prompt_tokens` overrides the question
    tail's length estimate.

    `layers`: compile models of `layers` and `2 * layers` layers instead of the full depth and
    extend every count linearly to the full depth (decoder layers are identical, so memory and
    traffic are affine in depth; `tests/test_plan.py` checks the extrapolation against a full
    compile). Raises ConfigError for a mesh or batch the devices cannot hold.
    """
    import jax

    from gradual_jax.sharding import axis_sizes

    available = jax.devices()
    if len(available) < devices:
        raise ConfigError(f"plan needs {devices} devices, this process has {len(available)}")
    mc = resolve_model_config(cfg)
    meshes = _meshes(cfg, mc, available[:devices])
    shapes = probe_shapes(cfg.probe, prompt_tokens)
    depth = mc.num_layers
    if layers is not None and layers < 1:
        raise ConfigError(f"layers must be >= 1, got {layers}")
    if layers is None or 2 * layers >= depth:
        measures = _compile_programs(mc, cfg, meshes, train, sampler, shapes)
        compiled_layers = [depth]
    else:
        low = _compile_programs(mc.replace(num_layers=layers), cfg, meshes, train, sampler, shapes)
        high = _compile_programs(mc.replace(num_layers=2 * layers), cfg, meshes, train, sampler, shapes)
        measures = _extrapolate_measures(low, high, layers, 2 * layers, depth)
        compiled_layers = [layers, 2 * layers]
    programs = measures["programs"]
    result: dict[str, Any] = {
        "devices": devices,
        "mesh": axis_sizes(meshes[0]),
        "probe_mesh": axis_sizes(meshes[1]),
        "model": cfg.model.source,
        "mode": f"lora r={cfg.train.lora.rank}" if cfg.train.lora.rank else "full",
        "batch": {"rows": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                  "seq_len": cfg.train.max_seq_len, "remat": cfg.train.remat,
                  "scan_layers": cfg.train.scan_layers},
        "dtypes": {"params": cfg.model.dtype, "compute": cfg.model.compute_dtype},
        "programs": {name: p.as_dict() for name, p in programs.items()},
        "compiled_layers": compiled_layers,
        "hbm_bytes": int(hbm_bytes),
        "backend": f"{available[0].platform} (simulated devices)",
    }
    fits = []
    if train:
        result.update(_train_report(measures, mc, cfg, devices))
        result["fits_train"] = result["per_device_bytes"]["total"] <= hbm_bytes
        fits.append(result["fits_train"])
    if sampler:
        probe = _probe_fit(measures, _resident_params(mc, meshes[0]))
        result.update({"probe_per_device_bytes": probe, "probe_shapes": measures["probe_shapes"],
                       "fits_probe": probe["total"] <= hbm_bytes,
                       **{k: measures[k] for k in ("decode_collective_bytes", "decode_collectives",
                                                   "decode_collective_shapes")}})
        fits.append(result["fits_probe"])
    peaks = [result[k]["total"] for k in ("per_device_bytes", "probe_per_device_bytes") if k in result]
    result["peak_bytes"] = max(peaks, default=0)
    result["fits"] = all(fits)
    return result


def _train_report(measures: Mapping[str, Any], mc: Any, cfg: RunConfig, devices: int) -> dict[str, Any]:
    step = measures["programs"]["train"]
    params, optimizer = measures["params"], measures["optimizer"]
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.max_seq_len
    model_flops = 6.0 * measures["n_params"] * tokens
    if mc.scan_layers:
        # XLA's cost analysis counts a while loop's body once, whatever its trip count.
        flops, flops_source = model_flops, "6 * params * tokens (scanned layers)"
    elif step.flops is not None:
        flops, flops_source = step.flops * devices, "cost_analysis (per device x devices)"
    else:
        flops, flops_source = model_flops, "6 * params * tokens"
    return {
        "params": measures["n_params"], "trainable_params": measures["n_trainable"],
        "per_device_bytes": {"params": params, "optimizer": optimizer,
                             "activations": max(step.total - params - optimizer, 0), "total": step.total},
        "flops_per_step": flops, "flops_source": flops_source, "model_flops_per_step": model_flops,
    }


def _gib(n: float) -> str:
    if abs(n) < GIB:
        return f"{n / (1 << 20):8.1f} MiB"
    return f"{n / GIB:8.2f} GiB"


def _axes(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def format_table(result: Mapping[str, Any]) -> str:
    """The plan as a few aligned lines for people."""
    lines = [f"devices {result['devices']}  train mesh {_axes(result['mesh'])}  "
             f"probe mesh {_axes(result['probe_mesh'])}"]
    if "per_device_bytes" in result:
        pd = result["per_device_bytes"]
        lines += [
            f"model {result['model']}: {result['params'] / 1e9:.3f}B params, "
            f"{result['trainable_params'] / 1e9:.4f}B trainable ({result['mode']}); batch "
            f"{result['batch']['rows']}x{result['batch']['grad_accum']} of {result['batch']['seq_len']} tokens",
            "per device, training:",
            f"  params      {_gib(pd['params'])}",
            f"  optimizer   {_gib(pd['optimizer'])}",
            f"  activations {_gib(pd['activations'])}   (grads, activations, batch, temporaries)",
            f"  total       {_gib(pd['total'])}",
        ]
    if "probe_per_device_bytes" in result:
        pp, ps = result["probe_per_device_bytes"], result["probe_shapes"]
        lines += [
            f"per device, probing ({ps['slots']} slots x {ps['cache_len']} cache positions, "
            f"{ps['store_rows']} stored prefixes of {ps['prefix_width']}):",
            f"  training shards   {_gib(pp['train_params'])}   (the model, resident on the train mesh)",
            f"  inference weights {_gib(pp['inference_weights'])}",
            f"  KV cache          {_gib(pp['kv_cache'])}",
            f"  prefix store      {_gib(pp['prefix_store'])}",
            f"  activations       {_gib(pp['activations'])}",
            f"  total             {_gib(pp['total'])}",
            f"  decode collectives {_gib(result['decode_collective_bytes']).strip()} per step per device",
        ]
    lines.append("programs:     argument     output       temp        total")
    for name, p in result["programs"].items():
        lines.append(f"  {name:16s}{_gib(p['argument'])}{_gib(p['output'] - p['alias'])}"
                     f"{_gib(p['temp'])}{_gib(p['total'])}   ({p['compile_seconds']:.0f} s compile)")
    if len(result.get("compiled_layers", [])) == 2:
        a, b = result["compiled_layers"]
        lines.append(f"  (compiled with {a} and {b} layers, extended linearly to the full depth)")
    if "flops_per_step" in result:
        lines.append(f"flops per step {result['flops_per_step']:.3e} ({result['flops_source']}); "
                     f"6 * params * tokens = {result['model_flops_per_step']:.3e}")
    lines.append(f"target {_gib(result['hbm_bytes']).strip()} per device ({result.get('hbm_source', '')})")
    hbm = result["hbm_bytes"]
    for phase, key, total in (("training", "fits_train", "per_device_bytes"),
                              ("probing", "fits_probe", "probe_per_device_bytes")):
        if key in result:
            peak = result[total]["total"]
            verdict = "fits" if result[key] else "does not fit"
            lines.append(f"  {phase}: {verdict}, {_gib(peak).strip()} ({100 * peak / hbm:.0f}% of the target)")
    peak = result["peak_bytes"]
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
