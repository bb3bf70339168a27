"""A real CT (NIfTI, from ../shared/data) written as a DICOM CT Image Storage series with pydicom.

Used by the end-to-end tests and ``benchmarks/e2e.py``: ``nifti_to_dicom(nifti, folder)`` writes
one file per axial slice with correct Image Position/Orientation (Patient) derived from the NIfTI
affine (RAS -> LPS), optionally resampled to a target shape (e.g. 300 x 512 x 512 for the
benchmark). Patient attributes are planted canary values so tests can check nothing leaks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CANARY_NAME = "Canary^E2E"
CANARY_ID = "CANARY-E2E-4411"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, slots=True)
class CtSeries:
    """A written series: its files, UIDs and the LPS affine of its (slice, row, column) grid."""

    folder: Path
    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    affine: np.ndarray  # (slice, row, column) index -> LPS mm
    shape: tuple[int, int, int]


def load_ras(nifti: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data (i, j, k), RAS affine) of a NIfTI file."""
    import nibabel as nib

    img = nib.load(str(nifti))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def resample_ijk(data: np.ndarray, affine: np.ndarray, shape_ijk: tuple[int, int, int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``data`` resampled to ``shape_ijk`` covering the same field of view (voxel-centre aligned)."""
    from scipy import ndimage

    f = np.asarray(shape_ijk, float) / np.asarray(data.shape, float)
    matrix = 1.0 / f
    offset = 0.5 / f - 0.5
    out = ndimage.affine_transform(data.astype(np.float32), matrix, offset=offset, output_shape=shape_ijk,
                                   order=order, mode="nearest", prefilter=False)
    m = np.eye(4)
    m[:3, :3] = np.diag(matrix)
    m[:3, 3] = offset
    return out, affine @ m


@functools.lru_cache(maxsize=2)
def _prepared(nifti: str, shape_ijk: tuple[int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The NIfTI's data and RAS affine, resampled to ``shape_ijk`` (cached: series are written many times)."""
    data, ras = load_ras(Path(nifti))
    if shape_ijk is not None and tuple(shape_ijk) != data.shape:
        data, ras = resample_ijk(data, ras, shape_ijk)
    return data, ras


def _standard_in_plane(data: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip i / j so rows run to the patient's left and columns to posterior (the usual DICOM layout)."""
    for axis in (0, 1):
        d = lps[:3, axis]
        if d[int(np.argmax(np.abs(d)))] < 0:
            n = data.shape[axis]
            data = np.flip(data, axis=axis)
            lps = lps.copy()
            lps[:3, 3] = lps[:3, 3] + d * (n - 1)
            lps[:3, axis] = -d
    return data, lps


def nifti_to_dicom(nifti: Path, folder: Path, *, shape_ijk: tuple[int, int, int] | None = None,
                   series_description: str = "e2e abdomen", body_part: str = "ABDOMEN",
                   study_uid: str | None = None, modality: str = "CT") -> CtSeries:
    """Write ``nifti`` as one DICOM file per k-slice into ``folder``; returns the series facts."""
    data, ras = _prepared(str(nifti), None if shape_ijk is None else tuple(shape_ijk))
    lps = RAS_TO_LPS @ ras  # (i, j, k) -> LPS
    data, lps = _standard_in_plane(data, lps)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]  # i: along a row, j: down the rows
    row_cos = col_step / np.linalg.norm(col_step)
    col_cos = row_step / np.linalg.norm(row_step)
    pixel_spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))
    thickness = float(np.linalg.norm(slice_step))
    hu = np.clip(np.rint(data), -1024 if modality == "CT" else 0, 3071 if modality == "CT" else 32767).astype(np.int16)
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    ni, nj, nk = hu.shape
    for k in range(nk):
        pos = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        ds = Dataset()
        fm = FileMetaDataset()
        sop_uid = generate_uid()
        fm.MediaStorageSOPClassUID = sop_class
        fm.MediaStorageSOPInstanceUID = sop_uid
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = fm
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC-CANARY", "1", ""
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = modality, "test", body_part
        ds.SeriesDescription = series_description
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [round(v, 6) for v in pixel_spacing]
        ds.SliceThickness = round(thickness, 4)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).tobytes()
        path = folder / f"{modality.lower()}{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    # (slice, row, column) = (k, j, i) -> LPS
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = slice_step, row_step, col_step, lps[:3, 3]
    return CtSeries(folder, tuple(files), study_uid, series_uid, for_uid, affine, (nk, nj, ni))


def reference_on_series(seg_nifti: Path, series: CtSeries) -> np.ndarray:
    """A NIfTI label map (same grid as the CT that made ``series``) as a (slice, row, column) array.

    Nearest-neighbour resampled when the series was written at another shape.
    """
    data, ras = load_ras(seg_nifti)
    ni, nj, nk = series.shape[2], series.shape[1], series.shape[0]
    if data.shape != (ni, nj, nk):
        data, ras = resample_ijk(data, ras, (ni, nj, nk), order=0)
    data, lps = _standard_in_plane(np.asarray(data), RAS_TO_LPS @ ras)
    assert np.allclose(lps[:3, 3], series.affine[:3, 3], atol=1e-3), "reference is not on the series grid"
    return np.rint(np.asarray(data)).astype(np.int16).transpose(2, 1, 0)
