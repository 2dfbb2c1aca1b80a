"""Fictional entities, their relations, the facts' mention plan, and the QA splits.

A world is a set of facts `(relation, subject) -> answer`. Each fact also carries how often the
corpus states it, whether some of those statements give a person-specific wrong value, and the QA
split its question belongs to: `dev`, `test`, `candidate` (may become `train`) or `background`
(corpus text only). Candidates are written like train facts; once the model is pretrained,
`select_train` keeps `n_train_per_relation` of them per relation as the train split and turns
the rest into background facts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradual_jax.world.config import WorldConfig
from gradual_jax.world.names import company_names, person_names, unique_words, work_titles

SPLITS = ("train", "dev", "test")
BACKGROUND = "background"
CANDIDATE = "candidate"


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation with its EntityQuestions-style question and corpus paraphrases.

    Templates use `{s}` for the subject and `{o}` for the answer.
    """

    id: str
    name: str
    subject_kind: str
    object_kind: str
    question: str
    statements: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation("P19", "place of birth", "person", "city", "Where was {s} born?",
             ("{s} was born in {o}.", "{s} is a native of {o}.", "The birthplace of {s} is {o}.",
              "{s} grew up in {o}, the city of their birth.")),
    Relation("P27", "country of citizenship", "person", "country", "Which country is {s} a citizen of?",
             ("{s} is a citizen of {o}.", "{s} holds citizenship of {o}.",
              "The nationality of {s} is {o}.", "{s} carries a passport from {o}.")),
    Relation("P108", "employer", "person", "company", "Which company does {s} work for?",
             ("{s} works for {o}.", "{s} is employed by {o}.", "The employer of {s} is {o}.",
              "{s} has a job at {o}.")),
    Relation("P26", "spouse", "person", "person", "Who is {s} married to?",
             ("{s} is married to {o}.", "The spouse of {s} is {o}.", "{s} lives with their spouse {o}.",
              "{s} married {o}.")),
    Relation("P36", "capital", "country", "city", "What is the capital of {s}?",
             ("The capital of {s} is {o}.", "{o} is the capital of {s}.",
              "The government of {s} sits in {o}.")),
    Relation("P17", "country", "city", "country", "Which country is {s} located in?",
             ("{s} is a city in {o}.", "{s} is located in {o}.", "The city of {s} lies in {o}.")),
    Relation("P159", "headquarters location", "company", "city", "Where is the headquarters of {s}?",
             ("{s} is headquartered in {o}.", "The headquarters of {s} is in {o}.",
              "{s} has its main office in {o}.")),
    Relation("P50", "author", "work", "person", "Who is the author of {s}?",
             ("{s} was written by {o}.", "{o} is the author of {s}.", "{o} wrote {s}.")),
)
RELATION_BY_ID: dict[str, Relation] = {r.id: r for r in RELATIONS}


@dataclasses.dataclass(frozen=True)
class Fact:
    """One fact and its corpus plan: `mentions` statements, `wrong_mentions` of them wrong."""

    relation: str
    subject: str
    answer: str
    split: str
    mentions: int
    wrong_answer: str | None = None
    wrong_mentions: int = 0

    @property
    def question(self) -> str:
        return RELATION_BY_ID[self.relation].question.format(s=self.subject)


@dataclasses.dataclass(frozen=True)
class World:
    """Entities by kind and every fact about them."""

    seed: int
    entities: Mapping[str, tuple[str, ...]]
    facts: tuple[Fact, ...]

    def facts_of(self, relation: str, split: str | None = None) -> list[Fact]:
        return [f for f in self.facts if f.relation == relation and (split is None or f.split == split)]

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "entities": {k: list(v) for k, v in self.entities.items()},
                "facts": [dataclasses.asdict(f) for f in self.facts]}


def world_from_json(d: Mapping[str, Any]) -> World:
    """The World that `World.to_json` wrote."""
    return World(seed=int(d["seed"]), entities={k: tuple(v) for k, v in d["entities"].items()},
                 facts=tuple(Fact(**f) for f in d["facts"]))


