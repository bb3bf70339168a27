"""CTARR registration of an anatomy segmentation to the atlas (../shared/CTARR.md sections 3-4).

Transform: ``atlas_mm = scale * O @ (frame_mm - centre) + translation`` per atlas-frame axis, where
``frame_mm`` is the scan point in the atlas-frame axes (feet, back, left; see atlas.py), ``centre``
the scan grid centre and ``O`` a quarter-turn rotation in the axial plane (``rotation_k``) followed
by an optional z flip. ``O`` says how the anatomy really lies compared with what the header claims.

1. Landmarks: centre of mass and mass of each anatomy; coverage weight = scan mass / atlas mass.
2. Orientation search over the 8 configurations with a weighted least-squares translation fit.
   Beyond the paper: an anatomy cut by the scan border along an axis only gives a one-sided
   constraint along that axis (its true centre lies beyond the observed one), and the decision is
   verified only when the best configuration beats every other one by a clear margin - rotation
   and z direction separately - and most of the anatomy supports it (robust landmark residual and
   volume plausibility, agreement.py); otherwise the header orientation is kept and ``verified``
   is false.
3. Dice descent of per-axis scale and translation (normalised parameters as in the paper's code:
   step 0.05, halve when the loss improved by less than 0.005, stop at the fourth halving). The
   soft Dice is evaluated in scan space (equal to the atlas-space Dice by change of variables), so
   each step costs O(foreground voxels) with analytic gradients: deterministic numpy, no threads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.anatomy.agreement import AGREE_MIN_SHARE, AGREE_MM, agreement
from dicomnode.anatomy.atlas import LPS_TO_FRAME, N_CLASSES, Atlas, frame_aligned
from dicomnode.anatomy.dice_fit import _descent, _Scan, _z_search, descend
from dicomnode.anatomy.orientation import apply_orientation, correction_matrix
from dicomnode.volume import Volume

__all__ = ["Registration", "register", "apply_orientation", "correction_matrix", "orientation_matrix", "descend",
           "coverage_weights"]

# orientation verification: the runner-up must be worse by this much (weighted RMS landmark error)
VERIFY_MARGIN_MM = 15.0
VERIFY_RATIO = 2.0
ONE_SIDED_MIN_ML = 10.0
ONE_SIDED_MIN_WEIGHT = 0.25

_R1 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (z, y, x) -> (z, -x, y)
_FZ = np.diag([-1.0, 1.0, 1.0])


def orientation_matrix(k: int, z_flip: bool) -> np.ndarray:
    """3x3 signed permutation acting on centred frame coordinates: k quarter turns, then z flip."""
    o = np.linalg.matrix_power(_R1, int(k) % 4)
    return _FZ @ o if z_flip else o


@dataclass(frozen=True)
class Registration:
    """Scan -> atlas transform plus the orientation finding (points in LPS mm / atlas-frame mm).

    ``scale``/``translation`` are per atlas-frame axis (feet, back, left); ``centre`` is the LPS
    position the orientation turns about (the anatomy grid centre). ``residual`` is the weighted
    RMS landmark error (mm) after refinement; ``dice`` the mean soft Dice at the end.
    """

    rotation_k: int
    z_flip: bool
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    residual: float
    verified: bool
    reason: str
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    dice: float = 0.0
    iterations: int = 0
    weights: tuple[float, ...] = ()
    rotation_margin_mm: float = 0.0
    flip_margin_mm: float = 0.0
    paper_rule: bool = False
    suggested: tuple[int, bool] = (0, False)
    agreement: float | None = None  # share of the anatomy supporting a verified ``suggested`` (agreement.py)
    method: str = "landmarks"  # how the orientation was decided: landmarks (this module) or turns (turns.py)

    @property
    def matrix(self) -> np.ndarray:
        """The orientation matrix O (frame coordinates)."""
        return orientation_matrix(self.rotation_k, self.z_flip)

    @property
    def reoriented(self) -> bool:
        """True when the anatomy disagrees with the header (rotation or flip)."""
        return self.rotation_k % 4 != 0 or self.z_flip

    def to_atlas(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) scan LPS mm -> (N, 3) atlas-frame mm."""
        p = np.atleast_2d(np.asarray(points_mm, np.float64))
        fc = LPS_TO_FRAME @ np.asarray(self.centre)
        q = (p @ LPS_TO_FRAME.T - fc) @ self.matrix.T
        return q * np.asarray(self.scale) + np.asarray(self.translation)

    def to_scan(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) atlas-frame mm -> (N, 3) scan LPS mm (inverse of :meth:`to_atlas`)."""
        a = np.atleast_2d(np.asarray(points_mm, np.float64))
        q = (a - np.asarray(self.translation)) / np.asarray(self.scale)
        fc = LPS_TO_FRAME @ np.asarray(self.centre)
        f = q @ self.matrix + fc  # O orthogonal: inverse = transpose
        return f @ LPS_TO_FRAME

    def corrected(self) -> "Registration":
        """The same transform for the volume after :func:`apply_orientation` (no rotation/flip)."""
        return dataclasses.replace(self, rotation_k=0, z_flip=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable summary (orientation + transform)."""
        return {
            "orientation": {"rotation_quarter_turns": int(self.rotation_k), "z_flipped": bool(self.z_flip),
                            "verified": bool(self.verified), "reason": self.reason, "method": self.method,
                            "rotation_margin_mm": round(self.rotation_margin_mm, 2),
                            "flip_margin_mm": round(self.flip_margin_mm, 2), "paper_rule": bool(self.paper_rule),
                            "agreement": None if self.agreement is None else round(float(self.agreement), 3),
                            "suggested": {"rotation_quarter_turns": int(self.suggested[0]),
                                          "z_flipped": bool(self.suggested[1])}},
            "transform": {"frame": "atlas mm: axis0 feet, axis1 back, axis2 left; atlas = scale*O*(scan-centre)+t",
                          "scale": [round(float(v), 5) for v in self.scale],
                          "translation_mm": [round(float(v), 3) for v in self.translation],
                          "centre_lps_mm": [round(float(v), 3) for v in self.centre],
                          "residual_mm": round(float(self.residual), 3) if np.isfinite(self.residual) else None,
                          "dice": round(float(self.dice), 4),
                          "iterations": int(self.iterations)},
        }

    @staticmethod
    def simple(scale: np.ndarray, translation: np.ndarray, anatomy: Volume) -> "Registration":
        """A transform without orientation change about ``anatomy``'s grid centre (atlas building)."""
        fg = frame_aligned(anatomy)
        centre = tuple(float(v) for v in fg.centre @ LPS_TO_FRAME)
        return Registration(0, False, tuple(float(v) for v in scale), tuple(float(v) for v in translation),  # type: ignore[arg-type]
                            0.0, True, "given", centre=centre)  # type: ignore[arg-type]


