"""Text to token ids and back for the sampler, remembered per tokenizer.

A probe asks the same prompts and gold answers in several phases and again for every stage's
model (each a new `Sampler`), and the host's checks of generated rows (stop strings, whether a
sample can still match) decode the same prompt-plus-answer ids over and over. `codec_for`
gives every sampler of one tokenizer the same `Codec`, whose tables outlive the samplers.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Sequence
from typing import Any

ENCODED_TEXTS = 20_000   # texts (prompts, continuations) whose token ids a codec keeps
DECODED_TEXTS = 50_000   # id sequences whose text a codec keeps


class _Lru:
    """A bounded dict that forgets the least recently used entry (thread-safe)."""

    def __init__(self, size: int):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class Codec:
    """`tokenizer`'s encode and decode as the sampler uses them, each answer kept.

    `decode` equals `tokenizer.decode(ids, skip_special_tokens=True)`. For transformers'
    tokenizers backed by the Rust library it calls their `_decode`, the step that `decode` runs
    after converting its argument to Python objects element by element (in a probe that
    conversion cost more than the decoding itself)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._encoded = _Lru(ENCODED_TEXTS)
        self._decoded = _Lru(DECODED_TEXTS)
        self._fast_decode = tokenizer._decode if _decode_is_the_base_one(tokenizer) else None
        # A sampler built only to lower its programs (the planner's) has no tokenizer.
        self._decode = self._fast_decode or getattr(tokenizer, "decode", None)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's default special tokens (`special`) or none."""
        kwargs = {} if special else {"add_special_tokens": False}
        return list(self._encoded.get((text, special), lambda: tuple(self.tokenizer(text, **kwargs)["input_ids"])))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (Python ints or numpy integers), special tokens skipped."""
        if self._decode is None:
            raise ValueError("this codec has no tokenizer to decode with")
        key = tuple(ids.tolist() if hasattr(ids, "tolist") else ids)
        return self._decoded.get(key, lambda: self._decode(list(key), skip_special_tokens=True))


def _decode_is_the_base_one(tokenizer: Any) -> bool:
    """Whether `tokenizer` is a Rust-backed transformers tokenizer whose `decode` is the base
    class's (argument conversion, then `_decode`): a class with its own `decode` keeps it."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not hasattr(tokenizer, "_decode"):
        return False
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase) and type(tokenizer).decode is PreTrainedTokenizerBase.decode


_CODECS: "weakref.WeakKeyDictionary[Any, Codec]" = weakref.WeakKeyDictionary()
_CODECS_LOCK = threading.Lock()


def codec_for(tokenizer: Any) -> Codec:
    """The one `Codec` of `tokenizer` (a new one for an object that cannot be weakly referenced)."""
    with _CODECS_LOCK:
        try:
            codec = _CODECS.get(tokenizer)
            if codec is None:
                codec = _CODECS[tokenizer] = Codec(tokenizer)
            return codec
        except TypeError:  # not hashable or not weakly referenceable
            return Codec(tokenizer)
