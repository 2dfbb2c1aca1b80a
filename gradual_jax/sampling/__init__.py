"""Batched generation: packed prefill into a preallocated KV cache, `lax.while_loop` decode.

How a call runs (`Sampler.generate_batch`):
- Prompts are tokenized whole (the tokenizer's default special tokens, as `tokenizer(text)`),
  ordered by their token ids so that prompts sharing a few-shot prefix sit together, and cut
  into batches of at most `batch_size` decode rows (prompts x samples per prompt).
- Shared prefix: prompts that begin with the same tokens (at least `MIN_SHARED_PREFIX`, e.g.
  the few-shot exemplars of one prompt set) form a group whose common token prefix is
  prefilled once, for one row, and reused by every row of the group's batches; batches never
  mix groups. The prefix is found on the token ids of the whole prompts, never by tokenizing a prefix
  string on its own: a byte-level BPE tokenizes "...\\n\\n" alone as one "\\n\\n" token but
  "...\\n\\nQ:" as "\\n", "\\n", "Q", so a separately tokenized prefix would change the prompt.
  Sharing therefore gives exactly the tokens of the unshared path, whatever the tokenizer.
- Prefill: the prompts' remaining tokens are packed, without padding between them, into rows
  of a power-of-two width (first-fit decreasing); attention is masked to each prompt's own
  tokens and the prefix, and positions continue from the prefix. A 4-shot probe batch computes
  its ~10 question tokens per prompt instead of ~100 padded ones. Each prompt's keys and values
  are then gathered into its own row of a `prefix + bucket + max_new_tokens` slot cache (left
  aligned, unused slots masked: positions come from the mask, so gaps change nothing), and the
  rows are repeated once per sample (fan-out: `n` samples share one prefill).
- Decode: a jitted `lax.while_loop` feeds one token per row per step and stops when every row is
  done or a chunk of steps is over. A row is done when it samples EOS or a token whose text
  contains a stop string (a per-vocabulary table, so the check runs on device). Between chunks
  the host checks stop strings that span tokens and, when at most half the rows are live,
  compacts the batch to them, so finished rows stop costing decode steps.
- Host: token ids are cut after the stopping token; text is the generation as it reads after
  the prompt, cut before the first stop string.

Randomness: row (prompt key p, sample j) draws step t with
`fold_in(fold_in(fold_in(key(seed), p), j), t)`, so samples do not depend on batch size,
batch composition or order. Per-row temperature/top-k/top-p let one decode batch mix greedy
rows with sampled ones (the SliCK probe's 1 greedy + 16 samples per prompt).

Shapes are bucketed (packed rows, widths, cache sizes, batch rows) so a dataset compiles a
handful of times. Functions are compiled ahead of time (so compile time can be reported in
`Sampler.stats`) and cached by graph, mesh and shapes, shared by every `Sampler`.

Modules: `methods` (Greedy, Sample), `records` (Generation, TokenScores, SamplerStats),
`packing` (host-side shapes, packing and planning: no jax), `kernels` (forward passes, token
choice, the compiled programs), `compile_cache`, `placement` (mesh layout), `decoding` (the
host decode loop), `lowering` (the programs on abstract inputs), `sampler` (`Sampler`) and
`api` (`sampler_for`, `generate`, `generate_batch`, `score_continuations`).
"""

from __future__ import annotations

from gradual_jax.sampling.api import generate, generate_batch, sampler_for, score_continuations
# Private names of the former single module that tests reach into.
from gradual_jax.sampling.compile_cache import COMPILED as _COMPILED
from gradual_jax.sampling.kernels import decode_step as _decode_step
from gradual_jax.sampling.methods import Greedy, Method, Sample, method_of
from gradual_jax.sampling.packing import (
    MIN_BUCKET,
    MIN_COMPACT_ROWS,
    MIN_SHARED_PREFIX,
    next_pow2,
)
from gradual_jax.sampling.packing import plan as _plan
from gradual_jax.sampling.records import Generation, SamplerStats, TokenScores
from gradual_jax.sampling.sampler import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK, Sampler

__all__ = ["Generation", "Greedy", "Method", "Sample", "Sampler", "SamplerStats", "TokenScores",
           "generate", "generate_batch", "method_of", "next_pow2", "sampler_for",
           "score_continuations"]
