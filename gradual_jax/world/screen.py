"""A cheap estimate of each candidate fact's SliCK category, to stratify the train split.

For every candidate and each of the probe's few-shot prompts, one teacher-forced forward pass
over `prompt + " answer\\n"` gives both whether greedy decoding would produce exactly the answer
(every answer token and the closing newline is the argmax) and the chance `q` that one sample at
the probe's temperature and top-k produces it. From those: HighlyKnown (greedy right for every
prompt), MaybeKnown (for some), WeaklyKnown (P(one of n_samples right in some prompt) >= 1/2)
or Unknown. This screens; the real probe (gradual_jax.knowledge.probe) measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerFast

from gradual_jax.knowledge.data import QAExample
from gradual_jax.knowledge.prompts import build_prompt_sets, format_probe_prompt
from gradual_jax.models.transformer import Transformer
from gradual_jax.world.generate import CANDIDATE, Fact, World

HIGHLY, MAYBE, WEAKLY, UNKNOWN = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
# Screening draws its own prompt sets (seed + offset), not the ones a run probes with, so the
# train split is not fitted to the exact prompts the probe will use.
SCREEN_SEED_OFFSET = 1_000


@nnx.jit(static_argnames=("top_k",))
def _answer_scores(model: Transformer, ids: jax.Array, positions: jax.Array, valid: jax.Array,
                   temperature: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Per row: does greedy reproduce the answer tokens, and the log-probability that one
    sample does. `positions[b, a]`: where answer token a of row b is predicted; `valid` masks
    the padding of shorter answers."""
    logits = jnp.take_along_axis(model(ids), positions[..., None], axis=1)  # [B, A, V]
    target = jnp.take_along_axis(ids, positions + 1, axis=1)  # [B, A]
    greedy = jnp.all((jnp.argmax(logits, -1) == target) | ~valid, axis=-1)
    scaled = logits / temperature
    kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
    logp = jax.nn.log_softmax(jnp.where(scaled >= kth, scaled, -jnp.inf), axis=-1)
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return greedy, jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)


def screen_categories(model: Transformer, tokenizer: PreTrainedTokenizerFast, facts: Sequence[Fact],
                      dev: Sequence[QAExample], *, n_prompts: int = 10, k: int = 4, n_samples: int = 16,
                      temperature: float = 0.5, top_k: int = 40, seed: int = 0,
                      batch_size: int = 128) -> list[str]:
    """The estimated category of each fact, with prompts built as the probe builds them."""
    sets = build_prompt_sets(dev, sorted({f.relation for f in facts}), n_prompts=n_prompts, k=k, seed=seed)
    rows, spans = [], []
    for f in facts:
        for exemplars in sets[f.relation]:
            prompt = tokenizer(format_probe_prompt(exemplars, f.question)).input_ids
            answer = tokenizer(f" {f.answer}\n", add_special_tokens=False).input_ids
            rows.append(prompt + answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
    width = -(-max(len(r) for r in rows) // 32) * 32  # few distinct shapes, few compiles
    n_ans = max(hi - lo for lo, hi in spans)
    n_rows = -(-len(rows) // batch_size) * batch_size
    ids = np.full((n_rows, width), tokenizer.pad_token_id, np.int32)
    positions = np.zeros((n_rows, n_ans), np.int32)
    valid = np.zeros((n_rows, n_ans), bool)
    for i, (r, (lo, hi)) in enumerate(zip(rows, spans)):
        ids[i, : len(r)] = r
        positions[i, : hi - lo] = np.arange(lo - 1, hi - 1)
        valid[i, : hi - lo] = True
    greedy, logq = [], []
    for s in range(0, n_rows, batch_size):
        g, lq = _answer_scores(model, jnp.asarray(ids[s:s + batch_size]),
                               jnp.asarray(positions[s:s + batch_size]), jnp.asarray(valid[s:s + batch_size]),
                               jnp.float32(temperature), top_k=top_k)
        greedy.append(np.asarray(g))
        logq.append(np.asarray(lq))
    greedy_ok = np.concatenate(greedy)[: len(rows)].reshape(len(facts), n_prompts)
    q = np.exp(np.concatenate(logq)[: len(rows)]).reshape(len(facts), n_prompts)
    return [_category(g, p, n_samples) for g, p in zip(greedy_ok, q)]


def _category(greedy_ok: np.ndarray, q: np.ndarray, n_samples: int) -> str:
    if greedy_ok.all():
        return HIGHLY
    if greedy_ok.any():
        return MAYBE
    p_any = 1.0 - np.prod((1.0 - q) ** n_samples)
    return WEAKLY if p_any >= 0.5 else UNKNOWN


def screen_candidates(model: Transformer, tokenizer: PreTrainedTokenizerFast, world: World,
                      seed: int = 0) -> dict[tuple[str, str], str]:
    """(relation, subject) -> estimated category for every train candidate of `world`, with
    prompt sets drawn under `seed + SCREEN_SEED_OFFSET`."""
    dev = [QAExample(id=f"{f.relation}.dev.{i}", relation=f.relation, question=f.question,
                     answers=(f.answer,), split="dev", subject=f.subject)
           for i, f in enumerate(world.facts) if f.split == "dev"]
    candidates = [f for f in world.facts if f.split == CANDIDATE]
    if not candidates:
        return {}
    categories = screen_categories(model, tokenizer, candidates, dev, seed=seed + SCREEN_SEED_OFFSET)
    return {(f.relation, f.subject): c for f, c in zip(candidates, categories)}
