"""The host side of decoding: run decode chunks to the end, compact finished rows away, and
turn each row's record into a `Generation`.

`DecodeLoop` is a mixin of `Sampler`: it uses the sampler's compiled programs (`_compile`,
`_decode_fn`, `_gather_fn`), placement (`_put`, `_dp`), tokenizer (`_decode`), `_eos`, `chunk`,
`compact` and `stats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from gradual_jax.sampling.kernels import DECODE_DONATE, Decoding, Policy
from gradual_jax.sampling.packing import compact_target
from gradual_jax.sampling.records import Generation


class DecodeLoop:
    """Decode chunks between host checks (stop strings across tokens, compaction)."""

    state: Any
    stats: Any
    chunk: int
    compact: bool
    _eos: tuple[int, ...]

    def _decode_args(self, d: Decoding, table: jax.Array, limit: int) -> tuple:
        """The decode program's arguments: run until step `limit` (or every row is done)."""
        return (self.state, d, table, self._put_replicated(np.int32(limit)))

    def _decode_loop(self, d: Decoding, row_ids: np.ndarray, new_tokens: int,
                     stop: tuple[str, ...], table: jax.Array,
                     policy: Policy) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Run decode chunks to the end; (tokens, logp, raw_logp) per original row."""
        results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        spanning = any(len(s.encode()) > 1 for s in stop)
        while True:
            step = int(d.step)
            done = np.asarray(d.done)
            if spanning:
                d, done = self._check_spanning_stops(d, done, stop)
            if done.all() or step >= new_tokens:
                self._collect(d, row_ids, results, np.ones_like(done))
                return results
            live = np.flatnonzero(~done)
            target = compact_target(len(live), self._dp())
            if self.compact and target <= len(done) // 2:
                d, row_ids = self._compact(d, row_ids, live, target, results, done)
            args = self._decode_args(d, table, min(step + self.chunk, new_tokens))
            d = self._compile("decode", self._decode_fn, args, dict(policy=policy), donate=DECODE_DONATE)(*args)
            taken = int(d.step) - step
            self.stats.decode_steps += taken
            self.stats.decode_row_steps += taken * len(row_ids)
            self.stats.logit_rows += taken * len(row_ids)

    def _compact(self, d: Decoding, row_ids: np.ndarray, live: np.ndarray, target: int,
                 results: dict, done: np.ndarray) -> tuple[Decoding, np.ndarray]:
        """Keep only the live rows (padded to `target` with copies marked done)."""
        self._collect(d, row_ids, results, done)
        index = np.concatenate([live, np.full(target - len(live), live[0])]).astype(np.int32)
        valid = np.arange(target) < len(live)
        args = (d, self._put(index), self._put(valid))
        d = self._compile("gather", self._gather_fn, args, {})(*args)
        self.stats.compactions += 1
        return d, np.where(valid, row_ids[index], -1)

    @staticmethod
    def _collect(d: Decoding, row_ids: np.ndarray, results: dict, which: np.ndarray) -> None:
        tokens, logp, raw = (np.asarray(a) for a in (d.tokens, d.logp, d.raw_logp))
        for r in np.flatnonzero(which):
            if row_ids[r] >= 0 and row_ids[r] not in results:
                results[int(row_ids[r])] = (tokens[r], logp[r], raw[r])

    def _check_spanning_stops(self, d: Decoding, done: np.ndarray,
                              stop: tuple[str, ...]) -> tuple[Decoding, np.ndarray]:
        """Mark rows whose text contains a stop string made of several tokens."""
        tokens = np.asarray(d.tokens)
        hit = np.array([not done[r] and any(s in self._decode(tokens[r][tokens[r] >= 0]) for s in stop)
                        for r in range(len(done))])
        if hit.any():
            done = done | hit
            d = dataclasses.replace(d, done=self._put(done))
        return d, done

    def _finish(self, head: str, prompt: list[int], tokens: np.ndarray, logp: np.ndarray,
                raw: np.ndarray, stop: tuple[str, ...]) -> Generation:
        """Cut a row's record after its stopping token and its text before the stop string
        (`head`: the prompt's decoded text)."""
        ids = [int(t) for t in tokens if t >= 0]
        reason, end = "length", len(ids)
        eos = next((i for i, t in enumerate(ids) if t in self._eos), None)
        if eos is not None:
            reason, end = "eos", eos + 1
        text = self._text(head, prompt, ids[:eos] if eos is not None else ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            reason, text = "stop", text[:cut]
            end = next(i for i in range(1, end + 1)
                       if any(s in self._text(head, prompt, ids[:i]) for s in stop))
        return Generation(text=text, token_ids=tuple(ids[:end]),
                          logprobs=tuple(float(x) for x in logp[:end]),
                          raw_logprobs=tuple(float(x) for x in raw[:end]), finish_reason=reason)

    def _text(self, head: str, prompt: list[int], ids: list[int]) -> str:
        """Text of `ids` as it reads after the prompt (SentencePiece keeps the leading space)."""
        full = self._decode(prompt + ids)
        return full[len(head):] if full.startswith(head) else self._decode(ids)
