"""Procedural whole-body label-map phantom (head to thighs) for training segmenters without images.

API
---
``generate_phantom(seed, fov="whole", spacing_mm=3.0) -> (labels, affine)``

* ``labels``: ``np.ndarray`` int16, shape (slice, row, column) = (z, y, x).
* ``affine``: 4x4 float64, voxel index (slice, row, column) -> LPS mm, the same convention as
  :class:`dicomnode.volume.Volume` (``Volume(labels, affine)`` works directly).

Orientation (documented contract; the same axes as the CTARR atlas frame of ../shared/CTARR.md):

* slice index grows towards the FEET (head -> feet; LPS z decreases with the slice index),
* row index grows towards POSTERIOR (LPS +y),
* column index grows towards the patient's LEFT (LPS +x) - the standard axial DICOM picture
  (patient's right on the left of the image).

This is the orientation of the node's model grid (``dicomnode.infer.tiling.CANONICAL_DIRECTION``),
so patches go to the models as they are; ``inference.train`` flips them head-feet at random except
for the models in ``NODE_ORDER``.

Label values: ``LABELS`` (name -> value). 1..19 are the CTARR anatomies in CTARR order
(``CTARR_NAMES``); 20.. are extra tissue classes the CT synthesis fills with their own HU
distributions (fat, muscle, bowel, gas, table, other bone, ...). 0 is air outside the body.
Fields of view (``FOVS``): "whole", "head", "chest", "abdomen", "pelvis".
Randomised per seed: height, lean girth, fat thickness, belly, organ sizes/positions, bladder
filling, arms up/down, yaw, position in the field of view, table, reconstruction circle, kidney
position, coronal tilt and perirenal fat, width of the liver's left lobe, thickness of the sacral
alae and tilt of the sacrum, lumbar lordosis, the shape of the iliac crest, the depth of the
costophrenic recesses (how far the lungs reach down round the liver and spleen).
Raises ValueError for an unknown ``fov`` or a non-positive spacing.
"""
from __future__ import annotations

import math

import numpy as np

from inference.phantom_shapes import Canvas, Fn, ellipsoid, interp, sheared, tube
from inference.phantom_skeleton import paint_skeleton

CTARR_NAMES: tuple[str, ...] = (
    "skull", "cervical_vertebrae", "left_ribs_scapula_clavicle", "right_ribs_scapula_clavicle",
    "sternum", "thoracic_vertebrae", "lumbar_vertebrae", "sacrum", "left_hip", "right_hip",
    "brain", "left_lung", "right_lung", "heart", "liver", "spleen", "left_kidney", "right_kidney",
    "urinary_bladder",
)
EXTRA_NAMES: tuple[str, ...] = (
    "fat", "muscle", "bowel", "gas", "table", "other_bone", "soft_tissue", "outside_fov",
    "vessel", "eye", "airway", "csf", "cartilage",
)
LABELS: dict[str, int] = {n: i + 1 for i, n in enumerate(CTARR_NAMES + EXTRA_NAMES)}
N_LABELS = len(LABELS) + 1  # including background 0
FOVS: tuple[str, ...] = ("whole", "head", "chest", "abdomen", "pelvis")
# z range (mm from the vertex, reference adult) of each field of view
_FOV_Z = {"whole": (-20.0, 1060.0), "head": (-25.0, 260.0), "chest": (280.0, 640.0),
          "abdomen": (520.0, 900.0), "pelvis": (720.0, 1000.0)}


