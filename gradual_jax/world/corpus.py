"""The pretraining corpus: statements of facts with skewed frequencies, plus QA-format text.

Each subject gets as many short documents as its most-stated fact has mentions; every fact is
stated in `mentions` of those documents through a random paraphrase, and `wrong_mentions` of
them give the fact's conflicting value instead. QA-format documents (`Q: ..\\nA: ..` blocks of one
relation, as the probe's few-shot prompts are) cover every relation; they use dev facts, mentioned
background facts and a `qa_train_coverage` share of train candidates, never test facts.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from gradual_jax.world.config import WorldConfig
from gradual_jax.world.generate import BACKGROUND, CANDIDATE, RELATION_BY_ID, RELATIONS, Fact, World

QA_DOC_FLOOR = 20  # QA documents per relation at least, so small relations still teach the format


def qa_block(question: str, answer: str) -> str:
    """One probe-style block `Q: {question}\\nA: {answer}\\n\\n`."""
    return f"Q: {question}\nA: {answer}\n\n"


def build_corpus(world: World, cfg: WorldConfig) -> list[str]:
    """Shuffled corpus documents (deterministic per `cfg.seed`).

    Promises: a fact with `mentions == 0` is never stated and never appears in QA text; every
    relation appears in QA-format text; no test fact appears in QA-format text.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    docs = _statement_docs(rng, world)
    docs += _qa_docs(rng, world, cfg, n_statement_docs=len(docs))
    return [docs[i] for i in rng.permutation(len(docs))]


def _statement_docs(rng: np.random.Generator, world: World) -> list[str]:
    by_subject: dict[str, list[Fact]] = defaultdict(list)
    for f in world.facts:
        if f.mentions > 0:
            by_subject[f.subject].append(f)
    docs = []
    for subject in sorted(by_subject):
        facts = by_subject[subject]
        n_docs = max(f.mentions for f in facts)
        sentences: list[list[str]] = [[] for _ in range(n_docs)]
        for f in facts:
            where = rng.choice(n_docs, f.mentions, replace=False)
            wrong = set(rng.choice(f.mentions, f.wrong_mentions, replace=False).tolist())
            for j, d in enumerate(where):
                value = f.wrong_answer if j in wrong else f.answer
                sentences[d].append(_statement(rng, f.relation, f.subject, value))
        for parts in sentences:
            docs.append(" ".join(parts[i] for i in rng.permutation(len(parts))))
    return docs


def _statement(rng: np.random.Generator, relation: str, subject: str, value: str) -> str:
    templates = RELATION_BY_ID[relation].statements
    return templates[rng.integers(len(templates))].format(s=subject, o=value)


def qa_pool(world: World, cfg: WorldConfig, relation: str) -> list[Fact]:
    """Facts of `relation` that QA-format corpus text may show: dev facts, mentioned background
    facts and the first `qa_train_coverage` share of train candidates (never test facts)."""
    train = world.facts_of(relation, CANDIDATE)
    covered = {f.subject for f in train[: round(cfg.qa_train_coverage * len(train))] if f.mentions > 0}
    return [f for f in world.facts_of(relation)
            if f.split == "dev" or (f.split == BACKGROUND and f.mentions > 0) or f.subject in covered]


def _qa_docs(rng: np.random.Generator, world: World, cfg: WorldConfig, n_statement_docs: int) -> list[str]:
    if cfg.qa_text_fraction == 0:
        return []
    total = round(n_statement_docs * cfg.qa_text_fraction / (1 - cfg.qa_text_fraction))
    n_facts = {r.id: len(world.facts_of(r.id)) for r in RELATIONS}
    all_facts = sum(n_facts.values())
    docs = []
    for rel in RELATIONS:
        pool = qa_pool(world, cfg, rel.id)
        n_docs = max(QA_DOC_FLOOR, round(total * n_facts[rel.id] / all_facts))
        for _ in range(n_docs):
            picks = rng.choice(len(pool), min(cfg.qa_pairs_per_doc, len(pool)), replace=False)
            text = "".join(qa_block(pool[i].question, pool[i].answer) for i in picks)
            docs.append(text.rstrip("\n") + "\n")
    return docs