# ---- scan points and landmarks ---------------------------------------------------------------
def _drop_isolated(lab: np.ndarray) -> np.ndarray:
    """Labels with every voxel that has no 6-neighbour of its own class set to 0 (speckle noise)."""
    lab = np.asarray(lab)
    keep = np.zeros(lab.shape, bool)
    for a in range(3):
        n = lab.shape[a]
        if n < 2:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, n - 1), slice(1, n)
        same = lab[tuple(lo)] == lab[tuple(hi)]
        keep[tuple(lo)] |= same
        keep[tuple(hi)] |= same
    return np.where(keep, lab, 0)


def _scan_points(anatomy: Volume, probabilities: np.ndarray | None) -> _Scan:
    grid = frame_aligned(anatomy)
    arr = grid.array
    shape = np.asarray(arr.shape)
    if probabilities is None:
        lab = _drop_isolated(arr if arr.dtype.kind in "iu" else arr.astype(np.int64))
        sel = (lab >= 1) & (lab <= N_CLASSES)
        idx = np.argwhere(sel)
        cls = lab[sel].astype(np.int64) - 1
        w = np.ones(len(idx))
        hard = lab
    else:
        probs = np.asarray(probabilities, np.float32)
        if probs.shape[0] == N_CLASSES + 1:
            probs = probs[1:]
        if probs.shape != (N_CLASSES,) + anatomy.shape:
            raise ValueError(f"probabilities must be (19 or 20, *anatomy.shape), got {probs.shape}")
        chans = [frame_aligned(Volume(probs[c], anatomy.affine), order=1).array for c in range(N_CLASSES)]
        stack = np.stack(chans)
        sel = stack >= 0.05
        cidx = np.argwhere(sel)
        cls, idx, w = cidx[:, 0], cidx[:, 1:], stack[sel].astype(np.float64)
        hard = np.where(stack.max(axis=0) >= 0.5, np.argmax(stack, axis=0) + 1, 0)
    q = idx * grid.spacing + grid.origin - grid.centre
    vox = float(np.prod(grid.spacing))
    tot = np.bincount(cls, weights=w, minlength=N_CLASSES)
    mass = tot * vox
    com = np.zeros((N_CLASSES, 3))
    for a in range(3):
        com[:, a] = np.bincount(cls, weights=w * q[:, a], minlength=N_CLASSES) / np.maximum(tot, 1e-9)
    trunc = np.zeros((N_CLASSES, 3, 2), bool)
    for a in range(3):  # a class is cut by the border when it appears in a face of the grid
        for e, face in enumerate((np.take(hard, 0, axis=a), np.take(hard, shape[a] - 1, axis=a))):
            f = face[(face >= 1) & (face <= N_CLASSES)].astype(np.int64)
            trunc[:, a, e] = np.bincount(f - 1, minlength=N_CLASSES)[:N_CLASSES] > 0
    return _Scan(q, cls.astype(np.int64), w, grid, mass, com, trunc)


