"""Plausibility of an anatomy segmentation after registration (CTARR limit 3 of ../shared/CTARR.md).

Checks: the landmark residual after registration; the volume of every anatomy that lies wholly
inside the field of view against the atlas (scaled by the registration); left/right consistency
(left anatomies must land left of their right partners in the atlas frame); the order of the
vertebral classes from head to feet (the paper's failure: lumbar vertebrae labelled cervical).
The findings go into the job record and the SR; ``ok`` is False when any finding is a warning.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.anatomy.agreement import VOLUME_HIGH, VOLUME_LOW
from dicomnode.anatomy.atlas import CLASS_NAMES, LR_PAIRS, N_CLASSES, Atlas, load_atlas
from dicomnode.anatomy.register import Registration, _kinds, _scan_points
from dicomnode.volume import Volume

RESIDUAL_WARN_MM = 40.0
LR_TOLERANCE_MM = 10.0
SPINE_CLASSES = (2, 6, 7, 8)  # C, T, L vertebrae, sacrum: head -> feet
COMPACT_CLASSES = (11, 14, 15, 16, 17, 18, 19)  # brain, heart, liver, spleen, kidneys, bladder: one piece in z
SPLIT_GAP_MM = 15.0
SPLIT_MIN_SHARE = 0.05
_DEFAULT_ATLAS: list[Atlas] = []


@dataclass(frozen=True)
class QcReport:
    """Plausibility findings of one anatomy segmentation (JSON-serialisable via :meth:`to_json`)."""

    ok: bool
    residual_mm: float
    orientation_verified: bool
    anatomies_found: tuple[str, ...]
    volume_ratios: tuple[tuple[str, float], ...]
    left_right_consistent: bool
    spine_order_consistent: bool
    split_anatomies: tuple[str, ...]
    findings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["residual_mm"] = None if not np.isfinite(self.residual_mm) else round(float(self.residual_mm), 2)
        d["volume_ratios"] = {n: round(float(r), 3) for n, r in self.volume_ratios}
        d["anatomies_found"] = list(self.anatomies_found)
        d["split_anatomies"] = list(self.split_anatomies)
        d["findings"] = list(self.findings)
        return d


def _default_atlas() -> Atlas:
    if not _DEFAULT_ATLAS:
        from dicomnode.config import PROJECT_ROOT

        _DEFAULT_ATLAS.append(load_atlas(Path(PROJECT_ROOT) / "config" / "atlas" / "atlas19.npz"))
    return _DEFAULT_ATLAS[0]


def check(anatomy: Volume, registration: Registration, atlas: Atlas | None = None) -> QcReport:
    """QC of ``anatomy`` (CTARR labels) registered by ``registration``; ``atlas`` defaults to the shipped one.

    Raises FileNotFoundError when no atlas is given and the shipped one is missing.
    """
    atlas = atlas or _default_atlas()
    scan = _scan_points(anatomy, None)
    o = registration.matrix
    scale = np.asarray(registration.scale)
    present = scan.mass > 0
    findings: list[str] = []
    # landmark residual
    res = float(registration.residual)
    if np.isfinite(res) and res > RESIDUAL_WARN_MM:
        findings.append(f"landmark residual {res:.0f} mm > {RESIDUAL_WARN_MM:.0f} mm: anatomy does not fit the atlas")
    if not registration.verified:
        findings.append(f"orientation not verified: {registration.reason}")
    # volumes of anatomies wholly inside the field of view
    whole = np.all(_kinds(scan.trunc, np.eye(3)) == 0, axis=1) & present & (atlas.mass > 0)
    expected = atlas.mass / float(np.prod(scale))  # atlas volume seen in scan millimetres
    ratios = []
    for c in np.flatnonzero(whole):
        r = float(scan.mass[c] / expected[c])
        ratios.append((CLASS_NAMES[c], r))
        if r < VOLUME_LOW or r > VOLUME_HIGH:
            findings.append(f"{CLASS_NAMES[c]} volume {scan.mass[c] / 1000:.0f} ml is {r:.2f}x the atlas")
    # positions in the atlas frame
    # scan.com is centred on the anatomy grid centre, the point the registration turns about
    mapped = (scan.com @ o.T) * scale + np.asarray(registration.translation)
    lr_ok = True
    for left, right in LR_PAIRS:
        li, ri = left - 1, right - 1
        if present[li] and present[ri] and mapped[li, 2] < mapped[ri, 2] - LR_TOLERANCE_MM:
            lr_ok = False
            findings.append(f"{CLASS_NAMES[li]} lies right of {CLASS_NAMES[ri]}: left/right inconsistent")
    spine = [c - 1 for c in SPINE_CLASSES if present[c - 1]]
    z = [mapped[c, 0] for c in spine]
    spine_ok = all(z[i] < z[i + 1] for i in range(len(z) - 1))
    if not spine_ok:
        findings.append("vertebral classes out of head-to-feet order: mislabelled vertebrae or corrupted slice order")
    split = _split_along_z(scan)
    for name, gap in split:
        findings.append(f"{name} is split along the head-feet axis by {gap:.0f} mm: corrupted slice order or mislabel")
    warn = [f for f in findings if not f.startswith("orientation not verified")]
    return QcReport(ok=not warn, residual_mm=res, orientation_verified=bool(registration.verified),
                    anatomies_found=tuple(CLASS_NAMES[c] for c in range(N_CLASSES) if present[c]),
                    volume_ratios=tuple(ratios), left_right_consistent=lr_ok, spine_order_consistent=spine_ok,
                    split_anatomies=tuple(n for n, _ in split), findings=tuple(findings))


def _split_along_z(scan: Any) -> list[tuple[str, float]]:
    """Compact anatomies whose slices (frame axis 0) have a gap >= SPLIT_GAP_MM between two parts
    that each hold >= SPLIT_MIN_SHARE of the anatomy: (name, gap mm)."""
    sp = float(scan.grid.spacing[0])
    n = scan.grid.array.shape[0]
    zi = np.round((scan.q[:, 0] + scan.grid.centre[0] - scan.grid.origin[0]) / sp).astype(np.int64)
    out = []
    for c in COMPACT_CLASSES:
        sel = scan.cls == c - 1
        if not np.any(sel):
            continue
        prof = np.bincount(zi[sel], weights=scan.w[sel], minlength=n)
        occupied = np.flatnonzero(prof > 0)
        total = prof.sum()
        for a, b in zip(occupied[:-1], occupied[1:]):
            gap = (b - a - 1) * sp
            if gap >= SPLIT_GAP_MM:
                below = prof[: a + 1].sum() / total
                if min(below, 1 - below) >= SPLIT_MIN_SHARE:
                    out.append((CLASS_NAMES[c - 1], gap))
                    break
    return out