def generate_phantom(seed: int, fov: str = "whole", spacing_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels int16 (z, y, x), affine 4x4 index->LPS) of a random phantom; see module doc.

    Raises ValueError for an unknown ``fov`` or ``spacing_mm <= 0``.
    """
    if fov not in _FOV_Z:
        raise ValueError(f"unknown field of view {fov!r}; expected one of {FOVS}")
    if not spacing_mm > 0:
        raise ValueError("spacing_mm must be positive")
    rng = np.random.default_rng(seed)
    U = rng.uniform
    H = U(0.88, 1.12)           # height scale (z)
    Wl = U(0.85, 1.12)          # lean girth scale (x, y)
    ft = U(4.0, 40.0)           # subcutaneous fat (mm)
    belly = U(0.0, 1.0) ** 2 * 70.0
    sp = float(spacing_mm)
    fz0, fz1 = _FOV_Z[fov]
    fz0 = fz0 * H + U(-40, 40); fz1 = fz1 * H + U(-40, 40)
    if fov == "head":
        fz1 = max(fz1, 200 * H)
    D = U(230, 300) if fov == "head" else U(380, 520) * (0.8 + 0.2 * Wl)
    nz = int(round((fz1 - fz0) / sp)); nxy = int(round(D / sp))
    shift = (U(-0.08, 0.08) * D, U(-0.12, 0.05) * D)
    cv = Canvas((nz, nxy, nxy), sp, fz0, nxy * sp / 2, U(-0.12, 0.12), shift)
    L = LABELS
    Z = lambda v: v * H  # noqa: E731  reference z (mm) -> this patient

    # ---- trunk profile (lean) ---------------------------------------------------------------
    zp = [Z(v) for v in (270, 300, 335, 400, 500, 570, 650, 750, 850, 930)]
    axp = [w * Wl for w in (55, 140, 165, 160, 158, 150, 145, 152, 170, 175)]
    ayp = [w * Wl for w in (55, 85, 95, 105, 112, 112, 110, 108, 108, 100)]
    bz = [Z(v) for v in (560, 620, 700, 780, 860)]; bv = [0, 0.6, 1.0, 0.7, 0.2]

    def ax(z): return interp(z, zp, axp)
    def ay(z): return interp(z, zp, ayp)

    lord = U(10, 28)  # lumbar lordosis: how far L3/L4 lies in front of the L1-S1 line (mm)

    def spine_y(z):  # vertebral body centre (posterior +)
        return interp(z, [Z(v) for v in (200, 330, 450, 600, 650, 700, 745, 780)],
                       [w * Wl for w in (10, 30, 55, 45, 45 - 0.7 * lord, 45 - lord, 45 - 0.6 * lord, 45)])

    def trunk(extra: float, ant_extra: float = 0.0) -> Fn:
        def fn(z, y, x):
            a = ax(z) + extra
            bb = np.where(y < 0, ay(z) + extra + ant_extra * interp(z, bz, bv), ay(z) + extra)
            return (x / a) ** 2 + (y / bb) ** 2 <= 1.0
        return fn
    tb = (Z(270), Z(940), -260, 260, -300, 300)
    cv.paint(tb, trunk(ft, belly), L["fat"])
    cv.paint(tb, trunk(0.0), L["muscle"])
    cv.paint((Z(330), Z(930), -260, 260, -300, 300), trunk(-14.0 * Wl), L["fat"])  # body cavity
    # neck and head
    cv.paint((Z(180), Z(320), -120, 120, -120, 120),
             lambda z, y, x: (x / (52 * Wl + ft * 0.5)) ** 2 + ((y - 12) / (55 * Wl + ft * 0.5)) ** 2 <= 1, L["fat"])
    cv.paint((Z(180), Z(320), -120, 120, -120, 120),
             lambda z, y, x: (x / (50 * Wl)) ** 2 + ((y - 12) / (52 * Wl)) ** 2 <= 1, L["muscle"])
    hs = U(0.9, 1.08)
    fn, bx = ellipsoid((0, 5, Z(112)), (80 * hs, 100 * hs, Z(116)))
    cv.paint(bx, fn, L["soft_tissue"])
    fn, bx = ellipsoid((0, 10, Z(95)), (71 * hs, 89 * hs, Z(88)))
    cv.paint(bx, lambda z, y, x: fn(z, y, x) & (z < Z(168)), L["skull"])
    fn, bx = ellipsoid((0, 12, Z(92)), (62 * hs, 80 * hs, Z(68)))
    cv.paint(bx, fn, L["csf"])
    fn, bx = ellipsoid((0, 12, Z(93)), (59 * hs, 77 * hs, Z(65)))
    cv.paint(bx, fn, L["brain"])
    for s in (-1, 1):
        fn, bx = ellipsoid((s * 31 * hs, -70 * hs, Z(118)), (12, 12, 12))
        cv.paint(bx, fn, L["eye"])
        fn, bx = ellipsoid((s * 28 * hs, -55 * hs, Z(158)), (15, 18, 16))
        cv.paint(bx, fn, L["airway"])
    mand = lambda z, y, x: ((np.abs(((x / (52 * hs)) ** 2 + ((y + 5) / (78 * hs)) ** 2) - 1.0) < 0.16)  # noqa: E731
                            & (y < -5) & (z > Z(185)) & (z < Z(212)))
    cv.paint((Z(180), Z(220), -100, 0, -70, 70), mand, L["skull"])
    cv.paint((Z(150), Z(190), -90, -30, -45, 45),
             lambda z, y, x: (np.abs(x) < 40 * hs) & (y < -40 * hs) & (((x / (58 * hs)) ** 2 + ((y + 5) / (86 * hs)) ** 2) < 1.0)
             & ~(((x / (40 * hs)) ** 2 + ((y + 5) / (70 * hs)) ** 2) < 1.0), L["skull"])
    fn, bx = tube((0, -25, Z(215)), (0, -22, Z(480)), 9.0)
    cv.paint(bx, fn, L["airway"])

    # ---- arms -------------------------------------------------------------------------------
    arms_up = rng.random() < 0.5
    for s in (-1, 1):
        if arms_up:
            p0, p1 = (s * 150 * Wl, 20, Z(330)), (s * 125 * Wl, 10, Z(-250))
        else:
            xo = s * (ax(np.array(Z(500))) + ft + 45 * Wl)
            p0, p1 = (s * 160 * Wl, 10, Z(320)), (float(xo) + s * 10, 10, Z(1010))
        fn, bx = tube(p0, p1, 45 * Wl + ft * 0.7)
        cv.paint(bx, fn, L["fat"])
        fn, bx = tube(p0, p1, 40 * Wl)
        cv.paint(bx, fn, L["muscle"])
        mid = tuple(np.array(p0) + 0.45 * (np.array(p1) - np.array(p0)))
        fn, bx = tube(p0, mid, 11.0)
        cv.paint(bx, fn, L["other_bone"])
        q = np.array(mid) + 0.05 * (np.array(p1) - np.array(p0))
        for dx in (-12, 12):
            fn, bx = tube(tuple(q + [dx, 0, 0]), tuple(q + 0.5 * (np.array(p1) - q) + [dx, 0, 0]), 6.0)
            cv.paint(bx, fn, L["other_bone"])

    # ---- abdominal / pelvic contents ----------------------------------------------------------
    def cavity(r: float) -> Fn:
        f = trunk(-(14.0 + r) * Wl)
        return f
    cv.paint((Z(620), Z(870), -200, 200, -200, 200),
             lambda z, y, x: cavity(10)(z, y, x) & (y < spine_y(z) - 10), L["bowel"])
    for _ in range(int(U(20, 70))):  # gas in the loops and mesenteric fat between them
        c = (U(-110, 110) * Wl, U(-90, 30) * Wl, Z(U(620, 860)))
        r = U(4, 20)
        fn, bx = ellipsoid(c, (r, r * U(0.6, 1.4), r * U(0.6, 1.4)))
        cv.paint(bx, fn, L["gas"] if rng.random() < 0.45 else L["fat"], only=(L["bowel"],))
    for s in (-1, 1):  # psoas and paraspinal muscles
        fn, bx = tube((s * 30 * Wl, 40 * Wl, Z(620)), (s * 75 * Wl, -10 * Wl, Z(880)), 20 * Wl)
        cv.paint(bx, fn, L["muscle"])
        cv.paint((Z(330), Z(820), -50, 200, -120, 120),
                 lambda z, y, x, s=s: ((x - s * 38 * Wl) / (28 * Wl)) ** 2 + ((y - spine_y(z) - 48 * Wl) / (28 * Wl)) ** 2 <= 1,
                 L["muscle"])
    fn, bx = tube((0, 30, Z(830)), (0, 5, Z(930)), 16.0)  # rectum
    cv.paint(bx, fn, L["bowel"])
    fb = U(0.55, 1.7)
    fn, bx = ellipsoid((U(-10, 10), -48 * Wl, Z(885) - 10 * fb), (42 * fb * Wl, 36 * fb * Wl, 30 * fb))
    cv.paint(bx, fn, L["urinary_bladder"])
    # stomach (with gas cap) and liver
    fn, bx = ellipsoid((55 * Wl, -25 * Wl, Z(600)), (45 * Wl, 40 * Wl, Z(55)), 0.5)
    cv.paint(bx, fn, L["bowel"])
    cv.paint(bx, lambda z, y, x: fn(z, y, x) & (y < -45 * Wl), L["gas"])
    dome = {s: Z(U(525, 560)) + (10 if s > 0 else 0) for s in (-1, 1)}

    # The diaphragm: each dome is highest over the liver / spleen and falls steeply towards the
    # ribs, so the lungs reach down in a thin rim round the upper abdomen (the costophrenic recesses,
    # deepest behind), as real lung bases do on abdominal CT.
    rxd, ryd = float(ax(np.array(Z(545)))) - 16 * Wl, float(ay(np.array(Z(545)))) - 14 * Wl  # rib cage there
    d_lat, d_post = U(45, 75), U(20, 40)

    def below_dome(s: int) -> Fn:
        def fn(z, y, x):
            rho = np.sqrt((x / rxd) ** 2 + (y / ryd) ** 2)
            rim = np.clip((rho - 0.4) / 0.6, 0, 1) ** 2
            return z > (dome[s] + 15 * ((x - s * 70 * Wl) / (120 * Wl)) ** 2 + d_lat * rim
                        + d_post * np.clip(y / (110 * Wl), 0, 1) ** 2)
        return fn
    lv = U(0.85, 1.2)
    f1, b1 = ellipsoid((-65 * Wl, U(-10, 10), Z(605)), (88 * Wl * lv, 88 * Wl * lv, Z(80) * lv), U(-0.3, 0.1))
    ll = U(0.9, 1.35)  # the left lobe reaches across the midline, often well to the left
    f2, b2 = ellipsoid((15 * ll * Wl, -40 * Wl, Z(585)), (65 * ll * Wl * lv, 38 * Wl, Z(42) * lv), 0.3)
    bd = below_dome(-1); cav = cavity(0)
    cv.paint(b1, lambda z, y, x: f1(z, y, x) & bd(z, y, x) & cav(z, y, x), L["liver"])
    cv.paint(b2, lambda z, y, x: f2(z, y, x) & bd(z, y, x) & cav(z, y, x), L["liver"])
    if rng.random() < 0.6:  # a tongue of the right lobe reaching down beside the kidney (Riedel's lobe)
        tl = U(0.6, 1.2)
        f3, b3 = ellipsoid((-90 * Wl, U(-10, 25) * Wl, Z(655 + 25 * tl)), (U(22, 35) * Wl, 38 * Wl, Z(60) * tl), U(-0.3, 0.3))
        cv.paint(b3, lambda z, y, x: f3(z, y, x) & cav(z, y, x), L["liver"], only=(L["fat"], L["bowel"], L["muscle"]))
    sv = U(0.75, 1.4)
    fn, bx = ellipsoid((95 * Wl, 55 * Wl, Z(600)), (27 * sv, 52 * sv * Wl, Z(52) * sv), U(0.2, 0.7))
    cv.paint(bx, lambda z, y, x: fn(z, y, x) & cav(z, y, x) & below_dome(1)(z, y, x), L["spleen"])
    for s, name in ((1, "left_kidney"), (-1, "right_kidney")):
        kz = Z(655 + (12 if s < 0 else 0) + U(-15, 15))
        kv = U(0.85, 1.15)
        kx, ky, rot = s * U(68, 80) * Wl, U(45, 58) * Wl, s * U(0.2, 0.6)
        pf = U(6, 16)  # perirenal fat: on real CT the kidney sits in its own fat capsule
        tilt = s * math.tan(U(0.1, 0.35))  # coronal tilt: the upper pole lies nearer the midline
        fn, bx = sheared(*ellipsoid((kx, ky, kz), (27 * kv + pf, 30 * kv + pf, Z(55) * kv + pf), rot), kz, tilt)
        cv.paint(bx, fn, L["fat"], only=(L["bowel"], L["soft_tissue"], L["gas"]))
        fn, bx = sheared(*ellipsoid((kx, ky, kz), (27 * kv, 30 * kv, Z(55) * kv), rot), kz, tilt)
        soft = (L["fat"], L["bowel"], L["soft_tissue"], L["gas"], L["vessel"], L["liver"], L["spleen"])
        cv.paint(bx, fn, L[name], only=soft)  # not over the psoas, the back muscles or bone
        fnh, bxh = sheared(*ellipsoid((kx - s * 20 * Wl, ky - 10 * Wl, kz), (12, 14, 16)), kz, tilt)
        cv.paint(bxh, fnh, L["fat"], only=(L[name],))
    # vessels: descending aorta + arch, IVC
    cv.paint((Z(450), Z(790), -100, 200, -100, 100),
             lambda z, y, x: (x - 15) ** 2 + (y - spine_y(z) + 32 * Wl) ** 2 <= 12.0 ** 2, L["vessel"])
    fn, bx = tube((-20, -20 * Wl, Z(455)), (12, 30 * Wl, Z(440)), 13.0)
    cv.paint(bx, fn, L["vessel"])
    cv.paint((Z(560), Z(780), -100, 200, -100, 100),
             lambda z, y, x: (x + 25) ** 2 + (y - spine_y(z) + 30 * Wl) ** 2 <= 11.0 ** 2, L["vessel"])

    # ---- thorax -------------------------------------------------------------------------------
    def rib_axes(z):
        return ax(z) - 16 * Wl, ay(z) - 14 * Wl
    lv_ = U(0.9, 1.1)
    for s, name in ((1, "left_lung"), (-1, "right_lung")):
        def lung(z, y, x, s=s):
            rx, ry = rib_axes(z)
            rho = (x / rx) ** 2 + (y / ry) ** 2
            apex = np.clip((z - Z(318)) / Z(70), 0, 1)
            return ((rho < 0.86 * apex * lv_) & (s * x > 22 + 5 * np.clip((z - Z(400)) / 100, 0, 1))
                    & ~below_dome(s)(z, y, x) & (z > Z(318)))
        cv.paint((Z(310), Z(640), -200, 200, -220, 220), lung, L[name])
    hv = U(0.85, 1.15)
    fn, bx = ellipsoid((22 * Wl, -25 * Wl, Z(505)), (58 * hv * Wl, 48 * hv * Wl, Z(55) * hv), U(0.3, 0.7))
    cv.paint(bx, fn, L["heart"])
    fn, bx = tube((-10, -30 * Wl, Z(380)), (-5, -25 * Wl, Z(470)), 15.0)
    cv.paint(bx, fn, L["vessel"])

    # ---- skeleton -----------------------------------------------------------------------------
    paint_skeleton(cv, L, U, Z, Wl, ft, spine_y, rib_axes, ay)

    # ---- table and reconstruction circle ------------------------------------------------------
    lab = cv.lab
    if rng.random() < 0.75:
        body = lab > 0
        rows = np.nonzero(body.any(axis=(0, 2)))[0]
        if rows.size:
            y0 = rows.max() + int(U(0, 12) / sp) + 1
            th = max(int(U(6, 25) / sp), 1)
            cols = np.arange(lab.shape[2])
            curve = (((cols - lab.shape[2] / 2) * sp / 250.0) ** 2 * U(0, 40) / sp).astype(int)
            for j in range(th):
                rr = np.clip(y0 + j - curve, 0, lab.shape[1] - 1)
                sel = np.abs(cols - lab.shape[2] / 2) * sp < U(200, 260)
                lab[:, rr[sel], cols[sel]] = np.where(lab[:, rr[sel], cols[sel]] == 0, L["table"], lab[:, rr[sel], cols[sel]])
    if rng.random() < 0.5:
        n = lab.shape[1]
        c = (np.arange(n) - (n - 1) / 2) * sp
        circ = (c[None, :, None] ** 2 + c[None, None, :] ** 2) > (n * sp / 2 * U(0.88, 1.0)) ** 2
        lab[np.broadcast_to(circ, lab.shape)] = L["outside_fov"]

    aff = np.eye(4)
    aff[:3, 0] = (0, 0, -sp); aff[:3, 1] = (0, sp, 0); aff[:3, 2] = (sp, 0, 0)
    half = nxy * sp / 2
    aff[:3, 3] = (-half + sp / 2 + U(-50, 50), -half + sp / 2 + U(-50, 50), -fz0 + U(-300, 300))
    return lab, aff


def present_ctarr(labels: np.ndarray) -> list[int]:
    """CTARR class values (1..19) present in ``labels``."""
    vals = set(np.unique(labels).tolist())
    return [v for v in range(1, 20) if v in vals]
