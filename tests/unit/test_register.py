"""CTARR registration: transform algebra, orientation search, Dice descent, orientation correction.

Uses the shipped atlas (config/atlas/atlas19.npz) and procedural phantoms (inference/phantom.py)
with seeds the atlas was NOT built from (it used seeds 0..15).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas
from dicomnode.anatomy.register import (
    Registration, apply_orientation, descend, orientation_matrix, register,
)
from dicomnode.volume import SourceFrame, Volume, resample, to_source_grid
from tests.conftest import ROOT

ATLAS_PATH = ROOT / "config" / "atlas" / "atlas19.npz"


@pytest.fixture(scope="module")
def atlas():
    return load_atlas(ATLAS_PATH)


def _phantom(seed: int, fov: str = "whole") -> Volume:
    from inference.phantom import generate_phantom

    lab, aff = generate_phantom(seed, fov=fov, spacing_mm=3.0)
    return Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff)


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return _phantom(2024)


def _reorient_array(vol: Volume, k: int, flip: bool) -> Volume:
    arr = np.rot90(np.asarray(vol.array), k, axes=(1, 2))
    if flip:
        arr = arr[::-1]
    return Volume(np.ascontiguousarray(arr), vol.affine)


def test_orientation_matrices_are_the_8_distinct_signed_permutations():
    mats = [orientation_matrix(k, f) for k in range(4) for f in (False, True)]
    assert len({m.tobytes() for m in mats}) == 8
    for (k, f), m in zip(itertools.product(range(4), (False, True)), mats):
        assert np.allclose(m @ m.T, np.eye(3))
        assert np.isclose(np.linalg.det(m), -1.0 if f else 1.0)
        assert np.allclose(m[0], [-1 if f else 1, 0, 0])  # z stays z


@settings(max_examples=40, deadline=None)
@given(k=st.integers(0, 3), flip=st.booleans(),
       s=st.tuples(*[st.floats(0.6, 1.6)] * 3), t=st.tuples(*[st.floats(-300, 300)] * 3),
       c=st.tuples(*[st.floats(-200, 200)] * 3))
def test_to_scan_inverts_to_atlas(k, flip, s, t, c):
    reg = Registration(k, flip, s, t, 0.0, True, "", centre=c)
    pts = np.random.default_rng(0).uniform(-400, 400, (20, 3))
    assert np.allclose(reg.to_scan(reg.to_atlas(pts)), pts, atol=1e-6)
    # the centre maps to the translation
    assert np.allclose(reg.to_atlas(np.array([c])), [t], atol=1e-6)


def test_descend_follows_the_paper_schedule():
    # a loss that never improves: step halves at every evaluation after the first -> stops at the 4th halving
    calls = []

    def flat(x):
        calls.append(x.copy())
        return 1.0, np.ones_like(x)

    x, loss, it = descend(flat, np.zeros(2))
    assert it == 5 and len(calls) == 5
    steps = [calls[i][0] - calls[i + 1][0] for i in range(4)]
    assert np.allclose(steps, [0.05, 0.025, 0.0125, 0.00625])
    # a convex quadratic is minimised
    x, loss, it = descend(lambda v: (float(np.sum((v - 3) ** 2)), 2 * (v - 3)), np.zeros(3), step=0.2)
    assert np.allclose(x, 3, atol=0.05) and loss < 1e-2


def test_phantom_orientation_all_8_configurations(atlas, phantom):
    base = register(phantom, atlas)
    assert base.verified and base.rotation_k == 0 and not base.z_flip, base.reason
    for k in range(4):
        for flip in (False, True):
            r = register(_reorient_array(phantom, k, flip), atlas)
            assert r.verified, r.reason
            # the correction must restore exactly the original array and affine
            fixed = apply_orientation(_reorient_array(phantom, k, flip), r)
            assert fixed.shape == phantom.shape
            assert np.array_equal(fixed.array, phantom.array), (k, flip, r.rotation_k, r.z_flip)
            assert np.allclose(fixed.affine, phantom.affine, atol=1e-6)


def test_registration_is_deterministic(atlas, phantom):
    a = register(phantom, atlas)
    b = register(phantom, atlas)
    assert a == b


def test_dice_descent_recovers_a_known_scale(atlas, phantom):
    """A phantom stretched 15 % along z (same FOV) needs a z scale ~15 % smaller."""
    base = register(phantom, atlas)
    aff = phantom.affine.copy()
    aff[:3, 0] /= 1.15  # target grid: voxel steps 1/1.15 along the slice axis -> content stretched in voxels
    stretched_arr = resample(phantom, aff, (int(phantom.shape[0] * 1.15), *phantom.shape[1:]), order=0).array
    stretched = Volume(np.asarray(stretched_arr), phantom.affine)  # relabel the grid at 3 mm: body 15 % taller
    r = register(stretched, atlas)
    ratio = r.scale[0] / base.scale[0]
    assert abs(ratio - 1 / 1.15) < 0.05, (r.scale, base.scale)
    assert abs(r.scale[1] / base.scale[1] - 1) < 0.05


def test_single_anatomy_cannot_tell(atlas, phantom):
    """Only the liver: the 8 configurations cannot be told apart -> header kept, verified False."""
    liver = phantom.with_array(np.where(phantom.array == CLASS_INDEX["liver"], CLASS_INDEX["liver"], 0).astype(np.int16))
    for k, flip in ((0, False), (2, True)):
        r = register(_reorient_array(liver, k, flip), atlas)
        assert not r.verified
        assert (r.rotation_k, r.z_flip) == (0, False)
        assert "undecided" in r.reason


def test_lungs_heart_spine_fix_the_axes_of_a_chest_crop(atlas):
    """Fewer than 4 well-covered anatomies (paper rule off) but heart, lungs and spine decide."""
    chest = _phantom(2031, fov="chest")
    keep = [CLASS_INDEX[n] for n in ("left_lung", "right_lung", "heart", "thoracic_vertebrae")]
    chest = chest.with_array(np.where(np.isin(chest.array, keep), chest.array, 0).astype(np.int16))
    for k in range(4):
        for flip in (False, True):
            r = register(_reorient_array(chest, k, flip), atlas)
            fixed = apply_orientation(_reorient_array(chest, k, flip), r)
            assert r.verified, r.reason
            assert np.array_equal(fixed.array, chest.array)


def test_apply_orientation_keeps_provenance_consistent(atlas, phantom):
    frames = tuple(SourceFrame("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}") for i in range(phantom.shape[0]))
    flipped = Volume(np.ascontiguousarray(np.asarray(phantom.array)[::-1]), phantom.affine, source=frames)
    r = register(flipped, atlas)
    assert r.verified and r.z_flip and r.rotation_k == 0
    fixed = apply_orientation(flipped, r)
    # provenance still describes the source as its headers do; results map back onto its frames
    assert fixed.source == frames and np.array_equal(fixed.source_affine, flipped.source_affine)
    assert np.array_equal(to_source_grid(fixed).array, flipped.array)
    assert "reoriented:anatomy" in fixed.geometry.actions
    # registration after correction: same transform without orientation change
    again = register(fixed, atlas)
    assert again.verified and not again.reoriented
    assert np.allclose(again.scale, r.scale, atol=0.03)


def test_register_rejects_empty_segmentation(atlas):
    with pytest.raises(ValueError):
        register(Volume(np.zeros((10, 10, 10), np.int16), np.eye(4) * 3 + np.diag([0, 0, 0, -2])), atlas)


def test_two_pass_atlas_build_from_phantoms(tmp_path):
    """A small (6 mm) atlas from 3 phantoms: all 19 anatomies, a centred grid, a 4th phantom registers."""
    from dicomnode.anatomy.atlas import CLASS_NAMES, build_atlas, save_atlas

    maps = [_phantom(s) for s in (7001, 7002, 7003)]
    small = build_atlas(maps, spacing_mm=6.0, built_from="test")
    assert np.all(small.mass > 0), [CLASS_NAMES[c] for c in np.flatnonzero(small.mass == 0)]
    centre = small.origin + (np.asarray(small.shape) - 1) / 2 * small.spacing
    assert np.allclose(centre, 0.0)
    # anatomical order along the feet axis
    z = {n: small.com[i, 0] for i, n in enumerate(CLASS_NAMES)}
    assert z["brain"] < z["heart"] < z["liver"] < z["urinary_bladder"]
    assert small.com[CLASS_NAMES.index("left_lung"), 2] > small.com[CLASS_NAMES.index("right_lung"), 2]
    save_atlas(small, tmp_path / "a.npz")
    again = load_atlas(tmp_path / "a.npz")
    assert again.shape == small.shape and np.allclose(again.com, small.com, atol=1.0)
    r = register(_phantom(7004), again)
    assert r.verified and not r.reoriented and r.dice > 0.4


def test_soft_probabilities_give_the_same_registration(atlas):
    """probabilities= (20 channels, smoothed one-hot) lead to the same orientation and a close transform."""
    from scipy import ndimage

    vol = _phantom(2077, fov="abdomen")
    arr = np.asarray(vol.array)
    probs = np.stack([ndimage.uniform_filter((arr == c).astype(np.float32), 3) for c in range(N_CLASSES + 1)])
    probs /= probs.sum(axis=0, keepdims=True)
    hard = register(vol, atlas)
    soft = register(vol, atlas, probabilities=probs)
    assert soft.verified == hard.verified and (soft.rotation_k, soft.z_flip) == (hard.rotation_k, hard.z_flip)
    assert np.allclose(soft.scale, hard.scale, atol=0.05)
    assert np.allclose(soft.translation, hard.translation, atol=15.0)
    with pytest.raises(ValueError):
        register(vol, atlas, probabilities=probs[:, :-1])


def test_oblique_grid_is_resampled_onto_the_frame(atlas):
    """A grid tilted 8 degrees in the axial plane (not axis-aligned) still registers, header kept."""
    from dicomnode.anatomy.atlas import frame_aligned

    vol = _phantom(2090, fov="abdomen")
    a = np.deg2rad(8.0)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    tilted = Volume(np.asarray(vol.array), rot @ vol.affine)
    grid = frame_aligned(tilted)
    assert np.allclose(grid.spacing, 3.0) and grid.array.shape[0] == vol.shape[0]
    assert set(np.unique(grid.array)) <= set(np.unique(vol.array))
    r = register(tilted, atlas)
    assert r.verified and not r.reoriented, r.reason


def test_mislabelled_anatomies_do_not_drag_the_registration_away(atlas):
    """A model's false positives (a 'brain', 'skull', 'heart' and 'sternum' blob inside an abdomen,
    stray voxels of every real anatomy at both ends of the scan) pull the landmark start far off; the head-feet
    search by the whole map's Dice brings the fit back to where the clean labels put it."""
    from dicomnode.anatomy.register import _orientation_costs, _scan_points, coverage_weights

    clean = _phantom(77, fov="abdomen")
    ref = register(clean, atlas)
    arr = np.asarray(clean.array).copy()
    z, y, x = arr.shape
    for name, (cz, cy, cx) in (("brain", (z // 2, y // 2, x // 3)), ("skull", (z // 3, y // 2, 2 * x // 3)),
                               ("heart", (2 * z // 3, y // 3, x // 2)), ("sternum", (z // 4, y // 4, x // 2))):
        arr[cz - 4:cz + 4, cy - 4:cy + 4, cx - 4:cx + 4] = CLASS_INDEX[name]
    for i, c in enumerate(np.unique(np.asarray(clean.array))[1:]):  # stray pairs of every real class at both
        col = 2 + 3 * i                                            # ends: each looks cut by the scan's border
        arr[[0, 0, -1, -1], 2, [col, col + 1, col, col + 1]] = c
    noisy = clean.with_array(arr)
    scan = _scan_points(noisy, None)
    start = _orientation_costs(scan, atlas, coverage_weights(scan.mass, atlas))[(0, False)][0]
    assert abs(start[0] - ref.translation[0]) > 40  # the premise: the landmark start is far off
    reg = register(noisy, atlas)
    assert abs(reg.translation[0] - ref.translation[0]) < 20, (reg.translation, ref.translation)
