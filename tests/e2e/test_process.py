"""``dicomnode process SERIES_DIR --out OUT_DIR --config FILE`` on a real CT with a real local Triton."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.ct_dicom import CANARY_ID, CANARY_NAME, nifti_to_dicom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DICOMNODE = ROOT / ".venv" / "bin" / "dicomnode"


def _config(path: Path, models: tuple[str, ...], modalities: tuple[str, ...] = ("CT",)) -> Path:
    path.write_text(
        f'[node]\ndata_dir = "{path.parent / "var"}"\n[triton]\nurl = "local"\n'
        f'[[pipelines]]\nname = "p"\nmodalities = {json.dumps(list(modalities))}\nmodels = {json.dumps(list(models))}\n')
    return path


def test_process_writes_seg_sr_and_summary(tmp_path: Path, shared_data: Path) -> None:
    if not (ROOT / ".venv-triton" / "bin" / "python").exists():
        pytest.skip("local Triton venv missing (.venv-triton; scripts/setup.sh makes it)")
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_ct.nii.gz", tmp_path / "ct")
    out = tmp_path / "out"
    res = subprocess.run([str(DICOMNODE), "process", str(series.folder), "--out", str(out),
                          "--config", str(_config(tmp_path / "node.toml", ("body",)))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage" in res.stderr  # the tqdm progress bar went to stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "done" and summary["pipeline"] == "p"
    assert summary["shape"] == [112, 101, 122] and summary["header_orientation"] == "SPL"
    (body,) = [s for s in summary["segments"] if s["model"] == "body"]
    assert 10_000 < body["volume_ml"] < 40_000  # an adult abdomen + pelvis
    assert {"select", "convert", "infer:body", "results"} <= set(summary["stages_s"])
    assert summary["total_s"] >= sum(summary["stages_s"].values()) - 1e-3
    seg = pydicom.dcmread(out / "seg.dcm")
    sr = pydicom.dcmread(out / "sr.dcm")
    assert seg.Modality == "SEG" and sr.Modality == "SR" and seg.StudyInstanceUID == series.study_uid
    text = (out / "summary.json").read_text() + res.stderr
    for secret in (CANARY_NAME, CANARY_ID, series.series_uid, series.study_uid):
        assert secret not in text


def test_process_refuses_a_missing_configured_model(tmp_path: Path, shared_data: Path) -> None:
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "ct")
    res = subprocess.run([str(DICOMNODE), "process", str(series.folder), "--out", str(tmp_path / "out"),
                          "--config", str(_config(tmp_path / "node.toml", ("body", "no_such_model")))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no_such_model" in res.stderr and "missing from the model repository" in res.stderr


def test_process_quarantines_a_series_no_pipeline_takes(tmp_path: Path, shared_data: Path) -> None:
    if not (ROOT / ".venv-triton" / "bin" / "python").exists():
        pytest.skip("local Triton venv missing (.venv-triton; scripts/setup.sh makes it)")
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "ct")
    out = tmp_path / "out"
    res = subprocess.run([str(DICOMNODE), "process", str(series.folder), "--out", str(out), "--no-progress",
                          "--config", str(_config(tmp_path / "node.toml", ("body",), ("MR",)))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "quarantined" and summary["reason"] == "unsupported:no_pipeline"
    assert summary["files"] == ["sr.dcm"] and (out / "sr.dcm").is_file() and not (out / "seg.dcm").exists()


def test_process_runs_the_mr_pipeline_on_a_real_mr(tmp_path: Path, shared_data: Path) -> None:
    """The default config's pipeline choice: an abdominal MR gets body only (no CTARR), on the real MR."""
    if not (ROOT / ".venv-triton" / "bin" / "python").exists():
        pytest.skip("local Triton venv missing (.venv-triton; scripts/setup.sh makes it)")
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_mr_sm.nii.gz", tmp_path / "mr",
                            modality="MR", series_description="t1 abdomen")
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[triton]\nurl = "local"\n'
        '[[pipelines]]\nname = "ct-full"\nmodalities = ["CT"]\nmodels = ["body", "no_such_ct_model"]\n'
        '[[pipelines]]\nname = "mr-body"\nmodalities = ["MR"]\nmodels = ["body"]\n')
    # every configured model must exist, even one only CT would use: the node refuses to start
    res = subprocess.run([str(DICOMNODE), "process", str(series.folder), "--out", str(tmp_path / "x"),
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no_such_ct_model" in res.stderr
    cfg.write_text(cfg.read_text().replace(', "no_such_ct_model"', ""))
    out = tmp_path / "out"
    res = subprocess.run([str(DICOMNODE), "process", str(series.folder), "--out", str(out), "--no-progress",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] == "mr-body" and summary["modality"] == "MR"
    assert [s["model"] for s in summary["segments"]] == ["body"] and summary["segments"][0]["mean_hu"] is None
    assert not summary["orientation"]["checked"] and not any(k.startswith("infer:anatomy") for k in summary["stages_s"])
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
