"""Next-token pretraining of the world model on packed corpus text, and its export.

Documents are tokenized as `<s> text </s>`, concatenated in a fresh random order every epoch and
cut into fixed rows of `seq_len + 1` tokens; attention runs across document boundaries, as in
ordinary packed pretraining. The step is one `jax.jit` over split NNX state (AdamW, warmup then
cosine decay).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from gradual_jax.models.transformer import ModelConfig, Transformer
from gradual_jax.world.config import WorldConfig
from gradual_jax.world.generate import CANDIDATE, World


def model_config(cfg: WorldConfig, tokenizer: PreTrainedTokenizerFast) -> ModelConfig:
    """The decoder for `cfg`: Llama-style, tied embeddings, vocabulary padded to a multiple of 64."""
    vocab = -(-len(tokenizer) // 64) * 64
    return ModelConfig(
        vocab_size=vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_layers=cfg.n_layers, num_heads=cfg.n_heads, num_kv_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads, tie_word_embeddings=True,
        max_position_embeddings=max(512, cfg.seq_len), rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenize_documents(corpus: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> list[np.ndarray]:
    """Each document as int32 ids `<s> ... </s>`."""
    eos = tokenizer.eos_token_id
    return [np.asarray(ids + [eos], np.int32) for ids in tokenizer(list(corpus)).input_ids]


def packed_batches(docs: Sequence[np.ndarray], seq_len: int, batch_size: int,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless `[batch_size, seq_len + 1]` int32 batches; each epoch reshuffles the documents,
    packs them into rows and visits the rows in random order (a short tail is dropped)."""
    row = seq_len + 1
    total = sum(len(d) for d in docs)
    if total < row * batch_size:
        raise ValueError(f"corpus has {total} tokens, fewer than one batch of {batch_size}x{row}")
    while True:
        stream = np.concatenate([docs[i] for i in rng.permutation(len(docs))])
        rows = stream[: len(stream) // row * row].reshape(-1, row)
        rows = rows[rng.permutation(len(rows))]
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[start:start + batch_size]


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of `targets` `[B, T]` under `logits` `[B, T, V]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(cfg: WorldConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to a tenth; no decay on vectors (norms)."""
    warmup = min(cfg.warmup_steps, max(1, cfg.pretrain_steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(cfg.pretrain_steps, warmup + 1), cfg.learning_rate / 10)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay, mask=decay_mask))


def make_train_step(graphdef: Any, tx: optax.GradientTransformation):
    """A jitted `(params, opt_state, rest, batch) -> (params, opt_state, loss)`."""

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return next_token_loss(model(batch[:, :-1]), batch[:, 1:])

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain(world: World, corpus: Sequence[str], tokenizer: PreTrainedTokenizerFast, cfg: WorldConfig,
             *, record: dict[str, Any] | None = None, progress: bool = True) -> Transformer:
    """A freshly initialised world model trained `cfg.pretrain_steps` steps on `corpus`.

    Deterministic in data order and initialisation for a given `cfg.seed`. When `record` is
    given it receives the loss curve (every 10 steps), tokens/s, wall time, and the zero-shot
    greedy QA accuracy on the world's dev facts and train candidates (a rough knowledge check).
    """
    model = Transformer(model_config(cfg, tokenizer), rngs=nnx.Rngs(cfg.seed))
    init_tied_embeddings(model, cfg.seed)
    docs = tokenize_documents(corpus, tokenizer)
    batches = packed_batches(docs, cfg.seq_len, cfg.batch_size, np.random.default_rng([cfg.seed, 2]))
    tx = make_optimizer(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    losses: list[tuple[int, float]] = []
    start = compiled_at = time.perf_counter()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain world model", disable=not progress)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, rest, jnp.asarray(next(batches)))
        if i == 0:
            compiled_at = time.perf_counter()
        if i % 10 == 0 or i == cfg.pretrain_steps - 1:
            losses.append((i, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
    wall = time.perf_counter() - start
    nnx.update(model, params)
    if record is not None:
        timed_tokens = cfg.batch_size * cfg.seq_len * max(0, cfg.pretrain_steps - 1)  # after compiling
        record.update(losses=losses, steps=cfg.pretrain_steps, wall_s=wall,
                      corpus_tokens=int(sum(len(d) for d in docs)),
                      tokens_per_s=timed_tokens / max(1e-9, time.perf_counter() - compiled_at),
                      params=int(sum(p.size for p in jax.tree.leaves(params))))
        for split in ("dev", CANDIDATE, "train"):
            pairs = [(f.question, f.answer) for f in world.facts if f.split == split]
            if pairs:
                record[f"{split}_qa_greedy_accuracy"] = qa_greedy_accuracy(model, tokenizer, pairs)
    return model


def init_tied_embeddings(model: Transformer, seed: int) -> None:
    """Re-draw the embedding table with std 1/sqrt(d_model).

    The decoder draws embeddings with std 1, which suits an untied input table; tied to the
    output projection it gives initial logits of std ~sqrt(d_model) and a first loss near 90.
    """
    d = model.config.hidden_size
    key = jax.random.PRNGKey(seed)
    model.embed[...] = (jax.random.normal(key, model.embed[...].shape, jnp.float32) / d ** 0.5).astype(
        model.embed[...].dtype)


@nnx.jit
def _greedy_next(model: Transformer, ids: jax.Array) -> jax.Array:
    return jnp.argmax(model(ids), axis=-1)


def qa_greedy_accuracy(model: Transformer, tokenizer: PreTrainedTokenizerFast,
                       pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> float:
    """Share of (question, answer) pairs whose zero-shot greedy answer to `Q: {q}\nA:` is exactly
    ` {answer}` then a newline; computed teacher-forced, one forward pass per batch."""
    if not pairs:
        return float("nan")
    rows, spans = [], []
    for q, a in pairs:
        prompt = tokenizer(f"Q: {q}\nA:").input_ids
        # Not `tokenizer("\n")`: the prefix space would make that " \n", another token.
        target = tokenizer(f" {a}\n", add_special_tokens=False).input_ids
        rows.append(prompt + target)
        spans.append((len(prompt), len(prompt) + len(target)))
    n_rows = -(-len(rows) // batch_size) * batch_size  # whole batches and a width rounded up to
    width = -(-max(len(r) for r in rows) // 32) * 32    # 32: few shapes, few compiles
    ids = np.full((n_rows, width), tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r  # right padding: causal attention keeps real positions exact
    pred = np.concatenate([np.asarray(_greedy_next(model, jnp.asarray(ids[s:s + batch_size])))
                           for s in range(0, n_rows, batch_size)])
    hits = [np.array_equal(pred[i, lo - 1:hi - 1], ids[i, lo:hi]) for i, (lo, hi) in enumerate(spans)]
    return float(np.mean(hits))


def export_model(model: Transformer, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write the model (Hugging Face safetensors + config.json) and tokenizer into `out_dir`."""
    from gradual_jax.models.hf import save_hf

    return save_hf(model, out_dir, tokenizer=tokenizer)
