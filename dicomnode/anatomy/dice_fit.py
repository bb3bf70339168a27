"""The Dice fit of CTARR's registration: a scan's anatomy labels against the atlas masks.

``_objective`` is the soft Dice of the scan's labelled points sampled (trilinearly) in the atlas,
with the paper's per-axis scale and translation; ``descend`` the paper's gradient descent
schedule; ``_z_search`` a head-feet grid search of the start translation by the same mean Dice,
which keeps a handful of mislabelled anatomies from dragging the start hundreds of mm away.
Used by :mod:`dicomnode.anatomy.register`; nothing here raises for valid inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.anatomy.atlas import N_CLASSES, Atlas, FrameGrid

STEP = 0.05
MIN_IMPROVEMENT = 0.005
N_HALVINGS = 4
MAX_ITER = 400
MAX_POINTS = 60000  # Dice descent subsamples the foreground on a regular lattice above this
SEARCH_STEP_MM = 20.0  # head-feet search of the start translation (robust to mislabelled anatomies)
SEARCH_POINTS = 5000  # foreground points the search evaluates (lattice subsample)
SEARCH_MIN_GAIN = 0.02  # mean Dice the search must gain over the landmark start to replace it


@dataclass(frozen=True)
class _Scan:
    q: np.ndarray  # (N, 3) centred frame mm of foreground points
    cls: np.ndarray  # (N,) 0-based class
    w: np.ndarray  # (N,) weight (1 or probability)
    grid: FrameGrid
    mass: np.ndarray  # (19,) mm^3
    com: np.ndarray  # (19, 3) centred frame mm
    trunc: np.ndarray  # (19, 3, 2) bool: touches the (low, high) border along each frame axis


# ---- Dice descent ----------------------------------------------------------------------------
def _sample(atlas: Atlas, cls: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear atlas value of each point's own class at atlas-frame mm ``y``, and d/dy (mm^-1)."""
    u = (y - atlas.origin) / atlas.spacing - atlas.lower[cls] + 1.0  # padded box index
    dims = atlas.dims[cls]
    inside = np.all((u >= 0) & (u <= dims - 1), axis=1)
    u = np.clip(u, 0, dims - 1.000001)
    i0 = np.floor(u).astype(np.int64)
    f = u - i0
    s1 = dims[:, 2]
    s0 = dims[:, 1] * s1
    base = atlas.offsets[cls] + i0[:, 0] * s0 + i0[:, 1] * s1 + i0[:, 2]
    fl = atlas.flat
    v = [[[fl[base + a * s0 + b * s1 + c] for c in (0, 1)] for b in (0, 1)] for a in (0, 1)]
    f0, f1, f2 = f[:, 0], f[:, 1], f[:, 2]
    g0, g1, g2 = 1 - f0, 1 - f1, 1 - f2
    c00 = v[0][0][0] * g2 + v[0][0][1] * f2
    c01 = v[0][1][0] * g2 + v[0][1][1] * f2
    c10 = v[1][0][0] * g2 + v[1][0][1] * f2
    c11 = v[1][1][0] * g2 + v[1][1][1] * f2
    c0 = c00 * g1 + c01 * f1
    c1 = c10 * g1 + c11 * f1
    val = c0 * g0 + c1 * f0
    d0 = c1 - c0
    d1 = (c01 - c00) * g0 + (c11 - c10) * f0
    e0 = (v[0][0][1] - v[0][0][0]) * g1 + (v[0][1][1] - v[0][1][0]) * f1
    e1 = (v[1][0][1] - v[1][0][0]) * g1 + (v[1][1][1] - v[1][1][0]) * f1
    d2 = e0 * g0 + e1 * f0
    grad = np.stack([d0, d1, d2], axis=1) / atlas.spacing
    val = np.where(inside, val, 0.0)
    grad = np.where(inside[:, None], grad, 0.0)
    return val, grad


