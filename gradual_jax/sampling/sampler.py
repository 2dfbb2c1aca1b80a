"""The `Sampler`: generation and scoring for one model and tokenizer.

It plans a call's batches on the host (`packing`), runs the compiled programs (`kernels`,
compiled once per shape through `compile_cache`), decodes to the end (`decoding`) and cuts the
results into `Generation`s and `TokenScores` (`records`). See the package docstring for how a
call runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradual_jax.models.transformer import KVCache, Transformer
from gradual_jax.sampling import compile_cache
from gradual_jax.sampling.decoding import DecodeLoop
from gradual_jax.sampling.kernels import (
    Decoding,
    Policy,
    Rows,
    decode_program,
    gather_program,
    prefix_program,
    score_program,
    start_program,
)
from gradual_jax.sampling.lowering import Lowering
from gradual_jax.sampling.methods import Greedy, Method, Sample, check_prompts, check_sampling, fanout
from gradual_jax.sampling.packing import MIN_BUCKET, Batch, Pack, batch_rows, next_pow2, pack, plan
from gradual_jax.sampling.placement import MeshPlacement
from gradual_jax.sampling.records import Generation, SamplerStats, TokenScores

DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK = 2


@dataclasses.dataclass
class _StartCall:
    """One batch's start program call: arguments, statics, which decode rows are padding, and
    the packed prefill tokens."""

    args: tuple
    static: dict
    padding: np.ndarray
    tokens: int


class Sampler(Lowering, DecodeLoop, MeshPlacement):
    """Generation and scoring for one model and tokenizer, with compiled functions cached by
    shape. Call `refresh(model)` after the model's weights change."""

    def __init__(self, model: Transformer, tokenizer: Any, *, mesh: Any = None,
                 chunk: int = DEFAULT_CHUNK, eos_ids: Sequence[int] | None = None,
                 compact: bool = True):
        """`chunk`: decode steps between host checks (stop strings across tokens, compaction).
        `eos_ids`: tokens that end a generation (default: the config's and tokenizer's EOS).
        `compact`: drop finished rows from the decode batch (off only to measure its effect)."""
        self.graphdef, state = nnx.split(model)
        self._graph_id = compile_cache.intern(self.graphdef)
        self.config = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chunk = chunk
        self.compact = compact
        self.set_state(self._place(state))
        self.stats = SamplerStats()
        self._vocab_text: list[str] | None = None
        self._stop_tables: dict[tuple[str, ...], np.ndarray] = {}
        self._eos = self._eos_ids() if eos_ids is None else tuple(int(i) for i in eos_ids)

    # ---- setup

    def refresh(self, model: Transformer, state: Any = None) -> None:
        """Use `model`'s current weights (same architecture) from now on; `state`: its
        `nnx.state`, when the caller has it already."""
        self.set_state(self._place(nnx.state(model) if state is None else state))

    def fits(self, state: Any) -> bool:
        """Whether a model's `nnx.state` has the variables this sampler was built for (adding or
        merging LoRA adapters in place changes them, and then a new sampler is needed)."""
        return jax.tree.structure(state) == self._state_treedef

    def set_state(self, state: Any) -> None:
        """Use this NNX state (already placed where the sampler runs) as the weights."""
        # Compiled functions take the state as its flat leaves: flattening NNX Variables on
        # every call was a tenth of the probe's host time.
        self.state = state
        self._state_leaves, self._state_treedef = jax.tree.flatten(state)
        self._state_key = compile_cache.intern(
            (self._state_treedef, tuple(compile_cache.spec(x) for x in self._state_leaves)))

    def reset_stats(self) -> None:
        """Zero `stats`."""
        self.stats = SamplerStats()

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        return tuple(sorted(i for i in ids if 0 <= i < self.config.vocab_size))

    # ---- tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of a whole prompt, with the tokenizer's default special tokens."""
        return list(self.tokenizer(text)["input_ids"])

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stop_table(self, stop: Sequence[str]) -> np.ndarray:
        """`[V]` bool: EOS and every token whose text contains one of `stop`."""
        key = tuple(stop)
        if key not in self._stop_tables:
            table = np.zeros(self.config.vocab_size, bool)
            table[list(self._eos)] = True
            if stop:
                if self._vocab_text is None:
                    n = min(len(self.tokenizer), self.config.vocab_size)
                    self._vocab_text = self.tokenizer.batch_decode([[i] for i in range(n)])
                for i, text in enumerate(self._vocab_text):
                    if any(s in text for s in stop):
                        table[i] = True
            self._stop_tables[key] = table
        return self._stop_tables[key]

    # ---- compilation

    def _compile(self, name: str, fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> Any:
        """`fn` compiled ahead of time for these argument shapes, as a callable of `args`; the
        compile time goes to `stats`. Executables are shared by every sampler of the same graph
        and mesh. When `args[0]` is the sampler's state, the executable takes its flat leaves."""
        with_state = bool(args) and args[0] is self.state
        rest = args[1:] if with_state else args
        key = (name, self._graph_id, self.mesh, tuple(sorted(static.items())),
               self._state_key if with_state else None, jax.tree.structure(rest),
               tuple(compile_cache.spec(x) for x in jax.tree.leaves(rest)))
        compiled, seconds = compile_cache.cached(key, lambda: self._lower(fn, args, static, donate))
        if seconds is not None:
            self.stats.compile_seconds += seconds
            self.stats.compiles += 1
        if with_state:
            leaves = self._state_leaves
            return lambda *a: compiled(leaves, *a[1:])
        return compiled

    def _lower(self, fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> jax.stages.Lowered:
        """`fn` lowered for `args` as `_compile` compiles it: when `args[0]` is the sampler's
        state, as a function of its flat leaves."""
        if bool(args) and args[0] is self.state:
            fn, args = compile_cache.over_leaves(fn, self._state_treedef), (self._state_leaves, *args[1:])
        return compile_cache.lower(fn, args, static, donate)

    # ---- device programs, bound to this model's graph (see `kernels`)

    def _prefix_fn(self, state: Any, *args: Any) -> KVCache:
        return prefix_program(self.graphdef, state, *args)

    def _start_fn(self, state: Any, *args: Any, **static: Any) -> Decoding:
        return start_program(self.graphdef, self._constrain, state, *args, **static)

    def _decode_fn(self, state: Any, *args: Any, **static: Any) -> Decoding:
        return decode_program(self.graphdef, state, *args, **static)

    _gather_fn = staticmethod(gather_program)

    def _score_fn(self, state: Any, *args: Any, **static: Any) -> tuple[jax.Array, jax.Array]:
        return score_program(self.graphdef, state, *args, **static)

    # ---- host orchestration: shared pieces

    def _validate_lengths(self, prompt_ids: list[list[int]], extra: Sequence[int]) -> None:
        limit = self.config.max_position_embeddings
        for i, (ids, more) in enumerate(zip(prompt_ids, extra)):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization: nothing to continue")
            if len(ids) + more > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with {more} more it exceeds the model's "
                    f"context of {limit} tokens (max_position_embeddings)")

    def _prefix_cache(self, prefix: tuple[int, ...], memo: dict) -> KVCache | None:
        """The prefix's cache, computed once while consecutive batches share it."""
        if not prefix:
            return None
        if prefix not in memo:
            packed, args = self._prefix_args(prefix)
            memo.clear()
            memo[prefix] = self._compile("prefix", self._prefix_fn, args, {})(*args)
            self.stats.prefill_tokens += packed.tokens
            self.stats.prefixes += 1
        return memo[prefix]

    def _prefix_args(self, prefix: Sequence[int]) -> tuple[Pack, tuple]:
        """The prefix program's arguments: the prefix packed into one replicated row."""
        packed = pack([list(prefix)], offset=0, count=1, row_multiple=1)
        return packed, (self.state, *(self._put_replicated(a) for a in (packed.ids, packed.pos, packed.seg)))

    def _pack_args(self, seqs: list[list[int]], offset: int, count: int) -> tuple[Pack, dict]:
        packed = pack(seqs, offset=offset, count=count, row_multiple=self._dp())
        arrays = {"ids": packed.ids, "pos": packed.pos, "seg": packed.seg, "row": packed.row,
                  "col": packed.col, "length": packed.length}
        return packed, {k: self._put(v) for k, v in arrays.items()}

    def _batch_rows(self, count: int, per_batch: int) -> int:
        """Prompts a batch is padded to (see `packing.batch_rows`)."""
        return batch_rows(count, per_batch, self._dp())

    # ---- generation

    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int,
                       methods: Method | Sequence[Method] = Greedy(), n: int = 1,
                       stop: Sequence[str] = (), seed: int = 0,
                       batch_size: int = DEFAULT_BATCH_SIZE, prefix: str = "",
                       share_prefix: bool | None = None,
                       prompt_keys: Sequence[int] | None = None) -> list[list[Generation]]:
        """For each prompt, one `Generation` per sample, in order.

        `methods`: one method used for `n` samples, or a list of methods, one sample each (e.g.
        `[Greedy()] + [Sample(0.5, 40)] * 16`). `prefix` is prepended to every prompt (the
        few-shot part common to all; see the package docstring for how sharing tokenizes).
        `share_prefix`: None shares a common token prefix of >= MIN_SHARED_PREFIX tokens, True
        any, False none. `prompt_keys`: integers seeding each prompt's samples (default: its
        index), so a subset of prompts can be re-run on the same random stream.
        `batch_size`: most rows (prompts x samples) decoded together. Bad arguments raise
        ValueError before anything is compiled.
        """
        prompts = check_prompts(prompts)
        fan = fanout(methods, n)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt_keys is not None and len(prompt_keys) != len(prompts):
            raise ValueError(f"prompt_keys has {len(prompt_keys)} entries for {len(prompts)} prompts")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        prompt_ids = [self.encode(prefix + p) for p in prompts]
        self._validate_lengths(prompt_ids, [max_new_tokens] * len(prompts))
        keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
        table = self._put_replicated(self.stop_table(stop))
        out: list[list[Generation]] = [[] for _ in prompts]
        memo: dict = {}
        per_batch = max(1, batch_size // len(fan))
        for batch in plan(prompt_ids, per_batch, share_prefix):
            gens = self._run_batch(batch, prompt_ids, keys, fan, max_new_tokens, stop, table, seed,
                                   memo, per_batch)
            for i, g in zip(batch.items, gens):
                out[i] = g
        return out

    def _rows(self, fan: list[Method], prompts: int) -> tuple[Rows, Policy]:
        """Per-row settings for `prompts` x `fan` rows, and the batch's static policy."""
        settings = [m if isinstance(m, Sample) else Sample(0.0) for m in fan]
        sampled = [s for s in settings if s.temperature > 0]
        k_cap = max((s.top_k for s in sampled), default=0)
        if not sampled or all(s.top_p >= 1 for s in sampled):
            top_p = "off"
        elif all(s.top_k > 0 for s in sampled):
            top_p = "topk"
        else:
            top_p = "full"
        tile = lambda v, dt: self._put(np.tile(np.asarray(v, dt), prompts))  # noqa: E731
        rows = Rows(temperature=tile([s.temperature for s in settings], np.float32),
                    # greedy rows: a top-1 distribution, so their sampling log-prob is 0
                    top_k=tile([s.top_k if s.temperature > 0 else 1 for s in settings], np.int32),
                    top_p=tile([s.top_p for s in settings], np.float32))
        return rows, Policy(bool(sampled), k_cap, top_p)

    def _row_keys(self, seed: int, prompt_keys: list[int], fan: int) -> jax.Array:
        base = jax.random.key(seed)
        p = jnp.repeat(jnp.asarray(prompt_keys, jnp.uint32), fan)
        j = jnp.tile(jnp.arange(fan, dtype=jnp.uint32), len(prompt_keys))
        per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, p)
        keys = jax.vmap(jax.random.fold_in)(per_prompt, j)
        return keys if self.mesh is None else jax.device_put(keys, self._rows_sharding(1))

    def _run_batch(self, batch: Batch, prompt_ids: list[list[int]], prompt_keys: list[int],
                   fan: list[Method], new_tokens: int, stop: tuple[str, ...], table: jax.Array,
                   seed: int, memo: dict, per_batch: int) -> list[list[Generation]]:
        m = len(fan)
        prefix = self._prefix_cache(batch.prefix, memo)
        start = self._start_args(batch, prefix, prompt_keys, fan, new_tokens, table, seed, per_batch)
        d = self._compile("start", self._start_fn, start.args, start.static)(*start.args)
        self.stats.prefill_tokens += start.tokens
        self.stats.logit_rows += len(start.padding) // m
        results = self._decode_loop(d, np.where(start.padding, -1, np.arange(len(start.padding))),
                                    new_tokens, stop, table, start.static["policy"])
        out = []
        for p, item in enumerate(batch.items):
            prompt = prompt_ids[item]
            head = self._decode(prompt)
            out.append([self._finish(head, prompt, *results[p * m + j], stop) for j in range(m)])
        return out

    def _start_args(self, batch: Batch, prefix: KVCache | None, prompt_keys: list[int],
                    fan: list[Method], new_tokens: int, table: jax.Array, seed: int,
                    per_batch: int) -> _StartCall:
        """The start program's arguments and statics for one batch (padded to `_batch_rows`
        prompts, each repeated once per method)."""
        count, m = len(batch.items), len(fan)
        b = self._batch_rows(count, per_batch)
        packed, arrays = self._pack_args(batch.suffixes, len(batch.prefix), b)
        rows, policy = self._rows(fan, b)
        keys = [prompt_keys[i] for i in batch.items] + [0] * (b - count)
        padding = np.repeat(np.arange(b) >= count, m)
        args = (self.state, prefix, arrays, rows, self._row_keys(seed, keys, m), self._put(padding), table)
        span = next_pow2(max(len(s) for s in batch.suffixes), MIN_BUCKET)
        static = dict(span=span, fanout=m, new_tokens=new_tokens, policy=policy)
        return _StartCall(args, static, padding, packed.tokens)

    # ---- scoring

    def score(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]], *,
              temperature: float = 1.0, top_k: int = 0,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[TokenScores]:
        """Teacher-forced log-probs of each continuation after its prompt (see `TokenScores`).

        A string continuation is tokenized on its own without special tokens (as the sampler
        appends generated tokens to a prompt); pass `Generation.token_ids` to score exactly
        what was generated. Temperature 0 scores 0 for the argmax token and -inf elsewhere.
        """
        prompts = check_prompts(prompts)
        if isinstance(continuations, str) or len(continuations) != len(prompts):
            raise ValueError(f"need one continuation per prompt ({len(prompts)})")
        check_sampling(temperature, top_k, 1.0)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompt_ids = [self.encode(p) for p in prompts]
        conts = [self._encode_plain(c) if isinstance(c, str) else [int(t) for t in c]
                 for c in continuations]
        self._validate_lengths(prompt_ids, [len(c) for c in conts])
        out: list[TokenScores] = [TokenScores((), (), ())] * len(prompts)
        memo: dict = {}
        for batch in plan(prompt_ids, batch_size, None):
            scored = self._score_batch(batch, conts, temperature, top_k, memo, batch_size)
            for i, s in zip(batch.items, scored):
                out[i] = s
        return out

    def _score_batch(self, batch: Batch, conts: list[list[int]], temperature: float, top_k: int,
                     memo: dict, batch_size: int) -> list[TokenScores]:
        count = len(batch.items)
        b = self._batch_rows(count, batch_size)
        prefix = self._prefix_cache(batch.prefix, memo)
        rows = [conts[i] for i in batch.items]
        seqs = [s + c for s, c in zip(batch.suffixes, rows)]
        packed, arrays = self._pack_args(seqs, len(batch.prefix), b)
        self.stats.prefill_tokens += packed.tokens
        width = next_pow2(max(1, max(len(c) for c in rows)), MIN_BUCKET)
        cont = np.zeros((b, width), np.int32)
        for i, c in enumerate(rows):
            cont[i, :len(c)] = c
        prompt_len = np.array([len(s) for s in batch.suffixes] + [1] * (b - count), np.int32)
        args = (self.state, prefix, arrays, self._put(prompt_len), self._put(cont))
        static = dict(temperature=float(temperature), top_k=int(top_k))
        raw, lp = self._compile("score", self._score_fn, args, static)(*args)
        self.stats.logit_rows += b * width
        raw, lp = np.asarray(raw), np.asarray(lp)
        return [TokenScores(tuple(c), tuple(float(x) for x in raw[i, :len(c)]),
                            tuple(float(x) for x in lp[i, :len(c)])) for i, c in enumerate(rows)]
