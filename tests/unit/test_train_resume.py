"""Training runs a few steps, checkpoints, resumes where it stopped, and exports a valid Triton model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dicomnode.infer.models import load_manifest
from inference import train
from inference.zoo import SPECS


def test_train_resume_export(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["body", "--out", str(out), "--pool", "1", "--patch", "16", "32", "32", "--batch", "1",
            "--threads", "1", "--ckpt-every", "1"]
    assert train.main(args + ["--steps", "2"]) == 0
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2
    w2 = {k: v.clone() for k, v in ck["net"].items()}
    assert train.main(args + ["--steps", "3", "--resume"]) == 0
    ck3 = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck3["step"] == 3
    assert any(not torch.equal(w2[k], ck3["net"][k]) for k in w2)  # it kept training
    log = (out / "train.log").read_text()
    assert "resumed at step 2" in log and "finished at step 3" in log
    assert json.loads((out / "done.json").read_text())["step"] == 3

    spec = SPECS["body"]
    folder = train.export(spec, out, repo=tmp_path / "repo")
    m = load_manifest(folder / "labels.json")
    assert m.name == "body" and m.n_classes == 2 and m.extra["train_steps"] == 3
    assert (folder / "1" / "model.onnx").stat().st_size < 25 * 2**20
    assert (folder / "config.pbtxt").read_text().count('backend: "python"') == 1

    import onnxruntime as ort
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 1, 24, 40, 32), dtype=np.float32)  # any multiple of 8
    y = sess.run(None, {"INPUT": x})[0]
    assert y.shape == (1, 2, 24, 40, 32)
    net, _ = train.load_net(spec, out)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-3)


def test_loss_and_schedule() -> None:
    logits = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    y = torch.zeros(1, 4, 4, 4, dtype=torch.long); y[0, :2] = 1; y[0, 3, 3, 3] = 255
    loss = train.seg_loss(logits, y)
    loss.backward()
    assert loss.item() > 0 and logits.grad is not None and torch.isfinite(logits.grad).all()
    perfect = torch.full((1, 3, 4, 4, 4), -20.0)
    perfect[:, 0][y == 0] = 20; perfect[:, 1][y == 1] = 20
    assert train.seg_loss(perfect, y).item() < 0.01
    assert train.lr_at(0, 100, 1.0) < train.lr_at(49, 100, 1.0) == 1.0
    assert train.lr_at(100, 100, 1.0) == 0.05


def test_snapshots_are_kept_and_averaged(tmp_path: Path) -> None:
    """``--keep-every`` keeps the weights of every Nth step; ``--export --average`` exports their mean."""
    out = tmp_path / "run"
    args = ["body", "--out", str(out), "--pool", "1", "--patch", "16", "32", "32", "--batch", "1",
            "--threads", "1", "--keep-every", "2"]
    assert train.main(args + ["--steps", "4"]) == 0
    assert sorted(f.name for f in out.glob("snap-*.pt")) == ["snap-2.pt", "snap-4.pt"]
    s2, s4 = (torch.load(out / f"snap-{i}.pt", weights_only=True) for i in (2, 4))
    spec = SPECS["body"]
    assert train.load_net(spec, out, average=1)[1]["averaged_steps"] == [4]  # the last N only
    net, ck = train.load_net(spec, out, average=10)
    assert ck["averaged_steps"] == [2, 4]
    k = next(k for k in s2 if s2[k].is_floating_point() and not torch.equal(s2[k], s4[k]))
    torch.testing.assert_close(net.state_dict()[k], (s2[k] + s4[k]) / 2)
    folder = train.export(spec, out, repo=tmp_path / "repo", average=10)
    assert "2, 4" in load_manifest(folder / "labels.json").extra["weights"]
    for f in out.glob("snap-*.pt"):
        f.unlink()
    import pytest
    with pytest.raises(FileNotFoundError):
        train.load_net(spec, out, average=10)


def test_anatomy_patches_come_in_the_node_slice_order() -> None:
    """anatomy19 and liver see every patch head -> feet like the node's model grid; the others flip at random."""
    ramp = np.broadcast_to(np.arange(1, 65, dtype=np.int16)[:, None, None], (64, 8, 8)).copy()  # head -> feet
    pool = train.Pool([ramp], ["ramp"])

    def order(p: np.ndarray) -> int:  # +1 head -> feet, -1 feet -> head (0 = padding outside the map)
        v = p[:, 4, 4].astype(int); v = v[v > 0]
        return int(np.sign(np.diff(v)).mean())
    rng = np.random.default_rng(0)
    assert {order(train.sample_labels(pool, rng, (8, 8, 8), fg_p=0.0, zoom=(1.0, 1.0), flip_p=0.0)) for _ in range(20)} == {1}
    seen = [order(train.sample_labels(pool, rng, (8, 8, 8), fg_p=0.0, zoom=(1.0, 1.0))) for _ in range(40)]
    assert 5 < seen.count(-1) < 35 and seen.count(-1) + seen.count(1) == 40
    assert {"anatomy19", "liver"} <= train.NODE_ORDER and "body" not in train.NODE_ORDER
    from dicomnode.infer.tiling import CANONICAL_DIRECTION
    assert CANONICAL_DIRECTION[2, 0] < 0  # the model grid's slices run towards the feet (-z), like the maps


def test_growing_a_full_resolution_path_keeps_what_the_network_computes() -> None:
    """A stem network grown by the full-resolution path (``refine``) from a checkpoint without it
    computes exactly what it did (the path's last layer starts at zero) and then trains the path;
    any other mismatch between checkpoint and network is refused; a path without a stem is refused."""
    import pytest

    from inference.unet import UNet3D
    torch.manual_seed(0)
    old = UNet3D(3, 5, base=4, stages=2, stem=2).eval()
    grown = UNet3D(3, 5, base=4, stages=2, stem=2, refine=4, refine_k=3)
    assert train.load_grown(grown, old.state_dict()) is True
    assert train.load_grown(UNet3D(3, 5, base=4, stages=2, stem=2), old.state_dict()) is False
    x = torch.rand(1, 3, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x), old(x))
    grown.train()
    train.seg_loss(grown(x), torch.randint(0, 5, (1, 8, 12, 12))).backward()
    assert grown.fine_head[-1].weight.grad.abs().sum() > 0  # the path learns from the first step
    with pytest.raises(RuntimeError):
        train.load_grown(UNet3D(3, 5, base=8, stages=2, stem=2, refine=4), old.state_dict())
    with pytest.raises(ValueError):
        UNet3D(3, 5, base=4, stages=2, refine=4)
