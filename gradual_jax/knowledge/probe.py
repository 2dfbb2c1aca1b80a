"""SliCK probe: P_greedy, P_sample and the four knowledge categories of every QA example.

Each example is asked with `n_prompts` few-shot prompts (exemplars of its relation from the dev
split). Per prompt: one greedy answer and `n_samples` answers at `temperature`, top-k. Exact match
after SQuAD normalisation against any gold answer.

Modes, all with the same categories on the same random stream:
- `exhaustive`: every greedy answer and every sample is drawn; `p_sample` is exact.
- `lazy`: no sampling where a greedy answer is right (samples only split WeaklyKnown from
  Unknown); for the rest, prompt after prompt, sampling stops at the first prompt with a right
  sample. Sample j of prompt i of an example uses the key (seed, example id, i, j) in every mode,
  so lazy draws a prefix of exhaustive's stream.
- `screened`: like lazy, but first the exact chance that one sample equals a gold answer is
  computed by teacher forcing (`q` per prompt); where P(any right sample) is below a threshold
  the example is declared Unknown without sampling.

Every mode also records, for every question, the continuous knowledge measure: `q` per prompt,
`p_gold` (the mean of `q` over prompts) and `expected_right_samples` (n_samples * sum of `q`);
with `gold_probability` off, only screened mode computes it, for the questions it screens.

Records are appended to a JSONL file in chunks; a restarted probe skips the examples already
written and refuses an output file written under another configuration. A file written under an
older gold-answer scoring (`GOLD_SCORING`) is brought up to date instead (`Probe.run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from tqdm.auto import tqdm

from gradual_jax import io
from gradual_jax.errors import UserError
from gradual_jax.knowledge.categories import CATEGORIES, UNKNOWN, categorize
from gradual_jax.knowledge.config import ProbeSettings
from gradual_jax.knowledge.data import QAExample
from gradual_jax.knowledge.match import exact_match, normalize_answer
from gradual_jax.knowledge.prompts import PromptSets, clean_answer, format_probe_prompt

Mode = Literal["lazy", "exhaustive", "screened"]
log = logging.getLogger("gradual_jax")

# What `q` counts. 1: ` {answer}\n` only, missing the samples that end the answer with an EOS
# token, which is how a model fine-tuned on answer+EOS ends it (its q fell to ~0 and screening
# then skipped sampling it). 2: ` {answer}` then a stop string or an EOS.
GOLD_SCORING = 2


class ProbeError(UserError):
    """Bad probe input or an output file that belongs to another configuration."""


class AnswerEngine(Protocol):
    """What the probe needs from a model: completions of few-shot prompts.

    `prompts` are (prefix, suffix) pairs: the full prompt is `prefix + suffix`, where the prefix
    is an exemplar block that many prompts of a call share (an engine may keep its prefill) and
    the suffix the question tail. Completions are raw text after the prompt. `sample` gets each
    prompt's gold `answers`: the probe only counts right samples, so an engine may stop a sample
    as soon as no completion of it can match (`match.can_still_match`) and return its text so
    far, which is then wrong as any completion would be. An engine may
    also offer `warm_up(prompts, continuations, *, max_new_tokens, n_samples, top_k)`, which the
    probe calls once with all its work before the first question (to compile ahead of time),
    and `greedy_with_probability(prompts, max_new_tokens, continuations, *, temperature,
    top_k)`: `greedy` and `answer_probability` of the same prompts in one call (answers,
    chances), which the probe then uses instead of the two.
    """

    def greedy(self, prompts: Sequence[tuple[str, str]], max_new_tokens: int) -> list[str]: ...

    def sample(self, prompts: Sequence[tuple[str, str]], n: int, seeds: Sequence[int], *,
               temperature: float, top_k: int, max_new_tokens: int,
               answers: Sequence[Sequence[str]] | None = None,
               first_answer_only: bool = False) -> list[list[str]]: ...

    def answer_probability(self, prompts: Sequence[tuple[str, str]],
                           continuations: Sequence[Sequence[str]], *, temperature: float,
                           top_k: int, answered: bool = True) -> list[list[float]]:
        """Per prompt, per continuation text: the chance that one sample (at `temperature`,
        top-k renormalised) is exactly that text, ended there by a stop (newline) or an EOS.
        `answered`: `greedy` ran on these prompts just before (an engine may reuse that work)."""


def row_seed(seed: int, example_id: str, prompt_index: int) -> int:
    """A stable 31-bit seed for the samples of one (example, prompt) pair."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}\x00{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def answer_variants(answer: str) -> list[str]:
    """Surface forms a sample could take that normalise to `answer`: case of the first letter,
    a leading 'the'. Each is scored as the sample ` {variant}` (then a stop or EOS); the list has
    no duplicates."""
    base = answer.strip()
    forms = [base, base[:1].upper() + base[1:], base[:1].lower() + base[1:]]
    if not normalize_answer(base).startswith("the ") and not base.lower().startswith("the "):
        forms += ["the " + base, "The " + base]
    out: list[str] = []
    for f in forms:
        if f and f not in out and normalize_answer(f) == normalize_answer(base):
            out.append(f)
    return out