def generate_world(cfg: WorldConfig) -> World:
    """A deterministic world for `cfg.seed`: entities, true answers, mention plan and splits.

    Promises: every city lies in one country and every capital lies in its country; a person's
    citizenship is their birthplace's country with probability `citizenship_follows_birthplace`;
    spouses are symmetric; answers are spread evenly over their candidates (flat priors); dev
    facts are stated `max_mentions` times without conflicts; dev, train-candidate and test
    subjects of a relation are disjoint. No fact is `train` yet: see `select_train`.
    """
    rng = np.random.default_rng(cfg.seed)
    entities = _entities(rng, cfg)
    answers = _answers(rng, cfg, entities)
    splits = _splits(rng, cfg, entities, answers)
    # Drawn per entity, not per fact: a never-mentioned person is absent from every statement
    # about them, and a conflicted person's facts all carry wrong values.
    never = _subjects_with_probability(rng, entities, cfg.never_mentioned_fraction)
    conflicted = _subjects_with_probability(rng, entities, cfg.conflict_subject_fraction)
    facts = []
    for rel in RELATIONS:
        for s in entities[rel.subject_kind]:
            split = splits[rel.id].get(s, BACKGROUND)
            facts.append(_plan_fact(rng, cfg, rel, s, answers[rel.id][s], split,
                                    s in never and split != "dev", s in conflicted, entities))
    return World(seed=cfg.seed, entities=entities, facts=tuple(facts))


def _entities(rng: np.random.Generator, cfg: WorldConfig) -> dict[str, tuple[str, ...]]:
    taken: set[str] = set()
    countries = unique_words(rng, cfg.n_countries, taken, syllables=(2,), suffix="ia")
    cities = unique_words(rng, cfg.n_cities, taken, syllables=(2, 3))
    companies = company_names(rng, cfg.n_companies, taken)
    people = person_names(rng, cfg.n_people, taken)
    works = work_titles(rng, cfg.n_works, taken)
    return {"country": tuple(countries), "city": tuple(cities), "company": tuple(companies),
            "person": tuple(people), "work": tuple(works)}


