"""Curriculum state machine: hand-worked stages, transitions and properties."""

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradual_jax import curriculum as cur
from gradual_jax.curriculum import CATEGORIES, EmptySelection, StageSpec

HK, MK, WK, UK = CATEGORIES

IDS = tuple("abcdefghij")
# Probe 0 (stage 0) and probe 1 (after stage 1 trained on d, e), worked by hand.
P0 = dict(zip(IDS, [HK, HK, HK, MK, MK, WK, WK, UK, UK, UK]))
P1 = dict(zip(IDS, [HK, HK, MK, HK, MK, MK, HK, WK, MK, UK]))

STAGE2 = {
    "moved_up_from": [WK, UK],
    "into": [MK, HK],
    "untrained": True,
    "replay": HK,
    "replay_ratio": 0.2,
}


def records(probe):
    return [{"id": i, "category": c, "p_greedy": 0.0} for i, c in probe.items()]


def state_after_stage1():
    s0 = cur.initial_state(records(P0))
    ids = cur.select(s0, StageSpec.from_dict({"categories": [MK]}), 0)
    s = cur.mark_trained(s0, ids, 1)
    return cur.advance(s, records(P1))


# ----------------------------------------------------------------- hand-built stages


def test_initial_state_keeps_record_order_and_stage_zero():
    s = cur.initial_state(records(P0))
    assert s.example_ids == IDS
    assert s.stage == 0 and len(s.probes) == 1
    assert dict(s.latest) == P0
    assert dict(s.trained_in) == {}


def test_stage1_selects_exactly_the_maybeknown_examples():
    s0 = cur.initial_state(records(P0))
    ids = cur.select(s0, StageSpec.from_dict({"categories": ["MaybeKnown"]}), 0)
    assert sorted(ids) == ["d", "e"]


def test_stage2_moved_up_untrained_plus_highlyknown_replay():
    s = state_after_stage1()
    assert s.stage == 1
    assert dict(s.trained_in) == {"d": 1, "e": 1}
    spec = StageSpec.from_dict(STAGE2)
    ids = cur.select(s, spec, 3)
    # Moved up from WK/UK at probe 0 into MK/HK now, never trained: f (WK->MK), g (WK->HK),
    # i (UK->MK). h moved up only to WK; d moved up but was trained in stage 1.
    primary = {"f", "g", "i"}
    assert primary <= set(ids)
    # Replay: round(0.2 * 3) = 1 example, HighlyKnown now and not already chosen: a, b or d.
    replay = set(ids) - primary
    assert len(replay) == 1 and replay <= {"a", "b", "d"}
    assert len(ids) == 4


def test_replay_count_rounds_half_up_and_caps_at_pool():
    # 10 moved-up examples and 5 HighlyKnown ones.
    ids = [f"m{k}" for k in range(10)] + [f"h{k}" for k in range(5)]
    p0 = {i: (UK if i.startswith("m") else HK) for i in ids}
    p1 = {i: (MK if i.startswith("m") else HK) for i in ids}
    s = cur.advance(cur.initial_state(records(p0)), records(p1))

    def n_replay(ratio, **extra):
        spec = StageSpec.from_dict({**STAGE2, "replay_ratio": ratio, **extra})
        chosen = cur.select(s, spec, 0)
        return sum(i.startswith("h") for i in chosen), sum(i.startswith("m") for i in chosen)

    assert n_replay(0.2) == (2, 10)  # 0.2 * 10 = 2
    assert n_replay(0.25) == (3, 10)  # 2.5 rounds half up to 3
    assert n_replay(0.2, max_examples=7) == (1, 7)  # 1.4 -> 1, ratio of the capped set
    assert n_replay(0.5, max_examples=5) == (3, 5)  # 2.5 -> 3
    assert n_replay(1.0) == (5, 10)  # only 5 HighlyKnown exist: all of them


def test_moved_up_requires_a_strict_rise_and_since_previous_uses_last_probe():
    s = state_after_stage1()
    # Same category in both sets: only strict rises count (h UK->WK is a rise; b HK stays).
    spec = StageSpec.from_dict({"moved_up_from": [HK, MK, WK, UK], "into": [HK, MK, WK, UK]})
    assert sorted(cur.select(s, spec, 0)) == ["d", "f", "g", "h", "i"]
    # Probe 2: f MK->HK since probe 1 (but WK at probe 0), j UK->MK.
    p2 = {**P1, "f": HK, "j": MK}
    s2 = cur.advance(s, records(p2))
    prev = StageSpec.from_dict({"moved_up_from": [MK, WK, UK], "into": [MK, HK], "since": "previous"})
    assert sorted(cur.select(s2, prev, 0)) == ["f", "j"]
    first = StageSpec.from_dict({"moved_up_from": [WK, UK], "into": [MK, HK], "untrained": True})
    assert sorted(cur.select(s2, first, 0)) == ["f", "g", "i", "j"]


