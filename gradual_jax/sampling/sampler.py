"""The `Sampler`: generation and scoring for one model and tokenizer, in fixed shapes.

A call splits its prompts into stored prefixes and tails (`packing.split_prompts`), makes sure
its engine's shapes (`packing.Shapes`) cover them, loads the prefixes it needs into the prefix
store, and runs its rows through the decode slots (`decoding`) or the scoring program. The
shapes only grow (up fixed ladders) and are the same for any number of prompts, so a probe
compiles six programs once (`warm_up` compiles them ahead of time).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gradual_jax.models.adapters import FoldedWeights, has_adapters
from gradual_jax.models.transformer import KVCache, Transformer, as_dtype
from gradual_jax.sampling import compile_cache
from gradual_jax.sampling.branch_scoring import BranchScoring
from gradual_jax.sampling.codec import codec_for
from gradual_jax.sampling.decoding import DecodeLoop, Job, Row
from gradual_jax.sampling.first_tokens import FirstTokens, exclusion_margin
from gradual_jax.sampling.kernels import (
    ADMIT_DONATES,
    DONATE_CARRY,
    Policy,
    PrefixStore,
    admit_program,
    decode_program,
    first_program,
    prefill_program,
)
from gradual_jax.sampling.lowering import Lowering
from gradual_jax.sampling.methods import Greedy, Method, Sample, check_prompts, fanout
from gradual_jax.sampling.packing import DEFAULT_BATCH_SIZE, Shapes, Split, shapes_for, split_prompts
from gradual_jax.sampling.placement import MeshPlacement
from gradual_jax.sampling.prefix_store import PrefixStoreRows
from gradual_jax.sampling.records import Generation, SamplerStats
from gradual_jax.sampling.scoring import Scoring
from gradual_jax.sampling.serial import serialized
from gradual_jax.sharding import run_program

DEFAULT_CHUNK = 4
TOP_P_MODES = ("off", "topk", "full")
log = logging.getLogger("gradual_jax")


# Whether a sampler scans its layers, by JAX backend. Measured on this project's CPU (BUILD_NOTES,
# "The sampler's layers as one scan"): unrolled layers decode faster there and the compile saving
# does not pay for it. No accelerator figures yet: `bench device` measures both ways.
SCAN_LAYERS_BY_BACKEND = {"cpu": False}


def default_scan_layers(backend: str | None = None) -> bool:
    """The sampler's `scan_layers` default on `backend` (default: JAX's)."""
    return SCAN_LAYERS_BY_BACKEND.get(backend or jax.default_backend(), False)


class Sampler(Lowering, DecodeLoop, PrefixStoreRows, Scoring, BranchScoring, MeshPlacement):
    """Generation and scoring for one model and tokenizer, with compiled functions cached by
    shape. Call `refresh(model)` after the model's weights change."""

    def __init__(self, model: Transformer, tokenizer: Any, *, mesh: Any = None,
                 chunk: int = DEFAULT_CHUNK, eos_ids: Sequence[int] | None = None,
                 scan_layers: bool | None = None):
        """`chunk`: decode steps between host checks when a stop string spans tokens.
        `eos_ids`: tokens that end a generation (default: the config's and tokenizer's EOS).
        `scan_layers`: run the layers as one `lax.scan` over layer-stacked keys and values
        (one layer to trace and compile) rather than one after another; None: the backend's
        default (`default_scan_layers`). The same numbers either way."""
        self.scan_layers = default_scan_layers() if scan_layers is None else bool(scan_layers)
        self.graphdef, state = nnx.split(model)
        self._source_graph = compile_cache.intern(self.graphdef)
        self._source_treedef = jax.tree.structure(state)
        # A model with LoRA adapters (a stage still training) is sampled with them folded into
        # its kernels: the base model's programs, without the adapters' matmuls.
        self._fold = FoldedWeights(self.graphdef, state) if has_adapters(model) else None
        if self._fold is not None:
            self.graphdef = self._fold.graphdef
        self._graph_id = compile_cache.intern(self.graphdef)
        self.config = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chunk = chunk
        self.shapes: Shapes | None = None
        self._policy = Policy()
        self._store: PrefixStore | None = None
        self._store_index: collections.OrderedDict[tuple[int, ...], int] = collections.OrderedDict()
        self._slots = None
        self._lock = threading.RLock()
        self._abstract = False
        self._prefix_ids: dict[str, list[int]] = {}
        self._codec = codec_for(tokenizer)
        # each prefilled prompt's best next-token logits, for scoring calls to skip what no
        # sample can start with (`first_tokens`); dropped whenever the weights change
        self._first_tokens = FirstTokens()
        self._exclusion_margin = exclusion_margin(np.dtype(as_dtype(self.config.dtype)))
        self.set_state(self._inference_weights(state))
        self.stats = SamplerStats()
        self._vocab_text: list[str] | None = None
        self._stop_tables: dict[tuple[str, ...], np.ndarray] = {}
        self._eos = self._eos_ids() if eos_ids is None else tuple(int(i) for i in eos_ids)

    # ---- setup

    @serialized
    def refresh(self, model: Transformer, state: Any = None) -> None:
        """Use `model`'s current weights (same architecture) from now on; `state`: its
        `nnx.state`, when the caller has it already."""
        state = nnx.state(model) if state is None else state
        self.set_state(self._inference_weights(state))

    def fits(self, state: Any) -> bool:
        """Whether a model's `nnx.state` has the variables this sampler was built for (adding or
        merging LoRA adapters in place changes them, and then a new sampler is needed)."""
        return jax.tree.structure(state) == self._source_treedef

    def _folded(self, state: Any) -> Any:
        """A model's state as this sampler runs it: LoRA adapters folded into the kernels."""
        return state if self._fold is None else self._fold(state)

    @serialized
    def set_state(self, state: Any) -> None:
        """Use this NNX state (already placed where the sampler runs) as the weights. Stored
        prefixes were computed with the old weights: they are dropped unless every array is
        the one already in use. Waits for a call in progress on another thread."""
        # Compiled functions take the state as its flat leaves: flattening NNX Variables on
        # every call was a tenth of the probe's host time.
        leaves, treedef = jax.tree.flatten(state)
        old = getattr(self, "_state_leaves", None)
        unchanged = (old is not None and treedef == self._state_treedef and len(leaves) == len(old)
                     and all(a is b for a, b in zip(leaves, old)))
        self.state = state
        self._state_leaves, self._state_treedef = leaves, treedef
        self._state_key = compile_cache.intern(
            (self._state_treedef, tuple(compile_cache.spec(x) for x in self._state_leaves)))
        if not unchanged:
            self._store_index.clear()
            self._first_tokens.clear()

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
        """Token ids of a whole prompt, with the tokenizer's default special tokens (kept, with
        every sampler of this tokenizer: a probe asks each prompt in several phases and again
        for every stage's model)."""
        return self._codec.encode(text)

    def _encode_plain(self, text: str) -> list[int]:
        return self._codec.encode(text, special=False)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._codec.decode(ids)

    def _declared(self, prefix: str) -> list[int] | None:
        if not prefix:
            return None
        if prefix not in self._prefix_ids:
            self._prefix_ids[prefix] = self.encode(prefix)
        return self._prefix_ids[prefix]

    def stop_table(self, stop: Sequence[str]) -> np.ndarray:
        """`[V]` bool: EOS and every token whose text contains one of `stop`."""
        key = tuple(stop)
        if key not in self._stop_tables:
            table = np.zeros(self.config.vocab_size, bool)
            table[list(self._eos)] = True
            if stop:
                if self._vocab_text is None:
                    n = min(len(self.tokenizer), self.config.vocab_size)
                    ids = [[i] for i in range(n)]
                    # the Rust tokenizer's own batch decode: transformers' wrapper type-checks
                    # every element of the nested list first (a second for a 49k vocabulary)
                    backend = getattr(self.tokenizer, "backend_tokenizer", None)
                    self._vocab_text = (backend.decode_batch(ids, skip_special_tokens=False)
                                        if backend is not None else self.tokenizer.batch_decode(ids))
                for i, text in enumerate(self._vocab_text):
                    if any(s in text for s in stop):
                        table[i] = True
            self._stop_tables[key] = table
        return self._stop_tables[key]

    # ---- shapes

    def prepare(self, *, batch_size: int = DEFAULT_BATCH_SIZE, longest_prefix: int = 1,
                longest_tail: int = 1, new_tokens: int = 1, longest_scored: int = 0,
                longest_continuation: int = 0, prefixes: int = 1, k_cap: int = 64,
                top_p: str = "off") -> Shapes:
        """Grow the engine's shapes to cover work of these sizes (token counts of prompts as the
        sampler splits them; `prefixes`: distinct prefixes worth keeping stored at once) and
        return them. The first call fixes the slot count (`batch_size` rows decoded together)."""
        slots = self.shapes.slots if self.shapes is not None else batch_size
        need = shapes_for(slots=slots, longest_prefix=longest_prefix, longest_tail=longest_tail,
                          new_tokens=new_tokens, longest_scored=longest_scored,
                          longest_continuation=longest_continuation, prefixes=prefixes,
                          k_cap=k_cap, vocab=self.config.vocab_size,
                          flops_per_token=self.config.layer_flops_per_token(), multiple=self._dp())
        return self.cover(need, top_p=top_p)

    @serialized
    def cover(self, need: Shapes, *, top_p: str = "off") -> Shapes:
        """Grow the engine's shapes to cover `need` (shapes with the same row counts: another
        sampler's of the same model, slots and mesh, such as a run's shared set) and return them."""
        if self.shapes is None or not self.shapes.covers(need):
            grown = need if self.shapes is None else self.shapes.union(need)
            if self.shapes is not None:
                log.info("sampler shapes grow: %s -> %s (new compiles)", self.shapes, grown)
            self.shapes = grown
            self._store, self._slots = None, None
            self._store_index.clear()
        mode = max(self._policy.top_p, top_p, key=TOP_P_MODES.index)
        self._policy = Policy(self.shapes.k_cap, mode)
        return self.shapes

    def prepare_for(self, prompts: Sequence[str], *, prefix: str | Sequence[str] = "",
                    max_new_tokens: int = 1, continuations: Sequence[str] = (),
                    batch_size: int = DEFAULT_BATCH_SIZE, prefixes: int = 1,
                    k_cap: int = 64, stop: Sequence[str] | None = None) -> Shapes:
        """`prepare` for every prompt (with its declared `prefix`, as `generate_batch` and
        `score` take them) continued by up to `max_new_tokens` and by each of `continuations`
        (with `stop`, by each of their `endings`, as `sample_probability` scores them)."""
        prompts = check_prompts(prompts)
        splits = self._split(prompts, prefix, None)
        conts = ([self._encode_plain(c) for c in continuations] if stop is None
                 else [e for c in continuations for e in self.endings(c, stop)])
        longest_cont = max((len(c) for c in conts), default=0)
        return self.prepare(batch_size=batch_size, longest_prefix=max(len(s.prefix) for s in splits),
                            longest_tail=max(len(s.tail) for s in splits), new_tokens=max_new_tokens,
                            longest_scored=max(len(s.tail) for s in splits) + longest_cont,
                            longest_continuation=longest_cont, prefixes=prefixes, k_cap=k_cap)

    @serialized
    def warm_up(self) -> tuple[int, float]:
        """Compile every program of the current shapes ahead of time; returns the compiles
        this made and their seconds (also added to `stats`)."""
        if self.shapes is None:
            raise ValueError("warm_up needs shapes: call prepare first")
        before, seconds = self.stats.compiles, self.stats.compile_seconds
        table = self._put_replicated(self.stop_table(()))
        for name, (fn, args, static, donate) in self._program_args(table).items():
            self._compile(name, fn, args, static, donate)
        made, spent = self.stats.compiles - before, self.stats.compile_seconds - seconds
        self.stats.warmup_compiles += made
        self.stats.warmup_seconds += spent
        return made, spent

    def _program_args(self, table: Any) -> dict[str, tuple[Callable, tuple, dict, tuple]]:
        """Every program with arguments of the current shapes (empty work)."""
        sh, z = self.shapes, self._zeros
        store, carry = self._store_or_new(), self._carry()
        prefill = (self.state, store, z((sh.prefill_rows, sh.prefix_width), np.int32),
                   z((sh.prefill_rows,), np.int32), z((sh.prefill_rows,), np.int32))
        pack, draw, place = self._empty_insert()
        first = (self.state, store, pack, draw)
        admit = (carry, self._empty_tails(), pack, place, table)
        scalar = z((), np.int32, rows=False)
        decode = (self.state, carry, store, table, scalar, scalar)
        score = (self.state, store, *self._empty_score())
        branch = (self.state, self._empty_tails(), self._empty_last(), pack, *self._empty_branches())
        policy = dict(policy=self._policy)
        return {"prefill": (self._prefill_fn, prefill, {}, (1,)),
                "first": (self._first_fn, first, policy, ()),
                "admit": (self._admit_fn, admit, {}, ADMIT_DONATES),
                "decode": (self._decode_fn, decode, policy, DONATE_CARRY),
                "score": (self._score_fn, score, policy, ()),
                "branch": (self._branch_fn, branch, policy, ())}

    def _empty_insert(self) -> tuple[dict, dict, dict]:
        """(pack, draw, place) of `first_program` and `admit_program`, zero."""
        sh = self.shapes
        r, w, t, n, a = sh.insert_rows, sh.insert_width, sh.insert_tails, sh.insert_dests, sh.admit_rows
        z = lambda shape, dt: self._zeros(shape, dt, rows=False)  # noqa: E731
        pack = {"ids": z((r, w), np.int32), "pos": z((r, w), np.int32), "seg": z((r, w), np.int32),
                "prefix": z((r,), np.int32), "row": z((t,), np.int32), "col": z((t,), np.int32),
                "length": z((t,), np.int32)}
        settings = lambda k: {name: z(v.shape, v.dtype)  # noqa: E731
                              for name, v in self._settings(k, []).items()}
        place = {**settings(a), "slot": z((a,), np.int32), "token": z((a,), np.int32),
                 "logp": z((a,), np.float32), "raw": z((a,), np.float32)}
        return pack, settings(n), place

    def _empty_tails(self) -> KVCache:
        """The tails' cache `first_program` returns, zero (for compiling `admit_program`)."""
        sh, cfg = self.shapes, self.config
        kv = (sh.insert_rows, sh.prefix_width + sh.insert_width, cfg.num_kv_heads, cfg.head_dim)
        z = lambda shape, dt: self._zeros(shape, dt, rows=False)  # noqa: E731
        return KVCache(keys=self._kv_buffers(kv, z), values=self._kv_buffers(kv, z),
                       mask=z(kv[:2], bool), end=self._scalar(sh.prefix_width))

    def _empty_last(self) -> Any:
        """The tails' last hidden states `first_program` returns, zero."""
        return self._zeros((self.shapes.insert_tails, self.config.hidden_size),
                           as_dtype(self.config.dtype), rows=False)

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
            return lambda *a: run_program(compiled, leaves, *a[1:])
        return lambda *a: run_program(compiled, *a)

    def _lower(self, fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> jax.stages.Lowered:
        """`fn` lowered for `args` as `_compile` compiles it: when `args[0]` is the sampler's
        state, as a function of its flat leaves."""
        if bool(args) and args[0] is self.state:
            fn, args = compile_cache.over_leaves(fn, self._state_treedef), (self._state_leaves, *args[1:])
        return compile_cache.lower(fn, args, static, donate)

    # ---- device programs, bound to this model's graph (see `kernels`)

    def _prefill_fn(self, state: Any, *args: Any) -> PrefixStore:
        return prefill_program(self.graphdef, self._constrain_replicated, state, *args)

    def _first_fn(self, state: Any, *args: Any, **static: Any) -> Any:
        return first_program(self.graphdef, self._constrain_replicated, self._constrain, self._rows_local,
                             state, *args, **static)

    def _admit_fn(self, *args: Any) -> Any:
        return admit_program(self._constrain, *args)

    def _decode_fn(self, state: Any, *args: Any, **static: Any) -> Any:
        return decode_program(self.graphdef, self._constrain, self._rows_local, state, *args, **static)

    # ---- host orchestration: shared pieces

    def _split(self, prompts: list[str], prefix: str | Sequence[str],
               share: bool | None) -> list[Split]:
        pres = [prefix] * len(prompts) if isinstance(prefix, str) else list(prefix)
        if len(pres) != len(prompts):
            raise ValueError(f"prefix has {len(pres)} entries for {len(prompts)} prompts")
        ids = [self.encode(pre + p) for pre, p in zip(pres, prompts)]
        return split_prompts(ids, [self._declared(pre) for pre in pres], share)

    def _validate_lengths(self, splits: list[Split], extra: Sequence[int]) -> None:
        limit = self.config.max_position_embeddings
        for i, (s, more) in enumerate(zip(splits, extra)):
            n = len(s.prefix) + len(s.tail)
            if not s.tail:
                raise ValueError(f"prompt {i} is empty after tokenization: nothing to continue")
            if n + more > limit:
                raise ValueError(
                    f"prompt {i} has {n} tokens; with {more} more it exceeds the model's "
                    f"context of {limit} tokens (max_position_embeddings)")

    @staticmethod
    def _top_p_mode(settings: list[Sample]) -> str:
        sampled = [s for s in settings if s.temperature > 0]
        if not sampled or all(s.top_p >= 1 for s in sampled):
            return "off"
        return "topk" if all(s.top_k > 0 for s in sampled) else "full"

    # ---- generation

    @serialized
    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int,
                       methods: Method | Sequence[Method] = Greedy(), n: int = 1,
                       stop: Sequence[str] = (), seed: int = 0,
                       batch_size: int = DEFAULT_BATCH_SIZE, prefix: str | Sequence[str] = "",
                       share_prefix: bool | None = None,
                       prompt_keys: Sequence[int] | None = None,
                       alive: Sequence[Callable[[str], bool] | None] | None = None,
                       ) -> list[list[Generation]]:
        """For each prompt, one `Generation` per sample, in order.

        `methods`: one method used for `n` samples, or a list of methods, one sample each (e.g.
        `[Greedy()] + [Sample(0.5, 40)] * 16`). `prefix` is prepended to every prompt (or one
        per prompt): the few-shot part the prompts share, kept in the prefix store (see the
        package docstring for how it is tokenized). `share_prefix` (no declared prefix): None
        shares a common token prefix of >= MIN_SHARED_PREFIX tokens, True any, False none.
        `prompt_keys`: integers seeding each prompt's samples (default: its index), so a subset
        of prompts can be re-run on the same random stream. `batch_size`: decode slots (rows
        decoded together), fixed by the sampler's first call or `prepare`. `alive`: per prompt,
        None or a test of a row's text so far (as `Generation.text` would read if it ended
        there); once it returns False the row stops with finish_reason 'abandoned' and its
        slot goes to a waiting row. For callers that only need to know whether a sample can
        still be accepted (the probe: `knowledge.match.can_still_match`); the test must be
        False only for texts no continuation of which the caller would accept. It is
        never applied to rows that already ended. Bad arguments raise ValueError before
        anything is compiled.
        """
        return self._generate(check_prompts(prompts), max_new_tokens=max_new_tokens, fan=methods, n=n, stop=stop,
                              seed=seed, batch_size=batch_size, prefix=prefix, share_prefix=share_prefix,
                              prompt_keys=prompt_keys, alive=alive)

    def _generate(self, prompts: list[str], *, max_new_tokens: int, fan: Method | Sequence[Method], n: int,
                  stop: Sequence[str], seed: int, batch_size: int, prefix: str | Sequence[str],
                  share_prefix: bool | None, prompt_keys: Sequence[int] | None,
                  alive: Sequence[Callable[[str], bool] | None] | None, scores: Any = None,
                  wanted: list[list[tuple]] | None = None, k_cap: int = 0) -> list[list[Generation]]:
        """`generate_batch`; with `scores` (`branches.BranchScores`), prompt i's continuations
        `wanted[i]` ((key, tokens, alternative)) are scored against its tail by the insert that
        prefills it. `k_cap`: the top-k logits every tail keeps at least."""
        fan = fanout(fan, n)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt_keys is not None and len(prompt_keys) != len(prompts):
            raise ValueError(f"prompt_keys has {len(prompt_keys)} entries for {len(prompts)} prompts")
        if alive is not None and len(alive) != len(prompts):
            raise ValueError(f"alive has {len(alive)} entries for {len(prompts)} prompts")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        splits = self._split(prompts, prefix, share_prefix)
        longest = [max([max_new_tokens] + [len(w[1]) for w in (wanted[i] if wanted else ())])
                   for i in range(len(prompts))]
        self._validate_lengths(splits, longest)
        keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
        settings = [m if isinstance(m, Sample) else Sample(0.0) for m in fan]
        k_cap = max([s.top_k for s in settings if s.temperature > 0] + [k_cap])
        self.prepare(batch_size=batch_size, longest_prefix=max(len(s.prefix) for s in splits),
                     longest_tail=max(len(s.tail) for s in splits), new_tokens=max_new_tokens,
                     k_cap=k_cap, top_p=self._top_p_mode(settings))
        table = self._put_replicated(self.stop_table(stop))
        m = len(fan)
        order = sorted(range(len(prompts)), key=lambda i: (splits[i].prefix, splits[i].tail))
        jobs = [Job(splits[i].prefix, splits[i].tail,
                    [Row(i * m + j, s.temperature, s.top_k, s.top_p, seed, keys[i], j)
                     for j, s in enumerate(settings)], None if alive is None else alive[i],
                    score=None if wanted is None else list(wanted[i]))
                for i in order]
        self._preload([j.prefix for j in jobs])
        results = self._run_jobs(jobs, stop, table, scores)
        out = []
        for i, s in enumerate(splits):
            prompt = list(s.prefix + s.tail)
            head = self._decode(prompt)
            out.append([self._finish(head, prompt, *results[i * m + j], stop) for j in range(m)])
        return out


class SharedShapes:
    """The shapes every sampler of a run grows into and leaves its own in: a probe or a dev
    evaluation of one stage model starts from the run's set instead of from its own work, so a
    run's samplers (one per model) share one set of compiled programs instead of compiling one
    per kind of work. Safe from several threads (pipeline seeds)."""

    def __init__(self) -> None:
        self.shapes: Shapes | None = None
        self._lock = threading.Lock()

    def apply(self, sampler: Sampler) -> None:
        """Grow `sampler`'s shapes to cover the run's (when their row counts agree)."""
        with self._lock:
            shapes = self.shapes
        if shapes is not None and (sampler.shapes is None or sampler.shapes.same_rows(shapes)):
            sampler.cover(shapes)

    def record(self, sampler: Sampler) -> None:
        """Grow the run's shapes to cover `sampler`'s."""
        with self._lock:
            mine = sampler.shapes
            if mine is None:
                return
            if self.shapes is None:
                self.shapes = mine
            elif self.shapes.same_rows(mine):
                self.shapes = self.shapes.union(mine)
