"""The configured mesh through a whole run: the smoke pipeline (one seed, two arms) trained on
`mesh.fsdp=8` and on `data=2 fsdp=2 tensor=2`, probed on the inference mesh, against the same
run on a single device (a subprocess with one CPU device): identical categories and report,
losses within 1e-4, train state sharded as configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradual_jax.launch import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_equality import assert_same  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
SMALL = ["seeds=[0]", "arms=[two_stage,one_stage]", "noise_control=false"]
TIMING = {"wall_seconds", "config", "invocation_seconds", "runtime"}


def _numbers(root: Path) -> dict:
    return {k: v for k, v in json.loads((root / "report.json").read_text()).items() if k not in TIMING}


def _categories(root: Path) -> dict[str, dict[str, str]]:
    out = {}
    for path in sorted(root.glob("seed_*/**/*.jsonl")):
        if path.name in ("train.jsonl", "test.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            out[str(path.relative_to(root))] = {r["id"]: r["category"] for r in rows if "category" in r}
    return out


def _losses(root: Path) -> dict[str, list[float]]:
    return {str(p.relative_to(root)): [c["loss"] for c in json.loads(p.read_text())["curve"]]
            for p in sorted(root.glob("seed_*/*/*/stage.json"))}


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, smoke_world) -> Path:
    run_dir = tmp_path_factory.mktemp("one_device")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "gradual_jax.launch", SMOKE, f"run_dir={run_dir}", *SMALL],
                   check=True, env=env, cwd=REPO, capture_output=True)
    return run_dir / "smoke"


@pytest.mark.parametrize("mesh", [("mesh.data=1", "mesh.fsdp=8"),
                                  ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")])
def test_sharded_run_equals_the_one_device_run(tmp_path, one_device_run, mesh):
    assert main([SMOKE, f"run_dir={tmp_path}", *SMALL, *mesh]) == 0
    root = tmp_path / "smoke"
    ref = one_device_run
    assert _categories(root) == _categories(ref) and _categories(ref)
    assert_same(_numbers(root), _numbers(ref))
    ours, theirs = _losses(root), _losses(ref)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key

    runtime = json.loads((root / "report.json").read_text())["runtime"]
    ref_runtime = json.loads((ref / "report.json").read_text())["runtime"]
    sizes = dict(item.split("=") for item in mesh)
    want = {"data": 1, "fsdp": 1, "tensor": 1, **{k.removeprefix("mesh."): int(v) for k, v in sizes.items()}}
    assert runtime["mesh"] == want and runtime["devices"] == 8 and runtime["processes"] == 1
    assert runtime["probe_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}  # smoke world: 2 heads
    assert ref_runtime["mesh"] == ref_runtime["probe_mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    total = {(s["arm"], s["stage"]): s["train_state_bytes_per_device"] for s in ref_runtime["stages"]}
    assert total and len(runtime["stages"]) == len(total)
    for s in runtime["stages"]:
        per_device = s["train_state_bytes_per_device"]
        if want["fsdp"] == 8:
            assert per_device == pytest.approx(total[s["arm"], s["stage"]] / 8, rel=0.15)
        else:  # replicated over data=2: a quarter of the state per device, up to replicated norms
            assert per_device == pytest.approx(total[s["arm"], s["stage"]] / 4, rel=0.15)


def test_stage_models_stay_on_the_training_mesh(tmp_path, smoke_world):
    """Loading places the base model on the configured mesh and a stage's model is restored
    onto it, every weight sharded by its logical axes (no move to one device)."""
    from jax.sharding import PartitionSpec as P

    from gradual_jax.config import load_config
    from gradual_jax.launch import load_resources
    from gradual_jax.models.transformer import abstract_model
    from gradual_jax.runtime import make_runtime

    cfg = load_config(SMOKE, [f"run_dir={tmp_path}", *SMALL, "mesh.data=1", "mesh.fsdp=8"])
    res = load_resources(cfg)
    assert dict(res.train_mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    model = res.model
    assert model.embed[...].sharding.spec == P(None, "fsdp")
    assert model.layers[0].attn.q.kernel[...].sharding.spec == P("fsdp")
    assert model.layers[0].mlp.down.kernel[...].sharding.spec == P(None, "fsdp")
    save, load = make_runtime(cfg, res)["params_io"]
    save(tmp_path / "params", model)
    restored = load(tmp_path / "params")
    assert restored.layers[0].attn.q.kernel[...].sharding.spec == P("fsdp")
    assert restored.layers[0].attn.q.kernel[...].sharding.mesh.shape == res.train_mesh.shape
    assert type(abstract_model(model.config)) is type(restored)


@pytest.mark.parametrize("override, message", [
    ("mesh.fsdp=3", "config key 'mesh': data=-1 x fsdp=3 x tensor=1: the fixed axes' product 3 does not divide the 8 devices"),
    ("mesh.tensor=4", "config key 'mesh.tensor': 4 does not divide the model's 2 query heads and 2 KV heads"),
    ("probe.mesh={data: 2, fsdp: 2, tensor: 1}", "config key 'probe.mesh': data=2 x fsdp=2 x tensor=1 = 4 devices, but 8 are present"),
    ("train.batch_size=12", "config key 'train.batch_size': 12 does not divide over the training mesh's data axes (data x fsdp = 8)"),
    ("probe.batch_size=6", "config key 'probe.batch_size': 6 does not divide over the probe mesh's 4 replicas"),
])
def test_bad_mesh_input_exits_2_before_loading_weights(tmp_path, smoke_world, capsys, override, message):
    assert main([SMOKE, f"run_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
