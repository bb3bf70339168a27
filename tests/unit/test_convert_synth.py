"""Synthetic series for the converter tests: known stored values, known geometry, any transfer syntax.

``make_stack`` writes single-frame files (or one Enhanced multi-frame file with ``enhanced=True``)
with pydicom; compressed syntaxes pydicom cannot encode (JPEG baseline/extended/lossless) are made
with dcmtk's ``dcmcjpeg``. The tests at the bottom check the generator itself.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

PYDICOM_ENCODED = {
    "1.2.840.10008.1.2.5": {},  # RLE
    "1.2.840.10008.1.2.4.80": {},  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": {"jls_error": 2},  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": {},  # J2K lossless
    "1.2.840.10008.1.2.4.91": {"j2k_cr": [4]},  # J2K lossy
}
DCMCJPEG = {"1.2.840.10008.1.2.4.70": "+e1", "1.2.840.10008.1.2.4.57": "+el", "1.2.840.10008.1.2.4.51": "+ee",
            "1.2.840.10008.1.2.4.50": "+eb"}
EIGHT_BIT_ONLY = {"1.2.840.10008.1.2.4.50"}  # JPEG baseline: 8-bit samples
NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
LOSSY = {"1.2.840.10008.1.2.4.81": 2, "1.2.840.10008.1.2.4.91": None, "1.2.840.10008.1.2.4.51": None,
         "1.2.840.10008.1.2.4.50": None}
ALL_SYNTAXES = NATIVE + tuple(PYDICOM_ENCODED) + tuple(DCMCJPEG)


def rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix from three Euler angles (radians, x then y then z)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def orientation_from(rot: np.ndarray) -> tuple[float, ...]:
    """ImageOrientationPatient whose row/column cosines are the first two columns of ``rot``."""
    return tuple(float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]]))


@dataclass
class Stack:
    """What was written: stored values in slice order, expected affine, files."""

    stored: np.ndarray  # (n, rows, cols) stored values in ascending slice order
    positions: np.ndarray  # (n, 3) LPS
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    paths: list[Path] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])

    @property
    def expected(self) -> np.ndarray:
        """Rescaled values (what the converter must return on a regular stack)."""
        return self.stored.astype(np.float64) * self.slope + self.intercept

    def expected_affine(self) -> np.ndarray:
        """(slice, row, col) -> LPS affine of the stack (regular, untilted)."""
        o = np.asarray(self.orientation)
        aff = np.eye(4)
        n = len(self.positions)
        step = (self.positions[-1] - self.positions[0]) / (n - 1) if n > 1 else self.normal
        aff[:3, 0] = step
        aff[:3, 1] = o[3:] * self.pixel_spacing[0]
        aff[:3, 2] = o[:3] * self.pixel_spacing[1]
        aff[:3, 3] = self.positions[0]
        return aff


def smooth_values(shape: tuple[int, int, int], lo: int, hi: int, seed: int = 0) -> np.ndarray:
    """Smooth but non-trivial int values in [lo, hi] (compress well; lossy codecs stay close)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    f = np.sin(3 * x + rng.uniform(0, 3)) * np.cos(2 * y + rng.uniform(0, 3)) + 0.5 * z
    f = (f - f.min()) / (np.ptp(f) or 1.0)
    v = lo + f * (hi - lo)
    v[:, 0, 0] = lo
    v[:, -1, -1] = hi
    v[:, 0, 1] = np.arange(shape[0]) % max(hi - lo, 1) + lo  # every slice distinguishable
    return np.rint(v).astype(np.int64)


