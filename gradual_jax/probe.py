"""`python -m gradual_jax.probe`: SliCK categories of any model on a QA set, as JSONL.

    python -m gradual_jax.probe --model PATH --data DIR --split train|dev|test \\
        [--relations P36,P17] [--limit-per-relation N] [--prompts-out FILE] [--prompts-in FILE] \\
        [probe settings: --n-prompts 10 --n-samples 16 --mode lazy ...] --out FILE.jsonl \\
        [--stats-json STATS.json]

`--model` takes a Hugging Face directory (or repo id) or a GGUF file; `--data` an EntityQuestions
directory (gzipped JSONL copy or the official JSON release) or a JSONL file. The probe resumes
into an existing `--out` written with the same configuration and refuses one written otherwise.
`--stats-json` writes the probe's figures: questions, seconds, compiles and compile_seconds
(every XLA compilation after the model is loaded, as JAX reports them), warmup_seconds,
questions_per_s_after_warmup, samples_drawn and peak_host_bytes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gradual_jax.configlib import add_arguments, from_arguments
from gradual_jax.io import write_json
from gradual_jax.knowledge.config import ProbeSettings

if TYPE_CHECKING:
    from gradual_jax.compile_stats import CompileCounter

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gradual_jax.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=("train", "dev", "test"), required=True)
    p.add_argument("--relations", default=None, help="comma-separated, e.g. P36,P17")
    p.add_argument("--limit-per-relation", type=int, default=None)
    # test_after_training picks a run's settings for its re-probes; one probe has one setting
    add_arguments(p.add_argument_group("probe settings (the same as a run config's probe.*)"),
                  ProbeSettings, skip=("test_after_training",))
    p.add_argument("--prompts-out", default=None)
    p.add_argument("--prompts-in", default=None)
    p.add_argument("--dev", default=None,
                   help="JSONL of few-shot exemplars when --data is a JSONL file "
                        "(default: dev.jsonl beside it)")
    p.add_argument("--out", required=True)
    p.add_argument("--stats-json", default=None, help="write the probe's figures (JSON) here")
    return p.parse_args(argv)


def load_examples(data: str, split: str, relations: list[str] | None, limit: int | None):
    """QA examples of `split` from an EntityQuestions directory or a JSONL file."""
    from gradual_jax.knowledge import data as qa

    path = Path(data)
    if path.is_file():
        examples = qa.load_jsonl(path, split=split)
        if relations:
            examples = [e for e in examples if e.relation in relations]
        return qa.first_per_relation(examples, limit)
    return qa.load_entityquestions(path, split, relations, limit_per_relation=limit)


def exemplar_source(ns: argparse.Namespace) -> str:
    """Where the few-shot exemplars come from: the EntityQuestions directory's dev split, or for a
    JSONL `--data` the `--dev` file (default `dev.jsonl` beside it), never the probed file itself."""
    from gradual_jax.knowledge.data import DataError

    data = Path(ns.data)
    if not data.is_file():
        return ns.data
    dev = Path(ns.dev) if ns.dev else data.with_name("dev.jsonl")
    if not dev.is_file() or dev.resolve() == data.resolve():
        raise DataError(f"--data {data} is a JSONL file: give the few-shot exemplars with --dev FILE "
                        f"(a different JSONL; {dev} not usable) or --prompts-in")
    return str(dev)


def run(ns: argparse.Namespace) -> list[dict]:
    from gradual_jax.compile_stats import CompileCounter
    from gradual_jax.knowledge.probe import Probe, category_table
    from gradual_jax.knowledge.prompts import build_prompt_sets, load_prompt_sets, save_prompt_sets
    from gradual_jax.models import load_model, load_tokenizer, resolve_model_source
    from gradual_jax.runtime import JaxEngine

    settings = from_arguments(ProbeSettings, ns)
    relations = ns.relations.split(",") if ns.relations else None
    examples = load_examples(ns.data, ns.split, relations, ns.limit_per_relation)
    rels = sorted({e.relation for e in examples})
    if ns.prompts_in:
        prompt_sets = load_prompt_sets(ns.prompts_in)
    else:
        dev = load_examples(exemplar_source(ns), "dev", rels, None)
        prompt_sets = build_prompt_sets(dev, rels, n_prompts=settings.n_prompts, k=settings.k_shot,
                                        seed=settings.seed)
    if ns.prompts_out:
        save_prompt_sets(ns.prompts_out, prompt_sets)
    ns.model = resolve_model_source(ns.model)
    model = load_model(ns.model)
    tokenizer = load_tokenizer(ns.model)
    engine = JaxEngine(model, tokenizer, batch_size=settings.batch_size, scan_layers=settings.scan_layers)
    probe = Probe(engine, prompt_sets, settings, model_id=str(ns.model))
    with CompileCounter() as compiles:
        t0 = time.perf_counter()
        records = probe.run(examples, ns.out)
        seconds = time.perf_counter() - t0
    print(category_table(records))
    print(f"{len(records)} questions in {seconds:.1f} s ({compiles.count} compiles, "
          f"{compiles.seconds:.1f} s compiling) -> {ns.out}")
    if ns.stats_json:
        write_json(ns.stats_json, probe_stats(records, seconds, compiles,
                                              engine.sampler.stats.warmup_seconds))
    return records


def probe_stats(records: list[dict], seconds: float, compiles: "CompileCounter",
                warmup_seconds: float = 0.0) -> dict:
    """The `--stats-json` figures of one probe: `seconds` its wall time, `compiles` every XLA
    compilation inside it (as JAX reports them), `warmup_seconds` the part of `seconds` spent
    tracing, lowering and compiling the engine's programs ahead of time before the first
    question (wall time, so it can exceed the backend compile seconds in `compile_seconds`)."""
    return {
        "questions": len(records),
        "seconds": round(seconds, 3),
        "compiles": compiles.count,
        "compile_seconds": round(compiles.seconds, 3),
        "warmup_seconds": round(warmup_seconds, 3),
        "questions_per_s_after_warmup": round(len(records) / max(seconds - warmup_seconds, 1e-9), 4),
        "samples_drawn": sum(r.get("n_sampled", 0) for r in records),
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    from gradual_jax.errors import USER_ERRORS
    from gradual_jax.xla_flags import apply_xla_flags

    apply_xla_flags()
    try:
        run(ns)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    from gradual_jax.xla_cache import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())
