"""``run_series`` on a real CT, with the segmentation models replaced by the reference labels.

This checks the pipeline's own logic - CTARR registration on the anatomy, orientation check and
correction, region crops on the real boxes, region model on the crop, paste back, SEG + SR on
the source frames, summary - independently of how good the trained models are. The segmenter
here answers with TotalSegmentator's reference labels for the pixels it is given (looked up in
the source instance each came from, so it follows the *content*, not the header); the real Triton path is tested
end to end in tests/e2e (the only place a fake peer is allowed: where the real one is also tested).

The second case corrupts the header: slice positions reversed, so the anatomy is upside down
relative to the header. The pipeline must detect the z flip from the anatomy, process in the
corrected orientation and still put the liver back onto the right source pixels.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicomnode.config import PROJECT_ROOT, parse_config
from dicomnode.infer import tiling
from dicomnode.infer.models import Prediction, load_manifest
from dicomnode.node_services import DirectorySource, FolderSink, build_context
from dicomnode.pipeline import run_series
from dicomnode.results.reading import read_seg
from dicomnode.store.records import Job
from dicomnode.volume import Volume, resample
from tests.ct_dicom import nifti_to_dicom, reference_on_series

pytestmark = pytest.mark.integration

CONFIG = {
    "triton": {"url": "127.0.0.1:1"},  # never contacted: the segmenter below stands in
    "pipelines": [{"name": "ct", "modalities": ["CT"], "models": ["body", "anatomy19"],
                   "regions": ["liver", "spleen", "kidneys", "urinary_bladder", "brain"],
                   "region_models": ["liver:liver"]}],
}


class ReferenceSegmenter:
    """Answers like ``InferenceClient`` with the reference labels of the pixels it is given.

    Each voxel it receives is looked up in the source instance it came from (through the headers'
    coordinates), so the answer follows the anatomy whatever the header or the pipeline's
    reorientation says - also for the 8 turns of the orientation check.
    """

    def __init__(self, manifests: dict[str, Any], by_sop: dict[str, dict[str, np.ndarray]], files: list[Path]) -> None:
        from dicomnode.series.convert import read_series

        self.manifests = manifests
        src = read_series(files)
        self.src_image = np.asarray(src.array)
        self.src_affine = src.affine
        self.src_labels = {m: np.stack([t[f.sop_instance_uid] for f in src.source]).astype(np.int16)
                           for m, t in by_sop.items()}
        self.calls: list[tuple[str, tuple[int, int, int]]] = []

    def _by_position(self, volume: Volume, model: str) -> np.ndarray:
        """The reference labels at ``volume``'s voxels, found through the headers' coordinates
        (``header_affine``): a voxel of a turned or corrected volume is looked up where its pixel
        came from, so the answer follows the content like a perfectly rotation-consistent model."""
        ref = Volume(self.src_labels[model], self.src_affine)
        return np.asarray(resample(ref, volume.header_affine, volume.shape, order=0, cval=0).array).astype(np.int16)

    def manifest(self, model: str) -> Any:
        return self.manifests[model]

    def segment_native(self, volume: Volume, model: str) -> Prediction:
        m = self.manifests[model]
        grid = tiling.to_model_grid(volume, m)
        self.calls.append((model, grid.shape))
        if model == "body":
            return Prediction(grid.with_array((np.asarray(grid.array) > -500).astype(np.int16)), m)
        return Prediction(grid.with_array(self._by_position(grid, model)), m)

    def segment(self, volume: Volume, model: str) -> Prediction:
        self.calls.append((model, volume.shape))
        if model == "body":
            labels = (np.asarray(volume.array) > -500).astype(np.int16)
        else:
            labels = self._by_position(volume, model)
        return Prediction(volume.with_array(labels), self.manifests[model])


def _manifests(tmp: Path) -> dict[str, Any]:
    from inference.zoo import SPECS, manifest

    out = {}
    for name in ("body", "anatomy19", "liver"):
        p = tmp / name / "labels.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(manifest(SPECS[name])))
        out[name] = load_manifest(p)
    return out


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("flow")
    ts = shared_data / "totalsegmentator"
    series = nifti_to_dicom(ts / "example_ct.nii.gz", tmp / "ct")
    ref = reference_on_series(ts / "example_seg_fast_force_split.nii.gz", series)
    from dicomnode.anatomy.atlas import load_totalseg_class_map, map_totalseg

    ctarr = map_totalseg(ref, load_totalseg_class_map(ts / "class_maps.json"))
    liver = (ref == 5).astype(np.int16)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files]
    by_sop = {"anatomy19": {s: ctarr[k] for k, s in enumerate(sops)},
              "liver": {s: liver[k] for k, s in enumerate(sops)}}
    return tmp, series, by_sop, liver, sops


def _run(tmp: Path, files: list[Path], by_sop: dict[str, Any], out: Path,
         config: dict[str, Any] = CONFIG) -> tuple[Any, ReferenceSegmenter, FolderSink]:
    cfg = parse_config(config)
    seg = ReferenceSegmenter(_manifests(tmp / "manifests"), by_sop, files)
    sink = FolderSink(out)
    ctx = build_context(cfg, seg, DirectorySource(files), sink)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    job = Job(1, str(first.SeriesInstanceUID), str(first.StudyInstanceUID), 1, "processing", 1, 0.0, 0.0, None,
              "test", "", "{}")
    return run_series(job, ctx), seg, sink


def _liver_from_seg(out: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    ds = pydicom.dcmread(out / "seg.dcm")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    reading = read_seg(ds, headers)
    livers = [s.number for s in reading.segments if s.label == "liver" and s.algorithm_name == "liver"]
    assert len(livers) == 1, [(s.number, s.label, s.algorithm_name) for s in reading.segments]
    return reading.mask(livers[0]), [f.sop_instance_uid for f in reading.grid.source]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def test_flow_on_a_real_ct(ct) -> None:  # type: ignore[no-untyped-def]
    tmp, series, by_sop, liver, sops = ct
    out = tmp / "out-plain"
    outcome, seg, sink = _run(tmp, list(series.files), by_sop, out)
    assert outcome.state == "done", (outcome.reason, outcome.detail)
    s = outcome.summary.to_json()
    o = s["orientation"]
    assert o["checked"] and o["verified"] and o["matches_header"] and not o["corrected"], o
    regions = {r["name"]: r for r in s["regions"]}
    assert {"liver", "spleen", "kidneys", "urinary_bladder"} <= set(regions)
    assert "brain" in s["qc"]["regions_outside_image"]  # an abdominal CT does not show the brain
    # the liver crop contains (nearly) the whole reference liver, and is much smaller than the scan
    lo, hi = regions["liver"]["lower"], regions["liver"]["upper"]
    inside = np.count_nonzero(liver[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]) / np.count_nonzero(liver)
    assert inside > 0.97, inside
    assert np.prod(np.subtract(hi, lo)) < 0.6 * np.prod(series.shape)
    # the liver model ran on the crop, not the whole scan
    liver_calls = [shape for model, shape in seg.calls if model == "liver"]
    assert liver_calls == [tuple(int(h - l) for l, h in zip(lo, hi))]
    # SEG on the source frames: the pasted-back liver is the reference liver
    mask, order = _liver_from_seg(out, list(series.files))
    ref = np.stack([by_sop["liver"][u] for u in order]) > 0
    assert _dice(mask, ref) > 0.98
    vols = {(x["model"], x["label"]): x["volume_ml"] for x in s["segments"]}
    ref_ml = np.count_nonzero(liver) * 27.0 / 1000.0
    assert abs(vols[("liver", "liver")] - ref_ml) < 0.02 * ref_ml
    assert s["qc"]["ok"] in (True, False) and "residual_mm" in s["qc"]
    assert {"seg.dcm", "sr.dcm"} <= {p.name for p in sink.written}
    stages = [n for n, _ in outcome.timings]
    assert stages[:4] == ["select", "convert", "orient", "infer:anatomy19"] and "infer:liver" in stages


def test_flipped_header_is_detected_and_corrected(ct) -> None:  # type: ignore[no-untyped-def]
    tmp, series, by_sop, liver, sops = ct
    folder = tmp / "flipped"
    folder.mkdir()
    positions = [pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in series.files]
    files = []
    new_uid = pydicom.uid.generate_uid()
    for k, f in enumerate(series.files):  # same pixels, slice positions reversed: anatomy upside down
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = positions[len(positions) - 1 - k]
        ds.SeriesInstanceUID = new_uid
        ds.save_as(folder / f.name, enforce_file_format=True)
        files.append(folder / f.name)
    out = tmp / "out-flipped"
    outcome, _, _ = _run(tmp, files, by_sop, out)
    assert outcome.state == "done", (outcome.reason, outcome.detail)
    o = outcome.summary.to_json()["orientation"]
    assert o["verified"] and o["z_flip"] and not o["matches_header"] and o["corrected"], o
    assert "orient:correct" in [n for n, _ in outcome.timings]
    mask, order = _liver_from_seg(out, files)
    ref = np.stack([by_sop["liver"][u] for u in order]) > 0
    assert _dice(mask, ref) > 0.98  # corrected processing, results still on the right source pixels


def test_series_without_a_pipeline_is_quarantined_with_an_sr(ct) -> None:  # type: ignore[no-untyped-def]
    tmp, series, by_sop, liver, sops = ct
    out = tmp / "out-mr-only"
    mr_only = {**CONFIG, "pipelines": [{"name": "mr", "modalities": ["MR"], "models": ["body"]}]}
    outcome, seg, sink = _run(tmp, list(series.files), by_sop, out, mr_only)
    assert outcome.state == "quarantined" and outcome.reason == "unsupported:no_pipeline"
    assert outcome.outputs == ("sr",) and [p.name for p in sink.written] == ["sr.dcm"]
    assert seg.calls == []  # nothing was segmented
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.StudyInstanceUID == series.study_uid
    values = [str(e.value) for e in sr.iterall() if e.keyword in ("CodeValue", "CodeMeaning", "TextValue")]
    assert any("no_pipeline" in v.lower() for v in values), values


def test_orientation_check_off_runs_the_anatomy_model_once(ct) -> None:  # type: ignore[no-untyped-def]
    """``[anatomy] check_orientation = false``: one anatomy19 run, the header kept and reported as
    not checked (no orientation finding in the SR); with the check on, the model sees the 8 turns."""
    tmp, series, by_sop, liver, sops = ct
    outcome, seg, _ = _run(tmp, list(series.files), by_sop, tmp / "out-nocheck",
                           {**CONFIG, "anatomy": {"check_orientation": False}})
    assert outcome.state == "done", (outcome.reason, outcome.detail)
    o = outcome.summary.to_json()["orientation"]
    assert not o["checked"] and o["method"] == "header" and not o["verified"] and not o["corrected"], o
    assert [m for m, _ in seg.calls].count("anatomy19") == 1
    assert "liver" in {r["name"] for r in outcome.summary.to_json()["regions"]}  # crops still made
    _, seg_on, _ = _run(tmp, list(series.files), by_sop, tmp / "out-check")
    assert [m for m, _ in seg_on.calls].count("anatomy19") == 8
