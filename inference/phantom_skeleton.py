"""The skeleton of the procedural phantom (:mod:`inference.phantom`): vertebrae with their canal,
ribs with costal cartilage, scapulae, clavicles, sternum, sacrum, iliac wings, acetabula, pubic and
ischial rami, femurs and thighs. Split from :func:`inference.phantom.generate_phantom`, which calls
:func:`paint_skeleton` at the same point of its random draws (label maps are unchanged by the split).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from inference.phantom_shapes import Canvas, Fn, ellipsoid, tube


def ilium(s: int, Wl: float, Z: Callable[[float], float], spine_y: Callable, U: Callable) -> Fn:
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


def paint_skeleton(cv: Canvas, L: dict[str, int], U: Callable[..., float], Z: Callable, Wl: float, ft: float,
                   spine_y: Callable, rib_axes: Callable, ay: Callable) -> None:
    """Paint the skeleton onto ``cv`` (label values ``L``), drawing its random shape parameters from
    ``U`` (the phantom's ``rng.uniform``). ``Z`` maps reference heights to this patient, ``Wl`` is
    the lean girth scale, ``ft`` the subcutaneous fat (mm), ``spine_y(z)`` the vertebral body centre,
    ``rib_axes(z)`` the rib cage's semi-axes, ``ay(z)`` the trunk's antero-posterior semi-axis."""
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
        fn, bx = ellipsoid((s * 95 * Wl, 0.0, Z(410)), (48 * Wl, 6, Z(70)), 0)

        def scap(z, y, x, s=s):
            rx, ry = rib_axes(np.clip(z, Z(340), Z(560)))
            yb = ry * np.sqrt(np.clip(1 - (x / rx) ** 2, 0, 1)) + 14
            return (((x - s * 90 * Wl) / (45 * Wl)) ** 2 + ((z - Z(410)) / Z(75)) ** 2 <= 1) & (np.abs(y - yb) < 5)
        cv.paint((Z(330), Z(490), 0, 220, -220, 220), scap, L[name])
        fn, bx = tube((s * 22, -ay(np.array(Z(340))) + 8, Z(338)), (s * 150 * Wl, 10, Z(322)), 7.0)
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
        cv.paint((Z(700), Z(885), -120, 160, -200, 200), ilium(s, Wl, Z, spine_y, U), L[name])
        ac = (s * 95 * Wl, -8 * Wl, Z(878))
        fn, bx = ellipsoid(ac, (36, 36, 34))
        cv.paint(bx, fn, L[name])
        fn, bx = tube((s * 70 * Wl, 5 * Wl, Z(850)), ac, 14)
        cv.paint(bx, fn, L[name])
        fn, bx = tube(ac, (s * 10, -52 * Wl, Z(905)), 10)
        cv.paint(bx, fn, L[name])
        fn, bx = tube(ac, (s * 60 * Wl, 30 * Wl, Z(935)), 14)
        cv.paint(bx, fn, L[name])
        fn, bx = tube((s * 60 * Wl, 30 * Wl, Z(935)), (s * 12, -50 * Wl, Z(915)), 7)
        cv.paint(bx, fn, L[name])
        # femur (other bone) and thigh
        fn, bx = ellipsoid(ac, (24, 24, 24))
        cv.paint(bx, fn, L["other_bone"])
        gt = (s * 130 * Wl, 5 * Wl, Z(905))
        fn, bx = tube(ac, gt, 15); cv.paint(bx, fn, L["other_bone"])
        fn, bx = ellipsoid(gt, (18, 20, 24)); cv.paint(bx, fn, L["other_bone"])
        knee = (s * 95 * Wl, -5, Z(1350))
        for r, lab in ((85 * Wl + ft, "fat"), (78 * Wl, "muscle")):
            fn, bx = tube((s * 105 * Wl, 0, Z(930)), knee, r)
            cv.paint(bx, lambda z, y, x, fn=fn: fn(z, y, x) & (z > Z(930)), L[lab])
        fn, bx = tube(gt, knee, 13); cv.paint(bx, fn, L["other_bone"])
