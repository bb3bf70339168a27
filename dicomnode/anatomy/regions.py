"""Anatomical regions: boxes in atlas mm -> boxes in scan voxels -> crops; learning new regions.

A region (``config/regions/<name>.json``) is one or more axis-aligned boxes in the atlas frame
(axis 0 feet, 1 back, 2 left; mm; stored WITHOUT margin) plus a per-region margin added on use
(default 10 mm, the paper's). Box corners are mapped to the scan with the registration and then
to voxel indices through the Volume's affine, so a scan at any resolution can be cropped; crops
are plain array slices (no interpolation), and predictions on a crop are pasted back onto the
full grid. :func:`learn_region` implements section 3.4 of the paper (heatmap, threshold,
connected components, merged boxes).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dicomnode.anatomy.atlas import Atlas, frame_aligned
from dicomnode.anatomy.register import Registration, apply_orientation, register
from dicomnode.errors import SeriesError
from dicomnode.volume import Volume, resample

__all__ = ["Region", "RegionCrop", "load_regions", "save_region", "region_boxes", "crop_region", "paste_back",
           "apply_orientation", "learn_region", "box_voxels_inside"]

DEFAULT_MARGIN_MM = 10.0


@dataclass(frozen=True)
class Region:
    """Boxes (n, 2, 3) = [box][lower, upper][axis] in atlas mm without margin, + margin and provenance."""

    name: str
    boxes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]
    margin_mm: float = DEFAULT_MARGIN_MM
    threshold: float = 0.0
    learned_from: str = ""
    n_scans: int = 0

    def array(self, with_margin: bool = True) -> np.ndarray:
        """Boxes as an (n, 2, 3) float array, the margin added when ``with_margin``."""
        b = np.asarray(self.boxes, np.float64).reshape(-1, 2, 3).copy()
        if with_margin:
            b[:, 0] -= self.margin_mm
            b[:, 1] += self.margin_mm
        return b

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``config/regions/<name>.json``."""
        return {"name": self.name, "frame": "atlas19 mm: axis0 feet, axis1 back, axis2 left (config/atlas/atlas19.npz)",
                "boxes_mm": [[[round(float(v), 2) for v in corner] for corner in box] for box in self.boxes],
                "margin_mm": self.margin_mm, "threshold": self.threshold, "learned_from": self.learned_from,
                "n_scans": self.n_scans}

    @staticmethod
    def from_json(doc: dict[str, Any]) -> "Region":
        """Parse a region document; raises ValueError for malformed boxes."""
        boxes = np.asarray(doc["boxes_mm"], np.float64)
        if boxes.ndim != 3 or boxes.shape[1:] != (2, 3) or np.any(boxes[:, 1] < boxes[:, 0]):
            raise ValueError(f"region {doc.get('name')!r}: boxes_mm must be [[lower, upper], ...] with lower <= upper")
        return Region(name=str(doc["name"]), boxes=tuple(tuple(tuple(float(v) for v in c) for c in b) for b in boxes),  # type: ignore[misc]
                      margin_mm=float(doc.get("margin_mm", DEFAULT_MARGIN_MM)), threshold=float(doc.get("threshold", 0.0)),
                      learned_from=str(doc.get("learned_from", "")), n_scans=int(doc.get("n_scans", 0)))


@dataclass(frozen=True)
class RegionCrop:
    """A region cropped from a volume: box ``lower``/``upper`` (voxel indices, upper exclusive)."""

    name: str
    lower: tuple[int, int, int]
    upper: tuple[int, int, int]
    volume: Volume


def load_regions(directory: Path) -> dict[str, Region]:
    """Every ``*.json`` region of ``directory`` by name; raises FileNotFoundError / ValueError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"regions directory not found: {directory}")
    out = {}
    for p in sorted(directory.glob("*.json")):
        r = Region.from_json(json.loads(p.read_text()))
        out[r.name] = r
    return out


def save_region(region: Region, directory: Path) -> Path:
    """Write ``<directory>/<name>.json``; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{region.name}.json"
    path.write_text(json.dumps(region.to_json(), indent=1) + "\n")
    return path


