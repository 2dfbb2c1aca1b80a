"""The one atomic writer: a file or a directory appears whole or not at all, and no temporary
is left behind."""

from __future__ import annotations

import pytest

from gradual_jax import io


def test_atomic_write_dir_keeps_the_first_copy_and_no_temporary(tmp_path):
    target = tmp_path / "cache" / "tok"

    def write(tmp):
        tmp.mkdir()
        (tmp / "a.json").write_text("1")

    assert io.atomic_write_dir(target, write) is True
    assert (target / "a.json").read_text() == "1"

    def other(tmp):
        tmp.mkdir()
        (tmp / "a.json").write_text("2")

    assert io.atomic_write_dir(target, other) is False  # the existing copy stands
    assert (target / "a.json").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["tok"]


def test_atomic_write_dir_failing_writer_leaves_nothing(tmp_path):
    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_dir(tmp_path / "d", broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_a_file_whole(tmp_path):
    io.write_json(tmp_path / "x.json", {"a": 1})
    io.write_text(tmp_path / "x.json", "new")
    assert (tmp_path / "x.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
