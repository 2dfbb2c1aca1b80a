"""One call at a time per sampler."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def serialized(method: Callable) -> Callable:
    """Run `method` holding the sampler's `_lock`: its decode slots and prefix store are donated
    buffers, so two threads sharing a sampler (parallel seeds on one model) must not interleave."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return call
