"""The exported (trained) models in triton_models/, run in onnxruntime on real and constructed inputs.

Includes the failure mode the foreground seed paper names: a large field of view with an
artificial boundary between air and a constant-valued region must not become foreground.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "triton_models"


def _model(name: str):
    from inference.evaluate import Model
    folder = REPO / name
    if not (folder / "1" / "model.onnx").exists():
        pytest.skip(f"{name} is not exported in triton_models/")
    m = Model(folder, threads=1)
    if m.manifest.extra.get("method") == "classical":
        pytest.skip(f"{name} is the classical placeholder, not the trained model")
    return m


def test_onnx_sizes_and_manifests() -> None:
    from dicomnode.infer.models import load_manifest
    found = 0
    for name in ("anatomy19", "body", "liver", "face_area"):
        f = REPO / name / "1" / "model.onnx"
        if f.exists():
            found += 1
            assert f.stat().st_size < 25 * 2**20
            m = load_manifest(REPO / name / "labels.json")
            assert m.pad_multiple >= 1 and m.output_kind in ("logits", "probabilities")
    if not found:
        pytest.skip("no model exported")


def test_body_constant_region_is_not_foreground(shared_data: Path) -> None:
    from inference import realdata
    model = _model("body")
    s = realdata.load_scan("example_ct_sm")
    ref = realdata.body_mask_ct(s.image)
    z, y, x = s.image.shape
    big = np.full((z, y + 96, x + 96), -1000.0, np.float32)
    big += np.random.default_rng(0).normal(0, 15, big.shape).astype(np.float32)  # air with noise
    big[:, 48:48 + y, 48:48 + x] = s.image
    big[:, :, x + 72:] = 0.0           # a constant-valued region (0 HU) beside real air
    big[:, y + 80:, :] = -2048.0       # and a constant padding region below
    pred, _ = model.predict(big, "CT")
    assert (pred[:, :, x + 74:] == 1).mean() < 0.01
    assert (pred[:, y + 82:, :] == 1).mean() < 0.01
    core = pred[:, 48:48 + y, 48:48 + x] == 1
    d = 2 * (core & ref).sum() / (core.sum() + ref.sum())
    assert d > 0.9


def test_body_on_mr_is_plausible(shared_data: Path) -> None:
    from inference import realdata
    model = _model("body")
    s = realdata.load_scan("example_mr")
    pred, _ = model.predict(s.image, "MR")
    organs = (s.labels > 0) & (s.labels < 20)
    assert (pred[organs] == 1).mean() > 0.9  # labelled organs are inside the body
    assert 0.1 < (pred == 1).mean() < 0.9


def test_anatomy19_left_right_on_real_ct(shared_data: Path) -> None:
    """Kidneys and lungs found on both sides of the real example_ct, each on its own side, and the
    liver on the patient's right (the step-2650 export found no kidney at all; steps 4450, 9000, 13000, the
    mean of 13500-15000 and a19x do)."""
    from inference import realdata
    model = _model("anatomy19")
    s = realdata.load_scan("example_ct")
    pred, _ = model.predict(s.image, "CT")
    col = lambda v: np.argwhere(pred == v)[:, 2].mean()  # noqa: E731  columns run right -> left
    for left, right in ((17, 18), (9, 10)):
        assert (pred == left).sum() > 50 and (pred == right).sum() > 50
        assert col(left) > col(right)
    assert (pred == 15).sum() > 500 and col(15) < pred.shape[2] / 2  # liver on the patient's right


def test_anatomy19_on_real_ct(shared_data: Path) -> None:
    """Mean Dice over the 19 classes present in the real example_ct (held out: training saw
    phantoms and example_mr's label map). docs/models.md has the per-class figures."""
    from inference.evaluate import eval_anatomy
    eval_r = eval_anatomy(_model("anatomy19"))
    r = eval_r["example_ct"]
    assert r["mean"] >= MIN_ANATOMY19_MEAN_DICE, r
    # the liver class of anatomy19 (the node's liver mask comes from the liver model on the CTARR
    # crop, 0.88 end to end): 0.81 with step 9000, 0.78 with step 13000, 0.82 with the mean of steps
    # 13500-15000
    assert r["per_class"]["liver"] >= 0.75, r
    shares = r["reference_voxels_labelled"]["liver"]  # where the liver's voxels went: shares of one
    # each share is rounded to 3 decimals, so three of them may add up to 1.0015
    assert set(r["reference_voxels_labelled"]) == set(r["per_class"]) and sum(shares.values()) <= 1.0015
    assert shares["liver"] >= 0.65  # Dice >= 0.75 needs most of the reference liver labelled liver (0.68)
    # the network's fit to its own training distribution (unseen phantoms): measured 0.88-0.91 per
    # phantom (a19x; 0.81-0.87 before the full-resolution path); a phantom/synthesis change that no longer matches the trained network shows here
    syn = eval_r["synthetic_unseen"]
    assert syn["mean"] >= 0.75 and min(syn["mean_dice"]) >= 0.7, syn


MIN_ANATOMY19_MEAN_DICE = 0.58  # measured 0.667 (a19x, mean of steps 16500-18000; mean of steps 13500-15000: 0.639, slices in the node's order; step 13000: 0.606, step 9000: 0.514); the goal of issue 5 is 0.85


def test_liver_on_real_ct(shared_data: Path) -> None:
    """The liver model on a crop around the reference liver of the real example CT (held out:
    training saw phantoms and example_mr's label map only). docs/models.md has the figure."""
    from inference.evaluate import eval_liver
    r = eval_liver(_model("liver"))["example_ct"]
    assert r["dice"] >= MIN_LIVER_DICE, r


MIN_LIVER_DICE = 0.86  # measured 0.894 (step 3000); the goal of issue 5 is 0.93


def test_face_area_on_the_held_out_real_head(shared_data: Path) -> None:
    """face_area on the real MR heads, defaced/refaced/blurred as in training; chris_t1 was never
    trained on. On the intact heads (nothing altered) it must stay nearly silent."""
    from inference.evaluate import eval_face_area
    r = eval_face_area(_model("face_area"))
    assert r["held_out_mean"] >= MIN_FACE_AREA_HELD_OUT_DICE, r
    held = r["chris_t1"]
    assert held["intact_predicted_voxels"] < 0.02 * held["region_voxels"], held  # measured 24 of 26639 (mean of steps 9000-10500)
    assert held["dice"]["deface"] >= 0.85, held  # the hardest mode: measured 0.907


MIN_FACE_AREA_HELD_OUT_DICE = 0.93  # measured 0.959 (mean of steps 9000-10500; 0.945 before; docs/models.md); the goal of issue 5 is 0.95
