"""Pure-functional curriculum state machine over SliCK categories.

A :class:`CurriculumState` records, for a fixed set of example ids, the category of every
example after every probe (probe 0 is the stage-0 model) and the stage at which each example
was first trained. Functions here never mutate a state: they return new ones. Nothing here
knows about models or JAX; ``launch.py`` joins this module to the prober and the trainer.

Life of a state in the two-stage method::

    s = initial_state(probe0)                      # stage 0, one probe
    ids = select(s, StageSpec.from_dict(...), seed) # stage-1 training set
    s = mark_trained(s, ids, 1)
    s = advance(s, probe1)                         # stage 1, two probes
    ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

from gradual_jax.errors import UserError
from gradual_jax.knowledge.categories import CATEGORIES, CATEGORY_RANK

_RANK = CATEGORY_RANK  # 0 = best

JSON_FORMAT = "gradual_jax.curriculum/1"


class FrozenMap(Mapping):
    """A read-only, hashable, picklable ``dict`` wrapper (insertion order kept)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | Iterable[tuple[Any, Any]] = ()) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is immutable")

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self):
        return (FrozenMap, (self._data,))


def _freeze(m: Mapping) -> FrozenMap:
    return m if isinstance(m, FrozenMap) else FrozenMap(m)


def _name_ids(ids: Iterable[str], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_category(category: Any, where: str) -> str:
    if category not in _RANK:
        raise ValueError(
            f"{where}: unknown category {category!r}; valid categories: {', '.join(CATEGORIES)}"
        )
    return category


# --------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class CurriculumState:
    """Categories of a fixed set of examples across probes, and what has been trained.

    Invariants (checked on construction): ids are unique; every probe maps exactly the ids to
    valid categories; ``trained_in`` keys are ids and its values stages >= 1;
    ``stage == len(probes) - 1`` (probe ``s`` measures the model after stage ``s``).
    Containers are converted to tuples and :class:`FrozenMap` so a state cannot be mutated.
    """

    example_ids: tuple[str, ...]
    probes: tuple[Mapping[str, str], ...]
    trained_in: Mapping[str, int]
    stage: int

    def __post_init__(self) -> None:
        ids = tuple(self.example_ids)
        probes = tuple(_freeze(p) for p in self.probes)
        trained = _freeze(self.trained_in)
        object.__setattr__(self, "example_ids", ids)
        object.__setattr__(self, "probes", probes)
        object.__setattr__(self, "trained_in", trained)

        id_set = set(ids)
        if len(id_set) != len(ids):
            seen: set[str] = set()
            dups = [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(f"duplicate example ids: {_name_ids(dict.fromkeys(dups))}")
        if not probes:
            raise ValueError("a curriculum state needs at least one probe (stage 0)")
        for k, probe in enumerate(probes):
            if probe.keys() != id_set:
                _raise_coverage(f"probe {k}", id_set, probe.keys())
            for i, c in probe.items():
                _check_category(c, f"probe {k}, example {i!r}")
        extra = [i for i in trained if i not in id_set]
        if extra:
            raise ValueError(f"trained_in names unknown example ids: {_name_ids(extra)}")
        for i, s in trained.items():
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ValueError(f"trained_in[{i!r}] must be a stage >= 1, got {s!r}")
        if not isinstance(self.stage, int) or self.stage != len(probes) - 1:
            raise ValueError(
                f"stage must equal the number of probes - 1 ({len(probes) - 1}), got {self.stage!r}"
            )

    @property
    def latest(self) -> Mapping[str, str]:
        """Category of each example at the latest probe."""
        return self.probes[-1]

    def untrained(self) -> tuple[str, ...]:
        """Ids never trained on, in state order."""
        return tuple(i for i in self.example_ids if i not in self.trained_in)


def _raise_coverage(what: str, expected: set[str], got: Iterable[str]) -> None:
    got = set(got)
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} id(s): {_name_ids(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected id(s): {_name_ids(extra)}")
    raise ValueError(f"{what} must cover exactly the state's example ids; " + "; ".join(parts))


def _read_records(probe_records: Iterable[Any]) -> dict[str, str]:
    """{id: category} from records that are mappings or objects with ``id``/``category``."""
    out: dict[str, str] = {}
    for n, rec in enumerate(probe_records):
        try:
            if isinstance(rec, Mapping):
                rid, cat = rec["id"], rec["category"]
            else:
                rid, cat = rec.id, rec.category
        except (KeyError, AttributeError):
            raise ValueError(
                f"probe record {n} needs 'id' and 'category', got {rec!r:.80}"
            ) from None
        if not isinstance(rid, str):
            raise ValueError(f"probe record {n}: id must be a string, got {rid!r}")
        if rid in out:
            raise ValueError(f"probe records contain id {rid!r} more than once")
        out[rid] = _check_category(cat, f"probe record {n} (id {rid!r})")
    return out


def initial_state(probe_records: Iterable[Any]) -> CurriculumState:
    """Stage-0 state from the first probe's records (dicts with at least ``id``, ``category``).

    Example order follows the records. Raises ValueError on no records, a duplicate id or an
    unknown category.
    """
    probe = _read_records(probe_records)
    if not probe:
        raise ValueError("initial_state needs at least one probe record")
    return CurriculumState(tuple(probe), (probe,), {}, 0)


def advance(state: CurriculumState, probe_records: Iterable[Any]) -> CurriculumState:
    """State one stage later with ``probe_records`` appended as the newest probe.

    The records must cover exactly ``state.example_ids`` (ValueError naming missing and extra
    ids otherwise); ids, their order and ``trained_in`` are carried over unchanged.
    """
    got = _read_records(probe_records)
    if got.keys() != set(state.example_ids):
        _raise_coverage(f"probe for stage {state.stage + 1}", set(state.example_ids), got)
    probe = {i: got[i] for i in state.example_ids}
    return dataclasses.replace(state, probes=state.probes + (probe,), stage=state.stage + 1)


def mark_trained(state: CurriculumState, ids: Iterable[str], stage: int) -> CurriculumState:
    """State with ``ids`` recorded as trained at ``stage``.

    ``stage`` must be in ``1 .. state.stage + 1`` (mark before or after re-probing). An example
    already trained keeps its first stage, so replayed examples stay attributed to the stage
    that first trained them. Unknown ids raise ValueError.
    """
    if not isinstance(stage, int) or isinstance(stage, bool) or not 1 <= stage <= state.stage + 1:
        raise ValueError(f"stage must be an int in 1..{state.stage + 1}, got {stage!r}")
    ids = list(ids)
    known = set(state.example_ids)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"mark_trained: unknown example ids: {_name_ids(unknown)}")
    trained = dict(state.trained_in)
    for i in ids:
        trained.setdefault(i, stage)
    return dataclasses.replace(state, trained_in=trained)


# --------------------------------------------------------------------------- selection


class EmptySelection(UserError):
    """A stage spec selected no examples."""


_SPEC_KEYS = (
    "categories",
    "moved_up_from",
    "into",
    "since",
    "untrained",
    "replay",
    "replay_ratio",
    "max_examples",
    "random",
    "size",
)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Which examples a training stage uses. Filters combine with AND; no filter = all examples.

    - ``categories``: category at the latest probe is one of these.
    - ``moved_up_from`` + ``into`` (given together): category at the reference probe is in
      ``moved_up_from``, category at the latest probe is in ``into``, and the latest category
      ranks strictly better than the reference one. The reference probe is probe 0 (stage 0)
      when ``since == "first"`` (the default: Gradual Learning's stage 2 takes examples that were
      WeaklyKnown/Unknown at stage 0 and are MaybeKnown/HighlyKnown now), or the probe before the
      latest when ``since == "previous"``.
    - ``untrained``: drop examples trained at any earlier stage.
    - ``max_examples``: keep at most this many (a uniform random subset).
    - ``random`` + ``size``: a uniform random subset of exactly ``size`` matching examples
      (ValueError if fewer match); used by the random-subset arm.
    - ``replay`` + ``replay_ratio``: add ``round(replay_ratio * n)`` examples (half rounds up),
      where ``n`` is the size of the set chosen above, drawn from examples whose latest category
      is ``replay`` and that are not already chosen (trained or not). If fewer exist, all are
      added.
    """

    categories: tuple[str, ...] | None = None
    moved_up_from: tuple[str, ...] | None = None
    into: tuple[str, ...] | None = None
    since: Literal["first", "previous"] = "first"
    untrained: bool = False
    replay: str | None = None
    replay_ratio: float = 0.0
    max_examples: int | None = None
    random: bool = False
    size: int | None = None

    def __post_init__(self) -> None:
        for key in ("categories", "moved_up_from", "into"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(
                    f"stage select '{key}' must be a list of categories, got {value!r}"
                )
            value = tuple(value)
            if not value:
                raise ValueError(f"stage select '{key}' must not be empty")
            for c in value:
                _check_category(c, f"stage select '{key}'")
            object.__setattr__(self, key, value)
        if (self.moved_up_from is None) != (self.into is None):
            raise ValueError("stage select 'moved_up_from' and 'into' must be given together")
        if self.since not in ("first", "previous"):
            raise ValueError(
                f"stage select 'since' must be 'first' or 'previous', got {self.since!r}"
            )
        for key in ("untrained", "random"):
            flag = getattr(self, key)
            if not isinstance(flag, bool):
                raise ValueError(f"stage select '{key}' must be true or false, got {flag!r}")
        if self.replay is not None:
            _check_category(self.replay, "stage select 'replay'")
        ratio = self.replay_ratio
        is_number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if not is_number or not math.isfinite(ratio):
            raise ValueError(f"stage select 'replay_ratio' must be a number, got {ratio!r}")
        object.__setattr__(self, "replay_ratio", float(ratio))
        if ratio < 0:
            raise ValueError(f"stage select 'replay_ratio' must be >= 0, got {ratio!r}")
        if (self.replay is None) != (ratio == 0):
            raise ValueError("stage select 'replay' and a replay_ratio > 0 must be given together")
        for key in ("max_examples", "size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"stage select '{key}' must be an integer >= 1, got {v!r}")
        if self.random != (self.size is not None):
            raise ValueError("stage select 'random: true' and 'size' must be given together")
        if self.size is not None and self.max_examples is not None:
            raise ValueError("stage select takes 'size' or 'max_examples', not both")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        """Spec from config data (lists become tuples). Raises ValueError on an unknown key
        (listing the valid keys), an unknown category (listing the valid ones) or a bad value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"stage select must be a mapping, got {data!r:.80}")
        unknown = [k for k in data if k not in _SPEC_KEYS]
        if unknown:
            raise ValueError(
                f"unknown stage select key {unknown[0]!r}; valid keys: {', '.join(_SPEC_KEYS)}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The non-default fields, as config data (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def __str__(self) -> str:
        fields = self.to_dict()
        if not fields:
            return "select {} (all examples)"
        return "select {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {rng!r}")


def _shuffled(ids: list[str], gen: np.random.Generator) -> list[str]:
    return [ids[j] for j in gen.permutation(len(ids))]


def _matches(state: CurriculumState, spec: StageSpec) -> list[str]:
    """Ids passing the spec's filters, sorted."""
    latest = state.probes[-1]
    if spec.since == "first":
        reference = state.probes[0]
    else:  # with a single probe this is the latest one, so nothing has moved
        reference = state.probes[max(0, len(state.probes) - 2)]
    out = []
    for i in sorted(state.example_ids):
        now = latest[i]
        if spec.categories is not None and now not in spec.categories:
            continue
        if spec.moved_up_from is not None:
            then = reference[i]
            if then not in spec.moved_up_from or now not in spec.into or _RANK[now] >= _RANK[then]:
                continue
        if spec.untrained and i in state.trained_in:
            continue
        out.append(i)
    return out


def select(
    state: CurriculumState, spec: StageSpec, rng: np.random.Generator | int
) -> tuple[str, ...]:
    """Ids to train on for ``spec``: no duplicates, all from ``state.example_ids``.

    Matching ids are sorted, then permuted by ``rng`` (a Generator, which is advanced, or an int
    seed), so the result depends only on the state, the spec and the seed. Replay examples are
    mixed into the same shuffled order. Raises :class:`EmptySelection` when no example matches
    (the message names the spec and the latest category counts) and ValueError when
    ``random``/``size`` asks for more examples than match.
    """
    gen = _rng(rng)
    pool = _shuffled(_matches(state, spec), gen)
    if spec.size is not None:
        if 0 < len(pool) < spec.size:
            raise ValueError(f"{spec} asks for {spec.size} examples but only {len(pool)} match")
        chosen = pool[: spec.size]
    elif spec.max_examples is not None:
        chosen = pool[: spec.max_examples]
    else:
        chosen = pool
    if not chosen:
        counts = ", ".join(f"{c}={n}" for c, n in category_counts(state).items())
        raise EmptySelection(
            f"no examples match {spec} (latest probe: {counts}; "
            f"{len(state.trained_in)} already trained)"
        )
    if spec.replay is not None:
        n_replay = int(math.floor(spec.replay_ratio * len(chosen) + 0.5))
        taken = set(chosen)
        replay_pool = [
            i
            for i in sorted(state.example_ids)
            if state.latest[i] == spec.replay and i not in taken
        ]
        chosen = chosen + _shuffled(replay_pool, gen)[:n_replay]
    return tuple(_shuffled(chosen, gen))


# --------------------------------------------------------------------------- analysis


def _probe_index(state: CurriculumState, k: int) -> int:
    n = len(state.probes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -n <= k < n:
        raise IndexError(f"probe index {k!r} out of range for {n} probe(s)")
    return int(k) % n


def category_counts(state: CurriculumState, probe: int = -1) -> dict[str, int]:
    """Number of examples per category (all of CATEGORIES, in order) at ``probe``."""
    p = state.probes[_probe_index(state, probe)]
    counts = dict.fromkeys(CATEGORIES, 0)
    for c in p.values():
        counts[c] += 1
    return counts


def transitions(
    state: CurriculumState, a: int, b: int, *, ids: Iterable[str] | None = None
) -> np.ndarray:
    """4x4 int64 counts of examples by category at probe ``a`` (row) and probe ``b`` (column),
    both in CATEGORIES order (best first). Negative probe indices count from the latest.
    ``ids`` restricts the count (ValueError on unknown ids; duplicates count once)."""
    pa = state.probes[_probe_index(state, a)]
    pb = state.probes[_probe_index(state, b)]
    if ids is None:
        chosen: Iterable[str] = state.example_ids
    else:
        chosen = list(dict.fromkeys(ids))
        unknown = [i for i in chosen if i not in pa]
        if unknown:
            raise ValueError(f"transitions: unknown example ids: {_name_ids(unknown)}")
    m = np.zeros((len(CATEGORIES), len(CATEGORIES)), dtype=np.int64)
    for i in chosen:
        m[_RANK[pa[i]], _RANK[pb[i]]] += 1
    return m


def _moved(
    state: CurriculumState, a: int, b: int, untrained_only: bool, up: bool
) -> tuple[str, ...]:
    pa = state.probes[_probe_index(state, a)]
    pb = state.probes[_probe_index(state, b)]
    out = []
    for i in state.example_ids:
        if untrained_only and i in state.trained_in:
            continue
        delta = _RANK[pa[i]] - _RANK[pb[i]]  # > 0: better at b
        if (delta > 0) if up else (delta < 0):
            out.append(i)
    return tuple(out)


def moved_up(
    state: CurriculumState, a: int, b: int, *, untrained_only: bool = False
) -> tuple[str, ...]:
    """Ids whose category at probe ``b`` ranks better than at probe ``a``, in state order;
    ``untrained_only`` drops examples ever trained on."""
    return _moved(state, a, b, untrained_only, up=True)


def moved_down(
    state: CurriculumState, a: int, b: int, *, untrained_only: bool = False
) -> tuple[str, ...]:
    """Ids whose category at probe ``b`` ranks worse than at probe ``a``, in state order;
    ``untrained_only`` drops examples ever trained on."""
    return _moved(state, a, b, untrained_only, up=False)


def should_continue(state: CurriculumState, min_moved_up: int) -> bool:
    """Stopping rule for extra stages: True while at least ``min_moved_up`` never-trained
    examples moved up between the last two probes. Needs at least two probes (ValueError)."""
    if len(state.probes) < 2:
        raise ValueError("should_continue needs at least two probes")
    return len(moved_up(state, -2, -1, untrained_only=True)) >= min_moved_up


# --------------------------------------------------------------------------- persistence


def to_json(state: CurriculumState) -> dict[str, Any]:
    """JSON-serialisable dict; probes are lists of categories aligned with ``example_ids``."""
    return {
        "format": JSON_FORMAT,
        "stage": state.stage,
        "example_ids": list(state.example_ids),
        "probes": [[p[i] for i in state.example_ids] for p in state.probes],
        "trained_in": {i: state.trained_in[i] for i in state.example_ids if i in state.trained_in},
    }


def from_json(d: Mapping[str, Any]) -> CurriculumState:
    """Inverse of :func:`to_json`; ValueError on a wrong format or inconsistent data."""
    if not isinstance(d, Mapping) or d.get("format") != JSON_FORMAT:
        got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
        raise ValueError(f"not a curriculum state: expected format {JSON_FORMAT!r}, got {got!r}")
    try:
        ids = tuple(d["example_ids"])
        probes = []
        for k, cats in enumerate(d["probes"]):
            if len(cats) != len(ids):
                raise ValueError(
                    f"curriculum state probe {k} has {len(cats)} categories for {len(ids)} ids"
                )
            probes.append(dict(zip(ids, cats)))
        return CurriculumState(ids, tuple(probes), dict(d["trained_in"]), d["stage"])
    except KeyError as err:
        raise ValueError(f"curriculum state is missing key {err.args[0]!r}") from None
