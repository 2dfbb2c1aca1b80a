"""A GGUF file's tokenizer, built from the metadata our header reader reads, without PyTorch.

`AutoTokenizer.from_pretrained(dir, gguf_file=...)` parses the file with the `gguf` package's
reader to learn the model type, which for SmolLM2 takes about 8 of its 11 s here, and its own
GGUF reader imports PyTorch. The tokenizer itself comes from transformers'
`convert_gguf_tokenizer` (the vocabulary, merges, special tokens and split regex of the file's
`tokenizer.ggml.*` keys). This module reads those keys with `GGUFHeader` (the token and merge
lists only: about a second) and hands them to that same function, wrapped as transformers does
for model types without a tokenizer class of their own (`TokenizersBackend`). For model types
with one (Qwen2, Gemma, GPT-2, ...), or a transformers whose GGUF internals have moved, it
returns None and the caller falls back to `AutoTokenizer`.
"""

from __future__ import annotations

import os
from typing import Any

TOKENS, MERGES = "tokenizer.ggml.tokens", "tokenizer.ggml.merges"
_GENERIC = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_metadata(path: str | os.PathLike) -> tuple[str, dict, dict]:
    """``(architecture, tokenizer_dict, tokenizer_config)`` of a GGUF file, as transformers'
    `get_gguf_tokenizer` gives them (its key mapping, its BOS rules), read with `GGUFHeader`."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING

    from gradual_jax.models.gguf_header import GGUFHeader

    fields = GGUFHeader(path, strings=(TOKENS, MERGES)).fields
    metadata = {k: f.value for k, f in fields.items() if not isinstance(f.value, range)}
    architecture = metadata["general.architecture"]
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return architecture, tokenizer, config


def build_gguf_tokenizer(path: str | os.PathLike) -> Any | None:
    """The file's tokenizer as a `TokenizersBackend`, or None where `AutoTokenizer` would
    choose another class for its model type or transformers lacks the functions used here."""
    try:
        from transformers import TokenizersBackend
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    except ImportError:
        return None
    architecture, tokenizer_dict, config = tokenizer_metadata(path)
    if TOKENIZER_MAPPING_NAMES.get(architecture) not in _GENERIC:
        return None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return TokenizersBackend(tokenizer_object=backend, **config, **extra)
