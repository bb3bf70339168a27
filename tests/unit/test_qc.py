"""QC of the anatomy segmentation: residual, volumes against the atlas, left/right, vertebral order."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.anatomy import qc
from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas
from dicomnode.anatomy.register import register
from dicomnode.volume import Volume
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def atlas():
    return load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")


@pytest.fixture(scope="module")
def phantom() -> Volume:
    from inference.phantom import generate_phantom

    lab, aff = generate_phantom(4040)
    return Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff)


def _relabel(vol: Volume, mapping: dict[int, int]) -> Volume:
    arr = np.asarray(vol.array).copy()
    out = arr.copy()
    for a, b in mapping.items():
        out[arr == a] = b
    return vol.with_array(out)


def test_plausible_phantom_passes_and_serialises(atlas, phantom):
    rep = qc.check(phantom, register(phantom, atlas), atlas)
    assert rep.ok, rep.findings
    assert rep.left_right_consistent and rep.spine_order_consistent and rep.orientation_verified
    assert "liver" in rep.anatomies_found and dict(rep.volume_ratios)["liver"] == pytest.approx(1.0, abs=0.6)
    doc = json.loads(json.dumps(rep.to_json()))
    assert doc["ok"] is True and isinstance(doc["volume_ratios"], dict)
    with pytest.raises(Exception):
        rep.ok = False  # frozen


def test_default_atlas_is_used_when_none_given(phantom, atlas):
    rep = qc.check(phantom, register(phantom, atlas))
    assert rep.ok


def test_swapped_left_right_labels_are_flagged(atlas, phantom):
    L = CLASS_INDEX
    swapped = _relabel(phantom, {L["left_lung"]: L["right_lung"], L["right_lung"]: L["left_lung"],
                                 L["left_kidney"]: L["right_kidney"], L["right_kidney"]: L["left_kidney"]})
    rep = qc.check(swapped, register(swapped, atlas), atlas)
    assert not rep.left_right_consistent and not rep.ok
    assert any("left/right" in f for f in rep.findings)


def test_enlarged_organ_is_flagged(atlas, phantom):
    liver = np.asarray(phantom.array) == CLASS_INDEX["liver"]
    big = ndimage.binary_dilation(liver, iterations=12)
    arr = np.asarray(phantom.array).copy()
    arr[big & (arr == 0)] = CLASS_INDEX["liver"]
    arr[big] = CLASS_INDEX["liver"]
    vol = phantom.with_array(arr)
    rep = qc.check(vol, register(vol, atlas), atlas)
    assert dict(rep.volume_ratios)["liver"] > qc.VOLUME_HIGH
    assert any(f.startswith("liver volume") for f in rep.findings) and not rep.ok


def test_lumbar_labelled_cervical_is_flagged(atlas, phantom):
    """The paper's failure case: lumbar vertebrae segmented as neck vertebrae."""
    L = CLASS_INDEX
    wrong = _relabel(phantom, {L["cervical_vertebrae"]: 0, L["lumbar_vertebrae"]: L["cervical_vertebrae"]})
    rep = qc.check(wrong, register(wrong, atlas), atlas)
    assert not rep.spine_order_consistent and not rep.ok


def test_corrupted_slice_order_splits_organs(atlas, phantom):
    """The paper's MSD-colon corruption: a block of slices stacked in the wrong place."""
    arr = np.asarray(phantom.array)
    liver_z = np.flatnonzero(np.any(arr == CLASS_INDEX["liver"], axis=(1, 2)))
    cut = int(liver_z[len(liver_z) // 2])  # move everything from mid-liver down to the top of the stack
    broken = phantom.with_array(np.ascontiguousarray(np.concatenate([arr[cut:], arr[:cut]])))
    rep = qc.check(broken, register(broken, atlas), atlas)
    assert "liver" in rep.split_anatomies and not rep.ok
    assert not qc.check(phantom, register(phantom, atlas), atlas).split_anatomies
