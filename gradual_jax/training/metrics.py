"""Scalar metrics to a JSONL file and a TensorBoard event file, without TensorFlow.

The event file is written by hand: TFRecord framing (little-endian length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload) around ``Event`` protos encoded field by field:
``Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5}``,
``Summary{value=1 (repeated)}``, ``Summary.Value{tag=1 (string), simple_value=2 (float)}``.
TensorBoard reads ``simple_value`` scalars as ordinary scalar plots.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- CRC-32C


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord frame around ``payload``."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


# ----------------------------------------------------------------------------- protobuf by hand


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives as ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialized ``tensorflow.Event`` with a version string or scalar summary values."""
    out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
    if step:
        out += _varint(2 << 3 | 0) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        out += _field_bytes(5, summary)
    return bytes(out)


# ----------------------------------------------------------------------------- reading back


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def read_tfrecords(path: str | Path) -> list[bytes]:
    """Payloads of every TFRecord in ``path``; raises ValueError on a bad checksum or truncation."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        if i + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {i}")
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[i + 8:i + 12])
        if crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {i}")
        payload = data[i + 12:i + 12 + n]
        if len(payload) < n or i + 16 + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {i}")
        (crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload checksum at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` for every scalar in an event file, in file order."""
    out = []
    for payload in read_tfrecords(path):
        step, values = 0, []
        for field, value in _fields(payload):
            if field == 2:
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 5:
                for f, v in _fields(value):
                    if f == 1:
                        tag, simple = "", math.nan
                        for ff, vv in _fields(v):
                            if ff == 1:
                                tag = vv.decode()
                            elif ff == 2:
                                (simple,) = struct.unpack("<f", vv)
                        values.append((tag, simple))
        out.extend((step, tag, val) for tag, val in values)
    return out


# ----------------------------------------------------------------------------- writer


def _jsonable(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


class MetricsWriter:
    """Appends scalars to ``<logdir>/metrics.jsonl`` and ``<logdir>/events.out.tfevents.*``.

    Each ``write`` call is one JSON line ``{"step", "time", **scalars}`` and one Event. Files are
    flushed every ``flush_every`` writes and on ``flush``/``close``.
    """

    def __init__(self, logdir: str | Path, *, jsonl: bool = True, tensorboard: bool = True,
                 flush_every: int = 20):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.logdir / "metrics.jsonl", "a", encoding="utf-8") if jsonl else None
        self._events = None
        if tensorboard:
            now = time.time()
            name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
            self.events_path = self.logdir / name
            self._events = open(self.events_path, "ab")
            self._events.write(tfrecord(encode_event(now, file_version="brain.Event:2")))
        self._flush_every, self._pending = flush_every, 0

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` at ``step``; non-numeric values go to JSONL only."""
        now = time.time()
        if self._jsonl is not None:
            record = {"step": int(step), "time": round(now, 3), **{k: _jsonable(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._events is not None:
            numeric = {}
            for k, v in scalars.items():
                try:
                    numeric[k] = float(v)
                except (TypeError, ValueError):
                    pass
            if numeric:
                self._events.write(tfrecord(encode_event(now, int(step), scalars=numeric)))
        self._pending += 1
        if self._pending >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()
        self._pending = 0

    def close(self) -> None:
        self.flush()
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
