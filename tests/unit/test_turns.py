"""anatomy/turns.py without a model: the no-anatomy case keeps the labels it already has."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.anatomy.atlas import load_atlas
from dicomnode.anatomy.turns import TURNS, NoAnatomyError, orientation_by_turns
from dicomnode.volume import Volume

ROOT = Path(__file__).resolve().parents[2]


def test_no_anatomy_in_any_turn_raises_with_the_header_orientation_labels() -> None:
    atlas = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    calls: list[tuple[int, ...]] = []

    def segment(v: Volume) -> Volume:  # a model that finds nothing anywhere
        calls.append(v.shape)
        return v.with_array(np.zeros(v.shape, np.int16))

    with pytest.raises(NoAnatomyError) as info:
        orientation_by_turns(Volume(np.zeros((10, 12, 14), np.float32), affine), segment, atlas)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert info.value.labels.shape == (10, 12, 14) and np.array_equal(info.value.labels.affine, affine)
    assert len(calls) == len(TURNS)  # the model ran once per turn, not again for the report
