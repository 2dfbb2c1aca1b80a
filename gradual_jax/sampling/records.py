"""What the sampler hands back: generations, teacher-forced scores, and its work counters."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion.

    `token_ids`: generated tokens up to and including the one that stopped the row (EOS or the
    token completing a stop string). `logprobs[i]`: log-probability of `token_ids[i]` under the
    distribution it was drawn from (0.0 for greedy); `raw_logprobs[i]`: under the raw model
    (softmax of the logits). `text`: the generation as it reads after the prompt, cut before the
    first stop string, without EOS. `finish_reason`: 'stop', 'eos', 'length', or 'abandoned'
    (the caller's `alive` test rejected the text so far, and generation stopped there).
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    raw_logprobs: tuple[float, ...]
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of one continuation: per token, log-probability under the raw model
    and under softmax(logits / T) kept to the top-k tokens and renormalised (-inf outside)."""

    token_ids: tuple[int, ...]
    raw_logprobs: tuple[float, ...]
    logprobs: tuple[float, ...]


@dataclasses.dataclass
class SamplerStats:
    """Work done by a `Sampler` since creation (or `reset_stats`). Token counts include padding,
    so they measure what the hardware computed. `prefixes`: prefixes prefilled into the store;
    `inserts`: insert calls (each prefills packed tails and starts slots); `abandoned`: rows
    stopped by an `alive` test; `scores_skipped`: continuations `sample_probability` knew to
    have chance 0 without scoring them; `warmup_*`: the
    compiles `Sampler.warm_up` did ahead of time (also counted in `compiles`)."""

    compiles: int = 0
    compile_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_row_steps: int = 0
    decode_steps: int = 0
    logit_rows: int = 0
    inserts: int = 0
    prefixes: int = 0
    abandoned: int = 0
    scores_skipped: int = 0
    warmup_compiles: int = 0
    warmup_seconds: float = 0.0
