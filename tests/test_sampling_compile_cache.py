"""Compiled programs kept on disk (`sampling.compile_cache`): a later process loads them instead
of tracing and compiling, with the same results; a changed package source or a damaged file
compiles again."""

from __future__ import annotations

import pytest

from gradual_jax import xla_cache
from gradual_jax.sampling import Greedy, Sample, compile_cache
from gradual_jax.sampling.sampler import Sampler

PROMPTS = ["Q: Where was Ada born?\nA:", "Q: What does Bo do?\nA:", "Q: Who made the Zed?\nA:"]
PREFIX = "Q: Where was Cy born?\nA: Tarn\n\n"


def _generate(model, tokenizer, mesh=None):
    sampler = Sampler(model, tokenizer, mesh=mesh)
    gens = sampler.generate_batch(PROMPTS, prefix=PREFIX, methods=[Greedy()] + [Sample(0.7, 5)] * 3,
                                  max_new_tokens=6, stop=("\n",), seed=3, batch_size=4)
    scores = sampler.score(PROMPTS, [" Tarn", " a", " Zed"], prefix=PREFIX)
    out = ([[(g.text, g.token_ids, g.raw_logprobs) for g in row] for row in gens], [list(map(float, s.logprobs)) for s in scores])
    return out, sampler.stats


def _fresh_process(monkeypatch):
    """What a new process has: no executable in memory."""
    monkeypatch.setattr(compile_cache, "COMPILED", {})


@pytest.mark.parametrize("axes", [None, (4, 1, 2)])
def test_programs_kept_on_disk_are_loaded_by_a_later_process(smoke_model, tmp_path, monkeypatch, axes):
    import jax

    from gradual_jax.sharding import make_mesh

    model, tokenizer = smoke_model
    mesh = None if axes is None else make_mesh(*axes, devices=jax.devices()[:8])
    store = tmp_path / "programs"
    monkeypatch.setattr(xla_cache, "_PROGRAMS", store)
    _fresh_process(monkeypatch)
    first, stats = _generate(model, tokenizer, mesh)
    kept = sorted(p.name for p in store.iterdir())
    assert stats.compiles > 0 and len(kept) == stats.compiles and stats.programs_loaded == 0

    _fresh_process(monkeypatch)

    def no_tracing(*args, **kwargs):
        raise AssertionError("a program kept on disk was traced again")

    with monkeypatch.context() as m:
        m.setattr(Sampler, "_lower", no_tracing)
        again, stats = _generate(model, tokenizer, mesh)
    assert again == first
    assert stats.compiles == 0 and stats.programs_loaded == len(kept)

    # A damaged file is compiled again (and replaced); the others still load.
    (store / kept[0]).write_bytes(b"not a program")
    _fresh_process(monkeypatch)
    again, stats = _generate(model, tokenizer, mesh)
    assert again == first and stats.compiles == 1 and stats.programs_loaded == len(kept) - 1
    assert sorted(p.name for p in store.iterdir()) == kept

    # Another package source: other names, everything compiled again.
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    _fresh_process(monkeypatch)
    again, stats = _generate(model, tokenizer, mesh)
    assert again == first and stats.compiles == len(kept) and stats.programs_loaded == 0
    assert len(list(store.iterdir())) == 2 * len(kept)


def test_nothing_is_kept_unless_an_entry_point_asked(smoke_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADUAL_JAX_CACHE", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    _, stats = _generate(*smoke_model)
    assert stats.compiles > 0 and not (tmp_path / "cache").exists()


CHILD = """
import json, sys
from pathlib import Path
from gradual_jax import xla_cache
from gradual_jax.models import load_hf, load_tokenizer
xla_cache._PROGRAMS = Path(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from test_sampling_compile_cache import _generate
out, stats = _generate(load_hf(sys.argv[1]), load_tokenizer(sys.argv[1]))
print(json.dumps({"out": out, "compiles": stats.compiles, "loaded": stats.programs_loaded}))
"""


def test_two_processes_keep_one_store(smoke_world, tmp_path):
    """Two processes compiling the same programs into one store at once: both finish, the store
    holds one whole file a program and no temporary, and a third process loads them all."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    store = tmp_path / "programs"
    argv = [sys.executable, "-c", CHILD, str(smoke_world.model_dir), str(store), str(Path(__file__).parent)]
    env = {**os.environ, "XLA_FLAGS": ""}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    first, second = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    names = sorted(p.name for p in store.iterdir())
    assert all(n.endswith(".bin") for n in names) and len(names) == first["compiles"]
    third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    third = json.loads(third.stdout.strip().splitlines()[-1])
    assert third["compiles"] == 0 and third["loaded"] == len(names)
    assert first["out"] == second["out"] == third["out"]
