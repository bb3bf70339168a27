"""Interoperability: the real SEG written by dcmqi (QIICR/dcmqi test data, liver on 3 GE CT slices)
is read correctly by the node's own SEG reader and matches dcmqi's NRRD of the same mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from dicomnode.results.reading import read_seg
from dicomnode.volume import Volume, resample


def _nrrd_volume(path: Path) -> Volume:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    sp = np.asarray(img.GetSpacing(), float)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = d[:, 2] * sp[2], d[:, 1] * sp[1], d[:, 0] * sp[0]
    aff[:3, 3] = img.GetOrigin()
    return Volume(array=sitk.GetArrayFromImage(img), affine=aff)


def test_dcmqi_liver_seg_matches_its_nrrd(shared_data: Path) -> None:
    folder = shared_data / "dcmqi_seg"
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((folder / "ct-3slice").glob("*.dcm"))]
    seg = pydicom.dcmread(folder / "liver.dcm")
    reading = read_seg(seg, sources)
    assert [s.number for s in reading.segments] == [1]
    liver = reading.segments[0]
    assert liver.label == "Liver" and liver.type is not None and liver.type.meaning == "Liver"
    assert reading.grid.shape == (3, 512, 512)
    mask = reading.mask(1)
    nrrd = _nrrd_volume(folder / "liver_seg.nrrd")
    expected = np.asarray(resample(nrrd, reading.grid.affine, reading.grid.shape, order=0).array) > 0
    assert mask.sum() == int((np.asarray(nrrd.array) > 0).sum())  # nothing lost outside the grid
    assert mask.any() and np.array_equal(mask, expected)
    # every frame references the source slice it lies on (the reader cross-checks position and UID)
    by_slice = [s.sop_instance_uid for s in reading.grid.source]
    for item, k in zip(seg.PerFrameFunctionalGroupsSequence, reading.frame_slices):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == by_slice[k]


def test_reader_refuses_wrong_source(shared_data: Path) -> None:
    import pytest

    folder = shared_data / "dcmqi_seg"
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((folder / "ct-3slice").glob("*.dcm"))]
    seg = pydicom.dcmread(folder / "liver.dcm")
    for ds in sources:  # shift the source stack by 0.4 mm: frames no longer lie on its slices
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.4]
    with pytest.raises(ValueError, match="position"):
        read_seg(seg, sources)
