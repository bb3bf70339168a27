"""The CTARR atlas: 19 averaged soft anatomy masks at 3 mm in a frame centred on the atlas.

Frame ("atlas frame", the one of ../shared/CTARR.md and the paper's region boxes): axis 0 grows
towards the FEET, axis 1 towards the BACK, axis 2 towards the patient's LEFT, in millimetres.
In LPS terms ``frame = (-z, y, x)``. The atlas origin (frame 0, 0, 0) is the centre of its grid.

The atlas is stored as one compressed ``.npz`` with every class cropped to its own bounding box
(uint8, 0..255 = probability), so it stays small on disk and in memory. Building follows the
paper's two passes (:func:`build_atlas`): register every label map to every other one, average
the transforms per map, average the moved maps (provisional atlas), register every map to the
provisional atlas, average again.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dicomnode.volume import Volume, resample

CLASS_NAMES: tuple[str, ...] = (
    "skull", "cervical_vertebrae", "left_ribs_scapula_clavicle", "right_ribs_scapula_clavicle",
    "sternum", "thoracic_vertebrae", "lumbar_vertebrae", "sacrum", "left_hip", "right_hip",
    "brain", "left_lung", "right_lung", "heart", "liver", "spleen", "left_kidney", "right_kidney",
    "urinary_bladder",
)
N_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {n: i + 1 for i, n in enumerate(CLASS_NAMES)}
# left/right pairs (left label, right label), used by QC
LR_PAIRS: tuple[tuple[int, int], ...] = ((3, 4), (9, 10), (12, 13), (17, 18))

# LPS -> frame: frame = P @ lps with frame = (-z, y, x); P is orthogonal, inverse = P.T
LPS_TO_FRAME = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

# TotalSegmentator v2 ("total" task) class names -> CTARR class index
_TS_PREFIX: tuple[tuple[str, int], ...] = (
    ("rib_left_", 3), ("rib_right_", 4), ("vertebrae_C", 2), ("vertebrae_T", 6), ("vertebrae_L", 7),
)
_TS_EXACT: dict[str, int] = {
    "skull": 1, "scapula_left": 3, "clavicula_left": 3, "scapula_right": 4, "clavicula_right": 4,
    "sternum": 5, "sacrum": 8, "vertebrae_S1": 8, "hip_left": 9, "hip_right": 10, "brain": 11,
    "lung_upper_lobe_left": 12, "lung_lower_lobe_left": 12, "lung_upper_lobe_right": 13,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 13, "heart": 14, "liver": 15,
    "spleen": 16, "kidney_left": 17, "kidney_right": 18, "urinary_bladder": 19,
}


def totalseg_class(name: str) -> int:
    """CTARR class (1..19) of a TotalSegmentator class name, 0 when it has none."""
    if name in _TS_EXACT:
        return _TS_EXACT[name]
    for prefix, cls in _TS_PREFIX:
        if name.startswith(prefix):
            return cls
    return 0


def map_totalseg(labels: np.ndarray, class_map: dict[int, str]) -> np.ndarray:
    """A TotalSegmentator label array (ids per ``class_map``) as CTARR labels (int16, 0..19)."""
    lut = np.zeros(max(max(class_map), int(labels.max())) + 1, dtype=np.int16)
    for idx, name in class_map.items():
        lut[int(idx)] = totalseg_class(name)
    return lut[np.asarray(labels).astype(np.int64)]


def load_totalseg_class_map(path: Path, task: str = "total") -> dict[int, str]:
    """Label id -> name of one task from TotalSegmentator's class_maps.json."""
    data = json.loads(Path(path).read_text())
    return {int(k): str(v) for k, v in data[task].items()}


# ---- frame-aligned grids ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FrameGrid:
    """An array whose axes are the atlas-frame axes (feet, back, left) with positive steps.

    ``origin`` is the frame position (mm) of voxel (0, 0, 0); ``centre`` the frame position of the
    centre of the grid.
    """

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray

    @property
    def centre(self) -> np.ndarray:
        """Frame mm of the grid centre (midpoint between the first and last voxel centres)."""
        return self.origin + (np.asarray(self.array.shape[-3:]) - 1) / 2.0 * self.spacing