# ---- atlas boxes -> voxel boxes --------------------------------------------------------------
def _corners(box: np.ndarray) -> np.ndarray:
    lo, hi = box
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def region_boxes(volume: Volume, registration: Registration, region: Region) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each box of ``region`` (with margin) as (lower, upper) voxel indices of ``volume``, clipped.

    Boxes that miss the volume come back empty (upper <= lower on some axis).
    """
    out = []
    shape = np.asarray(volume.shape)
    for box in region.array(with_margin=True):
        idx = volume.lps_to_index(registration.to_scan(_corners(box)))
        lo = np.clip(np.floor(idx.min(axis=0) + 0.5 - 1e-6).astype(int), 0, shape)
        hi = np.clip(np.ceil(idx.max(axis=0) + 0.5 + 1e-6).astype(int), 0, shape)
        out.append((lo, hi))
    return out


def crop_region(volume: Volume, registration: Registration, region: Region, anatomy_grid: Volume | None = None) -> RegionCrop:
    """Crop ``region`` (union of its boxes) from ``volume`` (any resolution; boxes go through LPS mm).

    ``registration`` must describe ``volume``'s coordinates (use ``registration.corrected()`` after
    :func:`apply_orientation`). ``anatomy_grid`` (the anatomy segmentation the registration came
    from) is checked to share ``volume``'s frame of reference. Raises SeriesError("region_outside_image",
    kind="anatomy") when the region misses the volume, ValueError on a frame-of-reference mismatch.
    """
    if (anatomy_grid is not None and anatomy_grid.frame_of_reference_uid and volume.frame_of_reference_uid
            and anatomy_grid.frame_of_reference_uid != volume.frame_of_reference_uid):
        raise ValueError("anatomy grid and volume are in different frames of reference")
    boxes = [(lo, hi) for lo, hi in region_boxes(volume, registration, region) if np.all(hi > lo)]
    if not boxes:
        raise SeriesError("region_outside_image", kind="anatomy", detail=region.name)
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    lower = tuple(int(v) for v in lo)
    upper = tuple(int(v) for v in hi)
    return RegionCrop(region.name, lower, upper, volume.crop(lower, upper))  # type: ignore[arg-type]


def _paste_volume(pred: Volume, full: Volume) -> Volume:
    arr = np.asarray(pred.array)
    same_axes = np.allclose(pred.affine[:3, :3], full.affine[:3, :3], atol=1e-6)
    off = full.lps_to_index(pred.affine[:3, 3])[0]
    if same_axes and np.allclose(off, np.round(off), atol=1e-3):
        o = np.round(off).astype(int)
        out = np.zeros(full.shape, dtype=arr.dtype)
        lo = np.maximum(o, 0)
        hi = np.minimum(o + np.asarray(arr.shape), full.shape)
        if np.all(hi > lo):
            src = arr[lo[0] - o[0]:hi[0] - o[0], lo[1] - o[1]:hi[1] - o[1], lo[2] - o[2]:hi[2] - o[2]]
            out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = src
        return full.with_array(out)
    back = resample(pred, full.affine, full.shape, order=0, cval=0)
    return full.with_array(np.ascontiguousarray(back.array).astype(arr.dtype, copy=False))


def paste_back(pred_labels: Any, full: Volume) -> Any:
    """A prediction on a crop (Volume, or Prediction) put back onto ``full``'s grid (0 outside).

    Exact insertion when the crop grid is a sub-grid of ``full``, nearest-neighbour otherwise.
    A Prediction comes back as a Prediction (labels pasted, probabilities dropped).
    """
    if isinstance(pred_labels, Volume):
        return _paste_volume(pred_labels, full)
    labels = getattr(pred_labels, "labels", None)
    if not isinstance(labels, Volume):
        raise TypeError("paste_back expects a Volume or a Prediction")
    return dataclasses.replace(pred_labels, labels=_paste_volume(labels, full), probabilities=None)


def box_voxels_inside(mask: np.ndarray, lower: Sequence[int], upper: Sequence[int]) -> float:
    """Share (0..1) of the non-zero voxels of ``mask`` inside the index box [lower, upper)."""
    total = int(np.count_nonzero(mask))
    if total == 0:
        return float("nan")
    sub = mask[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]]
    return int(np.count_nonzero(sub)) / total


# ---- learning (paper section 3.4) ------------------------------------------------------------
def _move_to_atlas(mask: Volume, registration: Registration, atlas: Atlas) -> np.ndarray:
    """The binary mask resampled (nearest) into the atlas grid (bool, atlas shape)."""
    out = np.zeros(atlas.shape, bool)
    idx = np.argwhere(np.asarray(mask.array) > 0)
    if len(idx) == 0:
        return out
    # atlas bounding box of the mask (its voxel corners mapped forward), then pull back voxel by voxel
    lo_i, hi_i = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array([[a, b, c] for a in (lo_i[0], hi_i[0]) for b in (lo_i[1], hi_i[1]) for c in (lo_i[2], hi_i[2])])
    amm = registration.to_atlas(mask.index_to_lps(corners))
    a_lo = np.clip(np.floor((amm.min(axis=0) - atlas.origin) / atlas.spacing).astype(int), 0, atlas.shape)
    a_hi = np.clip(np.ceil((amm.max(axis=0) - atlas.origin) / atlas.spacing).astype(int) + 1, 0, atlas.shape)
    if np.any(a_hi <= a_lo):
        return out
    grids = [atlas.origin[k] + np.arange(a_lo[k], a_hi[k]) * atlas.spacing[k] for k in range(3)]
    pts = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, 3)
    vi = np.round(mask.lps_to_index(registration.to_scan(pts))).astype(int)
    ok = np.all((vi >= 0) & (vi < np.asarray(mask.shape)), axis=1)
    vals = np.zeros(len(pts), bool)
    vals[ok] = np.asarray(mask.array)[vi[ok, 0], vi[ok, 1], vi[ok, 2]] > 0
    out[a_lo[0]:a_hi[0], a_lo[1]:a_hi[1], a_lo[2]:a_hi[2]] = vals.reshape([len(g) for g in grids])
    return out


def _merge_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    boxes = [b.copy() for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if np.all(a[0] <= b[1]) and np.all(b[0] <= a[1]):
                    boxes[i] = np.stack([np.minimum(a[0], b[0]), np.maximum(a[1], b[1])])
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes, key=lambda b: tuple(b[0]))


def learn_region(pairs: Sequence[tuple[Volume, Volume]], atlas: Atlas, name: str, *, threshold: float = 0.0,
                 margin_mm: float = DEFAULT_MARGIN_MM, learned_from: str = "",
                 registrations: Sequence[Registration | None] | None = None) -> tuple[Region, np.ndarray]:
    """Learn a region from (anatomy labels, region mask) pairs: (Region, heatmap in the atlas grid).

    Each anatomy is registered to ``atlas`` (unless ``registrations`` gives it one), its mask moved into the
    atlas frame; the heatmap (mean of the moved masks) is thresholded (> ``threshold``), the bounding
    box of every connected component taken, overlapping boxes merged. Boxes are stored without the
    margin (added on use). Raises ValueError when nothing is left above the threshold.
    """
    from scipy import ndimage

    if not pairs:
        raise ValueError("no (anatomy, mask) pairs to learn from")
    heat = np.zeros(atlas.shape, np.float32)
    for i, (anatomy, mask) in enumerate(pairs):
        given = registrations[i] if registrations is not None else None
        reg = given if given is not None else register(anatomy, atlas)
        heat += _move_to_atlas(mask, reg, atlas)
    heat /= len(pairs)
    comp, n = ndimage.label(heat > threshold)
    if n == 0:
        raise ValueError(f"region {name!r}: nothing above threshold {threshold}")
    boxes = []
    for sl in ndimage.find_objects(comp):
        lo = np.array([s.start for s in sl]) - 0.5
        hi = np.array([s.stop for s in sl]) - 0.5
        boxes.append(np.stack([atlas.origin + lo * atlas.spacing, atlas.origin + hi * atlas.spacing]))
    merged = _merge_boxes(boxes)
    region = Region(name=name, boxes=tuple(tuple(tuple(float(v) for v in c) for c in b) for b in merged),  # type: ignore[misc]
                    margin_mm=margin_mm, threshold=threshold, learned_from=learned_from, n_scans=len(pairs))
    return region, heat


def frame_extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) atlas-frame-axis mm of a volume's voxel centres (for reports)."""
    g = frame_aligned(volume)
    return g.origin, g.origin + (np.asarray(g.array.shape) - 1) * g.spacing
