"""Teacher-forced scoring: the log-probs of given continuations after their prompts.

Each distinct (prefix, tail) is a trunk; every continuation scored after it is a branch of its
own, attending to the trunk and to itself only. Trunks with their branches are packed end to end
into rows of one fixed width against their stored prefixes (`plan_score_batch`, host only), so
scoring runs in the engine's fixed shapes whatever the continuations.

`Scoring` is a mixin of `Sampler`: it uses the sampler's splitting and tokenizer (`_split`,
`_encode_plain`, `_validate_lengths`), shapes (`prepare`), prefix store (`_preload`,
`_store_rows`), placement and compiled programs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gradual_jax.sampling.first_tokens import excluded
from gradual_jax.sampling.kernels import score_program
from gradual_jax.sampling.methods import check_prompts, check_sampling
from gradual_jax.sampling.packing import DEFAULT_BATCH_SIZE, Split, pack_rows
from gradual_jax.sampling.records import TokenScores
from gradual_jax.sampling.serial import serialized

Trunk = tuple[tuple[int, ...], tuple[int, ...]]  # (stored prefix, tail)


def plan_score_batch(pending: list[tuple[Trunk, list[int]]], conts: Sequence[Sequence[int]], *,
                     width: int, budget: int) -> tuple[list[tuple[Trunk, list[int]]],
                                                       list[list[int]], list[list[int]], list[list[int]]]:
    """The next trunks to score together, in order: (take, tokens, positions, branches).

    `pending`: (trunk, indices of its continuations in `conts`) still to score. Each taken trunk
    takes as many of its continuations, in order, as fit after its tail in `width` tokens, and
    all together take at most `budget` continuation tokens (the positions one call reads). A
    trunk row's tokens are the tail then each continuation; positions restart after the tail
    for every continuation (each is read as if it alone followed the tail); branch 0 is the
    tail, branch j the j-th continuation.
    """
    take, used, spent = [], 0, False
    for key, members in pending:
        room, fit = width - len(key[1]), []
        for i in members:
            if used + len(conts[i]) > budget:
                spent = True
                break
            if len(conts[i]) > room:
                break
            fit.append(i)
            room -= len(conts[i])
            used += len(conts[i])
        if not fit:
            break
        take.append((key, fit))
        if spent:
            break
    tokens, positions, branches = [], [], []
    for (_, tail), members in take:
        seq, p, b = list(tail), list(range(len(tail))), [0] * len(tail)
        for j, i in enumerate(members, start=1):
            seq += conts[i]
            p += range(len(tail), len(tail) + len(conts[i]))
            b += [j] * len(conts[i])
        tokens.append(seq)
        positions.append(p)
        branches.append(b)
    return take, tokens, positions, branches


def remaining(pending: list[tuple[Trunk, list[int]]],
              taken: list[tuple[Trunk, list[int]]]) -> list[tuple[Trunk, list[int]]]:
    """`pending` less the continuations in `taken` (a trunk with none left drops out)."""
    done = dict(taken)
    rest = []
    for key, members in pending:
        left = members[len(done[key]):] if key in done else members
        if left:
            rest.append((key, left))
    return rest


class Scoring:
    """`Sampler.score` and its program's arguments."""

    @serialized
    def score(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]], *,
              temperature: float = 1.0, top_k: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
              prefix: str | Sequence[str] = "") -> list[TokenScores]:
        """Teacher-forced log-probs of each continuation after its prompt (see `TokenScores`).

        A string continuation is tokenized on its own without special tokens (as the sampler
        appends generated tokens to a prompt); pass `Generation.token_ids` to score exactly
        what was generated. Temperature 0 scores 0 for the argmax token and -inf elsewhere.
        `prefix`: as in `generate_batch`.
        """
        splits, conts = self._scoring_input(prompts, continuations, temperature, top_k, batch_size, prefix)
        out: list[TokenScores] = [TokenScores((), (), ())] * len(conts)
        self._score_splits(splits, conts, [i for i, c in enumerate(conts) if c], temperature,
                           top_k, batch_size, out)
        return out

    def endings(self, text: str, stop: Sequence[str]) -> list[list[int]]:
        """The token sequences after which a generation with stop strings `stop` has returned
        exactly `text` and ended: `text` followed by each stop string, and `text` followed by
        each EOS token, each in its tokenizer's own (canonical) tokenization; no duplicates."""
        out: list[list[int]] = []
        for seq in [self._encode_plain(text + s) for s in stop if s] + \
                   [self._encode_plain(text) + [e] for e in self._eos]:
            if seq not in out:
                out.append(seq)
        return out

    @serialized
    def sample_probability(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]], *,
                           temperature: float, top_k: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                           prefix: str | Sequence[str] = "", stop: Sequence[str] | None = None,
                           skip_unreachable: bool = True) -> list[float]:
        """The chance that one sample of each prompt at `temperature` and `top_k` is exactly its
        continuation: `exp(sum(logprobs))` of `score` (0 for an empty continuation).

        With `stop` (the stop strings a generation would be given), each continuation is a text
        and the chance is that of a generation returning exactly that text: the sum over its
        `endings` (the text then a stop string, or then an EOS token), each a distinct sample.

        A continuation whose first token the sampling distribution excludes (outside the
        top-k, or not the argmax at temperature 0) has chance 0 whatever follows, and is not
        scored (`stats.scores_skipped` counts them); the rest are. The prompts' best next-token
        logits come from the sampler's last prefill of each (`first_tokens`: a generation call
        since the weights last changed, as the probe's greedy pass right before); prompts it
        has not prefilled are prefilled first (one greedy token), so which continuations are
        scored, and so the packing and every result, depend on this call's arguments only.
        `skip_unreachable=False` scores every continuation and prefills nothing: the same
        chances (0 where the first token is excluded) up to float rounding, cheaper where no
        generation call has just prefilled the prompts (a one-token generation of each prompt
        costs more than the scoring it saves)."""
        if stop is not None:
            if isinstance(continuations, str) or not all(isinstance(c, str) for c in continuations):
                raise ValueError("with stop, every continuation must be a text")
            if len(continuations) != len(prompts):
                raise ValueError(f"need one continuation per prompt ({len(prompts)})")
            owner, seqs, alts = [], [], []
            merged = {c: self._merged_endings(c, stop) for c in set(continuations)}  # a text per prompt
            for i, c in enumerate(continuations):
                for seq, alt in merged[c]:
                    owner.append(i)
                    seqs.append(seq)
                    alts.append(alt)
            pres = [prefix] * len(prompts) if isinstance(prefix, str) else list(prefix)
            chances = self._chances([prompts[i] for i in owner], seqs, alts, temperature, top_k, batch_size,
                                    [pres[i] for i in owner], skip_unreachable)
            total = [0.0] * len(continuations)
            for i, p in zip(owner, chances):
                total[i] += p
            return total
        return self._chances(prompts, continuations, None, temperature, top_k, batch_size, prefix,
                             skip_unreachable)

    def _merged_endings(self, text: str, stop: Sequence[str]) -> list[tuple[list[int], tuple[int, int] | None]]:
        """`endings(text, stop)` with the first EOS ending read off the first stop string's
        sequence where that sequence is the text's own tokens and then more: (sequence,
        (position, EOS) or None). One branch then gives both chances, P(text) times P(stop |
        text) and P(text) times P(EOS | text), at the cost of one."""
        ends = self.endings(text, stop)
        text_ids = self._encode_plain(text)
        m = len(text_ids)
        first = self._encode_plain(text + stop[0]) if stop and stop[0] else None
        if not self._eos or first is None or m == 0 or len(first) <= m or first[:m] != text_ids:
            return [(e, None) for e in ends]
        eos = text_ids + [self._eos[0]]
        return [(first, (m, self._eos[0]))] + [(e, None) for e in ends if e != first and e != eos]

    def _chances(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]],
                 alts: Sequence[tuple[int, int] | None] | None, temperature: float, top_k: int,
                 batch_size: int, prefix: str | Sequence[str], skip_unreachable: bool) -> list[float]:
        """`sample_probability` of token continuations; with `alts`, each continuation's chance
        plus, where it names (position j, token t), the chance of its first j tokens then t."""
        splits, conts = self._scoring_input(prompts, continuations, temperature, top_k, batch_size, prefix)
        todo = [i for i, c in enumerate(conts) if c]
        if skip_unreachable and (temperature <= 0 or 0 < top_k <= self._policy.k_cap):
            keys = {i: (splits[i].prefix, splits[i].tail) for i in todo}
            # one prompt of each key not prefilled yet (a prompt is often asked with several
            # continuations)
            unseen = {k: i for i, k in keys.items() if self._first_tokens.get(k) is None}
            if unseen:
                pres = [prefix] * len(splits) if isinstance(prefix, str) else list(prefix)
                self.generate_batch([prompts[i] for i in unseen.values()],
                                    prefix=[pres[i] for i in unseen.values()], max_new_tokens=1,
                                    batch_size=batch_size)
            seen = {i: self._first_tokens.get(keys[i]) for i in todo}  # None only past its capacity
            kept = [i for i in todo if seen[i] is None
                    or not excluded(*seen[i], conts[i][0], temperature=temperature, top_k=top_k,
                                    margin=self._exclusion_margin)]
            self.stats.scores_skipped += len(todo) - len(kept)
            todo = kept
        out: list[TokenScores] = [TokenScores((), (), ())] * len(conts)
        alt_at = {i: a for i, a in enumerate(alts or []) if a is not None}
        alt_lp: dict[int, float] = {}
        self._score_splits(splits, conts, todo, temperature, top_k, batch_size, out, alt_at, alt_lp)
        return [sequence_chance(sc.logprobs, alt_at.get(i), alt_lp.get(i)) for i, sc in enumerate(out)]

    def _scoring_input(self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]],
                       temperature: float, top_k: int, batch_size: int,
                       prefix: str | Sequence[str]) -> tuple[list[Split], list[list[int]]]:
        """A scoring call's arguments checked: the prompts split, the continuations tokenized."""
        prompts = check_prompts(prompts)
        if isinstance(continuations, str) or len(continuations) != len(prompts):
            raise ValueError(f"need one continuation per prompt ({len(prompts)})")
        check_sampling(temperature, top_k, 1.0)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        splits = self._split(prompts, prefix, None)
        conts = [self._encode_plain(c) if isinstance(c, str) else [int(t) for t in c]
                 for c in continuations]
        self._validate_lengths(splits, [len(c) for c in conts])
        return splits, conts

    def _score_splits(self, splits: list[Split], conts: list[list[int]], todo: list[int],
                      temperature: float, top_k: int, batch_size: int, out: list[TokenScores],
                      alt_at: dict[int, tuple[int, int]] | None = None,
                      alt_lp: dict[int, float] | None = None) -> None:
        """Score continuations `todo` (indices into `splits` and `conts`, each non-empty) into
        `out`; where `alt_at` names (position j, token t) for a continuation, the sampled
        log-prob of t in place of its token j into `alt_lp`."""
        if not todo:
            return
        longest = max(len(splits[i].tail) + len(conts[i]) for i in todo)
        sh = self.prepare(batch_size=batch_size, longest_prefix=max(len(s.prefix) for s in splits),
                          longest_tail=1, new_tokens=1, longest_scored=longest,
                          longest_continuation=max(len(conts[i]) for i in todo), k_cap=top_k)
        if sh.score_width < longest:
            raise AssertionError("score shapes do not cover the work")
        groups: dict[Trunk, list[int]] = {}
        for i in sorted(todo, key=lambda i: (splits[i].prefix, splits[i].tail)):
            groups.setdefault((splits[i].prefix, splits[i].tail), []).append(i)
        pending = list(groups.items())
        self._preload([key[0] for key, _ in pending])
        while pending:
            take, tokens, positions, branches = plan_score_batch(
                pending, conts, width=sh.score_width, budget=sh.score_tokens)
            packed, count = pack_rows(tokens, [k[0] for k, _ in take], sh.score_rows, sh.score_width,
                                      len(take), positions, branches)
            take = take[:count]
            pending = remaining(pending, take)
            self._score_packed(packed, take, conts, temperature, top_k, out, alt_at or {}, alt_lp)

    def _score_packed(self, packed: Any, take: list, conts: list[list[int]], temperature: float,
                      top_k: int, out: list[TokenScores], alt_at: dict[int, tuple[int, int]],
                      alt_lp: dict[int, float] | None) -> None:
        """Score one packing of trunks (prompt tails) with their branches (continuations)."""
        sh = self.shapes
        store_rows = self._store_rows([p for p in packed.prefix if p is not None])
        prefix_rows = np.array([store_rows[p] if p is not None else 0 for p in packed.prefix], np.int32)
        n = sh.score_tokens
        cont, row, at = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        alt = np.full(n, -1, np.int32)
        k, spans = 0, []  # (continuation, first read position, length)
        for g, ((_, tail), members) in enumerate(take):
            start, offset = int(packed.col[g]), len(tail)
            for i in members:
                c = conts[i]
                cont[k:k + len(c)] = c
                row[k:k + len(c)] = packed.row[g]
                # token 0 is predicted by the tail's last token, token j by the branch's token j-1
                at[k:k + len(c)] = [start + len(tail) - 1] + [start + offset + j for j in range(len(c) - 1)]
                if i in alt_at:
                    alt[k + alt_at[i][0]] = alt_at[i][1]
                spans.append((i, k, len(c)))
                offset += len(c)
                k += len(c)
        pack = {"ids": self._put(packed.ids), "pos": self._put(packed.pos), "seg": self._put(packed.seg),
                "branch": self._put(packed.branch), "prefix": self._put(prefix_rows),
                "row": self._put_replicated(row), "at": self._put_replicated(at)}
        args = (self.state, self._store, pack, self._put(cont), self._put(alt),
                self._put_replicated(np.float32(temperature)), self._put_replicated(np.int32(top_k)))
        raw, lp, other = self._compile("score", self._score_fn, args, dict(policy=self._policy))(*args)
        self.stats.prefill_tokens += packed.ids.size
        self.stats.logit_rows += n
        raw, lp, other = np.asarray(raw), np.asarray(lp), np.asarray(other)
        for i, k, length in spans:
            if alt_lp is not None and i in alt_at:
                alt_lp[i] = float(other[k + alt_at[i][0]])
            out[i] = TokenScores(tuple(conts[i]), tuple(float(x) for x in raw[k:k + length]),
                                 tuple(float(x) for x in lp[k:k + length]))

    def _empty_score(self) -> tuple:
        """The score program's arguments after the state and store, zero."""
        sh = self.shapes
        r, w, n = sh.score_rows, sh.score_width, sh.score_tokens
        z = self._zeros
        rep = lambda shape, dt: z(shape, dt, rows=False)  # noqa: E731
        pack = {"ids": z((r, w), np.int32), "pos": z((r, w), np.int32), "seg": z((r, w), np.int32),
                "branch": z((r, w), np.int32), "prefix": z((r,), np.int32), "row": rep((n,), np.int32),
                "at": rep((n,), np.int32)}
        return pack, z((n,), np.int32), z((n,), np.int32), rep((), np.float32), rep((), np.int32)

    def _score_fn(self, state: Any, *args: Any, **static: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        return score_program(self.graphdef, self._constrain, self._rows_local, state, *args, **static)


def sequence_chance(logprobs: Sequence[float], alt: tuple[int, int] | None = None,
                    alt_logprob: float | None = None) -> float:
    """The chance of one sample being exactly a scored sequence, `exp(sum(logprobs))` (0 for
    none), plus, where `alt` names (position j, token t) and `alt_logprob` is t's sampled
    log-prob there, the chance of its first j tokens then t."""
    chance = math.exp(sum(logprobs)) if logprobs else 0.0
    if alt is not None and alt_logprob is not None:
        chance += math.exp(sum(logprobs[:alt[0]]) + alt_logprob)
    return chance
