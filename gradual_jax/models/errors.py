"""The one error type checkpoint I/O raises for bad input."""

from __future__ import annotations

from gradual_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint cannot be read as asked: a missing file, an unsupported architecture, a tensor
    whose shape disagrees with its config, a corrupt header or an unknown quantization type.

    The message is one line naming the file, key or tensor and what was expected.
    """