@dataclasses.dataclass
class _Work:
    example: QAExample
    greedy_answers: list[str] = dataclasses.field(default_factory=list)
    n_greedy_correct: int = 0
    n_sampled: int = 0
    n_sample_correct: int = 0
    sampled_prompts: int = 0
    q: list[float] | None = None
    skipped_sampling: bool = False


def _screen_stats(q: Sequence[float], n_samples: int) -> tuple[float, float]:
    """(expected right samples, P(at least one right sample)) for per-prompt chances q."""
    expected = n_samples * sum(q)
    log_none = sum(n_samples * math.log1p(-min(qi, 1.0 - 1e-12)) for qi in q)
    return expected, -math.expm1(log_none)


def scores_gold(settings: ProbeSettings) -> bool:
    """Whether a probe under `settings` computes `q` for any question."""
    return settings.gold_probability or (settings.mode == "screened" and settings.n_samples > 0)


def fingerprint(settings: ProbeSettings, prompt_sets: PromptSets, model_id: str, *,
                scoring: int = GOLD_SCORING) -> str:
    """The configuration a records file belongs to. The gold scoring counts only where the probe
    scores (greedy-only records are the same under every scoring); scoring 1 hashes as before
    the field existed, so files of that time are recognised."""
    fields = {"settings": settings.fingerprint_fields(), "prompts": prompt_sets, "model": model_id}
    if scoring > 1 and scores_gold(settings):
        fields["gold_scoring"] = scoring
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class RecordFile:
    """Append-only JSONL of probe records with a sidecar holding the configuration fingerprint.
    One writer per file: in a multi-process run only process 0 opens it (`Probe.run`).
    `stale_fp`: the fingerprint of the same configuration under an older gold scoring, whose
    records `Probe.run` brings up to date (None: there is none)."""

    def __init__(self, path: str | Path, fp: str, stale_fp: str | None = None):
        self.path = Path(path)
        self.meta = self.path.with_name(self.path.name + ".meta.json")
        self.fp = fp
        self.stale_fp = stale_fp if stale_fp != fp else None

    def open_for(self) -> dict:
        """{"done": records keyed by id, "stale": whether they need `Probe.run`'s update};
        creates the files or checks they belong to this config."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stale = False
        if self.path.exists() or self.meta.exists():
            try:
                meta = json.loads(self.meta.read_text())
            except (OSError, json.JSONDecodeError):
                raise ProbeError(f"{self.path} exists without a readable {self.meta.name}; "
                                 "it was not written by this probe: choose another --out") from None
            stale = self.stale_fp is not None and meta.get("fingerprint") == self.stale_fp
            if meta.get("fingerprint") != self.fp and not stale:
                raise ProbeError(f"{self.path} holds a probe of a different configuration "
                                 f"(fingerprint {meta.get('fingerprint')} != {self.fp}); "
                                 "choose another output path")
        else:
            io.write_json(self.meta, {"fingerprint": self.fp})
        return {"done": self._read_done(), "stale": stale}

    def replace(self, records: Sequence[dict]) -> None:
        """Rewrite the file as `records` under this configuration's fingerprint. The records
        land first: a kill before the sidecar leaves a file still marked stale, and updating
        updated records changes nothing."""
        io.atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))
        io.write_json(self.meta, {"fingerprint": self.fp})

    def _read_done(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if not self.path.exists():
            return done
        good_bytes = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a write cut short by a kill: dropped and redone
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                done[rec["id"]] = rec
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return done

    def append(self, records: Iterable[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())




def split_prompt(exemplars: list[dict], question: str) -> tuple[str, str]:
    """(exemplar block, question tail) of the probe prompt; their concatenation is the prompt."""
    full = format_probe_prompt(exemplars, question)
    tail = len(format_probe_prompt([], question))
    return full[:-tail], full[-tail:]


class Probe:
    """Runs the SliCK probe of one model under fixed settings and prompt sets."""

    def __init__(self, engine: AnswerEngine, prompt_sets: PromptSets, settings: ProbeSettings,
                 *, model_id: str = "model", first_answer_only: bool = False,
                 progress: bool = True):
        self.engine = engine
        self.prompt_sets = prompt_sets
        self.settings = settings
        self.model_id = model_id
        self.first_only = first_answer_only
        self.progress = progress
        for rel, sets in prompt_sets.items():
            if len(sets) < settings.n_prompts:
                raise ProbeError(f"prompt sets of relation {rel} hold {len(sets)} prompts; "
                                 f"the probe needs n_prompts={settings.n_prompts}")

    def fingerprint(self, scoring: int = GOLD_SCORING) -> str:
        return fingerprint(self.settings, self.prompt_sets, self.model_id, scoring=scoring)

    def run(self, examples: Sequence[QAExample], out: str | Path | None = None, *,
            split: bool = False) -> list[dict]:
        """Probe every example; records in input order. With `out`, resumable (see module doc).

        In a multi-process run every process calls this with the same examples (a collective):
        process 0 alone reads and writes `out` and tells the others what is done. With `split`
        (the engine runs on this process's own devices) each process probes its block of every
        chunk (`distributed.shard_for_process`) and the chunk's records are gathered in question
        order before process 0 appends them, so the file holds one line per question whatever
        the process count; without it every process probes every question.

        Records written under an older gold scoring (`GOLD_SCORING`) are updated first, then the
        file is rewritten whole (`update_chunk`): what a fresh probe would write, at the cost of
        rescoring and of sampling only the questions the new scores no longer screen out.
        """
        import jax

        from gradual_jax import distributed

        self._check(examples)
        done: dict[str, dict] = {}
        file = None
        split = split and jax.process_count() > 1
        main = distributed.is_main_process()
        if out is not None:
            file = RecordFile(out, self.fingerprint(), stale_fp=self.fingerprint(scoring=1))
            opened = distributed.on_main(file.open_for)
            done = opened["done"]
            if opened["stale"]:
                done = self._update(examples, done, split)
                if main:
                    file.replace(list(done.values()))
                log.info("probe %s: %d records updated to gold scoring %d", out, len(done), GOLD_SCORING)
        todo = [e for e in examples if e.id not in done]
        self.warm_up(todo)
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="probe",
                   unit="q", disable=not self.progress or not main, dynamic_ncols=True)
        size = self.settings.chunk_size
        mine: list[str] = []
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            if split:
                part = distributed.shard_for_process(chunk)
                mine += [e.id for e in part]
                records = distributed.gather_records(self.probe_chunk(part))
            else:
                records = self.probe_chunk(chunk)
            if file is not None and main:
                file.append(records)
            for r in records:
                done[r["id"]] = r
            bar.update(len(records))
        bar.close()
        if split:
            log.info("probe %s: process %d of %d probed %d of %d questions", out or "",
                     jax.process_index(), jax.process_count(), len(mine), len(todo))
            log.debug("probe %s: process %d probed ids %s", out or "", jax.process_index(), json.dumps(mine))
        return [done[e.id] for e in examples]

    def _update(self, examples: Sequence[QAExample], done: dict[str, dict], split: bool) -> dict[str, dict]:
        """`done` (records keyed by id, in file order) each passed through `update_chunk`, chunk
        by chunk, split over the processes like a probe."""
        from gradual_jax import distributed

        by_id = {e.id: e for e in examples}
        ids = [i for i in done if i in by_id]
        if len(ids) != len(done):
            raise ProbeError(f"{len(done) - len(ids)} records of the file are not among the questions")
        self.warm_up([by_id[i] for i in ids])
        out: dict[str, dict] = {}
        size = self.settings.chunk_size
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            if split:
                part = distributed.shard_for_process(chunk)
                records = distributed.gather_records(
                    self.update_chunk([by_id[i] for i in part], [done[i] for i in part]))
            else:
                records = self.update_chunk([by_id[i] for i in chunk], [done[i] for i in chunk])
            out.update((r["id"], r) for r in records)
        return out

    def update_chunk(self, examples: Sequence[QAExample], records: Sequence[dict]) -> list[dict]:
        """Records of `examples` written under an older gold scoring, as this probe would write
        them. Greedy answers and drawn samples stand (their keys are the same); `q` is computed
        again wherever the record has one. In screened mode the new `q` only adds mass (the old
        scoring counted a subset of the samples the new one counts), so a question sampled
        before is sampled now, and one screened out before is sampled now (lazily, on the same
        stream) exactly when its new P(any right sample) reaches the threshold."""
        s = self.settings
        work = []
        for ex, rec in zip(examples, records):
            w = _Work(ex, greedy_answers=list(rec["greedy_answers"]), n_sampled=rec["n_sampled"],
                      n_sample_correct=rec["n_sample_correct"],
                      skipped_sampling=bool(rec.get("sampling_skipped", False)))
            w.n_greedy_correct = sum(self._correct(a, ex) for a in w.greedy_answers)
            work.append(w)
        scored = [w for w, rec in zip(work, records) if rec.get("q") is not None]
        if scored and self._scores_in_greedy_pass():
            # the pass a probe scores in (its answers stand as recorded): the same q, bit for bit
            self._greedy_with_q(scored)
        elif scored:
            self.answer_probabilities(scored, answered=False)  # no greedy pass ran here
        if s.mode == "screened" and s.n_samples > 0:
            now_open = []
            for w in work:
                if w.skipped_sampling:
                    _, p_any = _screen_stats(w.q, s.n_samples)
                    w.skipped_sampling = p_any < s.screen_threshold
                    if not w.skipped_sampling:
                        now_open.append(w)
            self._sample(now_open, range(s.n_prompts), stop_at_first=True)
        return [self._record(w) for w in work]

    def _check(self, examples: Sequence[QAExample]) -> None:
        ids = set()
        for e in examples:
            if not e.answers:
                raise ProbeError(f"example {e.id} has no answers")
            if e.relation not in self.prompt_sets:
                raise ProbeError(f"no prompt sets for relation {e.relation} (example {e.id}); "
                                 f"prompt sets cover {sorted(self.prompt_sets)}")
            if e.id in ids:
                raise ProbeError(f"duplicate example id {e.id}")
            ids.add(e.id)

    def _correct(self, answer: str, ex: QAExample) -> bool:
        return exact_match(answer, list(ex.answers), first_only=self.first_only)

    def _prompt(self, w: _Work, i: int) -> tuple[str, str]:
        return split_prompt(self.prompt_sets[w.example.relation][i], w.example.question)

    def warm_up(self, examples: Sequence[QAExample]) -> None:
        """Show the engine every prompt and gold continuation the probe of `examples` can ask
        for (engines with a `warm_up` compile their programs for them ahead of time)."""
        warm = getattr(self.engine, "warm_up", None)
        if warm is None or not examples:
            return
        s = self.settings
        work = [_Work(e) for e in examples]
        prompts = [self._prompt(w, i) for w in work for i in range(s.n_prompts)]
        scores = scores_gold(s)
        conts = sorted({c for w in work for c in self._gold_continuations(w.example)}, key=len) if scores else []
        warm(prompts, conts, max_new_tokens=s.max_new_tokens, n_samples=s.n_samples, top_k=s.top_k)

    def probe_chunk(self, examples: Sequence[QAExample]) -> list[dict]:
        """Probe a chunk of examples in memory and return their records."""
        s = self.settings
        work = [_Work(e) for e in examples]
        pairs = [(w, i) for i in range(s.n_prompts) for w in work]
        # The continuous knowledge measure, for every question in every mode; screening reuses
        # it. An engine that can scores the gold answers in its greedy pass.
        if s.gold_probability and self._scores_in_greedy_pass():
            answers = self._greedy_with_q(work)
        else:
            answers = self.engine.greedy([self._prompt(w, i) for w, i in pairs], s.max_new_tokens)
            if s.gold_probability:
                self.answer_probabilities(work)
        for (w, _), a in zip(pairs, answers):
            a = clean_answer(a)
            w.greedy_answers.append(a)
            w.n_greedy_correct += self._correct(a, w.example)
        if s.n_samples > 0:
            if s.mode == "exhaustive":
                self._sample(work, range(s.n_prompts), stop_at_first=False)
            else:
                undecided = [w for w in work if w.n_greedy_correct == 0]
                if s.mode == "screened":
                    self._screen(undecided)
                    undecided = [w for w in undecided if not w.skipped_sampling]
                self._sample(undecided, range(s.n_prompts), stop_at_first=True)
        return [self._record(w) for w in work]

    def _sample(self, work: list[_Work], prompt_indices: Iterable[int], *, stop_at_first: bool) -> None:
        """Sample prompt after prompt (all of a prompt index's questions in one engine call);
        with `stop_at_first`, a question leaves once one of its samples is right."""
        s = self.settings
        active = list(work)
        for i in prompt_indices:
            if stop_at_first:
                active = [w for w in active if w.n_sample_correct == 0]
            if not active:
                return
            seeds = [row_seed(s.seed, w.example.id, i) for w in active]
            samples = self.engine.sample([self._prompt(w, i) for w in active], s.n_samples, seeds,
                                         temperature=s.temperature, top_k=s.top_k,
                                         max_new_tokens=s.max_new_tokens,
                                         answers=[list(w.example.answers) for w in active],
                                         first_answer_only=self.first_only)
            for w, outs in zip(active, samples):
                w.n_sampled += len(outs)
                w.sampled_prompts += 1
                w.n_sample_correct += sum(self._correct(clean_answer(o), w.example) for o in outs)

    def answer_probabilities(self, work: list[_Work], *, answered: bool = True) -> None:
        """Fill `q` for each work item: per prompt i, the teacher-forced chance that one sample
        (at the probe's temperature and top-k) equals a gold answer, summed over the gold answers'
        surface forms and capped at 1. It draws no random numbers, so the sampling stream and the
        categories of every mode are the same with or without it."""
        s = self.settings
        pairs = [(w, i) for i in range(s.n_prompts) for w in work]
        probs = self.engine.answer_probability([self._prompt(w, i) for w, i in pairs],
                                               [self._gold_continuations(w.example) for w, _ in pairs],
                                               temperature=s.temperature, top_k=s.top_k,
                                               answered=answered)
        self._fill_q(work, pairs, probs)

    def _scores_in_greedy_pass(self) -> bool:
        return getattr(self.engine, "greedy_with_probability", None) is not None

    def _greedy_with_q(self, work: list[_Work]) -> list[str]:
        """The greedy answers of every prompt of `work` (prompt index major), filling `q` in
        the same pass (`AnswerEngine.greedy_with_probability`)."""
        s = self.settings
        pairs = [(w, i) for i in range(s.n_prompts) for w in work]
        answers, probs = self.engine.greedy_with_probability(
            [self._prompt(w, i) for w, i in pairs], s.max_new_tokens,
            [self._gold_continuations(w.example) for w, _ in pairs], temperature=s.temperature, top_k=s.top_k)
        self._fill_q(work, pairs, probs)
        return answers

    def _fill_q(self, work: list[_Work], pairs: list[tuple[_Work, int]], probs: Sequence[Sequence[float]]) -> None:
        """`q` of each work item from its prompts' gold-answer chances (summed, capped at 1)."""
        for w in work:
            w.q = [0.0] * self.settings.n_prompts
        for (w, i), ps in zip(pairs, probs):
            w.q[i] = min(1.0, sum(ps))

    def _gold_continuations(self, ex: QAExample) -> list[str]:
        golds = ex.answers[:1] if self.first_only else ex.answers
        conts: list[str] = []
        for g in golds:
            for v in answer_variants(g):
                c = f" {v}"
                if c not in conts:
                    conts.append(c)
        return conts

    def _screen(self, work: list[_Work]) -> None:
        s = self.settings
        missing = [w for w in work if w.q is None]
        if missing:
            self.answer_probabilities(missing)
        for w in work:
            _, p_any = _screen_stats(w.q, s.n_samples)
            w.skipped_sampling = p_any < s.screen_threshold

    def _record(self, w: _Work) -> dict:
        s = self.settings
        ex = w.example
        category = categorize(w.n_greedy_correct, s.n_prompts, w.n_sample_correct)
        exhaustive_count = s.n_prompts * s.n_samples
        full = w.n_sampled == exhaustive_count
        rec = {
            "id": ex.id, "relation": ex.relation, "question": ex.question,
            "answers": list(ex.answers), "category": category,
            "p_greedy": w.n_greedy_correct / s.n_prompts,
            "p_sample": (w.n_sample_correct / exhaustive_count) if full and exhaustive_count else None,
            "greedy_answers": w.greedy_answers,
            "n_sampled": w.n_sampled,
            "n_sample_correct": w.n_sample_correct,
        }
        if w.q is not None:
            # p_gold: the gold answer's probability, mean over prompts; expected right samples
            # = n_samples * sum(q), what an exhaustive probe's count would average to.
            expected, p_any = _screen_stats(w.q, s.n_samples)
            rec.update(q=w.q, p_gold=sum(w.q) / len(w.q) if w.q else 0.0,
                       expected_right_samples=expected, p_any_right=p_any,
                       sampling_skipped=w.skipped_sampling)
        if w.skipped_sampling:
            assert category == UNKNOWN
        return rec


def category_table(records: Sequence[dict]) -> str:
    """A per-relation table of category counts (and the total), as fixed-width text."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))
    for r in records:
        counts[r["relation"]][r["category"]] += 1
        counts["all"][r["category"]] += 1
    header = f"{'relation':<10}" + "".join(f"{c:>13}" for c in CATEGORIES) + f"{'n':>7}"
    lines = [header]
    for rel in sorted(k for k in counts if k != "all") + ["all"]:
        row = counts[rel]
        n = sum(row.values())
        cells = "".join(f"{row[c]:>6} {100 * row[c] / max(n, 1):5.1f}%" for c in CATEGORIES)
        lines.append(f"{rel:<10}{cells}{n:>7}")
    return "\n".join(lines)


def category_counts(records: Iterable[dict]) -> dict[str, int]:
    """Count of records per category, every category present."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for r in records:
        counts[r["category"]] += 1
    return counts
