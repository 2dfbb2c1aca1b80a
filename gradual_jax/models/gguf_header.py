"""A GGUF file's metadata and tensor table, read in one pass over the header.

`gguf.GGUFReader` builds a Python object for every element of every metadata array, so a
tokenizer's 49,152 tokens and 48,900 merges take seconds to parse each time a model is opened
(SmolLM2: about 3-5 s here, paid once for the config and again for the weights). The loader
needs the scalar keys, the length of the token list and the tensors; this reader keeps scalars
and numeric arrays, steps over string arrays (their length is kept) but those it is asked for
(the tokenizer's tokens and merges), and memory-maps the tensor data in the layout
`gguf.quants.dequantize` takes (the reader's own `tensors[i].data`).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Container
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numpy arrays; every other type is raw bytes of blocks.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}
_DEFAULT_ALIGNMENT = 32


@dataclasses.dataclass
class Field:
    """One metadata value: a scalar, a string, a numeric array, or a string array (whose
    elements are stepped over: `data` is a range of its length)."""

    name: str
    value: Any
    data: Any

    def contents(self) -> Any:
        if isinstance(self.value, range):
            raise ValueError(f"GGUF key {self.name!r}: string arrays are not read by this reader")
        return self.value


@dataclasses.dataclass
class Tensor:
    """A tensor's name, GGUF shape (fastest dimension first), type and raw data."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


class GGUFHeader:
    """`fields` (key -> Field) and `tensors` (in file order) of a GGUF file, data memory-mapped.
    String arrays are stepped over unless named in ``strings`` (then read as a list of str).
    Raises ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: str | Path, strings: Container[str] = ()):
        import gguf

        self.path = Path(path)
        self._strings = strings
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)
        self._pos = 0
        if bytes(self._take(4)) != _MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            name = self._string()
            self.fields[name] = self._field(name, self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            infos.append((name, dims, gguf.GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else _DEFAULT_ALIGNMENT
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(name, dims, kind, start + offset, gguf)
                        for name, dims, kind, offset in infos]

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ValueError("GGUF file cut short")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return bytes(self._take(self._unpack("<Q"))).decode("utf-8")

    def _field(self, name: str, kind: int) -> Field:
        if kind in _SCALARS:
            value = self._unpack(_SCALARS[kind])
            return Field(name, value, value)
        if kind == _STRING:
            value = self._string()
            return Field(name, value, value)
        if kind != _ARRAY:
            raise ValueError(f"GGUF key {name!r}: unknown value type {kind}")
        elem, count = self._unpack("<I"), self._unpack("<Q")
        if elem in _NUMPY:
            dtype = np.dtype(_NUMPY[elem]).newbyteorder("<")
            values = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
            return Field(name, values.tolist(), values)
        if elem != _STRING:
            raise ValueError(f"GGUF key {name!r}: arrays of type {elem} are not supported")
        if name in self._strings:
            values = [self._string() for _ in range(count)]
            return Field(name, values, values)
        for _ in range(count):  # step over each string: length, then bytes
            self._take(self._unpack("<Q"))
        return Field(name, range(count), range(count))

    def _tensor(self, name: str, dims: tuple[int, ...], kind: Any, offset: int, gguf: Any) -> Tensor:
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(dims))  # numpy order: slowest dimension first
        n = int(np.prod(dims, dtype=np.int64))
        if kind.name in _PLAIN:
            dtype = _PLAIN[kind.name]
            count, layout = n, shape
        else:  # quantized (and BF16): raw bytes, each row's blocks end to end
            dtype = np.uint8
            count = n // block * type_size
            layout = (*shape[:-1], shape[-1] // block * type_size)
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(self._map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        data = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(layout)
        return Tensor(name, dims, kind, data)
