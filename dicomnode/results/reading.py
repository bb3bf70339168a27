"""Reading a DICOM-SEG back into label masks on the grid of its source series.

Independent of the writer (no highdicom): frames are placed by their Plane Position (Patient)
onto the source stack sorted along its normal, and the per-frame source reference, where there is
one, must agree with that position. Used by the tests to check the node's own SEGs and SEGs
written by others (dcmqi), and by operators to inspect results.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.infer.models import Code
from dicomnode.volume import SourceFrame, Volume, affine_from_dicom

TOLERANCE_MM = 0.05
_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment as described in the SEG's SegmentSequence."""

    number: int
    label: str
    category: Code | None
    type: Code | None
    algorithm_name: str
    algorithm_version: str
    tracking_uid: str
    tracking_id: str


@dataclass(frozen=True, slots=True)
class SegReading:
    """The content of a SEG on its source grid.

    ``grid`` is the source stack (sorted along its normal) as a Volume holding no image (zeros of
    shape (slices, rows, columns) as uint8, to keep the affine and source frames together);
    ``frame_segments`` / ``frame_slices`` give, for every stored frame, its segment number and
    slice index; ``frames`` the (n_frames, rows, columns) boolean masks (BINARY/FRACTIONAL), or
    for LABELMAP the segment-number frames.
    """

    sop_class_uid: str
    segmentation_type: str
    segments: tuple[SegmentInfo, ...]
    grid: Volume
    frame_segments: np.ndarray
    frame_slices: np.ndarray
    frames: np.ndarray

    def mask(self, segment_number: int) -> np.ndarray:
        """Boolean (slice, row, column) mask of one segment on the source grid."""
        out = np.zeros(self.grid.shape, dtype=bool)
        if self.segmentation_type == "LABELMAP":
            for i, s in enumerate(self.frame_slices):
                out[s] |= self.frames[i] == segment_number
            return out
        sel = np.nonzero(self.frame_segments == segment_number)[0]
        for i in sel:
            out[self.frame_slices[i]] |= self.frames[i]
        return out

    def label_map(self) -> np.ndarray:
        """(slice, row, column) uint16 map of segment numbers (the highest number wins on overlap)."""
        out = np.zeros(self.grid.shape, dtype=np.uint16)
        for seg in sorted(s.number for s in self.segments):
            out[self.mask(seg)] = seg
        return out


def _code(item: Dataset, keyword: str) -> Code | None:
    seq = item.get(keyword)
    if not seq:
        return None
    c = seq[0]
    return Code(str(c.get("CodeValue", c.get("LongCodeValue", ""))), str(c.CodingSchemeDesignator), str(c.CodeMeaning))


def _segments(seg: Dataset) -> tuple[SegmentInfo, ...]:
    out = []
    for item in seg.get("SegmentSequence", []):
        algo = item.get("SegmentationAlgorithmIdentificationSequence")
        out.append(SegmentInfo(
            number=int(item.SegmentNumber), label=str(item.get("SegmentLabel", "")),
            category=_code(item, "SegmentedPropertyCategoryCodeSequence"),
            type=_code(item, "SegmentedPropertyTypeCodeSequence"),
            algorithm_name=str(item.get("SegmentAlgorithmName", "")),
            algorithm_version=str(algo[0].get("AlgorithmVersion", "")) if algo else "",
            tracking_uid=str(item.get("TrackingUID", "")), tracking_id=str(item.get("TrackingID", "")),
        ))
    return tuple(out)


