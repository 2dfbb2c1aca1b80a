"""A plain transformers (PyTorch) answer engine: the reference our JAX probe is checked against.

It is what a researcher would write by hand: prompt by prompt, `generate(do_sample=False)` for the
greedy answer and `generate(do_sample=True, num_return_sequences=n)` for the samples. It serves
the parity tests and the benchmarks' baseline; it is not meant to be fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class TransformersEngine:
    """`AnswerEngine` over a transformers causal LM and its tokenizer (CPU, fp32)."""

    def __init__(self, model: Any, tokenizer: Any, *, stop: str = "\n"):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop = stop
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _encode(self, prompt: str):
        return self.tokenizer(prompt, return_tensors="pt")

    def _decode_new(self, out, n_prompt: int) -> list[str]:
        return [self.tokenizer.decode(row[n_prompt:], skip_special_tokens=True) for row in out]

    def greedy(self, prompts: Sequence[tuple[str, str]], max_new_tokens: int) -> list[str]:
        answers = []
        with self.torch.no_grad():
            for prefix, suffix in prompts:
                enc = self._encode(prefix + suffix)
                out = self.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                          stop_strings=[self.stop], tokenizer=self.tokenizer,
                                          pad_token_id=self.pad_id)
                answers.append(self._decode_new(out, enc["input_ids"].shape[1])[0])
        return answers

    def sample(self, prompts: Sequence[tuple[str, str]], n: int, seeds: Sequence[int], *,
               temperature: float, top_k: int, max_new_tokens: int,
               answers: Sequence[Sequence[str]] | None = None,
               first_answer_only: bool = False) -> list[list[str]]:
        """Every sample generated to its end (`answers` is not used to stop early)."""
        results = []
        with self.torch.no_grad():
            for (prefix, suffix), seed in zip(prompts, seeds):
                self.torch.manual_seed(seed)
                enc = self._encode(prefix + suffix)
                out = self.model.generate(**enc, do_sample=True, temperature=temperature,
                                          top_k=top_k or None, top_p=1.0,
                                          num_return_sequences=n, max_new_tokens=max_new_tokens,
                                          stop_strings=[self.stop], tokenizer=self.tokenizer,
                                          pad_token_id=self.pad_id)
                results.append(self._decode_new(out, enc["input_ids"].shape[1]))
        return results

    def _eos_ids(self) -> list[int]:
        """The tokens `generate` ends a sequence at: the generation config's EOS and the
        tokenizer's."""
        ids = set()
        for eos in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        return sorted(int(i) for i in ids)

    def answer_probability(self, prompts: Sequence[tuple[str, str]],
                           continuations: Sequence[Sequence[str]], *, temperature: float,
                           top_k: int, answered: bool = True) -> list[list[float]]:
        """Chance that one sample is exactly each continuation text (top-k renormalised, 0
        outside), ended there: the text then the stop string, plus the text then each EOS.
        `answered` is not used (every continuation is scored)."""
        torch = self.torch
        out = []
        with torch.no_grad():
            for (prefix, suffix), conts in zip(prompts, continuations):
                prompt = prefix + suffix
                n_prompt = len(self.tokenizer(prompt)["input_ids"])
                probs = []
                for c in conts:
                    endings = [self.tokenizer(prompt + c + self.stop)["input_ids"]]
                    endings += [self.tokenizer(prompt + c)["input_ids"] + [e] for e in self._eos_ids()]
                    chance = 0.0
                    for ids in endings:
                        ids = torch.tensor([ids])
                        logits = self.model(ids).logits[0, n_prompt - 1:-1].float() / temperature
                        target = ids[0, n_prompt:]
                        if top_k:
                            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                            logits = logits.masked_fill(logits < kth, float("-inf"))
                        logp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
                        chance += float(np.exp(logp.sum().item()))
                    probs.append(chance)
                out.append(probs)
        return out
