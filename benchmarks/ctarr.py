"""CTARR benchmark: registration + box mapping + crop time, crop quality, organ-model speed-up.

Run:  .venv/bin/python benchmarks/ctarr.py [--repeats 7] [--threads 2]

1. Time (median of ``--repeats``) of registration + mapping every shipped region + cropping, per
   real scan of ../shared/data with its reference labels, and the median over the scans
   (paper: 0.10-0.21 s on an RTX 6000 Ada GPU).
2. On example_ct: share of each organ inside its crop and foreground fraction before -> after,
   for the shipped regions (in-sample: example_ct helped learn them) and for regions learned from
   phantoms only (held-out).
3. Organ-model inference on the liver crop vs the whole volume: the liver model through a local
   Triton when triton_models/liver exists; otherwise, as the paper did (randomly initialised
   networks), a 3D U-Net-like torch network on CPU at 1.5 mm. Prints the ratio.
4. Region boxes against the paper's (../shared/data/ctarr): size per axis and placement relative
   to the liver box centre.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas, load_totalseg_class_map, map_totalseg  # noqa: E402
from dicomnode.anatomy.register import register  # noqa: E402
from dicomnode.anatomy.regions import box_voxels_inside, crop_region, learn_region, load_regions, region_boxes  # noqa: E402
from dicomnode.series.convert import read_nifti  # noqa: E402
from dicomnode.volume import Volume, resample  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TS = DATA / "totalsegmentator"
ORGANS = {"liver": ("liver",), "spleen": ("spleen",), "kidneys": ("kidney_left", "kidney_right"),
          "urinary_bladder": ("urinary_bladder",)}
PHANTOM_CLASSES = {"liver": ("liver",), "spleen": ("spleen",), "kidneys": ("left_kidney", "right_kidney"),
                   "urinary_bladder": ("urinary_bladder",)}


def _scans(cmap: dict[int, str]) -> list[tuple[str, Volume, Volume]]:
    out = []
    for name, img, seg in (("example_ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
                           ("example_ct_sm", "example_ct_sm.nii.gz", "example_seg.nii.gz")):
        ct = read_nifti(TS / img)
        raw = read_nifti(TS / seg, modality="SEG")
        out.append((name, ct, raw.with_array(map_totalseg(raw.array, cmap))))
    ct = read_nifti(TS / "cta_aorta" / "ct_cropped.nii.gz")
    t12 = read_nifti(TS / "cta_aorta" / "vertebrae_T12.nii.gz", modality="SEG")
    out.append(("cta_aorta (T12 label only)", ct,
                t12.with_array((np.asarray(t12.array) > 0).astype(np.int16) * CLASS_INDEX["thoracic_vertebrae"])))
    return out


def bench_time(atlas, regions, cmap, repeats: int) -> None:
    print("\n## 1. registration + box mapping + crop (all shipped regions), seconds")
    print(f"{'scan':28s} {'shape':16s} {'register':>9s} {'map+crop':>9s} {'total':>8s}  verified")
    medians = []
    for name, ct, lab in _scans(cmap):
        reg_t, crop_t, tot = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reg = register(lab, atlas)
            t1 = time.perf_counter()
            for region in regions.values():
                if any(np.all(hi > lo) for lo, hi in region_boxes(ct, reg, region)):
                    crop_region(ct, reg, region, lab)
            t2 = time.perf_counter()
            reg_t.append(t1 - t0)
            crop_t.append(t2 - t1)
            tot.append(t2 - t0)
        med = statistics.median(tot)
        medians.append(med)
        print(f"{name:28s} {str(ct.shape):16s} {statistics.median(reg_t):9.3f} {statistics.median(crop_t):9.4f} "
              f"{med:8.3f}  {reg.verified} (k={reg.rotation_k}, flip={reg.z_flip}, {reg.iterations} Dice steps)")
    print(f"median over scans: {statistics.median(medians):.3f} s (goal < 0.2 s; paper 0.10-0.21 s on GPU)")


def bench_crops(atlas, regions, cmap) -> dict[str, object]:
    print("\n## 2. example_ct: organ voxels inside the crop, foreground fraction before -> after")
    ct = read_nifti(TS / "example_ct.nii.gz")
    raw = read_nifti(TS / "example_seg_fast_force_split.nii.gz", modality="SEG")
    lab = raw.with_array(map_totalseg(raw.array, cmap))
    reg = register(lab, atlas)
    by_name = {n: i for i, n in cmap.items()}
    from inference.phantom import generate_phantom

    held = {}
    phantoms = []
    for seed in range(6000, 6012):
        pl, aff = generate_phantom(seed)
        phantoms.append(Volume(np.where(pl <= N_CLASSES, pl, 0).astype(np.int16), aff))
    regs = [register(p, atlas) for p in phantoms]
    for organ, classes in PHANTOM_CLASSES.items():
        ids = [CLASS_INDEX[c] for c in classes]
        pairs = [(p, p.with_array(np.isin(p.array, ids).astype(np.uint8))) for p in phantoms]
        held[organ], _ = learn_region(pairs, atlas, organ, registrations=regs)
    print(f"{'region':16s} {'shipped (in-sample)':>22s} {'phantom-only (held-out)':>25s} {'fg before':>10s} "
          f"{'fg after (shipped)':>19s} {'crop/whole voxels':>18s}")
    liver_crop = None
    for organ, names in ORGANS.items():
        mask = np.isin(np.asarray(raw.array), [by_name[n] for n in names])
        c = crop_region(ct, reg, regions[organ], lab)
        h = crop_region(ct, reg, held[organ], lab)
        sub = mask[c.lower[0]:c.upper[0], c.lower[1]:c.upper[1], c.lower[2]:c.upper[2]]
        print(f"{organ:16s} {100 * box_voxels_inside(mask, c.lower, c.upper):21.2f}% "
              f"{100 * box_voxels_inside(mask, h.lower, h.upper):24.2f}% {100 * mask.mean():9.2f}% "
              f"{100 * sub.mean():18.2f}% {np.prod(c.volume.shape) / np.prod(ct.shape):18.3f}")
        if organ == "liver":
            liver_crop = c
    return {"ct": ct, "liver_crop": liver_crop}


def _unet(channels: int = 16):
    import torch
    from torch import nn

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU(0.01),
                             nn.Conv3d(o, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU(0.01))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = channels
            self.e1, self.e2, self.e3 = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
            self.d2, self.d1 = block(6 * c, 2 * c), block(3 * c, c)
            self.out = nn.Conv3d(c, 2, 1)
            self.pool = nn.MaxPool3d(2)
            self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(self.pool(a))
            c = self.e3(self.pool(b))
            d = self.d2(torch.cat([self.up(c), b], 1))
            return self.out(self.d1(torch.cat([self.up(d), a], 1)))

    torch.manual_seed(0)
    return Net().eval()


def _sliding(net, arr: np.ndarray, patch: int = 64) -> float:
    import torch

    t0 = time.perf_counter()
    shape = arr.shape
    pad = [(0, max(0, patch - s)) for s in shape]
    arr = np.pad(arr, pad)
    starts = [sorted({*range(0, max(s - patch, 0) + 1, patch // 2), max(s - patch, 0)}) for s in arr.shape]
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    tile = torch.from_numpy(np.ascontiguousarray(arr[z:z + patch, y:y + patch, x:x + patch]))[None, None]
                    net(tile.float())
    return time.perf_counter() - t0


def bench_speedup(ct: Volume, crop, threads: int) -> None:
    print("\n## 3. organ model on the liver crop vs the whole volume")
    if (ROOT / "triton_models" / "liver").is_dir():
        from dicomnode.infer.client import InferenceClient
        from dicomnode.infer.server import LocalTriton

        server = LocalTriton(ROOT / "triton_models", ROOT / ".venv-triton")
        server.start()
        try:
            with InferenceClient(server.http_url, models_dir=ROOT / "triton_models") as client:
                client.segment(crop.volume, "liver")  # warm-up
                t0 = time.perf_counter()
                client.segment(ct, "liver")
                whole = time.perf_counter() - t0
                t0 = time.perf_counter()
                client.segment(crop.volume, "liver")
                part = time.perf_counter() - t0
        finally:
            server.stop()
        print(f"liver model via Triton: whole {whole:.2f} s, crop {part:.2f} s, speed-up x{whole / part:.1f}")
        return
    import torch

    torch.set_num_threads(threads)
    net = _unet()
    # the paper's simulated organ models: randomly initialised 3D U-Net, sliding window; here 1.5 mm
    fine_aff = ct.affine.copy()
    fine_aff[:3, :3] /= 2.0
    fine_shape = tuple(int(s * 2) for s in ct.shape)
    whole = resample(ct, fine_aff, fine_shape, order=1).array.astype(np.float32) / 1000.0
    cfine = tuple(int(s * 2) for s in crop.volume.shape)
    caff = crop.volume.affine.copy()
    caff[:3, :3] /= 2.0
    part = resample(ct, caff, cfine, order=1).array.astype(np.float32) / 1000.0
    _sliding(net, part[:64, :64, :64])  # warm-up
    t_whole = _sliding(net, whole)
    t_part = _sliding(net, part)
    print(f"no liver model in triton_models/: randomly initialised 3D U-Net (torch CPU, {threads} threads, 64^3 "
          f"windows, overlap 0.5) at 1.5 mm: whole {whole.shape} {t_whole:.1f} s, liver crop {part.shape} "
          f"{t_part:.1f} s, speed-up x{t_whole / t_part:.1f} (paper: x2-x13 for organ models)")


def compare_paper(regions) -> None:
    print("\n## 4. region boxes vs the paper's (no margin): size per axis (feet, back, left) and centre - liver centre, mm")
    paper = {p.stem: np.load(p) for p in sorted((DATA / "ctarr").glob("*.npy"))}
    ours_liver = regions["liver"].array(False)
    p_liver = paper["liver"]
    lc_o = (ours_liver[:, 0].min(0) + ours_liver[:, 1].max(0)) / 2
    lc_p = (p_liver[:, 0].min(0) + p_liver[:, 1].max(0)) / 2
    print(f"{'region':16s} {'size ours':>22s} {'size paper':>22s} {'centre-liver ours':>24s} {'centre-liver paper':>24s}")
    for name in sorted(regions):
        if name not in paper:
            continue
        o, p = regions[name].array(False), paper[name]
        so = o[:, 1].max(0) - o[:, 0].min(0)
        sp = p[:, 1].max(0) - p[:, 0].min(0)
        co = (o[:, 0].min(0) + o[:, 1].max(0)) / 2 - lc_o
        cp = (p[:, 0].min(0) + p[:, 1].max(0)) / 2 - lc_p
        fmt = lambda v: "[" + ", ".join(f"{x:6.0f}" for x in v) + "]"  # noqa: E731
        print(f"{name:16s} {fmt(so):>22s} {fmt(sp):>22s} {fmt(co):>24s} {fmt(cp):>24s}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-speedup", action="store_true")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if not TS.is_dir():
        print(f"real data not available at {TS}", file=sys.stderr)
        return 2
    atlas = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
    regions = load_regions(ROOT / "config" / "regions")
    cmap = load_totalseg_class_map(TS / "class_maps.json")
    print(f"# CTARR benchmark ({os.cpu_count()} CPUs visible, numpy registration is single-threaded)")
    bench_time(atlas, regions, cmap, args.repeats)
    res = bench_crops(atlas, regions, cmap)
    if not args.skip_speedup:
        bench_speedup(res["ct"], res["liver_crop"], args.threads)  # type: ignore[arg-type]
    compare_paper(regions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
