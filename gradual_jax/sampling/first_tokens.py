"""Which first tokens a prompt's samples cannot start with, from a prefill the sampler already ran.

Every insert prefills prompt tails and computes their next-token logits (`first_program`); it
also returns each tail's `k_cap` best logits. Kept here per prompt, they let a later scoring of
the same prompt skip a continuation whose first token the sampling distribution excludes: under
top-k (or greedy, temperature 0) its sampled log-prob is -inf, so the chance that one sample
equals the continuation is exactly 0 whatever its other tokens. The probe scores its gold
answers right after answering the same prompts greedily, and for questions a model does not
know most gold answers start outside its top-k.

The logits of a later scoring call come from another packing of the same prompt, so they may
differ in the last bits: a token is excluded only when it falls short of the cut by more than
`margin` (`exclusion_margin`: float32 differences are about 1e-5 here).

Host only: numpy, no jax.
"""

from __future__ import annotations

import collections

import numpy as np

Prompt = tuple[tuple[int, ...], tuple[int, ...]]  # (stored prefix, tail) as the sampler splits it

# Prompts whose first-token logits are kept (the probe's chunk is 10 prompts x 64 questions).
KEPT_PROMPTS = 8192


def exclusion_margin(dtype: np.dtype) -> float:
    """How far below the top-k cut (raw logits) a token must be to count as excluded, for logits
    computed in `dtype`: 128 units in the last place, at least 0.01 (float32: 0.01; bfloat16: 1)."""
    return max(0.01, 128 * float(np.finfo(dtype).eps))


def excluded(best: np.ndarray, best_ids: np.ndarray, token: int, *, temperature: float, top_k: int,
             margin: float) -> bool:
    """Whether `token` is certainly not drawn as the next token, given the prompt's largest
    logits `best` (descending) and their tokens `best_ids`: outside the top `top_k` at
    temperature > 0 (never when `top_k` is 0, keeping every token, or beyond the logits kept),
    not the argmax at temperature 0; each by more than `margin`."""
    if temperature > 0:
        if top_k <= 0 or top_k > len(best):
            return False
        cut = float(best[top_k - 1])
    else:
        cut = float(best[0])
    hit = np.flatnonzero(best_ids == token)
    # a token beyond the kept logits is at most the smallest kept one
    value = float(best[hit[0]]) if len(hit) else float(best[-1])
    return value < cut - margin


class FirstTokens:
    """The largest next-token logits of recently prefilled prompts (least recently seen dropped
    beyond `capacity`). Valid for one set of weights: `clear` when they change."""

    def __init__(self, capacity: int = KEPT_PROMPTS):
        self.capacity = capacity
        self._kept: collections.OrderedDict[Prompt, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, prompt: Prompt, best: np.ndarray, best_ids: np.ndarray) -> None:
        self._kept[prompt] = (best, best_ids)
        self._kept.move_to_end(prompt)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, prompt: Prompt) -> tuple[np.ndarray, np.ndarray] | None:
        return self._kept.get(prompt)

    def clear(self) -> None:
        self._kept.clear()
