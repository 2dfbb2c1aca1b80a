"""Continuations scored while generating: `Sampler.generate_and_score`.

A generation's inserts prefill its prompts' tails and keep their keys and values on the device
until the next insert (`decoding`). Continuations asked of a prompt (the probe's gold answers)
are scored right after the insert that prefilled its tail, by `branch_program`, against those
keys and values: only the continuations' own tokens run, where `Scoring.sample_probability`
would prefill every tail again. The insert's own next-token logits decide which continuations
no sample can start with (`first_tokens.excluded`); those are not run.

`BranchScoring` is a mixin of `Sampler`: it uses the sampler's generation (`_generate`),
scoring (`_merged_endings`, `_chances`), shapes, placement and compiled programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gradual_jax.sampling.branches import BranchScores, Wanted, plan_branches
from gradual_jax.sampling.first_tokens import excluded
from gradual_jax.sampling.kernels import branch_program
from gradual_jax.sampling.methods import Greedy, Method, check_prompts, check_sampling
from gradual_jax.sampling.packing import DEFAULT_BATCH_SIZE
from gradual_jax.sampling.records import Generation
from gradual_jax.sampling.scoring import sequence_chance
from gradual_jax.sampling.serial import serialized


class BranchScoring:
    """`Sampler.generate_and_score` and the branch program's arguments."""

    @serialized
    def generate_and_score(self, prompts: Sequence[str], continuations: Sequence[Sequence[str]], *,
                           max_new_tokens: int, stop: Sequence[str], temperature: float,
                           top_k: int = 0, methods: Method | Sequence[Method] = Greedy(),
                           prefix: str | Sequence[str] = "",
                           batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[list[list[Generation]], list[list[float]]]:
        """`generate_batch(prompts, methods=..., stop=stop)` and, for each prompt i, the
        `sample_probability` of each text of `continuations[i]` (at `temperature` and `top_k`,
        with `stop`), in one pass: each continuation is scored right after the insert that
        prefilled its prompt's tail, against the tail's keys and values still on the device
        (`branch_program`), instead of prefilling every tail again. What does not fit a
        branch call is scored as `sample_probability` scores it. The same generations, and the
        same chances up to float rounding (a continuation's first token is read off the
        insert's own logits, which also decide what is skipped)."""
        prompts = check_prompts(prompts)
        if len(continuations) != len(prompts) or any(isinstance(c, str) for c in continuations):
            raise ValueError(f"need a list of continuation texts per prompt ({len(prompts)})")
        check_sampling(temperature, top_k, 1.0)
        stop = tuple(stop)
        merged = {c: self._merged_endings(c, stop) for cs in continuations for c in set(cs)}
        wanted = [[((i, j, e), tuple(seq), alt) for j, c in enumerate(cs) for e, (seq, alt) in enumerate(merged[c])]
                  for i, cs in enumerate(continuations)]
        scores = BranchScores(temperature, top_k, self._exclusion_margin)
        gens = self._generate(prompts, max_new_tokens=max_new_tokens, fan=methods, n=1, stop=stop, seed=0,
                              batch_size=batch_size, prefix=prefix, share_prefix=None, prompt_keys=None,
                              alive=None, scores=scores, wanted=wanted,
                              k_cap=top_k if temperature > 0 else 0)
        self.stats.scores_skipped += scores.skipped
        found = dict(scores.scores)
        if scores.left:
            pres = [prefix] * len(prompts) if isinstance(prefix, str) else list(prefix)
            left = scores.left
            lp = self._chances([prompts[w.key[0]] for w in left], [list(w.tokens) for w in left],
                               [w.alt for w in left], temperature, top_k, batch_size,
                               [pres[w.key[0]] for w in left], True)
            found.update({w.key: float(p) for w, p in zip(left, lp)})
        chances = [[0.0] * len(cs) for cs in continuations]
        for i, items in enumerate(wanted):
            for key, _, alt in items:
                chances[i][key[1]] += _chance(found.get(key), alt)
        return gens, chances

    def _score_against_tails(self, scores: BranchScores, wanted: list[tuple[int, tuple]], packed: Any,
                             best: np.ndarray, best_ids: np.ndarray, mini: Any, last: Any, pack: dict) -> None:
        """Score the continuations `wanted` ((tail, (key, tokens, alternative))) of an insert's
        tails (`packed`, prefilled into `mini`, last hidden states `last`) into `scores`."""
        sh = self.shapes
        todo = []
        for t, (key, tokens, alt) in wanted:
            if tokens and excluded(best[t], best_ids[t], tokens[0], temperature=scores.temperature,
                                                   top_k=scores.top_k, margin=scores.margin):
                scores.scores[key] = None
                scores.skipped += 1
            else:
                todo.append(Wanted(key, t, tokens, alt))
        while todo:
            plan = plan_branches(todo, tail_length=packed.length, tails=sh.insert_tails,
                                 width=sh.branch_width, reads=sh.branch_reads)
            if not plan.spans:
                break
            branches = self._put_replicated({"ids": plan.ids, "pos": plan.pos, "tail": plan.tail,
                                             "branch": plan.branch, "read": plan.read})
            args = (self.state, mini, last, pack, branches, self._put(plan.cont), self._put(plan.alt),
                    self._put_replicated(np.float32(scores.temperature)),
                    self._put_replicated(np.int32(scores.top_k)))
            raw, lp, other = self._compile("branch", self._branch_fn, args, dict(policy=self._policy))(*args)
            self.stats.prefill_tokens += plan.ids.size
            self.stats.logit_rows += len(plan.read)
            raw, lp, other = np.asarray(raw), np.asarray(lp), np.asarray(other)
            for w, k, n in plan.spans:
                scores.scores[w.key] = (raw[k:k + n], lp[k:k + n],
                                        None if w.alt is None else float(other[k + w.alt[0]]))
            todo = plan.left
        scores.left += todo

    def _empty_branches(self) -> tuple:
        """`branch_program`'s arguments after the state, the tails' cache, their last hidden
        states and the insert's packing, zero."""
        sh = self.shapes
        w, n = sh.branch_width, sh.branch_reads
        rep = lambda shape, dt: self._zeros(shape, dt, rows=False)  # noqa: E731
        branches = {"ids": rep((w,), np.int32), "pos": rep((w,), np.int32), "tail": rep((w,), np.int32),
                    "branch": rep((w,), np.int32), "read": rep((n,), np.int32)}
        return (branches, self._zeros((n,), np.int32), self._zeros((n,), np.int32),
                rep((), np.float32), rep((), np.int32))

    def _branch_fn(self, state: Any, *args: Any, **static: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        return branch_program(self.graphdef, self._constrain, self._rows_local, state, *args, **static)


def _chance(found: Any, alt: tuple[int, int] | None) -> float:
    """One scored sequence's chance from `BranchScores.scores` ((raw, sampled, alternative)
    log-probs, or None: skipped) or from the plain path (a float)."""
    if found is None:
        return 0.0
    if isinstance(found, float):
        return found
    _, lp, other = found
    return sequence_chance([float(x) for x in lp], alt, other)
