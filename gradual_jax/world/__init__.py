"""The synthetic knowledge world: the embedded default that runs the whole method on a CPU.

`build_or_load_world(WorldConfig())` invents people, places, companies and books with facts about
them, writes a corpus that states those facts with skewed frequencies (some never, some with
conflicting values), trains a tokenizer and a tiny decoder on it, and returns the model directory
and EntityQuestions-style QA splits. Builds are cached per config.
"""

from gradual_jax.world.cache import (
    WorldArtifacts,
    build_or_load_world,
    build_world_dir,
    load_artifacts,
    world_cache_root,
)
from gradual_jax.world.config import WorldConfig, world_config_from_dict
from gradual_jax.world.corpus import build_corpus, qa_block, qa_pool
from gradual_jax.world.generate import (
    RELATIONS,
    Fact,
    Relation,
    World,
    generate_world,
    select_train,
    world_from_json,
)
from gradual_jax.world.pretraining import export_model, model_config, pretrain, qa_greedy_accuracy
from gradual_jax.world.qa import lexicon_texts, qa_examples
from gradual_jax.world.screen import screen_candidates, screen_categories
from gradual_jax.world.tokenizer import check_lexicon, train_tokenizer

__all__ = [
    "RELATIONS", "Fact", "Relation", "World", "WorldArtifacts", "WorldConfig", "build_corpus",
    "build_or_load_world", "build_world_dir", "check_lexicon", "export_model", "generate_world",
    "lexicon_texts", "load_artifacts", "model_config", "pretrain", "qa_block", "qa_examples",
    "qa_greedy_accuracy", "qa_pool", "screen_candidates", "screen_categories", "select_train",
    "train_tokenizer", "world_cache_root", "world_config_from_dict",
    "world_from_json",
]
