"""CT / MR synthesis from label maps, label omission, normalisation and targets."""
from __future__ import annotations

import numpy as np
import pytest

from inference import synth
from inference.phantom import LABELS as L
from inference.phantom import generate_phantom


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    lab, _ = generate_phantom(21, "abdomen", 3.0)
    return lab[20:68]


def test_ct_tissue_values(chest: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    hu = synth.ct_from_labels(chest, rng)
    assert hu.shape == chest.shape and hu.dtype == np.float32 and np.isfinite(hu).all()
    med = lambda n: float(np.median(hu[chest == L[n]]))  # noqa: E731
    assert med("fat") < -40 < med("muscle") < 150
    assert 0 < med("liver") < 250
    assert med("gas") < -700
    thorax, _ = generate_phantom(22, "chest", 3.0)
    thorax = thorax[30:70]
    hu_t = synth.ct_from_labels(thorax, np.random.default_rng(1))
    assert np.median(hu_t[thorax == L["left_lung"]]) < -600
    assert np.median(hu_t[thorax == L["right_lung"]]) < -600
    assert np.median(hu[chest == L["lumbar_vertebrae"]]) > 120
    assert np.median(hu[chest == 0]) < -900


def test_outside_fov_is_constant_and_varies_between_samples() -> None:
    lab = np.zeros((24, 40, 40), np.int16)
    lab[:, 10:30, 10:30] = L["muscle"]
    lab[:, :, 35:] = L["outside_fov"]
    values = set()
    for s in range(12):
        hu = synth.ct_from_labels(lab, np.random.default_rng(s))
        region = hu[:, :, 37:]  # away from the blurred edge
        assert region.std() < 1e-3
        values.add(round(float(region.mean())))
        assert hu[:, 10:30, 10:30].std() > 1.0  # tissue has noise
    assert len(values) > 2


def test_omit_labels_and_targets(chest: np.ndarray) -> None:
    out = synth.omit_labels(chest, np.random.default_rng(0), p=1.0)
    for v in range(12, 20):
        assert not (out == v).any()
    assert (out == L["lumbar_vertebrae"]).sum() == (chest == L["lumbar_vertebrae"]).sum()  # bones kept
    t = synth.ctarr_target(chest)
    assert t.max() <= 19 and set(np.unique(t)) <= set(range(20))
    assert (t == 15).sum() == (chest == L["liver"]).sum()
    b = synth.body_target(np.array([0, L["table"], L["outside_fov"], L["fat"], L["gas"], L["liver"]]))
    assert b.tolist() == [0, 0, 0, 1, 1, 1]


def test_windows_zscore_and_mr(chest: np.ndarray) -> None:
    hu = np.array([-2000.0, -500.0, 0.0, 1300.0, 3000.0], np.float32)
    w = synth.window_channels(hu, ((-500, 1300), (-1024, 150), (-150, 250)))
    assert w.shape == (3, 5) and w.min() >= 0 and w.max() <= 1
    assert w[0].tolist() == [0.0, 0.0, pytest.approx(500 / 1800), 1.0, 1.0]
    mr = synth.mr_from_labels(chest, np.random.default_rng(1))
    assert np.isfinite(mr).all() and mr.min() >= 0
    assert np.median(mr[chest == 0]) < np.median(mr[(chest != 0) & (chest != L["gas"])])
    z = synth.zscore(mr)
    assert z.shape == (1, *mr.shape) and abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3


def test_constant_suppression_forces_background_only_on_flat_unclipped_input() -> None:
    """inference.unet.ConstantSuppressed: padding-like flat regions become class 0, tissue does not."""
    import torch
    from inference.unet import ConstantSuppressed

    class AlwaysBody(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.zeros_like(x[:, :1])
            return torch.cat([z, z + 5.0], 1)  # every voxel says "body"

    x = torch.from_numpy(np.random.default_rng(1).normal(0.4, 0.01, (1, 1, 8, 12, 12)).astype(np.float32))
    x[..., 6:] = 0.0          # constant padding (e.g. -1024 HU after windowing)
    x[:, :, 2:6, 2:5, 2:5] = 1.0  # a clipped implant inside the tissue: flat but at the upper clip
    out = ConstantSuppressed(AlwaysBody())(x).argmax(1)[0]
    assert (out[:, :, 7:] == 0).all()            # inside the padding: background
    assert (out[:, :, :5] == 1).all()            # noisy tissue (and the clipped implant): body
    assert (out[3:5, 3, 3] == 1).all()
