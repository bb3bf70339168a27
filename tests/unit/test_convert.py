"""series.convert on generated series: voxels, affines, stack splitting, policies, NIfTI, CLI."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicomnode.cli import main
from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series.convert import (
    SUPPORTED_TRANSFER_SYNTAXES, load_input, read_headers, read_series, read_series_dir, read_stacks, write_nifti,
)
from dicomnode.volume import to_source_grid
from dicomnode.series.geometry import to_canonical
from tests.unit.test_convert_synth import CORONAL, NATIVE, SAGITTAL, make_stack, orientation_from, rotation

RESAMPLE_GAPS = GeometryConfig(on_gap="resample")


def _check(vol, st) -> None:
    assert np.array_equal(vol.array, st.expected)
    assert np.allclose(vol.affine, st.expected_affine(), atol=1e-3)


@pytest.mark.parametrize("syntax", NATIVE)
def test_regular_axial_stack_every_native_syntax(tmp_path: Path, syntax: str) -> None:
    st = make_stack(tmp_path, syntax=syntax, signed=True, intercept=-1024)
    vol = read_series_dir(tmp_path)
    _check(vol, st)
    assert vol.array.dtype == np.int16
    assert vol.geometry.acquisition_plane == "axial" and vol.geometry.n_slices == 6
    assert [f.sop_instance_uid for f in vol.source] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in st.paths]
    assert syntax in SUPPORTED_TRANSFER_SYNTAXES


def test_shuffled_files_are_sorted_along_the_normal_not_by_instance_number(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=7, order=[3, 0, 6, 2, 5, 1, 4], orientation=CORONAL)
    for p in st.paths:  # lying instance numbers must not matter
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 1
        ds.save_as(p)
    vol = read_series(st.paths)
    _check(vol, st)
    assert "sorted:by_position" in vol.geometry.actions
    assert vol.geometry.acquisition_plane == "coronal"


@pytest.mark.parametrize("angles", [(0.3, -0.2, 0.5), (1.2, 0.4, -2.0), (0.0, np.pi / 2, 0.0)])
def test_oblique_non_square_pixels(tmp_path: Path, angles: tuple[float, float, float]) -> None:
    ori = orientation_from(rotation(angles))
    st = make_stack(tmp_path, orientation=ori, pixel_spacing=(0.55, 1.35), slice_spacing=3.3)
    vol = read_series_dir(tmp_path)
    _check(vol, st)
    assert vol.geometry.non_square_pixels
    assert vol.geometry.spacing == pytest.approx((3.3, 0.55, 1.35), abs=1e-4)


def test_sagittal_plane_and_its_canonical_nifti(tmp_path: Path) -> None:
    st = make_stack(tmp_path / "s", orientation=SAGITTAL)
    vol = read_series_dir(tmp_path / "s")
    _check(vol, st)
    assert vol.geometry.acquisition_plane == "sagittal" and not vol.geometry.oblique
    can, _ = to_canonical(vol)  # a non-contiguous view: written all the same
    write_nifti(can, tmp_path / "c.nii")
    img = nib.load(tmp_path / "c.nii")
    assert np.array_equal(np.asanyarray(img.dataobj), can.array.transpose(2, 1, 0))
    assert np.allclose(img.affine, can.nifti_affine())
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # i to the left, j posterior, k superior


def test_gap_is_refused_by_default_and_resampled_on_request(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=6, depths=[0, 2, 4, 8, 10, 12])  # one slice missing
    with pytest.raises(SeriesError) as exc:
        read_series(st.paths)
    assert exc.value.reason == "gap" and exc.value.kind == "geometry"
    vol = read_series(st.paths, RESAMPLE_GAPS)
    assert vol.shape[0] == 7 and vol.geometry.gaps == 1 and "resampled:gap" in vol.geometry.actions
    assert np.allclose(vol.array[[0, 1, 2, 4, 5, 6]], st.expected)
    assert np.allclose(vol.array[3], (st.expected[2] + st.expected[3]) / 2)
    assert len(vol.source) == 6 and vol.source_shape == (6, 40, 36)


def test_nonuniform_spacing_resampled_and_labels_map_back_per_slice(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=5, depths=[0, 2, 4.5, 6.5, 8.5])
    vol = read_series(st.paths)
    g = vol.geometry
    assert not g.slice_spacing_uniform and g.gaps == 0 and "resampled:nonuniform" in g.actions
    assert g.slice_spacing_min == pytest.approx(2.0) and g.slice_spacing_max == pytest.approx(2.5)
    with pytest.raises(SeriesError, match="nonuniform"):
        read_series(st.paths, GeometryConfig(on_nonuniform="refuse"))
    # a label painted on the resampled grid lands on the source slice nearest to it
    labels = np.zeros(vol.shape, np.uint8)
    labels[2] = 1  # depth 4.0 mm (spacing 2.0): nearest source slice is depth 4.5
    back = to_source_grid(vol.with_array(labels))
    assert back.shape == (5, 40, 36)
    assert [int(back.array[k].max()) for k in range(5)] == [0, 0, 1, 0, 0]


def test_tilted_stack_resampled_exactly_for_linear_data(tmp_path: Path) -> None:
    n, rows, cols, ps, sp = 8, 40, 36, (0.8, 0.8), 2.0
    shear = (0.0, 0.35)  # 0.35 mm per slice along the column cosine: ~10 degrees of gantry tilt
    # stored value = linear function of the patient position, so linear resampling is exact
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    vals = np.stack([np.rint(10 * (r * ps[0] + k * shear[1]) + 3 * c * ps[1] + 5 * k * sp) for k in range(n)])
    st = make_stack(tmp_path, n=n, rows=rows, cols=cols, pixel_spacing=ps, slice_spacing=sp, shear=shear,
                    values=vals.astype(np.int64), intercept=0)
    with pytest.raises(SeriesError, match="tilt"):
        read_series(st.paths, GeometryConfig(on_tilt="refuse"))
    vol = read_series(st.paths)
    g = vol.geometry
    assert g.tilt_deg == pytest.approx(np.degrees(np.arctan(0.35 / 2.0)), abs=0.01)
    assert "resampled:tilt" in g.actions
    d = vol.direction
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)  # the output grid is orthogonal
    # compare interior voxels with the linear function at their patient position
    idx = np.argwhere(np.ones(vol.shape, bool))
    lps = vol.index_to_lps(idx)
    o = st.positions[0]
    rel = lps - o
    y = rel @ np.array([0, 1.0, 0])  # column cosine axis (rows)
    x = rel @ np.array([1.0, 0, 0])
    z = rel @ np.array([0, 0, 1.0])
    truth = 10 * y + 3 * x + 5 * z
    inside = (y > 4 + 3) & (y < (rows - 4) * ps[0] - 3)
    got = vol.array.reshape(-1)
    assert np.max(np.abs(got[inside] - truth[inside])) < 1.0
    # sheared source grid: labels map back onto the acquired slices
    assert not np.allclose(vol.source_affine, vol.affine)
    back = to_source_grid(vol.with_array((vol.array > np.median(vol.array)).astype(np.uint8)))
    assert back.shape == (n, rows, cols)


def test_enhanced_multiframe_with_shuffled_frames(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=6, enhanced=True, order=[5, 1, 3, 0, 2, 4], signed=True, intercept=-1000)
    vol = read_series(st.paths)
    _check(vol, st)
    assert [f.frame for f in vol.source] == [4, 2, 5, 3, 6, 1]
    assert len(read_headers(st.paths)) == 1


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"])
def test_enhanced_multiframe_compressed(tmp_path: Path, syntax: str) -> None:
    st = make_stack(tmp_path, n=4, enhanced=True, syntax=syntax, order=[2, 0, 3, 1])
    _check(read_series(st.paths), st)


def test_two_acquisitions_at_the_same_positions_are_two_stacks(tmp_path: Path) -> None:
    a = make_stack(tmp_path / "a", n=5, seed=1)
    b = make_stack(tmp_path / "b", n=4, seed=2)
    for i, p in enumerate(b.paths):  # phase 2 of the same series
        ds = pydicom.dcmread(p)
        ref = pydicom.dcmread(a.paths[0])
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.StudyInstanceUID = (
            ref.SeriesInstanceUID, ref.FrameOfReferenceUID, ref.StudyInstanceUID)
        ds.AcquisitionNumber = 2
        ds.save_as(p)
    for p in a.paths:
        ds = pydicom.dcmread(p)
        ds.AcquisitionNumber = 1
        ds.save_as(p)
    paths = a.paths + b.paths
    with pytest.raises(SeriesError) as exc:
        read_series(paths)
    assert exc.value.reason == "multiple_stacks" and "2 stacks" in exc.value.detail
    stacks = read_stacks(paths)
    assert [s.shape[0] for s in stacks] == [5, 4] and all(s.geometry.n_stacks == 2 for s in stacks)
    _check(stacks[0], a)
    _check(stacks[1], b)
    largest = read_series(paths, GeometryConfig(multiple_stacks="largest"))
    _check(largest, a)
    assert any(w.startswith("other_stacks_not_used") for w in largest.geometry.warnings)


def test_echoes_and_orientations_split_into_stacks(tmp_path: Path) -> None:
    a = make_stack(tmp_path / "a", n=3, modality="MR", intercept=0)
    ref = pydicom.dcmread(a.paths[0])
    for k, p in enumerate(list(a.paths)):
        ds = pydicom.dcmread(p)
        ds.EchoNumbers = 1
        ds.save_as(p)
        ds.EchoNumbers, ds.SOPInstanceUID = 2, pydicom.uid.generate_uid()
        ds.save_as(tmp_path / "a" / f"echo2_{k}.dcm")
    s = make_stack(tmp_path / "s", n=2, modality="MR", orientation=SAGITTAL, intercept=0)
    for p in s.paths:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = ref.SeriesInstanceUID, ref.FrameOfReferenceUID
        ds.save_as(p)
    stacks = read_stacks(sorted(tmp_path.rglob("*.dcm")))
    assert sorted(st.geometry.acquisition_plane for st in stacks) == ["axial", "axial", "sagittal"]
    assert all(st.array.dtype == np.uint16 for st in stacks)  # MR without rescale stays as stored


def test_same_instance_twice_is_one_slice_but_a_different_one_is_refused(tmp_path: Path) -> None:
    st = make_stack(tmp_path / "s", n=4)
    shutil.copy(st.paths[2], tmp_path / "s" / "copy.dcm")
    vol = read_series_dir(tmp_path / "s")
    _check(vol, st)
    ds = pydicom.dcmread(st.paths[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "s" / "other.dcm")
    with pytest.raises(SeriesError) as exc:
        read_series_dir(tmp_path / "s")
    assert exc.value.reason == "duplicate_positions"


def test_rescale_to_float_and_to_int16(tmp_path: Path) -> None:
    st = make_stack(tmp_path / "f", slope=0.5, intercept=-1000.25)
    vol = read_series(st.paths)
    assert vol.array.dtype == np.float32 and np.allclose(vol.array, st.expected, atol=1e-3)
    st = make_stack(tmp_path / "u", signed=False, intercept=-1024)  # unsigned stored, HU out
    vol = read_series(st.paths)
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, st.expected)


def test_high_bits_above_bits_stored_are_ignored(tmp_path: Path) -> None:
    vals = np.full((3, 40, 36), 100, np.int64)
    vals[:, 0, 0] = -5
    st = make_stack(tmp_path, n=3, values=vals, signed=True, bits_stored=12, intercept=0)
    for p in st.paths:  # plant garbage above bit 11 (sign-extended values must survive)
        ds = pydicom.dcmread(p)
        arr = np.frombuffer(ds.PixelData, np.int16).copy()
        arr[arr >= 0] |= np.int16(0x3000)
        ds.PixelData = arr.tobytes()
        ds.save_as(p)
    assert np.array_equal(read_series(st.paths).array, st.expected)


def test_nifti_round_trip_and_ras_affine(tmp_path: Path) -> None:
    st = make_stack(tmp_path / "s", orientation=orientation_from(rotation((0.2, 0.1, -0.4))), pixel_spacing=(0.6, 0.9))
    vol = read_series_dir(tmp_path / "s")
    _check(vol, st)
    out = tmp_path / "v.nii.gz"
    write_nifti(vol, out)
    img = nib.load(out)
    assert np.array_equal(np.asanyarray(img.dataobj), vol.array.transpose(2, 1, 0))
    # voxel (i=col, j=row, k=slice) of the NIfTI sits at the RAS position of the same DICOM voxel
    ijk = np.array([3, 5, 2, 1.0])
    ras = img.affine @ ijk
    lps = vol.index_to_lps([[2, 5, 3]])[0]
    assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    back = load_input(out, modality="CT")
    assert back.source == () and back.modality == "CT"
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-4)
    assert back.geometry.spacing == pytest.approx(vol.geometry.spacing, abs=1e-4)


def test_convert_command_writes_nifti_and_report(tmp_path: Path) -> None:
    make_stack(tmp_path / "s", n=4)
    assert main(["convert", str(tmp_path / "s"), str(tmp_path / "o.nii.gz"), "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["shape"] == [4, 40, 36] and rep["geometry"]["acquisition_plane"] == "axial"
    assert nib.load(tmp_path / "o.nii.gz").shape == (36, 40, 4)
    make_stack(tmp_path / "g", n=4, depths=[0, 1, 2, 5])
    assert main(["convert", str(tmp_path / "g"), str(tmp_path / "g.nii.gz"), "--report", str(tmp_path / "g.json")]) == 1
    assert json.loads((tmp_path / "g.json").read_text())["error"]["reason"] == "gap"
    assert not (tmp_path / "g.nii.gz").exists()
    make_stack(tmp_path / "sag", n=3, orientation=SAGITTAL)
    assert main(["convert", str(tmp_path / "sag"), str(tmp_path / "sag.nii"), "--canonical"]) == 0
    assert nib.aff2axcodes(nib.load(tmp_path / "sag.nii").affine) == ("L", "P", "S")
    assert main(["convert", str(tmp_path / "sag"), str(tmp_path / "sag.nii")]) == 0
    assert nib.aff2axcodes(nib.load(tmp_path / "sag.nii").affine) != ("L", "P", "S")


def test_single_slice(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=1, slice_spacing=5.0)
    vol = read_series(st.paths)
    assert vol.shape == (1, 40, 36) and vol.spacing[0] == pytest.approx(5.0)
    assert "single_slice" in vol.geometry.warnings
    assert dataclasses.asdict(vol.geometry)["n_slices"] == 1


def test_enhanced_mr_echoes_are_separate_stacks(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=6, enhanced=True, modality="MR", intercept=0, depths=[0, 2, 4, 0, 2, 4])
    with pytest.raises(SeriesError, match="duplicate_positions"):  # same positions, nothing tells them apart
        read_series(st.paths)
    ds = pydicom.dcmread(st.paths[0])
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        echo = pydicom.Dataset()
        echo.EffectiveEchoTime = 10.0 if i < 3 else 20.0
        fg.MREchoSequence = pydicom.Sequence([echo])
    ds.save_as(st.paths[0])
    with pytest.raises(SeriesError, match="multiple_stacks"):
        read_series(st.paths)
    stacks = read_stacks(st.paths)
    assert len(stacks) == 2 and all(s.shape == (3, 40, 36) for s in stacks)
    got = sorted((s.array for s in stacks), key=lambda a: int(a[0, 0, 1]))
    assert np.array_equal(got[0], st.expected[:3]) and np.array_equal(got[1], st.expected[3:])


def test_oblique_gap_resampled_keeps_the_acquired_slices_exactly(tmp_path: Path) -> None:
    # regression (found by the nightly Hypothesis run): rounding noise in the positions of an oblique
    # stack must not become sub-pixel in-plane shifts that pull the edge voxels towards the fill value
    depths = [2.0 * i for i in range(8) if i != 2]
    st = make_stack(tmp_path, n=7, rows=8, cols=8, depths=depths,
                    orientation=orientation_from(rotation((0.6338077588594171, 0.0, 2.744140625))))
    vol = read_series(st.paths, RESAMPLE_GAPS)
    assert vol.shape[0] == 8 and vol.geometry.gaps == 1
    assert np.allclose(vol.array[[0, 1, 3, 4, 5, 6, 7]], st.expected, atol=1e-3)


@pytest.mark.parametrize("seed", range(12))
def test_nifti_header_matches_nibabel(tmp_path: Path, seed: int) -> None:
    """The hand-written header has the fields nibabel writes for the same affine (qform quaternion too)."""
    from dicomnode.series.convert import _nifti_header
    from dicomnode.volume import Volume

    rng = np.random.default_rng(seed)
    rot = rotation(rng.uniform(-np.pi, np.pi, 3))
    if seed % 2:
        rot[:, 1] *= -1  # left-handed index axes (qfac -1)
    aff = np.eye(4)
    aff[:3, :3] = rot * rng.uniform(0.3, 3.0, 3)
    aff[:3, 3] = rng.uniform(-300, 300, 3)
    dtype = [np.int16, np.uint16, np.float32, np.uint8, np.int32, np.bool_][seed % 6]
    vol = Volume(array=np.zeros((3, 4, 5), dtype), affine=aff)
    write_nifti(vol, tmp_path / "a.nii")
    ours = nib.load(tmp_path / "a.nii").header
    ref = nib.Nifti1Header()
    ref.set_data_dtype(np.uint8 if dtype is np.bool_ else dtype)
    ref.set_data_shape((5, 4, 3))
    ref.set_sform(vol.nifti_affine(), code=1)
    ref.set_qform(vol.nifti_affine(), code=1)
    ref.set_xyzt_units("mm", "sec")
    for key in ("dim", "datatype", "bitpix", "qform_code", "sform_code", "xyzt_units", "vox_offset", "magic"):
        assert np.array_equal(ours[key], ref[key]), key
    for key in ("pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                "srow_x", "srow_y", "srow_z"):
        assert np.allclose(ours[key], ref[key], atol=1e-5), key
    assert np.allclose(ours.get_qform(), vol.nifti_affine(), atol=1e-4)
    assert len(_nifti_header((5, 4, 3), np.dtype(np.int16), aff)) == 352
