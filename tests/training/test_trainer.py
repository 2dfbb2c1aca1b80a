"""The trainer: learns a small QA set, sharded = single device, accumulation = big batch, LoRA, selection."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import FAST_COMPILE, capital_examples, tiny_model, train_config

from gradual_jax.training.config import LoRAConfig
from gradual_jax.training import data as D
from gradual_jax.training.metrics import MetricsWriter
from gradual_jax.sharding import make_mesh
from gradual_jax.training.trainer import Trainer, TrainingError, token_loss_sums


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def _greedy(model, tokenizer, prompts, max_new=4, length=32):
    """Greedy continuation of each prompt, decoded up to EOS, from the model's logits alone."""
    rows = [tokenizer.encode(p) for p in prompts]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask), compiler_options=FAST_COMPILE)
    outs = [[] for _ in rows]
    for _ in range(max_new):
        ids = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        logits = np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(ids > 0)))
        for i, r in enumerate(rows):
            nxt = int(logits[i, len(r) - 1].argmax())
            r.append(nxt)
            outs[i].append(nxt)
    return [tokenizer.decode(o[:o.index(2)] if 2 in o else o) for o in outs]


def test_learns_qa_pairs_and_answers_greedily(tokenizer, tiny_config, tmp_path):
    examples = capital_examples(8)
    model = tiny_model(tiny_config, seed=0)
    trainer = Trainer(model, tokenizer, seed=0, progress=False, compiler_options=FAST_COMPILE)
    with MetricsWriter(tmp_path) as metrics:
        result = trainer.fit(examples, [], train_config(epochs=40), metrics=metrics)
    assert result.steps == 40 and result.best_epoch == 40 and result.selection == "convergence"
    assert result.history[0]["train_loss"] > 2.0
    assert result.final_loss < 0.05
    answers = _greedy(model, tokenizer, [f"Q: {ex.question}\nA:" for ex in examples])
    assert [a.strip() for a in answers] == [ex.answers[0] for ex in examples]
    rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert rows[-1]["loss"] == pytest.approx(result.final_loss)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (_events,) = list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 41))


def _one_step(model, tokenizer, mesh, cfg, examples, row_multiple=None):
    trainer = Trainer(model, tokenizer, mesh=mesh, progress=False, compiler_options=FAST_COMPILE)
    trainer.setup(cfg, total_steps=10)
    toks = D.tokenize_examples(examples, tokenizer, template=cfg.template, max_seq_len=cfg.max_seq_len)
    batch = D.epoch_batches(toks, batch_rows=cfg.batch_size * cfg.grad_accum, seed=0, epoch=0,
                            max_seq_len=cfg.max_seq_len, row_multiple=row_multiple)[0]
    out = trainer.step(batch)
    trainer.sync()
    return out, _params(model)


# The (2,2,2)-mesh config is also the resume tests': the persistent compilation cache shares it.
STEP_CFG = dict(batch_size=4, weight_decay=0.1, clip_norm=0.5)


def test_sharded_step_equals_single_device(tokenizer, tiny_config):
    cfg = train_config(**STEP_CFG)
    examples = capital_examples(8)
    ref_out, ref = _one_step(tiny_model(tiny_config, seed=1), tokenizer,
                             make_mesh(devices=jax.devices()[:1]), cfg, examples)
    model = tiny_model(tiny_config, seed=1)
    out, params = _one_step(model, tokenizer, make_mesh(2, 2, 2), cfg, examples)
    assert model.layers[0].mlp.up.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert out["loss"] == pytest.approx(ref_out["loss"], abs=1e-5)
    assert out["grad_norm"] == pytest.approx(ref_out["grad_norm"], abs=1e-5)
    _assert_trees_close(params, ref, atol=1e-5)
    assert not np.allclose(params["embed"], _params(tiny_model(tiny_config, seed=1))["embed"])