def base_dataset(sop_class: str, modality: str, series: str, study: str, for_uid: str) -> Dataset:
    """A minimal image dataset with the given UIDs and a file meta header."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.PatientName, ds.PatientID = "Synthetic^Convert", "SYN-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
    ds.Modality = modality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def set_pixels(ds: Dataset, values: np.ndarray, bits_stored: int, signed: bool, bits_allocated: int = 16) -> None:
    """Store ``values`` (frames, rows, cols) or (rows, cols) as 8- or 16-bit pixel data."""
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.Rows, ds.Columns = values.shape[-2:]
    ds.PixelData = values.astype(np.dtype(("i" if signed else "u") + str(bits_allocated // 8))).tobytes()


def save(ds: Dataset, path: Path, syntax: str) -> None:
    """Write ``ds`` to ``path`` in ``syntax`` (pydicom encoders, or dcmcjpeg for JPEG)."""
    ds = copy.deepcopy(ds)
    if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    elif syntax == "1.2.840.10008.1.2.2":
        arr = np.frombuffer(ds.PixelData, dtype=np.int16 if ds.PixelRepresentation else np.uint16)
        ds.PixelData = arr.byteswap().tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, ds, enforce_file_format=True, little_endian=False, implicit_vr=False)
    elif syntax in PYDICOM_ENCODED:
        ds.compress(syntax, **PYDICOM_ENCODED[syntax])
        ds.save_as(path, enforce_file_format=True)
    elif syntax in DCMCJPEG:
        if shutil.which("dcmcjpeg") is None:
            pytest.skip("dcmcjpeg (dcmtk) not installed; scripts/setup.sh installs it")
        plain = path.with_suffix(".plain")
        ds.save_as(plain, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", DCMCJPEG[syntax], str(plain), str(path)], check=True, capture_output=True)
        plain.unlink()
    else:
        raise ValueError(f"no encoder for {syntax}")


def make_stack(
    folder: Path,
    *,
    n: int = 6,
    rows: int = 40,
    cols: int = 36,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    slice_spacing: float = 2.5,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-90.0, -110.5, 30.25),
    shear: Sequence[float] = (0.0, 0.0),  # in-plane shift per slice (mm along row, column cosine)
    depths: Sequence[float] | None = None,  # explicit slice depths (mm from the first), else regular
    syntax: str = "1.2.840.10008.1.2.1",
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    signed: bool = False,
    bits_allocated: int = 16,
    values: np.ndarray | None = None,
    order: Sequence[int] | None = None,  # file write order (shuffled series)
    enhanced: bool = False,
    seed: int = 0,
) -> Stack:
    """Write a stack into ``folder``; returns what was written (in ascending slice order)."""
    folder.mkdir(parents=True, exist_ok=True)
    o = np.round(np.asarray(orientation, dtype=np.float64), 10)  # DS values stay within 16 characters
    row, col = o[:3], o[3:]
    normal = np.cross(row, col)
    d = np.arange(n) * slice_spacing if depths is None else np.asarray(depths, dtype=np.float64)
    positions = np.array([np.asarray(origin) + di * normal + i * (shear[0] * row + shear[1] * col)
                          for i, di in enumerate(d)])
    positions = np.round(positions, 6)
    if values is None:
        lo, hi = (-2000, 2000) if signed else (0, 3000)
        if bits_allocated == 8:
            lo, hi = (-100, 100) if signed else (0, 255)
        elif bits_stored < 16:
            lo, hi = max(lo, -(1 << (bits_stored - 1)) if signed else 0), min(hi, (1 << (bits_stored - (1 if signed else 0))) - 1)
        values = smooth_values((n, rows, cols), lo, hi, seed)
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    stack = Stack(values, positions, tuple(float(v) for v in o), tuple(pixel_spacing), slope, intercept)  # type: ignore[arg-type]
    if enhanced:
        ds = base_dataset(ENHANCED_CT, modality, series, study, for_uid)
        set_pixels(ds, values, bits_stored, signed, bits_allocated)
        ds.NumberOfFrames = n
        shared = Dataset()
        pm = Dataset()
        pm.PixelSpacing = list(pixel_spacing)
        pm.SliceThickness = slice_spacing
        po = Dataset()
        po.ImageOrientationPatient = list(o)
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, intercept, "HU"
        shared.PixelMeasuresSequence = DicomSequence([pm])
        shared.PlaneOrientationSequence = DicomSequence([po])
        shared.PixelValueTransformationSequence = DicomSequence([pvt])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        frame_order = list(order) if order is not None else list(range(n))
        per = []
        for i in frame_order:
            fg = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [float(v) for v in positions[i]]
            fc = Dataset()
            fc.StackID = "1"
            fc.InStackPositionNumber = i + 1
            fg.PlanePositionSequence = DicomSequence([pp])
            fg.FrameContentSequence = DicomSequence([fc])
            per.append(fg)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
        set_pixels(ds, values[frame_order], bits_stored, signed, bits_allocated)
        path = folder / "enhanced.dcm"
        save(ds, path, syntax)
        stack.paths = [path]
        return stack
    for i in (order if order is not None else range(n)):
        ds = base_dataset(CT if modality == "CT" else MR, modality, series, study, for_uid)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [float(v) for v in positions[i]]
        ds.ImageOrientationPatient = [float(v) for v in o]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_spacing
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        set_pixels(ds, values[i], bits_stored, signed, bits_allocated)
        path = folder / f"f{len(stack.paths):04d}.dcm"
        save(ds, path, syntax)
        stack.paths.append(path)
    return stack


# ---------------------------------------------------------------------------------------------
# the generator's own checks


def test_generator_writes_the_geometry_it_reports(tmp_path: Path) -> None:
    st = make_stack(tmp_path, n=3, orientation=SAGITTAL, order=[2, 0, 1])
    ds = [pydicom.dcmread(p) for p in st.paths]
    assert [int(d.InstanceNumber) for d in ds] == [3, 1, 2]
    assert np.allclose([float(v) for v in ds[1].ImagePositionPatient], st.positions[0])
    assert np.array_equal(ds[1].pixel_array, st.stored[0])


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_generator_encodes_every_syntax(tmp_path: Path, syntax: str) -> None:
    if syntax in EIGHT_BIT_ONLY:
        st = make_stack(tmp_path, n=1, syntax=syntax, bits_allocated=8, bits_stored=8, intercept=0)
    else:
        st = make_stack(tmp_path, n=1, syntax=syntax, signed=True, bits_stored=12)
    ds = pydicom.dcmread(st.paths[0])
    assert ds.file_meta.TransferSyntaxUID == syntax
    err = np.abs(file_values(ds) - st.expected[0]).max()
    if syntax not in LOSSY:
        assert err == 0
    else:  # dcmcjpeg's lossy modes rescale the values (and write a new slope/intercept)
        assert err <= (LOSSY[syntax] or 0.05 * np.ptp(st.expected))


def file_values(ds: Dataset, index: int | None = None) -> np.ndarray:
    """Rescaled values of one frame as pydicom decodes them (the reference for lossy syntaxes)."""
    from pydicom.pixels import pixel_array

    arr = pixel_array(ds, index=index).astype(np.float64)
    src = ds
    if "SharedFunctionalGroupsSequence" in ds:  # Enhanced: rescale lives in the functional groups
        src = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    return arr * float(src.get("RescaleSlope", 1)) + float(src.get("RescaleIntercept", 0))
