"""The bottom layer's one concept of "bad input": every module's user-facing error subclasses
``UserError``, and the CLIs print any of ``USER_ERRORS`` as one line and exit with code 2.
Anything else (``FileNotFoundError`` included: a file the run itself wrote and lost is a race or
a bug, not the user's input) is an internal failure, exit 1. This module imports nothing of the
package."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a config key, a data file, a checkpoint, a run directory): the
    message is one line naming what is wrong and what was expected."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
