"""Batched generation and scoring in a fixed set of shapes: a prefix store, packed tail
prefill into fixed decode slots, continuous batching, teacher-forced scoring.

How a call runs (`Sampler.generate_batch`):
- Prompts are tokenized whole (the tokenizer's default special tokens, as `tokenizer(text)`)
  and cut into a stored prefix and a tail (`packing.split_prompts`). A caller that declares a
  prompt's few-shot prefix (`prefix=`) gets that prefix's tokens as they occur in the whole
  prompt, less the last one: a byte-level BPE tokenizes "...\\n\\n" alone as one "\\n\\n"
  token but "...\\n\\nQ:" as "\\n", "\\n", "Q", so the split never changes the prompt's tokens.
  Without a declared prefix, prompts sharing at least `MIN_SHARED_PREFIX` leading tokens share
  their common prefix, and others keep all but their last token as a prefix of their own.
- Prefix store: each distinct prefix is prefilled once (`prefill_rows` at a time, one fixed
  width) into a row of the store and stays there, least recently used first out, until the
  weights change (`refresh`). A probe's exemplar blocks are prefilled once for all its phases.
- Decode slots: a fixed number of rows (`batch_size`) of one cache length (prefix width + tail
  width + `max_new_tokens`). An insert packs the next prompts' tails end to end into one row of
  a fixed width (attention masked to each tail's own tokens and its stored prefix), prefills
  them, copies each tail's prefix and tail keys and values into the free slots that take its
  samples (fan-out: `n` samples share one prefill) and chooses their first tokens. Decode steps
  (a jitted `lax.while_loop`, one token per slot) run until enough slots are done to be worth
  refilling; finished rows go back to the host and their slots take the next rows (continuous
  batching). A row is done when it samples EOS or a token whose text contains a stop string (a
  per-vocabulary table, so the check runs on device); stop strings spanning tokens are checked
  by the host every `chunk` steps.
- Host: token ids are cut after the stopping token; text is the generation as it reads after
  the prompt, cut before the first stop string.

Scoring (`Sampler.score`) packs prompt tails with their continuations into rows of a fixed
width against their stored prefixes and reads the continuations' log-probs.

Randomness: row (prompt key p, sample j) draws its token t with
`fold_in(fold_in(fold_in(key(seed), p), j), t)`, so samples do not depend on batch size,
batch composition, slot or order. Per-row temperature/top-k/top-p let greedy rows and sampled
ones share the decode slots and one executable.

Shapes (`packing.Shapes`) grow only, up fixed ladders, so a probe of any size compiles the
same six programs (prefill, first, admit, decode, score, branch); `Sampler.warm_up` compiles them
ahead of time. `Sampler.generate_and_score` scores continuations (the probe's gold answers)
against the tails a generation's inserts have just prefilled (`branch`), instead of prefilling
them again for `score`. Executables are cached by graph, mesh and shapes, shared by every `Sampler`.

Modules: `methods` (Greedy, Sample), `records` (Generation, TokenScores, SamplerStats),
`packing` (shapes, prefix splitting and packing on the host: no jax), `kernels` (token choice,
the carries and the six programs), `compile_cache`, `placement` (mesh layout),
`prefix_store` (which prefix sits in which store row), `decoding` (the host's continuous
batching), `scoring` (`Sampler.score` and its host-side plan), `branch_scoring`
(`Sampler.generate_and_score`) and `branches` (its host-side plan), `lowering` (the programs on
abstract inputs), `serial` (one call at a time per sampler), `sampler` (`Sampler`) and `api`
(`sampler_for`, `generate`, `generate_batch`, `score_continuations`).
"""

from __future__ import annotations

from gradual_jax.sampling.api import generate, generate_batch, sampler_for, score_continuations
from gradual_jax.sampling.methods import Greedy, Method, Sample, method_of
from gradual_jax.sampling.packing import MIN_SHARED_PREFIX, Shapes, next_pow2
from gradual_jax.sampling.records import Generation, SamplerStats, TokenScores
from gradual_jax.sampling.sampler import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK,
    SCAN_LAYERS_BY_BACKEND,
    Sampler,
    default_scan_layers,
)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_CHUNK", "Generation", "Greedy", "MIN_SHARED_PREFIX",
           "Method", "SCAN_LAYERS_BY_BACKEND", "Sample", "Sampler", "SamplerStats", "Shapes",
           "TokenScores", "default_scan_layers", "generate", "generate_batch", "method_of",
           "next_pow2", "sampler_for", "score_continuations"]
