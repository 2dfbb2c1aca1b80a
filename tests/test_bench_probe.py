"""`python -m gradual_jax.bench probe`: argument parsing and bad input, before any model loads."""

from __future__ import annotations

import pytest

from gradual_jax import bench


def _parse(argv: list[str]):
    parser = bench.argparse.ArgumentParser()
    bench.add_probe_args(parser)
    return parser.parse_args(argv)


def test_probe_args_and_bad_input(tmp_path, capsys):
    args = _parse(["--model", "m.gguf", "--relations", "P36, P17", "--modes", "lazy,screened",
                   "--per-relation", "8", "--compare-hf", "--hf-questions", "3"])
    assert args.relations == ["P36", "P17"] and args.modes == ["lazy", "screened"]
    assert (args.per_relation, args.n_prompts, args.n_samples, args.hf_questions) == (8, 10, 16, 3)
    assert _parse(["--model", "m"]).modes == ["lazy", "exhaustive", "screened"]
    assert _parse(["--model", "m"]).hf_mode == "lazy"  # the transformers prober's algorithm
    assert _parse(["--model", "m", "--hf-mode", "exhaustive"]).hf_mode == "exhaustive"

    for bad in (["--modes", "lazy,greedy"], ["--modes", "lazy,lazy"], ["--modes", ","], ["--hf-mode", "screened"],
                ["--per-relation", "0"], ["--n-prompts", "x"], ["--hf-questions", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main(["probe", "--model", "m.gguf", *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown ['greedy']" in err and "must be >= 1, got 0" in err

    with pytest.raises(SystemExit, match="not found"):  # checked before data or model load
        bench.main(["probe", "--model", str(tmp_path / "missing.gguf")])
    eq = tmp_path / "eq"
    (eq / "dev").mkdir(parents=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    from gradual_jax.knowledge.data import DataError

    with pytest.raises(DataError, match="P36"):  # no data file for the relation
        bench.main(["probe", "--model", str(model), "--eq-dir", str(eq), "--relations", "P36"])
