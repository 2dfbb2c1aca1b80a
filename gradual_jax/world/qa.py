"""The world's facts as closed-book QA examples, EntityQuestions style."""

from __future__ import annotations

from gradual_jax.knowledge.data import QAExample
from gradual_jax.world.corpus import qa_block
from gradual_jax.world.generate import RELATIONS, SPLITS, World


def qa_examples(world: World) -> dict[str, list[QAExample]]:
    """Examples per split (`train`, `dev`, `test`), grouped by relation in RELATIONS order.

    An id is `"{relation}.{split}.{index}"` (index within the relation's split); the answer
    tuple holds the one true answer; background facts yield no example.
    """
    out: dict[str, list[QAExample]] = {split: [] for split in SPLITS}
    for rel in RELATIONS:
        for split in SPLITS:
            for i, f in enumerate(world.facts_of(rel.id, split)):
                out[split].append(QAExample(id=f"{rel.id}.{split}.{i}", relation=rel.id, question=f.question,
                                            answers=(f.answer,), split=split, subject=f.subject))
    return out


def lexicon_texts(world: World) -> list[str]:
    """Every fact's question and answer as probe-format text: added to the tokenizer's training
    text so that names of never-mentioned entities are whole tokens too."""
    return [qa_block(f.question, f.answer) for f in world.facts]
