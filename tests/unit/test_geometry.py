"""series.geometry: stack analysis and canonical reorientation with its exact inverse."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.errors import SeriesError
from dicomnode.series.geometry import (
    acquisition_plane, analyse_stack, check_orientation, duplicate_groups, to_canonical,
)
from dicomnode.volume import Volume
from tests.unit.test_convert_synth import rotation


def _volume(direction: np.ndarray, shape=(4, 5, 6), spacing=(2.0, 0.7, 0.9)) -> Volume:
    aff = np.eye(4)
    aff[:3, :3] = direction * np.asarray(spacing)
    aff[:3, 3] = (10.0, -20.0, 30.0)
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return Volume(array=arr, affine=aff)


SIGNED_PERMS = [
    np.eye(3)[:, list(p)] * np.asarray(s)
    for p in itertools.permutations(range(3)) for s in itertools.product((1, -1), repeat=3)
]


@pytest.mark.parametrize("k", range(len(SIGNED_PERMS)))
def test_every_axis_permutation_and_flip_reaches_the_canonical_grid(k: int) -> None:
    vol = _volume(SIGNED_PERMS[k])
    can, r = to_canonical(vol)
    # direction ~ identity in LPS: slices towards superior, rows posterior, columns left
    assert np.allclose(can.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # every voxel keeps its patient position
    idx = np.argwhere(np.ones(vol.shape, bool))
    lps = vol.index_to_lps(idx)
    can_idx = np.rint(can.lps_to_index(lps)).astype(int)
    assert np.array_equal(can.array[tuple(can_idx.T)], vol.array[tuple(idx.T)])
    back = r.invert(can)
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine)
    assert ("reoriented" in can.geometry.actions) == (not r.is_identity)


@settings(max_examples=60, deadline=None)
@given(st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False)] * 3))
def test_oblique_canonical_is_closest_and_exactly_invertible(angles: tuple[float, float, float]) -> None:
    vol = _volume(rotation(angles))
    can, r = to_canonical(vol)
    d = can.direction
    # each canonical axis is the best-aligned one of the original axes, positively oriented
    assert all(d[(2, 1, 0)[a], a] > 0 for a in range(3))
    assert np.allclose(np.abs(np.linalg.det(d)), 1.0)
    labels = can.with_array((can.array % 3).astype(np.uint8))
    back = r.invert(labels)
    assert np.array_equal(back.array, (vol.array % 3).astype(np.uint8))
    assert np.allclose(back.affine, vol.affine, atol=1e-9)
    with pytest.raises(ValueError):
        r.invert(vol.crop((0, 0, 0), (2, 5, 6)))


def test_analyse_stack_measures_spacing_gaps_and_tilt() -> None:
    pos = np.array([[0, 0, z] for z in (0, 2, 4, 8, 10)], float)
    g = analyse_stack(pos[::-1], (1, 0, 0, 0, 1, 0), (0.5, 0.5), spacing_tolerance_mm=0.05, tilt_tolerance_deg=0.05)
    assert g.spacing == 2 and g.gaps == 1 and g.needs_resample == "gap" and list(g.order) == [4, 3, 2, 1, 0]
    three = np.array([[0, 0, z] for z in (0, 2, 6)], float)  # too few steps for a median to tell
    g = analyse_stack(three, (1, 0, 0, 0, 1, 0), (0.5, 0.5), spacing_tolerance_mm=0.05, tilt_tolerance_deg=0.05)
    assert g.spacing == 2 and g.gaps == 1 and g.needs_resample == "gap"
    jitter = np.array([[0, 0, z] for z in (0, 2, 4.4, 6.4, 8.4)], float)  # uneven, but no slice missing
    g = analyse_stack(jitter, (1, 0, 0, 0, 1, 0), (0.5, 0.5), spacing_tolerance_mm=0.05, tilt_tolerance_deg=0.05)
    assert g.gaps == 0 and g.needs_resample == "nonuniform"
    tilted = np.array([[0, 0.5 * k, 2.0 * k] for k in range(5)], float)
    g = analyse_stack(tilted, (1, 0, 0, 0, 1, 0), (0.5, 0.5), spacing_tolerance_mm=0.05, tilt_tolerance_deg=0.05)
    assert g.needs_resample == "tilt" and g.tilt_deg == pytest.approx(np.degrees(np.arctan(0.25)))
    assert np.allclose(g.source_affine(tilted[0])[:3, 0], [0, 0.5, 2.0])
    with pytest.raises(SeriesError, match="duplicate_positions"):
        analyse_stack(np.zeros((2, 3)), (1, 0, 0, 0, 1, 0), (1, 1), spacing_tolerance_mm=0.05, tilt_tolerance_deg=0.05)


def test_orientation_checks_and_planes() -> None:
    with pytest.raises(SeriesError, match="invalid_orientation"):
        check_orientation((1, 0, 0, 1, 0, 0))
    with pytest.raises(SeriesError, match="invalid_orientation"):
        check_orientation((1, 0, 0, 0, np.nan, 0))
    assert acquisition_plane(np.array([0, 0, -1.0])) == "axial"
    assert acquisition_plane(np.array([0, 1.0, 0.1])) == "coronal"
    assert acquisition_plane(np.array([1.0, 0.1, 0.1])) == "sagittal"
    assert acquisition_plane(np.array([1.0, 1.0, 1.0])) == "oblique"
    assert [list(g) for g in duplicate_groups(np.array([0.0, 5.0, 0.001, 2.0]), 0.05)] == [[0, 2]]