def frame_aligned(volume: Volume, *, order: int = 0, spacing_mm: float | None = None) -> FrameGrid:
    """``volume`` with its axes permuted/flipped onto the atlas frame axes (no interpolation).

    Grids that are not aligned with the patient axes (oblique) are resampled (``order``) onto an
    aligned grid of the same voxel size (or ``spacing_mm``) covering the same extent.
    """
    d = LPS_TO_FRAME @ volume.affine[:3, :3]  # columns: frame step of each array axis
    sp = np.linalg.norm(d, axis=0)
    unit = d / sp
    axis_of = np.argmax(np.abs(unit), axis=0)  # frame axis of each array axis
    aligned = sorted(axis_of.tolist()) == [0, 1, 2] and np.all(np.abs(unit[axis_of, [0, 1, 2]]) > 0.9999)
    if aligned and spacing_mm is None:
        arr = np.asarray(volume.array)
        perm = [int(np.where(axis_of == f)[0][0]) for f in range(3)]  # array axis feeding frame axis f
        arr = arr.transpose(perm)
        signs = np.array([np.sign(unit[f, perm[f]]) for f in range(3)])
        flips = tuple(f for f in range(3) if signs[f] < 0)
        if flips:
            arr = np.flip(arr, axis=flips)
        spacing = sp[perm]
        # frame position of the new voxel 0 = the corner with the smallest frame coordinates
        corner = np.zeros(3)
        for f in range(3):
            if signs[f] < 0:
                corner[perm[f]] = volume.shape[perm[f]] - 1
        origin = LPS_TO_FRAME @ volume.index_to_lps(corner)[0]
        return FrameGrid(np.ascontiguousarray(arr), spacing.astype(np.float64), origin)
    # oblique: resample onto an aligned grid covering the bounding box of the volume's corners
    step = float(spacing_mm) if spacing_mm is not None else float(np.min(sp))
    shape = np.asarray(volume.shape)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    fr = (LPS_TO_FRAME @ volume.index_to_lps(corners).T).T
    lo, hi = fr.min(axis=0), fr.max(axis=0)
    n = np.maximum(1, np.floor((hi - lo) / step + 1e-6).astype(int) + 1)
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_FRAME.T * step
    aff[:3, 3] = LPS_TO_FRAME.T @ lo
    out = resample(volume, aff, tuple(int(v) for v in n), order=order)
    return FrameGrid(np.ascontiguousarray(out.array), np.full(3, step), lo)


# ---- the atlas -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Atlas:
    """Soft masks of the 19 anatomies, each cropped to its bounding box, in the atlas frame.

    ``shape``/``spacing``/``origin`` describe the full atlas grid (origin = frame mm of voxel 0,
    chosen so the grid centre is 0). ``lower[c]`` is the grid index of the first voxel of class
    ``c+1``'s box. ``com`` (19, 3) frame mm and ``mass`` (19,) mm^3 are the landmarks.
    ``flat``/``offsets``/``dims``/``padded_lower`` hold the boxes zero-padded by one voxel in one
    buffer, for vectorised sampling by the registration.
    """

    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    lower: np.ndarray
    masks: tuple[np.ndarray, ...]
    com: np.ndarray
    mass: np.ndarray
    built_from: str = ""
    flat: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    offsets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    dims: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int64), repr=False)

    @property
    def voxel_volume(self) -> float:
        """mm^3 of one atlas voxel."""
        return float(np.prod(self.spacing))

    def dense(self, cls: int) -> np.ndarray:
        """The full-grid soft mask (float32) of class ``cls`` (1..19)."""
        out = np.zeros(self.shape, np.float32)
        m = self.masks[cls - 1]
        lo = self.lower[cls - 1]
        out[lo[0]:lo[0] + m.shape[0], lo[1]:lo[1] + m.shape[1], lo[2]:lo[2] + m.shape[2]] = m
        return out

    def label_plane(self, axis: int, index: int, threshold: float = 0.5) -> np.ndarray:
        """Argmax label image (0 where every class < ``threshold``) of one plane of the grid."""
        plane_shape = [s for a, s in enumerate(self.shape) if a != axis]
        best = np.zeros(plane_shape, np.float32)
        lab = np.zeros(plane_shape, np.int16)
        for c in range(1, N_CLASSES + 1):
            m, lo = self.masks[c - 1], self.lower[c - 1]
            if not (lo[axis] <= index < lo[axis] + m.shape[axis]):
                continue
            sl = np.take(m, index - lo[axis], axis=axis)
            o = [lo[a] for a in range(3) if a != axis]
            region = (slice(o[0], o[0] + sl.shape[0]), slice(o[1], o[1] + sl.shape[1]))
            better = (sl > best[region]) & (sl >= threshold)
            best[region] = np.where(better, sl, best[region])
            lab[region] = np.where(better, c, lab[region])
        return lab


