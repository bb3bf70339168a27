"""The region report: a TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

Content (all findings come in one frozen :class:`ReportFindings`):
- per segment of the SEG: a Volumetric ROI group (TID 1411) referencing the segment, with its
  volume (ml) and, for CT, its mean attenuation (HU), and the algorithm that made it;
- per anatomical region: a Volumetric ROI group whose volume surface is the crop box (six
  planar polygons in patient coordinates) on the source series' frame of reference;
- one "processing" group (TID 1501) with the orientation finding (header vs anatomy), every QC
  finding and, for a quarantined series, the reason it was not processed;
- per model used: a group carrying its algorithm identification (name + version).

Only standard codes are used (SNOMED CT, DCM, UCUM, UMLS); findings that have no standard code
(orientation, QC, quarantine reason) are TEXT "Qualitative Evaluations" items in a fixed
machine-readable form, e.g. ``orientation: header=inconsistent rotation_deg=180 z_flip=yes``
(``header=unverified`` when the anatomy could not decide and the header orientation was kept).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.config import ResultsConfig
from dicomnode.infer.models import Code, Prediction
from dicomnode.results.seg import coded, software_version
from dicomnode.results.uids import derive_uid
from dicomnode.volume import Volume, resample, to_source_grid

ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
ATTENUATION = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
PROCEDURES = {
    "CT": hd.sr.CodedConcept("77477000", "SCT", "Computed Tomography"),
    "MR": hd.sr.CodedConcept("113091000", "SCT", "Magnetic Resonance Imaging"),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
# TID 1501 / 1411 "Qualitative Evaluations" as TEXT: findings without a standard code
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


@dataclass(frozen=True, slots=True)
class SegmentMeasurement:
    """Measurements of one SEG segment (numbered as in the SEG)."""

    segment_number: int
    volume_ml: float
    mean_hu: float | None = None  # CT only


@dataclass(frozen=True, slots=True)
class RegionBox:
    """An anatomical region's crop box as its 8 corners in LPS mm (a box on some voxel grid)."""

    name: str
    corners_mm: tuple[tuple[float, float, float], ...]
    code: Code | None = None

    @classmethod
    def from_voxel_box(
        cls, name: str, lower: Sequence[int], upper: Sequence[int], affine: np.ndarray, code: Code | None = None
    ) -> "RegionBox":
        """The box ``array[l0:u0, l1:u1, l2:u2]`` of a grid with ``affine``, to its outer voxel edges."""
        lo = np.asarray(lower, float) - 0.5
        hi = np.asarray(upper, float) - 0.5
        corners = []
        for bits in range(8):
            idx = np.array([hi[a] if bits >> a & 1 else lo[a] for a in range(3)])
            corners.append(tuple(float(v) for v in affine[:3, :3] @ idx + affine[:3, 3]))
        return cls(name=name, corners_mm=tuple(corners), code=code)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class OrientationFinding:
    """Whether the header orientation matches the anatomy, and the correction that was found."""

    header_matches_anatomy: bool
    rotation_k: int = 0  # quarter turns in the axial plane
    z_flip: bool = False
    verified: bool = True  # False: the anatomy could not decide; the header orientation was kept


@dataclass(frozen=True, slots=True)
class QcFinding:
    """One quality check (machine-readable ``name``, e.g. "body_coverage")."""

    name: str
    passed: bool


