"""Sampling methods as frozen dataclasses, and the checks on what callers pass in.

`Greedy()` always takes the most likely token; `Sample(temperature, top_k, top_p)` draws, and
temperature 0 means greedy. A call's methods fan out to one decode row per sample
(`fanout`). Nothing here touches jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Draw from softmax(logits / temperature), kept to the `top_k` most likely tokens (0: all)
    and then to the smallest set with mass >= `top_p`. Temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)


Method = Greedy | Sample


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError unless temperature >= 0, top_k is a non-negative integer and
    0 < top_p <= 1."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0 or int(top_k) != top_k:
        raise ValueError(f"top_k must be a non-negative integer (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_prompts(prompts: Any, what: str = "prompts") -> list[str]:
    """`prompts` as a list, or ValueError unless it is a non-empty sequence of strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{what} is empty: nothing to generate")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"{what}[{bad}] is {type(prompts[bad]).__name__}, expected a string")
    return list(prompts)


def method_of(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Method:
    """The sampling method for these settings: `Greedy()` when temperature is 0."""
    check_sampling(temperature, top_k, top_p)
    return Greedy() if temperature == 0 else Sample(temperature, top_k, top_p)


def fanout(methods: Method | Sequence[Method], n: int) -> list[Method]:
    """One method per sample of a prompt: `methods` repeated `n` times, or the list as given
    (then `n` must be 1). Raises ValueError otherwise."""
    if isinstance(methods, (Greedy, Sample)):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return [methods] * n
    fan = list(methods)
    if not fan or not all(isinstance(m, (Greedy, Sample)) for m in fan):
        raise ValueError("methods must be a Greedy/Sample or a non-empty list of them")
    if n != 1:
        raise ValueError("give either one method and n, or a list of methods (n = 1)")
    return fan
