"""Helpers shared by the training tests: a word-level tokenizer, tiny QA sets, train configs."""

from __future__ import annotations

import functools
import re

import jax
from flax import nnx

from gradual_jax.training.config import LoRAConfig, TrainConfig
from gradual_jax.knowledge.data import QAExample
from gradual_jax.models.transformer import ModelConfig, Transformer

# Tiny models: LLVM optimisation costs far more compile time than it saves at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

_TOKEN = re.compile(r"\n|\s+|\w+|[^\w\s]")

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"),
            ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo"),
            ("Norway", "Oslo"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad")]


class WordTokenizer:
    """Words, punctuation and whitespace runs are tokens; 0 pad, 1 BOS, 2 EOS, 3 unknown."""

    def __init__(self, texts):
        vocab = ["<pad>", "<s>", "</s>", "<unk>"]
        for text in texts:
            for tok in _TOKEN.findall(text):
                if tok not in vocab:
                    vocab.append(tok)
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.eos_token_id, self.bos_token_id, self.pad_token_id = 2, 1, 0

    def encode(self, text, add_special_tokens=True):
        ids = [self.ids.get(t, 3) for t in _TOKEN.findall(text)]
        return ([1] + ids) if add_special_tokens else ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids if i > 3)


def capital_examples(n=8, split="train"):
    return [QAExample(f"P36.{split}.{i}", "P36", f"What is the capital of {c}?", (a,), split, c)
            for i, (c, a) in enumerate(CAPITALS[:n])]


def train_config(**kw) -> TrainConfig:
    lora = kw.pop("lora", None)
    base = dict(lr=1e-2, epochs=1, batch_size=8, grad_accum=1, warmup_steps=0, schedule="constant",
                weight_decay=0.0, clip_norm=1.0, dropout=0.0, remat=False, template="qa", max_seq_len=32,
                selection="convergence", eval_every_epochs=1, dev_eval_size=256, packing=False)
    base.update(kw)
    return TrainConfig(**base, lora=lora or LoRAConfig())


@functools.cache
def _jitted_init(config: ModelConfig):
    def init(key):
        return nnx.split(Transformer(config, rngs=nnx.Rngs(params=key)))[1]

    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))[0]
    return graphdef, jax.jit(init, compiler_options=FAST_COMPILE)


def tiny_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """``init_model(config, seed)``'s distribution, built by one cached jitted function
    (eager init compiles every random op separately: seconds per fresh process)."""
    graphdef, init = _jitted_init(config)
    return nnx.merge(graphdef, init(jax.random.key(seed)))


def hf_word_tokenizer(word_tokenizer: WordTokenizer):
    """The same vocabulary as a transformers fast tokenizer (what the sampler expects)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(word_tokenizer.ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN.pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
