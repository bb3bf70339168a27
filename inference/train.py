"""Train one model of the zoo on CPU: ``python -m inference.train MODEL --out runs/MODEL [--steps N] [--resume]``.

Data: a pool of procedural phantoms (:mod:`inference.phantom`) generated at start, patches cropped
with random zoom, z flips and label omission, synthesised on the fly into CT (or MR-like) images
(:mod:`inference.synth`); optionally real label maps (:mod:`inference.realdata`, ``--real``).
Loss: cross-entropy + soft Dice. AdamW, linear warm-up then cosine decay to ``--steps``.
Checkpoints ``OUT/ckpt.pt`` every ``--ckpt-every`` steps (atomic), log ``OUT/train.log``.
``--keep-every N`` also keeps the weights of every Nth step (``OUT/snap-STEP.pt``).
``--export`` writes ``OUT/model.onnx`` and the Triton model folder (inference.triton_repo);
with ``--average``, from the mean of the kept snapshots (weight averaging along the run).
Exit codes: 0 done, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from inference import synth
from inference.phantom import FOVS, LABELS, generate_phantom
from inference.unet import ConstantSuppressed, UNet3D, export_onnx, n_params
from inference.zoo import SPECS, ModelSpec, manifest


# ---- data ---------------------------------------------------------------------------------------
class Pool:
    """Label maps plus per-class voxel coordinates for foreground-biased patch sampling."""

    def __init__(self, maps: list[np.ndarray], names: list[str]) -> None:
        self.maps, self.names = maps, names
        rng = np.random.default_rng(0)
        self.coords: list[dict[int, np.ndarray]] = []
        for m in maps:
            flat = m.ravel()
            idx = np.flatnonzero((flat >= 1) & (flat <= 19))
            idx = idx[rng.choice(len(idx), min(len(idx), 40000), replace=False)] if len(idx) else idx
            vals = flat[idx]
            d = {}
            for v in np.unique(vals):
                pts = np.stack(np.unravel_index(idx[vals == v][:500], m.shape), 1)
                d[int(v)] = pts
            self.coords.append(d)


def phantom_pool(n: int, spacing: float, fovs: tuple[str, ...], seed0: int) -> Pool:
    """``n`` phantoms cycling through ``fovs`` (seeds seed0..seed0+n-1)."""
    maps = [generate_phantom(seed0 + i, fovs[i % len(fovs)], spacing)[0] for i in range(n)]
    return Pool(maps, [f"phantom{seed0 + i}" for i in range(n)])


def crop_patch(lab: np.ndarray, centre: np.ndarray, size: tuple[int, ...], fill: int = 0) -> np.ndarray:
    """Crop ``size`` around ``centre`` (padding with ``fill`` outside the map)."""
    out = np.full(size, fill, lab.dtype)
    lo = np.asarray(centre) - np.asarray(size) // 2
    src = tuple(slice(max(l, 0), min(l + s, d)) for l, s, d in zip(lo, size, lab.shape))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = lab[src]
    return out


ROT_P = 0.0  # share of anatomy19 patches turned by 1-3 quarter turns in the axial plane (0.5 from
# step 2750 to 6000 lowered the mean Dice on example_ct from 0.34 to 0.23 - docs/models.md; off)


# Models that always see the slices in the node's order: head -> feet, the slice direction of the
# node's model grid (dicomnode.infer.tiling.CANONICAL_DIRECTION; to_model_grid gives every model
# that grid) and of the label maps, so their patches are never flipped and "up" means head. The
# others are flipped head-feet at random. (The run of 2026-12-05 trained anatomy19 and liver
# always flipped, feet -> head, on the mistaken belief that this was the node's order; see
# docs/models.md.)
NODE_ORDER = frozenset({"anatomy19", "liver"})


def sample_labels(pool: Pool, rng: np.random.Generator, patch: tuple[int, int, int], fg_p: float = 0.7,
                  zoom: tuple[float, float] = (0.85, 1.2), focus: int | None = None,
                  flip_p: float = 0.5) -> np.ndarray:
    """A random label patch (random map, foreground-biased centre, random zoom, z flip).

    ``focus``: a label value; when the map has it, foreground-biased centres are drawn from it
    (a region model sees what its crop would contain). ``flip_p``: probability of reversing the
    slices (the maps run head -> feet, as the node's model grid does; see ``NODE_ORDER``).
    """
    i = int(rng.integers(len(pool.maps)))
    lab, coords = pool.maps[i], pool.coords[i]
    f = rng.uniform(*zoom)
    size = tuple(int(math.ceil(p / f)) for p in patch)
    if coords and rng.random() < fg_p:
        key = focus if focus in coords else int(rng.choice(list(coords)))
        pts = coords[key]
        c = pts[rng.integers(len(pts))] + rng.integers(-12, 13, 3)
    else:
        c = np.array([rng.integers(0, s) for s in lab.shape])
    sub = crop_patch(lab, c, size)
    if size != patch:
        sub = ndi.zoom(sub, [p / s for p, s in zip(patch, size)], order=0)[:patch[0], :patch[1], :patch[2]]
        if sub.shape != patch:
            sub = crop_patch(sub, np.array(sub.shape) // 2, patch)
    if rng.random() < flip_p:
        sub = sub[::-1]
    return np.ascontiguousarray(sub)


def constant_region(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn the air beyond a random plane into the constant-valued 'outside_fov' region."""
    out = lab.copy()
    ax = int(rng.integers(1, 3)); n = lab.shape[ax]
    cut = int(rng.integers(n // 8, n - n // 8))
    sl = [slice(None)] * 3
    sl[ax] = slice(cut, None) if rng.random() < 0.5 else slice(0, cut)
    view = out[tuple(sl)]
    view[view == 0] = LABELS["outside_fov"]
    return out


def make_batch(spec: ModelSpec, pool: Pool, rng: np.random.Generator, real: Pool | None, real_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (x [B, C, z, y, x], y [B, z, y, x]) for ``spec``."""
    xs, ys = [], []
    for _ in range(spec.batch):
        use_real = real is not None and rng.random() < real_p
        if spec.name == "face_area":
            x, y = pool.sample(rng, spec.patch)  # type: ignore[attr-defined]
            if rng.random() < 0.5:
                x, y = x[:, ::-1].copy(), y[::-1].copy()
        elif spec.name == "body":
            lab = sample_labels(pool, rng, spec.patch, fg_p=0.5, zoom=(0.8, 1.25))
            if rng.random() < 0.35:
                lab = constant_region(lab, rng)
            y = synth.body_target(lab)
            if rng.random() < 0.7:
                x = synth.window_channels(synth.ct_from_labels(lab, rng), spec.windows)
            else:
                x = synth.zscore(synth.mr_from_labels(lab, rng)) * rng.uniform(0.8, 1.25) + rng.uniform(-0.3, 0.3)
        else:
            src = real if use_real else pool
            focus = LABELS["liver"] if spec.name == "liver" else None
            lab = sample_labels(src, rng, spec.patch, fg_p=0.85 if focus else 0.7, focus=focus,
                                flip_p=0.0 if spec.name in NODE_ORDER else 0.5)
            ignore = lab >= 100  # realdata.IGNORE_OFFSET + tissue: synthesised, not in the loss
            if ignore.any():
                lab = lab.copy(); lab[ignore] -= 100
            lab = synth.omit_labels(lab, rng, 0.08)
            y = synth.ctarr_target(lab)
            y[ignore] = 255
            if spec.name == "liver":
                y = (y == LABELS["liver"]).astype(np.int64)
                y[ignore] = 255
            x = synth.window_channels(synth.ct_from_labels(lab, rng), spec.windows)
            if spec.name == "anatomy19" and x.shape[-1] == x.shape[-2] and rng.random() < ROT_P:
                # a wrong header turns the array in the axial plane (CTARR's 8 configurations): the
                # model must still name the anatomies there for the orientation check to find it
                k = int(rng.integers(1, 4))
                x, y = np.rot90(x, k, axes=(-2, -1)).copy(), np.rot90(y, k, axes=(-2, -1)).copy()
        xs.append(x); ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


# ---- loss / schedule ------------------------------------------------------------------------------
def seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the classes present in the target or predicted (255 ignored)."""
    ce = F.cross_entropy(logits, y, ignore_index=255)
    valid = (y != 255).unsqueeze(1).float()
    p = logits.softmax(1) * valid
    oh = F.one_hot(y.clamp(max=logits.shape[1] - 1) * (y != 255), logits.shape[1]).permute(0, 4, 1, 2, 3).float() * valid
    dims = (0, 2, 3, 4)
    inter, den = (p * oh).sum(dims), p.sum(dims) + oh.sum(dims)
    keep = oh.sum(dims) > 0
    dice = (2 * inter + 1e-3) / (den + 1e-3)
    return ce + (1 - dice[keep]).mean()


def lr_at(step: int, total: int, base: float, warm: int = 50) -> float:
    """Linear warm-up then cosine decay to 5% of ``base`` at ``total``."""
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


# ---- main -----------------------------------------------------------------------------------------
def build_net(spec: ModelSpec) -> UNet3D:
    """A fresh network for ``spec``."""
    return UNet3D(spec.in_ch, spec.n_classes, spec.base, spec.stages, stem=spec.stem,
                  refine=spec.refine, refine_k=spec.refine_k)


def load_grown(net: UNet3D, state: dict) -> bool:
    """Load ``state`` into ``net``; a checkpoint without the full-resolution path (``fine.*``,
    ``fine_head.*``) of a network that has one is accepted - the path starts at zero, so the
    network computes what the checkpoint did. Returns True when the network was grown that way.
    Raises RuntimeError for any other mismatch."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("fine.", "fine_head.")) for k in missing):
        raise RuntimeError(f"checkpoint does not fit the network: missing {missing}, unexpected {unexpected}")
    return bool(missing)


def load_net(spec: ModelSpec, out: Path, average: int = 0) -> tuple[UNet3D, dict]:
    """Network with weights from ``out/ckpt.pt``, or with ``average`` = N the mean of the weights
    in the last N snapshots ``out/snap-*.pt`` (written by ``--keep-every``; the checkpoint still supplies
    the metadata). Raises FileNotFoundError when there is no checkpoint or, with ``average``, no
    snapshot."""
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    net = build_net(spec)
    if average:
        steps = sorted(int(f.stem.split("-")[1]) for f in out.glob("snap-*.pt"))[-average:]
        if not steps:
            raise FileNotFoundError(f"no snapshots snap-*.pt in {out}")
        states = [torch.load(out / f"snap-{i}.pt", map_location="cpu", weights_only=True) for i in steps]
        ck = {**ck, "net": {k: sum(st[k].float() for st in states) / len(states) for k in states[0]},
              "averaged_steps": steps}
    load_grown(net, ck["net"])
    return net.eval(), ck


def export(spec: ModelSpec, out: Path, repo: Path | None = None, average: int = 0) -> Path:
    """Export the checkpoint (``average``: the mean of the snapshots, see :func:`load_net`) to ONNX
    and write the Triton model folder; returns the folder. Raises FileNotFoundError (no checkpoint)."""
    from inference.triton_repo import PROJECT_REPO, write_model_dir

    net, ck = load_net(spec, out, average)
    post = {"weights": f"mean of the snapshots at steps {ck['averaged_steps']}"} if "averaged_steps" in ck else {}
    if spec.name == "body":  # the seed's constant-region failure mode, handled in the graph itself
        net = ConstantSuppressed(net).eval()
        post["postprocessing"] = "voxels with an exactly constant 3x3x3 input neighbourhood (below the window's upper clip) are background"
    data = export_onnx(net, spec.in_ch, out / "model.onnx")
    info = {"train_steps": int(ck["step"]), "train_seconds": round(float(ck.get("seconds", 0.0))),
            "parameters": n_params(net), "base_filters": spec.base, "stages": spec.stages, "stem": spec.stem,
            **({"refine_filters": spec.refine, "refine_kernel": spec.refine_k} if spec.refine else {}),
            "train_patch": list(spec.patch), "train_data": ck.get("data", ""), **post}
    return write_model_dir(repo or PROJECT_REPO, manifest(spec, info), data)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see module docstring."""
    ap = argparse.ArgumentParser(prog="python -m inference.train", description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(SPECS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", type=int, default=40, help="number of phantoms in the pool")
    ap.add_argument("--real", default="", help="comma-separated real label maps (inference.realdata names)")
    ap.add_argument("--real-p", type=float, default=0.3)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="override the training patch (z y x)")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size")
    ap.add_argument("--export", action="store_true", help="export the checkpoint and exit")
    ap.add_argument("--keep-every", type=int, default=0, help="also keep the weights every N steps as OUT/snap-STEP.pt")
    ap.add_argument("--average", type=int, nargs="?", const=10 ** 6, default=0, metavar="N",
                    help="with --export: export the mean of the last N (default: all) snap-*.pt weights")
    a = ap.parse_args(argv)
    spec = SPECS[a.model]
    if a.patch or a.batch:
        spec = dataclasses.replace(spec, patch=tuple(a.patch) if a.patch else spec.patch, batch=a.batch or spec.batch)
    torch.set_num_threads(max(1, a.threads))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.export:
        print(export(spec, a.out, average=a.average))
        return 0
    log = open(a.out / "train.log", "a", encoding="utf-8")

    def say(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n"); log.flush()

    net = build_net(spec)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    step, seconds, warm_from = 0, 0.0, 0
    if a.resume and (a.out / "ckpt.pt").exists():
        ck = torch.load(a.out / "ckpt.pt", map_location="cpu", weights_only=False)
        step, seconds = int(ck["step"]), float(ck.get("seconds", 0.0))
        if load_grown(net, ck["net"]):  # new parameters: fresh optimiser state, warmed up again
            warm_from = step
            say(f"resumed at step {step}, grown by a full-resolution path (zero at start); optimiser restarted")
        else:
            opt.load_state_dict(ck["opt"])
            say(f"resumed at step {step}")
    fovs = FOVS if spec.name == "body" else ("whole", "whole", "chest", "abdomen", "pelvis", "head")
    if spec.name == "liver":
        fovs = ("abdomen",)
    t0 = time.time()
    if spec.name == "face_area":
        from inference.face import FacePool
        pool = FacePool(a.pool, spec.spacing_mm, seed0=5000 + step)  # type: ignore[assignment]
        fovs = ("head",)
    else:
        pool = phantom_pool(a.pool, spec.spacing_mm, fovs, 1000 + a.seed * 10000 + step)
    real = None
    if a.real:
        from inference.realdata import real_pool
        real = real_pool(a.real.split(","), spec.spacing_mm)
    data_desc = ("2 real MR heads (brain1, brain2) + " if spec.name == "face_area" else "") + f"{a.pool} phantoms ({','.join(sorted(set(fovs)))})" + (f" + real label maps {a.real} (p={a.real_p})" if a.real else "")
    say(f"{spec.name}: {n_params(net)} parameters, pool {data_desc} built in {time.time() - t0:.1f}s, "
        f"steps {step}->{a.steps}, threads {a.threads}")
    rng = np.random.default_rng(a.seed * 7919 + step)
    net.train()
    ema, t_last = None, time.time()
    while step < a.steps:
        ts = time.time()
        x, y = make_batch(spec, pool, rng, real, a.real_p)
        td = time.time() - ts
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr) * (min(1.0, (step - warm_from + 1) / 100) if warm_from else 1.0)
        opt.zero_grad(set_to_none=True)
        loss = seg_loss(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        seconds += time.time() - ts
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            say(f"step {step} loss {loss.item():.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"data {td:.2f}s step {(time.time() - t_last) / 10:.2f}s")
            t_last = time.time()
        if step % a.ckpt_every == 0 or step == a.steps:
            tmp = a.out / "ckpt.pt.tmp"
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds,
                        "model": spec.name, "data": data_desc}, tmp)
            os.replace(tmp, a.out / "ckpt.pt")
        if a.keep_every and step % a.keep_every == 0:
            torch.save(net.state_dict(), a.out / f"snap-{step}.pt")
    (a.out / "done.json").write_text(json.dumps({"step": step, "seconds": round(seconds)}) + "\n")
    say(f"finished at step {step}, {seconds:.0f}s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
