"""DICOM-SEG from model predictions (highdicom), on the geometry of the original source images.

A model may have run on a reoriented, resampled or cropped grid: every prediction is first mapped
back onto its source grid (:func:`dicomnode.volume.to_source_grid`, nearest neighbour), so frame
``i`` of the mask is the source frame ``Volume.source[i]`` and the SEG's frames reference exactly
those instances (and frame numbers). One segment per manifest label, numbered in prediction order
then label value, with SNOMED CT category/type, algorithm identification (model name + version),
display colour and a deterministic tracking UID. Frames without any voxel of a segment are omitted.

Speed: a single prediction (or predictions that do not overlap) is handed to highdicom as one
label map of segment numbers (no 4D boolean array), and the plane positions are taken straight
from the source headers, which skips highdicom's own per-instance geometry pass.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.config import ResultsConfig
from dicomnode.errors import SeriesError
from dicomnode.infer.models import Code, Prediction
from dicomnode.results.seg_frames import complete_references, fill_frames
from dicomnode.results.uids import derive_uid
from dicomnode.volume import SourceFrame, Volume, to_source_grid

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
POSITION_TOLERANCE_MM = 0.05


def software_version() -> str:
    """The installed dicomnode version (``0.0.0`` when running from an uninstalled tree)."""
    try:
        return metadata.version("dicomnode")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "0.0.0"


def coded(code: Code) -> hd.sr.CodedConcept:
    """A manifest :class:`Code` as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def model_versions_of(predictions: Sequence[Prediction]) -> tuple[str, ...]:
    """``name:version`` of every model behind ``predictions`` (sorted, unique)."""
    return tuple(sorted({f"{p.manifest.name}:{p.manifest.version}" for p in predictions}))


def order_source_images(source_datasets: Sequence[Dataset], frames: Sequence[SourceFrame]) -> list[Dataset]:
    """The source datasets in the order of ``frames`` (one per slice of the source grid).

    Single-frame series: one dataset per frame. Multi-frame source: one dataset whose frames
    1..N are the slices in order. Raises SeriesError (inconsistent) when a frame has no dataset.
    """
    if not frames:
        raise SeriesError("seg_no_source_frames", kind="inconsistent", detail="the volume has no source frames")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    uids = [f.sop_instance_uid for f in frames]
    missing = sum(1 for u in set(uids) if u not in by_uid)
    if missing:
        raise SeriesError("seg_source_missing", kind="inconsistent", detail=f"{missing} source instances not given")
    if len(set(uids)) == 1 and len(frames) > 1:
        if [f.frame for f in frames] != list(range(1, len(frames) + 1)):
            raise SeriesError("seg_multiframe_order", kind="unsupported", detail="source frames out of order")
        return [by_uid[uids[0]]]
    if len(set(uids)) != len(uids):
        raise SeriesError("seg_mixed_frames", kind="unsupported", detail="mixed multi-frame sources")
    return [by_uid[u] for u in uids]


def _multiframe_geometry(ds: Dataset, frames: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(positions of ``frames`` (1-based), orientation, pixel spacing) of an enhanced multi-frame image."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def group(i: int, keyword: str) -> Dataset:
        item = per_frame[i]
        return (item if keyword in item else shared)[keyword][0]

    positions = np.array([[float(v) for v in group(f - 1, "PlanePositionSequence").ImagePositionPatient]
                          for f in frames])
    iop = np.asarray([float(v) for v in group(frames[0] - 1, "PlaneOrientationSequence").ImageOrientationPatient])
    spacing = [float(v) for v in group(frames[0] - 1, "PixelMeasuresSequence").PixelSpacing]
    return positions, iop, spacing


def _check_geometry(images: Sequence[Dataset], grid: Volume) -> np.ndarray | None:
    """Check the source headers against the source grid; return single-frame positions (n, 3).

    Returns None for a multi-frame source (highdicom then reads its positions itself). Raises
    SeriesError (inconsistent) when the headers do not describe the grid the mask is on.
    """
    assert grid.source_shape is not None and grid.source_affine is not None
    n, rows, cols = grid.source_shape
    aff = grid.source_affine
    first = images[0]
    multiframe = len(images) == 1 and n > 1
    try:
        if multiframe:
            positions, iop, spacing = _multiframe_geometry(first, [f.frame for f in grid.source[:n]])
        else:
            positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in images])
            iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
            spacing = [float(v) for v in first.PixelSpacing]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise SeriesError("seg_source_geometry_missing", kind="inconsistent",
                          detail=f"source headers lack geometry: {type(exc).__name__}") from exc
    expected = np.arange(n)[:, None] * aff[:3, 0][None, :] + aff[:3, 3][None, :]
    for i, f in enumerate(grid.source[:n]):  # stacks with gaps/uneven spacing carry each slice's position
        if f.position is not None:
            expected[i] = f.position
    ok = (
        int(first.Rows) == rows and int(first.Columns) == cols
        and positions.shape == expected.shape
        and np.allclose(positions, expected, atol=POSITION_TOLERANCE_MM)
        and np.allclose(iop[:3] * spacing[1], aff[:3, 2], atol=1e-3)
        and np.allclose(iop[3:] * spacing[0], aff[:3, 1], atol=1e-3)
    )
    if not ok:
        raise SeriesError("seg_source_geometry_mismatch", kind="inconsistent",
                          detail="source headers do not match the grid the mask was mapped to")
    return None if multiframe else positions


