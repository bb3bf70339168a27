"""Regions: JSON files, atlas boxes -> voxel boxes through the affines, crops, paste-back, learning."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas, make_atlas
from dicomnode.anatomy.register import Registration, register
from dicomnode.anatomy.regions import (
    Region, box_voxels_inside, crop_region, learn_region, load_regions, paste_back, region_boxes, save_region,
)
from dicomnode.errors import SeriesError
from dicomnode.infer.models import Prediction
from dicomnode.volume import Volume
from tests.conftest import ROOT

REQUIRED = ("liver", "spleen", "kidneys", "urinary_bladder", "lungs", "heart", "brain", "spine")


def _axial(shape, spacing=3.0, origin=(0.0, 0.0, 0.0)) -> Volume:
    """Axial grid, slices head -> feet (LPS z decreasing), rows posterior, columns left."""
    aff = np.eye(4)
    aff[:3, 0] = (0, 0, -spacing)
    aff[:3, 1] = (0, spacing, 0)
    aff[:3, 2] = (spacing, 0, 0)
    aff[:3, 3] = origin
    return Volume(np.zeros(shape, np.int16), aff)


def test_shipped_regions_load_and_are_sane():
    regions = load_regions(ROOT / "config" / "regions")
    for name in REQUIRED:
        assert name in regions, name
        r = regions[name]
        b = r.array(with_margin=False)
        assert np.all(b[:, 1] > b[:, 0]) and r.margin_mm >= 10.0
        assert np.allclose(r.array(True)[:, 0], b[:, 0] - r.margin_mm)
    # anatomical placement along the feet axis: brain < heart < liver < bladder; kidneys = two boxes L/R
    c = {n: regions[n].array(False)[:, :, 0].mean() for n in REQUIRED}
    assert c["brain"] < c["heart"] < c["liver"] < c["urinary_bladder"]
    k = regions["kidneys"].array(False)
    assert len(k) == 2 and np.sign(k[0, :, 2].mean()) != np.sign(k[1, :, 2].mean())


def test_region_json_roundtrip(tmp_path):
    r = Region("thing", (((0.0, 1.0, 2.0), (10.0, 11.0, 12.0)),), margin_mm=15.0, threshold=0.02, learned_from="x")
    p = save_region(r, tmp_path)
    assert load_regions(tmp_path)["thing"] == r
    bad = json.loads(p.read_text())
    bad["boxes_mm"] = [[[0, 0, 0], [-1, 1, 1]]]
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        load_regions(tmp_path)


def test_box_maps_through_the_affine_exactly():
    """Identity-like registration: atlas mm = frame mm - centre; the voxel box is computed by hand."""
    vol = _axial((40, 50, 60))
    centre = vol.index_to_lps(np.array([[19.5, 24.5, 29.5]]))[0]
    reg = Registration(0, False, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0, True, "", centre=tuple(centre))
    region = Region("r", (((-15.0, -30.0, 0.0), (15.0, 0.0, 30.0)),), margin_mm=0.0)
    (lo, hi), = region_boxes(vol, reg, region)
    # frame axes == array axes here at 3 mm: index = centre index + atlas/3, so the box edges fall on
    # indices 14.5..24.5, 14.5..24.5, 29.5..39.5 = voxel borders; every voxel touching the box is kept
    assert lo.tolist() == [14, 14, 29]
    assert hi.tolist() == [26, 26, 41]
    # a box edge inside a voxel keeps that voxel and no more
    region2 = Region("r", (((-14.0, -30.0, 1.0), (14.0, 0.0, 29.0)),), margin_mm=0.0)
    (lo2, hi2), = region_boxes(vol, reg, region2)
    assert lo2.tolist() == [15, 14, 30] and hi2.tolist() == [25, 26, 40]


def test_crop_at_finer_resolution_covers_the_same_mm():
    coarse = _axial((40, 50, 60), spacing=3.0)
    fine = _axial((120, 150, 180), spacing=1.0, origin=(-1.0, -1.0, 1.0))  # same extent, voxel centres at 1 mm
    centre = coarse.index_to_lps(np.array([[19.5, 24.5, 29.5]]))[0]
    reg = Registration(1, False, (1.1, 0.9, 1.0), (5.0, -3.0, 2.0), 0.0, True, "", centre=tuple(centre))
    region = Region("r", (((-20.0, -25.0, -10.0), (30.0, 15.0, 40.0)),), margin_mm=10.0)
    c3 = crop_region(coarse, reg, region, coarse)
    c1 = crop_region(fine, reg, region, coarse)
    lo3, hi3 = c3.volume.index_to_lps(np.zeros((1, 3)))[0], c3.volume.index_to_lps(np.array([c3.volume.shape]) - 1)[0]
    lo1, hi1 = c1.volume.index_to_lps(np.zeros((1, 3)))[0], c1.volume.index_to_lps(np.array([c1.volume.shape]) - 1)[0]
    assert np.all(np.abs(lo3 - lo1) <= 3.0) and np.all(np.abs(hi3 - hi1) <= 3.0)
    # every atlas-box corner lies inside the fine crop (conservative rounding)
    corners = np.array([[a, b, c] for a in (-30.0, 40.0) for b in (-35.0, 25.0) for c in (-20.0, 50.0)])
    idx = c1.volume.lps_to_index(reg.to_scan(corners))
    assert np.all(idx >= -0.5 - 1e-6) and np.all(idx <= np.asarray(c1.volume.shape) - 0.5 + 1e-6)


def test_region_outside_the_image_raises():
    vol = _axial((10, 10, 10))
    reg = Registration(0, False, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0, True, "", centre=(0.0, 0.0, 0.0))
    with pytest.raises(SeriesError) as err:
        crop_region(vol, reg, Region("far", (((500.0, 500.0, 500.0), (600.0, 600.0, 600.0)),)), vol)
    assert err.value.reason == "region_outside_image"


def test_paste_back_exact_and_resampled():
    full = _axial((20, 30, 40), spacing=2.0).with_array(np.arange(24000, dtype=np.int32).reshape(20, 30, 40))
    crop = full.crop((3, 4, 5), (13, 24, 35))
    pred = crop.with_array((np.asarray(crop.array) % 7).astype(np.int16))
    back = paste_back(pred, full)
    assert back.same_grid(full) and back.array.dtype == np.int16
    assert np.array_equal(back.array[3:13, 4:24, 5:35], pred.array)
    assert np.count_nonzero(back.array) == np.count_nonzero(pred.array)
    # Prediction in, Prediction out
    from dicomnode.infer.models import ModelManifest

    manifest = ModelManifest.__new__(ModelManifest)
    p = Prediction(labels=pred, manifest=manifest, probabilities=np.zeros((2,) + pred.shape))
    out = paste_back(p, full)
    assert isinstance(out, Prediction) and out.probabilities is None and out.labels.same_grid(full)
    # a prediction on a different (2x coarser) grid is resampled by nearest neighbour
    coarse_aff = crop.affine.copy()
    coarse_aff[:3, :3] *= 2
    coarse = Volume(np.ones((5, 10, 15), np.int16), coarse_aff)
    back2 = paste_back(coarse, full)
    assert back2.same_grid(full) and 0 < np.count_nonzero(back2.array) <= 10 * 20 * 30


def test_box_voxels_inside():
    m = np.zeros((10, 10, 10), bool)
    m[2:6, 2:6, 2:6] = True
    assert box_voxels_inside(m, (0, 0, 0), (10, 10, 10)) == 1.0
    assert box_voxels_inside(m, (2, 2, 2), (4, 6, 6)) == 0.5


def _blob_atlas():
    shape = (40, 40, 40)
    masks = []
    for c in range(N_CLASSES):
        m = np.zeros(shape, np.float32)
        if c < 4:
            m[5 + 8 * c:11 + 8 * c, 10:30, 5 + 8 * c:12 + 8 * c] = 1.0
        masks.append(m)
    return make_atlas(masks, (3.0, 3.0, 3.0), -(np.asarray(shape) - 1) / 2 * 3.0)


def test_learn_region_components_merge_and_threshold():
    atlas = _blob_atlas()
    grid = _axial((40, 40, 40))
    centre = tuple(grid.index_to_lps(np.array([[19.5, 19.5, 19.5]]))[0])
    ident = Registration(0, False, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0, True, "", centre=centre)
    m1 = np.zeros((40, 40, 40), np.uint8)
    m1[5:10, 5:10, 5:10] = 1  # component A
    m1[25:30, 25:30, 25:30] = 1  # component B, far away
    m2 = np.zeros_like(m1)
    m2[8:12, 8:12, 8:12] = 1  # overlaps A -> merged box
    pairs = [(grid, grid.with_array(m1)), (grid, grid.with_array(m2))]
    region, heat = learn_region(pairs, atlas, "two", registrations=[ident, ident])
    assert len(region.boxes) == 2
    b = region.array(with_margin=False)
    # box A spans voxels 5..11 (inclusive) -> mm edges at (5-0.5)*3 - 58.5 and (11+0.5)*3 - 58.5
    assert np.allclose(b[0, 0], (5 - 0.5) * 3 - 58.5) and np.allclose(b[0, 1], (11 + 0.5) * 3 - 58.5)
    assert heat.max() == 1.0
    # a threshold of 0.5 keeps only voxels in both masks (the A overlap 8..9)
    region_t, _ = learn_region(pairs, atlas, "two", threshold=0.5, registrations=[ident, ident])
    bt = region_t.array(with_margin=False)
    assert len(bt) == 1 and np.allclose(bt[0, 0], (8 - 0.5) * 3 - 58.5) and np.allclose(bt[0, 1], (9 + 0.5) * 3 - 58.5)
    with pytest.raises(ValueError):
        learn_region(pairs, atlas, "none", threshold=1.0, registrations=[ident, ident])


def test_learned_liver_from_phantoms_contains_a_held_out_phantom_liver():
    from inference.phantom import generate_phantom

    atlas = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
    liver = CLASS_INDEX["liver"]
    pairs = []
    for seed in (3001, 3002, 3003, 3004):
        lab, aff = generate_phantom(seed)
        v = Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff)
        pairs.append((v, v.with_array((lab == liver).astype(np.uint8))))
    region, _ = learn_region(pairs, atlas, "liver")
    lab, aff = generate_phantom(3010)
    test = Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff)
    crop = crop_region(test, register(test, atlas), region, test)
    assert box_voxels_inside(lab == liver, crop.lower, crop.upper) >= 0.99