@pytest.mark.parametrize("lora", [False, True])
def test_remat_and_scanned_layers_step_equals_plain_step_on_a_sharded_mesh(tokenizer, tiny_config, lora):
    """Per-layer remat recomputes activations in backward and `scan_layers` runs the stacked
    layers through one `lax.scan`; neither may change the step's numbers, with LoRA too (frozen
    base params stay out of the rematerialised write-back), dropout included."""
    lora_cfg = LoRAConfig(rank=4, alpha=8.0, targets=["q", "v", "up"]) if lora else None
    results = {}
    for remat, scan in ((False, False), (True, False), (False, True), (True, True)):
        cfg = train_config(**STEP_CFG, remat=remat, scan_layers=scan, dropout=0.1,
                           **({"lora": lora_cfg} if lora else {}))
        model = tiny_model(tiny_config, seed=1)
        results[remat, scan] = _one_step(model, tokenizer, make_mesh(2, 2, 2), cfg, capital_examples(8))
    plain_out, plain = results[False, False]
    for key, (out, params) in results.items():
        assert out["loss"] == pytest.approx(plain_out["loss"], abs=1e-6), key
        assert out["grad_norm"] == pytest.approx(plain_out["grad_norm"], abs=1e-5), key
        _assert_trees_close(params, plain, atol=1e-5)


