"""Config loading, overrides, validation messages and hashing."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from gradual_jax import config as C
from gradual_jax.config import ConfigError, RunConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_the_two_stage_method():
    cfg = load_config(None, [])
    assert cfg == RunConfig()
    assert cfg.seeds == [0] and cfg.arms == ["two_stage", "one_stage"]
    s1, s2 = cfg.stages
    assert s1.spec().categories == ("MaybeKnown",)
    spec = s2.spec()
    assert spec.moved_up_from == ("WeaklyKnown", "Unknown") and spec.into == ("MaybeKnown", "HighlyKnown")
    assert spec.untrained and spec.replay == "HighlyKnown" and spec.replay_ratio == 0.2
    t2 = C.stage_train_config(cfg, "stage2")
    assert t2.lr < cfg.train.lr and t2.weight_decay == 0.01
    assert C.stage_train_config(cfg, 0) == cfg.train


def test_yaml_load_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        name: paper
        seeds: [1, 2]
        model: {source: HuggingFaceTB/SmolLM2-135M, compute_dtype: bfloat16}
        data:
          kind: entityquestions
          train_relations: [P17, P19]
        train:
          lr: 1e-4          # YAML 1.1 reads this as a string; still a float here
          lora: {rank: 4, targets: [q, v]}
        world: {n_people: 50}
        """,
    )
    cfg = load_config(
        path,
        [
            "train.lora.rank=8",
            "seeds=[0,1,2]",
            "train.remat=true",
            "probe.temperature=0.7",
            "name=2024",  # a string field keeps the raw text
            "data.path=null",
            "world.n_people=80",
            "stages.1.train.lr=3e-6",
        ],
    )
    assert cfg.name == "2024"
    assert cfg.seeds == [0, 1, 2]
    assert cfg.model.source == "HuggingFaceTB/SmolLM2-135M" and cfg.model.compute_dtype == "bfloat16"
    assert cfg.data.kind == "entityquestions" and cfg.data.train_relations == ["P17", "P19"]
    assert cfg.data.path is None
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.lora.rank == 8 and cfg.train.lora.targets == ["q", "v"]  # merged, not replaced
    assert cfg.train.remat is True
    assert cfg.probe.temperature == 0.7
    assert cfg.world == {"n_people": 80}
    t2 = C.stage_train_config(cfg, 1)
    assert t2.lr == pytest.approx(3e-6 * 0.5) and t2.lora.rank == 8