@dataclass(frozen=True, slots=True)
class ModelUsed:
    """A model that contributed to the results."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class ReportFindings:
    """Everything the region report states. ``quarantine_reason`` set: the series was not processed."""

    segments: tuple[SegmentMeasurement, ...] = ()
    regions: tuple[RegionBox, ...] = ()
    orientation: OrientationFinding | None = None
    qc: tuple[QcFinding, ...] = ()
    models: tuple[ModelUsed, ...] = ()
    quarantine_reason: str = ""
    quarantine_kind: str = ""


def measure_predictions(predictions: Sequence[Prediction], image: Volume) -> tuple[SegmentMeasurement, ...]:
    """Volume (ml) and, for CT, mean HU of every label, numbered like :func:`build_seg` numbers segments.

    Labels are mapped to the source grid, then onto ``image``'s grid when that differs.
    """
    out: list[SegmentMeasurement] = []
    number = 0
    img = np.asarray(image.array)
    want_mean = image.modality == "CT"
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    for pred in predictions:
        grid = to_source_grid(pred.labels)
        if not grid.same_grid(image):
            grid = resample(grid, image.affine, image.shape, order=0)
        labels = sorted(pred.manifest.labels, key=lambda l: l.value)
        counts, sums = label_sums(np.asarray(grid.array), img, max(l.value for l in labels) + 1, want_mean)
        for label in labels:
            number += 1
            count = int(counts[label.value])
            mean = float(sums[label.value] / count) if (count and want_mean) else None
            out.append(SegmentMeasurement(number, count * voxel_ml, mean))
    return tuple(out)


def label_sums(labels: np.ndarray, image: np.ndarray, n: int, with_sums: bool,
               slab: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and image sum (float64) of each label value 1..n-1 (index 0 stays 0), in one pass.

    Slab by slab, so the float64 weights never cost more than ``slab`` slices of memory; values
    outside 0..n-1 are not counted. Raises ValueError when the shapes differ.
    """
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ")
    counts = np.zeros(n, np.int64)
    sums = np.zeros(n, np.float64)
    for z in range(0, labels.shape[0], slab):
        lab = labels[z:z + slab].ravel()
        if lab.dtype.kind not in "iu":
            lab = np.rint(lab).astype(np.int64)
        if n == 2:  # one label (body, liver): a mask is cheaper than bincount over every voxel
            mask = lab == 1
            counts[1] += int(np.count_nonzero(mask))
            if with_sums:
                sums[1] += float(image[z:z + slab].ravel()[mask].sum(dtype=np.float64))
            continue
        nz = np.flatnonzero((lab > 0) & (lab < n))  # background is most of a volume: skip it
        lab_nz = lab[nz]
        counts[1:] += np.bincount(lab_nz, minlength=n)[1:n]
        if with_sums:
            sums[1:] += np.bincount(lab_nz, weights=image[z:z + slab].ravel()[nz], minlength=n)[1:n]
    return counts, sums


def _box_faces(corners: Sequence[Sequence[float]]) -> list[np.ndarray]:
    c = np.asarray(corners, dtype=np.float64)  # index bits: axis0 -> 1, axis1 -> 2, axis2 -> 4
    faces = []
    for axis in range(3):
        a, b = [x for x in range(3) if x != axis]
        for side in (0, 1):
            ring = [(side << axis) | (i << a) | (j << b) for i, j in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0))]
            faces.append(c[ring])
    return faces


def _text(value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=QUALITATIVE_EVALUATIONS, value=value[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)


def processing_texts(findings: ReportFindings) -> list[str]:
    """The TEXT qualitative evaluations of the processing group (orientation, QC, quarantine)."""
    texts = []
    o = findings.orientation
    if o is not None:
        header = "unverified" if not o.verified else "consistent" if o.header_matches_anatomy else "inconsistent"
        texts.append(f"orientation: header={header} "
                     f"rotation_deg={(o.rotation_k % 4) * 90} z_flip={'yes' if o.z_flip else 'no'}")
    for q in findings.qc:
        texts.append(f"qc: {_safe(q.name)}={'passed' if q.passed else 'failed'}")
    if findings.quarantine_reason:
        kind = _safe(findings.quarantine_kind) if findings.quarantine_kind else "unknown"
        texts.append(f"not processed: kind={kind} reason={_safe(findings.quarantine_reason)}")
    return texts


def _processing_group(findings: ReportFindings, series_uid: str, versions: Sequence[str]) -> list:
    texts = processing_texts(findings)
    if not texts:
        return []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(series_uid, "sr-processing", versions),
            identifier="not processed" if findings.quarantine_reason else "processing"),
    )
    for t in texts:
        group[0].ContentSequence.append(_text(t))
    return [group]


