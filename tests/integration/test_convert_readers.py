"""Differential tests: the node's converter vs SimpleITK's ImageSeriesReader and vs dcm2niix.

Same voxels, affines equal within 1e-3 mm, on the real dcmqi 3-slice CT (../shared/data) and on
generated series (oblique, non-square pixels, shuffled, sagittal, Enhanced multi-frame).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dicomnode.series.convert import read_series_dir, write_nifti
from tests.unit.test_convert_synth import SAGITTAL, make_stack, orientation_from, rotation

pytestmark = pytest.mark.integration
TOL_MM = 1e-3


def _sitk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (slice,row,col), LPS affine) as SimpleITK's ImageSeriesReader reads the folder."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    img = reader.Execute()
    d = np.array(img.GetDirection()).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    aff = np.eye(4)
    aff[:3, 0] = d[:, 2] * sz
    aff[:3, 1] = d[:, 1] * sy
    aff[:3, 2] = d[:, 0] * sx
    aff[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img), aff


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not installed (scripts/setup.sh installs the Debian package)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
                   check=True, capture_output=True, timeout=120)
    files = sorted(out.glob("ref*.nii"))
    assert len(files) == 1, [f.name for f in files]
    return nib.load(files[0])


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj, dtype=np.float64), can.affine


def _compare(folder: Path, tmp: Path, *, sitk_too: bool = True) -> None:
    vol = read_series_dir(folder)
    if sitk_too:
        arr, aff = _sitk(folder)
        assert np.array_equal(vol.array.astype(np.float64), arr.astype(np.float64))
        assert np.allclose(vol.affine, aff, atol=TOL_MM), (vol.affine, aff)
    ours = tmp / "ours.nii"
    write_nifti(vol, ours)
    # SimpleITK reads the node's NIfTI back onto the same LPS grid (its own header reader)
    img = sitk.ReadImage(str(ours))
    assert np.array_equal(sitk.GetArrayFromImage(img), vol.array)
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    assert np.allclose(d[:, ::-1], vol.affine[:3, :3], atol=TOL_MM)
    assert np.allclose(img.GetOrigin(), vol.affine[:3, 3], atol=TOL_MM)
    ref_data, ref_aff = _canonical(_dcm2niix(folder, tmp / "d2n"))
    our_data, our_aff = _canonical(nib.load(ours))
    assert our_data.shape == ref_data.shape
    assert np.allclose(our_aff, ref_aff, atol=TOL_MM), (our_aff, ref_aff)
    assert np.array_equal(our_data, ref_data)


def test_real_ct_3slice_matches_simpleitk_and_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcmqi_seg" / "ct-3slice"
    src = tmp_path / "ct"
    src.mkdir()
    for f in sorted(folder.glob("0*.dcm")):  # the CT slices only (liver.dcm is the SEG)
        (src / f.name).symlink_to(f)
    _compare(src, tmp_path)
    vol = read_series_dir(src)
    assert vol.shape == (3, 512, 512) and vol.modality == "CT" and vol.array.dtype == np.int16
    assert vol.geometry.spacing[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        dict(pixel_spacing=(0.6, 0.9), order=[4, 1, 0, 3, 2]),
        dict(orientation=orientation_from(rotation((0.25, -0.15, 0.35))), pixel_spacing=(0.7, 1.1)),
        dict(orientation=SAGITTAL, slice_spacing=1.5),
        dict(orientation=orientation_from(rotation((0.0, 0.0, 0.4))), signed=True, intercept=-1024),
        dict(syntax="1.2.840.10008.1.2.4.90", order=[2, 3, 0, 1, 4], signed=True),
        dict(syntax="1.2.840.10008.1.2.5", signed=True, intercept=-1024),
        dict(slope=0.5, intercept=-1000.25, order=[1, 0, 4, 3, 2]),
    ],
    ids=["non-square-shuffled", "oblique", "sagittal", "in-plane-rotated", "jpeg2000", "rle", "float-rescale"],
)
def test_generated_series_match_simpleitk_and_dcm2niix(tmp_path: Path, case: dict) -> None:
    make_stack(tmp_path / "s", n=5, **case)
    _compare(tmp_path / "s", tmp_path)


def test_jpeg_ls_matches_simpleitk(tmp_path: Path) -> None:
    # Debian's dcm2niix is built without JPEG-LS ("JP2:OpenJPEG" only), so SimpleITK (GDCM/CharLS) alone
    make_stack(tmp_path / "s", n=4, syntax="1.2.840.10008.1.2.4.80", order=[1, 3, 0, 2], signed=True)
    vol = read_series_dir(tmp_path / "s")
    arr, aff = _sitk(tmp_path / "s")
    assert np.array_equal(vol.array.astype(np.float64), arr.astype(np.float64))
    assert np.allclose(vol.affine, aff, atol=TOL_MM)


def test_enhanced_multiframe_matches_dcm2niix(tmp_path: Path) -> None:
    make_stack(tmp_path / "s", n=5, enhanced=True, order=[3, 0, 4, 2, 1], pixel_spacing=(0.8, 0.6))
    _compare(tmp_path / "s", tmp_path, sitk_too=False)


def test_real_nifti_inputs_keep_their_grid(shared_data: Path, tmp_path: Path) -> None:
    from dicomnode.series.convert import load_input
    from dicomnode.series.geometry import to_canonical

    for name, modality in (("example_ct.nii.gz", "CT"), ("example_mr_sm.nii.gz", "MR")):
        path = shared_data / "totalsegmentator" / name
        img = nib.load(path)
        vol = load_input(path, modality=modality)
        assert vol.modality == modality and vol.source == ()
        assert np.allclose(vol.nifti_affine(), img.affine, atol=1e-5)
        assert np.array_equal(vol.array.transpose(2, 1, 0), np.asanyarray(img.dataobj))
        can, r = to_canonical(vol)
        assert np.allclose(np.abs(can.direction), [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-3)
        write_nifti(can, tmp_path / name)
        back = r.invert(load_input(tmp_path / name, modality=modality))
        assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-4)