def coverage_weights(scan_mass: np.ndarray, atlas: Atlas) -> np.ndarray:
    """w_c = scan mass / atlas mass (0 where either is 0), capped at 1, not normalised."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(atlas.mass > 0, scan_mass / np.where(atlas.mass > 0, atlas.mass, 1.0), 0.0)
    return np.clip(w, 0.0, 1.0)


# ---- orientation search ----------------------------------------------------------------------
def _axis_fit(d: np.ndarray, wf: np.ndarray, kind: np.ndarray) -> tuple[float, float, float]:
    """Fit t minimising sum w*rho(d - t)^2; kind 0 full, +1 (need d >= t), -1 (need d <= t), 2 none.

    Returns (t, cost, weight of the terms used).
    """
    use = (kind != 2) & (wf > 0)
    if not np.any(use):
        return 0.0, 0.0, 0.0
    d, wf, kind = d[use], wf[use], kind[use]
    full = kind == 0
    t = float(np.average(d[full], weights=wf[full])) if np.any(full) else float(np.average(d, weights=wf))

    def cost(tv: float) -> float:
        r = d - tv
        r = np.where(kind == 1, np.minimum(r, 0.0), np.where(kind == -1, np.maximum(r, 0.0), r))
        return float(np.sum(wf * r * r))

    best_t, best_c = t, cost(t)
    for _ in range(25):
        r = d - t
        active = full | ((kind == 1) & (r < 0)) | ((kind == -1) & (r > 0))
        if not np.any(active):
            break
        t_new = float(np.average(d[active], weights=wf[active]))
        c = cost(t_new)
        if c < best_c - 1e-12:
            best_t, best_c = t_new, c
        if abs(t_new - t) < 1e-6:
            break
        t = t_new
    return best_t, best_c, float(np.sum(wf))


def _kinds(trunc: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Per class and oriented axis: 0 full, +1 cut at the high end, -1 cut at the low end, 2 both."""
    out = np.zeros((N_CLASSES, 3), np.int64)
    for i in range(3):
        j = int(np.argmax(np.abs(o[i])))
        sgn = o[i, j]
        lo, hi = trunc[:, j, 0], trunc[:, j, 1]
        if sgn < 0:
            lo, hi = hi, lo
        out[:, i] = np.where(lo & hi, 2, np.where(hi, 1, np.where(lo, -1, 0)))
    return out