def source_grid(source_datasets: Sequence[Dataset]) -> tuple[list[Dataset], Volume]:
    """Single-frame source datasets sorted along their normal, and their grid as an empty Volume.

    For a stack with gaps or uneven spacing the affine is nominal (first two slices) and every
    ``grid.source[i].position`` holds the slice's real position. Raises ValueError for an empty or
    multi-orientation stack, or two slices at one position.
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    iop = np.asarray([float(v) for v in source_datasets[0].ImageOrientationPatient])
    if any(not np.allclose([float(v) for v in d.ImageOrientationPatient], iop, atol=1e-4) for d in source_datasets):
        raise ValueError("source datasets have different orientations")
    normal = np.cross(iop[:3], iop[3:])
    ordered = sorted(source_datasets, key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in ordered])
    step = (pos[1] - pos[0]) if len(ordered) > 1 else normal * float(ordered[0].get("SliceThickness") or 1.0)
    if len(ordered) > 1 and np.min(np.linalg.norm(np.diff(pos, axis=0), axis=1)) < TOLERANCE_MM:
        raise ValueError("two source slices at one position")
    first = ordered[0]
    aff = affine_from_dicom(pos[0], iop, tuple(float(v) for v in first.PixelSpacing), step)
    grid = Volume(
        array=np.zeros((len(ordered), int(first.Rows), int(first.Columns)), dtype=np.uint8), affine=aff,
        modality=str(first.get("Modality", "")), frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        source=tuple(SourceFrame(str(d.SOPClassUID), str(d.SOPInstanceUID), 1, tuple(float(v) for v in p))
                     for d, p in zip(ordered, pos)),
    )
    return ordered, grid


def _frames(seg: Dataset) -> np.ndarray:
    n, rows, cols = int(seg.get("NumberOfFrames", 1)), int(seg.Rows), int(seg.Columns)
    ts = seg.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(seg, "file_meta", Dataset()) else ExplicitVRLittleEndian
    if int(seg.BitsAllocated) == 1 and ts in _NATIVE:
        bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
        return bits[: n * rows * cols].reshape(n, rows, cols).astype(bool)
    arr = np.asarray(seg.pixel_array)
    return arr.reshape(n, rows, cols)


def read_seg(seg: Dataset, source_datasets: Sequence[Dataset]) -> SegReading:
    """The segments of ``seg`` as masks on the grid of ``source_datasets`` (single-frame instances).

    Raises ValueError when the SEG is not on that grid (other frame of reference, orientation,
    pixel spacing or matrix, frames between slices) or when a frame's source reference
    contradicts its position.
    """
    ordered, grid = source_grid(source_datasets)
    first = ordered[0]
    if str(seg.get("FrameOfReferenceUID", "")) != str(first.get("FrameOfReferenceUID", "")):
        raise ValueError("SEG and source have different frames of reference")
    if (int(seg.Rows), int(seg.Columns)) != (int(first.Rows), int(first.Columns)):
        raise ValueError("SEG frames do not have the source matrix size")
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    per_frame = seg.PerFrameFunctionalGroupsSequence
    iop_src = np.asarray([float(v) for v in first.ImageOrientationPatient])
    if "PlaneOrientationSequence" in shared:
        iop = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
        if not np.allclose(iop, iop_src, atol=1e-4):
            raise ValueError("SEG orientation differs from the source")
    if "PixelMeasuresSequence" in shared:
        ps = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
        if not np.allclose(ps, [float(v) for v in first.PixelSpacing], rtol=1e-4):
            raise ValueError("SEG pixel spacing differs from the source")
    uid_index = {s.sop_instance_uid: i for i, s in enumerate(grid.source)}
    slice_pos = np.array([s.position for s in grid.source], dtype=np.float64)
    seg_type = str(seg.get("SegmentationType", "BINARY"))
    n = len(per_frame)
    frame_segments = np.zeros(n, dtype=np.int32)
    frame_slices = np.zeros(n, dtype=np.int32)
    for i, item in enumerate(per_frame):
        if seg_type != "LABELMAP":
            frame_segments[i] = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref_uid = None
        if "DerivationImageSequence" in item:
            src_items = item.DerivationImageSequence[0].get("SourceImageSequence", [])
            if src_items:
                ref_uid = str(src_items[0].ReferencedSOPInstanceUID)
        if "PlanePositionSequence" in item:
            pos = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
            dist = np.linalg.norm(slice_pos - pos, axis=1)
            k = int(np.argmin(dist))
            if dist[k] > TOLERANCE_MM:
                raise ValueError(f"SEG frame {i + 1} is not at the position of a source slice")
            if ref_uid is not None and ref_uid in uid_index and uid_index[ref_uid] != k:
                raise ValueError(f"SEG frame {i + 1} references another slice than its position")
        elif ref_uid is not None and ref_uid in uid_index:
            k = uid_index[ref_uid]
        else:
            raise ValueError(f"SEG frame {i + 1} has neither a position nor a known source reference")
        frame_slices[i] = k
    frames = _frames(seg)
    if seg_type == "FRACTIONAL":
        frames = frames >= (int(seg.get("MaximumFractionalValue", 255)) + 1) // 2
    return SegReading(
        sop_class_uid=str(seg.SOPClassUID), segmentation_type=seg_type, segments=_segments(seg), grid=grid,
        frame_segments=frame_segments, frame_slices=frame_slices, frames=frames,
    )
