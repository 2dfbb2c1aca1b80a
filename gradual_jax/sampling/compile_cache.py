"""The compile cache: executables compiled ahead of time, shared by every `Sampler`.

Keys are (name, graphdef, mesh, statics, argument shapes); graph definitions and state layouts
are interned to small ints. The programs are pure over their arguments, so samplers of one
architecture share them (a fresh sampler after fine-tuning compiles nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding

# (name, graphdef, mesh, statics, argument shapes) -> compiled executable. The functions are
# pure over their arguments, so samplers of one architecture share them (a fresh sampler after
# fine-tuning compiles nothing).
COMPILED: dict[Any, Any] = {}
# Graph definitions and state layouts interned to small ints: hashing a 30-layer GraphDef or the
# state's treedef on every call cost a third of a SmolLM2 probe's host time.
INTERNED: dict[Any, int] = {}
# Samplers run from several threads at once (the pipeline's parallel seeds): interning must hand
# out each number once, and an executable being compiled is waited for, not compiled twice.
_INTERN_LOCK = threading.Lock()
_COMPILE_LOCKS: dict[Any, threading.Lock] = {}
_COMPILE_LOCKS_GUARD = threading.Lock()


def intern(value: Any) -> int:
    """A small int naming `value` (hashable), the same for equal values, in any thread."""
    found = INTERNED.get(value)
    if found is not None:
        return found
    with _INTERN_LOCK:
        return INTERNED.setdefault(value, len(INTERNED))


def spec(x: Any) -> tuple:
    """What a compiled program needs to match of an argument: shape, dtype and sharding (in a
    canonical spelling: see `canonical_sharding`)."""
    return (x.shape, str(x.dtype), canonical_sharding(getattr(x, "sharding", None)))


def canonical_sharding(sharding: Any) -> Any:
    """A NamedSharding as (mesh, spec, memory kind) with the mesh axes of size 1 and trailing
    Nones left out of its spec, so that one layout has one key: a program's output over a
    one-device axis comes back as `P()` where the host placed `P(None, 'tensor')`, and without
    this the first real call recompiled every program that warm-up had compiled."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    sizes = sharding.mesh.shape
    entries = []
    for entry in sharding.spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if sizes[n] > 1)
        entries.append(None if not names else names[0] if len(names) == 1 else names)
    while entries and entries[-1] is None:
        entries.pop()
    return (sharding.mesh, tuple(entries), sharding.memory_kind)


def abstract(tree: Any) -> Any:
    """Arrays (and compiled programs' output infos) as plain ShapeDtypeStructs with their
    shardings: what lowering needs of an argument."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def over_leaves(fn: Callable, treedef: Any) -> Callable:
    """`fn(state, ...)` as a function of the state's flat leaves."""
    def call(leaves: list, *more: Any, **kw: Any) -> Any:
        return fn(jax.tree.unflatten(treedef, leaves), *more, **kw)

    return call


def lower(fn: Callable, args: tuple, static: dict, donate: tuple = ()) -> jax.stages.Lowered:
    """`fn` jitted with `static`'s keys as static arguments and `donate` donated, lowered for
    `args` and `static`."""
    return jax.jit(fn, static_argnames=tuple(static), donate_argnums=donate).lower(*args, **static)


def cached(key: Any, build: Callable[[], jax.stages.Lowered]) -> tuple[Any, float | None]:
    """The executable under `key`, compiling `build()` once when there is none (other threads
    asking for the same key wait for it). Returns it and the seconds this call spent
    compiling (None when it was cached)."""
    compiled = COMPILED.get(key)
    if compiled is not None:
        return compiled, None
    with _compile_lock(key):
        compiled = COMPILED.get(key)
        if compiled is not None:
            return compiled, None
        t0 = time.perf_counter()
        compiled = build().compile()
        seconds = time.perf_counter() - t0
        COMPILED[key] = compiled
        return compiled, seconds


def _compile_lock(key: Any) -> threading.Lock:
    with _COMPILE_LOCKS_GUARD:
        return _COMPILE_LOCKS.setdefault(key, threading.Lock())
