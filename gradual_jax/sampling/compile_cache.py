"""The compile cache: executables compiled ahead of time, shared by every `Sampler`.

Keys are (name, graphdef, mesh, statics, argument shapes); graph definitions and state layouts
are interned to small ints. The programs are pure over their arguments, so samplers of one
architecture share them (a fresh sampler after fine-tuning compiles nothing).

Once an entry point has turned the caches on (`xla_cache.enable_compilation_cache`), compiled
programs are also kept on disk (`xla_cache.programs_dir`), so a later process loads them
instead of tracing, lowering and compiling them again: JAX's persistent cache saves only the
compile, and tracing SmolLM2's 30 unrolled layers takes seconds a program. A file's name is a
digest of everything the program depends on (`program_digest`: the package's own source among
it), so a changed program is never loaded in place of the new one. One process only: with
several, each compiles (their device assignments differ).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding

from gradual_jax import io
from gradual_jax.xla_cache import programs_dir

log = logging.getLogger("gradual_jax")

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


def cached(key: Any, build: Callable[[], jax.stages.Lowered],
           describe: Callable[[], Any] | None = None) -> tuple[Any, float | None, bool]:
    """The executable under `key`, compiling `build()` once when there is none (other threads
    asking for the same key wait for it). With `describe` (everything the program depends on
    but the package's source, as plain values: see `program_digest`) and the on-disk store on,
    a program compiled by an earlier process is loaded instead, and one compiled here is kept.
    Returns it, the seconds this call spent compiling (None when it did not compile) and
    whether it loaded the program from disk."""
    compiled = COMPILED.get(key)
    if compiled is not None:
        return compiled, None, False
    with _compile_lock(key):
        compiled = COMPILED.get(key)
        if compiled is not None:
            return compiled, None, False
        directory = programs_dir() if describe is not None and jax.process_count() == 1 else None
        path = None if directory is None else directory / f"{program_digest(describe())}.bin"
        compiled = None if path is None else _load(path)
        seconds = None
        if compiled is None:
            t0 = time.perf_counter()
            compiled = build().compile()
            seconds = time.perf_counter() - t0
            if path is not None:
                _save(path, compiled)
        COMPILED[key] = compiled
        return compiled, seconds, seconds is None


_GRAPH_DIGESTS: dict[int, str] = {}


def graph_digest(graph_id: int, graphdef: Any) -> str:
    """SHA-256 of `repr(graphdef)` (its modules, their static attributes and the model config
    among them), computed once per interned graph."""
    found = _GRAPH_DIGESTS.get(graph_id)
    if found is None:
        found = _GRAPH_DIGESTS.setdefault(graph_id, hashlib.sha256(repr(graphdef).encode()).hexdigest())
    return found


def mesh_description(mesh: Any) -> Any:
    """A mesh as plain values: its axis names, shape and device ids (None: no mesh)."""
    if mesh is None:
        return None
    return (tuple(mesh.axis_names), tuple(mesh.devices.shape), tuple(d.id for d in mesh.devices.flat))


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of the package's Python source (every `gradual_jax/**/*.py`, by relative path)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def program_digest(description: Any) -> str:
    """The on-disk name of a program: a digest of `description` (its name, graph, mesh and
    argument layouts, as `repr`-stable values), the package's source, the JAX and jaxlib
    versions, the backend and device kind, and the host CPU."""
    import jaxlib

    device = jax.devices()[0]
    text = repr((description, source_digest(), jax.__version__, jaxlib.__version__,
                 device.client.platform, device.client.platform_version, device.device_kind,
                 jax.device_count(), _host_cpu()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _host_cpu() -> str:
    """The host CPU's model and feature flags (CPU programs are compiled for them)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(line for line in info.splitlines() if line.split(":")[0].strip() in keep)


def _load(path: Path) -> Any | None:
    """The program kept at `path`, on the devices it was compiled for; None when there is none
    or it cannot be read (it is then compiled again and replaced)."""
    from jax.experimental import serialize_executable

    try:
        payload = pickle.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file is only a miss
        log.warning("compiled program %s unreadable (%s): compiling it again", path, err)
        return None
    by_id = {d.id: d for d in jax.devices()}
    if any(i not in by_id for i in payload["devices"]):
        return None
    return serialize_executable.deserialize_and_load(
        payload["executable"], payload["in_tree"], payload["out_tree"],
        execution_devices=[by_id[i] for i in payload["devices"]])


def _save(path: Path, compiled: Any) -> None:
    """Keep `compiled` at `path` (atomically; a concurrent writer's copy is as good). Programs
    that cannot be serialized are not kept."""
    from jax.experimental import serialize_executable

    try:
        executable, in_tree, out_tree = serialize_executable.serialize(compiled)
        devices = [d.id for d in compiled._executable.xla_executable.local_devices()]
        payload = pickle.dumps({"executable": executable, "in_tree": in_tree, "out_tree": out_tree,
                                "devices": devices})
    except Exception as err:  # noqa: BLE001 - keeping it is an optimisation only
        log.info("compiled program not kept on disk: %s", err)
        return
    try:
        io.atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    except OSError as err:
        log.warning("compiled program not kept in %s: %s", path.parent, err)


def _compile_lock(key: Any) -> threading.Lock:
    with _COMPILE_LOCKS_GUARD:
        return _COMPILE_LOCKS.setdefault(key, threading.Lock())
