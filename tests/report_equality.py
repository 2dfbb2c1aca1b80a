"""Report equality across layouts: exact, floats to 1e-5 relative.

The gold answer's probability (`p_gold`, the continuous knowledge measure) is a sum of
teacher-forced probabilities whose last bits move with the batch's composition and the mesh's
partitioning on CPU, so reports from two layouts of one run agree exactly except in such floats."""

from __future__ import annotations

from typing import Any

import pytest


def assert_same(ours: Any, theirs: Any, where: str = "report") -> None:
    """`ours` equals `theirs`, floats within rel 1e-5 / abs 1e-7; `where` names a mismatch."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for k in ours:
            assert_same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), where
    else:
        assert ours == theirs, where
