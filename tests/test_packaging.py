"""The wheel: it holds every module and every shipped config, and an installed copy finds its
configs by name from any working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test extra brings setuptools, so this needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, cwd=out,
                   env={**os.environ, "PIP_NO_INPUT": "1"})
    (whl,) = out.glob("gradual_jax-*.whl")
    return whl


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "gradual_jax").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (add their package to pyproject)"
    configs = {"gradual_jax/configs/" + p.relative_to(REPO / "configs").as_posix()
               for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs - names == set()


def test_installed_wheel_finds_shipped_configs_by_name(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    script = (
        "import json, gradual_jax\n"
        "from gradual_jax.launch import resolve_config_path\n"
        "from gradual_jax.config import load_config\n"
        "out = {'package': gradual_jax.__file__}\n"
        "for name in (None, 'smoke', 'smoke.yaml', 'smollm2_entityquestions', 'paper/qwen2_7b_lora'):\n"
        "    path = resolve_config_path(name)\n"
        "    out[str(name)] = [str(path), load_config(path).name]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                          capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found.pop("package")).is_relative_to(target)
    for name, (path, run_name) in found.items():
        assert Path(path).is_relative_to(target / "gradual_jax" / "configs"), name
    assert found["None"][1] == "default" and found["smoke"][1] == "smoke"


def test_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    from gradual_jax.launch import main

    monkeypatch.chdir(tmp_path)
    assert main(["smok"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file smok not found; shipped configs") and "smoke" in err
    assert len(err.splitlines()) == 1


def test_launch_help_lists_every_config_key_with_its_default(capsys):
    from gradual_jax.config import RunConfig
    from gradual_jax.configlib import iter_keys
    from gradual_jax.launch import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for line in ("probe.n_samples = 16  (int)", "train.lr = 1e-05  (float)", "mesh.fsdp = 1  (int)"):
        assert line in text
    keys = list(iter_keys(RunConfig))
    assert all(k.doc for k in keys), [k.key for k in keys if not k.doc]
    assert all(f"  {k.key} = " in text for k in keys)


def test_shipped_config_with_a_relative_data_path_says_so(tmp_path, monkeypatch, capsys):
    from gradual_jax.launch import main

    monkeypatch.chdir(tmp_path)  # ../shared/data/entityquestions does not exist from here
    assert main(["smollm2_entityquestions", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data.path: ../shared/data/entityquestions does not exist" in err
    assert "shipped config smollm2_entityquestions sets it relative to the repository's root" in err
