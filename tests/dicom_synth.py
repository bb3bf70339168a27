"""Synthetic DICOM source series and label volumes for the results tests (no patient data but
planted canary values, so tests can check nothing leaks into logs)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.volume import SourceFrame, Volume, affine_from_dicom

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CANARY_NAME = "Canary^Patient"
CANARY_ID = "CANARY-7781"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def make_series(
    shape: tuple[int, int, int] = (12, 32, 40),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
    iop: Sequence[float] = AXIAL,
    modality: str = "CT",
    origin: Sequence[float] = (-100.0, -80.0, -40.0),
    pixels: np.ndarray | None = None,
) -> list[Dataset]:
    """Single-frame instances (in slice order) of one series; ``pixels`` (slice,row,col) int16 optional."""
    n, rows, cols = shape
    row_cos = np.asarray(iop[:3], float)
    col_cos = np.asarray(iop[3:], float)
    normal = np.cross(row_cos, col_cos)
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    out = []
    for i in range(n):
        ds = Dataset()
        fm = FileMetaDataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        fm.MediaStorageSOPClassUID = sop_class
        fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = fm
        ds.PatientName = CANARY_NAME
        ds.PatientID = CANARY_ID
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = for_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC42"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = modality
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        ds.Manufacturer = "synthetic"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(origin, float) + i * spacing[0] * normal]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.KVP = 120
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 10, 500, 1
            ds.MagneticFieldStrength = 1.5
        data = np.zeros((rows, cols), np.int16) if pixels is None else np.asarray(pixels[i], np.int16)
        ds.PixelData = data.tobytes()
        out.append(ds)
    return out


def source_volume(datasets: Sequence[Dataset], array: np.ndarray | None = None) -> Volume:
    """The Volume of ``datasets`` (in the given order) on its own source grid."""
    first, n = datasets[0], len(datasets)
    p0 = np.asarray(first.ImagePositionPatient, float)
    step = (np.asarray(datasets[1].ImagePositionPatient, float) - p0) if n > 1 else np.cross(
        np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float))
    aff = affine_from_dicom(p0, np.asarray(first.ImageOrientationPatient, float),
                            tuple(float(v) for v in first.PixelSpacing), step)
    if array is None:
        array = np.stack([np.frombuffer(d.PixelData, np.int16).reshape(d.Rows, d.Columns) for d in datasets])
    return Volume(
        array=array, affine=aff, modality=str(first.Modality), frame_of_reference_uid=str(first.FrameOfReferenceUID),
        source=tuple(SourceFrame(str(d.SOPClassUID), str(d.SOPInstanceUID), 1) for d in datasets),
    )


def ellipsoid(shape: tuple[int, int, int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid in voxel units."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write ``datasets`` as files into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def manifest(name: str = "organs", version: str = "3", n_labels: int = 2, first_value: int = 1):
    """A ModelManifest with ``n_labels`` SNOMED-coded anatomical labels."""
    from dicomnode.infer.models import Code, LabelInfo, ModelManifest

    organs = [("10200004", "Liver"), ("78961009", "Spleen"), ("64033007", "Kidney"), ("89837001", "Urinary bladder"),
              ("39607008", "Lung"), ("80891009", "Heart"), ("12738006", "Brain"), ("421060004", "Spinal column")]
    category = Code("123037004", "SCT", "Anatomical Structure")
    labels = tuple(
        LabelInfo(first_value + i, f"{organs[i % len(organs)][1].lower().replace(' ', '_')}_{i}", category,
                  Code(organs[i % len(organs)][0], "SCT", organs[i % len(organs)][1]),
                  ((37 * i + 200) % 256, (91 * i + 60) % 256, (53 * i + 120) % 256))
        for i in range(n_labels)
    )
    return ModelManifest(name=name, version=version, modalities=("CT", "MR"), spacing_mm=(3.0, 3.0, 3.0),
                         windows=((-100.0, 200.0),), normalisation="window", patch=(64, 64, 64),
                         input_name="INPUT", output_name="OUTPUT", labels=labels)


def reorient(vol: Volume, perm: tuple[int, int, int], flips: tuple[int, ...], array: np.ndarray | None = None) -> Volume:
    """``vol`` with axes permuted (``perm``) then flipped (``flips``), affine updated, provenance kept."""
    import dataclasses

    arr = np.transpose(np.asarray(vol.array if array is None else array), perm)
    aff = np.eye(4)
    aff[:3, :3] = vol.affine[:3, :3][:, list(perm)]
    aff[:3, 3] = vol.affine[:3, 3]
    for ax in flips:
        arr = np.flip(arr, ax)
        aff[:3, 3] = aff[:3, 3] + aff[:3, ax] * (arr.shape[ax] - 1)
        aff[:3, ax] = -aff[:3, ax]
    return dataclasses.replace(vol, array=np.ascontiguousarray(arr), affine=aff)