def test_integer_accepted_for_float_but_not_the_reverse():
    cfg = load_config(None, ["train.lr=1", "train.weight_decay=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert error(None, ["train.epochs=2.5"]) == "config key 'train.epochs': expected int, got 2.5"
    assert error(None, ["train.remat=1"]) == "config key 'train.remat': expected bool, got 1"


def test_unknown_key_lists_valid_keys():
    msg = error(None, ["train.lrr=1e-4"])
    assert msg.startswith(
        "unknown key 'train.lrr'; valid keys: batch_shapes, batch_size, clip_norm, dev_eval_size, dropout, epochs,"
    )
    assert "(did you mean 'lr'?)" in msg
    msg = error(None, ["trian.lr=1"])
    assert msg.startswith("unknown key 'trian'; valid keys: arms, checkpoint, data, distributed,")


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "probe:\n  n_prompt: 4\n")
    msg = error(path)
    assert msg.startswith(f"{path}: unknown key 'probe.n_prompt'; valid keys: batch_size, chunk_size,")


def test_wrong_type_messages():
    assert error(None, ["train.lr=abc"]) == "config key 'train.lr': expected float, got 'abc'"
    assert error(None, ["seeds=[0, x]"]) == "config key 'seeds.1': expected int, got 'x'"
    assert error(None, ["data.limit_per_relation=many"]) == (
        "config key 'data.limit_per_relation': expected int or null, got 'many'"
    )
    assert error(None, ["probe.mode=fast"]) == (
        "config key 'probe.mode': expected one of 'lazy', 'exhaustive', 'screened', got 'fast'"
    )
    assert error(None, ["train.lora=4"]) == (
        "config key 'train.lora': expected mapping (LoRAConfig), got 4"
    )


def test_semantic_validation():
    assert error(None, ["seeds=[]"]) == "config key 'seeds': must not be empty"
    assert "unknown arm 'best'; valid: two_stage, one_stage, natural" in error(None, ["arms=[best]"])
    assert error(None, ["probe.temperature=0"]) == "config key 'probe.temperature': must be > 0 when sampling, got 0.0"
    assert load_config(None, ["probe.temperature=0", "probe.n_samples=0"]).probe.n_samples == 0
    assert "config key 'train.lora.dropout'" in error(None, ["train.lora.dropout=1.5"])
    assert "config key 'probe.screen_threshold'" in error(None, ["probe.screen_threshold=2"])
    assert "config key 'train.lora.targets': unknown target 'qkv'" in error(None, ["train.lora.targets=[qkv]"])
    assert error(None, ["mesh.fsdp=-1"]) == "config key 'mesh.fsdp': only one mesh axis may be -1"
    assert "config key 'data.path'" in error(None, ["data.kind=jsonl"])
    assert "config key 'model.dtype'" in error(None, ["model.dtype=int8"])
    assert error(None, ["seed_workers=0"]) == "config key 'seed_workers': must be >= 1, got 0"


def test_data_overlap_setting():
    # the default keeps what each source did before: Gekhman's filter with gekhman, none without
    assert load_config(None, ["data.kind=entityquestions"]).data.overlap_mode == "subject_or_answer"
    assert load_config(None, ["data.kind=entityquestions", "data.gekhman=false"]).data.overlap_mode == "none"
    assert load_config(None, ["data.kind=jsonl", "data.path=x"]).data.overlap_mode == "none"
    assert load_config(None, []).data.overlap_mode == "none"  # world
    cfg = load_config(None, ["data.kind=entityquestions", "data.gekhman=false", "data.overlap=subject"])
    assert cfg.data.overlap_mode == "subject"
    assert load_config(None, ["data.kind=entityquestions", "data.overlap=none"]).data.overlap_mode == "none"
    assert error(None, ["data.kind=entityquestions", "data.overlap=answer"]) == (
        "config key 'data.overlap': expected one of 'none', 'subject', 'subject_or_answer' or null, "
        "got 'answer'"
    )
    assert error(None, ["data.overlap=subject"]) == (
        "config key 'data.overlap': applies to QA sets read from data.path, not to kind 'world'; "
        "got 'subject'"
    )


def test_stage_select_and_train_overrides_are_validated(tmp_path):
    msg = error(None, ["stages.1.train.lrr=1e-6"])
    assert msg.startswith("unknown key 'stages.1.train.lrr'; valid keys: batch_shapes, batch_size,")
    assert error(None, ["stages.0.train.epochs=many"]) == (
        "config key 'stages.0.train.epochs': expected int, got 'many'"
    )
    assert error(None, ["stages.0.train.lora.rank=-1"]).startswith(
        "config key 'stages.0.train.lora.rank': must be >= 0"
    )
    msg = error(None, ["stages.0.select.categories=[Maybe]"])
    assert msg.startswith("config key 'stages.0.select': ")
    assert "unknown category 'Maybe'; valid categories: HighlyKnown, MaybeKnown, WeaklyKnown, Unknown" in msg
    msg = error(None, ["stages.1.select.ratio=0.2"])
    assert "unknown stage select key 'ratio'; valid keys: categories, moved_up_from, into" in msg
    assert "index '5' out of range" in error(None, ["stages.5.name=x"])
    path = write(tmp_path, "stages:\n  - name: only\n    train: {lr: 1e-6}\n")
    assert error(path) == f"{path}: config key 'stages.0.select': missing (required)"
    dup = "stages=[{name: a, select: {}}, {name: a, select: {}}]"
    assert "stage names must be unique" in error(None, [dup])


def test_stage_train_config_merges_lora_and_scales_lr():
    cfg = load_config(
        None,
        [
            "train.lora.rank=4",
            "stages=[{name: s1, select: {categories: [MaybeKnown]}, train: {lr: 2e-5, lora: {alpha: 8}}, lr_scale: 0.25}]",
        ],
    )
    t = C.stage_train_config(cfg, "s1")
    assert t.lr == pytest.approx(5e-6)
    assert t.lora.rank == 4 and t.lora.alpha == 8.0
    assert t.epochs == cfg.train.epochs
    with pytest.raises(ConfigError, match="unknown stage 'nope'; stages: s1"):
        C.stage_train_config(cfg, "nope")


def test_bad_override_syntax_and_bad_files(tmp_path):
    assert "not of the form dotted.key=value" in error(None, ["train.lr"])
    assert "'name' is 'default', not a mapping" in error(None, ["name.x=1"])
    assert error(None, ["seeds.x=1"]) == "config key 'seeds.x': expected a list index, got 'x'"
    assert "config file not found" in error(tmp_path / "missing.yaml")
    assert "invalid YAML" in error(write(tmp_path, "train: [unclosed\n", "bad.yaml"))
    assert "expected a mapping at the top level" in error(write(tmp_path, "- 1\n", "list.yaml"))
    assert load_config(write(tmp_path, "", "empty.yaml"), []) == RunConfig()


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.lora.rank=8", "seeds=[3,4]", "world={a: 1}"])
    assert C.from_dict(RunConfig, C.to_dict(cfg)) == cfg
    assert C.apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_config_hash_stable_under_key_order_and_sensitive_to_values(tmp_path):
    a = write(tmp_path, "train: {lr: 0.001, epochs: 3}\nseeds: [0, 1]\n", "a.yaml")
    b = write(tmp_path, "seeds: [0, 1]\ntrain: {epochs: 3, lr: 1e-3}\n", "b.yaml")
    ha, hb = C.config_hash(load_config(a, [])), C.config_hash(load_config(b, []))
    assert ha == hb and len(ha) == 64
    assert C.config_hash(load_config(a, ["train.epochs=4"])) != ha
    assert C.config_hash(load_config(a, ["stages.1.select.replay_ratio=0.3"])) != ha
    # Where the run is stored does not change what it computes.
    assert C.config_hash(load_config(a, ["run_dir=/elsewhere"])) == ha
    assert C.config_hash(load_config(a, ["run_dir=/elsewhere"]), exclude=()) != ha
    # Nor how many seeds run at once: a run may resume with another worker count.
    assert C.config_hash(load_config(a, ["seed_workers=2"])) == ha
    assert C.config_hash(load_config(a, ["checkpoint.minutes=0"])) == ha
    cfg = load_config(a, [])
    assert C.config_hash(cfg, exclude=("run_dir", "train.lr")) == C.config_hash(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)),
        exclude=("run_dir", "train.lr"),
    )
    with pytest.raises(ConfigError, match="cannot exclude unknown key 'train.lrr'"):
        C.config_hash(cfg, exclude=("train.lrr",))


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(REPO_ROOT / path, [])
    assert cfg.name and cfg.seeds and cfg.arms


def test_export_settings_are_checked_before_the_run():
    assert error(None, ["export.enabled=true", "export.arm=natural"]) == \
        "config key 'export.arm': 'natural' is not one of arms ['two_stage', 'one_stage']"
    assert error(None, ["export.enabled=true", "export.seed=3"]) == \
        "config key 'export.seed': 3 is not one of seeds [0]"
    assert error(None, ["export.enabled=true", "export.stage=stage9"]) == \
        "config key 'export.stage': arm two_stage has stages stage1, stage2, not 'stage9'"
    assert error(None, ["export.max_shard_size=5XB"]).startswith("config key 'export.max_shard_size': size '5XB'")
    assert load_config(None, ["export.enabled=true", "export.stage=stage2"]).export.stage == "stage2"