def _orientation_costs(scan: _Scan, atlas: Atlas, wc: np.ndarray) -> dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each configuration: (translation (3), cost per axis (3), weight per axis (3))."""
    present = scan.mass > 0
    wn = wc / max(wc.sum(), 1e-12)
    w_os = np.where(scan.mass >= ONE_SIDED_MIN_ML * 1000.0, np.maximum(wc, ONE_SIDED_MIN_WEIGHT), wc)
    w_os = w_os / max(wc.sum(), 1e-12)
    out = {}
    for k in range(4):
        for flip in (False, True):
            o = orientation_matrix(k, flip)
            x = scan.com @ o.T
            kinds = _kinds(scan.trunc, o)
            t, c, wsum = np.zeros(3), np.zeros(3), np.zeros(3)
            for a in range(3):
                wf = np.where(kinds[:, a] == 0, wn, w_os) * present * (atlas.mass > 0)
                t[a], c[a], wsum[a] = _axis_fit(atlas.com[:, a] - x[:, a], wf, kinds[:, a])
            out[(k, flip)] = (t, c, wsum)
    return out


def _rms(cost: float, weight: float) -> float:
    return float(np.sqrt(cost / weight)) if weight > 0 else 0.0


def _decide(costs: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[int, bool, float, float, str, bool]:
    """(k, flip, rotation margin, flip margin, reason, verified) from the per-axis costs."""
    # costs separate: axes 1-2 depend only on k, axis 0 only on the flip
    inplane = {k: costs[(k, False)][1][1:].sum() for k in range(4)}
    w_in = {k: costs[(k, False)][2][1:].sum() for k in range(4)}
    zc = {f: costs[(0, f)][1][0] for f in (False, True)}
    wz = {f: costs[(0, f)][2][0] for f in (False, True)}
    rms_in = {k: _rms(inplane[k], w_in[k]) for k in range(4)}
    rms_z = {f: _rms(zc[f], wz[f]) for f in (False, True)}
    order = sorted(range(4), key=lambda k: (rms_in[k], k))
    k_best, k_next = order[0], order[1]
    f_best = min((False, True), key=lambda f: (rms_z[f], f))
    f_next = not f_best
    m_rot = rms_in[k_next] - rms_in[k_best]
    m_z = rms_z[f_next] - rms_z[f_best]
    ok_rot = (w_in[k_best] > 0 and m_rot >= VERIFY_MARGIN_MM and rms_in[k_next] >= VERIFY_RATIO * rms_in[k_best])
    ok_z = (wz[f_best] > 0 and m_z >= VERIFY_MARGIN_MM and rms_z[f_next] >= VERIFY_RATIO * rms_z[f_best])
    reasons = []
    if not ok_rot:
        reasons.append(f"axial rotation undecided: best {k_best * 90} deg leads by {m_rot:.1f} mm "
                       f"(needs {VERIFY_MARGIN_MM:.0f} mm and x{VERIFY_RATIO:.0f})")
    if not ok_z:
        reasons.append(f"head-feet direction undecided: leads by {m_z:.1f} mm "
                       f"(needs {VERIFY_MARGIN_MM:.0f} mm and x{VERIFY_RATIO:.0f})")
    verified = ok_rot and ok_z
    reason = ("anatomy confirms the orientation" if verified and k_best == 0 and not f_best
              else "anatomy disagrees with the header" if verified else "; ".join(reasons))
    return k_best, bool(f_best), float(m_rot), float(m_z), reason, verified


# ---- public ----------------------------------------------------------------------------------
def register(anatomy: Volume, atlas: Atlas, *, probabilities: np.ndarray | None = None,
             orientation_search: bool = True, orientation: tuple[int, bool] | None = None) -> Registration:
    """Register an anatomy label Volume (CTARR classes 0..19) to ``atlas``.

    ``probabilities`` (optional, (20 or 19, *anatomy.shape)) makes landmarks and Dice soft.
    ``orientation_search=False`` keeps the header orientation (used when building the atlas);
    ``orientation=(k, z_flip)`` fits the transform in that orientation without searching (the
    orientation was decided elsewhere, e.g. by turns.py; ``verified`` is False, the caller says).
    Raises ValueError when the segmentation holds none of the 19 anatomies.
    """
    scan = _scan_points(anatomy, probabilities)
    if not np.any(scan.mass > 0):
        raise ValueError("the anatomy segmentation contains none of the 19 anatomies")
    wc = coverage_weights(scan.mass, atlas)
    paper_rule = int(np.sum(wc > 0.25)) > 3
    costs = _orientation_costs(scan, atlas, wc)
    agree: float | None = None
    if orientation is not None:
        k_s, f_s = int(orientation[0]) % 4, bool(orientation[1])
        m_rot = m_z = 0.0
        reason, verified = "orientation given", False
        k, flip = k_s, f_s
    elif orientation_search:
        k_s, f_s, m_rot, m_z, reason, verified = _decide(costs)
        if verified:  # the margin alone is not enough: most of the anatomy must support it (agreement.py)
            o_s = orientation_matrix(k_s, f_s)
            whole = np.all(_kinds(scan.trunc, np.eye(3)) == 0, axis=1)
            ag = agreement(scan.com @ o_s.T, _kinds(scan.trunc, o_s), scan.mass, wc, whole, atlas.com, atlas.mass,
                           costs[(k_s, f_s)][0])
            agree = ag.share
            if not ag.ok:
                verified = False
                reason = (f"anatomy does not support the best orientation ({k_s * 90} deg, z flip {f_s}): "
                          f"{ag.share:.0%} of it within {AGREE_MM:.0f} mm of the atlas with a plausible volume "
                          f"(needs {AGREE_MIN_SHARE:.0%}); not fitting: {', '.join(ag.disagreeing[:4])}")
        k, flip = (k_s, f_s) if verified else (0, False)
    else:
        k_s, f_s, m_rot, m_z, reason, verified = 0, False, 0.0, 0.0, "orientation search disabled", False
        k, flip = 0, False
    o = orientation_matrix(k, flip)
    t0 = _z_search(scan, atlas, o, costs[(k, flip)][0])
    scale, translation, dice, iters = _descent(scan, atlas, o, t0)
    # residual: weighted RMS over anatomies whose centre is reliable on all axes
    x = (scan.com @ o.T) * scale + translation
    full = np.all(_kinds(scan.trunc, o) == 0, axis=1) & (scan.mass > 0) & (atlas.mass > 0)
    wres = wc * full
    residual = float(np.sqrt(np.sum(wres * np.sum((x - atlas.com) ** 2, axis=1)) / wres.sum())) if wres.sum() > 0 else float("nan")
    centre = tuple(float(v) for v in scan.grid.centre @ LPS_TO_FRAME)
    return Registration(
        rotation_k=int(k), z_flip=bool(flip), scale=tuple(float(v) for v in scale),  # type: ignore[arg-type]
        translation=tuple(float(v) for v in translation), residual=residual, verified=bool(verified),  # type: ignore[arg-type]
        reason=reason, centre=centre, dice=float(dice), iterations=int(iters),  # type: ignore[arg-type]
        weights=tuple(float(v) for v in wc), rotation_margin_mm=float(m_rot), flip_margin_mm=float(m_z),
        paper_rule=paper_rule, suggested=(int(k_s), bool(f_s)), agreement=agree,
    )
