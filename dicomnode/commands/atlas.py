"""``dicomnode atlas build``: build the CTARR atlas (paper's two passes) and render its planes.

Inputs: NIfTI label maps (CTARR labels 0..19, or TotalSegmentator ids with ``--class-map``) and/or
``--phantoms N`` procedural whole-body phantoms (inference/phantom.py, all 19 anatomies).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from dicomnode.anatomy.atlas import (
    CLASS_NAMES, N_CLASSES, Atlas, build_atlas, load_atlas, load_totalseg_class_map, map_totalseg, save_atlas,
)
from dicomnode.volume import Volume

# one colour per class (RGB), bones greyish, organs coloured
COLOURS = np.array([
    (0, 0, 0), (200, 200, 170), (230, 230, 120), (150, 190, 255), (255, 170, 150), (210, 210, 210),
    (250, 250, 90), (240, 200, 60), (210, 150, 60), (120, 170, 255), (255, 140, 120), (255, 200, 230),
    (70, 140, 230), (230, 90, 70), (200, 30, 40), (150, 80, 40), (140, 60, 170), (60, 170, 90),
    (90, 200, 120), (240, 220, 40),
], dtype=np.uint8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the atlas from label maps and phantoms")
    b.add_argument("--labels", nargs="*", default=[], help="NIfTI label maps (CTARR 0..19 or TotalSegmentator ids)")
    b.add_argument("--class-map", help="TotalSegmentator class_maps.json: --labels hold 'total' task ids")
    b.add_argument("--phantoms", type=int, default=0, help="add N whole-body phantoms (seeds 0..N-1)")
    b.add_argument("--out", default="config/atlas/atlas19.npz", help="output .npz")
    b.add_argument("--png", default="", help="also render the three central planes to this PNG")
    r = sub.add_parser("render", help="render the three central planes of an atlas to a PNG")
    r.add_argument("atlas")
    r.add_argument("--png", required=True)


def _phantom_maps(n: int, seed0: int = 0) -> list[Volume]:
    """``n`` whole-body phantom label maps (CTARR classes only), seeds ``seed0``.. ."""
    try:
        from inference.phantom import generate_phantom
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from inference.phantom import generate_phantom
    maps = []
    for seed in range(seed0, seed0 + n):
        lab, aff = generate_phantom(seed, fov="whole", spacing_mm=3.0)
        maps.append(Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff))
    return maps


def _label_maps(paths: list[str], class_map: str | None) -> list[Volume]:
    from dicomnode.series.convert import read_nifti

    cmap = load_totalseg_class_map(Path(class_map)) if class_map else None
    out = []
    for p in paths:
        v = read_nifti(Path(p), modality="SEG")
        arr = map_totalseg(v.array, cmap) if cmap else np.where(v.array <= N_CLASSES, v.array, 0).astype(np.int16)
        out.append(v.with_array(arr.astype(np.int16)))
    return out


def render_png(atlas: Atlas, path: Path, zoom: int = 2) -> None:
    """Axial, coronal and sagittal central planes side by side (intensity = probability)."""
    from PIL import Image

    def rgb(axis: int) -> np.ndarray:
        idx = atlas.shape[axis] // 2
        lab = atlas.label_plane(axis, idx, threshold=0.15)
        prob = np.zeros(lab.shape, np.float32)
        for c in range(1, N_CLASSES + 1):
            dense = np.take(atlas.dense(c), idx, axis=axis)
            prob = np.where(lab == c, dense, prob)
        img = COLOURS[lab].astype(np.float32) * (0.35 + 0.65 * prob[..., None])
        return img.astype(np.uint8)

    axial, coronal, sagittal = rgb(0), rgb(1), rgb(2)
    h = max(axial.shape[0], coronal.shape[0], sagittal.shape[0])
    pad = lambda im: np.pad(im, ((0, h - im.shape[0]), (0, 4), (0, 0)), constant_values=40)  # noqa: E731
    canvas = np.concatenate([pad(axial), pad(coronal), pad(sagittal)], axis=1)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run(args: argparse.Namespace) -> int:
    """Build (or render) the atlas; exit 0 on success, 2 on bad input."""
    if args.action == "render":
        render_png(load_atlas(Path(args.atlas)), Path(args.png))
        return 0
    maps = _label_maps(args.labels, args.class_map) + _phantom_maps(args.phantoms)
    if len(maps) < 2:
        print("error: need at least two label maps (--labels and/or --phantoms)", file=sys.stderr)
        return 2
    desc = []
    if args.phantoms:
        desc.append(f"{args.phantoms} procedural whole-body phantoms (inference/phantom.py seeds 0..{args.phantoms - 1})")
    if args.labels:
        desc.append(f"{len(args.labels)} real label map(s): " + ", ".join(Path(p).name for p in args.labels))
    t0 = time.perf_counter()
    atlas = build_atlas(maps, built_from="; ".join(desc), log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out)
    save_atlas(atlas, out)
    print(f"atlas {atlas.shape} at {atlas.spacing.tolist()} mm from {len(maps)} maps in "
          f"{time.perf_counter() - t0:.1f} s -> {out} ({out.stat().st_size / 1e6:.2f} MB)")
    for c, name in enumerate(CLASS_NAMES):
        print(f"  {c + 1:2d} {name:28s} {atlas.mass[c] / 1000:8.1f} ml  com {np.round(atlas.com[c], 1).tolist()}")
    if args.png:
        render_png(atlas, Path(args.png))
    return 0
