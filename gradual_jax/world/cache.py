"""Build a world once per config and reuse it: `build_or_load_world`.

A build lives in `<root>/<fingerprint>/`:

    world.json          config, entities and every fact with its mention plan and split
    qa/{train,dev,test}.jsonl   the QA examples (fields of `QAExample`)
    corpus.jsonl.gz     the pretraining documents
    model/              the pretrained model in Hugging Face format, with its tokenizer
    record.json         pretraining figures (loss curve, tokens/s, wall time), screening counts

It is written into a temporary sibling directory and renamed into place, so a killed build
never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradual_jax import io
from gradual_jax.knowledge.data import QAExample
from gradual_jax.rundir import Heartbeat, holder_alive, this_host
from gradual_jax.world.config import WorldConfig, world_config_from_dict
from gradual_jax.world.corpus import build_corpus
from gradual_jax.world.generate import SPLITS, World, generate_world, select_train, world_from_json
from gradual_jax.world.qa import lexicon_texts, qa_examples
from gradual_jax.world.screen import screen_candidates
from gradual_jax.world.tokenizer import check_lexicon, train_tokenizer

REQUIRED_FILES = ("world.json", "record.json", "qa/train.jsonl", "qa/dev.jsonl", "qa/test.jsonl",
                  "model/config.json", "model/tokenizer.json")


@dataclasses.dataclass(frozen=True)
class WorldArtifacts:
    """A built world: where its files are and its QA splits."""

    root: Path
    config: WorldConfig
    examples: Mapping[str, list[QAExample]]
    record: Mapping[str, Any]

    @property
    def model_dir(self) -> Path:
        """Hugging Face model directory (config.json, model.safetensors, tokenizer files)."""
        return self.root / "model"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.jsonl.gz"

    @property
    def train(self) -> list[QAExample]:
        return self.examples["train"]

    @property
    def dev(self) -> list[QAExample]:
        return self.examples["dev"]

    @property
    def test(self) -> list[QAExample]:
        return self.examples["test"]

    def load_world(self) -> World:
        return world_from_json(json.loads(self.world_json.read_text())["world"])


def world_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory that holds one subdirectory per built world.

    `cache_dir` if given; else `$GRADUAL_JAX_CACHE/world`; else `$XDG_CACHE_HOME/gradual_jax/world`;
    else `~/.cache/gradual_jax/world`. A world is always built somewhere local: with the cache
    off or remote (`GRADUAL_JAX_CACHE=off`, `gs://...`), the default local directory.
    """
    from gradual_jax.xla_cache import default_cache_base, local_cache

    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return local_cache("world") or default_cache_base() / "world"


def build_or_load_world(cfg: WorldConfig, cache_dir: str | os.PathLike | None = None, *,
                        progress: bool = True) -> WorldArtifacts:
    """The world for `cfg`, built (minutes) on the first call and read back (instantly) later.

    The cache key is `cfg.fingerprint()`. Concurrent builders of one config both finish; the
    first rename wins and the other's copy is dropped.
    """
    final = world_cache_root(cache_dir) / cfg.fingerprint()
    if _complete(final):
        return load_artifacts(final)
    if final.exists():
        _say(f"world cache {final} is incomplete; rebuilding it", progress)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:12]}")
    owner = _owner_file(tmp)
    io.write_json(owner, this_host())
    beat = Heartbeat(owner)
    try:
        build_world_dir(cfg, tmp, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):
                raise
    finally:
        beat.stop()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        owner.unlink(missing_ok=True)
    _say(f"world built in {final}", progress)
    return load_artifacts(final)


def build_world_dir(cfg: WorldConfig, out: Path, *, progress: bool = True) -> None:
    """Generate, pretrain, choose the train split and write everything for `cfg` into `out`
    (which must not exist yet)."""
    from gradual_jax.world.pretraining import export_model, pretrain

    t0 = time.perf_counter()
    out.mkdir(parents=True)
    world = generate_world(cfg)
    corpus = build_corpus(world, cfg)
    tokenizer = train_tokenizer(corpus + lexicon_texts(world), cfg.vocab_size)
    check_lexicon(tokenizer, [n for names in world.entities.values() for n in names])
    _say(f"world: {len(world.facts)} facts, {len(corpus)} documents; pretraining the world model", progress)
    record: dict[str, Any] = {}
    model = pretrain(world, corpus, tokenizer, cfg, record=record, progress=progress)
    export_model(model, tokenizer, out / "model")
    world = _choose_train(world, model, tokenizer, cfg, record, progress)
    examples = qa_examples(world)
    for split in SPLITS:
        write_examples(out / "qa" / f"{split}.jsonl", examples[split])
    with gzip.open(out / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in corpus)
    (out / "world.json").write_text(json.dumps({"config": cfg.to_dict(), "world": world.to_json()}))
    record["build_wall_s"] = time.perf_counter() - t0
    (out / "record.json").write_text(json.dumps(record, indent=1))


def _choose_train(world: World, model: Any, tokenizer: Any, cfg: WorldConfig, record: dict[str, Any],
                  progress: bool) -> World:
    """The world with its train split chosen, stratified by a screening when the config asks."""
    categories = None
    if cfg.stratify_train:
        _say("screening train candidates to stratify the train split", progress)
        t0 = time.perf_counter()
        categories = screen_candidates(model, tokenizer, world, seed=cfg.seed)
        record["screen_wall_s"] = time.perf_counter() - t0
        record["screened_candidates"] = dict(Counter(categories.values()))
    world = select_train(world, cfg, categories)
    if categories:
        chosen = [categories[(f.relation, f.subject)] for f in world.facts if f.split == "train"]
        record["screened_train"] = dict(Counter(chosen))
    return world


def load_artifacts(root: Path) -> WorldArtifacts:
    """The WorldArtifacts of a complete world directory."""
    meta = json.loads((root / "world.json").read_text())
    examples = {split: read_examples(root / "qa" / f"{split}.jsonl") for split in SPLITS}
    return WorldArtifacts(root=root, config=world_config_from_dict(meta["config"]), examples=examples,
                          record=json.loads((root / "record.json").read_text()))


def write_examples(path: Path, examples: list[QAExample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dataclasses.asdict(e)) + "\n" for e in examples)


def read_examples(path: Path) -> list[QAExample]:
    with open(path, encoding="utf-8") as f:
        return [QAExample(**{**rec, "answers": tuple(rec["answers"])})
                for rec in map(json.loads, f) if rec]


def _complete(root: Path) -> bool:
    return all((root / name).is_file() for name in REQUIRED_FILES)


def _owner_file(tmp: Path) -> Path:
    """The file beside a temporary build directory naming its builder (`rundir.this_host`);
    its mtime is the builder's heartbeat."""
    return tmp.with_name(tmp.name + ".owner")


def _remove_stale_tmp(final: Path) -> None:
    """Delete temporary build directories of `final` whose builders no longer run, judged
    across hosts (`rundir.holder_alive`: the pid on this host, the heartbeat elsewhere), so a
    cache on shared storage never loses a peer host's build in progress. A directory without
    an owner file is judged by its own mtime."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        if tmp.name.endswith(".owner"):
            continue
        owner_file = _owner_file(tmp)
        try:
            owner = json.loads(owner_file.read_text())
            mtime = owner_file.stat().st_mtime
        except (OSError, ValueError):
            owner, mtime = {}, _mtime(tmp)
        if mtime is not None and not holder_alive(owner if isinstance(owner, dict) else {}, mtime):
            shutil.rmtree(tmp, ignore_errors=True)
            owner_file.unlink(missing_ok=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
