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
from typing import Callable

import numpy as np

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

Mask = np.ndarray
Fn = Callable[[np.ndarray, np.ndarray, np.ndarray], Mask]


def _interp(z: np.ndarray, zs: list[float], vs: list[float]) -> np.ndarray:
    return np.interp(z, zs, vs)


class _Canvas:
    """Label grid + body-frame <-> index transform (yaw about z, xy shift)."""

    def __init__(self, shape: tuple[int, int, int], sp: float, z0: float, half: float,
                 yaw: float, shift: tuple[float, float]) -> None:
        self.lab = np.zeros(shape, np.int16)
        self.sp, self.z0, self.half = sp, z0, half
        self.c, self.s = math.cos(yaw), math.sin(yaw)
        self.tx, self.ty = shift

    def _world_xy(self, xb: np.ndarray, yb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.c * xb - self.s * yb + self.tx, self.s * xb + self.c * yb + self.ty

    def paint(self, box: tuple[float, float, float, float, float, float], fn: Fn, value: int,
              only: tuple[int, ...] | None = None) -> None:
        """Set ``value`` where ``fn(z, y, x)`` (body mm) is true inside body box (z0,z1,y0,y1,x0,x1)."""
        z0, z1, y0, y1, x0, x1 = box
        nz, ny, nx = self.lab.shape
        k0 = max(int(math.floor((z0 - self.z0) / self.sp)), 0)
        k1 = min(int(math.ceil((z1 - self.z0) / self.sp)) + 1, nz)
        cx = np.array([x0, x1, x0, x1]); cy = np.array([y0, y0, y1, y1])
        wx, wy = self._world_xy(cx, cy)
        i0 = max(int(math.floor((wx.min() + self.half) / self.sp)), 0)
        i1 = min(int(math.ceil((wx.max() + self.half) / self.sp)) + 1, nx)
        j0 = max(int(math.floor((wy.min() + self.half) / self.sp)), 0)
        j1 = min(int(math.ceil((wy.max() + self.half) / self.sp)) + 1, ny)
        if k0 >= k1 or i0 >= i1 or j0 >= j1:
            return
        z = (self.z0 + self.sp * np.arange(k0, k1))[:, None, None]
        X = (-self.half + self.sp * (np.arange(i0, i1) + 0.5))[None, None, :] - self.tx
        Y = (-self.half + self.sp * (np.arange(j0, j1) + 0.5))[None, :, None] - self.ty
        xb = self.c * X + self.s * Y
        yb = -self.s * X + self.c * Y
        m = np.broadcast_to(fn(z, yb, xb), (k1 - k0, j1 - j0, i1 - i0))
        sub = self.lab[k0:k1, j0:j1, i0:i1]
        if only is not None:
            m = m & np.isin(sub, only)
        sub[m] = value


def _ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float], rot: float = 0.0) -> tuple[Fn, tuple]:
    """Ellipsoid centre (x, y, z), semi-axes (x, y, z), rotated by ``rot`` rad about z."""
    cx, cy, cz = c; rx, ry, rz = r
    co, si = math.cos(rot), math.sin(rot)

    def fn(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> Mask:
        dx, dy = x - cx, y - cy
        u, v = co * dx + si * dy, -si * dx + co * dy
        return (u / rx) ** 2 + (v / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    m = max(rx, ry)
    return fn, (cz - rz, cz + rz, cy - m, cy + m, cx - m, cx + m)


def _sheared(f: Fn, box: tuple, z0: float, slope: float) -> tuple[Fn, tuple]:
    """Shape ``f`` (with its box) sheared in x: at height z it is moved by ``slope * (z - z0)`` mm."""
    w = abs(slope) * (box[1] - box[0]) / 2
    return (lambda z, y, x: f(z, y, x - slope * (z - z0))), (box[0], box[1], box[2], box[3], box[4] - w, box[5] + w)


def _tube(p0: tuple[float, float, float], p1: tuple[float, float, float], rad: float) -> tuple[Fn, tuple]:
    """Capsule between points (x, y, z) with radius ``rad``."""
    a, b = np.array(p0, float), np.array(p1, float)
    d = b - a; L2 = float(d @ d) or 1.0

    def fn(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> Mask:
        t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / L2, 0, 1)
        return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= rad * rad
    lo, hi = np.minimum(a, b) - rad, np.maximum(a, b) + rad
    return fn, (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])


def _ilium(s: int, Wl: float, Z: Callable[[float], float], spine_y: Callable, U: Callable) -> Fn:
    """Iliac wing of side ``s`` (+1 left): in each axial slice a slightly bowed plate from the
    sacroiliac joint (behind, beside the sacrum) to the anterior rim, which runs from the anterior
    superior spine down to the acetabulum; thicker towards the bottom.

    The crest is not level: its highest point is posterolateral (the iliac tubercle), and it falls
    20-35 mm towards the back and 45-65 mm towards the anterior superior spine. In real CT the
    top slices of the crest are therefore a short oblique bar behind the flank, like a lower rib,
    which grows forwards and backwards slice by slice (measured on a real abdomen CT at 3 mm).
    """
    zc, za = Z(U(712, 742)), Z(878)
    sy = float(spine_y(np.array(Z(772))))
    asis = (U(115, 135) * Wl, U(-55, -30) * Wl)
    bulge = U(8, 22) * Wl                                            # lateral bowing of the wing (mm)
    kp, a_post, a_ant = U(0.25, 0.45), Z(U(20, 35)), Z(U(45, 65))   # crest: top, falls back / forwards
    k = np.linspace(0.0, 1.0, 24)
    drop = np.where(k < kp, a_post * ((kp - k) / kp) ** 2, a_ant * ((k - kp) / (1 - kp)) ** 2)

    def fn(z, y, x):
        t = np.clip((z - zc) / (za - zc), 0, 1)[..., None]          # (nz,1,1,1) crest -> acetabulum
        ta = np.clip((z - zc - a_ant) / (za - zc - a_ant), 0, 1)[..., None]  # from the anterior spine
        px0, py0 = 48 * Wl + 6 * t, sy + 30 - 20 * t                 # sacroiliac joint
        px1 = asis[0] + (95 * Wl - asis[0]) * ta                     # anterior rim
        py1 = asis[1] + (-8 * Wl - asis[1]) * ta
        qx = (px0 + px1) / 2 + 2 * bulge; qy = (py0 + py1) / 2       # control point: lateral bowing
        bx = (1 - k) ** 2 * px0 + 2 * k * (1 - k) * qx + k ** 2 * px1
        by = (1 - k) ** 2 * py0 + 2 * k * (1 - k) * qy + k ** 2 * py1
        d2 = ((s * x)[..., None] - bx) ** 2 + (y[..., None] - by) ** 2
        d2 = np.where(z[..., None] >= zc + drop, d2, np.inf)         # below the crest at each point
        th = 5.0 + 9.0 * t[..., 0] + 8.0 * np.exp(-((s * x - 48 * Wl) / 20.0) ** 2)  # half thickness (mm)
        return (d2.min(-1) <= th ** 2) & (z >= zc) & (z <= za)
    return fn


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
    cv = _Canvas((nz, nxy, nxy), sp, fz0, nxy * sp / 2, U(-0.12, 0.12), shift)
    L = LABELS
    Z = lambda v: v * H  # noqa: E731  reference z (mm) -> this patient

    # ---- trunk profile (lean) ---------------------------------------------------------------
    zp = [Z(v) for v in (270, 300, 335, 400, 500, 570, 650, 750, 850, 930)]
    axp = [w * Wl for w in (55, 140, 165, 160, 158, 150, 145, 152, 170, 175)]
    ayp = [w * Wl for w in (55, 85, 95, 105, 112, 112, 110, 108, 108, 100)]
    bz = [Z(v) for v in (560, 620, 700, 780, 860)]; bv = [0, 0.6, 1.0, 0.7, 0.2]

    def ax(z): return _interp(z, zp, axp)
    def ay(z): return _interp(z, zp, ayp)

    lord = U(10, 28)  # lumbar lordosis: how far L3/L4 lies in front of the L1-S1 line (mm)

    def spine_y(z):  # vertebral body centre (posterior +)
        return _interp(z, [Z(v) for v in (200, 330, 450, 600, 650, 700, 745, 780)],
                       [w * Wl for w in (10, 30, 55, 45, 45 - 0.7 * lord, 45 - lord, 45 - 0.6 * lord, 45)])

    def trunk(extra: float, ant_extra: float = 0.0) -> Fn:
        def fn(z, y, x):
            a = ax(z) + extra
            bb = np.where(y < 0, ay(z) + extra + ant_extra * _interp(z, bz, bv), ay(z) + extra)
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
    fn, bx = _ellipsoid((0, 5, Z(112)), (80 * hs, 100 * hs, Z(116)))
    cv.paint(bx, fn, L["soft_tissue"])
    fn, bx = _ellipsoid((0, 10, Z(95)), (71 * hs, 89 * hs, Z(88)))
    cv.paint(bx, lambda z, y, x: fn(z, y, x) & (z < Z(168)), L["skull"])
    fn, bx = _ellipsoid((0, 12, Z(92)), (62 * hs, 80 * hs, Z(68)))
    cv.paint(bx, fn, L["csf"])
    fn, bx = _ellipsoid((0, 12, Z(93)), (59 * hs, 77 * hs, Z(65)))
    cv.paint(bx, fn, L["brain"])
    for s in (-1, 1):
        fn, bx = _ellipsoid((s * 31 * hs, -70 * hs, Z(118)), (12, 12, 12))
        cv.paint(bx, fn, L["eye"])
        fn, bx = _ellipsoid((s * 28 * hs, -55 * hs, Z(158)), (15, 18, 16))
        cv.paint(bx, fn, L["airway"])
    mand = lambda z, y, x: ((np.abs(((x / (52 * hs)) ** 2 + ((y + 5) / (78 * hs)) ** 2) - 1.0) < 0.16)  # noqa: E731
                            & (y < -5) & (z > Z(185)) & (z < Z(212)))
    cv.paint((Z(180), Z(220), -100, 0, -70, 70), mand, L["skull"])
    cv.paint((Z(150), Z(190), -90, -30, -45, 45),
             lambda z, y, x: (np.abs(x) < 40 * hs) & (y < -40 * hs) & (((x / (58 * hs)) ** 2 + ((y + 5) / (86 * hs)) ** 2) < 1.0)
             & ~(((x / (40 * hs)) ** 2 + ((y + 5) / (70 * hs)) ** 2) < 1.0), L["skull"])
    fn, bx = _tube((0, -25, Z(215)), (0, -22, Z(480)), 9.0)
    cv.paint(bx, fn, L["airway"])

    # ---- arms -------------------------------------------------------------------------------
    arms_up = rng.random() < 0.5
    for s in (-1, 1):
        if arms_up:
            p0, p1 = (s * 150 * Wl, 20, Z(330)), (s * 125 * Wl, 10, Z(-250))
        else:
            xo = s * (ax(np.array(Z(500))) + ft + 45 * Wl)
            p0, p1 = (s * 160 * Wl, 10, Z(320)), (float(xo) + s * 10, 10, Z(1010))
        fn, bx = _tube(p0, p1, 45 * Wl + ft * 0.7)
        cv.paint(bx, fn, L["fat"])
        fn, bx = _tube(p0, p1, 40 * Wl)
        cv.paint(bx, fn, L["muscle"])
        mid = tuple(np.array(p0) + 0.45 * (np.array(p1) - np.array(p0)))
        fn, bx = _tube(p0, mid, 11.0)
        cv.paint(bx, fn, L["other_bone"])
        q = np.array(mid) + 0.05 * (np.array(p1) - np.array(p0))
        for dx in (-12, 12):
            fn, bx = _tube(tuple(q + [dx, 0, 0]), tuple(q + 0.5 * (np.array(p1) - q) + [dx, 0, 0]), 6.0)
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
        fn, bx = _ellipsoid(c, (r, r * U(0.6, 1.4), r * U(0.6, 1.4)))
        cv.paint(bx, fn, L["gas"] if rng.random() < 0.45 else L["fat"], only=(L["bowel"],))
    for s in (-1, 1):  # psoas and paraspinal muscles
        fn, bx = _tube((s * 30 * Wl, 40 * Wl, Z(620)), (s * 75 * Wl, -10 * Wl, Z(880)), 20 * Wl)
        cv.paint(bx, fn, L["muscle"])
        cv.paint((Z(330), Z(820), -50, 200, -120, 120),
                 lambda z, y, x, s=s: ((x - s * 38 * Wl) / (28 * Wl)) ** 2 + ((y - spine_y(z) - 48 * Wl) / (28 * Wl)) ** 2 <= 1,
                 L["muscle"])
    fn, bx = _tube((0, 30, Z(830)), (0, 5, Z(930)), 16.0)  # rectum
    cv.paint(bx, fn, L["bowel"])
    fb = U(0.55, 1.7)
    fn, bx = _ellipsoid((U(-10, 10), -48 * Wl, Z(885) - 10 * fb), (42 * fb * Wl, 36 * fb * Wl, 30 * fb))
    cv.paint(bx, fn, L["urinary_bladder"])
    # stomach (with gas cap) and liver
    fn, bx = _ellipsoid((55 * Wl, -25 * Wl, Z(600)), (45 * Wl, 40 * Wl, Z(55)), 0.5)
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
    f1, b1 = _ellipsoid((-65 * Wl, U(-10, 10), Z(605)), (88 * Wl * lv, 88 * Wl * lv, Z(80) * lv), U(-0.3, 0.1))
    ll = U(0.9, 1.35)  # the left lobe reaches across the midline, often well to the left
    f2, b2 = _ellipsoid((15 * ll * Wl, -40 * Wl, Z(585)), (65 * ll * Wl * lv, 38 * Wl, Z(42) * lv), 0.3)
    bd = below_dome(-1); cav = cavity(0)
    cv.paint(b1, lambda z, y, x: f1(z, y, x) & bd(z, y, x) & cav(z, y, x), L["liver"])
    cv.paint(b2, lambda z, y, x: f2(z, y, x) & bd(z, y, x) & cav(z, y, x), L["liver"])
    if rng.random() < 0.6:  # a tongue of the right lobe reaching down beside the kidney (Riedel's lobe)
        tl = U(0.6, 1.2)
        f3, b3 = _ellipsoid((-90 * Wl, U(-10, 25) * Wl, Z(655 + 25 * tl)), (U(22, 35) * Wl, 38 * Wl, Z(60) * tl), U(-0.3, 0.3))
        cv.paint(b3, lambda z, y, x: f3(z, y, x) & cav(z, y, x), L["liver"], only=(L["fat"], L["bowel"], L["muscle"]))
    sv = U(0.75, 1.4)
    fn, bx = _ellipsoid((95 * Wl, 55 * Wl, Z(600)), (27 * sv, 52 * sv * Wl, Z(52) * sv), U(0.2, 0.7))
    cv.paint(bx, lambda z, y, x: fn(z, y, x) & cav(z, y, x) & below_dome(1)(z, y, x), L["spleen"])
    for s, name in ((1, "left_kidney"), (-1, "right_kidney")):
        kz = Z(655 + (12 if s < 0 else 0) + U(-15, 15))
        kv = U(0.85, 1.15)
        kx, ky, rot = s * U(68, 80) * Wl, U(45, 58) * Wl, s * U(0.2, 0.6)
        pf = U(6, 16)  # perirenal fat: on real CT the kidney sits in its own fat capsule
        tilt = s * math.tan(U(0.1, 0.35))  # coronal tilt: the upper pole lies nearer the midline
        fn, bx = _sheared(*_ellipsoid((kx, ky, kz), (27 * kv + pf, 30 * kv + pf, Z(55) * kv + pf), rot), kz, tilt)
        cv.paint(bx, fn, L["fat"], only=(L["bowel"], L["soft_tissue"], L["gas"]))
        fn, bx = _sheared(*_ellipsoid((kx, ky, kz), (27 * kv, 30 * kv, Z(55) * kv), rot), kz, tilt)
        soft = (L["fat"], L["bowel"], L["soft_tissue"], L["gas"], L["vessel"], L["liver"], L["spleen"])
        cv.paint(bx, fn, L[name], only=soft)  # not over the psoas, the back muscles or bone
        fnh, bxh = _sheared(*_ellipsoid((kx - s * 20 * Wl, ky - 10 * Wl, kz), (12, 14, 16)), kz, tilt)
        cv.paint(bxh, fnh, L["fat"], only=(L[name],))
    # vessels: descending aorta + arch, IVC
    cv.paint((Z(450), Z(790), -100, 200, -100, 100),
             lambda z, y, x: (x - 15) ** 2 + (y - spine_y(z) + 32 * Wl) ** 2 <= 12.0 ** 2, L["vessel"])
    fn, bx = _tube((-20, -20 * Wl, Z(455)), (12, 30 * Wl, Z(440)), 13.0)
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
    fn, bx = _ellipsoid((22 * Wl, -25 * Wl, Z(505)), (58 * hv * Wl, 48 * hv * Wl, Z(55) * hv), U(0.3, 0.7))
    cv.paint(bx, fn, L["heart"])
    fn, bx = _tube((-10, -30 * Wl, Z(380)), (-5, -25 * Wl, Z(470)), 15.0)
    cv.paint(bx, fn, L["vessel"])

    # ---- skeleton -----------------------------------------------------------------------------
    verts = [("cervical_vertebrae", 7, 190, 330), ("thoracic_vertebrae", 12, 330, 600),
             ("lumbar_vertebrae", 5, 600, 772)]
    vtops: list[float] = []
    for name, n, za, zb in verts:
        h = Z(zb - za) / n
        for i in range(n):
            zt = Z(za) + i * h; vtops.append(zt)
            rv = (11 + 13 * (Z(za) + i * h - Z(190)) / Z(580)) * Wl ** 0.5
            cr = 0.42 * rv + 3  # spinal canal radius

            def vert(z, y, x, zt=zt, h=h, rv=rv, cr=cr, lumbar=name == "lumbar_vertebrae"):
                # body; behind it pedicles and laminae round the spinal canal (a ring open to the
                # front, closed by the body), the spinous process, and transverse processes in the
                # upper part of the vertebra: straight out (lumbar) or angled back (cervical,
                # thoracic, where the ribs articulate). Real lumbar canals are ~20-25 mm wide.
                yc = spine_y(z)
                u = (z - zt) / h
                inz = (u > 0.12) & (u < 0.92)
                body = (x / (rv * 1.15)) ** 2 + ((y - yc) / rv) ** 2 <= 1
                cy = yc + rv + 0.8 * cr
                rr = np.sqrt(x ** 2 + (y - cy) ** 2)
                arch = (rr >= cr) & (rr <= cr + 6) & (y > cy - 0.2 * cr)
                pedicle = (np.abs(np.abs(x) - cr - 2) < 4) & (y > yc) & (y <= cy)
                spin = (np.abs(x) < 4) & (y > cy + cr) & (y < cy + cr + 16 + rv * 0.5)
                ax_, ay_ = (1.0, 0.0) if lumbar else (0.87, 0.5)        # direction of the process
                px, py = np.abs(x) - cr - 2, y - cy                      # from the pedicle
                along = px * ax_ + py * ay_
                trans = (u > 0.2) & (u < 0.6) & (along > 0) & (along < rv + 12) & (np.abs(-px * ay_ + py * ax_) < 5)
                return inz & (body | arch | pedicle | spin | trans)
            cv.paint((zt, zt + h, -100, 200, -80, 80), vert, L[name])
            cv.paint((zt, zt + h, -100, 200, -80, 80),
                     lambda z, y, x, rv=rv, cr=cr: x ** 2 + (y - spine_y(z) - rv - 0.8 * cr) ** 2 < (cr - 1) ** 2,
                     L["csf"])
    # ribs: 12 pairs starting at the thoracic vertebrae
    t_tops = vtops[7:19]
    for i, zt in enumerate(t_tops):
        reach = 0.93 if i < 7 else (0.78 if i < 10 else 0.55)
        drop = Z(30 + 6 * i)
        for s, name in ((1, "left_ribs_scapula_clavicle"), (-1, "right_ribs_scapula_clavicle")):
            def rib(z, y, x, zt=zt, reach=reach, drop=drop, s=s):
                zr = np.clip(zt, Z(330), None)
                rx, ry = rib_axes(np.clip(zr + drop * 0.5, None, Z(640)))
                th = np.arctan2(s * x / rx, y / ry) / math.pi  # 0 at spine, 1 at sternum
                rho = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
                zc = zt + 8 + drop * np.clip(th, 0, 1) ** 1.3
                return (th > 0.1) & (th < reach) & (np.abs(z - zc) < 6.0) & (np.abs(rho - 1) * rx < 5.0)
            cv.paint((zt - 10, zt + drop + 30, -220, 220, -260, 260), rib, L[name])
            if reach > 0.9:  # costal cartilage to the sternum
                def cart(z, y, x, zt=zt, drop=drop, s=s):
                    rx, ry = rib_axes(np.clip(zt + drop * 0.5, None, Z(640)))
                    th = np.arctan2(s * x / rx, y / ry) / math.pi
                    rho = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
                    return (th >= 0.93) & (np.abs(z - (zt + 8 + drop)) < 6) & (np.abs(rho - 1) * rx < 5)
                cv.paint((zt - 10, zt + drop + 30, -220, 0, -120, 120), cart, L["cartilage"])
    for s, name in ((1, "left_ribs_scapula_clavicle"), (-1, "right_ribs_scapula_clavicle")):
        fn, bx = _ellipsoid((s * 95 * Wl, 0.0, Z(410)), (48 * Wl, 6, Z(70)), 0)

        def scap(z, y, x, s=s):
            rx, ry = rib_axes(np.clip(z, Z(340), Z(560)))
            yb = ry * np.sqrt(np.clip(1 - (x / rx) ** 2, 0, 1)) + 14
            return (((x - s * 90 * Wl) / (45 * Wl)) ** 2 + ((z - Z(410)) / Z(75)) ** 2 <= 1) & (np.abs(y - yb) < 5)
        cv.paint((Z(330), Z(490), 0, 220, -220, 220), scap, L[name])
        fn, bx = _tube((s * 22, -ay(np.array(Z(340))) + 8, Z(338)), (s * 150 * Wl, 10, Z(322)), 7.0)
        cv.paint(bx, fn, L[name])
    cv.paint((Z(338), Z(545), -220, 0, -40, 40),
             lambda z, y, x: (np.abs(x) < np.where(z < Z(380), 25, 15)) & (y < -ay(z) + 26 * Wl) & (y > -ay(z) + 12 * Wl),
             L["sternum"])
    # sacrum, hips, femurs
    sac_len, sac_tilt = Z(U(95, 125)), U(40, 70)  # the sacrum runs back from the promontory (S1), tip behind
    sac_ala = U(10, 16)

    def sacrum(z, y, x):
        t = np.clip((z - Z(772)) / sac_len, 0, 1)
        yc = spine_y(np.array(Z(772))) + sac_tilt * (1 - (1 - t) ** 1.6)  # steepest at S1, concave in front
        body = (x / (28 - 12 * t)) ** 2 + ((y - yc) / (18 - 7 * t)) ** 2 <= 1  # sacral bodies
        ala = (x / (55 - 42 * t)) ** 2 + ((y - yc - 4) / (sac_ala - 4 * t)) ** 2 <= 1  # thinner wings
        return (z >= Z(772)) & (z < Z(772) + sac_len) & (body | ala)
    cv.paint((Z(770), Z(900), -100, 250, -80, 80), sacrum, L["sacrum"])
    for s, name in ((1, "left_hip"), (-1, "right_hip")):
        cv.paint((Z(700), Z(885), -120, 160, -200, 200), _ilium(s, Wl, Z, spine_y, U), L[name])
        ac = (s * 95 * Wl, -8 * Wl, Z(878))
        fn, bx = _ellipsoid(ac, (36, 36, 34))
        cv.paint(bx, fn, L[name])
        fn, bx = _tube((s * 70 * Wl, 5 * Wl, Z(850)), ac, 14)
        cv.paint(bx, fn, L[name])
        fn, bx = _tube(ac, (s * 10, -52 * Wl, Z(905)), 10)
        cv.paint(bx, fn, L[name])
        fn, bx = _tube(ac, (s * 60 * Wl, 30 * Wl, Z(935)), 14)
        cv.paint(bx, fn, L[name])
        fn, bx = _tube((s * 60 * Wl, 30 * Wl, Z(935)), (s * 12, -50 * Wl, Z(915)), 7)
        cv.paint(bx, fn, L[name])
        # femur (other bone) and thigh
        fn, bx = _ellipsoid(ac, (24, 24, 24))
        cv.paint(bx, fn, L["other_bone"])
        gt = (s * 130 * Wl, 5 * Wl, Z(905))
        fn, bx = _tube(ac, gt, 15); cv.paint(bx, fn, L["other_bone"])
        fn, bx = _ellipsoid(gt, (18, 20, 24)); cv.paint(bx, fn, L["other_bone"])
        knee = (s * 95 * Wl, -5, Z(1350))
        for r, lab in ((85 * Wl + ft, "fat"), (78 * Wl, "muscle")):
            fn, bx = _tube((s * 105 * Wl, 0, Z(930)), knee, r)
            cv.paint(bx, lambda z, y, x, fn=fn: fn(z, y, x) & (z > Z(930)), L[lab])
        fn, bx = _tube(gt, knee, 13); cv.paint(bx, fn, L["other_bone"])

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
