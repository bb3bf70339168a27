"""The anatomical orientation correction and ``to_source_grid`` agree on every kind of stack.

A series is written as DICOM (regular, reversed slice direction, non-uniformly spaced, both),
read by ``series.convert`` (the only module that knows pixel layouts), put on the canonical grid,
then corrected by ``apply_orientation`` for each of the 8 rotations/flips. Labels computed on the
corrected volume must land on the source frames exactly where

- the same labels computed on the uncorrected volume land (``to_source_grid`` of the canonical
  volume: the path without any correction),
- pasting by hand puts them: every source pixel's header position (ImagePositionPatient,
  ImageOrientationPatient, PixelSpacing of its own file) moved by the correction into true
  coordinates and looked up (nearest) on the corrected grid,
- and, for a stack on one regular grid, the source pixels themselves (the labels are the image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.anatomy.register import Registration, apply_orientation, correction_matrix
from dicomnode.config import GeometryConfig
from dicomnode.series.convert import read_series
from dicomnode.series.geometry import to_canonical
from dicomnode.volume import Volume, to_source_grid
from tests.dicom_synth import make_series, write_series

CONFIGS = [(k, f) for k in range(4) for f in (False, True)]
# steps 2.5 / 3.0 / 3.2 / 2.8 mm: resampled at 2.5 mm, no source slice halfway between two grid slices
NONUNIFORM_DEPTHS = np.array([0.0, 2.5, 5.0, 8.0, 10.5, 13.7, 16.2, 18.7, 21.5])
FEET_FIRST = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal = row x col = -z: slices stored head -> feet


def _series(tmp: Path, kind: str) -> list[Path]:
    n, rows, cols = len(NONUNIFORM_DEPTHS), 12, 14  # non-square: quarter turns swap rows and columns
    pixels = (np.arange(n * rows * cols, dtype=np.int32).reshape(n, rows, cols) - 700).astype(np.int16)
    iop = FEET_FIRST if "reversed" in kind else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    ds = make_series((n, rows, cols), (2.5, 1.0, 1.25), iop=iop, origin=(-7.0, 5.0, 40.0), pixels=pixels)
    if "nonuniform" in kind:
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
        for d, depth in zip(ds, NONUNIFORM_DEPTHS):
            d.ImagePositionPatient = [round(float(v), 4) for v in np.array([-7.0, 5.0, 40.0]) + depth * normal]
    files = write_series(ds, tmp / kind)
    return files[::-1] if "reversed" in kind else files  # file order must not matter either


def _by_hand(files: list[Path], volume: Volume, corrected: Volume, corr: np.ndarray) -> dict[str, np.ndarray]:
    """Labels (``corrected.array``) at every source pixel, per SOP instance UID, computed from the headers."""
    inv = np.linalg.inv(corrected.affine)
    arr = np.asarray(corrected.array)
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        p = np.asarray(ds.ImagePositionPatient, float)
        row_cos, col_cos = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        dr, dc = float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        header = p + r[..., None] * dr * col_cos + c[..., None] * dc * row_cos  # (rows, cols, 3) LPS as stated
        true = header @ corr[:3, :3].T + corr[:3, 3]
        idx = np.floor(true @ inv[:3, :3].T + inv[:3, 3] + 0.5).astype(int)
        inside = np.all((idx >= 0) & (idx < np.asarray(arr.shape)), axis=-1)
        idx = np.clip(idx, 0, np.asarray(arr.shape) - 1)
        out[str(ds.SOPInstanceUID)] = np.where(inside, arr[idx[..., 0], idx[..., 1], idx[..., 2]], 0)
    return out


@pytest.mark.parametrize("kind", ["regular", "reversed", "nonuniform", "reversed_nonuniform"])
def test_corrected_results_land_on_the_source_frames(tmp_path: Path, kind: str) -> None:
    files = _series(tmp_path, kind)
    source = read_series(files, GeometryConfig(on_nonuniform="resample"))
    assert ("resampled:nonuniform" in source.geometry.actions) == ("nonuniform" in kind)
    canonical, _ = to_canonical(source)
    raw = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f).pixel_array for f in files}
    plain = to_source_grid(canonical)  # labels = image, no correction: the reference path
    centre = canonical.index_to_lps((np.asarray(canonical.shape) - 1) / 2.0)[0] + np.array([3.0, -2.0, 1.5])
    for k, flip in CONFIGS:
        reg = Registration(k, flip, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0, True, "test", centre=tuple(centre))
        fixed = apply_orientation(canonical, reg)
        if (k, flip) != (0, False):
            assert fixed.header_transform is not None and "reoriented:anatomy" in fixed.geometry.actions
        if k % 2:
            assert fixed.shape[1:] == canonical.shape[:0:-1]  # rows and columns swapped
        back = to_source_grid(fixed)  # labels computed on the corrected volume (here: its image)
        assert back.source == source.source and back.shape == source.source_shape, (kind, k, flip)
        assert np.allclose(back.affine, source.source_affine, atol=1e-6) and back.header_transform is None
        assert np.array_equal(back.array, plain.array), (kind, k, flip)
        hand = _by_hand(files, source, fixed, correction_matrix(reg))
        for i, frame in enumerate(back.source):
            assert np.array_equal(back.array[i], hand[frame.sop_instance_uid]), (kind, k, flip, i)
            if "nonuniform" not in kind:  # one regular grid: the labels are exactly the source pixels
                assert np.array_equal(back.array[i], raw[frame.sop_instance_uid]), (kind, k, flip, i)


def test_a_crop_of_the_corrected_volume_and_a_second_correction_map_back(tmp_path: Path) -> None:
    """Derived volumes (crops) keep the header transform; corrections compose."""
    source = read_series(_series(tmp_path, "reversed_nonuniform"), GeometryConfig(on_nonuniform="resample"))
    canonical, _ = to_canonical(source)
    centre = tuple(canonical.index_to_lps((np.asarray(canonical.shape) - 1) / 2.0)[0])
    once = apply_orientation(canonical, Registration(1, True, (1.0,) * 3, (0.0,) * 3, 0.0, True, "t", centre=centre))
    twice = apply_orientation(once, Registration(3, False, (1.0,) * 3, (0.0,) * 3, 0.0, True, "t", centre=centre))
    plain = np.asarray(to_source_grid(canonical).array)
    assert np.array_equal(to_source_grid(twice).array, plain)
    crop = once.crop((1, 2, 3), (6, 10, 11))
    from dicomnode.volume import resample

    full = resample(crop, once.affine, once.shape, order=0, cval=-5000)  # the crop pasted into the corrected grid
    back = np.asarray(to_source_grid(full, cval=-5000).array)
    hit = back != -5000
    assert hit.any() and np.array_equal(back[hit], plain[hit])