def test_random_size_draws_exactly_that_many_and_errors_when_too_few():
    s = cur.initial_state(records(P0))
    ids = cur.select(s, StageSpec.from_dict({"random": True, "size": 4}), 7)
    assert len(ids) == 4 and set(ids) <= set(IDS)
    with pytest.raises(ValueError, match="asks for 11 examples but only 10 match"):
        cur.select(s, StageSpec.from_dict({"random": True, "size": 11}), 7)


def test_no_filter_selects_all_examples():
    s = cur.initial_state(records(P0))
    assert sorted(cur.select(s, StageSpec(), 0)) == list(IDS)


def test_empty_selection_names_the_spec_and_counts():
    s = cur.initial_state(records(P0))
    spec = StageSpec.from_dict({"moved_up_from": [UK], "into": [HK]})
    with pytest.raises(EmptySelection) as info:
        cur.select(s, spec, 0)
    msg = str(info.value)
    assert "moved_up_from: ['Unknown']" in msg and "into: ['HighlyKnown']" in msg
    assert "HighlyKnown=3, MaybeKnown=2, WeaklyKnown=2, Unknown=3" in msg
    assert isinstance(info.value, ValueError)


def test_transitions_matrix_by_hand():
    s = state_after_stage1()
    expected = np.array(
        [
            # to: HK MK WK UK
            [2, 1, 0, 0],  # from HK: a, b stay; c down to MK
            [1, 1, 0, 0],  # from MK: d up; e stays
            [1, 1, 0, 0],  # from WK: g to HK; f to MK
            [0, 1, 1, 1],  # from UK: i to MK; h to WK; j stays
        ]
    )
    m = cur.transitions(s, 0, 1)
    assert m.dtype.kind == "i" and m.shape == (4, 4)
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(cur.transitions(s, 0, -1), expected)
    untrained = cur.transitions(s, 0, 1, ids=s.untrained())
    expected_untrained = expected.copy()
    expected_untrained[1] = 0  # d and e were trained
    np.testing.assert_array_equal(untrained, expected_untrained)
    np.testing.assert_array_equal(cur.transitions(s, 1, 1), np.diag([4, 4, 1, 1]))
    with pytest.raises(ValueError, match="'zz'"):
        cur.transitions(s, 0, 1, ids=["a", "zz"])
    with pytest.raises(IndexError):
        cur.transitions(s, 0, 2)


def test_moved_up_and_down():
    s = state_after_stage1()
    assert cur.moved_up(s, 0, 1) == ("d", "f", "g", "h", "i")
    assert cur.moved_up(s, 0, 1, untrained_only=True) == ("f", "g", "h", "i")
    assert cur.moved_down(s, 0, 1) == ("c",)
    assert cur.moved_down(s, 1, 0) == ("d", "f", "g", "h", "i")


def test_stopping_rule_counts_untrained_moves_between_last_two_probes():
    s = state_after_stage1()  # untrained moved up 0 -> 1: f, g, h, i
    assert cur.should_continue(s, 4)
    assert not cur.should_continue(s, 5)
    s = cur.mark_trained(s, ["f", "g", "i"], 2)
    # Probe 2: h WK->MK (untrained), f MK->HK (trained), c MK->HK (trained? no: c never trained).
    s2 = cur.advance(s, records({**P1, "h": MK, "f": HK, "c": HK}))
    assert cur.moved_up(s2, -2, -1, untrained_only=True) == ("c", "h")
    assert cur.should_continue(s2, 2)
    assert not cur.should_continue(s2, 3)
    with pytest.raises(ValueError, match="two probes"):
        cur.should_continue(cur.initial_state(records(P0)), 1)


def test_mark_trained_keeps_first_stage_and_rejects_unknown_ids():
    s = cur.mark_trained(cur.initial_state(records(P0)), ["a", "b"], 1)
    s = cur.advance(s, records(P1))
    s = cur.mark_trained(s, ["b", "c"], 2)
    assert dict(s.trained_in) == {"a": 1, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="'nope'"):
        cur.mark_trained(s, ["a", "nope"], 2)
    with pytest.raises(ValueError, match="stage"):
        cur.mark_trained(s, ["a"], 3)


def test_advance_names_missing_and_extra_ids():
    s = cur.initial_state(records(P0))
    bad = [r for r in records(P1) if r["id"] not in ("b", "c")] + [{"id": "zz", "category": HK}]
    with pytest.raises(ValueError) as info:
        cur.advance(s, bad)
    msg = str(info.value)
    assert "missing 2 id(s): 'b', 'c'" in msg and "1 unexpected id(s): 'zz'" in msg


def test_bad_records_are_rejected():
    with pytest.raises(ValueError, match="more than once"):
        cur.initial_state([{"id": "a", "category": HK}, {"id": "a", "category": MK}])
    with pytest.raises(ValueError, match="unknown category 'Known'; valid categories: HighlyKnown"):
        cur.initial_state([{"id": "a", "category": "Known"}])
    with pytest.raises(ValueError, match="'id' and 'category'"):
        cur.initial_state([{"id": "a"}])


