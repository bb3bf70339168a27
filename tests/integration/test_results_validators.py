"""Every SEG and SR the node writes passes the real validators and readers.

- dicom3tools ``dciodvfy``: no error and no warning, for every SEG and SR;
- dcmtk ``dsr2xml``: every SR converts;
- dcmqi ``segimage2itkimage``: reads each SEG back voxel-identical to the mask on the source grid
  (axial CT, sagittal MR, a cropped region, a reoriented input, an odd matrix size, an
  enhanced multi-frame CT source, overlapping models);
- dcmqi ``tid1500reader``: reads each SR, with the measurements it holds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import ResultsConfig
from dicomnode.infer.models import Code, Prediction
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import (
    ModelUsed, OrientationFinding, QcFinding, RegionBox, ReportFindings, build_sr, measure_predictions,
)
from dicomnode.volume import Volume, resample
from tests.dicom_synth import SAGITTAL, ellipsoid, make_series, manifest, reorient, source_volume

BIN = Path(sys.executable).parent
SEGIMAGE2ITK = BIN / "segimage2itkimage"
TID1500READER = BIN / "tid1500reader"
CFG = ResultsConfig()


def _need(tool: str | Path) -> str:
    path = shutil.which(str(tool))
    if path is None:
        pytest.skip(f"{tool} not installed (scripts/setup.sh installs it)")
    return path


def dciodvfy_problems(path: Path) -> list[str]:
    """Every error or warning line dciodvfy prints for ``path``."""
    res = subprocess.run([_need("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    return [ln for ln in lines if ln.startswith(("Error", "Warning")) or " Error " in ln or " Warning " in ln]


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _itk_volume(path: Path) -> Volume:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    sp = np.asarray(img.GetSpacing(), float)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = d[:, 2] * sp[2], d[:, 1] * sp[1], d[:, 0] * sp[0]
    aff[:3, 3] = img.GetOrigin()
    return Volume(array=sitk.GetArrayFromImage(img), affine=aff)


def dcmqi_masks(seg_path: Path, out: Path, grid: Volume) -> dict[int, np.ndarray]:
    """segimage2itkimage's reading of ``seg_path``: segment number -> mask resampled onto ``grid``."""
    out.mkdir()
    res = subprocess.run([_need(SEGIMAGE2ITK), "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                          "-t", "nrrd"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    masks: dict[int, np.ndarray] = {}
    for i, group in enumerate(meta["segmentAttributes"]):
        vol = _itk_volume(out / f"{i + 1}.nrrd")
        on_grid = np.asarray(resample(vol, grid.affine, grid.shape, order=0).array)
        for seg in group:
            masks[int(seg["labelID"])] = on_grid == int(seg["labelID"])
    return masks


def tid1500(path: Path, out: Path) -> dict:
    """tid1500reader's JSON for the SR at ``path``."""
    res = subprocess.run([_need(TID1500READER), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text())


@dataclass(frozen=True)
class Case:
    name: str
    src: list
    source: Volume  # source grid (array order = source order)
    predictions: list
    expected: dict[int, np.ndarray]  # segment number -> mask on the source grid
    regions: tuple = ()


def _organs(shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, (4, 10, 12), (2.5, 5, 6))] = 1
    lab[ellipsoid(shape, (8, 22, 26), (2, 6, 7))] = 2
    return lab


def _cases() -> list[Case]:
    cases = []
    shape = (12, 32, 40)
    pixels = (np.arange(np.prod(shape)) % 200 - 100).reshape(shape).astype(np.int16)
    src = make_series(shape=shape, pixels=pixels)
    vol = source_volume(src)
    lab = _organs(shape)
    cases.append(Case("axial_ct", src, vol, [Prediction(vol.with_array(lab), manifest())], {1: lab == 1, 2: lab == 2}))

    mr = make_series(shape=(10, 36, 30), spacing=(3.0, 1.1, 0.9), iop=SAGITTAL, modality="MR")
    mvol = source_volume(mr)
    mlab = _organs(mvol.shape)
    cases.append(Case("sagittal_mr", mr, mvol, [Prediction(mvol.with_array(mlab), manifest())],
                      {1: mlab == 1, 2: mlab == 2}))

    lo, hi = (1, 3, 4), (10, 29, 36)
    crop = vol.crop(lo, hi)
    clab = np.zeros(crop.shape, np.uint8)
    clab[ellipsoid(crop.shape, (4, 12, 14), (3, 7, 8))] = 1
    full = np.zeros(shape, bool)
    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = clab == 1
    cases.append(Case("cropped_region", src, vol, [Prediction(crop.with_array(clab), manifest("liver", "2", 1))],
                      {1: full}, regions=(RegionBox.from_voxel_box("liver", lo, hi, vol.affine,
                                                                   Code("10200004", "SCT", "Liver")),)))

    moved = reorient(vol, (2, 0, 1), (0, 2), array=lab)
    cases.append(Case("reoriented", src, vol, [Prediction(moved, manifest())], {1: lab == 1, 2: lab == 2}))

    odd = make_series(shape=(9, 31, 37), spacing=(2.0, 0.9, 0.9))  # rows * columns not a multiple of 8
    ovol = source_volume(odd)
    olab = _organs(ovol.shape)
    cases.append(Case("odd_matrix", odd, ovol, [Prediction(ovol.with_array(olab), manifest())],
                      {1: olab == 1, 2: olab == 2}))

    import highdicom as hd

    from dicomnode.volume import SourceFrame, affine_from_dicom

    mf = hd.legacy.LegacyConvertedEnhancedCTImage(src, hd.UID(), 5, hd.UID(), 1)  # enhanced CT source
    pos = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                    for f in mf.PerFrameFunctionalGroupsSequence])
    mf_vol = Volume(array=np.zeros(shape, np.int16), modality="CT",
                    affine=affine_from_dicom(pos[0], np.asarray(src[0].ImageOrientationPatient, float),
                                             (0.8, 0.7), pos[1] - pos[0]),
                    source=tuple(SourceFrame(str(mf.SOPClassUID), str(mf.SOPInstanceUID), k)
                                 for k in range(1, shape[0] + 1)))
    cases.append(Case("enhanced_ct_source", [mf], mf_vol, [Prediction(mf_vol.with_array(lab), manifest())],
                      {1: lab == 1, 2: lab == 2}))

    body = ellipsoid(shape, (6, 16, 20), (5, 14, 18)).astype(np.uint8)
    cases.append(Case("overlapping_models", src, vol,
                      [Prediction(vol.with_array(body), manifest("body", "1", 1)), Prediction(vol.with_array(lab), manifest())],
                      {1: body == 1, 2: lab == 1, 3: lab == 2}))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seg_and_sr_pass_validators_and_read_back(case: Case, tmp_path: Path) -> None:
    seg = build_seg(case.src, case.predictions, CFG)
    seg_path = _save(seg, tmp_path / "seg.dcm")
    assert dciodvfy_problems(seg_path) == []

    masks = dcmqi_masks(seg_path, tmp_path / "dcmqi", case.source)
    assert sorted(masks) == sorted(case.expected)
    for number, expected in case.expected.items():
        assert expected.any()
        assert np.array_equal(masks[number], expected), f"segment {number} differs from the source-grid mask"

    findings = ReportFindings(
        segments=measure_predictions(case.predictions, case.source), regions=case.regions,
        orientation=OrientationFinding(header_matches_anatomy=case.name != "reoriented", rotation_k=1),
        qc=(QcFinding("body_coverage", True),),
        models=tuple(ModelUsed(p.manifest.name, p.manifest.version) for p in case.predictions),
    )
    sr_path = _save(build_sr(case.src, seg, findings, CFG), tmp_path / "sr.dcm")
    assert dciodvfy_problems(sr_path) == []
    res = subprocess.run([_need("dsr2xml"), str(sr_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "<report" in res.stdout, res.stderr[-2000:]
    meta = tid1500(sr_path, tmp_path / "sr.json")
    segment_groups = [m for m in meta["Measurements"] if "ReferencedSegment" in m]
    assert [m["ReferencedSegment"] for m in segment_groups] == [s.segment_number for s in findings.segments]
    for group, sm in zip(segment_groups, findings.segments):
        vol_item = next(i for i in group["measurementItems"] if i["quantity"]["CodeMeaning"] == "Volume")
        assert vol_item["units"]["CodeValue"] == "ml"
        assert float(vol_item["value"]) == pytest.approx(sm.volume_ml, rel=1e-6)
        assert group["SourceSeriesForImageSegmentation"] == case.src[0].SeriesInstanceUID


def test_quarantine_sr_passes_validators(tmp_path: Path) -> None:
    src = CASES[0].src
    sr = build_sr(src, None, ReportFindings(quarantine_reason="gap", quarantine_kind="geometry"), CFG)
    path = _save(sr, tmp_path / "quarantine.dcm")
    assert dciodvfy_problems(path) == []
    res = subprocess.run([_need("dsr2xml"), str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "reason=gap" in res.stdout
    tid1500(path, tmp_path / "q.json")


def test_dciodvfy_check_is_not_blind(tmp_path: Path) -> None:
    """The helper does report problems: a SEG with a required attribute removed fails."""
    seg = build_seg(CASES[0].src, CASES[0].predictions, CFG)
    del seg.SegmentSequence[0].SegmentLabel
    assert dciodvfy_problems(_save(seg, tmp_path / "broken.dcm"))