def build_sr(
    source_datasets: Sequence[Dataset], seg: Dataset | None, findings: ReportFindings, cfg: ResultsConfig
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) for the series of ``source_datasets`` (headers suffice).

    ``seg`` is the SEG the segment measurements refer to (None for a quarantined series). Raises
    ValueError when a segment measurement names a segment the SEG does not have, or when there is
    nothing to report.
    """
    if not source_datasets:
        raise ValueError("build_sr needs the source datasets")
    src = source_datasets[0]
    series_uid = str(src.SeriesInstanceUID)
    for_uid = str(src.get("FrameOfReferenceUID", ""))
    versions = tuple(f"{m.name}:{m.version}" for m in findings.models)
    source_series = hd.sr.SourceSeriesForSegmentation(series_uid)
    groups: list = []
    if findings.segments:
        if seg is None:
            raise ValueError("segment measurements need the SEG they refer to")
        seg_items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
        for sm in findings.segments:
            item = seg_items.get(sm.segment_number)
            if item is None:
                raise ValueError(f"the SEG has no segment {sm.segment_number}")
            measurements = [hd.sr.Measurement(codes.SCT.Volume, float(sm.volume_ml), ML)]
            if sm.mean_hu is not None:
                measurements.append(hd.sr.Measurement(ATTENUATION, float(sm.mean_hu), HU, derivation=codes.SCT.Mean))
            algo = item.get("SegmentationAlgorithmIdentificationSequence")
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(item.get("TrackingUID") or derive_uid(series_uid, "sr-segment", versions, sm.segment_number)),
                    identifier=str(item.get("SegmentLabel", f"segment {sm.segment_number}"))[:64]),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=sm.segment_number, source_series=source_series),
                finding_type=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0]),
                finding_category=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=str(algo[0].AlgorithmName), version=str(algo[0].AlgorithmVersion)) if algo else None,
                measurements=measurements,
            ))
    for i, region in enumerate(findings.regions):
        if len(region.corners_mm) != 8:
            raise ValueError(f"region {region.name!r}: a box has 8 corners")
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(series_uid, "sr-region", versions, i), identifier=f"region {region.name}"[:64]),
            referenced_volume_surface=hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=_box_faces(region.corners_mm),
                frame_of_reference_uid=for_uid, source_series=source_series),
            finding_type=coded(region.code) if region.code else ANATOMICAL_STRUCTURE,
        ))
    groups.extend(_processing_group(findings, series_uid, versions))
    for m in findings.models:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(series_uid, "sr-model", [f"{m.name}:{m.version}"]), identifier=f"model {m.name}"[:64]),
            algorithm_id=hd.sr.AlgorithmIdentification(name=m.name[:64], version=m.version[:64]),
        ))
    if not groups:
        raise ValueError("nothing to report")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(series_uid, "sr-device"), name="dicomnode", manufacturer_name=cfg.manufacturer,
            model_name="dicomnode"),
    )
    modality = str(src.get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(modality, IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    kind = "sr-quarantine" if findings.quarantine_reason else "sr"
    evidence = list(source_datasets) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=derive_uid(series_uid, f"{kind}-series", versions),
        series_number=cfg.sr_series_number,
        sop_instance_uid=derive_uid(series_uid, kind, versions),
        instance_number=1,
        manufacturer=cfg.manufacturer,
        is_complete=True,
        series_description=(cfg.quarantine_sr_title if findings.quarantine_reason else cfg.sr_series_description)[:64],
        manufacturer_model_name="dicomnode",
        software_versions=software_version(),
        device_serial_number=cfg.device_serial_number,
    )
    return sr