def test_state_is_immutable_and_picklable():
    s = state_after_stage1()
    with pytest.raises(TypeError):
        s.probes[0]["a"] = UK  # type: ignore[index]
    with pytest.raises(TypeError):
        s.trained_in["a"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.stage = 5  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(s)) == s


def test_stage_spec_from_dict_errors():
    with pytest.raises(ValueError, match="unknown stage select key 'categorie'; valid keys: categories, "):
        StageSpec.from_dict({"categorie": [MK]})
    with pytest.raises(ValueError, match="unknown category 'Maybe'; valid categories: HighlyKnown, MaybeKnown"):
        StageSpec.from_dict({"categories": ["Maybe"]})
    with pytest.raises(ValueError, match="given together"):
        StageSpec.from_dict({"moved_up_from": [UK]})
    with pytest.raises(ValueError, match="given together"):
        StageSpec.from_dict({"replay_ratio": 0.2})
    with pytest.raises(ValueError, match="given together"):
        StageSpec.from_dict({"size": 3})
    with pytest.raises(ValueError, match="list of categories"):
        StageSpec.from_dict({"categories": MK})
    with pytest.raises(ValueError, match="true or false"):
        StageSpec.from_dict({"untrained": "yes"})
    spec = StageSpec.from_dict(STAGE2)
    assert spec.into == (MK, HK) and spec.replay_ratio == 0.2
    assert StageSpec.from_dict(spec.to_dict()) == spec


# ----------------------------------------------------------------- properties

category = st.sampled_from(CATEGORIES)
id_lists = st.lists(st.text("abcxyz0123", min_size=1, max_size=4), min_size=1, max_size=30, unique=True)


@st.composite
def states(draw, max_probes=3):
    ids = draw(id_lists)
    s = cur.initial_state([{"id": i, "category": draw(category)} for i in ids])
    for stage in range(1, draw(st.integers(1, max_probes))):
        trained = draw(st.lists(st.sampled_from(ids), unique=True))
        s = cur.mark_trained(s, trained, stage)
        s = cur.advance(s, [{"id": i, "category": draw(category)} for i in ids])
    return s


specs = st.builds(
    StageSpec,
    categories=st.none() | st.lists(category, min_size=1, max_size=4, unique=True).map(tuple),
    untrained=st.booleans(),
    max_examples=st.none() | st.integers(1, 10),
) | st.builds(
    StageSpec,
    moved_up_from=st.lists(category, min_size=1, unique=True).map(tuple),
    into=st.lists(category, min_size=1, unique=True).map(tuple),
    since=st.sampled_from(["first", "previous"]),
    replay=st.just(HK),
    replay_ratio=st.floats(0.05, 2.0),
)


@settings(max_examples=60, deadline=None)
@given(states(), st.data())
def test_advance_never_loses_or_duplicates_examples(s, data):
    new = {i: data.draw(category) for i in s.example_ids}
    shuffled = data.draw(st.permutations(list(new.items())))
    s2 = cur.advance(s, [{"id": i, "category": c} for i, c in shuffled])
    assert s2.example_ids == s.example_ids
    assert all(p.keys() == set(s.example_ids) for p in s2.probes)
    assert s2.probes[:-1] == s.probes and dict(s2.latest) == new
    assert s2.stage == s.stage + 1 and s2.trained_in == s.trained_in
    with pytest.raises(ValueError, match="missing 1 id"):
        cur.advance(s, [{"id": i, "category": c} for i, c in shuffled[1:]])


@settings(max_examples=80, deadline=None)
@given(states(), specs, st.integers(0, 2**32 - 1))
def test_selection_is_a_duplicate_free_subset_and_deterministic(s, spec, seed):
    try:
        ids = cur.select(s, spec, seed)
    except EmptySelection:
        return
    assert len(ids) == len(set(ids)) > 0
    assert set(ids) <= set(s.example_ids)
    assert cur.select(s, spec, seed) == ids
    assert cur.select(s, spec, np.random.default_rng(seed)) == ids
    for i in ids:
        if spec.categories is not None and spec.replay is None:
            assert s.latest[i] in spec.categories
        if spec.untrained:
            assert i not in s.trained_in


@settings(max_examples=60, deadline=None)
@given(states())
def test_json_round_trip(s):
    d = json.loads(json.dumps(cur.to_json(s)))
    assert cur.from_json(d) == s
    np.testing.assert_array_equal(
        cur.transitions(cur.from_json(d), 0, -1), cur.transitions(s, 0, -1)
    )


def test_from_json_rejects_other_formats():
    with pytest.raises(ValueError, match="not a curriculum state"):
        cur.from_json({"format": "other"})
    d = cur.to_json(state_after_stage1())
    d["probes"][1] = d["probes"][1][:-1]
    with pytest.raises(ValueError, match="probe 1 has 9 categories for 10 ids"):
        cur.from_json(d)
