"""Hand-written TensorBoard event files: checksums, protobuf encoding (checked with protobuf itself), JSONL."""

from __future__ import annotations

import json
import struct

import pytest

from gradual_jax.training import metrics as M


def test_crc32c_known_vectors():
    assert M.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert M.crc32c(b"") == 0
    assert M.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_tfrecord_framing():
    payload = b"hello"
    rec = M.tfrecord(payload)
    assert struct.unpack("<Q", rec[:8])[0] == 5
    assert rec[12:17] == payload
    crc = M.crc32c(payload)
    assert struct.unpack("<I", rec[17:])[0] == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_class():
    """The tensorflow.Event / Summary messages built with protobuf's own descriptors."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="tbtest", syntax="proto3")
    summary = fd.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".tbtest.Summary.Value")
    event = fd.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".tbtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def test_event_encoding_parses_with_protobuf():
    pytest.importorskip("google.protobuf")
    Event = _event_class()
    ev = Event.FromString(M.encode_event(1234.5, 77, scalars={"loss": 0.25, "train/lr": 1e-3}))
    assert ev.wall_time == 1234.5 and ev.step == 77
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("loss", 0.25), ("train/lr", pytest.approx(1e-3))]
    head = Event.FromString(M.encode_event(1.0, file_version="brain.Event:2"))
    assert head.file_version == "brain.Event:2"
    assert Event.FromString(M.encode_event(1.0, 2**40)).step == 2**40


def test_writer_round_trip(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 2.0, "lr": 0.1})
        w.write(2, {"loss": 1.5, "note": "text only in jsonl", "bad": float("nan")})
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["loss"] == 2.0 and lines[0]["lr"] == 0.1
    assert lines[1]["note"] == "text only in jsonl" and lines[1]["bad"] is None
    (events,) = list(tmp_path.glob("events.out.tfevents.*"))
    scalars = M.read_scalars(events)
    assert [(s, t) for s, t, _ in scalars] == [(1, "loss"), (1, "lr"), (2, "loss"), (2, "bad")]
    assert scalars[2][2] == 1.5


def test_reader_detects_corruption(tmp_path):
    path = tmp_path / "events.out.tfevents.x"
    path.write_bytes(M.tfrecord(M.encode_event(1.0, 3, scalars={"a": 1.0})))
    data = bytearray(path.read_bytes())
    data[14] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        M.read_tfrecords(path)