def test_scanned_layers_hold_one_layer_in_the_program(tokenizer, tiny_config):
    """With `scan_layers` the lowered step traces one layer body inside a loop, not num_layers."""
    from gradual_jax.models.transformer import apply_blocks, rope_inv_freq

    model = tiny_model(tiny_config, seed=1)
    x = jnp.ones((2, 5, tiny_config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    graphdef, state = nnx.split(model)

    def run(state, scan):
        m = nnx.merge(graphdef, state)
        return apply_blocks(m.layers, x, positions, rope_inv_freq(tiny_config), mask, scan=scan)

    texts = {scan: jax.jit(functools.partial(run, scan=scan)).lower(state).as_text() for scan in (False, True)}
    count = lambda text: text.count("rsqrt")  # two RMSNorms per layer body
    assert tiny_config.num_layers > 1
    assert count(texts[False]) == 2 * tiny_config.num_layers
    assert count(texts[True]) == 2 and "stablehlo.while" in texts[True]
    np.testing.assert_allclose(run(state, True), run(state, False), atol=1e-5)


def test_step_pins_activations_to_the_batch_axes(tokenizer, tiny_config):
    """Under the trainer's mesh every block output carries a batch sharding constraint."""
    model = tiny_model(tiny_config, seed=1)
    trainer = Trainer(model, tokenizer, mesh=make_mesh(2, 2, 2), progress=False, compiler_options=FAST_COMPILE)
    text = trainer.lower_step(train_config(**STEP_CFG), rows=4, seq_len=32, total_steps=10).as_text()
    constraints = text.count("sharding_constraint")
    assert constraints >= tiny_config.num_layers + 1, constraints  # embeddings + every block


def test_gradient_accumulation_equals_one_big_batch(tokenizer, tiny_config):
    examples = capital_examples(8)
    single = make_mesh(devices=jax.devices()[:1])
    big_out, big = _one_step(tiny_model(tiny_config, seed=1), tokenizer, single, train_config(**STEP_CFG), examples)
    acc_cfg = train_config(**{**STEP_CFG, "batch_size": 1, "grad_accum": 4})
    acc_out, acc = _one_step(tiny_model(tiny_config, seed=1), tokenizer, single, acc_cfg, examples)
    assert acc_out["loss"] == pytest.approx(big_out["loss"], abs=1e-6)
    assert acc_out["grad_norm"] == pytest.approx(big_out["grad_norm"], abs=1e-6)
    _assert_trees_close(acc, big, atol=1e-5)  # Adam's first step amplifies rounding where |g| ~ eps


def test_a_short_batch_cut_to_fewer_rows_steps_as_the_full_one(tokenizer, tiny_config):
    """3 examples in a 16-row batch on 4 data-parallel ways (2 micro-batches): cut to 8 rows
    (`bucket_rows`), the step's loss, gradient norm and new weights equal the full batch's."""
    examples, mesh = capital_examples(3), make_mesh(2, 2, 2)
    cfg = train_config(**{**STEP_CFG, "batch_size": 8, "grad_accum": 2})
    full_out, full = _one_step(tiny_model(tiny_config, seed=5), tokenizer, mesh, cfg, examples)
    cut_out, cut = _one_step(tiny_model(tiny_config, seed=5), tokenizer, mesh, cfg, examples, row_multiple=8)
    assert cut_out["answer_tokens"] == full_out["answer_tokens"]
    assert cut_out["loss"] == pytest.approx(full_out["loss"], abs=1e-6)
    assert cut_out["grad_norm"] == pytest.approx(full_out["grad_norm"], abs=1e-6)
    # Adam's first step is about lr * sign(g): where |g| is near its eps, rounding moves the
    # update by a fraction of lr (1e-2), so a few such weights may differ beyond 1e-5.
    x, y = np.concatenate([a.ravel() for a in jax.tree.leaves(cut)]), np.concatenate(
        [b.ravel() for b in jax.tree.leaves(full)])
    assert np.abs(x - y).max() < 1e-2 and (np.abs(x - y) > 1e-5).mean() < 1e-3


def test_lora_changes_only_lora_params(tokenizer, tiny_config):
    model = tiny_model(tiny_config, seed=3)
    base = _params(model)
    cfg = train_config(epochs=3, lora=LoRAConfig(rank=4, alpha=8.0, targets=["q", "v", "up"]))
    trainer = Trainer(model, tokenizer, progress=False, compiler_options=FAST_COMPILE)
    result = trainer.fit(capital_examples(8), [], cfg)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    _assert_trees_close(jax.tree.map(np.asarray, after), base, atol=0)  # bitwise unchanged
    b = np.asarray(model.layers[0].attn.q.lora.b[...])
    assert np.abs(b).max() > 0
    assert model.layers[0].attn.k.lora is None


def test_packed_loss_equals_unpacked(tokenizer, tiny_config):
    model = tiny_model(tiny_config, seed=4)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2, compiler_options=FAST_COMPILE)
    def loss_sums(state, batch, packed):
        return token_loss_sums(nnx.merge(graphdef, state), batch, packed=packed)

    toks = D.tokenize_examples(capital_examples(6), tokenizer, template="qa", max_seq_len=64)
    (plain,) = D.epoch_batches(toks, batch_rows=6, seed=0, epoch=0, max_seq_len=64)
    (packed,) = D.epoch_batches(toks, batch_rows=4, seed=0, epoch=0, max_seq_len=64, packing=True)
    assert (packed.segment_ids.max(axis=1) >= 2).any()  # rows really hold several examples
    s1, n1 = loss_sums(state, plain.as_dict(), False)
    # The LM head on the answer positions only gives the same loss.
    where = D.loss_positions(plain.loss_mask)
    assert where is not None and where["loss_positions"].shape[1] < plain.input_ids.shape[1]
    s2, n2 = loss_sums(state, {**plain.as_dict(), **where}, False)
    s3, n3 = loss_sums(state, {**packed.as_dict(), **D.loss_positions(packed.loss_mask)}, True)
    assert float(n1) == float(n2) == float(n3) == sum(len(t.tokens) - t.prompt_len for t in toks)
    assert float(s2) == pytest.approx(float(s1), rel=1e-5)
    assert float(s3) == pytest.approx(float(s1), rel=1e-5)


def test_early_stop_restores_best_epoch(tokenizer, tiny_config):
    model = tiny_model(tiny_config, seed=0)
    snapshots, scores = [], iter([0.2, 0.9, 0.4])

    def eval_fn(m, dev):
        assert len(dev) == 2  # dev_eval_size
        snapshots.append(_params(m))
        return next(scores)

    cfg = train_config(epochs=3, selection="early_stop", dev_eval_size=2)
    trainer = Trainer(model, tokenizer, progress=False, compiler_options=FAST_COMPILE)
    result = trainer.fit(capital_examples(8), capital_examples(5, "dev"), cfg, eval_fn=eval_fn)
    assert result.best_epoch == 2 and result.best_score == 0.9
    assert [h["dev_accuracy"] for h in result.history] == [0.2, 0.9, 0.4]
    _assert_trees_close(_params(model), snapshots[1], atol=0)


def test_bad_input_is_clear(tokenizer, tiny_config):
    model = tiny_model(tiny_config)
    trainer = Trainer(model, tokenizer, mesh=make_mesh(4, 2, 1), progress=False, compiler_options=FAST_COMPILE)
    with pytest.raises(TrainingError, match="training set is empty"):
        trainer.fit([], [], train_config())
    with pytest.raises(TrainingError, match=r"batch_size 6 does not divide over the data axes \(data=4, fsdp=2; 8 ways\)"):
        trainer.fit(capital_examples(8), [], train_config(batch_size=6))
    with pytest.raises(TrainingError, match="needs dev examples"):
        trainer.fit(capital_examples(8), [], train_config(selection="early_stop"))
    with pytest.raises(TrainingError, match="step()"):
        trainer.step(None)


def test_bf16_compute_dropout_remat_are_deterministic(tokenizer, tiny_config):
    """bf16 compute keeps fp32 master weights; dropout noise is a function of (seed, step)."""
    config = tiny_config.replace(dtype="bfloat16")
    cfg = train_config(epochs=2, dropout=0.2, remat=True)
    runs = []
    for _ in range(2):
        model = tiny_model(config, seed=5)
        trainer = Trainer(model, tokenizer, seed=3, progress=False, compiler_options=FAST_COMPILE)
        result = trainer.fit(capital_examples(8), [], cfg)
        runs.append((result, _params(model)))
        assert model.embed[...].dtype == jnp.float32
        assert model.config.dropout_rate == 0.0 and not model.config.remat  # runtime switches restored
    (r1, p1), (r2, p2) = runs
    assert np.isfinite(r1.final_loss) and r1.history[1]["train_loss"] < r1.history[0]["train_loss"]
    assert r1.final_loss == r2.final_loss
    _assert_trees_close(p1, p2, atol=0)


def test_clip_matches_optax():
    from gradual_jax.training.trainer import clip_by_global_norm

    grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([3.0, -4.0])}
    for max_norm in (0.5, 100.0):
        ours, _ = clip_by_global_norm(max_norm).update(grads, None)
        ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(x, y, rtol=1e-6)
    assert float(optax.tree.norm(clip_by_global_norm(0.5).update(grads, None)[0])) == pytest.approx(0.5)


