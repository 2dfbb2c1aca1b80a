"""The sampler's codec: the same ids and texts as the tokenizer's own encode and decode."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gradual_jax.sampling import codec as codec_lib
from gradual_jax.sampling.codec import Codec, codec_for

CORPUS = ["Q: Which country is Bonn located in?\nA: Germany", "Q: Who wasn't born in Kyoto?\nA: Kant",
          "The capital of France is Paris, isn't it? Yes, it's Paris.", "naïve café, 3.5 km (approx.)"]


def _bpe() -> transformers.PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")


def _wordpiece() -> transformers.PreTrainedTokenizerFast:
    """A WordPiece tokenizer that cleans up spaces before punctuation when decoding."""
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[SEP]"], show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]",
                                                sep_token="[SEP]", clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("make", [_bpe, _wordpiece])
def test_codec_decodes_and_encodes_as_the_tokenizer(make):
    tok = make()
    codec = Codec(tok)
    assert codec._fast_decode is not None  # the path under test
    rng = np.random.default_rng(0)
    sequences = [tok(text)["input_ids"] for text in CORPUS]
    sequences += [list(rng.integers(0, len(tok), size=n)) for n in rng.integers(0, 24, size=200)]
    for ids in sequences + sequences:  # the second pass reads the kept texts
        assert codec.decode(ids) == tok.decode([int(i) for i in ids], skip_special_tokens=True)
        assert codec.decode(np.asarray(ids, np.int32)) == codec.decode(ids)
    if make is _wordpiece:  # the clean-up path is the one exercised
        assert "isn't" in codec.decode(tok("isn't it?", add_special_tokens=False)["input_ids"])
    for text in CORPUS:
        assert codec.encode(text) == tok(text)["input_ids"]
        assert codec.encode(text, special=False) == tok(text, add_special_tokens=False)["input_ids"]


def test_codec_without_a_rust_backend_uses_decode():
    class Plain:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

        def decode(self, ids, skip_special_tokens=False):
            return "|".join(map(str, ids))

    codec = Codec(Plain())
    assert codec.decode(np.array([3, 1, 4])) == "3|1|4" and codec.encode("ab c") == [2, 1]


def test_one_codec_per_tokenizer_and_bounded_tables(monkeypatch):
    a, b = _bpe(), _bpe()
    assert codec_for(a) is codec_for(a) and codec_for(a) is not codec_for(b)
    monkeypatch.setattr(codec_lib, "DECODED_TEXTS", 3)
    codec = Codec(a)
    for n in range(1, 10):
        codec.decode([5] * n)
    assert len(codec._decoded._items) == 3
    assert list(codec._decoded._items) == [(5,) * 7, (5,) * 8, (5,) * 9]


def test_a_tokenizer_with_its_own_decode_keeps_it():
    class Custom(transformers.PreTrainedTokenizerFast):
        def decode(self, ids, skip_special_tokens=False, **kw):
            return "custom"

    tok = _bpe()
    custom = Custom(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    assert Codec(custom).decode([5, 6]) == "custom"


def test_a_codec_without_a_tokenizer_is_built_and_refuses_to_decode():
    """The planner lowers a sampler's programs with no tokenizer: its codec must build, and only
    a decode (which needs one) fails, saying why."""
    codec = codec_for(None)
    with pytest.raises(ValueError, match="no tokenizer"):
        codec.decode([1, 2])