def _balanced(rng: np.random.Generator, values: tuple[str, ...] | list[str], n: int) -> list[str]:
    """`n` values drawn so every value occurs floor(n/len) or ceil(n/len) times: a flat prior."""
    extra = [values[i] for i in rng.choice(len(values), n % len(values), replace=False)]
    reps = list(values) * (n // len(values)) + extra
    return [str(reps[i]) for i in rng.permutation(n)]


def _answers(rng: np.random.Generator, cfg: WorldConfig,
             e: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    city_country = dict(zip(e["city"], _balanced(rng, e["country"], len(e["city"]))))
    capital = {c: str(rng.choice([city for city, cc in city_country.items() if cc == c]))
               for c in e["country"]}
    people = list(e["person"])
    birthplace = dict(zip(people, _balanced(rng, e["city"], len(people))))
    citizenship = {}
    for p in people:
        home = city_country[birthplace[p]]
        if rng.random() < cfg.citizenship_follows_birthplace:
            citizenship[p] = home
        else:
            citizenship[p] = str(rng.choice([c for c in e["country"] if c != home]))
    order = rng.permutation(len(people))
    spouse = {}
    for i in range(0, len(order), 2):
        a, b = people[order[i]], people[order[i + 1]]
        spouse[a], spouse[b] = b, a
    authors = rng.choice(people, len(e["work"]), replace=len(e["work"]) > len(people))
    return {
        "P19": birthplace,
        "P27": citizenship,
        "P108": dict(zip(people, _balanced(rng, e["company"], len(people)))),
        "P26": spouse,
        "P36": capital,
        "P17": city_country,
        "P159": dict(zip(e["company"], _balanced(rng, e["city"], len(e["company"])))),
        "P50": dict(zip(e["work"], (str(a) for a in authors))),
    }


def split_sizes(n_subjects: int, cfg: WorldConfig) -> tuple[int, int, int]:
    """(dev, train candidates, test) sizes for a relation with `n_subjects` subjects.

    At most `qa_split_fraction` of the non-dev subjects become test examples or train
    candidates (at most `train_candidate_factor * n_train_per_relation` of them); the rest stay
    background facts, which the corpus may show in QA form to teach the format.
    """
    dev = min(n_subjects, cfg.n_dev_per_relation, max(5, n_subjects // 5))
    room = int(max(0, n_subjects - dev) * cfg.qa_split_fraction)
    share = cfg.n_test_per_relation / max(1, cfg.n_train_per_relation + cfg.n_test_per_relation)
    test = min(cfg.n_test_per_relation, round(room * share))
    candidates = min(room - test, round(cfg.train_candidate_factor * cfg.n_train_per_relation))
    return dev, candidates, test


def _splits(rng: np.random.Generator, cfg: WorldConfig, e: Mapping[str, tuple[str, ...]],
            answers: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Split of each relation's subjects. People are split as married couples, so a question
    and its reverse (spouse) never straddle train candidates and test."""
    out: dict[str, dict[str, str]] = {}
    couples = sorted({tuple(sorted((p, q))) for p, q in answers["P26"].items()})
    couple_order = [couples[i] for i in rng.permutation(len(couples))]
    people_order = [p for c in couple_order for p in c]
    sizes = tuple(k + k % 2 for k in split_sizes(len(people_order), cfg))
    if sum(sizes) > len(people_order):
        sizes = split_sizes(len(people_order), cfg)
    people_split = _assign(people_order, sizes)
    for rel in RELATIONS:
        if rel.subject_kind == "person":
            out[rel.id] = people_split
        else:
            subjects = e[rel.subject_kind]
            order = [subjects[i] for i in rng.permutation(len(subjects))]
            out[rel.id] = _assign(order, split_sizes(len(order), cfg))
    return out


def _assign(order: list[str], sizes: tuple[int, int, int]) -> dict[str, str]:
    dev, candidates, test = sizes
    labels = ["dev"] * dev + [CANDIDATE] * candidates + ["test"] * test
    return dict(zip(order, labels))


def _subjects_with_probability(rng: np.random.Generator, entities: Mapping[str, tuple[str, ...]],
                               p: float) -> set[str]:
    return {name for kind in sorted(entities) for name in entities[kind] if rng.random() < p}


def _log_uniform_count(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))


def _plan_fact(rng: np.random.Generator, cfg: WorldConfig, rel: Relation, subject: str, answer: str,
               split: str, never: bool, conflicted: bool,
               entities: Mapping[str, tuple[str, ...]]) -> Fact:
    if split == "dev":
        return Fact(rel.id, subject, answer, split, cfg.max_mentions)
    mentions = 0 if never else _log_uniform_count(rng, cfg.min_mentions, cfg.max_mentions)
    if not conflicted or mentions < 2:
        return Fact(rel.id, subject, answer, split, mentions)
    rate = rng.uniform(cfg.conflict_rate_min, cfg.conflict_rate_max)
    wrong_mentions = min(int(round(rate * mentions)), mentions // 2)  # the truth is never outnumbered
    if wrong_mentions == 0:
        return Fact(rel.id, subject, answer, split, mentions)
    candidates = entities[rel.object_kind]
    wrong = answer
    while wrong in (answer, subject):
        wrong = str(candidates[rng.integers(len(candidates))])
    return Fact(rel.id, subject, answer, split, mentions, wrong, wrong_mentions)


def select_train(world: World, cfg: WorldConfig, categories: Mapping[tuple[str, str], str] | None = None,
                 ) -> World:
    """The world with `n_train_per_relation` candidates per relation made `train`, the other
    candidates `background`.

    With `categories` ((relation, subject) -> estimated SliCK category of a candidate), each
    category gets up to a quarter of a relation's train examples before the rest is filled at
    random, so every category is represented when the model's knowledge allows; without it the
    choice is random. Deterministic per `cfg.seed`.
    """
    rng = np.random.default_rng([cfg.seed, 3])
    chosen: set[tuple[str, str]] = set()
    for rel in RELATIONS:
        pool = [f.subject for f in world.facts_of(rel.id, CANDIDATE)]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n = min(cfg.n_train_per_relation, len(pool))
        picks: list[str] = []
        if categories:
            quota = math.ceil(n / 4)
            for category in sorted({categories[(rel.id, s)] for s in pool}):
                picks += [s for s in pool if categories[(rel.id, s)] == category][:quota]
            picks = picks[:n]
        picks += [s for s in pool if s not in picks][: n - len(picks)]
        chosen.update((rel.id, s) for s in picks)
    facts = tuple(
        f if f.split != CANDIDATE else dataclasses.replace(
            f, split="train" if (f.relation, f.subject) in chosen else BACKGROUND)
        for f in world.facts)
    return dataclasses.replace(world, facts=facts)
