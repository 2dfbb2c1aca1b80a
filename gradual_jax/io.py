"""The package's one atomic writer: every file it writes appears whole or not at all.

A writer fills a temporary file beside the target, named uniquely across processes and hosts
(host name, pid and a random part), then renames it onto the target, so concurrent writers in
one directory never share a temporary and a reader sees the old file or the new one. This module
imports nothing of the package.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _temporary(path: Path) -> Path:
    """A name beside `path` that no other process or host uses."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _publish(path: Path, write: Callable[[Path], None], remove: Callable[[Path], None]) -> None:
    """``write(tmp)`` under a unique temporary name beside ``path``, then rename it onto
    ``path``; the temporary is removed (``remove``) whatever happens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename ``tmp`` onto ``path`` (its directory is created); returns ``path``."""
    _publish(Path(path), write, Path.unlink)
    return Path(path)


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> bool:
    """``write(tmp)`` into a fresh directory, then rename it onto ``path``: the directory appears
    whole or not at all. False (and nothing kept of this writer) when ``path`` already exists,
    for example written by a concurrent writer, whose copy stands."""
    try:
        _publish(Path(path), write, lambda tmp: shutil.rmtree(tmp, ignore_errors=True))
        return True
    except OSError:
        if Path(path).exists():
            return False
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` written atomically to ``path``."""
    return write_text(path, json.dumps(data, **dumps))