@pytest.mark.slow
def test_default_dev_eval_uses_the_sampler(tokenizer, tiny_config):
    """fit without eval_fn measures greedy exact match through gradual_jax.sampling."""
    from train_helpers import hf_word_tokenizer

    hf = hf_word_tokenizer(tokenizer)
    assert hf("Q: What is the capital of France?\nA:")["input_ids"] == tokenizer.encode(
        "Q: What is the capital of France?\nA:")
    examples = capital_examples(8)
    model = tiny_model(tiny_config, seed=0)
    trainer = Trainer(model, hf, progress=False, compiler_options=FAST_COMPILE)
    cfg = train_config(epochs=40, selection="early_stop", eval_every_epochs=20)
    result = trainer.fit(examples, examples, cfg)
    assert [h["dev_accuracy"] for h in result.history if h["dev_accuracy"] is not None][-1] == 1.0
    assert result.best_score == 1.0


def _stage_compiles(tokenizer, tiny_config, batch_shapes: str) -> list[int]:
    """Compiles of each of two stages of a run: the first trains on a long question and some
    capitals, the second on fewer capitals (shorter batches, fewer rows)."""
    from gradual_jax.compile_stats import CompileCounter
    from gradual_jax.knowledge.data import QAExample

    long = QAExample("P36.train.long", "P36", "What is the capital of the country whose largest city "
                     "is also its capital, in Europe?", ("Paris",), "train")
    run = [long] + capital_examples(12)
    lengths = [t.length for t in D.tokenize_examples(run, tokenizer, template="qa", max_seq_len=64)]
    assert D.bucket_length(lengths[0], 64) > D.bucket_length(max(lengths[1:]), 64)
    config = dataclasses.replace(tiny_config, intermediate_size=40)  # programs no other test compiled
    shape = D.run_batch_shape(D.tokenize_examples(run, tokenizer, template="qa", max_seq_len=64),
                              batch_rows=8, max_seq_len=64)
    counts = []
    for stage in (run[:8], run[8:]):
        trainer = Trainer(tiny_model(config, seed=0), tokenizer, progress=False, compiler_options=FAST_COMPILE)
        with CompileCounter() as compiles:
            trainer.fit(stage, [], train_config(epochs=1, batch_size=8, max_seq_len=64,
                                                     batch_shapes=batch_shapes),
                        batch_shape=shape if batch_shapes == "fixed" else None)
        counts.append(compiles.count)
    return counts


