"""The host side of decoding: continuous batching over a fixed set of decode slots.

A call's rows (prompt x sample) wait in prompt order. While slots are free and rows wait, an
insert prefills the next prompts' tails (packed, one stored prefix per packed row) and starts
each waiting row in a free slot; then decode steps run until enough slots are done to be worth
refilling, the finished rows are read back and their slots freed. Every program keeps its
shapes whatever the rows, so nothing compiles once the engine's shapes are set.

An insert is two programs: `first` prefills the tails and draws every taken row's first token,
then the host finishes the rows that ended at it and `admit` copies the rest into free slots. A
job may carry an `alive` test on its rows' text so far: the host applies it to each first token
and after every decode step, and abandons the rows it rejects (the probe's samples of an answer
that can no longer match: most die at their first token, before any copy), freeing their slots
for waiting rows.

`DecodeLoop` is a mixin of `Sampler`: it uses the sampler's shapes, compiled programs, prefix
store (`_store_rows`), placement (`_put`, `_put_replicated`), tokenizer (`_decode`), `_eos`,
`chunk` and `stats`, and keeps every insert's best next-token logits in `_first_tokens`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gradual_jax.models.transformer import KVCache
from gradual_jax.sampling.kernels import ADMIT_DONATES, DONATE_CARRY, Decoding, Rows
from gradual_jax.sampling.packing import RowPacker, pack_rows
from gradual_jax.sampling.records import Generation


def _host(*arrays: jax.Array) -> tuple[np.ndarray, ...]:
    """Host copies of carry arrays. Never views: `np.asarray` of a CPU array is zero-copy, and a
    live view pins the buffer that the next decode call donates (the donation then copies, and
    a view kept in the results would outlive the slot it reads)."""
    return tuple(np.array(a, copy=True) for a in arrays)

# A decode call returns to the host once this share of the slots is done and rows wait.
REFILL_SHARE = 2


@dataclasses.dataclass(frozen=True)
class Row:
    """One generation to run: `out` names it in the call's results."""

    out: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    prompt_key: int
    sample: int


@dataclasses.dataclass
class Job:
    """A prompt's waiting rows, all continuing `prefix + tail`."""

    prefix: tuple[int, ...]
    tail: tuple[int, ...]
    rows: list[Row]
    alive: Callable[[str], bool] | None = None
    head: str | None = None  # the prompt's decoded text, once a row of it is tested
    # continuations to score against the tail once an insert has prefilled it (`branches`):
    # (key, tokens, alternative), taken by the job's first insert
    score: list[tuple[Any, tuple[int, ...], tuple[int, int] | None]] | None = None


# Rows come back as (tokens, logp, raw_logp, abandoned).
RowResult = tuple[np.ndarray, np.ndarray, np.ndarray, bool]


