"""The exceptions that mean "bad input": the CLIs print them as one line and exit with code 2."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from gradual_jax.configlib import ConfigError
    from gradual_jax.curriculum import EmptySelection
    from gradual_jax.knowledge.data import DataError
    from gradual_jax.knowledge.probe import ProbeError
    from gradual_jax.pipeline import PipelineError

    errors: list[type[BaseException]] = [ConfigError, EmptySelection, DataError, ProbeError,
                                         PipelineError, FileNotFoundError]
    from gradual_jax.models.errors import CheckpointError

    errors.append(CheckpointError)
    from gradual_jax.checkpoint import CheckpointError as TrainCheckpointError
    from gradual_jax.training.data import TrainingError

    errors += [TrainCheckpointError, TrainingError]
    return tuple(errors)


USER_ERRORS = _user_errors()
