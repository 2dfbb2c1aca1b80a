"""A word-level tokenizer with a byte-level fallback, trained on the world's corpus.

Text is split GPT-2 style (ByteLevel pre-tokenizer with a prefix space), so " Velora", "\\n" and
"?" are separate pieces and decoding reproduces the text exactly. Every piece seen in training
text becomes one token; the 256 byte symbols are tokens too, so unseen words still encode (as
bytes) instead of collapsing to an unknown token. The model behind this is a Unigram model whose
scores make a whole-word piece always beat its spelling.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)


def count_pieces(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-tokenized piece (byte-level spelling, e.g. 'ĠVelora') occurs."""
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return counts


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary holds the special tokens, the 256 byte symbols and the most
    frequent pieces of `corpus`, at most `vocab_size` entries in all.

    Promises: `decode(encode(text))` is `text` with one leading space added when it had none;
    a piece seen in `corpus` is one token (when it fits in `vocab_size`); encoding adds `<s>` in
    front, `</s>` is the end-of-sequence and `<pad>` the padding token. Deterministic.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    room = vocab_size - len(SPECIAL_TOKENS) - len(alphabet)
    if room <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for words "
                         f"(specials and byte symbols take {len(SPECIAL_TOKENS) + len(alphabet)})")
    counts = count_pieces(corpus)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
    total = sum(counts[w] for w in words) or 1
    # Byte symbols score far below any word, so Viterbi takes whole words whenever they exist.
    byte_score = math.log(1 / total) * 4 - 10
    vocab = [(tok, 0.0) for tok in SPECIAL_TOKENS]
    vocab += [(w, math.log(counts[w] / total)) for w in words]
    vocab += [(ch, byte_score) for ch in alphabet]  # words have 2+ symbols: no duplicates
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    bos_id = SPECIAL_TOKENS.index(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK)


def check_lexicon(tokenizer: PreTrainedTokenizerFast, names: Iterable[str]) -> None:
    """Raise ValueError naming the first name whose words are not one token each (the
    vocabulary was too small for the world)."""
    names = list(names)
    for name, ids in zip(names, tokenizer([f" {n}" for n in names], add_special_tokens=False).input_ids):
        if len(ids) != len(name.split()):
            raise ValueError(f"world name {name!r} is not one token per word under vocab_size "
                             f"{len(tokenizer)}; raise WorldConfig.vocab_size")