def make_atlas(masks_full: Sequence[np.ndarray] | np.ndarray, spacing: Iterable[float], origin: Iterable[float],
               built_from: str = "", min_prob: float = 0.02) -> Atlas:
    """An :class:`Atlas` from 19 full-grid soft masks (values 0..1); values < ``min_prob`` are dropped."""
    spacing = np.asarray(list(spacing), np.float64)
    origin = np.asarray(list(origin), np.float64)
    shape = tuple(int(s) for s in np.asarray(masks_full[0]).shape)
    lowers, crops = [], []
    for c in range(N_CLASSES):
        m = np.asarray(masks_full[c], np.float32)
        keep = m >= min_prob
        spans = [np.flatnonzero(np.any(keep, axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        if any(len(sp) == 0 for sp in spans):
            lowers.append(np.zeros(3, np.int64))
            crops.append(np.zeros((1, 1, 1), np.float32))
            continue
        lo = np.array([sp[0] for sp in spans])
        hi = np.array([sp[-1] + 1 for sp in spans])
        crop = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
        crop[crop < min_prob] = 0.0
        lowers.append(lo.astype(np.int64))
        crops.append(crop)
    return _finish(shape, spacing, origin, np.array(lowers), crops, built_from)


def _finish(shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray, lower: np.ndarray,
            crops: list[np.ndarray], built_from: str) -> Atlas:
    com = np.zeros((N_CLASSES, 3))
    mass = np.zeros(N_CLASSES)
    padded, offsets, dims, off = [], [], [], 0
    for c, (lo, m) in enumerate(zip(lower, crops)):
        total = float(m.sum())
        mass[c] = total * float(np.prod(spacing))
        if total > 0:
            for a in range(3):
                prof = m.sum(axis=tuple(b for b in range(3) if b != a))
                pos = origin[a] + (lo[a] + np.arange(m.shape[a])) * spacing[a]
                com[c, a] = float((prof * pos).sum() / total)
        p = np.pad(m.astype(np.float32), 1)
        padded.append(p.ravel())
        offsets.append(off)
        dims.append(p.shape)
        off += p.size
    for m in crops:
        m.flags.writeable = False
    flat = np.concatenate(padded).astype(np.float32)
    return Atlas(shape=shape, spacing=spacing, origin=origin, lower=np.asarray(lower, np.int64), masks=tuple(crops),
                 com=com, mass=mass, built_from=built_from, flat=flat, offsets=np.asarray(offsets, np.int64),
                 dims=np.asarray(dims, np.int64))


def save_atlas(atlas: Atlas, path: Path) -> None:
    """Write ``atlas`` as a compressed npz (uint8 masks, 0..255)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"mask_{c + 1:02d}": np.round(np.clip(m, 0, 1) * 255).astype(np.uint8) for c, m in enumerate(atlas.masks)}
    np.savez_compressed(path, shape=np.asarray(atlas.shape), spacing=atlas.spacing, origin=atlas.origin,
                        lower=atlas.lower, class_names=np.asarray(CLASS_NAMES), built_from=np.asarray(atlas.built_from),
                        **arrays)


def load_atlas(path: Path) -> Atlas:
    """Read an atlas written by :func:`save_atlas`; raises FileNotFoundError / ValueError (bad file)."""
    with np.load(Path(path), allow_pickle=False) as z:
        names = tuple(str(n) for n in z["class_names"])
        if names != CLASS_NAMES:
            raise ValueError("atlas classes do not match the 19 CTARR anatomies")
        crops = [z[f"mask_{c + 1:02d}"].astype(np.float32) / 255.0 for c in range(N_CLASSES)]
        return _finish(tuple(int(s) for s in z["shape"]), z["spacing"].astype(np.float64),  # type: ignore[arg-type]
                       z["origin"].astype(np.float64), z["lower"].astype(np.int64), crops, str(z["built_from"]))


def atlas_from_labels(labels: Volume, built_from: str = "") -> Atlas:
    """A one-map 'atlas' (hard masks) of a label Volume, centred on its grid; used while building."""
    from scipy import ndimage

    fg = frame_aligned(labels)
    arr = np.where((fg.array >= 0) & (fg.array <= N_CLASSES), fg.array, 0).astype(np.int32)
    shape = arr.shape
    origin = -(np.asarray(shape) - 1) / 2.0 * fg.spacing
    objects = ndimage.find_objects(arr, max_label=N_CLASSES)
    lowers, crops = [], []
    for c, sl in enumerate(objects, start=1):
        if sl is None:
            lowers.append(np.zeros(3, np.int64))
            crops.append(np.zeros((1, 1, 1), np.float32))
            continue
        lowers.append(np.array([s.start for s in sl], np.int64))
        crops.append((arr[sl] == c).astype(np.float32))
    return _finish(tuple(int(v) for v in shape), fg.spacing, origin, np.array(lowers), crops, built_from)  # type: ignore[arg-type]


# ---- building (two passes) -------------------------------------------------------------------
def _warp_counts(labels: Volume, reg: "object", grid_shape: tuple[int, int, int], spacing: np.ndarray,
                 origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels resampled (nearest) into the atlas grid, coverage mask) for one map; separable."""
    fg = frame_aligned(labels)
    s = np.asarray(reg.scale)  # type: ignore[attr-defined]
    t = np.asarray(reg.translation)  # type: ignore[attr-defined]
    idx, ok = [], []
    for a in range(3):
        pos = origin[a] + np.arange(grid_shape[a]) * spacing[a]  # atlas frame mm
        f = (pos - t[a]) / s[a] + fg.centre[a]  # scan frame mm (orientation is identity when building)
        i = np.round((f - fg.origin[a]) / fg.spacing[a]).astype(np.int64)
        ok.append((i >= 0) & (i < fg.array.shape[a]))
        idx.append(np.clip(i, 0, fg.array.shape[a] - 1))
    out = fg.array[np.ix_(*idx)].astype(np.int16)
    cover = ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]
    out[~cover] = 0
    return out, cover


def _average(maps: Sequence[Volume], regs: Sequence[object], grid_shape: tuple[int, int, int], spacing: np.ndarray,
             origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(maps) > 255:
        raise ValueError("at most 255 label maps per atlas")
    counts = np.zeros((N_CLASSES,) + grid_shape, np.uint8)
    cover = np.zeros(grid_shape, np.uint8)
    for m, r in zip(maps, regs):
        lab, cov = _warp_counts(m, r, grid_shape, spacing, origin)
        cover += cov
        for c in range(1, N_CLASSES + 1):
            counts[c - 1] += lab == c
    return counts, cover


def build_atlas(maps: Sequence[Volume], *, spacing_mm: float = 3.0, extent_mm: tuple[float, float, float] = (1200.0, 540.0, 600.0),
                built_from: str = "", log: "callable | None" = None) -> Atlas:  # type: ignore[valid-type]
    """The paper's two-pass atlas from label Volumes (CTARR labels 0..19, correctly oriented).

    Pass 1: every map is registered to every other map (orientation fixed, Dice descent of scale and
    translation); the transforms of each map (including the identity to itself) are averaged, the
    maps moved with them and averaged voxel-wise, counting only maps whose field of view covers a
    voxel (the provisional atlas). Pass 2: every map registered to the provisional atlas, averaged
    again. The result is cropped to its content and re-centred. Raises ValueError for < 2 maps.
    """
    from dicomnode.anatomy.register import Registration, register

    if len(maps) < 2:
        raise ValueError("the atlas needs at least two label maps")
    say = log or (lambda msg: None)
    singles = [atlas_from_labels(m) for m in maps]
    regs1 = []
    for i, m in enumerate(maps):
        ss, ts = [np.ones(3)], [np.zeros(3)]
        for j, target in enumerate(singles):
            if i == j:
                continue
            r = register(m, target, orientation_search=False)
            ss.append(np.asarray(r.scale))
            ts.append(np.asarray(r.translation))
        regs1.append(Registration.simple(np.mean(ss, axis=0), np.mean(ts, axis=0), m))
        say(f"pass 1: map {i + 1}/{len(maps)} scale={np.round(np.mean(ss, axis=0), 3).tolist()}")
    sp = np.full(3, float(spacing_mm))
    shape = tuple(int(round(e / spacing_mm)) | 1 for e in extent_mm)
    origin = -(np.asarray(shape) - 1) / 2.0 * sp
    counts, cover = _average(maps, regs1, shape, sp, origin)  # type: ignore[arg-type]
    prov = make_atlas(counts / np.maximum(cover, 1).astype(np.float32)[None], sp, origin)
    regs2 = [register(m, prov, orientation_search=False) for m in maps]
    for i, r in enumerate(regs2):
        say(f"pass 2: map {i + 1}/{len(maps)} dice={r.dice:.3f} scale={np.round(r.scale, 3).tolist()}")
    counts, cover = _average(maps, regs2, shape, sp, origin)  # type: ignore[arg-type]
    soft = counts / np.maximum(cover, 1).astype(np.float32)[None]
    # crop to the content (+ 30 mm) and put the origin at the centre of the cropped grid
    nz = np.argwhere(soft.max(axis=0) >= 0.02)
    lo = np.maximum(nz.min(axis=0) - int(30 / spacing_mm), 0)
    hi = np.minimum(nz.max(axis=0) + int(30 / spacing_mm) + 1, shape)
    soft = soft[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    new_shape = np.asarray(soft.shape[1:])
    new_origin = -(new_shape - 1) / 2.0 * sp
    return make_atlas(soft.astype(np.float32), sp, new_origin, built_from)
