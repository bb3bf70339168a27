"""Stack geometry: checks on slice positions, resampling plans, and canonical reorientation.

Pure numpy on positions and direction cosines; no DICOM parsing here (that is ``series.convert``).

Conventions: ``orientation`` is ImageOrientationPatient (row cosine, then column cosine), positions
are ImagePositionPatient in LPS mm, the slice normal is ``row x col``. A stack is described by the
depth of every slice along the normal and its in-plane offset (along the row and column cosines).

Canonical orientation (what the models see): array axes (slice, row, column) run towards
(superior, posterior, left), i.e. the direction part of the affine is close to
[[0, 0, 1], [0, 1, 0], [1, 0, 0]] (a plain axial DICOM stack sorted along its normal already is).
Reaching it takes only axis permutations and flips (no interpolation), so it has an exact inverse.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from dicomnode.errors import SeriesError
from dicomnode.volume import Volume

# ---------------------------------------------------------------------------------------------
# orientation


def check_orientation(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row cosine, column cosine and slice normal from ImageOrientationPatient.

    Raises SeriesError("invalid_orientation") when the cosines are not finite, not unit length
    (within 1e-2) or not orthogonal (within 1e-2).
    """
    o = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if o.shape != (6,) or not np.all(np.isfinite(o)):
        raise SeriesError("invalid_orientation", kind="geometry", detail="need 6 finite direction cosines")
    row, col = o[:3], o[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(nr - 1.0) > 1e-2 or abs(nc - 1.0) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise SeriesError("invalid_orientation", kind="geometry", detail="direction cosines not orthonormal")
    row = row / nr
    col = col - (col @ row) * row  # remove tiny non-orthogonality
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def acquisition_plane(normal: np.ndarray) -> str:
    """"axial", "coronal" or "sagittal" after the patient axis the slice normal is closest to, or
    "oblique" when the normal is more than 30 degrees away from every patient axis."""
    n = np.abs(np.asarray(normal, dtype=np.float64))
    n = n / np.linalg.norm(n)
    if float(n.max()) < np.cos(np.radians(30.0)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def obliquity_deg(row: np.ndarray, col: np.ndarray) -> float:
    """Largest angle (degrees) between an image axis or the normal and its nearest patient axis."""
    worst = 0.0
    for v in (row, col, np.cross(row, col)):
        worst = max(worst, float(np.degrees(np.arccos(np.clip(np.max(np.abs(v)), -1.0, 1.0)))))
    return worst


# ---------------------------------------------------------------------------------------------
# stack analysis


@dataclass(frozen=True, slots=True)
class StackGeometry:
    """Where the slices of one stack are and what it takes to make a regular grid of them.

    ``order`` sorts the input slices along the normal; ``depths``, ``offsets`` are in that order.
    ``needs_resample`` names why the stack is not a regular orthogonal grid ("" when it is).
    """

    order: np.ndarray  # (N,) indices into the input, sorted along the normal
    depths: np.ndarray  # (N,) mm along the normal, ascending
    offsets: np.ndarray  # (N, 2) mm along (row cosine, column cosine)
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    spacing: float  # nominal slice spacing, mm
    spacing_min: float
    spacing_max: float
    uniform: bool
    gaps: int
    tilt_deg: float
    irregular: bool  # in-plane offsets not a straight line (besides tilt)
    needs_resample: str

    @property
    def n(self) -> int:
        """Number of slices."""
        return int(self.depths.shape[0])

    def source_affine(self, first_position: np.ndarray) -> np.ndarray:
        """Affine of the acquired stack, using the mean step between slices (sheared when tilted)."""
        step = self.normal * self.spacing
        if self.n > 1:
            span = self.depths[-1] - self.depths[0]
            d_off = (self.offsets[-1] - self.offsets[0]) / (self.n - 1)
            step = self.normal * (span / (self.n - 1)) + d_off[0] * self.row + d_off[1] * self.col
        return _affine(first_position, self.row, self.col, self.pixel_spacing, step)

    @property
    def target_offset(self) -> np.ndarray:
        """In-plane origin of the regular grid: the first slice's, or the mean of a tilted stack."""
        if self.needs_resample and (self.irregular or self.tilt_deg > 1e-3):
            return self.offsets.mean(axis=0)
        return self.offsets[0]

    def regular_affine(self) -> tuple[np.ndarray, int]:
        """Orthogonal target grid (affine, number of slices) spanning the stack at ``spacing``.

        The in-plane origin is :attr:`target_offset` (the middle of a tilted stack, else the first slice).
        """
        k = 1 if self.n == 1 else int(round((self.depths[-1] - self.depths[0]) / self.spacing)) + 1
        off = self.target_offset
        origin = self.depths[0] * self.normal + off[0] * self.row + off[1] * self.col
        return _affine(origin, self.row, self.col, self.pixel_spacing, self.normal * self.spacing), k


def _affine(origin: np.ndarray, row: np.ndarray, col: np.ndarray, ps: tuple[float, float], step: np.ndarray) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 0] = step
    aff[:3, 1] = col * ps[0]
    aff[:3, 2] = row * ps[1]
    aff[:3, 3] = origin
    return aff


def slice_depths(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Depth (mm) of every position along ``normal``."""
    return np.asarray(positions, dtype=np.float64) @ normal


def analyse_stack(
    positions: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    spacing_tolerance_mm: float,
    tilt_tolerance_deg: float,
    thickness: float | None = None,
) -> StackGeometry:
    """Sort slices along the normal and measure spacing, gaps, tilt and irregular positions.

    Positions must already be free of duplicates (see :func:`duplicate_groups`). Raises
    SeriesError("invalid_orientation") for bad cosines and SeriesError("invalid_pixel_spacing") for
    non-positive or non-finite spacing.
    """
    row, col, normal = check_orientation(orientation)
    ps = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    if not all(np.isfinite(ps)) or min(ps) <= 0:
        raise SeriesError("invalid_pixel_spacing", kind="geometry")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(pos)):
        raise SeriesError("missing_position", kind="geometry", detail="non-finite ImagePositionPatient")
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    d = depth[order]
    offsets = np.stack([pos[order] @ row, pos[order] @ col], axis=1)
    n = len(d)
    if n == 1:
        sp = float(thickness) if thickness and np.isfinite(thickness) and thickness > 0 else 1.0
        return StackGeometry(order, d, offsets, row, col, normal, ps, sp, sp, sp, True, 0, 0.0, False, "")
    diffs = np.diff(d)
    if float(diffs.min()) <= spacing_tolerance_mm / 2:
        raise SeriesError("duplicate_positions", kind="geometry")
    # nominal spacing: median of the steps that are not gaps (a missing slice only makes a step
    # bigger, so steps within 1.5x the smallest are the regular ones; also right for 3 slices)
    srt = np.sort(diffs[diffs <= 1.5 * float(diffs.min())])  # no np.median: it imports numpy.ma (~0.1 s)
    nominal = float(srt[(len(srt) - 1) // 2] + srt[len(srt) // 2]) / 2
    uniform = float(diffs.max() - diffs.min()) <= spacing_tolerance_mm
    if uniform:  # the mean step puts the first and the last slice exactly where they are
        nominal = float(d[-1] - d[0]) / (n - 1)
    gaps = 0
    if not uniform:
        big = diffs > 1.5 * nominal
        gaps = int(np.sum(np.maximum(np.rint(diffs[big] / nominal) - 1, 1)))
    rel = d - d[0]
    # in-plane drift per mm of depth: least squares through the first slice
    slope = (rel @ (offsets - offsets[0])) / float(rel @ rel)
    tilt = float(np.degrees(np.arctan(np.linalg.norm(slope))))
    resid = (offsets - offsets[0]) - np.outer(rel, slope)
    irregular = bool(np.max(np.abs(resid)) > max(spacing_tolerance_mm, 1e-3))
    reason = ""
    if gaps:
        reason = "gap"
    elif tilt > tilt_tolerance_deg:
        reason = "tilt"
    elif not uniform or irregular:
        reason = "nonuniform"
    return StackGeometry(
        order, d, offsets, row, col, normal, ps, nominal, float(diffs.min()), float(diffs.max()),
        uniform, gaps, tilt, irregular, reason,
    )


def duplicate_groups(depths: np.ndarray, tolerance_mm: float) -> list[np.ndarray]:
    """Groups (index arrays, >1 member) of slices whose depths agree within ``tolerance_mm / 2``."""
    order = np.argsort(depths, kind="stable")
    d = np.asarray(depths)[order]
    groups: list[np.ndarray] = []
    start = 0
    for i in range(1, len(d) + 1):
        if i == len(d) or d[i] - d[i - 1] > tolerance_mm / 2:
            if i - start > 1:
                groups.append(order[start:i])
            start = i
    return groups


def resample_stack(slices: np.ndarray, geo: StackGeometry, cval: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of sorted ``slices`` (N, R, C) onto :meth:`StackGeometry.regular_affine`.

    Each target slice mixes the two source slices around its depth, each shifted in-plane by its own
    offset (so tilt and irregular offsets are undone exactly in-plane). Returns (float32 array, affine).
    """
    from scipy import ndimage

    affine, k = geo.regular_affine()
    target_off = geo.target_offset
    out = np.empty((k, slices.shape[1], slices.shape[2]), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}

    def shifted(i: int) -> np.ndarray:
        if i not in cache:
            # target pixel (r, c) sits at source pixel (r + dr, c + dc)
            dr = (target_off[1] - geo.offsets[i, 1]) / geo.pixel_spacing[0]
            dc = (target_off[0] - geo.offsets[i, 0]) / geo.pixel_spacing[1]
            src = slices[i].astype(np.float32, copy=False)
            if abs(dr) < 1e-3 and abs(dc) < 1e-3:  # rounding noise of the positions: no shift
                cache[i] = src
            else:
                cache[i] = ndimage.shift(src, (-dr, -dc), order=1, mode="constant", cval=cval, prefilter=False)
            for old in [j for j in cache if j < i - 1]:
                del cache[old]
        return cache[i]

    for t in range(k):
        depth = geo.depths[0] + t * geo.spacing
        i = int(np.clip(np.searchsorted(geo.depths, depth, side="right") - 1, 0, geo.n - 1))
        if i >= geo.n - 1 or abs(depth - geo.depths[i]) < 1e-6:
            out[t] = shifted(min(i, geo.n - 1))
            continue
        w = float((depth - geo.depths[i]) / (geo.depths[i + 1] - geo.depths[i]))
        out[t] = (1.0 - w) * shifted(i) + w * shifted(i + 1)
    return out, affine


# ---------------------------------------------------------------------------------------------
# canonical reorientation


@dataclass(frozen=True, slots=True)
class Reorientation:
    """Axis permutation + flips taking a grid of ``shape``/``affine`` to the canonical orientation.

    ``perm[a]`` is the original axis that becomes canonical axis ``a``; ``flips[a]`` says whether the
    canonical axis ``a`` runs backwards along it. Exact, no interpolation.
    """

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shape: tuple[int, int, int]  # original shape
    affine: np.ndarray  # original affine

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape of the array on the canonical grid."""
        return tuple(self.shape[p] for p in self.perm)  # type: ignore[return-value]

    @property
    def is_identity(self) -> bool:
        """True when nothing moves."""
        return self.perm == (0, 1, 2) and not any(self.flips)

    def index_matrix(self) -> np.ndarray:
        """4x4 M with original_index = M @ canonical_index."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        cshape = self.canonical_shape
        for a, p in enumerate(self.perm):
            if self.flips[a]:
                m[p, a] = -1.0
                m[p, 3] = cshape[a] - 1
            else:
                m[p, a] = 1.0
        return m

    def apply(self, volume: Volume) -> Volume:
        """``volume`` (on the original grid) moved onto the canonical grid; raises ValueError on a shape mismatch."""
        if volume.shape != self.shape:
            raise ValueError(f"volume shape {volume.shape} is not the original grid {self.shape}")
        arr = np.transpose(volume.array, self.perm)
        flip_axes = tuple(a for a in range(3) if self.flips[a])
        if flip_axes:
            arr = np.flip(arr, axis=flip_axes)
        return dataclasses.replace(volume, array=arr, affine=volume.affine @ self.index_matrix())

    def invert(self, volume: Volume) -> Volume:
        """``volume`` on the canonical grid moved back onto the original grid (exact inverse of apply).

        Raises ValueError when ``volume`` does not have the canonical shape.
        """
        if volume.shape != self.canonical_shape:
            raise ValueError(f"volume shape {volume.shape} is not the canonical grid {self.canonical_shape}")
        arr = volume.array
        flip_axes = tuple(a for a in range(3) if self.flips[a])
        if flip_axes:
            arr = np.flip(arr, axis=flip_axes)
        arr = np.transpose(arr, np.argsort(self.perm))
        return dataclasses.replace(volume, array=arr, affine=volume.affine @ np.linalg.inv(self.index_matrix()))


def canonical_reorientation(shape: tuple[int, int, int], affine: np.ndarray) -> Reorientation:
    """The permutation/flip that makes the array axes run (superior, posterior, left).

    Chooses, among the 6 axis permutations, the one whose axes are best aligned with LPS (Z, Y, X).
    """
    direction = np.asarray(affine, dtype=np.float64)[:3, :3]
    direction = direction / np.linalg.norm(direction, axis=0)
    targets = (2, 1, 0)  # canonical axis 0 -> LPS z (superior), 1 -> y (posterior), 2 -> x (left)
    best: tuple[float, tuple[int, int, int]] = (-1.0, (0, 1, 2))
    for perm in itertools.permutations(range(3)):
        score = sum(abs(direction[targets[a], perm[a]]) for a in range(3))
        if score > best[0] + 1e-9:
            best = (score, perm)  # type: ignore[assignment]
    perm = best[1]
    flips = tuple(bool(direction[targets[a], perm[a]] < 0) for a in range(3))
    return Reorientation(perm, flips, tuple(int(s) for s in shape), np.array(affine, dtype=np.float64))  # type: ignore[arg-type]


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """``volume`` reoriented to axial patient axes (superior, posterior, left) from the header.

    Returns the reoriented volume (a view: no copy, no interpolation, affine updated, provenance
    kept; the report gains the action "reoriented" when anything moved) and the
    :class:`Reorientation` whose ``invert`` brings model outputs back onto the original grid.
    """
    r = canonical_reorientation(volume.shape, volume.affine)
    out = r.apply(volume)
    if not r.is_identity:
        out = dataclasses.replace(
            out, geometry=dataclasses.replace(out.geometry, actions=out.geometry.actions + ("reoriented",))
        )
    return out, r
