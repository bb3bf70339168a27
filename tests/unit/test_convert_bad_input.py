"""A corpus of broken series: each one is refused with a precise SeriesError reason, no patient data."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series.convert import load_input, read_series, read_series_dir
from tests.unit.test_convert_synth import make_stack

CANARY = "Canary^Convert"


def _edit(index: int | None, fn: Callable[[pydicom.Dataset], None]) -> Callable[[list[Path]], None]:
    """Apply ``fn`` to file ``index`` (every file when None)."""

    def mutate(paths: list[Path]) -> None:
        for i, p in enumerate(paths):
            if index is None or i == index:
                ds = pydicom.dcmread(p)
                fn(ds)
                ds.save_as(p)

    return mutate


def _delete(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    def fn(ds: pydicom.Dataset) -> None:
        for kw in keywords:
            if kw in ds:
                delattr(ds, kw)
    return fn


def _set(**values: object) -> Callable[[pydicom.Dataset], None]:
    def fn(ds: pydicom.Dataset) -> None:
        for kw, v in values.items():
            setattr(ds, kw, v)
    return fn


def _resize(ds: pydicom.Dataset) -> None:
    ds.Rows, ds.Columns = 20, 18
    ds.PixelData = np.zeros((20, 18), np.uint16).tobytes()


def _truncate_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _rgb(ds: pydicom.Dataset) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()


def _bad_rle(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"garbage" * 3])
    ds["PixelData"].VR = "OB"


def _cut_file(paths: list[Path]) -> None:
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 1000])


def _text_file(paths: list[Path]) -> None:
    paths[0].write_text("this is not DICOM\n" * 50)


def _unknown_syntax(paths: list[Path]) -> None:
    data = paths[0].read_bytes()  # same length UID, so the file stays well-formed
    paths[0].write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.9\x00", 1))


def _sr(ds: pydicom.Dataset) -> None:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    del ds.PixelData


CORPUS: list[tuple[str, Callable[[list[Path]], None], str]] = [
    ("missing pixel data", _edit(2, _delete("PixelData")), "missing_pixel_data"),
    ("non-image instance in the series", _edit(0, _sr), "missing_pixel_data"),
    ("inconsistent rows/columns", _edit(1, _resize), "inconsistent_dimensions"),
    ("inconsistent pixel spacing", _edit(1, _set(PixelSpacing=[0.5, 0.5])), "inconsistent_dimensions"),
    ("mixed modalities", _edit(3, _set(Modality="MR")), "mixed_modalities"),
    ("mixed series", _edit(3, _set(SeriesInstanceUID=generate_uid())), "mixed_series"),
    ("mixed frame of reference", _edit(0, _set(FrameOfReferenceUID=generate_uid())), "mixed_frame_of_reference"),
    ("missing position", _edit(2, _delete("ImagePositionPatient")), "missing_position"),
    ("position with two values", _edit(2, _set(ImagePositionPatient=[1.0, 2.0])), "missing_position"),
    ("non-numeric position", _edit(2, _set(ImagePositionPatient=["1", "nan", "3"])), "missing_position"),
    ("missing orientation", _edit(0, _delete("ImageOrientationPatient")), "missing_orientation"),
    ("non-orthogonal orientation", _edit(None, _set(ImageOrientationPatient=[1, 0, 0, 0.5, 0.5, 0])), "invalid_orientation"),
    ("missing pixel spacing", _edit(None, _delete("PixelSpacing")), "missing_pixel_spacing"),
    ("zero pixel spacing", _edit(None, _set(PixelSpacing=[0, 0.7])), "invalid_pixel_spacing"),
    ("zero rescale slope", _edit(1, _set(RescaleSlope=0)), "invalid_rescale"),
    ("truncated pixel data element", _edit(1, _truncate_pixels), "truncated_pixel_data"),
    ("truncated file", _cut_file, "truncated_pixel_data"),
    ("large declared dimensions", _edit(0, _set(Rows=8000, Columns=8000)), "truncated_pixel_data"),
    ("huge declared dimensions", _edit(0, _set(Rows=60000, Columns=60000)), "invalid_dimensions"),
    ("zero rows", _edit(0, _set(Rows=0)), "invalid_dimensions"),
    ("colour image", _edit(None, _rgb), "unsupported_photometric"),
    ("1-bit pixels", _edit(None, _set(BitsAllocated=1)), "unsupported_pixel_format"),
    ("mixed bit depth", _edit(0, _set(BitsStored=12, HighBit=11, PixelRepresentation=1)), "inconsistent_pixel_format"),
    ("unsupported transfer syntax", _unknown_syntax, "unsupported_transfer_syntax"),
    ("corrupt RLE stream", _edit(2, _bad_rle), "decode_failed"),
    ("not a DICOM file", _text_file, "unreadable_file"),
    ("same position, different instance", _edit(3, _set(ImagePositionPatient=[-90.0, -110.5, 30.25])), "duplicate_positions"),
    ("gap", lambda paths: paths.pop(2).unlink(), "gap"),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_series_is_refused_with_a_reason(tmp_path: Path, name: str, mutate: Callable, reason: str) -> None:
    st = make_stack(tmp_path, n=5)
    _edit(None, _set(PatientName=CANARY, PatientID="CANARY-ID-42"))(st.paths)
    paths = list(st.paths)
    mutate(paths)
    with pytest.raises(SeriesError) as exc:
        read_series_dir(tmp_path)
    assert exc.value.reason == reason, f"{name}: {exc.value}"
    assert exc.value.kind in ("geometry", "unsupported", "inconsistent")
    text = str(exc.value)
    assert "Canary" not in text and "CANARY" not in text and "1.2.826" not in text and "2.25." not in text


def test_empty_folder_and_empty_list(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="empty_series"):
        read_series_dir(tmp_path)
    with pytest.raises(SeriesError, match="empty_series"):
        read_series([])
    with pytest.raises(SeriesError, match="empty_series"):
        read_series_dir(tmp_path / "absent")


def test_too_many_voxels_refused_before_allocation(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=3)
    with pytest.raises(SeriesError, match="too_large"):
        read_series(st.paths, GeometryConfig(max_voxels=1000))


def test_nifti_that_is_not_3d_or_not_nifti(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(SeriesError, match="not_3d"):
        load_input(tmp_path / "t.nii.gz")
    (tmp_path / "b.nii.gz").write_bytes(b"garbage" * 40)
    with pytest.raises(SeriesError, match="unreadable_file"):
        load_input(tmp_path / "b.nii.gz")
    with pytest.raises(SeriesError, match="unreadable_file"):
        load_input(tmp_path / "absent.nii")


def test_far_away_slice_is_refused_before_any_allocation(tmp_path: Path) -> None:
    # one position a kilometre away must not turn "resample the gap" into a 500000-slice grid
    st = make_stack(tmp_path, n=4)
    _edit(3, _set(ImagePositionPatient=[-90.0, -110.5, 1e6]))(st.paths)
    for policy in (GeometryConfig(on_gap="resample"), GeometryConfig(on_gap="resample", on_nonuniform="resample")):
        with pytest.raises(SeriesError) as exc:
            read_series(st.paths, policy)
        assert exc.value.reason in ("gap", "nonuniform") and "slices for 4 acquired" in exc.value.detail
