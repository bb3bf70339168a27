"""The agreement rule that a margin-verified orientation must also pass (dicomnode/anatomy/agreement.py)."""
from __future__ import annotations

import numpy as np

from dicomnode.anatomy.agreement import AGREE_MIN_SHARE, agreement
from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas
from tests.conftest import ROOT

ATLAS = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
NONE_CUT = np.zeros((N_CLASSES, 3), np.int64)
ALL_WHOLE = np.ones(N_CLASSES, bool)


def _check(com: np.ndarray, mass: np.ndarray | None = None, kinds: np.ndarray = NONE_CUT, shift=(30.0, -50.0, 12.0)):
    mass = ATLAS.mass.copy() if mass is None else mass
    landmarks = com - np.asarray(shift)  # the scan sits elsewhere: the fit must find the shift
    weights = np.clip(mass / ATLAS.mass, 0, 1)
    return agreement(landmarks, kinds, mass, weights, np.all(kinds == 0, axis=1), ATLAS.com, ATLAS.mass,
                     np.zeros(3))


def test_the_atlas_itself_agrees_fully():
    rng = np.random.default_rng(1)
    a = _check(ATLAS.com + rng.normal(0, 8, ATLAS.com.shape))
    assert a.ok and a.share > 0.99


def test_one_mislabelled_class_does_not_drag_the_fit():
    """Lumbar vertebrae labelled cervical (the paper's failure): a least-squares fit would move every
    landmark by ~1/19 of 400 mm; the median fit leaves the others in place and only that class fails."""
    com = ATLAS.com.copy()
    c = CLASS_INDEX["cervical_vertebrae"] - 1
    com[c] = ATLAS.com[CLASS_INDEX["lumbar_vertebrae"] - 1]
    a = _check(com)
    assert a.ok and a.disagreeing == ("cervical_vertebrae",)


def test_scrambled_anatomy_does_not_support_the_orientation():
    """Landmarks in the wrong places (what a weak model gives): verified must be refused."""
    rng = np.random.default_rng(2)
    a = _check(ATLAS.com[rng.permutation(N_CLASSES)])
    assert not a.ok and a.share < AGREE_MIN_SHARE and len(a.disagreeing) > N_CLASSES // 2


def test_implausible_volumes_do_not_support():
    """Anatomies wholly inside the field of view with 5x (or 0.1x) the atlas volume do not count."""
    mass = ATLAS.mass.copy()
    big = [CLASS_INDEX[n] - 1 for n in ("liver", "brain", "heart", "left_lung", "right_lung", "urinary_bladder",
                                        "skull", "left_hip", "right_hip", "sacrum", "spleen")]
    mass[big] *= 5.0
    a = _check(ATLAS.com, mass)
    assert not a.ok and set(a.disagreeing) >= {"liver", "brain"}
    # the same anatomies cut by the border are partial views: their volume says nothing
    kinds = NONE_CUT.copy()
    kinds[big, 0] = 2
    assert _check(ATLAS.com, mass, kinds).ok


def test_cut_anatomies_count_one_sided():
    """An anatomy cut at the feet end whose observed centre lies headwards of the atlas one agrees
    (its true centre lies further towards the feet); beyond the atlas centre on the other side it does not."""
    kinds = NONE_CUT.copy()
    liver = CLASS_INDEX["liver"] - 1
    kinds[liver, 0] = 1  # cut at the high (feet) end of frame axis 0
    com = ATLAS.com.copy()
    com[liver, 0] -= 80.0  # observed centre 80 mm headwards: consistent with a cut
    assert "liver" not in _check(com, kinds=kinds).disagreeing
    com[liver, 0] += 160.0  # 80 mm feetwards of the atlas centre: a cut cannot explain that
    assert "liver" in _check(com, kinds=kinds).disagreeing
