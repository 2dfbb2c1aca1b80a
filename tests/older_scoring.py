"""Make a finished run directory look as a run made before gold scoring 2 left it (for the
resume tests of `Probe.run`'s update and the pipeline's stale summaries)."""

from __future__ import annotations

import json
from pathlib import Path


def mark_as_gold_scoring_1(run_root: Path, model_id: str, config: str | Path) -> int:
    """Rewrite every probe sidecar under `run_root` to the fingerprint the same probe had under
    gold scoring 1, and drop the summaries' ``gold_scoring``. Returns the number of sidecars
    changed (greedy-only ones hash as before and stay)."""
    from gradual_jax.config import load_config
    from gradual_jax.knowledge.probe import fingerprint
    from gradual_jax.pipeline import NOISE_SEED_OFFSET, probe_settings

    cfg = load_config(Path(config))
    changed = 0
    for seed_dir in sorted(run_root.glob("seed_*")):
        seed = int(seed_dir.name.split("_")[1])
        prompts = json.loads((seed_dir / "prompts.json").read_text())
        kinds = [(probe_settings(cfg, seed), prompts), (probe_settings(cfg, seed, greedy=True), prompts)]
        if (seed_dir / "noise_prompts.json").exists():
            kinds.append((probe_settings(cfg, seed + NOISE_SEED_OFFSET),
                          json.loads((seed_dir / "noise_prompts.json").read_text())))
        old = {fingerprint(s, p, model_id): fingerprint(s, p, model_id, scoring=1) for s, p in kinds}
        for meta in seed_dir.rglob("*.jsonl.meta.json"):
            fp = json.loads(meta.read_text())["fingerprint"]
            assert fp in old, meta
            changed += old[fp] != fp
            meta.write_text(json.dumps({"fingerprint": old[fp]}))
        for summary in [seed_dir / "result.json", *seed_dir.glob("*/arm.json")]:
            data = json.loads(summary.read_text())
            del data["gold_scoring"]
            summary.write_text(json.dumps(data))
    return changed
