"""The knowledge component's settings: which QA set (``DataConfig``) and how the SliCK probe asks
it (``ProbeSettings``). One definition each, read by the run config, the probe CLI and the API."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from gradual_jax.configlib import require
from gradual_jax.sharding import MeshConfig

MODES: tuple[str, ...] = ("lazy", "exhaustive", "screened")
RETEST: tuple[str, ...] = ("full", "greedy")
# probe.sampler_layers -> the sampler's scan_layers (None: the backend's default)
SAMPLER_LAYERS: dict[str, bool | None] = {"auto": None, "scan": True, "unrolled": False}
DATA_KINDS: tuple[str, ...] = ("world", "entityquestions", "jsonl", "hf", "tfds")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """SliCK probe settings (Gekhman et al.: 10 prompts of 4 exemplars, 1 greedy answer and 16
    samples at T=0.5, top-k 40 per prompt)."""

    n_prompts: int = 10
    """Few-shot prompts per question (N_ex)."""
    k_shot: int = 4
    """Exemplars of the same relation in each prompt, drawn from dev."""
    n_samples: int = 16
    """Samples per prompt at ``temperature``; 0 = greedy only (no WeaklyKnown/Unknown split)."""
    temperature: float = 0.5
    """Sampling temperature."""
    top_k: int = 40
    """Top-k of sampling; 0 samples from the full vocabulary."""
    mode: Literal["lazy", "exhaustive", "screened"] = "lazy"
    """lazy: skip samples a right greedy answer makes moot, stop at the first right sample;
    exhaustive: draw every sample; screened: lazy, and skip sampling where the gold answer's
    probability is below ``screen_threshold``. All give the same categories."""
    screen_threshold: float = 1e-3
    """screened mode: gold-answer probability below which sampling is skipped."""
    max_new_tokens: int = 24
    """Longest generated answer, in tokens (answers end at the first newline)."""
    batch_size: int = 64
    """Rows decoded at once."""
    chunk_size: int = 256
    """Questions per resumable chunk of the probe file."""
    seed: int = 0
    """Prompt and sampling seed; a run adds each of its ``seeds`` to it."""
    gold_probability: bool = True
    """Record every question's gold-answer probability (``q`` per prompt, ``p_gold``: teacher
    forcing, no samples drawn); off, screened mode still computes it for what it screens."""
    test_after_training: Literal["full", "greedy"] = "full"
    """A run's test re-probes after each stage: ``full`` (these settings) or ``greedy`` (the
    greedy answers only, as ``n_samples: 0, gold_probability: false``: HighlyKnown and
    MaybeKnown as usual, WeaklyKnown counted as Unknown, no test ``p_gold`` after stage 0).
    Stage 0 and every train probe are always full."""
    sampler_layers: Literal["auto", "scan", "unrolled"] = "auto"
    """How the probe's sampler runs the model's layers: ``scan`` (one ``lax.scan`` over
    layer-stacked weights and caches: one layer to trace and compile, whatever the depth),
    ``unrolled`` (one after another), ``auto`` (the backend's default,
    `gradual_jax.sampling.default_scan_layers`). The same numbers either way."""
    mesh: MeshConfig | None = None
    """The probe's own mesh (inference: tensor parallel inside a replica, questions over the
    replicas); default: the largest tensor degree dividing the devices and the query and KV
    heads, replicas over the rest. Set as ``probe.mesh={data: 4, fsdp: 1, tensor: 2}``."""

    @property
    def scan_layers(self) -> bool | None:
        """`sampler_layers` as the sampler takes it (None: the backend's default)."""
        return SAMPLER_LAYERS[self.sampler_layers]

    def __post_init__(self) -> None:
        require(self.sampler_layers in SAMPLER_LAYERS, "sampler_layers",
                f"expected one of {', '.join(SAMPLER_LAYERS)}, got {self.sampler_layers!r}")
        require(self.mode in MODES, "mode", f"expected one of {', '.join(MODES)}, got {self.mode!r}")
        for key in ("n_prompts", "max_new_tokens", "batch_size", "chunk_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.n_samples >= 0, "n_samples", f"must be >= 0 (0 = greedy only), got {self.n_samples}")
        require(self.k_shot >= 0, "k_shot", f"must be >= 0, got {self.k_shot}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(self.temperature > 0 or self.n_samples == 0, "temperature",
                f"must be > 0 when sampling, got {self.temperature}")
        require(0.0 <= self.screen_threshold <= 1.0, "screen_threshold",
                f"must be a probability in [0, 1], got {self.screen_threshold}")
        require(self.test_after_training in RETEST, "test_after_training",
                f"expected one of {', '.join(RETEST)}, got {self.test_after_training!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """Fields that change a probe's records. Chunking, batching, the mesh and how the
        sampler runs the layers do not, and
        ``k_shot`` is already in the prompt sets that are fingerprinted beside these, and
        ``test_after_training`` picks which settings a run's probe gets, not what they do."""
        d = dataclasses.asdict(self)
        for key in ("chunk_size", "batch_size", "k_shot", "mesh", "test_after_training", "sampler_layers"):
            d.pop(key)
        return d


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The closed-book QA set: train (fine-tuning and probing), dev (few-shot exemplars and model
    selection) and test."""

    kind: Literal["world", "entityquestions", "jsonl", "hf", "tfds"] = "world"
    """world: the synthetic world's QA (model.source world); entityquestions: a directory of the
    release; jsonl: DIR/{train,dev,test}.jsonl; hf: ``datasets.load_dataset``; tfds:
    ``tfds.data_source``."""
    path: str | None = None
    """entityquestions / jsonl: the directory; hf: a Hub id or a local directory of data files;
    tfds: the dataset name."""
    name: str | None = None
    """hf: the dataset's configuration (TriviaQA: rc.nocontext)."""
    data_dir: str | None = None
    """tfds: the directory holding prepared datasets (default: TFDS's own)."""
    splits: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    """hf / tfds: our split -> the source's split, slices allowed to carve one from another
    (``{train: train, dev: "validation[:50%]", test: "validation[50%:]"}``)."""
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    """hf / tfds: our field (question, answers, relation, id) -> the source's column; dotted for
    nested fields (``answers: answer.aliases``); JSON-encoded answer lists are decoded."""
    relation: str | None = None
    """hf / tfds: the relation of every example when no relation column is mapped."""
    train_relations: list[str] | None = None
    """Relations to train on (default: all, or Gekhman's 12 with ``gekhman``)."""
    test_relations: list[str] | None = None
    """Relations to test on (default: the train relations, or Gekhman's 7 with ``gekhman``)."""
    gekhman: bool = True
    """entityquestions: Gekhman et al.'s setup (their 12 train relations' train split, their 7
    test relations' test split, single answer, the ``overlap`` filter against both those test
    sets and the train relations' own test split)."""
    overlap: Literal["none", "subject", "subject_or_answer"] | None = None
    """Drop train examples that overlap the test set: subject drops those whose subject equals a
    test example's subject or answer, subject_or_answer also those whose answer does; none keeps
    all. Compared against the whole test split of the test relations, before
    ``test_limit_per_relation``, so a smaller test set leaves the train set as it is. Default:
    subject_or_answer with ``gekhman`` (kind entityquestions), none otherwise."""
    limit_per_relation: int | None = None
    """Keep the first N train examples of each relation (after the filters)."""
    dev_limit_per_relation: int | None = None
    """Keep the first N dev examples of each relation."""
    test_limit_per_relation: int | None = None
    """Keep the first N test examples of each relation."""

    def __post_init__(self) -> None:
        require(self.kind not in ("jsonl", "hf", "tfds") or bool(self.path), "path",
                f"required when kind is {self.kind!r}")
        bad = sorted(set(self.splits) - {"train", "dev", "test"})
        require(not bad, "splits", f"keys must be train, dev, test; got {bad}")
        missing = sorted({"train", "dev", "test"} - set(self.splits))
        require(not missing, "splits", f"needs train, dev and test; missing {missing}")
        bad = sorted(set(self.columns) - {"question", "answers", "relation", "id"})
        require(not bad, "columns", f"keys must be question, answers, relation, id; got {bad}")
        for key in ("train_relations", "test_relations"):
            v = getattr(self, key)
            require(v is None or len(v) > 0, key, "must not be empty (omit it for the default)")
        for key in ("limit_per_relation", "dev_limit_per_relation", "test_limit_per_relation"):
            v = getattr(self, key)
            require(v is None or v >= 1, key, f"must be >= 1, got {v}")
        require(self.kind != "world" or self.overlap in (None, "none"), "overlap",
                f"applies to QA sets read from data.path, not to kind 'world'; got {self.overlap!r}")

    @property
    def overlap_mode(self) -> str:
        """The overlap filter in effect: ``overlap``, or its default for this kind."""
        if self.overlap is not None:
            return self.overlap
        return "subject_or_answer" if self.kind == "entityquestions" and self.gekhman else "none"
