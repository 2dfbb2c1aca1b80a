"""Functional entry points: the model's cached `Sampler`, and generation and scoring through it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from flax import nnx

from gradual_jax.models.transformer import Transformer
from gradual_jax.sampling.methods import method_of
from gradual_jax.sampling.records import Generation, TokenScores
from gradual_jax.sampling.sampler import DEFAULT_BATCH_SIZE, Sampler, SharedShapes, default_scan_layers

_SAMPLERS: "weakref.WeakKeyDictionary[Transformer, Sampler]" = weakref.WeakKeyDictionary()
_SAMPLERS_LOCK = threading.Lock()


def sampler_for(model: Transformer | Sampler, tokenizer: Any, mesh: Any = None,
                scan_layers: bool | None = None) -> Sampler:
    """The cached `Sampler` of `model`, refreshed to its current weights (a new one when the
    tokenizer, the mesh, `scan_layers` (None: the backend's default) or the model's variables
    differ); a `Sampler` passes through."""
    if isinstance(model, Sampler):
        return model
    scan = default_scan_layers() if scan_layers is None else bool(scan_layers)
    with _SAMPLERS_LOCK:
        s = _SAMPLERS.get(model)
        state = nnx.state(model) if s is not None else None
        if (s is None or s.tokenizer is not tokenizer or s.mesh is not mesh or s.scan_layers != scan
                or not s.fits(state)):
            s = Sampler(model, tokenizer, mesh=mesh, scan_layers=scan)
            _SAMPLERS[model] = s
        else:
            s.refresh(model, state)
    return s


def generate_batch(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str], *,
                   mesh: Any = None, shapes: SharedShapes | None = None, scan_layers: bool | None = None,
                   **kwargs: Any) -> list[list[Generation]]:
    """`Sampler.generate_batch` on the model's cached sampler (`sampler_for`); with `shapes` (a
    run's shared set), in those shapes grown to cover this work."""
    sampler = sampler_for(model, tokenizer, mesh, scan_layers)
    if shapes is not None:
        shapes.apply(sampler)
    out = sampler.generate_batch(prompts, **kwargs)
    if shapes is not None:
        shapes.record(sampler)
    return out


def generate(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             n: int = 1, stop: Sequence[str] = (), seed: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, mesh: Any = None,
             shapes: SharedShapes | None = None, scan_layers: bool | None = None) -> list[list[str]]:
    """For each prompt, `n` completions: the text after the prompt, cut before the first stop
    string (EOS ends a completion too). Temperature 0 is greedy. Bad arguments raise ValueError
    before anything is compiled. `shapes`: a run's shared sampler shapes (see `SharedShapes`);
    `scan_layers`: the sampler's (see `sampler_for`)."""
    method = method_of(temperature, top_k, top_p)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gens = generate_batch(model, tokenizer, prompts, mesh=mesh, shapes=shapes, scan_layers=scan_layers,
                          max_new_tokens=max_new_tokens,
                          methods=method, n=n, stop=stop, seed=seed, batch_size=batch_size)
    return [[g.text for g in row] for row in gens]


def score_continuations(model: Transformer | Sampler, tokenizer: Any, prompts: Sequence[str],
                        continuations: Sequence[str | Sequence[int]], *, temperature: float = 1.0,
                        top_k: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                        mesh: Any = None) -> list[TokenScores]:
    """Per-token log-probs of each continuation after its prompt, raw and under
    softmax(logits / T) kept to the top-k (see `Sampler.score`)."""
    return sampler_for(model, tokenizer, mesh).score(prompts, continuations, temperature=temperature,
                                                     top_k=top_k, batch_size=batch_size)
