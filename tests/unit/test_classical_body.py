"""The served body model (classical until the trained one lands), in-process, on the real scans in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dicomnode.infer import tiling
from dicomnode.infer.models import load_manifest
from dicomnode.series.convert import load_input
from inference.classical_body import build_onnx

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "triton_models" / "body"


@pytest.fixture(scope="module")
def body():
    m = load_manifest(MODEL / "labels.json")
    sess = ort.InferenceSession(str(MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return m, (lambda x: sess.run(None, {m.input_name: x})[0])


def _segment(vol, m, predict, modality="CT"):
    grid = tiling.to_model_grid(vol, m)
    labels, _ = tiling.predict_volume(tiling.normalise(grid.array, m, modality), m, predict)
    return grid, tiling.postprocess(labels, m)  # the node's path (client.segment_native)


def test_served_graph_is_the_one_the_code_builds() -> None:
    m = load_manifest(MODEL / "labels.json")
    if m.extra.get("method") != "classical":
        pytest.skip("the served body model is the trained one now")
    assert (MODEL / "1" / "model.onnx").read_bytes() == build_onnx()
    assert "CLASSICAL" in m.description


def test_ct_body_contains_the_organs_and_leaves_air_and_table_out(body, shared_data: Path) -> None:
    m, predict = body
    ts = shared_data / "totalsegmentator"
    vol = load_input(ts / "example_ct.nii.gz")
    organs = load_input(ts / "example_seg_fast_force_split.nii.gz")
    grid, labels = _segment(vol, m, predict)
    org = tiling.to_model_grid(organs, m).array > 0.5  # same canonical grid (exact regrid)
    assert labels[org].mean() > 0.99
    hu = grid.array
    assert np.median(hu[labels == 0]) < -900
    assert -150 < np.median(hu[labels == 1]) < 150
    assert (hu[labels == 1] < -900).mean() < 0.05  # little air inside (bowel gas only)


def test_mr_body_contains_the_organs(body, shared_data: Path) -> None:
    m, predict = body
    ts = shared_data / "totalsegmentator"
    vol = load_input(ts / "example_mr_sm.nii.gz", modality="MR")
    organs = load_input(ts / "example_seg_mr.nii.gz", modality="MR")
    _, labels = _segment(vol, m, predict, "MR")
    org = tiling.to_model_grid(organs, m).array > 0.5
    assert labels[org].mean() > 0.99
    assert 0.3 < labels.mean() < 0.95


@pytest.mark.parametrize("value", [-500.0, 0.0, 40.0])
def test_a_constant_region_beside_the_field_of_view_is_not_body(body, shared_data: Path, value: float) -> None:
    """The seed paper's failure mode: an artificial boundary to a constant-valued region."""
    m, predict = body
    vol = load_input(shared_data / "totalsegmentator" / "example_ct.nii.gz")
    grid, base = _segment(vol, m, predict)
    padded = np.pad(grid.array, ((0, 0), (0, 0), (0, 40)), constant_values=value)
    labels, _ = tiling.predict_volume(tiling.normalise(padded, m, "CT"), m, predict)
    assert labels[:, :, -40:].mean() < 0.01
    np.testing.assert_array_equal(labels[:, :, :-40], base)