def _segment_descriptions(
    predictions: Sequence[Prediction], source_series_uid: str, versions: Sequence[str]
) -> tuple[list[hd.seg.SegmentDescription], list[np.ndarray]]:
    """Segment descriptions and, per prediction, a lookup table label value -> segment number."""
    descriptions: list[hd.seg.SegmentDescription] = []
    luts: list[np.ndarray] = []
    number = 0
    for pred in predictions:
        m = pred.manifest
        algo = hd.AlgorithmIdentificationSequence(
            name=m.name[:64], family=codes.cid7162.ArtificialIntelligence, version=m.version[:64],
        )
        labels = sorted(m.labels, key=lambda l: l.value)
        lut = np.zeros(max([l.value for l in labels] + [0]) + 1, dtype=np.uint16)
        for label in labels:
            number += 1
            lut[label.value] = number
            descriptions.append(hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name[:64],
                segmented_property_category=coded(label.category),
                segmented_property_type=coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_uid=derive_uid(source_series_uid, "seg-segment", versions, number),
                tracking_id=label.name[:64],
                display_color=hd.color.CIELabColor.from_rgb(*label.color),
            ))
        luts.append(lut)
    return descriptions, luts


def _label_maps(
    grids: Sequence[Volume], luts: Sequence[np.ndarray], n_segments: int, labelmap: bool
) -> tuple[list[np.ndarray], bool]:
    """Label maps of segment numbers on the source grid and whether segments overlap.

    One map when the predictions do not overlap (or for LABELMAP, where later models win), else
    one map per prediction. Raises SeriesError for label values the manifest does not name.
    """
    dtype = np.uint8 if n_segments < 256 else np.uint16
    mapped = []
    for grid, lut in zip(grids, luts):
        arr = np.asarray(grid.array)
        if arr.dtype.kind not in "iu":
            arr = np.rint(arr).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(lut)):
            raise SeriesError("seg_label_out_of_range", kind="inconsistent",
                              detail="prediction holds label values its manifest does not name")
        n = len(lut)
        if arr.dtype == dtype and np.array_equal(lut, np.arange(n)):
            mapped.append(arr)  # label values are already the segment numbers
        else:
            mapped.append(lut.astype(dtype)[arr])
    if len(mapped) == 1:
        return mapped, False
    pairs = [(i, j) for i in range(len(mapped)) for j in range(i + 1, len(mapped))]
    # every 4th slice first: overlapping models (anatomy inside body) are found at a quarter of the cost
    overlap = (any(np.any((mapped[i][::4] > 0) & (mapped[j][::4] > 0)) for i, j in pairs)
               or any(np.any((mapped[i] > 0) & (mapped[j] > 0)) for i, j in pairs))
    if overlap and not labelmap:
        return mapped, True
    if overlap:
        log.warning("overlapping predictions in a LABELMAP SEG: later models win where they overlap")
    out = mapped[0].copy()
    for m in mapped[1:]:
        f = m > 0
        out[f] = m[f]
    return [out], False


def _stack(maps: Sequence[np.ndarray], n_segments: int) -> np.ndarray:
    """(frames, rows, cols, segments) boolean masks from label maps (highdicom's overlapping input)."""
    stack = np.zeros(maps[0].shape + (n_segments,), dtype=bool)
    for m in maps:
        for s in np.unique(m):
            if s:
                stack[..., int(s) - 1] = m == s
    return stack


