"""Few-shot probe prompts, fine-tuning prompt/target pairs, and answer clean-up.

A probe prompt for one question is ``k`` exemplars of the same relation, each
``Q: {question}\\nA: {answer}\\n\\n``, then ``Q: {question}\\nA:``. Each relation gets ``n_prompts``
fixed exemplar sets (``PromptSets``) drawn from its dev examples, saved as JSON so a re-probe
can reuse exactly the same prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gradual_jax import io
from gradual_jax.knowledge.data import DataError, QAExample

PromptSets = dict[str, list[list[dict]]]
"""relation -> ``n_prompts`` exemplar lists, each of ``k`` ``{"question", "answer"}`` dicts."""

# Presets in the custom-template syntax below; format_train_pair's docstring gives the results.
TRAIN_TEMPLATES: dict[str, str] = {
    "gekhman": "Answer the following question. {question}\n{answer}",
    "qa": "Q: {question}\nA: {answer}\n",
}


def build_prompt_sets(
    dev_examples: Iterable[QAExample],
    relations: Iterable[str],
    *,
    n_prompts: int = 10,
    k: int = 4,
    seed: int = 0,
) -> PromptSets:
    """Draw ``n_prompts`` sets of ``k`` exemplars per relation from that relation's dev examples.

    A set never holds the same question twice (duplicate dev questions count once) and an
    exemplar's answer is the example's first answer. Each relation has its own random stream
    seeded by ``(seed, relation)``, so the sets of one relation do not depend on which other
    relations are asked for. Raises DataError naming a relation with fewer than ``k`` distinct
    dev questions.
    """
    if n_prompts <= 0 or k <= 0:
        raise ValueError(f"n_prompts and k must be positive, got n_prompts={n_prompts}, k={k}")
    pools: dict[str, dict[str, str]] = {}
    for ex in dev_examples:
        pools.setdefault(ex.relation, {}).setdefault(ex.question, ex.answers[0])
    sets: PromptSets = {}
    for relation in dict.fromkeys(relations):
        pool = list(pools.get(relation, {}).items())
        if len(pool) < k:
            raise DataError(
                f"relation {relation!r} has {len(pool)} distinct dev examples, "
                f"fewer than k={k} exemplars per prompt"
            )
        rng = random.Random(f"{seed}:{relation}")
        sets[relation] = [
            [{"question": q, "answer": a} for q, a in rng.sample(pool, k)] for _ in range(n_prompts)
        ]
    return sets


def save_prompt_sets(path: str | Path, sets: PromptSets) -> None:
    """Write ``sets`` as JSON, atomically: an existing file is replaced only by a complete one."""
    _validate(sets, "prompt sets")
    io.write_json(path, sets, ensure_ascii=False, indent=1)


def load_prompt_sets(path: str | Path) -> PromptSets:
    """Read prompt sets written by ``save_prompt_sets``; DataError names the file and bad entry."""
    path = Path(path)
    try:
        sets = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: prompt sets file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    _validate(sets, str(path))
    return sets


def _validate(sets: Any, where: str) -> None:
    if not isinstance(sets, dict) or not sets:
        raise DataError(
            f"{where}: expected a non-empty object mapping relation -> list of exemplar lists"
        )
    for relation, prompts in sets.items():
        if not isinstance(prompts, list) or not prompts:
            raise DataError(f"{where}: [{relation!r}] must be a non-empty list of exemplar lists")
        for i, exemplars in enumerate(prompts):
            if not isinstance(exemplars, list) or not exemplars:
                raise DataError(f"{where}: [{relation!r}][{i}] must be a non-empty list of exemplars")
            for j, ex in enumerate(exemplars):
                if not isinstance(ex, dict) or not all(
                    isinstance(ex.get(key), str) for key in ("question", "answer")
                ):
                    raise DataError(
                        f"{where}: [{relation!r}][{i}][{j}] must be an object "
                        "with string 'question' and 'answer'"
                    )


def format_probe_prompt(exemplars: Sequence[dict], question: str) -> str:
    """``Q: {question}\\nA: {answer}\\n\\n`` per exemplar, then ``Q: {question}\\nA:``."""
    shots = "".join(f"Q: {ex['question']}\nA: {ex['answer']}\n\n" for ex in exemplars)
    return f"{shots}Q: {question}\nA:"


def format_train_pair(question: str, answer: str, template: str) -> tuple[str, str]:
    """Split one fine-tuning example into ``(prompt, target)``; loss goes on the target only.

    ``template`` is ``"gekhman"`` (prompt ``Answer the following question. {question}\\n``,
    target ``{answer}``), ``"qa"`` (prompt ``Q: {question}\\nA:``, target `` {answer}\\n``) or a
    custom string containing ``{question}``. A custom string splits at ``{answer}``: the text
    before it is the prompt, except that trailing spaces move to the target (so ``A: {answer}``
    gives prompt ``...A:`` and target `` {answer}``, tokenising as in pretraining text); without
    ``{answer}`` the target is the bare answer. The trainer appends EOS to the target.
    """
    text = TRAIN_TEMPLATES.get(template, template)
    if "{question}" not in text:
        raise ValueError(
            f"training template {template!r} is neither a preset {tuple(TRAIN_TEMPLATES)} "
            "nor contains '{question}'"
        )
    if text.count("{answer}") > 1:
        raise ValueError(f"training template {template!r} contains '{{answer}}' more than once")
    head, sep, tail = text.partition("{answer}")
    if not sep:
        head, tail = text, ""
    if "{question}" not in head:
        raise ValueError(f"training template {template!r} puts '{{answer}}' before '{{question}}'")
    prompt = head.rstrip(" ")
    target = head[len(prompt) :] + answer + tail.replace("{question}", question)
    return prompt.replace("{question}", question), target


def clean_answer(completion: str) -> str:
    """The completion up to its first newline, stripped of surrounding whitespace."""
    return completion.split("\n", 1)[0].strip()
