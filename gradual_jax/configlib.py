"""Typed configuration machinery, independent of what is configured: frozen dataclasses built
from YAML and dotted ``key=value`` overrides, with one-line errors, and help text generated from
the dataclasses' attribute docstrings.

    cfg = load_dataclass(RunConfig, "configs/smoke.yaml", ["train.lr=1e-4", "seeds=[0,1,2]"])

Every problem raises :class:`ConfigError` with one line naming the key, e.g.
``config key 'train.lr': expected float, got 'abc'`` or
``unknown key 'train.lrr'; valid keys: batch_size, clip_norm, ...``.
Override paths may index lists: ``stages.1.train.lr=5e-6``. This module imports no part of the
package: each component declares its own config dataclass beside its code, using
:func:`require` for its checks, and ``gradual_jax.config`` composes them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import re
import textwrap
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gradual_jax.errors import UserError


_KEY_FMT = "config key '{key}': {detail}"
_UNKNOWN_FMT = "unknown key '{key}'; {detail}"


class ConfigError(UserError):
    """A configuration problem, described in one line.

    ``key`` is the dotted key the problem is about (None if none) and ``detail`` the problem;
    ``fmt`` lays them out, by default as ``config key '<key>': <detail>``.
    """

    def __init__(self, detail: str, key: str | None = None, fmt: str = _KEY_FMT) -> None:
        self.detail, self.key, self.fmt = detail, key, fmt
        super().__init__(fmt.format(key=key, detail=detail) if key else detail)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key (no-op without a key)."""
        if self.key is None or not prefix:
            return self
        return ConfigError(self.detail, f"{prefix}.{self.key}", self.fmt)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a number with a unit such as "5GB", "500MB", "1.5GiB" or
    "20KB" (KB/MB/GB/TB are powers of 1000, as in transformers; KiB/MiB/GiB/TiB powers of 1024).
    Raises ValueError for anything else or a size below one byte."""
    if isinstance(size, bool):
        raise ValueError(f"size {size!r}: expected bytes or a string like 5GB")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in {"", *_SIZE_UNITS}:
            raise ValueError(f"size {size!r}: expected bytes or a number with a unit "
                             f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB), like 5GB")
        value = int(float(m.group(1)) * _SIZE_UNITS.get(unit, 1))
    if value < 1:
        raise ValueError(f"size {size!r}: must be at least 1 byte")
    return value


def require(ok: bool, key: str, detail: str) -> None:
    """Raise ``ConfigError(detail, key)`` unless ``ok``: the one-line check config classes use."""
    if not ok:
        raise ConfigError(detail, key)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and lightly coerced to) type ``tp``; ConfigError if it fails."""
    origin, args = get_origin(tp), get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"expected {_type_name(tp)}, got {_show(value)}", key)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                if err.key != key:  # failed deeper down (inside a list or mapping): say where
                    raise
        raise fail()
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return from_dict(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        item = args[0] if args else Any
        items = [_convert(item, v, _join(key, n)) for n, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        vt = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"keys must be strings, got {_show(k)}", key)
            out[k] = _convert(vt, v, _join(key, k))
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any numeric literal.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise fail()
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"config schema uses unsupported type {tp!r} at {key!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"valid keys: {', '.join(sorted(valid))}{hint}", key, _UNKNOWN_FMT)


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Instance of dataclass ``cls`` built from ``data``, recursively and with type checks.

    Missing keys take the field defaults. ``path`` is the dotted prefix used in error messages.
    Raises ConfigError on an unknown key (listing the valid ones), a missing required key, a
    value of the wrong type or a value the dataclass's own checks reject.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected {_type_name(cls)}, got {_show(data)}", path or None)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise _unknown_key(_join(path, str(k)), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing (required)", _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass; inverse of :func:`from_dict`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return copy.deepcopy(cfg)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type(cls: Any, parts: Sequence[str]) -> Any:
    """Schema type at a dotted path below dataclass ``cls``, or None when it is not known."""
    tp = cls
    for part in parts:
        origin, args = get_origin(tp), get_args(tp)
        if origin in (Union, types.UnionType):
            non_none = [a for a in args if a is not type(None)]
            tp, origin, args = non_none[0], get_origin(non_none[0]), get_args(non_none[0])
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif origin in (list, tuple) and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    return tp


def _accepts_str_only(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return all(a is str or a is type(None) for a in get_args(tp))
    return False


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], schema: type | None = None
) -> dict[str, Any]:
    """Copy of ``data`` with each ``dotted.key=value`` override applied in order.

    Values are parsed with ``yaml.safe_load`` (``lr=1e-4``, ``seeds=[0,1,2]``, ``remat=true``);
    where ``schema`` says the key is a string, the raw text is kept (``name=2024``). Numeric path
    parts index lists (``stages.1.train.lr=5e-6``); missing mappings are created. Key and type
    checking happen when the result goes through :func:`from_dict`.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        parts = key.split(".")
        tp = _field_type(schema, parts) if schema is not None else None
        if tp is not None and _accepts_str_only(tp) and raw.strip() not in ("null", "~", ""):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                first = str(err).splitlines()[0]
                raise ConfigError(f"cannot parse override value {raw!r}: {first}", key) from None
        _set_path(out, parts, value)
    return out


def set_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``data`` with each dotted key of ``values`` set to its (Python, unparsed) value,
    as :func:`apply_overrides` does for ``key=value`` text; checked later by :func:`from_dict`."""
    out = copy.deepcopy(dict(data))
    for key, value in values.items():
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"cannot set {key!r}: not a dotted key")
        _set_path(out, key.split("."), copy.deepcopy(value))
    return out


