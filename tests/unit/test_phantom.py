"""The procedural phantom: shapes, orientation contract, anatomical left/right, fields of view."""
from __future__ import annotations

import numpy as np
import pytest

from dicomnode.volume import Volume
from inference.phantom import CTARR_NAMES, FOVS, LABELS, generate_phantom, present_ctarr


@pytest.fixture(scope="module")
def whole() -> tuple[np.ndarray, np.ndarray]:
    return generate_phantom(7, "whole", 3.0)


def _centroid_lps(labels: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray:
    idx = np.argwhere(labels == LABELS[name]).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_shape_dtype_and_affine_axes(whole) -> None:
    lab, aff = whole
    assert lab.dtype == np.int16 and lab.ndim == 3
    np.testing.assert_allclose(aff[:3, 0], [0, 0, -3.0])  # slices head -> feet
    np.testing.assert_allclose(aff[:3, 1], [0, 3.0, 0])   # rows anterior -> posterior
    np.testing.assert_allclose(aff[:3, 2], [3.0, 0, 0])   # columns right -> left
    vol = Volume(lab, aff)
    assert vol.spacing == (3.0, 3.0, 3.0)


def test_whole_body_has_all_19_in_ctarr_order(whole) -> None:
    lab, _ = whole
    assert present_ctarr(lab) == list(range(1, 20))
    assert [LABELS[n] for n in CTARR_NAMES] == list(range(1, 20))
    assert LABELS["urinary_bladder"] == 19 and LABELS["skull"] == 1 and LABELS["liver"] == 15


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_left_right_and_head_feet(seed: int) -> None:
    lab, aff = generate_phantom(seed, "whole")
    c = {n: _centroid_lps(lab, aff, n) for n in (
        "liver", "spleen", "heart", "left_lung", "right_lung", "left_kidney", "right_kidney",
        "left_hip", "right_hip", "brain", "urinary_bladder", "left_ribs_scapula_clavicle", "right_ribs_scapula_clavicle")}
    body_x = _centroid_lps(lab, aff, "thoracic_vertebrae")[0]
    assert c["liver"][0] < body_x < c["spleen"][0]           # LPS +x = patient's left
    assert c["heart"][0] > body_x
    for n in ("lung", "kidney", "hip", "ribs_scapula_clavicle"):
        assert c[f"left_{n}"][0] > c[f"right_{n}"][0]
    assert c["brain"][2] > c["heart"][2] > c["liver"][2] > c["urinary_bladder"][2]  # LPS +z = head
    assert c["heart"][1] < _centroid_lps(lab, aff, "thoracic_vertebrae")[1]          # heart anterior of spine


def test_fields_of_view_and_determinism() -> None:
    head, _ = generate_phantom(4, "head")
    assert {LABELS["brain"], LABELS["skull"]} <= set(np.unique(head).tolist())
    assert LABELS["liver"] not in head and LABELS["urinary_bladder"] not in head
    pelvis, _ = generate_phantom(4, "pelvis")
    assert {LABELS["urinary_bladder"], LABELS["sacrum"]} <= set(np.unique(pelvis).tolist())
    assert LABELS["brain"] not in pelvis
    a, fa = generate_phantom(11, "chest")
    b, fb = generate_phantom(11, "chest")
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    c, _ = generate_phantom(12, "chest")
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert set(FOVS) == {"whole", "head", "chest", "abdomen", "pelvis"}


def test_finer_spacing_and_errors() -> None:
    lab, aff = generate_phantom(5, "abdomen", 1.5)
    lab3, _ = generate_phantom(5, "abdomen", 3.0)
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), 1.5)
    v15 = (lab == LABELS["liver"]).sum() * 1.5 ** 3
    v3 = (lab3 == LABELS["liver"]).sum() * 3.0 ** 3
    assert v15 == pytest.approx(v3, rel=0.1)  # same anatomy, finer grid
    with pytest.raises(ValueError):
        generate_phantom(0, "knee")
    with pytest.raises(ValueError):
        generate_phantom(0, "whole", 0.0)


@pytest.mark.parametrize("seed", [2, 5])
def test_pelvis_shapes(seed: int) -> None:
    """Iliac wings are plates from the crest (beside the lower lumbar spine) to the acetabulum that
    meet the sacrum at the sacroiliac joints; the sacrum curves back (its tip behind its top)."""
    from scipy import ndimage as ndi
    lab, _ = generate_phantom(seed, "pelvis")
    sac = lab == LABELS["sacrum"]
    zs = np.nonzero(sac.any(axis=(1, 2)))[0]
    top, tip = np.argwhere(sac[zs[0]:zs[0] + 3]).mean(0), np.argwhere(sac[zs[-1] - 2:zs[-1] + 1]).mean(0)
    assert tip[1] - top[1] > 25 / 3.0  # rows run anterior -> posterior: > 25 mm backwards
    lumbar_z = np.nonzero((lab == LABELS["lumbar_vertebrae"]).any(axis=(1, 2)))[0]
    near_sac = ndi.binary_dilation(sac, iterations=3)
    for name in ("left_hip", "right_hip"):
        hip = lab == LABELS[name]
        hz = np.nonzero(hip.any(axis=(1, 2)))[0]
        assert hz[0] < lumbar_z[-1] - 5          # the crest lies beside L4/L5, above the sacrum's top
        assert (hip & near_sac).sum() > 20        # sacroiliac joint
        # a plate, not a ball: in the wing's slices the bone is much wider than thick
        wing = hip[hz[0] + 5]
        assert 0 < wing.sum() < 0.5 * (np.ptp(np.nonzero(wing)[0]) + 1) * (np.ptp(np.nonzero(wing)[1]) + 1)