class DecodeLoop:
    """Continuous batching of a call's rows over the sampler's decode slots."""

    state: Any
    stats: Any
    chunk: int
    _eos: tuple[int, ...]

    def _empty_carry(self) -> Decoding:
        """Decode slots, all done, built on the host (device_put compiles nothing)."""
        sh, cfg = self.shapes, self.config
        b, s, n = sh.slots, sh.cache_len, sh.new_tokens
        kv = (b, s, cfg.num_kv_heads, cfg.head_dim)
        z = self._zeros
        key_width = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape[-1]
        cache = KVCache(keys=self._kv_buffers(kv, z), values=self._kv_buffers(kv, z),
                        mask=z((b, s), bool), end=self._scalar(s - n))
        rows = Rows(temperature=z((b,), np.float32), top_k=z((b,), np.int32), top_p=z((b,), np.float32),
                    key=z((b, key_width), np.uint32))
        # every slot starts done (empty): `done` is the one array not zero
        done = self._put(np.ones(b, bool)) if not getattr(self, "_abstract", False) else z((b,), bool)
        return Decoding(cache=cache, prefix_rows=z((b,), np.int32), prefix_mask=z((b, sh.prefix_width), bool),
                        rows=rows, token=z((b,), np.int32), done=done,
                        step=z((b,), np.int32), tokens=z((b, n), np.int32),
                        logp=z((b, n), np.float32), raw_logp=z((b, n), np.float32))

    def _carry(self) -> Decoding:
        if self._slots is None:
            self._slots = self._empty_carry()
        return self._slots

    def _run_jobs(self, jobs: list[Job], stop: tuple[str, ...], table: jax.Array,
                  scores: Any = None) -> dict[int, RowResult]:
        """Every row of `jobs` decoded to its end (or abandoned); a `RowResult` per row `out`.
        `scores` (`branches.BranchScores`): where the jobs' continuations, scored against each
        insert's tails, go."""
        sh = self.shapes
        d = self._carry()
        self._slots = None  # donated below; restored when the call ends
        owner = np.full(sh.slots, -1)
        slot_job: list[Job | None] = [None] * sh.slots
        pending = collections.deque(jobs)
        results: dict[int, RowResult] = {}
        spanning = any(len(s.encode()) > 1 for s in stop)
        testing = any(j.alive is not None for j in jobs)
        while True:
            free = np.flatnonzero(owner < 0)
            while pending and len(free):
                d, started = self._insert(d, pending, free, owner, table, slot_job, results, stop, scores)
                free = np.flatnonzero(owner < 0)
                if not started:  # the store is full of live slots' prefixes: decode first
                    break
            live = sh.slots - len(free)
            if live == 0:
                break
            waiting = sum(len(j.rows) for j in pending)
            refill_at = sh.slots if not waiting else len(free) + min(max(1, sh.slots // REFILL_SHARE), waiting)
            # tested rows are read after every step: most are abandoned within one or two
            limit = 1 if testing else self.chunk if spanning else sh.new_tokens
            args = (self.state, d, self._store, table, self._argument(int(limit)), self._argument(int(refill_at)))
            d, taken = self._compile("decode", self._decode_fn, args, dict(policy=self._policy),
                                     donate=DONATE_CARRY)(*args)
            taken = int(taken)
            self.stats.decode_steps += taken
            self.stats.decode_row_steps += taken * sh.slots
            self.stats.logit_rows += taken * sh.slots
            if testing:
                d = self._abandon(d, owner, slot_job, results)
            (done,) = _host(d.done)
            if spanning:
                d, done = self._check_spanning_stops(d, done, owner, stop)
            finished = np.flatnonzero(done & (owner >= 0))
            if len(finished):
                tokens, logp, raw = _host(d.tokens, d.logp, d.raw_logp)
                for s in finished:
                    results[int(owner[s])] = (tokens[s], logp[s], raw[s], False)
                owner[finished] = -1
        self._slots = d
        return results

    def _abandon(self, d: Decoding, owner: np.ndarray, slot_job: list[Job | None],
                 results: dict[int, RowResult]) -> Decoding:
        """Stop the running rows whose job's `alive` test rejects their text so far: their
        results are recorded as abandoned and their slots freed."""
        watched = [s for s in np.flatnonzero(owner >= 0)
                   if slot_job[s] is not None and slot_job[s].alive is not None]
        if not watched:
            return d
        tokens, done = _host(d.tokens, d.done)
        # rows that ended on their own (stop token, EOS, length) are collected as usual
        dead = [s for s in watched
                if not done[s] and not self._still_alive(slot_job[s], [int(t) for t in tokens[s] if t >= 0])]
        if not dead:
            return d
        logp, raw = _host(d.logp, d.raw_logp)
        for s in dead:
            results[int(owner[s])] = (tokens[s], logp[s], raw[s], True)
            owner[s] = -1
            slot_job[s] = None
        done[dead] = True
        self.stats.abandoned += len(dead)
        return dataclasses.replace(d, done=self._put(done))

    def _still_alive(self, job: Job, ids: list[int]) -> bool:
        """Whether `job.alive` accepts the text of generated tokens `ids` (in any reading)."""
        prompt = list(job.prefix + job.tail)
        if job.head is None:
            job.head = self._decode(prompt)
        return any(job.alive(text) for text in self._readings(self._text(job.head, prompt, ids)))

    def _readings(self, text: str) -> tuple[str, ...]:
        """What the final text may begin with, given `text` so far: itself, and where the
        tokenizer's decode cleans up spaces before punctuation and contractions (a space at the
        end may vanish once the next token comes, as may the one before a final 'n' of "n't")."""
        if not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return (text,)
        out = [text]
        if text.endswith(" "):
            out.append(text[:-1])
        if text.endswith(" n"):
            out.append(text[:-2] + "n")
        return tuple(out)

    def _insert(self, d: Decoding, pending: collections.deque, free: np.ndarray, owner: np.ndarray,
                table: jax.Array, slot_job: list[Job | None], results: dict[int, RowResult],
                stop: tuple[str, ...], scores: Any = None) -> tuple[Decoding, bool]:
        """Start waiting rows: the next jobs' tails, as many as one packing holds, are prefilled
        and every row taken draws its first token (`first_program`); the host then finishes the
        rows that ended there, abandons those their job's `alive` test rejects, and admits the
        rest into free slots (`admit_program`). Rows of untested jobs are taken only as far as
        slots are free; tested rows up to `insert_dests`, and any that find no free slot go back
        to the front of the line (redrawn later from the same key, so the same token).
        Live slots read their prefixes from the store, so those rows stay: a job whose prefix
        would need a row they all hold waits. Returns the carry and whether any row was taken."""
        sh = self.shapes
        held = {slot_job[s].prefix for s in np.flatnonzero(owner >= 0)}
        needed = set(held)  # store rows this insert must keep: held, then its jobs' prefixes
        taken: list[tuple[Job, list[Row]]] = []
        seqs: list[tuple[int, ...]] = []
        keys: list[tuple[int, ...]] = []
        used = untested = 0
        packer = RowPacker(sh.insert_rows, sh.insert_width)
        while pending and used < sh.insert_dests and len(seqs) < sh.insert_tails:
            job = pending[0]
            room = sh.insert_dests - used
            if job.alive is None:
                room = min(room, len(free) - untested)
            if job.prefix not in needed and len(needed) >= sh.store_rows:
                break
            if room <= 0 or not packer.add(len(job.tail), job.prefix):
                break
            k = min(len(job.rows), room)
            taken.append((job, job.rows[:k]))
            seqs.append(job.tail)
            keys.append(job.prefix)
            needed.add(job.prefix)
            used += k
            untested += k if job.alive is None else 0
            if k == len(job.rows):
                pending.popleft()
            else:
                job.rows = job.rows[k:]
        if not taken:
            return d, False
        packed, count = pack_rows(seqs, keys, sh.insert_rows, sh.insert_width, sh.insert_tails)
        assert count == len(seqs)
        store_rows = self._store_rows([p for p in packed.prefix if p is not None], held=held)
        prefix = np.array([store_rows[p] if p is not None else 0 for p in packed.prefix], np.int32)
        drawn = [(job, r, t) for t, (job, rows) in enumerate(taken) for r in rows]
        draw = self._settings(sh.insert_dests, [(r, t) for _, r, t in drawn])
        # one transfer for every host array of the call
        pack, draw = self._put_replicated(({"ids": packed.ids, "pos": packed.pos, "seg": packed.seg,
                                            "prefix": prefix, "row": packed.row, "col": packed.col,
                                            "length": packed.length}, draw))
        args = (self.state, self._store, pack, draw)
        mini, token, logp, raw, best, best_ids, last = self._compile("first", self._first_fn, args,
                                                                     dict(policy=self._policy))(*args)
        self.stats.inserts += 1
        self.stats.prefill_tokens += packed.ids.size
        self.stats.logit_rows += sh.insert_tails
        token, logp, raw, best, best_ids = _host(token, logp, raw, best, best_ids)
        for t, (prefix_ids, tail) in enumerate(zip(keys, seqs)):
            self._first_tokens.add((prefix_ids, tail), best[t], best_ids[t])
        if scores is not None:
            wanted = []
            for t, (job, _) in enumerate(taken):
                wanted += [(t, item) for item in job.score or ()]
                job.score = None
            if wanted:
                self._score_against_tails(scores, wanted, packed, best, best_ids, mini, last, pack)
        ends = self.stop_table(stop)
        n = sh.new_tokens
        admit: list[tuple[int, Row, int, int]] = []  # (slot, row, tail, draw index)
        back: dict[int, tuple[Job, list[Row]]] = {}
        spare = list(free)
        for i, (job, r, t) in enumerate(drawn):
            first = int(token[i])
            ended = bool(ends[first]) or n == 1
            rejected = not ended and job.alive is not None and not self._still_alive(job, [first])
            if ended or rejected:
                ids, lp, rlp = np.full(n, -1, np.int32), np.zeros(n, np.float32), np.zeros(n, np.float32)
                ids[0], lp[0], rlp[0] = first, logp[i], raw[i]
                results[r.out] = (ids, lp, rlp, rejected)
                self.stats.abandoned += rejected
            elif spare:
                s = spare.pop(0)
                owner[s], slot_job[s] = r.out, job
                admit.append((s, r, t, i))
            else:
                back.setdefault(id(job), (job, []))[1].append(r)
        for job, rows in reversed(list(back.values())):
            pending.appendleft(Job(job.prefix, job.tail, rows, job.alive, job.head))
        per_call = sh.admit_rows
        for start in range(0, len(admit), per_call):
            part = admit[start:start + per_call]
            place = self._settings(per_call, [(r, t) for _, r, t, _ in part])
            place["slot"] = np.full(per_call, sh.slots, np.int32)  # out of range: no slot
            for name, source in (("token", token), ("logp", logp), ("raw", raw)):
                place[name] = np.zeros(per_call, source.dtype)
            for a, (s, _, _, i) in enumerate(part):
                place["slot"][a] = s
                place["token"][a], place["logp"][a], place["raw"][a] = token[i], logp[i], raw[i]
            args = (d, mini, pack, self._put_replicated(place), table)
            d = self._compile("admit", self._admit_fn, args, {}, donate=ADMIT_DONATES)(*args)
        return d, True

    @staticmethod
    def _settings(size: int, rows: list[tuple[Row, int]]) -> dict[str, np.ndarray]:
        """Per-row sampling settings and keys, padded to `size`, with each row's source tail."""
        out = {"source": np.zeros(size, np.int32), "temperature": np.zeros(size, np.float32),
               "top_k": np.ones(size, np.int32), "top_p": np.ones(size, np.float32),
               "seed": np.zeros(size, np.uint32), "prompt_key": np.zeros(size, np.uint32),
               "sample": np.zeros(size, np.uint32)}
        for i, (r, t) in enumerate(rows):
            out["source"][i] = t
            out["temperature"][i], out["top_p"][i] = r.temperature, r.top_p
            # greedy rows: a top-1 distribution, so their sampling log-prob is 0
            out["top_k"][i] = r.top_k if r.temperature > 0 else 1
            out["seed"][i], out["prompt_key"][i], out["sample"][i] = r.seed, r.prompt_key, r.sample
        return out

    def _check_spanning_stops(self, d: Decoding, done: np.ndarray, owner: np.ndarray,
                              stop: tuple[str, ...]) -> tuple[Decoding, np.ndarray]:
        """Mark slots whose text contains a stop string made of several tokens."""
        (tokens,) = _host(d.tokens)
        hit = np.array([owner[s] >= 0 and not done[s]
                        and any(x in self._decode(tokens[s][tokens[s] >= 0]) for x in stop)
                        for s in range(len(done))])
        if hit.any():
            done = done | hit
            d = dataclasses.replace(d, done=self._put(done))
        return d, done

    def _finish(self, head: str, prompt: list[int], tokens: np.ndarray, logp: np.ndarray,
                raw: np.ndarray, abandoned: bool, stop: tuple[str, ...]) -> Generation:
        """Cut a row's record after its stopping token and its text before the stop string
        (`head`: the prompt's decoded text)."""
        ids = [int(t) for t in tokens if t >= 0]
        reason, end = "abandoned" if abandoned else "length", len(ids)
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