def _set_path(out: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    key = ".".join(parts)
    node: Any = out
    for n, part in enumerate(parts[:-1]):
        where = ".".join(parts[: n + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"cannot set '{key}': '{where}' is {_show(node)}, not a mapping")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"cannot set '{key}': '{where}' is {_show(node)}, not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"expected a list index, got {part!r}", where)
    if not -len(node) <= int(part) < len(node):
        detail = f"list index {part!r} out of range (the list has {len(node)} items)"
        raise ConfigError(detail, where)
    return int(part)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_dataclass(cls: type, path: str | Path | None, overrides: Sequence[str] = ()) -> Any:
    """Instance of dataclass ``cls`` from a YAML file (None: defaults), then ``overrides`` applied
    in order. Errors in the file are prefixed with its path; all are :class:`ConfigError`."""
    if path is not None:
        path = Path(path)
        try:
            cfg = from_dict(cls, read_yaml(path))
        except ConfigError as err:
            if str(err).startswith(str(path)):
                raise
            raise ConfigError(f"{path}: {err}") from None
    else:
        cfg = cls()
    if overrides:
        cfg = from_dict(cls, apply_overrides(to_dict(cfg), overrides, cls))
    return cfg


def _drop_key(data: dict[str, Any], dotted: str) -> None:
    node: Any = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config_hash: cannot exclude unknown key '{dotted}'")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"config_hash: cannot exclude unknown key '{dotted}'")
    del node[parts[-1]]


def config_hash(cfg: Any, exclude: Iterable[str] = ()) -> str:
    """Hex sha256 of the config's canonical JSON (sorted keys), without the dotted ``exclude``
    keys. Equal configs hash equal however they were written."""
    data = to_dict(cfg)
    for key in exclude:
        _drop_key(data, key)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()



# --------------------------------------------------------------------------- help text


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right below its line), joined into one
    line; fields without one are absent. Inherited fields are looked up in the bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class KeyHelp:
    """One settable key: its dotted name, type, default (as YAML would show it) and description."""

    key: str
    type: str
    default: str
    doc: str


def _default_text(value: Any) -> str:
    value = to_dict(value)
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= 70 else text[:67] + "..."


def iter_keys(cls: type, prefix: str = "") -> Iterator[KeyHelp]:
    """Every key of dataclass ``cls``, nested dataclass fields expanded into dotted keys, in
    declaration order, with their defaults and attribute docstrings."""
    hints, docs = _hints(cls), field_docs(cls)
    default_obj = None
    try:
        default_obj = cls()
    except TypeError:  # has required fields: no defaults to show for them
        pass
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key)
            continue
        default = getattr(default_obj, f.name) if default_obj is not None else dataclasses.MISSING
        shown = "(required)" if default is dataclasses.MISSING else _default_text(default)
        yield KeyHelp(key, _type_name(tp), shown, docs.get(f.name, ""))


def keys_help(cls: type, width: int = 100) -> str:
    """A help listing of every key of ``cls``: ``key = default  (type)`` then its description."""
    lines = []
    for k in iter_keys(cls):
        lines.append(f"  {k.key} = {k.default}  ({k.type})")
        if k.doc:
            lines += textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def add_arguments(parser: Any, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag-name`` per scalar field of dataclass ``cls`` but those named in `skip` (type,
    choices, default and help from the dataclass), so a CLI never re-declares settings; read back
    with :func:`from_arguments`. Values are checked by ``cls`` itself, so a bad one fails with the
    same line as in a config. Fields skipped or not scalars (nested settings) keep their defaults."""
    import argparse

    hints, docs, default = _hints(cls), field_docs(cls), cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, value = hints[f.name], getattr(default, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {_default_text(value)})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=value, help=help_text)
        elif get_origin(tp) is Literal:
            parser.add_argument(flag, dest=f.name, choices=list(get_args(tp)), default=value,
                                help=help_text)
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=tp, default=value, help=help_text)


def from_arguments(cls: type, namespace: Any) -> Any:
    """The ``cls`` instance :func:`add_arguments`'s flags describe in a parsed ``namespace``."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                  if hasattr(namespace, f.name)})