def test_stages_of_a_run_share_one_compiled_step_in_fixed_shapes(tokenizer, tiny_config):
    first, second = _stage_compiles(tokenizer, tiny_config, "fixed")
    assert first > 0 and second == 0
    # Bucketed batches of the shorter stage compile a step of their own.
    _, second = _stage_compiles(tokenizer, tiny_config, "bucketed")
    assert second > 0


def _optax_reference(model, tokenizer, cfg, examples, schedule):
    """The params after ``cfg.epochs`` epochs of a plain optax loop: clipping then AdamW on
    ``schedule``, over the batches ``fit`` makes (its run shape, its order)."""
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                                 mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    opt = tx.init(params)
    toks = D.tokenize_examples(examples, tokenizer, template=cfg.template, max_seq_len=cfg.max_seq_len)
    shape = D.run_batch_shape(toks, batch_rows=cfg.batch_size, max_seq_len=cfg.max_seq_len)

    def loss(p, batch):
        total = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        return token_loss_sums(nnx.merge(graphdef, p), batch, packed=False)[0] / total

    for epoch in range(cfg.epochs):
        for batch in D.epoch_batches(toks, batch_rows=cfg.batch_size, seed=0, epoch=epoch,
                                     max_seq_len=cfg.max_seq_len, shape=shape):
            arrays = {**batch.as_dict(), **(D.loss_positions(batch.loss_mask, batch.loss_tokens) or {})}
            grads = jax.grad(loss)(params, {k: jnp.asarray(v) for k, v in arrays.items()})
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def test_learning_rate_schedule_and_decay_are_step_arguments_equal_to_optax(tokenizer, tiny_config):
    """Stages of other learning rates, schedules, lengths and weight decay run one compiled step,
    and each trains as a plain optax loop on its own schedule does."""
    from gradual_jax.compile_stats import CompileCounter

    config = dataclasses.replace(tiny_config, intermediate_size=48)  # programs no other test compiled
    examples = capital_examples(8)
    stages = [(dict(lr=1e-2, epochs=2, weight_decay=0.0, schedule="constant", warmup_steps=0),
               optax.constant_schedule(1e-2)),
              (dict(lr=3e-3, epochs=3, weight_decay=0.1, schedule="cosine", warmup_steps=2),
               optax.warmup_cosine_decay_schedule(0.0, 3e-3, 2, 6, end_value=0.0))]
    compiles = []
    for settings, schedule in stages:
        cfg = train_config(batch_size=4, clip_norm=0.5, **settings)
        model = tiny_model(config, seed=2)
        reference = _optax_reference(tiny_model(config, seed=2), tokenizer, cfg, examples, schedule)
        trainer = Trainer(model, tokenizer, mesh=make_mesh(devices=jax.devices()[:1]), progress=False,
                          compiler_options=FAST_COMPILE)
        with CompileCounter() as counter:
            result = trainer.fit(examples, [], cfg)
        compiles.append(counter.count)
        assert result.steps == 2 * cfg.epochs
        _assert_trees_close(_params(model), reference, atol=5e-5)  # a missed decay step moves 1e-4
    assert compiles[0] > 0 and compiles[1] == 0
