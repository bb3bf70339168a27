"""TID 1500 region report: content, references, measurements, quarantine SR, determinism."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import ResultsConfig
from dicomnode.infer.models import Code, Prediction
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import (
    ModelUsed, OrientationFinding, QcFinding, RegionBox, ReportFindings, SegmentMeasurement, build_sr,
    measure_predictions, processing_texts,
)
from tests.dicom_synth import ellipsoid, make_series, manifest, source_volume

CFG = ResultsConfig()


def _walk(items) -> list[Dataset]:
    out = []
    for it in items:
        out.append(it)
        out.extend(_walk(it.get("ContentSequence", [])))
    return out


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


@pytest.fixture(scope="module")
def case():
    shape = (12, 32, 40)
    pixels = np.full(shape, -1000, np.int16)
    liver = ellipsoid(shape, (4, 10, 12), (2.5, 5, 6))
    spleen = ellipsoid(shape, (8, 22, 28), (2, 6, 7))
    pixels[liver] = 60
    pixels[spleen] = 45
    src = make_series(shape=shape, pixels=pixels)
    vol = source_volume(src)
    lab = np.zeros(shape, np.uint8)
    lab[liver] = 1
    lab[spleen] = 2
    preds = [Prediction(vol.with_array(lab), manifest())]
    seg = build_seg(src, preds, CFG)
    return src, vol, lab, preds, seg


def test_measure_predictions(case) -> None:
    src, vol, lab, preds, _ = case
    m = measure_predictions(preds, vol)
    voxel_ml = 2.5 * 0.8 * 0.7 / 1000
    assert [s.segment_number for s in m] == [1, 2]
    assert m[0].volume_ml == pytest.approx(np.count_nonzero(lab == 1) * voxel_ml)
    assert m[0].mean_hu == pytest.approx(60.0) and m[1].mean_hu == pytest.approx(45.0)


def test_report_content(case) -> None:
    src, vol, lab, preds, seg = case
    findings = ReportFindings(
        segments=measure_predictions(preds, vol),
        regions=(RegionBox.from_voxel_box("liver", (1, 2, 3), (8, 20, 30), vol.affine,
                                          Code("10200004", "SCT", "Liver")),),
        orientation=OrientationFinding(header_matches_anatomy=False, rotation_k=2, z_flip=True),
        qc=(QcFinding("body_coverage", True), QcFinding("hu_range", False)),
        models=(ModelUsed("organs", "3"),),
    )
    sr = build_sr(src, seg, findings, CFG)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SeriesNumber == CFG.sr_series_number and sr.StudyInstanceUID == src[0].StudyInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = _walk(sr.ContentSequence)
    volumes = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if _name(i) == "Volume"]
    assert volumes == pytest.approx([s.volume_ml for s in findings.segments], rel=1e-6)
    units = {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in items if _name(i) == "Volume"}
    assert units == {"ml"}
    hu = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if _name(i) == "Attenuation Coefficient"]
    assert hu == pytest.approx([60.0, 45.0])
    refs = [i for i in items if _name(i) == "Referenced Segment"]
    assert [r.ReferencedSOPSequence[0].ReferencedSegmentNumber for r in refs] == [1, 2]
    assert {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs} == {seg.SOPInstanceUID}
    series_refs = {i.UID for i in items if _name(i) == "Source Series for Segmentation"}
    assert series_refs == {src[0].SeriesInstanceUID}
    surfaces = [i for i in items if _name(i) == "Volume Surface"]
    assert len(surfaces) == 6 and all(s.GraphicType == "POLYGON" for s in surfaces)
    pts = np.concatenate([np.asarray(s.GraphicData, float).reshape(-1, 3) for s in surfaces])
    lo, hi = vol.index_to_lps([0.5, 1.5, 2.5])[0], vol.index_to_lps([7.5, 19.5, 29.5])[0]
    assert np.allclose(pts.min(0), np.minimum(lo, hi), atol=1e-3) and np.allclose(pts.max(0), np.maximum(lo, hi), atol=1e-3)
    texts = [i.TextValue for i in items if _name(i) == "Qualitative Evaluations"]
    assert "orientation: header=inconsistent rotation_deg=180 z_flip=yes" in texts
    undecided = ReportFindings(segments=(), orientation=OrientationFinding(True, verified=False))
    assert processing_texts(undecided) == ["orientation: header=unverified rotation_deg=0 z_flip=no"]
    assert "qc: body_coverage=passed" in texts and "qc: hu_range=failed" in texts
    algos = {(i.TextValue) for i in items if _name(i) == "Algorithm Version"}
    assert algos == {"3"}
    # the SEG and the source series are evidence
    evidence = {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert evidence == {src[0].SeriesInstanceUID, seg.SeriesInstanceUID}
    again = build_sr(src, seg, findings, CFG)
    assert again.SOPInstanceUID == sr.SOPInstanceUID and again.SeriesInstanceUID == sr.SeriesInstanceUID


def test_quarantine_sr_states_reason(case) -> None:
    src = case[0]
    sr = build_sr(src, None, ReportFindings(quarantine_reason="gap", quarantine_kind="geometry"), CFG)
    texts = [i.TextValue for i in _walk(sr.ContentSequence) if _name(i) == "Qualitative Evaluations"]
    assert texts == ["not processed: kind=geometry reason=gap"]
    assert sr.SeriesDescription == CFG.quarantine_sr_title
    normal = build_sr(src, case[4], ReportFindings(models=(ModelUsed("organs", "3"),)), CFG)
    assert sr.SOPInstanceUID != normal.SOPInstanceUID


def test_invalid_input(case) -> None:
    src, _, _, _, seg = case
    with pytest.raises(ValueError, match="no segment 9"):
        build_sr(src, seg, ReportFindings(segments=(SegmentMeasurement(9, 1.0),)), CFG)
    with pytest.raises(ValueError, match="SEG"):
        build_sr(src, None, ReportFindings(segments=(SegmentMeasurement(1, 1.0),)), CFG)
    with pytest.raises(ValueError, match="nothing"):
        build_sr(src, None, ReportFindings(), CFG)


def test_label_sums_equal_masking_each_label() -> None:
    from dicomnode.results.sr import label_sums
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 6, (37, 20, 24)).astype(np.uint8)
    lab[lab == 5] = 9  # a value the manifest does not name: not counted
    img = rng.normal(40, 300, lab.shape).astype(np.float32)
    counts, sums = label_sums(lab, img, 6, True, slab=4)
    for v in range(1, 6):
        m = lab == v
        assert counts[v] == m.sum() and np.isclose(sums[v], img[m].astype(np.float64).sum())
    one = (lab == 2).astype(np.uint8)
    c1, s1 = label_sums(one, img, 2, True, slab=5)
    assert c1[1] == counts[2] and np.isclose(s1[1], sums[2])
    assert label_sums(one, img, 2, False)[1][1] == 0.0
    with pytest.raises(ValueError):
        label_sums(one[:3], img, 2, True)