def _template_pixels(shape: tuple[int, ...], n_segments: int, dtype: type) -> np.ndarray:
    """A label map with one voxel of every segment on the first slice (highdicom makes one frame each)
    and one of segment 1 on the second."""
    pix = np.zeros(shape, dtype=dtype)
    flat = pix[0].reshape(-1)
    flat[:n_segments] = np.arange(1, n_segments + 1)
    pix[1].reshape(-1)[0] = 1  # a second slice: positions and references stay per-frame groups
    return pix


def build_seg(
    source_datasets: Sequence[Dataset],
    predictions: Sequence[Prediction],
    cfg: ResultsConfig,
    *,
    model_versions: Sequence[str] | None = None,
) -> Dataset:
    """One DICOM-SEG (BINARY, or LABELMAP per ``cfg.seg_type``) holding every label of ``predictions``.

    ``source_datasets`` are the headers of the source instances (pixel data not needed), in any
    order. ``model_versions`` (default: ``name:version`` of each prediction's model) feed the
    deterministic UIDs. Raises ValueError without predictions, SeriesError when the predictions
    do not map onto the given source instances.
    """
    if not predictions:
        raise ValueError("build_seg needs at least one prediction")
    versions = tuple(model_versions) if model_versions is not None else model_versions_of(predictions)
    grids = [to_source_grid(p.labels) for p in predictions]
    frames = grids[0].source
    if any(g.source != frames or g.shape != grids[0].shape for g in grids[1:]):
        raise SeriesError("seg_predictions_disagree", kind="inconsistent",
                          detail="predictions refer to different source grids")
    images = order_source_images(source_datasets, frames)
    positions = _check_geometry(images, grids[0])
    series_uid = str(images[0].SeriesInstanceUID)
    descriptions, luts = _segment_descriptions(predictions, series_uid, versions)
    labelmap = cfg.seg_type == "LABELMAP"
    maps, overlap = _label_maps(grids, luts, len(descriptions), labelmap)
    if not any(np.any(m) for m in maps):
        raise SeriesError("seg_empty", kind="anatomy", detail="no segment has any voxel")
    fast = (not labelmap and positions is not None and maps[0].shape[0] >= 2
            and maps[0].shape[1] * maps[0].shape[2] >= len(descriptions))
    kwargs = {}
    if positions is not None:
        src = images[0]
        kwargs = {
            "plane_positions": [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, p)
                                for p in (positions[:2] if fast else positions)],
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, [float(v) for v in src.ImageOrientationPatient]),
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=[float(v) for v in src.PixelSpacing],
                slice_thickness=float(src.get("SliceThickness") or abs(grids[0].spacing[0])),
            ),
        }
    template_images = images
    if fast:  # highdicom builds a two-slice, one-frame-per-segment SEG; the frames are added below
        template_images = images[:2]
        pixels = _template_pixels((2,) + maps[0].shape[1:], len(descriptions), maps[0].dtype.type)
    else:
        pixels = _stack(maps, len(descriptions)) if overlap else maps[0]
    seg = hd.seg.Segmentation(
        source_images=template_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(series_uid, "seg-series", versions),
        series_number=cfg.seg_series_number,
        sop_instance_uid=derive_uid(series_uid, "seg", versions),
        instance_number=1,
        manufacturer=cfg.manufacturer,
        manufacturer_model_name="dicomnode",
        software_versions=software_version(),
        device_serial_number=cfg.device_serial_number,
        content_label=cfg.seg_content_label,
        content_description=", ".join(versions)[:64] or None,
        series_description=cfg.seg_series_description[:64],
        omit_empty_frames=True,
        **kwargs,
    )
    if fast:
        normal = np.cross(*np.asarray([float(v) for v in images[0].ImageOrientationPatient]).reshape(2, 3))
        depth = positions @ normal  # type: ignore[operator]
        order = np.argsort(depth, kind="stable")
        steps = np.diff(depth[order])
        regular = bool(steps.size == 0 or np.allclose(steps, steps[0], atol=POSITION_TOLERANCE_MM))
        complete_references(seg, images, regular)
        fill_frames(seg, images, maps, order)
        seg.SegmentsOverlap = "YES" if overlap else "NO"
    return seg