def _box_bounds(atlas: Atlas, c: int, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index range [a, b) of class ``c``'s atlas box whose voxel centres lie inside [lo_mm, hi_mm]."""
    m, low = atlas.masks[c], atlas.lower[c]
    pos0 = atlas.origin + low * atlas.spacing
    a = np.clip(np.ceil((lo_mm - pos0) / atlas.spacing - 1e-9).astype(int), 0, m.shape)
    b = np.clip(np.floor((hi_mm - pos0) / atlas.spacing + 1e-9).astype(int) + 1, 0, m.shape)
    return a, b


def _lattice(scan: _Scan, max_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, cls, w) of ``scan``, subsampled on a regular lattice above ``max_points`` points; each kept
    point then stands for m^3 voxels (its weight times m^3)."""
    q, cls, w = scan.q, scan.cls, scan.w
    if len(q) <= max_points:
        return q, cls, w
    m = int(np.ceil((len(q) / max_points) ** (1 / 3)))
    idx = np.round((q - q.min(axis=0)) / scan.grid.spacing).astype(np.int64)
    keep = np.all(idx % m == 0, axis=1)
    return q[keep], cls[keep], w[keep] * float(m ** 3)


def _window_mass(atlas: Atlas, lo_mm: np.ndarray, hi_mm: np.ndarray) -> np.ndarray:
    """Atlas mass (voxel units) of each class with voxel centres inside [lo_mm, hi_mm]."""
    out = np.zeros(N_CLASSES)
    for c in range(N_CLASSES):
        m = atlas.masks[c]
        a, b = _box_bounds(atlas, c, lo_mm, hi_mm)
        if np.all(b > a):
            out[c] = float(m[a[0]:b[0], a[1]:b[1], a[2]:b[2]].sum())
    return out


def _z_profiles(atlas: Atlas, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative atlas mass per class along the head-feet axis inside the [lo, hi] x-y window.

    Returns (z of each atlas slice centre (Z,), cumulative mass (19, Z + 1)); the mass of a z range
    is a difference of two entries, equal to :func:`_window_mass` with the same x-y window.
    """
    nz = int(atlas.shape[0])
    prof = np.zeros((N_CLASSES, nz))
    for c in range(N_CLASSES):
        m, low = atlas.masks[c], atlas.lower[c]
        a, b = _box_bounds(atlas, c, lo_mm, hi_mm)
        if b[1] > a[1] and b[2] > a[2] and m.shape[0] > 0:
            prof[c, low[0]:low[0] + m.shape[0]] = m[:, a[1]:b[1], a[2]:b[2]].sum(axis=(1, 2))
    z = atlas.origin[0] + np.arange(nz) * atlas.spacing[0]
    return z, np.concatenate([np.zeros((N_CLASSES, 1)), np.cumsum(prof, axis=1)], axis=1)


def _objective(scan: _Scan, atlas: Atlas, o: np.ndarray, t0: np.ndarray) -> tuple[Any, np.ndarray]:
    """(loss_grad(a, b) -> (loss, grad (6), mean dice), h): the soft Dice loss of atlas = t0 + (q - h*b)/a."""
    q, cls, w = _lattice(scan, MAX_POINTS)
    qo = q @ o.T
    shape_o = np.abs(o) @ (np.asarray(scan.grid.array.shape) * scan.grid.spacing)
    h = shape_o / 2.0
    vs_va = float(np.prod(scan.grid.spacing)) / atlas.voxel_volume
    m_win = _window_mass(atlas, t0 - h, t0 + h)
    present = np.bincount(cls, weights=w, minlength=N_CLASSES) > 0
    n_present = max(int(present.sum()), 1)

    def loss_grad(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, float]:
        y = t0 + (qo - h * b) / a
        inw = np.all(np.abs(y - t0) <= h, axis=1)
        val, g = _sample(atlas, cls, y)
        ww = w * inw
        s_c = np.bincount(cls, weights=ww, minlength=N_CLASSES)
        n_c = np.bincount(cls, weights=ww * val, minlength=N_CLASSES)
        rho = float(np.prod(1.0 / a)) * vs_va
        den = rho * s_c + m_win
        safe = np.where(den > 0, den, 1.0)
        dice = np.where(present & (den > 0), 2 * rho * n_c / safe, 0.0)
        grad = np.zeros(6)
        for k in range(3):
            dy_da = -(qo[:, k] - h[k] * b[k]) / (a[k] ** 2)
            dy_db = -h[k] / a[k]
            gk = ww * g[:, k]
            dn_da = np.bincount(cls, weights=gk * dy_da, minlength=N_CLASSES)
            dn_db = np.bincount(cls, weights=gk, minlength=N_CLASSES) * dy_db
            drho = -rho / a[k]
            for p, (dn, dr) in enumerate(((dn_da, drho), (dn_db, 0.0))):
                num = (dr * n_c + rho * dn) * den - rho * n_c * (dr * s_c)
                dd = np.where(present & (den > 0), 2 * num / (safe * safe), 0.0)
                grad[k + 3 * p] = -float(dd.sum()) / n_present
        mean_dice = float(dice.sum()) / n_present
        return 1.0 - mean_dice, grad, mean_dice

    return loss_grad, h


def descend(loss_grad: Any, x0: np.ndarray, *, step: float = STEP, min_improvement: float = MIN_IMPROVEMENT,
            n_halvings: int = N_HALVINGS, max_iter: int = MAX_ITER, lower: np.ndarray | None = None,
            upper: np.ndarray | None = None) -> tuple[np.ndarray, float, int]:
    """Plain gradient descent with the paper's schedule; returns (best x, its loss, evaluations).

    ``loss_grad(x) -> (loss, grad)``. The step is halved every time the loss improved by less than
    ``min_improvement`` since the previous evaluation; the descent stops at the ``n_halvings``-th
    halving (or after ``max_iter`` evaluations). The best point seen is returned.
    """
    x = np.asarray(x0, np.float64).copy()
    best_x, best_loss = x.copy(), np.inf
    prev: float | None = None
    halvings, it = 0, 0
    for it in range(1, max_iter + 1):
        loss, grad = loss_grad(x)
        if loss < best_loss:
            best_x, best_loss = x.copy(), float(loss)
        if prev is not None and prev - loss < min_improvement:
            step *= 0.5
            halvings += 1
            if halvings >= n_halvings:
                break
        x = x - step * np.asarray(grad)
        if lower is not None or upper is not None:
            x = np.clip(x, lower, upper)
        prev = float(loss)
    return best_x, best_loss, it


def _z_search(scan: _Scan, atlas: Atlas, o: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """The start translation with its head-feet part replaced by the best of a grid search.

    Landmark centres are pulled far off by a few mislabelled anatomies (a model's false positives
    far from their true place, truncation flags set by stray voxels), and the Dice descent then
    settles in a local optimum hundreds of mm away. The mean Dice of the whole label map is far
    less sensitive to such outliers, so it is evaluated at every head-feet position of the atlas
    (SEARCH_STEP_MM apart, scale 1, on a lattice subsample); the best position replaces the
    landmark start when it gains at least SEARCH_MIN_GAIN.
    """
    q, cls, w = _lattice(scan, SEARCH_POINTS)
    qo = q @ o.T
    h = (np.abs(o) @ (np.asarray(scan.grid.array.shape) * scan.grid.spacing)) / 2.0
    z, cum = _z_profiles(atlas, t0 - h, t0 + h)
    present = np.bincount(cls, weights=w, minlength=N_CLASSES) > 0
    rho = float(np.prod(scan.grid.spacing)) / atlas.voxel_volume
    dims = atlas.dims[cls]

    def dice_at(t: np.ndarray) -> float:  # the descent's mean Dice at scale 1, nearest atlas voxel
        i, j = np.searchsorted(z, t[0] - h[0] - 1e-9), np.searchsorted(z, t[0] + h[0] + 1e-9, side="right")
        m_win = cum[:, j] - cum[:, i]
        u = np.rint((t + qo - atlas.origin) / atlas.spacing).astype(np.int64) - atlas.lower[cls] + 1
        inside = np.all((u >= 0) & (u < dims), axis=1)
        u = np.clip(u, 0, dims - 1)
        val = atlas.flat[atlas.offsets[cls] + (u[:, 0] * dims[:, 1] + u[:, 1]) * dims[:, 2] + u[:, 2]] * inside
        s_c = np.bincount(cls, weights=w, minlength=N_CLASSES)
        n_c = np.bincount(cls, weights=w * val, minlength=N_CLASSES)
        den = rho * s_c + m_win
        dice = np.where(present & (den > 0), 2 * rho * n_c / np.where(den > 0, den, 1.0), 0.0)
        return float(dice.sum()) / max(int(present.sum()), 1)

    lo = float(atlas.origin[0])
    hi = lo + float(atlas.shape[0]) * float(atlas.spacing[0])
    best_t, best = t0, dice_at(t0)
    start = best
    for tz in np.arange(lo, hi + SEARCH_STEP_MM, SEARCH_STEP_MM):
        t = t0.copy()
        t[0] = tz
        d = dice_at(t)
        if d > best:
            best_t, best = t, d
    return best_t if best >= start + SEARCH_MIN_GAIN else t0


def _descent(scan: _Scan, atlas: Atlas, o: np.ndarray, t0: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Dice descent of (a, b): atlas = t0 + (q - h*b)/a. Returns (scale, translation, dice, iterations)."""
    loss_grad, h = _objective(scan, atlas, o, t0)
    lo = np.array([0.5, 0.5, 0.5, -np.inf, -np.inf, -np.inf])
    hi = np.array([2.0, 2.0, 2.0, np.inf, np.inf, np.inf])
    x0 = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    x, loss, it = descend(lambda v: loss_grad(v[:3], v[3:])[:2], x0, lower=lo, upper=hi)
    a, b = x[:3], x[3:]
    return 1.0 / a, t0 - h * b / a, 1.0 - loss, it
